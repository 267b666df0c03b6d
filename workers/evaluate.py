"""Original vs quantized model on held-out text, streamed one decoder layer at a time.

Both models see the same windows (paper protocol: consecutive non-overlapping windows, BOS per window,
every token after the first scored, ppl = exp(mean NLL)). The original and each quantized model keep
their own hidden-state stream; per layer we materialise the original layer, push the original stream
through it, drop it, then do the same for each quantized model, whose weights are read back from the
checkpoint as written (so evaluation checks the bytes on disk, not an in-memory copy). At the end the final
norm and lm_head turn each stream into next-token distributions, a chunk of tokens at a time, for
perplexity, KL(P_original ‖ P_quantized) per token (mean and 99th percentile) and top-1 agreement.
Peak memory: one layer plus one hidden-state stream per model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from workers.activation_quant import Quantizer
from workers.activation_quant import attach as attach_input_quantizers
from workers.activations import Activations
from workers.calibration import eval_windows, read_text
from workers.errors import JobCancelled
from workers.formats.reader import QuantizedCheckpoint
from workers.loading import CheckpointWeights, LayerwiseModel, WeightSource
from workers.memory import release_host_memory
from workers.options import PipelineOptions
from workers.progress import CancelCheck, Progress, ProgressCallback, never_cancel, no_progress
from workers.report import EvalMetrics
from workers.spec import EvalSpec
from workers.tensor_source import TensorSource

HEAD_TOKENS = 512  # tokens per lm_head chunk: bounds the [tokens, vocab] float32 logits (~100 MB at 49k vocab)


class QuantizedWeights:
    """A quantized checkpoint read back dense (dequantized in the model dtype, as a runtime would)."""

    def __init__(self, path: str | Path, dtype: torch.dtype) -> None:
        self.checkpoint = QuantizedCheckpoint(path)
        self.dtype = dtype

    def tensors(self, prefix: str, device: torch.device) -> dict[str, Tensor]:
        return self.checkpoint.dense_prefix(prefix, device, self.dtype)

    def input_quantizers(self, prefix: str) -> dict[str, Quantizer]:
        """W8A8 / FP8 checkpoints: the runtime's quantization of each Linear's input (workers/activation_quant.py)."""
        return self.checkpoint.input_quantizers(prefix)


def open_weights(path: str | Path, dtype: torch.dtype) -> WeightSource:
    """Quantized checkpoints (config.json with quantization_config) dequantized; plain ones as stored."""
    config = json.loads((Path(path) / "config.json").read_text())
    if "quantization_config" in config:
        return QuantizedWeights(path, dtype)
    return CheckpointWeights(TensorSource(path))


def percentile(values: Tensor, q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of a 1-D tensor of any length."""
    rank = max(1, math.ceil(q * values.numel()))
    return float(torch.kthvalue(values, rank).values)


def evaluate(
    original_dir: str | Path,
    quantized_dir: str | Path,
    eval_spec: EvalSpec,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    on_progress: ProgressCallback = no_progress,
    *,
    batch_tokens: int = 8192,
    should_cancel: CancelCheck = never_cancel,
) -> EvalMetrics:
    """Compare one quantized checkpoint with its original model (see module docstring)."""
    return evaluate_many(
        original_dir, [quantized_dir], eval_spec, tokenizer, device, on_progress,
        batch_tokens=batch_tokens, should_cancel=should_cancel,
    )[0]


def evaluate_many(
    original_dir: str | Path,
    quantized: Sequence[str | Path | WeightSource],
    eval_spec: EvalSpec,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    on_progress: ProgressCallback = no_progress,
    *,
    batch_tokens: int = 8192,
    should_cancel: CancelCheck = never_cancel,
) -> list[EvalMetrics]:
    """Compare several quantized variants of one model at the cost of one pass of the original.

    Each entry of `quantized` is a checkpoint directory or any WeightSource (e.g. the original's own
    weights, which must give KL 0 and identical perplexity).
    """
    windows = eval_windows(read_text(eval_spec.path, "evaluation"), tokenizer, eval_spec.seq_len, eval_spec.max_windows)
    return compare_on_windows(
        original_dir, quantized, windows, device, on_progress, batch_tokens=batch_tokens, should_cancel=should_cancel
    )


def compare_on_windows(
    original_dir: str | Path,
    quantized: Sequence[str | Path | WeightSource],
    windows: Tensor,
    device: torch.device,
    on_progress: ProgressCallback = no_progress,
    *,
    batch_tokens: int = 8192,
    should_cancel: CancelCheck = never_cancel,
) -> list[EvalMetrics]:
    """`evaluate_many` on given token windows `[n, seq_len]` (e.g. held-out calibration windows)."""
    model = LayerwiseModel(original_dir, device)
    original: WeightSource = CheckpointWeights(TensorSource(original_dir))
    sources = [original] + [q if not isinstance(q, str | Path) else open_weights(q, model.model_dtype) for q in quantized]
    options = PipelineOptions(batch_tokens=batch_tokens)

    with torch.no_grad():
        streams = [Activations(model.embed(windows, src, batch_tokens=batch_tokens), device, options) for src in sources]
        calls = model.layer_calls(windows.shape[1], original)
        for index in range(model.num_layers):
            if should_cancel():
                raise JobCancelled(f"cancelled during evaluation, before decoder layer {index}")
            on_progress(Progress("evaluate", index, model.num_layers))
            for src, stream in zip(sources, streams, strict=True):
                layer = model.decoder_layer(index, src)
                if isinstance(src, QuantizedWeights):  # score what a W8A8 runtime computes
                    attach_input_quantizers(layer, src.input_quantizers(model.graph.layer_prefix(index)))
                stream.forward(layer, calls[index], update=True)
                del layer
            release_host_memory()
        on_progress(Progress("evaluate", model.num_layers, model.num_layers, message="scoring"))
        heads = [model.head(src) for src in sources]
        return _score(windows, streams, heads, device)


def _score(
    windows: Tensor, streams: list[Activations], heads: list[Callable[[Tensor], Tensor]], device: torch.device
) -> list[EvalMetrics]:
    """NLL of every next token for each model, and KL / top-1 of each quantized model against the original."""
    n_windows, seq_len = windows.shape
    targets = windows[:, 1:].reshape(-1)
    hidden = [s.hidden[:, :-1].reshape(-1, s.hidden.shape[-1]) for s in streams]
    nll = [0.0] * len(streams)
    kl_parts: list[list[Tensor]] = [[] for _ in streams[1:]]
    agree = [0] * (len(streams) - 1)

    def logprobs(k: int, a: int, b: int) -> Tensor:
        """The model's own head (final norm, lm_head, logit scaling or soft-capping) on a chunk of tokens."""
        return torch.log_softmax(heads[k](hidden[k][a:b].to(device)).to(torch.float32), dim=-1)

    for a in range(0, targets.numel(), HEAD_TOKENS):
        b = min(a + HEAD_TOKENS, targets.numel())
        tgt = targets[a:b].to(device).unsqueeze(1)
        ref = logprobs(0, a, b)
        nll[0] += float(-ref.gather(1, tgt).to(torch.float64).sum())
        ref_probs, ref_top = ref.exp(), ref.argmax(dim=-1)
        for k in range(1, len(streams)):
            lp = logprobs(k, a, b)
            nll[k] += float(-lp.gather(1, tgt).to(torch.float64).sum())
            kl_parts[k - 1].append((ref_probs * (ref - lp)).sum(dim=-1).clamp(min=0).cpu())
            agree[k - 1] += int((lp.argmax(dim=-1) == ref_top).sum())

    tokens = targets.numel()
    ppl_original = math.exp(nll[0] / tokens)
    metrics = []
    for k in range(1, len(streams)):
        kl = torch.cat(kl_parts[k - 1]).to(torch.float64)
        ppl = math.exp(nll[k] / tokens)
        metrics.append(
            EvalMetrics(
                ppl_original=ppl_original,
                ppl_quantized=ppl,
                delta_ppl_pct=100.0 * (ppl / ppl_original - 1.0),
                kl_mean=float(kl.mean()),
                kl_p99=percentile(kl, 0.99),
                top1_agreement=agree[k - 1] / tokens,
                tokens=tokens,
                windows=n_windows,
                seq_len=seq_len,
            )
        )
    return metrics
