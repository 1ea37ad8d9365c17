"""LIFT memory and mask-selection speed, in one process, against baselines run side by side.

1. Memory on one model (a stack of ``--layers`` square ``nn.Linear`` of width ``--width``, float32): the
   bytes of trainable parameters, the peak of live gradients and the optimizer state for full AdamW, LoRA
   (peft, rank ``--lora-rank`` on every layer) and LIFT (``k = (m + n)·lora_rank`` per layer). The gradient
   peak is measured with a post-accumulate-grad hook that fires before LIFT's own hook frees the dense
   gradient. ``lift sparse_grad`` never forms a dense weight gradient (a sampled matmul in the backward pass
   writes the ``(k,)`` gradient into a buffer it keeps; its index buffers, the CSR row pointers and one shared
   column-index scratch, are counted). With CUDA the allocator's measured peak is
   printed too. Then the seconds per step of each method, without any measuring hook, interleaved over
   ``--repeats`` rounds (medians; ``--profile`` adds torch.profiler's top operators of each method).
2. Mask selection on a ``--size``² matrix with a power-law spectrum: exact SVD vs ``torch.svd_lowrank``
   (ratio = exact / randomized time), and the overlap of the two top-k masks.

    OMP_NUM_THREADS=2 python benchmarks/lift_memory.py            # 4096² SVD: ~20 s on 2 cores
    python benchmarks/lift_memory.py --size 1024 --width 512      # a quick look
    python benchmarks/lift_memory.py --skip-selection --batch 256 # step times where the matmuls dominate

The step-time rounds also time what bounds LIFT from below with the kernels it uses: the frozen stack's
forward and backward (what every method pays: no weight gradient, no optimizer) and, per layer, the sampled
product of the ``k`` gradient entries, the dense weight gradient and its gather at the mask, and the in-place
update of the ``k`` entries (``index_add_``, which touches nearly every cache line of the weight). Their sums
are printed as floors: ``floor_sparse_vs_lora`` = (frozen + layers × (sampled + update)) / LoRA and
``floor_default_vs_lora`` = (frozen + layers × (dense grad + gather + update)) / LoRA, without LIFT's Adam
on the ``k`` entries or any other cost, so no implementation on these kernels can go below them.

The last line is JSON: ``step_time_vs_lora`` (default path), ``sparse_step_time_vs_lora`` (``sparse_grad``),
their CPU-time versions, the two floors, the memory ratios, the selection speed-up, and the load average.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _interleave import interleaved, machine, top_ops
from torch import nn

from weightlab.methods.lift.model import LiftConfig, prepare
from weightlab.methods.lift.sampled import MaskPattern
from weightlab.report.tables import markdown_table
from weightlab.weights.lowrank import lora_budget, mask_overlap, principal_weight_mask


def stack(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = (nn.Sequential(nn.Linear(width, width, bias=False), nn.GELU()) for _ in range(layers))
    return nn.Sequential(*blocks)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def lift_config(method: str, args: argparse.Namespace) -> LiftConfig:
    # randomized SVD masks: the set-up is quicker and the cost of a step does not depend on which entries
    return LiftConfig(rank=args.rank, lora_rank=args.lora_rank, refresh_every=0, track_delta=False,
                      randomized=True, sparse_grad=method == "lift sparse_grad")


def build(method: str, args: argparse.Namespace, device: torch.device, model: nn.Module | None = None):
    """``(model, optimizer, trainable entries)`` of one contender on the same stack (or on ``model``)."""
    model = stack(args.width, args.layers).to(device) if model is None else model
    if method.startswith("lift"):
        lift = prepare(model, lift_config(method, args))
        return model, lift.optimizer, lift.trainable_entries()
    if method == "lora":
        import peft

        targets = [f"{i}.0" for i in range(args.layers)]
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                           target_modules=targets, lora_dropout=0.0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-4), sum(p.numel() for p in trainable)


def measure(method: str, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """Memory of one contender: trainable parameters, the peak of live gradients, the optimizer state."""
    torch.manual_seed(1)
    x = torch.randn(args.batch, args.width, device=device)
    live = {"peak": 0}
    model = stack(args.width, args.layers).to(device)
    if method == "lora":
        model = build(method, args, device, model)[0]
    hooked = [p for p in model.parameters() if p.requires_grad]
    extra = list

    def track() -> None:
        grads = [p.grad for p in hooked if p.grad is not None]
        live["peak"] = max(live["peak"], nbytes(grads) + nbytes(extra()))

    for p in hooked:  # registered before LIFT's hooks, so it sees each dense gradient before it is freed
        p.register_post_accumulate_grad_hook(lambda _p: track())
    if method == "lora":
        opt = torch.optim.AdamW(hooked, lr=1e-4)
        n_trainable = sum(p.numel() for p in hooked)
    else:
        model, opt, n_trainable = build(method, args, device, model)
    if method.startswith("lift"):
        extra = lambda: list(opt._grads.values())  # noqa: E731 - gathered (k,) gradients
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        track()
        opt.step()
    if method.startswith("lift"):
        state = opt.state_bytes()
    else:
        state = nbytes(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    param_bytes = n_trainable * 4
    row: dict[str, object] = {"method": method, "trainable entries": n_trainable,
                              "trainable params (MiB)": 0.0 if "lift" in method else param_bytes / 2**20,
                              "peak live grads (MiB)": live["peak"] / 2**20,
                              "optimizer state (MiB)": state / 2**20,
                              "index buffers (MiB)": opt.index_buffer_bytes() / 2**20 if "lift" in method else 0.0}
    # LIFT edits the frozen weights in place, so it stores no extra trainable parameters
    row["total (MiB)"] = (row["trainable params (MiB)"] + row["peak live grads (MiB)"]  # type: ignore[operator]
                          + row["optimizer state (MiB)"] + row["index buffers (MiB)"])
    if device.type == "cuda":
        row["CUDA peak (MiB)"] = torch.cuda.max_memory_allocated() / 2**20
    return row


FLOOR_PARTS = ("frozen stack", "sampled grad", "dense grad + gather", "k-entry update")


def floor_parts(args: argparse.Namespace, device: torch.device, x: torch.Tensor) -> dict[str, object]:
    """One step's worth of each cost that bounds LIFT from below (see the module docstring): the frozen
    stack's forward and backward, and ``--layers`` times each per-layer kernel on one layer's shapes."""
    model = stack(args.width, args.layers).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    scale = torch.ones((), device=device, requires_grad=True)  # after layer 0, as LoRA and LIFT: no ∂x there
    first, rest = model[0], model[1:]
    m = n = args.width
    k = lora_budget((m, n), args.lora_rank)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randperm(m * n, generator=gen)[:k].sort().values.to(device=device, dtype=torch.int32)
    pattern = MaskPattern.of(idx, (m, n), dtype=torch.float32)
    flats = [block[0].weight.detach().clone().view(-1) for block in model]  # one per layer, as in training
    grad_out = torch.randn(args.batch, m, device=device)
    delta = torch.full((k,), 1e-9, device=device)

    def frozen() -> None:
        rest(first(x) * scale).pow(2).mean().backward()

    def sampled() -> None:
        for _ in range(args.layers):
            pattern.grad(grad_out, x)

    def dense() -> None:
        for _ in range(args.layers):
            (grad_out.T @ x).view(-1).index_select(0, idx)

    def update() -> None:
        for flat in flats:
            flat.index_add_(0, idx, delta)

    return dict(zip(FLOOR_PARTS, (frozen, sampled, dense, update), strict=True))


def step_times(methods: tuple[str, ...], args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Seconds per training step of each method, without any measuring hook, interleaved (see
    ``_interleave.py``): every round runs ``--steps`` steps of each method and ``--steps`` times each
    :func:`floor_parts` cost; medians over ``--repeats``."""
    torch.manual_seed(1)
    x = torch.randn(args.batch, args.width, device=device)
    built = {m: build(m, args, device)[:2] for m in methods}
    parts = floor_parts(args, device, x)

    def steps(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        for _ in range(args.steps):
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            opt.step()

    for model, opt in built.values():  # warm-up
        steps(model, opt)
    for m, (model, opt) in built.items():
        if args.profile:
            print(f"\n### {m}: top operators of {args.steps} steps by self CPU time\n")
            print(top_ops(lambda model=model, opt=opt: steps(model, opt), rows=12))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    def repeat(part) -> None:
        for _ in range(args.steps):
            part()

    contenders = {m: (lambda mo=mo, op=op: steps(mo, op)) for m, (mo, op) in built.items()}
    contenders.update({name: (lambda part=part: repeat(part)) for name, part in parts.items()})
    times = interleaved(contenders, repeats=args.repeats, sync=sync)
    return {m: {k: v / args.steps if k != "wall_spread" else v for k, v in t.items()} for m, t in times.items()}


def power_law_matrix(size: int, *, components: int = 512, alpha: float = 1.0, seed: int = 0) -> torch.Tensor:
    """``U diag(i^-alpha) Vᵀ`` over ``components`` directions plus a small isotropic floor."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(size, components, generator=g))
    v, _ = torch.linalg.qr(torch.randn(size, components, generator=g))
    s = torch.arange(1, components + 1, dtype=torch.float32) ** -alpha
    return (u * s) @ v.T + 1e-4 * torch.randn(size, size, generator=g)


def selection(args: argparse.Namespace) -> list[dict[str, object]]:
    w = power_law_matrix(args.size, alpha=args.alpha)
    k = int(0.05 * w.numel())
    rows = []
    start = time.perf_counter()
    exact = principal_weight_mask(w, args.rank, k)
    t_exact = time.perf_counter() - start
    rows.append({"selection": "exact SVD", "seconds": t_exact, "speed-up": 1.0, "overlap with exact": 1.0})
    for q_factor, niter in ((2, 4), (4, 8)):
        torch.manual_seed(0)
        start = time.perf_counter()
        u, s, v = torch.svd_lowrank(w, q=min(q_factor * args.rank, args.size), niter=niter)
        approx = (u[:, :args.rank] * s[:args.rank]) @ v[:, :args.rank].T
        idx = torch.topk(approx.abs().flatten(), k).indices.sort().values
        t = time.perf_counter() - start
        rows.append({"selection": f"svd_lowrank q={q_factor}r niter={niter}", "seconds": t,
                     "speed-up": t_exact / t, "overlap with exact": mask_overlap(idx, exact)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="training steps per contender per timing round")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds (medians)")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--alpha", type=float, default=1.0, help="singular values i^-alpha")
    parser.add_argument("--skip-selection", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the top operators of each method's steps")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, load {machine()['loadavg']}")
    result: dict[str, object] = {"benchmark": "lift_memory", "device": str(device),
                                 "config": {k: getattr(args, k) for k in ("width", "layers", "batch", "steps",
                                                                          "repeats", "lora_rank", "rank")}}
    if not args.skip_memory:
        result.update(memory(args, device))
    if not args.skip_selection:
        print(f"\n## Mask selection: {args.size}×{args.size}, spectrum i^-{args.alpha:g}, rank {args.rank}, "
              "top 5%\n")
        sel = selection(args)
        print(markdown_table(sel))
        print(f"randomized (q=2r, niter=4) speed-up over exact: {sel[1]['speed-up']:.1f}× (target ≥ 5×)")
        result["selection_speedup"] = sel[1]["speed-up"]
        result["selection_overlap"] = sel[1]["overlap with exact"]
    result["machine"] = machine()
    print(json.dumps(result))


def memory(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    k = lora_budget((args.width, args.width), args.lora_rank)
    print(f"\n## Memory and step time: {args.layers} × Linear({args.width}, {args.width}), batch {args.batch}, "
          f"lora_rank {args.lora_rank} (k = {k} = {100 * k / args.width**2:.2f}% per matrix)\n")
    methods = ("full AdamW", "lora", "lift", "lift sparse_grad")
    rows = [measure(m, args, device) for m in methods]
    times = step_times(methods, args, device)
    for row in rows:
        t = times[row["method"]]
        row.update({"s/step": t["wall_s"], "CPU s/step": t["cpu_s"], "× LoRA (wall)": t["wall_s"]
                    / times["lora"]["wall_s"], "× LoRA (CPU)": t["cpu_s"] / times["lora"]["cpu_s"]})
    print(markdown_table(rows))
    by = {r["method"]: r for r in rows}
    lora_total = by["lora"]["total (MiB)"]
    out = {"step_time_vs_lora": by["lift"]["× LoRA (wall)"],
           "sparse_step_time_vs_lora": by["lift sparse_grad"]["× LoRA (wall)"],
           "cpu_step_time_vs_lora": by["lift"]["× LoRA (CPU)"],
           "sparse_cpu_step_time_vs_lora": by["lift sparse_grad"]["× LoRA (CPU)"],
           "state_vs_lora": by["lift"]["optimizer state (MiB)"] / lora_total,
           "memory_vs_lora": by["lift"]["total (MiB)"] / lora_total,
           "sparse_memory_vs_lora": by["lift sparse_grad"]["total (MiB)"] / lora_total,
           "memory_vs_full": by["lift"]["total (MiB)"] / by["full AdamW"]["total (MiB)"],
           "s_per_step": {m: times[m]["wall_s"] for m in (*methods, *FLOOR_PARTS)},
           "wall_spread": {m: times[m]["wall_spread"] for m in methods}}
    t = {name: times[name]["wall_s"] for name in FLOOR_PARTS}
    lora = times["lora"]["wall_s"]
    out["floor_sparse_vs_lora"] = (t["frozen stack"] + t["sampled grad"] + t["k-entry update"]) / lora
    out["floor_default_vs_lora"] = (t["frozen stack"] + t["dense grad + gather"] + t["k-entry update"]) / lora
    print(markdown_table([{"cost per step": name, "s": t[name], "× LoRA step": t[name] / lora}
                          for name in FLOOR_PARTS]))
    print(f"floors (no implementation on these kernels goes below): default path "
          f"{out['floor_default_vs_lora']:.3f}× LoRA, sparse_grad {out['floor_sparse_vs_lora']:.3f}× LoRA")
    print(f"LIFT optimizer state / LoRA trainable-parameter state (params + grads + moments): "
          f"{out['state_vs_lora']:.3f}× (target ≤ 1.1×)")
    print(f"LIFT total / full AdamW total: {out['memory_vs_full']:.3f}×")
    print(f"memory vs LoRA: lift {out['memory_vs_lora']:.3f}×, lift sparse_grad {out['sparse_memory_vs_lora']:.3f}×")
    print(f"step time vs LoRA (wall, medians of {args.repeats} interleaved rounds): lift "
          f"{out['step_time_vs_lora']:.3f}× (target ≤ 1.1×), lift sparse_grad {out['sparse_step_time_vs_lora']:.3f}× "
          "(target ≤ 1.3×)")
    return out


if __name__ == "__main__":
    main()
