"""Experiment ``universality``: regret of the Bayesian mixture is governed by the weight of the hypothesis.

Part 1 (exact, finite classes). Sign networks with ``hidden`` ∈ ``hidden_sizes`` units on ``d`` inputs and
weights in {-1, 0, 1} (:class:`SignNetClass`: 81^hidden members for d = 3, up to 81^4 ≈ 4.3e7), uniform prior,
and the *same* teacher inside every class (one active unit; a "complex" teacher has two). The mixture is
exact: members with identical likelihoods are summed in groups (``function_classes``). For each class we
measure the exact mixture's online regret against the teacher over ``n`` steps (mean over ``sequences``
sequences), the exact weight ``W(A_ε)`` by enumeration and its Monte Carlo estimate from prior draws, and the
bound ``min_ε nε + log 1/W(A_ε)``.

Part 2 (continuous, SGLD). ``p(y=1|x) = sigmoid(v tanh(w·x))`` with θ ∈ R³ and a Gaussian prior: the exact
mixture is a quadrature on a ``grid³`` grid; SGLD ensembles of K chains (run as one batched computation) are
compared with it on held-out data as K grows, beside an SGD point estimate and a deep ensemble (T = 0).
Also: the continuous mixture's regret against the bound from the Monte Carlo and the Laplace weights.

Claims: regret tracks log 1/weight, not log class size; the SGLD ensemble approaches the exact mixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F

from weightlab.data.arrays import ArrayDataset
from weightlab.errors import WeightlabError
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import Count, ExperimentConfig, Positive, Range
from weightlab.experiments.results import Results, claim
from weightlab.methods.universality.hypothesis_weight import (
    expected_divergence,
    fisher_information,
    laplace_log_inv_weight,
    log_weight,
    resolvability_bound,
)
from weightlab.methods.universality.mixture import StreamingMixture
from weightlab.methods.universality.sgld import SGLD, CollectConfig, CollectSamples, SGLDConfig
from weightlab.methods.universality.sgld_chains import StackedMLP, chain_nll, ensemble_log_proba
from weightlab.methods.universality.teacher_student import SignNetClass, bernoulli_log_probs, tanh_unit_log_probs
from weightlab.report import plots
from weightlab.report.tables import mean_std, pm
from weightlab.runs import TrialContext
from weightlab.stats import effect
from weightlab.train import TrainConfig, train
from weightlab.utils import derive_seed

TEACHERS = {"simple": [(1.0, (1.0, -1.0, 0.0))], "complex": [(1.0, (1.0, -1.0, 0.0)), (1.0, (0.0, 1.0, 1.0))]}
THETA_STAR = (1.5, -1.0, 2.5)  # continuous teacher (w1, w2, v)


@dataclass(frozen=True)
class UniversalityConfig(ExperimentConfig):
    seeds: Count = 5
    hidden_sizes: tuple[Annotated[int, Range(1, 5)], ...] = (1, 2, 3, 4)
    beta: Positive = 2.0
    n: Count = 256
    sequences: Count = 8
    kl_inputs: Count = 1000
    mc_samples: Count = 20000
    n_train: Count = 64
    n_test: Count = 400
    prior_std: Positive = 2.0
    grid: Count = 61
    chains: tuple[Count, ...] = (1, 2, 4, 8, 16, 32, 64)
    sgld_steps: Count = 1500
    sgld_lr: Positive = 0.5
    sgld_b: Positive = 100.0
    sgld_gamma: Positive = 0.55
    batch_size: Count = 16
    samples_per_chain: Count = 1

    def check(self) -> None:
        if not self.hidden_sizes or not self.chains:
            raise WeightlabError("hidden_sizes and chains must not be empty")


EPS = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-4, 0, 33, dtype=torch.float64)])


def _gen(*keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


# ------------------------------------------------------------------------------------------ part 1: finite


def finite_class_run(config: UniversalityConfig, seed: int) -> dict:
    """Regret curves, exact and Monte Carlo weights and bounds for every (teacher, class) at one seed."""
    d, n, S = 3, config.n, config.sequences
    out: dict = {}
    for teacher, units in TEACHERS.items():
        gen = _gen(seed, "finite", teacher)
        x = torch.randn(S * n, d, generator=gen, dtype=torch.float64)  # (S·n, d): S sequences of n steps
        x_kl = torch.randn(config.kl_inputs, d, generator=gen, dtype=torch.float64)
        ref_class = SignNetClass(d, len(units), beta=config.beta)
        z_star = ref_class.logits(units, x)  # (S·n,)
        y = torch.bernoulli(torch.sigmoid(z_star), generator=gen).long()  # (S·n,)
        sign = 2.0 * y.double() - 1.0  # log p(y|z) = logsigmoid(±z)
        ref = bernoulli_log_probs(z_star).gather(-1, y[:, None]).squeeze(-1).view(S, n)
        log_p_true = bernoulli_log_probs(ref_class.logits(units, x_kl))  # (M, 2)
        for hidden in config.hidden_sizes:
            if hidden < len(units):
                continue
            cls = SignNetClass(d, hidden, beta=config.beta)
            mixtures = [StreamingMixture() for _ in range(S)]
            log_prior = torch.cat([lp for _, lp in cls.grouped_logit_chunks(x_kl[:1])])  # (G,) group masses
            for chunk, lp in cls.grouped_logit_chunks(x):  # (c, S·n), (c,)
                lik = F.logsigmoid(sign * chunk)  # (c, S·n): log p_h(y_t|x_t)
                for s, mix in enumerate(mixtures):
                    mix.add(lik[:, s * n:(s + 1) * n].T, lp)
            regret = torch.stack([torch.cumsum(ref[s], 0) - m.log_marginal for s, m in enumerate(mixtures)])
            div = torch.cat([expected_divergence(log_p_true, bernoulli_log_probs(c))
                             for c, _ in cls.grouped_logit_chunks(x_kl)])
            idx = torch.multinomial(log_prior.exp(), config.mc_samples, replacement=True,
                                    generator=_gen(seed, "mc", teacher, hidden))  # draws from the prior
            inv_w = -log_weight(div, EPS, log_prior=log_prior)
            inv_w_mc = -log_weight(div[idx], EPS)
            steps = torch.arange(1, n + 1)
            bound, _ = resolvability_bound(steps, EPS, inv_w)
            bound_mc, _ = resolvability_bound(steps, EPS, inv_w_mc) if torch.isfinite(inv_w_mc).any() else (
                torch.full((n,), math.inf, dtype=torch.float64), None)
            out[f"{teacher}/{hidden}"] = {
                "log_size": cls.log_size, "log_inv_prior_teacher": cls.log_size,
                "log_inv_weight_0": float(inv_w[0]), "log_inv_weight_0_mc": float(inv_w_mc[0]),
                "regret_mean": regret.mean(0).tolist(), "regret_max": float(regret[:, -1].max()),
                "bound": bound.tolist(), "bound_mc": bound_mc.tolist(),
                "log_inv_weight": inv_w.tolist(), "log_inv_weight_mc": inv_w_mc.tolist()}
    return out


# -------------------------------------------------------------------------------------- part 2: continuous


def _grid(config: UniversalityConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid points ``(G³, 3)`` over ±3σ and their log prior weights ``(G³,)`` (equal cells, unnormalized)."""
    axis = torch.linspace(-3 * config.prior_std, 3 * config.prior_std, config.grid, dtype=torch.float64)
    theta = torch.cartesian_prod(axis, axis, axis)
    return theta, -(theta**2).sum(1) / (2 * config.prior_std**2)


def _label_log_lik(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(..., M, 2), (M,) -> (..., M)``: the log-probability of each observed label."""
    return log_probs.gather(-1, y.expand(*log_probs.shape[:-1])[..., None]).squeeze(-1)


def exact_continuous(theta: torch.Tensor, log_prior: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     x_test: torch.Tensor, *, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid mixture: cumulative ``log q(y^t)`` on the training sequence ``(n,)`` and the posterior predictive
    on the test inputs ``(M, 2)``."""
    stream, log_post = StreamingMixture(), []
    for i in range(0, theta.shape[0], chunk):
        lik = _label_log_lik(tanh_unit_log_probs(theta[i:i + chunk], x), y)  # (c, n)
        stream.add(lik.T, log_prior[i:i + chunk])
        log_post.append(log_prior[i:i + chunk] + lik.sum(1))
    post = torch.cat(log_post)
    post = post - torch.logsumexp(post, 0)
    keep = post > post.max() - 30  # the rest carries < e^-30 of the mass each
    lp = tanh_unit_log_probs(theta[keep], x_test)  # (k, M, 2)
    return stream.log_marginal, torch.logsumexp(post[keep][:, None, None] + lp, dim=0)


def run_chains(config: UniversalityConfig, data: ArrayDataset, seed: int, *,
               temperature: float) -> torch.Tensor:
    """Final (or thinned) parameters of ``max(chains)`` batched chains: ``(samples, K, 3)``."""
    k = max(config.chains)
    chains = StackedMLP(k, (2, 1, 1), bias=False, activation="tanh")
    init = torch.randn(k, 3, generator=_gen(seed, "init"), dtype=torch.float32) * config.prior_std
    chains.set_flat_parameters(init)
    sgld = SGLDConfig(num_data=len(data), prior_std=config.prior_std, lr=config.sgld_lr, b=config.sgld_b,
                      gamma=config.sgld_gamma, temperature=temperature)
    opt = SGLD(chains.parameters(), sgld, generator=_gen(seed, "noise", temperature))
    every = max(1, config.sgld_steps // (2 * config.samples_per_chain))
    collect = CollectSamples(CollectConfig(every=every, burn_in=config.sgld_steps - every * config.samples_per_chain))
    tc = TrainConfig(max_steps=config.sgld_steps, batch_size=config.batch_size, device="cpu",
                     seed=derive_seed(seed, "batches"), description=f"SGLD T={temperature}")
    train(chains, data, tc, optimizer=opt, loss_fn=chain_nll, callbacks=[collect])
    flats = []
    for sample in collect.samples:
        chains.load_state_dict(sample, strict=True)
        flats.append(chains.flat_parameters().detach().to(torch.float64))
    return torch.stack(flats)  # (S, K, 3)


def continuous_run(config: UniversalityConfig, seed: int) -> dict:
    """Exact grid mixture vs SGLD ensembles, and regret vs the MC and Laplace bounds, at one seed."""
    gen = _gen(seed, "continuous")
    theta_star = torch.tensor(THETA_STAR, dtype=torch.float64)
    x = torch.randn(config.n_train, 2, generator=gen, dtype=torch.float64)
    x_test = torch.randn(config.n_test, 2, generator=gen, dtype=torch.float64)
    lp_star, lp_star_test = tanh_unit_log_probs(theta_star, x), tanh_unit_log_probs(theta_star, x_test)
    y = torch.bernoulli(lp_star[:, 1].exp(), generator=gen).long()
    y_test = torch.bernoulli(lp_star_test[:, 1].exp(), generator=gen).long()
    theta, log_prior = _grid(config)
    log_marginal, log_q_exact = exact_continuous(theta, log_prior, x, y, x_test)
    regret = torch.cumsum(_label_log_lik(lp_star, y), 0) - log_marginal

    def test_loss(log_q: torch.Tensor) -> float:
        return float(-_label_log_lik(log_q, y_test).mean())

    def kl_from_exact(log_q: torch.Tensor) -> float:
        return float((log_q_exact.exp() * (log_q_exact - log_q)).sum(-1).mean())

    data = ArrayDataset(x.float(), y)
    rows: dict = {"teacher": {"loss": test_loss(lp_star_test), "kl": kl_from_exact(lp_star_test)},
                  "exact mixture": {"loss": test_loss(log_q_exact), "kl": 0.0}}
    for temperature, _name in ((0.0, "MAP"), (1.0, "SGLD")):
        samples = run_chains(config, data, seed, temperature=temperature)  # (S, K, 3)
        member_lp = tanh_unit_log_probs(samples, x_test)  # (S, K, M, 2)
        sizes = (1, max(config.chains)) if temperature == 0 else config.chains
        for k in sizes:
            log_q = ensemble_log_proba(member_lp[:, :k].reshape(-1, config.n_test, 2))
            label = {1: "SGD point estimate (T=0)"}.get(k, f"deep ensemble K={k} (T=0)") if temperature == 0 \
                else f"SGLD ensemble K={k}"
            rows[label] = {"loss": test_loss(log_q), "kl": kl_from_exact(log_q), "chains": k}

    # weight of the hypothesis: Monte Carlo over the prior, and Laplace at θ*
    x_kl = torch.randn(config.kl_inputs, 2, generator=gen, dtype=torch.float64)
    lp_kl = tanh_unit_log_probs(theta_star, x_kl)
    draws = torch.randn(config.mc_samples, 3, generator=gen, dtype=torch.float64) * config.prior_std
    div = torch.cat([expected_divergence(lp_kl, tanh_unit_log_probs(draws[i:i + 4096], x_kl))
                     for i in range(0, config.mc_samples, 4096)])
    inv_w_mc = -log_weight(div, EPS)
    fisher = fisher_information(lambda th: tanh_unit_log_probs(th, x_kl), theta_star)
    log_density = float(-1.5 * math.log(2 * math.pi * config.prior_std**2)
                        - (theta_star**2).sum() / (2 * config.prior_std**2))
    inv_w_laplace, d_eff = laplace_log_inv_weight(fisher, EPS[1:], log_prior_density=log_density)
    steps = torch.arange(1, config.n_train + 1)
    bound_mc = resolvability_bound(steps, EPS, inv_w_mc)[0] if torch.isfinite(inv_w_mc).any() else \
        torch.full((config.n_train,), math.inf, dtype=torch.float64)
    bound_laplace = resolvability_bound(steps, EPS[1:], inv_w_laplace)[0]
    return {"methods": rows, "regret": regret.tolist(), "bound_mc": bound_mc.tolist(),
            "bound_laplace": bound_laplace.tolist(), "d_eff": d_eff,
            "log_inv_weight_mc": inv_w_mc.tolist(), "log_inv_weight_laplace": inv_w_laplace.tolist()}


# ---------------------------------------------------------------------------------------------- reporting


def _stack(values: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(values, dtype=float)
    return arr.mean(0), arr.std(0)


def trial(config: UniversalityConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """Both parts at one seed, each a resumable unit."""
    return {"finite": ctx.cached("finite", lambda: finite_class_run(config, seed)),
            "continuous": ctx.cached("continuous", lambda: continuous_run(config, seed))}


def summarise(config: UniversalityConfig, records: list[dict[str, Any]]) -> Results:
    finite = [r["finite"] for r in records]
    cont = [r["continuous"] for r in records]
    figures = {}
    n = config.n

    # ---- part 1 table and plots
    keys = list(finite[0])
    final = {k: [f[k]["regret_mean"][-1] for f in finite] for k in keys}
    early = min(16, n)  # a class with hidden units h has 4h parameters: hidden=4 has 16
    rows = []
    for k in keys:
        teacher, hidden = k.split("/")
        first = finite[0][k]
        rows.append({"teacher": teacher, "hidden units": int(hidden), "log class size": first["log_size"],
                     "log 1/W(A_0) exact": mean_std([f[k]["log_inv_weight_0"] for f in finite])[0],
                     "log 1/W(A_0) MC": mean_std([f[k]["log_inv_weight_0_mc"] for f in finite])[0],
                     f"regret at n={early}": pm([f[k]["regret_mean"][early - 1] for f in finite], scale=1,
                                                 digits=2),
                     f"regret at n={n}": pm(final[k], scale=1, digits=2),
                     "max regret (any sequence)": max(f[k]["regret_max"] for f in finite),
                     "bound min_ε nε+log 1/W": mean_std([f[k]["bound"][-1] for f in finite])[0],
                     "bound (MC weight)": mean_std([f[k]["bound_mc"][-1] for f in finite])[0],
                     "naive bound log 1/prior": first["log_inv_prior_teacher"]})
    xs = list(range(1, n + 1))
    for teacher in TEACHERS:
        series, band = {}, {}
        for k in (k for k in keys if k.startswith(teacher + "/")):
            hidden = k.split("/")[1]
            mean, std = _stack([f[k]["regret_mean"] for f in finite])
            series[f"regret, hidden={hidden}"], band[f"regret, hidden={hidden}"] = mean, std
            series[f"bound (MC weight), hidden={hidden}"] = _stack([f[k]["bound_mc"] for f in finite])[0]
        figures[f"regret_{teacher}"] = plots.curves(series, x=xs, band=band, title=f"{teacher} teacher: regret vs n",
                                                    xlabel="n", ylabel="nats")

    # ---- part 2 table and plots
    methods = list(cont[0]["methods"])
    sgld_rows = [{"predictor": m,
                  "test log-loss (nats)": pm([c["methods"][m]["loss"] for c in cont], scale=1, digits=4),
                  "KL(exact ‖ predictor)": pm([c["methods"][m]["kl"] for c in cont], scale=1, digits=4)}
                 for m in methods]
    ks = list(config.chains)
    kl_k = [mean_std([c["methods"][f"SGLD ensemble K={k}"]["kl"] for c in cont])[0] for k in ks]
    loss_gap = [mean_std([abs(c["methods"][f"SGLD ensemble K={k}"]["loss"]
                              - c["methods"]["exact mixture"]["loss"]) for c in cont])[0] for k in ks]
    fig = plots.curves({"KL(exact ‖ SGLD ensemble)": kl_k, "|log-loss gap|": loss_gap}, x=ks,
                       title="SGLD ensemble vs exact mixture", xlabel="chains K", ylabel="nats")
    fig.axes[0].set_xscale("log", base=2)
    fig.axes[0].set_yscale("log")
    figures["sgld_vs_exact"] = fig
    steps = list(range(1, config.n_train + 1))
    reg_c = _stack([c["regret"] for c in cont])
    cont_series = {"regret (grid mixture)": reg_c[0],
                   "bound (MC weight)": _stack([c["bound_mc"] for c in cont])[0],
                   "bound (Laplace weight)": _stack([c["bound_laplace"] for c in cont])[0],
                   "(d/2) log n": [1.5 * math.log(t) for t in steps]}
    figures["regret_continuous"] = plots.curves(cont_series, x=steps, band={"regret (grid mixture)": reg_c[1]},
                                                title="continuous class: regret vs bounds", xlabel="n", ylabel="nats")
    cont_rows = [{"n": t, "regret": pm([c["regret"][t - 1] for c in cont], scale=1, digits=2),
                  **{name: float(vals[t - 1]) for name, vals in list(cont_series.items())[1:]}}
                 for t in sorted({1, 4, 16, config.n_train // 2, config.n_train})]

    # ---- claims
    hs = sorted(int(k.split("/")[1]) for k in keys if k.startswith("simple/"))
    lo, hi = f"simple/{hs[0]}", f"simple/{hs[-1]}"
    r_lo, r_hi = mean_std(final[lo])[0], mean_std(final[hi])[0]
    dsize = finite[0][hi]["log_size"] - finite[0][lo]["log_size"]
    w_lo, w_hi = ([f[k]["log_inv_weight_0"] for f in finite] for k in (lo, hi))
    claims = [claim(f"a much larger class (log size +{dsize:.1f}) with similar weight has similar regret "
                    "(|Δ regret| < 0.25·Δ log size)",
                    effect("0.25·Δ log size − |Δ regret|",
                           [0.25 * dsize - abs(a - b) for a, b in zip(final[hi], final[lo], strict=True)]),
                    measured={f"regret(hidden={hs[0]})": r_lo, f"regret(hidden={hs[-1]})": r_hi, "Δ log size": dsize,
                              "Δ log 1/W(A_0)": float(np.mean(np.subtract(w_hi, w_lo)))},
                    paper="regret is governed by the weight, not the class size")]
    big = f"complex/{hs[-1]}"
    if big in final:
        w_c = [f[big]["log_inv_weight_0"] for f in finite]
        # more regret for the teacher of smaller weight (larger log 1/W), per seed
        signed = [float(np.sign(wc - ws)) * (rc - rs)
                  for wc, ws, rc, rs in zip(w_c, w_hi, final[big], final[hi], strict=True)]
        claims.append(claim(f"in one class (hidden={hs[-1]}), the teacher of smaller weight has more regret",
                            effect("sign(Δ log 1/W)·Δ regret (complex − simple)", signed),
                            measured={"regret(simple)": r_hi, "regret(complex)": float(np.mean(final[big])),
                                      "log 1/W simple": float(np.mean(w_hi)), "log 1/W complex": float(np.mean(w_c))},
                            paper="simple = large weight = fewer samples"))
    # every (class, n): regret − bound ≤ 0 (1e-9: floating-point slack); the claim holds when every point does
    gaps = np.asarray([[np.asarray(f[k]["regret_mean"]) - np.asarray(f[k]["bound"]) for k in keys] for f in finite])
    points = [effect(f"regret − bound ({k}, n={t + 1})", gaps[:, i, t].tolist(), side="<=", threshold=1e-9)
              for i, k in enumerate(keys) for t in range(n)]
    claims.append(claim("mean measured regret ≤ min_ε nε + log 1/W(A_ε) at every n, every class", *points,
                        measured={"violations (seed means)": int((gaps.mean(0) > 1e-9).sum()), "checked": len(points)},
                        paper="E[R_n] ≤ min_ε nε + log 1/W(A_ε)"))
    kl = {k: [c["methods"][f"SGLD ensemble K={k}"]["kl"] for c in cont] for k in (ks[0], ks[-1])}
    claims.append(claim(f"the SGLD ensemble's predictive approaches the exact mixture's as chains grow "
                        f"(KL at K={ks[-1]} < half of K={ks[0]})",
                        effect(f"0.5·KL(K={ks[0]}) − KL(K={ks[-1]})",
                               [0.5 * a - b for a, b in zip(kl[ks[0]], kl[ks[-1]], strict=True)]),
                        measured={f"KL(K={ks[0]})": kl_k[0], f"KL(K={ks[-1]})": kl_k[-1],
                                  f"loss gap(K={ks[0]})": loss_gap[0], f"loss gap(K={ks[-1]})": loss_gap[-1]},
                        paper="SGLD + ensembling approximates the mixture learner"))
    notes = [f"part 1: {config.sequences} sequences of n={n} per seed and teacher; weights in "
             f"{{-1,0,1}}, d=3; part 2: grid {config.grid}³ quadrature as the exact mixture.",
             "A class with h hidden units has 4h parameters; at n=16 the hidden=4 class has no more samples "
             "than parameters.",
             "The bound uses the exact (enumerated) weight; the MC column estimates it from "
             f"{config.mc_samples} prior draws (−inf resolution below 1/{config.mc_samples}).",
             f"Laplace weight uses d_eff={cont[0]['d_eff']} stiff Fisher directions at θ*={THETA_STAR}."]
    return Results(tables={"Finite classes: regret vs class size and weight": rows,
                           "SGLD ensembles vs the exact mixture (held-out)": sgld_rows,
                           "Continuous class: regret vs bounds": cont_rows},
                   claims=claims, data={"eps": EPS.tolist()}, notes=notes, figures=figures)


experiment("universality", paper="universality", config=UniversalityConfig, trial=trial, summarise=summarise,
           summary="mixture regret vs the weight of the hypothesis; SGLD ensembles vs the exact mixture",
           profiles={"smoke": {"seeds": 1, "hidden_sizes": (1, 2), "n": 48, "sequences": 2, "kl_inputs": 200,
                               "mc_samples": 1000, "n_train": 32, "n_test": 100, "grid": 17,
                               "chains": (1, 4, 16), "sgld_steps": 200},
                     "full": {"seeds": 5, "hidden_sizes": (1, 2, 3, 4, 5), "n": 1024, "sequences": 32,
                              "kl_inputs": 4000, "mc_samples": 200000, "grid": 81,
                              "chains": (1, 2, 4, 8, 16, 32, 64, 128, 256), "sgld_steps": 5000,
                              "samples_per_chain": 4}})
