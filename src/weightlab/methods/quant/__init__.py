"""Low-bit quantization-aware training for vision transformers (paper key ``ofq``).

Import from the modules: :mod:`.api` (``QuantConfig``, ``prepare``, ``convert``), :mod:`.lsq`, :mod:`.statsq`,
:mod:`.layers`, :mod:`.qkr`, :mod:`.oscillation` and :mod:`.cga`.
"""
