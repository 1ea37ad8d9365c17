"""Overhead of weightlab's training loop (with callbacks) against a bare PyTorch loop.

Same model, data, optimizer and batch order, in one process; the two are interleaved and repeated, and the
median wall times are compared. Target: ratio ≤ 1.05.

    .venv/bin/python benchmarks/train_overhead.py [--repeats 7] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from _interleave import machine

from weightlab.data import digits
from weightlab.models import MLP
from weightlab.train import Callback, TrainConfig, train

if TYPE_CHECKING:
    from weightlab.data.arrays import Batch
    from weightlab.train.loop import LoopState


class CountSteps(Callback):
    """A cheap callback on two hooks, so the measurement includes callback dispatch."""

    def __init__(self) -> None:
        self.steps = 0

    def on_batch(self, state: LoopState, batch: Batch) -> Batch:
        return batch

    def after_step(self, state: LoopState) -> None:
        self.steps += 1


def bare_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
              lr: float, seed: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    data = digits("train", size=16, augment_to=10_000)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.05, device="cpu", seed=0)
    times: dict[str, list[float]] = {"bare": [], "weightlab": []}
    for r in range(args.repeats + 1):
        torch.manual_seed(0)
        m1 = MLP(256, 10, hidden=(256, 256))
        m2 = MLP(256, 10, hidden=(256, 256))
        m2.load_state_dict(m1.state_dict())
        t0 = time.perf_counter()
        bare_loop(m1, data.x, data.y, epochs=args.epochs, batch_size=args.batch_size, lr=0.05, seed=0)
        t1 = time.perf_counter()
        train(m2, data, config, callbacks=[CountSteps()])
        t2 = time.perf_counter()
        if r == 0:  # warm-up round; also check both loops did the same work
            same = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(m1.parameters(), m2.parameters()))
            print(f"identical weights after training: {same}")
            continue
        times["bare"].append(t1 - t0)
        times["weightlab"].append(t2 - t1)
    bare, ours = statistics.median(times["bare"]), statistics.median(times["weightlab"])
    steps = args.epochs * -(-len(data) // args.batch_size)
    print(f"{steps} steps per run, {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    print(f"bare PyTorch loop : {bare:.3f} s (median)")
    print(f"weightlab train() : {ours:.3f} s (median)")
    print(f"ratio weightlab / bare = {ours / bare:.3f}  (target ≤ 1.05)")
    print(json.dumps({"benchmark": "train_overhead", "steps": steps, "repeats": args.repeats,
                      "weightlab_vs_bare": ours / bare, "bare_s": bare, "weightlab_s": ours,
                      "machine": machine()}))


if __name__ == "__main__":
    main()
