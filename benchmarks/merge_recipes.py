"""Benchmark-only check: a mergekit recipe gives the same tensors in weightlab as in mergekit.

For ``task_arithmetic``, ``ties`` and ``linear`` recipes (per-model weights, a negative weight, lambda > 1,
per-model densities), the same YAML file is run by ``mergekit-yaml`` and by ``weightlab merge --config`` on
generated Llama-shaped checkpoints, and every tensor is compared (``torch.equal``, and the largest absolute
difference). mergekit is never a dependency of weightlab: give the path of a ``mergekit-yaml`` with
``--mergekit``, or let ``--install-mergekit VENV`` make a private virtualenv that shares this project's
packages (torch, transformers, ...) through a ``.pth`` file and ``pip install``s mergekit into it.

    python benchmarks/merge_recipes.py --install-mergekit /tmp/venv-mergekit
    python benchmarks/merge_recipes.py --mergekit /tmp/venv-mergekit/bin/mergekit-yaml --params 20e6

Prints one line per recipe, then a JSON line. Ties at the TIES cut (equal magnitudes) are broken by memory
order in weightlab and by an unstable sort in mergekit; random float weights have none.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_stream import generate  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def recipes(base: str, fts: list[str]) -> dict[str, str]:
    """Three mergekit recipes over ``base`` and the fine-tunes (paths relative to the recipes' folder)."""
    weights = [1.0, -0.5, 0.7, 1.2, 0.3][: len(fts)]
    densities = [0.3, 0.5, 0.2, 0.6, 0.4][: len(fts)]
    ta = "".join(f"  - model: {p}\n    parameters: {{weight: {w}}}\n" for p, w in zip(fts, weights))
    ties = "".join(f"  - model: {p}\n    parameters: {{weight: {abs(w)}, density: {d}}}\n"
                   for p, w, d in zip(fts, weights, densities))
    linear = "".join(f"  - model: {p}\n    parameters: {{weight: {i + 1.0}}}\n" for i, p in enumerate([base, *fts]))
    return {
        "task_arithmetic": f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{ta}"
                           "parameters: {lambda: 1.3}\ndtype: float32\n",
        "ties": f"merge_method: ties\nbase_model: {base}\nmodels:\n{ties}parameters: {{normalize: true}}\n"
                "dtype: float32\n",
        "linear": f"merge_method: linear\nmodels:\n{linear}dtype: float32\n",
    }


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def compare(a: Path, b: Path) -> dict:
    ta, tb = tensors(a), tensors(b)
    common = sorted(set(ta) & set(tb))
    equal = sum(torch.equal(ta[k], tb[k]) for k in common)
    worst = max((float((ta[k].double() - tb[k].double()).abs().max()) for k in common), default=float("nan"))
    return {"keys": len(common), "only_weightlab": len(set(ta) - set(tb)), "only_mergekit": len(set(tb) - set(ta)),
            "equal_tensors": equal, "max_abs_diff": worst}


def install_mergekit(venv: Path) -> Path:
    """A private venv sharing this interpreter's site-packages (a .pth), with mergekit pip-installed."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        inner = subprocess.run([str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                               check=True, capture_output=True, text=True).stdout.strip()
        Path(inner, "weightlab-shared.pth").write_text(site.getsitepackages()[0] + "\n")
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mergekit"], check=True)
    return venv / "bin" / "mergekit-yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit", default="", help="path to mergekit-yaml")
    ap.add_argument("--install-mergekit", type=Path, default=None, help="make this private venv with mergekit")
    ap.add_argument("--params", type=float, default=2e6, help="parameters per model (default 2e6)")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated recipes to run (task_arithmetic, ties, linear)")
    args = ap.parse_args()
    mergekit = str(install_mergekit(args.install_mergekit)) if args.install_mergekit else args.mergekit
    if not mergekit or not Path(mergekit).exists():
        sys.exit("no mergekit-yaml: pass --mergekit PATH or --install-mergekit VENV")
    work = Path(tempfile.mkdtemp(prefix="weightlab-recipes-"))
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}  # local folders only (a relative path looks like a hub id)
    results = {}
    try:
        base, fts, n = generate(work / "models", args.params, args.tasks)
        chosen = recipes(str(base.relative_to(work)), [str(p.relative_to(work)) for p in fts])
        for name, text in chosen.items():
            if args.only and name not in args.only.split(","):
                continue
            recipe = work / f"{name}.yml"
            recipe.write_text(text)
            mk_args = [str(recipe), str(work / f"mk-{name}"), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
            mk = subprocess.run([mergekit, *mk_args], cwd=work, capture_output=True, text=True, env=offline)
            wl = subprocess.run([sys.executable, "-m", "weightlab.cli", "merge", "--config", str(recipe), "--out",
                                 str(work / f"wl-{name}"), "--quiet"], cwd=work, capture_output=True, text=True)
            if mk.returncode or wl.returncode:
                results[name] = {"mergekit_rc": mk.returncode, "weightlab_rc": wl.returncode,
                                 "error": (mk.stderr + wl.stderr)[-1500:]}
            else:
                results[name] = compare(work / f"wl-{name}", work / f"mk-{name}")
            print(f"{name:16s} {results[name]}", flush=True)
        print(json.dumps({"params": n, "tasks": args.tasks, "mergekit": mergekit, "results": results}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
