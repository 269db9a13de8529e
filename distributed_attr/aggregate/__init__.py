"""Dataset-wide statistics from an attribution store: mergeable moments and the Ray job."""
from .job import run_aggregation
from .stats import GroupedMoments, Moments, MomentsResult

__all__ = ["GroupedMoments", "Moments", "MomentsResult", "run_aggregation"]
