"""`--kv-policy` and its knobs: parsing, validation, and what they turn into.

The parser-level tests are fast; the `vllm serve` ones run the real command
(patched CLI) and stop before an engine starts.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from sir_vllm.policy import knob_users, make_policy
from sir_vllm.server import flags, settings
from sir_vllm.server.process import vllm_executable


def parse(*argv):
    return flags.parser_for_tests().parse_args(list(argv))


def test_default_is_stock_vllm():
    args = parse()
    assert args.kv_policy == "none"
    assert flags.policy_from_args(args) is None


def test_knobs_build_the_policy_and_the_connector_config():
    args = parse("--kv-policy", "sirllm", "--kv-start-size", "4", "--kv-entropy-size", "64",
                 "--kv-recent-size", "32", "--kv-decay", "0.5")
    policy = flags.policy_from_args(args)
    assert policy.cache_size == 100 and policy.decay == 0.5
    cfg = flags.kv_transfer_config(policy)
    assert cfg["kv_connector"] == "SirKVConnector"
    assert cfg["kv_connector_module_path"] == "sir_vllm.connector"
    assert cfg["kv_role"] == "kv_both"
    assert cfg["kv_connector_extra_config"]["policy"]["entropy_size"] == 64


def test_streaming_refuses_sirllm_only_knobs():
    with pytest.raises(flags.FlagError, match="--kv-entropy-size"):
        flags.policy_from_args(parse("--kv-policy", "streaming", "--kv-entropy-size", "8"))


@pytest.mark.parametrize("argv, flag", [
    (("--kv-policy", "sirllm", "--kv-decay", "1.5"), "--kv-decay"),
    (("--kv-policy", "sirllm", "--kv-start-size", "-1"), "--kv-start-size"),
    (("--kv-start-size", "4"), "--kv-start-size"),  # a knob without a policy
])
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(flags.FlagError, match=flag):
        flags.policy_from_args(parse(*argv))


def test_reference_code_score_is_refused_with_the_reason():
    """The server cannot read a prompt row's log-prob of its own token on vLLM 0.32's
    V1 runners; the flag says so instead of serving a different score."""
    with pytest.raises(flags.FlagError, match="--kv-score.*prompt_logprob_token_ids"):
        flags.policy_from_args(parse("--kv-policy", "sirllm", "--kv-score", "reference-code"))


def test_several_api_servers_need_a_shared_store():
    args = parse("--kv-policy", "sirllm", "--kv-session-store", "memory")
    args.api_server_count, args.kv_transfer_config = 2, None
    with pytest.raises(flags.FlagError, match="--api-server-count 2: --kv-session-store memory"):
        flags.check_serving(args)
    for store in ([], ["--kv-session-store", "sqlite:/tmp/x.db"],
                  ["--kv-session-store", "redis://127.0.0.1:6379/0"]):
        args = parse("--kv-policy", "sirllm", *store)
        args.api_server_count, args.kv_transfer_config = 2, None
        flags.check_serving(args)  # the default store (sqlite) and redis are shared


@pytest.mark.parametrize("value", ["postgres://x", "redis://", "sqlite3:/tmp/x", "mem"])
def test_a_bad_session_store_names_the_flag(value):
    with pytest.raises(flags.FlagError, match="--kv-session-store: unknown session store"):
        flags.session_settings_from_args(parse("--kv-policy", "sirllm", "--kv-session-store", value),
                                         flags.policy_from_args(parse("--kv-policy", "sirllm")))


# -- the session settings -----------------------------------------------------

@pytest.fixture
def fresh_settings(monkeypatch):
    """settings.current as a fresh Settings for one test (the module global is shared)."""
    monkeypatch.setattr(settings, "current", settings.Settings())
    return settings


def test_session_settings_default_and_parse(fresh_settings):
    args = parse("--kv-policy", "sirllm")
    policy = flags.policy_from_args(args)
    assert flags.session_settings_from_args(args, policy) == {}
    fresh_settings.configure(policy, args)
    cur = fresh_settings.current
    defaults = {name: default for name, default, _ in settings.session_settings()}
    assert {k: getattr(cur, k) for k in defaults} == defaults
    assert (cur.max_sessions, cur.session_ttl, cur.rollback_turns, cur.max_budget) == \
        (None, 86400.0, 4, None)
    args = parse("--kv-policy", "sirllm", "--kv-max-sessions", "7", "--kv-session-ttl", "0",
                 "--kv-rollback-turns", "0", "--kv-max-budget", "2048")
    fresh_settings.configure(policy, args, **flags.session_settings_from_args(args, policy))
    assert (cur.max_sessions, cur.session_ttl, cur.rollback_turns, cur.max_budget) == \
        (7, 0.0, 0, 2048)
    assert cur.budget_limit() == 2048


def test_budget_limit_defaults_to_the_server_budget_or_the_context_length(fresh_settings):
    policy = make_policy("sirllm", entropy_size=96)  # budget 100
    fresh_settings.configure(policy, parse("--kv-policy", "sirllm"))
    assert fresh_settings.current.budget_limit() == 100  # context length not known yet
    args = parse("--kv-policy", "sirllm")
    args.max_model_len = 4096
    fresh_settings.configure(policy, args)
    assert fresh_settings.current.budget_limit() == 4096
    args.max_model_len = -1  # vLLM's "auto"
    fresh_settings.configure(policy, args)
    assert fresh_settings.current.max_model_len is None


def test_configure_leaves_the_bytes_per_token_to_the_engine_config(fresh_settings):
    fresh_settings.current.kv_bytes_per_token = 123  # a stale value from an earlier start
    args = parse("--kv-policy", "sirllm")
    fresh_settings.configure(flags.policy_from_args(args), args, chat_template="{{ x }}")
    assert fresh_settings.current.kv_bytes_per_token is None
    assert fresh_settings.current.chat_template == "{{ x }}"
    with pytest.raises(TypeError, match="not session settings: no_such_setting"):
        fresh_settings.configure(None, args, no_such_setting=5)


def test_chat_template_flag_is_loaded_as_vllm_loads_it(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    args = parse("--kv-policy", "sirllm")
    args.chat_template = str(path)
    assert flags.chat_template_from_args(args) == path.read_text()
    args.chat_template = None
    assert flags.chat_template_from_args(args) is None
    args.chat_template = str(tmp_path / "missing.jinja")
    with pytest.raises(flags.FlagError, match="--chat-template: .*missing.jinja"):
        flags.chat_template_from_args(args)


def test_apply_turns_the_flags_into_connector_middleware_and_settings(fresh_settings, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(flags.os, "environ", {})  # the CPU core reservation it sets
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0].content }}")
    args = parse("--kv-policy", "streaming", "--kv-recent-size", "60", "--kv-rollback-turns", "2")
    args.middleware, args.chat_template, args.max_model_len = [], str(template), 512
    flags.apply_kv_policy_args(args)
    assert args.kv_transfer_config.kv_connector == flags.CONNECTOR_CLASS
    assert args.kv_transfer_config.kv_connector_extra_config["policy"]["recent_size"] == 60
    assert args.kv_transfer_config.kv_connector_extra_config["max_running"] == 0  # off
    assert args.kv_transfer_config.kv_connector_extra_config["offload_bytes"] == 0  # off
    assert args.middleware == [flags.MIDDLEWARE]
    cur = fresh_settings.current
    assert cur.policy.to_dict() == make_policy("streaming", recent_size=60).to_dict()
    assert (cur.rollback_turns, cur.session_ttl, cur.chat_template) == (2, 86400.0,
                                                                        template.read_text())
    assert cur.budget_limit() == 512
    flags.apply_kv_policy_args(args)  # a second call (another from_cli_args) changes nothing
    assert args.middleware == [flags.MIDDLEWARE]


def test_max_running_reaches_the_connectors_config(fresh_settings, monkeypatch):
    monkeypatch.setattr(flags.os, "environ", {})
    for value, expected in (("auto", "auto"), ("16", 16)):
        args = parse("--kv-policy", "sirllm", "--kv-max-running", value)
        args.middleware = []
        flags.apply_kv_policy_args(args)
        assert fresh_settings.current.max_running == expected
        assert args.kv_transfer_config.kv_connector_extra_config["max_running"] == expected
    with pytest.raises(SystemExit):
        parse("--kv-policy", "sirllm", "--kv-max-running", "-1")


def test_offload_bytes_reaches_the_connectors_config(fresh_settings, monkeypatch):
    monkeypatch.setattr(flags.os, "environ", {})
    for value, expected in (("2G", 2 * 2**30), ("500m", 500 * 10**6), ("0", 0)):
        args = parse("--kv-policy", "sirllm", "--kv-offload-bytes", value)
        args.middleware = []
        flags.apply_kv_policy_args(args)
        assert fresh_settings.current.offload_bytes == expected
        assert args.kv_transfer_config.kv_connector_extra_config["offload_bytes"] == expected
    for bad in ("-1", "much"):
        with pytest.raises(SystemExit):
            parse("--kv-policy", "sirllm", "--kv-offload-bytes", bad)


@pytest.mark.parametrize("argv, message", [
    (("--kv-max-sessions", "0"), "--kv-max-sessions: must be an integer >= 1, got 0"),
    (("--kv-session-ttl", "-1"), "--kv-session-ttl: must be a number >= 0, got -1.0"),
    (("--kv-session-ttl", "nan"), "--kv-session-ttl: must be a number >= 0"),
    (("--kv-rollback-turns", "-2"), "--kv-rollback-turns: must be an integer >= 0, got -2"),
    (("--kv-max-budget", "0"), "--kv-max-budget: must be an integer >= 1, got 0"),
    (("--kv-entropy-size", "96", "--kv-max-budget", "64"),
     "--kv-max-budget 64: below the server's own budget of 100 tokens "
     r"\(--kv-start-size \+ --kv-entropy-size \+ --kv-recent-size\)"),
])
def test_bad_session_settings_name_the_flag(argv, message):
    args = parse("--kv-policy", "sirllm", *argv)
    with pytest.raises(flags.FlagError, match=message):
        flags.session_settings_from_args(args, flags.policy_from_args(args))


def test_session_settings_need_a_policy():
    with pytest.raises(flags.FlagError,
                       match="--kv-session-ttl, --kv-max-budget: needs --kv-policy sirllm or streaming"):
        flags.policy_from_args(parse("--kv-session-ttl", "5", "--kv-max-budget", "9"))


# -- a request's kv_policy -------------------------------------------------------

SERVER = make_policy("sirllm", start_size=4, entropy_size=64, recent_size=32)  # budget 100


def test_request_policy_takes_the_knobs_within_the_limit():
    assert flags.policy_from_request(None, SERVER, 1000) is SERVER
    p = flags.policy_from_request({"entropy_size": 500, "decay": 0.9}, SERVER, 1000)
    assert (p.name, p.cache_size, p.decay) == ("sirllm", 504, 0.9)  # unset knobs: the policy's
    s = flags.policy_from_request({"name": "streaming", "recent_size": 996}, SERVER, 1000)
    assert s.cache_size == 1000  # exactly the limit
    same = flags.policy_from_request(SERVER.to_dict(), SERVER, 100)  # to_dict round-trips
    assert same.to_dict() == SERVER.to_dict()


@pytest.mark.parametrize("value, message", [
    ("sirllm", "kv_policy must be an object like"),
    ({"name": "h2o"}, "kv_policy.name: unknown policy 'h2o'; a session takes one of sirllm, "
                      "streaming"),
    ({"name": 3}, "kv_policy.name: unknown policy 3"),
    ({"name": "none"}, "kv_policy.name: 'none' never evicts; a session needs a bounded policy"),
    ({"name": "full"}, "kv_policy.name: 'full' never evicts"),
    ({"name": "streaming", "entropy_size": 8}, "kv_policy.entropy_size: not a knob of policy "
                                               "'streaming'"),
    ({"window": 8}, "kv_policy.window: not a knob of policy 'sirllm'"),
    ({"decay": 2.0}, r"kv_policy.decay: decay must be in \(0, 1\], got 2.0"),
    ({"entropy_size": "500"}, "kv_policy.entropy_size: entropy_size must be an integer"),
    ({"start_size": True}, "kv_policy.start_size: start_size must be an integer"),
    ({"entropy_size": 10, "cache_size": 99}, "kv_policy.cache_size: cache_size 99 does not match"),
    ({"score": "reference-code"}, "kv_policy.score: 'reference-code' .*prompt_logprob_token_ids"),
    ({"entropy_size": 10**12}, r"kv_policy: budget of 1000000000004 tokens \(start_size \+ "
                               r"entropy_size \+ recent_size\) is above this server's limit of "
                               r"1000 \(--kv-max-budget\)"),
    ({"name": "streaming", "recent_size": 997}, "budget of 1001 tokens .* limit of 1000"),
])
def test_request_policy_refusals_say_what_is_wrong(value, message):
    with pytest.raises(ValueError, match=message):
        flags.policy_from_request(value, SERVER, 1000)


def test_request_budget_limit_none_is_the_server_budget():
    asked = {"entropy_size": 64, "recent_size": 32}
    assert flags.policy_from_request(asked, SERVER, None).cache_size == 100
    with pytest.raises(ValueError, match="budget of 101 tokens .* limit of 100"):
        flags.policy_from_request({**asked, "entropy_size": 65}, SERVER, None)


def test_serve_args_round_trip_through_the_flags():
    for policy in (SERVER, make_policy("streaming", start_size=2, recent_size=30)):
        argv = flags.serve_args(policy)
        assert flags.policy_from_args(parse(*argv)).to_dict() == policy.to_dict()


def _vllm(*argv, timeout=300):
    return subprocess.run([vllm_executable(), *argv], capture_output=True, text=True, timeout=timeout)


def test_vllm_serve_help_lists_the_flags():
    out = _vllm("serve", "--help=SirLLM")
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--kv-policy", "--kv-start-size", "--kv-entropy-size", "--kv-recent-size",
                 "--kv-decay", "--kv-score"):
        assert flag in out.stdout


def _help_blocks(text: str) -> dict[str, str]:
    """`--flag` -> its help, whitespace collapsed, from argparse's help output."""
    blocks, flag = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (--[\w-]+)", line)
        if m:
            flag = m.group(1)
            blocks[flag] = ""
        elif not line.strip() or not line.startswith("  "):
            flag = None
        if flag:
            blocks[flag] += " " + line.strip()
    return {f: " ".join(b.split()) for f, b in blocks.items()}


def test_vllm_serve_help_states_each_default_once():
    """vLLM's formatter appends "(default: ...)" to every help not mentioning
    %(default); our flags default to None and state their real default."""
    out = _vllm("serve", "--help=SirLLM")
    assert out.returncode == 0, out.stderr[-2000:]
    blocks = _help_blocks(out.stdout)
    expected = {"--kv-policy": ["(default: none)"]}
    for name, users in knob_users(bounded=True).items():
        expected[flags.knob_flag(name)] = [f"{cls.name} (default: {k.default})" for cls, k in users]
    for _, default, spec in settings.session_settings():
        expected[spec.flag] = [f"(default: {spec.default_text or default})"]
    assert set(blocks) == set(expected)
    for flag, defaults in expected.items():
        assert "None" not in blocks[flag], (flag, blocks[flag])
        assert blocks[flag].count("default") == len(defaults), (flag, blocks[flag])
        for text in defaults:
            assert " ".join(text.split()) in blocks[flag], (flag, text, blocks[flag])


@pytest.mark.parametrize("argv, needle", [
    (("--kv-policy", "sirllm", "--kv-decay", "0"), "--kv-decay"),
    (("--kv-policy", "bogus"), "--kv-policy"),
    (("--kv-policy", "sirllm", "--api-server-count", "2", "--kv-session-store", "memory"),
     "--api-server-count"),
    (("--kv-policy", "sirllm", "--kv-max-sessions", "0"), "--kv-max-sessions: must be"),
    (("--kv-rollback-turns", "2",), "--kv-rollback-turns: needs --kv-policy"),
])
def test_vllm_serve_stops_on_a_bad_value(bundled_model, argv, needle):
    out = _vllm("serve", str(bundled_model), *argv)
    assert out.returncode == 2, out.stderr[-2000:]
    assert needle in out.stderr, out.stderr[-2000:]


def test_session_servers_reserve_the_cores_stock_vllm_reserves():
    """vLLM reserves an extra CPU core for any KV connector; on 2 cores that
    turns into no reservation and half-speed batched decode (vllm_adapter)."""
    from sir_vllm import vllm_adapter

    env = {}
    assert vllm_adapter.keep_stock_cpu_reservation(parse("--kv-policy", "sirllm"), env) == "1"
    assert env == {vllm_adapter.CPU_RESERVED_ENV: "1"}
    args = parse("--kv-policy", "sirllm")
    args.tensor_parallel_size = 2
    assert vllm_adapter.keep_stock_cpu_reservation(args, {}) == "2"
    chosen = {vllm_adapter.CPU_RESERVED_ENV: "0"}  # the user's own choice wins
    assert vllm_adapter.keep_stock_cpu_reservation(args, chosen) is None
    assert chosen == {vllm_adapter.CPU_RESERVED_ENV: "0"}
