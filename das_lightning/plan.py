"""Plans: what a stage will compute and store, and roughly how much memory and disk, before it runs.

``python attribute.py ... plan=true`` (and ``evaluate_lds.py``, ``train.py``) prints a :class:`Plan` and exits: no
weights are loaded, nothing is computed or written. Every figure comes from the typed settings the stage runs with
and, where the size is decided by a function of its own, from that function: the store layout of
:func:`~das_lightning.attribution.store.store_layout`, the vmap budget of
:meth:`~das_lightning.attribution.grads.PerSampleGradients.pairs_per_call`, the dense projector's ``fits_in_memory``,
kronfluence's factor stages, how ``flat_gradients`` splits a batch into vmap calls
(:func:`~das_lightning.attribution.grads.vmap_chunks`) and when ``KernelSolver.from_features`` takes the Gram form
(:meth:`~das_lightning.attribution.kernel_solver.KernelSolver.uses_gram`); tests/test_plan.py checks the figures
against runs.

What is exact and what is an estimate:
- exact: parameter counts, store files (``features.npy`` + ``done.npy`` + ``row_digests.npy``, headers included),
  ``scores.npy``, ground-truth cache files, counts of passes, gradient evaluations and forward passes;
- estimates: memory. A batch of per-sample gradients costs ``PEAK_PER_SAVED_BYTE`` x the activations one
  (image, timestep) pair saves (measured on one forward pass of the network with uninitialised weights: sizes are
  all that count) x the pairs of a call, plus the pairs' P-vectors and the batch's unprojected P-vectors; the
  kernel's factorisation counts its float64 arrays.

Each line that is memory or disk is compared with what this machine has free (MemAvailable, or the GPU's free memory
on a GPU run; the free disk at ``paths.root``) and a warning names the lines that exceed it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path

import torch

from das_lightning.attribution.features import FeatureSettings, make_gradients, store_folder
from das_lightning.attribution.grads import PEAK_PER_SAVED_BYTE, vmap_chunks
from das_lightning.attribution.kernel_solver import KernelSolver
from das_lightning.attribution.methods import build_method
from das_lightning.attribution.methods.base import Method
from das_lightning.attribution.methods.kernel import KernelMethod, psi_settings
from das_lightning.attribution.projectors import DenseProjector, SparseJLProjector, projector_class
from das_lightning.attribution.settings import DASSettings, EKFACSettings, LambdaSettings, MethodSettings
from das_lightning.attribution.store import DTYPES, npy_bytes, store_layout
from das_lightning.diffusion import make_scheduler
from das_lightning.errors import ConfigError, UserError
from das_lightning.lambdas import default_scale_grid
from das_lightning.paths import RunPaths

FLOAT32 = 4
FLOAT64 = 8
# a network is instantiated (uninitialised) to measure its activations only when its weights take less than this
# share of the free memory
MEASURE_SHARE = 0.25


# ------------------------------------------------------------------------------------------------ the machine


@dataclass(frozen=True)
class Resources:
    """What this machine has free for a stage: memory (host, or the GPU's on a GPU run) and disk at the output root."""

    free_memory: int
    memory_source: str
    free_disk: int
    disk_path: Path


def available_memory(accelerator: str = "cpu") -> tuple[int, str]:
    """(bytes free, where the figure comes from): the GPU's free memory on a GPU run, else MemAvailable."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free), f"free memory of {torch.cuda.get_device_name()}"
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable (/proc/meminfo)"
    raise OSError("no MemAvailable in /proc/meminfo")


def free_disk(root: Path) -> tuple[int, Path]:
    """(bytes free, the folder measured): the nearest existing folder at or above ``root`` (nothing is created)."""
    path = Path(root).expanduser().absolute()
    while not path.exists():
        path = path.parent
    return int(shutil.disk_usage(path).free), path


def machine_resources(root: Path, accelerator: str = "cpu") -> Resources:
    memory, source = available_memory(accelerator)
    disk, measured = free_disk(root)
    return Resources(memory, source, disk, measured)


# ------------------------------------------------------------------------------------------------ the plan


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def shown(path: Path, paths: RunPaths) -> str:
    """``path`` under the output root, as the plan prints it (the root itself is printed once, below the table)."""
    try:
        return str(Path(path).relative_to(paths.root))
    except ValueError:
        return str(path)


def human_count(count: int) -> str:
    return f"{count:,}" if count < 10**10 else f"{count:.3g}"


@dataclass(frozen=True)
class PlanLine:
    """One figure of a plan. ``resource`` ("memory" or "disk") says what it is compared with; None: a count."""

    key: str
    label: str
    value: int | None  # None: unknown before the run (the detail says why)
    unit: str = "count"  # count | bytes
    resource: str | None = None
    detail: str = ""

    def formatted(self) -> str:
        if self.value is None:
            return "?"
        return human_bytes(self.value) if self.unit == "bytes" else human_count(self.value)


@dataclass
class Plan:
    """What a stage will compute and store; ``str(plan)`` is the table ``plan=true`` prints."""

    stage: str
    title: str
    resources: Resources
    root: Path
    lines: list[PlanLine] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *args, **kwargs) -> None:
        self.lines.append(PlanLine(*args, **kwargs))

    def figure(self, key: str) -> int | None:
        """The value of the line ``key`` (KeyError when the plan has no such line)."""
        for line in self.lines:
            if line.key == key:
                return line.value
        raise KeyError(f"no plan line {key!r}; lines: {[line.key for line in self.lines]}")

    def total_disk(self) -> int:
        return sum(line.value or 0 for line in self.lines if line.resource == "disk")

    def warnings(self) -> list[str]:
        """One line per figure over what this machine has free, and for the stage's disk in all."""
        warnings = []
        for line in self.lines:
            if line.value is None or line.resource is None:
                continue
            free = self.resources.free_memory if line.resource == "memory" else self.resources.free_disk
            if line.value > free:
                warnings.append(
                    f"warning: {line.label} ({line.formatted()}) exceeds the free {line.resource} here "
                    f"({human_bytes(free)})"
                )
        disk_lines = [line for line in self.lines if line.resource == "disk" and line.value]
        if len(disk_lines) > 1 and self.total_disk() > self.resources.free_disk:
            warnings.append(
                f"warning: the stage writes {human_bytes(self.total_disk())} in all, more than the free disk at "
                f"{self.resources.disk_path} ({human_bytes(self.resources.free_disk)})"
            )
        return warnings

    def format(self) -> str:
        width = max((len(line.label) for line in self.lines), default=10)
        values = max((len(line.formatted()) for line in self.lines), default=5)
        rows = [f"plan: {self.title}", ""]
        for line in self.lines:
            detail = f"  {line.detail}" if line.detail else ""
            rows.append(f"  {line.label:<{width}}  {line.formatted():>{values}}{detail}")
        rows += [
            "",
            f"  output root: {self.root}",
            f"  free here: memory {human_bytes(self.resources.free_memory)} ({self.resources.memory_source}), "
            f"disk {human_bytes(self.resources.free_disk)} at {self.resources.disk_path}",
        ]
        rows += [f"  note: {note}" for note in self.notes]
        warnings = self.warnings()
        rows += ["", *warnings] if warnings else []
        return "\n".join(rows)

    __str__ = format


# ------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class DatasetSize:
    """How many images a set holds, and where the figure comes from (the files, or the registry/config)."""

    count: int | None
    source: str
    problem: str | None = None  # why the files were not read


def dataset_size(build: Callable[[], Sized], fallback: int | None, what: str) -> DatasetSize:
    """The set's size from its files when they can be read, else ``fallback`` (the registry's or config's
    ``num_train``), else unknown: a plan never fails for want of data."""
    try:
        return DatasetSize(len(build()), "read from the files")
    except UserError as error:
        reason = f"{what}: {str(error).splitlines()[0]}"
        if fallback is not None:
            return DatasetSize(int(fallback), "from the registry/config: files not read", reason)
        return DatasetSize(None, "unknown: files not read; give dataset.num_train=N", reason)


@dataclass(frozen=True)
class NetworkFigures:
    """What a plan knows of the network: its parameters, those the features track, and one vmap call's load."""

    num_parameters: int
    tracked_parameters: int
    saved_bytes_per_pair: int | None = None  # activations one (image, timestep) pair keeps for its backward
    budget_pairs: int | None = None  # PerSampleGradients.pairs_per_call at the activation budget


def network_figures(
    unet_factory: Callable[[], torch.nn.Module],
    features: FeatureSettings | None,
    image_shape: Sequence[int],
    free_memory: int | None = None,
) -> NetworkFigures:
    """The network built on the meta device (no memory, no weights) for its parameter counts; with ``features``,
    the per-sample-gradient budget of :class:`PerSampleGradients` measured on one forward pass of an uninitialised
    copy (``to_empty``: sizes are what count), skipped when its weights would take over ``MEASURE_SHARE`` of
    ``free_memory``."""
    with torch.device("meta"):
        network = unet_factory()
    num_parameters = sum(parameter.numel() for parameter in network.parameters())
    if features is None:
        return NetworkFigures(num_parameters, num_parameters)
    alphas_cumprod = make_scheduler().alphas_cumprod
    gradients = make_gradients(network, alphas_cumprod, features)
    tracked = gradients.num_parameters
    if free_memory is not None and num_parameters * FLOAT32 > MEASURE_SHARE * free_memory:
        return NetworkFigures(num_parameters, tracked)
    network.to_empty(device="cpu")
    image = torch.zeros(tuple(image_shape))
    return NetworkFigures(
        num_parameters,
        tracked,
        gradients.saved_bytes_per_pair(image, {}),
        gradients.pairs_per_call(image, {}),
    )


def pairs_in_call(batch: int, num_draws: int, budget_pairs: int, timestep_batch: int | None) -> int:
    """(image, draw) pairs in one vmap call of a batch, as ``PerSampleGradients.flat_gradients`` chunks it."""
    images, draws = vmap_chunks(batch, budget_pairs, timestep_batch)
    return images * min(draws, num_draws)


# ------------------------------------------------------------------------------------------------ attribute


def _add_dataset(plan: Plan, num_train: DatasetSize) -> None:
    plan.add("num_train", "training images N", num_train.count, detail=num_train.source)
    if num_train.problem:
        plan.notes.append(
            f"the training set was not read, so the stage cannot run here yet: {num_train.problem}"
        )


def projector_memory(features: FeatureSettings, num_params: int) -> tuple[int, str]:
    """(bytes the projector keeps, how): a dense matrix when it fits its budget, the sparse hashes, or nothing."""
    settings = features.projector
    projector_class(settings.kind)  # an unknown kind is named here
    if settings.kind == "dense":
        options = {key: value for key, value in settings.options.items() if key != "device"}
        dense = DenseProjector(num_params, settings.dim, settings.seed, settings.distribution, **options)
        if dense.fits_in_memory:
            return (
                num_params * settings.dim * FLOAT32,
                f"dense {settings.dim} x P float32 matrix, kept in memory",
            )
        chunk = dense.chunk_rows * settings.dim * FLOAT32
        return chunk, (
            f"dense; the matrix ({human_bytes(num_params * settings.dim * FLOAT32)}) is over its budget "
            f"({human_bytes(dense.memory_budget_bytes)}): {dense.chunk_rows}-row chunks regenerated in every call"
        )
    if settings.kind == "sparse":
        nnz = int(settings.options.get("nnz_per_param", 4))
        # SparseJLProjector keeps an int64 output index and a float32 weight per (parameter, nonzero)
        per_entry = torch.empty((), dtype=torch.long).element_size() + FLOAT32
        return num_params * nnz * per_entry, f"{SparseJLProjector.kind}: {nnz} int64 + float32 per parameter"
    if settings.kind == "identity":
        return 0, "identity: k = P, no matrix"
    return 0, f"{settings.kind}: no matrix on the host (fused kernel)"


def store_bytes(num_rows: int, dim: int, dtype: str) -> int:
    """Bytes of a finished feature store's arrays (features.npy, done.npy, row_digests.npy; not its manifest)."""
    return sum(entry["bytes"] for entry in store_layout(num_rows, dim, dtype).values())


def score_rows(method: MethodSettings) -> int:
    """Rows of scores.npy: one per distinct c of the lambda grid, one without lambda."""
    if isinstance(method, LambdaSettings):
        return len({float(c) for c in method.lambda_scales})
    return 1


def kernel_memory(num_train: int, dim: int) -> tuple[int, str]:
    """The factorisation of KernelSolver.from_features: the k x k kernel, or the N x N Gram matrix when N < k."""
    if KernelSolver.uses_gram(num_train, dim):
        # features N x k, Gram and its eigenvectors N x N, directions k x N, all float64
        return (2 * num_train * dim + 2 * num_train**2) * FLOAT64, (
            "Gram form (N < k): N x N float64 Gram + eigenvectors, N x k float64 features and directions"
        )
    # the kernel, its symmetrised copy and the eigenvectors, k x k float64 each
    return 3 * dim**2 * FLOAT64, "kernel form: k x k float64 kernel, symmetrised copy, eigenvectors"


def ekfac_passes(
    method: EKFACSettings, query_sizes: dict[str, int | None], num_parameters: int | None
) -> tuple[int | None, str]:
    """Passes over the training set of EK-FAC: kronfluence's factor stages that read the data (covariance, Lambda),
    then the scoring passes of :mod:`~das_lightning.attribution.methods.ekfac`: one for every query set and c,
    more only when the rotated queries exceed its ``QUERY_GRADIENT_BYTES``."""
    from kronfluence.factor.config import FactorConfig, FactorStrategy

    from das_lightning.attribution.methods.ekfac import scoring_passes

    strategy = FactorConfig.CONFIGS[FactorStrategy(method.ekfac_strategy)]
    fitting = int(strategy.requires_covariance_matrices) + int(strategy.requires_lambda_matrices)
    if num_parameters is None or any(size is None for size in query_sizes.values()):
        return None, "query set sizes or tracked parameters unknown"
    scoring = scoring_passes([int(size) for size in query_sizes.values()], num_parameters)
    return fitting + scoring, f"{fitting} factor fitting + {scoring} scoring (every query set, every c)"


def attribute_plan(
    method: MethodSettings,
    num_train: DatasetSize,
    query_sizes: dict[str, int | None],
    paths: RunPaths,
    network: NetworkFigures | None,
    resources: Resources,
    device: str = "cpu",
) -> Plan:
    """The plan of ``attribute.py``: features, projector, stores, kernel, score files, passes and evaluations."""
    entry: Method = build_method(method)  # the same checks as the run, before anything is planned
    if entry.needs_query_sets is not None:
        query_sizes = {name: size for name, size in query_sizes.items() if name in entry.needs_query_sets}
    plan = Plan(
        "attribute", f"attribute.py method={method.name} ({method.kind}) on {device}", resources, paths.root
    )
    n = num_train.count
    _add_dataset(plan, num_train)
    for name, size in query_sizes.items():
        plan.add(f"num_queries.{name}", f"{name} queries", size)
    if network is not None:
        plan.add("num_parameters", "model parameters", network.num_parameters)
        plan.add(
            "model_memory", "model weights (float32)", network.num_parameters * FLOAT32, "bytes", "memory"
        )
    else:
        plan.notes.append("the network cannot be built from its config alone: parameter figures left out")
    features = method.features
    if isinstance(method, EKFACSettings):
        _plan_ekfac(plan, method, n, query_sizes, network)
    elif entry.needs_features and features is not None:
        _plan_features(plan, method, entry, features, n, query_sizes, paths, network)
    else:
        plan.notes.append(f"{method.kind} needs no gradient features: no stores, projector or kernel")
    rows = score_rows(method)
    for name, size in query_sizes.items():
        value = None if n is None or size is None else npy_bytes((rows, size, n), "float32")
        plan.add(
            f"score_bytes.{name}",
            f"scores.npy ({name})",
            value,
            "bytes",
            "disk",
            f"{rows} c x {size} queries x {n} train, float32 ({shown(paths.scores_dir / method.name / name, paths)})",
        )
    in_memory = [
        rows * size * n * FLOAT32 * 2 for size in query_sizes.values() if size is not None and n is not None
    ]
    plan.add(
        "score_memory",
        "scores in memory (largest query set)",
        max(in_memory) if in_memory else None,
        "bytes",
        "memory",
        "the c grid's matrices and their stacked copy",
    )
    if isinstance(method, DASSettings) and method.residual in ("normalized", "magnitude") and n is not None:
        plan.add(
            "residual_forwards",
            "DAS residual forward passes",
            n * int(method.residual_timesteps),
            detail=f"N x {method.residual_timesteps} timesteps, no gradient",
        )
    if method.kind == "tracin":
        plan.notes.append("TracIn: stores, passes and evaluations are per training snapshot (x snapshots)")
    if method.kind == "journey_trak":
        plan.notes.append(
            f"Journey-TRAK: one generated-query store per denoising step (x {method.journey_steps})"
        )
    plan.add(
        "peak_memory",
        "estimated peak memory",
        _peak_memory(plan),
        "bytes",
        "memory",
        "weights + the larger of collection and scoring"
        + (
            " (EK-FAC: of the scoring pass; the factor fit is kronfluence's)"
            if isinstance(method, EKFACSettings)
            else ""
        ),
    )
    return plan


def _add_tracked(plan: Plan, features: FeatureSettings, network: NetworkFigures | None) -> int | None:
    """The "tracked parameters P" line: the parameters the gradients differentiate (None: network unknown)."""
    tracked = network.tracked_parameters if network is not None else None
    pattern = f" matching {features.param_pattern!r}" if features.param_pattern else ""
    plan.add("tracked_parameters", f"tracked parameters P{pattern}", tracked)
    return tracked


def _num_draws(features: FeatureSettings) -> int:
    """(t, eps) draws per image: timesteps x noise draws per timestep."""
    return len(features.timestep_list()) * int(features.draws_per_timestep)


def _batch(features: FeatureSettings, n: int | None) -> int:
    """The images of one per-sample-gradient batch (never more than the training set)."""
    return int(features.batch_size) if n is None else min(int(features.batch_size), n)


def _vmap_call(
    features: FeatureSettings, batch: int, num_draws: int, network: NetworkFigures
) -> tuple[int, int] | None:
    """(pairs, activation bytes) of one vmap call of a batch, as ``flat_gradients`` chunks it at the activation
    budget; None when the network's activations were not measured."""
    if network.saved_bytes_per_pair is None:
        return None
    pairs = pairs_in_call(batch, num_draws, network.budget_pairs, features.timestep_batch)
    return pairs, pairs * PEAK_PER_SAVED_BYTE * network.saved_bytes_per_pair


def _plan_features(
    plan: Plan,
    method: MethodSettings,
    entry: Method,
    features: FeatureSettings,
    n: int | None,
    query_sizes: dict[str, int | None],
    paths: RunPaths,
    network: NetworkFigures | None,
) -> None:
    num_draws = _num_draws(features)
    tracked = _add_tracked(plan, features, network)
    dim = tracked if features.projector.kind == "identity" else int(features.projector.dim)
    if tracked is not None:
        memory, how = projector_memory(features, tracked)
        plan.add(
            "projector_memory",
            f"projector ({features.projector.kind}, k={dim})",
            memory,
            "bytes",
            "memory",
            how,
        )
    batch = _batch(features, n)
    call = _vmap_call(features, batch, num_draws, network) if network is not None else None
    if call is not None:
        pairs, activations = call
        # flat_gradients returns the batch's B unprojected P-vectors; a batch over the budget is computed in
        # pieces and concatenated, so the pieces and the whole are held at once
        split = features.timestep_batch is None and batch > network.budget_pairs
        feature_rows = 2 * batch if split else batch
        plan.add(
            "pairs_per_call",
            "(image, timestep) pairs per vmap call",
            pairs,
            detail=f"batch {batch}, {num_draws} draws, budget {features.activation_budget_mib} MiB",
        )
        plan.add(
            "call_memory",
            "per-sample-gradient memory per batch",
            activations + (pairs + feature_rows) * tracked * FLOAT32,
            "bytes",
            "memory",
            f"{PEAK_PER_SAVED_BYTE} x {human_bytes(network.saved_bytes_per_pair)} saved per pair x {pairs} pairs "
            f"+ {pairs} pair gradients + {feature_rows} P-vectors of the batch"
            + (" (split: pieces + concatenation)" if split else ""),
        )
    elif network is not None:
        plan.notes.append(
            "the network is too large to measure its activations here: per-call memory left out"
        )
    if features.dtype not in DTYPES:
        raise ConfigError(f"method.features.dtype must be one of {sorted(DTYPES)}, not {features.dtype!r}")
    sets: dict[str, int | None] = {"train": n, **query_sizes}
    if isinstance(method, DASSettings) and method.residual == "exact":
        sets["train-psi"] = n  # the train set's own loss gradients (psi), a second train store
    for key, rows in sets.items():
        chosen = psi_settings(features) if key == "train-psi" else features  # the psi store: its own
        folder = store_folder(paths.features_dir / chosen.name / key.removesuffix("-psi"), chosen)
        plan.add(
            f"store_bytes.{key}",
            f"feature store ({key})",
            None if rows is None else store_bytes(rows, dim, features.dtype),
            "bytes",
            "disk",
            f"{rows} x {dim} {features.dtype} + done + digests ({shown(folder, paths)})",
        )
    if isinstance(entry, KernelMethod) and n is not None and dim is not None:
        memory, how = kernel_memory(n, dim)
        plan.add("kernel_memory", "kernel factorisation", memory, "bytes", "memory", how)
    evaluations = {key: None if rows is None else rows * num_draws for key, rows in sets.items()}
    total = None if any(value is None for value in evaluations.values()) else sum(evaluations.values())
    plan.add(
        "gradient_evaluations",
        "per-sample gradient evaluations",
        total,
        detail=f"images x {len(features.timestep_list())} timesteps x {features.draws_per_timestep} draws, all sets",
    )
    passes = sum(1 for key in sets if key.startswith("train"))
    plan.add(
        "train_passes", "passes over the training set", passes, detail="feature collection, once per store"
    )


def _plan_ekfac(
    plan: Plan,
    method: EKFACSettings,
    n: int | None,
    query_sizes: dict[str, int | None],
    network: NetworkFigures | None,
) -> None:
    """EK-FAC: no stores, projector or kernel; the fitted factors and the scoring pass's tensors (its memory is
    the ``call_memory`` line, which :func:`_peak_memory` adds to the weights)."""
    from das_lightning.attribution.methods.ekfac import INVERSE_WEIGHTS_BYTES, queries_per_pass

    features = method.features
    tracked = _add_tracked(plan, features, network)
    passes, how = ekfac_passes(method, query_sizes, tracked)
    plan.add("train_passes", "passes over the training set", passes, detail=how)
    draws = _num_draws(features)
    plan.add(
        "gradient_evaluations",
        "training-image gradient evaluations",
        None if passes is None or n is None else passes * n * draws,
        detail=f"passes x N x {draws} draws (the loss averages them)",
    )
    if tracked is None or any(size is None for size in query_sizes.values()):
        return
    rows = 1 if method.ekfac_strategy == "identity" else score_rows(method)
    held = min(sum(int(size) for size in query_sizes.values()), queries_per_pass(tracked))
    diagonals = rows * tracked * FLOAT32
    kept = diagonals <= INVERSE_WEIGHTS_BYTES
    batch = _batch(features, n)
    # without measured activations: every pair of the batch in one call, activations not counted
    pairs, activations = _vmap_call(features, batch, draws, network) or (batch * draws, 0)
    parts = {
        "rotated queries": held * tracked * FLOAT32,
        "eigenvalues (float64)": tracked * FLOAT64,
        "grid diagonals": diagonals if kept else tracked * (FLOAT64 + FLOAT32),
        # the pair gradients of a vmap call, then the batch's flat, rotated and weighted P-vectors
        "batch gradients": activations + (pairs + 3 * batch) * tracked * FLOAT32,
    }
    plan.add(
        "call_memory",
        "EK-FAC scoring pass memory",
        sum(parts.values()),
        "bytes",
        "memory",
        ", ".join(f"{name} {human_bytes(value)}" for name, value in parts.items())
        + (
            "" if kept else f" (the {rows} diagonals are recomputed per batch: {human_bytes(diagonals)} kept)"
        ),
    )
    plan.notes.append(
        "EK-FAC's factor fit is kronfluence's (per-module covariances and eigenbases): its memory is not planned"
    )


def _peak_memory(plan: Plan) -> int | None:
    keys = {line.key: line.value for line in plan.lines}
    if (
        keys.get("model_memory") is None
    ):  # the network was not built (a pipeline's LoRA UNet): no peak is claimed
        return None
    weights = keys.get("model_memory") or 0
    collection = (keys.get("projector_memory") or 0) + (keys.get("call_memory") or 0)
    scoring = (keys.get("kernel_memory") or 0) + (keys.get("score_memory") or 0)
    if not weights and not collection and not scoring:
        return None
    return weights + max(collection, scoring)


# ------------------------------------------------------------------------------------------------ evaluate


def ground_truth_file_bytes(num_queries: int) -> int:
    """Bytes of one ground-truth cache file (losses.safetensors: Q float64 losses), as safetensors writes it."""
    from safetensors.torch import save

    return len(save({"loss": torch.zeros(num_queries, dtype=torch.float64)}))


def evaluate_plan(
    num_subsets: int,
    seeds: Sequence[int],
    timesteps: Sequence[int],
    e_seeds: Sequence[int],
    pair_batch_size: int,
    methods: dict[str, int | None],
    num_train: DatasetSize,
    query_sizes: dict[str, int | None],
    paths: RunPaths,
    resources: Resources,
    train_steps: int | None = None,
) -> Plan:
    """The plan of ``evaluate_lds.py``: subset models, ground-truth forward passes, caches and score matrices.

    ``methods``: score-folder name -> rows of its scores.npy (number of c), None when not known yet."""
    plan = Plan(
        "evaluate", f"evaluate_lds.py, {num_subsets} subsets x {len(seeds)} seeds", resources, paths.root
    )
    n = num_train.count
    _add_dataset(plan, num_train)
    models = num_subsets * len(seeds)
    plan.add(
        "subset_models",
        "subset models M x R",
        models,
        detail=f"{num_subsets} x {len(seeds)}"
        + (f", {train_steps} steps each (train.py)" if train_steps else ""),
    )
    per_query = len(timesteps) * len(e_seeds)
    queries = None if any(size is None for size in query_sizes.values()) else sum(query_sizes.values())
    for name, size in query_sizes.items():
        plan.add(f"num_queries.{name}", f"{name} queries", size)
    plan.add(
        "ground_truth_forwards",
        "ground-truth forward passes",
        None if queries is None else models * queries * per_query,
        detail=f"M x R x {queries} queries x {len(timesteps)} timesteps x {len(e_seeds)} e_seeds, "
        f"batches of {pair_batch_size}",
    )
    cache = None
    if queries is not None:
        cache = models * sum(ground_truth_file_bytes(size) for size in query_sizes.values())
    plan.add(
        "ground_truth_cache",
        "ground-truth cache",
        cache,
        "bytes",
        "disk",
        f"one losses.safetensors per model and query set ({shown(paths.lds_dir / 'ground_truth', paths)})",
    )
    unknown = [name for name, rows in methods.items() if rows is None]
    grid = len(default_scale_grid())
    held = None
    if n is not None and queries is not None:
        rows = sum(grid if rows is None else rows for rows in methods.values())
        held = rows * queries * n * FLOAT32
    plan.add(
        "score_memory",
        "score matrices held",
        held,
        "bytes",
        "memory",
        f"{len(methods)} methods x their c x queries x train, float32" + (" (at most)" if unknown else ""),
    )
    if unknown:
        plan.notes.append(
            f"no scores yet for {', '.join(unknown)}: counted at the default grid of {grid} c "
            "(methods without lambda have one)"
        )
    return plan


# ------------------------------------------------------------------------------------------------ train


def train_plan(
    network: NetworkFigures | None,
    subset: str,
    subset_size: int | None,
    max_steps: int,
    batch_size: int,
    snapshot_every: int,
    ema: bool,
    num_generated: int,
    lds_models: tuple[int, int] | None,
    paths: RunPaths,
    resources: Resources,
) -> Plan:
    """The plan of ``train.py``: the model, its steps, what it writes, and the LDS's subset models when known."""
    plan = Plan("train", f"train.py subset={subset}", resources, paths.root)
    plan.add("train_images", "training images", subset_size)
    plan.add(
        "steps",
        "optimizer steps",
        max_steps,
        detail=f"batch {batch_size}: {human_count(max_steps * batch_size)} images seen",
    )
    if network is not None:
        p = network.num_parameters
        states = 4 + int(ema)  # weights, gradients, Adam's two moments (+ EMA)
        plan.add("num_parameters", "model parameters", p)
        plan.add(
            "train_memory",
            "weights, gradients, optimizer state",
            states * p * FLOAT32,
            "bytes",
            "memory",
            f"{states} x P float32; activations not planned",
        )
        plan.add("weights_bytes", "weights file", p * FLOAT32, "bytes", "disk", shown(paths.unet_dir, paths))
        plan.add(
            "checkpoint_bytes",
            "last.ckpt",
            (states - 1) * p * FLOAT32,
            "bytes",
            "disk",
            "weights + Adam state" + (" + EMA" if ema else ""),
        )
        snapshots = max_steps // snapshot_every if snapshot_every > 0 else 0
        plan.add("snapshot_bytes", f"snapshots ({snapshots})", snapshots * p * FLOAT32, "bytes", "disk")
    plan.add("generated", "generated queries", num_generated)
    if lds_models is not None:
        subsets, seeds = lds_models
        plan.add(
            "subset_models",
            "LDS subset models M x R",
            subsets * seeds,
            detail=f"{subsets} x {seeds}, {max_steps} steps each: {human_count(subsets * seeds * max_steps)} steps",
        )
    return plan
