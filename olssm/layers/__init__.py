"""Layers: OnlineSSM (a mixer for any derived Rule) and the published presets."""
from .online_ssm import OnlineSSM, available_backends, dt_bias_init, inv_softplus
from .presets import (GLA, PRESETS, DecayedLeastSquares, DeltaNet, GatedDeltaNet, LinearAttention, Longhorn,
                      Mamba, Mamba2, RetNet, get_preset)

__all__ = ["OnlineSSM", "available_backends", "dt_bias_init", "inv_softplus", "PRESETS", "get_preset",
           "Longhorn", "Mamba", "Mamba2", "DeltaNet", "GatedDeltaNet", "GLA", "LinearAttention", "RetNet",
           "DecayedLeastSquares"]
