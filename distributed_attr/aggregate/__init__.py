"""Dataset-wide statistics from an attribution store: mergeable moments and the Ray job.

``run_aggregation`` is imported when first used, so that the pure statistics (``stats``,
``spectra``, ``results``) can be imported without the job's store, Ray and plotting imports."""
from .stats import GroupedMoments, Moments, MomentsResult

__all__ = ["GroupedMoments", "Moments", "MomentsResult", "run_aggregation"]


def __getattr__(name: str):
    if name == "run_aggregation":
        from .job import run_aggregation

        return run_aggregation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
