"""Tables, claims and figures of ``variational-binary-cl`` (and the accuracy heatmaps ``rnn-hypernetwork``
shares)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from weightlab.experiments.results import Results, claim
from weightlab.report import plots
from weightlab.report.claims import seeds_phrase
from weightlab.report.tables import pm
from weightlab.stats import Effect, Side, paired
from weightlab.train import average_accuracy, forgetting

KNOBS = {"variational-task": "kl_weight", "variational-step": "beta_max", "meta": "m", "binary": "",
         "ewc-online": "lambda", "ewc-per-task": "lambda"}  # the hyper-parameter searched besides lr


def mean_heatmaps(runs: dict[str, list[dict]], *, prefix: str = "") -> dict[str, Any]:
    """One figure per method: the accuracy matrix ``runs[m][seed]["R"]`` averaged over seeds."""
    figures = {}
    for m, rs in runs.items():
        mean_R = np.mean(np.asarray([r["R"] for r in rs]), axis=0)
        title = f"{prefix}{m}: accuracy matrix ({seeds_phrase(len(rs))})"
        figures[f"accuracy_matrix_{prefix.replace(' / ', '_')}{m}"] = plots.heatmap(mean_R, title=title)
    return figures


def just_learned(R: list[list[float]]) -> float:
    """Mean of the diagonal ``R_ii``: accuracy on each task right after learning it (plasticity)."""
    return float(np.mean([R[i][i] for i in range(len(R))]))


def _method_rows(runs: dict[str, list[dict]], searches: dict[str, dict], knobs: dict[str, str]) -> list[dict]:
    rows = []
    for m, rs in runs.items():
        best = searches[m]["best"]
        row = {"method": m, "chosen lr": f"{best['lr']:g}",
               "chosen knob": f"{knobs[m]} = {best['knob']:g}" if knobs[m] else "—",
               "average accuracy (%)": pm([average_accuracy(r["R"]) for r in rs]),
               "forgetting (%)": pm([forgetting(r["R"]) for r in rs]),
               "just-learned R_ii (%)": pm([just_learned(r["R"]) for r in rs]),
               "train accuracy, last task (%)": pm([r["train accuracy"][-1] for r in rs]),
               "train loss, last epoch of each task": ", ".join(
                   f"{np.mean([r['losses'][t][-1] for r in rs]):.3f}" for t in range(len(rs[0]["losses"])))}
        if "sample" in rs[0]:
            row["sampled binary weights (%)"] = pm([float(np.mean(r["sample"])) for r in rs])
            row["noise-free mean pass (%)"] = pm([float(np.mean(r["mean"])) for r in rs])
        rows.append(row)
    return rows


def _teacher_student(config: Any, records: list[dict]) -> tuple[list, dict, list]:
    """Simulation vs theory: a table of the end-of-task-2 overlaps, the prior claim, figures."""
    sims = [r["teacher_student"] for r in records]
    theory = {(row["alpha"], row["gamma"]): row for row in records[0]["mean_field"]}
    rows, effects, figures = [], [], {}
    for alpha in config.perceptron_alphas:
        end = {w: {k: [s[f"{alpha:g}/{w}"][k][-1] for s in sims] for k in ("R1", "R2")} for w in (True, False)}
        for w, gamma in ((True, 1.0), (False, 0.0)):
            th = theory[(alpha, gamma)]
            rows.append({"α": alpha, "prior (γ)": f"{'yes' if w else 'no'} ({gamma:g})",
                         "R1 simulated": pm(end[w]["R1"], scale=1, digits=3), "R1 theory": f"{th['R1']:.3f}",
                         "R2 simulated": pm(end[w]["R2"], scale=1, digits=3), "R2 theory": f"{th['R2']:.3f}",
                         "theory converged": th["converged"]})
        effects.append(paired(f"R1 end (prior) − R1 end (no prior), α = {alpha:g}", end[True]["R1"], end[False]["R1"]))
    mid = config.perceptron_alphas[-1]
    series = {f"{k} ({'prior' if w else 'no prior'})": np.mean([s[f"{mid:g}/{w}"][k] for s in sims], axis=0).tolist()
              for w in (True, False) for k in ("R1", "R2")}
    figures["teacher_student_overlaps"] = plots.curves(
        series, title=f"teacher–student perceptron, α = {mid:g}: overlaps (task 1 then task 2)",
        xlabel="epoch (task 2 starts halfway)", ylabel="overlap R = m·w/N")
    alphas = list(config.perceptron_alphas)
    compare = {}
    for w, gamma in ((True, 1.0), (False, 0.0)):
        tag = "prior" if w else "no prior"
        for k in ("R1", "R2"):
            compare[f"{k} simulated ({tag})"] = [float(np.mean([s[f"{a:g}/{w}"][k][-1] for s in sims])) for a in alphas]
            compare[f"{k} mean-field ({tag})"] = [theory[(a, gamma)][k] for a in alphas]
    figures["teacher_student_theory"] = plots.curves(
        compare, x=alphas, title="end of task 2: simulation vs replica mean-field (Franz–Parisi)",
        xlabel="α = P/N per task", ylabel="overlap")
    ts_claim = claim("teacher–student: the previous task as prior keeps more overlap with teacher 1",
                     *effects, paper="variational-binary-cl",
                     measured={f"R1 theory (α = {a:g}, γ = {g:g})": theory[(a, g)]["R1"]
                               for a in alphas for g in (0.0, 1.0)})
    return [ts_claim], figures, rows


def summarise(config: Any, records: list[dict[str, Any]]) -> Results:
    names = list(config.methods)
    runs = {m: [r["methods"][m] for r in records] for m in names}
    searches = records[0]["search"]
    acc = {m: [average_accuracy(r["R"]) for r in rs] for m, rs in runs.items()}
    means = {m: float(np.mean(v)) for m, v in acc.items()}

    def diff(a: str, b: str, side: Side = ">") -> Effect:
        return paired(f"acc({a}) − acc({b})", acc[a], acc[b], side=side)

    claims = []
    var = [m for m in names if m.startswith("variational")]
    if var and "meta" in names and "binary" in names:
        best_var = max(var, key=lambda m: searches[m]["best"]["val"])  # chosen on validation, not test
        claims.append(claim("variational ≥ metaplasticity > plain binary (average accuracy after the last task)",
                            diff(best_var, "meta", ">="), diff("meta", "binary"),
                            measured={f"acc({m})": means[m] for m in [*var, "meta", "binary"]},
                            paper="variational-binary-cl"))
    if var and "binary" in names:
        claims.append(claim("each prior variant of the variational rule beats plain binary training",
                            *(diff(m, "binary") for m in var), measured={f"acc({m})": means[m] for m in var},
                            paper="variational-binary-cl"))
    ts_claims, figures, ts_rows = _teacher_student(config, records)
    claims += ts_claims
    for m, rs in runs.items():
        curve = np.mean([[v for task in r["losses"] for v in task] for r in rs], axis=0).tolist()
        figures[f"loss_curve_{m}"] = plots.curves({m: curve}, title=f"{m}: training loss per epoch (tasks in turn)",
                                                  xlabel="epoch", ylabel="loss")
    figures.update(mean_heatmaps(runs))
    grid_rows = [{"method": m, "lr": f"{g['lr']:g}", "knob": f"{KNOBS[m]} = {g['knob']:g}" if KNOBS[m] else "—",
                  "validation accuracy (%)": f"{100 * g['val']:.1f}"} for m in names for g in searches[m]["grid"]]
    n_test = records[0]["n_test"]
    se = {m: math.sqrt(max(v * (1 - v), 1e-12) / (n_test * config.n_tasks)) for m, v in means.items()}
    notes = [
        f"Data: permuted {config.data} at {config.image_size}×{config.image_size}, {config.n_train} training images "
        f"(+{config.augment_copies} affine copies each), {config.n_val} validation, {n_test} test images per "
        f"task ({config.n_tasks} tasks, {config.epochs} epochs per task, batch {config.batch_size}).",
        "Every method gets the same search (two learning rates × three values of its knob; plain binary only the "
        "learning rates) on the validation split with the first seed; the criterion is the mean validation accuracy "
        "after the last task. The best variational variant for the first claim is the one with the higher "
        "validation score.",
        "Both variational variants keep one Adam across all tasks (the reference code); the metaplastic BNN "
        "rebuilds its optimizer per task (Laborieux's code); ewc-online is online EWC with γ = 1 (one anchor, "
        "summed Fisher), ewc-per-task keeps one anchor and Fisher per task.",
        "Binomial standard error of an average test accuracy (n = n_test × n_tasks): "
        + ", ".join(f"{m} {100 * s:.2f} pp" for m, s in se.items()) + ".",
        "Variational networks are evaluated with the stochastic mean-field pass (the reference code's evaluator); "
        "the sampled-binary column draws one binary network from q per evaluation.",
        "Teacher–student: the mean-field column is the replica-symmetric saddle point at inverse temperature "
        f"β = {config.mean_field_beta:g} (weightlab.methods.binary_cl.mean_field); the simulation is gradient "
        "descent on the fields for a fixed number of epochs, so the two are compared, not judged.",
    ]
    return Results(tables={f"Permuted {config.data}, average accuracy after the last task":
                           _method_rows(runs, searches, KNOBS),
                           "Search on the validation split (first seed)": grid_rows,
                           "Teacher–student perceptron at the end of task 2: simulation vs mean-field": ts_rows},
                   claims=claims, notes=notes, figures=figures,
                   data={"mean_field": records[0]["mean_field"]})
