"""The ``tall-masks`` experiment's summary: the paper's table, the diagnostics per seed, the two claims."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from weightlab import merging
from weightlab.experiments.results import Results, claim
from weightlab.report.claims import over_seeds
from weightlab.report.tables import mean_std, pm
from weightlab.stats import effect, paired

METHODS = (
    "zero-shot",
    "weight averaging",
    "task arithmetic",
    "TIES",
    "Consensus TA",
    "Consensus TIES",
    "magnitude masking",
    "TALL mask + TA",
    "TALL mask + TIES",
    "fine-tuned",
)
PAPER_B32_8 = {
    "zero-shot": "48.4",
    "weight averaging": "66.5 (72.3)",
    "task arithmetic": "70.8 (76.5)",
    "TIES": "75.1 (81.0)",
    "Consensus TA": "75.0 (80.8)",
    "Consensus TIES": "74.8 (80.6)",
    "magnitude masking": "86.8 (93.3)",
    "TALL mask + TA": "92.6 (99.7)",
    "TALL mask + TIES": "93.0 (100.3)",
    "fine-tuned": "92.8",
}


def storage(method: str, params: int, T: int) -> float:
    """Bits stored by ``method`` as the paper counts them (32-bit weights, 1-bit masks)."""
    if method == "fine-tuned":
        return T * 32.0 * params
    if method in ("magnitude masking", "TALL mask + TA", "TALL mask + TIES"):
        return merging.storage_bits(base_bits=32 * params, merged_params=params, n_tasks=T)["tall_bits"]
    return 32.0 * params


def normalized(record: dict[str, Any], method: str) -> float:
    """Mean over tasks of the method's test accuracy over the fine-tuned model's."""
    acc = record["acc"]
    return float(np.mean(np.asarray(acc[method]) / np.asarray(acc["fine-tuned"])))


def absolute(record: dict[str, Any], method: str) -> float:
    return float(np.mean(record["acc"][method]))


def binomial_se(record: dict[str, Any], method: str) -> float:
    """Standard error of the method's task-mean test accuracy from the test-set sizes (binomial)."""
    n = [row["n_test"] for row in record["training"]]
    p = record["acc"][method]
    return math.sqrt(sum(q * (1 - q) / m for q, m in zip(p, n, strict=True))) / len(p)


def off_diagonal(matrix: list[list[float]]) -> np.ndarray:
    m = np.asarray(matrix)
    return m[~np.eye(len(m), dtype=bool)]


def seed_diagnostics(seed: int, r: dict[str, Any]) -> dict[str, Any]:
    """One row of the diagnostics table (see the docs page for what each column decides)."""
    d, T = r["diagnostics"], len(r["tasks"])
    rel, cos = np.asarray(d["tau_rel_norm"]), off_diagonal(d["cosine"])
    hist = np.asarray(r["agreement"], dtype=float) / r["params"]
    losses = [row["epoch_losses"] for row in r["training"]]
    return {
        "seed": seed,
        "‖τ_t‖/‖θ₀‖ (min–max)": f"{rel.min():.4f}–{rel.max():.4f}",
        "entries changed (%)": f"{100 * float(np.mean(d['tau_changed'])):.1f}",
        "cosine off-diag (mean / max)": f"{cos.mean():.3f} / {cos.max():.3f}",
        "TA α (1/T)": f"{r['chosen']['alpha task arithmetic']:.1f} ({1 / T:.3f})",
        "TA − WA (pp)": f"{100 * (absolute(r, 'task arithmetic') - absolute(r, 'weight averaging')):+.2f}",
        "catastrophic / selfish (%)": f"{100 * hist[0]:.1f} / {100 * hist[1]:.1f}",
        "TALL mask density (%)": f"{100 * float(np.mean(d['mask_density_TA'])):.1f}",
        "fine-tune loss first → last epoch": (f"{np.mean([x[0] for x in losses]):.3f} → "
                                              f"{np.mean([x[-1] for x in losses]):.3f}"),
        "train acc (%)": f"{100 * np.mean([row['train_acc'] for row in r['training']]):.1f}",
        "fine-tuned test acc (%) ± binomial SE": (f"{100 * absolute(r, 'fine-tuned'):.2f} ± "
                                                  f"{100 * binomial_se(r, 'fine-tuned'):.2f}"),
    }


def task_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task: sizes, τ size, zero-shot / fine-tuned / TALL (own vector) accuracy, train accuracy."""
    rows = []
    for t, name in enumerate(records[0]["tasks"]):
        train = [r["training"][t] for r in records]
        rows.append({
            "task": name,
            "n train / val / test": f"{train[0]['n_train']} / {train[0]['n_val']} / {train[0]['n_test']}",
            "‖τ_t‖/‖θ₀‖": f"{np.mean([r['diagnostics']['tau_rel_norm'][t] for r in records]):.4f}",
            "λ_t (TA)": "/".join(f"{r['chosen']['lambdas TA'][t]:.1f}" for r in records),
            "zero-shot": pm([r["acc"]["zero-shot"][t] for r in records]),
            "fine-tuned": pm([r["acc"]["fine-tuned"][t] for r in records]),
            "train acc": pm([x["train_acc"] for x in train]),
            "TALL mask + TA": pm([r["acc"]["TALL mask + TA"][t] for r in records]),
            "θ₀ + m_t∘τ_t (own vector)": pm([r["diagnostics"]["tall_own_vector"][t] for r in records]),
        })
    return rows


def cosine_rows(seeds: list[int], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = records[0]["tasks"]
    return [{"seed": s, "task": a, **{b: f"{r['diagnostics']['cosine'][i][j]:.3f}" for j, b in enumerate(names)}}
            for s, r in zip(seeds, records, strict=True) for i, a in enumerate(names)]


def summarise(config: Any, records: list[dict[str, Any]]) -> Results:
    """The image experiment's results (EfficientNet-Lite0's last stage on real-image tasks)."""
    T, params = len(config.tasks), records[0]["params"]
    setup = [
        f"{T} tasks; the pretrained EfficientNet-Lite0's last stage (block 6, conv_head, bn2: {params} parameters, "
        f"BatchNorm statistics frozen) is fine-tuned with Adam (lr {config.lr:g}, {config.steps} steps of "
        f"{config.batch_size}) on trunk features of {config.image_size}-px inputs computed once and cached; "
        "the earlier stages stay frozen (a CPU budget: the same for every task and seed).",
        "Heads: unit-norm class centroids of the pretrained features on each task's training split, scale "
        f"{config.head_scale:g}, frozen (the zero-shot row is θ₀ with these heads).",
    ]
    result = merge_results(config, records, title=f"Merging {T} real-image tasks on EfficientNet-Lite0",
                           setup=setup, sources=_sources(config))
    minilm = records[0].get("minilm")
    if minilm is not None:
        result.tables["MiniLM-L6 (Hugging Face transformer), 3 generated text tasks"] = minilm["rows"]
    return result


def merge_results(config: Any, records: list[dict[str, Any]], *, title: str, setup: list[str],
                  sources: dict[str, Any]) -> Results:
    """The paper's table, the diagnostics and per-task tables, the two claims; ``setup`` opens the notes
    (what is fine-tuned, the heads), ``sources`` is the provenance of every dataset the tasks read."""
    runs, seeds = records, config.seed_list
    T, params = len(config.tasks), runs[0]["params"]
    rows = [{"method": "individual (fine-tuned)" if m == "fine-tuned" else m,
             "accuracy (%)": pm([absolute(r, m) for r in runs]),
             "normalized (%)": pm([normalized(r, m) for r in runs]),
             "storage (Mb)": storage(m, params, T) / 1e6,
             "paper B/32, 8 tasks": PAPER_B32_8[m]} for m in METHODS]
    ks = [("task arithmetic", 0), *[(f"Consensus TA (k={k})", k) for k in config.k_ablation],
          ("Consensus TA", config.k)]
    k_rows = [{"k": k, "Consensus TA accuracy (%)": pm([absolute(r, m) for r in runs])}
              for m, k in sorted(ks, key=lambda mk: mk[1])]
    per_task = [{"method": m, **{name: pm([r["acc"][m][t] for r in runs]) for t, name in enumerate(runs[0]["tasks"])}}
                for m in METHODS]
    claims = [
        claim("TALL mask + TA retains ≥ 99% of the fine-tuned accuracy (normalized)",
              effect("normalized accuracy (TALL mask + TA)", [normalized(r, "TALL mask + TA") for r in runs],
                     side=">=", threshold=0.99),
              paper="99.7% (ViT-B/32, 8 tasks)"),
        claim("Consensus TA beats task arithmetic",
              paired("acc(Consensus TA) − acc(task arithmetic)", [absolute(r, "Consensus TA") for r in runs],
                     [absolute(r, "task arithmetic") for r in runs]),
              measured={m: mean_std([absolute(r, m) for r in runs])[0] for m in ("Consensus TA", "task arithmetic")},
              paper="75.0 vs 70.8 (ViT-B/32, 8 tasks)"),
    ]
    hist = np.sum([r["agreement"] for r in runs], axis=0) / len(runs)
    bits = merging.storage_bits(base_bits=32 * params, merged_params=params, n_tasks=T)
    n_val = sorted({row["n_val"] for r in runs for row in r["training"]})
    n_test = sorted({row["n_test"] for r in runs for row in r["training"]})
    notes = [
        *setup,
        f"α (grid 0.1…1.0) maximizes the mean normalized validation accuracy and λ_t (grid 0.2…0.6) each task's "
        f"validation accuracy, as the reference code; validation examples per task: {n_val}, test examples per "
        f"task: {n_test}; the binomial SE of a task-mean accuracy is in the diagnostics table.",
        f"Storage {bits['finetuned_bits'] / 1e6:.1f} Mb for the fine-tuned tails vs {bits['tall_bits'] / 1e6:.1f} "
        f"Mb for base + τ_MTL + masks ({bits['ratio']:.2f}x).",
        f"Mask agreement (weights active in 0, 1, …, {T} tasks, TA masks, mean over seeds): "
        f"{[int(h) for h in hist]}; 0 = catastrophic, 1 = selfish.",
    ]
    tables = {
        f"{title} ({over_seeds(len(seeds))})": rows,
        "Diagnostics per seed (is the paper's regime reached?)": [
            seed_diagnostics(s, r) for s, r in zip(seeds, runs, strict=True)],
        "Per task (mean ± std over seeds; λ_t per seed)": task_rows(runs),
        "Per task (accuracy %)": per_task,
        "Pairwise cosine of the task vectors, per seed": cosine_rows(seeds, runs),
        f"Consensus TA: k ablation (k = 0 is task arithmetic, k = {config.k} the main table)": k_rows,
    }
    return Results(tables=tables, claims=claims, data={"storage_bits": bits, "sources": sources},
                   notes=notes, figures={"mask_agreement": _histogram(hist)})


def _sources(config: Any) -> dict[str, Any]:
    """Provenance of every dataset the tasks read (the run's ``data`` field names only the first)."""
    from weightlab.data.datasets import dataset_provenance
    from weightlab.experiments._merge_tasks import IMAGE_TASKS

    names = sorted({IMAGE_TASKS[t].source for t in config.tasks})
    return {name: dict(dataset_provenance(name)) for name in names}


def _histogram(hist: np.ndarray):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar(range(len(hist)), hist, color=["tab:red", "tab:orange"] + ["tab:blue"] * (len(hist) - 2))
    ax.set(title="TALL-mask agreement: in how many tasks a weight is active", xlabel="number of tasks",
           ylabel="weights", xticks=range(len(hist)))
    return fig
