from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.calibration import calibration_windows
from workers.errors import JobCancelled
from workers.formats.writer import CheckpointWriter
from workers.loading import CheckpointWeights, LayerwiseModel, load_tokenizer, run_decoder_layer
from workers.methods.awq import _fold_scales
from workers.pipeline import PipelineOptions, PipelineResult, quantize_model
from workers.progress import Progress
from workers.quant import inverse_hessian
from workers.quant.grid import QuantizedTensor
from workers.quant.rtn import rtn_quantize
from workers.spec import JobSpec, OutputFormat
from workers.tensor_source import TensorSource

CPU = torch.device("cpu")


class RecordingSink:
    """Keeps everything the pipeline would write."""

    def __init__(self) -> None:
        self.dense: dict[str, Tensor] = {}
        self.quantized: dict[str, QuantizedTensor] = {}

    def add_dense(self, name: str, tensor: Tensor) -> None:
        self.dense[name] = tensor

    def add_quantized(self, module_name: str, qt: QuantizedTensor) -> None:
        self.quantized[module_name] = qt


class InputRecordingModel(LayerwiseModel):
    """Records every hidden-state batch fed to decoder layer `watch`."""

    def __init__(self, model_dir: Path, watch: int) -> None:
        super().__init__(model_dir, CPU)
        self.watch = watch
        self.seen: list[Tensor] = []

    def decoder_layer(self, index: int, weights: object) -> nn.Module:  # type: ignore[override]
        layer = super().decoder_layer(index, weights)  # type: ignore[arg-type]
        if index == self.watch:
            layer.register_forward_pre_hook(lambda _m, args: self.seen.append(args[0].clone()))
        return layer


def run(
    spec: JobSpec, model: LayerwiseModel | None = None, *, options: PipelineOptions | None = None, **kwargs: object
) -> tuple[PipelineResult, RecordingSink, LayerwiseModel]:
    model = model or LayerwiseModel(spec.model_dir, CPU)
    sink = RecordingSink()
    calibration = None
    if spec.calibration.path:
        calibration = calibration_windows(spec.calibration, load_tokenizer(spec.model_dir))
    weights = CheckpointWeights(TensorSource(spec.model_dir))
    result = quantize_model(model, weights, spec, [sink], calibration, options=options, **kwargs)  # type: ignore[arg-type]
    return result, sink, model


def layer_with(model: LayerwiseModel, index: int, sink: RecordingSink) -> nn.Module:
    """Decoder layer `index` rebuilt from what the pipeline wrote (dense tensors + dequantized Linears)."""
    prefix = model.arch.layer_prefix(index)
    state = {n[len(prefix) :]: t for n, t in sink.dense.items() if n.startswith(prefix)}
    for name, qt in sink.quantized.items():
        if name.startswith(prefix):
            state[name[len(prefix) :] + ".weight"] = qt.dequantize(model.model_dtype)

    class Written:
        def tensors(self, p: str, device: torch.device) -> dict[str, Tensor]:
            assert p == prefix
            return state

    return model.decoder_layer(index, Written())


def embeddings(spec: JobSpec, model: LayerwiseModel) -> Tensor:
    ids = calibration_windows(spec.calibration, load_tokenizer(spec.model_dir))
    return F.embedding(ids, model.embed_weight(CheckpointWeights(TensorSource(spec.model_dir))))


def errors_by_layer(result: PipelineResult) -> dict[int, float]:
    total: dict[int, float] = defaultdict(float)
    for e in result.module_errors:
        total[e.layer] += e.error
    return dict(total)


def test_later_layers_see_the_quantized_outputs_of_earlier_ones(make_spec: Callable[..., JobSpec], tiny_model_dir: Path) -> None:
    spec = make_spec("gptq")
    model = InputRecordingModel(tiny_model_dir, watch=1)
    _, sink, _ = run(spec, model, options=PipelineOptions(batch_tokens=256))  # 4 windows per chunk
    seen = torch.cat(model.seen[:4])  # first pass over layer 1: the calibration forward, in 4 chunks
    assert len(model.seen) == 8  # calibration forward + forward of the quantized layer

    hidden = embeddings(spec, model)
    weights = CheckpointWeights(TensorSource(tiny_model_dir))
    pos = model.layer_calls(hidden.shape[1], weights)[0]
    with torch.no_grad():
        through_quantized = run_decoder_layer(layer_with(model, 0, sink), hidden, pos)
        through_original = run_decoder_layer(model.decoder_layer(0, weights), hidden, pos)
    torch.testing.assert_close(seen, through_quantized, rtol=1e-5, atol=1e-5)
    assert (seen - through_original).abs().max() > 100 * (seen - through_quantized).abs().max()


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_and_awq_have_lower_output_error_than_rtn_in_every_layer(
    make_spec: Callable[..., JobSpec], method: str, bits: int
) -> None:
    rtn = errors_by_layer(run(make_spec("rtn", bits=bits, observer="minmax"))[0])  # the baseline: plain min-max RTN
    better = errors_by_layer(run(make_spec(method, bits=bits))[0])
    assert sorted(rtn) == sorted(better) == [0, 1]
    for layer in rtn:
        assert better[layer] < 0.9 * rtn[layer], (layer, better[layer], rtn[layer])


def test_gptq_act_order_beats_rtn(make_spec: Callable[..., JobSpec]) -> None:
    rtn = errors_by_layer(run(make_spec("rtn", bits=3))[0])
    ordered = errors_by_layer(run(make_spec("gptq", bits=3, act_order=True))[0])
    assert all(ordered[layer] < rtn[layer] for layer in rtn)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_module_error_is_the_output_mse_on_calibration_inputs(make_spec: Callable[..., JobSpec], method: str) -> None:
    """The recorded q_proj error of layer 0 equals mean((x·Ŵᵀ − x·Wᵀ)²) computed directly."""
    spec = make_spec(method)
    result, sink, model = run(spec)
    original: Any = model.decoder_layer(0, CheckpointWeights(TensorSource(spec.model_dir)))
    with torch.no_grad():
        x = original.input_layernorm(embeddings(spec, model)).reshape(-1, 64)
        w = original.self_attn.q_proj.weight
        w_hat = sink.quantized["model.layers.0.self_attn.q_proj"].dequantize()
        if method == "awq":  # AWQ scaled the input by 1/s (folded into the norm) and W's columns by s
            s = original.input_layernorm.weight / sink.dense["model.layers.0.input_layernorm.weight"].float()
            w_hat = w_hat / s
        expected = float(((x @ w_hat.T) - (x @ w.T)).square().mean())
        power = float((x @ w.T).square().mean())
    recorded = next(e for e in result.module_errors if (e.layer, e.module) == (0, "self_attn.q_proj"))
    assert recorded.error == pytest.approx(expected, rel=2e-3)
    assert recorded.relative_error == pytest.approx(expected / power, rel=2e-3)


def test_awq_folding_keeps_the_layer_function(tiny_mha_model_dir: Path) -> None:
    """Dividing the previous op by s and multiplying the Linears' columns by s changes nothing before rounding."""
    model = LayerwiseModel(tiny_mha_model_dir, CPU)
    layer = model.decoder_layer(0, CheckpointWeights(TensorSource(tiny_mha_model_dir)))
    hidden = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(0))
    pos = model.layer_calls(24, CheckpointWeights(TensorSource(tiny_mha_model_dir)))[0]
    with torch.no_grad():
        before = run_decoder_layer(layer, hidden, pos)
        for i, mapping in enumerate(model.layer_plan(layer, hidden[:1], pos).awq_mappings):
            linears: list[Any] = [layer.get_submodule(n) for n in mapping.linears]
            s = torch.exp(torch.randn(linears[0].in_features, generator=torch.Generator().manual_seed(i)))
            _fold_scales(layer.get_submodule(mapping.prev), s)
            for lin in linears:
                lin.weight.mul_(s)
        after = run_decoder_layer(layer, hidden, pos)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_awq_with_v_to_o_mapping_writes_an_equivalent_layer(make_spec: Callable[..., JobSpec], tiny_mha_model_dir: Path) -> None:
    """On a model where v_proj → o_proj applies, the written AWQ layer is closer to the original than RTN's."""
    spec = make_spec("awq", model_dir=tiny_mha_model_dir)
    awq_result, awq_sink, model = run(spec)
    _, rtn_sink, _ = run(make_spec("rtn", model_dir=tiny_mha_model_dir, calibration=False))
    original_v = TensorSource(tiny_mha_model_dir).get("model.layers.0.self_attn.v_proj.weight").float()
    awq_v = awq_sink.quantized["model.layers.0.self_attn.v_proj"].dequantize()
    row_ratio = (awq_v.norm(dim=1) / original_v.norm(dim=1)).std()
    assert row_ratio > 0.05  # v_proj's rows carry o_proj's AWQ scales (1/s), unlike plain RTN
    assert awq_sink.dense["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16

    hidden = embeddings(spec, model)  # layer 0's calibration inputs
    pos = model.layer_calls(hidden.shape[1], CheckpointWeights(TensorSource(tiny_mha_model_dir)))[0]
    with torch.no_grad():
        reference = run_decoder_layer(model.decoder_layer(0, CheckpointWeights(TensorSource(tiny_mha_model_dir))), hidden, pos)
        awq_out = run_decoder_layer(layer_with(model, 0, awq_sink), hidden, pos)
        rtn_out = run_decoder_layer(layer_with(model, 0, rtn_sink), hidden, pos)
    assert (awq_out - reference).square().mean() < (rtn_out - reference).square().mean()
    assert len(awq_result.module_errors) == 3 * 7


def test_rtn_without_calibration_quantizes_the_stored_weights(make_spec: Callable[..., JobSpec], tiny_model_dir: Path) -> None:
    result, sink, _ = run(make_spec("rtn", calibration=False, group_size=64, symmetric=False))
    assert result.module_errors == [] and result.fallback_modules == []
    source = TensorSource(tiny_model_dir)
    assert len(sink.quantized) == 14
    for name, qt in sink.quantized.items():
        expected = rtn_quantize(source.get(f"{name}.weight"), qt.scheme, observer="mse")  # fp16-rounded scales
        assert torch.equal(qt.q, expected.q) and torch.equal(qt.scale, expected.scale)
        assert qt.zero_point is not None and expected.zero_point is not None
        assert torch.equal(qt.zero_point, expected.zero_point)
    dense = {n for n in source.names if not any(n == f"{q}.weight" for q in sink.quantized)}
    assert set(sink.dense) == dense  # norms and embeddings written, nothing else
    for name, tensor in sink.dense.items():
        assert torch.equal(tensor, source.get(name))


def test_cancellation_stops_at_a_layer_boundary(make_spec: Callable[..., JobSpec]) -> None:
    checks = iter([False, True])
    events: list[Progress] = []
    sink = RecordingSink()
    spec = make_spec("rtn", calibration=False)
    model = LayerwiseModel(spec.model_dir, CPU)
    with pytest.raises(JobCancelled, match="before decoder layer 1 of 2"):
        quantize_model(
            model, CheckpointWeights(TensorSource(spec.model_dir)), spec, [sink],
            on_progress=events.append, should_cancel=lambda: next(checks),
        )
    assert {n.split(".")[2] for n in sink.quantized} == {"0"}
    assert [e.layer for e in events if e.stage == "quantize" and e.module is None] == [0]


def test_progress_names_layers_and_modules(make_spec: Callable[..., JobSpec]) -> None:
    events: list[Progress] = []
    run(make_spec("gptq"), on_progress=events.append)
    layers = [(e.layer, e.num_layers) for e in events if e.stage == "quantize" and e.module is None]
    assert layers == [(0, 2), (1, 2)]
    modules = [e.module for e in events if e.stage == "quantize" and e.layer == 1 and e.module]
    assert modules == ["self_attn.q_proj, self_attn.k_proj, self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj, mlp.up_proj", "mlp.down_proj"]


def test_gptq_cholesky_failure_falls_back_to_rtn_and_is_reported(
    make_spec: Callable[..., JobSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    factor = inverse_hessian.flipped_cholesky

    def failing(hessian: Tensor, **kwargs: Any) -> inverse_hessian.FlippedCholesky:  # every dampening fails
        return dataclasses.replace(factor(hessian, **kwargs), lower=None, dampening=kwargs["dampening"] * 1000)

    monkeypatch.setattr(inverse_hessian, "flipped_cholesky", failing)
    result, sink, _ = run(make_spec("gptq", observer="minmax"))  # the fallback is then plain RTN
    assert len(result.fallback_modules) == 14
    assert result.fallback_modules[0].startswith("layers.0.self_attn.q_proj: Cholesky of the Hessian failed")
    assert all(e.fell_back_to_rtn and e.note for e in result.module_errors)
    source = TensorSource(make_spec("gptq").model_dir)
    qt = sink.quantized["model.layers.0.mlp.up_proj"]
    assert torch.equal(qt.q, rtn_quantize(source.get("model.layers.0.mlp.up_proj.weight"), qt.scheme).q)


# --- read-ahead, background writes, report precision: same bytes, errors surface, no threads left -----------

SWITCHES_OFF = PipelineOptions(prefetch_weights=False, background_writes=False, fast_error_report=False)


def helper_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("qf-writer", "qf-prefetch"))]


def write_checkpoints(spec: JobSpec, out: Path, options: PipelineOptions) -> PipelineResult:
    """Quantize into one directory per format (small shards, so the shard layout is exercised) and finalize."""
    model = LayerwiseModel(spec.model_dir, CPU)
    calibration = calibration_windows(spec.calibration, load_tokenizer(spec.model_dir)) if spec.calibration.path else None
    writers = [
        CheckpointWriter(out / fmt.value, fmt, spec.scheme, model.model_dtype, max_shard_bytes=40_000)
        for fmt in (OutputFormat.COMPRESSED_TENSORS, OutputFormat.GPTQ)
    ]
    weights = CheckpointWeights(TensorSource(spec.model_dir))
    result = quantize_model(model, weights, spec, writers, calibration, options=options)
    for writer in writers:
        writer.finalize(model.config.to_dict())
    return result


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_background_io_writes_the_same_bytes_and_reports_the_same_errors(
    make_spec: Callable[..., JobSpec], tmp_path: Path, method: str
) -> None:
    spec = make_spec(method)
    plain = write_checkpoints(spec, tmp_path / "plain", SWITCHES_OFF)
    overlapped = write_checkpoints(spec, tmp_path / "overlapped", PipelineOptions())
    expected, got = files(tmp_path / "plain"), files(tmp_path / "overlapped")
    assert sum(name.endswith(".safetensors") for name in expected) >= 4  # several shards per format
    assert sorted(got) == sorted(expected)
    for name, data in expected.items():
        assert got[name] == data, name
    assert overlapped.module_errors == plain.module_errors and len(plain.module_errors) == 14
    assert helper_threads() == []


class FailingSink(RecordingSink):
    def add_quantized(self, module_name: str, qt: QuantizedTensor) -> None:
        if module_name.startswith("model.layers.1."):
            raise OSError("No space left on device")
        super().add_quantized(module_name, qt)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_an_error_in_the_writer_thread_fails_the_job(make_spec: Callable[..., JobSpec], method: str) -> None:
    spec = make_spec(method)
    model = LayerwiseModel(spec.model_dir, CPU)
    calibration = calibration_windows(spec.calibration, load_tokenizer(spec.model_dir))
    sink = FailingSink()
    with pytest.raises(OSError, match="No space left on device"):
        quantize_model(model, CheckpointWeights(TensorSource(spec.model_dir)), spec, [sink], calibration)
    assert {n.split(".")[2] for n in sink.quantized} == {"0"}
    assert helper_threads() == []


def test_cancel_mid_run_with_background_io_leaves_no_thread(make_spec: Callable[..., JobSpec], tiny_mha_model_dir: Path) -> None:
    spec = make_spec("gptq", model_dir=tiny_mha_model_dir)  # 3 layers: cancelled before the third
    checks = iter([False, False, True])
    sink = RecordingSink()
    calibration = calibration_windows(spec.calibration, load_tokenizer(spec.model_dir))
    with pytest.raises(JobCancelled, match="before decoder layer 2 of 3"):
        quantize_model(
            LayerwiseModel(spec.model_dir, CPU), CheckpointWeights(TensorSource(spec.model_dir)), spec, [sink],
            calibration, should_cancel=lambda: next(checks),
        )
    assert {n.split(".")[2] for n in sink.quantized} == {"0", "1"}  # what was solved before the cancel is written
    assert helper_threads() == []
