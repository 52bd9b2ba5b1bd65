"""Tools over trained models: population statistics and folding into Dense/Conv."""
from jaxbn.tools.folding import fold_into_kernel
from jaxbn.tools.precise import precise_statistics

__all__ = ["fold_into_kernel", "precise_statistics"]
