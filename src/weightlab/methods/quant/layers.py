"""Fake-quantized layers: :class:`QuantLinear`, :class:`QuantAttention`, and :class:`IntWeight` (converted).

A weight quantizer (:class:`~.lsq.LsqWeightQuantizer` or :class:`~.statsq.StatsQuantizer`) maps the float
weight to its fake-quantized value in every forward; ``codes(weight)`` gives the integer codes and per-row
scale with ``weight ≈ scale·(codes + offset)``. After :func:`~.api.convert` a layer holds an
:class:`IntWeight` (int8 codes + float scales) instead of the float weight and its quantizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.methods.quant import lsq
from weightlab.methods.quant.act import ActOptions, make_act_quantizer
from weightlab.methods.quant.lsq import LsqWeightQuantizer
from weightlab.methods.quant.statsq import StatsQuantizer

WeightQuantizer = LsqWeightQuantizer | StatsQuantizer


def make_weight_quantizer(weight: Tensor, bits: int, method: str) -> WeightQuantizer:
    """A quantizer for ``weight``: ``method`` is ``"lsq"`` or ``"statsq"``."""
    if method == "lsq":
        return LsqWeightQuantizer(weight, bits)
    if method == "statsq":
        return StatsQuantizer(bits)
    raise WeightlabError(f"quantization method must be 'lsq' or 'statsq', got {method!r}")


class IntWeight(nn.Module):
    """A converted weight: int8 ``codes`` and a per-row ``scale`` with ``weight = scale·(codes + offset)``."""

    def __init__(self, codes: Tensor, scale: Tensor, *, offset: float, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.float())
        self.register_buffer("offset", torch.tensor(float(offset)))

    @classmethod
    def from_quantizer(cls, weight: Tensor, quantizer: WeightQuantizer) -> IntWeight:
        codes, scale = quantizer.codes(weight)
        return cls(codes, scale, offset=quantizer.offset, bits=quantizer.bits)

    def forward(self) -> Tensor:
        return self.scale * (self.codes.float() + self.offset)


class QuantLinear(nn.Module):
    """``y = x̂ Ŵᵀ + b``: a Linear with a fake-quantized weight and (optionally) LSQ-quantized inputs.

    It shares the float ``weight`` and ``bias`` Parameters of the Linear it replaces; ``act`` chooses the input
    quantizer (per-tensor LSQ by default; :class:`~.act.ActOptions` for OFQ's per-token steps and shifts).
    """

    def __init__(self, linear: nn.Linear, *, bits_w: int, bits_a: int | None, method: str,
                 act: ActOptions = ActOptions()) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits = bits_w
        self.weight: nn.Parameter | None = linear.weight
        self.bias = linear.bias
        self.weight_quantizer: nn.Module | None = make_weight_quantizer(linear.weight, bits_w, method)
        self.input_quantizer = make_act_quantizer(bits_a, options=act)
        self.int_weight: IntWeight | None = None

    def quantized_weight(self) -> Tensor:
        """The weight the forward uses ``(out, in)``: fake-quantized, or dequantized after conversion."""
        if self.int_weight is not None:
            return self.int_weight()
        return self.weight_quantizer(self.weight)

    @torch.no_grad()
    def integer_codes(self) -> Tensor:
        """The integer code of every weight ``(out, in)`` (what the oscillation tracker watches)."""
        if self.int_weight is not None:
            return self.int_weight.codes.float()
        return self.weight_quantizer.codes(self.weight)[0]

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)

    def convert_(self) -> None:
        """Replace the float weight and its quantizer by an :class:`IntWeight` (in place)."""
        if self.int_weight is not None:
            return
        self.int_weight = IntWeight.from_quantizer(self.weight.detach(), self.weight_quantizer)
        self.weight = None
        self.weight_quantizer = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


def unsigned_options(act: ActOptions) -> ActOptions:
    """The options of the unsigned (softmax) quantizer: per-token as the others, never shifted."""
    return ActOptions(per_token=act.per_token)


def is_attention(module: nn.Module) -> bool:
    """timm-style self-attention: a fused ``qkv`` Linear, a ``proj`` Linear and ``num_heads``."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    return (isinstance(qkv, nn.Linear | QuantLinear) and isinstance(proj, nn.Linear | QuantLinear)
            and isinstance(getattr(module, "num_heads", None), int))


def attention_parts(attn: nn.Module) -> dict[str, object]:
    """What a replacement keeps of a timm-style attention module (checks what it cannot reproduce)."""
    if getattr(attn, "gate", None) is not None:
        raise WeightlabError(f"gated attention ({type(attn).__name__}.gate) is not supported by quantization")
    num_heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", attn.qkv.out_features // (3 * num_heads))
    if attn.qkv.out_features != 3 * num_heads * head_dim:
        raise WeightlabError(f"attention qkv has {attn.qkv.out_features} outputs; "
                             f"expected 3·{num_heads}·{head_dim}")
    parts: dict[str, object] = {"num_heads": num_heads, "head_dim": head_dim,
                                "scale": getattr(attn, "scale", head_dim**-0.5)}
    for name in ("q_norm", "k_norm", "attn_drop", "norm", "proj_drop"):
        parts[name] = getattr(attn, name, None) or nn.Identity()
    return parts


def mask_logits(logits: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """Apply timm's optional ``attn_mask`` (bool: True = attend; float: added) and causal mask to
    ``(B, H, N, N)`` logits."""
    if is_causal:
        n = logits.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is None:
        return logits
    if attn_mask.dtype == torch.bool:
        return logits.masked_fill(~attn_mask, float("-inf"))
    return logits + attn_mask


def joinable(quantizers: tuple[nn.Module, ...]) -> bool:
    """Whether ``quantizers`` can run as one LSQ node: all plain, initialised :class:`~.lsq.LsqActQuantizer`
    of one range and one step each, with no forward hooks to bypass."""
    first = quantizers[0]
    return all(type(qz) is lsq.LsqActQuantizer and qz._initialized and qz.step.numel() == 1
               and (qz.qn, qz.qp) == (first.qn, first.qp) and not qz._forward_hooks
               and not qz._forward_pre_hooks for qz in quantizers)


class QuantAttention(nn.Module):
    """Multi-head self-attention with quantized ``qkv``/``proj`` weights and LSQ-quantized q, k, v and
    attention probabilities (unsigned), as OFQ's baseline ``QAttention``. Same module names as timm.
    With ``act`` options the signed quantizers get them; the unsigned one gets per-token steps only (the
    reference has no shift around the softmax quantizer)."""

    def __init__(self, attn: nn.Module, *, bits_w: int, bits_a: int | None, method: str,
                 act: ActOptions = ActOptions()) -> None:
        super().__init__()
        parts = attention_parts(attn)
        self.num_heads, self.head_dim, self.scale = parts["num_heads"], parts["head_dim"], parts["scale"]
        self.q_norm, self.k_norm, self.attn_drop = parts["q_norm"], parts["k_norm"], parts["attn_drop"]
        self.norm, self.proj_drop = parts["norm"], parts["proj_drop"]
        self.qkv = QuantLinear(attn.qkv, bits_w=bits_w, bits_a=bits_a, method=method, act=act)
        self.proj = QuantLinear(attn.proj, bits_w=bits_w, bits_a=bits_a, method=method, act=act)
        self.q_quantizer = make_act_quantizer(bits_a, options=act)
        self.k_quantizer = make_act_quantizer(bits_a, options=act)
        self.v_quantizer = make_act_quantizer(bits_a, options=act)
        self.attn_quantizer = make_act_quantizer(bits_a, signed=False, options=unsigned_options(act))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape  # (B, N, C)
        q, k, v = self.quantized_qkv(self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim))
        attn = mask_logits((q @ k.transpose(-2, -1)) * self.scale, attn_mask, is_causal)  # (B, H, N, N)
        attn = self.attn_drop(self.attn_quantizer(attn.softmax(dim=-1)))
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)  # (B, N, H·hd)
        return self.proj_drop(self.proj(self.norm(out)))

    def quantized_qkv(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, N, 3, H, hd)`` → the quantized q, k, v, each ``(B, H, N, hd)``.

        When the three are plain per-tensor LSQ quantizers (initialised, without hooks) and there is no
        q/k norm, one LSQ node quantizes the contiguous ``qkv`` with the three steps broadcast over its
        ``3`` axis: the same outputs and input gradients as three nodes on the strided q, k and v views, the
        step gradients up to float summation order, in a third of the nodes and without strided passes."""
        quantizers = (self.q_quantizer, self.k_quantizer, self.v_quantizer)
        if (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
                and joinable(quantizers)):
            first = self.q_quantizer
            steps = torch.stack([qz.step for qz in quantizers]).view(1, 1, 3, 1, 1)
            g = lsq.lsq_grad_scale(first.qp, qkv.shape[1] * qkv.shape[3] * qkv.shape[4])  # features of one
            q, k, v = lsq.lsq_quantize(qkv, steps, qn=first.qn, qp=first.qp, g=g).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        return self.q_quantizer(self.q_norm(q)), self.k_quantizer(self.k_norm(k)), self.v_quantizer(v)
