"""Published layers as OnlineSSM presets: the catalogue objective plus the published defaults.

Each preset only picks the objective (``olssm.catalogue``) and default arguments of
:class:`~olssm.layers.OnlineSSM`; every default can be overridden by keyword. Where each default comes
from is written in PRESETS.md next to this file.
"""
from __future__ import annotations

import math

from .online_ssm import OnlineSSM


def _rule(name):
    from .. import catalogue
    return catalogue.get(name).rule


class _Preset(OnlineSSM):
    catalogue_name: str = ""

    @classmethod
    def preset_defaults(cls, d_model: int, n_heads: int, overrides=frozenset()) -> dict:
        """The published defaults; `overrides` names the arguments the caller gives (their defaults are
        not computed, so a size the override makes valid is not refused)."""
        return {}

    def __init__(self, d_model: int, n_heads: int = 4, **overrides):
        kw = self.preset_defaults(d_model, n_heads, frozenset(overrides))
        kw.update(overrides)
        super().__init__(_rule(self.catalogue_name), d_model, n_heads, **kw)


def _value_head_dim(what, d_model, n_heads, expand, overrides):
    """d_inner / n_heads, d_inner = expand · d_model (None where the caller gives d_v)."""
    if "d_v" in overrides:
        return None
    d_inner = int(expand * d_model)
    if d_inner % n_heads:
        raise ValueError(f"{what}: d_inner = {expand} * d_model = {d_inner} is not divisible by n_heads = {n_heads} "
                         "(or give d_v)")
    return d_inner // n_heads


def _mamba_block(d_model, n_heads, overrides, expand=2, d_state=16):
    return dict(d_k=d_state, d_v=_value_head_dim("Mamba-style preset", d_model, n_heads, expand, overrides),
                conv_size=4, conv_bias=True, key_norm=False, query_norm=False, out_norm=False, gate=True,
                d_skip="channel", qk_heads=1, project_from="value", bias=False)


class Mamba(_Preset):
    """Mamba / S6 (Gu & Dao 2023): d_state 16, d_conv 4, expand 2, dt_rank ceil(d_model/16)."""

    catalogue_name = "mamba"

    @classmethod
    def preset_defaults(cls, d_model, n_heads, overrides=frozenset()):
        return dict(_mamba_block(d_model, n_heads, overrides), coef_rank={"dt": math.ceil(d_model / 16)},
                    dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4)


class Longhorn(_Preset):
    """Longhorn (Liu et al. 2024): Mamba's block, β = sigmoid(low-rank projection) per channel, no A."""

    catalogue_name = "longhorn"

    @classmethod
    def preset_defaults(cls, d_model, n_heads, overrides=frozenset()):
        return dict(_mamba_block(d_model, n_heads, overrides), coef_rank={"beta": math.ceil(d_model / 16)})


class Mamba2(_Preset):
    """Mamba-2 / SSD (Dao & Gu 2024): scalar A per head, dt per head, B/C shared (1 group), D per head,
    conv over x/B/C, gated RMSNorm norm(o ⊙ silu(z)); d_state 128."""

    catalogue_name = "mamba2"

    @classmethod
    def preset_defaults(cls, d_model, n_heads, overrides=frozenset()):
        return dict(d_k=128, d_v=_value_head_dim("Mamba2", d_model, n_heads, 2, overrides), conv_size=4,
                    conv_bias=True, key_norm=False, query_norm=False, out_norm=True, gate=True,
                    norm_before_gate=False, d_skip="head", qk_heads=1,
                    dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4, bias=False)


class DeltaNet(_Preset):
    """DeltaNet (Schlag et al. 2021; Yang et al. 2024): L2-normalised q/k, β = sigmoid, SiLU conv 4."""

    catalogue_name = "deltanet"

    @classmethod
    def preset_defaults(cls, d_model, n_heads, overrides=frozenset()):
        return dict(conv_size=4, key_norm=True, query_norm=True, out_norm=True, gate=False, bias=False)


class GatedDeltaNet(_Preset):
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025): DeltaNet + Mamba-2 style α, expand_v 2, gate."""

    catalogue_name = "gated_deltanet"

    @classmethod
    def preset_defaults(cls, d_model, n_heads, overrides=frozenset()):
        return dict(expand_v=2.0, conv_size=4, key_norm=True, query_norm=True, out_norm=True, gate=True,
                    decay_style="mamba", dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4, decay_init=None, bias=False)


class GLA(_Preset):
    """Gated linear attention (Yang et al. 2024): expand_k 0.5, low-rank (16) gate, logsigmoid / 16."""

    catalogue_name = "gla"

    @classmethod
    def preset_defaults(cls, d_model, n_heads, overrides=frozenset()):
        return dict(expand_k=0.5, expand_v=1.0, conv_size=0, key_norm=False, query_norm=False,
                    q_scale="rsqrt_dk", out_norm=True, gate=True, coef_rank={"g": 16},
                    decay_normalizer=16.0, decay_init=None, bias=False)


class LinearAttention(_Preset):
    """Linear attention (Katharopoulos et al. 2020): φ = elu + 1; the output RMSNorm stands in for the
    normaliser Σ φ(k)ᵀφ(q)."""

    catalogue_name = "linear_attention"

    @classmethod
    def preset_defaults(cls, d_model, n_heads, overrides=frozenset()):
        return dict(conv_size=0, key_norm=False, query_norm=False, feature_map="elu1", q_scale="rsqrt_dk",
                    out_norm=True, gate=False, bias=False)


class RetNet(_Preset):
    """RetNet (Sun et al. 2023): fixed γ_h = 1 − 2^(−5−h), k scaled by d_k^-½, expand_v 2, swish gate,
    per-head norm; no xPos."""

    catalogue_name = "retnet"

    @classmethod
    def preset_defaults(cls, d_model, n_heads, overrides=frozenset()):
        return dict(expand_v=2.0, conv_size=0, key_norm=False, query_norm=False, q_scale="rsqrt_dk",
                    out_norm=True, gate=True, freeze=("gamma",), bias=False)


class DecayedLeastSquares(_Preset):
    """Decayed least squares / Mesa layer (von Oswald et al. 2025): exact ridge regression over the
    decayed prefix; L2-normalised q/k, β sigmoid, γ forget gate, λ learned (softplus, init 1)."""

    catalogue_name = "decayed_least_squares"

    @classmethod
    def preset_defaults(cls, d_model, n_heads, overrides=frozenset()):
        return dict(conv_size=4, key_norm=True, query_norm=True, out_norm=True, gate=True, bias=False)


PRESETS = {
    "longhorn": Longhorn,
    "mamba": Mamba,
    "mamba2": Mamba2,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "gla": GLA,
    "linear_attention": LinearAttention,
    "retnet": RetNet,
    "decayed_least_squares": DecayedLeastSquares,
}


def get_preset(name: str):
    """The preset class for a name (a clear error lists the known names)."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown mixer preset {name!r}; known presets: {sorted(PRESETS)}") from None


__all__ = ["PRESETS", "get_preset", "Longhorn", "Mamba", "Mamba2", "DeltaNet", "GatedDeltaNet", "GLA",
           "LinearAttention", "RetNet", "DecayedLeastSquares"]
