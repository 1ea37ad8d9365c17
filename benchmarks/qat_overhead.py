"""QAT overhead and model size: fake-quantized training step vs the full-precision step, same model, one run.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/qat_overhead.py [--steps 10] [--repeats 9] [--dim 64]

For each variant (FP, LSQ, StatsQ, StatsQ + QKR, StatsQ + QKR + tracker + CGA) it times ``--steps`` steps of
the one training loop (``weightlab.train.train``, AdamW) on the same TinyViT initialisation. The variants
alternate, ``--repeats`` rounds (see ``_interleave.py``), and the ratio to the FP step is taken between
medians. Then it converts each QAT model and prints the size of its bit-packed state (safetensors payload)
against the float model's. The last line is JSON with the named ratios (``statsq_step_vs_fp`` etc.).
``--profile`` prints torch.profiler's top operators of one FP and one StatsQ training run. ``--isolate`` instead
splits the StatsQ W2A2 overhead: W2 with float activations, A2 with 8-bit StatsQ weights, and that A2 model
with every LSQ node replaced by an identity node that costs one copy (what having the nodes at all costs),
each against the float step in the same interleaved rounds; its JSON line has ``w_only_vs_fp``,
``a_only_vs_fp`` and ``a_identity_nodes_vs_fp``.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from _interleave import interleaved, machine, top_ops

from weightlab.data import ArrayDataset
from weightlab.methods.quant import lsq
from weightlab.methods.quant.api import QuantConfig, convert, packed_state, prepare, state_nbytes
from weightlab.methods.quant.cga import ConfidenceGuidedAnnealing
from weightlab.methods.quant.oscillation import OscillationTracker
from weightlab.models import TinyViT
from weightlab.train import TrainConfig, train


def train_config(steps: int, batch_size: int) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=batch_size, lr=1e-4, optimizer="adamw", amp=False)


def key(name: str) -> str:
    """``"StatsQ + QKR W2A2"`` → ``"statsq_qkr"``: the variant's name in the JSON."""
    words = [w.lower() for w in name.replace("+", " ").split() if not (w[0] == "W" and "A" in w)]
    return "_".join(words).replace("full_precision", "fp")


class _IdentityNode(torch.autograd.Function):
    """An autograd node that copies its input and passes the gradient straight through (``--isolate``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None, None, None


def isolate(base: TinyViT, data: ArrayDataset, args: argparse.Namespace) -> None:
    """Where the StatsQ W2A2 overhead goes (see the module docstring)."""
    b = args.bits
    models = {"full precision": copy.deepcopy(base),
              f"W{b} only": prepare(copy.deepcopy(base), QuantConfig(bits_w=b, bits_a=None)).model,
              f"A{b} only (W8)": prepare(copy.deepcopy(base), QuantConfig(bits_w=8, bits_a=b)).model}
    config = train_config(args.steps, args.batch_size)
    for model in models.values():
        train(model, data, train_config(1, args.batch_size))
    real = lsq.lsq_quantize

    def identity_nodes() -> None:
        lsq.lsq_quantize = lambda x, step, *, qn, qp, g: _IdentityNode.apply(x, step, qn, qp, g)
        try:
            train(models[f"A{b} only (W8)"], data, config)
        finally:
            lsq.lsq_quantize = real

    contenders = {n: (lambda m=m: train(m, data, config)) for n, m in models.items()}
    contenders[f"A{b} only (W8), identity nodes"] = identity_nodes
    times = interleaved(contenders, repeats=args.repeats)
    fp = times["full precision"]["wall_s"]
    print(f"TinyViT dim {args.dim} depth {args.depth}, batch {args.batch_size}, {args.steps} steps × "
          f"{args.repeats} interleaved rounds, threads {torch.get_num_threads()}, load {machine()['loadavg']}")
    for name, t in times.items():
        print(f"{name:42s} {1e3 * t['wall_s'] / args.steps:9.2f} ms/step {t['wall_s'] / fp:7.3f} × FP")
    names = list(times)
    print(json.dumps({"benchmark": "qat_overhead --isolate", "repeats": args.repeats,
                      "w_only_vs_fp": times[names[1]]["wall_s"] / fp, "a_only_vs_fp": times[names[2]]["wall_s"] / fp,
                      "a_identity_nodes_vs_fp": times[names[3]]["wall_s"] / fp, "machine": machine()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per variant per round")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds (medians)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--isolate", action="store_true", help="split the StatsQ overhead (see the docstring)")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = TinyViT(10, image_size=16, patch_size=4, dim=args.dim, depth=args.depth, num_heads=4)
    gen = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(args.batch_size * 8, 1, 16, 16, generator=gen),
                        torch.randint(0, 10, (args.batch_size * 8,), generator=gen))
    if args.isolate:
        isolate(base, data, args)
        return
    b = args.bits
    variants = {
        "full precision": (None, None),
        f"LSQ W{b}A{b}": (QuantConfig(bits_w=b, bits_a=b, method="lsq"), None),
        f"StatsQ W{b}A{b}": (QuantConfig(bits_w=b, bits_a=b), None),
        f"StatsQ + QKR W{b}A{b}": (QuantConfig(bits_w=b, bits_a=b, qkr=True), None),
        f"StatsQ + QKR W{b}A{b} + tracker + CGA": (
            QuantConfig(bits_w=b, bits_a=b, qkr=True),
            lambda m: [OscillationTracker(m), ConfidenceGuidedAnnealing(m)]),
    }
    models, callbacks = {}, {}
    for name, (config, callbacks_for) in variants.items():
        models[name] = copy.deepcopy(base) if config is None else prepare(copy.deepcopy(base), config).model
        callbacks[name] = callbacks_for(models[name]) if callbacks_for else []
        train(models[name], data, train_config(1, args.batch_size), callbacks=callbacks[name])  # warm-up
    config = train_config(args.steps, args.batch_size)
    if args.profile:
        profile(models, callbacks, data, config)
    print(f"TinyViT dim {args.dim} depth {args.depth}, batch {args.batch_size}, {args.steps} steps × "
          f"{args.repeats} interleaved rounds, threads {torch.get_num_threads()}, load {machine()['loadavg']}")
    times = interleaved({n: (lambda n=n: train(models[n], data, config, callbacks=callbacks[n]))
                         for n in variants}, repeats=args.repeats)
    float_bytes = state_nbytes(base.state_dict())
    fp = times["full precision"]
    print(f"{'variant':42s} {'ms/step':>9s} {'× FP':>7s} {'× FP (CPU)':>11s} {'size (KiB)':>11s} "
          f"{'size ÷ float':>13s}")
    result: dict[str, object] = {"benchmark": "qat_overhead", "dim": args.dim, "depth": args.depth,
                                 "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
                                 "ms_per_step": {}, "size_vs_float": {}}
    for name, (qconfig, _) in variants.items():
        t = times[name]
        ratio, cpu_ratio = t["wall_s"] / fp["wall_s"], t["cpu_s"] / fp["cpu_s"]
        size = float_bytes if qconfig is None else state_nbytes(packed_state(convert(copy.deepcopy(models[name]))))
        print(f"{name:42s} {1e3 * t['wall_s'] / args.steps:9.2f} {ratio:7.2f} {cpu_ratio:11.2f} "
              f"{size / 1024:11.1f} {size / float_bytes:13.3f}")
        result["ms_per_step"][name] = 1e3 * t["wall_s"] / args.steps  # type: ignore[index]
        result["size_vs_float"][name] = size / float_bytes  # type: ignore[index]
        if qconfig is not None:
            result[f"{key(name)}_step_vs_fp"] = ratio
            result[f"{key(name)}_cpu_step_vs_fp"] = cpu_ratio
    result["machine"] = machine()
    print(f"StatsQ W{b}A{b} step / FP step: {result['statsq_step_vs_fp']:.2f}× (target ≤ 1.5×)")
    print(json.dumps(result))


def profile(models: dict, callbacks: dict, data: ArrayDataset, config: TrainConfig) -> None:
    """torch.profiler's operators by self CPU time, for the FP and the StatsQ model (where the time goes)."""
    for name in list(models)[:3:2]:
        print(f"\n## {name}: top operators by self CPU time\n")
        print(top_ops(lambda name=name: train(models[name], data, config, callbacks=callbacks[name])))


if __name__ == "__main__":
    main()
