"""The GPU benchmark's CPU-checkable parts: the synthetic checkpoint, the shared token ids, the timing maths.

The GPU timings themselves only run on the device machine (benchmarks/gpu.md); these tests make sure
what they time is the model and data we claim, and that the extrapolation to 32 layers is the stated formula.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from benchmarks import gpu_speed as gs

SHAPE = gs.TINY


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, gs.BuildResult]:
    model_dir = tmp_path_factory.mktemp("bench") / "model-2L"
    return model_dir, gs.build_model(model_dir, SHAPE, layers=2, seed=0, device=torch.device("cpu"))


def read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[name] = f.get_tensor(name)
    return out


def test_checkpoint_has_every_llama_tensor_with_its_shape_and_init_scale(
    built: tuple[Path, gs.BuildResult],
) -> None:
    model_dir, result = built
    tensors = read_all(model_dir)
    expected = dict(SHAPE.outer_tensors())
    for i in range(2):
        expected |= {f"model.layers.{i}.{n}": s for n, s in SHAPE.layer_tensors().items()}
    assert {n: tuple(t.shape) for n, t in tensors.items()} == expected
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert torch.equal(tensors["model.norm.weight"], torch.ones(SHAPE.hidden, dtype=torch.bfloat16))
    q = tensors["model.layers.1.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - gs.INIT_STD) < 0.001 and abs(q.mean().item()) < 0.001
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    payload = SHAPE.checkpoint_bytes(2)
    assert payload <= result.bytes_written < payload + 64 * 1024  # data plus small safetensors headers


def test_prefix_holds_exactly_the_first_layers_of_the_longer_model(
    built: tuple[Path, gs.BuildResult], tmp_path: Path
) -> None:
    two = read_all(built[0])
    gs.build_model(tmp_path / "model-1L", SHAPE, layers=1, seed=0, device=torch.device("cpu"))
    one = read_all(tmp_path / "model-1L")
    assert set(one) < set(two)
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert not torch.equal(two["model.layers.0.mlp.up_proj.weight"], two["model.layers.1.mlp.up_proj.weight"])


def test_a_complete_build_is_reused_and_a_different_seed_rebuilds(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    first = gs.build_model(tmp_path / "m", SHAPE, layers=1, seed=0, device=cpu)
    before = read_all(tmp_path / "m")
    again = gs.build_model(tmp_path / "m", SHAPE, layers=1, seed=0, device=cpu)
    assert again.reused and not first.reused and again.bytes_written == first.bytes_written
    other = gs.build_model(tmp_path / "m", SHAPE, layers=1, seed=1, device=cpu)
    assert not other.reused
    after = read_all(tmp_path / "m")
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    (tmp_path / "m" / "build.json").unlink()  # an interrupted build leaves no marker: it is built again
    assert not gs.build_model(tmp_path / "m", SHAPE, layers=1, seed=1, device=cpu).reused


def test_transformers_loads_the_checkpoint_and_runs_it(built: tuple[Path, gs.BuildResult]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built[0], dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == SHAPE.vocab
    ids = gs.calibration_ids(2, 16, SHAPE.vocab, seed=0)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 16, SHAPE.vocab) and torch.isfinite(logits).all()


def test_calibration_text_tokenizes_back_to_the_same_ids(
    built: tuple[Path, gs.BuildResult], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    ids = gs.calibration_ids(3, 40, SHAPE.vocab, seed=7)
    assert torch.equal(ids, gs.calibration_ids(3, 40, SHAPE.vocab, seed=7))
    assert int(ids.min()) >= 0 and int(ids.max()) < SHAPE.vocab
    gs.write_calibration_jsonl(tmp_path / "calib.jsonl", ids)
    tok = AutoTokenizer.from_pretrained(built[0])
    rows = [json.loads(line)["text"] for line in (tmp_path / "calib.jsonl").read_text().splitlines()]
    assert [tok(r)["input_ids"] for r in rows] == ids.tolist()


def test_extrapolation_is_fixed_plus_layers_times_median_plus_scaled_io() -> None:
    r = gs.Result(
        tool="x",
        method="gptq",
        layers=2,
        total_layers=SHAPE.layers,
        stages={},
        layer_s=[3.0, 5.0],
        io_s=2.0,
        total_s=20.0,
        peak_gpu_gib=0.0,
        cache="warm",
        whole_model_s=1.0,
    )
    fixed = 20.0 - 2.0 - 1.0 - 2 * 4.0
    byte_ratio = SHAPE.checkpoint_bytes(4) / SHAPE.checkpoint_bytes(2)
    assert r.extrapolated_s(SHAPE) == pytest.approx(fixed + 4 * 4.0 + 2.0 * byte_ratio + 1.0 * 2)
    full = gs.Result(**{**r.__dict__, "layers": SHAPE.layers, "layer_s": [1.0] * SHAPE.layers})
    assert full.extrapolated_s(SHAPE) == 20.0


def test_progress_clock_charges_time_to_stages_steps_and_layers() -> None:
    clock = gs.ProgressClock()
    clock.events = [
        (0.0, "load", None, ""),
        (1.0, "quantize", 0, "q_proj"),
        (2.5, "quantize", 0, "down_proj"),
        (4.0, "quantize", 1, "q_proj"),
        (6.0, "quantize", 1, "down_proj"),
        (8.0, "write", None, ""),
    ]
    assert clock.stages(end=10.0) == {"load": 1.0, "quantize": 7.0, "write": 2.0}
    assert clock.steps(end=10.0) == {
        "load": 1.0,
        "quantize: q_proj": 3.5,
        "quantize: down_proj": 3.5,
        "write": 2.0,
    }
    assert clock.layer_seconds(end=10.0) == [3.0, 4.0]


def test_engine_samples_exactly_the_benchmark_ids_from_the_calibration_file(
    built: tuple[Path, gs.BuildResult], tmp_path: Path
) -> None:
    """Both tools must see the same tokens: the engine's seeded sampler has no slack, so it takes them in order."""
    from transformers import AutoTokenizer

    from workers.calibration import calibration_windows
    from workers.spec import CalibrationSpec

    ids = gs.calibration_ids(6, 48, SHAPE.vocab, seed=3)
    gs.write_calibration_jsonl(tmp_path / "calib.jsonl", ids)
    spec = CalibrationSpec(path=str(tmp_path / "calib.jsonl"), num_samples=6, seq_len=48, seed=0)
    assert torch.equal(calibration_windows(spec, AutoTokenizer.from_pretrained(built[0])), ids)


def test_time_quantfleet_times_the_real_engine_per_stage_and_layer(
    built: tuple[Path, gs.BuildResult], tmp_path: Path
) -> None:
    ids = gs.calibration_ids(4, 32, SHAPE.vocab, seed=0)
    gs.write_calibration_jsonl(tmp_path / "calib.jsonl", ids)
    result = gs.time_quantfleet(
        "gptq", built[0], tmp_path / "out", tmp_path / "calib.jsonl", ids, SHAPE, 2, False
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 128, True)
    assert result.config["calibration"] == {
        "path": str(tmp_path / "calib.jsonl"),
        "num_samples": 4,
        "seq_len": 32,
        "seed": 0,
    }
    assert len(result.layer_s) == 2 and all(s > 0 for s in result.layer_s)
    assert sum(result.layer_s) <= result.stages["quantize"] + 1e-6 <= result.total_s
    assert result.stages["other"] >= 0 and result.io_s == result.stages["save"]
    assert sum(result.config["steps_s"].values()) == pytest.approx(result.total_s, abs=0.5)


def test_bad_arguments_are_rejected_with_what_to_fix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gs.main(["--tools", "autoawq"])
    assert "unknown tool/method ['autoawq']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gs.main(["--layers", "33"])
    assert "--layers must be between 1 and 32" in capsys.readouterr().err
    with pytest.raises(ValueError, match="between 1 and 4"):
        gs.build_model(Path("/nonexistent"), SHAPE, layers=5, seed=0, device=torch.device("cpu"))


def test_the_70b_shape_is_llama3_70b() -> None:
    """The memory projection runs one layer of this shape: it must be the real 70.6 B-parameter layout."""
    shape = gs.SHAPES["llama3-70b"]
    params = shape.checkpoint_bytes(shape.layers) // 2
    assert 70.5e9 < params < 70.6e9
    assert shape.layer_tensors()["mlp.down_proj.weight"] == (8192, 28672)
    assert shape.layer_tensors()["self_attn.k_proj.weight"] == (1024, 8192)
