"""TensorBoard logging (optional extra ``tensorboard``): ``weightlab run NAME --log tensorboard``.

Writes, under ``<run dir>/tensorboard``: the training loss and learning rate every ``every`` steps (as a
callback of the one loop), every experience's accuracies (``<stream>/accuracy/task<j>`` and the average),
and the accuracy matrix of each finished stream as an image. View with ``tensorboard --logdir runs/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from weightlab.errors import WeightlabError
from weightlab.train.callbacks import Callback

if TYPE_CHECKING:
    from weightlab.train.loop import LoopState

LOGGERS = ("tensorboard",)


class TensorBoardLogger(Callback):
    """A callback (per-step scalars) that the run context also feeds per-experience results."""

    def __init__(self, logdir: str | Path, *, every: int = 10) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError:
            raise WeightlabError("--log tensorboard needs the optional extra: pip install 'weightlab[tensorboard]'") \
                from None
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.every = every
        self.global_step = 0

    def after_step(self, state: LoopState) -> None:
        self.global_step += 1
        if self.global_step % self.every == 0 and state.loss is not None:
            self.writer.add_scalar("train/loss", state.loss.item(), self.global_step)
            self.writer.add_scalar("train/lr", state.optimizer.param_groups[0]["lr"], self.global_step)

    def experience(self, stream: str, index: int, row: Sequence[float]) -> None:
        for j, acc in enumerate(row):
            self.writer.add_scalar(f"{stream}/accuracy/task{j}", acc, index)
        self.writer.add_scalar(f"{stream}/average_accuracy", sum(row[: index + 1]) / (index + 1), index)

    def matrix(self, stream: str, rows: Sequence[Sequence[float]]) -> None:
        from weightlab.report.plots import heatmap

        if rows and len(rows) == len(rows[0]):
            self.writer.add_figure(f"{stream}/accuracy_matrix", heatmap(rows, title=stream), len(rows))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def make_logger(kind: str | None, run_dir: Path) -> TensorBoardLogger | None:
    if kind is None:
        return None
    if kind not in LOGGERS:
        raise WeightlabError(f"unknown --log {kind!r}; expected one of {', '.join(LOGGERS)}")
    return TensorBoardLogger(run_dir / "tensorboard")
