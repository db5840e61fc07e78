"""The settings of one attribution method (conf/method/*.yaml), as the library takes them.

:class:`MethodSettings` holds what every method shares (its name and kind, its gradient features, how much is
shown); each registered method declares its own subclass (``Method.settings_class``) with the fields it reads, and
:func:`build_settings` refuses a key the method does not have, naming the keys it does. The mixins below are the
few groups several methods share: a lambda grid (:class:`LambdaSettings`), candidate screening
(:class:`ScreeningSettings`) and a readout that may be squared (``square``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from das_lightning.attribution.features import FeatureSettings
from das_lightning.errors import ConfigError
from das_lightning.lambdas import DEFAULT_LAMBDA_SCALE, default_scale_grid

SCREENS = (None, "pixel", "clip")
READOUT_POWERS = ("linear", "square", "signed_square")


@dataclass
class MethodSettings:
    """What every method has (conf/method/*.yaml); a method's own fields live on its subclass."""

    name: str = "das"
    kind: str = "das"  # the registered method that scores: see das_lightning.attribution.methods.METHODS
    features: FeatureSettings | None = None  # gradient features (None for pixel, CLIP)
    top_k: int = 8
    num_grid_queries: int = 8
    block_size: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.features, dict):
            self.features = FeatureSettings(**self.features)

    def validate(self) -> None:
        """The checks of the fields every method has (a method's own are in its entry)."""
        if self.features is not None:
            self.features.projector.validate()
        for key in ("top_k", "block_size"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"method.{key} must be a positive integer, got {getattr(self, key)}")
        if int(self.num_grid_queries) < 0:
            raise ConfigError(f"method.num_grid_queries must be zero or more, got {self.num_grid_queries}")

    def scored_settings(self) -> dict[str, Any]:
        """The fields that change the scores (what a score manifest records): all but what is only shown."""
        shown = {"top_k", "num_grid_queries", "block_size", "lambda_scale"}
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in shown}


def _plain(value: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(value) if is_dataclass(value) else value


@dataclass
class LambdaSettings(MethodSettings):
    """A method scored on a lambda grid: lambda = c x its unit for each c (das_lightning/lambdas.py)."""

    lambda_scales: list[float] = field(default_factory=default_scale_grid)
    lambda_scale: float = DEFAULT_LAMBDA_SCALE  # c for pictures and top-k until an LDS has selected one
    # the readout's power: linear s, square s^2 (the *_squared variants), signed_square sign(s) s^2
    square: bool | str = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lambda_scales is None:  # null in a YAML: the default grid
            self.lambda_scales = default_scale_grid()
        self.square = readout_power(self.square)

    def validate(self) -> None:
        super().validate()
        if not self.lambda_scales:
            raise ConfigError(
                f"method {self.name!r} ({self.kind}) scores on a lambda grid: give lambda_scales"
            )
        if any(float(c) <= 0 for c in self.lambda_scales):
            raise ConfigError(
                f"method.lambda_scales must be positive multiples of the unit, got {self.lambda_scales}"
            )
        if self.lambda_scale <= 0:
            raise ConfigError(f"method.lambda_scale must be positive, got {self.lambda_scale}")


def readout_power(square: bool | str) -> str:
    """``method.square``: true/false (older configs) or linear | square | signed_square."""
    if isinstance(square, bool):
        return "square" if square else "linear"
    if square not in READOUT_POWERS:
        raise ConfigError(
            f"method.square must be one of {list(READOUT_POWERS)} (or true/false), not {square!r}"
        )
    return square


@dataclass
class ScreeningSettings(MethodSettings):
    """A method that may score only each query's ``screen_top`` nearest candidates by a cheap similarity."""

    screen_by: str | None = None  # pixel | clip | None
    screen_top: int = 1000
    clip_model: str = "openai/clip-vit-base-patch32"  # for screen_by=clip (and method=clip)

    def validate(self) -> None:
        super().validate()
        if self.screen_by not in SCREENS:
            raise ConfigError(f"method.screen_by must be pixel, clip or null, not {self.screen_by!r}")
        if int(self.screen_top) < 1:
            raise ConfigError(f"method.screen_top must be a positive integer, got {self.screen_top}")


@dataclass
class KernelSettings(LambdaSettings, ScreeningSettings):
    """phi_q^T (K + lambda I)^-1 phi_i methods: TRAK, D-TRAK, relative and renormalized influence."""


@dataclass
class DASSettings(KernelSettings):
    """DAS: the kernel score with leverage and residual (METHOD.md §2)."""

    square: bool | str = True
    leverage: bool = True  # 1 / (1 - h_ii)
    residual: str = "normalized"  # none | normalized (authors' r_i) | magnitude | exact
    residual_timesteps: int = 50  # per-timestep losses on a uniform grid of this many timesteps

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.residual, bool):  # residual: true/false in older configs
            self.residual = "normalized" if self.residual else "none"


@dataclass
class JourneySettings(KernelSettings):
    """Journey-TRAK: TRAK summed over the denoising steps of each generated query."""

    journey_steps: int = 10  # denoising steps attributed (evenly spaced along the trajectory)


@dataclass
class EKFACSettings(LambdaSettings):
    """EK-FAC influence (kronfluence): what is measured on a query, and the curvature."""

    measurement: str = (
        "loss"  # loss | mean | square_norm (output functions of attribution/output_functions.py)
    )
    ekfac_strategy: str = "ekfac"  # ekfac | kfac | diagonal | identity (kronfluence's strategies)
    ekfac_fisher: str = "sampled"  # sampled (targets drawn from the model: Gauss-Newton) | empirical


@dataclass
class SimilaritySettings(MethodSettings):
    """Similarity baselines (pixel, CLIP): no lambda, no screening."""

    similarity: str = "cosine"  # cosine | dot
    clip_model: str = "openai/clip-vit-base-patch32"


@dataclass
class GradientSimilaritySettings(SimilaritySettings, ScreeningSettings):
    """Similarity of gradient features; may screen candidates like the kernel methods."""


Settings = TypeVar("Settings", bound=MethodSettings)


def build_settings(settings_class: type[Settings], values: dict[str, Any]) -> Settings:
    """``settings_class`` from a YAML's values; a key the method does not have is refused by name."""
    known = {f.name for f in fields(settings_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"method {values.get('name', '?')!r} (kind {values.get('kind', '?')}) has no setting "
            f"{', '.join('method.' + key for key in unknown)}; its settings are: {', '.join(sorted(known))}"
        )
    return settings_class(**values)
