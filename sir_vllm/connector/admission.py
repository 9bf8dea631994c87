"""When the pool is full, a session turn waits rather than take another session's pins.

Under KV-pool pressure every turn admitted beside many running ones costs
idle sessions their pins, and each of those sessions then recomputes its
kept tokens (a prefill of the whole budget) on its next turn. vLLM's
`--max-num-seqs` cap avoids that (measured: 64 sessions, cap 16, turns/s
1.11 -> 2.10), but it caps always, and the operator must pick the number.
This rule caps only under pressure: a turn that fits the free blocks runs at
once; a turn that would drop idle sessions' pins waits while `cap` session
turns already run (they finish and free their blocks), and goes ahead,
dropping pins as before, when fewer run. `auto` gives the running turns half
the pool: cap = usable blocks // (2 x the blocks this turn takes), at least 1.

`--kv-max-running` sets it (`sir_vllm.server.settings`); it reaches the
engine in the connector's extra config under `CONFIG_KEY`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

CONFIG_KEY = "max_running"
AUTO = "auto"
OFF = 0


class MaxRunningError(argparse.ArgumentTypeError, ValueError):
    """A value `--kv-max-running` does not take (argparse prints its message)."""


def parse_max_running(value) -> int | str:
    """`--kv-max-running`'s value: `auto` or an integer >= 0 (0: off)."""
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    try:
        number = int(text)
    except ValueError:
        number = -1
    if number < 0:
        raise MaxRunningError(f"must be 'auto' or an integer >= 0, got {value!r}")
    return number


@dataclass(frozen=True)
class AdmissionRule:
    """How many session turns may run before a turn that needs others' pins waits."""

    max_running: int | str = OFF

    @classmethod
    def from_extra_config(cls, extra: dict | None) -> AdmissionRule:
        value = (extra or {}).get(CONFIG_KEY, OFF)
        return cls(parse_max_running(OFF if value is None else value))

    @property
    def enabled(self) -> bool:
        return self.max_running != OFF

    def cap(self, usable_blocks: int, turn_blocks: int) -> int:
        """Session turns allowed to run while this one (taking `turn_blocks`) waits."""
        if self.max_running == AUTO:
            return max(1, usable_blocks // (2 * max(turn_blocks, 1)))
        return int(self.max_running)

    def must_wait(self, *, running: int, free_blocks: int, need_blocks: int,
                  idle_pins: bool, usable_blocks: int, turn_blocks: int) -> bool:
        """True when admitting the turn now would drop idle pins while enough run."""
        if not self.enabled or free_blocks >= need_blocks or not idle_pins:
            return False
        return running >= self.cap(usable_blocks, turn_blocks)
