"""The GGUF grids against the `gguf` package (an independent implementation of ggml's block layouts):
every packed block type dequantizes with `gguf.quants.dequantize` to exactly our values, our RTN bytes of
the legacy types equal `gguf.quants.quantize`'s, and GPTQ on the grid beats RTN on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants

from workers.quant import gguf_grid
from workers.quant.gguf_gptq import gguf_gptq_quantize_shared

ALL = list(gguf_grid.BLOCK_TYPES)
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def _weight(out: int = 48, n: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.04
    w[:, 7] *= 12  # an outlier column
    w[2, :256] = 0.0  # an all-zero super-block
    w[5, 32:64] = 0.01  # a constant block
    return w


@pytest.mark.parametrize("name", ALL)
def test_packed_blocks_dequantize_bit_for_bit_with_gguf(name: str) -> None:
    kind = gguf_grid.block_type(name)
    w = _weight()
    for t in (gguf_grid.quantize(kind, w), gguf_grid.quantize(kind, w, importance=torch.rand(w.shape[1]) + 0.1)):
        packed = t.to_bytes()
        assert packed.dtype == np.uint8 and packed.shape == (48, 512 // kind.block * quants.GGML_QUANT_SIZES[kind.qtype][1])
        theirs = quants.dequantize(packed, kind.qtype)
        ours = t.dequantize().numpy()
        assert theirs.shape == ours.shape
        assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32))
        assert int(t.codes.min()) >= kind.cmin and int(t.codes.max()) <= kind.cmax


@pytest.mark.parametrize("name", LEGACY)
def test_rtn_bytes_equal_gguf_quantize(name: str) -> None:
    kind = gguf_grid.block_type(name)
    w = _weight(seed=1)
    assert np.array_equal(gguf_grid.quantize(kind, w).to_bytes(), quants.quantize(w.numpy(), kind.qtype))


def test_scale_rules_of_the_legacy_types() -> None:
    """Q4_0 d = max/-8 with max the signed value of largest magnitude (it lands on code -8), Q8_0 amax/127."""
    row = torch.linspace(-0.3, 0.2, 32).unsqueeze(0)
    q4 = gguf_grid.quantize(gguf_grid.block_type("Q4_0"), row)
    assert float(q4.fields["d"][0, 0]) == float(torch.tensor(-0.3 / -8).to(torch.float16))
    assert int(q4.codes[0, 0]) == -8
    q8 = gguf_grid.quantize(gguf_grid.block_type("Q8_0"), row)
    assert float(q8.fields["d"][0, 0]) == float(torch.tensor(0.3 / 127).to(torch.float16))
    assert int(q8.codes[0, 0]) == -127


def test_k_quant_sub_scales_live_on_the_super_block_grid() -> None:
    w = _weight(seed=2)
    q4k = gguf_grid.quantize(gguf_grid.block_type("Q4_K"), w)
    assert q4k.fields["sc"].shape == (48, 2, 8) and int(q4k.fields["sc"].max()) == 63  # the largest sub-scale
    assert int(q4k.fields["mn"].min()) >= 0 and int(q4k.fields["mn"].max()) <= 63
    q6k = gguf_grid.quantize(gguf_grid.block_type("Q6_K"), w)
    assert q6k.fields["sc"].shape == (48, 2, 16)
    assert int(q6k.fields["sc"].min()) >= -128 and int(q6k.fields["sc"].max()) <= 127
    q5k = gguf_grid.quantize(gguf_grid.block_type("Q5_K"), w)
    assert int(q5k.codes.max()) == 31 and int(q5k.codes.min()) == 0  # the fifth bit is used
    assert int(q5k.fields["sc"].max()) == 63 and int(q5k.fields["mn"].max()) <= 63
    rel = {n: float(((gguf_grid.quantize(gguf_grid.block_type(n), w).dequantize() - w) ** 2).sum() / (w**2).sum())
           for n in ("Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0")}
    assert rel["Q8_0"] < rel["Q6_K"] < rel["Q5_K"] < rel["Q4_K"] < rel["Q4_0"] < 0.02


def test_k_quants_refuse_rows_that_are_not_whole_super_blocks() -> None:
    with pytest.raises(Exception, match="multiple of 256"):
        gguf_grid.quantize(gguf_grid.block_type("Q4_K"), torch.randn(4, 576))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_gptq_on_the_grid_has_lower_output_error_than_rtn(name: str) -> None:
    kind = gguf_grid.block_type(name)
    g = torch.Generator().manual_seed(3)
    n = 512
    x = torch.randn(2048, n, generator=g) @ (torch.randn(n, n, generator=g) * 0.1 + torch.eye(n))
    hessian = 2 * x.T @ x / x.shape[0]
    w = torch.randn(64, n, generator=g) * 0.05

    def output_error(t: gguf_grid.GGUFTensor) -> float:
        d = t.dequantize() - w
        return float(torch.trace(d @ hessian @ d.T) / torch.trace(w @ hessian @ w.T))

    (solved, fell_back), = gguf_gptq_quantize_shared([w], [kind], hessian)
    rtn = gguf_grid.quantize(kind, w, importance=hessian.diagonal())
    assert not fell_back
    assert solved.fields.keys() == rtn.fields.keys()
    for key in solved.fields:  # the same fixed grid: only the codes differ
        assert torch.equal(solved.fields[key], rtn.fields[key])
    assert output_error(solved) < 0.75 * output_error(rtn)
    packed = solved.to_bytes()
    assert np.array_equal(quants.dequantize(packed, kind.qtype).view(np.uint32), solved.dequantize().numpy().view(np.uint32))
