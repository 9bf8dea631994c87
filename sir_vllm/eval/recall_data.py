"""The recall-against-distance task's data: a fact, k filler turns, a question.

A fact is one user turn ("Please remember this: my neighbour's name is
[Ada]."), of one of three kinds (a name, a number, a place). Its question
("What is my neighbour's name? Reply with the name only.") is a 4-way choice:
the gold value and 3 distractors of the same kind, in a seeded order. The
values come from the lists below (names, cities) or a seeded 4-digit draw
(numbers): nothing is fetched, and fact i is a function of (seed, i) alone,
so every policy, every distance k and every `--facts` count sees the same
facts.

The fillers between fact and question are DailyDialog utterances (the
validation split, kept apart from the test split that stream-ppl and the
dailydialog task read), taken in order from a seeded starting dialogue, as the
user's turns; the model answers each itself. An utterance that mentions any of
the fact's four values, its subject ("neighbour") or a square bracket is
skipped, so the answer is never in the fillers and the bracketed marker
("[Ada]") reads in the cache only where the fact itself is kept. The first k
fillers of a fact are the same for every k: the k=5 episode is a prefix of
the k=500 one.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from .data import ChoiceTurn, _listed, default_data_dir, load_dialogue_stream

NAMES = ("Ada", "Boris", "Carmen", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ingrid",
         "Jonas", "Keiko", "Lars", "Mirela", "Nadia", "Oskar", "Priya", "Quentin", "Rafael",
         "Svetlana", "Tomas", "Ulrike", "Viktor", "Wanda", "Xavier", "Yusuf", "Zofia", "Anselm",
         "Beatrix", "Cyrus", "Dagny", "Emeka", "Fiona", "Gustav", "Hana", "Ivo", "Jolene",
         "Kofi", "Leonie", "Matteo", "Nkechi")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Krakow", "Seville", "Bergen",
          "Quito", "Tbilisi", "Zagreb", "Porto", "Valencia", "Montreal", "Adelaide", "Osaka",
          "Manila", "Accra", "Cusco", "Tallinn", "Riga", "Vilnius", "Helsinki", "Marseille",
          "Glasgow", "Dakar", "Havana", "Bogota", "Ankara", "Geneva", "Vienna", "Prague",
          "Budapest", "Seoul", "Perth", "Calgary", "Antwerp", "Bologna", "Munich")


@dataclass(frozen=True)
class FactKind:
    name: str
    statement: str      # the user's turn, {value} in brackets
    question: str       # asked after the fillers
    subject: tuple      # words a filler must not mention (regexes)


FACT_KINDS = (
    FactKind("name", "Please remember this: my neighbour's name is [{value}].",
             "What is my neighbour's name? Reply with the name only.", (r"neighbou?rs?",)),
    FactKind("number", "Please remember this: my locker number is [{value}].",
             "What is my locker number? Reply with the number only.", (r"lockers?",)),
    FactKind("place", "Please remember this: my sister lives in [{value}].",
             "Which city does my sister live in? Reply with the city only.", (r"sisters?",)),
)
CHOICES = 4
LETTERS = "ABCD"


@dataclass(frozen=True)
class Fact:
    index: int
    kind: str
    values: tuple       # the CHOICES candidates, in the asked order
    gold: int
    statement: str      # the user turn that tells the fact
    question: ChoiceTurn
    avoid: re.Pattern   # what a filler must not contain

    @property
    def answer(self) -> str:
        return self.values[self.gold]

    @property
    def marker(self) -> str:
        """The fact's answer as the statement writes it: in the cache only if the fact is."""
        return f"[{self.answer}]"


@dataclass
class RecallEpisode:
    id: str
    k: int              # filler turns between the fact and the question
    fact: Fact
    fillers: list[str]  # the user's k filler turns (the model answers each)


def _values(kind: str, rng: random.Random) -> list[str]:
    if kind == "name":
        return rng.sample(NAMES, CHOICES)
    if kind == "place":
        return rng.sample(CITIES, CHOICES)
    return [str(n) for n in rng.sample(range(1000, 10000), CHOICES)]


def make_fact(seed: int, index: int) -> Fact:
    """Fact `index` of a seed: kinds in turn (name, number, place, ...), the
    values, the gold's position and so the question, all from (seed, index)."""
    rng = random.Random(f"sir-vllm-recall/{seed}/{index}")
    kind = FACT_KINDS[index % len(FACT_KINDS)]
    values = _values(kind.name, rng)          # values[0] is the fact's own
    order = list(range(CHOICES))
    rng.shuffle(order)
    shown = [values[i] for i in order]
    gold = order.index(0)
    labelled = [{"label": LETTERS[i], "text": v} for i, v in enumerate(shown)]
    question = ChoiceTurn(f"recall-{index}", _listed(kind.question, labelled), list(LETTERS),
                          shown, gold, "recall", bare_question=kind.question)
    words = [re.escape(v) for v in values] + list(kind.subject)
    avoid = re.compile(r"[\[\]]|\b(?:" + "|".join(words) + r")\b", re.IGNORECASE)
    return Fact(index, kind.name, tuple(shown), gold, kind.statement.format(value=values[0]),
                question, avoid)


def default_filler_file(data_dir: Path | None = None) -> Path:
    return Path(data_dir or default_data_dir()) / "dailydialog" / "dialogues_validation.txt"


def filler_turns(fact: Fact, dialogues: list[list[str]], n: int, seed: int) -> list[str]:
    """n utterances, in order, from a seeded starting dialogue on (wrapping
    round), skipping every one that mentions the fact (`Fact.avoid`)."""
    if n == 0:
        return []
    rng = random.Random(f"sir-vllm-recall-fillers/{seed}/{fact.index}")
    start = rng.randrange(len(dialogues))
    out: list[str] = []
    for step in range(len(dialogues)):
        for utterance in dialogues[(start + step) % len(dialogues)]:
            if not fact.avoid.search(utterance):
                out.append(utterance)
                if len(out) == n:
                    return out
    raise ValueError(f"the filler text has fewer than {n} usable utterances for fact {fact.index}")


def build_episodes(distances: list[int], facts_per_k: list[int], seed: int,
                   dialogues: list[list[str]]) -> list[RecallEpisode]:
    """facts_per_k[j] episodes at distance distances[j]: facts 0.. of the
    seed, each with its first k filler turns."""
    if len(facts_per_k) != len(distances):
        raise ValueError(f"{len(facts_per_k)} fact counts for {len(distances)} distances")
    most = max(facts_per_k, default=0)
    facts = [make_fact(seed, i) for i in range(most)]
    longest = {i: max((k for k, n in zip(distances, facts_per_k) if i < n), default=0)
               for i in range(most)}
    fillers = {i: filler_turns(facts[i], dialogues, longest[i], seed) for i in range(most)}
    return [RecallEpisode(f"recall-k{k}-f{i}", k, facts[i], fillers[i][:k])
            for k, n in zip(distances, facts_per_k) for i in range(n)]


def load_fillers(path: Path) -> list[list[str]]:
    return load_dialogue_stream(path)
