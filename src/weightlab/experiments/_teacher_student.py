"""The teacher–student part of ``variational-binary-cl``: the simulated binary perceptron learnt in field space
(teacher 1, then a related teacher 2, with and without the previous task as prior) and the replica mean-field
(Franz–Parisi) prediction of the same order parameters (:mod:`weightlab.methods.binary_cl.mean_field`).

The simulation's prior weight ``kl_weight = 1/P`` is the theory's ``γ = 1``; no prior is ``γ = 0``. Gradient
descent on the fields finds a minimum of the free energy, which the theory describes at large inverse
temperature ``β`` (``mean_field_beta``); the gap between them is reported, not judged.
"""

from __future__ import annotations

from typing import Any

import torch

from weightlab.data import ArrayDataset
from weightlab.methods.binary_cl.mean_field import MeanFieldConfig, first_task, second_task
from weightlab.methods.binary_cl.variational import (
    ProbitPerceptron,
    VariationalConfig,
    VariationalFieldAdam,
    binary_teacher,
    generalization_error,
    overlaps,
    related_teacher,
    teacher_data,
)
from weightlab.train import TrainConfig, train
from weightlab.utils import derive_seed, seed_everything

CURVE_KEYS = ("R1", "R2", "Q", "eg1", "eg2")


def simulate(*, n: int, alpha: float, teacher_overlap: float, epochs: int, lr: float, beta: float, seed: int,
             with_prior: bool) -> dict[str, list[float]]:
    """Train a probit perceptron on teacher 1 then teacher 2 (``αN`` examples each); the overlaps
    ``R1, R2, Q`` and the mean student's generalization errors after every epoch (``2·epochs`` entries)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "teachers"))
    t1 = binary_teacher(n, generator=gen)
    t2 = related_teacher(t1, teacher_overlap, generator=gen)
    p = max(int(alpha * n), 1)
    seed_everything(derive_seed(seed, "student"))
    student = ProbitPerceptron(n)
    curve: dict[str, list[float]] = {k: [] for k in CURVE_KEYS}
    for task, teacher in enumerate((t1, t2)):
        x, y = teacher_data(teacher, p, generator=gen)  # (P, N), (P,)
        vc = VariationalConfig(lr=lr, prior="task", kl_weight=None if with_prior else 0.0)
        opt = VariationalFieldAdam([student.layer], vc, kl_weight=vc.resolved_kl_weight(n_train=p, batch_size=32))
        if task > 0:
            opt.consolidate()
        for epoch in range(epochs):
            student.layer.beta = beta
            train(student, ArrayDataset(x, y), TrainConfig(epochs=1, batch_size=32, lr=lr,
                                                            seed=derive_seed(seed, task, epoch)), optimizer=opt)
            mean = torch.tanh(student.layer.beta * student.layer.field.detach())
            r1, r2, q = overlaps(mean, [t1, t2])
            values = (r1, r2, q, generalization_error(r1, q), generalization_error(r2, q))
            for k, v in zip(CURVE_KEYS, values, strict=True):
                curve[k].append(v)
    return curve


def theory(*, alphas: tuple[float, ...], teacher_overlap: float, beta: float, nodes: int,
           gammas: tuple[float, ...] = (0.0, 1.0)) -> list[dict[str, Any]]:
    """The replica-symmetric saddle point after task 2 for every ``α`` (= α₁ = α₂) and prior weight ``γ``:
    overlaps ``R1``/``R2`` of the mean student, ``Q = q*``, and the convergence of both saddle points."""
    config = MeanFieldConfig(beta=beta, n_z=3 * nodes, n_x=nodes, n_m=nodes)
    rows = []
    for alpha in alphas:
        first = first_task(alpha, config)
        for gamma in gammas:
            second = second_task(first, alpha, teacher_overlap=teacher_overlap, gamma=gamma, config=config)
            rows.append({"alpha": alpha, "gamma": gamma, "R1 after task 1": first.r, "R1": second.r_other,
                         "R2": second.r, "Q": second.q_star, "converged": first.converged and second.converged,
                         "iterations": [first.iterations, second.iterations]})
    return rows
