"""Time per training step of a target MLP trained through each hypernetwork, against the same target trained
directly, in one process (``rnn-hypernetwork``).

    OMP_NUM_THREADS=1 python benchmarks/hnet_overhead.py [--steps 200] [--hidden 64] [--prev-tasks 4]

Every variant runs the same mini-batches through the one training loop (:func:`weightlab.train.train`) with
Adam; the hypernetwork variants also regularise the outputs of ``--prev-tasks`` earlier task embeddings
(the cost of the output regulariser late in a task sequence). Prints wall-clock and process-CPU ms/step and
their ratios to direct training. On a shared CPU the figures are noisy: run it twice and compare ratios,
not absolute times.
"""

from __future__ import annotations

import argparse
import time

import torch

from weightlab.data import ArrayDataset, Experience
from weightlab.methods.hypernet.hypernetworks import (
    ChunkedMLPHyperNet,
    HnetRegConfig,
    HyperModel,
    LSTMHyperNet,
    MLPHyperNet,
    OutputRegularizer,
    count_parameters,
)
from weightlab.models import MLP
from weightlab.train import TrainConfig, train


def time_steps(model: torch.nn.Module, data: ArrayDataset, exp: Experience, *, steps: int,
               callbacks=()) -> tuple[float, float]:
    """Wall-clock and process-CPU seconds per step over ``steps`` steps (after a 10-step warm-up)."""
    warm = TrainConfig(max_steps=10, batch_size=32, lr=1e-3, optimizer="adam", seed=0)
    train(model, data, warm, callbacks=list(callbacks), experience=exp)
    cfg = TrainConfig(max_steps=steps, batch_size=32, lr=1e-3, optimizer="adam", seed=1)
    start, cpu = time.perf_counter(), time.process_time()
    train(model, data, cfg, callbacks=list(callbacks), experience=exp)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=300)
    parser.add_argument("--prev-tasks", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    task = args.prev_tasks
    data = ArrayDataset(torch.rand(1024, 1, 8, 8), torch.randint(0, 10, (1024,)), torch.full((1024,), task))
    exp = Experience(data, data, data, tuple(range(10)), task)

    def target() -> MLP:
        return MLP(64, 10, hidden=(args.hidden, args.hidden))

    n = sum(p.numel() for p in target().parameters())
    variants = {
        "full MLP hnet": MLPHyperNet(n, hidden=(16,)),
        "chunked MLP hnet": ChunkedMLPHyperNet(n, chunk_size=args.chunk_size, hidden=(16,)),
        "LSTM hnet": LSTMHyperNet(n, chunk_size=args.chunk_size, hidden=16),
    }
    base = time_steps(target(), data, exp, steps=args.steps)
    print(f"target MLP 64-{args.hidden}-{args.hidden}-10 ({n} weights), {args.steps} steps, batch 32, "
          f"{args.prev_tasks} previous tasks regularised, threads={torch.get_num_threads()}")
    print(f"{'variant':<22} {'trainable':>9} {'wall ms/step':>12} {'ratio':>6} {'CPU ms/step':>11} "
          f"{'ratio':>6}")
    print(f"{'direct (baseline)':<22} {n:>9} {base[0] * 1e3:>12.2f} {1.0:>6.2f} {base[1] * 1e3:>11.2f} "
          f"{1.0:>6.2f}")
    for name, hnet in variants.items():
        model = HyperModel(target(), hnet)
        for _ in range(task + 1):
            hnet.add_task()
        reg = OutputRegularizer(model, HnetRegConfig(beta=0.01))
        wall, cpu = time_steps(model, data, exp, steps=args.steps, callbacks=[reg])
        print(f"{name:<22} {count_parameters(model):>9} {wall * 1e3:>12.2f} {wall / base[0]:>6.2f} "
              f"{cpu * 1e3:>11.2f} {cpu / base[1]:>6.2f}")


if __name__ == "__main__":
    main()
