"""MoE benchmark: a Qwen3-MoE-shaped model (real expert shapes, a few layers, random weights) quantized with
QuantFleet's engine (GPTQ w4 g128), timed per MoE layer, scored by the transformers + compressed-tensors loader.

The model is Qwen3-30B-A3B's shape — hidden 2048, 128 experts of width 768, 8 routed per token, 32 query /
4 key-value heads of 128, vocabulary 151,936 — with `--layers` decoder layers (default 4), built by
transformers itself from `Qwen3MoeConfig` (random initialisation, bf16) and written with its own
`save_pretrained`, so the checkpoint is in the layout real Qwen3-MoE checkpoints have (per-expert
`mlp.experts.N.{gate,up,down}_proj`). The tokenizer is word-level ("w0" … "w151935", one word per id) and the
text is random words, so calibration and evaluation ids are exactly the ids written in the text file.

Reported (stdout, and `--json FILE`): seconds and peak memory of each decoder layer (all are MoE layers; peak
CUDA memory allocated on a GPU, the process's peak RSS on CPU), the engine's total and phase times, and
perplexity of the original and the quantized checkpoint on the evaluation text, both through
`AutoModelForCausalLM.from_pretrained` (the quantized one with `CompressedTensorsConfig(dequantize=True)`),
the figure vLLM's perplexity on the same text must reproduce. The quantized checkpoint is left in `--out`
for vLLM to serve (`../shared/gpu/vllm_bundle.sh`).

Usage:
    python benchmarks/gpu_moe.py --out /tmp/qwen3moe-w4g128 --work /tmp/moe-bench            # GPU, real shapes
    python benchmarks/gpu_moe.py --tiny --out /tmp/tiny-moe --work /tmp/tiny-bench --device cpu  # CPU check
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@dataclass(frozen=True)
class MoeShape:
    hidden: int
    expert_width: int
    experts: int
    routed: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    group_size: int


QWEN3_30B_A3B = MoeShape(hidden=2048, expert_width=768, experts=128, routed=8, heads=32, kv_heads=4, head_dim=128,
                         vocab=151936, group_size=128)
TINY = MoeShape(hidden=64, expert_width=32, experts=4, routed=2, heads=4, kv_heads=2, head_dim=16, vocab=512,
                group_size=32)


@dataclass
class LayerTiming:
    layer: int
    seconds: float
    peak_bytes: int  # CUDA memory allocated at most during the layer (GPU) or the process's peak RSS (CPU)


@dataclass
class MoeBenchResult:
    shape: dict[str, int]
    layers: int
    device: str
    calibration_tokens: int
    total_seconds: float
    engine_timings_s: dict[str, float]
    engine_peak_memory_bytes: dict[str, int]
    per_layer: list[LayerTiming] = field(default_factory=list)
    quantized_experts: int = 0
    ppl_original: float = math.nan
    ppl_quantized: float = math.nan
    eval_tokens: int = 0
    checkpoint: str = ""


def write_word_tokenizer(model_dir: Path, vocab: int) -> None:
    """Word-level tokenizer, no special tokens added: "w5 w17" encodes to exactly [5, 17]."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", model_max_length=1 << 20).save_pretrained(model_dir)


def write_text(path: Path, tokens: int, vocab: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(f"w{rng.randrange(1, vocab)}" for _ in range(tokens)) + "\n")
    return path


def build_model(model_dir: Path, shape: MoeShape, layers: int, device: torch.device, seed: int = 0) -> Path:
    """A random Qwen3-MoE model of `shape` with `layers` decoder layers, saved by transformers in bf16."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(  # type: ignore[call-arg]
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=4 * shape.expert_width,
        moe_intermediate_size=shape.expert_width, num_experts=shape.experts, num_experts_per_tok=shape.routed,
        num_hidden_layers=layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=4096, tie_word_embeddings=False, norm_topk_prob=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    write_word_tokenizer(model_dir, shape.vocab)
    del model
    return model_dir


class LayerClock:
    """Seconds and peak memory per decoder layer, from the engine's progress events (a layer runs from its
    first event to the next layer's first event, or to the write step after the last)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.layers: list[LayerTiming] = []
        self._current: tuple[int, float] | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _close(self) -> None:
        if self._current is not None:
            self._sync()
            layer, started = self._current
            self.layers.append(LayerTiming(layer, time.perf_counter() - started, self._peak()))
            self._current = None

    def __call__(self, progress: Any) -> None:
        layer = progress.layer if progress.stage == "quantize" else None
        if self._current is not None and layer == self._current[0]:
            return
        if layer is None and progress.stage not in ("write", "done", "evaluate"):
            return
        self._close()
        if layer is not None:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self._current = (layer, time.perf_counter())

    def finish(self) -> None:
        self._close()


def perplexity(model_dir: Path, text: Path, seq_len: int, device: torch.device, *, quantized: bool) -> tuple[float, int]:
    """Paper protocol through transformers: consecutive windows of `seq_len` ids, every token after the first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    ids = AutoTokenizer.from_pretrained(model_dir)(text.read_text(), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quantized else {}
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=str(device), **extra)
    model = model.to(dtype).eval()  # transformers 5.17's decompression can leave parts in the checkpoint's dtype
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(window.unsqueeze(0).to(device)).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, window[1:].to(device), reduction="sum"))
            count += seq_len - 1
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return math.exp(total / max(count, 1)), count


def run(args: argparse.Namespace) -> MoeBenchResult:
    from workers.engine import run_local
    from workers.spec import CalibrationSpec, JobSpec, Method, QuantScheme

    shape = TINY if args.tiny else QWEN3_30B_A3B
    device = torch.device(args.device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"qwen3moe-{args.layers}L{'-tiny' if args.tiny else ''}"
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, shape, args.layers, device if device.type == "cuda" else torch.device("cpu"))
    calibration = write_text(work / "calibration.txt", args.samples * args.seq_len + 1, shape.vocab, seed=1)
    evaluation = write_text(work / "evaluation.txt", args.eval_windows * args.seq_len, shape.vocab, seed=2)

    spec = JobSpec(
        model_dir=str(model_dir), method=Method.GPTQ, device=str(device),
        scheme=QuantScheme(bits=4, group_size=shape.group_size, symmetric=True),
        calibration=CalibrationSpec(path=str(calibration), num_samples=args.samples, seq_len=args.seq_len),
    )
    clock = LayerClock(device)
    started = time.perf_counter()
    report = run_local(spec, args.out, on_progress=clock)
    clock.finish()
    out = Path(args.out)
    from safetensors import safe_open

    experts = 0
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            experts += sum(1 for name in f.keys() if ".experts." in name and name.endswith("weight_packed"))  # noqa: SIM118
    result = MoeBenchResult(
        shape=asdict(shape), layers=args.layers, device=str(device), calibration_tokens=args.samples * args.seq_len,
        total_seconds=time.perf_counter() - started, engine_timings_s=report.timings_s,
        engine_peak_memory_bytes=report.peak_memory_bytes, per_layer=clock.layers, quantized_experts=experts,
        checkpoint=str(out.resolve()),
    )
    if not args.no_ppl:
        result.ppl_original, result.eval_tokens = perplexity(model_dir, evaluation, args.seq_len, device, quantized=False)
        result.ppl_quantized, _ = perplexity(out, evaluation, args.seq_len, device, quantized=True)
    return result


def table(result: MoeBenchResult) -> str:
    rows = ["| layer | seconds | peak memory (GiB) |", "|---:|---:|---:|"]
    rows += [f"| {t.layer} | {t.seconds:.2f} | {t.peak_bytes / 2**30:.2f} |" for t in result.per_layer]
    rows.append(f"\nexperts quantized: {result.quantized_experts}; total {result.total_seconds:.1f} s; "
                f"ppl original {result.ppl_original:.3f}, quantized {result.ppl_quantized:.3f} "
                f"({result.eval_tokens} tokens); checkpoint {result.checkpoint}")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the quantized checkpoint's directory (must not exist or be empty)")
    parser.add_argument("--work", default="/tmp/quantfleet-moe-bench", help="where the random model and texts go")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="tiny dimensions (CPU check): hidden 64, 4 experts of 32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (default 128; tiny 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 512; tiny 32)")
    parser.add_argument("--eval-windows", type=int, default=None, help="evaluation windows (default 32; tiny 4)")
    parser.add_argument("--no-ppl", action="store_true", help="skip the transformers perplexity")
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    args.samples = args.samples or (8 if args.tiny else 128)
    args.seq_len = args.seq_len or (32 if args.tiny else 512)
    args.eval_windows = args.eval_windows or (4 if args.tiny else 32)
    return args


def main(argv: list[str] | None = None) -> MoeBenchResult:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    payload = json.dumps(asdict(result), indent=2)
    print(payload)
    if args.json:
        Path(args.json).write_text(payload + "\n")
    return result


if __name__ == "__main__":
    main()
