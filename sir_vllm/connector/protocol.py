"""What the API process and the connector say to each other (plain JSON).

Request `kv_transfer_params[PARAMS_KEY]`:
    {"id": session key, "old_len": cached tokens the API expects pinned,
     "keep": ascending indices into those tokens, or null for all of them,
     "name": the client's session id (log lines only; pins are keyed by "id"),
     "peek": true (optional): load the kept tokens as usual, but when the
     request finishes neither release the session's pins nor pin its blocks
     (the API scores a turn without committing it)}
Response `kv_transfer_params[REPLY_KEY]`: tokens of this turn now pinned;
`kv_transfer_params[RECOMPUTED_KEY]` (only when > 0): kept tokens the engine no
longer held pinned (its idle session was dropped from a full KV pool, or the
pins did not match), so their KV was rebuilt from the token ids instead.
Clients never write PARAMS_KEY: the session middleware strips it.
"""

PARAMS_KEY = "sir_session"
REPLY_KEY = "sir_cached_tokens"
RECOMPUTED_KEY = "sir_recomputed_tokens"
PEEK_KEY = "peek"
DROP_KEY = "drop"  # {"id": ..., "drop": true}: free the session's pinned blocks


def keep_list(params: dict) -> list[int]:
    keep = params.get("keep")
    return list(range(int(params["old_len"]))) if keep is None else [int(i) for i in keep]
