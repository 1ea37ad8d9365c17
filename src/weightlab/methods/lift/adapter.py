"""A LIFT update as an adapter folder, as PEFT saves a LoRA (paper key ``lift``).

    lift.save_pretrained("lift-adapter")                  # adapter_config.json + adapter_model.safetensors
    model = from_pretrained(fresh_base, "lift-adapter")   # the base with the sparse delta added; plain module

``adapter_config.json`` holds ``peft_type: "LIFT"``, the :class:`~weightlab.methods.lift.model.LiftConfig`,
and the shape and dtype of every target weight and ``modules_to_save`` parameter. ``adapter_model.safetensors``
holds, per target weight ``W`` (``name.weight``):

* ``name.weight.indices`` ``(t,)`` int64: the sorted flat indices of the entries LIFT has touched;
* ``name.weight.values`` ``(t,)``: their change ``W − W_base``, in a wider dtype than ``W`` (float64 for float32
  and float64 weights, float32 for 16-bit ones) so that ``W_base + delta`` rounds back to ``W`` exactly;
* ``name.weight.exact_indices`` / ``exact_values``: the rare entries where it would not (a weight that moved
  to within ``2⁻²⁸`` of zero relative to its base value), stored as their final values — usually empty;

and every ``modules_to_save`` parameter (e.g. ``classifier.weight``) in full. Loading onto the base the
adapter was trained from reproduces the fine-tuned weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from weightlab import __version__
from weightlab.errors import FormatError, WeightlabError, closest
from weightlab.weights.io import load_tensors, save_tensors, write_text_atomic

if TYPE_CHECKING:
    from weightlab.methods.lift.model import Lift

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = 1
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def delta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a delta of weights of ``dtype`` is stored in (wide enough for an exact round trip)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def _same_bits(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise bitwise equality of two tensors of one float dtype ``(t,)`` → bool ``(t,)``."""
    return a.view(_BITS[a.dtype]) == b.view(_BITS[b.dtype])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sparse_delta(weight: Tensor, indices: Tensor, base: Tensor) -> dict[str, Tensor]:
    """The saved form of one weight's update: ``indices``, ``values`` (the delta in :func:`delta_dtype`) and the
    ``exact_indices``/``exact_values`` where ``base + delta`` would not round back to ``weight``."""
    flat = weight.detach().reshape(-1)
    new = flat[indices]  # (t,)
    wide = delta_dtype(weight.dtype)
    values = new.to(wide) - base.to(wide)
    inexact = ~_same_bits((base.to(wide) + values).to(weight.dtype), new)
    return {"indices": indices.long().cpu(), "values": values.cpu(),
            "exact_indices": indices[inexact].long().cpu(), "exact_values": new[inexact].cpu()}


def save_pretrained(lift: Lift, path: str | Path) -> Path:
    """Write ``lift``'s update to the folder ``path`` (created; files replaced atomically); returns it."""
    if not lift.config.track_delta:
        raise WeightlabError("save_pretrained needs LiftConfig(track_delta=True) (the original values of the "
                             "touched entries)")
    lift.check_stepped("save_pretrained")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise WeightlabError(f"{str(folder)!r} exists and is not a folder")
    tensors: dict[str, Tensor] = {}
    targets: dict[str, dict[str, Any]] = {}
    for name, module in lift.targets.items():
        key, weight = f"{name}.weight", module.weight
        empty = torch.zeros(0, dtype=torch.long, device=weight.device)
        indices, base = lift.touched.get(key, (empty, weight.detach().reshape(-1)[empty]))
        for part, tensor in sparse_delta(weight, indices, base).items():
            tensors[f"{key}.{part}"] = tensor
        targets[key] = {"shape": list(weight.shape), "dtype": _dtype_name(weight.dtype)}
    saved = {}
    for key, p in lift.saved.items():
        tensors[key] = p.detach().cpu()
        saved[key] = {"shape": list(p.shape), "dtype": _dtype_name(p.dtype)}
    config = {"peft_type": "LIFT", "library": "weightlab", "weightlab_version": __version__, "format": FORMAT,
              "config": dataclasses.asdict(lift.config), "targets": targets, "modules_to_save": saved}
    save_tensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt", "peft_type": "LIFT"})
    write_text_atomic(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return folder


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a LIFT adapter folder, checked to be one."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file() or not (Path(path) / WEIGHTS_FILE).is_file():
        raise WeightlabError(f"no LIFT adapter at {str(path)!r} (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{str(file)!r} is not valid JSON ({exc})") from None
    kind = config.get("peft_type") if isinstance(config, dict) else None
    if kind != "LIFT":
        raise FormatError(f"{str(file)!r} describes a {kind or 'non-PEFT'} adapter, not a LIFT one "
                          "(peft_type 'LIFT')")
    if config.get("format") != FORMAT or not isinstance(config.get("targets"), dict):
        raise FormatError(f"{str(file)!r} has LIFT adapter format {config.get('format')!r}; this weightlab "
                          f"reads format {FORMAT}")
    return config


def lift_config(path: str | Path):
    """The :class:`~weightlab.methods.lift.model.LiftConfig` an adapter was trained with (to continue)."""
    from weightlab.methods.lift.model import LiftConfig

    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in read_config(path)["config"].items()}
    try:
        return LiftConfig(**fields)
    except TypeError as exc:
        raise FormatError(f"the LiftConfig in {str(Path(path) / CONFIG_FILE)!r} is not this version's ({exc})") \
            from None


def _parameter(model: nn.Module, key: str, spec: Any) -> nn.Parameter:
    if not isinstance(spec, dict):
        raise FormatError(f"the adapter's entry for {key!r} must be {{'shape': [...], 'dtype': ...}}, got {spec!r}")
    params = dict(model.named_parameters())
    if key not in params:
        raise WeightlabError(f"the adapter changes {key!r}, which {type(model).__name__} does not have "
                             f"(closest: {', '.join(closest(key, list(params)))})")
    p = params[key]
    if list(p.shape) != spec.get("shape") or _dtype_name(p.dtype) != spec.get("dtype"):
        raise WeightlabError(f"the adapter expects {key!r} of shape {tuple(spec.get('shape') or ())} and dtype "
                             f"{spec.get('dtype')}, the model's is {tuple(p.shape)} {_dtype_name(p.dtype)}")
    return p


def _checked_part(tensors: dict[str, Tensor], key: str, numel: int, values_dtype: torch.dtype,
                  prefix: str) -> tuple[Tensor, Tensor]:
    idx, val = tensors[f"{key}.{prefix}indices"], tensors[f"{key}.{prefix}values"]
    what = f"{key}.{prefix}indices"
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise FormatError(f"{what} must be a 1-D int32/int64 tensor, got {tuple(idx.shape)} {idx.dtype}")
    if val.shape != idx.shape or val.dtype != values_dtype:
        raise FormatError(f"{key}.{prefix}values must be {values_dtype} of shape {tuple(idx.shape)}, got "
                          f"{val.dtype} of shape {tuple(val.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise FormatError(f"{what} holds indices in [{int(idx.min())}, {int(idx.max())}], outside [0, {numel}) "
                          "of the weight")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise FormatError(f"{what} must be strictly increasing (sorted, no repeats)")
    if not bool(torch.isfinite(val).all()):
        raise FormatError(f"{key}.{prefix}values holds non-finite values")
    return idx.long(), val


@torch.no_grad()
def from_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Add the LIFT adapter saved in ``path`` to ``model`` (the base it was trained from), in place.

    Returns ``model``, a plain module (not prepared for LIFT: ``prepare`` it again to continue training).

    Raises:
        WeightlabError: the folder is not a LIFT adapter, a parameter it changes is missing from ``model`` or has
            another shape or dtype, or a tensor in it has the wrong dtype, shape, or out-of-range indices.
    """
    config = read_config(path)
    tensors = load_tensors(Path(path) / WEIGHTS_FILE)
    expected = {f"{k}.{part}" for k in config["targets"]
                for part in ("indices", "values", "exact_indices", "exact_values")}
    expected |= set(config.get("modules_to_save", {}))
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise FormatError(f"{str(Path(path) / WEIGHTS_FILE)!r} does not match its config: "
                          f"{'unexpected' if odd[0] in tensors else 'missing'} tensor {odd[0]!r}")
    updates = []
    for key, spec in config["targets"].items():
        p = _parameter(model, key, spec)
        idx, delta = _checked_part(tensors, key, p.numel(), delta_dtype(p.dtype), "")
        exact_idx, exact = _checked_part(tensors, key, p.numel(), p.dtype, "exact_")
        updates.append((p, idx, delta, exact_idx, exact))
    dense = [(_parameter(model, key, spec), tensors[key]) for key, spec in config.get("modules_to_save", {}).items()]
    for (p, value), key in zip(dense, config.get("modules_to_save", {}), strict=True):
        if value.shape != p.shape or value.dtype != p.dtype:
            raise FormatError(f"the saved {key!r} is {value.dtype} {tuple(value.shape)}, the model's "
                              f"{p.dtype} {tuple(p.shape)}")
    for p, idx, delta, exact_idx, exact in updates:  # everything is checked: now change the model
        if not p.data.is_contiguous():
            p.data = p.data.contiguous()
        flat = p.data.view(-1)
        idx, exact_idx = idx.to(p.device), exact_idx.to(p.device)
        flat[idx] = (flat[idx].to(delta.dtype) + delta.to(p.device)).to(p.dtype)
        flat[exact_idx] = exact.to(p.device)
    for p, value in dense:
        p.data.copy_(value)
    return model
