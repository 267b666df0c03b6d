"""GGUF quality on SmolLM2-135M: our RTN and GPTQ on GGUF's own grids beside llama.cpp's own quantizer.

For every GGUF type asked (default Q4_0, Q4_K_M, Q8_0):
* ours, RTN: `workers.gguf_export.export_gguf(method="rtn")`, llama.cpp's own scale rules, no importance;
* ours, GPTQ: the same file layout, codes from the GPTQ sweep on the fixed GGUF grid (static groups,
  act-order, sub-block fields weighted by the Hessian diagonal), calibration windows seeded from the
  calibration plays;
* llama.cpp: `llama_cpp.llama_model_quantize` (llama-cpp-python, i.e. llama.cpp's `llama-quantize`, no
  imatrix) of an F16 GGUF we write from the same fp16 weights, read back with transformers' GGUF loader.

All variants are scored by one evaluation (workers/evaluate.py compare_on_windows: the first
`--eval-windows` 512-token windows of the held-out plays; Δppl, KL mean/p99, top-1 vs the fp16 model).
With llama-cpp-python installed, llama.cpp itself also loads each of our files and computes the perplexity
of the same windows from its own logits (`llama.cpp ppl`), which must match ours within 1 %; and the tensor
types of llama.cpp's files are compared with our recipe's.

    .venv/bin/pip install .cache/wheels/llama_cpp_python-*.whl   # built once from the PyPI sdist (README)
    .venv/bin/python benchmarks/gguf_quality.py --num-samples 32 --eval-windows 16

Results: one JSON line per variant in `--results`, and a Markdown table on stdout (`--table-only` reprints it).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.calibration import calibration_windows, eval_windows, read_text  # noqa: E402
from workers.evaluate import compare_on_windows  # noqa: E402
from workers.gguf_export import DenseWeights, export_gguf  # noqa: E402
from workers.loading import load_tokenizer  # noqa: E402
from workers.spec import CalibrationSpec  # noqa: E402


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def llama_cpp_quantize(source: Path, target: Path, file_type: str, threads: int) -> float:
    """llama.cpp's own quantizer (no imatrix) of `source` (an F16 GGUF); returns seconds."""
    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, f"MOSTLY_{file_type}"))
    params.nthread = threads
    started = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {file_type} failed ({rc})")
    return time.perf_counter() - started


def read_back(path: Path) -> dict[str, torch.Tensor]:
    """A GGUF file dequantized by transformers' GGUF loader (float32, Hugging Face names)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    del model
    return state


def llama_cpp_logits(path: Path, windows: torch.Tensor, threads: int) -> Iterator[torch.Tensor]:
    """llama.cpp's own logits `[seq, vocab]` (float32) of each window, one window at a time."""
    import llama_cpp

    seq = windows.shape[1]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=seq, n_batch=seq, n_ubatch=seq, logits_all=True,
                          n_threads=threads, verbose=False)
    try:
        for row in windows.tolist():
            llm.reset()
            llm.eval(row)
            yield torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32))
    finally:
        llm.close()


def llama_cpp_perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    """exp(mean NLL) of every token after the first of each window, from llama.cpp's own logits."""
    total, count = 0.0, 0
    for row, logits in zip(windows, llama_cpp_logits(path, windows, threads), strict=True):
        logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)
        total -= float(logprobs.gather(1, row[1:].unsqueeze(1)).sum())
        count += len(row) - 1
    return math.exp(total / count)


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def identical_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors whose bytes are identical, tensors) of two GGUF files with the same names."""
    import gguf

    theirs = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    same = total = 0
    for t in gguf.GGUFReader(str(a)).tensors:
        total += 1
        other = theirs.get(t.name)
        same += int(other is not None and other.tensor_type == t.tensor_type and np.array_equal(t.data, other.data))
    return same, total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", type=Path, default=Path(".cache/assets"))
    p.add_argument("--types", default="Q4_0,Q4_K_M,Q8_0")
    p.add_argument("--methods", default="rtn,gptq")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the exports and the evaluation run (cuda: GPTQ on the GPU)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even where it is installed")
    p.add_argument("--work", type=Path, default=Path("/tmp/qf-gguf-quality"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/gguf-quality.jsonl"))
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)
    if args.table_only:
        print(table([json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]))
        return 0

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = args.assets / "smollm2-135m"
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    windows = eval_windows(read_text(args.assets / "shakespeare-eval.txt"), tokenizer, args.seq_len, args.eval_windows)
    calibration = calibration_windows(
        CalibrationSpec(str(args.assets / "shakespeare-calibration.txt"), args.num_samples, args.seq_len, args.seed),
        tokenizer,
    )
    use_llama = llama_cpp_available() and not args.no_llama_cpp
    f16 = args.work / "model-F16.gguf"
    if use_llama and not f16.exists():
        export_gguf(model, f16, "F16", keep_dequantized=False)
    protocol = {"calibration": f"{args.num_samples}x{args.seq_len} seed {args.seed}",
                "eval": f"{windows.shape[0]}x{args.seq_len}", "threads": args.threads,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    rows: list[dict[str, Any]] = []
    for file_type in args.types.split(","):
        variants: list[tuple[dict[str, Any], DenseWeights, Path]] = []
        for method in args.methods.split(","):
            path = args.work / f"ours-{method}-{file_type}.gguf"
            result = export_gguf(model, path, file_type, method=method,  # type: ignore[arg-type]
                                 calibration=calibration if method != "rtn" else None, device=device)
            row = {"type": file_type, "source": f"QuantFleet {method}", "bits_per_weight": result.bits_per_weight,
                   "file_bytes": result.file_bytes, "seconds": round(result.seconds, 1), **protocol}
            print(f"{file_type} {method}: {result.seconds:.1f} s, {result.bits_per_weight:.3f} bpw", flush=True)
            variants.append((row, result.weights(), path))
        if use_llama:
            path = args.work / f"llamacpp-{file_type}.gguf"
            seconds = llama_cpp_quantize(f16, path, file_type, args.threads)
            ours = tensor_types(args.work / f"ours-{args.methods.split(',')[0]}-{file_type}.gguf")
            theirs = tensor_types(path)
            same, total = identical_tensors(args.work / f"ours-rtn-{file_type}.gguf", path) if "rtn" in args.methods else (0, 0)
            row = {"type": file_type, "source": "llama.cpp llama-quantize (no imatrix)",
                   "file_bytes": path.stat().st_size, "seconds": round(seconds, 1),
                   "recipe_matches_ours": ours == theirs, "tensors_identical_to_our_rtn": f"{same}/{total}", **protocol}
            state = read_back(path)
            row["bits_per_weight"] = _bits_per_weight(path)
            variants.append((row, DenseWeights(state), path))
        metrics = compare_on_windows(model, [v[1] for v in variants], windows, device)
        for (row, _weights, path), m in zip(variants, metrics, strict=True):
            row.update(ppl_original=m.ppl_original, ppl=m.ppl_quantized, delta_ppl_pct=m.delta_ppl_pct,
                       kl_mean=m.kl_mean, kl_p99=m.kl_p99, top1=m.top1_agreement)
            if use_llama and row["source"].startswith("QuantFleet"):
                row["llama_cpp_ppl"] = llama_cpp_perplexity(path, windows, args.threads)
                row["llama_cpp_ppl_diff_pct"] = 100 * (row["llama_cpp_ppl"] / m.ppl_quantized - 1)
            rows.append(row)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        del variants, metrics
        gc.collect()
    print(table(rows))
    return 0


def _bits_per_weight(path: Path) -> float:
    import gguf

    tensors = [t for t in gguf.GGUFReader(str(path)).tensors if t.tensor_type != gguf.GGMLQuantizationType.F32]
    return 8.0 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| GGUF type | source | bits/weight | Δppl % | KL mean | KL p99 | top-1 | llama.cpp ppl vs ours | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        check = f"{r['llama_cpp_ppl_diff_pct']:+.2f} %" if "llama_cpp_ppl_diff_pct" in r else "—"
        lines.append(
            f"| {r['type']} | {r['source']} | {r['bits_per_weight']:.3f} | {r['delta_ppl_pct']:+.2f} | {r['kl_mean']:.4f}"
            f" | {r['kl_p99']:.3f} | {r['top1']:.3f} | {check} | {r['seconds']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
