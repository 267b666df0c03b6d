from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from workers.errors import InputError, InvalidSpecError
from workers.loading import (
    CheckpointWeights,
    LayerwiseModel,
    compute_dtype_for,
    load_tokenizer,
    resolve_device,
    run_decoder_layer,
)
from workers.tensor_source import TensorSource

CPU = torch.device("cpu")


def layerwise_logits(model: LayerwiseModel, weights: CheckpointWeights, ids: torch.Tensor) -> torch.Tensor:
    """Logits computed one materialised piece at a time, as the pipeline and evaluation do."""
    embed = model.embed_weight(weights)
    hidden = model.embed(ids, weights)
    assert torch.equal(hidden, F.embedding(ids, embed))  # lookup in fp16 then cast == lookup in fp32
    calls = model.layer_calls(ids.shape[1], weights)
    for index in range(model.num_layers):
        hidden = run_decoder_layer(model.decoder_layer(index, weights), hidden, calls[index])
    head = model.head(weights, embed)
    return torch.stack([head(h) for h in hidden])


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_mha_model_dir"])
def test_layer_by_layer_forward_equals_the_full_model(fixture: str, request: pytest.FixtureRequest) -> None:
    """Calling decoder layers directly (sdpa, no mask, rotary from a fresh module) is the full causal LM."""
    model_dir: Path = request.getfixturevalue(fixture)
    model = LayerwiseModel(model_dir, CPU)
    weights = CheckpointWeights(TensorSource(model_dir))
    ids = torch.randint(4, 270, (3, 40), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(ids).logits
        ours = layerwise_logits(model, weights, ids)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero tensors


def test_skeleton_stays_on_meta_and_layers_are_real(tiny_model_dir: Path) -> None:
    model = LayerwiseModel(tiny_model_dir, CPU)
    assert all(p.is_meta for p in model.skeleton.parameters())
    layer: Any = model.decoder_layer(1, CheckpointWeights(TensorSource(tiny_model_dir)))
    stored = TensorSource(tiny_model_dir).get("model.layers.1.mlp.down_proj.weight")
    assert all(not p.is_meta and p.dtype == torch.float32 and not p.requires_grad for p in layer.parameters())
    torch.testing.assert_close(layer.mlp.down_proj.weight, stored.float(), rtol=0, atol=0)
    assert all(p.is_meta for p in model.skeleton.parameters())  # materialising copied, not mutated


def test_tied_and_untied_lm_head(tiny_model_dir: Path, tiny_mha_model_dir: Path) -> None:
    tied = LayerwiseModel(tiny_model_dir, CPU)
    weights = CheckpointWeights(TensorSource(tiny_model_dir))
    assert torch.equal(tied.lm_head_weight(weights), tied.embed_weight(weights))
    untied = LayerwiseModel(tiny_mha_model_dir, CPU)
    source = TensorSource(tiny_mha_model_dir)
    head = untied.lm_head_weight(CheckpointWeights(source))
    assert torch.equal(head, source.get("lm_head.weight").float())
    assert not torch.equal(head, source.get("model.embed_tokens.weight").float())


def test_missing_layer_tensor_is_an_error(tiny_model_dir: Path) -> None:
    class Partial(CheckpointWeights):
        def tensors(self, prefix: str, device: torch.device) -> dict[str, torch.Tensor]:
            found = super().tensors(prefix, device)
            found.pop("self_attn.o_proj.weight", None)
            return found

    model = LayerwiseModel(tiny_model_dir, CPU)
    with pytest.raises(InputError, match=r"decoder layer 0 .*missing \['self_attn.o_proj.weight'\]"):
        model.decoder_layer(0, Partial(TensorSource(tiny_model_dir)))


def test_compute_dtype_and_device_rules() -> None:
    assert compute_dtype_for(torch.float16, CPU) == torch.float32
    assert compute_dtype_for(torch.bfloat16, CPU) == torch.float32
    assert compute_dtype_for(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidSpecError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_tokenizer_loads_and_failures_are_input_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.bos_token_id == 1
    with pytest.raises(InputError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)
