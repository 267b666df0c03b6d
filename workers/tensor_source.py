"""Read tensors lazily from a directory of safetensors shards, one name or one prefix at a time.

This is how the engine keeps peak memory near one decoder layer: nothing is read until asked for.
Pickle checkpoints (`*.bin`, `*.pt`) are refused unless explicitly allowed, because unpickling runs code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from workers.errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class TensorSource:
    """Name → shard map over `*.safetensors` files (with or without `model.safetensors.index.json`)."""

    def __init__(self, model_dir: str | Path, *, allow_pickle: bool = False) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise InputError(f"model directory {self.dir} does not exist")
        shards = sorted(self.dir.glob("*.safetensors"))
        if not shards:
            pickles = [p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles and not allow_pickle:
                raise InputError(
                    f"{self.dir} holds only pickle weights ({', '.join(sorted(pickles))}); convert them to "
                    "safetensors (unpickling can run arbitrary code) or allow pickle explicitly"
                )
            if pickles:
                raise InputError(f"{self.dir}: pickle weights are allowed but not supported yet; use safetensors")
            raise InputError(f"{self.dir} has no *.safetensors weight files")
        self._where: dict[str, Path] = {}
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {name: self.dir / file for name, file in weight_map.items()}
        else:
            for shard in shards:
                with safe_open(str(shard), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        self._where[name] = shard

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if name not in self._where:
            raise InputError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        with safe_open(str(self._where[name]), framework="pt", device=str(device)) as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor, read from the shard header only (no tensor data is loaded)."""
        if name not in self._where:
            raise InputError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        with safe_open(str(self._where[name]), framework="pt") as f:
            return tuple(int(d) for d in f.get_slice(name).get_shape())

    def get_prefix(self, prefix: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """All tensors whose names start with `prefix`, keyed by the rest of the name."""
        out: dict[str, torch.Tensor] = {}
        by_shard: dict[Path, list[str]] = {}
        for name, shard in self._where.items():
            if name.startswith(prefix):
                by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            with safe_open(str(shard), framework="pt", device=str(device)) as f:
                for name in names:
                    out[name[len(prefix):]] = f.get_tensor(name)
        return out

    def iter_names(self, prefix: str = "") -> Iterator[str]:
        return (n for n in self._where if n.startswith(prefix))

    def headers(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name → (safetensors dtype, e.g. "F16", shape) of every tensor, from the shard headers alone (one
        small read per shard, no tensor data)."""
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for shard in sorted(set(self._where.values())):
            with shard.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(size))
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise InputError(f"{shard} has no valid safetensors header: {exc}") from exc
            for name, entry in header.items():
                if name != "__metadata__" and self._where.get(name) == shard:
                    out[name] = (str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
        return out

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in set(self._where.values()))
