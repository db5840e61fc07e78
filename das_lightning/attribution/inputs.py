"""What the attribute stage scores with, loaded from a run folder: the full model (trained here, or a pretrained
one named by the config), its training set, its query sets, and what the method needs besides features (training
snapshots for TracIn, denoising trajectories of the generated queries for Journey-TRAK)."""

from __future__ import annotations

from collections.abc import Callable

from das_lightning.artifacts import load_finished, require_trained_on, training_snapshots
from das_lightning.attribution.context import AttributionInputs
from das_lightning.attribution.features import CollectionDevice
from das_lightning.attribution.methods import Method
from das_lightning.data import ImageDataset
from das_lightning.models.adapters import ModelAdapter, PretrainedAdapter
from das_lightning.paths import RunPaths
from das_lightning.selection import lds_json_path


def load_attribution_inputs(
    paths: RunPaths,
    adapter: ModelAdapter,
    train_set: ImageDataset,
    query_sets: Callable[[], dict[str, ImageDataset]],
    entry: Method,
    device: CollectionDevice,
) -> AttributionInputs:
    """The model of ``paths`` (or the pretrained one of ``adapter``) with the sets to attribute, refusing a model
    trained on another training set or one that does not fit the data. ``query_sets`` builds the query sets, after
    a pretrained network is checked against the data (generated queries would otherwise be looked for first)."""
    if isinstance(adapter, PretrainedAdapter):  # trained elsewhere: the user names its training set
        adapter.check_fits(train_set.channels, train_set.image_size)
        model = adapter.load()
    else:
        model = load_finished(paths, adapter)
        require_trained_on(paths, train_set)
    query_sets = query_sets()
    snapshots = training_snapshots(paths) if entry.needs_snapshots else []
    journey = {}
    if entry.needs_journey and "generated" in query_sets:
        from das_lightning.attribution.methods.journey_support import predicted_clean_steps

        model.to(device.torch_device())  # replaying SD trajectories on a CPU would take hours
        journey["generated"] = predicted_clean_steps(
            model, paths, len(query_sets["generated"]), entry.settings.journey_steps
        )
        model.to("cpu")
    return AttributionInputs(
        model=model,
        train_set=train_set,
        query_sets=query_sets,
        features_dir=paths.features_dir,
        scores_dir=paths.scores_dir,
        snapshots=snapshots,
        journey=journey,
        lds_file=lds_json_path(paths),
    )
