"""The Fisher of every Linear's output channels (workers/fisher.py), layer by layer, equals the one computed by
autograd through the whole transformers model with the same sampled tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from workers.fisher import output_fisher
from workers.loading import CheckpointWeights, LayerwiseModel
from workers.tensor_source import TensorSource


def test_layerwise_fisher_matches_autograd_through_the_whole_model(tiny_mha_model_dir: Path) -> None:
    ids = torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    model = LayerwiseModel(tiny_mha_model_dir, torch.device("cpu"))
    ours = output_fisher(model, CheckpointWeights(TensorSource(tiny_mha_model_dir)), ids, seed=4)

    reference = AutoModelForCausalLM.from_pretrained(tiny_mha_model_dir, dtype=torch.float32).eval()
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
            output.retain_grad()
            outputs[name] = output
        return hook

    for name, module in reference.model.layers.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(keep(f"model.layers.{name}"))
    logprobs = torch.log_softmax(reference(ids).logits.float(), dim=-1)
    generator = torch.Generator().manual_seed(4)
    sampled = torch.stack([torch.multinomial(logprobs[w].detach().exp(), 1, generator=generator) for w in range(3)])
    logprobs.gather(2, sampled).sum().backward()
    assert set(ours) == set(outputs) and len(ours) == 3 * 7
    for name, output in outputs.items():
        assert output.grad is not None
        expected = output.grad.pow(2).reshape(-1, output.shape[-1]).sum(0) / ids.numel()
        torch.testing.assert_close(ours[name], expected, rtol=1e-3, atol=1e-9)
