"""Evaluation: the LDS ground truth (losses of subset models on the queries) and the LDS itself."""

from das_lightning.evaluation.ground_truth import (
    GroundTruthModule,
    LossPredictionWriter,
    cached_query_losses,
    gather_predictions,
    ground_truth_manifest,
    query_losses,
    read_prediction_files,
)
from das_lightning.evaluation.intervals import (
    BootstrapInterval,
    SeedSpread,
    paired_two_way_difference,
    seed_spread_difference,
    seed_spread_lds,
    two_way_bootstrap,
)
from das_lightning.evaluation.lambda_selection import heldout_split, lds_by_lambda, select_lambda
from das_lightning.evaluation.lds import lds_per_query
from das_lightning.evaluation.lds_report import (
    LDSRecord,
    PairedDifference,
    evaluate_method,
    markdown_table,
    paired_difference,
    plot_lds_vs_lambda,
)
from das_lightning.evaluation.snr_lds import snr_lds

__all__ = [
    "BootstrapInterval",
    "SeedSpread",
    "paired_two_way_difference",
    "seed_spread_difference",
    "seed_spread_lds",
    "snr_lds",
    "two_way_bootstrap",
    "GroundTruthModule",
    "LDSRecord",
    "LossPredictionWriter",
    "PairedDifference",
    "cached_query_losses",
    "evaluate_method",
    "gather_predictions",
    "ground_truth_manifest",
    "heldout_split",
    "lds_by_lambda",
    "lds_per_query",
    "markdown_table",
    "paired_difference",
    "plot_lds_vs_lambda",
    "query_losses",
    "read_prediction_files",
    "select_lambda",
]
