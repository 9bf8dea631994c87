"""The `sir-vllm` command."""
