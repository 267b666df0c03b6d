"""Checks of a job against the model it names, cheap enough to run when the job is submitted.

`check_against_model` reads config.json and the safetensors headers (never tensor data), and builds the
model on the `meta` device to learn its decoder layers and their Linears (any decoder-only causal LM of
transformers; others are refused), so the service can answer a bad request with a 422 in about a second
instead of failing an hour into a GPU job. Checks that
need no model at all live in `JobSpec.validate`; checks that depend on the worker's hardware (is CUDA
there?) happen in the engine, because the API host may have no GPU.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from workers.architectures import ArchitectureInfo
from workers.errors import InputError, InvalidSpecError
from workers.formats.gguf import check_model as check_gguf_model
from workers.formats.gguf import parse_format as parse_gguf_format
from workers.model_graph import build_skeleton, stored_prefixes
from workers.quant.grid import check_group_size
from workers.spec import FP8_BLOCK, JobSpec, OutputFormat
from workers.tensor_source import TensorSource

CONFIG_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ModelInfo:
    """What the engine learned about the model before loading any weight."""

    model_dir: Path
    architecture: ArchitectureInfo
    config: dict[str, Any]  # config.json as written
    num_layers: int
    dtype: torch.dtype  # the checkpoint's dtype: quantization scales are written in it
    linear_shapes: dict[str, tuple[int, int]]  # "layers.3.mlp.down_proj" → (out_features, in_features)
    tied_embeddings: bool  # lm_head reuses the embedding matrix (no lm_head.weight in the checkpoint)
    weight_bytes: int
    has_tokenizer: bool
    embed_prefix: str = ""  # checkpoint name prefix of the input embeddings, e.g. "model.embed_tokens."
    lm_head_prefix: str = ""  # checkpoint name prefix of the output projection (its module path when tied)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise InputError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise InputError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InputError(f"{path} must hold a JSON object")
    return config


def config_dtype(config: dict[str, Any]) -> torch.dtype:
    """The checkpoint dtype from config.json ("dtype" in transformers 5, "torch_dtype" before)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in CONFIG_DTYPES:
        raise InvalidSpecError(f"model dtype {name!r} is not supported; expected one of {sorted(CONFIG_DTYPES)}")
    return CONFIG_DTYPES[name]


def _check_text_file(path: str, role: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{role} file {file} does not exist")
    if file.stat().st_size == 0:
        raise InputError(f"{role} file {file} is empty; give it some text")


def load_config(model_dir: str | Path) -> Any:
    """The transformers config of a model directory (remote code never runs), with the KV cache off."""
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types here; the user needs the reason, not the type
        raise InputError(f"cannot read the model config in {model_dir}: {exc}") from exc
    config.use_cache = False
    return config


def _linear_shapes(source: TensorSource, arch: ArchitectureInfo, num_layers: int) -> dict[str, tuple[int, int]]:
    """Every decoder layer's Linears as the checkpoint stores them, checked against the model's shapes."""
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(num_layers):
        for linear, expected in (arch.layer_linear_shapes[layer] if arch.layer_linear_shapes else arch.linear_shapes).items():
            name = f"{arch.layer_prefix(layer)}{linear}.weight"
            if name not in source:
                if _fused_expert(source, arch, layer, linear):
                    shapes[f"layers.{layer}.{linear}"] = expected  # split from the fused tensor (workers/moe.py)
                    continue
                raise InputError(f"the checkpoint in {source.dir} lacks {name}; is it complete?")
            shape = tuple(source.shape(name))
            if shape != expected:
                raise InputError(f"{name} has shape {list(shape)}; the model's config gives {list(expected)}")
            shapes[f"layers.{layer}.{linear}"] = (shape[0], shape[1])
    return shapes


def _fused_expert(source: TensorSource, arch: ArchitectureInfo, layer: int, linear: str) -> bool:
    """`linear` is one expert's Linear, and the checkpoint stores that layer's experts fused (gpt-oss)."""
    for block in arch.experts:
        if block.layer == layer and linear.startswith(f"{block.path}."):
            return f"{arch.layer_prefix(layer)}{block.path}.down_proj" in source
    return False


def _check_gptq_format(spec: JobSpec, module: str, out_features: int, in_features: int) -> None:
    """The gptq format packs 32/bits values a word along both dimensions (qweight along in, qzeros along out)."""
    per_word = 32 // spec.scheme.bits
    if OutputFormat.GPTQ in spec.formats and (in_features % per_word or out_features % per_word):
        raise InvalidSpecError(
            f"the gptq output format needs in and out features divisible by {per_word} for {spec.scheme.bits}-bit, "
            f"and {module} is [{out_features}, {in_features}]; use the compressed-tensors format only"
        )


def _check_fp8_blocks(spec: JobSpec, module: str, out_features: int, in_features: int) -> None:
    """vLLM's block-FP8 kernels need whole 128×128 blocks in its fused (qkv, gate_up) and sharded Linears."""
    if spec.scheme.strategy == "block" and (out_features % FP8_BLOCK or in_features % FP8_BLOCK):
        raise InvalidSpecError(
            f"block FP8 needs every quantized Linear's dimensions divisible by {FP8_BLOCK}, and {module} is "
            f"[{out_features}, {in_features}]; use scheme fp8-dynamic (one scale per output channel) instead"
        )


def check_against_model(spec: JobSpec) -> ModelInfo:
    """Validate `spec` against its model directory and data files; raise a QuantFleetError saying what to fix."""
    model_dir = Path(spec.model_dir)
    config = read_config(model_dir)
    dtype = config_dtype(config)
    text = config.get("text_config")
    num_layers = config.get("num_hidden_layers", text.get("num_hidden_layers") if isinstance(text, dict) else None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise InputError(f"{model_dir}/config.json has no valid num_hidden_layers")
    if not DEVICE_PATTERN.match(spec.device):
        raise InvalidSpecError(f"device {spec.device!r} is not understood; use auto, cpu, cuda or cuda:N")
    skeleton = build_skeleton(load_config(model_dir))
    arch = ArchitectureInfo.of(skeleton)
    if spec.method.smooths:
        arch.check_awq()
    if spec.smoothquant is not None and not arch.awq_mappings:  # SmoothQuant folds into AWQ's pairs
        raise InvalidSpecError(
            f"SmoothQuant folds its scales into the smoothing pairs AWQ uses, and none are known for {arch.name};"
            " use scheme w8a8-int8 (no smoothing)"
        )
    if spec.smoothquant is not None and arch.experts:  # its fold reaches no router, its search no routed output
        raise InvalidSpecError(
            f"SmoothQuant is not supported for the Mixture-of-Experts layers of {arch.name}; use scheme w8a8-int8 "
            "(no smoothing), or method awq for weight-only grids"
        )

    source = TensorSource(model_dir, allow_pickle=spec.allow_pickle)
    embed, head = arch.graph.embed_tokens, arch.graph.lm_head
    embed_prefixes = [p for p in stored_prefixes(skeleton, embed) if f"{p}weight" in source]
    if not embed_prefixes:
        raise InputError(f"the checkpoint in {model_dir} lacks {embed}.weight")
    head_prefixes = [p for p in stored_prefixes(skeleton, head) if f"{p}weight" in source]
    tied = not head_prefixes
    if tied and config.get("tie_word_embeddings") is False:
        raise InputError(f"the checkpoint in {model_dir} lacks {head}.weight and its embeddings are not tied")
    shapes = _linear_shapes(source, arch, num_layers)
    for fmt in spec.formats:  # GGUF's block types are its grid, not the job's scheme
        if fmt.is_gguf:
            check_gguf_model(config, parse_gguf_format(fmt.value), model_dir)
    if any(not f.is_gguf for f in spec.formats):  # the scheme's grid, for the checkpoint formats
        for module, (out_features, in_features) in shapes.items():
            check_group_size(module, in_features, spec.scheme)
            _check_gptq_format(spec, module, out_features, in_features)
            _check_fp8_blocks(spec, module, out_features, in_features)

    has_tokenizer = any((model_dir / name).is_file() for name in TOKENIZER_FILES)
    needs_text = spec.calibration.path is not None or spec.eval is not None
    if needs_text and not has_tokenizer:
        raise InputError(f"{model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); calibration and "
                         "evaluation need one")
    if spec.calibration.path is not None:
        _check_text_file(spec.calibration.path, "calibration")
    if spec.eval is not None:
        _check_text_file(spec.eval.path, "evaluation")
    return ModelInfo(
        model_dir=model_dir,
        architecture=arch,
        config=config,
        num_layers=num_layers,
        dtype=dtype,
        linear_shapes=shapes,
        tied_embeddings=tied,
        weight_bytes=source.total_bytes(),
        has_tokenizer=has_tokenizer,
        embed_prefix=embed_prefixes[0],
        lm_head_prefix=head_prefixes[0] if head_prefixes else f"{head}.",
    )
