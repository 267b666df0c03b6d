"""The method interface: what a quantization method reads of a decoder layer and how it solves it.

A method is one class in one file of this package, registered by name:

    @register
    class Rtn(QuantMethod):
        name = "rtn"                            # spec.method's value ("rtn:float": that method for FP8 schemes)
        statistics = frozenset({"second_moment"})  # what it reads of each group's input (the loop collects only that)
        def solve(self, work: LayerWork) -> dict[str, QuantizedTensor]: ...

`solve` gets a `LayerWork`: the layer (on every device: `replicas`, the primary first), its calibration
shards, its plan (the Linear groups and AWQ mappings, found at run time) and the merged input statistics of
every group (`work.statistics`, collected on first use, once per layer). It returns one QuantizedTensor per
quantized Linear (on the primary device), records each module's output error with `work.record`, and may
change the primary layer in place (AWQ folds scales into norms); the layer loop (workers/pipeline.py) then
installs the dequantized weights, forwards the calibration shards to the next layer and writes the layer.
Solving groups spread over the devices is `workers/methods/groups.py`; the math kernels are in workers/quant/.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from workers.activations import ShardedActivations
from workers.devices import DeviceThreads
from workers.loading import LayerwiseModel
from workers.model_graph import Group, LayerPlan
from workers.options import PipelineOptions
from workers.output_error import deployed
from workers.progress import Progress, ProgressCallback, no_progress
from workers.quant.gptq import HessianPrecision
from workers.quant.grid import QuantizedTensor
from workers.report import ModuleError
from workers.spec import JobSpec
from workers.statistics import InputStatistics, collect_statistics

if TYPE_CHECKING:
    from workers.methods.awq import AwqStatistics

Statistic = Literal["second_moment", "mean_abs", "abs_max"]
ALL_STATISTICS: frozenset[Statistic] = frozenset({"second_moment", "mean_abs", "abs_max"})


@dataclass
class PipelineResult:
    module_errors: list[ModuleError] = field(default_factory=list)
    fallback_modules: list[str] = field(default_factory=list)


@dataclass
class LayerWork:
    """One decoder layer being solved, on one or several devices (see the module docstring)."""

    index: int
    replicas: list[nn.Module]  # the layer on every device, the primary (the model's device) first
    acts: ShardedActivations | None  # the calibration shards; None without calibration
    model: LayerwiseModel
    spec: JobSpec
    options: PipelineOptions = field(default_factory=PipelineOptions)
    result: PipelineResult = field(default_factory=PipelineResult)
    on_progress: ProgressCallback = no_progress
    precision: HessianPrecision | None = None  # of the statistics; default: workers.statistics.precision_for
    wanted: frozenset[Statistic] = ALL_STATISTICS  # what `statistics` collects: the methods' (and grids') needs
    # per Linear whose output rows a smoothing fold divided (AWQ's prev Linear), that row scale; shared by the
    # solve passes of one layer (workers/moe.py), so a later pass measures errors in the original coordinates
    row_scale: dict[str, Tensor] = field(default_factory=dict)
    # AWQ's smoothing of this layer (or solve pass), once for every grid of the job (workers/methods/awq.py smooth)
    smoothed: tuple[dict[Group, AwqStatistics], dict[str, Tensor]] | None = field(default=None, repr=False)

    @property
    def layer(self) -> nn.Module:
        return self.replicas[0]

    @property
    def devices(self) -> list[torch.device]:
        return self.acts.devices if self.acts is not None else [self.model.device]

    @property
    def threads(self) -> DeviceThreads:
        assert self.acts is not None, "only a calibrated layer has device threads"
        return self.acts.threads

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model_dtype

    @cached_property
    def plan(self) -> LayerPlan:
        """The layer's Linear groups and AWQ mappings, found on one window of the primary's calibration shard."""
        assert self.acts is not None, "the plan is found on calibration inputs"
        return self.model.layer_plan(self.layer, self.acts.shards[0].probe(), self.acts.positions[0])

    @cached_property
    def statistics(self) -> dict[Group, InputStatistics]:
        """Every group's input statistics over all calibration tokens (one capture forward per device)."""
        assert self.acts is not None, "statistics need calibration inputs"
        magnitudes = bool(self.wanted & {"mean_abs", "abs_max"})
        return collect_statistics(self.replicas, self.acts, self.plan, self.precision, magnitudes=magnitudes)

    def linear(self, name: str, device: int = 0) -> nn.Linear:
        module = self.replicas[device].get_submodule(name)
        assert isinstance(module, nn.Linear), f"{name} is not a Linear"
        return module

    def deployed(self, qt: QuantizedTensor, device: torch.device) -> Tensor:
        return deployed(qt, self.model, device)

    def progress(self, module: str, message: str | None = None) -> None:
        self.on_progress(Progress("quantize", self.index, self.model.num_layers, module, message))

    def where(self, device: int, what: str = "") -> str | None:
        """A progress note naming the device, only when there are several."""
        if len(self.devices) == 1:
            return what or None
        return f"{what} on {self.devices[device]}".strip()

    def record(self, name: str, mse: float, relative: float, fallback: bool = False, note: str | None = None) -> None:
        self.result.module_errors.append(ModuleError(self.index, name, mse, relative, fallback, note))
        if fallback:
            self.result.fallback_modules.append(f"layers.{self.index}.{name}: {note}")


class QuantMethod(ABC):
    """How one method solves a decoder layer (see the module docstring)."""

    name: ClassVar[str]
    statistics: ClassVar[frozenset[Statistic]] = frozenset()

    @abstractmethod
    def solve(self, work: LayerWork) -> dict[str, QuantizedTensor]:
        """Every quantized Linear of `work.layer` by name, on the primary device."""


REGISTRY: dict[str, type[QuantMethod]] = {}
M = TypeVar("M", bound=type[QuantMethod])


def register(cls: M) -> M:
    """Class decorator: make `cls` the method of its `name`."""
    if cls.name in REGISTRY:
        raise ValueError(f"two methods are named {cls.name!r}: {REGISTRY[cls.name].__name__} and {cls.__name__}")
    REGISTRY[cls.name] = cls
    return cls
