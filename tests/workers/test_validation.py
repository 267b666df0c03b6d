from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.errors import InputError, InvalidSpecError
from workers.spec import EvalSpec, JobSpec
from workers.validation import check_against_model


def _edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_valid_job_reports_the_model(make_spec: Callable[..., JobSpec], tiny_model_dir: Path) -> None:
    info = check_against_model(make_spec("gptq"))
    assert info.architecture.name == "LlamaForCausalLM"
    assert info.num_layers == 2
    assert info.dtype == torch.float16
    assert info.tied_embeddings
    assert info.has_tokenizer
    assert info.weight_bytes == (tiny_model_dir / "model.safetensors").stat().st_size
    assert len(info.linear_shapes) == 2 * 7
    # hidden 64, 4 heads × 16, 2 KV heads × 16, intermediate 128
    assert info.linear_shapes["layers.1.self_attn.q_proj"] == (64, 64)
    assert info.linear_shapes["layers.1.self_attn.k_proj"] == (32, 64)
    assert info.linear_shapes["layers.0.mlp.down_proj"] == (64, 128)


def test_group_size_must_divide_every_input_size(make_spec: Callable[..., JobSpec]) -> None:
    with pytest.raises(InvalidSpecError, match=r"group_size 128 does not divide in_features 64 of layers\.0\.self_attn\.q_proj"):
        check_against_model(make_spec("rtn", group_size=128))
    check_against_model(make_spec("rtn", group_size=-1))  # per channel always fits


def test_missing_model_directory(make_spec: Callable[..., JobSpec], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        check_against_model(make_spec("rtn", model_dir=tmp_path / "nope"))


def test_missing_config(make_spec: Callable[..., JobSpec], copy_model: Callable[[Path], Path], tiny_model_dir: Path) -> None:
    model = copy_model(tiny_model_dir)
    (model / "config.json").unlink()
    with pytest.raises(InputError, match="no config.json"):
        check_against_model(make_spec("rtn", model_dir=model))


def test_pickle_weights_are_refused(make_spec: Callable[..., JobSpec], copy_model: Callable[[Path], Path], tiny_model_dir: Path) -> None:
    model = copy_model(tiny_model_dir)
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"only pickle weights \(pytorch_model.bin\)"):
        check_against_model(make_spec("rtn", model_dir=model))


def test_unknown_architecture(make_spec: Callable[..., JobSpec], copy_model: Callable[[Path], Path], tiny_model_dir: Path) -> None:
    model = copy_model(tiny_model_dir)
    _edit_config(model, architectures=["GPT2LMHeadModel"])
    with pytest.raises(InvalidSpecError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        check_against_model(make_spec("rtn", model_dir=model))


def test_incomplete_checkpoint(make_spec: Callable[..., JobSpec], copy_model: Callable[[Path], Path], tiny_model_dir: Path) -> None:
    model = copy_model(tiny_model_dir)
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(InputError, match=r"lacks model\.layers\.1\.mlp\.up_proj\.weight"):
        check_against_model(make_spec("rtn", model_dir=model))


def test_unsupported_dtype(make_spec: Callable[..., JobSpec], copy_model: Callable[[Path], Path], tiny_model_dir: Path) -> None:
    model = copy_model(tiny_model_dir)
    _edit_config(model, dtype="float8_e4m3fn")
    with pytest.raises(InvalidSpecError, match="model dtype 'float8_e4m3fn' is not supported"):
        check_against_model(make_spec("rtn", model_dir=model))


def test_text_files_must_exist_and_hold_text(make_spec: Callable[..., JobSpec], tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    spec = make_spec("gptq")
    with pytest.raises(InputError, match="calibration file .*empty.txt is empty"):
        check_against_model(replace(spec, calibration=replace(spec.calibration, path=str(empty))))
    with pytest.raises(InputError, match="calibration file .*missing.txt does not exist"):
        check_against_model(replace(spec, calibration=replace(spec.calibration, path=str(tmp_path / "missing.txt"))))
    with pytest.raises(InputError, match="evaluation file .*missing.txt does not exist"):
        check_against_model(replace(spec, eval=EvalSpec(path=str(tmp_path / "missing.txt"))))


def test_tokenizer_needed_for_text(make_spec: Callable[..., JobSpec], copy_model: Callable[[Path], Path], tiny_model_dir: Path) -> None:
    model = copy_model(tiny_model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    with pytest.raises(InputError, match="no tokenizer files"):
        check_against_model(make_spec("gptq", model_dir=model))
    # RTN without calibration or evaluation needs no tokenizer
    info = check_against_model(make_spec("rtn", model_dir=model, calibration=False, with_eval=False))
    assert not info.has_tokenizer


def test_bad_device_string(make_spec: Callable[..., JobSpec]) -> None:
    with pytest.raises(InvalidSpecError, match="device 'gpu0' is not understood"):
        check_against_model(make_spec("rtn", device="gpu0"))


def test_sequence_longer_than_a_sliding_window_is_accepted(make_spec: Callable[..., JobSpec], copy_model: Callable[[Path], Path], tiny_model_dir: Path) -> None:
    """Layers get the model's own masks (sliding windows included), so windows longer than a sliding window are fine."""
    model = copy_model(tiny_model_dir)
    _edit_config(model, sliding_window=32)
    check_against_model(make_spec("gptq", model_dir=model))


@pytest.mark.parametrize("devices", [0, 17])
def test_device_count_must_be_sensible(make_spec: Callable[..., JobSpec], devices: int) -> None:
    with pytest.raises(InvalidSpecError, match=f"devices={devices} must be between 1 and 16"):
        make_spec(devices=devices).validate()


def test_more_devices_than_calibration_windows_is_refused(make_spec: Callable[..., JobSpec]) -> None:
    spec = make_spec(devices=4)
    spec = type(spec)(**{**spec.__dict__, "calibration": type(spec.calibration)(path=spec.calibration.path, num_samples=2)})
    with pytest.raises(InvalidSpecError, match="devices=4 exceeds calibration num_samples=2"):
        spec.validate()
