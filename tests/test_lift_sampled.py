"""The masked weight gradient without the dense one (methods/lift/sampled.py) and the sparse step's arithmetic."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from weightlab.methods.lift.model import LiftConfig, merge_and_unload, prepare
from weightlab.methods.lift.optimizer import SparseAdamW
from weightlab.methods.lift.sampled import (
    SAMPLED_MAX_DENSITY,
    column_indices,
    masked_weight_grad,
    row_pointers,
)


def mask(shape: tuple[int, int], density: float, seed: int = 0) -> torch.Tensor:
    numel = shape[0] * shape[1]
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=g)[: max(1, int(density * numel))].sort().values.int()


def test_row_pointers_and_columns_known_answer() -> None:
    idx = torch.tensor([1, 3, 4, 11], dtype=torch.int32)  # a 3×4 matrix: (0,1) (0,3) (1,0) (2,3)
    crow = row_pointers(idx, (3, 4))
    assert crow.tolist() == [0, 2, 3, 4] and crow.dtype == torch.int32
    assert column_indices(idx, crow, 4).tolist() == [1, 3, 0, 3]  # power of two: bit mask
    idx = torch.tensor([1, 4, 5, 14])  # a 3×5 matrix: (0,1) (0,4) (1,0) (2,4)
    crow = row_pointers(idx, (3, 5))
    assert crow.tolist() == [0, 2, 3, 4]
    assert column_indices(idx, crow, 5).tolist() == [1, 4, 0, 4]


@pytest.mark.parametrize("shape", [(64, 48), (40, 64), (33, 17)])
@pytest.mark.parametrize("density", [0.05, SAMPLED_MAX_DENSITY + 0.1, 1.0])
def test_masked_gradient_equals_the_dense_gradient_gathered_at_the_mask(shape, density) -> None:
    torch.manual_seed(0)
    grad_out, x = torch.randn(9, shape[0]), torch.randn(9, shape[1])
    idx = mask(shape, density)
    dense = (grad_out.T @ x).view(-1)[idx.long()]  # what the default path gathers
    got = masked_weight_grad(grad_out, x, idx, shape, dtype=torch.float32)
    assert got.shape == idx.shape and got.dtype == torch.float32
    # a different summation order over the 9 rows: float rounding only
    assert torch.allclose(got, dense, rtol=1e-5, atol=1e-5)
    got64 = masked_weight_grad(grad_out.double(), x.double(), idx.long(), shape, dtype=torch.float64)
    assert torch.allclose(got64, (grad_out.double().T @ x.double()).view(-1)[idx.long()], rtol=1e-12, atol=1e-12)
    # small row blocks on the blocked path, and the sampled path, give the same numbers
    blocks = masked_weight_grad(grad_out, x, idx, shape, dtype=torch.float32, chunk_elements=shape[1])
    assert torch.allclose(blocks, dense, rtol=1e-5, atol=1e-5)


def test_half_precision_inputs_are_computed_in_float32() -> None:
    torch.manual_seed(0)
    grad_out, x = torch.randn(6, 32).bfloat16(), torch.randn(6, 16)
    idx = mask((32, 16), 0.1)
    got = masked_weight_grad(grad_out, x, idx, (32, 16), dtype=torch.float32)
    ref = (grad_out.float().T @ x).view(-1)[idx.long()]
    assert got.dtype == torch.float32 and torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert masked_weight_grad(grad_out, x, idx[:0], (32, 16), dtype=torch.float32).numel() == 0


def old_sparse_step(w: torch.Tensor, idx: torch.Tensor, grads: list[torch.Tensor], *, lr: float, wd: float,
                    betas: tuple[float, float], eps: float) -> torch.Tensor:
    """The masked AdamW arithmetic of the step before it was rearranged (a reference, op for op)."""
    w = w.clone().view(-1)
    m, v = torch.zeros(idx.numel()), torch.zeros(idx.numel())
    for t, g in enumerate(grads, start=1):
        m.lerp_(g, 1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        denom = (v.sqrt() / math.sqrt(1 - betas[1] ** t)).add_(eps)
        cur = w.index_select(0, idx)
        w.index_add_(0, idx, m.div(denom).mul_(-lr / (1 - betas[0] ** t)).sub_(cur * (lr * wd)))
    return w


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_sparse_step_is_bit_for_bit_the_masked_adamw_arithmetic(wd: float) -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 8))
    idx = mask((16, 8), 0.25).long()
    grads = [torch.randn(idx.numel()) for _ in range(4)]
    hp = {"lr": 0.05, "betas": (0.9, 0.95), "eps": 1e-6}
    ref = old_sparse_step(w.detach(), idx, grads, wd=wd, **hp)
    opt = SparseAdamW([{"params": [w], "sparse": True, "selectors": [lambda p, g: idx]}], weight_decay=wd, **hp)
    for g in grads:
        opt._grads[w] = g.clone()
        opt.step()
    assert torch.equal(w.detach().view(-1), ref)


def test_sparse_grad_training_matches_the_dense_hook_path_on_a_wide_layer() -> None:
    # wide enough that the sampled kernel (not the blocked one) runs, with a bias and batch-shaped inputs
    x, y = torch.randn(4, 5, 96), torch.randn(4, 5, 64)
    models = []
    for sparse_grad in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(96, 128), nn.GELU(), nn.Linear(128, 64))
        lift = prepare(model, LiftConfig(rank=8, lora_rank=4, lr=1e-2, refresh_every=2, sparse_grad=sparse_grad,
                                         exclude_modules=()))
        for _ in range(4):
            lift.optimizer.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            lift.optimizer.step()
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(models[1][0].weight, nn.Sequential(nn.Linear(96, 128))[0].weight)


def test_a_deep_copy_of_a_sparse_grad_model_is_a_plain_model_of_its_own_weights() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    lift = prepare(model, LiftConfig(rank=2, density=0.25, sparse_grad=True, target_modules=("0",)))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.zero_()
        twin[0].bias.zero_()
    x = torch.randn(3, 8)
    assert torch.equal(twin[0](x), torch.zeros(3, 8))  # its own (zeroed) weights, not the original's
    twin[0](x).sum().backward()
    assert twin[0].weight.grad is not None and not lift.optimizer._grads  # a plain layer: dense gradient
    model(x).sum().backward()
    assert model[0].weight.grad is None and len(lift.optimizer._grads) == 1
    lift.optimizer.step()
    plain = merge_and_unload(model)
    assert "forward" not in plain[0].__dict__ and not hasattr(plain[0], "_lift_optimizer")
