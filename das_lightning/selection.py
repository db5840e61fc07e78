"""The lambda the LDS selected, and the file that carries it: ``lds.json``, the one place it is written (by the
LDS stage) and read (by the attribute stage's pictures and top-k, and the counterfactual).

One ``lds.json`` per full model: ``<experiment>/lds/<tag>-seed<r>/lds.json`` (:func:`lds_json_path`), so the
full model of seed 1 (and an ensemble whose primary model it is) has a selection of its own and evaluating it does
not overwrite seed 0's. Downstream of the LDS one c is used: the one the LDS selected on held-out queries for that
method and query set when ``lds.json`` has it, else ``method.lambda_scale``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from das_lightning.manifest import atomic_write_text, read_json
from das_lightning.paths import RunPaths

log = logging.getLogger(__name__)

LDS_JSON_VERSION = 2  # version 1 recorded absolute lambdas on the old fixed grid
CONFIDENCE = 0.95  # of every interval lds.json reports


def lds_json_path(paths: RunPaths) -> Path:
    """Where the LDS of the full model ``paths`` (and of the ensembles whose primary model it is) is kept."""
    return paths.lds_results_dir / "lds.json"


@dataclass(frozen=True)
class ChosenScale:
    """The c used downstream of the scores, and where it came from (printed and stored in manifests)."""

    scale: float
    source: str  # "<lds.json> (held-out selection)" or "method.lambda_scale"

    def describe(self, unit: float | None = None) -> dict[str, object]:
        described: dict[str, object] = {"lambda_scale": self.scale, "source": self.source}
        if unit is not None:
            described["lambda"] = self.scale * unit
        return described


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write it as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def write_lds_json(
    path: Path,
    records: Sequence[Mapping[str, Any]],
    differences: Sequence[Mapping[str, Any]] = (),
    extra_meta: Mapping[str, Any] | None = None,
) -> None:
    """Write ``lds.json``: {"unit": "percent", "meta": ..., "records": [...], "differences": [...]}.

    ``records`` are :meth:`LDSRecord.to_json` dicts (das_lightning.evaluation.lds_report): each has ``method``,
    ``query_set``, ``lambda_selection`` and ``lambda_scale``, which is what :func:`selected_scale` reads back."""
    document = {
        "version": LDS_JSON_VERSION,
        "unit": "percent",
        "confidence": CONFIDENCE,
        "meta": dict(extra_meta or {}),
        "records": [dict(record) for record in records],
        "differences": [dict(difference) for difference in differences],
    }
    atomic_write_text(Path(path), json.dumps(_json_safe(document), indent=2, default=str))


def selected_scale(lds_file: Path, method: str, query_set: str) -> float | None:
    """The c that the LDS selected on held-out queries for ``method`` on ``query_set``, if ``lds_file`` has it."""
    path = Path(lds_file)
    if not path.exists():
        return None
    # written atomically: a file that does not parse was damaged, and ignoring it would change the pictures' c
    document = read_json(path, "delete it and rerun `python evaluate_lds.py` to select lambda again")
    if document.get("version") != LDS_JSON_VERSION:
        log.warning(
            "%s was written with absolute lambdas (version %s); ignoring it", path, document.get("version")
        )
        return None
    for record in document.get("records", []):
        if (
            record.get("method") == method
            and record.get("query_set") == query_set
            and record.get("lambda_selection") == "heldout"
            and record.get("lambda_scale") is not None
        ):
            return float(record["lambda_scale"])
    return None


def choose_scale(lds_file: Path | None, method: str, query_set: str, default: float) -> ChosenScale:
    """The held-out LDS selection when there is one, else ``default`` (``method.lambda_scale``)."""
    selected = None if lds_file is None else selected_scale(lds_file, method, query_set)
    if selected is not None:
        return ChosenScale(selected, f"{lds_file} (held-out selection)")
    return ChosenScale(float(default), "method.lambda_scale")
