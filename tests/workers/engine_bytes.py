"""The engine's output bytes for a fixed set of tiny jobs: every method × format × FP8 scheme, GGUF files, and
the several-device path on two CPU "devices".

`python -m tests.workers.engine_bytes record` writes the sha256 of every output file of every case to
`tests/workers/data/engine_bytes.json`, with the environment the numbers belong to (torch version, machine):
the float arithmetic of the solvers follows the BLAS build and the CPU's vector units (AVX2 vs AVX-512), so the recorded hashes are only
comparable where that environment matches. `tests/workers/test_engine_bytes.py` checks them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tests.families import make_tiny_family
from tests.helpers import make_tiny_llama, write_text_corpus
from tests.workers.test_gguf_export import tiny_model as tiny_bpe_model
from workers.calibration import calibration_windows
from workers.engine import run_local
from workers.formats.writer import CheckpointWriter
from workers.loading import CheckpointWeights, LayerwiseModel, load_tokenizer
from workers.spec import CalibrationSpec, JobSpec, Method, OutputFormat, QuantScheme
from workers.tensor_source import TensorSource
from workers.validation import check_against_model

RECORD = Path(__file__).parent / "data" / "engine_bytes.json"  # the first environment recorded (AVX2)
KEYS = ("torch", "transformers", "machine", "cpu_capability")  # the float results follow all four


def records() -> list[dict[str, Any]]:
    """Every recorded environment's hashes: engine_bytes.json and engine_bytes-<cpu capability>.json."""
    return [json.loads(p.read_text()) for p in sorted(RECORD.parent.glob("engine_bytes*.json"))]


def record_path(environment: dict[str, Any]) -> Path:
    """Where `record` writes: the file of this environment if one exists, else a new file named by its CPU."""
    for path in sorted(RECORD.parent.glob("engine_bytes*.json")):
        recorded = json.loads(path.read_text())["environment"]
        if {k: recorded.get(k) for k in KEYS} == {k: environment.get(k) for k in KEYS}:
            return path
    return RECORD if not RECORD.exists() else RECORD.with_name(f"engine_bytes-{environment['cpu_capability'].lower()}.json")
CT, GPTQ = OutputFormat.COMPRESSED_TENSORS, OutputFormat.GPTQ
Q4_K_M, Q8_0 = OutputFormat.GGUF_Q4_K_M, OutputFormat.GGUF_Q8_0
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Case:
    model: str  # a key of MODELS
    method: str
    formats: tuple[OutputFormat, ...] = (CT, GPTQ)
    scheme: QuantScheme = QuantScheme(bits=4, group_size=32)
    calibration: bool = True
    devices: int = 1  # >1: the several-device path on as many CPU "devices"
    overrides: tuple[tuple[str, Any], ...] = ()


MODELS: dict[str, Callable[[Path], Path]] = {
    "llama": lambda d: make_tiny_llama(d / "llama", num_layers=2, seed=0),
    "llama-mha-bf16": lambda d: make_tiny_llama(
        d / "mha", num_layers=3, seed=1, num_key_value_heads=4, dtype=torch.bfloat16, tie_word_embeddings=False
    ),
    "llama-128": lambda d: make_tiny_llama(
        d / "l128", num_layers=2, seed=1, hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=4,
    ),
    "phi3": lambda d: make_tiny_family("phi3", d / "phi3"),
    "llama-bpe": lambda d: tiny_bpe_model(d / "bpe"),  # a byte-level BPE tokenizer and 256-wide rows: GGUF files
}

ASYM = QuantScheme(bits=4, group_size=32, symmetric=False)
CASES: dict[str, Case] = {
    "rtn-uncalibrated": Case("llama", "rtn", calibration=False),
    "rtn": Case("llama", "rtn"),
    "rtn-minmax-asym": Case("llama", "rtn", formats=(CT,), scheme=ASYM, overrides=(("observer", "minmax"),)),
    "gptq": Case("llama", "gptq"),
    "gptq-asym-no-act-order": Case("llama", "gptq", formats=(CT,), scheme=ASYM, overrides=(("act_order", False),)),
    "gptq-w8-channel": Case("llama", "gptq", scheme=QuantScheme(bits=8, group_size=-1)),
    "awq": Case("llama", "awq"),
    "awq-mha-bf16": Case("llama-mha-bf16", "awq", formats=(CT,)),
    "awq-gptq": Case("llama", "awq-gptq"),
    "auto": Case("llama", "auto", formats=(CT,)),
    "gptq-phi3": Case("phi3", "gptq", formats=(CT,)),
    "awq-phi3": Case("phi3", "awq", formats=(CT,)),
    "fp8-dynamic": Case("llama", "rtn", formats=(CT,), scheme=QuantScheme.from_preset("fp8-dynamic")),
    "fp8-static": Case("llama", "rtn", formats=(CT,), scheme=QuantScheme.from_preset("fp8-static")),
    "fp8-block": Case("llama-128", "rtn", formats=(CT,), scheme=QuantScheme.from_preset("fp8-block"), calibration=False),
    # GGUF alone: recorded from the separate GGUF layer loop before it joined the pipeline (issue 12, item 5)
    "gguf-gptq-q4km": Case("llama-bpe", "gptq", formats=(Q4_K_M,)),
    "gguf-gptq-q8": Case("llama-bpe", "gptq", formats=(Q8_0,)),
    "gguf-rtn-q4km": Case("llama-bpe", "rtn", formats=(Q4_K_M,), calibration=False),
    "dp2-rtn": Case("llama", "rtn", devices=2),
    "dp2-gptq": Case("llama", "gptq", devices=2),
    "dp2-awq": Case("llama", "awq", devices=2),
    "dp2-awq-gptq": Case("llama", "awq-gptq", devices=2),
    "dp2-gptq-mha-bf16": Case("llama-mha-bf16", "gptq", formats=(CT,), devices=2),
}


def spec_of(case: Case, model_dir: Path, calibration_file: Path) -> JobSpec:
    return JobSpec(
        model_dir=str(model_dir),
        method=Method(case.method),
        scheme=case.scheme,
        calibration=CalibrationSpec(
            path=str(calibration_file) if case.calibration else None, num_samples=16, seq_len=64
        ),
        formats=case.formats,
        **dict(case.overrides),
    )


def _several_devices(spec: JobSpec, out_dir: Path, devices: int) -> None:
    """The pipeline on `devices` CPU "devices" (run_local only gives several to CUDA GPUs)."""
    from workers.pipeline import quantize_model

    info = check_against_model(spec)
    dirs = [out_dir if i == 0 else out_dir / fmt.value for i, fmt in enumerate(spec.formats)]
    writers = [
        CheckpointWriter(d, fmt, spec.scheme, info.dtype, act_order=spec.act_order and spec.method.sweeps)
        for d, fmt in zip(dirs, spec.formats, strict=True)
    ]
    calibration = calibration_windows(spec.calibration, load_tokenizer(spec.model_dir))
    weights = CheckpointWeights(TensorSource(spec.model_dir))
    quantize_model(LayerwiseModel(spec.model_dir, CPU), weights, spec, writers, calibration, devices=[CPU] * devices)
    for writer in writers:
        writer.finalize(info.config)


def output_hashes(out_dir: Path) -> dict[str, str]:
    """sha256 of every file under `out_dir` but eval.json (timings) and tokenizer copies."""
    skip = {"eval.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    return {
        str(p.relative_to(out_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def run_case(case: Case, model_dir: Path, calibration_file: Path, out_dir: Path) -> dict[str, str]:
    spec = spec_of(case, model_dir, calibration_file)
    if case.devices > 1:
        _several_devices(spec, out_dir, case.devices)
    else:
        run_local(spec, out_dir)
    return output_hashes(out_dir)


def environment() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}


def record(names: list[str]) -> dict[str, Any]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = write_text_corpus(root / "calibration.txt", n_words=6000, seed=0)
        models: dict[str, Path] = {}
        hashes = {}
        for name in names:
            case = CASES[name]
            if case.model not in models:
                models[case.model] = MODELS[case.model](root / "models")
            hashes[name] = run_case(case, models[case.model], text, root / "out" / name)
            print(name, len(hashes[name]), "files", flush=True)
    return {"environment": environment(), "cases": {n: dataclasses.asdict(CASES[n]) | {"files": hashes[n]} for n in names}}


if __name__ == "__main__":
    if sys.argv[1:2] != ["record"]:
        sys.exit("usage: python -m tests.workers.engine_bytes record [CASE ...]")
    result = record(sys.argv[2:] or list(CASES))
    path = record_path(result["environment"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print("wrote", path)
