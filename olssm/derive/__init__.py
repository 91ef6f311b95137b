"""Symbolic derivation: Objective -> Rule (see NOTES.md for the math)."""
from __future__ import annotations

import warnings

from ..objectives.core import DerivationError, Objective
from .rule import Correction, ExactForm, InputTerm, NormalForm, RLSForm, Rule, decay_kind, torch_step_source
from .solve import _caller_level, derive_form

_CACHE: dict[str, Rule] = {}
#: the warnings each cached derivation raised: every new Objective that hits the cache gets them again (an equal
#: objective built a second time had derived silently)
_WARNINGS: dict[str, list] = {}


def derive(objective: Objective) -> Rule:
    """Derive the closed-form update of an objective (cached by the objective's canonical form)."""
    if isinstance(objective, Rule):
        return objective
    if not isinstance(objective, Objective):
        raise DerivationError(f"derive(): expected an olssm.objectives.Objective, got {type(objective).__name__}")
    key = objective.key
    rule = _CACHE.get(key)
    if rule is None or rule.objective is not objective:
        if rule is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                form = derive_form(objective)
            _WARNINGS[key] = [w.message for w in caught]
        else:
            form = rule.form
        rule = Rule(objective, form)
        _CACHE[key] = rule
        for message in _WARNINGS.get(key, ()):
            warnings.warn(message, stacklevel=_caller_level())
    return rule


__all__ = ["derive", "Rule", "NormalForm", "ExactForm", "RLSForm", "Correction", "InputTerm", "DerivationError",
           "decay_kind", "torch_step_source"]
