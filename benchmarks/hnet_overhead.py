"""Time per training step of a target MLP trained through each hypernetwork, against the same target trained
directly, in one process (``rnn-hypernetwork``).

    OMP_NUM_THREADS=1 python benchmarks/hnet_overhead.py [--steps 200] [--repeats 5] [--hidden 64] [--prev-tasks 4]

Every variant runs the same mini-batches through the one training loop (:func:`weightlab.train.train`) with
Adam; the hypernetwork variants also regularise the outputs of ``--prev-tasks`` earlier task embeddings
(the cost of the output regulariser late in a task sequence). Prints wall-clock and process-CPU ms/step and
their ratios to direct training (the variants alternate round by round, medians over ``--repeats``), then a
final JSON line with ``<variant>_vs_direct`` ratios and the load average.
"""

from __future__ import annotations

import argparse
import json

import torch
from _interleave import interleaved, machine

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of --steps steps (medians)")
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
    runs: dict[str, tuple[torch.nn.Module, list]] = {"direct (baseline)": (target(), [])}
    for name, hnet in {"full MLP hnet": MLPHyperNet(n, hidden=(16,)),
                       "chunked MLP hnet": ChunkedMLPHyperNet(n, chunk_size=args.chunk_size, hidden=(16,)),
                       "LSTM hnet": LSTMHyperNet(n, chunk_size=args.chunk_size, hidden=16)}.items():
        model = HyperModel(target(), hnet)
        for _ in range(task + 1):
            hnet.add_task()
        runs[name] = (model, [OutputRegularizer(model, HnetRegConfig(beta=0.01))])
    warm = TrainConfig(max_steps=10, batch_size=32, lr=1e-3, optimizer="adam", seed=0)
    cfg = TrainConfig(max_steps=args.steps, batch_size=32, lr=1e-3, optimizer="adam", seed=1)
    for model, callbacks in runs.values():
        train(model, data, warm, callbacks=list(callbacks), experience=exp)
    times = interleaved({name: (lambda m=m, cb=cb: train(m, data, cfg, callbacks=list(cb), experience=exp))
                         for name, (m, cb) in runs.items()}, repeats=args.repeats)
    base = times["direct (baseline)"]
    print(f"target MLP 64-{args.hidden}-{args.hidden}-10 ({n} weights), {args.steps} steps × {args.repeats} "
          f"interleaved rounds, batch 32, {args.prev_tasks} previous tasks regularised, "
          f"threads={torch.get_num_threads()}, load {machine()['loadavg']}")
    print(f"{'variant':<22} {'trainable':>9} {'wall ms/step':>12} {'ratio':>6} {'CPU ms/step':>11} "
          f"{'ratio':>6}")
    ratios: dict[str, float] = {}
    for name, (model, _) in runs.items():
        t = times[name]
        wall, cpu = t["wall_s"] / base["wall_s"], t["cpu_s"] / base["cpu_s"]
        print(f"{name:<22} {count_parameters(model):>9} {t['wall_s'] / args.steps * 1e3:>12.2f} {wall:>6.2f} "
              f"{t['cpu_s'] / args.steps * 1e3:>11.2f} {cpu:>6.2f}")
        if name != "direct (baseline)":
            key = name.split()[0].lower()
            ratios[f"{key}_vs_direct"], ratios[f"{key}_cpu_vs_direct"] = wall, cpu
    print(json.dumps({"benchmark": "hnet_overhead", "steps": args.steps, "repeats": args.repeats, **ratios,
                      "machine": machine()}))


if __name__ == "__main__":
    main()
