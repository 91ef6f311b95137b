"""Models: a causal LM stacking OnlineSSM mixers, with recurrent generation and save / load."""
from .lm import Block, CausalLM, LMConfig, RMSNorm, SwiGLU, build_mixer

__all__ = ["LMConfig", "CausalLM", "Block", "RMSNorm", "SwiGLU", "build_mixer"]
