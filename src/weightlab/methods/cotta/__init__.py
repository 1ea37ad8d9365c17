"""Paper key ``cotta``: continual test-time adaptation (CoTTA), its baselines Tent and BN-adapt, its augmentations
and the corruption streams it adapts on.
"""

from weightlab.methods.cotta.cotta import (
    CoTTA,
    CoTTAConfig,
    anchor_threshold_rule,
    ema_update_,
    soft_cross_entropy,
    stochastic_restore_,
)
from weightlab.methods.cotta.streams import (
    Domain,
    cifar10c_stream,
    continual_stream,
    corrupted,
    dirichlet_order,
    gradual_severities,
    gradual_stream,
    repeated,
)
from weightlab.methods.cotta.tent import (
    Adapter,
    BNAdapt,
    Tent,
    TentConfig,
    adapted_norms,
    batchnorm_layers,
    collect_params,
    configure_model,
    make_tta_optimizer,
    require_batchnorm,
    softmax_entropy,
    use_batch_statistics,
)
from weightlab.methods.cotta.transforms import (
    BLUR_RADIUS,
    GREY,
    AugmentParams,
    augment,
    colour_jitter,
    sample_params,
)

__all__ = [
    "Adapter",
    "AugmentParams",
    "BLUR_RADIUS",
    "BNAdapt",
    "CoTTA",
    "CoTTAConfig",
    "Domain",
    "GREY",
    "Tent",
    "TentConfig",
    "adapted_norms",
    "anchor_threshold_rule",
    "augment",
    "batchnorm_layers",
    "cifar10c_stream",
    "collect_params",
    "colour_jitter",
    "configure_model",
    "continual_stream",
    "corrupted",
    "dirichlet_order",
    "ema_update_",
    "gradual_severities",
    "gradual_stream",
    "make_tta_optimizer",
    "repeated",
    "require_batchnorm",
    "sample_params",
    "soft_cross_entropy",
    "softmax_entropy",
    "stochastic_restore_",
    "use_batch_statistics",
]
