"""Exploratory run (2026-11-26): Grocery, `text` scoring, with the questions
rendered WITHOUT the paper's listed choices ("Choices: (A) ... (D) ...").

With the list, the 135M model copies the last listed item and recall is at
chance even with the full cache; without it, recall works. Not yet an option
of `sir-vllm eval`; usage: python docs/results/experiments/grocery_text_without_listed_choices.py POLICY [DIALOGUES]
POLICY: full | sirllm (4+508) | streaming (4+508): a budget that evicts, since
the dialogues shrink to about 700 tokens without the lists.
"""

import sys

from sir_vllm.eval import data, tasks
from sir_vllm.eval.backends import ReferenceBackend
from sir_vllm.models.bundled import prepare
from sir_vllm.policy import make_policy

POLICIES = {
    "full": make_policy("full"),
    "sirllm": make_policy("sirllm", start_size=4, entropy_size=508),
    "streaming": make_policy("streaming", start_size=4, recent_size=508),
}

name, limit = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20
episodes = data.load_grocery(data.default_file("grocery", data.default_data_dir()), limit)
for episode in episodes:
    for turn in episode.turns:
        if turn.kind != "key":
            turn.question = turn.question.split(" Choices: ")[0]
backend = ReferenceBackend(prepare())
predictions = tasks.run_choice_episodes(backend, POLICIES[name], episodes, "text", name)
print(name, tasks.grocery_metrics(predictions))
