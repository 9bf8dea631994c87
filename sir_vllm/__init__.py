"""sir-vllm: SirLLM session memory (surprisal-ranked KV retention) for vLLM serving."""

__version__ = "0.1.0"

# The vLLM release whose internals `sir_vllm.vllm_adapter` is written against.
VLLM_VERSION = "0.32.0"
