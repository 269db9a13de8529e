"""distributed_attr: dataset-scale attribution maps, spectra and faithfulness metrics.

Python API
----------
- ``run(config)``: the attribution job (YAML path, dict or ``Config``) -> ``RunSummary``.
- ``attribute(model, images, method, target=None, **params)``: maps (N, H, W) for one batch.
- ``methods()``: the registered methods with their parameters and defaults.
- ``radial_spectrum(maps)``, ``low_pass(maps, cutoff, kind="forgrad")``: spectra and filters.
- ``evaluate(model, images, maps, metric, target=None, **params)``: per-image metric scores.
"""
from .methods import attribute, methods

__version__ = "0.1.0"


def run(config, **kwargs):
    """Run the attribution job; see ``distributed_attr.runner.run``."""
    from .runner import run as _run

    return _run(config, **kwargs)


def radial_spectrum(maps):
    """``(frequencies, power)`` of a batch of maps (N, H, W); see ``distributed_attr.spectral``."""
    from .spectral import radial_spectrum as _rs

    return _rs(maps)


def low_pass(maps, cutoff, kind="forgrad", **kwargs):
    """Low-pass filtered maps; ``cutoff`` in cycles per image (FORGrad's sigma)."""
    from .spectral import low_pass as _lp

    return _lp(maps, cutoff, kind=kind, **kwargs)


def evaluate(model, images, maps, metric, target=None, **params):
    """Per-image scores (and curves) of ``metric`` for a batch; see ``distributed_attr.metrics``."""
    from .metrics import evaluate as _ev

    return _ev(model, images, maps, metric, target=target, **params)


__all__ = ["attribute", "evaluate", "low_pass", "methods", "radial_spectrum", "run", "__version__"]
