"""The checkpoints we write load in transformers + compressed-tensors and mean exactly our weights.

A tiny random Llama is quantized with RTN, written with CheckpointWriter and loaded back three ways:
transformers (`CompressedTensorsConfig(dequantize=True)`), our reader, and the independent GPTQ v1
reference dequantizer.
"""

import json
from pathlib import Path

import compressed_tensors
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from workers.errors import InvalidSpecError
from workers.formats import compressed_tensors as ct_format
from workers.formats import gptq_v1
from workers.formats.reader import QuantizedCheckpoint
from workers.formats.writer import CheckpointWriter
from workers.quant.grid import QuantizedTensor
from workers.quant.rtn import rtn_quantize
from workers.spec import OutputFormat, QuantScheme
from workers.tensor_source import TensorSource

CT_SCHEMES = [
    QuantScheme(bits=4, group_size=32, symmetric=True),
    QuantScheme(bits=4, group_size=32, symmetric=False),
    QuantScheme(bits=8, group_size=-1, symmetric=True),
    QuantScheme(bits=2, group_size=32, symmetric=True),
    QuantScheme(bits=3, group_size=32, symmetric=False),  # dense cross-word packing, zero points too
]
GPTQ_SCHEMES = [
    QuantScheme(bits=4, group_size=32, symmetric=True),
    QuantScheme(bits=4, group_size=32, symmetric=False),
    QuantScheme(bits=8, group_size=-1, symmetric=True),
    QuantScheme(bits=2, group_size=32, symmetric=False),
]


def _tiny_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _is_decoder_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def _write(
    model: LlamaForCausalLM, out_dir: Path, fmt: OutputFormat, scheme: QuantScheme, **writer_kwargs
) -> tuple[dict[str, QuantizedTensor], list[str]]:
    """Quantize every decoder Linear with RTN and write the model; returns the QuantizedTensors by module."""
    dtype = next(model.parameters()).dtype
    writer = CheckpointWriter(out_dir, fmt, scheme, dtype, **writer_kwargs)
    quantized = {}
    for name, tensor in model.state_dict().items():
        if _is_decoder_linear(name):
            module = name.removesuffix(".weight")
            scale_dtype = torch.float16 if fmt == OutputFormat.GPTQ else dtype  # what the format stores
            quantized[module] = rtn_quantize(tensor, scheme, scale_dtype=scale_dtype)
            writer.add_quantized(module, quantized[module])
        else:
            writer.add_dense(name, tensor)
    return quantized, writer.finalize(model.config.to_dict())


def _expected_state(
    model: LlamaForCausalLM, quantized: dict[str, QuantizedTensor]
) -> dict[str, torch.Tensor]:
    dtype = next(model.parameters()).dtype
    state = dict(model.state_dict())
    for module, qt in quantized.items():
        state[f"{module}.weight"] = qt.dequantize(dtype)
    return state


def _load_with_transformers(path: Path) -> torch.nn.Module:
    config = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()


@pytest.mark.parametrize("scheme", CT_SCHEMES, ids=str)
def test_transformers_loads_our_compressed_tensors_checkpoint(tmp_path: Path, scheme: QuantScheme) -> None:
    model = _tiny_llama(torch.float32)
    quantized, files = _write(model, tmp_path, OutputFormat.COMPRESSED_TENSORS, scheme)
    assert files == ["model.safetensors", "config.json"]
    expected = _expected_state(model, quantized)

    loaded = _load_with_transformers(tmp_path)
    loaded_state = loaded.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(loaded_state[name], tensor), name

    reference = _tiny_llama(torch.float32)
    reference.load_state_dict(expected)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = reference(ids).logits, loaded(ids).logits
    assert float((ours - theirs).norm() / ours.norm()) < 1e-3

    reader = QuantizedCheckpoint(tmp_path)
    assert reader.format == OutputFormat.COMPRESSED_TENSORS and reader.scheme == scheme
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        dense = reader.dense_prefix(prefix)
        assert set(dense) == {n.removeprefix(prefix) for n in expected if n.startswith(prefix)}
        for name, tensor in dense.items():
            assert torch.equal(tensor, expected[prefix + name]), name


def test_bfloat16_checkpoint_is_exact_too(tmp_path: Path) -> None:
    """Scales are stored in bf16; since RTN rounded them to bf16 first, nothing is lost anywhere."""
    model = _tiny_llama(torch.bfloat16)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    quantized, _ = _write(model, tmp_path, OutputFormat.COMPRESSED_TENSORS, scheme)
    expected = _expected_state(model, quantized)
    loaded = _load_with_transformers(tmp_path)
    assert loaded.dtype == torch.bfloat16
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    dense = QuantizedCheckpoint(tmp_path).dense_prefix("model.layers.1.", dtype=torch.bfloat16)
    assert torch.equal(dense["mlp.down_proj.weight"], expected["model.layers.1.mlp.down_proj.weight"])


def test_compressed_tensors_layout_and_config(tmp_path: Path) -> None:
    model = _tiny_llama(torch.float16)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    quantized, _ = _write(model, tmp_path, OutputFormat.COMPRESSED_TENSORS, scheme, act_order=True)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.gate_proj.weight_packed")
        zero = f.get_tensor("model.layers.0.mlp.gate_proj.weight_zero_point")
        scale = f.get_tensor("model.layers.0.mlp.gate_proj.weight_scale")
        shape = f.get_tensor("model.layers.0.mlp.gate_proj.weight_shape")
    assert packed.dtype == torch.int32 and packed.shape == (128, 8)
    assert zero.dtype == torch.int32 and zero.shape == (16, 2)  # 128 outputs × 4 bits, packed along out
    assert scale.dtype == torch.float16 and scale.shape == (128, 2)
    assert shape.tolist() == [128, 64]
    qt = quantized["model.layers.0.mlp.gate_proj"]
    first = int(packed[0, 0]) & 0xFFFFFFFF
    assert [(first >> (4 * j)) & 0xF for j in range(8)] == (qt.q[0, :8].int() + 8).tolist()

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float16"
    assert config["num_hidden_layers"] == 2
    qc = config["quantization_config"]
    assert qc == ct_format.quantization_config(scheme, act_order=True)
    assert qc["version"] == compressed_tensors.__version__ and qc["ignore"] == ["lm_head"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, False)
    assert (weights["strategy"], weights["actorder"]) == ("group", "static")
    channel = ct_format.quantization_config(QuantScheme(bits=8, group_size=-1))["config_groups"]["group_0"]
    assert (
        channel["weights"]["strategy"],
        channel["weights"]["group_size"],
        channel["weights"]["actorder"],
    ) == (
        "channel",
        None,
        None,
    )


@pytest.mark.parametrize("scheme", GPTQ_SCHEMES, ids=str)
def test_gptq_export_dequantizes_to_the_same_weights(tmp_path: Path, scheme: QuantScheme) -> None:
    model = _tiny_llama(torch.float16)
    # asymmetric grids never get unsigned zero 0 here: random weights have negatives in every group
    quantized, files = _write(model, tmp_path, OutputFormat.GPTQ, scheme)
    assert files == ["model.safetensors", "config.json"]
    source = TensorSource(tmp_path)
    for module, qt in quantized.items():
        tensors = {s: source.get(f"{module}.{s}") for s in gptq_v1.SUFFIXES}
        out, n = qt.shape
        per_word = 32 // scheme.bits
        groups = 1 if scheme.group_size == -1 else n // scheme.group_size
        assert tensors["qweight"].shape == (n // per_word, out) and tensors["qweight"].dtype == torch.int32
        assert tensors["qzeros"].shape == (groups, out // per_word)
        assert tensors["scales"].shape == (groups, out) and tensors["scales"].dtype == torch.float16
        assert tensors["g_idx"].tolist() == [j * groups // n for j in range(n)]
        dense = gptq_v1.dequantize_gptq_v1(tensors, scheme.bits, scheme.group_size)
        assert torch.equal(dense, qt.dequantize()), module
        if scheme.bits == 4 and scheme.symmetric:
            assert bool((tensors["qzeros"] == 0x77777777).all())

    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config == {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "desc_act": False,
        "sym": scheme.symmetric,
        "checkpoint_format": "gptq",
        "lm_head": False,
    }
    layer = QuantizedCheckpoint(tmp_path).dense_prefix("model.layers.0.", dtype=torch.float16)
    assert torch.equal(
        layer["self_attn.o_proj.weight"],
        quantized["model.layers.0.self_attn.o_proj"].dequantize(torch.float16),
    )
    assert torch.equal(layer["input_layernorm.weight"], model.model.layers[0].input_layernorm.weight)


def test_gptq_format_refuses_what_it_cannot_store(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpecError, match="bits 2, 4 and 8, not 3"):
        CheckpointWriter(tmp_path, OutputFormat.GPTQ, QuantScheme(bits=3, group_size=32), torch.float16)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    writer = CheckpointWriter(tmp_path, OutputFormat.GPTQ, scheme, torch.float16)
    positive = torch.rand(32, 64) + 0.1  # no negative weight → unsigned zero point 0
    with pytest.raises(
        InvalidSpecError, match="model.layers.0.mlp.up_proj: a group has asymmetric zero point 0"
    ):
        writer.add_quantized("model.layers.0.mlp.up_proj", rtn_quantize(positive, scheme))
    with pytest.raises(InvalidSpecError, match="divisible by 8"):
        writer.add_quantized("odd", rtn_quantize(torch.randn(12, 64), scheme))
    huge = QuantizedTensor(
        torch.zeros(8, 64, dtype=torch.int8),
        torch.full((8, 2), 1e6),
        None,
        QuantScheme(bits=4, group_size=32),
    )
    with pytest.raises(InvalidSpecError, match="does not fit in float16"):
        gptq_v1.linear_tensors(huge)


def test_sharded_checkpoint_loads_and_replaces_an_earlier_attempt(tmp_path: Path) -> None:
    model = _tiny_llama(torch.float32)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True)
    _, earlier = _write(model, tmp_path, OutputFormat.COMPRESSED_TENSORS, scheme, max_shard_bytes=10_000)
    assert all((tmp_path / name).exists() for name in earlier)  # an earlier attempt, with more shards

    quantized, files = _write(
        model, tmp_path, OutputFormat.COMPRESSED_TENSORS, scheme, max_shard_bytes=70_000
    )
    shards = [f for f in files if f.endswith(".safetensors")]
    assert 2 < len(shards) < len(earlier) - 2
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert files[-2:] == ["model.safetensors.index.json", "config.json"]
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert on_disk == sorted(files)  # no partial files, no shards of the earlier attempt
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    sizes = []
    for shard in shards:
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            names = list(f.keys())
            sizes.append(sum(f.get_tensor(n).nbytes for n in names))
        assert all(index["weight_map"][n] == shard for n in names)
    assert index["metadata"]["total_size"] == sum(sizes)
    assert max(sizes) <= 70_000  # no single tensor group is larger, so no shard may be
    assert len(index["weight_map"]) == len(TensorSource(tmp_path).names)

    expected = _expected_state(model, quantized)
    for name, tensor in _load_with_transformers(tmp_path).state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_writer_rejects_misuse(tmp_path: Path) -> None:
    scheme = QuantScheme(bits=4, group_size=32)
    writer = CheckpointWriter(tmp_path, OutputFormat.COMPRESSED_TENSORS, scheme, torch.float16)
    with pytest.raises(ValueError, match="no tensors"):
        writer.finalize({})
    qt = rtn_quantize(torch.randn(8, 64), QuantScheme(bits=8, group_size=32))
    with pytest.raises(InvalidSpecError, match="quantized with .*bits=8.* the checkpoint uses .*bits=4"):
        writer.add_quantized("m", qt)
    writer.add_dense("model.norm.weight", torch.ones(64))
    with pytest.raises(ValueError, match="added twice"):
        writer.add_dense("model.norm.weight", torch.ones(64))
    assert writer.finalize({"model_type": "llama"}) == ["model.safetensors", "config.json"]
    with pytest.raises(RuntimeError, match="already finalized"):
        writer.add_dense("x", torch.ones(1))
    with pytest.raises(InvalidSpecError, match="floating-point"):
        CheckpointWriter(tmp_path, OutputFormat.COMPRESSED_TENSORS, scheme, torch.int8)
