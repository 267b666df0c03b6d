"""The input statistics of a decoder layer's Linear groups over all calibration tokens, from every device.

Each device sums its own shard (`HessianAccumulator`: Σ xᵀx, Σ|x|, max|x| of each group's input, one capture
forward per device); `InputStatistics` merges the parts once per layer, on the device that asks:

    H = 2/n · Σ_d S_d      E|x| = Σ_d Σ|x| / n      max|x| = max_d max|x|

One device (N = 1) merges nothing: its accumulator runs in the "auto" precision (float32 rows: the rescaled
running mean of IST-DASLab's GPTQ; bf16/fp16 rows on CUDA: tensor-core sums), exactly the statistics of a
one-device job. Several devices accumulate unscaled "half-operands" sums, which add up exactly across
devices (a product of two bf16 numbers is exact in float32), so the only difference from one device is the
order of the float32 additions; a GPTQ solve given the same Hessian gives the same integers on any device of
one kind (tests/workers/test_data_parallel.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from workers.activations import ShardedActivations, capture_inputs
from workers.model_graph import Group, LayerPlan
from workers.quant.gptq import HessianAccumulator, HessianPrecision


def sum_in_order(parts: Sequence[Tensor], device: torch.device) -> Tensor:
    """Σ_d parts[d], added in device order on `device` (a new tensor)."""
    total = parts[0].to(device, copy=True)
    for part in parts[1:]:
        total.add_(part.to(device))
    return total


def merge_sums(sums: Sequence[Tensor], num_samples: int, device: torch.device) -> Tensor:
    """H = 2/n · Σ_d S_d: the unscaled partial sums added in device order on `device`, scaled once."""
    return sum_in_order(sums, device).mul_(2.0 / max(num_samples, 1))  # the scaling of HessianAccumulator.hessian


def merge_hessians(parts: Sequence[HessianAccumulator], device: torch.device) -> Tensor:
    """The Hessian of all shards from per-device accumulators in "half-operands" (unscaled) mode."""
    return merge_sums([acc.unscaled_sum() for acc in parts], sum(acc.num_samples for acc in parts), device)


class InputStatistics:
    """One Linear group's input statistics over the whole calibration set, from one accumulator per device."""

    def __init__(self, parts: Sequence[HessianAccumulator]) -> None:
        self.parts = list(parts)

    @property
    def num_samples(self) -> int:
        return sum(acc.num_samples for acc in self.parts)

    def hessian(self, device: torch.device) -> Tensor:
        """H = 2/n Σ xᵀx on `device`."""
        if len(self.parts) == 1:
            return self.parts[0].hessian.to(device)
        return merge_hessians(self.parts, device)

    def second_moment(self, device: torch.device) -> Tensor:
        """Σ = E[x xᵀ] = H / 2 on `device` (a new tensor)."""
        if len(self.parts) == 1:
            return self.parts[0].second_moment.to(device)
        return merge_hessians(self.parts, device) / 2

    def mean_abs(self, device: torch.device) -> Tensor:
        """E|x| per input channel (AWQ's activation magnitude) on `device` (a new tensor)."""
        if len(self.parts) == 1:
            return self.parts[0].mean_abs.to(device)
        return sum_in_order([acc.abs_sum() for acc in self.parts], device) / max(self.num_samples, 1)

    def abs_max(self, device: torch.device) -> Tensor:
        """max|x| over every input (static FP8's activation range)."""
        return torch.stack([acc.abs_max.to(device) for acc in self.parts]).amax()


def precision_for(num_devices: int) -> HessianPrecision:
    """One device: the one-device numerics; several: sums that merge exactly."""
    return "auto" if num_devices == 1 else "half-operands"


def collect_statistics(
    replicas: Sequence[nn.Module], acts: ShardedActivations, plan: LayerPlan, precision: HessianPrecision | None = None,
    *, magnitudes: bool = True,
) -> dict[Group, InputStatistics]:
    """Every group's input statistics: each device captures its shard through its replica of the layer.
    `magnitudes`: also Σ|x| and max|x| (AWQ, static FP8; see `HessianAccumulator`)."""
    precision = precision or precision_for(len(acts.devices))

    def accumulate(i: int) -> dict[Group, HessianAccumulator]:
        accs = {
            group: HessianAccumulator(_in_features(replicas[i], group[0]), acts.devices[i], precision=precision,
                                      magnitudes=magnitudes)
            for group in plan.groups
        }
        capture_inputs(replicas[i], acts.shards[i], acts.positions[i], plan, lambda group, x: accs[group].add(x))
        return accs

    partials = acts.threads.run(accumulate)
    return {group: InputStatistics([part[group] for part in partials]) for group in plan.groups}


def _in_features(layer: nn.Module, name: str) -> int:
    module = layer.get_submodule(name)
    assert isinstance(module, nn.Linear), f"{name} is not a Linear"
    return module.in_features
