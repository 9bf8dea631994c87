"""sir_vllm.policy: hand-computed expectations for every rule, plus a property check."""

import itertools
import math

import numpy as np
import pytest

from sir_vllm.policy import (
    POLICY_NAMES,
    REST,
    FullPolicy,
    Knob,
    Policy,
    PolicyError,
    SessionScores,
    SirLLMPolicy,
    StreamingPolicy,
    fit_budget,
    knob_users,
    knobs_of,
    make_policy,
    policy_aliases,
    policy_names,
    register_policy,
    turn_scores,
    unregister_policy,
)
from sir_vllm.policy.base import check_size


def keep(policy, scores, num_coming):
    out = policy.select(np.asarray(scores, dtype=float), num_coming)
    if out is None:
        return None
    assert out.dtype == np.int64
    return out.tolist()


# ---------------------------------------------------------------- SirLLM select

S8 = [9, 0, 1, 7, 3, 2, 8, 4]  # n = 8; ranking: 0 (9), 6 (8), 3 (7), 7 (4), 4 (3)


def test_sirllm_no_eviction_up_to_exact_boundary():
    p = SirLLMPolicy(start_size=2, entropy_size=3, recent_size=1)  # cache 6
    assert p.cache_size == 6
    assert keep(p, S8[:5], 1) is None  # 5 + 1 == 6: fits exactly
    assert keep(p, S8[:4], 2) is None
    assert keep(p, [], 6) is None
    assert keep(p, S8[:5], 2) == [0, 1, 3, 4]  # 7 > 6: keep 4; top-1 is 0 (a sink) -> 4, 3


def test_sirllm_topk_overlapping_sinks_is_topped_up_with_recent():
    p = SirLLMPolicy(start_size=2, entropy_size=3, recent_size=1)
    # num_coming 2: target 4, k = 1 -> TopK {0} inside the sinks -> top up 7, 6
    assert keep(p, S8, 2) == [0, 1, 6, 7]
    # num_coming 1: target 5, k = 2 -> {0, 6} ∪ sinks = {0, 1, 6}; top up 7, 5
    assert keep(p, S8, 1) == [0, 1, 5, 6, 7]
    # num_coming 0: target 6, k = 3 -> {0, 6, 3} ∪ sinks = {0, 1, 3, 6}; top up 7, 5
    assert keep(p, S8, 0) == [0, 1, 3, 5, 6, 7]


def test_sirllm_topk_away_from_recent_keeps_order():
    p = SirLLMPolicy(start_size=1, entropy_size=3, recent_size=0)  # cache 4
    s = [0, 5, 0, 6, 0, 0, 4, 0, 0, 0]
    # target 3, k = 2 -> {3, 1} ∪ {0}; nothing to top up; returned ascending
    assert keep(p, s, 1) == [0, 1, 3]


def test_sirllm_ties_earlier_token_wins():
    p = SirLLMPolicy(start_size=1, entropy_size=2, recent_size=0)  # cache 3
    s = [0, 0, 5, 5, 5, 0, 0]
    assert keep(p, s, 0) == [0, 2, 3]
    # agrees with Python's stable sorted(..., reverse=True)
    top = sorted(range(len(s)), key=lambda i: s[i], reverse=True)[:2]
    assert top == [2, 3]
    # all equal: TopK picks the earliest tokens
    p2 = SirLLMPolicy(start_size=0, entropy_size=3, recent_size=0)
    assert keep(p2, [1.0] * 6, 0) == [0, 1, 2]


def test_sirllm_k_not_positive_gives_sinks_plus_recent():
    p = SirLLMPolicy(start_size=2, entropy_size=2, recent_size=3)  # cache 7
    s = [0, 0, 0, 99, 0, 0, 0, 0]
    assert keep(p, s, 2) == [0, 1, 5, 6, 7]  # k = 0: 99 is not kept
    assert keep(p, s, 3) == [0, 1, 6, 7]  # k = -1
    p2 = SirLLMPolicy(start_size=4, entropy_size=2, recent_size=4)  # cache 10
    assert keep(p2, list(range(10)), 5) == [0, 1, 2, 3, 9]  # num_coming > entropy_size


def test_sirllm_index_zero_only_via_sinks_or_topk():
    # start_size 0: token 0 is not a sink and top-up never picks it
    p = SirLLMPolicy(start_size=0, entropy_size=1, recent_size=2)  # cache 3
    assert keep(p, [9, 1, 1, 1], 1) == [2, 3]  # k = 0: 0 dropped despite its score
    p2 = SirLLMPolicy(start_size=0, entropy_size=2, recent_size=1)
    assert keep(p2, [9, 1, 1, 1], 1) == [0, 3]  # k = 1: 0 kept through TopK


def test_sirllm_nan_ranks_last():
    p = SirLLMPolicy(start_size=0, entropy_size=1, recent_size=0)
    assert keep(p, [math.nan, 1.0, 0.5], 0) == [1]


def test_turn_that_does_not_fit_raises():
    p = SirLLMPolicy(start_size=4, entropy_size=4, recent_size=0)  # cache 8
    with pytest.raises(ValueError, match="turn of 5 tokens does not fit budget 8"):
        p.select(np.zeros(10), 5)  # leaves 3 < 4 sinks
    with pytest.raises(ValueError, match="turn of 9 tokens does not fit budget 8"):
        p.select(np.zeros(0), 9)
    assert keep(p, np.zeros(10), 4) == [0, 1, 2, 3]  # exactly the sinks still fits
    s = StreamingPolicy(start_size=2, recent_size=4)
    with pytest.raises(ValueError, match="turn of 5 tokens does not fit budget 6"):
        s.select(np.zeros(5), 5)
    with pytest.raises(ValueError, match="num_coming"):
        p.select(np.zeros(3), -1)


# ------------------------------------------------------------ Streaming / Full


def test_streaming_sinks_plus_window():
    p = StreamingPolicy(start_size=2, recent_size=4)  # cache 6
    assert p.cache_size == 6 and not p.needs_scores and p.decay == 1.0
    assert keep(p, np.zeros(4), 2) is None  # exact boundary
    # released: k[0:2] ∪ k[n - recent + num_coming : n] = k[6:8]
    assert keep(p, np.zeros(8), 2) == [0, 1, 6, 7]
    assert keep(p, np.zeros(8), 0) == [0, 1, 4, 5, 6, 7]
    assert keep(p, np.zeros(5), 4) == [0, 1]  # empty window


def test_streaming_plain_sliding_window():
    p = StreamingPolicy(start_size=0, recent_size=5)
    assert keep(p, np.zeros(7), 2) == [4, 5, 6]
    assert keep(p, np.zeros(7), 5) == []


def test_full_never_evicts():
    p = FullPolicy()
    assert p.cache_size is None and p.decay == 1.0 and not p.needs_scores
    assert p.select(np.zeros(100_000), 100_000) is None
    assert isinstance(p, Policy)


# ----------------------------------------------------------------- turn_scores


def test_turn_scores_paper():
    sur = np.array([math.nan, 1.0, 3.0, 2.0])
    out = turn_scores("paper", sur)
    assert out.dtype == np.float64
    assert out.tolist() == [3.0, 1.0, 3.0, 2.0]
    assert math.isnan(sur[0])  # input untouched
    assert turn_scores("paper", [math.nan]).tolist() == [0.0]


def test_turn_scores_reference_code_max_before_shift():
    # the max (5) comes from the last value, which the shift then drops
    assert turn_scores("reference-code", [1.0, 2.0, 5.0]).tolist() == [5.0, 1.0, 2.0]
    assert turn_scores("reference-code", [4.0, 2.0, 1.0]).tolist() == [4.0, 4.0, 2.0]
    assert turn_scores("reference-code", [7.0]).tolist() == [7.0]


def test_turn_scores_errors():
    with pytest.raises(ValueError, match="score"):
        turn_scores("bogus", [1.0])
    with pytest.raises(ValueError, match="at least one token"):
        turn_scores("paper", [])


# --------------------------------------------------------------- SessionScores


def test_session_decay_from_second_turn_even_without_eviction():
    p = SirLLMPolicy(start_size=1, entropy_size=2, recent_size=0, decay=0.5)  # cache 3
    ss = SessionScores()
    assert ss.before_turn(p, 2) is None and ss.size == 0  # first turn: nothing
    ss.after_turn([4.0, 2.0])
    assert ss.turns == 1 and ss.scores.tolist() == [4.0, 2.0]
    assert ss.before_turn(p, 1) is None  # 2 + 1 fits, but decay still applies
    assert ss.scores.tolist() == [2.0, 1.0]
    ss.after_turn([8.0])
    assert ss.scores.tolist() == [2.0, 1.0, 8.0] and ss.turns == 2
    kept = ss.before_turn(p, 1)  # target 2, k = 1 -> {2} ∪ {0}
    assert kept.tolist() == [0, 2]
    assert ss.scores.tolist() == [1.0, 4.0] and ss.size == 2


def test_session_first_turn_never_decays():
    p = SirLLMPolicy(start_size=1, entropy_size=2, decay=0.5)
    ss = SessionScores()
    ss.before_turn(p, 1)
    ss.after_turn([2.0])
    assert ss.scores.tolist() == [2.0]


def test_session_streaming_compacts_without_decay():
    p = StreamingPolicy(start_size=1, recent_size=2)
    ss = SessionScores()
    ss.after_turn([1.0, 2.0, 3.0])
    assert ss.before_turn(p, 1).tolist() == [0, 2]
    assert ss.scores.tolist() == [1.0, 3.0]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "ctor, knobs, msg",
    [
        (SirLLMPolicy, {"decay": 1.5}, r"decay must be in \(0, 1\], got 1.5"),
        (SirLLMPolicy, {"decay": 0}, "decay"),
        (SirLLMPolicy, {"decay": math.nan}, "decay"),
        (SirLLMPolicy, {"score": "entropy"}, "score"),
        (SirLLMPolicy, {"start_size": -1}, "start_size"),
        (SirLLMPolicy, {"entropy_size": 2.5}, "entropy_size"),
        (SirLLMPolicy, {"recent_size": True}, "recent_size"),
        (SirLLMPolicy, {"start_size": 0, "entropy_size": 0}, "start_size \\+ entropy_size"),
        (StreamingPolicy, {"recent_size": -3}, "recent_size"),
        (StreamingPolicy, {"start_size": 0, "recent_size": 0}, "start_size \\+ recent_size"),
    ],
)
def test_validation_names_the_knob(ctor, knobs, msg):
    with pytest.raises(ValueError, match=msg):
        ctor(**knobs)


def test_make_policy():
    assert POLICY_NAMES == ("sirllm", "streaming", "full")
    p = make_policy("sirllm", start_size=4, entropy_size=508, decay=0.7, recent_size=None)
    assert isinstance(p, SirLLMPolicy) and p.cache_size == 512 and p.needs_scores
    assert p.recent_size == 0 and p.score == "paper"
    assert make_policy("sirllm").cache_size == 1024
    assert make_policy("streaming").cache_size == 1024
    assert isinstance(make_policy("none"), FullPolicy)
    assert isinstance(make_policy("full", decay=None), FullPolicy)
    with pytest.raises(ValueError, match="unknown policy 'h2o'"):
        make_policy("h2o")
    with pytest.raises(ValueError, match="entropy_size"):
        make_policy("streaming", entropy_size=10)
    with pytest.raises(ValueError, match="decay"):
        make_policy("full", decay=0.5)
    with pytest.raises(ValueError, match="decay"):
        make_policy("sirllm", decay=2)


def test_to_dict_round_trips():
    for p in (
        SirLLMPolicy(2, 30, 5, 0.8, "reference-code"),
        StreamingPolicy(0, 64),
        FullPolicy(),
    ):
        d = p.to_dict()
        assert d["name"] == p.name and d["cache_size"] == p.cache_size
        assert make_policy(**d).to_dict() == d
    with pytest.raises(ValueError, match="cache_size"):
        make_policy("streaming", start_size=4, recent_size=4, cache_size=9)


# -------------------------------------------------------------------- registry


def test_registry_names_aliases_and_knobs():
    assert policy_names() == ("sirllm", "streaming", "full")
    assert policy_names(bounded=True) == ("sirllm", "streaming")
    assert policy_aliases() == {"none": "full"}
    assert [k.name for k in knobs_of("sirllm")] == ["start_size", "entropy_size", "recent_size",
                                                     "decay", "score"]
    assert knobs_of("none") == ()
    users = knob_users()
    assert [cls.name for cls, _ in users["recent_size"]] == ["sirllm", "streaming"]
    assert [k.default for _, k in users["recent_size"]] == [0, 1020]  # each policy's own
    for cls in (SirLLMPolicy, StreamingPolicy, FullPolicy):
        built = cls()  # bounded means a budget; the declared defaults are the constructor's
        assert cls.bounded == (built.cache_size is not None)
        assert {k.name: getattr(built, k.name) for k in cls.knobs} == \
            {k.name: k.default for k in cls.knobs}


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown policy 'h2o'; choose one of sirllm, streaming, "
                                         "full, none"):
        make_policy("h2o")
    with pytest.raises(PolicyError) as e:
        make_policy("sirllm", entropy_size=-1)
    assert e.value.knob == "entropy_size"
    with pytest.raises(PolicyError) as e:
        make_policy("streaming", start_size=0, recent_size=0)  # a rule across knobs: the first named
    assert e.value.knob == "start_size"
    with pytest.raises(PolicyError) as e:
        make_policy("streaming", window=3)
    assert e.value.knob == "window"


def test_fit_budget_gives_the_rest_to_the_rest_knob():
    assert fit_budget("sirllm", 512).to_dict() == make_policy(
        "sirllm", start_size=4, entropy_size=508, recent_size=0).to_dict()
    assert fit_budget("sirllm", 512, recent_size=100).entropy_size == 408
    assert fit_budget("sirllm", 512, entropy_size=20).cache_size == 24  # given: kept as is
    assert fit_budget("streaming", 100, start_size=0).recent_size == 100
    assert isinstance(fit_budget("none", 100), FullPolicy)
    with pytest.raises(PolicyError, match="entropy_size"):
        fit_budget("sirllm", 3)  # less than the sinks


@pytest.mark.parametrize("attrs, msg", [
    ({"name": "sirllm"}, "already registered"),
    ({"name": "Bad Name"}, "lower-case word"),
    ({"bounded": None}, "bounded"),
    ({"knobs": (Knob("window", int, 99, "tokens"),)}, "declares default 99"),
    ({"knobs": (Knob("size", int, 8, "tokens"),)}, "not a constructor keyword"),
    ({"knobs": (Knob("window", int, 8, "a"), Knob("window", int, 8, "b"))}, "repeated"),
    ({"knobs": (Knob("start_size", float, 4.0, "sinks"),),  # sirllm's is an int
      "__init__": lambda self, start_size=4.0: None}, "differs in type"),
    ({"knobs": (Knob("window", int, 8, "a", budget=REST), Knob("more", int, 1, "b", budget=REST)),
      "__init__": lambda self, window=8, more=1: None}, "at most one"),
    ({"aliases": ("none",)}, "alias 'none'"),
])
def test_registration_refuses_a_bad_declaration(attrs, msg):
    cls = type("Bad", (ToyWindowPolicy,), {"name": "bad", **attrs})
    with pytest.raises(ValueError, match=msg):
        register_policy(cls)
    assert "bad" not in policy_names()


class ToyWindowPolicy:
    """Keeps the most recent `window` tokens (a policy only this test file knows)."""

    name = "toywindow"
    bounded = True
    needs_scores = False
    decay = 1.0
    score = "paper"
    knobs = (Knob("window", int, 8, "Most recent tokens kept", budget=REST),)

    def __init__(self, window: int = 8):
        self.window = check_size("window", window)
        self.cache_size = self.window

    def select(self, scores, num_coming):
        n = len(scores)
        if n + num_coming <= self.cache_size:
            return None
        return np.arange(n - (self.cache_size - num_coming), n, dtype=np.int64)

    def to_dict(self):
        return {"name": self.name, "window": self.window, "cache_size": self.cache_size}


@pytest.fixture
def toy_policy():
    register_policy(ToyWindowPolicy)
    yield ToyWindowPolicy
    unregister_policy(ToyWindowPolicy.name)


def test_a_registered_policy_is_offered_by_server_cli_and_bench(toy_policy):
    """One class + one decorator call: the server's flags, the CLI's policy
    arguments and the bench's policy list and server arguments all offer it."""
    import argparse

    from sir_vllm.bench.runner import Budget, parse_policies, server_args
    from sir_vllm.cli.policy_args import add_policy_args, policy_from_args
    from sir_vllm.server import flags

    assert policy_names(bounded=True) == ("sirllm", "streaming", "toywindow")
    # vllm serve: --kv-policy choice and a --kv-window knob flag
    server = flags.parser_for_tests()
    policy = flags.policy_from_args(server.parse_args(["--kv-policy", "toywindow",
                                                       "--kv-window", "24"]))
    assert isinstance(policy, ToyWindowPolicy) and policy.cache_size == 24
    assert "toywindow" in server.format_help() and "--kv-window" in server.format_help()
    with pytest.raises(flags.FlagError, match="--kv-window: not a knob of --kv-policy sirllm"):
        flags.policy_from_args(server.parse_args(["--kv-policy", "sirllm", "--kv-window", "3"]))
    # sir-vllm eval/replay: --policy choice, --window, the task budget fills the REST knob
    cli = argparse.ArgumentParser()
    add_policy_args(cli)
    assert policy_from_args(cli.parse_args(["--policy", "toywindow"]), budget=40).window == 40
    assert policy_from_args(cli.parse_args(["--policy", "toywindow", "--window", "5"])).window == 5
    with pytest.raises(ValueError, match="--window do"):
        policy_from_args(cli.parse_args(["--policy", "streaming", "--window", "5"]))
    # sir-vllm bench: a session policy, whose server gets its knobs as flags
    assert parse_policies("toywindow,none") == ["toywindow", "stock"]
    argv = server_args("toywindow", Budget(4, 60), 1.0, None)
    assert argv[argv.index("--kv-policy") + 1] == "toywindow"
    assert argv[argv.index("--kv-window") + 1] == "64"  # the bench's whole budget
    served = flags.policy_from_args(server.parse_known_args(argv)[0])
    assert served.to_dict() == ToyWindowPolicy(64).to_dict()
    # withdrawn: offered nowhere
    unregister_policy("toywindow")
    with pytest.raises(SystemExit):
        flags.parser_for_tests().parse_args(["--kv-policy", "toywindow"])
    with pytest.raises(ValueError, match="unknown policy 'toywindow'"):
        parse_policies("toywindow")


# -------------------------------------------------------------- property check


def released_keep(scores, start, entropy, recent, num_coming):
    """The released rule, written as a plain Python loop (independent of numpy)."""
    n, cache = len(scores), start + entropy + recent
    if n + num_coming <= cache:
        return None
    k = entropy - num_coming
    top = sorted(range(n), key=lambda i: scores[i], reverse=True)[:k] if k > 0 else []
    kept = set(top) | set(range(min(start, n)))
    for i in range(n - 1, 0, -1):
        if len(kept) >= cache - num_coming:
            break
        kept.add(i)
    return sorted(kept)


def test_property_random_scores_many_sizes():
    rng = np.random.default_rng(0)
    for start, entropy, recent in itertools.product((0, 1, 4), (0, 1, 3, 9), (0, 2, 5)):
        if start + entropy + recent == 0:
            continue
        p = SirLLMPolicy(start, entropy, recent)
        s_pol = StreamingPolicy(start, entropy + recent)
        cache = p.cache_size
        for n in range(0, cache + 6):
            for num_coming in range(0, cache + 2):
                # integer-valued scores make ties common
                scores = rng.integers(0, 4, size=n).astype(float)
                for pol in (p, s_pol):
                    if n + num_coming > cache and cache - num_coming < start:
                        with pytest.raises(ValueError, match="does not fit"):
                            pol.select(scores, num_coming)
                        continue
                    out = pol.select(scores, num_coming)
                    if n + num_coming <= cache:
                        assert out is None
                        continue
                    out = out.tolist()
                    assert len(out) == cache - num_coming
                    assert out == sorted(set(out))
                    assert all(0 <= i < n for i in out)
                    assert set(range(min(start, n))) <= set(out)
                    if pol is p:
                        assert out == released_keep(list(scores), start, entropy, recent, num_coming)
                    else:
                        w = cache - num_coming - start
                        assert out == list(range(min(start, n))) + list(range(n - w, n))
