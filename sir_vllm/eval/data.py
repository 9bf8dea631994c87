"""Load the paper's evaluation data into episodes of choice turns.

Prompts follow the released SirLLM code (`sir_llm/utils.py`); an episode is one
session (the cache resets between episodes, as in the paper).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("grocery", "dailydialog", "rps", "stream-ppl", "recall-distance")
RPS_PLAYERS = ("rock", "paper", "scissors")
RPS_FIRST = ("Let's play a game of Rock-Paper-Scissors. Choose one option from: "
             "(A) rock (B) paper (C) scissors. ")
RPS_NEXT = ("I chose [{prev}]. Analyze my preferences to maximize your winning rate and "
            "proceed to the next round. Choices: (A) rock (B) paper (C) scissors. You choose:")


@dataclass
class ChoiceTurn:
    id: str
    question: str              # the user message in `letter` scoring (the paper's, choices listed)
    letters: list[str]         # candidate answers in `letter` scoring
    texts: list[str]           # candidate answers in `text` scoring
    gold: int
    kind: str                  # key | csqa | recall | dialog | rps
    user_choice: int | None = None   # rps: the player's move
    bare_question: str | None = None  # the user message in `text` scoring: no listed choices

    def message(self, mode: str) -> str:
        """The user message for a scoring mode.

        `letter` needs the choices listed so the letters mean something; `text`
        scores each choice's own words as the reply, and a listed set only
        invites a small model to copy the last item (measured: 135 of 200
        recall answers on SmolLM2-135M), so it leaves the list out.
        """
        if mode == "text" and self.bare_question is not None:
            return self.bare_question
        return self.question


@dataclass
class Episode:
    id: str
    turns: list[ChoiceTurn] = field(default_factory=list)


def default_data_dir() -> Path:
    """../shared/data/sirllm beside the repository (where the project keeps it)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "sirllm"


def _read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (pass --data-dir or --data)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _bare(stem: str, lead: str = "") -> str:
    return lead + stem.strip()


def _listed(stem: str, choices: list[dict], lead: str = "") -> str:
    text = _bare(stem, lead) + " Choices: "
    for c in choices:
        text += " (" + c["label"] + ") " + c["text"]
    return text


def _gold(choices: list[dict], label: str) -> int:
    labels = [c["label"] for c in choices]
    if label not in labels:
        raise ValueError(f"answerKey {label!r} is not among the labels {labels}")
    return labels.index(label)


def load_grocery(path: Path, limit: int | None = None) -> list[Episode]:
    """keys.jsonl: per dialogue a key turn, CommonsenseQA turns, a recall turn."""
    episodes: dict[str, Episode] = {}
    for row in _read_jsonl(path):
        rid = str(row["id"])
        dialogue = rid.split("_")[-1]
        q = row["question"]
        if rid.startswith("key"):
            turn = ChoiceTurn(rid, q["stem"].strip(), ["OK"], ["OK"], 0, "key")
        else:
            kind = "recall" if rid.startswith("answer") else "csqa"
            turn = ChoiceTurn(rid, _listed(q["stem"], q["choices"]),
                              [c["label"] for c in q["choices"]], [c["text"] for c in q["choices"]],
                              _gold(q["choices"], row["answerKey"]), kind,
                              bare_question=_bare(q["stem"]))
        if dialogue not in episodes:
            if limit is not None and len(episodes) >= limit:
                break
            episodes[dialogue] = Episode(f"grocery-{dialogue}")
        episodes[dialogue].turns.append(turn)
    return list(episodes.values())


def load_dailydialog(path: Path, limit: int | None = 2000) -> list[Episode]:
    """dailydialog.jsonl: response choice; a new dialogue (id prefix) resets the cache.
    The paper uses the first 2,000 rows."""
    episodes: dict[str, Episode] = {}
    rows = _read_jsonl(path)
    for row in rows[:limit] if limit is not None else rows:
        dialogue = str(row["id"]).split("_")[0]
        q = row["question"]
        lead = "Choose the best response for the input: "
        turn = ChoiceTurn(str(row["id"]), _listed(q["stem"], q["choices"], lead),
                          [c["label"] for c in q["choices"]], [c["text"].strip() for c in q["choices"]],
                          _gold(q["choices"], row["answerKey"]), "dialog",
                          bare_question=_bare(q["stem"], lead))
        episodes.setdefault(dialogue, Episode(f"dailydialog-{dialogue}")).turns.append(turn)
    return list(episodes.values())


def load_rps(path: Path, limit: int | None = 2000, player: str | None = None) -> Episode:
    """One player's rounds, one session with no reset; the prompt of round r
    names the player's move in round r-1."""
    rows = _read_jsonl(path)
    rows = rows[:limit] if limit is not None else rows
    episode = Episode(f"rps-{player or Path(path).stem}")
    prev = None
    for row in rows:
        choices = row["question"]["choices"]
        user = _gold(choices, row["user_choice"])
        question = RPS_FIRST if prev is None else RPS_NEXT.format(prev=prev)
        episode.turns.append(ChoiceTurn(str(row["id"]), question, [c["label"] for c in choices],
                                        [c["text"] for c in choices],
                                        _gold(choices, row["answerKey"]), "rps", user))
        prev = choices[user]["text"]
    return episode


def rps_files(data_dir: Path) -> dict[str, Path]:
    return {p: Path(data_dir) / "rock_paper_scissors" / f"rock_paper_scissors_dominant_{p}.jsonl"
            for p in RPS_PLAYERS}


def load_dialogue_stream(path: Path) -> list[list[str]]:
    """Raw DailyDialog text: one dialogue a line, utterances split by __eou__."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    dialogues = []
    for line in path.read_text(encoding="utf-8").splitlines():
        utterances = [u.strip() for u in line.split("__eou__") if u.strip()]
        if utterances:
            dialogues.append(utterances)
    return dialogues


def stream_messages(dialogues: list[list[str]]):
    """(role, text) of every utterance, dialogue after dialogue, as one
    conversation: a dialogue's utterances alternate user and assistant."""
    for dialogue in dialogues:
        for i, text in enumerate(dialogue):
            yield ("user" if i % 2 == 0 else "assistant"), text


def default_file(task: str, data_dir: Path) -> Path:
    data_dir = Path(data_dir)
    return {
        "grocery": data_dir / "grocery_keys" / "keys.jsonl",
        "dailydialog": data_dir / "dailydialog" / "dailydialog.jsonl",
        "stream-ppl": data_dir / "dailydialog" / "dialogues_test.txt",
    }[task]
