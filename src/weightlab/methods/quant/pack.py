"""Bit packing of integer weight codes (any width 1–8) into bytes, in torch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from weightlab.errors import WeightlabError


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack signed codes in ``[−2^(b−1), 2^(b−1)−1]`` into ``ceil(numel·bits/8)`` uint8 bytes (LSB first)."""
    low = -(2 ** (bits - 1))
    unsigned = codes.flatten().long() - low  # (numel,) in [0, 2^b)
    if unsigned.numel() and (unsigned.min() < 0 or unsigned.max() >= 2**bits):
        raise WeightlabError(f"codes outside the {bits}-bit range [{low}, {-low - 1}]")
    bit_planes = (unsigned[:, None] >> torch.arange(bits, device=codes.device)) & 1  # (numel, bits)
    flat = bit_planes.flatten()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.reshape(-1, 8) << torch.arange(8, device=codes.device)).sum(1).to(torch.uint8)  # (bytes,)


def unpack_codes(packed: Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of :func:`pack_codes`: int8 codes of ``shape``."""
    numel = math.prod(shape)
    device = packed.device
    flat = ((packed.long()[:, None] >> torch.arange(8, device=device)) & 1).flatten()[: numel * bits]
    unsigned = (flat.reshape(numel, bits) << torch.arange(bits, device=device)).sum(1)  # (numel,)
    return (unsigned - 2 ** (bits - 1)).to(torch.int8).reshape(shape)
