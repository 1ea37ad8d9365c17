"""Interleaved timing for the benchmarks: contenders alternate within one process, medians per contender.

On a shared machine the load changes from second to second; timing contender A for a minute and then B for
a minute puts that drift into the ratio. Here every round runs each contender once (the order rotates from
round to round) and the ratio is taken between medians, next to the load average the run saw.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch


def interleaved(contenders: dict[str, Callable[[], object]], *, repeats: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU seconds of each contender over ``repeats`` rounds.

    Args:
        contenders: name -> a call doing one unit of work (the same work for every contender).
        repeats: rounds; each runs every contender once, starting one later in the order each round.
        sync: called before reading the clock (``torch.cuda.synchronize`` on a GPU).
    """
    names = list(contenders)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            sync()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {n: {"wall_s": statistics.median(wall[n]), "cpu_s": statistics.median(cpu[n]),
                "wall_spread": (max(wall[n]) - min(wall[n])) / statistics.median(wall[n])} for n in names}


def machine() -> dict[str, object]:
    """The state a timing was taken in: load average (1, 5, 15 min), torch threads, CPUs."""
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count()}


def top_ops(work: Callable[[], object], *, rows: int = 20) -> str:
    """torch.profiler's table of the operators ``work()`` spends most self CPU time in (the evidence of
    where a step's time goes)."""
    from torch.profiler import profile

    with profile() as prof:
        work()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
