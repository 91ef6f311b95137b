"""Symbolic derivation: Objective -> Rule (see NOTES.md for the math)."""
from __future__ import annotations

from ..objectives.core import DerivationError, Objective
from .rule import Correction, ExactForm, InputTerm, NormalForm, RLSForm, Rule, decay_kind, torch_step_source
from .solve import derive_form

_CACHE: dict[str, Rule] = {}


def derive(objective: Objective) -> Rule:
    """Derive the closed-form update of an objective (cached by the objective's canonical form)."""
    if isinstance(objective, Rule):
        return objective
    if not isinstance(objective, Objective):
        raise DerivationError(f"derive(): expected an olssm.objectives.Objective, got {type(objective).__name__}")
    key = objective.key
    rule = _CACHE.get(key)
    if rule is None or rule.objective is not objective:
        form = derive_form(objective) if rule is None else rule.form
        rule = Rule(objective, form)
        _CACHE[key] = rule
    return rule


__all__ = ["derive", "Rule", "NormalForm", "ExactForm", "RLSForm", "Correction", "InputTerm", "DerivationError",
           "decay_kind", "torch_step_source"]
