"""Images per second of weightlab's CoTTA against a faithful port of the reference loop (paper key ``cotta``).

The reference (``qinenergy/cotta:cifar/cotta.py``) runs, on every batch and with autograd on: the student,
the anchor, the plain teacher and 32 augmented teacher passes one after another (augmenting the whole padded
image, then cropping), and only then decides from the anchor's confidence whether to use them; EMA and
restore loop over parameters. The port below keeps that structure and draws its random numbers from the same
per-step generators as weightlab's CoTTA, so both must give identical predictions on the same stream.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cotta_throughput.py --batch 200 --domains 15

Also times weightlab's batched form (vmap over the copies, BatchNorm statistics per copy); on a CPU it is not
expected to be faster. With ``--device cuda`` the same script measures the GPU.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
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


def run(adapter, batches: list[Tensor]) -> tuple[Tensor, float, float]:
    """Outputs, wall seconds and process CPU seconds (steadier than wall time on a shared machine)."""
    start, cpu = time.perf_counter(), time.process_time()
    outs = [adapter(x).detach() for x in batches]
    if batches[0].is_cuda:
        torch.cuda.synchronize()
    return torch.cat(outs), time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--domains", type=int, default=15, help="how many of the 15 corruptions")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of the source model")
    parser.add_argument("--threshold", type=float, default=None,
                        help="anchor threshold (default: the maintainer's rule on the source data; 1.0 = "
                             "augment every batch)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-batched", action="store_true")
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
          f"anchor threshold {threshold:.3f}")

    reference = ReferenceCoTTA(copy.deepcopy(model).to(device), config)
    ref_out, ref_time, ref_cpu = run(reference, batches)
    print(f"reference loop          : {n_images / ref_time:8.1f} img/s  "
          f"(wall {ref_time:.2f} s, cpu {ref_cpu:.2f} s)")
    variants = {"weightlab sequential": dict(augmentation="sequential"),
                "weightlab channels-last": dict(augmentation="sequential", channels_last=True),
                "weightlab always-augment": dict(augmentation="sequential", always_augment=True)}
    if not args.skip_batched:
        variants["weightlab batched (vmap)"] = dict(augmentation="batched")
    for name, options in variants.items():
        wrapper = CoTTA(copy.deepcopy(model).to(device), CoTTAConfig(**{**config.__dict__, **options}))
        out, seconds, cpu = run(wrapper, batches)
        differ = int((out.argmax(1) != ref_out.argmax(1)).sum())
        print(f"{name:24s}: {n_images / seconds:8.1f} img/s  ratio wall {ref_time / seconds:5.2f}×  "
              f"cpu {ref_cpu / cpu:5.2f}×  predictions differing: {differ}/{n_images}  "
              f"max |Δlogit| {float((out - ref_out).abs().max()):.1e}  "
              f"augmented batches {wrapper.augmented_steps}/{wrapper.step_count}")


if __name__ == "__main__":
    main()
