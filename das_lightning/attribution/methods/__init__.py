"""The attribution methods, one registered class each (see :mod:`.base`); every module of this package is
imported here, so a new method is one file in this folder and one YAML in conf/method/. A method's helpers that
need more than the registry (kronfluence's task, Journey-TRAK's trajectory replay) sit beside it as
``<method>_support.py`` and are imported by their method when it runs.

    method_settings(values) -> the settings class of ``values["kind"]``, built from a YAML's values
    build_method(settings)  -> the method's entry, its settings checked
    METHODS                 -> method.kind -> class
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from das_lightning.attribution.methods.base import METHODS, Method, MethodScores, register
from das_lightning.attribution.settings import MethodSettings
from das_lightning.errors import ConfigError

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.endswith("_support"):
        importlib.import_module(f"{__name__}.{_module.name}")


def method_class(kind: str) -> type[Method]:
    if kind not in METHODS:
        raise ConfigError(f"unknown method kind {kind!r}; choose one of {sorted(METHODS)}")
    return METHODS[kind]


def method_settings(values: dict[str, Any]) -> MethodSettings:
    """The settings of the method ``values["kind"]`` (its own settings class), from a YAML's values."""
    return method_class(str(values.get("kind", "das"))).settings_from(values)


def build_method(settings: MethodSettings) -> Method:
    """The registered entry of ``settings.kind``, built (and so validated) from ``settings``."""
    return method_class(settings.kind)(settings)


__all__ = ["METHODS", "Method", "MethodScores", "build_method", "method_settings", "register"]
