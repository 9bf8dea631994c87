"""The user turns of a benchmark: DailyDialog text or synthetic, fixed by a seed.

Session `i` gets the same turns whatever the number of sessions, so a sweep
over `--sessions 1,4,8` and every policy replay one and the same workload
(session 0 of the 8-session run is session 0 of the 1-session run).
"""

from __future__ import annotations

import random
from pathlib import Path

# A small fixed vocabulary: synthetic turns look like text to the tokenizer
# (a few tokens a word) without depending on any data file.
_WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line "
    "differ turn cause much mean before move right boy old too same tell does set three want air "
    "well also play small end put home read hand port large spell add even land here must big "
    "high such follow act why ask men change went light kind off need house picture try us again "
    "animal point mother world near build self earth father head stand own page should country "
    "found answer school grow study still learn plant cover food sun four between state keep eye "
    "never last let thought city tree cross farm hard start might story saw far sea draw left late"
).split()


def _session_rng(seed: int, session: int) -> random.Random:
    return random.Random(f"sir-vllm-bench/{seed}/{session}")


def dialogue_turns(dialogues: list[list[str]], sessions: int, turns: int, seed: int) -> list[list[str]]:
    """Per session, `turns` user messages: the utterances of DailyDialog dialogues
    in a random order (per session), one dialogue after another."""
    if not dialogues:
        raise ValueError("no dialogues to draw user turns from")
    out = []
    for s in range(sessions):
        rng = _session_rng(seed, s)
        order = list(range(len(dialogues)))
        rng.shuffle(order)
        msgs: list[str] = []
        k = 0
        while len(msgs) < turns:
            msgs.extend(dialogues[order[k % len(order)]])
            k += 1
        out.append(msgs[:turns])
    return out


def synthetic_turns(sessions: int, turns: int, seed: int, words: int = 16) -> list[list[str]]:
    """Per session, `turns` messages of about `words` random words (0.5x to 1.5x)."""
    if words < 1:
        raise ValueError(f"--synthetic-words must be >= 1, got {words}")
    out = []
    for s in range(sessions):
        rng = _session_rng(seed, s)
        msgs = []
        for _ in range(turns):
            n = rng.randint(max(1, words // 2), max(1, words + words // 2))
            text = " ".join(rng.choice(_WORDS) for _ in range(n))
            msgs.append(text[0].upper() + text[1:] + rng.choice(".?!"))
        out.append(msgs)
    return out


def truncate_tokens(text: str, tokenizer, max_tokens: int | None) -> str:
    """`text` cut to at most `max_tokens` tokens (on a token boundary)."""
    if not max_tokens:
        return text
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def build_workload(sessions: int, turns: int, seed: int, data: Path | None = None,
                   synthetic: bool = False, synthetic_words: int = 16,
                   tokenizer=None, max_user_tokens: int | None = None) -> list[list[str]]:
    """The user messages of every session: `sessions` lists of `turns` strings."""
    if sessions < 1 or turns < 1:
        raise ValueError(f"need at least one session and one turn, got {sessions} x {turns}")
    if synthetic:
        work = synthetic_turns(sessions, turns, seed, synthetic_words)
    else:
        from sir_vllm.eval.data import default_data_dir, default_file, load_dialogue_stream

        path = Path(data) if data else default_file("stream-ppl", default_data_dir())
        work = dialogue_turns(load_dialogue_stream(path), sessions, turns, seed)
    if tokenizer is not None and max_user_tokens:
        work = [[truncate_tokens(m, tokenizer, max_user_tokens) for m in msgs] for msgs in work]
    return work
