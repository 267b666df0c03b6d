"""Pack a `GGUFTensor` into ggml's block layouts (ggml-common.h), byte for byte as ggml-quants.c does.

Each row of `[out, in]` becomes `in / block` consecutive blocks; every function below takes the stored
(unsigned) codes `[n_blocks, block]` and the fields `[n_blocks, ...]` and returns uint8 `[n_blocks, bytes]`.
The `gguf` package packs none of the K-quants; tests/workers/test_gguf_grid.py reads every layout back with
`gguf.quants.dequantize`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES

from workers.quant.gguf_grid import GGUFTensor

U8 = np.uint8


def _f16_bytes(x: torch.Tensor, n_blocks: int) -> np.ndarray:
    return x.to(torch.float16).reshape(n_blocks, 1).numpy().view(U8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """32 codes → 16 bytes: byte j holds code j (low nibble) and code j + 16 (high nibble)."""
    half = q.shape[1] // 2
    return (q[:, :half] & 0x0F) | ((q[:, half:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of 32 codes as one little-endian uint32 (bit j = code j)."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _legacy(q: np.ndarray, f: dict[str, torch.Tensor]) -> list[np.ndarray]:
    n = q.shape[0]
    parts = [_f16_bytes(f["d"], n)]
    if "m" in f:
        parts.append(_f16_bytes(f["m"], n))
    return parts


def _q4_0(q: np.ndarray, f: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([*_legacy(q, f), _nibbles(q)], axis=1)


def _q5(q: np.ndarray, f: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([*_legacy(q, f), _high_bits(q), _nibbles(q)], axis=1)


def _q8_0(q: np.ndarray, f: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([_f16_bytes(f["d"], q.shape[0]), q.astype(np.int16).astype(np.int8).view(U8)], axis=1)


def _q4_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins → 12 bytes (ggml's get_scale_min_k4 layout)."""
    out = np.zeros((sc.shape[0], 12), dtype=U8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def _q4_k(q: np.ndarray, f: dict[str, torch.Tensor]) -> np.ndarray:
    n = q.shape[0]
    chunks = q.reshape(n, 4, 2, 32)  # 64 values per 32 bytes: the first 32 in low nibbles, the next in high
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, 128)
    sc = f["sc"].reshape(n, 8).numpy().astype(U8)
    mn = f["mn"].reshape(n, 8).numpy().astype(U8)
    return np.concatenate([_f16_bytes(f["d"], n), _f16_bytes(f["dmin"], n), _q4_k_scales(sc, mn), qs], axis=1)


def _q5_k(q: np.ndarray, f: dict[str, torch.Tensor]) -> np.ndarray:
    """Q4_K's layout of the low four bits, plus qh: bit b of byte j is bit 4 of code 32·b + j."""
    n = q.shape[0]
    low = _q4_k(q & 0x0F, f)
    high = ((q >> 4) & 1).reshape(n, 8, 32)
    qh = np.zeros((n, 32), dtype=U8)
    for b in range(8):
        qh |= (high[:, b] << b).astype(U8)
    return np.concatenate([low[:, :16], qh, low[:, 16:]], axis=1)


def _q6_k(q: np.ndarray, f: dict[str, torch.Tensor]) -> np.ndarray:
    n = q.shape[0]
    halves = q.reshape(n, 2, 4, 32)  # per 128 values: four runs of 32 (l, l+32, l+64, l+96)
    low = halves & 0x0F
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    high = halves >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    sc = f["sc"].reshape(n, 16).numpy().astype(np.int8).view(U8)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc, _f16_bytes(f["d"], n)], axis=1)


PACKERS: dict[str, Callable[[np.ndarray, dict[str, torch.Tensor]], np.ndarray]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_0,
    "Q5_0": _q5,
    "Q5_1": _q5,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def pack(t: GGUFTensor) -> np.ndarray:
    """uint8 `[out, in / block · bytes_per_block]`."""
    kind = t.kind
    out, n = t.shape
    n_blocks = out * (n // kind.block)
    stored = (t.codes.cpu().to(torch.int32) + kind.offset).reshape(n_blocks, kind.block).numpy()
    q = stored.astype(np.int16) if kind.name == "Q8_0" else stored.astype(U8)
    fields = {name: value.cpu().reshape(n_blocks, -1) for name, value in t.fields.items()}
    packed = PACKERS[kind.name](q, fields)
    expected = GGML_QUANT_SIZES[kind.qtype][1]
    assert packed.shape == (n_blocks, expected), (packed.shape, expected)
    return np.ascontiguousarray(packed).reshape(out, -1)
