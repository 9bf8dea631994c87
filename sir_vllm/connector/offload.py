"""A host-memory tier under the pins: a dropped session's KV is saved, not lost.

Under KV-pool pressure the scheduler drops idle sessions' pins, and each such
session's next turn recomputes its kept tokens: a prefill of the whole
budget (measured at 64 sessions: 66,108 of 93,863 prompt tokens were such
recomputes). With `--kv-offload-bytes N` the dropped pins' tokens are first
copied into host memory (at most N bytes, least recently saved out first);
the session's next turn copies its kept ones back, re-rotated, instead of
recomputing them. A session's budget is small, so a modest tier holds every
session of a pool many times over.

The scheduler role decides everything (`HostIndex`: which sessions are held,
what is evicted) and sends the worker role an ordered list of operations in
each step's metadata (`SaveOp`, `RestoreOp`, `ForgetOp`, `MoveOp`); the worker role
(`SessionWorker.run_host_ops`, its tensors in `kv.offload`) only obeys, in
order, before the step's forward pass: so both
sides agree without talking back. Losing an entry only costs a recompute.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from sir_vllm import vllm_adapter

CONFIG_KEY = "offload_bytes"


class OffloadBytesError(argparse.ArgumentTypeError, ValueError):
    """A value `--kv-offload-bytes` does not take (argparse prints its message)."""


def parse_offload_bytes(value) -> int:
    """`--kv-offload-bytes`' value: bytes >= 0, with vLLM's suffixes (1G = 2**30, 1g = 10**9)."""
    try:
        number = vllm_adapter.human_readable_int(str(value))
    except (ValueError, argparse.ArgumentTypeError):
        number = -1
    if number < 0:
        raise OffloadBytesError(f"must be a number of bytes >= 0 (e.g. 2G), got {value!r}")
    return number


# --- the worker's plan: flat dataclasses, executed in order -----------------

@dataclass
class SaveOp:
    """Copy the tokens at `src_slots` (token i = position i) into host entry `key`."""

    key: str
    src_slots: list[int]


@dataclass
class RestoreOp:
    """Write host entry `key`'s tokens `index` into `dst_slots`, keys re-rotated by `delta`."""

    req_id: str
    key: str
    index: list[int]
    dst_slots: list[int]
    delta: list[int]


@dataclass
class ForgetOp:
    key: str


@dataclass
class MoveOp:
    """Hold host entry `src` under `dst` (a long turn's state becomes the session's)."""

    src: str
    dst: str


HostOp = SaveOp | RestoreOp | ForgetOp | MoveOp


# --- the scheduler's side ---------------------------------------------------

@dataclass
class Offloaded:
    """A dropped pin's state, held on the host (the worker holds the tensors)."""

    token_ids: list[int]  # position = index, as in the pins
    turn: str  # the turn that left the pins
    name: str = ""
    origin: tuple | None = None  # what that turn started from: a regenerated turn shares its prefix


class HostIndex:
    """Which sessions' KV the host tier holds, within `capacity` tokens, LRU.

    Every change queues the worker's operation (`take_ops`), in the order the
    scheduler made it."""

    def __init__(self, capacity_tokens: int):
        self.capacity = max(0, int(capacity_tokens))
        self.entries: OrderedDict[str, Offloaded] = OrderedDict()
        self.ops: list[HostOp] = []

    @classmethod
    def from_config(cls, extra: dict | None, bytes_per_token: Callable[[], int]) -> HostIndex:
        """The tier `--kv-offload-bytes` asks for, in tokens of `bytes_per_token()`
        bytes each (asked only when the tier is on)."""
        size = parse_offload_bytes((extra or {}).get(CONFIG_KEY) or 0)
        return cls(size // max(1, bytes_per_token()) if size else 0)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def tokens(self) -> int:
        return sum(len(e.token_ids) for e in self.entries.values())

    def save(self, key: str, entry: Offloaded, src_slots: list[int]) -> bool:
        """Hold `entry` (its KV read from `src_slots`), evicting the least
        recently saved; False when it cannot fit even in an empty tier."""
        self.forget(key)
        need = len(entry.token_ids)
        if not self.enabled or need > self.capacity:
            return False
        while self.tokens + need > self.capacity:
            self.forget(next(iter(self.entries)))
        self.entries[key] = entry
        self.ops.append(SaveOp(key, list(src_slots)))
        return True

    def get(self, key: str) -> Offloaded | None:
        return self.entries.get(key)

    def touch(self, key: str) -> None:
        """A request of this session arrived: its copy is the last to be evicted."""
        if key in self.entries:
            self.entries.move_to_end(key)

    def restore(self, req_id: str, key: str, index: list[int], dst_slots: list[int],
                delta: list[int]) -> None:
        """Plan a copy back; the entry stays until the turn's new pins replace it."""
        self.entries.move_to_end(key)
        self.ops.append(RestoreOp(req_id, key, list(index), list(dst_slots), list(delta)))

    def move(self, src: str, dst: str) -> bool:
        """Put `src`'s copy under `dst`, whose own copy (an older state) goes;
        False, and nothing changed, when `src` has none."""
        entry = self.entries.pop(src, None)
        if entry is None:
            return False
        self.forget(dst)
        self.entries[dst] = entry
        self.ops.append(MoveOp(src, dst))
        return True

    def forget(self, key: str) -> bool:
        if self.entries.pop(key, None) is None:
            return False
        self.ops.append(ForgetOp(key))
        return True

    def take_ops(self) -> list[HostOp]:
        ops, self.ops = self.ops, []
        return ops
