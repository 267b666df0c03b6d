"""GPU speed benchmark: llm-compressor's `oneshot` against QuantFleet on a Llama-3-8B-shaped model.

Why synthetic weights: no model hub is reachable on the device machine, and quantization speed depends
only on shapes, not on what the weights learned. The model is written as real safetensors shards with a
real `config.json` and a word-level tokenizer ("w0".."w128255", one word per id), so both tools read the
same checkpoint through their normal loaders and see exactly the same calibration token ids.

Why a layer prefix: the full model is ~16 GB and llm-compressor needs ~6 s per layer, so one 10-minute
device call holds only part of it. `--layers K` writes the first K decoder layers (same weights as the
full model: each tensor is seeded by its name), times the tools on that, and extrapolates to 32 layers:
  * the per-layer loop scales with the layer count (median per-layer time × 32),
  * loading and saving scale with checkpoint bytes,
  * everything else (start-up, tracing, the norm/lm_head tail) is counted once.
Every printed row says how many layers were really timed.

Usage (repository root, on the GPU machine):
    python benchmarks/gpu_speed.py --work /tmp/bench --layers 4 --tools llmcompressor --methods gptq,awq
    python benchmarks/gpu_speed.py --work /tmp/bench --layers 4 --tools both --methods gptq
    python benchmarks/gpu_speed.py --rates-only      # matmul / copy / Hessian / Cholesky rates for the floor
Each (tool, method) pair runs in its own child process so peak GPU memory and global state stay separate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("llmcompressor", "quantfleet")
METHODS = ("gptq", "awq")
INIT_STD = 0.02  # the scale of Llama's own initialisation; keeps activations finite through the layers


# ----------------------------------------------------------------------------------------------------------
# The model: shapes, synthetic weights, tokenizer, calibration ids
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name (inside `model.layers.{i}.`) → shape, as LlamaDecoderLayer stores them."""
        h, i, q, kv = (
            self.hidden,
            self.intermediate,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        return {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
        }

    def outer_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensors outside the decoder layers (untied embeddings, as in Llama-3-8B)."""
        return {
            "model.embed_tokens.weight": (self.vocab, self.hidden),
            "model.norm.weight": (self.hidden,),
            "lm_head.weight": (self.vocab, self.hidden),
        }

    def checkpoint_bytes(self, layers: int, bytes_per_param: int = 2) -> int:
        def numel(shapes: dict[str, tuple[int, ...]]) -> int:
            return sum(int(torch.Size(s).numel()) for s in shapes.values())

        return bytes_per_param * (numel(self.outer_tensors()) + layers * numel(self.layer_tensors()))

    def validate(self) -> None:
        if min(self.hidden, self.intermediate, self.layers, self.heads, self.kv_heads, self.vocab) < 1:
            raise ValueError(f"every model dimension must be positive, got {self}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"hidden {self.hidden} must divide by heads {self.heads}, heads by kv_heads {self.kv_heads}"
            )


LLAMA3_8B = ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
LLAMA3_70B = ModelShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256)
TINY = ModelShape(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2, vocab=1024)  # CPU tests
# Llama-3-8B's proportions at 1/8 of the width (hidden:intermediate 1:3.5, head_dim 128, 4 query heads per KV
# head): the factorisation costs keep their ratios (n³), for CPU measurements of the multi-device schedule
LLAMA3_8B_DIV8 = ModelShape(hidden=512, intermediate=1792, layers=32, heads=4, kv_heads=1, vocab=1024)
SHAPES = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B, "tiny": TINY, "llama3-8b-div8": LLAMA3_8B_DIV8}


def tensor_seed(seed: int, name: str) -> int:
    """Seed per tensor name, so a K-layer prefix holds exactly the first K layers of the full model."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def synthetic_tensor(name: str, shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Norm weights are ones (as initialised); matrices are N(0, INIT_STD²) in bf16, drawn on `device`."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device).manual_seed(tensor_seed(seed, name))
    return torch.randn(shape, generator=gen, dtype=torch.bfloat16, device=device).mul_(INIT_STD)


@dataclass
class BuildResult:
    model_dir: str
    layers: int
    bytes_written: int
    generate_s: float
    write_s: float
    reused: bool = False  # an earlier complete build in the same directory (generate_s/write_s are its)

    @property
    def write_mb_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.write_s, 1e-9)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, float]:
    """Write one shard and fsync it, so the time is the disk's, not the page cache's."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    save_file(tensors, str(path), metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path.stat().st_size, time.perf_counter() - t0


def write_llama_config(model_dir: Path, shape: ModelShape, layers: int) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(model_dir)


def write_word_tokenizer(model_dir: Path, vocab: int) -> None:
    """Word-level tokenizer with no special tokens added: the text "w5 w17" encodes to exactly [5, 17]."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    backend = Tokenizer(WordLevel(words, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", model_max_length=8192)
    tok.save_pretrained(model_dir)


def build_model(
    model_dir: Path, shape: ModelShape, layers: int, seed: int, device: torch.device
) -> BuildResult:
    """Write `layers` decoder layers (one shard each) plus embeddings/norm/lm_head, config and tokenizer."""
    shape.validate()
    if not 1 <= layers <= shape.layers:
        raise ValueError(f"--layers {layers} must be between 1 and {shape.layers} for this shape")
    marker = model_dir / "build.json"
    key = {"shape": asdict(shape), "layers": layers, "seed": seed}
    if marker.exists():  # a complete earlier build of the same weights (written last): reuse it
        done = json.loads(marker.read_text())
        if done.get("key") == key:
            return BuildResult(**(done["result"] | {"reused": True}))
        marker.unlink()
    model_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_bytes, gen_s, write_s = 0, 0.0, 0.0

    def emit(shard: str, named: dict[str, tuple[int, ...]]) -> None:
        nonlocal total_bytes, gen_s, write_s
        t0 = time.perf_counter()
        tensors = {n: synthetic_tensor(n, s, seed, device) for n, s in named.items()}
        tensors = {n: t.cpu() for n, t in tensors.items()}  # the .cpu() waits for the GPU work
        gen_s += time.perf_counter() - t0
        size, secs = _write_shard(model_dir / shard, tensors)
        total_bytes, write_s = total_bytes + size, write_s + secs
        weight_map.update(dict.fromkeys(tensors, shard))

    emit("model-outer.safetensors", shape.outer_tensors())
    for i in range(layers):
        named = {f"model.layers.{i}.{n}": s for n, s in shape.layer_tensors().items()}
        emit(f"model-layer-{i:03d}.safetensors", named)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    write_llama_config(model_dir, shape, layers)
    write_word_tokenizer(model_dir, shape.vocab)
    result = BuildResult(str(model_dir), layers, total_bytes, gen_s, write_s)
    marker.write_text(json.dumps({"key": key, "result": asdict(result)}))
    return result


def calibration_ids(num_samples: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """Uniform random token ids from a fixed seed: the same [num_samples, seq_len] tensor for every tool."""
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"calibration needs at least one sample of one token, got {num_samples}×{seq_len}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num_samples, seq_len), generator=gen, dtype=torch.int64)


def write_calibration_jsonl(path: Path, ids: torch.Tensor) -> None:
    """One {"text": "w.. w.."} record per sample; the word tokenizer turns it back into the same ids."""
    with path.open("w") as f:
        for row in ids.tolist():
            f.write(json.dumps({"text": " ".join(f"w{t}" for t in row)}) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def now() -> float:
    """Host clock after the GPU has finished its queued work."""
    sync()
    return time.perf_counter()


def drop_page_cache() -> bool:
    """Ask the kernel to forget cached file pages (root only), so a load reads the disk. False if refused."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def disk_read_mb_s(files: list[Path], chunk: int = 64 << 20) -> float:
    buf = bytearray(chunk)
    total, t0 = 0, time.perf_counter()
    for path in files:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(buf):  # type: ignore[attr-defined]
                total += n
    return total / 1e6 / (time.perf_counter() - t0)


@dataclass
class Result:
    """One timed run of one tool. `stages` are measured seconds; `layer_s` the per-decoder-layer times."""

    tool: str
    method: str
    layers: int
    total_layers: int
    stages: dict[str, float]
    layer_s: list[float]
    io_s: float  # the part of `total_s` that scales with checkpoint bytes (load + save)
    total_s: float
    peak_gpu_gib: float
    cache: str
    whole_model_s: float = 0.0  # whole-model passes outside the layer loop that scale with the layer count
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def per_layer_s(self) -> float:
        return statistics.median(self.layer_s) if self.layer_s else float("nan")

    def extrapolated_s(self, shape: ModelShape) -> float:
        """fixed + total_layers × median layer + I/O scaled by bytes + whole-model passes scaled by layers.

        Equals total_s when nothing was cut.
        """
        if self.layers == self.total_layers:
            return self.total_s
        loop = self.per_layer_s()
        fixed = self.total_s - self.io_s - self.whole_model_s - loop * self.layers
        byte_ratio = shape.checkpoint_bytes(self.total_layers) / shape.checkpoint_bytes(self.layers)
        layer_ratio = self.total_layers / self.layers
        return fixed + loop * self.total_layers + self.io_s * byte_ratio + self.whole_model_s * layer_ratio


# ----------------------------------------------------------------------------------------------------------
# llm-compressor
# ----------------------------------------------------------------------------------------------------------


class LlmCompressorProbe:
    """Times llm-compressor's pipelines per subgraph without changing what they compute.

    It wraps two seams of llm-compressor 0.14: `_get_batches` (one calibration pass or one propagation
    pass over all samples through one subgraph; the calibration pass includes the Hessian / activation
    hooks) and `LifecycleCallbacks.sequential_epoch_end` (where GPTQ solves and AWQ searches its scales;
    when the data-free pipeline calls it, AWQ's follow-up QuantizationModifier rounds all weights).
    """

    def __init__(self) -> None:
        self.passes: list[tuple[int, str, float]] = []  # (subgraph index, "Calibrating"|"Propagating", s)
        self.solves: list[tuple[int, float]] = []  # (subgraph index, s) from the sequential pipeline
        self.data_free_s = 0.0  # epoch ends called by any other pipeline (whole model at once)

    def install(self) -> None:
        import llmcompressor.pipelines.sequential.pipeline as seq
        from llmcompressor.core import LifecycleCallbacks

        get_batches = seq._get_batches
        epoch_end = LifecycleCallbacks.sequential_epoch_end  # bound classmethod

        def timed_batches(
            activations: Any, num_batches: int, input_names: list[str], desc: str, *args: Any, **kwargs: Any
        ) -> Iterator[Any]:
            t0 = now()
            yield from get_batches(activations, num_batches, input_names, desc, *args, **kwargs)
            index = int(desc.split("/")[0].strip("( "))
            self.passes.append((index, desc.rsplit(" ", 1)[-1], now() - t0))

        def timed_epoch_end(cls: type, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            t0 = now()
            out = epoch_end(*args, **kwargs)
            secs = now() - t0
            if caller == seq.__name__ and self.passes:
                self.solves.append((self.passes[-1][0], secs))  # follows that subgraph's calibration pass
            else:
                self.data_free_s += secs
            return out

        seq._get_batches = timed_batches
        LifecycleCallbacks.sequential_epoch_end = classmethod(timed_epoch_end)  # type: ignore[method-assign]

    def per_subgraph(self) -> list[float]:
        """calibrate + solve + propagate seconds for each subgraph, in pipeline order."""
        by_index: dict[int, float] = {}
        for index, _, secs in self.passes:
            by_index[index] = by_index.get(index, 0.0) + secs
        for index, secs in self.solves:
            by_index[index] = by_index.get(index, 0.0) + secs
        return [by_index[i] for i in sorted(by_index)]

    def stage_sums(self) -> dict[str, float]:
        return {
            "calibrate": sum(s for _, kind, s in self.passes if kind == "Calibrating"),
            "solve": sum(s for _, s in self.solves),
            "propagate": sum(s for _, kind, s in self.passes if kind == "Propagating"),
            "quantize": self.data_free_s,
        }


def llmcompressor_recipe(method: str) -> list[Any]:
    """W4A16 = int4, group 128, symmetric; lm_head stays bf16. GPTQ keeps its defaults (actorder static)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if method == "gptq":
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]
    if method == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(), QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]
    raise ValueError(f"llm-compressor method {method!r} is not benchmarked; choose one of {METHODS}")


def time_llmcompressor(
    method: str, model_dir: Path, out_dir: Path, ids: torch.Tensor, shape: ModelShape, layers: int, cold: bool
) -> Result:
    """load (from_pretrained to host RAM) → oneshot (calibrate + quantize) → save_pretrained(compressed)."""
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    probe = LlmCompressorProbe()
    probe.install()
    cache = "cold" if cold and drop_page_cache() else "warm"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    t0 = now()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    t_load = now() - t0

    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t0 = now()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=llmcompressor_recipe(method),
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
        shuffle_calibration_samples=False,
    )
    t_oneshot = now() - t0

    t0 = now()
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    t_save = now() - t0

    sub = probe.per_subgraph()
    # The tracer cuts before each decoder layer: subgraph 1 is the embedding prefix (no Linear to solve),
    # subgraphs 2..K+1 are the K layers, the last one also carrying the final norm (lm_head is skipped).
    if len(sub) != layers + 1:
        raise RuntimeError(f"expected {layers + 1} traced subgraphs for {layers} layers, got {len(sub)}")
    layer_s = sub[1:]
    stages = {"load": t_load, **probe.stage_sums(), "save": t_save}
    stages["other"] = t_oneshot - sum(stages[k] for k in ("calibrate", "solve", "propagate", "quantize"))
    import compressed_tensors

    return Result(
        tool="llmcompressor",
        method=method,
        layers=layers,
        total_layers=shape.layers,
        stages=stages,
        layer_s=layer_s,
        io_s=t_load + t_save,
        total_s=t_load + t_oneshot + t_save,
        peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
        cache=cache,
        whole_model_s=stages["quantize"],
        config={
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "scheme": "W4A16 (int4 g128 sym)",
            "ignore": ["lm_head"],
            "subgraphs": len(sub),
            "passes": probe.passes,
            "solves": probe.solves,
        },
        notes=[
            "'other' = tracing, dataset prep, calibration_end; 'quantize' = AWQ's data-free rounding pass"
        ],
    )


# ----------------------------------------------------------------------------------------------------------
# QuantFleet  (to be timed once workers.engine.run_local lands)
# ----------------------------------------------------------------------------------------------------------


class ProgressClock:
    """Turns the engine's Progress events into seconds per stage, per step and per decoder layer.

    The time between two events is charged to the earlier event; a layer's time runs from its first
    event to the next layer's first event. Each event waits for queued GPU work (like the llm-compressor
    probe), so the times are attributed to the step that launched the work.
    """

    def __init__(self, profile_layer: int | None = None) -> None:
        self.events: list[tuple[float, str, int | None, str]] = []  # (time, stage, layer, module or message)
        self.profile_layer = profile_layer
        self.profile_table = ""
        self._profiler: Any = None

    def __call__(self, progress: Any) -> None:
        self.events.append((now(), progress.stage, progress.layer, progress.module or progress.message or ""))
        self._maybe_profile(progress.stage, progress.layer)

    def _maybe_profile(self, stage: str, layer: int | None) -> None:
        """torch.profiler over exactly one decoder layer: from its first event to the next layer's first."""
        if self.profile_layer is None:
            return
        if self._profiler is None and stage == "quantize" and layer == self.profile_layer:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._profiler = profile(activities=activities)
            self._profiler.start()
        elif self._profiler is not None and not self.profile_table and layer != self.profile_layer:
            sync()
            self._profiler.stop()
            averages = self._profiler.key_averages()
            sort = "cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            self.profile_table = (
                averages.table(sort_by=sort, row_limit=25, max_name_column_width=60)
                + "\n"
                + averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
            )

    def _spans(self, end: float) -> Iterator[tuple[float, str, str]]:
        marks = [*self.events, (end, "", None, "")]
        for (t, stage, _, label), (t_next, *_) in zip(marks, marks[1:], strict=False):
            yield t_next - t, stage, label

    def stages(self, end: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for secs, stage, _ in self._spans(end):
            out[stage] = out.get(stage, 0.0) + secs
        return out

    def steps(self, end: float) -> dict[str, float]:
        """Seconds per "stage: module/message", summed over layers: where the layer loop spends its time."""
        out: dict[str, float] = {}
        for secs, stage, label in self._spans(end):
            key = f"{stage}: {label}" if label else stage
            out[key] = out.get(key, 0.0) + secs
        return out

    def layer_seconds(self, end: float) -> list[float]:
        starts: dict[int, float] = {}
        for t, _, layer, _ in self.events:
            if layer is not None:
                starts.setdefault(layer, t)
        order = sorted(starts)
        if not order:
            return []
        after_last = next(
            (t for t, _, layer, _ in self.events if t > starts[order[-1]] and layer is None), end
        )
        bounds = [starts[i] for i in order] + [after_last]
        return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def time_quantfleet(
    method: str,
    model_dir: Path,
    out_dir: Path,
    calib_path: Path,
    ids: torch.Tensor,
    shape: ModelShape,
    layers: int,
    cold: bool,
    profile_layer: int | None = None,
    devices: int = 1,
    overlap: bool = True,
    act_order: bool = True,
) -> Result:
    """Times `workers.engine.run_local(JobSpec(...), out_dir)` on the same checkpoint and token ids.

    `devices` > 1 gives the job that many GPUs (calibration split across them, JobSpec.devices).

    The calibration file holds exactly num_samples × seq_len words and the tokenizer has no BOS, so the
    engine's seeded window sampler has no slack and takes the records in order: the same ids as
    llm-compressor. Stages come from the engine's own EngineReport.timings_s; per-layer times from its
    Progress events (the weights are read inside the layer loop, so loading scales with layers there).
    """
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from workers.engine import run_local
    except ImportError as exc:
        raise RuntimeError(
            f"QuantFleet engine not importable ({exc}); run with --tools llmcompressor"
        ) from exc
    from workers.pipeline import PipelineOptions
    from workers.spec import CalibrationSpec, JobSpec, Method, QuantScheme

    options = PipelineOptions() if overlap else PipelineOptions(prefetch_weights=False, background_writes=False)

    spec = JobSpec(
        model_dir=str(model_dir),
        method=Method(method),
        scheme=QuantScheme(bits=4, group_size=128, symmetric=True),
        calibration=CalibrationSpec(
            path=str(calib_path), num_samples=ids.shape[0], seq_len=ids.shape[1], seed=0
        ),
        device="cuda" if torch.cuda.is_available() else "cpu",
        devices=devices,
        act_order=act_order,
    )
    spec.validate()
    clock = ProgressClock(profile_layer=profile_layer)
    cache = "cold" if cold and drop_page_cache() else "warm"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = now()
    report = run_local(spec, out_dir, on_progress=clock, options=options)
    end = now()
    if clock.profile_table:
        print(f"--- torch.profiler, decoder layer {profile_layer} ({method})\n{clock.profile_table}", flush=True)
    timings = report.timings_s
    stages = {
        "load": timings.get("load", 0.0),
        "calibrate": timings.get("calibrate", 0.0),  # tokenizing the calibration text
        "quantize": timings.get(
            "quantize", 0.0
        ),  # the whole layer loop: read, calibrate, solve, pack, propagate
        "save": timings.get("write", 0.0),
    }
    stages["other"] = (end - t0) - sum(stages.values())
    return Result(
        tool="quantfleet" if devices == 1 else f"quantfleet-{devices}gpu",
        method=method,
        layers=layers,
        total_layers=shape.layers,
        stages=stages,
        layer_s=clock.layer_seconds(end),
        io_s=stages["save"],
        total_s=end - t0,
        peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
        cache=cache,
        config={
            **spec.to_dict(),
            "pipeline_options": asdict(options),
            "engine_timings_s": timings,
            "engine_peak_memory": report.peak_memory_bytes,
            "steps_s": clock.steps(end),
        },
        notes=["'quantize' is the layer loop; the weights are read inside it, so loading scales with layers"],
    )


# ----------------------------------------------------------------------------------------------------------
# Rates for the floor
# ----------------------------------------------------------------------------------------------------------


def _median_ms(fn: Callable[[], Any], reps: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def hessian_seconds(d: int, tokens: int, mode: str, chunk: int = 8192) -> float:
    """Time H += XᵀX over `tokens` rows of bf16 activations, as GPTQ accumulates it, in one precision mode."""
    x = torch.randn(chunk, d, device="cuda", dtype=torch.bfloat16)
    h = torch.zeros(d, d, device="cuda", dtype=torch.float32)

    def step() -> None:
        if mode == "bf16->fp32":
            h.add_(torch.mm(x.t(), x, out_dtype=torch.float32))  # type: ignore[call-overload]
        else:
            xf = x.float()
            h.addmm_(xf.t(), xf)

    with tf32(mode == "tf32"):
        ms = _median_ms(step, reps=5)
    return ms / 1e3 * tokens / chunk


def matmul_rates(n: int = 8192) -> dict[str, float]:
    """TFLOP/s of an n³ matrix product in bf16, fp32 (TF32 off, as GPTQ's reference code runs) and TF32."""
    a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
    a16, b16 = a.bfloat16(), b.bfloat16()
    flop = 2 * n**3
    out = {"bf16_mm_tflops": flop / (_median_ms(lambda: a16 @ b16) / 1e3) / 1e12}
    with tf32(False):
        out["fp32_mm_tflops"] = flop / (_median_ms(lambda: a @ b) / 1e3) / 1e12
    with tf32(True):
        out["tf32_mm_tflops"] = flop / (_median_ms(lambda: a @ b) / 1e3) / 1e12
    return out


def copy_rates(nbytes: int = 1 << 30) -> dict[str, float]:
    """Device-to-device (bytes read + written) and pinned host<->device copy rates."""
    src = torch.empty(nbytes, device="cuda", dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return {
        "d2d_copy_tb_s": 2 * nbytes / (_median_ms(lambda: dst.copy_(src)) / 1e3) / 1e12,
        "h2d_pinned_gb_s": nbytes / (_median_ms(lambda: src.copy_(host, non_blocking=True)) / 1e3) / 1e9,
        "d2h_pinned_gb_s": nbytes / (_median_ms(lambda: host.copy_(src, non_blocking=True)) / 1e3) / 1e9,
    }


def gptq_inverse_ms(d: int) -> float:
    """GPTQ's `cholesky(cholesky_inverse(cholesky(H)), upper=True)` on a well-conditioned fp32 d×d matrix."""
    x = torch.randn(2 * d, d, device="cuda")
    h = x.t() @ x / (2 * d) + 0.01 * torch.eye(d, device="cuda")

    def inverse() -> torch.Tensor:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    with tf32(False):
        return _median_ms(inverse, reps=3)


def measure_rates(tokens: int, shape: ModelShape) -> dict[str, Any]:
    """The ceilings the floor in benchmarks/gpu.md is computed from, measured on this GPU."""
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    out.update(matmul_rates())
    out.update(copy_rates())
    for d in sorted({shape.hidden, shape.intermediate}):
        for mode in ("fp32", "tf32", "bf16->fp32"):
            try:
                out[f"hessian_{d}_{mode}_s"] = hessian_seconds(d, tokens, mode)
            except (RuntimeError, TypeError) as exc:
                out[f"hessian_{d}_{mode}_s"] = f"unsupported: {exc}"[:120]
        out[f"chol_inv_chol_{d}_ms"] = gptq_inverse_ms(d)
    torch.cuda.empty_cache()
    out.update(decoder_layer_forward_seconds(shape, tokens))
    return out


def decoder_layer_forward_seconds(
    shape: ModelShape, tokens: int, batch: int = 8, seq: int = 2048
) -> dict[str, Any]:
    """One bf16 transformers LlamaDecoderLayer forward over `tokens` calibration tokens (sdpa attention)."""
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        cfg = LlamaConfig(
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            num_hidden_layers=1,
            vocab_size=shape.vocab,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            max_position_embeddings=8192,
        )
        cfg._attn_implementation = "sdpa"
        layer = LlamaDecoderLayer(cfg, layer_idx=0).cuda().bfloat16()
        rope = LlamaRotaryEmbedding(cfg).cuda()
        x = torch.randn(batch, seq, shape.hidden, device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(seq, device="cuda")[None].expand(batch, -1)
        cos_sin = rope(x, pos)

        @torch.no_grad()
        def fwd() -> Any:
            return layer(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)

        ms = _median_ms(fwd, reps=5)
        return {"decoder_layer_forward_s": ms / 1e3 * tokens / (batch * seq)}
    except Exception as exc:  # report, do not lose the other rates
        return {"decoder_layer_forward_s": f"failed: {exc}"[:160]}


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace) -> None:
    """One (tool, method) in this process; writes its Result as JSON."""
    if os.environ.get("QF_BENCH_CPU_DEVICES") == "1" and not torch.cuda.is_available():
        sys.path.insert(0, str(REPO_ROOT))
        from workers import engine  # --devices N as N logical CPU devices (gpu_scaling.py --cpu-devices)

        engine.resolve_devices = lambda device, count: [torch.device("cpu")] * count  # type: ignore[assignment]
    shape = SHAPES[args.shape]
    work = Path(args.work)
    ids = torch.load(work / "calib_ids.pt")
    model_dir = work / f"model-{args.shape}-{args.layers}L"
    out_dir = work / f"out-{args.shape}-{args.layers}L-{args.tool}-{args.method}"
    shutil.rmtree(out_dir, ignore_errors=True)  # a stale result of an earlier run on a warm machine
    if args.tool == "llmcompressor":
        result = time_llmcompressor(args.method, model_dir, out_dir, ids, shape, args.layers, args.cold)
    else:
        result = time_quantfleet(
            args.method, model_dir, out_dir, work / "calib.jsonl", ids, shape, args.layers, args.cold,
            args.profile_layer, args.devices, not args.no_overlap, args.act_order == "on",
        )
    Path(args.result_json).write_text(json.dumps(asdict(result), indent=1))


def fmt(x: float) -> str:
    return f"{x:8.1f}" if x == x else "     n/a"


def print_table(results: list[Result], shape: ModelShape) -> str:
    cols = ["load", "calibrate", "solve", "propagate", "quantize", "save", "other"]
    head = f"{'tool':14} {'method':6} {'layers':>6} " + " ".join(f"{c[:8]:>8}" for c in cols)
    head += f" {'total':>8} {'s/layer':>8} {'total@' + str(shape.layers):>9} {'peakGiB':>8} cache"
    lines = [head, "-" * len(head)]
    for r in results:
        cells = " ".join(fmt(r.stages.get(c, float("nan"))) for c in cols)
        lines.append(
            f"{r.tool:14} {r.method:6} {r.layers:>6} {cells} {fmt(r.total_s)} {fmt(r.per_layer_s())} "
            f"{fmt(r.extrapolated_s(shape)):>9} {r.peak_gpu_gib:8.2f} {r.cache}"
        )
    by_key = {(r.tool, r.method): r for r in results}
    for method in METHODS:
        lc, qf = by_key.get(("llmcompressor", method)), by_key.get(("quantfleet", method))
        if lc and qf:
            lines.append(
                f"ratio llm-compressor/QuantFleet ({method}, extrapolated to {shape.layers} layers): "
                f"{lc.extrapolated_s(shape) / qf.extrapolated_s(shape):.2f}x"
            )
    prefix = [r for r in results if r.layers < shape.layers]
    if prefix:
        lines.append(
            f"NOTE: timed on a {prefix[0].layers}-layer PREFIX of the {shape.layers}-layer model; "
            f"total@{shape.layers} = fixed + {shape.layers} × median layer + load/save scaled by bytes"
            " + whole-model passes scaled by layers."
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work", default="/tmp/qf-bench", help="scratch directory on local disk (needs ~1 GB/layer)"
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--layers", type=int, default=4, help="time the first K decoder layers (a prefix)")
    p.add_argument("--tools", default="llmcompressor", help="llmcompressor, quantfleet or both")
    p.add_argument("--methods", default="gptq", help="comma list of gptq, awq")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--warm", dest="cold", action="store_false", help="do not drop the page cache before loads"
    )
    p.add_argument("--child-timeout", type=int, default=900, help="seconds per (tool, method) child process")
    p.add_argument("--no-overlap", action="store_true", help="QuantFleet without prefetching and background writes")
    p.add_argument("--act-order", choices=["on", "off"], default="on", help="QuantFleet GPTQ act-order (default on)")
    p.add_argument("--devices", type=int, default=1, help="GPUs given to each QuantFleet job (JobSpec.devices)")
    p.add_argument("--profile-layer", type=int, default=None, help="torch.profiler table of this QuantFleet layer")
    p.add_argument("--rates", action="store_true", help="also measure matmul/copy/Hessian/Cholesky rates")
    p.add_argument("--rates-only", action="store_true")
    p.add_argument("--results", default=None, help="write all results (JSON) here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tool", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--result-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run_child(args)
        return 0

    shape = SHAPES[args.shape]
    tools = list(TOOLS) if args.tools == "both" else args.tools.split(",")
    methods = args.methods.split(",")
    bad = [t for t in tools if t not in TOOLS] + [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown tool/method {bad}; tools: {TOOLS} or 'both', methods: {METHODS}")
    if not 1 <= args.layers <= shape.layers:
        p.error(f"--layers must be between 1 and {shape.layers}")
    summary: dict[str, Any] = {
        "shape": asdict(shape),
        "layers": args.layers,
        "samples": args.samples,
        "seq_len": args.seq_len,
    }
    if args.rates or args.rates_only:
        if not torch.cuda.is_available():
            p.error("--rates needs a CUDA GPU")
        try:
            summary["rates"] = measure_rates(args.samples * args.seq_len, shape)
        except Exception as exc:  # the tool timings below are worth more than the rates: keep going
            summary["rates"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(summary["rates"], indent=1), flush=True)
        _dump(args.results, summary)
        torch.cuda.empty_cache()
    if args.rates_only:
        _dump(args.results, summary)
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ids = calibration_ids(args.samples, args.seq_len, shape.vocab, args.seed)
    torch.save(ids, work / "calib_ids.pt")
    write_calibration_jsonl(work / "calib.jsonl", ids)
    build = build_model(work / f"model-{args.shape}-{args.layers}L", shape, args.layers, args.seed, device)
    model_files = sorted(Path(build.model_dir).glob("*.safetensors"))
    cold = drop_page_cache()
    summary["build"] = {
        **asdict(build),
        "write_mb_s": build.write_mb_s,
        "read_mb_s": disk_read_mb_s(model_files),
        "read_cache": "cold" if cold else "warm",
    }
    print(
        f"{'reused' if build.reused else 'built'} {args.layers} of {shape.layers} layers: {build.bytes_written / 1e9:.2f} GB, generate {build.generate_s:.1f} s, "
        f"write+fsync {build.write_s:.1f} s ({build.write_mb_s:.0f} MB/s), read "
        f"{summary['build']['read_mb_s']:.0f} MB/s ({summary['build']['read_cache']})",
        flush=True,
    )

    results: list[Result] = []
    summary["failures"] = []
    for tool in tools:
        for method in methods:
            result_json = work / f"result-{tool}-{method}.json"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                "--tool",
                tool,
                "--method",
                method,
                "--work",
                str(work),
                "--shape",
                args.shape,
                "--layers",
                str(args.layers),
                "--result-json",
                str(result_json),
            ] + ([] if args.cold else ["--warm"])
            if args.profile_layer is not None:
                cmd += ["--profile-layer", str(args.profile_layer)]
            if args.devices != 1:
                cmd += ["--devices", str(args.devices)]
            if args.no_overlap:
                cmd += ["--no-overlap"]
            cmd += ["--act-order", args.act_order]
            print(f"=== {tool} {method} ({args.layers} layers)", flush=True)
            try:
                rc = subprocess.run(cmd, timeout=args.child_timeout).returncode
            except subprocess.TimeoutExpired:
                rc = -1
            if rc != 0 or not result_json.exists():
                summary["failures"].append({"tool": tool, "method": method, "rc": rc})
                print(f"!!! {tool} {method} failed (rc={rc}); see its log above", flush=True)
                continue
            results.append(Result(**json.loads(result_json.read_text())))
    summary["results"] = [
        asdict(r) | {"per_layer_s": r.per_layer_s(), "extrapolated_s": r.extrapolated_s(shape)}
        for r in results
    ]
    for r in results:
        if steps := r.config.get("steps_s"):
            top = sorted(steps.items(), key=lambda kv: -kv[1])[:8]
            print(
                f"{r.tool} {r.method} slowest steps (s, summed over layers): "
                + ", ".join(f"{k}={v:.1f}" for k, v in top),
                flush=True,
            )
    summary["table"] = print_table(results, shape)
    _dump(args.results, summary)
    return 1 if summary["failures"] else 0


def _dump(path: str | None, summary: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
