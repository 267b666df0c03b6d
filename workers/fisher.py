"""How much each Linear's output matters to the model's output distribution: the diagonal of the Fisher
information of its output channels, E[g_j²] with g = ∇ log p(ŷ) at the Linear's output and ŷ drawn from the
original model's own next-token distribution (so E[g gᵀ] is the Hessian of KL(original ‖ perturbed) at zero).

A perturbation Δy of the output then costs KL ≈ ½ Σ_j E[g_j²] E[Δy_j²] per token (output channels and inputs
taken as independent), and for Δy = ΔW x, E[Δy_j²] = ½ (ΔW H ΔWᵀ)_jj with H = 2 E[x xᵀ]: mixed precision
weighs each row's Hessian error by its channel's Fisher (workers/mixed_precision.py), so errors of different
layers and kinds of Linear are counted in one unit, their effect on the final distribution.

One forward pass over `FISHER_TOKENS` calibration tokens keeps each decoder layer's input; the gradient at the
last layer's output comes from the model's head; then each layer, last first, is run again with autograd to
carry the gradient to its input, and hooks on its Linears' outputs sum g². Layers are loaded one at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workers.loading import LayerwiseModel, WeightSource, run_decoder_layer
from workers.progress import Progress, ProgressCallback, no_progress

FISHER_TOKENS = 8192  # calibration tokens (whole windows, at least one) the Fisher is estimated on


def output_fisher(
    model: LayerwiseModel, weights: WeightSource, calibration: Tensor, *, seed: int = 0,
    on_progress: ProgressCallback = no_progress,
) -> dict[str, Tensor]:
    """Full Linear name (e.g. "model.layers.3.mlp.down_proj") → E[g²] per output channel `[out]`, float32."""
    ids = calibration[: max(1, FISHER_TOKENS // calibration.shape[1])]
    calls = model.layer_calls(ids.shape[1], weights)
    inputs: list[Tensor] = []
    with torch.no_grad():
        hidden = model.embed(ids, weights)
        for index in range(model.num_layers):
            on_progress(Progress("calibrate", index, model.num_layers, message="mixed precision: forward for the Fisher"))
            inputs.append(hidden)
            hidden = run_decoder_layer(model.decoder_layer(index, weights), hidden, calls[index])
    grad = _head_gradient(model, weights, hidden, seed)
    fisher: dict[str, Tensor] = {}
    tokens = ids.numel()
    for index in reversed(range(model.num_layers)):
        on_progress(Progress("calibrate", index, model.num_layers, message="mixed precision: Fisher, backward"))
        layer, prefix = model.decoder_layer(index, weights), model.graph.layer_prefix(index)
        handles = [module.register_forward_hook(_summing_hook(fisher, prefix + name, tokens))
                   for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
        try:
            x = inputs.pop().detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(run_decoder_layer(layer, x, calls[index]), x, grad_outputs=grad)
        finally:
            for handle in handles:
                handle.remove()
    return fisher


def _head_gradient(model: LayerwiseModel, weights: WeightSource, hidden: Tensor, seed: int) -> Tensor:
    """∇ Σ log p(ŷ) at the last decoder layer's output, ŷ sampled (seeded) from the model's own distribution."""
    head = model.head(weights, grad=True)
    generator = torch.Generator(device=hidden.device).manual_seed(seed)
    grad = torch.zeros_like(hidden)
    for window in range(hidden.shape[0]):  # one window's logits at a time: [seq, vocab] in float32
        h = hidden[window].detach().requires_grad_(True)
        with torch.enable_grad():
            logprobs = torch.log_softmax(head(h).to(torch.float32), dim=-1)
            sampled = torch.multinomial(logprobs.detach().exp(), 1, generator=generator)
            (grad[window],) = torch.autograd.grad(logprobs.gather(1, sampled).sum(), h)
    return grad


def _summing_hook(fisher: dict[str, Tensor], name: str, tokens: int):  # type: ignore[no-untyped-def]
    def hook(_module: nn.Module, _args: object, output: Tensor) -> None:
        def add(g: Tensor) -> None:
            part = g.detach().to(torch.float32).pow(2).reshape(-1, g.shape[-1]).sum(0) / tokens
            fisher[name] = fisher[name] + part if name in fisher else part

        if output.requires_grad:
            output.register_hook(add)

    return hook
