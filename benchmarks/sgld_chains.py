"""K SGLD chains as one batched computation vs K sequential chains, in one process.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/sgld_chains.py [--chains 16] [--steps 200]

Both sides run the same SGLD update (weightlab.methods.universality.sgld.SGLD) on a 20-64-64-2 tanh MLP with batch 64:
the baseline keeps K ``nn.Sequential`` chains with one optimizer each and loops over them every step; the
batched side keeps the weights stacked as ``(K, in, out)`` tensors (``StackedMLP``, one ``baddbmm`` per layer)
with one optimizer. The script checks that both produce the same parameters given the same noise, then prints
the median wall time of each and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _interleave import machine
from torch import nn

from weightlab.methods.universality.sgld import SGLD, SGLDConfig
from weightlab.methods.universality.sgld_chains import StackedMLP, chain_nll


def make_data(steps: int, batch: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, batch, 20, generator=g), torch.randint(2, (steps, batch), generator=g)


def sequential(chains: list[nn.Sequential], x: torch.Tensor, y: torch.Tensor, config: SGLDConfig,
               noise: list[list[torch.Tensor]] | None = None) -> None:
    """K chains one after the other: a bare loop (the baseline)."""
    opts = [SGLD(c.parameters(), config) for c in chains]
    for t in range(x.shape[0]):
        for k, (chain, opt) in enumerate(zip(chains, opts, strict=True)):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(chain(x[t]), y[t]).backward()
            opt.step(noise=None if noise is None else noise[t][k])


def batched(chains: StackedMLP, x: torch.Tensor, y: torch.Tensor, config: SGLDConfig,
            noise: list[list[torch.Tensor]] | None = None) -> None:
    """K chains as one computation on stacked weights."""
    opt = SGLD(chains.parameters(), config)
    for t in range(x.shape[0]):
        opt.zero_grad(set_to_none=True)
        chain_nll(chains(x[t]), y[t]).mean().backward()
        opt.step(noise=None if noise is None else noise[t])


def check_equal(k: int) -> float:
    """Max parameter difference after 5 steps with shared noise (float64)."""
    stacked = StackedMLP(k, (20, 64, 64, 2), generator=torch.Generator().manual_seed(1)).double()
    singles = [stacked.chain(i) for i in range(k)]
    x, y = make_data(5, 64)
    x = x.double()
    config = SGLDConfig(num_data=10_000, lr=1e-4)
    stacked_noise = [[torch.randn_like(p) for p in stacked.parameters()] for _ in range(5)]
    order = [0, 3, 1, 4, 2, 5]  # Sequential: w0 b0 w1 b1 w2 b2; stacked: w0 w1 w2 b0 b1 b2
    per_chain = [[[stacked_noise[t][j][i].T if j < 3 else stacked_noise[t][j][i].reshape(-1) for j in order]
                  for i in range(k)] for t in range(5)]
    batched(stacked, x, y, config, stacked_noise)
    sequential(singles, x, y, config, per_chain)
    with torch.no_grad():
        return max(float((stacked.chain(i)[0].weight - singles[i][0].weight).abs().max()) for i in range(k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"batched == sequential given the same noise: max |Δθ| = {check_equal(4):.2e}")
    x, y = make_data(args.steps, args.batch)
    config = SGLDConfig(num_data=10_000, lr=1e-4)
    times: dict[str, list[float]] = {"sequential": [], "batched": []}
    for _ in range(args.repeats):
        stacked = StackedMLP(args.chains, (20, 64, 64, 2), generator=torch.Generator().manual_seed(0))
        singles = [stacked.chain(i) for i in range(args.chains)]
        start = time.perf_counter()
        sequential(singles, x, y, config)
        times["sequential"].append(time.perf_counter() - start)
        start = time.perf_counter()
        batched(stacked, x, y, config)
        times["batched"].append(time.perf_counter() - start)
    seq, bat = statistics.median(times["sequential"]), statistics.median(times["batched"])
    print(f"K={args.chains}, 20-64-64-2 MLP, batch {args.batch}, {args.steps} steps, "
          f"threads={torch.get_num_threads()}, median of {args.repeats}")
    print(f"  sequential chains: {seq:.3f} s")
    print(f"  batched (K, in, out) + baddbmm: {bat:.3f} s")
    print(f"  speed-up: {seq / bat:.2f}x")
    print(json.dumps({"benchmark": "sgld_chains", "chains": args.chains, "steps": args.steps,
                      "repeats": args.repeats, "batched_speedup": seq / bat, "sequential_s": seq,
                      "batched_s": bat, "machine": machine()}))


if __name__ == "__main__":
    main()
