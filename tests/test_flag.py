"""`--kv-policy` and its knobs: parsing, validation, and what they turn into.

The parser-level tests are fast; the `vllm serve` ones run the real command
(patched CLI) and stop before an engine starts.
"""

from __future__ import annotations

import subprocess

import pytest

from sir_vllm.server import flags
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


def test_several_api_servers_are_refused():
    args = parse("--kv-policy", "sirllm")
    args.api_server_count, args.kv_transfer_config = 2, None
    with pytest.raises(flags.FlagError, match="--api-server-count"):
        flags.check_serving(args)


def _vllm(*argv, timeout=300):
    return subprocess.run([vllm_executable(), *argv], capture_output=True, text=True, timeout=timeout)


def test_vllm_serve_help_lists_the_flags():
    out = _vllm("serve", "--help=SirLLM")
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--kv-policy", "--kv-start-size", "--kv-entropy-size", "--kv-recent-size",
                 "--kv-decay", "--kv-score"):
        assert flag in out.stdout


@pytest.mark.parametrize("argv, needle", [
    (("--kv-policy", "sirllm", "--kv-decay", "0"), "--kv-decay"),
    (("--kv-policy", "bogus"), "--kv-policy"),
    (("--kv-policy", "sirllm", "--api-server-count", "2"), "--api-server-count"),
])
def test_vllm_serve_stops_on_a_bad_value(bundled_model, argv, needle):
    out = _vllm("serve", str(bundled_model), *argv)
    assert out.returncode != 0
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
