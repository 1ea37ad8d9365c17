"""Teacher–student model classes for the universality experiment (paper key ``universality``).

:class:`SignNetClass` is a finite class that can be enumerated exactly: networks with ``hidden`` units,

    p(y = 1 | x) = sigmoid(β f(x)),    f(x) = Σ_j v_j sign(w_j · x),    w_j ∈ {-1, 0, 1}^d,  v_j ∈ {-1, 0, 1},

so it has ``3^((d+1)·hidden)`` members. A teacher with one active unit lies in every class with
``hidden ≥ 1``; in a larger class many members compute the same function (inactive units, sign flips,
permutations, cancelling pairs), so the teacher's *weight* shrinks far more slowly than 1/size.

:func:`tanh_unit_log_probs` is the continuous model ``p(y=1|x) = sigmoid(v tanh(w · x))`` used where SGLD
and the exact (grid) mixture are compared.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from weightlab.errors import WeightlabError


def bernoulli_log_probs(logits: Tensor) -> Tensor:
    """``(...,) -> (..., 2)`` with ``[log p(y=0), log p(y=1)]`` for ``p(y=1) = sigmoid(logits)``."""
    return torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=-1)


class SignNetClass:
    """All sign networks with ``hidden`` units on ``d`` inputs, weights in {-1, 0, 1}, output scale ``beta``.

    A unit is an index ``u`` into :attr:`units` (``(U, d+1)`` rows ``[v, w_1..w_d]``, ``U = 3^(d+1)``); a
    hypothesis is a tuple of ``hidden`` unit indices, numbered in base ``U`` with the first unit most
    significant.
    """

    def __init__(self, d: int, hidden: int, *, beta: float = 2.0) -> None:
        if d < 1 or hidden < 1:
            raise WeightlabError(f"d and hidden must be ≥ 1, got d={d}, hidden={hidden}")
        if not beta > 0:
            raise WeightlabError(f"beta must be > 0, got {beta}")
        self.d, self.hidden, self.beta = d, hidden, beta
        grid = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=d + 1)), dtype=torch.float64)
        self.units = grid  # (U, d+1): [v, w]

    @property
    def n_units(self) -> int:
        return self.units.shape[0]

    @property
    def size(self) -> int:
        return self.n_units**self.hidden

    @property
    def log_size(self) -> float:
        return self.hidden * math.log(self.n_units)

    def unit_index(self, v: float, w: Sequence[float]) -> int:
        """The index of the unit ``v · sign(w · x)``."""
        row = torch.tensor([v, *w], dtype=torch.float64)
        if row.numel() != self.d + 1:
            raise WeightlabError(f"a unit needs {self.d} input weights, got {len(w)}")
        match = (self.units == row).all(dim=1).nonzero()
        if match.numel() != 1:
            raise WeightlabError(f"unit (v={v}, w={list(w)}) is not in the grid {{-1, 0, 1}}")
        return int(match[0, 0])

    def hypothesis_index(self, units: Sequence[tuple[float, Sequence[float]]]) -> int:
        """The index of the network with the given active units; the remaining units are ``v = 0, w = 0``."""
        if len(units) > self.hidden:
            raise WeightlabError(
                f"{len(units)} active units do not fit a class with {self.hidden} hidden units"
            )
        zero = self.unit_index(0.0, [0.0] * self.d)
        digits = [self.unit_index(v, w) for v, w in units] + [zero] * (self.hidden - len(units))
        index = 0
        for u in digits:
            index = index * self.n_units + u
        return index

    def unit_outputs(self, x: Tensor) -> Tensor:
        """``v_u sign(w_u · x)`` for every unit u and input. ``(M, d) -> (U, M)``."""
        if x.ndim != 2 or x.shape[1] != self.d:
            raise WeightlabError(f"inputs need shape (M, {self.d}), got {tuple(x.shape)}")
        w, v = self.units[:, 1:], self.units[:, :1]
        return v * torch.sign(w @ x.to(torch.float64).T)

    def logits(self, units: Sequence[tuple[float, Sequence[float]]], x: Tensor) -> Tensor:
        """``β f(x)`` of one network given by its active units. ``(M, d) -> (M,)``."""
        out = self.unit_outputs(x)
        idx = [self.unit_index(v, w) for v, w in units]
        return self.beta * out[idx].sum(0)

    def function_classes(self) -> tuple[Tensor, Tensor]:
        """The class grouped into members that compute the same function for an obvious reason, with their
        exact prior mass under the uniform prior over all ``U^hidden`` members.

        A unit ``(v, w)`` computes the zero function when ``v = 0`` or ``w = 0`` (``3^d + 2`` configurations),
        and ``(v, w)`` equals ``(-v, -w)``; so there are ``3^d`` distinct unit functions (representatives
        ``(0, 0)`` and ``(1, w)``, w ≠ 0). A network is a multiset of ``hidden`` unit functions; its mass is
        ``hidden! / Π c_i! · Π mult_i / U^hidden``. Grouping identical likelihoods leaves the mixture exact.

        Returns:
            ``(G, hidden)`` indices into :meth:`unit_functions` rows, and ``(G,)`` log prior masses (sum 1).
        """
        _, log_mult = self.unit_functions()
        m = log_mult.numel()
        combos = torch.tensor(list(itertools.combinations_with_replacement(range(m), self.hidden)))  # (G, k)
        counts = torch.stack([(combos == i).sum(1) for i in range(m)], dim=1).double()  # (G, m)
        log_perm = math.lgamma(self.hidden + 1) - torch.lgamma(counts + 1).sum(1)
        return combos, log_perm + log_mult[combos].sum(1) - self.log_size

    def unit_functions(self) -> tuple[Tensor, Tensor]:
        """Representatives ``(3^d, d+1)`` of the distinct unit functions and their log multiplicities."""
        w = self.units[self.units[:, 0] == 1.0, 1:]  # (3^d, d): every w once
        w = torch.cat([torch.zeros(1, self.d, dtype=w.dtype), w[(w != 0).any(1)]])  # zero function first
        reps = torch.cat([torch.tensor([[0.0]] + [[1.0]] * (w.shape[0] - 1), dtype=w.dtype), w], dim=1)
        log_mult = torch.full((reps.shape[0],), math.log(2.0), dtype=torch.float64)
        log_mult[0] = math.log(3**self.d + 2)
        return reps, log_mult

    def grouped_logit_chunks(self, x: Tensor, *, chunk: int = 2048) -> Iterator[tuple[Tensor, Tensor]]:
        """``(logits (c, M), log prior (c,))`` over :meth:`function_classes`, ``chunk`` groups at a time."""
        reps, _ = self.unit_functions()
        out = reps[:, :1] * torch.sign(reps[:, 1:] @ x.to(torch.float64).T)  # (m, M)
        combos, log_prior = self.function_classes()
        for i in range(0, combos.shape[0], chunk):
            idx = combos[i : i + chunk]  # (c, hidden)
            logits = out[idx[:, 0]].clone()  # (c, M); summed unit by unit to keep memory at (c, M)
            for j in range(1, self.hidden):
                logits += out[idx[:, j]]
            yield self.beta * logits, log_prior[i : i + chunk]

    def logit_chunks(self, x: Tensor) -> Iterator[Tensor]:
        """Every hypothesis' logits ``β f(x)``, in index order, as chunks ``(U^(hidden-1), M)``."""
        out = self.unit_outputs(x)  # (U, M)
        rest = torch.zeros(1, x.shape[0], dtype=torch.float64)  # (1, M)
        for _ in range(self.hidden - 1):
            rest = (out[:, None, :] + rest[None, :, :]).reshape(-1, x.shape[0])  # (U·R, M)
        for u in range(self.n_units):
            yield self.beta * (out[u][None, :] + rest)


def tanh_unit_log_probs(theta: Tensor, x: Tensor) -> Tensor:
    """``log p(y|x)`` for ``p(y=1|x) = sigmoid(v tanh(w · x))`` with ``θ = (w_1..w_d, v)``.

    Args:
        theta: ``(..., d+1)`` parameters (any leading batch shape).
        x: ``(M, d)`` inputs.

    Returns:
        ``(..., M, 2)``.
    """
    w, v = theta[..., :-1], theta[..., -1:]
    z = v * torch.tanh(w @ x.T)  # (..., M)
    return bernoulli_log_probs(z)
