"""FP8 E4M3 weights (schemes fp8-dynamic / fp8-static / fp8-block): RTN onto the E4M3 grid (workers/quant/fp8.py).

Method `rtn` with a float scheme. Static activations also get each Linear's `input_scale` = max|x| / 448 over
the calibration tokens of its input (one range for a group's shared input); dynamic ones are the runtime's.
"""

from __future__ import annotations

from workers.methods.base import LayerWork, register
from workers.methods.rtn import Rtn
from workers.quant.fp8 import FloatQuantizedTensor, input_scale
from workers.quant.grid import QuantizedTensor


@register
class Fp8Rtn(Rtn):
    name = "rtn:float"
    statistics = frozenset({"second_moment", "abs_max"})

    def solve(self, work: LayerWork) -> dict[str, QuantizedTensor]:
        solved = super().solve(work)
        if work.acts is None or work.spec.scheme.activations != "static":
            return solved
        primary = work.devices[0]
        for group, statistics in work.statistics.items():
            for name in group:  # a tensor each: the checkpoint stores no shared storage
                qt = solved[name]
                assert isinstance(qt, FloatQuantizedTensor)
                qt.input_scale = input_scale(statistics.abs_max(primary), work.dtype)
        return solved
