"""Stream a quantized checkpoint to disk, one decoder layer at a time, in any format of workers/formats/base.py.

Tensors are buffered until the next addition would push the buffer past `max_shard_bytes`; then the buffer
is written as a shard under a temporary name, so peak memory is about one shard (or one layer, whichever is
larger). `finalize` renames the shards to the Hugging Face names (`model.safetensors`, or
`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`) and writes config.json with the
quantization config. A job that is retried into the same directory overwrites its files and removes
shards of an earlier attempt, so the directory always holds exactly one checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from workers.errors import InvalidSpecError
from workers.formats import mixed_precision
from workers.formats.base import for_writing
from workers.quant.grid import QuantizedTensor
from workers.spec import OutputFormat, QuantScheme

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
PARTIAL_SUFFIX = ".safetensors.partial"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class CheckpointWriter:
    """Collects dense and quantized tensors of one model and writes them as sharded safetensors."""

    def __init__(
        self,
        out_dir: Path,
        fmt: OutputFormat,
        scheme: QuantScheme,
        dtype: torch.dtype,
        *,
        max_shard_bytes: int = 2 * 2**30,
        act_order: bool = False,
        mixed: bool = False,
        kv_cache_scheme: dict[str, Any] | None = None,
    ) -> None:
        if fmt == OutputFormat.COMPRESSED_TENSORS and mixed:  # a grid per Linear, recorded as they come
            self._format: Any = mixed_precision.MixedPrecisionDocument()
        else:
            self._format = for_writing(fmt, scheme)  # the format module that writes it (workers/formats/base.py)
            self._format.check_scheme(scheme)
        if not dtype.is_floating_point:
            raise InvalidSpecError(f"the model dtype must be a floating-point dtype, not {dtype}")
        if max_shard_bytes < 1:
            raise InvalidSpecError(f"max_shard_bytes={max_shard_bytes} must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.fmt, self.scheme, self.dtype, self.act_order = fmt, scheme, dtype, act_order
        self.kv_cache_scheme = kv_cache_scheme  # quantization_config.kv_cache_scheme (FP8 KV-cache scales)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[Path] = []  # partial files written so far
        self._shard_of: dict[str, int] = {}  # tensor name → shard index
        self._total_bytes = 0
        self._finalized = False

    def add_dense(self, name: str, tensor: Tensor) -> None:
        """A tensor stored as is (embeddings, norms, lm_head); floating tensors are cast to the model dtype."""
        # a private copy: the caller may reuse its tensor, and tied weights must not share storage on disk
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        self._add({name: tensor.detach().to(device="cpu", dtype=dtype, copy=True)})

    def add_quantized(self, module_name: str, qt: QuantizedTensor) -> None:
        """One quantized Linear, e.g. module_name "model.layers.0.self_attn.q_proj"."""
        if isinstance(self._format, mixed_precision.MixedPrecisionDocument):
            self._format.record(module_name, qt.scheme)
        elif qt.scheme != self.scheme:
            raise InvalidSpecError(
                f"{module_name} was quantized with {qt.scheme}, the checkpoint uses {self.scheme}"
            )
        try:
            tensors = self._format.linear_tensors(qt, self.dtype)
        except InvalidSpecError as e:
            raise InvalidSpecError(f"{module_name}: {e}") from e
        self._add({f"{module_name}.{suffix}": t for suffix, t in tensors.items()})

    def _add(self, tensors: dict[str, Tensor]) -> None:
        if self._finalized:
            raise RuntimeError("the checkpoint is already finalized")
        for name in tensors:
            if name in self._buffer or name in self._shard_of:
                raise ValueError(f"tensor {name!r} was added twice")
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer.update({name: t.contiguous().cpu() for name, t in tensors.items()})
        self._buffer_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards) + 1:05d}{PARTIAL_SUFFIX}"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        for name in self._buffer:
            self._shard_of[name] = len(self._shards)
        self._shards.append(path)
        self._total_bytes += self._buffer_bytes
        self._buffer, self._buffer_bytes = {}, 0

    def finalize(self, hf_config: dict[str, Any]) -> list[str]:
        """Write the last shard, name the shards, write the index and config.json; returns the file names."""
        if self._finalized:
            raise RuntimeError("the checkpoint is already finalized")
        if self._buffer:
            self._flush()
        if not self._shards:
            raise ValueError("no tensors were added to the checkpoint")
        self._finalized = True
        count = len(self._shards)
        names = (
            [SINGLE_FILE]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        self._remove_stale(keep=set(names))
        for partial, name in zip(self._shards, names, strict=True):
            os.replace(partial, self.out_dir / name)
        written = list(names)
        if count > 1:
            index = {
                "metadata": {"total_size": self._total_bytes},
                "weight_map": {t: names[i] for t, i in sorted(self._shard_of.items())},
            }
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            written.append(INDEX_FILE)
        config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
        config["torch_dtype"] = config["dtype"] = _dtype_name(self.dtype)
        config["quantization_config"] = self._format.quantization_config(
            self.scheme, act_order=self.act_order
        )
        if self.kv_cache_scheme is not None:
            config["quantization_config"]["kv_cache_scheme"] = self.kv_cache_scheme
        (self.out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        written.append(CONFIG_FILE)
        return written

    def _remove_stale(self, keep: set[str]) -> None:
        """Delete weight files of an earlier attempt that this checkpoint does not overwrite."""
        for path in self.out_dir.iterdir():
            is_weight_file = path.name in (SINGLE_FILE, INDEX_FILE) or (
                path.name.startswith("model-") and path.name.endswith(".safetensors")
            )
            is_old_partial = path.name.endswith(PARTIAL_SUFFIX) and path not in self._shards
            if (is_weight_file and path.name not in keep) or is_old_partial:
                path.unlink()
