"""distributed_attr: dataset-scale attribution maps, spectra and faithfulness metrics.

Python API
----------
- ``run(config)``: the attribution job (YAML path, dict or ``Config``) -> ``RunSummary``.
- ``attribute(model, images, method, target=None, **params)``: maps (N, H, W) for one batch.
- ``list_methods()`` / ``list_metrics()``: the registered methods / metrics with their parameters
  and defaults.
- ``radial_spectrum(maps)``, ``low_pass(maps, cutoff, kind="forgrad")``: spectra and filters.
- ``evaluate(model, images, maps, metric, target=None, **params)``: per-image scores.

The subpackages keep their names: ``distributed_attr.methods`` is the methods package (its
registry, ``compute_maps``, one module per family), ``distributed_attr.metrics`` the metrics'.
Importing this package imports no torch; the functions import what they need.
"""

__version__ = "0.1.0"


def run(config, **kwargs):
    """Run the attribution job; see ``distributed_attr.runner.run``."""
    from .runner import run as _run

    return _run(config, **kwargs)


def attribute(model, images, method, target=None, **kwargs):
    """Maps (N, H, W) of one method for a batch; see ``distributed_attr.methods.attribute``."""
    from .methods import attribute as _attribute

    return _attribute(model, images, method, target, **kwargs)


def list_methods():
    """Every registered attribution method with its family, parameters and defaults."""
    from .methods import list_methods as _list

    return _list()


def list_metrics():
    """Every registered metric with its direction, outputs, parameters and defaults."""
    from .metrics import list_metrics as _list

    return _list()


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


__all__ = ["__version__", "attribute", "evaluate", "list_methods", "list_metrics", "low_pass", "radial_spectrum",
           "run"]
