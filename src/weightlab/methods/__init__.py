"""One package per paper key (see docs/architecture.md); ``continual/`` and ``adversarial/`` hold what several
keys share. Importing this package imports every method package, so each registers its entries."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
