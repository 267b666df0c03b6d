"""GGUF files for llama.cpp: the architecture, the per-tensor type recipe, metadata, tokenizer, writer.

Names and keys come from the `gguf` package's own tables: the architecture is the model's `model_type`
when `gguf.MODEL_ARCH_NAMES` knows it (Mistral is written as `llama`, as llama.cpp's converter does),
tensor names from `gguf.TensorNameMap` (checked against `gguf.MODEL_TENSORS[arch]`), hyperparameter keys
through `GGUFWriter.add_*` (`gguf.Keys`). What is the architecture's, not the tables' (one entry each in
workers/formats/gguf_archs.py):

* llama.cpp's `llama` architecture uses interleaved ("normal") RoPE, Hugging Face the rotate-half form, so
  q/k rows are permuted exactly as llama.cpp's convert_hf_to_gguf.py does (`permute`); `qwen2`/`qwen3`/`phi3`
  use NeoX RoPE and are written as they are. Quantized rows permute as whole rows: codes and fields move together.
  A few keys are one architecture's (`ARCH_KEYS`: Phi-3's original context length and sliding window, Gemma's
  soft-capping and sliding window), and Gemma's norms are stored as 1 + w (its RMSNorm scales by 1 + w),
  as convert_hf_to_gguf.py writes them; `Origin.shift` undoes it when the file is read back.
* What llama.cpp fixes in its code rather than reading from the file is checked at submit (`ARCH_CHECKS`):
  Gemma's query scale (1/√head_dim) and its sliding-window layer pattern (every 2nd layer global for Gemma-2,
  every 6th for Gemma-3, whose local layers' RoPE base is 10,000); Qwen-MoE's routing renormalisation (qwen3moe
  renormalises the top-k weights, qwen2moe does not), every layer an MoE layer, qwen2moe's own output matrix.
* Mixture-of-Experts: the engine writes each expert's Linears; llama.cpp stores a layer's experts as one
  `[experts, out, in]` tensor per projection (`ffn_{gate,up,down}_exps`), so `GGUFFile` holds one layer's expert
  slices until all have come and writes them stacked (`Origin.experts` splits them back when read); routers
  (`ffn_gate_inp`, the shared expert's gate) stay F32 as llama.cpp keeps them.
* RoPE scaling (llama3, yarn, ...) needs extra tensors/keys and is refused at submit.
* The file types' recipe (`Recipe`) follows llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for
  the types we write: Q4_K_M and Q5_K_M put Q6_K on `attn_v` and `ffn_down` of the layers `use_more_bits`
  picks (the first and last eighth and every third layer between); Q4_K_S puts Q5_K on `attn_v` of the first
  four layers and on `ffn_down` of the first eighth; a fused `attn_qkv` follows `attn_v`, the experts'
  `ffn_down_exps`/`ffn_down_shexp` follow `ffn_down`, 8-expert models get Q8_0 `attn_k`/`attn_v`; the output
  matrix (the token embedding when the model ties them) is Q6_K, or Q8_0 when its rows are not whole
  256-blocks; a K-quant tensor whose rows are not whole super-blocks falls back like llama.cpp's (Q4_K → Q5_0,
  Q5_K → Q5_1, Q6_K → Q8_0).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor

from workers.errors import InvalidSpecError
from workers.formats.gguf_archs import (
    ARCH_ALIASES,
    ARCH_CHECKS,
    ARCH_KEYS,
    EXPORTED_ARCHS,
    NORM_SHIFT_ARCHS,
    NORMAL_ROPE_ARCHS,
    rope_sections,
)
from workers.quant import gguf_grid
from workers.quant.gguf_grid import QK_K, BlockType, GGUFTensor

FORMAT_PREFIX = "gguf:"

# file type → (llama.cpp's LlamaFileType, the default block type of its 2-D weights)
FILE_TYPES: dict[str, tuple[gguf.LlamaFileType, str | None]] = {
    "Q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_0"),
    "Q4_1": (gguf.LlamaFileType.MOSTLY_Q4_1, "Q4_1"),
    "Q5_0": (gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_0"),
    "Q5_1": (gguf.LlamaFileType.MOSTLY_Q5_1, "Q5_1"),
    "Q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
    "Q4_K_S": (gguf.LlamaFileType.MOSTLY_Q4_K_S, "Q4_K"),
    "Q4_K_M": (gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q4_K"),
    "Q5_K_S": (gguf.LlamaFileType.MOSTLY_Q5_K_S, "Q5_K"),
    "Q5_K_M": (gguf.LlamaFileType.MOSTLY_Q5_K_M, "Q5_K"),
    "Q6_K": (gguf.LlamaFileType.MOSTLY_Q6_K, "Q6_K"),
    "F16": (gguf.LlamaFileType.MOSTLY_F16, None),  # unquantized: the input of llama.cpp's own quantizer
}

FLOAT32_KINDS = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP)  # routers: F32, never quantized
EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.*)$")  # one expert's Linear: "….experts.<e>.<name>"
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama-quant.cpp, for rows that are not whole super-blocks


def parse_format(text: str) -> str:
    """"gguf:Q4_K_M" → "Q4_K_M"; raises InvalidSpecError naming the choices."""
    if not text.startswith(FORMAT_PREFIX):
        raise InvalidSpecError(f"{text!r} is not a GGUF format; write gguf:<type>, e.g. gguf:Q4_K_M")
    name = text[len(FORMAT_PREFIX) :].upper()
    if name not in FILE_TYPES:
        raise InvalidSpecError(f"GGUF type {name!r} is not supported; choose one of {[FORMAT_PREFIX + t for t in FILE_TYPES]}")
    return name


def resolve_arch(config: dict[str, Any]) -> str:
    """llama.cpp's architecture name for a Hugging Face config.json, or InvalidSpecError saying why not."""
    model_type = str(config.get("model_type", ""))
    arch = ARCH_ALIASES.get(model_type, model_type)
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise InvalidSpecError(
            f"llama.cpp does not know the architecture {model_type!r} ({', '.join(config.get('architectures') or [])}):"
            " GGUF export is not possible for it; choose another output format (compressed-tensors, gptq)"
        )
    if arch not in EXPORTED_ARCHS:
        raise InvalidSpecError(
            f"GGUF export of llama.cpp architecture {arch!r} is not implemented yet (exported: {list(EXPORTED_ARCHS)});"
            " choose another output format"
        )
    for section in rope_sections(config).values():
        rope_type = section.get("rope_type", section.get("type", "default"))
        if rope_type not in ("default", None):
            raise InvalidSpecError(f"GGUF export does not write RoPE scaling {rope_type!r} yet; choose another output format")
    if arch in ARCH_CHECKS:
        ARCH_CHECKS[arch](config, arch)
    return arch


def _arch_enum(arch: str) -> gguf.MODEL_ARCH:
    return next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp: the first and last eighth of the layers and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class TensorTarget:
    """Where one Hugging Face tensor goes in the file: its GGUF name and kind, and its block type."""

    name: str
    kind: gguf.MODEL_TENSOR
    block: BlockType | None  # None: stored as float (F32 for 1-D tensors and routers, else F16)
    expert: int | None = None  # a slice of a stacked experts tensor ([experts, out, in])


@dataclass
class Recipe:
    """The file layout of one model and file type (see the module docstring)."""

    arch: str
    file_type: str
    num_layers: int
    tied_embeddings: bool
    num_experts: int = 0  # routed experts per MoE layer (0: a dense model)
    names: gguf.TensorNameMap = field(init=False)

    def __post_init__(self) -> None:
        self.names = gguf.get_tensor_name_map(_arch_enum(self.arch), self.num_layers)

    @classmethod
    def for_config(cls, config: dict[str, Any], file_type: str) -> Recipe:
        experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
        return cls(resolve_arch(config), file_type, int(config["num_hidden_layers"]),
                   bool(config.get("tie_word_embeddings", False)), experts)

    def target(self, hf_name: str, shape: tuple[int, ...]) -> TensorTarget | None:
        """The GGUF name and type of a Hugging Face tensor (".weight"/".bias"); None: not written
        (e.g. lm_head of a tied model). Raises InvalidSpecError for a tensor the tables do not know."""
        if hf_name == "lm_head.weight" and self.tied_embeddings:
            return None
        expert = EXPERT.match(hf_name)
        if expert is not None:  # llama.cpp stacks a layer's experts: "….experts.<name>" [experts, out, in]
            stacked = self.target(f"{expert.group(1)}.{expert.group(3)}", (self.num_experts, *shape))
            return replace(stacked, expert=int(expert.group(2))) if stacked is not None else None
        found = self.names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise InvalidSpecError(f"tensor {hf_name} has no GGUF name for architecture {self.arch}")
        kind, name = found
        if kind not in gguf.MODEL_TENSORS[_arch_enum(self.arch)]:
            raise InvalidSpecError(f"tensor {hf_name} ({name}) is not part of llama.cpp's {self.arch} architecture")
        if len(shape) not in (2, 3) or not hf_name.endswith(".weight") or kind in FLOAT32_KINDS:
            return TensorTarget(name, kind, None)
        return TensorTarget(name, kind, self.block_type(kind, name, shape[-1]))

    def block_type(self, kind: gguf.MODEL_TENSOR, name: str, in_features: int) -> BlockType | None:
        default = FILE_TYPES[self.file_type][1]
        if default is None:
            return None
        chosen = default
        is_output = kind == gguf.MODEL_TENSOR.OUTPUT or (kind == gguf.MODEL_TENSOR.TOKEN_EMBD and self.tied_embeddings)
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if is_output:
            chosen = "Q8_0" if in_features % QK_K != 0 else (default if default == "Q8_0" else "Q6_K")
        else:
            chosen = self._mixed(kind, layer) or default
        block = gguf_grid.block_type(chosen)
        if not gguf_grid.fits(block, in_features):
            block = gguf_grid.block_type(K_FALLBACK.get(chosen, chosen))
        if not gguf_grid.fits(block, in_features):
            raise InvalidSpecError(
                f"{name}: rows of {in_features} values are not whole {block.block}-blocks of GGUF type {block.name};"
                " choose another GGUF type or format"
            )
        return block


    def _mixed(self, kind: gguf.MODEL_TENSOR, layer: int) -> str | None:
        """The _S/_M file types' exceptions to their default block type (llama_tensor_get_type)."""
        down = kind in (gguf.MODEL_TENSOR.FFN_DOWN, gguf.MODEL_TENSOR.FFN_DOWN_EXP, gguf.MODEL_TENSOR.FFN_DOWN_SHEXP)
        values = kind in (gguf.MODEL_TENSOR.ATTN_V, gguf.MODEL_TENSOR.ATTN_QKV)  # a fused qkv follows attn_v's rules
        if self.num_experts == 8 and (values or kind == gguf.MODEL_TENSOR.ATTN_K):
            return "Q8_0"  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
        if self.num_experts == 8 and kind == gguf.MODEL_TENSOR.ATTN_OUT and self.file_type in ("Q4_K_S", "Q4_K_M"):
            return "Q5_K"
        if self.file_type in ("Q4_K_M", "Q5_K_M"):
            if values and use_more_bits(layer, self.num_layers):
                return "Q6_K"
            if down and use_more_bits(layer, self.num_layers):
                return "Q6_K"
        if self.file_type == "Q4_K_S":
            if values and layer < 4:
                return "Q5_K"
            if down and layer < self.num_layers // 8:
                return "Q5_K"
        return None


def check_model(config: dict[str, Any], file_type: str, model_dir: Path | None = None) -> None:
    """Submit-time checks from config.json (and the tokenizer, given `model_dir`): an architecture llama.cpp
    knows and we export, no RoPE scaling, rows that the recipe's blocks tile; InvalidSpecError otherwise."""
    recipe = Recipe.for_config(config, file_type)
    hidden = int(config.get("hidden_size", 0))
    inter = int(config.get("intermediate_size", 0))
    for width, what in ((hidden, "hidden_size"), (inter, "intermediate_size")):
        if width:  # every 2-D weight reads one of these; the recipe raises if no block type tiles its rows
            recipe.block_type(gguf.MODEL_TENSOR.FFN_UP, f"({what})", width)
    if model_dir is not None:
        _vocab(Path(model_dir))


def estimate_bytes(config: dict[str, Any], file_type: str, headers: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
    """The tensor data of the GGUF file from the checkpoint's tensor headers (name → (dtype, shape)), by the
    recipe (the metadata, mostly the vocabulary, comes on top)."""
    recipe = Recipe.for_config(config, file_type)
    total = 0
    for name, (_dtype, shape) in headers.items():
        target = recipe.target(name, tuple(shape))
        if target is None:
            continue
        count = int(np.prod(shape)) if shape else 1
        if target.block is not None:
            total += count // target.block.block * gguf.GGML_QUANT_SIZES[target.block.qtype][1]
        else:
            total += count * (2 if len(shape) == 2 and target.kind not in FLOAT32_KINDS else 4)
    return total


def permute(rows: Tensor | np.ndarray, n_head: int) -> Any:
    """convert_hf_to_gguf.py's LlamaModel.permute on dim 0 (q: heads, k: KV heads)."""
    shape = rows.shape
    split = rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
    swapped = split.swapaxes(1, 2) if isinstance(split, np.ndarray) else split.transpose(1, 2)
    return swapped.reshape(shape)


def unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute`: llama.cpp's interleaved q/k rows back in Hugging Face's order."""
    shape = rows.shape
    return np.ascontiguousarray(rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape))


def _vocab(model_dir: Path) -> Any:
    """The `gguf` package's reader of the model's tokenizer: byte-level BPE (GPT-2 style) or Llama's
    SentencePiece-style tokenizer.json; anything else is refused (llama.cpp could not tokenize it)."""
    for kind in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
        try:
            return kind(model_dir)
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            continue
    raise InvalidSpecError(
        f"GGUF export needs a byte-level BPE or a Llama/SentencePiece tokenizer (tokenizer.json); the one in"
        f" {model_dir} is neither; choose another output format"
    )


def _tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> list[str]:
    """Vocabulary, merges, special tokens and chat template; returns notes about what is approximate."""
    notes: list[str] = []
    tokenizer_json = model_dir / "tokenizer.json"
    vocab = _vocab(model_dir)
    model = "gpt2" if isinstance(vocab, gguf.vocab.BpeVocab) else "llama"
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text())
        for added in data.get("added_tokens", []):
            if added["id"] < len(types):
                types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        pre = data.get("pre_tokenizer") or {}
        if model == "gpt2":
            if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
                writer.add_tokenizer_pre("gpt-2")  # exactly GPT-2's regex: llama.cpp's "gpt-2" pre-tokenizer
            else:
                writer.add_tokenizer_pre("default")
                notes.append("pre-tokenizer not recognised: written as llama.cpp's 'default'")
    for i in range(len(tokens), vocab_size):  # padded embedding rows
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return notes


def _hyperparameters(writer: gguf.GGUFWriter, config: dict[str, Any], file_type: str) -> None:
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rotary = float(config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
    writer.add_rope_dimension_count(int(rotary * head_dim))
    full = rope_sections(config).get("full_attention", rope)  # Gemma-3: the global layers' base
    writer.add_rope_freq_base(float(config.get("rope_theta") or full.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(int(FILE_TYPES[file_type][0]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    if experts:  # convert_hf_to_gguf.py's Qwen2MoeModel / TextModel
        writer.add_expert_count(experts)
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
        if config.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
        if config.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))
    ARCH_KEYS.get(resolve_arch(config), lambda _w, _c: None)(writer, config)


@dataclass(frozen=True)
class Origin:
    """Where a GGUF tensor came from: its Hugging Face name, the heads its rows were permuted by, the constant
    added to it (Gemma's norms)."""

    hf_name: str
    heads: int | None = None
    shift: float = 0.0
    experts: tuple[str, ...] = ()  # a stacked experts tensor: each expert's Hugging Face name, in order


@dataclass
class WrittenTensor:
    name: str
    type: str  # "Q4_K", "F32", ...
    elements: int
    nbytes: int


class DenseWeights:
    """A WeightSource over a dict of full tensor names (e.g. the weights a GGUF file decodes to)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self._tensors = tensors

    def tensors(self, prefix: str, device: torch.device) -> dict[str, Tensor]:
        return {name[len(prefix) :]: t.to(device) for name, t in self._tensors.items() if name.startswith(prefix)}


class GGUFWeights:
    """A written GGUF file as a WeightSource under Hugging Face names: each tensor decoded by the `gguf` package's
    own dequantizers (q/k rows un-permuted), read when a prefix asks for it. The evaluation scores these: the
    bytes on disk, as for every other format (workers/evaluate.py)."""

    def __init__(self, path: Path, origins: Mapping[str, Origin]) -> None:
        reader = gguf.GGUFReader(str(path))  # memory-mapped
        self._tensors = {origins[t.name].hf_name: (t, origins[t.name]) for t in reader.tensors}

    def tensors(self, prefix: str, device: torch.device) -> dict[str, Tensor]:
        found = {}
        for name, (tensor, origin) in self._tensors.items():
            if name.startswith(prefix):
                array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
                if origin.heads is not None:
                    array = unpermute(array, origin.heads)
                if origin.shift:
                    array = array - np.float32(origin.shift)
                for part, piece in zip(origin.experts or (name,), array if origin.experts else (array,), strict=True):
                    found[part[len(prefix) :]] = torch.from_numpy(np.array(piece)).to(device)
        return found


class GGUFFile:
    """A checkpoint sink (`add_dense` / `add_quantized`, Hugging Face names) that writes one GGUF file.

    Tensors are spilled to a scratch directory as they come (peak memory: one tensor), and `finalize` writes
    header, metadata and data in one pass. Dense 2-D tensors that the recipe quantizes (the token embedding,
    an untied output) are rounded here with `gguf_grid.quantize` (RTN on the GGUF grid). With
    `keep_dequantized`, what the file decodes to is also kept (float32, Hugging Face names: `weights()`), for
    the evaluation.
    """

    def __init__(self, path: Path, model_dir: Path, config: dict[str, Any], file_type: str, *,
                 keep_dequantized: bool = False) -> None:
        self.path, self.model_dir, self.config = Path(path), Path(model_dir), config
        self.recipe = Recipe.for_config(config, file_type)
        self.file_type = file_type
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._scratch = Path(tempfile.mkdtemp(prefix=".gguf-", dir=self.path.parent))
        self._tensors: list[tuple[str, Path, gguf.GGMLQuantizationType]] = []
        self.written: list[WrittenTensor] = []
        self.notes: list[str] = []
        self.keep_dequantized = keep_dequantized
        self.dequantized: dict[str, Tensor] = {}
        self._origins: dict[str, Origin] = {}  # GGUF name → where it came from
        self._experts: dict[str, dict[int, tuple[str, np.ndarray, gguf.GGMLQuantizationType, int]]] = {}

    def target(self, hf_name: str, shape: tuple[int, ...]) -> TensorTarget | None:
        return self.recipe.target(hf_name, shape)

    def block_of(self, hf_name: str, shape: tuple[int, ...]) -> BlockType | None:
        """The block type a tensor is quantized to; None: written as float, or not at all."""
        target = self.target(hf_name, shape)
        return target.block if target is not None else None

    def weights(self) -> DenseWeights:
        """What the file decodes to, kept in memory as it was written (needs `keep_dequantized`)."""
        return DenseWeights(self.dequantized)

    @property
    def origins(self) -> dict[str, Origin]:
        """GGUF tensor name → its Hugging Face name, the heads its rows were permuted by, its shift."""
        return dict(self._origins)

    def read_back(self) -> GGUFWeights:
        """What the finalized file decodes to, read from it."""
        return GGUFWeights(self.path, self._origins)

    def _keep(self, hf_name: str, value: Tensor) -> None:
        if self.keep_dequantized:
            self.dequantized[hf_name] = value.detach().to("cpu", torch.float32)

    def _heads_for(self, kind: gguf.MODEL_TENSOR) -> int | None:
        if self.recipe.arch not in NORMAL_ROPE_ARCHS:
            return None
        heads = int(self.config["num_attention_heads"])
        if kind == gguf.MODEL_TENSOR.ATTN_Q:
            return heads
        if kind == gguf.MODEL_TENSOR.ATTN_K:
            return int(self.config.get("num_key_value_heads") or heads)
        return None

    def _spill(self, name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType, elements: int,
               origin: Origin) -> None:
        self._origins[name] = origin
        file = self._scratch / f"{len(self._tensors):05d}.npy"
        np.save(file, np.ascontiguousarray(array))
        self._tensors.append((name, file, qtype))
        self.written.append(WrittenTensor(name, qtype.name, elements, int(array.nbytes)))

    def add_dense(self, hf_name: str, tensor: Tensor) -> None:
        target = self.target(hf_name, tuple(tensor.shape))
        if target is None:
            return
        if target.block is not None:
            self.add_quantized(hf_name.removesuffix(".weight"), gguf_grid.quantize(target.block, tensor))
            return
        dtype = np.float16 if tensor.ndim == 2 and target.kind not in FLOAT32_KINDS else np.float32
        shift = 1.0 if self.recipe.arch in NORM_SHIFT_ARCHS and hf_name.endswith("norm.weight") else 0.0
        stored = tensor.detach().to("cpu", torch.float32)
        if shift:
            stored = stored + shift
        self._keep(hf_name, stored - shift if shift else stored)  # what the file decodes to, in float32
        array = stored.numpy().astype(dtype)
        heads = self._heads_for(target.kind)
        if heads is not None:
            array = permute(array, heads)
        qtype = gguf.GGMLQuantizationType.F16 if dtype == np.float16 else gguf.GGMLQuantizationType.F32
        if target.expert is not None:
            self._stack(target, hf_name, array, qtype, tensor.numel())
            return
        self._spill(target.name, array, qtype, tensor.numel(), Origin(hf_name, heads, shift))

    def add_quantized(self, module_name: str, t: GGUFTensor) -> None:
        target = self.target(f"{module_name}.weight", t.shape)
        if target is None:
            return
        if target.block != t.kind:
            raise InvalidSpecError(f"{module_name} was quantized as {t.kind.name}, the {self.file_type} recipe wants"
                                   f" {target.block.name if target.block else 'float'}")
        self._keep(f"{module_name}.weight", t.dequantize())
        packed = t.to_bytes()
        if target.expert is not None:
            self._stack(target, f"{module_name}.weight", packed, t.kind.qtype, t.shape[0] * t.shape[1])
            return
        heads = self._heads_for(target.kind)
        if heads is not None:
            packed = permute(packed, heads)
        self._spill(target.name, packed, t.kind.qtype, t.shape[0] * t.shape[1], Origin(f"{module_name}.weight", heads))

    def _stack(self, target: TensorTarget, hf_name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType,
               elements: int) -> None:
        """Hold one expert's slice until the layer's every expert has come, then spill them as one
        [experts, out, …] tensor (one layer's experts at most are held)."""
        assert target.expert is not None
        slices = self._experts.setdefault(target.name, {})
        slices[target.expert] = (hf_name, array, qtype, elements)
        if len(slices) < self.recipe.num_experts:
            return
        parts = [slices[e] for e in range(self.recipe.num_experts)]
        del self._experts[target.name]
        if len({p[2] for p in parts}) != 1:
            raise InvalidSpecError(f"{target.name}: the experts were quantized to different types")
        stacked_name = EXPERT.sub(r"\1.\3", parts[0][0])
        self._spill(target.name, np.stack([p[1] for p in parts]), qtype, sum(p[3] for p in parts),
                    Origin(stacked_name, experts=tuple(p[0] for p in parts)))

    def finalize(self) -> list[str]:
        """Write the file; returns the notes (approximations) recorded on the way."""
        if self._experts:
            missing = {name: self.recipe.num_experts - len(got) for name, got in self._experts.items()}
            raise InvalidSpecError(f"experts missing from stacked GGUF tensors: {missing}")
        writer = gguf.GGUFWriter(self.path, self.recipe.arch)
        try:
            writer.add_name(str(self.config.get("_name_or_path") or self.model_dir.name))
            _hyperparameters(writer, self.config, self.file_type)
            self.notes += _tokenizer(writer, self.model_dir, int(self.config["vocab_size"]))
            arrays = list(self._load())
            for (name, _file, qtype), array in zip(self._tensors, arrays, strict=True):
                raw = None if qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32) else qtype
                writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for array in self._load():
                writer.write_tensor_data(array)
        finally:
            writer.close()
            shutil.rmtree(self._scratch, ignore_errors=True)
        return self.notes

    def _load(self) -> Iterator[np.ndarray]:
        for _name, file, _qtype in self._tensors:
            yield np.load(file, mmap_mode="r")

    def bits_per_weight(self) -> float:
        """Bits per element over every 2-D tensor written (1-D norms and biases excluded)."""
        big = [t for t in self.written if t.type not in ("F32",)]
        return 8.0 * sum(t.nbytes for t in big) / max(1, sum(t.elements for t in big))

    def abort(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)
