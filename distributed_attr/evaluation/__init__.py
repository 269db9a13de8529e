"""Aggregation over a store: best filter cutoffs, method rankings, cross-architecture matrix."""
from .data import MetricTable, load_metric, metric_names, open_store, usable_positions
from .rankings import (
    CutoffStatistics,
    best_cutoffs,
    cross_architecture_matrix,
    cutoff_statistics,
    rank_methods,
)
from .run import run_evaluation
from .stats import bootstrap_means, validation_mask

__all__ = [
    "CutoffStatistics",
    "MetricTable",
    "best_cutoffs",
    "bootstrap_means",
    "cross_architecture_matrix",
    "cutoff_statistics",
    "load_metric",
    "metric_names",
    "open_store",
    "rank_methods",
    "run_evaluation",
    "usable_positions",
    "validation_mask",
]
