"""What an attribution method is to the pipeline: one registered class per ``method.kind``.

A method declares its settings class (``settings_class``, built and validated from its YAML) and what it needs
(gradient features, training snapshots, generated-query trajectories), and scores one query set into a
:class:`MethodScores`: {c: queries x train scores} keyed by the lambda scale c for methods with a lambda grid
(with the unit c multiplies and the kernel's spectrum), by None for methods without. The pipeline asks the
registry and nothing else names methods; nothing but this result passes from a method to the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from das_lightning.attribution.context import ScoringContext
from das_lightning.attribution.settings import LambdaSettings, MethodSettings, build_settings
from das_lightning.errors import ConfigError


@dataclass(frozen=True)
class MethodScores:
    """What a method returns for one query set (one model; an ensemble averages several of these).

    ``by_scale``: {c: (queries, train) scores} for each c of the method's grid, or {None: scores} without lambda.
    ``lambda_unit``: the absolute lambda of c = 1 (lambda = c x unit); ``spectrum``: the kernel's or curvature's
    (smallest, largest) eigenvalue relative to the unit. Both None without lambda.
    ``members``: per ensemble member, its record (name, checksum) and its own lambda unit; empty for one model.
    """

    by_scale: dict[float | None, np.ndarray]
    lambda_unit: float | None = None
    spectrum: tuple[float, float] | None = None
    members: list[dict[str, Any]] = field(default_factory=list)

    @property
    def has_lambda(self) -> bool:
        return list(self.by_scale) != [None]

    def lambda_record(self) -> dict[str, Any]:
        """The lambda keys of a score manifest (the grid ascending, as the rows of scores.npy)."""
        if not self.has_lambda:
            record: dict[str, Any] = {"lambda_scales": None, "lambda_unit": None, "lambdas": None}
        else:
            scales = sorted(self.by_scale)
            record = {
                "lambda_scales": scales,
                "lambda_unit": self.lambda_unit,
                "lambdas": [c * self.lambda_unit for c in scales],
                "spectrum_relative": list(self.spectrum),
            }
        if self.members:
            record["ensemble"] = list(self.members)
        return record


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
    settings_class: ClassVar[type[MethodSettings]] = MethodSettings
    needs_features: ClassVar[bool] = True  # gradient features of the train set and the queries
    needs_snapshots: ClassVar[bool] = False  # weights saved during training (TracIn)
    needs_journey: ClassVar[bool] = False  # denoising trajectories of the generated queries (Journey-TRAK)
    needs_query_sets: ClassVar[tuple[str, ...] | None] = None  # the query sets it can attribute (None: any)

    def __init__(self, settings: MethodSettings) -> None:
        if not isinstance(settings, self.settings_class):
            raise ConfigError(
                f"method kind {self.kind!r} takes {self.settings_class.__name__}, not {type(settings).__name__}"
            )
        self.settings = settings
        if self.needs_features and settings.features is None:
            raise ConfigError(f"method {settings.name!r} ({self.kind}) needs a features section")
        settings.validate()
        self.validate()

    def validate(self) -> None:
        """Refuse this method's own bad settings (called when it is built, before any work)."""

    @classmethod
    def settings_from(cls, values: dict[str, Any]) -> MethodSettings:
        """This method's settings from a YAML's values (unknown keys refused by name); validated when built."""
        return build_settings(cls.settings_class, values)

    @property
    def has_lambda(self) -> bool:
        """Scored on a lambda grid (its settings carry one)."""
        return isinstance(self.settings, LambdaSettings)

    def check_available(self) -> None:
        """Fail before anything is written if something the method needs is missing (e.g. a local model)."""
        if getattr(self.settings, "screen_by", None) == "clip":
            from das_lightning.clip import load_local_clip

            load_local_clip(self.settings.clip_model)

    def scores(self, context: ScoringContext, query_set: str) -> MethodScores:
        """The scores of one query set against the training set, with the lambda unit if there is a grid."""
        raise NotImplementedError

    def headers(self) -> tuple[str, str, str]:
        """Column titles of the pictures: query, highest scores, lowest scores."""
        return ("query", "proponents", "opponents")
