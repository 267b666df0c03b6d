"""Do two GPUs driven by one process run as fast as one GPU alone? Threads vs processes, per workload.

The layer loop on several devices (workers/devices.py, workers/activations.py) drives every GPU of a job from one Python process,
one thread per GPU. This times three of its workloads on GPU 0 alone, then on every GPU at once from
threads of one process, then from one process per GPU (started together behind a barrier):

* gemm: a [8192, 4096]·[4096, 14336] bf16 GEMM loop (few, long kernels);
* layer: a Llama-3-8B-shaped decoder layer forward over 16 chunks of 4×2048 tokens (the calibration
  forward: many kernels per chunk, launched from Python by transformers);
* awq: AWQ's scale search for gate/up (4096 tokens, [28672, 4096] weights; many mid-size kernels);
* capture / forward: the pipeline's own Hessian capture (`input_statistics`) and quantized-layer forward
  (`Activations.forward`) of that layer over 64 windows of 2048 tokens: one device's shard of 128.

Efficiency = alone / together (1.0: the GPUs do not slow each other down).

    python3 benchmarks/gpu_concurrency.py --results $OUT/concurrency.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

WORKLOADS = ("gemm", "layer", "awq", "capture", "forward")


LLAMA_PLAN_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",),
)


def llama_8b_layer(device: torch.device) -> tuple[torch.nn.Module, Any]:
    """A Llama-3-8B-shaped decoder layer (random bf16 weights, sdpa) on `device`, and the call arguments
    (`workers.loading.LayerCall`: positions and rotary embeddings) of one 2048-token window."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from workers.loading import LayerCall

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=2048)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).to(device, torch.bfloat16).eval()
    rope = LlamaRotaryEmbedding(config).to(device)
    probe = torch.zeros(1, 2048, 4096, device=device, dtype=torch.bfloat16)
    positions = torch.arange(2048, device=device).unsqueeze(0)
    kwargs = {"attention_mask": None, "position_ids": positions, "position_embeddings": rope(probe, positions)}
    return layer, LayerCall((), kwargs)


def make_workload(name: str, device: torch.device) -> Callable[[], None]:
    """A closure that runs the workload once on `device` and waits for it."""
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    if name == "gemm":
        a = torch.randn(8192, 4096, device=device, dtype=bf16)
        b = torch.randn(4096, 14336, device=device, dtype=bf16)

        def run() -> None:
            for _ in range(20):
                a @ b
            torch.cuda.synchronize(device)

        return run
    if name == "layer":
        from workers.loading import run_decoder_layer

        layer, pos = llama_8b_layer(device)
        hidden = torch.randn(4, 2048, 4096, device=device, dtype=bf16)

        def run() -> None:
            with torch.no_grad():
                for _ in range(16):
                    run_decoder_layer(layer, hidden, pos)
            torch.cuda.synchronize(device)

        return run
    if name == "awq":
        from workers.quant.awq import search_scales
        from workers.spec import QuantScheme

        x = torch.randn(4096, 4096, device=device)
        sigma, mean_abs = x.T @ x / x.shape[0], x.abs().mean(dim=0)
        weights = [torch.randn(14336, 4096, device=device, dtype=bf16) * 0.02 for _ in range(2)]
        scheme = QuantScheme(bits=4, group_size=128, symmetric=True)

        def run() -> None:
            search_scales(sigma, mean_abs, weights, scheme, grid=20)
            torch.cuda.synchronize(device)

        return run
    if name in ("capture", "forward"):
        from workers.activations import ShardedActivations
        from workers.model_graph import LayerPlan
        from workers.options import PipelineOptions
        from workers.statistics import collect_statistics

        layer, pos = llama_8b_layer(device)
        acts = ShardedActivations(torch.randn(64, 2048, 4096, device=device, dtype=bf16), [pos], [device], PipelineOptions())
        plan = LayerPlan(LLAMA_PLAN_GROUPS)

        def run() -> None:
            with torch.no_grad():
                if name == "capture":
                    collect_statistics([layer], acts, plan)
                else:
                    acts.forward([layer], update=False)
            torch.cuda.synchronize(device)

        return run
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


def time_alone(name: str) -> float:
    run = make_workload(name, torch.device("cuda", 0))
    run()  # warm-up
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def time_threads(name: str, count: int) -> float:
    runs = [make_workload(name, torch.device("cuda", d)) for d in range(count)]

    def warm_then_run(d: int, barrier: threading.Barrier, out: list[float]) -> None:
        with torch.cuda.device(d):
            runs[d]()
            barrier.wait()
            t0 = time.perf_counter()
            runs[d]()
            out[d] = time.perf_counter() - t0

    barrier, out = threading.Barrier(count), [0.0] * count
    threads = [threading.Thread(target=warm_then_run, args=(d, barrier, out)) for d in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(out)


def time_on_each(name: str, count: int) -> float:
    """A fresh thread pool per call (`workers.devices._on_each`), against the pipeline's long-lived threads."""
    from workers.devices import _on_each

    devices = [torch.device("cuda", d) for d in range(count)]
    runs = [make_workload(name, device) for device in devices]
    _on_each(devices, lambda i: runs[i]())  # warm-up, on other threads than the timed call's
    t0 = time.perf_counter()
    _on_each(devices, lambda i: runs[i]())
    return time.perf_counter() - t0


def time_sharded(count: int) -> dict[str, float]:
    """The pipeline's own multi-device steps on one 8B-shaped layer and 128 windows: `collect_statistics` and
    `ShardedActivations.forward` (replicated layer, activations sharded over `count` GPUs)."""
    from workers.activations import ShardedActivations
    from workers.devices import replicate
    from workers.model_graph import LayerPlan
    from workers.options import PipelineOptions
    from workers.statistics import collect_statistics

    devices = [torch.device("cuda", d) for d in range(count)]
    layer, pos = llama_8b_layer(devices[0])
    hidden = torch.randn(128, 2048, 4096, device=devices[0], dtype=torch.bfloat16)
    acts = ShardedActivations(hidden, [pos], devices, PipelineOptions())
    acts.at_layer(0)
    del hidden
    plan = LayerPlan(LLAMA_PLAN_GROUPS)
    out: dict[str, float] = {}
    with torch.no_grad():
        replicas = replicate(layer, devices)
        for step, fn in (("partial_hessians", lambda: collect_statistics(replicas, acts, plan)),
                         ("sharded_forward", lambda: acts.forward(replicas, update=False))):
            for _attempt in range(2):  # the first is a warm-up
                for d in devices:
                    torch.cuda.synchronize(d)
                t0 = time.perf_counter()
                fn()
                for d in devices:
                    torch.cuda.synchronize(d)
                out[step] = time.perf_counter() - t0
    return out


def _process_main(name: str, d: int, barrier: Any, queue: Any) -> None:
    torch.cuda.set_device(d)
    run = make_workload(name, torch.device("cuda", d))
    run()
    barrier.wait()
    t0 = time.perf_counter()
    run()
    queue.put(time.perf_counter() - t0)


def time_processes(name: str, count: int) -> float:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=_process_main, args=(name, d, barrier, queue)) for d in range(count)]
    for p in procs:
        p.start()
    times = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    return max(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)
    count = torch.cuda.device_count()
    if count < 2:
        print(f"needs 2 or more CUDA GPUs, found {count}", flush=True)
        return 2
    rows = []
    for name in args.workloads.split(","):
        alone = time_alone(name)
        threads = time_threads(name, count)
        processes = time_processes(name, count)
        on_each = time_on_each(name, count)
        rows.append({"workload": name, "alone_s": alone, "threads_s": threads, "processes_s": processes,
                     "on_each_s": on_each, "on_each_efficiency": alone / on_each,
                     "threads_efficiency": alone / threads, "processes_efficiency": alone / processes})
        print(json.dumps(rows[-1]), flush=True)
    if "capture" in args.workloads:
        sharded = time_sharded(count)
        print(f"pipeline steps, 128 windows over {count} GPUs: {json.dumps(sharded)}", flush=True)
        rows.append({"workload": "sharded", **sharded})
    head = f"{'workload':8} {'alone s':>8} {f'{count} threads s':>12} {'eff':>5} {f'{count} procs s':>11} {'eff':>5} {'_on_each s':>10} {'eff':>5}"
    lines = [head, "-" * len(head)] + [
        f"{r['workload']:8} {r['alone_s']:8.3f} {r['threads_s']:12.3f} {r['threads_efficiency']:5.2f} "
        f"{r['processes_s']:11.3f} {r['processes_efficiency']:5.2f} {r['on_each_s']:10.3f} {r['on_each_efficiency']:5.2f}"
        for r in rows if "alone_s" in r
    ]
    print("\n".join(lines), flush=True)
    if args.results:
        Path(args.results).write_text(json.dumps({"gpus": count, "rows": rows, "table": "\n".join(lines)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
