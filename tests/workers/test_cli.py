from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.progress import Progress as RichProgressBar

from workers.cli import ProgressBars, main, quantize_command
from workers.progress import Progress


def test_tiny_run_writes_eval_json_and_prints_the_table(
    tiny_model_dir: Path, calibration_file: Path, eval_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = quantize_command([
        str(tiny_model_dir), "--method", "gptq", "--bits", "4", "--group-size", "32", "--asym",
        "--calibration", str(calibration_file), "--num-samples", "8", "--seq-len", "64",
        "--eval-text", str(eval_file), "--eval-seq-len", "64", "--eval-max-windows", "5",
        "--format", "compressed-tensors", "--format", "gptq", "--device", "cpu", "--out", str(out),
    ])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    assert (report["method"], report["bits"], report["group_size"], report["symmetric"]) == ("gptq", 4, 32, False)
    assert report["formats"] == ["compressed-tensors", "gptq"] and (out / "gptq" / "config.json").is_file()
    assert report["eval"]["windows"] == 5 and report["eval"]["seq_len"] == 64
    printed = capsys.readouterr().out
    assert f"{report['eval']['ppl_quantized']:.4f}" in printed
    assert "Δ perplexity" in printed and "top-1 agreement" in printed and "peak memory" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "rtn", "--bits", "5"], "error: bits=5 is not supported; choose one of [2, 3, 4, 8]"),
        (["--method", "rtn", "--group-size", "128"], "error: group_size 128 does not divide in_features 64"),
        (["--method", "awq", "--group-size", "32", "--calibration", "/nonexistent/calib.txt"],
         "error: calibration file /nonexistent/calib.txt does not exist"),
        (["--method", "gptq", "--group-size", "32"], "error: method gptq needs calibration data"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code = quantize_command([str(tiny_model_dir), "--out", str(tmp_path / "out"), *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(message) and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_missing_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert quantize_command([str(tmp_path / "none"), "--method", "rtn", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: model directory {tmp_path / 'none'} does not exist\n"


def test_main_needs_the_quantize_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_progress_bars_count_layers_per_stage() -> None:
    bars = RichProgressBar(disable=True)
    callback = ProgressBars(bars)
    callback(Progress("quantize", 0, 3))
    callback(Progress("quantize", 1, 3, "mlp.up_proj"))
    task = bars.tasks[callback.tasks["quantize"]]
    assert (task.completed, task.total) == (1.5, 3) and "mlp.up_proj" in task.description
    callback(Progress("evaluate", 0, 3))
    assert task.completed == 3  # the earlier stage is complete once a later one starts


def test_python_dash_m_entry_point(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "quantize", str(tiny_model_dir), "--method", "rtn",
         "--bits", "8", "--group-size", "-1", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "eval.json").read_text())["group_size"] == -1
    assert "weights before → after" in done.stdout
