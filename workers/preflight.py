"""The preflight: what a job will do, computed in seconds from config.json and the safetensors headers.

`plan_job(spec)` runs the model checks of `workers.validation.check_against_model` (the model skeleton is
built on the `meta` device; no tensor data is read, so bad combinations are refused here with an
InvalidSpecError / InputError that says what to change) and returns a `JobPlan`: the architecture, the
decoder layers, every Linear that will be quantized (grouped by its name inside a layer), every tensor that
stays dense (embeddings, lm_head, norms, biases, routers…), an estimate of peak memory and the size of each
requested output format. The service stores the plan on the job at submit time (`GET /v1/jobs/{id}`
shows it); `quantfleet quantize` prints it before it starts.

Estimates (see `MemoryEstimate`): one decoder layer in the compute dtype (float32 on CPU, the model's dtype
on a GPU), the layer's input statistics — GPTQ's Hessians and AWQ's E[xxᵀ], 4·in² bytes each, counted once
per Linear (an upper bound: Linears that read one input share one; which do is found at run time) — and the
calibration activations entering and leaving the layer (num_samples·seq_len·hidden in the compute dtype,
twice; split across the job's GPUs). Output sizes count the packed integers, scales, zero points and index
tensors each format writes per Linear, the dense tensors in the model's dtype, and the safetensors headers.

This module imports nothing heavy at import time: `summary_lines` formats a stored plan (a dict) for CLIs
that talk to the service.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.spec import JobSpec
    from workers.validation import ModelInfo

# bytes per element of the safetensors dtypes
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_HEADER_BYTES_PER_TENSOR = 64  # a safetensors header entry besides its name: dtype, shape, offsets


@dataclass(frozen=True)
class QuantizedModules:
    """The Linears of one name inside a decoder layer, e.g. `self_attn.q_proj` in each of 32 layers."""

    pattern: str  # checkpoint name with the layer index as "*", e.g. "model.layers.*.self_attn.q_proj"
    count: int  # how many (one per decoder layer)
    out_features: int
    in_features: int


@dataclass(frozen=True)
class DenseModules:
    """Tensors written as they are (in the model's dtype), by module: outside the decoder layers one entry per
    module, inside them one per name with the layer index as "*"."""

    pattern: str  # e.g. "model.embed_tokens", "model.layers.*.input_layernorm", "model.layers.*.self_attn.q_proj"
    kind: str  # embeddings, lm_head, norm, router, bias (of a quantized Linear) or other
    count: int
    tensors: tuple[str, ...]  # e.g. ("weight",), ("bias",)
    bytes: int  # written, all of them together
    note: str = ""  # e.g. "tied to model.embed_tokens (not stored)"


@dataclass(frozen=True)
class ExpertModules:
    """The routed experts of one MoE block, in every decoder layer that has it (workers/moe.py)."""

    pattern: str  # checkpoint name with the layer index as "*", e.g. "model.layers.*.block_sparse_moe.experts"
    layers: int  # decoder layers with this block
    experts: int  # per layer; every one is quantized
    linears: tuple[str, ...]  # each expert's Linears, e.g. ("w1", "w3", "w2")
    hidden: int
    intermediate: int
    fused_in_model: bool  # transformers holds them as 3-D parameters (the engine splits them into Linears)
    fused_in_checkpoint: bool  # the checkpoint stores them fused (gpt-oss); written back per expert
    dense: tuple[str, ...]  # the block's routers and gates, kept dense, e.g. ("block_sparse_moe.gate",)
    statistics_bytes: int  # statistics of one layer's experts held at once (within the budget)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of the layer loop, in bytes: `cpu` for a job on CPU (host memory, float32 compute), `gpu`
    per GPU for a job on GPUs (the model's dtype). The parts are given for each."""

    cpu: int
    gpu: int
    layer_cpu: int  # one decoder layer's weights in float32
    layer_gpu: int  # … in the model's dtype
    statistics: int  # input statistics (Hessians / E[xxᵀ], float32) of one layer's Linears (MoE: one solve pass)
    activations_cpu: int  # calibration hidden states in and out of a layer, float32
    activations_gpu: int  # … in the model's dtype, per GPU


@dataclass(frozen=True)
class JobPlan:
    """What a job will do, from the model's config and safetensors headers only (JSON-serialisable: `to_dict`)."""

    architecture: str  # the transformers class, e.g. "LlamaForCausalLM"
    model_type: str  # config.model_type, e.g. "llama"
    dtype: str  # the checkpoint's dtype, e.g. "float16"
    num_layers: int
    layers: str  # the decoder layers' checkpoint prefix, e.g. "model.layers.*"
    method: str
    bits: int
    group_size: int
    symmetric: bool
    quantized: tuple[QuantizedModules, ...]
    quantized_count: int  # every Linear of every decoder layer
    dense: tuple[DenseModules, ...]
    tied_embeddings: bool
    awq_mappings: tuple[str, ...]  # "input_layernorm → self_attn.q_proj", … (methods that smooth)
    weight_bytes: int  # the checkpoint's safetensors files
    memory: MemoryEstimate
    output_bytes: dict[str, int] = field(default_factory=dict)  # per requested format
    experts: tuple[ExpertModules, ...] = ()  # Mixture-of-Experts blocks
    towers: tuple[str, ...] = ()  # multimodal: modules beside the language model, kept dense (checkpoint names)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples as lists), as the service stores it."""
        return json.loads(json.dumps(asdict(self)))  # type: ignore[no-any-return]


def plan_job(spec: JobSpec, info: ModelInfo | None = None) -> JobPlan:
    """The plan of `spec` (checked against its model first; pass `info` if that was done already)."""
    from workers import validation  # looked up at call time: tests count the model checks
    from workers.tensor_source import TensorSource

    spec.validate()
    info = info or validation.check_against_model(spec)
    headers = TensorSource(info.model_dir, allow_pickle=spec.allow_pickle).headers()
    return build_plan(spec, info, headers)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _nbytes(shape: tuple[int, ...], dtype_bytes: int) -> int:
    return math.prod(shape) * dtype_bytes


def _kind(module: str, info: ModelInfo, tensors: set[str], quantized: bool) -> str:
    if module in _towers(info):
        return "tower"
    if f"{module}." == info.embed_prefix:
        return "embeddings"
    if f"{module}." == info.lm_head_prefix:
        return "lm_head"
    if quantized:
        return "bias"
    if any(module.endswith(f".{router}") for block in info.architecture.experts for router in block.dense):
        return "router"
    leaf = module.rsplit(".", 1)[-1].lower()
    if "norm" in leaf or re.fullmatch(r"ln(_\w+)?|\w*_ln", leaf):
        return "norm"
    if "router" in leaf or ("gate" in leaf and tensors == {"weight"} and "proj" not in leaf):
        return "router"
    return "other"


def _towers(info: ModelInfo) -> tuple[str, ...]:
    """Checkpoint names of a multimodal model's towers and projectors (e.g. "vision_tower")."""
    return info.architecture.graph.stored_towers


def _expert_pattern(stored_layers: str, local: str) -> str:
    """"model.layers.*.mlp.experts.*.w1" for any expert's Linear (the expert index as "*" too)."""
    collapsed = re.sub(r"(^|[.])experts[.][0-9]+[.]", r"\1experts.*.", local)
    return f"{stored_layers}*.{collapsed}"


def _moe_statistics(info: ModelInfo, layer: int, linears: dict[str, tuple[int, int]], smooths: int = 0) -> int:
    """The largest solve pass's statistics of an MoE layer, passes packed as workers/moe.py plan_passes packs
    them: every non-expert Linear's (an upper bound, one per Linear) and the experts' shared gate/up input in one
    pass, the expert down_proj Hessians in as many as the budget holds (at least one expert each). Methods that
    smooth also hold each expert's routed statistics (twice the bytes per expert, in expert passes of their own)
    and the MoE block's input and output over the `smooths` calibration tokens (float32;
    workers/methods/awq_moe.py) in the pass with the other groups."""
    from workers.moe import STATISTICS_BUDGET_BYTES, pack_passes

    blocks = [b for b in info.architecture.experts if b.layer == layer]
    inside = tuple(f"{b.path}." for b in blocks)
    dense = sum(4 * in_f * in_f for name, (_, in_f) in linears.items() if not name.startswith(inside))
    shared = sum(4 * b.hidden * b.hidden for b in blocks)
    per_expert = 2 if smooths else 1
    own = [per_expert * 4 * b.intermediate * b.intermediate for b in blocks for _ in range(b.num_experts)]
    block_io = sum(2 * 4 * smooths * b.hidden for b in blocks)
    if dense + shared + sum(own) <= STATISTICS_BUDGET_BYTES:
        return dense + shared + sum(own) + block_io
    passes = pack_passes(0 if smooths else dense + shared, own, STATISTICS_BUDGET_BYTES)
    largest = max(sum(own[i] for i in p) for p in passes)
    if smooths:  # the expert passes first, then the other groups with the MoE blocks' input and output
        return max(largest, dense + shared + block_io)
    return max(largest, dense + shared + sum(own[i] for i in passes[0]))


def _expert_modules(info: ModelInfo, headers: Mapping[str, tuple[str, tuple[int, ...]]],
                    smooths: int = 0) -> tuple[ExpertModules, ...]:
    arch = info.architecture
    stored_layers = arch.layer_prefix(0)[: -len("0.")]
    by_path: dict[str, list[Any]] = {}
    for block in arch.experts:
        by_path.setdefault(block.path, []).append(block)
    found = []
    for path, blocks in by_path.items():
        b = blocks[0]
        fused = any(f"{arch.layer_prefix(x.layer)}{path}.down_proj" in headers for x in blocks)
        per_layer = [_moe_statistics(info, x.layer, _layer_linears(info, x.layer), smooths) for x in blocks]
        found.append(ExpertModules(
            pattern=f"{stored_layers}*.{path}", layers=len(blocks), experts=b.num_experts, linears=b.linears,
            hidden=b.hidden, intermediate=b.intermediate, fused_in_model=b.fused, fused_in_checkpoint=fused,
            dense=b.dense, statistics_bytes=max(per_layer),
        ))
    return tuple(found)


def _layer_linears(info: ModelInfo, layer: int) -> dict[str, tuple[int, int]]:
    prefix = f"layers.{layer}."
    return {name[len(prefix):]: shape for name, shape in info.linear_shapes.items() if name.startswith(prefix)}


def build_plan(spec: JobSpec, info: ModelInfo, headers: Mapping[str, tuple[str, tuple[int, ...]]]) -> JobPlan:
    """The plan from the checked model (`info`) and the checkpoint's tensor headers (name → (dtype, shape))."""
    from workers.spec import Method, OutputFormat

    graph = info.architecture.graph
    model_bytes = info.dtype.itemsize
    layer_re = re.compile(rf"^{re.escape(graph.layers)}\.(\d+)\.(.+)$")
    stored_layers = info.architecture.layer_prefix(0)[: -len("0.")]  # "model.layers."
    stored_re = re.compile(rf"^{re.escape(stored_layers)}(\d+)\.(.+)$")

    # quantized Linears: "layers.3.mlp.down_proj" → its checkpoint weight name
    quantized_names: set[str] = set()
    patterns: dict[str, QuantizedModules] = {}
    for module, (out_f, in_f) in info.linear_shapes.items():
        _, index, local = module.split(".", 2)
        quantized_names.add(f"{info.architecture.layer_prefix(int(index))}{local}.weight")
        pattern = _expert_pattern(stored_layers, local)
        prev = patterns.get(pattern)
        patterns[pattern] = QuantizedModules(pattern, (prev.count if prev else 0) + 1, out_f, in_f)
    quantized_modules = {name.removesuffix(".weight") for name in quantized_names}

    # dense tensors, grouped by module (layer index as "*")
    dense_bytes = 0
    dense_header = 0
    grouped: dict[str, dict[str, Any]] = {}
    fused = {f"{info.architecture.layer_prefix(b.layer)}{b.path}.{kind}" for b in info.architecture.experts
             for kind in ("gate_up_proj", "up_proj", "down_proj")}
    towers = _towers(info)
    expert_blocks = {f"{info.architecture.layer_prefix(b.layer)}{b.path}" for b in info.architecture.experts}
    for name, (dtype, shape) in headers.items():
        if name in quantized_names or name in fused:
            continue
        size = _nbytes(shape, model_bytes if dtype in _FLOAT_DTYPES else _DTYPE_BYTES.get(dtype, 4))
        dense_bytes += size
        dense_header += _HEADER_BYTES_PER_TENSOR + len(name)
        module, _, tensor = name.rpartition(".")
        match = stored_re.match(module) or layer_re.match(module)
        pattern = f"{stored_layers}*.{match.group(2)}" if match else module
        tower = next((t for t in towers if module == t or module.startswith(f"{t}.")), None)
        pattern = tower or re.sub(r"[.]experts[.][0-9]+[.]", ".experts.*.", pattern)
        module = tower or module
        entry = grouped.setdefault(pattern, {"modules": set(), "tensors": set(), "bytes": 0, "quantized": False})
        entry["modules"].add(module)
        entry["tensors"].add(tensor)
        entry["bytes"] += size
        entry["quantized"] |= module in quantized_modules or module in expert_blocks  # fused experts' biases
    dense: list[DenseModules] = []
    for pattern, entry in grouped.items():
        any_module = next(iter(entry["modules"]))
        kind = _kind(any_module, info, entry["tensors"], entry["quantized"])
        dense.append(DenseModules(pattern, kind, len(entry["modules"]), tuple(sorted(entry["tensors"])), entry["bytes"]))
    if info.tied_embeddings:
        head = info.lm_head_prefix.rstrip(".")
        dense.append(DenseModules(head, "lm_head", 1, ("weight",), 0,
                                  note=f"tied to {info.embed_prefix.rstrip('.')} (not stored again)"))
    order = {"embeddings": 0, "norm": 2, "router": 3, "bias": 4, "other": 5, "lm_head": 6, "tower": 7}
    dense.sort(key=lambda d: (order.get(d.kind, 5), d.pattern))

    # memory
    hidden = int(info.config.get("hidden_size") or _hidden_from(info))
    layer_numel = max(sum(math.prod(shape) for name, (_, shape) in headers.items()
                          if name.startswith(info.architecture.layer_prefix(i))) for i in range(info.num_layers))
    calibrated = spec.calibration.path is not None
    moe_layers = {b.layer for b in info.architecture.experts}
    statistics = 0  # of the layer that holds the most
    tokens = spec.calibration.num_samples * spec.calibration.seq_len if calibrated else 0
    for i in range(info.num_layers):
        linears = _layer_linears(info, i)
        if spec.method in (Method.GPTQ, Method.AWQ, Method.AWQ_GPTQ, Method.AUTO):
            smooths = max(tokens, 1) if spec.method.smooths else 0
            full = (_moe_statistics(info, i, linears, smooths) if i in moe_layers
                    else sum(4 * f * f for _, f in linears.values()))
            statistics = max(statistics, full)
        elif calibrated:  # RTN with calibration: the E[x²] of the range search and the error report
            statistics = max(statistics, sum(4 * f for _, f in linears.values()))
    act_cpu = 2 * tokens * hidden * 4
    act_gpu = math.ceil(2 * tokens * hidden * model_bytes / max(1, spec.devices))
    layer_cpu, layer_gpu = layer_numel * 4, layer_numel * model_bytes
    memory = MemoryEstimate(
        cpu=layer_cpu + statistics + act_cpu, gpu=layer_gpu + statistics + act_gpu, layer_cpu=layer_cpu,
        layer_gpu=layer_gpu, statistics=statistics, activations_cpu=act_cpu, activations_gpu=act_gpu,
    )

    # output sizes
    output: dict[str, int] = {}
    for fmt in spec.formats:
        if fmt.is_gguf:  # GGUF's own block types, by the file type's recipe
            from workers.formats.gguf import estimate_bytes, parse_format

            output[fmt.value] = estimate_bytes(info.config, parse_format(fmt.value), headers)
            continue
        total = dense_bytes + dense_header
        for module, (out_f, in_f) in info.linear_shapes.items():
            total += _quantized_bytes(fmt.value, out_f, in_f, spec, model_bytes)
            entries = 4 if fmt is OutputFormat.GPTQ or not spec.scheme.symmetric else 3
            if spec.scheme.is_float:
                entries = 3 if spec.scheme.activations == "static" else 2
            total += entries * (_HEADER_BYTES_PER_TENSOR + len(graph.layers) + len(module) + 12)
        output[fmt.value] = total

    pairs = (f"{m.prev} → {m.anchor}" for m in info.architecture.awq_mappings) if spec.method.smooths else ()
    mappings = tuple(dict.fromkeys(re.sub(r"experts[.][0-9]+[.]", "experts.*.", p) for p in pairs))  # one per expert
    return JobPlan(
        architecture=info.architecture.name,
        model_type=graph.model_type,
        dtype=_dtype_name(info.dtype),
        num_layers=info.num_layers,
        layers=f"{stored_layers}*",
        method=spec.method.value,
        bits=spec.scheme.bits,
        group_size=spec.scheme.group_size,
        symmetric=spec.scheme.symmetric,
        quantized=tuple(patterns.values()),
        quantized_count=len(info.linear_shapes),
        dense=tuple(dense),
        tied_embeddings=info.tied_embeddings,
        awq_mappings=mappings,
        weight_bytes=info.weight_bytes,
        memory=memory,
        output_bytes=output,
        experts=_expert_modules(info, headers, max(tokens, 1) if spec.method.smooths else 0),
        towers=towers,
    )


def _hidden_from(info: ModelInfo) -> int:
    """The hidden size when config.json names it otherwise: the input size of a layer's first Linear."""
    return next(iter(info.architecture.linear_shapes.values()))[1]


def _quantized_bytes(fmt: str, out_f: int, in_f: int, spec: JobSpec, model_bytes: int) -> int:
    """Bytes one Linear takes in `fmt` (see workers/formats/compressed_tensors.py and gptq_v1.py)."""
    bits, group = spec.scheme.bits, spec.scheme.group_size
    if spec.scheme.is_float:  # float8 weight + scales (+ input_scale): workers/formats/float_quantized.py
        scales = {"channel": out_f, "tensor": 1}.get(str(spec.scheme.strategy), math.ceil(out_f / 128) * math.ceil(in_f / 128))
        return out_f * in_f + scales * model_bytes + (model_bytes if spec.scheme.activations == "static" else 0)
    groups = 1 if group == -1 else math.ceil(in_f / group)
    if fmt == "gptq":
        qweight = math.ceil(in_f * bits / 32) * out_f * 4
        qzeros = groups * math.ceil(out_f * bits / 32) * 4
        return qweight + qzeros + groups * out_f * 2 + in_f * 4  # + fp16 scales + g_idx
    packed = out_f * math.ceil(in_f * bits / 32) * 4
    zero = 0 if spec.scheme.symmetric else math.ceil(out_f * bits / 32) * 4 * groups
    return packed + out_f * groups * model_bytes + 16 + zero  # + scales + weight_shape


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summary_lines(plan: Mapping[str, Any]) -> list[str]:
    """A short human summary of a plan (`JobPlan.to_dict()`, as the service stores and returns it)."""
    scheme = f"w{plan['bits']} g{plan['group_size']} {'sym' if plan['symmetric'] else 'asym'}"
    lines = [
        f"plan: {plan['architecture']} ({plan['model_type']}, {plan['dtype']}), {plan['num_layers']} decoder layers"
        f" at {plan['layers']}; {plan['method']} {scheme}",
        f"  quantized: {plan['quantized_count']} Linears — "
        + ", ".join(f"{q['pattern'].split('*.', 1)[-1]} ×{q['count']} [{q['out_features']}×{q['in_features']}]"
                    for q in plan["quantized"]),
    ]
    kinds: dict[str, list[str]] = {}
    for d in plan["dense"]:
        label = d["pattern"] + (f" ×{d['count']}" if "*" in d["pattern"] else "")
        kinds.setdefault(d["kind"], []).append(label + (" (tied)" if d.get("note") else ""))
    lines.append("  dense: " + "; ".join(f"{kind}: {', '.join(names)}" for kind, names in kinds.items()))
    for e in plan.get("experts", []):
        lines.append(
            f"  experts: {e['pattern']} ×{e['layers']} layers, {e['experts']} experts each, all quantized "
            f"({', '.join(e['linears'])}; {'fused in the model' if e['fused_in_model'] else 'separate Linears'}"
            f"{', fused in the checkpoint' if e['fused_in_checkpoint'] else ''}); dense: {', '.join(e['dense']) or 'none'}; "
            f"statistics {_size(e['statistics_bytes'])} per layer"
        )
    if plan.get("towers"):
        lines.append("  dense towers: " + ", ".join(plan["towers"]))
    if plan.get("awq_mappings"):
        lines.append("  AWQ smoothing: " + ", ".join(plan["awq_mappings"]))
    mem = plan["memory"]
    lines.append(
        f"  peak memory (est.): {_size(mem['gpu'])} per GPU, {_size(mem['cpu'])} on CPU "
        f"(layer {_size(mem['layer_gpu'])}, statistics {_size(mem['statistics'])}, "
        f"activations {_size(mem['activations_gpu'])})"
    )
    sizes = ", ".join(f"{fmt} {_size(n)}" for fmt, n in plan.get("output_bytes", {}).items())
    lines.append(f"  output (est.): {sizes} (original {_size(plan['weight_bytes'])})")
    return lines
