"""Per-layer resume: a job's finished decoder layers and the next layer's inputs, kept in a node-local directory,
so a retried attempt continues at the first unfinished layer and writes the same checkpoint bytes.

Layout of `<resume_dir>/<fingerprint>/` (`PipelineOptions.resume_dir`; the fingerprint covers everything the
output depends on, so a changed spec, model, calibration set or engine option never resumes stale state):

    layer-00000.safetensors   what layer 0 handed the checkpoint writers: its dense tensors (as written) and
                              every quantized Linear's q / scale / zero_point / input_scale; its module errors
                              and grids in the metadata. Written by the writer thread right after the layer.
    inputs-00004.safetensors  the calibration hidden states entering layer 4 (every device's shard, gathered)
    state.json                {"next_layer": 4, "inputs": "inputs-00004.safetensors"}: replaced atomically once
                              layers 0–3 and the inputs are on disk; the previous inputs file is then deleted

The inputs are saved after every `checkpoint_every`-th layer (they are the big part: samples × seq × hidden).
A resumed run writes the dense pieces (embeddings, head) from the model again, then hands the stored layers to
the writers in the same order as the first run did, so the shards come out byte for byte the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from workers.quant.fp8 import FloatQuantizedTensor
from workers.quant.grid import QuantizedTensor
from workers.report import ModuleError
from workers.spec import JobSpec, QuantScheme

STATE = "state.json"
QT_FIELDS = ("q", "scale", "zero_point", "input_scale")
MAX_AGE_S = 7 * 24 * 3600  # `prune` removes the state of jobs untouched this long (their last attempt failed)


def fingerprint(spec: JobSpec, options: dict[str, Any], calibration: Tensor | None, devices: int) -> str:
    """sha256 of what the quantized bytes depend on: the spec, the model's files (name, size, mtime), the
    calibration tokens, the layer loop's options, the number of devices and the torch version."""
    model_dir = Path(spec.model_dir)
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir()
        if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".json"))
    )
    digest = hashlib.sha256()
    digest.update(json.dumps([spec.to_dict(), files, options, devices, torch.__version__], default=str).encode())
    if calibration is not None:
        digest.update(calibration.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


class LayerCheckpoints:
    """The resume state of one quantize_model run (see the module docstring)."""

    def __init__(self, root: Path, key: str, num_layers: int, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"checkpoint_every={every} must be at least 1")
        self.dir = Path(root) / key
        self.num_layers, self.every = num_layers, every
        self.dir.mkdir(parents=True, exist_ok=True)

    def _layer_file(self, index: int) -> Path:
        return self.dir / f"layer-{index:05d}.safetensors"

    def start(self) -> tuple[int, Tensor | None]:
        """(first layer to solve, the hidden states entering it, if saved); (0, None) without usable state."""
        try:
            state = json.loads((self.dir / STATE).read_text())
        except (OSError, ValueError):
            return 0, None
        next_layer, inputs = int(state["next_layer"]), state.get("inputs")
        layers_there = all(self._layer_file(i).is_file() for i in range(next_layer))
        if not 0 < next_layer <= self.num_layers or not layers_there:
            return 0, None
        hidden = None
        if inputs is not None:
            try:
                with safe_open(str(self.dir / inputs), framework="pt") as f:
                    hidden = f.get_tensor("hidden")
            except OSError:  # e.g. removed by a concurrent attempt of the same job (a rescued lease): start over
                return 0, None
        return next_layer, hidden

    def save_layer(
        self, index: int, dense: dict[str, Tensor], solved: dict[str, QuantizedTensor], errors: list[ModuleError],
        fallbacks: list[str],
    ) -> None:
        """Layer `index` as the writers received it (called on the writer thread, after the writers)."""
        tensors = {f"dense/{name}": t.detach().to("cpu").contiguous().clone() for name, t in dense.items()}
        grids = {}
        for name, qt in solved.items():
            grids[name] = {"scheme": dataclasses.asdict(qt.scheme), "float": isinstance(qt, FloatQuantizedTensor)}
            for field in QT_FIELDS:
                value = getattr(qt, field, None)
                if isinstance(value, Tensor):
                    tensors[f"q/{name}/{field}"] = value.detach().to("cpu").contiguous().clone()
        metadata = {
            "dense": json.dumps(list(dense)),
            "solved": json.dumps(grids),
            "module_errors": json.dumps([dataclasses.asdict(e) for e in errors]),
            "fallback_modules": json.dumps(fallbacks),
        }
        _atomic(self._layer_file(index), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def restore_layer(self, index: int) -> tuple[dict[str, Tensor], dict[str, QuantizedTensor]]:
        """(dense tensors, quantized Linears) of a stored layer, as the writers received them."""
        with safe_open(str(self._layer_file(index)), framework="pt") as f:
            meta, stored = f.metadata(), set(f.keys())
            dense = {name: f.get_tensor(f"dense/{name}") for name in json.loads(meta["dense"])}
            solved: dict[str, QuantizedTensor] = {}
            for name, grid in json.loads(meta["solved"]).items():
                parts = {field: f.get_tensor(f"q/{name}/{field}") for field in QT_FIELDS if f"q/{name}/{field}" in stored}
                scheme = QuantScheme(**grid["scheme"])
                if grid["float"]:
                    solved[name] = FloatQuantizedTensor(parts["q"], parts["scale"], None, scheme, parts.get("input_scale"))
                else:
                    solved[name] = QuantizedTensor(parts["q"], parts["scale"], parts.get("zero_point"), scheme)
        return dense, solved

    def restore_report(self, index: int) -> tuple[list[ModuleError], list[str]]:
        """(module errors, RTN fallbacks) a stored layer recorded."""
        with safe_open(str(self._layer_file(index)), framework="pt") as f:
            meta = f.metadata()
        return [ModuleError(**e) for e in json.loads(meta["module_errors"])], json.loads(meta["fallback_modules"])

    def due(self, index: int) -> bool:
        """Save the inputs of the layer after `index`? (every `every` layers, never after the last)"""
        return (index + 1) % self.every == 0 and index + 1 < self.num_layers

    def save_inputs(self, next_layer: int, hidden: Tensor | None) -> None:
        """Record that layers before `next_layer` are done and (if calibrated) the hidden states entering it."""
        name = None
        if hidden is not None:
            name = f"inputs-{next_layer:05d}.safetensors"
            _atomic(self.dir / name, lambda tmp: save_file({"hidden": hidden.contiguous()}, str(tmp)))
        state = json.dumps({"next_layer": next_layer, "inputs": name})
        _atomic(self.dir / STATE, lambda tmp: tmp.write_text(state))
        for old in self.dir.glob("inputs-*.safetensors"):
            if old.name != name:
                old.unlink()


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def clear(root: Path | None) -> None:
    """Remove a job's resume state (it finished, was cancelled, or its input can never work)."""
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def prune(parent: Path, max_age_s: float = MAX_AGE_S) -> None:
    """Remove every job's resume state under `parent` not written to for `max_age_s` seconds."""
    if not parent.is_dir():
        return
    now = time.time()
    for job in parent.iterdir():
        try:
            newest = max((p.stat().st_mtime for p in job.rglob("*") if p.is_file()), default=job.stat().st_mtime)
        except OSError:  # being written or removed by another attempt right now
            continue
        if now - newest > max_age_s:
            clear(job)
