"""Mixture-of-Experts layers: every expert is a set of Linears, calibrated on every calibration token.

transformers 5 stores the routed experts of most MoE families (Mixtral, Qwen2/3-MoE, DeepSeek-V3, gpt-oss…)
as one module with fused 3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]). Its layout is
read off the module itself — the flags `use_experts_implementation` sets on it (`has_gate`, `is_concatenated`
gate/up halves or interleaved columns, `is_transposed`, `has_bias`) and its own gating (`_apply_gate`, e.g.
gpt-oss's clamped SwiGLU) — and `unfuse_experts` replaces it, in the model skeleton, by `ExpertLinears`:
one `Expert` of plain Linears per expert, computing exactly what the fused module computes. From then on
the engine sees ordinary Linears: it groups them by shared input, solves them with any method and writes one
quantized Linear per expert projection.

Names: each expert's Linears carry the names the original Hugging Face checkpoints use, which are what
transformers 5 `save_pretrained` writes (its conversion mapping turns fused experts back into per-expert
tensors): the mapping's source patterns give them (`experts.*.w1.weight` + `experts.*.w3.weight` →
`gate_up_proj` for Mixtral: gate `w1`, up `w3`, down `w2`; Qwen-MoE / DeepSeek: `gate_proj`, `up_proj`,
`down_proj`). A family without such a mapping (gpt-oss) gets `gate_proj` / `up_proj` / `down_proj`.

Calibration reaches every expert: while anything observes an expert (a forward pre-hook on one of its
Linears: the statistics capture, the plan's discovery), that expert runs on *all* tokens of the batch, so
its statistics cover every calibration token, while the block's output still adds only the routed tokens'
results with their routing weights, as the model computes it. Unobserved experts (propagation, evaluation)
run on their routed tokens only. All experts then read one input tensor, so their gate/up projections form
one group with one Hessian (the block's input), and each expert's down projection has its own.

Memory (`solve_layer`): an MoE layer's statistics are the groups of a dense layer plus one Hessian per
expert's down projection (E · 4·I² bytes). When they exceed `STATISTICS_BUDGET_BYTES`, the layer is solved
in passes: the first with every other group and as many experts as fit, then further chunks of experts,
each pass one capture forward over the calibration windows holding only its own statistics. Methods that
smooth (AWQ, awq-gptq) must fold every scale into a Linear before it is rounded; an expert's own mapping
(up → down) folds only into that expert, so they solve the experts first, in chunks that hold each expert's
down_proj statistics and its routed ones (workers/methods/awq_moe.py) within the budget, each chunk searching,
folding and rounding its down projections, then every other group with the remaining mappings (norm → gate/up
of all experts, attention) on the already folded up projections. One pass when everything fits. Every grid
of the job (the scheme's and each GGUF type's) solves each pass from that pass's one capture.

Too few tokens: an expert Linear whose statistics come from fewer tokens than it has inputs (a rank-deficient
Hessian) is solved with `STARVED_DAMPENING_FACTOR` times the job's dampening; if Cholesky
still fails, GPTQ falls back to RTN for that module (workers/quant/gptq.py). Both are recorded per module, and
every expert Linear's entry in eval.json's `module_errors` notes its routed and calibration token counts.
Routers and gates stay dense (`dense_linears`: Linears that are direct children of an MoE block, e.g.
Qwen2-MoE's `shared_expert_gate`); shared experts are ordinary MLPs and are quantized like dense ones.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from workers.errors import InvalidSpecError

if TYPE_CHECKING:
    from workers.awq_mappings import AwqMapping
    from workers.methods.base import LayerWork, PipelineResult
    from workers.model_graph import Group, LayerPlan

STATISTICS_BUDGET_BYTES = 4 * 2**30  # input statistics of one solve pass of an MoE layer
STARVED_DAMPENING_FACTOR = 10.0


@dataclass(frozen=True)
class ExpertNames:
    """Checkpoint names of one expert's Linears (gate is None for ungated experts)."""

    gate: str | None
    up: str
    down: str


@dataclass(frozen=True)
class ExpertLayout:
    """How a fused experts module stores its weights (read off the module)."""

    num_experts: int
    hidden: int
    intermediate: int
    gated: bool
    concatenated: bool  # gate/up halves [gate; up] (True) or interleaved columns g0 u0 g1 u1 … (False)
    transposed: bool  # weights stored [E, in, out] (True) or [E, out, in]
    bias: bool


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with 3-D expert parameters (`down_proj` and `gate_up_proj` / `up_proj`)."""
    params = module._parameters
    down = params.get("down_proj")
    up = params.get("gate_up_proj", params.get("up_proj"))
    return down is not None and up is not None and down.dim() == 3 and up.dim() == 3 and hasattr(module, "is_transposed")


def fused_layout(module: nn.Module) -> ExpertLayout:
    if getattr(module, "has_post_expert_norm", False):
        raise InvalidSpecError(f"{type(module).__name__}: experts with a norm after each expert are not supported")
    gated = bool(getattr(module, "has_gate", "gate_up_proj" in module._parameters))
    transposed = bool(getattr(module, "is_transposed", False))
    up = module._parameters["gate_up_proj" if gated else "up_proj"]
    assert up is not None
    num_experts, a, b = up.shape
    hidden, width = (a, b) if transposed else (b, a)
    return ExpertLayout(
        num_experts=num_experts, hidden=hidden, intermediate=width // 2 if gated else width, gated=gated,
        concatenated=bool(getattr(module, "is_concatenated", True)), transposed=transposed,
        bias=bool(getattr(module, "has_bias", "down_proj_bias" in module._parameters)),
    )


_PATTERN = re.compile(r"experts\.\*\.(\w+)\.weight$")


def expert_names(conversions: list[Any], gated: bool) -> ExpertNames:
    """The per-expert checkpoint names from transformers' conversion mapping of the model (see module docstring)."""
    for rule in conversions:
        targets = [t.rstrip("$") for t in getattr(rule, "target_patterns", [])]
        sources = [_PATTERN.search(s.replace("\\", "")) for s in getattr(rule, "source_patterns", [])]
        names = [m.group(1) for m in sources if m]
        if len(targets) != 1 or len(names) != len(sources):
            continue
        if targets[0].endswith("experts.gate_up_proj") and len(names) == 2 and gated:
            gate, up = names
            down = _down_name(conversions)
            if down:
                return ExpertNames(gate, up, down)
    return ExpertNames("gate_proj" if gated else None, "up_proj", "down_proj")


def _down_name(conversions: list[Any]) -> str | None:
    for rule in conversions:
        targets = getattr(rule, "target_patterns", [])
        sources = [_PATTERN.search(s.replace("\\", "")) for s in getattr(rule, "source_patterns", [])]
        if len(targets) == 1 and targets[0].rstrip("$").endswith("experts.down_proj") and len(sources) == 1 and sources[0]:
            return sources[0].group(1)
    return None


class Expert(nn.Module):
    """One expert's Linears, registered under its checkpoint names."""

    def __init__(self, layout: ExpertLayout, names: ExpertNames, device: torch.device | str) -> None:
        super().__init__()
        self.names = names
        hidden, inter, bias = layout.hidden, layout.intermediate, layout.bias
        if names.gate is not None:
            self.add_module(names.gate, nn.Linear(hidden, inter, bias=bias, device=device))
        self.add_module(names.up, nn.Linear(hidden, inter, bias=bias, device=device))
        self.add_module(names.down, nn.Linear(inter, hidden, bias=bias, device=device))

    def linears(self) -> Iterator[nn.Linear]:
        for module in self.children():
            assert isinstance(module, nn.Linear)
            yield module

    @property
    def observed(self) -> bool:
        """Something watches this expert's inputs (a forward pre-hook on one of its Linears)."""
        return any(module._forward_pre_hooks for module in self.linears())

    def hidden(self, x: Tensor, activation: nn.Module, concatenated: bool) -> Tensor:
        """The down projection's input: the gated activation of the gate/up projections of `x`."""
        gating: Any = activation  # the fused module's own act_fn / _apply_gate
        up = self.get_submodule(self.names.up)(x)
        if self.names.gate is None:
            return gating.act_fn(up)  # type: ignore[no-any-return]
        gate = self.get_submodule(self.names.gate)(x)
        gate_up = torch.cat([gate, up], dim=-1) if concatenated else torch.stack([gate, up], dim=-1).flatten(-2)
        return gating._apply_gate(gate_up)  # type: ignore[no-any-return]

    def forward(self, x: Tensor, activation: nn.Module, concatenated: bool) -> Tensor:
        out: Tensor = self.get_submodule(self.names.down)(self.hidden(x, activation, concatenated))
        return out


class ExpertLinears(nn.Module):
    """The routed experts of one MoE block as per-expert Linears (children "0" … "E-1"), a drop-in replacement
    of the fused module: same forward arguments (hidden states, top-k expert indices, top-k weights)."""

    def __init__(self, fused: nn.Module, names: ExpertNames) -> None:
        super().__init__()
        self.layout = fused_layout(fused)
        self.names = names
        device = fused._parameters["down_proj"].device  # type: ignore[union-attr]
        for e in range(self.layout.num_experts):
            self.add_module(str(e), Expert(self.layout, names, device))
        activation = copy.copy(fused)  # its gating (`_apply_gate`, act_fn, constants), without the weights
        activation._parameters = {}
        activation._modules = dict(fused._modules)
        self.__dict__["activation"] = activation  # not a submodule: holds no weights
        self.routed_tokens = torch.zeros(self.layout.num_experts, dtype=torch.long)  # since `reset_counts`

    def experts(self) -> list[Expert]:
        return [m for m in self.children() if isinstance(m, Expert)]

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        flat = top_k_index.reshape(-1)
        self.routed_tokens += torch.bincount(flat[flat < self.layout.num_experts].cpu(), minlength=self.layout.num_experts)
        for e, expert in enumerate(self.experts()):
            token, position = torch.where(top_k_index == e)
            if expert.observed:  # calibration: every token through this expert, only the routed ones kept
                result = expert(hidden_states, self.activation, self.layout.concatenated)[token]
            elif token.numel():
                result = expert(hidden_states[token], self.activation, self.layout.concatenated)
            else:
                continue
            weighted = result * top_k_weights[token, position, None]
            out.index_add_(0, token, weighted.to(out.dtype))
        return out

    def split_fused(self, state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
        """`state` with the fused tensors under `prefix` (e.g. "mlp.experts.") replaced by per-expert ones."""
        layout, names = self.layout, self.names
        gate_up = state.pop(f"{prefix}{'gate_up_proj' if layout.gated else 'up_proj'}")
        down = state.pop(f"{prefix}down_proj")
        if layout.transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)  # [E, out, in]
        parts = {"weight": (gate_up, down)}
        if layout.bias:
            parts["bias"] = (state.pop(f"{prefix}{'gate_up_proj' if layout.gated else 'up_proj'}_bias"),
                             state.pop(f"{prefix}down_proj_bias"))
        for kind, (first, second) in parts.items():
            for e in range(layout.num_experts):
                if names.gate is not None:
                    gate, up = _split_gate_up(first[e], layout)
                    state[f"{prefix}{e}.{names.gate}.{kind}"] = gate
                else:
                    up = first[e]
                state[f"{prefix}{e}.{names.up}.{kind}"] = up
                state[f"{prefix}{e}.{names.down}.{kind}"] = second[e]
        return state


def _split_gate_up(fused: Tensor, layout: ExpertLayout) -> tuple[Tensor, Tensor]:
    """One expert's fused gate/up rows (weight [2I, H] or bias [2I]) → (gate, up), as its `_apply_gate` splits them."""
    if layout.concatenated:
        return fused[: layout.intermediate].contiguous(), fused[layout.intermediate :].contiguous()
    return fused[0::2].contiguous(), fused[1::2].contiguous()


def unfuse_experts(model: nn.Module, conversions: list[Any]) -> list[str]:
    """Replace every fused experts module of `model` by `ExpertLinears`; returns their module paths.

    Experts in any other layout (no `use_experts_implementation` flags saying how the 3-D tensors are laid
    out, e.g. Llama-4's or DBRX's) are refused rather than silently left unquantized."""
    found = [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]
    for name, fused in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[child] = ExpertLinears(fused, expert_names(conversions, fused_layout(fused).gated))
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False)]
        if own and "expert" in type(module).__name__.lower() and not isinstance(module, nn.Linear):
            raise InvalidSpecError(
                f"the experts of {type(model).__name__} ({type(module).__name__} at {name}: {', '.join(own)}) are stored "
                "in a layout QuantFleet cannot read as Linears (fused 3-D tensors without transformers' experts-layout "
                "flags); they would stay unquantized, so the model is refused"
            )
    return [name for name, _ in found]


def expert_blocks(layer: nn.Module) -> dict[str, ExpertLinears]:
    """The ExpertLinears of a decoder layer by path, e.g. {"mlp.experts": …}."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, ExpertLinears)}


def dense_linears(layer: nn.Module) -> set[str]:
    """Linears of a decoder layer that stay dense: routers and gates, the direct Linear children of an MoE block."""
    dense: set[str] = set()
    for path in expert_blocks(layer):
        block_path = path.rpartition(".")[0]
        block = layer.get_submodule(block_path) if block_path else layer
        for child_name, child in block.named_children():
            if isinstance(child, nn.Linear):
                dense.add(f"{block_path}.{child_name}" if block_path else child_name)
    return dense


def expert_of(layer: nn.Module, linear: str) -> tuple[str, int] | None:
    """(block path, expert index) of an expert's Linear, e.g. "mlp.experts.3.w1" → ("mlp.experts", 3)."""
    for path in expert_blocks(layer):
        if linear.startswith(f"{path}."):
            return path, int(linear[len(path) + 1 :].split(".", 1)[0])
    return None


# --- solving an MoE layer ---------------------------------------------------------------------------------

def _group_bytes(layer: nn.Module, group: Group) -> int:
    module = layer.get_submodule(group[0])
    assert isinstance(module, nn.Linear)
    return 4 * module.in_features**2


def plan_passes(layer: nn.Module, plan: LayerPlan, budget: int, smoothing: bool = False) -> list[LayerPlan]:
    """The layer's groups split into solve passes whose statistics fit `budget` bytes: every group that is not
    one expert's own (attention, shared experts, the experts' shared gate/up input) in the first pass, the
    per-expert groups packed in order after them. One pass when everything fits.

    `smoothing` (AWQ, awq-gptq): each expert group also holds its routed statistics (twice the bytes), the
    expert passes come first, each with its experts' own mappings (up → down: they fold only into that expert),
    and the last pass takes every other group and mapping; the folds of a pass are then complete before any
    Linear it quantizes is rounded (see the module docstring)."""
    from workers.model_graph import LayerPlan

    def own_expert(group: Group) -> bool:
        owners = {expert_of(layer, name) for name in group}
        return len(owners) == 1 and None not in owners

    first = [g for g in plan.groups if not own_expert(g)]
    rest = [g for g in plan.groups if own_expert(g)]
    per_expert = 2 if smoothing else 1
    first_bytes = sum(_group_bytes(layer, g) for g in first)
    sizes = [per_expert * _group_bytes(layer, g) for g in rest]
    if first_bytes + sum(sizes) <= budget or not rest:
        return [plan]
    chunks = [[rest[i] for i in chunk] for chunk in pack_passes(0 if smoothing else first_bytes, sizes, budget)]
    order = {g: i for i, g in enumerate(plan.groups)}
    if not smoothing:
        passes = [first + chunks[0], *chunks[1:]]
        return [LayerPlan(tuple(sorted(p, key=order.__getitem__)), plan.awq_mappings) for p in passes]
    plans = []
    for chunk in chunks:  # each expert chunk with its experts' own mappings
        names = {name for g in chunk for name in g}
        own = tuple(m for m in plan.awq_mappings if _own_mapping(layer, m) and set(m.linears) <= names)
        plans.append(LayerPlan(tuple(chunk), own))
    others = tuple(m for m in plan.awq_mappings if not _own_mapping(layer, m))
    return [*plans, LayerPlan(tuple(first), others)] if first else plans


def pack_passes(first: int, sizes: Sequence[int], budget: int) -> list[list[int]]:
    """The indices of `sizes` packed in order into passes of at most `budget` bytes, the first pass already
    holding `first` bytes; a pass always takes one item, even one larger than the budget."""
    passes: list[list[int]] = [[]]
    used = first
    for i, size in enumerate(sizes):
        if used + size > budget and passes[-1]:
            passes.append([])
            used = 0
        passes[-1].append(i)
        used += size
    return passes


def _own_mapping(layer: nn.Module, mapping: AwqMapping) -> bool:
    """A mapping whose Linears are one expert's own (an expert's up → down)."""
    owners = {expert_of(layer, name) for name in mapping.linears}
    return len(owners) == 1 and None not in owners


def reset_counts(layers: list[nn.Module]) -> None:
    for layer in layers:
        for block in expert_blocks(layer).values():
            block.routed_tokens.zero_()


def routed_counts(layers: list[nn.Module]) -> dict[str, list[int]]:
    """Tokens the router sent to each expert since `reset_counts`, summed over the replicas."""
    totals: dict[str, list[int]] = {}
    for layer in layers:
        for path, block in expert_blocks(layer).items():
            counts = block.routed_tokens.tolist()
            totals[path] = [a + b for a, b in zip(totals.get(path, [0] * len(counts)), counts, strict=True)]
    return totals


class Solver(Protocol):
    """What solves a layer's Linears from its statistics: a method (workers/methods/base.py) or a grid
    (workers/methods/gguf.py GGUFGrid)."""

    def solve(self, work: LayerWork) -> Mapping[str, Any]: ...


def solve_layer(
    solvers: Sequence[tuple[Solver, PipelineResult]], work: LayerWork, budget: int | None = None
) -> list[dict[str, Any]]:
    """Each solver's `solve(work)` (its records go to its own result), all from the same captures; for an MoE
    layer in passes that fit the statistics budget, every solver solving each pass from that pass's capture, with
    starved experts dampened more, and each expert's token counts noted on its modules' records (see the module
    docstring)."""
    if work.acts is None or not expert_blocks(work.layer):
        return [dict(solver.solve(work)) for solver, _ in solvers]
    layer, replicas, plan = work.layer, work.replicas, work.plan  # the plan's probe forward is not counted
    tokens = work.acts.num_tokens
    smooths = work.spec.method.smooths  # the expert passes (with their own mappings) first, see plan_passes
    passes = plan_passes(layer, plan, STATISTICS_BUDGET_BYTES if budget is None else budget, smoothing=smooths)
    starved = STARVED_DAMPENING_FACTOR * work.spec.dampening
    solved: list[dict[str, Any]] = [{} for _ in solvers]
    first_records = [len(result.module_errors) for _, result in solvers]
    routed: dict[str, list[int]] = {}
    for sub in passes:
        parts = [(sub, work.spec.dampening)] if smooths else _by_dampening(layer, sub, tokens, work.spec.dampening, starved)
        for part_plan, dampening in parts:
            reset_counts(replicas)
            part = _work_with(work, part_plan, dampening)  # one capture of this part's statistics, for every solver
            for (solver, _), own in zip(solvers, solved, strict=True):
                own.update(solver.solve(part))
            # a capture forward that reached the MoE block routed every token once (one may stop before it)
            for path, counts in routed_counts(replicas).items():
                routed[path] = [max(a, b) for a, b in zip(routed.get(path, counts), counts, strict=True)]
    for (_, result), first in zip(solvers, first_records, strict=True):
        _annotate(work, result, first, routed, tokens, None if smooths else starved)
    return solved


def _by_dampening(
    layer: nn.Module, plan: LayerPlan, tokens: int, dampening: float, starved: float
) -> list[tuple[LayerPlan, float]]:
    """Split a pass into (groups at the job's dampening, starved expert groups at the raised one)."""
    normal: list[Group] = []
    raised: list[Group] = []
    for group in plan.groups:
        module = layer.get_submodule(group[0])
        assert isinstance(module, nn.Linear)
        is_expert = all(expert_of(layer, name) is not None for name in group)
        (raised if is_expert and tokens < module.in_features else normal).append(group)
    parts = [(replace(plan, groups=tuple(g)), d) for g, d in ((normal, dampening), (raised, starved)) if g]
    return parts


def _work_with(work: LayerWork, plan: LayerPlan, dampening: float) -> LayerWork:
    """A LayerWork for the same layer whose plan is `plan` (its statistics: those groups only)."""
    spec = work.spec if dampening == work.spec.dampening else replace(work.spec, dampening=dampening)
    part = replace(work, spec=spec)
    part.__dict__["plan"] = plan  # the cached property, set: this pass's groups
    return part


def _annotate(
    work: LayerWork, result: PipelineResult, first: int, routed: dict[str, list[int]], tokens: int, starved: float | None
) -> None:
    for i in range(first, len(result.module_errors)):
        record = result.module_errors[i]
        owner = expert_of(work.layer, record.module)
        if owner is None:
            continue
        path, e = owner
        module = work.layer.get_submodule(record.module)
        assert isinstance(module, nn.Linear)
        note = f"expert {e}: routed {routed[path][e]} of {tokens} tokens, calibrated on all {tokens}"
        if tokens < module.in_features and starved is not None:
            note += f"; fewer tokens than its {module.in_features} inputs: dampening {starved:g}"
            result.fallback_modules.append(f"layers.{work.index}.{record.module}: {note}")
        record.note = f"{note}; {record.note}" if record.note else note
