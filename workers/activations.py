"""The calibration hidden states between decoder layers, split by samples over the job's devices.

`ShardedActivations` holds one `Activations` per device (one device: the whole set, not copied) with every
decoder layer's arguments on every device. `capture_inputs` runs a layer over one device's windows and hands
each Linear group's input to a collector (workers/statistics.py sums them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from workers.devices import DeviceThreads, shard_bounds
from workers.loading import LayerCall, run_decoder_layer
from workers.model_graph import Group, LayerPlan
from workers.options import PipelineOptions


class Activations:
    """Hidden states `[samples, seq, hidden]` of calibration windows on one device, processed in chunks of samples."""

    def __init__(self, hidden: Tensor, device: torch.device, options: PipelineOptions) -> None:
        self.device = device
        self.rows_per_chunk = max(1, options.batch_tokens // hidden.shape[1])
        home = self._home(hidden, device, options)
        self.hidden = hidden.to(home)
        if home.type == "cpu" and device.type == "cuda":  # offloaded: pinned, so chunk copies are fast DMA
            self.hidden = self.hidden.pin_memory()

    @staticmethod
    def _home(hidden: Tensor, device: torch.device, options: PipelineOptions) -> torch.device:
        if device.type != "cuda":
            return device
        free, _ = torch.cuda.mem_get_info(device)
        fits = 2 * hidden.numel() * hidden.element_size() < options.device_activation_fraction * free
        return device if fits else torch.device("cpu")

    def chunks(self) -> list[tuple[int, int]]:
        n = self.hidden.shape[0]
        return [(a, min(a + self.rows_per_chunk, n)) for a in range(0, n, self.rows_per_chunk)]

    def probe(self) -> Tensor:
        """One window on the device: enough for a forward that only looks at the layer's structure."""
        return self.hidden[:1].to(self.device)

    def forward(self, layer: nn.Module, call: LayerCall, *, update: bool) -> None:
        """Run `layer` over all windows; with `update`, its outputs replace the stored hidden states."""
        for a, b in self.chunks():
            out = run_decoder_layer(layer, self.hidden[a:b].to(self.device), call)
            if update:
                self.hidden[a:b] = out.to(self.hidden.device)


class _InputsCaptured(Exception):
    """Raised by the last capture hook: the rest of the layer's forward is not needed."""


def capture_inputs(
    layer: nn.Module, activations: Activations, call: LayerCall, plan: LayerPlan, collect: Callable[[Group, Tensor], None]
) -> None:
    """Forward the layer over all windows, handing each Linear group's input `[tokens, in]` to `collect`.

    The forward of each chunk stops once the last group's input is seen (saving its matmul, a quarter of
    a Llama layer's work): only inputs are wanted here, the outputs come from the quantized layer later.
    """
    last = plan.groups[-1]
    handles = []
    for group in plan.groups:

        def hook(_module: nn.Module, args: tuple[Tensor, ...], group: Group = group) -> None:
            collect(group, args[0].detach().reshape(-1, args[0].shape[-1]))
            if group == last:
                raise _InputsCaptured

        handles.append(layer.get_submodule(group[0]).register_forward_pre_hook(hook))
    try:
        for a, b in activations.chunks():
            with contextlib.suppress(_InputsCaptured):
                run_decoder_layer(layer, activations.hidden[a:b].to(activations.device), call)
    finally:
        for handle in handles:
            handle.remove()


class ShardedActivations:
    """The calibration hidden states split by samples, one `Activations` per device, with every decoder layer's
    arguments on every device (`positions`: those of the layer set by `at_layer`)."""

    def __init__(self, hidden: Tensor, calls: Sequence[LayerCall], devices: Sequence[torch.device], options: PipelineOptions):
        self.devices = list(devices)
        self.bounds = shard_bounds(hidden.shape[0], len(self.devices))
        self.seq_len = hidden.shape[1]
        # several: clone, as a view would keep the whole tensor alive on the primary
        parts = [hidden] if len(self.devices) == 1 else [hidden[a:b].clone() for a, b in self.bounds]
        self.shards = [Activations(part, d, options) for part, d in zip(parts, self.devices, strict=True)]
        self.calls = [[call.to(d) for call in calls] for d in self.devices]
        self.positions = [per_device[0] for per_device in self.calls] if calls else []
        self.threads = DeviceThreads(self.devices)  # every multi-device step of the job runs on these

    def close(self) -> None:
        self.threads.close()

    def at_layer(self, index: int) -> None:
        """Run the next steps with decoder layer `index`'s arguments."""
        self.positions = [per_device[index] for per_device in self.calls]

    @property
    def num_tokens(self) -> int:
        return self.bounds[-1][1] * self.seq_len

    def forward(self, replicas: Sequence[nn.Module], *, update: bool) -> None:
        """Each device runs its shard through its replica (see `Activations.forward`)."""
        self.threads.run(lambda i: self.shards[i].forward(replicas[i], self.positions[i], update=update))

    def gather(self, device: torch.device) -> Tensor:
        return torch.cat([shard.hidden.to(device) for shard in self.shards])
