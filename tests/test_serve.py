"""The bundled model served by the real `vllm serve` command, through the
official `openai` client."""

from __future__ import annotations

from importlib.metadata import entry_points

from conftest import SERVED_NAME


def test_chat_completion_knows_the_capital_of_france(client):
    reply = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0.0,
        max_tokens=32,
    )
    text = reply.choices[0].message.content
    assert "Paris" in text, text
    assert reply.usage.completion_tokens > 0


def test_completions_api_is_greedy_and_deterministic(client):
    kwargs = dict(model=SERVED_NAME, prompt="The capital of France is",
                  temperature=0.0, max_tokens=8)
    first = client.completions.create(**kwargs).choices[0].text
    second = client.completions.create(**kwargs).choices[0].text
    assert first == second
    assert first.strip(), "empty completion"


def test_models_endpoint_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]


def test_general_plugin_entry_point_is_registered():
    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("sir_vllm") == "sir_vllm.plugin:register"


def test_general_plugin_is_loaded_inside_the_engine_process(server, plugin_probe):
    # Each vLLM process that loads our plugin appends "pid<TAB>process-name".
    rows = [line.split("\t") for line in plugin_probe.read_text().splitlines()]
    by_name = {name: int(pid) for pid, name in rows}
    assert "EngineCore" in by_name, rows
    assert by_name["EngineCore"] != server.proc.pid
    assert any(name.startswith("VllmWorker") for name in by_name), rows
