"""The method registry: every YAML in conf/method/ builds a registered entry, and each entry refuses its own bad
settings when it is built (before any feature is computed)."""

from __future__ import annotations

import numpy as np
import pytest

from das_lightning import cli
from das_lightning.attribution.methods import METHODS, build_method
from das_lightning.attribution.methods.kernel import KernelMethod

from conftest import REPO, compose

METHOD_YAMLS = sorted(path.stem for path in (REPO / "conf" / "method").glob("*.yaml"))


@pytest.mark.parametrize("name", METHOD_YAMLS)
def test_every_method_yaml_builds_its_registered_entry(name: str) -> None:
    settings = cli.method_settings(compose("attribute", [f"method={name}"]))
    entry = build_method(settings)
    assert settings.name == name and isinstance(entry, METHODS[settings.kind])
    # what the entry declares agrees with its settings: kernel methods (and EK-FAC's damping) have a lambda grid
    assert entry.has_lambda or not isinstance(entry, KernelMethod)
    # a method without lambda has no grid at all (not an empty one), and its settings are its own class
    assert hasattr(settings, "lambda_scales") == entry.has_lambda
    assert type(settings) is type(entry).settings_class
    assert (settings.features is not None) or not entry.needs_features


def test_every_registered_kind_has_a_yaml() -> None:
    kinds = {cli.method_settings(compose("attribute", [f"method={name}"])).kind for name in METHOD_YAMLS}
    assert kinds == set(METHODS)


@pytest.mark.parametrize(
    ("method", "override", "message"),
    [
        ("das", "method.residual=nope", "method.residual must be one of"),
        ("das", "method.leverage=false", None),  # allowed: the one-step form without leverage
        ("das_exact", "method.leverage=false", "needs method.leverage=true"),
        ("pixel", "method.similarity=euclid", "method.similarity must be one of"),
        ("das", "method.screen_by=nope", "method.screen_by must be"),
        ("das", "method.kind=nope", "unknown method kind 'nope'; choose one of"),
        ("journey_trak", "method.journey_steps=0", "method.journey_steps must be at least 1"),
        ("trak", "+method.top_k=0", "method.top_k must be a positive integer"),
        # a key of another method is refused by name, with the method's own keys listed
        ("pixel", "+method.lambda_scales=[1.0]", "has no setting method.lambda_scales; its settings are"),
        ("trak", "+method.residual=exact", "has no setting method.residual"),
        ("ekfac", "+method.screen_by=pixel", "has no setting method.screen_by"),
        ("das", "method.square=cubed", "method.square must be one of"),
    ],
)
def test_an_entry_refuses_its_own_bad_settings_when_built(
    method: str, override: str, message: str | None
) -> None:
    config = compose("attribute", [f"method={method}", override])
    if message is None:
        build_method(cli.method_settings(config))
        return
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_method(cli.method_settings(config))


@pytest.mark.parametrize("signed", ["trak", "dtrak", "relatif"])
def test_a_squared_variant_is_its_method_squared_on_the_same_features(signed: str) -> None:
    from das_lightning.attribution.kernel_solver import kernel_scores

    plain_settings = cli.method_settings(compose("attribute", [f"method={signed}"]))
    squared_settings = cli.method_settings(compose("attribute", [f"method={signed}_squared"]))
    # the same registered kind and the same feature store: only the readout differs
    assert (
        squared_settings.kind == plain_settings.kind and squared_settings.features == plain_settings.features
    )
    assert squared_settings.square == "square" and plain_settings.square == "linear"
    plain_entry, squared_entry = build_method(plain_settings), build_method(squared_settings)
    assert squared_entry.headers()[1] == "largest change" and plain_entry.headers()[1] == "proponents"

    rng = np.random.default_rng(0)
    queries, train = rng.normal(size=(4, 6)), rng.normal(size=(20, 6))
    plain = kernel_scores(queries, train, [0.3], plain_entry.readout(None))[0.3]
    squared = kernel_scores(queries, train, [0.3], squared_entry.readout(None))[0.3]
    np.testing.assert_allclose(squared, plain.astype(np.float64) ** 2, rtol=1e-6)
    assert (plain < 0).any()  # so the square does change the ranking here
