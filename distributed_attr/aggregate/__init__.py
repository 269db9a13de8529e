"""Dataset-wide statistics from an attribution store: mergeable moments and the Ray job."""
from .stats import GroupedMoments, Moments, MomentsResult

__all__ = ["GroupedMoments", "Moments", "MomentsResult"]
