"""dist_marsm: distributed MARS-M (variance-reduced Muon) for PyTorch FSDP2/DTensor and torchtitan.

``import dist_marsm`` needs torch alone; the torchtitan glue lives in ``dist_marsm.titan``.
"""

from dist_marsm.newton_schulz import newton_schulz
from dist_marsm.optimizer import MARSM, NonFiniteGradientError
from dist_marsm.param_groups import DEFAULT_ADAMW_PATTERNS, build_param_groups

__all__ = ["MARSM", "NonFiniteGradientError", "build_param_groups", "DEFAULT_ADAMW_PATTERNS", "newton_schulz"]
__version__ = "0.1.0"
