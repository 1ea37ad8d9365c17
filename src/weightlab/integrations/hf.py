"""weightlab callbacks and LIFT inside the Hugging Face ``Trainer`` (needs the ``hf`` extra).

    lift = prepare(model, LiftConfig(...))
    Trainer(model=model, args=args, train_dataset=ds, **lift.trainer_kwargs()).train()
    # or, with other weightlab callbacks and any optimizer:
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[WeightlabCallback(tracker, cga, ewc)])

:class:`WeightlabCallback` maps the Trainer's events onto weightlab's hooks:

==========================  ===============================================================================
Trainer event               weightlab
==========================  ===============================================================================
``on_train_begin``          ``on_experience_start``
``on_pre_optimizer_step``   ``loss`` hooks as weight penalties (their gradient is added), ``after_backward``,
                            then gradient clipping (moved here from the Trainer, see below)
``on_optimizer_step``       ``after_step``
``on_train_end``            ``on_experience_end``
==========================  ===============================================================================

The Trainer clips gradients before ``on_pre_optimizer_step``, i.e. before a callback could mask them (CGA) and
without the gradients LIFT has already gathered (and freed). So when ``args.max_grad_norm > 0`` the adapter
sets it to 0 for the run (restored at the end) and clips itself after ``after_backward``, with
:func:`weightlab.train.loop.clip_gradients` (LIFT's own gradients included). A ``loss`` hook can only add a
term that depends on the weights (EWC's penalty): it is called as ``loss(state, None, None, 0)`` once per
optimizer step. Hooks that need the batch or the logits (``on_batch``, ``transform_logits``,
``sample_weights``) have no place in a TrainerCallback and are refused.

With ``lift=`` the adapter also fails loudly when the Trainer steps another optimizer than LIFT's (at the
start) or LIFT's optimizer never stepped (at the end), and logs the true trainable count (LIFT's entries, not
the whole target matrices the Trainer counts).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers
from transformers import TrainerCallback

from weightlab.errors import WeightlabError
from weightlab.integrations.hooks import CallbackRunner
from weightlab.methods.lift.model import Lift
from weightlab.train.callbacks import Callback, overriding
from weightlab.train.loop import TrainConfig, clip_gradients

logger = logging.getLogger(__name__)
BATCH_HOOKS = ("on_batch", "transform_logits", "sample_weights")


def _unwrap(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (the Trainer hands callbacks the wrapper)."""
    return getattr(optimizer, "optimizer", optimizer)


class WeightlabCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that runs weightlab ``callbacks`` (and checks ``lift``).

    Args:
        callbacks: weightlab callbacks using ``on_experience_start``, ``loss`` (weight penalties only),
            ``after_backward``, ``after_step`` and ``on_experience_end`` (LIFT's mask refresh needs none: the
            optimizer does it; the oscillation tracker, CGA and EWC work).
        lift: the :class:`~weightlab.methods.lift.model.Lift` handle whose optimizer the Trainer must step.
        experience: ``state.experience`` for the callbacks (EWC reads its ``.train`` data at the end).
    """

    def __init__(self, *callbacks: Callback, lift: Lift | None = None, experience: Any = None) -> None:
        missing = [e for e in ("on_pre_optimizer_step", "on_optimizer_step") if not hasattr(TrainerCallback, e)]
        if missing:
            raise WeightlabError(f"this transformers ({transformers.__version__}) has no TrainerCallback."
                                 f"{missing[0]}, which WeightlabCallback needs: upgrade transformers")
        for hook in BATCH_HOOKS:
            users = overriding(list(callbacks), hook)
            if users:
                raise WeightlabError(f"{type(users[0]).__name__} overrides {hook}, which a Trainer callback cannot "
                                     "run (it needs the batch); use weightlab.train.train or a CallbackRunner in "
                                     "your own loop")
        self.callbacks = list(callbacks)
        self.lift = lift
        self.experience = experience
        self.runner: CallbackRunner | None = None
        self.max_grad_norm = 0.0  # the Trainer's clipping, taken over for the run
        self._lift_steps = 0

    # ------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer = _unwrap(optimizer)
        if self.lift is not None:
            self._check_lift(args, optimizer)
        if args.max_grad_norm > 0:
            if args.fp16:
                raise WeightlabError("WeightlabCallback clips gradients after its hooks, which fp16's loss scaling "
                                     "leaves scaled: use bf16=True, or max_grad_norm=0")
            self.max_grad_norm, args.max_grad_norm = args.max_grad_norm, 0.0
        self.runner = CallbackRunner(model, optimizer, self.callbacks, experience=self.experience,
                                     config=TrainConfig(seed=args.seed, description="hf"), seed=args.seed,
                                     total_steps=state.max_steps)
        self.runner.experience_start()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        runner = self._running()
        penalties = runner.uses("loss")
        if penalties:
            zero = torch.zeros((), device=runner.state.device)
            extra = zero
            for cb in penalties:
                extra = cb.loss(runner.state, None, None, extra)  # type: ignore[arg-type]
            if extra.requires_grad:
                extra.backward()
        runner.after_backward()
        if self.max_grad_norm > 0:
            clip_gradients(model, runner.state.optimizer, self.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._running().after_step()

    def on_train_end(self, args, state, control, **kwargs):
        runner = self._running()
        if self.max_grad_norm > 0:
            args.max_grad_norm, self.max_grad_norm = self.max_grad_norm, 0.0
        runner.experience_end()
        if self.lift is not None and runner.state.step > 0 and self.lift.optimizer.steps == self._lift_steps:
            raise WeightlabError(f"the Trainer made {runner.state.step} optimizer steps but LIFT's optimizer never "
                                 "stepped: no LIFT entry changed")

    # ------------------------------------------------------------------------------------------ helpers
    def _running(self) -> CallbackRunner:
        if self.runner is None:
            raise WeightlabError("WeightlabCallback got a Trainer event before on_train_begin")
        return self.runner

    def _check_lift(self, args: Any, optimizer: Any) -> None:
        lift = self.lift
        assert lift is not None
        if optimizer is not lift.optimizer:
            raise WeightlabError(f"the Trainer steps {type(optimizer).__name__}, not LIFT's SparseAdamW, so no LIFT "
                                 "entry would change: pass Trainer(..., **lift.trainer_kwargs()) "
                                 "(optimizers=(lift.optimizer, None))")
        if args.fp16:
            raise WeightlabError("fp16's GradScaler does not unscale LIFT's gathered gradients: use bf16=True")
        self._lift_steps = lift.optimizer.steps
        trainable, total = lift.get_nb_trainable_parameters()
        logger.info("LIFT trains %s of %s parameters (%.4f%%); the Trainer's 'Number of trainable parameters' "
                    "counts the whole target matrices", f"{trainable:,d}", f"{total:,d}",
                    100 * trainable / max(total, 1))
