"""Benchmark: streaming TIES merge of 8 fine-tuned checkpoints + a base of a Llama-shaped model.

Contenders (TIES, density 0.2, per-tensor scope, alpha 1), each run in its own subprocess so that its peak
resident memory (``getrusage(RUSAGE_CHILDREN)`` of a fresh wrapper process) and wall time are its own, all
with the same number of threads (``--threads``, default 2: ``OMP_NUM_THREADS`` and mergekit's ``-j``):

* ``weightlab``: ``weightlab merge ... --method ties --scope tensor`` (streams tensor by tensor);
* ``inmemory``: the reference code's approach: load every model, flatten each into one float32 vector,
  stack the task vectors ``(T, d)`` and merge that matrix (per-tensor trimming over segments);
* ``mergekit``: ``mergekit-yaml`` with ``merge_method: ties`` (density 0.2, weight 1, normalize), when it is
  installed in a separate virtualenv (a benchmark-only extra, never a dependency).

    python benchmarks/merge_stream.py --params 100e6 --skip inmemory --repeats 3 \\
        --mergekit /tmp/venv-mergekit/bin/mergekit-yaml

Prints each run's wall time, CPU time, peak RSS and the load average before it; then weightlab's ratios
against the others (medians over interleaved repeats); whether weightlab's output equals the in-memory
path's tensor for tensor (the flattened contender when it ran, and always, key by key, weightlab's in-memory
state-dict functions with the same scope); and a final JSON line with ``results`` (``wall_s``, ``cpu_s``,
``peak_gib`` per contender), ``ratios`` (``wall_vs_mergekit``, ``peak_vs_mergekit``, ...), ``targets``,
``targets_met`` and ``skipped`` (each contender not measured, and why). Generated checkpoints are deleted at
the end. Timings on a shared machine are noisy: read the load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from weightlab.weights import merge_ops  # noqa: E402
from weightlab.weights.stream_io import SafetensorsReader, SafetensorsWriter  # noqa: E402


def llama_shape(params: float) -> dict[str, int]:
    """A Llama config with about ``params`` parameters (untied embeddings)."""
    families = [
        (5e7, (768, 2048, 32000)),
        (2e7, (512, 1376, 16000)),
        (5e6, (256, 688, 8000)),
        (0, (64, 172, 1000)),
    ]
    h, inter, vocab = next(shape for low, shape in families if params >= low)
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    layers = max(1, round((params - 2 * vocab * h - h) / per_layer))
    return {
        "hidden_size": h,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, h // 64),
        "num_key_value_heads": max(1, h // 64),
    }


def layout(cfg: dict[str, int]) -> dict[str, tuple[int, ...]]:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (h, h)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, inter)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def generate(work: Path, params: float, tasks: int) -> tuple[Path, list[Path], int]:
    """A base and ``tasks`` fine-tuned HF folders (fp32, one model.safetensors each, random weights)."""
    cfg = llama_shape(params)
    shapes = layout(cfg)
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "float32",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        **cfg,
    }
    paths = []
    for m in range(tasks + 1):
        folder = work / ("base" if m == 0 else f"ft{m}")
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(hf_config))
        writer = SafetensorsWriter(
            folder / "model.safetensors", {k: (torch.float32, s) for k, s in shapes.items()}, {"format": "pt"}
        )
        for i, (key, shape) in enumerate(shapes.items()):
            base = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.02
            if m:
                base += torch.randn(shape, generator=torch.Generator().manual_seed(1000 * m + i)) * 0.002
            writer.write(key, base)
        writer.close()
        paths.append(folder)
    return paths[0], paths[1:], sum(torch.Size(s).numel() for s in shapes.values())


def inmemory_merge(base: Path, fts: list[Path], out: Path, density: float = 0.2, alpha: float = 1.0) -> None:
    """The reference code's approach (flatten everything, merge a (T, d) matrix), with per-tensor trimming."""
    from safetensors.torch import load_file, save_file

    base_sd = load_file(str(base / "model.safetensors"))
    ft_sds = [load_file(str(p / "model.safetensors")) for p in fts]
    keys = sorted(base_sd)  # state_dict_to_vector sorts the keys
    flat_base = torch.cat([base_sd[k].reshape(-1).float() for k in keys])  # (d,)
    flat_fts = torch.stack([torch.cat([sd[k].reshape(-1).float() for k in keys]) for sd in ft_sds])  # (T, d)
    taus = flat_fts - flat_base  # (T, d)
    merged = torch.empty_like(flat_base)
    start = 0
    for k in keys:  # per-tensor scope: thresholds and majority sign per segment of the flat vector
        seg = slice(start, start + base_sd[k].numel())
        merged[seg] = merge_ops.ties_tensor(
            taus[:, seg], thresholds=merge_ops.trim_thresholds(taus[:, seg], density)
        )
        start = seg.stop
    result = merge_ops.apply_delta(flat_base, merged, alpha)
    out_sd, start = {}, 0
    for k in keys:
        n = base_sd[k].numel()
        out_sd[k] = result[start : start + n].reshape(base_sd[k].shape).clone()
        start += n
    out.mkdir()
    save_file(out_sd, str(out / "model.safetensors"), metadata={"format": "pt"})


def mergekit_config(base: Path, fts: list[Path], density: float) -> str:
    models = "".join(
        f"  - model: {p}\n    parameters:\n      density: {density}\n      weight: 1.0\n" for p in fts
    )
    return (
        f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}"
        "parameters:\n  normalize: true\n  int8_mask: false\ndtype: float32\n"
    )


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd`` (in a fresh wrapper, so the peak RSS is this command's alone); the load average around it."""
    wrapper = [sys.executable, __file__, "--measure-json", json.dumps(cmd)]
    load_before = os.getloadavg()[0]
    done = subprocess.run(wrapper, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if not lines:
        return {"rc": done.returncode, "error": done.stderr[-2000:]}
    result = json.loads(lines[-1])
    result.update(load_before=load_before, load_after=os.getloadavg()[0])
    if result["rc"] != 0:
        result["error"] = done.stderr[-2000:]
    return result


def _measure_child(cmd: list[str]) -> None:
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss / 1024**2  # KiB -> GiB
    print(json.dumps({"rc": rc, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_gib": peak}))


def compare(a: Path, b: Path) -> tuple[bool, float]:
    """Whether two single-file checkpoints hold identical tensors, and the largest absolute difference."""
    ra, rb = SafetensorsReader(a / "model.safetensors"), SafetensorsReader(b / "model.safetensors")
    same, worst = set(ra.tensors) == set(rb.tensors), 0.0
    for k in ra.tensors:
        x, y = ra.read(k), rb.read(k)
        same &= torch.equal(x, y)
        worst = max(worst, (x - y).abs().max().item())
    return same, worst


def verify_per_key(base: Path, fts: list[Path], out: Path, density: float, alpha: float = 1.0) -> bool:
    """Whether ``out`` equals, key by key, weightlab's in-memory state-dict functions with per-tensor scope
    (``ties_merge(..., scope="tensor")`` then ``apply``): the in-memory path's answer at a memory cost of one
    key, so it can be checked at sizes where the flattened contender does not fit."""
    from weightlab import merging

    readers = [SafetensorsReader(p / "model.safetensors") for p in [base, *fts]]
    got = SafetensorsReader(out / "model.safetensors")
    try:
        for key in readers[0].tensors:
            theta0, *thetas = ({key: r.read(key)} for r in readers)
            taus = merging.task_vectors(theta0, thetas)
            merged = merging.ties_merge(taus, density=density, reduce="mean", scope="tensor")
            if not torch.equal(merging.apply(theta0, merged, alpha)[key], got.read(key)):
                print(f"verify: {key!r} differs from the in-memory functions")
                return False
        return True
    finally:
        for r in [*readers, got]:
            r.close()


def ratios(results: dict) -> dict[str, float]:
    """weightlab's wall time and peak memory over each other contender's (medians of the repeats)."""
    ref = results.get("weightlab")
    named = {}
    for name, r in results.items():
        if name != "weightlab" and ref and r.get("rc") == 0 and ref.get("rc") == 0:
            named[f"wall_vs_{name}"] = ref["wall_s"] / r["wall_s"]
            named[f"peak_vs_{name}"] = ref["peak_gib"] / r["peak_gib"]
    return named


def summarise(runs: list[dict]) -> dict:
    """One contender's repeats: medians of wall, CPU and peak; every run's wall time; the first failure."""
    failed = [r for r in runs if r.get("rc") != 0]
    if failed:
        return failed[0]
    out = {"rc": 0, **{k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "peak_gib")}}
    out.update(wall_runs=[r["wall_s"] for r in runs], load=[r["load_before"] for r in runs])
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--measure-json":
        _measure_child(json.loads(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--inmemory":
        inmemory_merge(Path(sys.argv[2]), [Path(p) for p in sys.argv[4:]], Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=100e6, help="parameters per model (default 100e6)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2, help="threads of every contender (OMP_NUM_THREADS, -j)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs of each contender (medians)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/weightlab-merge-stream-bench"))
    ap.add_argument("--mergekit", default="", help="path to mergekit-yaml (skipped when empty or missing)")
    ap.add_argument(
        "--skip", default="", help="comma-separated contenders to skip (weightlab, inmemory, mergekit)"
    )
    ap.add_argument("--no-verify", action="store_true", help="skip the key-by-key check against the in-memory "
                    "state-dict functions")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads)}
    skip = set(filter(None, args.skip.split(",")))
    skipped: dict[str, str] = {}
    try:
        t0 = time.perf_counter()
        base, fts, n = generate(args.work / "models", args.params, args.tasks)
        size = (base / "model.safetensors").stat().st_size / 1e6
        print(
            f"generated 1 + {args.tasks} checkpoints of {n / 1e6:.1f}M parameters ({size:.0f} MB each) in "
            f"{time.perf_counter() - t0:.0f} s; {args.threads} threads per contender"
        )
        cmds = {
            "weightlab": [
                sys.executable, "-m", "weightlab.cli", "merge", str(base), *map(str, fts),
                "--method", "ties", "--density", str(args.density), "--scope", "tensor", "--alpha", "1.0",
                "--quiet", "--out", str(args.work / "out-weightlab"),
            ],
            "inmemory": [
                sys.executable, __file__, "--inmemory", str(base), str(args.work / "out-inmemory"), *map(str, fts),
            ],
        }
        if args.mergekit and Path(args.mergekit).exists():
            cfg = args.work / "mergekit.yml"
            cfg.write_text(mergekit_config(base, fts, args.density))
            cmds["mergekit"] = [
                args.mergekit, str(cfg), str(args.work / "out-mergekit"), "--no-copy-tokenizer", "--quiet",
                "-j", str(args.threads),
            ]
        else:
            reason = f"not found at {args.mergekit!r}" if args.mergekit else "no --mergekit given"
            skipped["mergekit"] = (f"not measured: {reason} (make a private venv with `python "
                                   "benchmarks/merge_recipes.py --install-mergekit VENV`, then pass --mergekit "
                                   "VENV/bin/mergekit-yaml)")
            print(f"mergekit: {skipped['mergekit']}")
        skipped.update({name: "not measured: --skip" for name in cmds if name in skip})
        cmds = {name: cmd for name, cmd in cmds.items() if name not in skip}
        runs: dict[str, list[dict]] = {name: [] for name in cmds}
        for repeat in range(args.repeats):  # interleaved, so that a change in the machine's load hits all
            for name, cmd in cmds.items():
                out_dir = args.work / f"out-{name}"
                if repeat and out_dir.exists():
                    shutil.rmtree(out_dir)
                r = measure(cmd, env)
                runs[name].append(r)
                status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']}: {r.get('error', '')[-600:]}"
                wall, cpu, peak = (r.get(x, float("nan")) for x in ("wall_s", "cpu_s", "peak_gib"))
                print(f"{name:10s} wall {wall:7.1f} s   CPU {cpu:7.1f} s   peak RSS {peak:6.2f} GiB   "
                      f"load {r.get('load_before', float('nan')):.1f}   {status}", flush=True)
        results = {name: summarise(r) for name, r in runs.items()}
        named = ratios(results)
        for key, value in named.items():
            print(f"weightlab {key.replace('_vs_', ' / ')}: {value:.3f}x")
        ok = results.get("weightlab", {}).get("rc") == 0
        identical = {}
        for name in ("inmemory", "mergekit"):
            if results.get(name, {}).get("rc") == 0 and ok:
                same, worst = compare(args.work / "out-weightlab", args.work / f"out-{name}")
                identical[name] = same
                print(f"output weightlab vs {name}: identical={same}, max |diff| = {worst:.3g}")
        if ok and not args.no_verify:
            identical["state_dict_functions"] = verify_per_key(base, fts, args.work / "out-weightlab", args.density)
            print(f"output weightlab vs the in-memory functions, key by key: identical="
                  f"{identical['state_dict_functions']}")
        targets = {"wall_vs_mergekit": 0.2, "peak_vs_mergekit": 0.5}
        met = {k: named[k] <= v for k, v in targets.items() if k in named}
        print(json.dumps({
            "params": n, "tasks": args.tasks, "threads": args.threads, "repeats": args.repeats,
            "load_average": os.getloadavg(), "results": results, "ratios": named, "targets": targets,
            "targets_met": met, "identical": identical,
            "skipped": skipped,
        }))
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
