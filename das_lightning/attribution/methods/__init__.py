"""The attribution methods, one registered class each (see :mod:`.base`); every module of this package is
imported here, so a new method is one file in this folder and one YAML in conf/method/.

    build_method(settings)  -> the method's entry, its settings checked
    METHODS                 -> method.kind -> class
"""

from __future__ import annotations

import importlib
import pkgutil

from das_lightning.attribution.methods.base import METHODS, Method, register
from das_lightning.attribution.settings import MethodSettings
from das_lightning.errors import ConfigError

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def build_method(settings: MethodSettings) -> Method:
    """The registered entry of ``settings.kind``, built (and so validated) from ``settings``."""
    if settings.kind not in METHODS:
        raise ConfigError(f"unknown method kind {settings.kind!r}; choose one of {sorted(METHODS)}")
    return METHODS[settings.kind](settings)


__all__ = ["METHODS", "Method", "build_method", "register"]
