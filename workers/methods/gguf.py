"""A GGUF file type as a grid of the layer loop: the job's GPTQ or RTN solved on ggml's own blocks.

Not a method of its own (nothing is registered): `GGUFGrid` is one extra grid of a job (workers/pipeline.py
`Output`), solved from the layer's statistics the job already collected (`work.plan`, `work.statistics`: one
capture forward per layer, shared by every grid). Each Linear gets the block type the file type's recipe gives
it (`workers.formats.gguf.Recipe`, through the sink's `target`); GPTQ sweeps its columns against the fixed GGUF
grid (`workers/quant/gguf_gptq.py`), one factored Hessian per Linear group, and RTN rounds to it with llama.cpp's
own rules (no importance, so our RTN Q8_0/Q4_0 equal `llama-quantize`'s). AWQ (when this grid is the job's first
format; otherwise the layer was smoothed once already with the first format's search, and this grid rounds it)
searches each mapping's scales by the output error of the GGUF block types the recipe gives its Linears, folds them (workers/methods/awq.py `fold`: the norms the file stores
change too), then rounds every Linear on its block type with the scaled inputs' E[x²] as llama.cpp's importance
matrix (the K-quants' scale/min searches weigh columns by it; the search scores that same rounding). A file type that keeps 2-D weights as float (F16)
solves nothing. Module errors and fallbacks go to the grid's own `result`. With several devices, the
statistics are merged on the primary and the GGUF grids solved there (the scheme's groups spread over all).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from workers.awq_mappings import AwqMapping
from workers.errors import InvalidSpecError
from workers.methods.base import LayerWork, PipelineResult
from workers.model_graph import linear_names
from workers.moe import expert_blocks
from workers.output_error import output_error
from workers.quant import gguf_grid
from workers.quant.awq import search_scales
from workers.quant.gguf_gptq import gguf_gptq_quantize_shared
from workers.quant.gguf_grid import BlockType, GGUFTensor
from workers.report import ModuleError
from workers.spec import Method

BlockOf = Callable[[str, tuple[int, ...]], BlockType | None]  # (Hugging Face tensor name, shape) → its block type


class GGUFGrid:
    """GPTQ (`method` gptq, needs calibration), AWQ (needs calibration) or RTN of every Linear on its GGUF block
    type."""

    def __init__(self, name: str, block_of: BlockOf, method: Method) -> None:
        if method not in (Method.GPTQ, Method.RTN, Method.AWQ):
            raise ValueError(f"GGUF grids are solved by gptq, awq or rtn, not {method.value}")
        self.name, self.block_of, self.method = name, block_of, method
        self.result = PipelineResult()

    def deployed(self, qt: GGUFTensor, work: LayerWork, device: torch.device) -> Tensor:
        """What the file decodes to, in the compute dtype: the weight the next layer's inputs are made with."""
        return qt.dequantize(work.model.compute_dtype).to(device)

    def solve(self, work: LayerWork) -> dict[str, GGUFTensor]:
        prefix = work.model.graph.layer_prefix(work.index)
        blocks = {}
        for name in linear_names(work.layer):
            weight = work.linear(name).weight
            block = self.block_of(f"{prefix}{name}.weight", tuple(weight.shape))
            if block is not None:
                blocks[name] = block
        if not blocks:  # F16: every weight stays float
            return {}
        if work.acts is None:  # uncalibrated RTN
            return {name: gguf_grid.quantize(block, work.linear(name).weight) for name, block in blocks.items()}
        if self.method is Method.AWQ:
            return self._awq(work, blocks)
        statistics, device = work.statistics, work.devices[0]
        solved: dict[str, GGUFTensor] = {}
        for group in work.plan.groups:
            names = [name for name in group if name in blocks]
            if not names:
                continue
            hessian = statistics[group].hessian(device)
            weights = [work.linear(name).weight for name in names]
            if self.method is Method.GPTQ:
                work.progress(", ".join(names), self.name)
                outcomes = gguf_gptq_quantize_shared(
                    weights, [blocks[n] for n in names], hessian, dampening=work.spec.dampening,
                    act_order=work.spec.act_order,
                )
            else:
                outcomes = [(gguf_grid.quantize(blocks[n], w), False) for n, w in zip(names, weights, strict=True)]
            for name, weight, (qt, fell_back) in zip(names, weights, outcomes, strict=True):
                mse, relative = output_error(weight, qt.dequantize().to(weight.device), hessian / 2)
                self._record(work.index, name, mse, relative, fell_back)
                solved[name] = qt
        return solved

    def _awq(self, work: LayerWork, blocks: dict[str, BlockType]) -> dict[str, GGUFTensor]:
        """AWQ's scales searched on the GGUF grid and folded (workers/methods/awq.py `smooth`), then RTN on it with
        the scaled inputs' importance."""
        from workers.methods.awq import AwqStatistics, smooth

        if expert_blocks(work.layer):
            raise InvalidSpecError("AWQ on a GGUF grid does not cover Mixture-of-Experts layers; use method gptq or rtn")

        def search_on(mapping: AwqMapping, stats: AwqStatistics, _device: int) -> Tensor | None:
            if any(name not in blocks for name in mapping.linears):
                return None  # a Linear the file keeps float: nothing to protect
            quantizers = [partial(_round_trip, blocks[name], stats.second_moment.diagonal()) for name in mapping.linears]
            return search_scales(stats.second_moment, stats.mean_abs, [work.linear(n).weight for n in mapping.linears],
                                 None, grid=work.options.awq_grid, quantizers=quantizers)[0]

        stats, row_scale = smooth(work, search_on)
        solved: dict[str, GGUFTensor] = {}
        for group in work.plan.groups:
            sigma = stats[group].second_moment
            for name in (n for n in group if n in blocks):
                weight = work.linear(name).weight
                qt = gguf_grid.quantize(blocks[name], weight, importance=sigma.diagonal())
                rows = row_scale.get(name)
                row = (rows if rows is not None else torch.ones(weight.shape[0])).to(sigma.device).unsqueeze(1)
                reference = weight.to(sigma.device, torch.float32) * row
                mse, relative = output_error(reference, qt.dequantize().to(sigma.device) * row, sigma)
                self._record(work.index, name, mse, relative, False)
                solved[name] = qt
        return solved

    def _record(self, index: int, name: str, mse: float, relative: float, fell_back: bool) -> None:
        note = "Cholesky failed, RTN on the GGUF grid" if fell_back else None
        self.result.module_errors.append(ModuleError(index, name, mse, relative, fell_back, note))
        if fell_back:
            self.result.fallback_modules.append(f"{self.name} layers.{index}.{name}: {note}")


def _round_trip(block: BlockType, importance: Tensor, scaled: Tensor, scales: Tensor) -> Tensor:
    """W·s rounded to `block` and decoded, the columns weighed by the scaled inputs' E[x²] / s² as the final
    rounding weighs them: the AWQ search's RTN."""
    return gguf_grid.quantize(block, scaled, importance=importance / scales.square()).dequantize()
