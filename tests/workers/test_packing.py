"""Bit packing must match compressed-tensors' own packer word for word, and round-trip exactly."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from workers.formats.packing import pack_int32, unpack_int32

LENGTHS = (1, 31, 32, 33, 64, 100, 576)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("length", LENGTHS)
def test_matches_compressed_tensors_along_last_dim(bits: int, length: int) -> None:
    torch.manual_seed(length * 10 + bits)
    values = torch.randint(0, 2**bits, (5, length))
    signed = (values - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors packs signed int8 codes
    packed = pack_int32(values, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, -(-length * bits // 32))
    assert torch.equal(packed, pack_to_int32(signed, bits))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size((5, length))), signed)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_compressed_tensors_along_dim0(bits: int) -> None:
    """Zero points are packed along the output dim; we do that by transposing around pack_int32."""
    values = torch.randint(0, 2**bits, (70, 3))
    ours = pack_int32(values.T.contiguous(), bits).T
    theirs = pack_to_int32((values - 2 ** (bits - 1)).to(torch.int8), bits, packed_dim=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("length", LENGTHS)
def test_round_trip_is_bit_exact(bits: int, length: int) -> None:
    values = torch.randint(0, 2**bits, (2, 3, length), dtype=torch.int32)
    values[0, 0, 0] = 2**bits - 1  # the top bit of the first value, sign bit of an 8-bit top word, …
    values[-1, -1, -1] = 2**bits - 1
    assert torch.equal(unpack_int32(pack_int32(values, bits), bits, length), values)


def test_four_bit_layout_is_lsb_first() -> None:
    values = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15]])
    packed = pack_int32(values, 4)
    assert packed.tolist() == [[0x87654321 - 2**32, 15]]  # value j in word j // 8 at bits 4·(j % 8)


def test_three_bit_values_straddle_words() -> None:
    """Value 10 of a 3-bit row occupies stream bits 30..32: two bits end word 0, one starts word 1."""
    values = torch.zeros(1, 32, dtype=torch.int32)
    values[0, 10] = 0b111
    assert pack_int32(values, 3).tolist() == [[-(2**31) + 2**30, 1, 0]]


def test_bad_inputs_are_rejected_with_a_reason() -> None:
    with pytest.raises(ValueError, match=r"lie in \[0, 15\]"):
        pack_int32(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match=r"lie in \[0, 15\]"):
        pack_int32(torch.tensor([[-1]]), 4)
    with pytest.raises(ValueError, match="integer values"):
        pack_int32(torch.tensor([[1.0]]), 4)
    with pytest.raises(ValueError, match="1 to 8 bits"):
        pack_int32(torch.tensor([[1]]), 16)
    with pytest.raises(ValueError, match="take 2 words, got 1"):
        unpack_int32(torch.zeros(1, 1, dtype=torch.int32), 4, 9)
