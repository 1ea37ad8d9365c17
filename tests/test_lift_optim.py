"""SparseAdamW (methods/lift/optimizer.py): AdamW on masked entries, O(k) state, freed gradients, refresh."""

from __future__ import annotations

import torch
from torch import nn

from weightlab.methods.lift.optimizer import SparseAdamW


def fixed(*index_lists: list[int]):
    """A selector returning the given index lists one after the other (the last one repeats)."""
    calls = iter(index_lists)
    last = [None]

    def select(weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        last[0] = next(calls, last[0])
        return torch.tensor(last[0])

    return select


def loss_of(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x @ w.T).sin().pow(2).sum()


def test_full_mask_equals_torch_adamw_with_decoupled_weight_decay() -> None:
    w = nn.Parameter(torch.randn(4, 3))
    ref = nn.Parameter(w.detach().clone())
    hp = {"lr": 0.05, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.3}
    opt = SparseAdamW([{"params": [w], "sparse": True, "selectors": [fixed(list(range(12)))]}], **hp)
    torch_opt = torch.optim.AdamW([ref], **hp)
    x = torch.randn(5, 3)
    for _ in range(6):
        for p, o in ((w, opt), (ref, torch_opt)):
            o.zero_grad()
            loss_of(p, x).backward()
            o.step()
    assert torch.allclose(w, ref, atol=1e-6)


def test_entries_outside_the_mask_never_change_and_inside_follow_adamw() -> None:
    w = nn.Parameter(torch.randn(4, 3))
    ref = nn.Parameter(w.detach().clone())
    keep = [1, 5, 6, 10]
    hp = {"lr": 0.1, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.5}
    opt = SparseAdamW([{"params": [w], "sparse": True, "selectors": [fixed(keep)]}], **hp)
    torch_opt = torch.optim.AdamW([ref], **hp)
    start = w.detach().clone()
    x = torch.randn(5, 3)
    for _ in range(5):
        opt.zero_grad()
        loss_of(w, x).backward()
        opt.step()
        torch_opt.zero_grad()
        # reference: AdamW on the same weights with the gradient zeroed outside the mask
        with torch.no_grad():
            ref.copy_(torch.where(torch.isin(torch.arange(12), torch.tensor(keep)).view(4, 3), ref, start))
        loss_of(ref, x).backward()
        torch_opt.step()
    outside = torch.ones(12, dtype=torch.bool)
    outside[keep] = False
    assert torch.equal(w.detach().view(-1)[outside], start.view(-1)[outside])
    assert (w.detach().view(-1)[keep] != start.view(-1)[keep]).all()
    assert torch.allclose(w.detach().view(-1)[keep], ref.detach().view(-1)[keep], atol=1e-6)


def test_weight_decay_acts_on_the_real_weights() -> None:
    # zero gradient: the Adam step is 0 and only decoupled decay w <- w (1 - lr wd) remains (the official code
    # applies it to a boolean-indexed copy, so there it does nothing)
    w = nn.Parameter(torch.full((2, 2), 2.0))
    opt = SparseAdamW([{"params": [w], "sparse": True, "selectors": [fixed([0, 3])]}], lr=0.1,
                      weight_decay=0.5)
    (w * 0).sum().backward()
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([[2.0 * 0.95, 2.0], [2.0, 2.0 * 0.95]]))


def test_dense_gradient_is_freed_and_accumulation_adds_up() -> None:
    x1, x2 = torch.randn(5, 3), torch.randn(5, 3)
    w = nn.Parameter(torch.randn(4, 3))
    opt = SparseAdamW([{"params": [w], "sparse": True, "selectors": [fixed([0, 4, 11])]}], lr=0.1)
    loss_of(w, x1).backward()
    loss_of(w, x2).backward()  # gradient accumulation over two micro-batches
    assert w.grad is None
    gathered = opt._grads[w]
    w2 = nn.Parameter(w.detach().clone())
    (loss_of(w2, x1) + loss_of(w2, x2)).backward()
    assert gathered.shape == (3,)
    assert torch.allclose(gathered, w2.grad.view(-1)[[0, 4, 11]], atol=1e-6)
    opt.zero_grad()
    assert w not in opt._grads


def test_state_size_is_what_the_formula_says() -> None:
    r = 2
    layers = [nn.Linear(16, 8, bias=False), nn.Linear(8, 12, bias=False)]
    ks = [(m + n) * r for m, n in ((8, 16), (12, 8))]
    sel = [fixed(list(range(k))) for k in ks]
    opt = SparseAdamW([{"params": [lay.weight for lay in layers], "sparse": True, "selectors": sel}])
    assert opt.state_numel() == {"indices": sum(ks), "moments": 2 * sum(ks)}
    # int32 indices + two float32 moments + a float32 step counter per matrix
    assert opt.state_bytes() == sum(ks) * (4 + 2 * 4) + 2 * 4
    assert all(opt.state[lay.weight]["indices"].dtype == torch.int32 for lay in layers)


def test_refresh_carries_the_moments_of_entries_that_stay() -> None:
    w = nn.Parameter(torch.randn(4, 3))
    opt = SparseAdamW([{"params": [w], "sparse": True, "selectors": [fixed([0, 2, 5], [2, 5, 9])]}],
                      lr=0.01, refresh_every=3)
    x = torch.randn(5, 3)
    for _ in range(2):
        opt.zero_grad()
        loss_of(w, x).backward()
        opt.step()
    before = {k: opt.state[w][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    opt.zero_grad()
    loss_of(w, x).backward()
    g = opt._grads[w].clone()
    opt.step()  # third step: update with the old mask, then refresh
    st = opt.state[w]
    assert st["indices"].tolist() == [2, 5, 9]
    assert float(st["step"]) == 3  # bias correction goes on
    m_old = before["exp_avg"] * 0.9 + 0.1 * g  # the moments after step 3 at entries 0, 2, 5
    v_old = before["exp_avg_sq"] * 0.95 + 0.05 * g * g
    assert torch.allclose(st["exp_avg"], torch.stack([m_old[1], m_old[2], torch.tensor(0.0)]), atol=1e-7)
    assert torch.allclose(st["exp_avg_sq"], torch.stack([v_old[1], v_old[2], torch.tensor(0.0)]), atol=1e-9)


def test_gradient_masks_are_selected_from_the_next_gradient() -> None:
    w = nn.Parameter(torch.zeros(2, 3))

    def top_grad(weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        assert grad is not None
        return grad.abs().view(-1).topk(2).indices.sort().values

    opt = SparseAdamW([{"params": [w], "sparse": True, "selectors": [top_grad]}], lr=0.1, needs_grad=True)
    (w * torch.tensor([[1.0, -9.0, 0.0], [3.0, 0.0, 0.5]])).sum().backward()
    opt.step()
    assert opt.state[w]["indices"].tolist() == [1, 3]
    assert (w.detach().view(-1) != 0).nonzero().flatten().tolist() == [1, 3]


def test_dense_groups_train_with_plain_adamw_and_clipping_scales_gradients() -> None:
    head = nn.Parameter(torch.randn(3))
    ref = nn.Parameter(head.detach().clone())
    opt = SparseAdamW([{"params": [head]}], lr=0.1, weight_decay=0.1, max_grad_norm=1e-3)
    torch_opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6)
    (head * 100).sum().backward()
    opt.step()
    (ref * 100).sum().backward()
    torch.nn.utils.clip_grad_norm_([ref], 1e-3)
    torch_opt.step()
    assert torch.allclose(head, ref, atol=1e-6)


def test_state_dict_round_trip_keeps_integer_indices_for_half_precision_weights() -> None:
    w = nn.Parameter(torch.randn(300, 300).bfloat16())
    keep = list(range(0, 90000, 7))  # indices that bf16 cannot represent exactly
    opt = SparseAdamW([{"params": [w], "sparse": True, "selectors": [fixed(keep)]}], lr=0.1)
    (w.float() ** 2).sum().backward()
    opt.step()
    saved = opt.state_dict()
    other = SparseAdamW([{"params": [w], "sparse": True, "selectors": [fixed([0])]}], lr=0.1)
    other.load_state_dict(saved)
    st = other.state[w]
    assert st["indices"].dtype == torch.int32 and st["indices"].tolist() == keep
    assert st["exp_avg"].dtype == torch.float32 and torch.equal(st["exp_avg"], opt.state[w]["exp_avg"])


def test_refresh_schedule_survives_a_state_dict_round_trip():
    from weightlab.methods.lift.model import LiftConfig, prepare

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = prepare(model, LiftConfig(rank=2, density=0.25, refresh_every=5, target_modules=("0",))).optimizer
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    assert state["steps"] == 2
    fresh = prepare(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)),
                    LiftConfig(rank=2, density=0.25, refresh_every=5, target_modules=("0",))).optimizer
    fresh.load_state_dict(state)
    assert fresh.steps == 2


def test_masked_gradient_linear_under_bf16_autocast():
    """Under bf16 autocast the masked-gradient backward (sparse_grad) makes the update the dense gradient makes:
    float32 weights, only the principal entries of the targets move, and the gradient reaches layer 0 through
    the masked layer 2 (its autocast-safe input gradient)."""
    from weightlab.methods.lift.model import LiftConfig, prepare

    def one_step(sparse_grad: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, set[int]]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                    torch.nn.Linear(8, 2))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        lift = prepare(model, LiftConfig(rank=2, density=0.25, sparse_grad=sparse_grad, target_modules=("0", "2")))
        masks = {f"{n}.weight": set(lift.optimizer.masks()[model[int(n)].weight].tolist()) for n in ("0", "2")}
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().sum()
        loss.backward()
        lift.optimizer.step()
        return before, model.state_dict(), masks

    before, sparse, masks = one_step(True)
    _, dense, dense_masks = one_step(False)
    assert masks == dense_masks
    for name, mask in masks.items():
        assert sparse[name].dtype == torch.float32 and len(mask) == 16  # 25% of 8×8
        moved = set((sparse[name] != before[name]).flatten().nonzero().flatten().tolist())  # flat indices
        assert moved and moved <= mask, name
        torch.testing.assert_close(sparse[name], dense[name])
    assert torch.equal(sparse["3.weight"], before["3.weight"])  # not a target: frozen
