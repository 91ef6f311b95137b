"""Declare online-learning objectives: inputs, the state, quadratic building blocks."""
from .core import (COLUMN, DOMAINS, ELEMENTWISE, ROW, SCALAR, DerivationError, IndefiniteHessianWarning, InputSpec,
                   MemorylessWarning, Objective, UnknownSignWarning, column, csum, diag, dot, inner, key, kind_of, norm,
                   parameter, query, row, scalar, sqnorm, states, value)

__all__ = ["states", "key", "value", "query", "scalar", "row", "column", "parameter", "sqnorm", "inner",
           "diag", "dot", "norm", "Objective", "DerivationError", "UnknownSignWarning", "IndefiniteHessianWarning",
           "MemorylessWarning", "InputSpec", "kind_of", "csum", "SCALAR", "ROW", "COLUMN", "ELEMENTWISE", "DOMAINS"]
