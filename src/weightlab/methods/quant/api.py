"""``prepare`` a ViT for quantization-aware training, ``convert`` it to integer weights (paper key ``ofq``).

    quant = prepare(TinyViT(10), QuantConfig(bits_w=2, bits_a=2, method="statsq", qkr=True))
    model = quant.model                 # the same module, prepared in place
    train(model, data, ..., callbacks=[OscillationTracker(model)])
    quant.convert()                     # int8 codes + per-row scales, in place; returns the model
    save_tensors(quant.packed_state(), "vit-w2a2.safetensors")   # codes bit-packed to 2 bits

``prepare`` returns a :class:`Quantized` handle, as LIFT's ``prepare`` returns a ``Lift``: both have ``.model``
and ``.config``; LIFT's has ``.optimizer`` and ``merge_and_unload()``, this one ``convert()``.

Works on any model whose attention follows timm's names (``attn.qkv`` fused, ``attn.proj``, ``num_heads``):
weightlab's :class:`~weightlab.models.TinyViT` and timm's ViT/DeiT. Every other ``nn.Linear`` (``mlp.fc1``,
``mlp.fc2``) becomes a :class:`~.layers.QuantLinear`; the classifier head gets 8-bit LSQ as in OFQ.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from weightlab.errors import WeightlabError
from weightlab.methods.quant.act import ActOptions
from weightlab.methods.quant.layers import IntWeight, QuantAttention, QuantLinear, is_attention
from weightlab.methods.quant.lsq import check_bits, lsq_range
from weightlab.methods.quant.pack import pack_codes, unpack_codes
from weightlab.methods.quant.qkr import QKRAttention
from weightlab.registry import register

METHODS = ("lsq", "statsq")
ACT_GRANULARITIES = ("tensor", "token")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how (defaults: OFQ's W2A2 StatsQ recipe; ``ofq``, Liu et al. ICML 2023).

    Attributes:
        bits_w: weight bits (1–8) of the transformer blocks.
        bits_a: activation bits (1–8) of Linear inputs, q/k/v and attention probabilities; None: float.
        method: weight quantizer: ``"statsq"`` (scale 2·mean|W|, not learned) or ``"lsq"`` (learned step).
        qkr: query–key reparameterization (quantize ``W_qᵀW_k`` per head).
        head_bits: bits of the classifier head (weights and inputs, LSQ); None keeps it float.
        head_names: names (last component) of classifier heads.
        skip: ``fnmatch`` patterns of module names to leave in full precision.
        act_granularity: activation LSQ steps: ``"tensor"`` (one per quantizer) or ``"token"`` (one per token
            position, OFQ's setting for ViTs; the head's ``(B, C)`` input stays per tensor).
        act_shift: learn a per-channel shift ``β`` with each signed activation step (LSQ+ form,
            ``round_clip((x − β)/s)·s + β``, ``β`` starting at 0; OFQ's learnable biases).
    """

    bits_w: int = 2
    bits_a: int | None = 2
    method: Literal["lsq", "statsq"] = "statsq"
    qkr: bool = False
    head_bits: int | None = 8
    head_names: tuple[str, ...] = ("head", "head_dist")
    skip: tuple[str, ...] = ()
    act_granularity: Literal["tensor", "token"] = "tensor"
    act_shift: bool = False

    @property
    def act(self) -> ActOptions:
        """The activation quantizers' options of the blocks."""
        return ActOptions(per_token=self.act_granularity == "token", shift=self.act_shift)

    def __post_init__(self) -> None:
        check_bits(self.bits_w, what="bits_w")
        if self.bits_a is not None:
            check_bits(self.bits_a, what="bits_a")
            lsq_range(self.bits_a, signed=True)
        if self.head_bits is not None:
            lsq_range(check_bits(self.head_bits, what="head_bits"), signed=True)
        if self.method not in METHODS:
            raise WeightlabError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "lsq":
            lsq_range(self.bits_w, signed=True)
        if self.act_granularity not in ACT_GRANULARITIES:
            raise WeightlabError(f"act_granularity must be one of {', '.join(ACT_GRANULARITIES)}, "
                                 f"got {self.act_granularity!r}")
        if not isinstance(self.act_shift, bool):
            raise WeightlabError(f"act_shift must be True or False, got {self.act_shift!r}")
        if self.bits_a is None and not self.act.plain:
            raise WeightlabError("act_granularity='token' and act_shift=True quantize activations; "
                                 "they need bits_a (got bits_a=None)")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _found(model: nn.Module) -> str:
    kinds = sorted({type(m).__name__ for _, m in model.named_modules() if not list(m.children())})
    return ", ".join(kinds) or "no layers"


def attention_modules(model: nn.Module) -> list[str]:
    """Names of the timm-style attention modules in ``model`` (outermost first)."""
    return [name for name, m in model.named_modules() if is_attention(m)]


class Quantized:
    """What :func:`prepare` returns: the prepared ``model``, its ``config`` and the replaced ``layers`` by name.

    ``convert()`` turns the fake-quantized weights into integer codes (in place) and returns the model;
    ``packed_state()`` is then the bit-packed state dict to save.
    """

    def __init__(self, model: nn.Module, config: QuantConfig, layers: dict[str, nn.Module]) -> None:
        self.model = model
        self.config = config
        self.layers = layers

    def convert(self) -> nn.Module:
        """:func:`convert` the model; returns it."""
        return convert(self.model)

    def packed_state(self) -> dict[str, Tensor]:
        """:func:`packed_state` of the converted model."""
        return packed_state(self.model)

    def __repr__(self) -> str:
        return f"Quantized({type(self.model).__name__}, {len(self.layers)} layers, {self.config})"


def prepare(model: nn.Module, config: QuantConfig = QuantConfig()) -> Quantized:
    """Replace ``model``'s attention and Linear layers by fake-quantized ones, in place; returns the
    :class:`Quantized` handle (``.model`` is ``model``).

    Call it before building the optimizer: QKR creates new ``W_q``, ``W_k`` and ``v`` parameters.

    Raises:
        WeightlabError: the model has no Linear layer to quantize, or ``config.qkr`` is set and no attention
            module with a fused ``qkv``, a ``proj`` and ``num_heads`` is found.
    """
    if any(isinstance(m, QuantLinear | QKRAttention) for m in model.modules()):
        raise WeightlabError(f"{type(model).__name__} is already prepared for quantization")

    def skipped(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in config.skip)

    attentions = [n for n in attention_modules(model) if not skipped(n)]
    if config.qkr and not attentions:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise WeightlabError(
            "qkr=True needs self-attention modules with a fused 'qkv' Linear, a 'proj' Linear and "
            f"'num_heads' (timm's names); {type(model).__name__} has none "
            f"(Linear layers: {', '.join(linears) or 'none'}; "
            f"layer types: {_found(model)})")
    options = {"bits_w": config.bits_w, "bits_a": config.bits_a, "method": config.method, "act": config.act}
    layers: dict[str, nn.Module] = {}
    for name in attentions:
        attn = model.get_submodule(name)
        if config.qkr:
            layers[name] = QKRAttention(attn, **options)
        elif config.bits_a is not None:
            layers[name] = QuantAttention(attn, **options)
        if name in layers:
            _set_module(model, name, layers[name])
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or skipped(name):
            continue
        if name.rpartition(".")[2] in config.head_names:
            if config.head_bits is None:
                continue
            layer = QuantLinear(module, bits_w=config.head_bits, bits_a=config.head_bits, method="lsq",
                                act=ActOptions(shift=config.act_shift))  # (B, C) input: per tensor
        else:
            layer = QuantLinear(module, **options)
        _set_module(model, name, layer)
        layers[name] = layer
    if not layers and not attentions:
        raise WeightlabError(f"{type(model).__name__} has no nn.Linear layers to quantize "
                             f"(layer types found: {_found(model)})")
    return Quantized(model, config, layers)


def convert(model: nn.Module) -> nn.Module:
    """Replace every fake-quantized weight by int8 codes and per-row scales (in place); returns ``model``.

    The converted model computes the same function as the fake-quantized one in eval mode; activation
    quantizers keep their learned steps.
    """
    modules = [m for m in model.modules() if hasattr(m, "convert_")]
    if not modules:
        raise WeightlabError(f"{type(model).__name__} has no quantized layers; "
                             "call prepare(model, config) first")
    for m in modules:
        m.convert_()
    return model


def packed_state(model: nn.Module) -> dict[str, Tensor]:
    """The converted model's state dict with every :class:`IntWeight`'s codes bit-packed to its width."""
    ints = {n: m for n, m in model.named_modules() if isinstance(m, IntWeight)}
    if not ints:
        raise WeightlabError("packed_state needs a converted model (call convert(model) first)")
    state = dict(model.state_dict())
    for name, m in ints.items():
        del state[f"{name}.codes"]
        state[f"{name}.packed"] = pack_codes(m.codes, m.bits)
        state[f"{name}.shape"] = torch.tensor(list(m.codes.shape))
        state[f"{name}.bits"] = torch.tensor(m.bits)
    return state


def load_packed_state(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Load :func:`packed_state` output into a converted model of the same architecture."""
    state = dict(state)
    for name, m in model.named_modules():
        if isinstance(m, IntWeight):
            if f"{name}.packed" not in state:
                raise WeightlabError(f"packed state lacks {name}.packed")
            shape = tuple(state.pop(f"{name}.shape").tolist())
            bits = int(state.pop(f"{name}.bits"))
            state[f"{name}.codes"] = unpack_codes(state.pop(f"{name}.packed"), bits, shape)
    model.load_state_dict(state)
    return model


def state_nbytes(state: dict[str, Tensor]) -> int:
    """Bytes of the tensors in a state dict."""
    return sum(t.numel() * t.element_size() for t in state.values())


register("method", "ofq")(prepare)  # OFQ's entry: prepare(model, QuantConfig()) quantizes the model
