"""distributed_attr: dataset-scale attribution maps, spectra and faithfulness metrics."""
from .methods import attribute, methods

__version__ = "0.1.0"
__all__ = ["attribute", "methods", "__version__"]
