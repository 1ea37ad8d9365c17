"""LIFT under DDP (2 gloo processes): the same update as one process with the whole batch, on both gradient
paths, with and without a densely trained head. Before SparseAdamW averaged its gathered gradients over the
ranks, each rank stepped with its own half-batch gradient (the weights differed by about the learning rate)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from weightlab.methods.lift.model import DDP_IGNORE, LiftConfig, merge_and_unload, prepare

STEPS, BATCH = 3, 8


def make() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def config(sparse_grad: bool, head: bool) -> LiftConfig:
    return LiftConfig(rank=2, lora_rank=2, lr=1e-2, refresh_every=2, exclude_modules=(),
                      modules_to_save=("4",) if head else (), sparse_grad=sparse_grad, max_grad_norm=0.5)


def train(cfg: LiftConfig, *, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    model = make()
    lift = prepare(model, cfg)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(BATCH, 16, generator=gen), torch.randint(0, 4, (BATCH,), generator=gen)
        x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        lift.optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        lift.optimizer.step()  # clips the averaged gradients, then refreshes the masks every 2 steps
    return [p.detach().clone() for p in model.parameters()]


CASES = [(False, True), (True, True), (False, False), (True, False)]  # (sparse_grad, a dense head)


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        queue.put((rank, [[w.tolist() for w in train(config(*case), rank=rank, world=2)] for case in CASES]))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_take_the_one_process_step() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for c, case in enumerate(CASES):
        one = train(config(*case))
        for r in (0, 1):  # each rank took the one-process step, so the ranks agree too
            for w, ref in zip(got[r][c], one, strict=True):
                torch.testing.assert_close(torch.tensor(w), ref, rtol=1e-5, atol=1e-6, msg=f"{case} rank {r}")


def test_prepare_tells_ddp_to_skip_the_targets_and_unload_forgets_it() -> None:
    model = make()
    model._ddp_params_and_buffers_to_ignore = ["someone.else"]
    prepare(model, config(sparse_grad=False, head=True))
    assert getattr(model, DDP_IGNORE) == ["someone.else", "0.weight", "2.weight"]
    merge_and_unload(model)
    assert getattr(model, DDP_IGNORE) == ["someone.else"]
    alone = make()  # only the targets train: DDP would refuse a module with nothing to all-reduce
    prepare(alone, config(sparse_grad=False, head=False))
    assert not hasattr(alone, DDP_IGNORE)


def test_synchronize_averages_and_keeps_weights_no_rank_saw(monkeypatch) -> None:
    """One rank's view, with the other rank's contribution injected into the all-reduce: a weight gathered
    here only gets the average with the other rank's zeros, one gathered on both the mean, and one no rank
    gathered stays without a gradient (no step, as in one process)."""
    from weightlab.methods.lift import optimizer as opt_mod

    a, b, c = (nn.Parameter(torch.zeros(4, 4)) for _ in range(3))
    idx = torch.tensor([0, 5, 10], dtype=torch.int32)
    opt = opt_mod.SparseAdamW([{"params": [a, b, c], "sparse": True, "selectors": [lambda p, g: idx] * 3}])
    opt._grads[a] = torch.tensor([2.0, 4.0, 6.0])  # only this rank
    opt._grads[b] = torch.tensor([1.0, 1.0, 1.0])  # both ranks (the other has 3, 3, 3)
    other = torch.tensor([0.0, 0, 0, 3, 3, 3, 0, 0, 0, 0, 1, 0])  # a's, b's, c's entries, then presence flags
    calls = []

    def all_reduce(flat, op=None):
        calls.append(flat.numel())
        flat.add_(other)

    monkeypatch.setattr(opt_mod.dist, "is_available", lambda: True)
    monkeypatch.setattr(opt_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(opt_mod.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(opt_mod.dist, "all_reduce", all_reduce)
    opt.synchronize()
    opt.synchronize()  # already averaged: no second all-reduce
    assert calls == [12]
    assert opt._grads[a].tolist() == [1.0, 2.0, 3.0] and opt._grads[b].tolist() == [2.0, 2.0, 2.0]
    assert c not in opt._grads
    opt.step()
    assert float(opt.state[c]["step"]) == 0 and float(opt.state[a]["step"]) == 1
    opt._grads[a] = torch.ones(3)
    opt.sync_grads = False
    opt.synchronize()
    assert calls == [12]  # ranks train independently
