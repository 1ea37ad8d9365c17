"""PGD speed: weightlab's ℓ∞ PGD against torchattacks' PGD (if importable) and a plain reference loop.

Same model, same batch, same ε / step / steps, in one process; the contenders alternate round by round
(``_interleave.py``) and the script prints median wall and CPU times and the ratio weightlab / baseline
(target ≤ 1.0), then a final JSON line with ``weightlab_vs_<baseline>`` ratios and the load average. Without
a random start the three produce the same adversarial examples (the loss is summed here and averaged there,
which leaves the gradient's sign unchanged); that is checked first.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/pgd.py [--batch 256] [--size 32] [--repeats 7]

torchattacks is optional (``make`` installs it with ``pip install --no-deps 'torchattacks>=3.5'``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _interleave import interleaved, machine
from torch import Tensor, nn

from weightlab.methods.adversarial.attacks import PGD
from weightlab.models import SmallCNN


def plain_pgd(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, alpha: float, steps: int, random_start: bool
) -> Tensor:
    """The textbook loop (Madry et al.), written as users write it: the baseline."""
    model.eval()
    adv = x.clone().detach()
    if random_start:
        adv = (adv + torch.empty_like(adv).uniform_(-eps, eps)).clamp(0, 1).detach()
    for _ in range(steps):
        adv.requires_grad = True
        loss = F.cross_entropy(model(adv), y)
        grad = torch.autograd.grad(loss, adv)[0]
        adv = adv.detach() + alpha * grad.sign()
        adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1).detach()
    return adv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = SmallCNN(10, width=args.width).to(device).eval()
    x = torch.rand(args.batch, 1, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    eps, alpha = 8 / 255, 2 / 255

    candidates: dict[str, Callable[[bool], Tensor]] = {
        "weightlab": lambda rs: PGD(eps=eps, steps=args.steps, step_size=alpha, random_start=rs)(
            model, x, y
        ),
        "plain loop": lambda rs: plain_pgd(
            model, x, y, eps=eps, alpha=alpha, steps=args.steps, random_start=rs
        ),
    }
    try:
        import torchattacks

        def ta(rs: bool) -> Tensor:
            return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=args.steps, random_start=rs)(x, y)

        candidates["torchattacks " + torchattacks.__version__] = ta
    except ImportError:
        print("torchattacks is not importable: comparing against the plain loop only")

    reference = candidates["weightlab"](False)
    for name, fn in candidates.items():
        diff = (fn(False) - reference).abs().max().item()
        print(f"{name:>22}: max |Δ adv| vs weightlab without random start = {diff:.2e}")
    for fn in candidates.values():  # warm-up
        fn(True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = interleaved({name: (lambda fn=fn: fn(True)) for name, fn in candidates.items()},
                        repeats=args.repeats, sync=sync)
    print(
        f"PGD-{args.steps}, batch {args.batch}×1×{args.size}×{args.size}, SmallCNN(width={args.width}), "
        f"device {device}, medians of {args.repeats} interleaved rounds"
    )
    ratios: dict[str, float] = {}
    for name, t in times.items():
        ratio = times["weightlab"]["wall_s"] / t["wall_s"]
        cpu_ratio = times["weightlab"]["cpu_s"] / t["cpu_s"]
        print(f"{name:>22}: {t['wall_s'] * 1000:8.1f} ms   weightlab / {name} = {ratio:.2f} (CPU {cpu_ratio:.2f})")
        if name != "weightlab":
            key = name.split()[0]
            ratios[f"weightlab_vs_{key}"], ratios[f"weightlab_vs_{key}_cpu"] = ratio, cpu_ratio
    print(json.dumps({"benchmark": "pgd", "batch": args.batch, "size": args.size, "steps": args.steps,
                      "repeats": args.repeats, "device": str(device), **ratios,
                      "ms": {n: 1000 * t["wall_s"] for n, t in times.items()}, "machine": machine()}))


if __name__ == "__main__":
    main()
