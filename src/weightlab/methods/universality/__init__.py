"""Paper key ``universality``: the hypothesis-weight lens, mixture learners, SGLD and the teacher–student perceptron."""

from weightlab.methods.universality.hypothesis_weight import (
    expected_divergence,
    fisher_information,
    laplace_log_inv_weight,
    log_weight,
    resolvability_bound,
    unit_ball_log_volume,
)
from weightlab.methods.universality.mixture import (
    BayesMixture,
    StreamingMixture,
    cumulative_log_marginal,
    normalize_log_weights,
    regret,
    uniform_log_prior,
)
from weightlab.methods.universality.sgld import (
    SGLD,
    CollectConfig,
    CollectSamples,
    SGLDConfig,
    cycle_position,
    cyclical_step_size,
    polynomial_step_size,
)
from weightlab.methods.universality.sgld_chains import (
    ACTIVATIONS,
    StackedMLP,
    chain_log_probs,
    chain_nll,
    ensemble_log_proba,
)
from weightlab.methods.universality.teacher_student import (
    SignNetClass,
    bernoulli_log_probs,
    tanh_unit_log_probs,
)

__all__ = [
    "ACTIVATIONS",
    "BayesMixture",
    "CollectConfig",
    "CollectSamples",
    "SGLD",
    "SGLDConfig",
    "SignNetClass",
    "StackedMLP",
    "StreamingMixture",
    "bernoulli_log_probs",
    "chain_log_probs",
    "chain_nll",
    "cumulative_log_marginal",
    "cycle_position",
    "cyclical_step_size",
    "ensemble_log_proba",
    "expected_divergence",
    "fisher_information",
    "laplace_log_inv_weight",
    "log_weight",
    "normalize_log_weights",
    "polynomial_step_size",
    "regret",
    "resolvability_bound",
    "tanh_unit_log_probs",
    "uniform_log_prior",
    "unit_ball_log_volume",
]
