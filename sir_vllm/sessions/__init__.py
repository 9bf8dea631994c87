"""Per-session state in the API process: retained token ids, scores, policy, lock.

The store lives in the one API server process (`--api-server-count 1`), the
place every turn of a session reaches; the engine only holds the pinned KV.
"""

from sir_vllm.sessions.chat import ChatError, new_messages, normalize_messages
from sir_vllm.sessions.store import Session, SessionBusy, SessionStore
from sir_vllm.sessions.turn import TurnError, TurnPlan, commit_turn, plan_turn

__all__ = ["ChatError", "Session", "SessionBusy", "SessionStore", "TurnError", "TurnPlan",
           "commit_turn", "new_messages", "normalize_messages", "plan_turn"]
