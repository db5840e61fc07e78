"""What an attribution method is to the pipeline: one registered class per ``method.kind``.

A method declares what it needs (gradient features, training snapshots, generated-query trajectories, a lambda
grid), checks its own settings when it is built, and scores one query set: {c: queries x train scores}, keyed by
the lambda scale c for kernel methods and by None for methods without lambda. The pipeline asks the registry and
nothing else names methods.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from das_lightning.attribution.context import ScoringContext
from das_lightning.attribution.settings import MethodSettings
from das_lightning.errors import ConfigError

# method.kind -> the class that scores it; filled by @register as the modules of this package are imported
METHODS: dict[str, type[Method]] = {}


def register(kind: str):
    """Class decorator: make a :class:`Method` the scorer of ``method.kind=<kind>``."""

    def add(cls: type[Method]) -> type[Method]:
        if kind in METHODS:
            raise RuntimeError(
                f"method kind {kind!r} is registered twice ({METHODS[kind].__name__}, {cls.__name__})"
            )
        METHODS[kind] = cls
        cls.kind = kind
        return cls

    return add


class Method:
    """One attribution method; subclasses set what they need and implement :meth:`scores`."""

    kind: ClassVar[str] = ""
    needs_features: ClassVar[bool] = True  # gradient features of the train set and the queries
    needs_snapshots: ClassVar[bool] = False  # weights saved during training (TracIn)
    needs_journey: ClassVar[bool] = False  # denoising trajectories of the generated queries (Journey-TRAK)
    has_lambda: ClassVar[bool] = False  # scores on the lambda grid (kernel methods)

    def __init__(self, settings: MethodSettings) -> None:
        self.settings = settings
        if self.needs_features and settings.features is None:
            raise ConfigError(f"method {settings.name!r} ({self.kind}) needs a features section")
        settings.validate()
        self.validate()

    def validate(self) -> None:
        """Refuse this method's own bad settings (called when it is built, before any work)."""

    def check_available(self) -> None:
        """Fail before anything is written if something the method needs is missing (e.g. a local model)."""
        if self.settings.screen_by == "clip":
            from das_lightning.clip import load_local_clip

            load_local_clip(self.settings.clip_model)

    def scores(self, context: ScoringContext, query_set: str) -> dict[float | None, np.ndarray]:
        """{c: (queries, train) scores} for one query set ({None: scores} without lambda)."""
        raise NotImplementedError

    def headers(self) -> tuple[str, str, str]:
        """Column titles of the pictures: query, highest scores, lowest scores."""
        return ("query", "proponents", "opponents")
