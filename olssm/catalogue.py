"""Published models as online-learning objectives, each beside its published recurrence.

Every entry is *derived* (olssm.derive), never looked up: the published recurrence is only the
independent oracle that the derived rule is checked against (`check`, `python -m olssm table`).
Layout of the published steps: state [B, H, d_v, d_k], keys/queries [B, H, d_k], values and row
coefficients [B, H, d_v], scalars [B, H], parameters per head ([H], [H, d_v, d_k]).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import sympy as sp
import torch

from . import objectives as O
from .derive import Rule, derive


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    title: str
    source: str
    build: Callable[[], O.Objective]
    published: Callable          # step(S, **inputs) -> S, the recurrence as written in the paper
    published_text: str

    @functools.cached_property
    def objective(self) -> O.Objective:
        return self.build()

    @property
    def rule(self) -> Rule:
        return derive(self.objective)


def _vkT(v, k):
    return v.unsqueeze(-1) * k.unsqueeze(-2)


def _proj(S, k):
    return (S * k.unsqueeze(-2)).sum(-1)  # S k, [B, H, d_v]


def _s(x):
    return x[..., None, None]


def _linear_attention():
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    return O.Objective(O.sqnorm(S - Sp) / 2 - O.inner(S @ k, v), name="linear attention")


def _retnet():
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    gamma = O.parameter("gamma", "scalar", domain="decay")
    return O.Objective(O.sqnorm(S - gamma * Sp) / 2 - O.inner(S @ k, v), name="RetNet")


def _gla():
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    g = O.column("g", domain="decay")
    return O.Objective(O.sqnorm(S - Sp @ O.diag(g)) / 2 - O.inner(S @ k, v), name="GLA")


def _mamba():
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")          # k = B_t, q = C_t, v = x_t
    dt = O.row("dt", domain="timestep")
    A = O.parameter("A", "matrix", domain="negative")
    return O.Objective(O.sqnorm(S - sp.exp(dt * A) * Sp) / 2 - O.inner(S, dt * v * k), name="Mamba")


def _mamba2():
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    dt = O.scalar("dt", domain="timestep")
    A = O.parameter("A", "scalar", domain="negative")
    return O.Objective(O.sqnorm(S - sp.exp(dt * A) * Sp) / 2 - O.inner(S @ k, dt * v), name="Mamba-2")


def _deltanet():
    S, _ = O.states()
    k, v = O.key("k"), O.value("v")
    beta = O.scalar("beta", domain="unit")
    return O.Objective(O.sqnorm(S @ k - v, weight=beta) / 2, update="explicit", name="DeltaNet")


def _gated_deltanet():
    S, _ = O.states()
    k, v = O.key("k"), O.value("v")
    beta = O.scalar("beta", domain="unit")
    alpha = O.scalar("alpha", domain="decay")
    return O.Objective(O.sqnorm(S @ k - v, weight=beta) / 2, update="explicit", decay=alpha,
                       name="Gated DeltaNet")


def _longhorn():
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    beta = O.row("beta", domain="unit")
    return O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=beta) / 2, name="Longhorn")


def _longhorn_diag():
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    beta = O.row("beta", domain="unit")
    eps = beta / (1 + beta * O.dot(k, k))
    return O.Objective(O.sqnorm(S - sp.exp(-eps * k**2) * Sp) / 2 - O.inner(S, eps * v * k),
                       name="Longhorn (diagonal, as run)")


def _decayed_least_squares():
    S, _ = O.states()
    k, v = O.key("k"), O.value("v")
    beta = O.scalar("beta", domain="unit")
    gamma = O.scalar("gamma", domain="decay")
    lam = O.parameter("lam", "scalar", domain="positive")
    return O.Objective(O.sqnorm(S @ k - v, weight=beta) / 2, update="exact", decay=gamma, ridge=lam,
                       name="decayed least squares")


def _rls():
    S, _ = O.states()
    k, v = O.key("k"), O.value("v")
    gamma = O.scalar("gamma", domain="decay")
    lam = O.parameter("lam", "scalar", domain="positive")
    return O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", decay=gamma, ridge=lam, ridge_decays=True,
                       name="recursive least squares")


def _haykin_rls(state, k, v, gamma, **_):
    """Exponentially weighted RLS as in Haykin, Adaptive Filter Theory, §10: gain first, then P."""
    S, P = state
    Pk = (P * k.unsqueeze(-2)).sum(-1)                                  # P_{t-1} k
    gain = Pk / (gamma.unsqueeze(-1) + (k * Pk).sum(-1, keepdim=True))  # P_{t-1} k / (γ + kᵀ P_{t-1} k)
    err = v - _proj(S, k)                                               # a priori error
    P = (P - gain.unsqueeze(-1) * Pk.unsqueeze(-2)) / _s(gamma)
    return S + err.unsqueeze(-1) * gain.unsqueeze(-2), P


def _eps(beta, k):
    return beta / (1 + beta * (k * k).sum(-1, keepdim=True))


ENTRIES: dict[str, Entry] = {e.name: e for e in [
    Entry("linear_attention", "Linear attention", "Katharopoulos et al. 2020", _linear_attention,
          lambda S, k, v, **_: S + _vkT(v, k), "S_t = S_{t-1} + v kᵀ"),
    Entry("retnet", "RetNet", "Sun et al. 2023", _retnet,
          lambda S, k, v, gamma, **_: gamma[:, None, None] * S + _vkT(v, k), "S_t = γ S_{t-1} + v kᵀ"),
    Entry("gla", "GLA", "Yang et al. 2024", _gla,
          lambda S, k, v, g, **_: S * g.unsqueeze(-2) + _vkT(v, k), "S_t = S_{t-1} diag(α_t) + v kᵀ"),
    Entry("mamba", "Mamba (S6)", "Gu & Dao 2023", _mamba,
          lambda S, k, v, dt, A, **_: torch.exp(dt.unsqueeze(-1) * A) * S + _vkT(dt * v, k),
          "h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) B_tᵀ"),
    Entry("mamba2", "Mamba-2 (SSD)", "Dao & Gu 2024", _mamba2,
          lambda S, k, v, dt, A, **_: _s(torch.exp(dt * A)) * S + _vkT(_s(dt)[..., 0] * v, k),
          "h_t = exp(Δ_t a) h_{t-1} + Δ_t x_t B_tᵀ"),
    Entry("deltanet", "DeltaNet", "Schlag et al. 2021; Yang et al. 2024", _deltanet,
          lambda S, k, v, beta, **_: S - _s(beta) * _vkT(_proj(S, k) - v, k),
          "S_t = S_{t-1}(I − β k kᵀ) + β v kᵀ"),
    Entry("gated_deltanet", "Gated DeltaNet", "Yang, Kautz & Hatamizadeh 2025", _gated_deltanet,
          lambda S, k, v, beta, alpha, **_: _s(alpha) * S - _s(beta) * _vkT(_proj(_s(alpha) * S, k) - v, k),
          "S_t = α_t S_{t-1}(I − β_t k kᵀ) + β_t v kᵀ"),
    Entry("longhorn", "Longhorn", "Liu et al. 2024", _longhorn,
          lambda S, k, v, beta, **_: S - _vkT(_eps(beta, k) * (_proj(S, k) - v), k),
          "S_t = S_{t-1} − (ε ⊙ (S_{t-1} k − x)) kᵀ,  ε = β / (1 + β kᵀk) (row-wise)"),
    Entry("longhorn_diag", "Longhorn (diagonal)", "Liu et al. 2024, released kernel", _longhorn_diag,
          lambda S, k, v, beta, **_: torch.exp(-_eps(beta, k).unsqueeze(-1) * (k * k).unsqueeze(-2)) * S
          + _vkT(_eps(beta, k) * v, k),
          "S_t = exp(−ε ⊗ k²) ⊙ S_{t-1} + (ε ⊙ x) kᵀ"),
    Entry("decayed_least_squares", "Decayed least squares", "MesaNet (von Oswald et al. 2025)",
          _decayed_least_squares, None,
          "H_t = γ H_{t-1} + β k kᵀ,  G_t = γ G_{t-1} + β v kᵀ,  o_t = G_t (H_t + λ I)⁻¹ q_t"),
    Entry("rls", "Recursive least squares", "Haykin, Adaptive Filter Theory (exponentially weighted RLS)",
          _rls, _haykin_rls, "g = P k/(γ + kᵀP k),  S_t = S_{t-1} + (v − S_{t-1}k) gᵀ,  P_t = (P − g kᵀP)/γ"),
]}


def _mesa_step(state, k, v, beta, gamma, **_):
    G, H = state
    g = _s(gamma)
    return (g * G + _s(beta) * _vkT(v, k), g * H + _s(beta) * k.unsqueeze(-1) * k.unsqueeze(-2))


object.__setattr__(ENTRIES["decayed_least_squares"], "published", _mesa_step)


def get(name: str) -> Entry:
    try:
        return ENTRIES[name]
    except KeyError:
        raise KeyError(f"no catalogue entry {name!r}; known: {sorted(ENTRIES)}") from None


def _two_keys():
    S, _ = O.states()
    loss = sum(O.sqnorm(S @ O.key(f"k{i}") - O.value(f"v{i}"), weight=O.scalar(f"b{i}", domain="unit")) / 2
               for i in range(2))
    return O.Objective(loss, update="explicit", decay=O.scalar("alpha", domain="decay"), name="two-key gated delta")


def _longhorn_forget():
    S, Sp = O.states()
    return O.Objective(O.sqnorm(S - O.diag(O.row("r", domain="decay")) @ Sp) / 2
                       + O.sqnorm(S @ O.key("k") - O.value("v"), weight=O.row("beta", domain="unit")) / 2,
                       name="Longhorn with a per-channel forget gate")


#: objectives no paper names, derived here to exercise (and benchmark) the generic path: their rules have
#: structures no catalogue entry has (two_keys: one gradient step on two gated regressions, rank-2 corrections;
#: longhorn_forget: Longhorn's implicit update from a forgotten copy diag(r) S_{t−1}, a row decay with a row c)
DERIVED = {"two_keys": _two_keys, "longhorn_forget": _longhorn_forget}


@functools.lru_cache(maxsize=None)
def rule(name: str) -> Rule:
    """The rule of a catalogue entry or of a DERIVED objective, by name."""
    if name in ENTRIES:
        return ENTRIES[name].rule
    if name in DERIVED:
        return derive(DERIVED[name]())
    raise KeyError(f"no catalogue entry or derived example {name!r}; known: {sorted(ENTRIES) + sorted(DERIVED)}")


def random_inputs(rule: Rule, B: int, T: int, H: int, d_k: int, d_v: int, seed: int = 0,
                  dtype=torch.float32, device=None) -> dict:
    """Random scan inputs in the ranges a trained layer produces (keys L2-normalised)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, s in rule.inputs.items():
        size = {"scalar": (), "row": (d_v,), "column": (d_k,), "elementwise": (d_v, d_k)}[s.kind]
        shape = (H, *size) if s.is_parameter else (B, T, H, *size)
        if s.role in ("key", "query"):
            x = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
        elif s.role == "value":
            x = torch.randn(shape, generator=g)
        elif s.domain == "negative":
            x = -torch.exp(torch.rand(shape, generator=g) * 2 - 1)
        elif s.domain in ("decay", "log_decay"):
            x = 0.8 + 0.2 * torch.rand(shape, generator=g)
            x = torch.log(x) if s.domain == "log_decay" else x
        elif s.domain == "timestep":
            x = torch.exp(torch.rand(shape, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                          + torch.log(torch.tensor(1e-3))) * 10
        elif s.domain in ("unit", "positive"):
            x = 0.1 + 0.8 * torch.rand(shape, generator=g)
        else:
            x = torch.randn(shape, generator=g)
        out[n] = x.to(dtype=dtype, device=device)
    return out


def check_published(entry: Entry, T: int = 16, B: int = 2, H: int = 2, d_k: int = 5, d_v: int = 3,
                    seed: int = 0) -> float:
    """Max relative error between the derived rule's reference scan and the published recurrence."""
    rule = entry.rule
    inp = random_inputs(rule, B, T, H, d_k, d_v, seed, dtype=torch.float64)
    o, final = rule.scan(backend="reference", output_final_state=True, **inp)
    qn = rule.query_name
    tokens = {n: x for n, x in inp.items() if not rule.inputs[n].is_parameter}
    params = {n: x for n, x in inp.items() if rule.inputs[n].is_parameter}
    if rule.is_exact:
        state = rule.zero_state((B, H), d_k, d_v, dtype=torch.float64, **params)
    else:
        state = torch.zeros(B, H, d_v, d_k, dtype=torch.float64)
    err = 0.0
    for t in range(T):
        step_in = {n: x[:, t] for n, x in tokens.items()}
        state = entry.published(state, **step_in, **params)
        q = step_in[qn]
        if rule.is_rls:
            o_pub = _proj(state[0], q)
        elif rule.is_exact:
            G, Hm = state
            lam = params["lam"][:, None, None] * torch.eye(d_k, dtype=torch.float64)
            o_pub = (G * torch.linalg.solve(Hm + lam, q.unsqueeze(-1)).squeeze(-1).unsqueeze(-2)).sum(-1)
        else:
            o_pub = _proj(state, q)
        err = max(err, float((o[:, t] - o_pub).norm() / o_pub.norm().clamp_min(1e-12)))
    fin = final[0] if rule.is_exact else final
    pub = state[0] if rule.is_exact else state
    return max(err, float((fin - pub).norm() / pub.norm().clamp_min(1e-12)))


__all__ = ["Entry", "ENTRIES", "get", "random_inputs", "check_published"]
