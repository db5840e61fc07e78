"""The settings of one attribution method (conf/method/*.yaml), as the library takes them.

One flat dataclass serves every method; each method's entry (das_lightning/attribution/methods/) checks the
fields it uses when it is built, and these checks are the ones every method shares."""

from __future__ import annotations

from dataclasses import dataclass, field

from das_lightning.attribution.features import FeatureSettings
from das_lightning.errors import ConfigError
from das_lightning.lambdas import DEFAULT_LAMBDA_SCALE, default_scale_grid


@dataclass
class MethodSettings:
    """One attribution method (conf/method/*.yaml)."""

    name: str = "das"
    kind: str = "das"  # the registered method that scores: see das_lightning.attribution.methods.METHODS
    features: FeatureSettings | None = field(default_factory=FeatureSettings)
    # kernel methods: lambda = c * trace(K) / N for every c of the grid (das_lightning/lambdas.py); [] = no lambda
    lambda_scales: list[float] | None = field(default_factory=default_scale_grid)  # None: the default grid
    lambda_scale: float = DEFAULT_LAMBDA_SCALE  # c for pictures and top-k until an LDS has selected one
    leverage: bool = True  # DAS: 1 / (1 - h_ii)
    square: bool = False  # squared scores: DAS (das.yaml) and the *_squared variants
    residual: str = "normalized"  # DAS: none | normalized (authors' r_i) | magnitude | exact
    residual_timesteps: int = 50  # DAS residual: per-timestep losses on a uniform grid of this many timesteps
    similarity: str = "cosine"  # pixel / clip / grad_cos: dot or cosine
    clip_model: str = "openai/clip-vit-base-patch32"
    journey_steps: int = 10  # journey_trak: denoising steps attributed (evenly spaced along the trajectory)
    screen_by: str | None = None  # candidate screening by a cheap similarity: pixel | clip | None
    screen_top: int = 1000
    top_k: int = 8
    num_grid_queries: int = 8
    block_size: int = 1024
    # EK-FAC influence (method=ekfac, ekfac_das; kronfluence): what is measured on a query, and the curvature
    measurement: str = "loss"  # loss | mean | square_norm (output functions of attribution/outputs.py)
    ekfac_strategy: str = "ekfac"  # ekfac | kfac | diagonal | identity (kronfluence's strategies)
    ekfac_fisher: str = "sampled"  # sampled (targets drawn from the model: Gauss-Newton) | empirical

    def __post_init__(self) -> None:
        if isinstance(self.residual, bool):  # residual: true/false in older configs
            self.residual = "normalized" if self.residual else "none"
        if self.lambda_scales is None:
            self.lambda_scales = default_scale_grid()

    def validate(self) -> None:
        """The checks every method shares (a method's own are in its entry)."""
        if self.features is not None:
            self.features.projector.validate()
        if any(float(c) <= 0 for c in self.lambda_scales):
            raise ConfigError(
                f"method.lambda_scales must be positive multiples of the unit, got {self.lambda_scales}"
            )
        if self.lambda_scale <= 0:
            raise ConfigError(f"method.lambda_scale must be positive, got {self.lambda_scale}")
        if self.screen_by not in {None, "pixel", "clip"}:
            raise ConfigError(f"method.screen_by must be pixel, clip or null, not {self.screen_by!r}")
        for key in ("top_k", "num_grid_queries", "block_size", "screen_top"):
            if int(getattr(self, key)) < (0 if key == "num_grid_queries" else 1):
                raise ConfigError(f"method.{key} must be a positive integer, got {getattr(self, key)}")
