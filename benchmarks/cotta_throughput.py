"""Images per second of weightlab's CoTTA against a faithful port of the reference loop (paper key ``cotta``).

The reference (``qinenergy/cotta:cifar/cotta.py``) runs, on every batch and with autograd on: the student,
the anchor, the plain teacher and 32 augmented teacher passes one after another (augmenting the whole padded
image, then cropping), and only then decides from the anchor's confidence whether to use them; EMA and
restore loop over parameters. The port below keeps that structure and draws its random numbers from the same
per-step generators as weightlab's CoTTA, so both must give identical predictions on the same stream.

Two comparisons, both against that port:

* **equal work** (``always_augment=True``): weightlab also computes the 32 augmented passes on every batch,
  so the ratio is what its implementation gains (no autograd for teacher and anchor, crop-first
  augmentation, pair max pooling in the no-grad copies, the colour jitter without index searches);
* **gated** (the default): weightlab skips the augmented passes on batches where the anchor is confident,
  which the reference computes and throws away; most of this ratio is that gating, not faster code.

Every contender runs the whole stream from the same source model, ``--repeats`` rounds interleaved (see
``_interleave.py``); the ratios are between medians. The last line is JSON with the named ratios.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cotta_throughput.py --batch 200 --domains 15

Also times weightlab's batched form (vmap over the copies, BatchNorm statistics per copy); on a CPU it is not
expected to be faster. With ``--device cuda`` the same script measures the GPU.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from _interleave import interleaved, machine
from torch import Tensor, nn

from weightlab.data import digits
from weightlab.methods.cotta.cotta import CoTTA, CoTTAConfig, anchor_threshold_rule, collect_params, configure_model
from weightlab.methods.cotta.streams import continual_stream
from weightlab.methods.cotta.transforms import augment, sample_params
from weightlab.models import SmallCNN
from weightlab.train import TrainConfig, predict, train
from weightlab.utils import derive_seed


class ReferenceCoTTA:
    """A line-by-line port of the reference ``forward_and_adapt`` (the baseline of this benchmark)."""

    def __init__(self, model: nn.Module, config: CoTTAConfig) -> None:
        self.config = config
        self.model = configure_model(model)
        params, _ = collect_params(self.model)
        self.optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.betas)
        self.model_state = copy.deepcopy(self.model.state_dict())
        self.model_anchor = copy.deepcopy(self.model)
        self.model_ema = copy.deepcopy(self.model)
        for p in self.model_ema.parameters():
            p.detach_()
        self.step = 0

    def generator(self, purpose: str, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(derive_seed(self.config.seed, self.step, purpose))

    @torch.enable_grad()
    def __call__(self, x: Tensor) -> Tensor:
        cfg = self.config
        outputs = self.model(x)
        anchor_prob = torch.nn.functional.softmax(self.model_anchor(x), dim=1).max(1)[0]
        standard_ema = self.model_ema(x)
        g = self.generator("augment", x.device)
        params = sample_params(cfg.n_augmentations, tuple(x.shape), generator=g,
                               noise_std=cfg.noise_std, flip_prob=cfg.flip_prob, device=x.device)
        outputs_emas = []
        for i in range(cfg.n_augmentations):
            outputs_emas.append(self.model_ema(augment(x, params.select(i), crop_first=False)[0]).detach())
        if anchor_prob.mean(0) < cfg.anchor_threshold:
            outputs_ema = torch.stack(outputs_emas).mean(0)
        else:
            outputs_ema = standard_ema
        loss = (-(outputs_ema.softmax(1) * outputs.log_softmax(1)).sum(1)).mean(0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        alpha = cfg.ema_momentum
        for ema_param, param in zip(self.model_ema.parameters(), self.model.parameters(), strict=True):
            ema_param.data[:] = alpha * ema_param[:].data[:] + (1 - alpha) * param[:].data[:]
        g = self.generator("restore", x.device)
        for nm, m in self.model.named_modules():
            for npp, p in m.named_parameters(recurse=False):
                if npp in ("weight", "bias") and p.requires_grad:
                    mask = (torch.rand(p.shape, generator=g, device=g.device) < cfg.restore_prob).float()
                    with torch.no_grad():
                        key = f"{nm}.{npp}" if nm else npp
                        p.data = self.model_state[key] * mask + p * (1.0 - mask)
        self.step += 1
        return outputs_ema


def run(adapter, batches: list[Tensor]) -> Tensor:
    """The adapter's outputs over the stream ``(N, classes)``."""
    return torch.cat([adapter(x).detach() for x in batches])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--domains", type=int, default=15, help="how many of the 15 corruptions")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of the source model")
    parser.add_argument("--threshold", type=float, default=None,
                        help="anchor threshold (default: the maintainer's rule on the source data; 1.0 = "
                             "augment every batch)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the whole stream")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-batched", action="store_true")
    parser.add_argument("--skip-channels-last", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = SmallCNN(10, width=args.width)
    train_set = digits("train", size=16)
    tc = TrainConfig(epochs=args.epochs, lr=0.05, schedule="cosine", device="cpu", amp=False)
    train(model, train_set, tc)
    threshold = args.threshold
    if threshold is None:
        threshold = anchor_threshold_rule(predict(model, train_set)[0].softmax(1).max(1).values)
    test = digits("test", size=16)
    from weightlab.data.corruptions import CORRUPTIONS

    stream = continual_stream(test, severity=5, corruptions=CORRUPTIONS[: args.domains], seed=0)
    batches = [x.to(device) for d in stream for x in d.data.x.split(args.batch)]
    n_images = sum(len(x) for x in batches)
    config = CoTTAConfig(anchor_threshold=threshold, flip_prob=0.0)
    print(f"stream: {len(batches)} batches, {n_images} images (batch ≤ {args.batch}, 16×16, SmallCNN width "
          f"{args.width}), device {device}, torch threads {torch.get_num_threads()}, "
          f"anchor threshold {threshold:.3f}, load {machine()['loadavg']}")

    variants = {"weightlab equal work (always_augment)": dict(augmentation="sequential", always_augment=True),
                "weightlab gated (default, sequential)": dict(augmentation="sequential")}
    if not args.skip_channels_last:
        variants["weightlab gated, channels-last"] = dict(augmentation="sequential", channels_last=True)
    if not args.skip_batched:
        variants["weightlab gated, batched (vmap)"] = dict(augmentation="batched")
    outputs: dict[str, Tensor] = {}
    wrappers: dict[str, CoTTA] = {}

    def contender(name: str):
        def go() -> None:
            if name == "reference":
                adapter = ReferenceCoTTA(copy.deepcopy(model).to(device), config)
            else:
                adapter = wrappers[name] = CoTTA(copy.deepcopy(model).to(device),
                                                 CoTTAConfig(**{**config.__dict__, **variants[name]}))
            outputs[name] = run(adapter, batches)
        return go

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = interleaved({n: contender(n) for n in ("reference", *variants)}, repeats=args.repeats, sync=sync)
    ref, ref_out = times["reference"], outputs["reference"]
    print(f"{'reference loop (port)':38s}: {n_images / ref['wall_s']:8.1f} img/s  "
          f"(wall {ref['wall_s']:.2f} s, cpu {ref['cpu_s']:.2f} s, medians of {args.repeats})")
    result: dict[str, object] = {"benchmark": "cotta_throughput", "device": str(device), "images": n_images,
                                 "batches": len(batches), "threshold": threshold, "repeats": args.repeats,
                                 "img_per_s": {"reference": n_images / ref["wall_s"]}, "variants": {}}
    for name in variants:
        t, out, wrapper = times[name], outputs[name], wrappers[name]
        row = {"wall_ratio": ref["wall_s"] / t["wall_s"], "cpu_ratio": ref["cpu_s"] / t["cpu_s"],
               "predictions_differing": int((out.argmax(1) != ref_out.argmax(1)).sum()),
               "max_abs_logit_diff": float((out - ref_out).abs().max()),
               "augmented_batches": wrapper.augmented_steps, "wall_spread": t["wall_spread"]}
        result["img_per_s"][name] = n_images / t["wall_s"]  # type: ignore[index]
        result["variants"][name] = row  # type: ignore[index]
        print(f"{name:38s}: {n_images / t['wall_s']:8.1f} img/s  ratio wall {row['wall_ratio']:5.2f}×  "
              f"cpu {row['cpu_ratio']:5.2f}×  predictions differing: {row['predictions_differing']}/{n_images}  "
              f"max |Δlogit| {row['max_abs_logit_diff']:.1e}  augmented batches "
              f"{wrapper.augmented_steps}/{wrapper.step_count}")
    equal, gated = result["variants"]["weightlab equal work (always_augment)"], \
        result["variants"]["weightlab gated (default, sequential)"]  # type: ignore[index]
    result.update({"equal_work_vs_reference": equal["wall_ratio"], "equal_work_cpu_vs_reference": equal["cpu_ratio"],
                   "equal_work_identical": equal["max_abs_logit_diff"] == 0.0,
                   "gated_vs_reference": gated["wall_ratio"], "gated_cpu_vs_reference": gated["cpu_ratio"],
                   "machine": machine()})
    print(f"equal work: {equal['wall_ratio']:.2f}× wall, {equal['cpu_ratio']:.2f}× CPU (target ≥ 1.5×), "
          f"bit-identical: {result['equal_work_identical']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
