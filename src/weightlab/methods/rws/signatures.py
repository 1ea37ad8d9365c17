"""Robust weight signatures (paper key ``rws``; Cai, Zhang & Wang, ICML 2023).

Models fine-tuned from one pretrained ``θ_pre``: a clean one ``θ_clean`` and one per corruption ``θ_c``. For
each of the first ``k`` (shallow) layers ``L``, with ``a = θ_clean[L] − θ_pre[L]`` and
``d = θ_c[L] − θ_pre[L]``
flattened, the signature is ``d`` with its component along the clean direction removed:

    RWS_c[L] = d − (⟨d, a⟩ / ‖a‖²) · a

Patching adds ``Σ_c s_c · RWS_c`` to those layers of any clean model of the same architecture; :func:`unpatch`
puts back the saved original tensors, so the clean model is restored bit for bit. Signatures are quantized
to ``b`` bits with uniform levels over each tensor's own range (the reference's ``linear_quant``) and
bit-packed, so a signature of a few shallow layers at 8 bits is far smaller than a copy of the weights.

Decisions (see ``docs/robustness.md``): the scale is applied once (the reference applies it twice, so its
effective coefficient is ``s²``); BatchNorm tensors are not part of a signature (the reference replaces them
by the mean over the robust models) — use models without BatchNorm, or accept that BN statistics stay clean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.methods.quant.pack import pack_codes, unpack_codes
from weightlab.methods.rift.rift import weight_modules

Signature = dict[str, Tensor]


def shallow_keys(model: nn.Module, k: int) -> list[str]:
    """State-dict keys (weight and bias) of the first ``k`` conv/linear modules of ``model``."""
    modules = weight_modules(model)
    if not 1 <= k <= len(modules):
        raise WeightlabError(f"k must be between 1 and the {len(modules)} conv/linear modules, got {k}")
    keys = []
    for name in modules[:k]:
        keys += [f"{name}.{p}" for p, _ in model.get_submodule(name).named_parameters(recurse=False)]
    return keys


def check_compatible(reference: dict[str, Tensor], other: dict[str, Tensor], *, what: str) -> None:
    """Raise :class:`WeightlabError` naming the keys of ``other`` that ``reference`` lacks or shapes
    differently."""
    missing = [k for k in other if k not in reference]
    shapes = [k for k in other if k in reference and reference[k].shape != other[k].shape]
    if missing or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys the model lacks (first: {missing[:3]})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} keys of another shape (first: {k!r} {tuple(other[k].shape)} vs "
                f"{tuple(reference[k].shape)})"
            )
        raise WeightlabError(f"{what} does not match this architecture: " + "; ".join(parts))


def project_out(delta: Tensor, direction: Tensor) -> Tensor:
    """``delta − (⟨delta, direction⟩ / ‖direction‖²) · direction`` (``delta`` if the direction is 0)."""
    d, a = delta.flatten().double(), direction.flatten().double()
    norm2 = torch.dot(a, a)
    if norm2 == 0:
        return delta.clone()
    return (d - torch.dot(d, a) / norm2 * a).view_as(delta).to(delta.dtype)


def extract_signature(
    pretrained: dict[str, Tensor], clean: dict[str, Tensor], robust: dict[str, Tensor], keys: Sequence[str]
) -> Signature:
    """The robust weight signature of ``robust`` for ``keys``: ``θ_c − θ_pre`` with the direction of
    ``θ_clean − θ_pre`` projected out, tensor by tensor (all three state dicts from one pretrained model)."""
    for what, state in (("the clean state dict", clean), ("the robust state dict", robust)):
        check_compatible(pretrained, {k: state[k] for k in keys if k in state}, what=what)
        absent = [k for k in keys if k not in state or k not in pretrained]
        if absent:
            raise WeightlabError(
                f"{what} or the pretrained one lacks {len(absent)} keys (first: {absent[0]!r})"
            )
    return {k: project_out(robust[k] - pretrained[k], clean[k] - pretrained[k]) for k in keys}


# ------------------------------------------------------------------------------------------- quantization
@dataclass(frozen=True)
class QuantizedTensor:
    """``bits``-bit codes of a tensor, bit-packed into ``packed`` (uint8), with its range ``[lo, hi]``."""

    packed: Tensor
    lo: float
    hi: float
    bits: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 8  # codes + two float32 range values


def quantize(tensor: Tensor, bits: int) -> QuantizedTensor:
    """Uniform ``2^bits`` levels over ``[min, max]`` of ``tensor``; codes bit-packed."""
    if not 1 <= bits <= 8:
        raise WeightlabError(f"bits must be between 1 and 8, got {bits}")
    flat = tensor.detach().flatten().float().cpu()
    lo, hi = float(flat.min()), float(flat.max())
    levels = 2**bits - 1
    scale = (hi - lo) / levels if hi > lo else 1.0
    codes = torch.round((flat - lo) / scale).clamp_(0, levels)
    offset = 2 ** (bits - 1)  # unsigned codes [0, 2^b) stored as the signed codes pack_codes expects
    return QuantizedTensor(pack_codes(codes.long() - offset, bits), lo, hi, bits, tuple(tensor.shape))


def dequantize(q: QuantizedTensor) -> Tensor:
    n = math.prod(q.shape)
    levels = 2**q.bits - 1
    scale = (q.hi - q.lo) / levels if q.hi > q.lo else 1.0
    codes = unpack_codes(q.packed, q.bits, (n,)).long() + 2 ** (q.bits - 1)
    return (q.lo + codes.float() * scale).view(q.shape)


def quantize_signature(signature: Signature, bits: int) -> dict[str, QuantizedTensor]:
    return {k: quantize(v, bits) for k, v in signature.items()}


def dequantize_signature(quantized: dict[str, QuantizedTensor]) -> Signature:
    return {k: dequantize(q) for k, q in quantized.items()}


def signature_bytes(signature: Signature | dict[str, QuantizedTensor]) -> int:
    """Storage of a signature: packed codes plus ranges when quantized, else the raw tensor bytes."""
    return sum(
        v.nbytes if isinstance(v, QuantizedTensor) else v.numel() * v.element_size()
        for v in signature.values()
    )


# ------------------------------------------------------------------------------------------- patching
def apply_signatures(
    state: dict[str, Tensor], signatures: Sequence[Signature], scales: Sequence[float]
) -> dict[str, Tensor]:
    """Pure form: ``state`` with ``Σ_c s_c · RWS_c`` added to the signed tensors (a new dict)."""
    if len(signatures) != len(scales):
        raise WeightlabError(f"got {len(signatures)} signatures but {len(scales)} scales (one scale each)")
    out = dict(state)
    for sig, scale in zip(signatures, scales, strict=True):
        check_compatible(state, sig, what="signature")
        for k, v in sig.items():
            out[k] = out[k] + scale * v.to(out[k])  # the weight's dtype and device
    return out


@dataclass
class Patch:
    """What :func:`patch` changed: the original tensors of the patched keys (for an exact :func:`unpatch`)."""

    originals: dict[str, Tensor]


@torch.no_grad()
def patch(
    model: nn.Module, signatures: Sequence[Signature], scales: Sequence[float] | None = None
) -> Patch:
    """Add ``Σ_c s_c · RWS_c`` to ``model``'s weights in place (default scales 1); returns a
    :class:`Patch`."""
    scales = [1.0] * len(signatures) if scales is None else list(scales)
    state = model.state_dict()
    patched = apply_signatures(state, signatures, scales)
    keys = sorted({k for sig in signatures for k in sig})
    handle = Patch({k: state[k].detach().clone() for k in keys})
    for k in keys:
        state[k].copy_(patched[k])
    return handle


@torch.no_grad()
def unpatch(model: nn.Module, handle: Patch) -> None:
    """Restore the tensors saved by :func:`patch` exactly (bitwise)."""
    state = model.state_dict()
    check_compatible(state, handle.originals, what="patch")
    for k, v in handle.originals.items():
        state[k].copy_(v)
