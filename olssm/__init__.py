"""olssm: state-space models and linear attention derived from online-learning objectives.

    objective ──derive──▶ Rule ──lower──▶ scan (reference | chunk | triton) ──▶ layers / models
"""
from . import objectives
from .derive import Rule, derive
from .objectives import (DerivationError, IndefiniteHessianWarning, MemorylessWarning, Objective,
                         UnknownSignWarning)
from .verify import VerifyReport, verify

__version__ = "0.1.0"

_LAZY = {"catalogue": ".catalogue", "kernels": ".kernels", "layers": ".layers", "models": ".models",
         "data": ".data"}


def __getattr__(name):
    import importlib
    if name in _LAZY:
        return importlib.import_module(_LAZY[name], __name__)
    if name == "OnlineSSM":
        from .layers import OnlineSSM
        return OnlineSSM
    if name == "scan":
        from .kernels import scan
        return scan
    raise AttributeError(f"module 'olssm' has no attribute {name!r}")


__all__ = ["objectives", "derive", "Rule", "Objective", "DerivationError", "UnknownSignWarning",
           "IndefiniteHessianWarning", "MemorylessWarning", "verify", "VerifyReport", "catalogue", "OnlineSSM", "scan"]
