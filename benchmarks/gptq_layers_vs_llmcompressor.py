"""One decoder layer's GPTQ, QuantFleet's solver against llm-compressor 0.14.0.1's, on the same tensors.

The end-to-end benchmark (quality_vs_llmcompressor.py) mixes every cause; this isolates the solver. It takes
SmolLM2's weights of one decoder layer and the Hessians of their inputs (`--samples` windows of the
calibration text through the unquantized model, float64 sums), gives both solvers exactly those tensors, and
scores each result by the objective GPTQ minimises, Σ_rows (w − ŵ)·H·(w − ŵ)ᵀ, relative to llm-compressor's:

* llm-compressor: `quantize_weight` with compressed-tensors' min-max `calculate_qparams`, static act-order,
  128-column blocks, dampening 0.01 (its GPTQModifier defaults), run in its own venv (`--llmc-python`);
* QuantFleet: `gptq_quantize` with min-max ranges (float32 and fp16 scales) and with the default range search
  (`observer="mse"`: per row, the better sweep of the searched and the min-max ranges).

    .venv/bin/python benchmarks/gptq_layers_vs_llmcompressor.py --layers 0,20 --schemes w8:-1:sym,w4:64:sym

Results: benchmarks/quality.md, "GPTQ ranges".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLMC_SOLVE = """
import sys, torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
path, out, bits, group, sym = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "sym"
args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel" if group == -1 else "group",
                        group_size=None if group == -1 else group, actorder="static")
result = {}
for name, item in torch.load(path).items():
    w, h = item["W"], item["H"]
    grouped = w.reshape(w.shape[0], -1, w.shape[1] if group == -1 else group)
    scale, zero = calculate_qparams(grouped.amin(2), grouped.amax(2), args)
    q, _, _ = quantize_weight(w[None].clone(), h[None].clone(), scale[None], zero[None], None, args,
                              blocksize=128, percdamp=0.01)
    result[name] = q[0]
torch.save(result, out)
"""


def layer_problems(model_dir: Path, text: Path, layer: int, samples: int, seq_len: int) -> dict[str, dict[str, torch.Tensor]]:
    """Weights and input Hessians (2/n Σ xᵀx, float64 sums) of one decoder layer's Linears."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer(text.read_text()[:400_000], return_tensors="pt").input_ids[0]
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=torch.Generator().manual_seed(0))
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    block = model.model.layers[layer]
    linears = {name: module for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)}
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook(name: str):  # type: ignore[no-untyped-def]
        def add(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            rows = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] += 2 * rows.T @ rows
            counts[name] += rows.shape[0]
        return add

    for name, module in linears.items():
        module.register_forward_hook(hook(name))
    with torch.no_grad():
        for i in range(0, samples, 4):
            model(windows[i : i + 4])
    return {name: {"W": m.weight.detach().float().clone(), "H": (sums[name] / counts[name]).float()}
            for name, m in linears.items()}


def compare(problems: dict[str, dict[str, torch.Tensor]], llmc: dict[str, torch.Tensor], bits: int, group: int,
            symmetric: bool) -> dict[str, float]:
    from workers.output_error import row_errors
    from workers.quant.gptq import gptq_quantize
    from workers.spec import QuantScheme

    def objective(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
        return float(row_errors(w, w_hat, h).double().sum())

    scheme = QuantScheme(bits=bits, group_size=group, symmetric=symmetric)
    variants = {"min-max, fp32 scales": ("minmax", torch.float32), "min-max, fp16 scales": ("minmax", torch.float16),
                "range search (default), fp16 scales": ("mse", torch.float16)}
    totals = dict.fromkeys(["llm-compressor", *variants], 0.0)
    for name, item in problems.items():
        w, h = item["W"], item["H"]
        totals["llm-compressor"] += objective(w, llmc[name], h)
        for label, (observer, dtype) in variants.items():
            result = gptq_quantize(w, h, scheme, act_order=True, observer=observer, scale_dtype=dtype)  # type: ignore[arg-type]
            totals[label] += objective(w, result.quantized.dequantize(), h)
    return {label: total / totals["llm-compressor"] for label, total in totals.items()}


def main() -> None:
    from workers.assets import calibration_text, smollm2_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="0,20")
    parser.add_argument("--schemes", default="w8:-1:sym,w4:64:sym,w4:32:asym", help="bits:group:sym|asym, comma list")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--llmc-python", default=str(REPO / ".cache" / "llmc-venv" / "bin" / "python"),
                        help="a Python with llmcompressor==0.14.0.1 (quality_vs_llmcompressor.py creates this venv)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layer in (int(x) for x in args.layers.split(",")):
            problems = layer_problems(smollm2_dir(), calibration_text(), layer, args.samples, args.seq_len)
            saved = Path(tmp) / f"layer{layer}.pt"
            torch.save(problems, saved)
            for text in args.schemes.split(","):
                bits, group, sym = text.lstrip("w").split(":")
                out = Path(tmp) / f"llmc-{layer}-{bits}-{group}-{sym}.pt"
                subprocess.run([args.llmc_python, "-c", LLMC_SOLVE, str(saved), str(out), bits, group, sym], check=True,
                               stderr=subprocess.DEVNULL)
                ratios = compare(problems, torch.load(out), int(bits), int(group), sym == "sym")
                rows.append({"layer": layer, "scheme": text, **ratios})
                print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
