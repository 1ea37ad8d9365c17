"""Per-task overhead of the ``scole`` experiment against a bare PyTorch loop doing the same optimizer steps.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/scole_overhead.py --tasks 200 --variant sgd-mask

Three ways to run the same SCoLe stream (same model, data, batch size, steps, masking, gradient clipping),
alternated ``--repeats`` times in one process; per task the median over repeats is kept:

* ``bare``      — a hand-written loop: gather the task, shuffle, forward / mask / loss / backward / clip /
                  step,
                  then evaluate on the full test set (what a plain script would do);
* ``train()``   — weightlab's one loop (:func:`weightlab.train.train` with :class:`GroupMasking`) + the same
                  evaluation;
* ``experiment``— the ``scole`` experiment's own per-task function under :meth:`TrialContext.stream`, i.e. the
                  above plus a safetensors checkpoint with the JSON record every ``--checkpoint-every`` tasks
                  (what resumability costs; timed per checkpoint interval and spread over its tasks).

Prints the mean per-task time of each, the ratios to ``bare``, and first-10 vs last-10 task times, and the
same over the first and last 10% of the stream (no growth along the stream is the target). Numbers on a
shared, overloaded machine are noisy; the default clock is the process CPU time, which waiting for a core
does not inflate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _interleave import machine

from weightlab.data import digits
from weightlab.data.scenarios import SCoLeStream
from weightlab.experiments.scole import SCoLeExperimentConfig, generator_config, run_variant
from weightlab.methods.scole.strategies import GroupMasking
from weightlab.models import MLP
from weightlab.runs import RunContext
from weightlab.train import TrainConfig, per_class_accuracy, predict, train
from weightlab.utils import derive_seed

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time  # set from --clock in main()


def bare(config: SCoLeExperimentConfig, stream: SCoLeStream, mask: bool) -> list[float]:
    torch.manual_seed(0)
    model = MLP(stream.train_data.x[0].numel(), config.n_classes, hidden=(config.hidden, config.hidden))
    test_x, test_y = stream.full_test.x, stream.full_test.y
    times = []
    for i in range(len(stream)):
        t0 = clock()
        exp = stream[i]
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.0)
        x, y = exp.train.x, exp.train.y
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(i))
        model.train()
        for start in range(0, len(y), config.batch_size):
            idx = order[start : start + config.batch_size]
            xb, yb = x[idx], y[idx]
            logits = model(xb)
            if mask:
                present = torch.zeros(logits.shape[1], dtype=torch.bool)
                present[yb] = True
                logits = logits.masked_fill(~present, -1e9)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
        model.eval()
        with torch.no_grad():
            logits = model(test_x)
        per_class_accuracy(logits, test_y, config.n_classes)
        (logits.argmax(1) == test_y).float().mean().item()
        times.append(clock() - t0)
    return times


def loop_only(config: SCoLeExperimentConfig, stream: SCoLeStream, mask: bool) -> list[float]:
    torch.manual_seed(0)
    model = MLP(stream.train_data.x[0].numel(), config.n_classes, hidden=(config.hidden, config.hidden))
    callbacks = [GroupMasking()] if mask else []
    times = []
    for i in range(len(stream)):
        t0 = clock()
        exp = stream[i]
        tc = TrainConfig(batch_size=config.batch_size, lr=config.lr, momentum=0.0, grad_clip=config.grad_clip,
                         seed=derive_seed(0, "bench", i))
        train(model, exp.train, tc, callbacks=callbacks)
        logits, targets = predict(model, stream.full_test)
        per_class_accuracy(logits, targets, config.n_classes)
        (logits.argmax(1) == targets).float().mean().item()
        times.append(clock() - t0)
    return times


class TimedContext(RunContext):
    """A run context that timestamps every checkpoint (one per task)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.stamps = [clock()]

    def save_state(self, *args, **kwargs) -> None:
        super().save_state(*args, **kwargs)
        self.stamps.append(clock())


def experiment(config: SCoLeExperimentConfig, data: tuple, variant: str) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = TimedContext(Path(tmp))
        run_variant(config, ctx.trial(0), data, variant)
        chunks = [b - a for a, b in zip(ctx.stamps, ctx.stamps[1:], strict=False)]  # one per checkpoint
        sizes = [config.checkpoint_every] * (config.n_tasks // config.checkpoint_every)
        rest = config.n_tasks % config.checkpoint_every
        sizes += [rest] if rest else []
        return [c / k for c, k in zip(chunks, sizes, strict=True) for _ in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--variant", default="sgd-mask", choices=["sgd", "sgd-mask"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--augment-to", type=int, default=SCoLeExperimentConfig.augment_to)
    parser.add_argument("--checkpoint-every", type=int, default=SCoLeExperimentConfig.checkpoint_every)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: process CPU time (robust on a shared machine); wall: elapsed time")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    config = SCoLeExperimentConfig(n_tasks=args.tasks, seeds=1, augment_to=args.augment_to,
                                   checkpoint_every=args.checkpoint_every)
    data = (digits("train", size=config.image_size, augment_to=config.augment_to or None),
            digits("test", size=config.image_size))
    stream = SCoLeStream(*data, generator_config(config, args.variant, 0))
    mask = args.variant == "sgd-mask"
    steps = sum(-(-len(stream[i].train) // config.batch_size) for i in range(len(stream)))
    print(f"SCoLe stream: {args.tasks} tasks, {steps} optimizer steps in all "
          f"({steps / args.tasks:.1f} per task), "
          f"variant {args.variant}, {torch.get_num_threads()} torch thread(s), {args.clock} clock")
    warm = SCoLeStream(*data, generator_config(SCoLeExperimentConfig(n_tasks=5), args.variant, 1))
    bare(config, warm, mask), loop_only(config, warm, mask)  # warm-up (first optimizer step, allocator)
    runs: dict[str, list[list[float]]] = {"bare": [], "train()": [], "experiment": []}
    for _ in range(args.repeats):  # alternate, so that load changes hit every method alike
        runs["bare"].append(bare(config, stream, mask))
        runs["train()"].append(loop_only(config, stream, mask))
        runs["experiment"].append(experiment(config, data, args.variant))
    per_task = {k: [statistics.median(col) for col in zip(*v, strict=True)] for k, v in runs.items()}
    base = statistics.mean(per_task["bare"])
    k = max(10, len(stream) // 10)
    print(f"{'method':<12}{'ms/task':>10}{'ratio':>8}{'first 10':>11}{'last 10':>10}"
          f"{f'first {k}':>11}{f'last {k}':>10}")
    for name, times in per_task.items():
        mean = statistics.mean(times)
        ends = [statistics.mean(t) for t in (times[:10], times[-10:], times[:k], times[-k:])]
        print(f"{name:<12}{1e3 * mean:>10.2f}{mean / base:>8.2f}" + "".join(
            f"{1e3 * e:>{w}.2f}" for e, w in zip(ends, (11, 10, 11, 10), strict=True)))
    means = {name: statistics.mean(times) for name, times in per_task.items()}
    print(json.dumps({"benchmark": "scole_overhead", "tasks": args.tasks, "repeats": args.repeats,
                      "clock": args.clock, "train_vs_bare": means["train()"] / base,
                      "experiment_vs_bare": means["experiment"] / base,
                      "ms_per_task": {n: 1e3 * m for n, m in means.items()}, "machine": machine()}))


if __name__ == "__main__":
    main()
