"""Model checkpoints sir-vllm runs on: the bundled SmolLM2 and tiny test models."""
