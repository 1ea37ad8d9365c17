"""Low-bit quantization-aware training for vision transformers (paper key ``ofq``).

``prepare(model, QuantConfig(...))`` returns a :class:`Quantized` handle (``.model``, ``.config``, ``.layers``,
``convert()``, ``packed_state()``); the modules hold the pieces: :mod:`.api`, :mod:`.lsq`, :mod:`.statsq`,
:mod:`.act` (OFQ's per-token activation steps and shifts), :mod:`.layers`, :mod:`.qkr`, :mod:`.oscillation`
(the tracker), :mod:`.cga` (confidence-guided annealing),
:mod:`.freezing` (Nagel et al.'s iterative freezing, the oscillation baseline) and :mod:`.distill` (soft + hard
distillation from the full-precision teacher).
"""

from weightlab.methods.quant.act import ActOptions, OfqActQuantizer
from weightlab.methods.quant.api import (
    METHODS,
    QuantConfig,
    Quantized,
    attention_modules,
    convert,
    load_packed_state,
    packed_state,
    prepare,
    state_nbytes,
)
from weightlab.methods.quant.cga import CGAConfig, ConfidenceGuidedAnnealing, cga_train_config, cga_trainable_mask
from weightlab.methods.quant.distill import SoftHardDistillation
from weightlab.methods.quant.freezing import FreezingConfig, IterativeFreezing, freezing_threshold
from weightlab.methods.quant.layers import QuantAttention, QuantLinear
from weightlab.methods.quant.oscillation import OscillationConfig, OscillationTracker, oscillation_step
from weightlab.methods.quant.qkr import QKRAttention

__all__ = [
    "ActOptions",
    "CGAConfig",
    "ConfidenceGuidedAnnealing",
    "FreezingConfig",
    "IterativeFreezing",
    "METHODS",
    "OfqActQuantizer",
    "OscillationConfig",
    "OscillationTracker",
    "QKRAttention",
    "QuantAttention",
    "QuantConfig",
    "QuantLinear",
    "Quantized",
    "SoftHardDistillation",
    "attention_modules",
    "cga_train_config",
    "cga_trainable_mask",
    "convert",
    "freezing_threshold",
    "load_packed_state",
    "oscillation_step",
    "packed_state",
    "prepare",
    "state_nbytes",
]
