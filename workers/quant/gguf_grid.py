"""GGUF's own weight grids (ggml block types), as our solvers see them and as the file stores them.

A weight `[out, in]` is cut along the input dimension (ggml's `ne[0]`) into blocks. Every block type here
reduces to one rule per *sub-block* of `sub` consecutive columns:

    value = scale · c + bias          c an integer in [cmin, cmax], scale and bias float32

with `scale` and `bias` computed from the file's own fields exactly as ggml dequantizes them, so
`GGUFTensor.dequantize()` equals `gguf.quants.dequantize` of the packed bytes bit for bit:

| type | sub | c range    | scale, bias (float32)            | file fields per super-block            |
|------|-----|------------|----------------------------------|----------------------------------------|
| Q4_0 | 32  | [-8, 7]    | d, none                          | d fp16 (d = max/-8, max the signed value of largest magnitude) |
| Q5_0 | 32  | [-16, 15]  | d, none                          | d fp16 (d = max/-16)                   |
| Q8_0 | 32  | [-128,127] | d, none                          | d fp16 (d = amax/127)                  |
| Q4_1 | 32  | [0, 15]    | d, m                             | d, m fp16 (d = (max-min)/15, m = min)  |
| Q5_1 | 32  | [0, 31]    | d, m                             | d, m fp16                              |
| Q4_K | 32  | [0, 15]    | d·sc, -(dmin·mn)                 | d, dmin fp16 per 256; sc, mn 6-bit ×8  |
| Q5_K | 32  | [0, 31]    | d·sc, -(dmin·mn)                 | as Q4_K (+ one high bit per code)      |
| Q6_K | 16  | [-32, 31]  | d·sc, none                       | d fp16 per 256; sc int8 ×16            |

`choose_params` picks the fields from a weight the way llama.cpp's reference quantizers do (ggml-quants.c:
the legacy types' max rules; `make_qkx2_quants` for Q4_K's and Q5_K's sub-block scale/min with weights av_x + |x|,
`make_qx_quants` for Q6_K's), the K-quant sub-scales already quantized to the super-block's 6-/8-bit
grid. With `importance` (E[x²] of each input column, the diagonal of the Hessian) the K-quant searches weigh
each column as llama.cpp does with an importance matrix (qw·sqrt(σ² + x²)). The fields are then fixed: RTN
rounds every weight to its sub-block's grid (`rtn_codes`, ggml's own rounding for the legacy types, so our
RTN Q4_0/Q4_1/Q5_x/Q8_0 bytes equal `gguf.quants.quantize`'s), and GPTQ (`workers/quant/gguf_gptq.py`)
sweeps columns against the same fixed grid with `nearest_codes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import Tensor

from workers.errors import InvalidSpecError

QK_K = 256
GROUP_MAX_EPS = 1e-15


@dataclass(frozen=True)
class BlockType:
    """One ggml block type as a grid: sub-block width, code range, super-block width."""

    name: str
    sub: int  # columns sharing one scale (and bias)
    cmin: int
    cmax: int
    block: int  # columns of one packed block (32, or 256 for K-quants)
    has_bias: bool
    offset: int  # stored unsigned code = c + offset

    @property
    def qtype(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def bits_per_weight(self) -> float:
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.qtype]
        return 8.0 * size / block


BLOCK_TYPES: dict[str, BlockType] = {
    "Q4_0": BlockType("Q4_0", 32, -8, 7, 32, False, 8),
    "Q5_0": BlockType("Q5_0", 32, -16, 15, 32, False, 16),
    "Q8_0": BlockType("Q8_0", 32, -128, 127, 32, False, 0),
    "Q4_1": BlockType("Q4_1", 32, 0, 15, 32, True, 0),
    "Q5_1": BlockType("Q5_1", 32, 0, 31, 32, True, 0),
    "Q4_K": BlockType("Q4_K", 32, 0, 15, QK_K, True, 0),
    "Q5_K": BlockType("Q5_K", 32, 0, 31, QK_K, True, 0),
    "Q6_K": BlockType("Q6_K", 16, -32, 31, QK_K, False, 32),
}


def block_type(name: str) -> BlockType:
    if name not in BLOCK_TYPES:
        raise InvalidSpecError(f"GGUF block type {name!r} is not supported; choose one of {list(BLOCK_TYPES)}")
    return BLOCK_TYPES[name]


def fits(kind: BlockType, in_features: int) -> bool:
    """ggml blocks tile each row (`ne[0]`) exactly; K-quants need a multiple of 256."""
    return in_features % kind.block == 0


@dataclass
class GGUFTensor:
    """A weight on one GGUF grid: its codes plus the file's fields (see the module docstring)."""

    kind: BlockType
    codes: Tensor  # int16 [out, in], c in [cmin, cmax]
    fields: dict[str, Tensor] = field(default_factory=dict)  # d, m / dmin (float16), sc, mn (int16)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def grid(self) -> tuple[Tensor, Tensor | None]:
        return grid_of(self.kind, self.fields)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense `[out, in]`: scale·c + bias in float32 (ggml's order of operations), then `dtype`."""
        scale, bias = self.grid()
        return apply_grid(self.codes, scale, bias, self.kind.sub).to(dtype)

    def to_bytes(self) -> np.ndarray:
        """The packed ggml blocks, uint8 `[out, in / block · block_bytes]` (what GGUFWriter takes)."""
        from workers.formats.gguf_blocks import pack

        return pack(self)


def _expand(params: Tensor, sub: int) -> Tensor:
    return params.repeat_interleave(sub, dim=1)


def apply_grid(codes: Tensor, scale: Tensor, bias: Tensor | None, sub: int) -> Tensor:
    """scale·c (+ bias) per sub-block of `sub` columns, float32; works on any column range of whole sub-blocks."""
    values = codes.to(torch.float32) * _expand(scale, sub)
    return values if bias is None else values + _expand(bias, sub)


def grid_of(kind: BlockType, fields: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """(scale, bias) float32 `[out, in / sub]` from the file's fields, as ggml computes them."""
    d = fields["d"].to(torch.float32)
    if kind.name in ("Q4_0", "Q5_0", "Q8_0"):
        return d, None
    if kind.name in ("Q4_1", "Q5_1"):
        return d, fields["m"].to(torch.float32)
    per = QK_K // kind.sub  # sub-blocks per super-block
    scale = (d.unsqueeze(2) * fields["sc"].to(torch.float32)).flatten(1)
    if kind.name == "Q6_K":
        return scale, None
    assert per == 8
    dmin = fields["dmin"].to(torch.float32)
    return scale, -(dmin.unsqueeze(2) * fields["mn"].to(torch.float32)).flatten(1)


def _blocks(w: Tensor, width: int) -> Tensor:
    out, n = w.shape
    return w.reshape(out, n // width, width)


def _fp16(x: Tensor) -> Tensor:
    """ggml's GGML_FP32_TO_FP16 (round to nearest even)."""
    return x.to(torch.float16)


def _safe_reciprocal(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _signed_max(blocks: Tensor) -> Tensor:
    """The value of largest magnitude in each block, with its sign (the first one on ties, as ggml)."""
    index = blocks.abs().argmax(dim=-1, keepdim=True)
    return torch.take_along_dim(blocks, index, dim=-1).squeeze(-1)


def _round_away(x: Tensor) -> Tensor:
    """C's roundf (half away from zero), exactly as gguf's np_roundf computes it."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def choose_params(kind: BlockType, weight: Tensor, importance: Tensor | None = None) -> dict[str, Tensor]:
    """The file's fields for `weight` `[out, in]` (see the module docstring); `importance` `[in]` or None."""
    w = weight.detach().to(torch.float32)
    if not fits(kind, w.shape[1]):
        raise InvalidSpecError(f"{kind.name} needs rows of a multiple of {kind.block} values, not {w.shape[1]}")
    if not bool(torch.isfinite(w).all()):
        raise InvalidSpecError("the weight has non-finite values (inf or NaN); quantization needs finite weights")
    if kind.name in ("Q4_0", "Q5_0"):
        return {"d": _fp16(_signed_max(_blocks(w, 32)) / kind.cmin)}
    if kind.name == "Q8_0":
        return {"d": _fp16(_blocks(w, 32).abs().amax(dim=-1) / 127)}
    if kind.name in ("Q4_1", "Q5_1"):
        blocks = _blocks(w, 32)
        lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)
        return {"d": _fp16((hi - lo) / kind.cmax), "m": _fp16(lo)}
    if kind.name in K_MIN_SEARCH:
        return _k_min_params(w, importance, kind.cmax, *K_MIN_SEARCH[kind.name])
    return _q6_k_params(w, importance)


def rtn_codes(kind: BlockType, weight: Tensor, fields: dict[str, Tensor]) -> Tensor:
    """Each weight rounded on its sub-block's fixed grid the way ggml's reference quantizer rounds it:
    the legacy types from the unrounded scale (trunc(x/d + 8.5) for Q4_0, roundf for Q8_0, ...), K-quants
    with nearest_int on the stored one. Bytes equal `gguf.quants.quantize` for the legacy types."""
    w = weight.detach().to(torch.float32)
    if kind.name not in ("Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"):
        return nearest_codes(kind, w, *grid_of(kind, fields))
    blocks = _blocks(w, 32)
    if kind.name == "Q8_0":
        d = blocks.abs().amax(dim=-1, keepdim=True) / 127
        return _round_away(blocks * _safe_reciprocal(d)).reshape(w.shape).to(torch.int16)
    if kind.name in ("Q4_0", "Q5_0"):
        d = _signed_max(blocks).unsqueeze(-1) / kind.cmin
        half = float(-kind.cmin) + 0.5
        q = torch.trunc(blocks * _safe_reciprocal(d) + half).clamp(0, kind.cmax - kind.cmin)
        return (q - kind.offset).reshape(w.shape).to(torch.int16)
    lo = blocks.amin(dim=-1, keepdim=True)
    d = (blocks.amax(dim=-1, keepdim=True) - lo) / kind.cmax
    q = torch.trunc((blocks - lo) * _safe_reciprocal(d) + 0.5).clamp(0, kind.cmax)
    return q.reshape(w.shape).to(torch.int16)


def nearest_codes(kind: BlockType, w: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """c = clamp(round((w - bias) / scale)) on the fixed grid (c = 0 where a sub-block's scale is 0); `w`
    any whole number of sub-blocks, `scale`/`bias` its sub-blocks."""
    s = _expand(scale, kind.sub)
    x = w.to(torch.float32) if bias is None else w.to(torch.float32) - _expand(bias, kind.sub)
    q = torch.round(x / torch.where(s == 0, torch.ones_like(s), s))
    q = torch.where(s == 0, torch.zeros_like(q), q)
    return q.clamp(kind.cmin, kind.cmax).to(torch.int16)


def quantize(kind: BlockType, weight: Tensor, importance: Tensor | None = None) -> GGUFTensor:
    """Round-to-nearest on the GGUF grid: fields by `choose_params`, codes by ggml's rounding."""
    fields = choose_params(kind, weight, importance)
    return GGUFTensor(kind, rtn_codes(kind, weight, fields), fields)


# ---- K-quant parameter searches (ggml-quants.c, vectorized over sub-blocks) ----------------------------


def _k_weights(w: Tensor, importance: Tensor | None, sub: int, q6: bool) -> Tensor:
    """Per-value weights of the sub-block searches, `[out, n_sub, sub]`.

    Without importance: Q4_K av_x + |x| (av_x the sub-block's RMS), Q6_K x². With importance qw (E[x²] of the
    column): qw·sqrt(σ² + x²), σ² the super-block's mean x² (·2 for Q4_K), as llama.cpp with an imatrix."""
    blocks = _blocks(w, sub)
    if importance is None:
        if q6:
            return blocks.square()
        return blocks.square().mean(dim=-1, keepdim=True).sqrt() + blocks.abs()
    supers = _blocks(w, QK_K)
    sigma2 = supers.square().mean(dim=-1, keepdim=True) * (1.0 if q6 else 2.0)
    qw = importance.to(w.device, torch.float32).reshape(1, -1, QK_K)
    return (qw * (sigma2 + supers.square()).sqrt()).reshape(blocks.shape)


def _make_qkx2(x: Tensor, weights: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[Tensor, Tensor]:
    """ggml's make_qkx2_quants over `[..., n]`: (scale, min ≥ 0) with x ≈ scale·l - min, l in [0, nmax]."""
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = x.amax(dim=-1, keepdim=True)
    flat = hi == lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    sum_w = weights.sum(dim=-1, keepdim=True)
    sum_x = (weights * x).sum(dim=-1, keepdim=True)

    iscale = nmax / span
    levels = torch.round(iscale * (x - lo)).clamp(0, nmax)
    best_scale, best_min = 1.0 / iscale, lo
    best_error = (weights * (best_scale * levels + best_min - x).square()).sum(dim=-1, keepdim=True)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / span
        levels = torch.round(iscale * (x - lo)).clamp(0, nmax)
        sum_l = (weights * levels).sum(dim=-1, keepdim=True)
        sum_l2 = (weights * levels.square()).sum(dim=-1, keepdim=True)
        sum_xl = (weights * levels * x).sum(dim=-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        safe_det = torch.where(det > 0, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0
        safe_l2 = torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2))
        this_scale = torch.where(positive, sum_xl / safe_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        error = (weights * (this_scale * levels + this_min - x).square()).sum(dim=-1, keepdim=True)
        better = (det > 0) & (error < best_error)
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, this_scale, best_scale)
        best_min = torch.where(better, this_min, best_min)
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    return best_scale.squeeze(-1), (-best_min).squeeze(-1)


def _make_qx(x: Tensor, weights: Tensor, nmax: int) -> Tensor:
    """ggml's make_qx_quants (rmse_type 1) over `[..., n]`: the signed scale with x ≈ scale·l, l in
    [-nmax, nmax-1], searched over iscale = -(nmax + 0.1·k)/max, k = -9..9."""
    max_signed = _signed_max(x).unsqueeze(-1)
    tiny = max_signed.abs() < GROUP_MAX_EPS
    safe_max = torch.where(tiny, torch.ones_like(max_signed), max_signed)

    def fit(iscale: Tensor) -> tuple[Tensor, Tensor]:
        levels = torch.round(iscale * x).clamp(-nmax, nmax - 1)
        return (weights * x * levels).sum(dim=-1, keepdim=True), (weights * levels.square()).sum(dim=-1, keepdim=True)

    sum_lx, sum_l2 = fit(-nmax / safe_max)
    scale = torch.where(sum_l2 > 0, sum_lx / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), torch.zeros_like(sum_l2))
    best = scale * sum_lx
    for k in range(-9, 10):
        if k == 0:
            continue
        lx, l2 = fit(-(nmax + 0.1 * k) / safe_max)
        better = (l2 > 0) & (lx * lx > best * l2)
        this = lx / torch.where(l2 > 0, l2, torch.ones_like(l2))
        scale = torch.where(better, this, scale)
        best = torch.where(better, this * lx, best)
    return torch.where(tiny, torch.zeros_like(scale), scale).squeeze(-1)


# make_qkx2_quants' search (rmin, rdelta, nstep) in quantize_row_q4_K_ref / quantize_row_q5_K_ref
K_MIN_SEARCH: dict[str, tuple[float, float, int]] = {"Q4_K": (-1.0, 0.1, 20), "Q5_K": (-0.5, 0.1, 15)}


def _k_min_params(w: Tensor, importance: Tensor | None, nmax: int, rmin: float, rdelta: float,
                  nstep: int) -> dict[str, Tensor]:
    """Q4_K / Q5_K: per 32-value sub-block a scale and a min (make_qkx2_quants), both then quantized to 6 bits
    of the super-block's d and dmin."""
    out = w.shape[0]
    x = _blocks(w, 32)
    scales, mins = _make_qkx2(x, _k_weights(w, importance, 32, q6=False), nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(out, -1, 8), mins.reshape(out, -1, 8)
    max_scale, max_min = scales.amax(dim=-1, keepdim=True), mins.amax(dim=-1, keepdim=True)
    inv_scale = torch.where(max_scale > 0, 63.0 / torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale)), 0.0)
    inv_min = torch.where(max_min > 0, 63.0 / torch.where(max_min > 0, max_min, torch.ones_like(max_min)), 0.0)
    sc = torch.round(inv_scale * scales).clamp(0, 63).to(torch.int16)
    mn = torch.round(inv_min * mins).clamp(0, 63).to(torch.int16)
    return {"d": _fp16(max_scale.squeeze(-1) / 63), "dmin": _fp16(max_min.squeeze(-1) / 63), "sc": sc, "mn": mn}


def _q6_k_params(w: Tensor, importance: Tensor | None) -> dict[str, Tensor]:
    out = w.shape[0]
    scales = _make_qx(_blocks(w, 16), _k_weights(w, importance, 16, q6=True), 32).reshape(out, -1, 16)
    max_scale = _signed_max(scales).unsqueeze(-1)
    tiny = max_scale.abs() < GROUP_MAX_EPS
    iscale = -128.0 / torch.where(tiny, torch.ones_like(max_scale), max_scale)
    sc = torch.round(iscale * scales).clamp(max=127)
    d = torch.where(tiny, torch.zeros_like(iscale), 1.0 / iscale).squeeze(-1)
    sc = torch.where(tiny, torch.zeros_like(sc), sc).to(torch.int16)
    return {"d": _fp16(d), "sc": sc}
