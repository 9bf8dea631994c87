"""The one list of policies: names, aliases, knobs, and how to build one.

A policy is a class with `name`, `bounded`, `knobs` (a tuple of `Knob`) and
optionally `aliases` and `summary`, decorated with `@register_policy`. The
server's flags, the CLI, the bench and the per-request checks read this
registry when they run, so a new policy needs no change anywhere else.
"""

from __future__ import annotations

import inspect
import re

from .base import PART, REST, Knob, Policy

_CLASSES: dict[str, type] = {}  # canonical name -> class
_ALIASES: dict[str, str] = {}  # alias -> canonical name
_RESERVED_KNOBS = ("name", "cache_size")  # keys `to_dict` writes besides the knobs


class PolicyError(ValueError):
    """A policy name or knob value refused; `knob` names the knob it is about
    (None when it is about the name), so callers can name their own flag or field."""

    def __init__(self, message: str, knob: str | None = None):
        super().__init__(message)
        self.knob = knob


def _key(name) -> str:
    return str(name).strip().lower()


def register_policy(cls: type) -> type:
    """Class decorator: offer `cls` under `cls.name` (and `cls.aliases`).

    Checks the declaration, so a mistake fails at import instead of as a
    strange flag: knob names are constructor keywords with the declared
    defaults, a knob shared with another policy has the same type and choices,
    and at most one knob is the budget's REST.
    """
    name = _key(getattr(cls, "name", ""))
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ValueError(f"{cls.__name__}.name must be a lower-case word, got {name!r}")
    if name in _CLASSES or name in _ALIASES:
        if _CLASSES.get(name) is cls:
            return cls
        raise ValueError(f"policy name {name!r} is already registered")
    if not isinstance(getattr(cls, "bounded", None), bool):
        raise ValueError(f"{cls.__name__}.bounded must be True or False")
    knobs = tuple(getattr(cls, "knobs", ()))
    _check_knobs(cls, knobs)
    aliases = tuple(_key(a) for a in getattr(cls, "aliases", ()))
    for alias in aliases:
        if alias in _CLASSES or alias in _ALIASES or alias == name:
            raise ValueError(f"alias {alias!r} of policy {name!r} is already a policy name or alias")
    _CLASSES[name] = cls
    _ALIASES.update(dict.fromkeys(aliases, name))
    return cls


def _check_knobs(cls: type, knobs: tuple) -> None:
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    seen = set()
    for knob in knobs:
        if not isinstance(knob, Knob):
            raise ValueError(f"{cls.__name__}.knobs must hold Knob entries, got {knob!r}")
        if knob.name in seen or knob.name in _RESERVED_KNOBS or not knob.name.isidentifier():
            raise ValueError(f"{cls.__name__}: knob name {knob.name!r} is repeated or reserved")
        seen.add(knob.name)
        param = params.get(knob.name)
        if param is None and not takes_any:
            raise ValueError(f"{cls.__name__}: knob {knob.name!r} is not a constructor keyword")
        if param is not None and param.default is not inspect.Parameter.empty \
                and param.default != knob.default:
            raise ValueError(f"{cls.__name__}: knob {knob.name!r} declares default {knob.default!r}"
                             f" but the constructor's is {param.default!r}")
        for other, theirs in knob_users().get(knob.name, []):
            if (theirs.type, theirs.choices) != (knob.type, knob.choices):
                raise ValueError(f"{cls.__name__}: knob {knob.name!r} differs in type or choices"
                                 f" from policy {other.name!r}'s")
    if sum(k.budget == REST for k in knobs) > 1:
        raise ValueError(f"{cls.__name__}: at most one knob can take the rest of the budget")


def unregister_policy(name: str) -> None:
    """Withdraw a policy and its aliases (for tests and plugins)."""
    key = _key(name)
    _CLASSES.pop(key, None)
    for alias in [a for a, target in _ALIASES.items() if target == key]:
        del _ALIASES[alias]


def _order(cls: type) -> tuple:
    return (not cls.bounded, cls.name)  # bounded first, then by name: stable help and choices


def policy_names(bounded: bool | None = None) -> tuple[str, ...]:
    """Canonical names, bounded policies first; only those with `bounded` if given."""
    return tuple(c.name for c in sorted(_CLASSES.values(), key=_order)
                 if bounded is None or c.bounded == bounded)


def policy_aliases() -> dict[str, str]:
    """alias -> canonical name (e.g. none -> full)."""
    return dict(_ALIASES)


def names_with_aliases(bounded: bool | None = None) -> tuple[str, ...]:
    """Canonical names then their aliases: what a `choices=` list offers."""
    names = policy_names(bounded)
    return names + tuple(a for a, target in _ALIASES.items() if target in names)


def policy_class(name) -> type:
    """The class registered under `name` or one of its aliases."""
    key = _key(name)
    cls = _CLASSES.get(_ALIASES.get(key, key))
    if cls is None:
        raise PolicyError(f"unknown policy {name!r}; choose one of {', '.join(names_with_aliases())}")
    return cls


def canonical_name(name) -> str:
    return policy_class(name).name


def knobs_of(name) -> tuple[Knob, ...]:
    return tuple(policy_class(name).knobs)


def knob_users(bounded: bool | None = None) -> dict[str, list[tuple[type, Knob]]]:
    """knob name -> [(policy class, its Knob), ...], in policy order."""
    users: dict[str, list[tuple[type, Knob]]] = {}
    for cls in sorted(_CLASSES.values(), key=_order):
        if bounded is None or cls.bounded == bounded:
            for knob in cls.knobs:
                users.setdefault(knob.name, []).append((cls, knob))
    return users


def _knob_named_in(message: str, names) -> str | None:
    """The knob a constructor's message names first (its messages start with it)."""
    hits = [(m.start(), n) for n in names if (m := re.search(rf"\b{re.escape(n)}\b", message))]
    return min(hits)[1] if hits else None


def make_policy(name: str, **knobs) -> Policy:
    """Build a policy by name; knobs set to None are ignored (unset CLI flags).

    A `cache_size` knob (as written by `to_dict`) is accepted when it matches
    the budget the other knobs give, so `make_policy(**p.to_dict())` round-trips.
    Raises PolicyError (a ValueError) naming the knob at fault.
    """
    cls = policy_class(name)
    knobs = {k: v for k, v in knobs.items() if v is not None}
    cache_size = knobs.pop("cache_size", None)
    allowed = [k.name for k in cls.knobs]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise PolicyError(f"unknown knob(s) for policy {cls.name!r}: {', '.join(unknown)}"
                          f" (allowed: {', '.join(allowed) or 'none'})", knob=unknown[0])
    try:
        policy = cls(**knobs)
    except (TypeError, ValueError) as e:
        raise PolicyError(str(e), knob=_knob_named_in(str(e), allowed)) from None
    if cache_size is not None and cache_size != policy.cache_size:
        raise PolicyError(f"cache_size {cache_size} does not match the knobs of policy {cls.name!r}"
                          f" (they give {policy.cache_size})", knob="cache_size")
    return policy


def fit_budget(name: str, budget: int | None, **knobs) -> Policy:
    """make_policy, with the REST knob (if unset) taking what `budget` leaves
    after the PART knobs (given or default): how a task's or a benchmark's
    total budget becomes sirllm's entropy_size or streaming's recent window."""
    cls = policy_class(name)
    knobs = {k: v for k, v in knobs.items() if v is not None}
    rest = next((k for k in cls.knobs if k.budget == REST), None)
    parts = [knobs.get(k.name, k.default) for k in cls.knobs if k.budget == PART]
    if budget is not None and rest is not None and rest.name not in knobs \
            and all(isinstance(v, int) for v in parts):
        knobs[rest.name] = budget - sum(parts)
    return make_policy(cls.name, **knobs)


def knob_values(policy: Policy) -> dict:
    """The declared knobs of a built policy, from its `to_dict`."""
    d = policy.to_dict()
    return {k.name: d[k.name] for k in type(policy).knobs if k.name in d}


def budget_knobs(name) -> tuple[str, ...]:
    """The knobs whose sum is the policy's cache_size."""
    return tuple(k.name for k in knobs_of(name) if k.budget in (PART, REST))


def describe_knob(name: str, default_text=None, bounded: bool | None = None) -> str:
    """"<help>. Used by sirllm (default: 4), streaming (default: 4)." for a knob;
    `default_text(cls, knob)` may replace a policy's default with words."""
    users = knob_users(bounded).get(name)
    if not users:
        raise PolicyError(f"no policy has a knob {name!r}", knob=name)
    uses = []
    for cls, knob in users:
        text = default_text(cls, knob) if default_text else None
        uses.append(f"{cls.name} (default: {knob.default if text is None else text})")
    return f"{users[0][1].help.rstrip('.')}. Used by {', '.join(uses)}."


def describe_policies(bounded: bool | None = None) -> str:
    """"sirllm: ...; streaming: ..." from each class's `summary` (or docstring)."""
    parts = []
    for name in policy_names(bounded):
        cls = _CLASSES[name]
        summary = getattr(cls, "summary", None) or (cls.__doc__ or "").strip().split("\n")[0]
        aliases = [a for a, target in _ALIASES.items() if target == name]
        label = f"{name} (alias {', '.join(aliases)})" if aliases else name
        parts.append(f"{label}: {summary.rstrip('.')}")
    return "; ".join(parts)


STATED_DEFAULT = "%(default).0s"


def argparse_help(text: str) -> str:
    """`text` (which states its default in words) as argparse help.

    Argparse's ArgumentDefaultsHelpFormatter, which `vllm serve`'s
    SortedHelpFormatter and our `eval` command use, appends
    " (default: %(default)s)" to any help that does not mention `%(default)`.
    Our knob options default to None (unset, so the policy's own default
    applies and a knob given without a policy can be told apart), which it
    would print as "(default: None)" after the real default. A mention that
    formats to nothing keeps it out; `%` is escaped for argparse's formatting.
    """
    return text.replace("%", "%%") + STATED_DEFAULT
