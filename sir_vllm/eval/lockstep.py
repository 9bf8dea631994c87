"""Where do a server session and the oracle part ways on a long stream?

`python -m sir_vllm.eval.lockstep --url URL --model DIR [--policy ...]` feeds
the stream-ppl text (DailyDialog test, a message a turn) to the oracle and to
one server session side by side, and after every turn compares the two
sessions' kept token ids (the server's from `GET /v1/sessions/{id}`). At the
first turn whose keep sets differ it prints the tokens only one side kept,
with both sides' scores before that turn's eviction: a keep set decided by
scores that differ only in their last digits (float32 kernels) is a near-tie,
not a fault. Explains a stream-ppl gap between the two backends, which no
single pick shows.
"""

from __future__ import annotations

import argparse
import json
from itertools import islice

import numpy as np

from ..cli.policy_args import add_policy_args, policy_from_args
from . import data
from .backends import ReferenceBackend
from .server_backend import ServerBackend


def _server_state(backend: ServerBackend, session) -> tuple[list[int], np.ndarray]:
    tokens = backend.session_info(session.id)["tokens"]
    return [t["id"] for t in tokens], np.array([t["score"] for t in tokens])


def split_point(ids: list[int], policy, num_coming: int, ref_scores: np.ndarray,
                srv_scores: np.ndarray) -> list[dict]:
    """Both sides' keep sets for one turn (the policy on each side's scores),
    and the tokens only one side keeps, with both sides' scores there."""
    def keep(scores):
        k = policy.select(scores, num_coming)
        return set(range(len(scores))) if k is None else {int(i) for i in k}

    keep_r, keep_s = keep(ref_scores), keep(srv_scores)
    return [{"position": p, "token": ids[p], "kept_by": "oracle" if p in keep_r else "server",
             "oracle_score": float(ref_scores[p]), "server_score": float(srv_scores[p])}
            for p in sorted(keep_r ^ keep_s)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sir_vllm.eval.lockstep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True, help="checkpoint folder (the oracle and the tokenizer)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--turns", type=int, default=3000, help="stop after this many messages")
    add_policy_args(ap)
    args = ap.parse_args(argv)
    policy = policy_from_args(args)  # stream-ppl: budget 1024, decay 1
    path = data.default_file("stream-ppl", args.data_dir or data.default_data_dir())
    ref_b, srv_b = ReferenceBackend(args.model), ServerBackend(args.url, model=args.model)
    ref, srv = ref_b.new_session(policy), srv_b.new_session(policy)
    prev = None  # (ids, oracle scores, server scores) after the previous turn
    worst = 0.0
    try:
        messages = data.stream_messages(data.load_dialogue_stream(path))
        for turn, (role, text) in enumerate(islice(messages, args.turns)):
            num_coming = len(ref.r.encode(ref.r.message_text(role, text, ref.first_message)))
            ref.feed(role, text)
            srv.feed(role, text)
            r_ids, r_scores = list(ref.session.ids), np.asarray(ref.session.scores)
            s_ids, s_scores = _server_state(srv_b, srv)
            if r_ids != s_ids:
                out = {"first_different_turn": turn, "max_score_difference_before": worst}
                if prev is not None:
                    ids, ps_r, ps_s = prev
                    out["kept_by_one_side"] = split_point(ids, policy, num_coming, ps_r, ps_s)
                print(json.dumps(out, indent=1))
                return 1
            worst = max(worst, float(np.max(np.abs(r_scores - s_scores))))
            prev = (r_ids, r_scores, s_scores)
            if turn % 100 == 0:
                print(f"turn {turn}: same {len(r_ids)} kept tokens, max |score difference| {worst:.2e}",
                      flush=True)
        print(json.dumps({"turns": args.turns, "same_keep_sets": True,
                          "max_score_difference": worst}, indent=1))
        return 0
    finally:
        srv.close()


if __name__ == "__main__":
    raise SystemExit(main())
