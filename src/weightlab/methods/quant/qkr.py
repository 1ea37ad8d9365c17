"""Query–key reparameterization (QKR; paper key ``ofq``).

Instead of quantizing ``W_q`` and ``W_k`` separately (whose quantization errors multiply in the attention
logits and oscillate together), QKR quantizes their per-head product ``W_qk^h = W_q^hᵀ W_k^h`` (C×C):

    logits[b, h, n, m] = x̂_n · Q(W_qk^h) x̂_m · d^−½  (+ x̂_m · u_h d^−½ when q has a bias)

``u_h = W_k^hᵀ b_q^h`` keeps the one bias term that does not cancel in the softmax (the reference code drops
the q and k biases instead, which changes a pretrained model; here the full-precision function is exact).
``v`` becomes its own :class:`~.layers.QuantLinear` (named ``v``), fed the same quantized input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.methods.quant.act import ActOptions, make_act_quantizer
from weightlab.methods.quant.layers import (
    IntWeight,
    QuantLinear,
    attention_parts,
    make_weight_quantizer,
    mask_logits,
    unsigned_options,
)


def query_key_product(q_weight: Tensor, k_weight: Tensor, num_heads: int) -> Tensor:
    """``W_qk^h = W_q^hᵀ W_k^h`` for every head: two ``(H·d, C)`` weights → ``(H, C, C)``."""
    c = q_weight.shape[1]
    wq, wk = q_weight.reshape(num_heads, -1, c), k_weight.reshape(num_heads, -1, c)  # (H, d, C)
    return torch.einsum("hdc,hde->hce", wq, wk)


class QKRAttention(nn.Module):
    """Self-attention with a quantized query–key product, quantized ``v`` and ``proj``, LSQ activations
    (``act``: per-tensor by default; OFQ's per-token steps and shifts as :class:`~.layers.QuantAttention`)."""

    def __init__(self, attn: nn.Module, *, bits_w: int, bits_a: int | None, method: str = "statsq",
                 act: ActOptions = ActOptions()) -> None:
        super().__init__()
        parts = attention_parts(attn)
        for norm in ("q_norm", "k_norm"):
            if not isinstance(parts[norm], nn.Identity):
                raise WeightlabError(f"QKR cannot fold {norm} ({type(parts[norm]).__name__}) into W_qk; "
                                     "use qkr=False for attention with query/key normalisation")
        self.num_heads, self.head_dim, self.scale = parts["num_heads"], parts["head_dim"], parts["scale"]
        self.attn_drop, self.norm, self.proj_drop = parts["attn_drop"], parts["norm"], parts["proj_drop"]
        self.bits = bits_w
        qkv = attn.qkv
        width = self.num_heads * self.head_dim
        w = qkv.weight.detach()
        b = qkv.bias.detach() if qkv.bias is not None else None
        self.q_weight = nn.Parameter(w[:width].clone())  # (H·d, C)
        self.k_weight = nn.Parameter(w[width:2 * width].clone())  # (H·d, C)
        self.q_bias = nn.Parameter(b[:width].clone()) if b is not None else None  # k's bias cancels
        v = nn.Linear(w.shape[1], width, bias=b is not None)
        with torch.no_grad():
            v.weight.copy_(w[2 * width:])
            if b is not None:
                v.bias.copy_(b[2 * width:])
        self.v = QuantLinear(v, bits_w=bits_w, bits_a=None, method=method)
        self.proj = QuantLinear(attn.proj, bits_w=bits_w, bits_a=bits_a, method=method, act=act)
        product = query_key_product(self.q_weight.detach(), self.k_weight.detach(), self.num_heads)
        self.qk_quantizer = make_weight_quantizer(product.flatten(0, 1), bits_w, method)
        self.input_quantizer = make_act_quantizer(bits_a, options=act)
        self.key_quantizer = make_act_quantizer(bits_a, options=act)  # keys (B, H, N, C): shift (H, 1, C)
        self.v_quantizer = make_act_quantizer(bits_a, options=act)
        self.attn_quantizer = make_act_quantizer(bits_a, signed=False, options=unsigned_options(act))
        self.int_qk: IntWeight | None = None
        self.register_buffer("key_bias", torch.zeros(0))  # u_h after conversion

    def qk_product(self) -> Tensor:
        """The float ``W_qk`` ``(H·C, C)`` (rows are output channels of the product, per head)."""
        return query_key_product(self.q_weight, self.k_weight, self.num_heads).flatten(0, 1)

    def quantized_qk(self) -> Tensor:
        """The quantized ``W_qk`` ``(H, C, C)`` used by the forward."""
        wqk = self.int_qk() if self.int_qk is not None else self.qk_quantizer(self.qk_product())
        return wqk.reshape(self.num_heads, -1, wqk.shape[1])

    def key_bias_term(self) -> Tensor | None:
        """``u_h = W_k^hᵀ b_q^h`` ``(H, C)``, or None without a query bias."""
        if self.int_qk is not None:
            return self.key_bias if self.key_bias.numel() else None
        if self.q_bias is None:
            return None
        c = self.k_weight.shape[1]
        return torch.einsum("hdc,hd->hc", self.k_weight.reshape(self.num_heads, -1, c),
                            self.q_bias.reshape(self.num_heads, -1))

    @torch.no_grad()
    def integer_codes(self) -> Tensor:
        """Integer codes of ``W_qk`` ``(H·C, C)``."""
        if self.int_qk is not None:
            return self.int_qk.codes.float()
        return self.qk_quantizer.codes(self.qk_product())[0]

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape  # (B, N, C)
        xq = self.input_quantizer(x)  # (B, N, C)
        keys = self.key_quantizer(torch.einsum("hce,bme->bhmc", self.quantized_qk(), xq))  # (B, H, N, C)
        logits = torch.einsum("bnc,bhmc->bhnm", xq, keys)  # (B, H, N, N)
        u = self.key_bias_term()
        if u is not None:
            logits = logits + torch.einsum("bmc,hc->bhm", xq, u).unsqueeze(2)
        logits = mask_logits(logits * self.scale, attn_mask, is_causal)
        attn = self.attn_drop(self.attn_quantizer(logits.softmax(dim=-1)))
        v = self.v_quantizer(self.v(xq)).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)  # (B, N, H·d)
        return self.proj_drop(self.proj(self.norm(out)))

    def convert_(self) -> None:
        """Store ``W_qk`` as an :class:`~.layers.IntWeight` and drop ``W_q``, ``W_k`` (in place)."""
        if self.int_qk is not None:
            return
        with torch.no_grad():
            u = self.key_bias_term()
            self.int_qk = IntWeight.from_quantizer(self.qk_product(), self.qk_quantizer)
        self.key_bias = u.detach().clone() if u is not None else torch.zeros(0)
        self.q_weight = self.k_weight = self.q_bias = None
        self.qk_quantizer = None
        self.v.convert_()
        self.proj.convert_()
