"""Tiny random Mixture-of-Experts and multimodal models built from transformers' own config classes (no
download), saved with transformers' own `save_pretrained` (so in the checkpoint layout transformers writes:
per-expert tensors for the families it converts, fused ones for gpt-oss), with the word-level test tokenizer.

Experts are 4 per MoE layer, 2 routed per token; hidden 64, expert width 32; 2 decoder layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from tests.helpers import make_tokenizer

TEXT: dict[str, Any] = dict(
    vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.05,
)
NUM_EXPERTS = 4
MOE: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", {"num_local_experts": NUM_EXPERTS, "num_experts_per_tok": 2, "intermediate_size": 32}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": NUM_EXPERTS, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 64}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": NUM_EXPERTS, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "head_dim": 16}),
    "gpt_oss": ("GptOssConfig", {"num_local_experts": NUM_EXPERTS, "num_experts_per_tok": 2, "intermediate_size": 32,
                                 "head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}),
    # layer 0 dense (first_k_dense_replace), layer 1 routed + shared experts; multi-head latent attention
    "deepseek_v3": ("DeepseekV3Config", {"n_routed_experts": NUM_EXPERTS, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 32, "n_shared_experts": 1, "first_k_dense_replace": 1,
                                         "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                                         "v_head_dim": 16, "n_group": 1, "topk_group": 1}),
}
# routed experts per family and decoder layer (DeepSeek's layer 0 is dense)
MOE_LAYERS: dict[str, list[int]] = {"deepseek_v3": [1]}
MULTIMODAL = ("gemma3", "qwen2_5_vl")


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Outlier embedding channels and uneven norm gains, as tests/families.py does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight  # type: ignore[operator]
        outliers = torch.ones(embed.shape[1])
        outliers[torch.randperm(embed.shape[1], generator=generator)[:4]] = 8.0
        embed.mul_(outliers)
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight") and "vision" not in name and "visual" not in name:
                param.copy_(torch.exp(0.5 * torch.randn(param.shape, generator=generator)))
            if name.endswith("sinks"):
                param.normal_(0.0, 0.5, generator=generator)


def make_tiny_moe(family: str, directory: Path, seed: int = 0, *, biased_expert: int | None = None,
                  dtype: torch.dtype = torch.float16) -> Path:
    """A random 2-layer MoE model of `family` saved in `dtype`; `biased_expert`: every router scores that expert far
    below the others, so no calibration token is ever routed to it."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    class_name, overrides = MOE[family]
    unbiasable = biased_expert is not None and family not in ("gpt_oss", "deepseek_v3")
    if unbiasable:  # a router without a bias: one routed expert, chosen from a pair ±v (one of them scores >= 0)
        overrides = {**overrides, "num_experts_per_tok": 1}
    config = getattr(transformers, class_name)(
        **{**TEXT, **overrides}, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _perturb(model, seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 3 or "experts" in name and name.endswith("weight"):
                param.normal_(0.0, 0.08)  # experts big enough that their rounding shows in the logits
            if name.endswith("bias") and "experts" in name:
                param.normal_(0.0, 0.02)
        if biased_expert is not None:
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if type(module).__name__.endswith(("Router", "TopKRouter", "TopkRouter")) and weight is not None:
                    bias = getattr(module, "bias", None)
                    correction = getattr(module, "e_score_correction_bias", None)
                    if isinstance(bias, torch.Tensor):
                        bias[biased_expert] = -1e4
                    elif isinstance(correction, torch.Tensor):
                        correction[biased_expert] = -1e4
                    else:  # logit 0 never beats max(x·v, -x·v)
                        a, b = [e for e in range(NUM_EXPERTS) if e != biased_expert][:2]
                        weight[biased_expert].zero_()
                        weight[b] = -weight[a]
    model = model.to(dtype)  # type: ignore[arg-type]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_multimodal(family: str, directory: Path, seed: int = 0) -> Path:
    """A random Gemma-3 (SigLIP tower + projector) or Qwen2.5-VL (ViT + merger) model with processor files."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if family == "gemma3":
        config: Any = transformers.Gemma3Config(
            text_config=dict(TEXT, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                             **special),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298, **special,
        )
    else:
        config = transformers.Qwen2_5_VLConfig(
            text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **special),
            vision_config=dict(hidden_size=32, intermediate_size=64, depth=1, num_heads=2, out_hidden_size=64),
            image_token_id=299, video_token_id=298, vision_start_token_id=297, **special,
        )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    _perturb(model, seed)
    model = model.to(torch.float16)  # type: ignore[arg-type]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "TestImageProcessor"}) + "\n")
    (directory / "processor_config.json").write_text(json.dumps({"processor_class": "TestProcessor"}) + "\n")
    return directory
