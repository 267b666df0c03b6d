from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.calibration import eval_windows, read_text
from workers.engine import run_local
from workers.evaluate import QuantizedWeights, evaluate, evaluate_many, percentile
from workers.formats.reader import QuantizedCheckpoint
from workers.loading import CheckpointWeights, load_tokenizer
from workers.progress import Progress
from workers.spec import EvalSpec, JobSpec
from workers.tensor_source import TensorSource

CPU = torch.device("cpu")


def reference_logits(model_dir: Path, windows: torch.Tensor, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Full-model logits from transformers in float32, optionally with replaced weights."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(windows).logits[:, :-1].float()


def test_original_against_itself_is_exactly_lossless(tiny_model_dir: Path, eval_file: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    same = CheckpointWeights(TensorSource(tiny_model_dir))
    metrics = evaluate_many(tiny_model_dir, [same], EvalSpec(str(eval_file), seq_len=64), tokenizer, CPU)[0]
    assert metrics.kl_mean == 0.0 and metrics.kl_p99 == 0.0
    assert metrics.top1_agreement == 1.0
    assert metrics.delta_ppl_pct == 0.0 and metrics.ppl_quantized == metrics.ppl_original


def test_perplexity_matches_a_direct_full_model_computation(tiny_model_dir: Path, eval_file: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    spec = EvalSpec(str(eval_file), seq_len=64, max_windows=20)
    metrics = evaluate_many(tiny_model_dir, [CheckpointWeights(TensorSource(tiny_model_dir))], spec, tokenizer, CPU)[0]
    windows = eval_windows(read_text(eval_file), tokenizer, 64, 20)
    logits = reference_logits(tiny_model_dir, windows)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert metrics.windows == 20 and metrics.seq_len == 64 and metrics.tokens == 20 * 63
    assert metrics.ppl_original == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_quantized_metrics_match_a_direct_computation(
    make_spec: Callable[..., JobSpec], tiny_model_dir: Path, eval_file: Path, tmp_path: Path
) -> None:
    """KL, top-1 and perplexity of a written checkpoint, recomputed with transformers on its dense weights."""
    out = tmp_path / "out"
    run_local(make_spec("rtn", bits=3, calibration=False, with_eval=False), out)
    tokenizer = load_tokenizer(tiny_model_dir)
    events: list[Progress] = []
    spec = EvalSpec(str(eval_file), seq_len=64, max_windows=24)
    metrics = evaluate(tiny_model_dir, out, spec, tokenizer, CPU, events.append, batch_tokens=512)

    windows = eval_windows(read_text(eval_file), tokenizer, 64, 24)
    dense = QuantizedCheckpoint(out).dense_prefix("", CPU, torch.float16)
    p = torch.log_softmax(reference_logits(tiny_model_dir, windows), -1).reshape(-1, 300)
    q = torch.log_softmax(reference_logits(tiny_model_dir, windows, {k: v.float() for k, v in dense.items()}), -1).reshape(-1, 300)
    kl = (p.exp() * (p - q)).sum(-1).clamp(min=0)
    targets = windows[:, 1:].reshape(-1, 1)
    ppl_q = math.exp(float(-q.gather(1, targets).mean()))
    ppl_p = math.exp(float(-p.gather(1, targets).mean()))

    assert metrics.kl_mean == pytest.approx(float(kl.mean()), rel=1e-3)
    assert metrics.kl_p99 == pytest.approx(percentile(kl, 0.99), rel=1e-3)
    assert metrics.top1_agreement == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).float().mean()), abs=2 / kl.numel())
    assert metrics.ppl_quantized == pytest.approx(ppl_q, rel=1e-4)
    assert metrics.delta_ppl_pct == pytest.approx(100 * (ppl_q / ppl_p - 1), rel=1e-3, abs=1e-4)
    assert metrics.kl_mean > 1e-4 and 0.5 < metrics.top1_agreement < 1.0  # 3-bit RTN does change the model
    assert [e.layer for e in events if e.stage == "evaluate"] == [0, 1, 2]


def test_several_checkpoints_in_one_pass_agree_with_single_evaluations(
    make_spec: Callable[..., JobSpec], tiny_model_dir: Path, eval_file: Path, tmp_path: Path
) -> None:
    outs = [tmp_path / "w3", tmp_path / "w8"]
    run_local(make_spec("rtn", bits=3, calibration=False, with_eval=False), outs[0])
    run_local(make_spec("rtn", bits=8, calibration=False, with_eval=False), outs[1])
    tokenizer = load_tokenizer(tiny_model_dir)
    spec = EvalSpec(str(eval_file), seq_len=64, max_windows=10)
    together = evaluate_many(tiny_model_dir, outs, spec, tokenizer, CPU)
    alone = [evaluate(tiny_model_dir, out, spec, tokenizer, CPU) for out in outs]
    assert together == alone
    assert together[1].kl_mean < together[0].kl_mean / 10  # 8 bits is far closer than 3 bits
    assert isinstance(QuantizedWeights(outs[0], torch.float16).tensors("model.norm.", CPU)["weight"], torch.Tensor)


def test_percentile_is_nearest_rank() -> None:
    values = torch.arange(1, 101, dtype=torch.float64).flip(0)
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile(torch.tensor([5.0]), 0.99) == 5.0
