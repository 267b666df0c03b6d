"""What each llama.cpp architecture needs beyond the `gguf` package's tables (workers/formats/gguf.py).

Adding a family llama.cpp knows is an entry here: its name in EXPORTED_ARCHS (and ARCH_ALIASES when Hugging
Face's `model_type` differs), its RoPE form (NORMAL_ROPE_ARCHS: q/k rows permuted), its norm convention
(NORM_SHIFT_ARCHS: stored as 1 + w), the metadata keys only it has (ARCH_KEYS, as convert_hf_to_gguf.py writes
them) and the settings llama.cpp fixes in its code rather than reading from the file, checked at submit
(ARCH_CHECKS).
"""

from __future__ import annotations

from typing import Any

import gguf

from workers.errors import InvalidSpecError

# architectures we export (llama.cpp knows many more; see workers.formats.gguf.resolve_arch)
EXPORTED_ARCHS = ("llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "qwen2moe", "qwen3moe")
NORMAL_ROPE_ARCHS = ("llama",)
NORM_SHIFT_ARCHS = ("gemma", "gemma2", "gemma3")  # RMSNorm computes x̂·(1 + w): llama.cpp stores 1 + w
# Hugging Face model_type → llama.cpp architecture, as convert_hf_to_gguf.py maps it
ARCH_ALIASES = {"mistral": "llama", "mixtral": "llama", "gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


def rope_sections(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The RoPE parameters by attention type (Gemma-3: "full_attention" / "sliding_attention"), or {"": them}."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        return {}
    if all(isinstance(v, dict) for v in rope.values()) and rope:
        return rope
    return {"": rope}


def _check_gemma(config: dict[str, Any], arch: str) -> None:
    """What llama.cpp's Gemma graphs fix in code: the query scale, the sliding-window layers, the local RoPE base."""
    layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    scalar = config.get("query_pre_attn_scalar")
    big = {"gemma2": 46, "gemma3": 62}.get(arch) == layers  # llama.cpp's 27B: 1/√(hidden/heads)
    if scalar is not None and int(scalar) != head_dim and not (big and int(scalar) == int(config["hidden_size"]) // heads):
        raise InvalidSpecError(f"llama.cpp scales {arch}'s queries by 1/√head_dim ({head_dim}), this model by"
                               f" 1/√{scalar} (query_pre_attn_scalar): choose another output format")
    every = {"gemma2": 2, "gemma3": 6}.get(arch)
    if every and config.get("layer_types") is not None:
        expected = ["sliding_attention" if i % every < every - 1 else "full_attention" for i in range(layers)]
        if list(config["layer_types"]) != expected:
            raise InvalidSpecError(f"llama.cpp's {arch} makes every {every}th layer global and the others sliding-window;"
                                   " this model's layer_types differ: choose another output format")
    if arch == "gemma2" and (config.get("attn_logit_softcapping") is None or config.get("final_logit_softcapping") is None):
        raise InvalidSpecError("llama.cpp's gemma2 always soft-caps attention and final logits; this model does not:"
                               " choose another output format")
    local = rope_sections(config).get("sliding_attention", {}).get("rope_theta", config.get("rope_local_base_freq"))
    if arch == "gemma3" and local is not None and float(local) != 10000.0:
        raise InvalidSpecError(f"llama.cpp's gemma3 uses RoPE base 10000 on its sliding-window layers, this model"
                               f" {local}: choose another output format")


def _check_qwen_moe(config: dict[str, Any], arch: str) -> None:
    """llama.cpp's qwen2moe / qwen3moe: every layer an MoE layer, the top-k routing weights renormalised for qwen3moe
    and not for qwen2moe (fixed in its graphs)."""
    if int(config.get("decoder_sparse_step") or 1) != 1 or config.get("mlp_only_layers"):
        raise InvalidSpecError(f"llama.cpp's {arch} makes every layer an MoE layer; this model has dense ones"
                               " (decoder_sparse_step / mlp_only_layers): choose another output format")
    if arch == "qwen2moe" and config.get("tie_word_embeddings"):
        raise InvalidSpecError("llama.cpp's qwen2moe reads its own output matrix, and this model ties it to the token"
                               " embedding: choose another output format")
    normalised = arch == "qwen3moe"
    if bool(config.get("norm_topk_prob", False)) != normalised:
        raise InvalidSpecError(f"llama.cpp's {arch} {'renormalises' if normalised else 'does not renormalise'} the"
                               f" top-k routing weights; this model's norm_topk_prob is {config.get('norm_topk_prob')}:"
                               " choose another output format")


ARCH_CHECKS = {"gemma": _check_gemma, "gemma2": _check_gemma, "gemma3": _check_gemma,
               "qwen2moe": _check_qwen_moe, "qwen3moe": _check_qwen_moe}


def _phi3_keys(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """convert_hf_to_gguf.py's Phi3MiniModel: the pre-extension context length, and a sliding window of 0 when the
    model has none (llama.cpp tells Phi-4 from Phi-3 by it)."""
    rope = config.get("rope_parameters") or {}
    original = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    writer.add_rope_scaling_orig_ctx_len(int(original or config.get("max_position_embeddings", 4096)))
    writer.add_sliding_window(int(config.get("sliding_window") or 0))


def _gemma2_keys(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    writer.add_sliding_window(int(config["sliding_window"]))


def _gemma3_keys(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    writer.add_sliding_window(int(config["sliding_window"]))


ARCH_KEYS = {"phi3": _phi3_keys, "gemma2": _gemma2_keys, "gemma3": _gemma3_keys}  # the keys only one arch has
