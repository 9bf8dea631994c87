"""A tiny random-weight Llama checkpoint with the bundled model's tokenizer.

Fast tests need a model that loads in seconds; sharing the real tokenizer and
chat template keeps prompts and token ids realistic.
"""

from __future__ import annotations

from pathlib import Path

from .bundled import prepare


def make_tiny(out: Path, seed: int = 0, num_layers: int = 2, hidden: int = 64,
              heads: int = 4, kv_heads: int = 2) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = prepare()
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
