"""Run any method of the merge table key by key: over checkpoints on disk, or over state dicts in memory.

:func:`merge_checkpoints` streams one key at a time (the base tensor and the T models' tensors in float32,
``(T + 2) ×`` the largest tensor, or more for methods that sort), on the CPU or a GPU (``device="cuda"``),
and writes the base's layout in the base's dtypes or ``dtype``. For the four paper methods with unit
weights on the CPU, from plain checkpoints, it hands over to the streaming kernel
(:func:`weightlab.methods.merging.streaming.merge_checkpoints`), which gives the same bits faster.
:func:`merge_state_dicts` runs the same rules on state dicts in memory, so a merge in memory and one
streamed from disk give the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from weightlab.errors import WeightlabError
from weightlab.methods.merging import methods, provenance, streaming
from weightlab.methods.merging.checkpoints import (
    DTYPE_NAMES,
    Checkpoint,
    Source,
    as_source,
    check_output,
    open_all,
    source_path,
    write_like,
)
from weightlab.methods.merging.config import MergeConfig
from weightlab.methods.merging.lora import is_adapter
from weightlab.methods.merging.streaming import InputCheck
from weightlab.methods.merging.task_arithmetic import StateDict, check_finite
from weightlab.report.progress import track
from weightlab.weights import merge_ops
from weightlab.weights.io import exclusive_output


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a device that exists here (a one-line error otherwise)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise WeightlabError(f"device {str(device)!r} is not a torch device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WeightlabError(f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() is "
                                 "False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise WeightlabError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type != "cpu":
        raise WeightlabError(f"--device {device}: weightlab merges on cpu or cuda, got {dev.type!r}")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A floating-point output dtype by name (``float32``, ``float16``, ``bfloat16``, ``float64``) or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise WeightlabError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return DTYPE_NAMES[name]


def check_models(config: MergeConfig, n_models: int) -> None:
    """The number of fine-tuned models fits the method (and ``k``, and the weights' sum for normalising)."""
    low, high = config.spec.models
    if n_models < low or (high is not None and n_models > high):
        span = f"exactly {low}" if low == high else f"at least {low}"
        raise WeightlabError(f"{config.method} merges the base with {span} fine-tuned model(s), got {n_models}")
    if config.uses_consensus and config.k > n_models:
        raise WeightlabError(f"k = {config.k} exceeds the {n_models} tasks (the merge would keep nothing)")
    reads = config.spec.reads
    if "weights" in reads:
        weights = config.weights_for(n_models)
        if config.normalized and abs(sum(weights)) < 1e-8 and config.method == "linear":
            raise WeightlabError(f"linear divides by the sum of the weights, which is 0 ({weights}); change a weight "
                                 "or set normalize: false")
    if "density" in reads:
        config.densities_for(n_models)
    if "lam" in reads:
        config.lambdas_for(n_models)


class Merger:
    """The per-key computation of one merge: ``produce(key)`` -> the output tensor of that key."""

    def __init__(self, base: object, fts: Sequence[object], config: MergeConfig, *, device: torch.device,
                 dtype: torch.dtype | None = None) -> None:
        self.base, self.fts, self.config, self.device, self.dtype = base, list(fts), config, device, dtype
        self.floats = set(base.float_keys())  # type: ignore[attr-defined]
        self.check = InputCheck(base, fts)  # type: ignore[arg-type]
        n = len(self.fts)
        check_models(config, n)
        reads = config.spec.reads
        thresholds = majority = None
        if config.global_scope:  # the reference TIES over the whole model: two passes, then one for the sign
            thresholds, majority = self._global_ties(base.float_keys(), config.density)  # type: ignore[attr-defined]
        self.context = methods.Context(
            config=config,
            weights=torch.tensor(config.weights_for(n) if "weights" in reads else [1.0] * n, device=device),
            densities=tuple(config.densities_for(n) if "density" in reads else [config.density] * n),
            lambdas=torch.tensor(config.lambdas_for(n) if "lam" in reads else [0.0] * n, device=device).reshape(-1, 1),
            thresholds=None if thresholds is None else thresholds.to(device),
            majority=None if majority is None else majority.to(device),
        )

    def group(self, key: str) -> tuple[Tensor, methods.Group]:
        """The base tensor of ``key`` and its group (read through ``.read`` only: any checkpoint-like input)."""
        theta0 = self.base.read(key)  # type: ignore[attr-defined]
        base32 = theta0.reshape(-1).to(torch.float32)
        models = torch.empty(len(self.fts), base32.numel(), dtype=torch.float32)  # (T, n)
        for t, ft in enumerate(self.fts):
            models[t].copy_(ft.read(key).reshape(-1))
            check_finite(models[t], key, f"checkpoint {str(ft.path)!r}")
        return theta0, methods.Group(key, base32.to(self.device), models.to(self.device))

    def _global_ties(self, keys: list[str], density: float) -> tuple[Tensor, Tensor]:
        """Each task's exact trim threshold over the whole model ``(T,)`` and the majority sign ``()``.

        The reference code's global TIES, by the two-level radix select of :mod:`weightlab.weights.merge_ops`
        (two reading passes) and one more pass for ``sign(Σ γ)``. It reads through ``.read`` only, so LoRA
        adapters, renamed and in-memory checkpoints work (the streaming kernel has its own faster passes).
        """
        n_tasks = len(self.fts)
        rank = merge_ops.keep_rank(sum(self.base.numel(k) for k in keys), density)  # type: ignore[attr-defined]
        thresholds = torch.zeros(n_tasks)
        if rank > 0:
            def counts(bins: list[int] | None, label: str) -> Tensor:
                return sum((merge_ops.radix_counts(self.group(key)[1].deltas, bins).cpu()
                            for key in track(keys, label)), torch.zeros((), dtype=torch.long))

            high = counts(None, "threshold pass 1/2")
            thresholds = merge_ops.select_from_counts(high, [rank] * n_tasks,
                                                      lambda bins: counts(bins, "threshold pass 2/2"))
        balance = 0  # Σ sign(Σ_t τ̂_t) over the model, counted exactly as an integer
        for key in track(keys, "majority-sign pass"):
            deltas = self.group(key)[1].deltas
            signs = merge_ops.raw_sign(merge_ops.trim(deltas, thresholds.to(deltas.device)))  # (n,)
            balance += int(signs.sum(dtype=torch.int64))
        return thresholds, torch.sign(torch.tensor(float(balance)))

    def produce(self, key: str) -> Tensor:
        if key not in self.floats:
            return self.base.read(key)  # type: ignore[attr-defined]
        theta0, group = self.group(key)
        self.check.observe(group.deltas)
        merged = self.config.spec.rule(group, self.context).to("cpu")
        return merged.reshape(theta0.shape).to(self.dtype or theta0.dtype)


def _plain(item: str | Path | Source) -> bool:
    """A checkpoint the kernel reads directly: not a LoRA adapter, no prefix options."""
    source = as_source(item)
    return not (is_adapter(source.path) or source.strip_prefix or source.add_prefix)


def _kernel_fits(config: MergeConfig, finetuned: Sequence[str | Path | Source], device: torch.device,
                 dtype: torch.dtype | None) -> bool:
    return (config.fits_kernel(len(finetuned)) and device.type == "cpu" and dtype is None
            and all(map(_plain, finetuned)))


def _same_dtype(base: str | Path, dtype: torch.dtype | None) -> torch.dtype | None:
    """None when every floating-point tensor of ``base`` already has ``dtype`` (nothing to convert)."""
    if dtype is None:
        return None
    ckpt = Checkpoint(base)
    try:
        dtypes = {d for d, _ in ckpt.layout.values() if d.is_floating_point}
    finally:
        ckpt.close()
    return None if dtypes <= {dtype} else dtype


def merge_checkpoints(
    base: str | Path,
    finetuned: Sequence[str | Path | Source],
    out: str | Path,
    config: MergeConfig = MergeConfig(),
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    kernel: bool | None = None,
    root: Path | None = None,
) -> Path:
    """Merge checkpoints on disk into ``out`` with any method of the table; returns the output path.

    Args:
        base: the base checkpoint (a ``.safetensors`` file or a Hugging Face folder); its layout is kept.
        finetuned: the models (files, folders, LoRA adapter folders, or :class:`Source` with prefix options).
        out: the output (must not exist); a folder gets ``merge_config.yaml`` and ``README.md``, a file the
            same recipe in its safetensors metadata (``merge_config``).
        dtype: the output's floating-point dtype (default: the base's).
        device: where the arithmetic runs (``cpu``, ``cuda``).
        kernel: force (True) or avoid (False) the streaming kernel; None: use it where it applies.
        root: the folder of the recipe; the provenance records paths relative to it.
    """
    dev, wanted = resolve_device(device), resolve_dtype(dtype)
    check_models(config, len(finetuned))
    out = check_output(out, [base, *finetuned])
    out_dtype = _same_dtype(source_path(base), wanted)
    fits = _kernel_fits(config, finetuned, dev, out_dtype)
    if kernel and not fits:
        raise WeightlabError(f"the streaming kernel cannot run this {config.method!r} merge (it needs a paper method "
                             "with unit weights, on the CPU, in the base's dtypes, from plain checkpoints)")
    if fits and kernel is not False:
        files = provenance.merge_files(base, finetuned, config, dtype=wanted, root=root)
        return streaming.merge_checkpoints(base, finetuned, out, config, provenance=files)
    spec = config.spec
    base_ckpt, fts = open_all(base, list(finetuned), minimum=spec.models[0],
                              base_is_input=spec.strength != "alpha")
    try:
        files = provenance.merge_files(base, finetuned, config, dtype=wanted, root=root)
        with exclusive_output(out):
            merger = Merger(base_ckpt, fts, config, device=dev, dtype=out_dtype)
            write_like(base_ckpt, out, merger.produce, description=f"merge ({config.method})", dtype=out_dtype,
                       provenance=files)
        merger.check.warn()
    finally:
        for c in [base_ckpt, *fts]:
            c.close()
    return out


class MemoryCheckpoint:
    """A state dict in memory with the read interface of :class:`Checkpoint` (for in-memory merges)."""

    def __init__(self, state: Mapping[str, Tensor], name: str) -> None:
        self.state, self.path, self.is_folder = state, Path(name), False
        self.layout = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}

    def read(self, key: str) -> Tensor:
        return self.state[key]

    def numel(self, key: str) -> int:
        return self.state[key].numel()

    def float_keys(self) -> list[str]:
        return [k for k, v in self.state.items() if v.is_floating_point()]


def merge_state_dicts(
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    config: MergeConfig = MergeConfig(),
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> StateDict:
    """The merged state dict (the base's keys; non-float tensors copied), by the same rules as on disk."""
    from weightlab.methods.merging.task_arithmetic import describe_mismatches

    base_ckpt = MemoryCheckpoint(base, "base")
    fts = [MemoryCheckpoint(ft, f"fine-tuned model {i}") for i, ft in enumerate(finetuned)]
    for ft in fts:
        problem = describe_mismatches(base_ckpt.layout, ft.layout, str(ft.path))
        if problem:
            raise WeightlabError(problem)
    merger = Merger(base_ckpt, fts, config, device=resolve_device(device), dtype=resolve_dtype(dtype))
    merged = {k: merger.produce(k) for k in base}
    return {k: v.clone() if v is base[k] else v for k, v in merged.items()}
