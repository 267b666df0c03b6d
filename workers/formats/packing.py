"""Dense LSB-first bit packing of small unsigned integers into int32 words.

Each row of `bits`-bit values is treated as one bit stream: value j occupies bits [j·bits, (j+1)·bits) of
the stream, and word w holds stream bits [32·w, 32·w + 32), least significant first. For 2, 4 and 8 bits
this is the classic layout (4-bit value j sits in word j // 8 at bit 4·(j % 8)), shared by GPTQ v1 and
compressed-tensors; for 3 bits values straddle word boundaries, which is compressed-tensors' dense layout
since 0.18 (32 values fill exactly 3 words). Rows need no padding beyond the last word.

Packing works on blocks of 32 values (= `bits` words) so a value never spans more than two words of its
block; the arithmetic is int64, and words are reinterpreted as signed int32 at the end.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLOCK = 32  # values per block; a block fills exactly `bits` words


def _check(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing supports 1 to 8 bits, not {bits}")


def _bit_layout(bits: int) -> list[tuple[int, int, int, int, int]]:
    """Pieces of one block: (value index, bit offset in the value, word, shift in the word, width).

    A value that straddles two words is two pieces: its low bits end one word, its high bits start the next.
    """
    pieces = []
    for j in range(BLOCK):
        start = j * bits
        low = min(bits, 32 - start % 32)
        pieces.append((j, 0, start // 32, start % 32, low))
        if low < bits:
            pieces.append((j, low, start // 32 + 1, 0, bits - low))
    return pieces


def pack_int32(values: Tensor, bits: int) -> Tensor:
    """Pack integers in [0, 2^bits) along the last dim: `[..., n]` → int32 `[..., ceil(n·bits/32)]`."""
    _check(bits)
    if values.is_floating_point():
        raise ValueError(f"pack_int32 takes integer values, got {values.dtype}")
    n = values.shape[-1]
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise ValueError(f"values to pack in {bits} bits must lie in [0, {2**bits - 1}]")
    lead = values.shape[:-1]
    blocks = math.ceil(n / BLOCK)
    padded = torch.nn.functional.pad(values.to(torch.int32), (0, blocks * BLOCK - n)).reshape(
        *lead, blocks, BLOCK
    )
    words = torch.zeros(*lead, blocks, bits, dtype=torch.int64, device=values.device)
    for j, value_offset, word, shift, width in _bit_layout(bits):
        part = (padded[..., j].to(torch.int64) >> value_offset) & ((1 << width) - 1)
        words[..., word] |= part << shift
    words = words.reshape(*lead, blocks * bits)[..., : math.ceil(n * bits / 32)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: Tensor, bits: int, num_values: int) -> Tensor:
    """Inverse of `pack_int32`: int32 `[..., words]` → int32 values in [0, 2^bits) `[..., num_values]`."""
    _check(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_int32 takes int32 words, got {packed.dtype}")
    words_needed = math.ceil(num_values * bits / 32)
    if packed.shape[-1] != words_needed:
        raise ValueError(
            f"{num_values} values of {bits} bits take {words_needed} words, got {packed.shape[-1]}"
        )
    lead = packed.shape[:-1]
    blocks = math.ceil(num_values / BLOCK)
    words = torch.nn.functional.pad(packed, (0, blocks * bits - words_needed)).reshape(*lead, blocks, bits)
    values = torch.zeros(*lead, blocks, BLOCK, dtype=torch.int32, device=packed.device)
    for j, value_offset, word, shift, width in _bit_layout(bits):
        part = (words[..., word].to(torch.int64) >> shift) & ((1 << width) - 1)
        values[..., j] |= part.to(torch.int32) << value_offset
    return values.reshape(*lead, blocks * BLOCK)[..., :num_values]
