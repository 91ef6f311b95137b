"""OnlineSSM: an nn.Module mixer built from any derived Rule, driven by the inputs' specs.

The layer reads ``rule.inputs`` (role, kind, domain of every symbol) and creates:

* key / query / value inputs (roles ``key``, ``query``, ``value``): linear projections, an optional
  short causal depthwise convolution with SiLU (``conv_size``; 0 disables), an optional feature map,
  and optional L2 normalisation of keys and queries (``key_norm`` / ``query_norm``);
* per-token coefficients (roles ``scalar`` [B,T,H], ``row`` [B,T,H,d_v], ``column`` [B,T,H,d_k]):
  linear (optionally low-rank) projections mapped into the input's domain:

  ========== ====================================================================================
  unit       sigmoid(x)
  positive   softplus(x)
  decay      exp(log_decay), log_decay = −softplus(x) / decay_normalizer   (``decay_style="softplus"``)
             or −exp(A_log) · softplus(x + dt_bias)                         (``decay_style="mamba"``);
             handed to the scan as log_decay: the layer runs ``rule.with_log_decays()``, which reads
             such an input as exp(·) (domain ``log_decay``), so no backend takes the log of a decay
  timestep   softplus(x + dt_bias), dt_bias = softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max]
  real       x
  negative   −softplus(x)
  ========== ====================================================================================

* learned parameters (role ``parameter``, per head: [H], [H, d_v], [H, d_k], [H, d_v, d_k]):

  ========== ====================================================================================
  negative   A = −exp(A_log); S4D-real init A_log = log(1..d_k) (key-indexed kinds), else log U(1, 16)
  decay      γ = exp(−exp(w)); init γ_h = 1 − 2^(−5−h) (RetNet)
  log_decay  log γ = −exp(w), the same γ in log space
  positive   softplus(w), init 1
  unit       sigmoid(w), init 1/2
  timestep   softplus(w), init like dt
  real       w, init 1
  ========== ====================================================================================

then ``o = rule.scan(...)``, an optional D skip (``o += D ⊙ v``), per-head RMSNorm, SiLU output gate
and the output projection. State math is fp32 (the scan keeps fp32 state), so bf16 autocast works.

``step(x_t, cache)`` decodes one token with ``rule.decode`` and a conv cache; ``forward(x, cache,
return_cache=True)`` continues from / returns a cache (prefill), equal to stepping token by token.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..derive import Rule, derive
from ..objectives.core import COLUMN, ELEMENTWISE, ROW, SCALAR, DOMAINS, Objective
from ..kernels.api import auto_backend, expand_heads

#: scan backends of olssm.kernels, plus "recurrent": the layer's own batched token loop over
#: rule.decode (the decoding path; no kernel needed, vectorised over the batch)
BACKENDS = ("auto", "reference", "chunk", "triton", "recurrent")
FEATURE_MAPS = (None, "identity", "elu1", "relu", "silu")
DECAY_STYLES = ("softplus", "mamba")
_VECTOR_ROLES = ("key", "query", "value")
_COEF_ROLES = ("scalar", "row", "column")


@functools.lru_cache(maxsize=None)
def available_backends() -> tuple[str, ...]:
    """Scan backends whose implementation is importable here (reference always is)."""
    out = ["reference"]
    if importlib.util.find_spec("olssm.kernels.chunk") is not None:
        out.append("chunk")
    try:
        has_triton_pkg = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        has_triton_pkg = False
    if has_triton_pkg and importlib.util.find_spec("olssm.kernels.triton") is not None:
        out.append("triton")
    return tuple(out)


def inv_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0)."""
    return y + torch.log(-torch.expm1(-y))


def dt_bias_init(n, dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4, generator=None) -> torch.Tensor:
    """Mamba's Δ bias: dt log-uniform in [dt_min, dt_max] (floored), bias = softplus⁻¹(dt)."""
    u = torch.rand(n, generator=generator)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    return inv_softplus(dt)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _RMSNormHeads(nn.Module):
    """RMSNorm over the last dim of [..., H, d], one weight per (head, channel), computed in fp32."""

    def __init__(self, n_heads: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, dim))

    def forward(self, x):
        xf = x.to(_compute_dtype(x))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


def _head_dim(what, expand, arg, width, H):
    if width % H:
        raise ValueError(f"OnlineSSM: {what} width d_model * {expand} = {width} is not divisible by "
                         f"n_heads = {H}; choose n_heads dividing it or pass {arg} explicitly")
    return width // H


def _finite_number(v) -> bool:
    """A finite int or float, not a bool (True would pass as 1)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _check_pos_int(name, v, allow_zero=False):
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
        raise ValueError(f"OnlineSSM: {name} must be an integer >= {0 if allow_zero else 1}, got {v!r}")


class OnlineSSM(nn.Module):
    """A sequence mixer [B, T, d_model] -> [B, T, d_model] for any derived Rule (or Objective).

    Args:
        rule_or_objective: an ``olssm.Objective`` (derived here) or an ``olssm.Rule``.
        d_model: model width.
        n_heads: number of heads H.
        d_k, d_v: key / value size per head; default ``int(d_model * expand_k) // H`` and
            ``int(d_model * expand_v) // H`` (an error names the sizes when they do not divide).
        expand_k, expand_v: see d_k, d_v.
        conv_size: short causal depthwise conv (+ SiLU) over the q/k/v channels; 0 disables.
        conv_bias: bias in the conv.
        key_norm, query_norm: L2-normalise keys / queries per head (query_norm defaults to key_norm).
        feature_map: None | "identity" | "elu1" | "relu" | "silu", applied to keys and queries.
        q_scale: multiplies the queries (a float, or "rsqrt_dk" for d_k ** -0.5).
        out_norm: per-head RMSNorm of the mixer output.
        gate: SiLU output gate from a projection of the input (o ⊙ silu(W_g x)).
        norm_before_gate: norm(o) ⊙ silu(g) (True, fla) or norm(o ⊙ silu(g)) (False, Mamba-2).
        d_skip: False, True / "channel" (D ∈ R^{H × d_v}), or "head" (D ∈ R^H): o += D ⊙ v.
        qk_heads: key / query heads G, dividing n_heads: head h reads key / query group h // (n_heads / G)
            (Mamba's B/C and Mamba-2 with one group: 1; Mamba-2's ngroups; fla's grouped-value heads).
            Default n_heads. The scan takes the G-head inputs as they are (olssm.kernels.scan).
        project_from: "input" (keys, queries and coefficients are projected from the layer input) or
            "value" (Mamba's block: they are projected from the convolved value stream).
        coef_rank: low-rank projection for coefficients: an int for all of them, or {name: rank}
            (Mamba's dt_rank, GLA's 16).
        dt_min, dt_max, dt_init_floor: Mamba's Δ initialisation (timestep domain).
        decay_style: "softplus" (log decay = −softplus(x) / decay_normalizer) or "mamba"
            (log decay = −exp(A_log) softplus(x + dt_bias), Gated DeltaNet's α).
        decay_normalizer: divides the softplus log decay (GLA: 16).
        decay_init: (lo, hi) initial decays of per-token decay coefficients: the decay starts in [lo, hi] at
            x = 0 (through the projection's bias, or dt_bias given A in the mamba style). None: each style's
            own start: a zero bias ("softplus"), Δ log-uniform in [dt_min, dt_max] ("mamba", Gated DeltaNet's).
        param_init: {parameter name: value in its domain (float or tensor broadcastable to the
            parameter's shape)} overriding the domain's default initialisation: 'positive' 1, 'unit' 0.5,
            'real' 1, 'negative' Mamba's A (S4D-real per column, U(−16, −1) per head), 'decay' RetNet's
            γ_h = 1 − 2^(−5−h), 'timestep' Mamba's Δ. The default knows nothing of a parameter's role: a ridge
            λ‖S‖²/2 beside ½‖S − S_prev‖² decays the state by 1/(1 + λ) per token, so λ = 1 halves it at every
            token and the layer can hardly learn to recall (MQAR accuracy 0.08 where λ = 1e-3 reached 1.0, a
            probe's 200 steps): start such weights small, param_init={"lam": 1e-3}.
        freeze: parameter names kept fixed (e.g. RetNet's γ).
        bias: bias in the q/k/v/gate/output projections.
        norm_eps: RMSNorm epsilon.
        backend: scan backend: "auto" (kernels.auto_backend: triton on CUDA, chunk on CPU and for exact rules;
            falls back to "recurrent" with a warning when that backend is not importable or raises
            NotImplementedError for the rule),
            "reference", "chunk", "triton" (olssm.kernels.scan), or "recurrent" (the layer's token
            loop over rule.decode, batched; what step() runs).
        chunk_size: tokens per chunk of the chunk-parallel scans (the chunk backend, the triton backend's chunked
            kernels: a power of two from 16 to 64 there); None: each backend's default (olssm.kernels.scan).
    """

    def __init__(self, rule_or_objective, d_model: int, n_heads: int = 4, d_k: int | None = None,
                 d_v: int | None = None, *, expand_k: float = 1.0, expand_v: float = 1.0,
                 conv_size: int = 4, conv_bias: bool = True, key_norm: bool = True,
                 query_norm: bool | None = None, feature_map: str | None = None, q_scale=1.0,
                 out_norm: bool = True, gate: bool = True, norm_before_gate: bool = True, d_skip=False,
                 qk_heads: int | None = None,
                 project_from: str = "input", coef_rank=None, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, decay_style: str = "softplus", decay_normalizer: float = 1.0,
                 decay_init=(0.9, 0.999), param_init: dict | None = None, freeze=(), bias: bool = False,
                 norm_eps: float = 1e-5, backend: str = "auto", chunk_size: int | None = None, layer_idx=None):
        super().__init__()
        if isinstance(rule_or_objective, Objective):
            rule = derive(rule_or_objective)
        elif isinstance(rule_or_objective, Rule):
            rule = rule_or_objective
        else:
            raise TypeError(f"OnlineSSM: expected an olssm Objective or Rule, got {type(rule_or_objective).__name__}")
        _check_pos_int("d_model", d_model)
        _check_pos_int("n_heads", n_heads)
        _check_pos_int("conv_size", conv_size, allow_zero=True)
        if chunk_size is not None:
            _check_pos_int("chunk_size", chunk_size)
        H = n_heads
        qk_heads = H if qk_heads is None else qk_heads
        _check_pos_int("qk_heads", qk_heads)
        if H % qk_heads:
            raise ValueError(f"OnlineSSM: qk_heads = {qk_heads} must divide n_heads = {H} (each key / query head "
                             "serves n_heads / qk_heads consecutive heads)")
        if d_k is None:
            d_k = _head_dim("key", "expand_k", "d_k", int(d_model * expand_k), H)
        if d_v is None:
            d_v = _head_dim("value", "expand_v", "d_v", int(d_model * expand_v), H)
        _check_pos_int("d_k", d_k)
        _check_pos_int("d_v", d_v)
        if backend not in BACKENDS:
            raise ValueError(f"OnlineSSM: backend must be one of {BACKENDS}, got {backend!r}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"OnlineSSM: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"OnlineSSM: decay_style must be one of {DECAY_STYLES}, got {decay_style!r}")
        if project_from not in ("input", "value"):
            raise ValueError(f"OnlineSSM: project_from must be 'input' or 'value', got {project_from!r}")
        if d_skip not in (False, True, "channel", "head", None):
            raise ValueError(f"OnlineSSM: d_skip must be False, True, 'channel' or 'head', got {d_skip!r}")
        if not (isinstance(decay_normalizer, (int, float)) and math.isfinite(decay_normalizer) and decay_normalizer > 0):
            raise ValueError(f"OnlineSSM: decay_normalizer must be a finite number > 0, got {decay_normalizer!r}")
        if not (_finite_number(norm_eps) and norm_eps >= 0):
            raise ValueError(f"OnlineSSM: norm_eps must be a finite number >= 0, got {norm_eps!r}")
        if decay_style == "mamba" and decay_normalizer != 1:
            raise ValueError(f"OnlineSSM: decay_normalizer={decay_normalizer!r} divides the 'softplus' style's log "
                             "decay; decay_style='mamba' reads −exp(A_log)·softplus(x + dt_bias) and has none")
        if decay_init is not None and not (isinstance(decay_init, (tuple, list)) and len(decay_init) == 2
                                           and all(_finite_number(d) for d in decay_init)
                                           and 0 < decay_init[0] <= decay_init[1] < 1):
            raise ValueError(f"OnlineSSM: decay_init must be None or a pair (lo, hi) with 0 < lo <= hi < 1, "
                             f"got {decay_init!r}")
        if isinstance(q_scale, str):
            if q_scale != "rsqrt_dk":
                raise ValueError(f"OnlineSSM: q_scale must be a number or 'rsqrt_dk', got {q_scale!r}")
            q_scale = d_k ** -0.5
        if not _finite_number(q_scale):
            raise ValueError(f"OnlineSSM: q_scale must be a finite number or 'rsqrt_dk', got {q_scale!r} (NaN made "
                             "every output NaN)")
        for name, value in (("dt_min", dt_min), ("dt_max", dt_max), ("dt_init_floor", dt_init_floor)):
            if not (_finite_number(value) and value > 0):
                raise ValueError(f"OnlineSSM: {name} must be a finite number > 0 (Mamba's Δ initialisation, "
                                 f"log-uniform), got {value!r}")
        if dt_min > dt_max:
            raise ValueError(f"OnlineSSM: dt_min must be <= dt_max, got dt_min={dt_min!r} > dt_max={dt_max!r}")
        if rule.query_name is None:
            raise ValueError("OnlineSSM: the rule has no query input symbol to read the state with")
        # the layer produces its decays in log space: handing them over as such gives every backend log Λ in
        # closed form (Rule.with_log_decays: no log of a tiny decay, the triton chunked backward under "auto")
        rule = rule.with_log_decays()

        self.rule = rule
        self.d_model, self.n_heads, self.d_k, self.d_v = d_model, H, d_k, d_v
        self.conv_size, self.key_norm = conv_size, bool(key_norm)
        self.query_norm = self.key_norm if query_norm is None else bool(query_norm)
        self.feature_map, self.q_scale = feature_map, float(q_scale)
        self.qk_heads, self.project_from = qk_heads, project_from
        self.decay_style, self.decay_normalizer = decay_style, float(decay_normalizer)
        self.backend, self.chunk_size, self.layer_idx = backend, chunk_size, layer_idx
        self._warned_fallback = False

        specs = rule.inputs
        self.vector_specs = {n: s for n, s in specs.items() if s.role in _VECTOR_ROLES}
        self.coef_specs = {n: s for n, s in specs.items() if s.role in _COEF_ROLES}
        self.param_specs = {n: s for n, s in specs.items() if s.is_parameter}
        other = {n: s.role for n, s in specs.items()
                 if n not in self.vector_specs and n not in self.coef_specs and n not in self.param_specs}
        if other:
            raise ValueError(f"OnlineSSM: inputs with unsupported roles {other}")
        values = [n for n, s in self.vector_specs.items() if s.role == "value"]
        if not values:
            raise ValueError("OnlineSSM: the rule reads no value input (role 'value'); a layer needs one")
        self.value_name = values[0]
        if project_from == "value" and len(values) > 1:
            raise ValueError(f"OnlineSSM: project_from='value' needs exactly one value input, the rule has {values}")
        for n, s in {**self.vector_specs, **self.coef_specs}.items():
            if s.kind == ELEMENTWISE:
                raise ValueError(f"OnlineSSM: per-token input {n!r} is elementwise (d_v x d_k); only learned "
                                 "parameters may be elementwise")

        # -- vector projections (+ conv)
        def vec_size(s):
            return d_k if s.kind == COLUMN else d_v

        def heads_of(n, s):
            return self.qk_heads if s.role in ("key", "query") else H

        # named, not told apart by width later: the value stream H·d_v can be d_model wide (Mamba, d_v = d_model / H)
        self.reads_value_stream = frozenset(n for n, s in {**self.vector_specs, **self.coef_specs}.items()
                                            if project_from == "value" and s.role != "value")
        src_dim = {n: (H * d_v if n in self.reads_value_stream else d_model)
                   for n in {**self.vector_specs, **self.coef_specs}}
        self.proj = nn.ModuleDict({n: nn.Linear(src_dim[n], heads_of(n, s) * vec_size(s), bias=bias)
                                   for n, s in self.vector_specs.items()})
        # convolved vectors: all q/k/v ("input"), or only the value stream ("value", Mamba)
        conv_names = [n for n, s in self.vector_specs.items() if project_from == "input" or s.role == "value"]
        self.conv = nn.ModuleDict()
        if conv_size > 0:
            for n in conv_names:
                C = self.proj[n].out_features
                self.conv[n] = nn.Conv1d(C, C, conv_size, groups=C, bias=conv_bias)

        # -- coefficient projections
        if coef_rank is None:
            ranks = {}
        elif isinstance(coef_rank, int) and not isinstance(coef_rank, bool):
            ranks = {n: coef_rank for n in self.coef_specs}
        elif isinstance(coef_rank, dict):
            unknown = sorted(set(coef_rank) - set(self.coef_specs))
            if unknown:
                raise ValueError(f"OnlineSSM: coef_rank names {unknown} are not per-token coefficients of this "
                                 f"rule; it has {sorted(self.coef_specs)}")
            ranks = dict(coef_rank)
        else:
            raise ValueError(f"OnlineSSM: coef_rank must be None, an int or a dict, got {coef_rank!r}")
        self.coef_rank = ranks
        self.coef_proj = nn.ModuleDict()
        self.coef_bias = nn.ParameterDict()
        self.decay_A_log = nn.ParameterDict()
        for n, s in self.coef_specs.items():
            out = {SCALAR: H, ROW: H * d_v, COLUMN: H * d_k}[s.kind]
            decay = s.domain in ("decay", "log_decay")
            has_bias = s.domain not in ("timestep",) and not (decay and decay_style == "mamba")
            r = ranks.get(n)
            if r is not None:   # (`if r:` had let a rank of 0 through as full rank)
                _check_pos_int(f"coef_rank[{n!r}]", r)
                second = nn.Linear(r, out, bias=has_bias)
                if s.domain == "timestep":  # Mamba's dt_proj init
                    nn.init.uniform_(second.weight, -r ** -0.5, r ** -0.5)
                mod = nn.Sequential(nn.Linear(src_dim[n], r, bias=False), second)
                last = second
            else:
                mod = last = nn.Linear(src_dim[n], out, bias=has_bias)
            # a decay starts in decay_init = [lo, hi] at x = 0: d = exp(−softplus(bias) / normalizer), or
            # exp(−A_h softplus(dt_bias)) in the mamba style
            start = None if not decay or decay_init is None else decay_init[0] + (
                decay_init[1] - decay_init[0]) * torch.rand(out, dtype=torch.float64)
            if last.bias is not None:
                nn.init.zeros_(last.bias)
                if start is not None:
                    with torch.no_grad():
                        last.bias.copy_(inv_softplus(-torch.log(start) * self.decay_normalizer))
            self.coef_proj[n] = mod
            if decay and decay_style == "mamba":  # Gated DeltaNet: A ~ U(0, 16) per head
                dt_bias = dt_bias_init(out, dt_min, dt_max, dt_init_floor) if start is None else None
                A = torch.empty(H).uniform_(0, 16)
                self.decay_A_log[n] = nn.Parameter(torch.log(A))
                self.decay_A_log[n]._no_weight_decay = True
                if dt_bias is None:
                    dt_bias = inv_softplus(-torch.log(start) / A.double().repeat_interleave(out // H)).float()
                self.coef_bias[n] = nn.Parameter(dt_bias)
                self.coef_bias[n]._no_weight_decay = True
            elif s.domain == "timestep":
                self.coef_bias[n] = nn.Parameter(dt_bias_init(out, dt_min, dt_max, dt_init_floor))
                self.coef_bias[n]._no_weight_decay = True

        # -- learned parameters
        param_init = dict(param_init or {})
        unknown = sorted(set(param_init) - set(self.param_specs))
        if unknown:
            raise ValueError(f"OnlineSSM: param_init names {unknown} are not parameters of this rule; "
                             f"it has {sorted(self.param_specs)}")
        freeze = (freeze,) if isinstance(freeze, str) else tuple(freeze or ())   # "gamma" is one name, not five
        unknown = sorted(set(freeze) - set(self.param_specs))
        if unknown:
            raise ValueError(f"OnlineSSM: freeze names {unknown} are not parameters of this rule; "
                             f"it has {sorted(self.param_specs)}")
        self.params_raw = nn.ParameterDict()
        for n, s in self.param_specs.items():
            shape = {SCALAR: (H,), ROW: (H, d_v), COLUMN: (H, d_k), ELEMENTWISE: (H, d_v, d_k)}[s.kind]
            raw = self._init_param(s, shape, dt_min, dt_max, dt_init_floor, param_init.get(n))
            p = nn.Parameter(raw, requires_grad=n not in freeze)
            p._no_weight_decay = True
            self.params_raw[n] = p

        # -- skip, norm, gate, output
        if d_skip in (True, "channel"):
            self.D = nn.Parameter(torch.ones(H, d_v))
        elif d_skip == "head":
            self.D = nn.Parameter(torch.ones(H))
        else:
            self.D = None
        if self.D is not None:
            self.D._no_weight_decay = True
        self.d_skip = d_skip if d_skip != True else "channel"  # noqa: E712
        self.out_norm = _RMSNormHeads(H, d_v, norm_eps) if out_norm else None
        self.norm_before_gate = bool(norm_before_gate)
        self.gate_proj = nn.Linear(d_model, H * d_v, bias=bias) if gate else None
        self.out_proj = nn.Linear(H * d_v, d_model, bias=bias)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _init_param(spec, shape, dt_min, dt_max, dt_init_floor, value):
        """Raw (unconstrained) tensor for a parameter; `value` (in the domain) overrides the default."""
        dom = spec.domain
        if value is not None:
            v = torch.as_tensor(value, dtype=torch.float32)
            try:
                v = torch.broadcast_to(v, shape).clone()
            except RuntimeError:
                raise ValueError(f"OnlineSSM: param_init[{spec.name!r}] of shape {tuple(v.shape)} does not broadcast "
                                 f"to the parameter's shape {tuple(shape)} ([H, ...] per head)") from None
            # what each parameterisation below reaches: open intervals, so a domain's closed end (a decay of 1, a
            # log decay of 0) is refused too, and the message says so rather than quote the domain alone
            checks = {"negative": ((v < 0).all(), "< 0, as −exp(w)"),
                      "decay": (((v > 0) & (v < 1)).all(), "in (0, 1), as exp(−exp(w))"),
                      "positive": ((v > 0).all(), "> 0, as softplus(w)"),
                      "timestep": ((v > 0).all(), "> 0, as softplus(w)"),
                      "unit": (((v > 0) & (v < 1)).all(), "in (0, 1), as sigmoid(w)"),
                      "log_decay": ((v < 0).all(), "< 0, as −exp(w)")}
            if dom in checks and not bool(checks[dom][0]):
                raise ValueError(f"OnlineSSM: param_init[{spec.name!r}] is outside its domain {dom!r} as the layer "
                                 f"parameterises it: {checks[dom][1]} (the domain: {DOMAINS[dom]})")
            return {"negative": lambda: torch.log(-v), "decay": lambda: torch.log(-torch.log(v)),
                    "positive": lambda: inv_softplus(v), "timestep": lambda: inv_softplus(v),
                    "unit": lambda: torch.logit(v), "real": lambda: v, "log_decay": lambda: torch.log(-v)}[dom]()
        H = shape[0]
        if dom == "negative":
            if spec.kind in (ELEMENTWISE, COLUMN):  # S4D-real: A[..., j] = -(j + 1)
                d_k = shape[-1]
                return torch.log(torch.arange(1, d_k + 1, dtype=torch.float32)).expand(shape).clone()
            return torch.log(torch.empty(shape).uniform_(1, 16))  # Mamba-2: A ~ U(1, 16)
        if dom in ("decay", "log_decay"):  # RetNet: γ_h = 1 - 2^(-5-h) (log_decay: log γ_h, the same raw w)
            gamma = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))
            w = torch.log(-torch.log(gamma)).float()
            return w.reshape(H, *([1] * (len(shape) - 1))).expand(shape).clone()
        if dom == "positive":
            return inv_softplus(torch.ones(shape))
        if dom == "timestep":
            return dt_bias_init(int(torch.Size(shape).numel()), dt_min, dt_max, dt_init_floor).reshape(shape)
        if dom == "unit":
            return torch.zeros(shape)
        return torch.ones(shape)

    @staticmethod
    def _to_domain(dom, raw):
        if dom == "negative":
            return -torch.exp(raw)
        if dom == "decay":
            return torch.exp(-torch.exp(raw))
        if dom == "log_decay":   # log γ of the decay above (read as 'real' it had started at +1: a growing state)
            return -torch.exp(raw)
        if dom in ("positive", "timestep"):
            return F.softplus(raw)
        if dom == "unit":
            return torch.sigmoid(raw)
        return raw

    def parameter_values(self, dtype=torch.float32) -> dict:
        """The learned rule parameters in their domains, per head ([H], [H, d_v], [H, d_k], [H, d_v, d_k])."""
        return {n: self._to_domain(s.domain, self.params_raw[n].to(dtype)) for n, s in self.param_specs.items()}

    def _coef(self, n, s, src):
        x = self.coef_proj[n](src)
        x = x.to(_compute_dtype(x))
        dom = s.domain
        if dom == "timestep":
            y = F.softplus(x + self.coef_bias[n].to(x.dtype))
        elif dom in ("decay", "log_decay"):   # the log decay; the decay itself only for a rule that reads it raw
            if self.decay_style == "mamba":
                rate = F.softplus(x + self.coef_bias[n].to(x.dtype))
                A = torch.exp(self.decay_A_log[n].to(x.dtype))
                if s.kind != SCALAR:
                    y = (-A[:, None] * rate.unflatten(-1, (self.n_heads, -1))).flatten(-2)
                else:
                    y = -A * rate
            else:
                y = -F.softplus(x) / self.decay_normalizer
            y = torch.exp(y) if dom == "decay" else y
        elif dom == "unit":
            y = torch.sigmoid(x)
        elif dom == "positive":
            y = F.softplus(x)
        elif dom == "negative":
            y = -F.softplus(x)
        else:
            y = x
        if s.kind == SCALAR:
            return y
        return y.unflatten(-1, (self.n_heads, -1))

    def _feature(self, x):
        fm = self.feature_map
        if fm == "elu1":
            return F.elu(x) + 1
        if fm == "relu":
            return F.relu(x)
        if fm == "silu":
            return F.silu(x)
        return x

    def _conv(self, n, u, prev, cu_seqlens=None):
        """Causal depthwise conv + SiLU of u [B, T, C], continuing from prev [B, C, K-1] (or zeros).
        With cu_seqlens (B = 1, sequences packed along T) every sequence starts from zeros, so no
        token sees its neighbour's; the cache is then the tail of each sequence [N, C, K-1]."""
        if cu_seqlens is not None:
            bounds = cu_seqlens.tolist()
            parts = [self._conv(n, u[:, a:b], None) for a, b in zip(bounds, bounds[1:])]
            return torch.cat([y for y, _ in parts], 1), torch.cat([tail for _, tail in parts], 0)
        conv = self.conv[n]
        K = self.conv_size
        ut = u.transpose(1, 2)
        if prev is None:
            prev = ut.new_zeros(ut.shape[0], ut.shape[1], K - 1)
        full = torch.cat([prev.to(ut.dtype), ut], dim=-1)
        if ut.shape[-1] == 0:   # no tokens (an empty packed sequence): conv1d refuses an input shorter than K
            return u, full
        y = F.conv1d(full, conv.weight, conv.bias, groups=conv.groups)
        return F.silu(y).transpose(1, 2), full[..., full.shape[-1] - (K - 1):]

    def _features(self, x, conv_cache, cu_seqlens=None):
        """Scan inputs [B, T, H, ...] (keys / queries [B, T, qk_heads, d_k]), parameters [H, ...], the new
        conv cache."""
        new_conv = {}
        streams = {}
        vec_items = list(self.vector_specs.items())
        # the value stream first (Mamba: everything else reads it)
        vec_items.sort(key=lambda it: it[1].role != "value")
        for n, s in vec_items:
            src = streams[self.value_name] if n in self.reads_value_stream else x
            u = self.proj[n](src)
            if n in self.conv:
                u, new_conv[n] = self._conv(n, u, None if conv_cache is None else conv_cache.get(n), cu_seqlens)
            streams[n] = u
        inputs = {}
        for n, s in self.vector_specs.items():
            u = streams[n]
            h = u.shape[-1] // (self.d_k if s.kind == COLUMN else self.d_v)
            u = u.unflatten(-1, (h, -1))
            if s.role in ("key", "query"):
                u = self._feature(u)
                if (s.role == "key" and self.key_norm) or (s.role == "query" and self.query_norm):
                    u = F.normalize(u.to(_compute_dtype(u)), dim=-1).to(u.dtype)
                if s.role == "query" and self.q_scale != 1.0:
                    u = u * self.q_scale
            inputs[n] = u
        for n, s in self.coef_specs.items():
            src = streams[self.value_name] if n in self.reads_value_stream else x
            inputs[n] = self._coef(n, s, src)
        params = self.parameter_values(_compute_dtype(x))
        return inputs, params, new_conv

    def scan_inputs(self, x: torch.Tensor) -> tuple[dict, dict]:
        """(per-token inputs [B, T, H, ...], parameters [H, ...]) that forward passes to the scan (keys and
        queries with qk_heads heads)."""
        self._check_x(x, "scan_inputs", 3)
        inputs, params, _ = self._features(x, None)
        return inputs, params

    def _post(self, o, x, v):
        """D skip, per-head RMSNorm, output gate, output projection. o, v: [B, T, H, d_v]."""
        o = o.to(v.dtype)
        if self.D is not None:
            D = self.D if self.D.dim() == 2 else self.D[:, None]
            o = o + (D.to(_compute_dtype(v)) * v.to(_compute_dtype(v))).to(o.dtype)
        g = None if self.gate_proj is None else F.silu(self.gate_proj(x)).unflatten(-1, (self.n_heads, -1))
        if g is not None and not self.norm_before_gate:
            o = o * g
        if self.out_norm is not None:
            o = self.out_norm(o)
        if g is not None and self.norm_before_gate:
            o = o * g
        return self.out_proj(o.flatten(-2))

    def _resolve_backend(self, device):
        if self.backend != "auto":
            return self.backend, False
        want = auto_backend(self.rule, device)      # what scan(backend="auto") runs (exact rules: chunk)
        avail = available_backends()
        if want in avail:
            return want, True
        if "chunk" in avail:
            return "chunk", True
        self._fallback_warning(f"backend {want!r} is not available")
        return "recurrent", True

    def _fallback_warning(self, why):
        if not self._warned_fallback:
            warnings.warn(f"OnlineSSM(backend='auto'): {why}; using the 'recurrent' token loop", RuntimeWarning,
                          stacklevel=3)
            self._warned_fallback = True

    def _check_x(self, x, what, ndim):
        if not torch.is_tensor(x) or x.dim() != ndim or x.shape[-1] != self.d_model:
            want = "[B, T, d_model]" if ndim == 3 else "[B, d_model]"
            raise ValueError(f"OnlineSSM.{what}: x must be {want} with d_model={self.d_model}, got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        weight = next(iter(self.proj.values())).weight
        if not x.is_floating_point():
            raise ValueError(f"OnlineSSM.{what}: x must be a floating-point tensor, got {x.dtype}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"OnlineSSM.{what}: x is {x.dtype} and the layer's weights {weight.dtype}; cast one to "
                             "the other (layer.to(dtype) / x.to(dtype)) or run under torch.autocast")

    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cache: dict | None = None, return_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None):
        """y [B, T, d_model]; with a cache, continue from it; with return_cache, also return the new cache.

        cu_seqlens [N+1] (cumulative lengths, x of batch 1 packed along T): N independent sequences,
        the short conv and the state restart at every boundary; a returned cache holds one state and
        one conv tail per sequence."""
        self._check_x(x, "forward", 3)
        if cu_seqlens is not None:
            self._check_cu_seqlens(x, cu_seqlens, cache)
        if cache is not None:
            self._check_cache(cache, x.shape[0], "forward")
        from ..kernels import scan
        inputs, params, new_conv = self._features(x, None if cache is None else cache.get("conv"), cu_seqlens)
        init = None if cache is None else cache["state"]
        backend, auto = self._resolve_backend(x.device)
        kw = dict(initial_state=init, output_final_state=return_cache, chunk_size=self.chunk_size,
                  cu_seqlens=cu_seqlens)
        try:
            if backend == "recurrent":
                o, final = self._recurrent_scan(inputs, params, init, cu_seqlens)
            else:
                o, final = scan(self.rule, backend=backend, **kw, **inputs, **params)
        except NotImplementedError as e:
            if not auto or backend == "recurrent":
                raise
            self._fallback_warning(f"backend {backend!r} does not support this rule ({e})")
            o, final = self._recurrent_scan(inputs, params, init, cu_seqlens)
        y = self._post(o, x, inputs[self.value_name])
        if not return_cache:
            return y
        return y, {"state": final, "conv": new_conv}

    def _check_cache(self, cache, batch: int, where: str):
        """A cache from init_cache or a previous call, for this layer and this batch: a wrong one is named here
        (step had failed inside torch.cat, or blamed the key input for a state of the wrong d_k)."""
        name = f"OnlineSSM.{where}"
        if not isinstance(cache, dict) or "state" not in cache:
            raise ValueError(f"{name}: cache must be a dict with 'state' and 'conv' (init_cache or a previous "
                             f"call's), got {type(cache).__name__}")
        want = [(batch, self.n_heads, self.d_v, self.d_k)] + ([(batch, self.n_heads, self.d_k, self.d_k)]
                                                              if self.rule.is_exact else [])
        state = cache["state"]
        got = list(state) if self.rule.is_exact and isinstance(state, (tuple, list)) else [state]
        if len(got) != len(want) or any(not torch.is_tensor(t) or tuple(t.shape) != w for t, w in zip(got, want)):
            shapes = [tuple(t.shape) if torch.is_tensor(t) else type(t).__name__ for t in got]
            raise ValueError(f"{name}: cache['state'] must be {' and '.join(map(str, want))} (batch, heads, d_v, "
                             f"d_k{'; then P or H: d_k, d_k' if self.rule.is_exact else ''}) for this layer and a "
                             f"batch of {batch}, got {shapes if len(shapes) > 1 else shapes[0]}")
        conv = cache.get("conv")
        if self.conv and not isinstance(conv, dict):
            raise ValueError(f"{name}: cache['conv'] must be a dict of this layer's short-conv tails "
                             f"{sorted(self.conv)} (init_cache or a previous call's), got {type(conv).__name__}")
        # a missing tail would restart the conv at the cache's boundary: outputs off by O(1), no error
        missing = sorted(set(self.conv) - set(conv or {}))
        if missing:
            raise ValueError(f"{name}: cache['conv'] lacks the short-conv tail(s) {missing} of this layer "
                             f"(conv_size={self.conv_size}): the last conv_size - 1 inputs of each conv before the "
                             "cache's boundary, which init_cache and every call with return_cache carry; a cache "
                             "built by hand from a scan's final state needs them too (zeros only at a sequence's "
                             "start)")
        for n, c in self.conv.items():
            t = conv[n]
            want_c = (batch, c.in_channels, self.conv_size - 1)
            if not torch.is_tensor(t) or tuple(t.shape) != want_c:
                raise ValueError(f"{name}: cache['conv'][{n!r}] must be {want_c} (batch, channels, conv_size - 1), "
                                 f"got {tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")

    def _check_cu_seqlens(self, x, cu_seqlens, cache):
        if x.shape[0] != 1:
            raise ValueError(f"OnlineSSM.forward: with cu_seqlens the sequences are packed along T and the batch "
                             f"must be 1, got x of shape {tuple(x.shape)}")
        if (not torch.is_tensor(cu_seqlens) or cu_seqlens.dim() != 1 or len(cu_seqlens) < 2
                or cu_seqlens.dtype not in (torch.int32, torch.int64)):
            raise ValueError("OnlineSSM.forward: cu_seqlens must be a 1-D int32/int64 tensor [N+1] of cumulative lengths")
        c = cu_seqlens.tolist()
        if c[0] != 0 or c[-1] != x.shape[1] or any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"OnlineSSM.forward: cu_seqlens must start at 0, end at T={x.shape[1]} and not "
                             f"decrease; got {c}")
        if cache is not None:
            raise ValueError("OnlineSSM.forward: cu_seqlens starts every sequence fresh; continuing from a cache "
                             "is not supported with packed sequences")

    def _recurrent_scan(self, inputs, params, state, cu_seqlens=None):
        """The token loop over rule.decode, vectorised over the batch: o [B, T, H, d_v], final state."""
        if cu_seqlens is not None:  # packed sequences: one loop each, states stacked per sequence
            b = cu_seqlens.tolist()
            runs = [self._recurrent_scan({n: x[:, s:e] for n, x in inputs.items()}, params, None)
                    for s, e in zip(b, b[1:])]
            o = torch.cat([r[0] for r in runs], 1)
            if self.rule.is_exact:
                return o, tuple(torch.cat([r[1][i] for r in runs]) for i in range(2))
            return o, torch.cat([r[1] for r in runs])
        inputs = self._per_head(inputs)
        v = inputs[self.value_name]
        B, T = v.shape[:2]
        if state is None:
            state = self._first_state(v, params, {n: x[:, 0] for n, x in inputs.items()} if T else {})
        outs = []
        steps = {n: x.unbind(1) for n, x in inputs.items()}   # x[:, t] per token: a quadratic backward
        for t in range(T):
            o, state = self.rule.decode(state, **{n: xs[t] for n, xs in steps.items()}, **params)
            outs.append(o)
        if not outs:
            return v.new_zeros(B, 0, self.n_heads, self.d_v), state
        return torch.stack(outs, 1).to(v.dtype), state

    def _first_state(self, v, params, first: dict):
        """The state before a sequence's first token, on v's device (fp64 for fp64 values, else fp32): the rule's
        zero state, which for an RLS rule is P = I/λ with λ from the parameters or the first token's inputs
        (first: {name: [B, H, ...]}, the token's per-head inputs)."""
        return self.rule.zero_state((v.shape[0], self.n_heads), self.d_k, self.d_v, device=v.device,
                                    dtype=torch.float64 if v.dtype == torch.float64 else torch.float32,
                                    **params, **first)

    def _per_head(self, inputs: dict) -> dict:
        """Grouped keys / queries repeated per head, for the token loops over rule.decode (the scan takes them
        grouped)."""
        return {n: (expand_heads(x, self.n_heads) if n in self.vector_specs and self.vector_specs[n].role in
                    ("key", "query") else x) for n, x in inputs.items()}

    def init_cache(self, batch_size: int, device=None, dtype=None) -> dict:
        """Zero decoding cache: {"state": fp32 state [B, H, d_v, d_k] (exact rules: (G, H)),
        "conv": {name: [B, C, conv_size - 1]}}."""
        _check_pos_int("batch_size", batch_size)
        per_token = self._per_token_initial_inputs()
        if per_token:
            raise ValueError(f"OnlineSSM.init_cache: this rule's initial state reads the per-token input(s) {per_token} "
                             "(RLS: P_0 = I/λ with the first token's λ), which no token has given yet; start with "
                             "step(x_t, None) or prefill with forward(x, return_cache=True)")
        p = self.out_proj.weight
        device = p.device if device is None else device
        sdt = torch.float64 if p.dtype == torch.float64 else torch.float32
        # RLS rules start from P = I/λ, so the ridge parameter is passed along
        st = self.rule.zero_state((batch_size, self.n_heads), self.d_k, self.d_v, device=device, dtype=sdt,
                                  **{n: x.to(device, sdt) for n, x in self.parameter_values(sdt).items()})
        conv = {n: torch.zeros(batch_size, c.in_channels, self.conv_size - 1, device=device,
                               dtype=dtype or p.dtype) for n, c in self.conv.items()}
        return {"state": st, "conv": conv}

    def _per_token_initial_inputs(self) -> list:
        """Per-token inputs the zero state reads (an RLS ridge declared per token), sorted."""
        if not self.rule.is_rls:
            return []
        return sorted(s.name for s in self.rule.form.ridge.free_symbols if s.name not in self.param_specs)

    def step(self, x_t: torch.Tensor, cache: dict | None):
        """One token: x_t [B, d_model] -> (y_t [B, d_model], new cache); equal to forward on the sequence.
        cache None: the first token (zero conv tails, the rule's zero state from this token's inputs)."""
        self._check_x(x_t, "step", 2)
        if cache is not None:
            self._check_cache(cache, x_t.shape[0], "step")
        x = x_t[:, None]
        inputs, params, new_conv = self._features(x, None if cache is None else cache.get("conv"))
        tok = {n: t[:, 0] for n, t in self._per_head(inputs).items()}
        if cache is None:
            # as the forward's token loop starts: an RLS ridge given per token is the first token's (init_cache,
            # which has no token, could not decode such a rule)
            state = self._first_state(inputs[self.value_name], params, tok)
        else:
            state = cache["state"]
        o, state = self.rule.decode(state, **tok, **params)
        y = self._post(o[:, None], x, inputs[self.value_name])
        return y[:, 0], {"state": state, "conv": new_conv}

    def extra_repr(self):
        return (f"rule={self.rule.objective.name or self.rule.structure!r}, d_model={self.d_model}, "
                f"n_heads={self.n_heads}, d_k={self.d_k}, d_v={self.d_v}, conv_size={self.conv_size}, "
                f"backend={self.backend!r}")
