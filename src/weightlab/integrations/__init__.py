"""weightlab's callbacks and LIFT in training loops that are not weightlab's.

* :mod:`weightlab.integrations.hooks` — :class:`~weightlab.integrations.hooks.CallbackRunner`: call the
  callbacks' hooks from a plain PyTorch loop, in the order :func:`weightlab.train.train` calls them.
* :mod:`weightlab.integrations.hf` — :class:`~weightlab.integrations.hf.WeightlabCallback`: a
  ``transformers.TrainerCallback`` running weightlab callbacks (and checking LIFT) inside the Hugging Face
  ``Trainer`` (needs the ``hf`` extra; imported only when used).
"""

from weightlab.integrations.hooks import CallbackRunner

__all__ = ["CallbackRunner"]
