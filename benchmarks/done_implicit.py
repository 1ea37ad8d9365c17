"""Cost per training step of DONE with CID's implicit term against plain DONE and plain AT (paper key ``done``).

Same model, same data, same attack, in one process: each arm trains ``--steps`` steps (after a warm-up step)
through the one training loop, and the median wall time per step of ``--repeats`` runs is printed; the last
line is JSON with the named ratios (implicit DONE / DONE, implicit DONE / AT, DONE / AT, barrier-only DONE /
DONE). Run it on a quiet machine for figures; ``--tiny`` is a seconds-long check that it runs.

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/done_implicit.py [--batch 128] [--size 28] [--cg-steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from weightlab.data.arrays import ArrayDataset
from weightlab.methods.adversarial.attacks import PGD, AdversarialTraining
from weightlab.methods.done.dro import DONE, DONEConfig
from weightlab.models import SmallCNN
from weightlab.train import TrainConfig, train
from weightlab.train.callbacks import Callback


def seconds_per_step(make: Callable[[], Callback], data: ArrayDataset, *, width: int, batch: int, steps: int,
                     repeats: int, device: str) -> float:
    """Median over ``repeats`` of the wall time per step of ``steps`` training steps (one warm-up step first)."""
    times = []
    for _ in range(repeats):
        torch.manual_seed(0)
        model = SmallCNN(10, width=width)
        train(model, data, TrainConfig(max_steps=1, batch_size=batch, seed=0, device=device), callbacks=[make()])
        start = time.perf_counter()
        train(model, data, TrainConfig(max_steps=steps, batch_size=batch, seed=1, device=device),
              callbacks=[make()])
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--attack-steps", type=int, default=7)
    parser.add_argument("--cg-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run that checks the script works")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.size, args.width, args.steps, args.repeats = 16, 8, 4, 2, 1
    gen = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + 1)
    data = ArrayDataset(torch.rand(n, 1, args.size, args.size, generator=gen),
                        torch.randint(0, 10, (n,), generator=gen))
    attack = PGD(eps=0.1, steps=args.attack_steps, step_size=0.025)
    arms: dict[str, Callable[[], Callback]] = {
        "AT": lambda: AdversarialTraining(attack),
        "DONE": lambda: DONE(attack, DONEConfig(r=1.0)),
        "DONE barrier": lambda: DONE(attack, DONEConfig(r=1.0, barrier=1e-3)),
        "DONE implicit": lambda: DONE(attack, DONEConfig(r=1.0, barrier=1e-3, implicit=True,
                                                         cg_steps=args.cg_steps)),
    }
    times = {name: seconds_per_step(make, data, width=args.width, batch=args.batch, steps=args.steps,
                                    repeats=args.repeats, device=args.device) for name, make in arms.items()}
    print(f"batch {args.batch}×1×{args.size}×{args.size}, SmallCNN(width={args.width}), PGD-{args.attack_steps}, "
          f"CG {args.cg_steps}, {args.steps} steps, median of {args.repeats}, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    for name, t in times.items():
        print(f"{name:>14}: {t * 1000:8.1f} ms / step")
    print(json.dumps({"implicit_over_done": times["DONE implicit"] / times["DONE"],
                      "implicit_over_at": times["DONE implicit"] / times["AT"],
                      "done_over_at": times["DONE"] / times["AT"],
                      "barrier_over_done": times["DONE barrier"] / times["DONE"]}))


if __name__ == "__main__":
    main()
