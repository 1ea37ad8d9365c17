"""One package per paper key (see docs/architecture.md); ``continual/`` and ``adversarial/`` hold what several
keys share. Importing this package imports every module under it, so each registers its entries (kind
``"method"``) beside its code, whatever its package's ``__init__`` re-exports."""

import importlib
import pkgutil

for _module in pkgutil.walk_packages(__path__, f"{__name__}."):
    if not _module.name.rsplit(".", 1)[-1].startswith("_"):
        importlib.import_module(_module.name)
