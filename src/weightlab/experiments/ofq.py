"""Experiment ``ofq``: oscillation-free low-bit QAT of a tiny ViT on Fashion-MNIST (paper key ``ofq``).

Per seed a full-precision TinyViT is trained once (the teacher); from it, QAT at each bit width (weights and
activations) for every arm with the **same steps and schedule**: a cosine QAT phase of ``qat_steps``, then
``cga_steps`` at the constant ``cga_lr``. Arms: LSQ; LSQ + Nagel et al.'s iterative freezing (the oscillation
baseline); StatsQ; StatsQ + QKR; StatsQ + QKR + CGA (CGA acts in the last phase only; it shares the first
phase with StatsQ + QKR, which is therefore also the "same steps without freezing" control); and StatsQ + QKR
(+ CGA) with OFQ's activation quantizer (``+act``: per-token LSQ steps and learnable shifts, the reference's
setting; ``act_granularity`` / ``act_shift``), beside the per-tensor arms rather than replacing them. Every arm
distils from the FP teacher (soft + hard, as the reference; ``kd``). Oscillation is counted as flip-backs of
the integer codes in the final ``osc_window`` steps, per module, so it does not depend on an EMA's decay.
Claims (paper): at 2 bits StatsQ + QKR + CGA has fewer oscillating weights and higher accuracy than LSQ;
the gap is smaller at 3 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np

from weightlab.data.digits import SIZES
from weightlab.errors import WeightlabError
from weightlab.experiments._ofq import ARMS, fp_teacher, run_unit, splits
from weightlab.experiments.base import experiment
from weightlab.experiments.configs import Count, ExperimentConfig, NonNegative, Positive, Range
from weightlab.experiments.results import Results, claim
from weightlab.methods.quant.lsq import check_bits, lsq_range
from weightlab.report import plots
from weightlab.report.claims import seeds_phrase
from weightlab.report.tables import mean_std, pm
from weightlab.runs import TrialContext
from weightlab.stats import Effect, Side, binomial_se, effect, paired

Method = Literal["lsq", "lsq+freezing", "statsq", "statsq+qkr", "statsq+qkr+cga", "statsq+qkr+act",
                 "statsq+qkr+cga+act"]
METHODS: tuple[Method, ...] = ("lsq", "lsq+freezing", "statsq", "statsq+qkr", "statsq+qkr+cga", "statsq+qkr+act",
                               "statsq+qkr+cga+act")
LABELS = {"lsq": "LSQ", "lsq+freezing": "LSQ + iterative freezing", "statsq": "StatsQ",
          "statsq+qkr": "StatsQ + QKR", "statsq+qkr+cga": "StatsQ + QKR + CGA",
          "statsq+qkr+act": "StatsQ + QKR, OFQ act.", "statsq+qkr+cga+act": "StatsQ + QKR + CGA, OFQ act."}
KINDS = {"attn.qkv": "qkv", "attn.qk": "W_qk", "attn.v": "v", "attn.proj": "proj", "mlp.fc1": "fc1",
         "mlp.fc2": "fc2"}
# OFQ Table (DeiT-T, ImageNet top-1 %, W/A bits); FP 72.02. LSQ-only rows are not in the spec notes.
PAPER = {(m, b): f"{acc} (DeiT-T W{b}A{b})" for m in ("statsq+qkr+cga", "statsq+qkr+cga+act")
         for b, acc in ((2, "64.33"), (3, "72.72"))}
OURS, BASE, OURS_ACT = "statsq+qkr+cga", "lsq", "statsq+qkr+cga+act"


@dataclass(frozen=True)
class OfqConfig(ExperimentConfig):
    seeds: Count = 5
    data: Literal["fashion-mnist", "digits"] = "fashion-mnist"
    image_size: Count = 28
    n_train: Count | None = None
    n_val: Count = 5000
    patch_size: Count = 7
    dim: Count = 32
    depth: Count = 2
    heads: Count = 2
    batch_size: Count = 128
    fp_steps: Count = 4000
    fp_lr: Positive = 2e-3
    qat_steps: Count = 400
    qat_lr: Positive = 5e-4
    weight_decay: NonNegative = 0.05
    cga_steps: Count = 600
    cga_lr: Positive = 1e-4
    boundary_range: Annotated[float, Range(0, 0.5, lo_open=True)] = 0.005
    kd: bool = True
    freeze_threshold: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.1
    freeze_final_threshold: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.01
    osc_window: Count = 200
    osc_threshold: Positive = 0.005
    osc_record_every: Count = 10
    bits: tuple[Annotated[int, Range(2, 8)], ...] = (2, 3)
    methods: tuple[Method, ...] = ("lsq", "lsq+freezing", "statsq+qkr", "statsq+qkr+cga", "statsq+qkr+cga+act")
    act_granularity: Literal["tensor", "token"] = "token"
    act_shift: bool = True
    act_bits: tuple[Annotated[int, Range(2, 8)], ...] = (2,)

    def methods_at(self, bits: int) -> tuple[Method, ...]:
        """The arms run at ``bits``: the ``+act`` arms only at ``act_bits`` (their claim is at 2 bits)."""
        return tuple(m for m in self.methods if not m.endswith("+act") or bits in self.act_bits)

    def check(self) -> None:
        for b in self.bits:
            lsq_range(check_bits(b, what="ofq bits"), signed=True)
        if not self.bits or not self.methods:
            raise WeightlabError("bits and methods must not be empty")
        if any(m.endswith("+act") for m in self.methods) and self.act_granularity == "tensor" \
                and not self.act_shift:
            raise WeightlabError("the '+act' arms need act_granularity='token' or act_shift=true "
                                 "(with neither they repeat the per-tensor arms)")
        if self.osc_window > self.cga_steps:
            raise WeightlabError(f"osc_window ({self.osc_window}) must be ≤ cga_steps ({self.cga_steps}): "
                                 "oscillation is counted in the final steps")
        if self.data == "digits" and self.image_size not in SIZES:
            raise WeightlabError(f"image_size: digits come at sizes {', '.join(map(str, SIZES))}, "
                                 f"got {self.image_size}")
        if self.image_size % self.patch_size or self.dim % self.heads:
            raise WeightlabError(f"patch_size {self.patch_size} must divide image_size {self.image_size} and "
                                 f"heads {self.heads} must divide dim {self.dim}")


def trial(config: OfqConfig, seed: int, ctx: TrialContext) -> dict[str, Any]:
    """The FP teacher of this seed, then every (bits, arm) QAT run from it."""
    data = splits(config)
    fp, diagnostics = fp_teacher(config, ctx, data)
    record: dict[str, Any] = {"fp": diagnostics, "n_test": len(data[2]), "runs": {}}
    for bits in config.bits:
        for unit in dict.fromkeys(ARMS[m].unit for m in config.methods_at(bits)):  # ordered set
            done = ctx.cached(f"qat/w{bits}/{unit}", lambda b=bits, u=unit: run_unit(config, ctx, fp, b, u, data))
            record["runs"].update({f"w{bits}/{name}": summary for name, summary in done.items()})
    return record


def _tables(config: OfqConfig, records: list[dict[str, Any]], results: dict) -> dict[str, list[dict[str, Any]]]:
    n_test = records[0]["n_test"]
    rows, modules = [], []
    fp = [r["fp"]["test_acc"] for r in records]
    rows.append({"W/A bits": "32/32", "method": "full precision (teacher)", "top-1 (%)": pm(fp),
                 "binomial SE (pts)": f"{100 * binomial_se(float(np.mean(fp)), n_test):.2f}",
                 "oscillating in window (%)": "–", "flip-backs / weight / 1k steps": "–",
                 "EMA > thr. (%)": "–", "last-phase code changes / step (%)": "–",
                 "train loss, final window": f"{np.mean([r['fp']['loss_curve'][-1] for r in records]):.3f}",
                 "paper top-1 (%)": "72.02 (DeiT-T)"})
    for bits in config.bits:
        for m in config.methods_at(bits):
            rs = results[(bits, m)]
            acc = [r["acc"] for r in rs]
            rows.append({"W/A bits": f"{bits}/{bits}", "method": LABELS[m], "top-1 (%)": pm(acc),
                         "binomial SE (pts)": f"{100 * binomial_se(float(np.mean(acc)), n_test):.2f}",
                         "oscillating in window (%)": pm([r["osc"] for r in rs], digits=2),
                         "flip-backs / weight / 1k steps": pm([r["flipbacks"] for r in rs], scale=1e3, digits=2),
                         "EMA > thr. (%)": pm([r["ema_osc"] for r in rs], digits=2),
                         "last-phase code changes / step (%)": pm([r["phase2_change_rate"] for r in rs], digits=3),
                         "train loss, final window": pm([r["final_loss"] for r in rs], scale=1, digits=3),
                         "paper top-1 (%)": PAPER.get((m, bits), "–")})
            kinds = {k for r in rs for k in r["per_module"]}
            modules.append({"W/A bits": f"{bits}/{bits}", "method": LABELS[m],
                            **{label: pm([r["per_module"][k] for r in rs], digits=2) if k in kinds else "–"
                               for k, label in KINDS.items()}})
    teacher = [{"seed": s, "train acc (%)": f"{100 * r['fp']['train_acc']:.1f}",
                "val acc (%)": f"{100 * r['fp']['val_acc']:.1f}", "test acc (%)": f"{100 * r['fp']['test_acc']:.1f}",
                "loss, first → last 5%": f"{r['fp']['loss_curve'][0]:.3f} → {r['fp']['loss_curve'][-1]:.3f}",
                "loss change, last 25% (rel.)": f"{_tail_change(r['fp']['loss_curve']):+.1%}"}
               for s, r in zip(config.seed_list, records, strict=True)]
    return {"Top-1 and weight oscillation (TinyViT)": rows,
            f"Oscillating weights per module in the final {config.osc_window} steps (%)": modules,
            "Full-precision teacher (convergence)": teacher}


def _tail_change(curve: list[float]) -> float:
    """Relative change of the loss over the last quarter of training (near 0 when it has converged)."""
    k = max(len(curve) // 4, 1)
    start = curve[-k - 1] if len(curve) > k else curve[0]
    return (curve[-1] - start) / max(abs(start), 1e-12)


def _claims(config: OfqConfig, results: dict) -> list:
    def col(bits: int, m: str, key: str) -> list[float]:
        return [r[key] for r in results[(bits, m)]]

    def mean(bits: int, m: str, key: str) -> float:
        return mean_std(col(bits, m, key))[0]

    def diff(bits: int, a: str, b: str, key: str, side: Side) -> Effect:
        return paired(f"{key}({LABELS[a]}) − {key}({LABELS[b]}), W{bits}", col(bits, a, key), col(bits, b, key),
                      side=side)

    def measured(bits: int, key: str, *ms: str) -> dict[str, float]:
        return {f"{key}%({LABELS[m]}, W{bits})": 100 * mean(bits, m, key) for m in ms}

    have = set(config.methods)
    claims = []
    if {OURS, BASE} <= have and 2 in config.bits:
        claims.append(claim("at 2 bits StatsQ + QKR + CGA has fewer oscillating weights than LSQ",
                            diff(2, OURS, BASE, "osc", "<"), measured=measured(2, "osc", BASE, OURS),
                            paper="fewer oscillating weights"))
        claims.append(claim("at 2 bits StatsQ + QKR + CGA is more accurate than LSQ",
                            diff(2, OURS, BASE, "acc", ">"), measured=measured(2, "acc", BASE, OURS),
                            paper="DeiT-T W2A2 64.33, above the previous 2-bit state of the art"))
        if 3 in config.bits:
            gap = {b: np.subtract(col(b, OURS, "acc"), col(b, BASE, "acc")) for b in (2, 3)}
            claims.append(claim("the accuracy gap to LSQ is smaller at 3 bits than at 2 bits",
                                effect("gap W3 − gap W2 (acc(ours) − acc(LSQ))", (gap[3] - gap[2]).tolist(),
                                       side="<"),
                                measured={f"gap W{b} (points)": 100 * float(gap[b].mean()) for b in (2, 3)},
                                paper="W3A3 close to FP for all methods"))
    if {OURS, "statsq+qkr"} <= have and 2 in config.bits:
        claims.append(claim("(ablation) at 2 bits CGA leaves fewer oscillating weights than the same steps "
                            "without it", diff(2, OURS, "statsq+qkr", "osc", "<"),
                            measured=measured(2, "osc", "statsq+qkr", OURS), paper="CGA calms the oscillating weights"))
    if {OURS, "lsq+freezing"} <= have and 2 in config.bits:
        claims.append(claim("(baseline) at 2 bits StatsQ + QKR + CGA is more accurate than LSQ + iterative "
                            "freezing", diff(2, OURS, "lsq+freezing", "acc", ">"),
                            measured=measured(2, "acc", "lsq+freezing", OURS),
                            paper="OFQ above oscillation dampening / freezing (Nagel et al. 2022)"))
    if {OURS_ACT, OURS} <= have and 2 in config.bits and 2 in config.act_bits:
        claims.append(claim("(ablation) at 2 bits OFQ's activation quantizer makes StatsQ + QKR + CGA more "
                            "accurate than per-tensor LSQ activations", diff(2, OURS_ACT, OURS, "acc", ">"),
                            measured=measured(2, "acc", OURS, OURS_ACT),
                            paper="the reference's setting behind its DeiT numbers (per-token LSQ, learnable "
                                  "biases); no ablation of it is reported"))
    if {BASE, "statsq"} <= have and 2 in config.bits:
        claims.append(claim("(ablation) at 2 bits StatsQ (scale not learned) has fewer oscillating weights than "
                            "LSQ (learned scale)", diff(2, "statsq", BASE, "osc", "<"),
                            measured=measured(2, "osc", BASE, "statsq"),
                            paper="the learnable scale aggravates oscillation"))
    return claims


def _notes(config: OfqConfig, records: list[dict[str, Any]], results: dict) -> list[str]:
    n_test = records[0]["n_test"]
    notes = [f"TinyViT dim {config.dim}, depth {config.depth}, {config.heads} heads, patch {config.patch_size} on "
             f"{config.image_size}×{config.image_size} {config.data}; FP teacher {config.fp_steps} steps (AdamW, "
             f"cosine, lr {config.fp_lr}). Every QAT arm: {config.qat_steps} steps (AdamW, cosine, peak lr "
             f"{config.qat_lr}, wd {config.weight_decay}) then {config.cga_steps} steps at the constant lr "
             f"{config.cga_lr} (CGA, BR {config.boundary_range}, acts in this last phase only), batch "
             f"{config.batch_size}; {'soft + hard KD from the FP teacher' if config.kd else 'no KD'}.",
             "Hyper-parameters are fixed in advance (the reference recipe scaled down: AdamW, wd 0.05, cosine; "
             "the last phase's lr is a fifth of the QAT peak so that codes still move); none is chosen on the "
             f"test split. {config.n_val} training images are held out as a validation split (the teacher's "
             "val accuracy).",
             f"Test set: n = {n_test} images; the binomial SE column is √(p(1−p)/n) of the mean accuracy. "
             "'train loss, final window': the mean training loss of the final window (the teacher's: cross-entropy "
             "over its last 5% of steps; a QAT arm's includes the soft KD term when kd is on).",
             f"Oscillating (window): a weight whose integer code flipped back (a change against its previous "
             f"change) at least once in the final {config.osc_window} steps, over all low-bit block weights "
             "(W_qk = W_qᵀW_k per head instead of W_q, W_k under QKR; the 8-bit head and the float patch "
             f"embedding are not tracked). 'EMA > thr.': Nagel et al.'s EMA measure (momentum 0.01) above "
             f"{config.osc_threshold} at the end, for comparison.",
             f"LSQ + iterative freezing: Nagel et al.'s threshold annealed (cosine) from {config.freeze_threshold} "
             f"to {config.freeze_final_threshold} over the QAT phase, then kept."]
    act_bits = [b for b in config.bits if b in config.act_bits]
    if act_bits and any(m.endswith("+act") for m in config.methods):
        notes.append(f"OFQ act. (the '+act' arms, run at {', '.join(f'W{b}' for b in act_bits)} only): activation "
                     f"LSQ with {'one step per token' if config.act_granularity == 'token' else 'one step'}"
                     f"{' and a learned per-channel shift (LSQ+ form, starting at 0)' if config.act_shift else ''}"
                     "; every other arm: one step per tensor, no shift. The same steps and schedule as every arm.")
    for bits in config.bits:
        parts = []
        if results.get((bits, OURS)):
            kept = mean_std([r["trainable"] for r in results[(bits, OURS)]])[0]
            changed = mean_std([r["phase2_changed"] for r in results[(bits, OURS)]])[0]
            parts.append(f"CGA kept {100 * kept:.2f}% of its StatsQ weights trainable per step; "
                         f"{100 * changed:.2f}% of all tracked codes differ between the start and end of its phase")
        if results.get((bits, "lsq+freezing")):
            frozen = mean_std([r["frozen"] for r in results[(bits, "lsq+freezing")]])[0]
            parts.append(f"iterative freezing froze {100 * frozen:.2f}% of the LSQ weights")
        if results.get((bits, OURS_ACT)):
            rs = results[(bits, OURS_ACT)]
            spread, shift = (mean_std([r[k] for r in rs])[0] for k in ("act_step_spread", "act_shift_steps"))
            parts.append(f"OFQ act.: the largest per-token step of a quantizer is {spread:.2f}× its smallest "
                         f"(mean over quantizers) and the mean |shift| is {shift:.3f} steps")
        if parts:
            notes.append(f"W{bits}: " + "; ".join(parts) + ".")
    return notes


def summarise(config: OfqConfig, records: list[dict[str, Any]]) -> Results:
    results = {(b, m): [r["runs"][f"w{b}/{m}"] for r in records] for b in config.bits for m in config.methods_at(b)}
    figures = {}
    for bits in config.bits:
        series = {LABELS[m]: (100 * np.mean([r["history"] for r in results[(bits, m)]], axis=0)).tolist()
                  for m in config.methods_at(bits)}
        figures[f"oscillation_w{bits}"] = plots.curves(
            series, title=f"W{bits}A{bits}: oscillating weights (EMA) during QAT ({seeds_phrase(len(records))})",
            xlabel=f"QAT step / {config.osc_record_every}", ylabel=f"% weights with osc. EMA > {config.osc_threshold}")
    curves = {f"seed {s}": r["fp"]["loss_curve"] for s, r in zip(config.seed_list, records, strict=True)}
    figures["fp_loss"] = plots.curves(curves, title="FP teacher: training loss",
                                      xlabel=f"block of {max(config.fp_steps // 20, 1)} steps", ylabel="loss")
    return Results(tables=_tables(config, records, results), claims=_claims(config, results),
                   notes=_notes(config, records, results), figures=figures)


experiment("ofq", paper="ofq", config=OfqConfig, trial=trial, summarise=summarise,
           summary="LSQ (± iterative freezing) vs StatsQ + QKR (+ CGA) low-bit QAT of a tiny ViT on Fashion-MNIST",
           profiles={"smoke": {"seeds": 1, "data": "digits", "image_size": 16, "patch_size": 4, "n_val": 200,
                               "depth": 1, "batch_size": 64, "fp_steps": 250, "fp_lr": 2e-3, "qat_steps": 60,
                               "cga_steps": 40, "osc_window": 20, "osc_record_every": 5, "bits": (2,)},
                     "full": {"dim": 64, "depth": 4, "heads": 4, "fp_steps": 10000, "qat_steps": 4000,
                              "cga_steps": 2000, "osc_window": 500, "methods": METHODS}})
