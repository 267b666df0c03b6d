"""Tiny random models of many transformers families (2 layers, hidden 64), built from transformers' own
config classes with no download, for tests that run every family through the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM

from tests.helpers import make_tokenizer

COMMON: dict[str, Any] = dict(
    vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.05,
)
# family → (config class, overrides). Sliding windows of 16 tokens, shorter than the test windows, exercise
# the per-layer masks; multipliers and logit scales exercise the model's own embedding and head paths.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 16, "final_logit_softcapping": 5.0}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", {"num_key_value_heads": 4, "pad_token_id": 3}),
    "olmo2": ("Olmo2Config", {"num_key_value_heads": 4}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 4.0,
                                  "attention_multiplier": 0.2}),
    "cohere": ("CohereConfig", {"logit_scale": 0.5}),
    "stablelm": ("StableLmConfig", {"num_key_value_heads": 4}),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.5}),
}


def make_tiny_family(family: str, directory: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Save a random 2-layer model of `family` with the word-level test tokenizer into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    class_name, overrides = FAMILIES[family]
    config = getattr(transformers, class_name)(
        **{**COMMON, **overrides}, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **({} if "pad_token_id" in overrides else {"pad_token_id": tokenizer.pad_token_id}),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        outliers = torch.ones(embed.shape[1])
        outliers[torch.randperm(embed.shape[1], generator=generator)[:4]] = 8.0
        embed.mul_(outliers)
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):  # uneven gains (Gemma's norms scale by 1 + weight)
                param.copy_(torch.exp(0.5 * torch.randn(param.shape, generator=generator)))
    model = model.to(dtype)  # type: ignore[arg-type]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
