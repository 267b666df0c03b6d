"""AWQ's scale search for the mappings of Mixture-of-Experts layers, scored on the layer's real routed output.

The mappings inside an MoE block (workers/awq_mappings.py) are scored on the block's output:
- norm → every expert's gate/up Linears (with a shared expert's; routers and gates get the exact fold, never a
  search), and a shared expert's up → down: rounding them changes the block's output through the experts' gating
  (and Qwen2-MoE's sigmoid gate on the shared expert), not linearly, so a candidate s is scored by running the
  MoE block on its calibration inputs X (the norm's output, every calibration token) with the mapping's weights
  set to RTN(W·s)/s. The loss is E‖block(X) − Y‖² against the float block's output Y: each token through the
  experts the router picks, weighted as the model weights them (the router itself is not touched);
- an expert's up → down: rounding down_e changes the block's output by g·ΔW·h on the tokens routed to e (g their
  routing weight, h down_e's input), so the closed-form search (workers/quant/awq.py) scores it exactly on
  Σ_e = Σ_{t→e} g_t² h_t h_tᵀ / N, with E|h| over those tokens for the candidates; an expert no calibration
  token is routed to scores 0 for every s and keeps s = 1.
`capture` gathers X, Y and the Σ_e of the solve pass's mappings (workers/moe.py splits an MoE layer into expert
chunks when its statistics exceed the budget) in one forward of the primary layer over all calibration windows,
before the pass folds any scale. Each MoE block's X and Y are held over all tokens (2 · tokens · hidden in the model's dtype,
where the calibration hidden states are kept); Σ_e takes the space of the experts' down_proj statistics again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from workers.awq_mappings import AwqMapping
from workers.loading import run_decoder_layer
from workers.methods.base import LayerWork
from workers.moe import ExpertLinears, expert_blocks, expert_of
from workers.quant.awq import candidate_scales, search_scales
from workers.quant.grid import ScaleCheck, fake_quantize


@dataclass
class Routed:
    """Σ g² h hᵀ, Σ|h| and the token count of one expert's down projection input over its routed tokens."""

    weighted: Tensor
    abs_sum: Tensor
    tokens: int = 0


@dataclass
class MoeCapture:
    """Per MoE block (by path, e.g. "mlp") its input and output chunks; per expert down Linear its `Routed`."""

    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)
    routed: dict[str, Routed] = field(default_factory=dict)
    num_tokens: int = 0


def _output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


def capture(work: LayerWork, mappings: Sequence[AwqMapping]) -> MoeCapture:
    """One forward of the primary layer over every device's calibration windows, gathering what `mappings` are
    scored on (see the module docstring): the input and output of the MoE blocks scored on their output, and
    the routed statistics of the experts' down Linears that the mappings scale. No forward if none."""
    assert work.acts is not None, "AWQ needs calibration inputs"
    layer, acts, primary = work.layer, work.acts, work.devices[0]
    home = acts.shards[0].hidden.device  # where the calibration hidden states live (the host when offloaded)
    found = MoeCapture()
    blocks = {scored for m in mappings if (scored := block_of(layer, m)) is not None}
    downs = {m.linears[0] for m in mappings if len(m.linears) == 1 and expert_of(layer, m.linears[0]) is not None}
    handles = []
    for path, experts in expert_blocks(layer).items():
        block = path.rpartition(".")[0]
        mine = [(e, f"{path}.{e}.{expert.names.down}") for e, expert in enumerate(experts.experts())]
        mine = [(e, name) for e, name in mine if name in downs]
        if block in blocks:
            found.inputs[block], found.outputs[block] = [], []

            def on_block(_m: nn.Module, args: tuple[Any, ...], out: Any, block: str = block) -> None:
                found.inputs[block].append(args[0].detach().to(home))
                found.outputs[block].append(_output(out).detach().to(home))

            handles.append(layer.get_submodule(block).register_forward_hook(on_block))
        if not mine:
            continue

        def on_experts(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                       mine: list[tuple[int, str]] = mine) -> None:
            assert isinstance(module, ExpertLinears)
            values = [*args, *(kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs)]
            hidden, index, weights = values[:3]
            experts = module.experts()
            for e, name in mine:
                token, position = torch.where(index == e)
                h = experts[e].hidden(hidden[token], module.__dict__["activation"], module.layout.concatenated).float()
                g = weights[token, position, None].float()
                acc = found.routed.setdefault(name, Routed(h.new_zeros(h.shape[1], h.shape[1]), h.new_zeros(h.shape[1])))
                acc.weighted.addmm_((g * h).T, g * h)
                acc.abs_sum.add_(h.abs().sum(dim=0))
                acc.tokens += int(token.numel())

        handles.append(experts.register_forward_pre_hook(on_experts, with_kwargs=True))
    found.num_tokens = acts.num_tokens
    if not handles:
        return found
    try:
        with torch.no_grad():
            for shard in acts.shards:
                for a, b in shard.chunks():
                    run_decoder_layer(layer, shard.hidden[a:b].to(primary), acts.positions[0])
    finally:
        for handle in handles:
            handle.remove()
    return found


def block_of(layer: nn.Module, mapping: AwqMapping) -> str | None:
    """The MoE block whose routed output scores a mapping: one whose Linears and readers are all inside it (the
    norm → experts mapping, a shared expert's up → down), but not an expert's own up → down (scored in closed form);
    None for mappings outside MoE blocks."""
    names = (*mapping.linears, *mapping.dense)
    for path in expert_blocks(layer):
        block = path.rpartition(".")[0]
        if all(name.startswith(f"{block}.") for name in names):
            own = len(mapping.linears) == 1 and expert_of(layer, mapping.linears[0]) is not None
            return None if own else block
    if any(expert_of(layer, name) is not None for name in mapping.linears):
        raise ValueError(f"AWQ mapping {mapping.prev} → {', '.join(names)} reaches outside its MoE block")
    return None


def search(work: LayerWork, mapping: AwqMapping, mean_abs: Tensor, moe: MoeCapture, device: int = 0) -> Tensor | None:
    """The scales of an MoE mapping on device `device`'s replica (see the module docstring); None for others."""
    block = block_of(work.layer, mapping)
    if block is not None:
        return _search_block(work, mapping, block, mean_abs, moe, device)
    routed = moe.routed.get(mapping.linears[0]) if len(mapping.linears) == 1 else None
    if routed is None:
        return None
    dev = work.devices[device]
    sigma = routed.weighted.to(dev) / max(moe.num_tokens, 1)
    s_x = routed.abs_sum.to(dev) / max(routed.tokens, 1)
    weight = work.linear(mapping.linears[0], device).weight
    return search_scales(sigma, s_x, [weight], work.spec.scheme, grid=work.options.awq_grid, scale_dtype=work.dtype)[0]


def _search_block(work: LayerWork, mapping: AwqMapping, block: str, mean_abs: Tensor, moe: MoeCapture,
                  device: int) -> Tensor:
    dev = work.devices[device]
    module = work.replicas[device].get_submodule(block)
    linears = [work.linear(name, device) for name in mapping.linears]
    originals = [linear.weight.data for linear in linears]
    s_x = mean_abs.to(dev, torch.float32)
    check, candidates, losses = ScaleCheck(), [], []
    try:
        with torch.no_grad():
            for step in range(work.options.awq_grid):
                s = candidate_scales(s_x, step / work.options.awq_grid)
                for linear, weight in zip(linears, originals, strict=True):
                    scaled = fake_quantize(weight.float() * s, work.spec.scheme, check=check, scale_dtype=work.dtype)
                    linear.weight.data = (scaled / s).to(weight.dtype)
                loss = sum(
                    ((_output(module(x.to(dev))) - y.to(dev)).float().pow(2).sum() for x, y in
                     zip(moe.inputs[block], moe.outputs[block], strict=True)),
                    torch.zeros((), device=dev),
                )
                candidates.append(s)
                losses.append(loss)
    finally:
        for linear, weight in zip(linears, originals, strict=True):
            linear.weight.data = weight
    check.raise_first()
    values = torch.stack(losses).tolist()  # one sync for all candidates
    best = min(range(len(values)), key=lambda i: (values[i], i))
    return candidates[best]
