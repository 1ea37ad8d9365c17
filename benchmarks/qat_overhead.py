"""QAT overhead and model size: fake-quantized training step vs the full-precision step, same model, one run.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/qat_overhead.py [--steps 30] [--dim 64] [--depth 4]

For each variant (FP, LSQ, StatsQ, StatsQ + QKR, StatsQ + QKR + tracker + CGA) it times ``--steps``
steps of the one training loop (``weightlab.train.train``, AdamW) on the same TinyViT initialisation, best of
``--repeats``, and prints the ratio to the FP step. Then it converts each QAT model and prints the size of
its bit-packed state (safetensors payload) against the float model's. CPU timings on a shared machine are
noisy.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from weightlab.data import ArrayDataset
from weightlab.methods.quant.api import QuantConfig, convert, packed_state, prepare, state_nbytes
from weightlab.methods.quant.cga import ConfidenceGuidedAnnealing
from weightlab.methods.quant.oscillation import OscillationTracker
from weightlab.models import TinyViT
from weightlab.train import TrainConfig, train


def time_steps(model: torch.nn.Module, data: ArrayDataset, *, steps: int, batch_size: int, repeats: int,
               callbacks_for=None) -> float:
    """Best-of-``repeats`` seconds per training step (one warm-up step first)."""
    config = TrainConfig(max_steps=steps, batch_size=batch_size, lr=1e-4, optimizer="adamw", amp=False)
    callbacks = callbacks_for(model) if callbacks_for else []
    train(model, data, TrainConfig(max_steps=1, batch_size=batch_size, lr=1e-4, optimizer="adamw"),
          callbacks=callbacks)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        train(model, data, config, callbacks=callbacks)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--bits", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = TinyViT(10, image_size=16, patch_size=4, dim=args.dim, depth=args.depth, num_heads=4)
    gen = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(args.batch_size * 8, 1, 16, 16, generator=gen),
                        torch.randint(0, 10, (args.batch_size * 8,), generator=gen))
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
    float_bytes = state_nbytes(base.state_dict())
    print(f"TinyViT dim {args.dim} depth {args.depth}, batch {args.batch_size}, {args.steps} steps, "
          f"best of {args.repeats}, threads {torch.get_num_threads()}")
    print(f"{'variant':42s} {'ms/step':>9s} {'× FP':>7s} {'size (KiB)':>11s} {'size ÷ float':>13s}")
    fp_time = None
    for name, (config, callbacks_for) in variants.items():
        model = copy.deepcopy(base) if config is None else prepare(copy.deepcopy(base), config).model
        seconds = time_steps(model, data, steps=args.steps, batch_size=args.batch_size, repeats=args.repeats,
                             callbacks_for=callbacks_for)
        fp_time = fp_time or seconds
        size = float_bytes if config is None else state_nbytes(packed_state(convert(model)))
        print(f"{name:42s} {1e3 * seconds:9.2f} {seconds / fp_time:7.2f} {size / 1024:11.1f} "
              f"{size / float_bytes:13.3f}")


if __name__ == "__main__":
    main()
