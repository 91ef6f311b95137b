"""A causal language model that stacks OnlineSSM mixers: embedding, pre-norm residual blocks
(mixer + optional SwiGLU MLP), final RMSNorm, (tied) LM head; recurrent generation; save / load.

Custom objectives: ``LMConfig(mixer_objective=obj)`` builds the mixers from any Objective. An
Objective is sympy, not JSON, so ``save_pretrained`` refuses it unless ``allow_pickle=True``, which
pickles it to ``objective.pkl`` beside the config (loading a pickle runs code: only load your own
files, and pass ``allow_pickle=True`` to ``from_pretrained`` too). Alternatively save without the
objective (``allow_pickle=False`` raises) and pass ``objective=`` to ``from_pretrained``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import OnlineSSM
from ..layers.presets import PRESETS, get_preset
from ..objectives.core import Objective

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAME = "model.pt"
OBJECTIVE_NAME = "objective.pkl"
FORMAT_VERSION = 1


def objective_fingerprint(objective: Objective) -> str:
    """A short hash of what a layer built from the objective depends on: its terms and settings as printed, and
    every input's name, role, kind and domain. Kept in config.json to check the objective passed at load."""
    import hashlib
    from ..derive import derive
    specs = sorted((s.name, s.role, s.kind, s.domain, bool(s.positive)) for s in derive(objective).inputs.values())
    return hashlib.sha256(repr((repr(objective), specs)).encode()).hexdigest()[:16]


@dataclasses.dataclass
class LMConfig:
    """Configuration of :class:`CausalLM`.

    mixer: a PRESETS name ("longhorn", "mamba", ...); ignored when ``mixer_objective`` is given, in
    which case every mixer is ``OnlineSSM(mixer_objective, d_model, n_heads, **mixer_kwargs)``.
    mlp_ratio: hidden size of the SwiGLU MLP as a multiple of d_model; 0 disables the MLP (Mamba-style
    blocks). mixer_kwargs: keyword arguments for the mixer (override preset defaults).
    """

    vocab_size: int
    d_model: int = 128
    n_layers: int = 2
    mixer: str = "longhorn"
    mixer_objective: Objective | None = None
    n_heads: int = 4
    mlp_ratio: float = 4.0
    mixer_kwargs: dict = dataclasses.field(default_factory=dict)
    tie_embeddings: bool = True
    gradient_checkpointing: bool = False
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LMConfig: {name} must be a positive integer, got {v!r}")
        if self.mixer_objective is not None:
            if not isinstance(self.mixer_objective, Objective):
                raise ValueError(f"LMConfig: mixer_objective must be an olssm Objective, got "
                                 f"{type(self.mixer_objective).__name__}")
        elif self.mixer not in PRESETS:
            raise ValueError(f"LMConfig: unknown mixer {self.mixer!r}; known presets: {sorted(PRESETS)} "
                             "(or pass mixer_objective=an Objective)")
        if (isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float))
                or not (math.isfinite(self.mlp_ratio) and self.mlp_ratio >= 0)):
            raise ValueError(f"LMConfig: mlp_ratio must be a finite number >= 0 (0 disables the MLP), got "
                             f"{self.mlp_ratio!r}")
        for name in ("norm_eps", "initializer_range"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"LMConfig: {name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.mixer_kwargs, dict):
            raise ValueError(f"LMConfig: mixer_kwargs must be a dict, got {type(self.mixer_kwargs).__name__}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mixer_objective"}
        d["mixer_kwargs"] = dict(self.mixer_kwargs)
        d["custom_objective"] = self.mixer_objective is not None
        if self.mixer_objective is not None:
            d["objective_fingerprint"] = objective_fingerprint(self.mixer_objective)
        return d

    @classmethod
    def from_dict(cls, d: dict, objective: Objective | None = None) -> "LMConfig":
        d = dict(d)
        d.pop("custom_objective", None)
        d.pop("objective_fingerprint", None)
        d.pop("format_version", None)
        d.pop("olssm_version", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"LMConfig: unknown config field(s) {unknown}; known: {sorted(names)}")
        if "mixer_kwargs" in d:  # JSON turns tuples into lists
            d["mixer_kwargs"] = {k: tuple(v) if isinstance(v, list) else v for k, v in d["mixer_kwargs"].items()}
        return cls(**d, mixer_objective=objective)


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float() if x.dtype != torch.float64 else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, ratio: float):
        super().__init__()
        hidden = max(1, int(d_model * ratio * 2 / 3))
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        a, b = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(a) * b)


def build_mixer(config: LMConfig, layer_idx: int | None = None) -> OnlineSSM:
    kw = dict(config.mixer_kwargs)
    if config.mixer_objective is not None:
        return OnlineSSM(config.mixer_objective, config.d_model, config.n_heads, layer_idx=layer_idx, **kw)
    return get_preset(config.mixer)(config.d_model, config.n_heads, layer_idx=layer_idx, **kw)


class Block(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.norm1 = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = build_mixer(config, layer_idx)
        if config.mlp_ratio > 0:
            self.norm2 = RMSNorm(config.d_model, config.norm_eps)
            self.mlp = SwiGLU(config.d_model, config.mlp_ratio)
        else:
            self.norm2 = self.mlp = None

    def forward(self, h, cache=None, return_cache=False, cu_seqlens=None):
        out = self.mixer(self.norm1(h), cache=cache, return_cache=return_cache, cu_seqlens=cu_seqlens)
        if return_cache:
            out, cache = out
        h = h + out
        if self.mlp is not None:
            h = h + self.mlp(self.norm2(h))
        return (h, cache) if return_cache else h

    def step(self, h, cache):
        out, cache = self.mixer.step(self.norm1(h), cache)
        h = h + out
        if self.mlp is not None:
            h = h + self.mlp(self.norm2(h))
        return h, cache


class CausalLM(nn.Module):
    """Embedding → n_layers × (RMSNorm → mixer → +, RMSNorm → MLP → +) → RMSNorm → LM head."""

    def __init__(self, config: LMConfig):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"CausalLM: expected an LMConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layers)])
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=config.initializer_range)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=config.initializer_range)

    # -- forward ------------------------------------------------------------------------------
    def _check_ids(self, input_ids, what, ndim=2):
        if (not torch.is_tensor(input_ids) or input_ids.dim() != ndim or input_ids.is_floating_point()
                or input_ids.is_complex() or input_ids.dtype == torch.bool):
            want = "[B, T]" if ndim == 2 else "[B]"
            got = (f"{input_ids.dtype} {tuple(input_ids.shape)}" if torch.is_tensor(input_ids)
                   else type(input_ids).__name__)
            raise ValueError(f"CausalLM.{what}: input_ids must be an integer tensor {want}, got {got}")
        # the range on CPU tensors only: on a GPU it is a host sync per call (the embedding asserts there), and
        # under compilation a graph break
        if input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"CausalLM.{what}: input_ids must lie in [0, vocab_size = {self.config.vocab_size}), "
                                 f"got ids from {lo} to {hi}")

    def _check_caches(self, caches, what):
        if not isinstance(caches, (list, tuple)) or len(caches) != len(self.blocks):
            raise ValueError(f"{what}: caches must be a list of {len(self.blocks)} per-layer caches (init_caches or "
                             f"a previous call's), got {type(caches).__name__}"
                             + (f" of length {len(caches)}" if isinstance(caches, (list, tuple)) else ""))

    def forward(self, input_ids: torch.Tensor, caches=None, return_caches: bool = False, cu_seqlens=None):
        """logits [B, T, vocab]; with return_caches also the per-layer decoding caches (prefill).
        cu_seqlens [N+1]: input_ids [1, T] packs N independent sequences (no state crosses a boundary)."""
        self._check_ids(input_ids, "forward")
        if caches is not None:   # (one short had raised IndexError; extra ones, another model's, were ignored)
            self._check_caches(caches, "forward")
        h = self.embed(input_ids)
        new = []
        for i, blk in enumerate(self.blocks):
            c = None if caches is None else caches[i]
            if return_caches or c is not None:
                h, c = blk(h, cache=c, return_cache=True, cu_seqlens=cu_seqlens)
                new.append(c)
            elif self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(blk, h, None, False, cu_seqlens, use_reentrant=False)
            else:
                h = blk(h, cu_seqlens=cu_seqlens)
        logits = self.lm_head(self.norm(h))
        return (logits, new) if return_caches else logits

    def init_caches(self, batch_size: int, device=None) -> list:
        return [blk.mixer.init_cache(batch_size, device) for blk in self.blocks]

    def step(self, token: torch.Tensor, caches: list | None = None):
        """One token [B] -> (logits [B, vocab], caches). caches None: fresh ones (each mixer's step(x, None)), as
        for the first token of a sequence."""
        self._check_ids(token, "step", ndim=1)
        if caches is None:   # each mixer's step starts its own (init_caches cannot for a per-token RLS ridge)
            caches = [None] * len(self.blocks)
        self._check_caches(caches, "step")
        h = self.embed(token)
        new = []
        for blk, c in zip(self.blocks, caches):
            h, c = blk.step(h, c)
            new.append(c)
        return self.lm_head(self.norm(h)), new

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt [B, T0] -> [B, T0 + max_new_tokens]: one prefill forward (returning the recurrent
        caches), then one recurrent step per token (cost independent of the prompt length).
        temperature 0 is greedy; > 0 samples from softmax(logits / temperature), optionally top-k."""
        self._check_ids(input_ids, "generate")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"generate: temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"generate: top_k must be a positive integer or None, got {top_k!r}")
        if input_ids.shape[1] == 0:
            raise ValueError("generate: the prompt must have at least one token")
        if max_new_tokens == 0:
            return input_ids
        logits, caches = self(input_ids, return_caches=True)
        last = logits[:, -1]
        out = [input_ids]
        for i in range(max_new_tokens):
            nxt = self._sample(last, temperature, top_k, generator)
            out.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                last, caches = self.step(nxt, caches)
        return torch.cat(out, dim=1)

    @staticmethod
    def _sample(logits, temperature, top_k, generator):
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float()
        # shifted so that the largest is 0 first: a tiny temperature then gives −inf elsewhere, not inf − inf
        logits = (logits - logits.amax(-1, keepdim=True)) / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    # -- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, directory, allow_pickle: bool = False, safe_serialization: bool = True,
                        save_objective: bool = True):
        """Write config.json and model.safetensors (model.pt via torch.save if safetensors is missing).
        A custom mixer_objective is pickled to objective.pkl only with allow_pickle=True; save_objective=False
        writes weights and config alone, and from_pretrained(dir, objective=...) rebuilds it (config.json keeps
        the objective's fingerprint, and loading with another objective is an error)."""
        from .. import __version__
        if self.config.mixer_objective is not None and save_objective and not allow_pickle:
            raise ValueError("save_pretrained: this model uses a custom mixer_objective, which is not JSON. "
                             "Pass allow_pickle=True to pickle it to objective.pkl, or save_objective=False to "
                             "save weights and config only (then from_pretrained(dir, objective=the same "
                             "Objective))")
        cfg = self.config.to_dict()
        cfg["format_version"] = FORMAT_VERSION
        cfg["olssm_version"] = __version__
        try:
            text = json.dumps(cfg, indent=2, sort_keys=True)
        except TypeError as e:
            bad = [k for k, v in cfg["mixer_kwargs"].items() if not _jsonable(v)]
            raise ValueError(f"save_pretrained: config.json needs JSON values; mixer_kwargs {bad} are not "
                             f"({e}); use plain numbers / lists instead of tensors") from None
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            f.write(text)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        try:
            import safetensors.torch as st
        except ImportError:
            st = None
        if st is not None and safe_serialization:
            written, other = WEIGHTS_NAME, TORCH_WEIGHTS_NAME
            st.save_file(state, os.path.join(directory, written), metadata={"format": "pt"})
        else:
            written, other = TORCH_WEIGHTS_NAME, WEIGHTS_NAME
            torch.save(state, os.path.join(directory, written))
        # a directory saved before in the other format keeps no stale weights: from_pretrained prefers
        # model.safetensors, and loaded an older one next to this config (and these model.pt weights) silently
        if os.path.exists(os.path.join(directory, other)):
            os.remove(os.path.join(directory, other))
        pkl = os.path.join(directory, OBJECTIVE_NAME)
        if self.config.mixer_objective is not None and save_objective:
            with open(pkl, "wb") as f:
                pickle.dump(self.config.mixer_objective, f)
        elif os.path.exists(pkl):   # a stale objective from an earlier save would be loaded with these weights
            os.remove(pkl)

    @classmethod
    def from_pretrained(cls, directory, objective: Objective | None = None, allow_pickle: bool = False,
                        map_location="cpu") -> "CausalLM":
        """Load a model written by save_pretrained; errors name missing / unexpected keys, shape
        mismatches and unknown mixers. The parameters are float32 whatever dtype they were saved in (as a
        freshly built model's); call .to(dtype) after loading for another."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"from_pretrained: no {CONFIG_NAME} in {directory!r}")
        with open(path) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError(f"from_pretrained: {path} does not hold a JSON object")
        if cfg.get("custom_objective") and objective is None:
            pkl = os.path.join(directory, OBJECTIVE_NAME)
            if not os.path.isfile(pkl):
                raise ValueError(f"from_pretrained: {directory!r} was saved with a custom mixer objective; pass "
                                 "objective=the same Objective")
            if not allow_pickle:
                raise ValueError(f"from_pretrained: {directory!r} holds a pickled custom objective "
                                 f"({OBJECTIVE_NAME}); loading a pickle can run code, so pass allow_pickle=True "
                                 "if you trust it, or objective=the same Objective")
            with open(pkl, "rb") as f:
                objective = pickle.load(f)
        if not cfg.get("custom_objective"):
            if objective is not None:
                raise ValueError(f"from_pretrained: {directory!r} uses the preset mixer {cfg.get('mixer')!r}; "
                                 "do not pass objective=")
            if cfg.get("mixer") not in PRESETS:
                raise ValueError(f"from_pretrained: unknown mixer {cfg.get('mixer')!r} in {path}; known presets: "
                                 f"{sorted(PRESETS)}")
        want = cfg.get("objective_fingerprint")
        got = objective_fingerprint(objective) if objective is not None and want is not None else want
        if got != want:
            raise ValueError(f"from_pretrained: {directory!r} was saved with another mixer objective than the one "
                             f"passed ({objective!r}): its inputs, domains or terms differ (fingerprint {got} != "
                             f"{want}); pass the Objective the model was trained with")
        config = LMConfig.from_dict(cfg, objective)
        model = cls(config)
        wpath = os.path.join(directory, WEIGHTS_NAME)
        tpath = os.path.join(directory, TORCH_WEIGHTS_NAME)
        if os.path.isfile(wpath):
            import safetensors.torch as st
            state = st.load_file(wpath, device=str(map_location))
        elif os.path.isfile(tpath):
            state = torch.load(tpath, map_location=map_location, weights_only=True)
        else:
            raise FileNotFoundError(f"from_pretrained: no {WEIGHTS_NAME} or {TORCH_WEIGHTS_NAME} in {directory!r}")
        model.load_weights(state, source=directory)
        return model

    def load_weights(self, state: dict, source: str = "state dict"):
        """Strict load with a message naming missing / unexpected keys and shape mismatches."""
        own = self.state_dict()
        if self.config.tie_embeddings:
            own.pop("lm_head.weight", None)
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if shapes:
            problems.append("shape mismatch: " + "; ".join(shapes))
        if problems:
            raise ValueError(f"load from {source}: " + "; ".join(problems))
        self.load_state_dict(state, strict=not self.config.tie_embeddings)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["LMConfig", "CausalLM", "RMSNorm", "SwiGLU", "Block", "build_mixer"]
