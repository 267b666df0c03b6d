"""vLLM serves what QuantFleet writes: random models of real shapes (a few layers) quantized by the engine on
the GPU, scored by two independent loaders on the same token windows, and decode throughput per format.

Three stages, each its own command because they need different packages on the GPU machine:

  quantize    (the project + compressed-tensors 0.19) builds each case's model with transformers' own config
              class and `save_pretrained` (random bf16 weights, real hidden/head/expert/vocabulary sizes,
              `--layers` decoder layers), quantizes it with `workers.engine.run_local`, and scores original and
              checkpoint with transformers + compressed-tensors (`CompressedTensorsConfig(dequantize=True)`; for
              W8A8/FP8 the inputs of the quantized Linears are quantized per token / with the checkpoint's
              static scale as the runtime does, workers/activation_quant.py) → WORK/loader.json
  vllm-ppl    (vLLM 0.26.0 in its own site, ../shared/gpu/vllm_bundle.sh) serves every checkpoint of
              loader.json in a fresh process (eager) and takes the perplexity of the same windows from
              `prompt_logprobs` → WORK/vllm.json, and prints the side-by-side table
  throughput  (vLLM) decode tokens/s at batch 1 and 64 with CUDA graphs on (vLLM's defaults, capture sizes
              1…64), for the Llama-3-8B shape at full depth: bf16, W4A16 (g128), FP8 dynamic, W8A8 int8.
              The weights are RTN-quantized there (same tensors, same kernels as GPTQ's; only speed is measured)
              → WORK/throughput.json

The tokenizer is word-level ("w0" … "wN", one word per id; benchmarks/gpu_moe.py) and the texts are random
words, so both loaders see exactly the same ids. Random weights make a near-uniform next-token distribution, so
the per-token comparison (mean |Δ log p|) is printed beside the perplexities: it is what would expose a weight
read wrongly.

    python benchmarks/gpu_serving.py quantize --work /tmp/serve --cases gemma3-w4a16,phi3-awq-w4a16,...
    PYTHONPATH=/tmp/site-vllm python benchmarks/gpu_serving.py vllm-ppl --work /tmp/serve
    PYTHONPATH=/tmp/site-vllm python benchmarks/gpu_serving.py throughput --work /tmp/serve
    python benchmarks/gpu_serving.py quantize --tiny --device cpu --work /tmp/serve-tiny   # CPU check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@dataclass(frozen=True)
class Family:
    config_class: str
    shape: dict[str, Any]  # the real model's sizes
    tiny: dict[str, Any]  # the same family at test sizes (CPU check)
    layers: int


LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, rope_theta=500000.0)
FAMILIES: dict[str, Family] = {
    # Gemma-3 4B's language model: 5 sliding-window layers to 1 global, head_dim 256, 262k vocabulary (tied)
    "gemma3": Family("Gemma3TextConfig", dict(
        vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_attention_heads=8, num_key_value_heads=4,
        head_dim=256, sliding_window=1024, query_pre_attn_scalar=256), dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=16, query_pre_attn_scalar=16), layers=6),
    # Phi-3-mini: fused qkv_proj and gate_up_proj
    "phi3": Family("Phi3Config", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32),
        dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4),
        layers=4),
    # Qwen3-8B: q/k norms
    "qwen3": Family("Qwen3Config", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128), dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16), layers=4),
    # Qwen3-30B-A3B: 128 experts of width 768, 8 routed
    "qwen3moe": Family("Qwen3MoeConfig", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True),
        dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
             num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, norm_topk_prob=True),
        layers=2),
    "llama3-8b": Family("LlamaConfig", LLAMA3_8B, dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2), layers=4),
}


@dataclass(frozen=True)
class Case:
    family: str
    method: str
    scheme: str  # "w4g128sym", "w4g128asym", a SCHEME_PRESETS name, or "mixed"
    # the loader scores the first format; vLLM serves the last (the same integers written as GPTQ v1 there)
    formats: tuple[str, ...] = ("compressed-tensors",)


CASES: dict[str, Case] = {
    "gemma3-gptq-w4a16": Case("gemma3", "gptq", "w4g128sym"),
    "phi3-awq-w4a16": Case("phi3", "awq", "w4g128sym"),
    "qwen3-gptq-w4a16-asym": Case("qwen3", "gptq", "w4g128asym"),
    "qwen3moe-gptq-w4a16": Case("qwen3moe", "gptq", "w4g128sym"),
    # GPTQ v1 with `dynamic` rules keeping the routers dense (workers/formats/gptq_v1.py), served by gptq_marlin
    "qwen3moe-gptq-v1": Case("qwen3moe", "gptq", "w4g128sym", ("compressed-tensors", "gptq")),
    "llama3-8b-gptq-w4a16": Case("llama3-8b", "gptq", "w4g128sym"),
    "llama3-8b-fp8-dynamic": Case("llama3-8b", "rtn", "fp8-dynamic"),
    "llama3-8b-fp8-static": Case("llama3-8b", "rtn", "fp8-static"),
    "llama3-8b-w8a8-sq-gptq": Case("llama3-8b", "gptq", "w8a8-int8-smoothquant"),
    "llama3-8b-mixed-gptq": Case("llama3-8b", "gptq", "mixed"),  # w4 g128; first/last layer and down_proj at w8 g128
}
THROUGHPUT = {"bf16": None, "w4a16": "w4g128sym", "fp8-dynamic": "fp8-dynamic", "w8a8-int8": "w8a8-int8"}


# ----------------------------------------------------------------------------------------------- quantize


def build_model(directory: Path, family: str, *, tiny: bool, layers: int | None, device: str) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from benchmarks.gpu_moe import write_word_tokenizer

    if (directory / "config.json").is_file():
        return directory
    spec = FAMILIES[family]
    sizes = spec.tiny if tiny else spec.shape
    config = getattr(transformers, spec.config_class)(
        **sizes, num_hidden_layers=layers or spec.layers, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    write_word_tokenizer(directory, sizes["vocab_size"])
    del model
    free_cuda()
    return directory


def free_cuda() -> None:
    """Give cached CUDA memory back, so a vLLM child process finds the GPU free."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def job_spec(case: Case, model_dir: Path, calibration: Path, samples: int, seq_len: int, device: str, tiny: bool) -> Any:
    from workers.spec import (
        SMOOTHQUANT_PRESETS,
        CalibrationSpec,
        JobSpec,
        Method,
        MixedPrecisionSpec,
        OutputFormat,
        QuantScheme,
    )

    group = 32 if tiny else 128
    extra: dict[str, Any] = {}
    if case.scheme.startswith("w4g128"):
        scheme = QuantScheme(4, group, case.scheme.endswith("sym") and not case.scheme.endswith("asym"))
    elif case.scheme == "mixed":
        scheme = QuantScheme(4, group, True)
        extra["mixed_precision"] = MixedPrecisionSpec(edge_layers=1, patterns=("down_proj",), high=QuantScheme(8, group, True))
    else:
        scheme = QuantScheme.from_preset(case.scheme)
        if case.scheme in SMOOTHQUANT_PRESETS:
            extra["smoothquant"] = SMOOTHQUANT_PRESETS[case.scheme]
    return JobSpec(model_dir=str(model_dir), method=Method(case.method), scheme=scheme, device=device,
                   formats=tuple(OutputFormat(f) for f in case.formats),
                   calibration=CalibrationSpec(path=str(calibration), num_samples=samples, seq_len=seq_len), **extra)


def token_windows(model_dir: Path, text: Path, seq_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(text.read_text(), add_special_tokens=False)["input_ids"]
    return [ids[i : i + seq_len] for i in range(0, len(ids) // seq_len * seq_len, seq_len)]


def loader_logprobs(checkpoint: Path, windows: list[list[int]], device: str) -> list[list[float]]:
    """log p of every token after the first of each window, through transformers (+ compressed-tensors)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from workers import activation_quant
    from workers.formats.reader import QuantizedCheckpoint

    quantized = "quantization_config" in json.loads((checkpoint / "config.json").read_text())
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quantized else {}
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, device_map=device, **extra)
    model = model.to(dtype).eval()
    if quantized:  # W8A8 / FP8: the runtime quantizes the quantized Linears' inputs
        reader = QuantizedCheckpoint(checkpoint)
        layers = model.model.layers
        for i, layer in enumerate(layers):
            activation_quant.attach(layer, reader.input_quantizers(f"model.layers.{i}."))
    out: list[list[float]] = []
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor(window, device=device).unsqueeze(0)
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            out.append(logp.gather(1, ids[0, 1:, None])[:, 0].tolist())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def perplexity(logprobs: list[list[float]]) -> float:
    flat = [x for window in logprobs for x in window]
    return math.exp(-sum(flat) / max(len(flat), 1))


def quantize(args: argparse.Namespace) -> None:
    import torch

    from benchmarks.gpu_moe import write_text
    from workers.engine import run_local
    from workers.outputs import output_path
    from workers.spec import OutputFormat

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "loader.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    seq_len = 32 if args.tiny else args.seq_len
    samples = 8 if args.tiny else args.samples
    for name in args.cases.split(","):
        case = CASES[name]
        vocab = (FAMILIES[case.family].tiny if args.tiny else FAMILIES[case.family].shape)["vocab_size"]
        calibration = write_text(work / f"calibration-{vocab}.txt", samples * seq_len + 1, vocab, seed=1)
        evaluation = write_text(work / f"evaluation-{vocab}.txt", args.eval_windows * seq_len, vocab, seed=2)
        model_dir = build_model(work / "models" / case.family, case.family, tiny=args.tiny, layers=None,
                                device=args.device)
        windows = token_windows(model_dir, evaluation, seq_len)
        key = f"original:{case.family}"
        if key not in results:
            results[key] = {"checkpoint": str(model_dir), "windows": windows,
                            "logprobs": loader_logprobs(model_dir, windows, args.device)}
        out = work / "checkpoints" / name
        if out.exists():
            import shutil

            shutil.rmtree(out)
        started = time.perf_counter()
        report = run_local(job_spec(case, model_dir, calibration, samples, seq_len, args.device, args.tiny), out)
        seconds = time.perf_counter() - started
        logprobs = loader_logprobs(out, windows, args.device)
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        served = output_path(out, len(case.formats) - 1, OutputFormat(case.formats[-1]))
        results[name] = {"checkpoint": str(out), "served": str(served), "family": case.family, "method": case.method,
                         "scheme": case.scheme, "formats": list(case.formats),
                         "quantize_s": round(seconds, 1), "engine_s": report.timings_s, "safetensors_bytes": size,
                         "windows": windows, "logprobs": logprobs, "original": key}
        print(f"{name}: {seconds:.1f} s, loader ppl {perplexity(logprobs):.3f} "
              f"(original {perplexity(results[key]['logprobs']):.3f})", flush=True)
        results_path.write_text(json.dumps(results))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- vLLM


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_USE_FLASHINFER_SAMPLER="0",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HOME="/tmp/hf", VLLM_CACHE_ROOT="/tmp/vllm-cache",
               TOKENIZERS_PARALLELISM="false")
    return env


def child(stage: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one vLLM engine in a fresh process (vLLM does not give all GPU memory back in-process)."""
    proc = subprocess.run([sys.executable, __file__, "_child", stage, json.dumps(payload)], env=vllm_env(),
                          capture_output=True, text=True, timeout=timeout)
    marker = "@@RESULT@@"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(marker)]
    if proc.returncode != 0 or not lines:
        return {"error": f"rc={proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
    return dict(json.loads(lines[-1][len(marker):]))


def child_main(stage: str, payload: dict[str, Any]) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    if stage == "ppl":
        windows: list[list[int]] = payload["windows"]
        llm = LLM(model=payload["checkpoint"], enforce_eager=True, gpu_memory_utilization=0.5,
                  max_model_len=len(windows[0]) + 16, dtype="bfloat16", seed=0)
        loaded = time.perf_counter() - started
        outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows],
                               SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
        logprobs = [[entry[token].logprob for entry, token in zip(o.prompt_logprobs[1:], w[1:], strict=True)]
                    for o, w in zip(outputs, windows, strict=True)]
        result: dict[str, Any] = {"logprobs": logprobs, "load_s": round(loaded, 1)}
    else:
        llm = LLM(model=payload["checkpoint"], gpu_memory_utilization=0.8, max_model_len=1024, max_num_seqs=64,
                  dtype="bfloat16", seed=0, compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]})
        loaded = time.perf_counter() - started
        prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % 30000 + 1 for j in range(128)]) for i in range(64)]
        params = SamplingParams(max_tokens=payload["new_tokens"], ignore_eos=True, temperature=0.0, detokenize=False)
        llm.generate(prompts[:8], SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False), use_tqdm=False)
        result = {"load_s": round(loaded, 1)}
        for batch in (1, 64):
            t0 = time.perf_counter()
            outs = llm.generate(prompts[:batch], params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            result[f"batch{batch}_tokens_per_s"] = round(tokens / seconds, 1)
    print("@@RESULT@@" + json.dumps(result), flush=True)


def vllm_ppl(args: argparse.Namespace) -> None:
    work = Path(args.work)
    loader = json.loads((work / "loader.json").read_text())
    path = work / "vllm.json"
    served: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    names = args.cases.split(",") if args.cases else list(loader)
    for name in names:
        if name in served and "error" not in served[name]:
            continue
        entry = loader[name]
        checkpoint = entry.get("served", entry["checkpoint"])
        served[name] = child("ppl", {"checkpoint": checkpoint, "windows": entry["windows"]}, args.child_timeout)
        print(name, "error" if "error" in served[name] else f"vLLM ppl {perplexity(served[name]['logprobs']):.3f}",
              served[name].get("error", "")[-600:], flush=True)
        path.write_text(json.dumps(served))
    print(ppl_table(loader, served))


def ppl_table(loader: dict[str, Any], served: dict[str, Any]) -> str:
    rows = ["| checkpoint | transformers ppl | vLLM ppl | Δ | mean abs Δ log p | max abs Δ log p | tokens |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in loader.items():
        if name not in served or "error" in served[name]:
            rows.append(f"| {name} | {perplexity(entry['logprobs']):.4f} | (not served) | | | | |")
            continue
        a = [x for w in entry["logprobs"] for x in w]
        b = [x for w in served[name]["logprobs"] for x in w]
        diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
        pa, pb = perplexity(entry["logprobs"]), perplexity(served[name]["logprobs"])
        rows.append(f"| {name} | {pa:.4f} | {pb:.4f} | {100 * (pb / pa - 1):+.3f} % | {sum(diffs) / len(diffs):.4f} |"
                    f" {max(diffs):.4f} | {len(a)} |")
    return "\n".join(rows)


def throughput(args: argparse.Namespace) -> None:
    from benchmarks.gpu_moe import write_text
    from workers.engine import run_local

    work = Path(args.work)
    path = work / "throughput.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    layers = 32
    model_dir = build_model(work / "models" / f"llama3-8b-{layers}L", "llama3-8b", tiny=False, layers=layers,
                            device="cuda")
    calibration = write_text(work / "calibration-128256.txt", 8 * 512 + 1, 128256, seed=1)
    for name in args.cases.split(",") if args.cases else list(THROUGHPUT):
        scheme = THROUGHPUT[name]
        checkpoint = model_dir
        if scheme is not None:
            checkpoint = work / "checkpoints" / f"llama3-8b-{layers}L-{name}"
            if not (checkpoint / "config.json").is_file():
                case = Case("llama3-8b", "rtn", scheme)
                run_local(job_spec(case, model_dir, calibration, 8, 512, "cuda", False), checkpoint)
                free_cuda()
        if name in results and "error" not in results[name]:
            continue
        results[name] = child("decode", {"checkpoint": str(checkpoint), "new_tokens": args.new_tokens},
                              args.child_timeout)
        print(name, results[name], flush=True)
        path.write_text(json.dumps(results))
    print("| weights | batch 1 tokens/s | batch 64 tokens/s | engine start s |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r.get('batch1_tokens_per_s', '-')} | {r.get('batch64_tokens_per_s', '-')} | {r.get('load_s', '-')} |")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        child_main(argv[1], json.loads(argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("quantize", "vllm-ppl", "throughput", "table"))
    p.add_argument("--work", default="/tmp/quantfleet-serving")
    p.add_argument("--cases", default="", help=f"comma list (quantize: of {', '.join(CASES)}; throughput: of"
                   f" {', '.join(THROUGHPUT)})")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="test-sized models (CPU check of the quantize stage)")
    p.add_argument("--samples", type=int, default=64, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256, help="decode: tokens generated per sequence")
    p.add_argument("--child-timeout", type=float, default=400)
    args = p.parse_args(argv)
    if args.stage == "quantize":
        args.cases = args.cases or ",".join(CASES)
        quantize(args)
    elif args.stage == "vllm-ppl":
        vllm_ppl(args)
    elif args.stage == "throughput":
        throughput(args)
    else:
        work = Path(args.work)
        served = json.loads((work / "vllm.json").read_text()) if (work / "vllm.json").is_file() else {}
        print(ppl_table(json.loads((work / "loader.json").read_text()), served))


if __name__ == "__main__":
    main()
