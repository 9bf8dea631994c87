"""What the engine processes count, published through vLLM's KV-connector stats channel.

vLLM carries a connector's own telemetry from the engine to the API process:
each step the worker role's and the scheduler role's `get_kv_connector_stats()`
are merged (`KVConnectorStats.aggregate`) and ride on the step's
`SchedulerStats` as a plain dict; in the API process vLLM's Prometheus stat
logger rebuilds nothing and hands the dict to the connector's
`KVConnectorPromMetrics.observe`, and its log stat logger (one API process
only: vLLM turns it off with `--api-server-count` above 1) rebuilds it
(`build_kv_connector_stats`) for the periodic "KV Transfer metrics" line.
A step's stats go to one API process only, so counters summed over API
processes (Prometheus multiprocess mode) count every event once.

What goes this way is what happens in an engine step:

* `compactions`: one `[seconds, tokens]` per load job, from the worker (the
  copy and re-rotation of a request's kept tokens). Only the engine's first
  worker reports: every tensor-parallel rank compacts its own heads of the
  same job at the same time.
* `pins_dropped`: idle sessions whose pins the scheduler dropped because the
  pool could not hold a new request.
* `turns_held`: session turns the admission rule (`--kv-max-running`) held
  back at least once, rather than drop idle sessions' pins.
* `offloaded_tokens` / `restored_tokens`: tokens of dropped pins saved to
  the host tier (`--kv-offload-bytes`), and kept tokens copied back from it
  instead of recomputed.
* `recomputed_tokens`: kept tokens a session request found unpinned (pins
  dropped, an engine restart, a rollback of more than one turn), counted when
  the request finishes, committed by the API or not.

The pins a pool holds now (sessions, blocks) are gauges the API process reads
with `EngineQuery.STATS` when `/metrics` is scraped (`server.metrics`): they
also change between steps (a DELETE, an expiry, a long turn's MOVE), when an
idle engine sends no stats at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from sir_vllm import vllm_adapter

KVConnectorStats, KVConnectorPromMetrics, create_metric_per_engine = vllm_adapter.connector_stats_api()

COMPACTIONS = "compactions"
PINS_DROPPED = "pins_dropped"
RECOMPUTED_TOKENS = "recomputed_tokens"
TURNS_HELD = "turns_held"
OFFLOADED_TOKENS = "offloaded_tokens"
RESTORED_TOKENS = "restored_tokens"
COUNTS = (PINS_DROPPED, RECOMPUTED_TOKENS, TURNS_HELD, OFFLOADED_TOKENS, RESTORED_TOKENS)

# Each count's Prometheus counter: its name (without `_total`) and help text.
COUNTER_METRICS = {
    PINS_DROPPED: ("vllm:sir_pins_dropped",
                   "Idle sessions whose pinned KV was dropped because the KV pool could not "
                   "hold a new request (least recently used first)."),
    RECOMPUTED_TOKENS: ("vllm:sir_pin_miss_tokens",
                        "Kept tokens a session request found unpinned and recomputed from their "
                        "ids (every session request, committed or not)."),
    TURNS_HELD: ("vllm:sir_turns_held",
                 "Session turns that waited for running turns to finish rather than drop idle "
                 "sessions' pinned KV (--kv-max-running)."),
    OFFLOADED_TOKENS: ("vllm:sir_offloaded_tokens",
                       "Tokens of dropped pins saved to host memory (--kv-offload-bytes)."),
    RESTORED_TOKENS: ("vllm:sir_restored_tokens",
                      "Kept tokens copied back from host memory instead of recomputed "
                      "(--kv-offload-bytes)."),
}

# A compaction moves up to a budget of tokens: tens of microseconds on a GPU,
# milliseconds on CPU pages.
COMPACTION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                      0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class SirConnectorStats(KVConnectorStats):
    """One interval's events of the connector (serializable: `data` is plain lists and ints)."""

    def __post_init__(self):
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {COMPACTIONS: [], **{key: 0 for key in COUNTS}}

    def record_compaction(self, seconds: float, tokens: int) -> None:
        self.data[COMPACTIONS].append([float(seconds), int(tokens)])

    def record_pins_dropped(self, sessions: int = 1) -> None:
        self.data[PINS_DROPPED] += int(sessions)

    def record_recomputed(self, tokens: int) -> None:
        self.data[RECOMPUTED_TOKENS] += int(tokens)

    def record_turn_held(self) -> None:
        self.data[TURNS_HELD] += 1

    def record_offloaded(self, tokens: int) -> None:
        self.data[OFFLOADED_TOKENS] += int(tokens)

    def record_restored(self, tokens: int) -> None:
        self.data[RESTORED_TOKENS] += int(tokens)

    def is_empty(self) -> bool:
        d = self.data
        return not d.get(COMPACTIONS) and not any(d.get(key) for key in COUNTS)

    def aggregate(self, other: KVConnectorStats) -> SirConnectorStats:
        """Another worker's, the scheduler's, or a later step's events added to these."""
        if other is not None and not other.is_empty():
            mine, theirs = self.data, other.data
            mine[COMPACTIONS] = [*mine.get(COMPACTIONS, []), *theirs.get(COMPACTIONS, [])]
            for key in COUNTS:
                mine[key] = mine.get(key, 0) + theirs.get(key, 0)
        return self

    def take(self) -> SirConnectorStats | None:
        """These events, handed over once (None when there are none); the recorder starts afresh."""
        if self.is_empty():
            return None
        taken = SirConnectorStats(data=self.data)
        self.reset()
        return taken

    def reduce(self) -> dict[str, int | float]:
        """The interval's summary for vLLM's "KV Transfer metrics" log line."""
        times = [s for s, _ in self.data.get(COMPACTIONS, [])]
        return {
            "Compactions": len(times),
            "Avg compaction (ms)": round(1e3 * sum(times) / len(times), 3) if times else 0,
            "Max compaction (ms)": round(1e3 * max(times), 3) if times else 0,
            "Compacted tokens": sum(n for _, n in self.data.get(COMPACTIONS, [])),
            "Pins dropped": self.data.get(PINS_DROPPED, 0),
            "Recomputed tokens": self.data.get(RECOMPUTED_TOKENS, 0),
            "Turns held": self.data.get(TURNS_HELD, 0),
            "Offloaded tokens": self.data.get(OFFLOADED_TOKENS, 0),
            "Restored tokens": self.data.get(RESTORED_TOKENS, 0),
        }


class SirConnectorPromMetrics(KVConnectorPromMetrics):
    """The connector's Prometheus metrics, in the API process, labelled like vLLM's
    engine metrics (`model_name`, `engine`); `observe` takes one step's stats dict."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(metric):
            return create_metric_per_engine(metric, self.per_engine_labelvalues)

        self.compaction_seconds = per_engine(self._histogram_cls(
            name="vllm:sir_compaction_seconds",
            documentation="Time a load job took to copy a session's kept tokens into a request's "
                          "slots and re-rotate their keys (device time; one observation per job).",
            buckets=list(COMPACTION_BUCKETS), labelnames=labelnames))
        self.compacted_tokens = per_engine(self._counter_cls(
            name="vllm:sir_compacted_tokens",
            documentation="Kept tokens the worker copied into place for session turns.",
            labelnames=labelnames))
        self.counts = {key: per_engine(self._counter_cls(name=name, documentation=doc,
                                                         labelnames=labelnames))
                       for key, (name, doc) in COUNTER_METRICS.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for seconds, tokens in transfer_stats_data.get(COMPACTIONS, ()):
            self.compaction_seconds[engine_idx].observe(seconds)
            self.compacted_tokens[engine_idx].inc(tokens)
        for key, counter in self.counts.items():
            if transfer_stats_data.get(key):
                counter[engine_idx].inc(transfer_stats_data[key])


def cuda_events(device) -> Callable[[], Any] | None:
    """A maker of timing events for a device whose kernels run asynchronously
    (CUDA), or None where a copy is done when the call returns (the CPU)."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return lambda: torch.cuda.Event(enable_timing=True)


class CompactionTimer:
    """Seconds each load job's compaction took, into a `SirConnectorStats`.

    On the CPU the copy is synchronous: the host clock is the job's time. On
    CUDA the launch returns at once, so a pair of events brackets the job on
    its stream; `take` (after the step's forward pass was launched behind the
    job) waits for the end event only, never for the forward pass."""

    def __init__(self, events: Callable[[], Any] | None = None, clock=time.perf_counter):
        self.events, self.clock = events, clock
        self.stats = SirConnectorStats()
        self._pending: list[tuple[Any, Any, int]] = []

    def start(self):
        if self.events is None:
            return self.clock()
        event = self.events()
        event.record()
        return event

    def stop(self, started, tokens: int) -> None:
        if self.events is None:
            self.stats.record_compaction(self.clock() - started, tokens)
            return
        end = self.events()
        end.record()
        self._pending.append((started, end, tokens))

    def take(self) -> SirConnectorStats | None:
        for start, end, tokens in self._pending:
            end.synchronize()
            self.stats.record_compaction(start.elapsed_time(end) / 1e3, tokens)  # ms -> s
        self._pending.clear()
        return self.stats.take()
