"""Side-by-side quality benchmark on the CPU: QuantFleet vs llm-compressor 0.14.0.1, same model, same tokens.

What it does (issue 9, item 1):
  1. Makes the token windows ONCE and saves them (`<work>/windows/<hash>.safetensors`): `--num-samples` ×
     `--seq-len` calibration windows at seeded random, non-overlapping offsets of the calibration text, and
     `--eval-windows` consecutive held-out windows from the start of the evaluation text. A window starts
     with exactly the tokens the tokenizer itself adds to plain text (`add_special_tokens=True`; for
     SmolLM2-Instruct: none — its `bos_token` `<|im_start|>` is a chat token it never adds), then text.
  2. Quantizes with each tool in a child process, both fed the SAME calibration windows:
       * llm-compressor in its own virtualenv (`--llmc-venv`, created here when missing: `torch==2.13.0`
         CPU wheel, then `llmcompressor==0.14.0.1`; never the project's venv). `oneshot` with a
         `datasets.Dataset` of the windows' input_ids, at its defaults for the bits/group/symmetry: RTN =
         QuantizationModifier, GPTQ = GPTQModifier (default actorder = static), AWQ = AWQModifier +
         QuantizationModifier. Saved with `save_compressed=True`. Runs in float32 (CPU fp16 matmuls are
         ~25× slower here), so its checkpoint keeps float32 scales; QuantFleet writes model-dtype (fp16) ones.
         llm-compressor's AWQ calls `IntermediatesCache.pin_memory`, which raises without an accelerator;
         pinning only speeds host-to-device copies, so on the CPU it is replaced by a no-op.
       * QuantFleet through `workers.engine.run_local(JobSpec(...), calibration_provider=<the saved
         windows>)`, compressed-tensors format. `--qf-act-order on|off` and `--qf-opt NAME=VALUE` (a
         JobSpec or PipelineOptions field) pass options on; otherwise the engine's current defaults.
  3. Evaluates every checkpoint with the same code in this (the project's) venv: transformers +
     compressed-tensors (`CompressedTensorsConfig(dequantize=True)`), float32, over the held-out windows:
     perplexity over every next-token position, Δppl % vs the original, mean (and p99) KL(original ‖
     quantized) of the next-token distributions, top-1 agreement.

Weight+activation schemes (issue 12; `--configs fp8dyn,fp8static,w8a8,w8a8sq`, not in the default list): FP8
dynamic, FP8 static (both RTN: both tools' FP8 is round-to-nearest), W8A8 int8 and W8A8 int8 after SmoothQuant
α 0.8 (both GPTQ). llm-compressor runs its presets as its examples write them: QuantizationModifier(targets=
"Linear", scheme="FP8_DYNAMIC" | "FP8", ignore=["lm_head"]), GPTQModifier(targets="Linear", scheme="W8A8",
ignore=["lm_head"]), preceded by SmoothQuantModifier(smoothing_strength=0.8) for the SmoothQuant row; QuantFleet
runs QuantScheme.from_preset("fp8-dynamic" | "fp8-static" | "w8a8-int8"), JobSpec.smoothquant=0.8 for the
SmoothQuant row. Both checkpoints are scored by `load_runtime`, this script's own reader (safetensors + the
compressed-tensors config, neither tool's loader): weights = stored codes × scales, and each quantized Linear's
input quantized as vLLM does from the checkpoint's `input_activations` (per-token dynamic int8; per-token dynamic
E4M3; static per-tensor E4M3 with the checkpoint's `input_scale`, max over the shards vLLM fuses — see
ACTIVATION_NOTE). Their rows also report bits per weight from the checkpoint's safetensors headers.

Group sizes: SmolLM2-135M's hidden size 576 is not divisible by 128, so group 128 is invalid for most of its
Linears (QuantFleet rejects it with a message). With the default `--substitute-group 32`, a config whose
group does not tile every Linear input of the model runs at group 32 instead, and the table says so
("w4 g32 sym (for g128)"); `--substitute-group 0` runs the group as asked and reports what each tool does.
`--model DIR` takes any Llama-like checkpoint (dims divisible by 128 give the real g128 rows).

Caching: `<out>/results.json` keeps one entry per (tool, method, effective scheme, calibration-windows hash,
tool options; for QuantFleet also a hash of workers/*.py, so an engine change is re-measured), with its
metrics per evaluation-windows hash. Rerunning with `--tools quantfleet` does not recompute llm-compressor
rows; `--force` recomputes the selected rows. Two drivers may share one results file (it is locked).

Seconds = the quantization call only, on this machine: llm-compressor `oneshot` (model already loaded,
save not included); QuantFleet `run_local` minus its final write (it reads each layer's weights inside its
layer loop, so loading is included). All stages are kept in results.json.

`--seeds 1,2` also runs QuantFleet with calibration windows drawn with those seeds (a noise estimate).

Usage (repository root; `make quality` runs the full table):
    .venv/bin/python benchmarks/quality_vs_llmcompressor.py                      # the weight-only table, both tools
    .venv/bin/python benchmarks/quality_vs_llmcompressor.py --tools llmcompressor --threads 1
    .venv/bin/python benchmarks/quality_vs_llmcompressor.py --tools quantfleet --qf-act-order on
    .venv/bin/python benchmarks/quality_vs_llmcompressor.py --configs fp8dyn,fp8static,w8a8,w8a8sq --threads 1
    .venv/bin/python benchmarks/quality_vs_llmcompressor.py --methods gptq --configs w4g64sym \\
        --num-samples 8 --seq-len 128 --eval-windows 4 --out /tmp/qbench       # a quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("llmcompressor", "quantfleet")
METHODS = ("rtn", "gptq", "awq")  # both tools; QuantFleet-only methods (e.g. awq-gptq, auto) are accepted too
LLMC_VERSION = "0.14.0.1"
LLMC_REQUIREMENTS = (("torch==2.13.0",), (f"llmcompressor=={LLMC_VERSION}",))  # torch first: the CPU wheel
DEFAULT_WORK = REPO_ROOT / ".cache" / "quality-bench"
DEFAULT_LLMC_VENV = REPO_ROOT / ".cache" / "llmc-venv"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "quality-vs-llmcompressor"
PIN_MEMORY_NOTE = (
    "llm-compressor 0.14.0.1's AWQ calls IntermediatesCache.pin_memory, which raises on a machine without an "
    "accelerator; pinning only speeds host-to-device copies, so on the CPU it was replaced by a no-op "
    "(nothing it computes changes)."
)
EVAL_DEVICE = torch.device("cpu")  # where checkpoints are scored (--device); set once in main()
HEAD_CHUNK = 512  # positions per lm_head chunk in the evaluation: bounds the [tokens, vocab] float32 logits


# ----------------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    bits: int
    group: int  # -1 = one scale per output channel
    symmetric: bool
    preset: str = ""  # a weight+activation scheme (PRESETS key, QuantFleet's preset name); "" = weight-only int
    smoothquant: float = 0.0  # SmoothQuant migration strength before the preset's method (0: none)

    def label(self) -> str:
        if self.preset:
            return PRESETS[self.preset].label + (f" + SmoothQuant {self.smoothquant:g}" if self.smoothquant else "")
        g = "per-channel" if self.group == -1 else f"g{self.group}"
        return f"w{self.bits} {g} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class Preset:
    """A weight+activation scheme both tools name: QuantFleet's preset (the PRESETS key), llm-compressor's preset
    scheme string, and the methods both run it with (FP8: round-to-nearest as llm-compressor's examples do, or
    GPTQ, `GPTQModifier(scheme=...)` there; W8A8 is GPTQ), of which `--methods` picks."""

    llmc_scheme: str
    methods: tuple[str, ...]
    label: str


PRESETS: dict[str, Preset] = {
    "fp8-dynamic": Preset("FP8_DYNAMIC", ("rtn", "gptq"), "FP8 dynamic"),
    "fp8-static": Preset("FP8", ("rtn", "gptq"), "FP8 static"),
    "w8a8-int8": Preset("W8A8", ("gptq",), "W8A8 int8"),
}

WEIGHT_CONFIGS: dict[str, Scheme] = {
    "w4g128sym": Scheme(4, 128, True),
    "w4g128asym": Scheme(4, 128, False),
    "w4g64sym": Scheme(4, 64, True),
    "w3g128asym": Scheme(3, 128, False),
    "w8chsym": Scheme(8, -1, True),
}
# Issue 12: weight+activation schemes, scored with the runtime's activation quantization (load_runtime).
SCHEME_CONFIGS: dict[str, Scheme] = {
    "fp8dyn": Scheme(8, -1, True, "fp8-dynamic"),
    "fp8static": Scheme(8, -1, True, "fp8-static"),
    "w8a8": Scheme(8, -1, True, "w8a8-int8"),
    "w8a8sq": Scheme(8, -1, True, "w8a8-int8", 0.8),
}
CONFIGS: dict[str, Scheme] = WEIGHT_CONFIGS | SCHEME_CONFIGS


def linear_input_dims(model_dir: Path) -> dict[str, int]:
    """Input sizes of a Llama-like decoder layer's Linears, from config.json."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    return {
        "q/k/v_proj, gate/up_proj": hidden,
        "o_proj": heads * head_dim,
        "down_proj": int(cfg["intermediate_size"]),
    }


def effective_scheme(asked: Scheme, dims: dict[str, int], substitute: int) -> tuple[Scheme, str]:
    """(scheme to run, note). A group that does not tile every Linear input is replaced by `substitute`."""
    if asked.group == -1:
        return asked, ""
    bad = {name: d for name, d in dims.items() if d % asked.group}
    if not bad or substitute <= 0:
        return asked, ""
    if any(d % substitute for d in dims.values()):
        raise SystemExit(f"--substitute-group {substitute} does not tile this model's Linear inputs {dims} either")
    why = ", ".join(f"{n} in={d}" for n, d in bad.items())
    return Scheme(asked.bits, substitute, asked.symmetric), f"g{asked.group} does not divide {why}"


def config_label(asked: Scheme, scheme: Scheme) -> str:
    return scheme.label() if scheme == asked else f"{scheme.label()} (for g{asked.group})"


# ----------------------------------------------------------------------------------------------------------
# Token windows (made once, saved, fed to both tools and to the evaluation)
# ----------------------------------------------------------------------------------------------------------


def added_special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids the tokenizer adds around plain text with add_special_tokens=True."""
    probe = "To be, or not to be: that is the question."
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k]), list(full[k + len(plain) :])
    raise RuntimeError("the tokenizer changes the text's own tokens when adding special tokens; cannot tell its prefix")


def tokenize_stream(text: str, tokenizer: Any, chunk_chars: int = 1 << 18) -> torch.Tensor:
    """The whole text as one id stream (no special tokens), tokenized in pieces cut before a blank line."""
    parts: list[torch.Tensor] = []
    start = 0
    while start < len(text):
        cut = len(text)
        if start + chunk_chars < len(text):
            found = text.find("\n\n", start + chunk_chars)
            cut = found if found > 0 else len(text)
        ids = tokenizer(text[start:cut], add_special_tokens=False, verbose=False)["input_ids"]
        parts.append(torch.tensor(ids, dtype=torch.int64))
        start = cut
    return torch.cat(parts)


def sample_disjoint(stream: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """`count` non-overlapping slices of `length` tokens at seeded random offsets, in stream order."""
    slack = stream.numel() - count * length
    if slack < 0:
        raise SystemExit(f"calibration text has {stream.numel()} tokens; {count} windows of {length} need more")
    gen = torch.Generator().manual_seed(seed)
    gaps = torch.sort(torch.randint(0, slack + 1, (count,), generator=gen)).values
    starts = gaps + torch.arange(count) * length
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().to(torch.int64).numpy().tobytes() + str(tuple(t.shape)).encode()).hexdigest()[:16]


@dataclass
class Windows:
    path: Path
    calibration: torch.Tensor  # [num_samples, seq_len] int64
    eval: torch.Tensor  # [eval_windows, seq_len] int64
    calib_hash: str
    eval_hash: str
    meta: dict[str, Any]


def make_windows(
    model_dir: Path, calib_path: Path, eval_path: Path, num_samples: int, seq_len: int, eval_windows: int,
    seed: int, work: Path,
) -> Windows:
    """Build (or reuse) the windows file for these inputs."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prefix, suffix = added_special_tokens(tokenizer)
    ident = {
        "model": str(model_dir.resolve()),
        "tokenizer_sha": _files_sha(model_dir, ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")),
        "calibration_text_sha": _files_sha(calib_path.parent, (calib_path.name,)),
        "eval_text_sha": _files_sha(eval_path.parent, (eval_path.name,)),
        "num_samples": num_samples, "seq_len": seq_len, "eval_windows": eval_windows, "seed": seed,
        "prefix": prefix,
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    path = work / "windows" / f"{key}.safetensors"
    if path.exists():
        tensors = load_file(str(path))
        meta = json.loads(path.with_suffix(".json").read_text())
    else:
        body = seq_len - len(prefix)
        head = torch.tensor(prefix, dtype=torch.int64)

        def with_prefix(rows: torch.Tensor) -> torch.Tensor:
            return torch.cat([head.expand(rows.shape[0], -1), rows], dim=1)

        cal_stream = tokenize_stream(calib_path.read_text(encoding="utf-8"), tokenizer)
        ev_stream = tokenize_stream(eval_path.read_text(encoding="utf-8"), tokenizer)
        calibration = with_prefix(sample_disjoint(cal_stream, num_samples, body, seed))
        available = ev_stream.numel() // body
        if available < eval_windows:
            raise SystemExit(f"evaluation text holds {available} windows of {body} tokens, fewer than {eval_windows}")
        evaluation = with_prefix(ev_stream[: eval_windows * body].reshape(eval_windows, body))
        tensors = {"calibration": calibration.contiguous(), "eval": evaluation.contiguous()}
        meta = ident | {
            "suffix_ignored": suffix,
            "prefix_tokens": tokenizer.convert_ids_to_tokens(prefix),
            "bos_token": tokenizer.bos_token,
            "calibration_stream_tokens": cal_stream.numel(),
            "eval_stream_tokens": ev_stream.numel(),
            "calib_hash": tensor_hash(calibration),
            "eval_hash": tensor_hash(evaluation),
            "rule": "each window = the tokens the tokenizer adds before plain text with add_special_tokens=True, "
            "then text; calibration windows at seeded random non-overlapping offsets, eval windows consecutive "
            "from the start of the evaluation text",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        tmp.replace(path)
    return Windows(path, tensors["calibration"], tensors["eval"], meta["calib_hash"], meta["eval_hash"], meta)


def _files_sha(directory: Path, names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        p = directory / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def engine_fingerprint() -> str:
    """Hash of the engine's source (workers/**/*.py): a QuantFleet row is re-measured when it changes."""
    h = hashlib.sha256()
    for p in sorted((REPO_ROOT / "workers").rglob("*.py")):
        h.update(str(p.relative_to(REPO_ROOT)).encode() + p.read_bytes())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------
# Children: one quantization each, in the tool's own interpreter
# ----------------------------------------------------------------------------------------------------------


def llmc_recipe(args: argparse.Namespace) -> list[Any]:
    """llm-compressor's recipe for the child's method and scheme. Weight+activation presets as its examples write
    them (examples/quantization_w8a8_fp8, quantization_w8a8_int8): QuantizationModifier(targets="Linear",
    scheme="FP8_DYNAMIC" | "FP8", ignore=["lm_head"]); GPTQModifier(targets="Linear", scheme="W8A8",
    ignore=["lm_head"]), after SmoothQuantModifier(smoothing_strength=0.8) for the SmoothQuant row."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStrategy
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if args.preset:
        preset = PRESETS[args.preset]
        if args.method not in preset.methods:
            raise SystemExit(f"preset {args.preset} runs with {' or '.join(preset.methods)}, not {args.method}")
        recipe: list[Any] = []
        if args.smoothquant:
            from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

            recipe.append(SmoothQuantModifier(smoothing_strength=args.smoothquant))
        modifier = GPTQModifier if args.method == "gptq" else QuantizationModifier
        recipe.append(modifier(targets="Linear", scheme=preset.llmc_scheme, ignore=["lm_head"]))
        return recipe
    strategy = QuantizationStrategy.CHANNEL if args.group == -1 else QuantizationStrategy.GROUP
    weights = QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=bool(args.symmetric), strategy=strategy,
        group_size=None if args.group == -1 else args.group, dynamic=False,
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if args.method == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if args.method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    from llmcompressor.modifiers.transform import AWQModifier

    return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]


def llmc_needs_calibration(args: argparse.Namespace) -> bool:
    """RTN of weight-only grids and FP8_DYNAMIC observe no activations; everything else calibrates."""
    return args.method != "rtn" or args.preset == "fp8-static" or bool(args.smoothquant)


def child_llmcompressor(args: argparse.Namespace) -> dict[str, Any]:
    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    notes = []
    accel = hasattr(torch, "accelerator") and torch.accelerator.is_available()
    if args.method == "awq" and not accel:
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None  # type: ignore[method-assign]
        notes.append("IntermediatesCache.pin_memory replaced by a no-op (no accelerator)")

    recipe = llmc_recipe(args)
    dtype = getattr(torch, args.llmc_dtype)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t_load = time.perf_counter() - t0
    ids = load_file(args.windows)["calibration"]
    kwargs: dict[str, Any] = {}
    if llmc_needs_calibration(args):
        from datasets import Dataset

        kwargs = dict(
            dataset=Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}),
            max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0], shuffle_calibration_samples=False,
        )
    t0 = time.perf_counter()
    oneshot(model=model, processor=tokenizer, recipe=recipe, **kwargs)
    t_oneshot = time.perf_counter() - t0
    t0 = time.perf_counter()
    # Save in the checkpoint's own dtype (fp16 for SmolLM2), as QuantFleet writes it: the scales then have the
    # same precision in both checkpoints. The integer codes survive the cast: |w/scale - q| stays far below 0.5.
    model_cfg = json.loads((Path(args.model) / "config.json").read_text())
    saved_dtype = getattr(torch, str(model_cfg.get("dtype") or model_cfg.get("torch_dtype") or args.llmc_dtype))
    if args.llmc_save_model_dtype and saved_dtype != dtype:
        model.to(saved_dtype)
        notes.append(f"model cast from {args.llmc_dtype} to {saved_dtype} before save_pretrained(save_compressed=True)")
    tmp = Path(args.ckpt + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    tokenizer.save_pretrained(tmp)
    tmp.replace(args.ckpt)
    t_save = time.perf_counter() - t0
    qcfg = json.loads((Path(args.ckpt) / "config.json").read_text()).get("quantization_config", {})
    return {
        "seconds": t_oneshot,
        "timings": {"load": t_load, "oneshot": t_oneshot, "save": t_save},
        "versions": {
            "llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__,
        },
        "recipe": [repr(m) for m in recipe],
        "written_weights_config": qcfg.get("config_groups", {}).get("group_0", {}).get("weights"),
        "written_input_activations_config": qcfg.get("config_groups", {}).get("group_0", {}).get("input_activations"),
        "dtype": args.llmc_dtype,
        "saved_dtype": str(saved_dtype if args.llmc_save_model_dtype else dtype),
        "notes": notes,
    }


def parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("on", "true", "yes"):
        return True
    if low in ("off", "false", "no"):
        return False
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_qf_options(opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """NAME=VALUE options → (JobSpec fields, PipelineOptions fields); unknown names are an error."""
    from dataclasses import fields

    from workers.pipeline import PipelineOptions
    from workers.spec import JobSpec

    spec_names = {f.name for f in fields(JobSpec)} - {"model_dir", "method", "scheme", "calibration", "eval", "formats"}
    pipe_names = {f.name for f in fields(PipelineOptions)}
    spec_kw, pipe_kw = {}, {}
    for name, value in opts.items():
        if name in spec_names:
            spec_kw[name] = value
        elif name in pipe_names:
            pipe_kw[name] = value
        else:
            raise SystemExit(f"--qf-opt {name}: not a JobSpec field ({sorted(spec_names)}) nor a PipelineOptions "
                             f"field ({sorted(pipe_names)})")
    return spec_kw, pipe_kw


def child_quantfleet(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO_ROOT))
    from safetensors.torch import load_file

    from workers.engine import run_local, versions
    from workers.pipeline import PipelineOptions
    from workers.spec import CalibrationSpec, JobSpec, Method, OutputFormat, QuantScheme

    ids = load_file(args.windows)["calibration"]
    spec_kw, pipe_kw = split_qf_options(json.loads(args.qf_options))
    calls = []

    def provider(cal: Any, tokenizer: Any) -> torch.Tensor:
        if (cal.num_samples, cal.seq_len) != tuple(ids.shape):
            raise RuntimeError(f"engine asked for {cal.num_samples}×{cal.seq_len} windows, the file has {tuple(ids.shape)}")
        calls.append(1)
        return ids.clone()

    if args.preset:
        scheme = QuantScheme.from_preset(args.preset)
        if args.smoothquant:
            spec_kw["smoothquant"] = args.smoothquant
    else:
        scheme = QuantScheme(bits=args.bits, group_size=args.group, symmetric=bool(args.symmetric))
    spec = JobSpec(
        model_dir=args.model,
        method=Method(args.method),
        scheme=scheme,
        calibration=CalibrationSpec(path=args.calib_text, num_samples=ids.shape[0], seq_len=ids.shape[1], seed=args.seed),
        formats=(OutputFormat.COMPRESSED_TENSORS,),
        device=args.device,
        **spec_kw,
    )
    shutil.rmtree(args.ckpt, ignore_errors=True)
    t0 = time.perf_counter()
    report = run_local(spec, args.ckpt, calibration_provider=provider, options=PipelineOptions(**pipe_kw))
    wall = time.perf_counter() - t0
    timings = dict(report.timings_s)
    return {
        "seconds": wall - timings.get("write", 0.0),
        "timings": timings | {"run_local": wall},
        "versions": versions(),
        "spec": spec.to_dict(),
        "pipeline_options": asdict(PipelineOptions(**pipe_kw)),
        "provider_calls": len(calls),
        "engine_at_run": engine_fingerprint(),  # workers/ may change while a long run goes on
        "git_head": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip(),
        "fallback_modules": report.fallback_modules,
        "notes": [],
    }


def run_child(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    fn = child_llmcompressor if args.child == "llmcompressor" else child_quantfleet
    out = fn(args)
    out["threads"] = torch.get_num_threads()
    Path(args.result_json).write_text(json.dumps(out, indent=1, default=str))
    return 0


# ----------------------------------------------------------------------------------------------------------
# llm-compressor's virtualenv
# ----------------------------------------------------------------------------------------------------------


def ensure_llmc_venv(venv: Path) -> Path:
    """The interpreter of a venv with llmcompressor==0.14.0.1 (created here if missing; never the project's)."""
    python = venv / "bin" / "python"
    marker = venv / f".installed-llmcompressor-{LLMC_VERSION}"
    if marker.exists() and python.exists():
        return python
    if venv.resolve() == (REPO_ROOT / ".venv").resolve():
        raise SystemExit("refusing to install llm-compressor into the project's own .venv; pass another --llmc-venv")
    print(f"creating llm-compressor's venv in {venv} (torch CPU wheel, then llmcompressor=={LLMC_VERSION})", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    for reqs in LLMC_REQUIREMENTS:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *reqs], check=True)
    subprocess.run([str(python), "-c", "import llmcompressor, compressed_tensors, datasets"], check=True)
    marker.write_text(subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout)
    return python


# ----------------------------------------------------------------------------------------------------------
# Results file (shared by concurrent drivers: locked read-modify-write)
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked_results(path: Path) -> Iterator[dict[str, Any]]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault("rows", {})
        data.setdefault("original", {})
        yield data
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(path)


def read_results(path: Path) -> dict[str, Any]:
    with locked_results(path) as data:
        return json.loads(json.dumps(data))


def row_key(tool: str, method: str, scheme: Scheme, calib_hash: str, options: dict[str, Any]) -> str:
    opts = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    return f"{tool}|{method}|{scheme.label()}|{calib_hash}|{opts}"


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the same code for every checkpoint
# ----------------------------------------------------------------------------------------------------------


def load_dense(path: Path) -> Any:
    """A checkpoint as a dense float32 transformers model (compressed-tensors ones dequantized)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if "quantization_config" in json.loads((path / "config.json").read_text()):
        from transformers import CompressedTensorsConfig

        try:
            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        except TypeError:  # older transformers
            kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    return model.float().eval().to(EVAL_DEVICE)


# Weight+activation schemes (issue 12): both tools' checkpoints read here, independently of either tool's loader
# (plain safetensors + the compressed-tensors config), with each quantized Linear's input quantized the way vLLM
# quantizes it at run time.

E4M3_MAX = 448.0
FP8_MIN_SCALE = 1.0 / (E4M3_MAX * 512)  # vLLM's floor for a dynamic per-token FP8 scale
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                     "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
LINEAR_PARTS = ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx",
                "input_scale", "input_zero_point")  # every stored tensor of one quantized Linear
FUSED_SHARDS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # one Linear each in vLLM
ACTIVATION_NOTE = (
    "activations as vLLM quantizes them, read from each checkpoint's own compressed-tensors config (input_activations)"
    " by this script's reader, not either tool's: W8A8 int8 per token, dynamic, symmetric (scale max|x|/127, round "
    "half to even, clamp [-128, 127]); FP8 dynamic per token E4M3 (scale max(max|x|/448, 1/(448·512)), clamp ±448, "
    "round to E4M3); FP8 static per tensor E4M3 with the checkpoint's input_scale, the max over q/k/v and over "
    "gate/up (vLLM fuses each into one Linear with one input scale; per-tensor FP8 weights of a fused Linear are "
    "requantized to the shards' max weight scale, as vLLM's requantize_with_max_scale does); weights dequantized "
    "from the stored codes × scales; the model runs in float32 (vLLM runs bf16/fp16 activations)"
)


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """x (already divided by its scale) rounded to FP8 E4M3 (saturating at ±448), as float32."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def int8_per_token_dynamic(x: torch.Tensor) -> torch.Tensor:
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xf * inv).clamp(-128, 127) * (amax / 127.0)).to(x.dtype)


def fp8_per_token_dynamic(x: torch.Tensor) -> torch.Tensor:
    xf = x.to(torch.float32)
    scale = (xf.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=FP8_MIN_SCALE)
    return (e4m3(xf / scale) * scale).to(x.dtype)


def fp8_static(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (e4m3(x.to(torch.float32) / scale) * scale).to(x.dtype)


def activation_kind(args: dict[str, Any] | None) -> str | None:
    """What a compressed-tensors input_activations entry asks the runtime to do; None = weight-only."""
    if not args:
        return None
    kind = (args.get("type"), int(args.get("num_bits", 0)), args.get("strategy"), bool(args.get("dynamic")))
    if kind == ("int", 8, "token", True) and args.get("symmetric", True):
        return "int8-token-dynamic"
    if kind == ("float", 8, "token", True):
        return "fp8-token-dynamic"
    if kind == ("float", 8, "tensor", False):
        return "fp8-tensor-static"
    raise SystemExit(f"input_activations {args} are not simulated by this script")


def _target_matches(target: str, module: str) -> bool:
    if target == "Linear":  # the class: every stored quantized module here is a Linear
        return True
    if target.startswith("re:"):
        import re

        return re.match(target[3:], module) is not None
    return module == target or module.endswith("." + target)


def module_activation_kinds(qcfg: dict[str, Any], modules: Sequence[str]) -> dict[str, str | None]:
    groups = list((qcfg.get("config_groups") or {}).values())
    out: dict[str, str | None] = {}
    for module in modules:
        group = next((g for g in groups if any(_target_matches(t, module) for t in g.get("targets", []))), None)
        if group is None:
            raise SystemExit(f"{module} has quantized tensors but no config group of the checkpoint targets it")
        out[module] = activation_kind(group.get("input_activations"))
    return out


def _scale_for(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A stored weight scale (or zero point) broadcast to the weight's [out, in]: per tensor, channel or group."""
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(1, 1)
    s = s.reshape(shape[0], -1)
    return s if s.shape[1] == 1 else s.repeat_interleave(shape[1] // s.shape[1], dim=1)


def fused_siblings(module: str, present: set[str]) -> list[str]:
    """The shards vLLM fuses with `module` into one Linear (itself included), those present in the checkpoint."""
    parent, _, leaf = module.rpartition(".")
    for shards in FUSED_SHARDS:
        if leaf in shards:
            return [f"{parent}.{s}" for s in shards if f"{parent}.{s}" in present]
    return [module]


def read_checkpoint(ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    cfg = json.loads((ckpt / "config.json").read_text())
    qcfg = cfg.get("quantization_config") or {}
    if qcfg.get("quant_method") != "compressed-tensors" or qcfg.get("format") not in (
        "int-quantized", "float-quantized", "naive-quantized"
    ):
        raise SystemExit(f"{ckpt}: not a compressed-tensors int-/float-quantized checkpoint ({qcfg.get('format')!r})")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                tensors[k] = h.get_tensor(k)
    return qcfg, tensors


def load_runtime(model_dir: Path, ckpt: Path) -> tuple[Any, dict[str, Any]]:
    """The checkpoint as a float32 model of `model_dir`'s architecture with every weight replaced from `ckpt`
    (quantized Linears dequantized), and forward pre-hooks quantizing each quantized Linear's input as vLLM does
    (ACTIVATION_NOTE). Returns (model, what was simulated)."""
    from transformers import AutoModelForCausalLM

    qcfg, tensors = read_checkpoint(ckpt)
    modules = sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))
    kinds = module_activation_kinds(qcfg, modules)
    present = set(modules)
    codes = {m: tensors.pop(f"{m}.weight") for m in modules}
    scales = {m: tensors.pop(f"{m}.weight_scale").to(torch.float32) for m in modules}
    zero_points = {m: tensors.pop(f"{m}.weight_zero_point") for m in modules if f"{m}.weight_zero_point" in tensors}
    input_scales = {m: tensors.pop(f"{m}.input_scale").to(torch.float32) for m in modules if f"{m}.input_scale" in tensors}
    state: dict[str, torch.Tensor] = {}
    requantized: list[str] = []
    for m in modules:
        q = codes[m].to(torch.float32)
        if m in zero_points:
            q = q - _scale_for(zero_points[m], q.shape)
        dense = q * _scale_for(scales[m], q.shape)
        siblings = fused_siblings(m, present)
        if codes[m].dtype == torch.float8_e4m3fn and scales[m].numel() == 1 and len(siblings) > 1:
            shared = max(float(scales[s].reshape(())) for s in siblings)
            if shared != float(scales[m].reshape(())):
                dense = e4m3(dense / shared) * shared
                requantized.append(m)
        state[f"{m}.weight"] = dense
    dropped = sorted(k for k in tensors if k.rpartition(".")[2] in ("k_scale", "v_scale", *LINEAR_PARTS[1:]))
    for k in dropped:
        tensors.pop(k)
    state |= {k: t.to(torch.float32) if t.is_floating_point() else t for k, t in tensors.items()}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise SystemExit(f"{ckpt}: tensors the model lacks {unexpected[:5]}, model tensors the checkpoint lacks "
                         f"{sorted(set(missing) - tied)[:5]}")
    if tied:
        model.tie_weights()
    counts: dict[str, int] = {}
    for m in modules:
        kind = kinds[m]
        counts[str(kind)] = counts.get(str(kind), 0) + 1
        if kind is None:
            continue
        if kind == "int8-token-dynamic":
            quantize = int8_per_token_dynamic
        elif kind == "fp8-token-dynamic":
            quantize = fp8_per_token_dynamic
        else:
            siblings = fused_siblings(m, present)
            if any(s not in input_scales for s in siblings):
                raise SystemExit(f"{ckpt}: static FP8 activations but no input_scale for {siblings}")
            scale = max(float(input_scales[s].reshape(())) for s in siblings)

            def quantize(x: torch.Tensor, scale: float = scale) -> torch.Tensor:
                return fp8_static(x, scale)

        def hook(_m: Any, args: tuple[Any, ...], quantize: Any = quantize) -> tuple[Any, ...]:
            return (quantize(args[0]), *args[1:])

        model.get_submodule(m).register_forward_pre_hook(hook)
    info = {"linears_by_activation": counts, "requantized_to_shared_weight_scale": len(requantized),
            "dropped_runtime_tensors": len(dropped), "note": ACTIVATION_NOTE}
    return model.float().eval().to(EVAL_DEVICE), info


def bits_per_weight_of(ckpt: Path) -> float:
    """Every stored byte of the quantized Linears (codes, scales, zero points, input scales) × 8 per weight, from
    the checkpoint files' safetensors headers."""
    import struct

    header: dict[str, Any] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as h:
            (n,) = struct.unpack("<Q", h.read(8))
            header |= {k: v for k, v in json.loads(h.read(n)).items() if k != "__metadata__"}
    modules = [k[: -len(".weight_scale")] for k in header if k.endswith(".weight_scale")]
    stored = weights = 0
    for m in modules:
        for part in LINEAR_PARTS:
            if (t := header.get(f"{m}.{part}")) is not None:
                stored += SAFETENSORS_BYTES[t["dtype"]] * math.prod(t["shape"])
        if f"{m}.weight" not in header:
            raise SystemExit(f"{ckpt}: {m} has no unpacked weight (packed codes are not counted here)")
        weights += math.prod(header[f"{m}.weight"]["shape"])
    return 8 * stored / weights


def final_hidden(model: Any, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """Normed last hidden states [n, seq, hidden] (what lm_head reads)."""
    decoder = model.get_decoder()
    outs = []
    with torch.inference_mode():
        for a in range(0, windows.shape[0], batch):
            ids = windows[a : a + batch].to(EVAL_DEVICE)
            outs.append(decoder(input_ids=ids).last_hidden_state.float())
    return torch.cat(outs)


class Reference:
    """The original model's final hidden states on the eval windows (cached on disk) and its lm_head."""

    def __init__(self, model_dir: Path, windows: Windows, work: Path) -> None:
        self.model = load_dense(model_dir)
        self.head = self.model.get_output_embeddings().weight.detach().float()
        cache = work / "reference" / f"{_files_sha(model_dir, ('model.safetensors', 'config.json'))}-{windows.eval_hash}.pt"
        if cache.exists():
            self.hidden = torch.load(cache, map_location=EVAL_DEVICE)
        else:
            t0 = time.perf_counter()
            self.hidden = final_hidden(self.model, windows.eval)
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.hidden.cpu(), cache)
            print(f"reference hidden states: {time.perf_counter() - t0:.0f} s", flush=True)
        self.windows = windows.eval


def score(ref: Reference, model: Any) -> dict[str, Any]:
    """ppl of original and quantized over every next-token position; KL(orig ‖ quant) mean/p99; top-1 agreement."""
    # .to(): a checkpoint saved from an offloaded model may keep accelerate's hooks, which return CPU tensors
    hidden = final_hidden(model, ref.windows).to(EVAL_DEVICE)
    head = model.get_output_embeddings().weight.detach().float().to(EVAL_DEVICE)
    d = hidden.shape[-1]
    h_ref = ref.hidden[:, :-1].reshape(-1, d)
    h_q = hidden[:, :-1].reshape(-1, d)
    targets = ref.windows[:, 1:].reshape(-1, 1).to(EVAL_DEVICE)
    nll_ref = nll_q = 0.0
    kls: list[torch.Tensor] = []
    agree = 0
    with torch.inference_mode():
        for a in range(0, targets.shape[0], HEAD_CHUNK):
            b = min(a + HEAD_CHUNK, targets.shape[0])
            lp_ref = torch.log_softmax(h_ref[a:b] @ ref.head.T, dim=-1)
            lp_q = torch.log_softmax(h_q[a:b] @ head.T, dim=-1)
            nll_ref -= float(lp_ref.gather(1, targets[a:b]).double().sum())
            nll_q -= float(lp_q.gather(1, targets[a:b]).double().sum())
            kls.append((lp_ref.exp() * (lp_ref - lp_q)).sum(-1).clamp(min=0))
            agree += int((lp_ref.argmax(-1) == lp_q.argmax(-1)).sum())
    n = targets.shape[0]
    kl = torch.cat(kls)
    ppl_ref, ppl_q = math.exp(nll_ref / n), math.exp(nll_q / n)
    return {
        "ppl_original": ppl_ref,
        "ppl": ppl_q,
        "dppl_pct": 100 * (ppl_q / ppl_ref - 1),
        "kl_mean": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl, 0.99)),
        "top1": agree / n,
        "tokens": n,
    }


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    tool: str
    method: str
    config: str  # CONFIGS key asked for
    asked: Scheme
    scheme: Scheme
    seed: int
    windows: Windows
    options: dict[str, Any]
    note: str

    @property
    def key(self) -> str:
        return row_key(self.tool, self.method, self.scheme, self.windows.calib_hash, self.options)

    @property
    def ckpt(self) -> str:
        return self.key.replace("|", "_").replace(" ", "-")


def quantize_row(row: Row, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the tool's child; returns the entry's quantization part (status ok/failed/invalid)."""
    ckpt = work / "checkpoints" / row.ckpt
    result_json = work / "checkpoints" / f"{row.ckpt}.result.json"
    result_json.unlink(missing_ok=True)
    if row.tool == "llmcompressor":
        python = args.llmc_python or str(ensure_llmc_venv(Path(args.llmc_venv)))
    else:
        python = sys.executable
    cmd = [
        python, str(Path(__file__).resolve()), "--child", row.tool, "--method", row.method,
        "--bits", str(row.scheme.bits), "--group", str(row.scheme.group), "--symmetric", str(int(row.scheme.symmetric)),
        *(["--preset", row.scheme.preset] if row.scheme.preset else []),
        *(["--smoothquant", str(row.scheme.smoothquant)] if row.scheme.smoothquant else []),
        "--model", str(args.model), "--windows", str(row.windows.path), "--calib-text", str(args.calib_text),
        "--ckpt", str(ckpt), "--result-json", str(result_json), "--seed", str(row.seed),
        "--llmc-dtype", args.llmc_dtype, *([] if args.llmc_save_model_dtype else ["--llmc-save-fp32"]), "--qf-options", json.dumps(row.options.get("qf", {})),
        "--threads", str(args.threads or 0), "--device", args.device,
    ]
    log = work / "checkpoints" / f"{row.ckpt}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="30")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    print(f"=== {row.tool} {row.method} {row.scheme.label()} (seed {row.seed}) → {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=args.child_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -9
    wall = time.perf_counter() - t0
    if rc == 0 and result_json.exists():
        out = json.loads(result_json.read_text())
        return out | {"status": "ok", "checkpoint": str(ckpt), "child_wall_s": wall, "log": str(log)}
    tail = log.read_text(errors="replace").strip().splitlines()[-30:]
    error = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else f"rc={rc}")
    status = "invalid" if ("does not divide" in error or "divisible" in error) else "failed"
    print(f"!!! {row.tool} {row.method} {row.scheme.label()}: {status}: {error}", flush=True)
    return {"status": status, "error": error.strip()[:500], "rc": rc, "child_wall_s": wall, "log": str(log)}


def run_rows(rows: list[Row], args: argparse.Namespace, work: Path, results_path: Path) -> None:
    reference: Reference | None = None
    for row in rows:
        ev = row.windows.eval_hash
        entry = read_results(results_path)["rows"].get(row.key)
        stale = entry is not None and entry.get("status") == "ok" and ev not in entry.get("metrics", {}) and not Path(
            entry.get("checkpoint", "")
        ).exists()
        if args.force or entry is None or entry.get("status") == "failed" or stale:
            entry = quantize_row(row, args, work) | {
                "tool": row.tool, "method": row.method, "config": row.config, "label": config_label(row.asked, row.scheme),
                "asked": asdict(row.asked), "scheme": asdict(row.scheme), "seed": row.seed, "note": row.note,
                "calib_hash": row.windows.calib_hash, "options": row.options, "metrics": {},
                "date": dt.datetime.now().isoformat(timespec="seconds"),
            }
            with locked_results(results_path) as data:
                data["rows"][row.key] = entry
        else:
            print(f"--- cached: {row.tool} {row.method} {row.scheme.label()} (seed {row.seed}): {entry['status']}", flush=True)
        if entry["status"] != "ok" or ev in entry.get("metrics", {}):
            continue
        if reference is None:
            reference = Reference(Path(args.model), row.windows, work)
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        if row.scheme.preset:  # weights + activations: this script's reader, the runtime's activation quantization
            model, simulated = load_runtime(Path(args.model), Path(entry["checkpoint"]))
            extra = {"bits_per_weight": bits_per_weight_of(Path(entry["checkpoint"])), "scorer": "load_runtime",
                     "activation_simulation": simulated}
        else:
            model = load_dense(Path(entry["checkpoint"]))
        metrics = score(reference, model) | extra | {"eval_s": time.perf_counter() - t0}
        del model
        bpw = f" bits/weight {metrics['bits_per_weight']:.3f}" if "bits_per_weight" in metrics else ""
        print(
            f"    {row.tool} {row.method} {row.scheme.label()}: Δppl {metrics['dppl_pct']:+.2f} % KL {metrics['kl_mean']:.4f} "
            f"top-1 {metrics['top1']:.3f}{bpw}  quantize {entry['seconds']:.1f} s  eval {metrics['eval_s']:.0f} s",
            flush=True,
        )
        with locked_results(results_path) as data:
            data["rows"][row.key].setdefault("metrics", {})[ev] = metrics
            data["original"][ev] = {"ppl": metrics["ppl_original"], "tokens": metrics["tokens"]}


def fmt_table(rows: list[Row], results: dict[str, Any], eval_hash: str, bpw_col: bool = False) -> str:
    """One line per row; `bpw_col` adds bits per weight measured from the checkpoint (weight+activation rows)."""
    lines = [
        "| config | method | tool | Δppl % | KL mean | KL p99 | top-1 | seconds |" + (" bits / weight |" if bpw_col else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if bpw_col else ""),
    ]
    seen = set()
    for row in rows:
        if row.key in seen:
            continue
        seen.add(row.key)
        e = results["rows"].get(row.key)
        tool = row.tool if row.seed == rows[0].seed or row.tool != "quantfleet" else f"{row.tool} [seed {row.seed}]"
        if e is None and row.tool == "quantfleet":  # measured with an earlier engine source: show it, marked
            e = latest_other_engine(row, results, eval_hash)
        if e is not None and row.tool == "quantfleet":
            ran = e.get("engine_at_run", e["options"]["engine"])  # workers/ may change during a long run
            if ran != row.options["engine"]:
                tool += f" (engine {ran})"
        label = config_label(row.asked, row.scheme)
        pad = " |" if bpw_col else ""
        if e is None:
            lines.append(f"| {label} | {row.method} | {tool} | not run | | | | |{pad}")
        elif e["status"] != "ok":
            lines.append(f"| {label} | {row.method} | {tool} | {e['status']}: {e.get('error', '')[:120]} | | | | |{pad}")
        elif eval_hash not in e.get("metrics", {}):
            lines.append(f"| {label} | {row.method} | {tool} | not evaluated | | | | {e['seconds']:.1f} |{pad}")
        else:
            m = e["metrics"][eval_hash]
            bpw = (f" {m['bits_per_weight']:.3f} |" if "bits_per_weight" in m else " |") if bpw_col else ""
            lines.append(
                f"| {label} | {row.method} | {tool} | {m['dppl_pct']:+.2f} | {m['kl_mean']:.4f} | {m['kl_p99']:.3f} | "
                f"{m['top1']:.3f} | {e['seconds']:.1f} |{bpw}"
            )
    return "\n".join(lines)


def latest_other_engine(row: Row, results: dict[str, Any], eval_hash: str) -> dict[str, Any] | None:
    """The newest evaluated QuantFleet entry for this row's method, scheme, windows and options, any engine hash."""
    found = [
        e for e in results["rows"].values()
        if e.get("tool") == row.tool and e.get("method") == row.method and e.get("scheme") == asdict(row.scheme)
        and e.get("calib_hash") == row.windows.calib_hash and e.get("options", {}).get("qf") == row.options.get("qf")
        and eval_hash in e.get("metrics", {})
    ]
    return max(found, key=lambda e: e.get("date", "")) if found else None


def seed_spread(rows: list[Row], results: dict[str, Any], eval_hash: str) -> list[str]:
    """min–max of QuantFleet's Δppl and KL over calibration seeds, per (method, config)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        e = results["rows"].get(row.key)
        if row.tool == "quantfleet" and e and e["status"] == "ok" and eval_hash in e.get("metrics", {}):
            groups.setdefault((config_label(row.asked, row.scheme), row.method), []).append(e["metrics"][eval_hash])
    out = []
    for (label, method), ms in groups.items():
        if len(ms) > 1:
            d = [m["dppl_pct"] for m in ms]
            k = [m["kl_mean"] for m in ms]
            out.append(f"- {label} {method}: {len(ms)} seeds, Δppl {min(d):+.2f} … {max(d):+.2f} %, KL {min(k):.4f} … {max(k):.4f}")
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "CPU"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M from make assets)")
    p.add_argument("--calib-text", default=None, help="calibration text (default: the Shakespeare calibration split)")
    p.add_argument("--eval-text", default=None, help="held-out text (default: the Shakespeare evaluation split)")
    p.add_argument("--tools", default="llmcompressor,quantfleet", help="comma list of llmcompressor, quantfleet (or both)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma list of rtn, gptq, awq (both tools) and QuantFleet-only methods such as awq-gptq, auto")
    p.add_argument("--configs", default=",".join(WEIGHT_CONFIGS),
                   help=f"comma list of {', '.join(CONFIGS)} (default: the weight-only ones; {', '.join(SCHEME_CONFIGS)} "
                        "are the weight+activation schemes of issue 12, each with its own method: FP8 rtn, W8A8 gptq)")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--seeds", default="", help="extra calibration seeds for QuantFleet rows (noise estimate), e.g. 1,2")
    p.add_argument("--substitute-group", type=int, default=32,
                   help="group used when the asked group does not tile the model's Linear inputs (0: run as asked)")
    p.add_argument("--qf-act-order", choices=("on", "off"), default=None, help="QuantFleet JobSpec.act_order")
    p.add_argument("--qf-opt", action="append", default=[], metavar="NAME=VALUE",
                   help="a QuantFleet JobSpec or PipelineOptions field (repeatable)")
    p.add_argument("--llmc-venv", default=str(DEFAULT_LLMC_VENV), help="llm-compressor's own venv (created if missing)")
    p.add_argument("--llmc-python", default=None,
                   help="an interpreter that already imports llmcompressor (e.g. a GPU machine's python3 with the "
                        "wheels on PYTHONPATH) instead of --llmc-venv")
    p.add_argument("--device", default="cpu",
                   help="where both tools quantize and the checkpoints are scored (cpu, cuda); results of another "
                        "device are separate rows")
    p.add_argument("--llmc-dtype", default="float32", help="dtype llm-compressor loads the model in")
    p.add_argument("--llmc-save-fp32", dest="llmc_save_model_dtype", action="store_false",
                   help="save llm-compressor's checkpoint in --llmc-dtype instead of the model's own dtype")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="windows, checkpoints, logs, reference cache")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="directory for results.json and table.md")
    p.add_argument("--table-only", action="store_true", help="run nothing: print and write the table of what is in results.json")
    p.add_argument("--force", action="store_true", help="recompute the selected rows even if cached")
    p.add_argument("--child-timeout", type=int, default=6 * 3600)
    # child-only
    p.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    for name in ("--method", "--windows", "--ckpt", "--result-json", "--qf-options"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--preset", default="", help=argparse.SUPPRESS)
    p.add_argument("--smoothquant", type=float, default=0.0, help=argparse.SUPPRESS)
    for name in ("--bits", "--group", "--symmetric"):
        p.add_argument(name, type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    global EVAL_DEVICE
    EVAL_DEVICE = torch.device(args.device)
    if args.child:
        return run_child(args)
    sys.path.insert(0, str(REPO_ROOT))
    from workers import assets

    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = str(Path(args.model or assets.smollm2_dir()).resolve())
    args.calib_text = str(Path(args.calib_text or assets.calibration_text()).resolve())
    args.eval_text = str(Path(args.eval_text or assets.eval_text()).resolve())
    for path in (args.model, args.calib_text, args.eval_text):
        if not Path(path).exists():
            p.error(f"{path} does not exist (run `make assets`, or pass --model/--calib-text/--eval-text)")
    tools = [] if args.table_only else list(TOOLS) if args.tools == "both" else [t for t in args.tools.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    from workers.spec import Method

    qf_methods = [m.value for m in Method]
    bad = [x for x in tools if x not in TOOLS] + [x for x in methods if x not in qf_methods] + [x for x in configs if x not in CONFIGS]
    if bad:
        p.error(f"unknown {bad}; tools {TOOLS}, methods {qf_methods} (llm-compressor: {METHODS}), configs {list(CONFIGS)}")
    qf_opts = {k: parse_value(v) for k, _, v in (o.partition("=") for o in args.qf_opt)}
    if args.qf_act_order:
        qf_opts["act_order"] = args.qf_act_order == "on"
    split_qf_options(qf_opts)  # fail early on an unknown name
    seeds = [args.seed] + [int(s) for s in args.seeds.split(",") if s.strip() and int(s) != args.seed]

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    windows = {
        s: make_windows(Path(args.model), Path(args.calib_text), Path(args.eval_text), args.num_samples,
                        args.seq_len, args.eval_windows, s, work)
        for s in seeds
    }
    w0 = windows[args.seed]
    print(
        f"windows: {w0.path} calibration {tuple(w0.calibration.shape)} (hash {w0.calib_hash}), eval "
        f"{tuple(w0.eval.shape)} (hash {w0.eval_hash}); prefix per window: {w0.meta['prefix_tokens']} "
        f"(tokenizer bos_token {w0.meta['bos_token']!r})",
        flush=True,
    )
    dims = linear_input_dims(Path(args.model))
    engine = engine_fingerprint()
    llmc_opts = {"llmcompressor": LLMC_VERSION, "dtype": args.llmc_dtype, "save_model_dtype": args.llmc_save_model_dtype}
    qf_all: dict[str, Any] = {"qf": qf_opts, "engine": engine}
    if args.device != "cpu":  # CPU rows keep their cached keys
        llmc_opts["device"] = qf_all["device"] = args.device

    def rows_for(tool_list: list[str], seed_list: list[int]) -> list[Row]:
        out_rows = []
        for cfg in configs:
            asked = CONFIGS[cfg]
            scheme, note = effective_scheme(asked, dims, args.substitute_group)
            for method in [m for m in methods if m in PRESETS[asked.preset].methods] if asked.preset else methods:
                for tool in tool_list:
                    if tool == "llmcompressor" and method not in METHODS:
                        continue  # a QuantFleet-only method: no llm-compressor row
                    for s in seed_list if tool == "quantfleet" else [args.seed]:
                        opts = llmc_opts if tool == "llmcompressor" else qf_all
                        out_rows.append(Row(tool, method, cfg, asked, scheme, s, windows[s], opts, note))
        return out_rows

    todo = rows_for(tools, seeds)
    run_rows(todo, args, work, results_path)

    results = read_results(results_path)
    shown = rows_for(list(TOOLS), seeds)  # both tools' rows from the results file, whichever ran now
    weight_rows = [r for r in shown if not r.scheme.preset]
    scheme_rows = [r for r in shown if r.scheme.preset]
    tables = [fmt_table(weight_rows, results, w0.eval_hash)] if weight_rows else []
    if scheme_rows:
        tables.append(fmt_table(scheme_rows, results, w0.eval_hash, bpw_col=True))
    table = "\n\n".join(tables)
    orig = results["original"].get(w0.eval_hash, {})
    subs = sorted({f"{config_label(r.asked, r.scheme)}: {r.note}" for r in shown if r.note})
    header = [
        f"# QuantFleet vs llm-compressor {LLMC_VERSION}: quality on {Path(args.model).name} ({device_name(args.device)})",
        "",
        f"- date: {dt.date.today().isoformat()}; machine: {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} CPUs; torch threads: {args.threads or torch.get_num_threads()}",
        f"- model: {args.model}; original ppl {orig.get('ppl', float('nan')):.3f} over {orig.get('tokens', 0)} tokens",
        f"- calibration: {tuple(w0.calibration.shape)} windows (seed {args.seed}, hash {w0.calib_hash}); eval: "
        f"{tuple(w0.eval.shape)} windows (hash {w0.eval_hash}); per-window prefix {w0.meta['prefix_tokens']}",
        f"- QuantFleet options: {qf_opts or 'engine defaults'} (engine source hash {engine}); llm-compressor at its "
        f"defaults, loaded in {args.llmc_dtype}",
        f"- {PIN_MEMORY_NOTE}",
        *([f"- weight+activation rows ({', '.join(sorted({r.scheme.label() for r in scheme_rows}))}): scored with "
           f"{ACTIVATION_NOTE}; bits / weight: every stored byte of the quantized Linears (codes, scales, zero points, "
           "input scales) × 8 per weight, from the checkpoint's safetensors headers; llm-compressor recipes: "
           "QuantizationModifier(targets='Linear', scheme='FP8_DYNAMIC' | 'FP8', ignore=['lm_head']), "
           "GPTQModifier(targets='Linear', scheme='W8A8', ignore=['lm_head']), after "
           "SmoothQuantModifier(smoothing_strength=0.8) for the SmoothQuant row; QuantFleet: "
           "QuantScheme.from_preset('fp8-dynamic' | 'fp8-static' | 'w8a8-int8'), JobSpec.smoothquant=0.8 for the "
           "SmoothQuant row"] if scheme_rows else []),
        *[f"- group substitution: {s}" for s in subs],
        "- seconds: the quantization call (llm-compressor `oneshot`; QuantFleet `run_local` less its final write)",
        f"- results: {results_path}",
        "",
    ]
    spread = seed_spread(shown, results, w0.eval_hash)
    text = "\n".join(header) + "\n" + table + ("\n\nQuantFleet calibration-seed spread:\n" + "\n".join(spread) if spread else "") + "\n"
    (out / "table.md").write_text(text)
    print(text, flush=True)
    failed = [r for r in todo if results["rows"].get(r.key, {}).get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
