"""The chunk backend: chunk-parallel pure torch (the fast path on a CPU). Math: CHUNK.md.

Three engines, picked from the *evaluated* shapes of the normal-form coefficients:

- ``_linear_engine``: diagonal decay that is none / scalar / row / column (a d_k vector shared by
  the value rows) plus any number of low-rank corrections with scalar or row coefficients, and
  input terms e wᵀ with e a row (or scalar) coefficient. Intra-chunk: decay-weighted Gram
  matrices from cumulative log-decays (pairwise, so nothing overflows) and a unit lower-triangular
  solve (the WY / UT transform); inter-chunk: one sequential pass over chunk states.
- ``_loop_engine``: no corrections and an elementwise decay (Mamba, Longhorn-diagonal) or an
  elementwise input coefficient: a C-step loop run for all chunks at once, then a pass over chunks.
- ``_exact_engine``: exact (sufficient-statistics) rules with none/scalar forgetting: H_t for every
  token by chunked decayed prefix sums, a batched solve per token, then G by the linear engine
  with x_t = (H_t + diag λ)⁻¹ q_t as its query.

On a CPU, elementwise decays, per-row corrections and the structures no engine chunks (an
elementwise decay together with corrections, ...) run ``recurrent.recurrent_scan`` instead: the token
loop with a hand-written adjoint (CHUNK.md §5); the unchunkable ones say so with a
``ChunkFallbackWarning`` (elsewhere they run the reference loop).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import sympy as sp
import torch

from ..derive.rule import ExactForm, NormalForm, closed_form_log, decay_may_be_negative, evaluator, untraced
from ..objectives.core import spec_of
from .recurrent import Plan, exact_x_loop, recurrent_scan, view_key

# log of a decay is clamped here so that an exact 0 decay (a reset) stays finite; exp of the
# clamped cumulative sums underflows to 0 as it should (see CHUNK.md, "zero decays").
_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)
#: tokens per chunk where the caller gives no chunk_size (scan's chunk_size=None)
CHUNK_SIZE = 64
# exact rules: tokens per chunk of H's decayed prefix sums (CHUNK.md §4)
EXACT_H_CHUNK = 16
# column decays: factorised intra-chunk form (exp(L_t) q, exp(-L_s) k) when a chunk's total log
# decay stays above -_FACTOR_RANGE in every column, else the pairwise [C, C, d_k] form.
_FACTOR_RANGE = 30.0
# corrections with per-row coefficients (Longhorn) or row decays: chunk size capped here (CHUNK.md §2)
_ROW_CHUNK = 8
#: on a CPU, corrections with per-row transitions (Longhorn's row c, a row decay) run "recurrent" (the token loop,
#: §5) or "chunk" (the linear engine's per-row mode, what other devices run)
CPU_ROW_ENGINE = "recurrent"


# tokens per checkpoint / coefficient block of the CPU recurrent engine: 16 keeps a block of Mamba's
# exp(Δ A) ([16, B, H, d_v, d_k]: 2 MB at B·H = 8, d = 64) near L2; measured 0.39 s fwd+bwd at T = 2048
# against 0.46 s with 64 (Longhorn unchanged)
RECURRENT_BLOCK = 16


class ChunkFallbackWarning(UserWarning):
    """The chunk backend cannot chunk this rule's structure: it runs a token loop instead (the recurrent
    engine on a CPU, the reference loop elsewhere)."""


# --------------------------------------------------------------------------------------------
# coefficient evaluation: every normal-form entry for all tokens at once

def _evaluator_for(form):
    return evaluator(_exprs(form))


def _log_evaluator_for(form):
    ex = _log_decay_expr(form.decay)
    return evaluator(ex) if ex else None


@dataclasses.dataclass(frozen=True)
class _FormFacts:
    """What chunk_scan reads from a form's sympy expressions, as plain Python values and compiled evaluators."""
    evaluate: object                 # inputs (broadcast layout) -> {entry: tensor}
    log_evaluate: object             # -> {"logdecay": log Λ} where log Λ has a closed form, else None
    none_decay: bool                 # Λ = 1
    raw_decay_inputs: tuple          # the inputs of a decay without a closed-form log (read raw), else ()
    may_be_negative: bool            # Λ not known to be ≥ 0 (decay_may_be_negative)
    gram_diag: bool                  # an exact rule's Gram has a diagonal term


@untraced   # sympy work (derive.rule.untraced); the evaluators it returns are traced
def _form_facts(form) -> _FormFacts:
    decay = sp.sympify(form.decay)
    none_decay, log_evaluate = bool(decay == 1), _log_evaluator_for(form)
    raw = not none_decay and log_evaluate is None   # no closed-form log (a constant decay has no inputs either way)
    return _FormFacts(_evaluator_for(form), log_evaluate, none_decay,
                      tuple(s.name for s in decay.free_symbols) if raw else (), bool(decay_may_be_negative(decay)),
                      isinstance(form, ExactForm) and bool(sp.sympify(form.gram_diag) != 0))


def _full(x, B, T, H, dtype, device):
    """An evaluated coefficient as [B, T, H, X, Y] (X in {1, d_v}, Y in {1, d_k})."""
    x = torch.as_tensor(x, dtype=dtype, device=device)
    if x.dim() < 2:
        x = x.reshape(*([1] * (2 - x.dim())), *x.shape)
    return torch.broadcast_to(x.to(dtype), (B, T, H, x.shape[-2], x.shape[-1]))


def _log_decay(d):
    return torch.log(d.clamp_min(torch.finfo(d.dtype).tiny)).clamp_min(_LOG_FLOOR)


# --------------------------------------------------------------------------------------------
# layout helpers

def _pad_T(x, Tp, value=0.0):
    T = x.shape[1]
    if T == Tp:
        return x
    pad = x.new_full((x.shape[0], Tp - T, *x.shape[2:]), value)
    return torch.cat([x, pad], 1)


def _chunks(x, C):
    """[B, Tp, H, ...] -> [B, H, n, C, ...]."""
    B, Tp, H = x.shape[:3]
    x = x.reshape(B, Tp // C, C, H, *x.shape[3:])
    return x.movedim(3, 1)


def _tril(C, strict, device):
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _pair(z, y, L, strict, factor):
    """Decay-weighted inner products K[t p, s q] = Σ_j z[t,p,j] y[s,q,j] exp(L[t,j] - L[s,j]), s ≤ t.

    z [b, C, P, K], y [b, C, Q, K], L None or [b, C, G, KL] (cumulative log decay, fp64).
    Returns [b, G, C*P, C*Q] (G = 1 without decay).
    """
    C, P, Q = z.shape[-3], z.shape[-2], y.shape[-2]
    mask = _tril(C, strict, z.device)
    if L is None or L.shape[-1] == 1:
        dot = torch.einsum("...tpk,...sqk->...tpsq", z, y)          # [b, C, P, C, Q]
        if L is None:
            out = (dot * mask[:, None, :, None].to(dot.dtype)).unsqueeze(-5)
        else:
            Lg = L[..., 0].transpose(-1, -2)                         # [b, G, C]
            D = Lg[..., :, None] - Lg[..., None, :]
            Wd = torch.exp(torch.where(mask, D, -math.inf).to(z.dtype))
            out = dot.unsqueeze(-5) * Wd[..., :, None, :, None]      # [b, G, C, P, C, Q]
    else:
        if L.shape[-2] != 1:
            raise NotImplementedError("chunk: per-row column decays (elementwise) in the linear engine")
        Lk = L[..., 0, :]                                            # [b, C, K]
        if factor:
            zt = z * torch.exp(Lk).to(z.dtype).unsqueeze(-2)
            yt = y * torch.exp(-Lk).to(z.dtype).unsqueeze(-2)
            dot = torch.einsum("...tpk,...sqk->...tpsq", zt, yt)
            out = (dot * mask[:, None, :, None].to(dot.dtype)).unsqueeze(-5)
        else:
            D = Lk[..., :, None, :] - Lk[..., None, :, :]            # [b, C, C, K]
            Wd = torch.exp(torch.where(mask[..., None], D, -math.inf).to(z.dtype))
            out = torch.einsum("...tpk,...tsk,...sqk->...tpsq", z, Wd, y).unsqueeze(-5)
    return out.reshape(*out.shape[:-4], C * P, C * Q)


class _UnitLowerInverse(torch.autograd.Function):
    """(I + N)⁻¹ of the strictly lower triangle of N [..., m, m] (_block_unit_lower_inverse), with its adjoint
    written out: ∂N = −tril₋₁(Tᵀ ∂T Tᵀ), two batched matmuls. Autograd through the block recursion took 11 of the
    chunk backend's ~45 ms for DeltaNet fwd+bwd at (2, 2048, 4, 64) on two CPU threads (the recursion's cat /
    reshape graph, ~6 levels); torch's solve_triangular backward took as long. The adjoint reads T, this Function's
    own output, so a second derivative flows through it as well."""

    @staticmethod
    def forward(ctx, N):
        T = _block_unit_lower_inverse(N)
        ctx.save_for_backward(T)
        return T

    @staticmethod
    def backward(ctx, dT):
        T, = ctx.saved_tensors
        Tt = T.transpose(-1, -2)
        return (Tt @ dT @ Tt).tril_(-1).neg_()


def _unit_lower_inverse(N):
    """(I + N)⁻¹ for strictly lower-triangular N [..., m, m] (only the strict lower triangle is read)."""
    return _UnitLowerInverse.apply(N)


def _block_unit_lower_inverse(N):
    """(I + N)⁻¹ for strictly lower-triangular N [..., m, m] by block recursion (batched matmuls only;
    torch's batched solve_triangular copies every small matrix on the CPU: the per-row bottleneck)."""
    m = N.shape[-1]
    p = 1 << max(0, (m - 1).bit_length())
    if p != m:
        N = torch.nn.functional.pad(N, (0, p - m, 0, p - m))
    batch = N.shape[:-2]
    Dg = torch.ones(*batch, p, 1, 1, dtype=N.dtype, device=N.device)      # inverses of 1x1 diagonal blocks
    s = 1
    while s < p:
        P = p // (2 * s)
        Nr = N.reshape(*batch, P, 2, s, P, 2, s)[..., :, 1, :, :, 0, :]   # [..., P, s, P, s]
        Cb = torch.diagonal(Nr, dim1=-4, dim2=-2).movedim(-1, -3)       # [..., P, s, s] lower-left blocks
        Ai, Di = Dg[..., 0::2, :, :], Dg[..., 1::2, :, :]
        low = -(Di @ Cb @ Ai)
        top = torch.cat([Ai, torch.zeros_like(Ai)], -1)
        bot = torch.cat([low, Di], -1)
        Dg = torch.cat([top, bot], -2)                                   # [..., P, 2s, 2s]
        s *= 2
    inv = Dg[..., 0, :, :]
    return inv[..., :m, :m] if p != m else inv


def _same(x, y):
    """Two evaluated coefficients that are the same values (views of one input: DeltaNet's b and w
    are both k), known without reading them."""
    return view_key(x) == view_key(y)


def _gmm(Lm, Rm):
    """Lm [..., G1, m, k] @ Rm [..., G2, k, r] without broadcasting a shared (G = 1) operand over the
    d_v per-row groups when the other side is a single row/column per group (one GEMM instead)."""
    G1, G2 = Lm.shape[-3], Rm.shape[-3]
    if G1 == 1 and G2 > 1 and Rm.shape[-1] == 1:      # squeeze, not [..., 0]: a view in the backward
        return (Lm.squeeze(-3) @ Rm.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
    if G2 == 1 and G1 > 1 and Lm.shape[-2] == 1:
        return (Lm.squeeze(-2) @ Rm.squeeze(-3)).unsqueeze(-2)
    return Lm @ Rm


# --------------------------------------------------------------------------------------------
# engines. All take per-token tensors [B, T, H, X, Y], an initial state and return
# (o [B, T, H, d_v], final state).

def _linear_engine(logd, corrs, ins, q, S0, C):
    """Diagonal (non-elementwise) decay + low-rank corrections + input terms (CHUNK.md §1-2)."""
    B, T, H = q.shape[:3]
    K, V = S0.shape[-1], S0.shape[-2]
    dt = S0.dtype
    R, M = len(corrs), len(ins)
    row = (logd is not None and logd.shape[-2] > 1) or any(c.shape[-2] > 1 for c, _, _ in corrs)
    g, Rg = (V, 1) if row else (1, V)
    if R and row:      # per-row transitions: the UT inverse is per value row, O(d_v C^2) per chunk
        C = min(C, _ROW_CHUNK)
    elif R > 1:        # R corrections: the UT system has C·R unknowns per chunk, so chunks of C / R tokens (CHUNK.md §2)
        C = max(min(C, _ROW_CHUNK), C // R)
    n = -(-T // C)
    Tp = n * C
    ck = lambda x, val=0.0: _chunks(_pad_T(x, Tp, val), C)

    Q = ck(q)                                                        # [b, C, 1, K]
    W = ck(torch.cat([w for _, w in ins], -2)) if M else None        # [b, C, M, K]
    if M:
        E = torch.cat([e.expand(*e.shape[:3], V, 1) for e, _ in ins], -1)   # [B, T, H, V, M]
        E = ck(E)                                                    # [b, C, V, M]
        if row:
            ef = E.permute(0, 1, 2, 4, 3, 5).reshape(B, H, n, V, C * M, 1)
        else:
            ef = E.permute(0, 1, 2, 3, 5, 4).reshape(B, H, n, 1, C * M, V)
    if logd is not None:
        Lc = torch.cumsum(ck(logd).to(torch.float64), dim=3)         # [b, C, gL, kL]
        eL = torch.exp(Lc).to(dt)
        LC = Lc[:, :, :, -1:]
        dec = torch.exp(LC - Lc).to(dt)                              # decay from t to chunk end
        gam = torch.exp(LC[:, :, :, 0]).to(dt)                       # [b, gL, kL]
        gL = Lc.shape[-2]
        # (a meta tensor has no values to test: the pairwise form is right for any decay)
        factor = Lc.shape[-1] > 1 and LC.device.type != "meta" and bool((LC > -_FACTOR_RANGE).all())
    else:
        Lc = None
        gL, factor = 1, False

    def decayed(x, f):  # x [b, C, P, K] * f [b, C, gL, kL] -> [b, gL, C*P, K]
        if Lc is None:
            return x.reshape(B, H, n, 1, -1, K)
        y = x.unsqueeze(-2) * f.unsqueeze(-3)                        # [b, C, P, gL, K]
        return y.movedim(-2, 3).reshape(B, H, n, gL, -1, K)

    pairs = {}

    def pair(z, y, strict):    # once per distinct (z, y): DeltaNet's K(a, b) = K(a, w) = k kᵀ
        key = (id(z), id(y), strict)
        if key not in pairs:
            pairs[key] = _pair(z, y, Lc, strict, factor)
        return pairs[key]

    # tied: every input term's key is its correction's b (DeltaNet, Gated DeltaNet: w = b = k), so
    # the input and correction terms share one product each: (e − δ) against b (CHUNK.md §2)
    tied = R == M and R > 0 and not row and all(_same(b, w) for (_, _, b), (_, w) in zip(corrs, ins))
    if M and not tied:
        Sloc = _gmm(ef.transpose(-1, -2), decayed(W, dec if Lc is not None else None))   # [b, g, Rg, K]
    if R:
        A = ck(torch.cat([a.expand(*a.shape[:3], 1, K) for _, a, _ in corrs], -2))  # [b, C, R, K]
        Bv = W if tied else ck(torch.cat([b.expand(*b.shape[:3], 1, K) for _, _, b in corrs], -2))
        if R == M and all(_same(a, w) for (_, a, _), (_, w) in zip(corrs, ins)):
            A = W
        gc = V if any(c.shape[-2] > 1 for c, _, _ in corrs) else 1
        cc = ck(torch.cat([c.expand(*c.shape[:3], gc, 1) for c, _, _ in corrs], -1))  # [b, C, gc, R]
        cf = cc.permute(0, 1, 2, 4, 3, 5).reshape(B, H, n, gc, C * R)
        Kab = pair(A, Bv, True)                                      # [b, gL, CR, CR]
        Gx = max(gc, gL)
        Tinv = _unit_lower_inverse(cf[..., :, None] * Kab)           # (I + c ⊙ Kab)⁻¹, [b, Gx, CR, CR]
        At = decayed(A, eL if Lc is not None else None)              # [b, gL, CR, K]
        # tied: e − δ = T e − W̃ S0ᵀ, since (I + c ⊙ K(a, b)) e − c ⊙ K(a, w) e = e when w = b (one product
        # T e instead of K(a, w) e and T (c ⊙ ·)); x = e − δ is what the chunk pass and the output need
        rhs_l = cf[..., None] * _gmm(pair(A, W, True), ef) if M and not tied else None   # [b, *, CR, Rg]
        # shared rows (Gx == 1): δ = U + Wt S0ᵀ with Wt = T (c ⊙ ã) for all chunks at once.
        # per-row transitions (Gx == d_v): Wt would be [d_v, CR, d_k] per chunk; apply T to the
        # one right-hand side column of each row inside the chunk pass instead (CHUNK.md §2).
        per_row = Gx > 1
        if not per_row:
            Wt = Tinv @ (cf[..., None] * At)
            U = Tinv @ (ef if tied else rhs_l) if M else None     # tied: T e
        Bdec = decayed(Bv, dec if Lc is not None else None)          # [b, gL, CR, K]

    S = S0.reshape(B, H, g, Rg, K)
    S0s, deltas = [], []
    # index chunks through unbind (one backward node) rather than x[:, :, j] (n full-size zero grads)
    ub = lambda x: x.unbind(2) if x is not None else [None] * n
    gam_j = ub(gam.unsqueeze(-2) if Lc is not None else None)
    Sloc_j = ub(Sloc if M and not tied else None)
    if R:
        Bdec_j = ub(Bdec)
        if per_row:
            # δ = (T ⊙ c) (ã s_0ᵀ) + T (c ⊙ K(a, w) e): everything but the s_0 product batched over chunks
            TiC_j, At_j = ub(Tinv * cf[..., None, :]), ub(At)
            U_j = ub(Tinv @ rhs_l if M else None)
        else:
            Wt_j, U_j = ub(Wt), ub(U)
    for j in range(n):
        S0s.append(S)
        new = S if Lc is None else S * gam_j[j]
        if M and not tied:
            new = new + Sloc_j[j]
        if R:
            if per_row:
                d = TiC_j[j] @ _gmm(At_j[j], S.transpose(-1, -2))   # [B, H, V, CR, 1]
                if M:
                    d = d + U_j[j]
            else:
                d = Wt_j[j] @ S.transpose(-1, -2)                    # [B, H, g, CR, Rg]
                if tied:
                    d = U_j[j] - d                                   # x = e − δ = T e − W̃ S0ᵀ
                elif U_j[j] is not None:
                    d = d + U_j[j]
            deltas.append(d)
            new = new + d.transpose(-1, -2) @ Bdec_j[j] if tied else new - _gmm(d.transpose(-1, -2), Bdec_j[j])
        S = new
    S0s = torch.stack(S0s, 2)                                        # [b, g, Rg, K]
    o = _gmm(decayed(Q, eL if Lc is not None else None), S0s.transpose(-1, -2))      # [b, G, C, Rg]
    if tied:
        o = o + pair(Q, Bv, False) @ torch.stack(deltas, 2)         # deltas hold x = e − δ
    else:
        if M:
            o = o + _gmm(pair(Q, W, False), ef)
        if R:
            o = o - _gmm(pair(Q, Bv, False), torch.stack(deltas, 2))
    o = o.expand(B, H, n, g, C, Rg).permute(0, 1, 2, 4, 3, 5).reshape(B, H, Tp, V)
    return o[:, :, :T].transpose(1, 2), S.reshape(B, H, V, K)


def _loop_engine(decay, ins, q, S0, C):
    """No corrections, any diagonal decay incl. elementwise (CHUNK.md §3): three cheap passes.

    1. all chunks at once, C steps from a zero state: local end states and total decays;
    2. n steps over chunks: true chunk-initial states;
    3. all chunks at once, C steps from the true initial states: outputs.
    Products only (no log of a decay), so tiny or zero decays are exact."""
    B, T, H = q.shape[:3]
    K, V = S0.shape[-1], S0.shape[-2]
    n = -(-T // C)
    Tp = n * C
    ck = lambda x, val=0.0: _chunks(_pad_T(x, Tp, val), C)
    Lam_t = ck(decay, 1.0).unbind(3) if decay is not None else None     # C x [b, X, Y]
    Es_t = [(ck(e).unbind(3), ck(w).unbind(3)) for e, w in ins]
    Q_t = ck(q).unbind(3)                                                # C x [b, 1, K]

    def steps(S, out=None):
        for t in range(C):
            if Lam_t is not None:
                S = Lam_t[t] * S
            for e, w in Es_t:
                S = S + e[t] * w[t]
            if out is not None:
                out.append((S * Q_t[t]).sum(-1))                         # [B, H, n, V]
        return S

    if n == 1:  # one chunk: a single pass from the true initial state is all there is to do
        outs = []
        S = steps(S0.unsqueeze(2), outs).squeeze(2)
        o = torch.stack(outs, 3)
        return o.reshape(B, H, Tp, V)[:, :, :T].transpose(1, 2), S
    zero = torch.zeros(B, H, n, V, K, dtype=S0.dtype, device=S0.device)
    Sl = steps(zero)
    P = torch.prod(ck(decay, 1.0), dim=3) if decay is not None else None    # [b, X, Y] chunk total decay
    S, S0s = S0, []
    Sl_j = Sl.unbind(2)
    P_j = P.unbind(2) if P is not None else None
    for j in range(n):
        S0s.append(S)
        S = (S if P is None else P_j[j] * S) + Sl_j[j]
    outs = []
    steps(torch.stack(S0s, 2), outs)
    o = torch.stack(outs, 3)                                             # [b, C, V]
    return o.reshape(B, H, Tp, V)[:, :, :T].transpose(1, 2), S


@dataclasses.dataclass
class Gram:
    """H's per-token update X_t = Σ_r R_r u_r w_rᵀ + diag δ of an exact rule, in its factors ([B, T, H, ·, ·]
    views: R [.., 1, 1], u, w, δ [.., 1, K]; δ None when absent). The token loop never forms X; the chunked form
    does (full)."""
    terms: list
    diag: object = None

    def full(self, K: int):
        """X [B, T, H, K, K]."""
        parts = [(R * u.mT) * w for R, u, w in self.terms]
        if self.diag is not None:
            parts.append(torch.diag_embed(self.diag[..., 0, :]))
        return functools.reduce(torch.add, parts)

    def map(self, fn):
        return Gram([tuple(fn(x) for x in term) for term in self.terms], None if self.diag is None else fn(self.diag))


def _exact_x_loop(gam, X, ridge, qr, H0):
    """x_t = (H_t + diag λ_t)⁻¹ q_t with H_t = γ_t H_{t-1} + X_t token by token (the CPU form of the
    exact engine's first half, CHUNK.md §4): x [B, T, H, K, 1] and H_T, through the recurrent module's
    written-out adjoint (X kept in its factors, LU factors kept for the backward, H recomputed per
    RECURRENT_BLOCK tokens). gam: γ [B, T, H, 1, 1] or None."""
    B, T, Hh = qr.shape[:3]
    K = H0.shape[-1]
    return exact_x_loop(gam, X.terms, X.diag, ridge, torch.broadcast_to(qr, (B, T, Hh, 1, K)), H0, RECURRENT_BLOCK)


def _g_loop(decay, ins, x, G0):
    """G_t = γ_t G_{t-1} + Σ_m e_m w_mᵀ, o_t = G_t x_t through the recurrent engine (γ differentiated as
    itself, not through its log): evaluated entries [B, T, H, X, Y] in, o [B, T, H, d_v] and G_T out."""
    B, T, Hh = x.shape[:3]
    V, K = G0.shape[-2:]
    tokens = {"decay": decay, "q": x}
    for m, (e, w) in enumerate(ins):
        tokens[f"e{m}"], tokens[f"w{m}"] = e, w
    plan = Plan(lambda inp, L: {n: torch.broadcast_to(t, (L, B, Hh, *t.shape[-2:])) for n, t in inp.items()},
                0, len(ins), True, (B, T, Hh, V, K))
    return recurrent_scan(plan, tokens, {}, G0, RECURRENT_BLOCK)


def _exact_engine(logd, X, ridge, ins, qr, S0, C, g_engine=None, h_loop=False, decay=None):
    """Exact rules: H_t by chunked decayed prefix sums, x_t = (H_t + diag λ)⁻¹ q_t, G by the
    linear engine with query x_t (CHUNK.md §4) — or by g_engine(logd, ins, x, G0) -> (o, G_T)
    (backend="triton" passes the generated kernels' scan there). X: H's update, a Gram (its factors) or, for
    the chunked form only, a full [B, T, H, K, K] tensor. h_loop: H and x token by token (_exact_x_loop;
    faster on a CPU, where the chunked form's passes over T·d_k² elements dominate). decay: γ itself
    [B, T, H, 1, 1] instead of logd, for both token loops (an exact gradient for a raw γ)."""
    G0, H0 = S0
    B, T, Hh = qr.shape[:3]
    K = H0.shape[-1]
    dt = H0.dtype
    if decay is not None:
        x, Hst = _exact_x_loop(decay, X, ridge, qr, H0)
        xr = x.transpose(-1, -2)
        o, Gf = _g_loop(decay, ins, xr, G0) if g_engine is None else g_engine(None, ins, xr, G0, decay=decay)
        return o, (Gf, Hst)
    if h_loop:
        x, Hst = _exact_x_loop(torch.exp(logd) if logd is not None else None, X, ridge, qr, H0)
        o, Gf = _linear_engine(logd, [], ins, x.transpose(-1, -2), G0, C)
        return o, (Gf, Hst)
    X = X.full(K) if isinstance(X, Gram) else X
    # H's prefix sums in chunks of at most EXACT_H_CHUNK tokens: their pairwise form costs T·C·d_k² (64×
    # the T·d_k² of H itself at C = 64), and the sequential pass over chunk states is cheap
    CH = min(C, EXACT_H_CHUNK)
    n = -(-T // CH)
    Tp = n * CH
    ck = lambda x, val=0.0: _chunks(_pad_T(x, Tp, val), CH)
    Xc = ck(X)                                                       # [b, CH, K, K]
    mask = _tril(CH, False, X.device)
    if logd is not None:
        Lc = torch.cumsum(ck(logd)[..., 0, 0].to(torch.float64), dim=3)   # [b, CH]
        Wd = torch.exp(torch.where(mask, Lc[..., :, None] - Lc[..., None, :], -math.inf).to(dt))
        eL = torch.exp(Lc).to(dt)
        gam = torch.exp(Lc[..., -1]).to(dt)                          # [b]
    else:
        Wd = mask.to(dt)
    Hloc = torch.einsum("...ts,...sij->...tij", Wd, Xc)              # [b, CH, K, K]
    Hs, Hst = [], H0
    Hend = Hloc[:, :, :, -1].unbind(2)
    gam_j = gam.unbind(2) if logd is not None else None
    for j in range(n):
        Hs.append(Hst)
        Hst = (Hst if logd is None else gam_j[j][:, :, None, None] * Hst) + Hend[j]
    Hs = torch.stack(Hs, 2)                                          # [b, K, K]
    A = (Hloc + Hs.unsqueeze(3) if logd is None else
         torch.addcmul(Hloc, eL[..., None, None], Hs.unsqueeze(3))).reshape(B, Hh, Tp, K, K)
    # the ridge goes onto A's diagonal in place (A is a fresh sum no other op saved) and the solve runs in
    # A's own [B, H, T, ...] layout: a diag_embed and a transposed copy were two more passes over T·d_k²
    tok_major = lambda x: _pad_T(torch.broadcast_to(x, (B, T, Hh, 1, K))[..., 0, :], Tp, 1.0).transpose(1, 2)
    A.diagonal(dim1=-2, dim2=-1).add_(tok_major(ridge))
    x = torch.linalg.solve(A, tok_major(qr).unsqueeze(-1))          # [B, H, Tp, K, 1]
    x = x[:, :, :T].transpose(1, 2)                                  # [B, T, H, K, 1]
    if g_engine is not None:
        o, Gf = g_engine(logd, ins, x.transpose(-1, -2), G0)
    else:
        o, Gf = _linear_engine(logd, [], ins, x.transpose(-1, -2), G0, C)
    return o, (Gf, Hst)


# --------------------------------------------------------------------------------------------
# planning and the entry point

def _plan(form, ev):
    """Which engine runs these evaluated coefficients, or why none can (for the fallback)."""
    if isinstance(form, ExactForm):
        d = ev["decay"]
        if d.shape[-2] > 1 or d.shape[-1] > 1:
            return None, f"exact rule with {tuple(d.shape[-2:])}-shaped (non-scalar) forgetting"
        return "exact", None
    d = ev["decay"]
    R, M = len(form.corrections), len(form.inputs)
    vec_names = [f"a{r}" for r in range(R)] + [f"b{r}" for r in range(R)] + [f"w{m}" for m in range(M)] + ["q"]
    for nm in vec_names:
        if ev[nm].shape[-2] > 1:
            return None, f"a key-sized vector of the normal form ({nm}) that varies over value rows"
    elementwise_e = any(ev[f"e{m}"].shape[-1] > 1 for m in range(M))
    elementwise_d = d.shape[-2] > 1 and d.shape[-1] > 1
    if R == 0:
        return ("loop" if elementwise_d or elementwise_e else "linear"), None
    if elementwise_d:
        return None, "elementwise decay together with low-rank corrections"
    if elementwise_e:
        return None, "elementwise input coefficient together with low-rank corrections"
    for r in range(R):
        if ev[f"c{r}"].shape[-1] > 1:
            return None, f"a correction coefficient c{r} that varies over key columns"
    return "linear", None


def _per_row_corrections(form, ev):
    """Corrections whose transition differs between value rows (a row coefficient c_r or a row decay):
    the chunked form needs one triangular inverse per row and chunk (CHUNK.md §2)."""
    R = len(form.corrections)
    return R > 0 and (ev["decay"].shape[-2] > 1 or any(ev[f"c{r}"].shape[-2] > 1 for r in range(R)))


def _raw_decay_grads(facts, lay, tokens) -> tuple[bool, bool]:
    """Whether a gradient will flow to a decay read raw (Λ not constant, log Λ without a closed form) through
    (a per-token input, a learned parameter). A per-token gate is where resets and tiny values happen; a learned
    parameter (a layer's γ = exp(−exp(raw))) is a per-head constant, usually far from 0, so it counts only
    where its value is tiny (_tiny)."""
    if not facts.raw_decay_inputs or not torch.is_grad_enabled():
        return False, False
    want = [n for n in facts.raw_decay_inputs if lay[n].requires_grad]
    return any(n in tokens for n in want), any(n not in tokens for n in want)


#: a raw decay read from learned parameters only takes the token loops for its gradient below this value
#: (fp32: ε/Λ ≈ 6e-5 relative error at it; RetNet's γ = 0 had lost its gradient, γ = 1e-30 flipped its sign)
TINY_PARAMETER_DECAY = 1e-3


def check_decay_values(decay, form, tokens) -> None:
    """A decay that its inputs' declared domains make ≥ 0 (decay_may_be_negative is False) but that evaluates
    negative has an input outside its domain: an error naming them (one host sync; the chunked forms take its log,
    where the clamp had turned RetNet's γ = −0.5 into e^-87 silently)."""
    if decay.device.type == "meta" or not bool((decay.detach() < 0).any()):
        return
    syms = sorted(sp.sympify(form.decay).free_symbols, key=lambda s: s.name)
    declared = ", ".join(f"{s.name!r} ({'per token' if s.name in tokens else 'parameter'}, domain "
                         f"{spec_of(s).domain!r})" for s in syms)
    raise ValueError(f"scan: the decay {form.decay} evaluates to negative values (min {float(decay.min()):.3g}), "
                     f"which its inputs' declared domains rule out: one of {declared} is outside its domain. The "
                     "chunked forms work with log Λ; declare the input domain='real' if negative decays are meant "
                     "(the token loops then run)")


def _tiny(decay) -> bool:
    """Some value of the evaluated decay is below TINY_PARAMETER_DECAY (one host sync; a meta tensor has none)."""
    return decay.device.type != "meta" and bool((decay.detach().abs() < TINY_PARAMETER_DECAY).any())


def _log_decay_expr(decay):
    """{"logdecay": log Λ} in closed form (CHUNK.md, "gradients and tiny decays"), else nothing. A constant 0
    (an objective with a ridge and no proximal term forgets everything: S̃ = 0) is the floor, not log 0."""
    decay = sp.sympify(decay)
    if decay.is_number:
        return {} if decay == 1 else {"logdecay": sp.Float(_LOG_FLOOR) if decay == 0 else sp.log(decay)}
    le = closed_form_log(decay)
    return {} if le is None else {"logdecay": le}


def _exprs(form):
    if isinstance(form, ExactForm):
        ex = {"decay": form.decay, "gram_diag": form.gram_diag, "ridge": form.ridge, "q": form.readout}
        for r, c in enumerate(form.gram):
            ex[f"R{r}"], ex[f"u{r}"], ex[f"uw{r}"] = c.coef, c.a, c.b
        for m, t in enumerate(form.moments):
            ex[f"e{m}"], ex[f"w{m}"] = t.coef, t.w
        return ex
    ex = {"decay": form.decay, "q": form.readout}
    for r, c in enumerate(form.corrections):
        ex[f"c{r}"], ex[f"a{r}"], ex[f"b{r}"] = c.coef, c.a, c.b
    for m, t in enumerate(form.inputs):
        ex[f"e{m}"], ex[f"w{m}"] = t.coef, t.w
    return ex


def chunk_scan(args, g_engine=None):
    """backend="chunk": same contract as reference_scan (o in out_dtype, the final state in args.state_dtype), in
    chunks of args.chunk_size tokens (CHUNK_SIZE when None; checked by api.check_scan_args).
    g_engine: for exact rules, what runs the G statistics' scan (default: the linear engine)."""
    chunk_size = CHUNK_SIZE if args.chunk_size is None else args.chunk_size
    rule, form = args.rule, args.rule.form
    if not isinstance(form, (NormalForm, ExactForm)):
        warnings.warn(f"chunk backend: no chunked form for {type(form).__name__} ({rule.structure}); running the "
                      "reference loop instead", ChunkFallbackWarning, stacklevel=3)
        from .reference import reference_scan
        return reference_scan(args)
    exact = isinstance(form, ExactForm)
    dt = args.state_dtype if g_engine is None else torch.float32   # triton's G scan: fp32 state, so H too
    lay = rule.broadcast_inputs(args.d_k, args.d_v, {**args.tokens, **args.params}, "chunk")
    facts = _form_facts(form)
    evaluate = facts.evaluate
    B, T, H, K, V = args.B, args.T, args.H, args.d_k, args.d_v
    tokens = set(args.tokens)

    def lay_at(bs, t0, t1):  # the inputs of tokens t0..t1 (parameters whole)
        return {n: (x[bs, t0:t1] if n in tokens else x) for n, x in lay.items()}

    # the plan depends only on which indices each coefficient carries: one token tells
    probe = {nm: _full(x, B, min(T, 1), H, dt, args.device) for nm, x in evaluate(lay_at(slice(None), 0, 1)).items()}
    engine, why = _plan(form, probe)
    # on a CPU, elementwise decays and per-row corrections run the token loop with a hand-written
    # adjoint (recurrent.py, CHUNK.md §5): their chunked forms move T·d_v·d_k (or T·d_v·C) elements
    # through memory, more than the loop's L2-resident steps; coefficients are evaluated per block.
    # A raw decay (no closed-form log) whose gradient is wanted takes the token loops on any device: the
    # chunked forms differentiate log Λ, and ∂L/∂Λ = ∂L/∂log Λ / Λ turns its rounding error into ~ε/Λ
    # (and a Λ of exactly 0 into no gradient); the loops differentiate Λ itself (CHUNK.md §1)
    raw_grad, raw_param_grad = _raw_decay_grads(facts, lay, args.tokens)
    # a decay not known to be >= 0 has no real log: the loops, which multiply by Λ, on every path
    raw_grad = raw_grad or facts.may_be_negative
    recurrent = not exact and (raw_grad or args.device.type == "cpu" and (
        engine in ("loop", None) or (engine == "linear" and _per_row_corrections(form, probe)
                                     and CPU_ROW_ENGINE == "recurrent")))
    ev = None if recurrent else {nm: _full(x, B, T, H, dt, args.device) for nm, x in evaluate(lay).items()}
    if ev is not None and raw_param_grad and _tiny(ev["decay"]):
        raw_grad, recurrent, ev = True, not exact, (ev if exact else None)
    if engine is None:
        warnings.warn(f"chunk backend: cannot chunk {why} (rule structure: {rule.structure}); running "
                      + ("a token loop (the recurrent engine)" if recurrent else
                         "the reference loop instead (backend='reference' says so explicitly)"),
                      ChunkFallbackWarning, stacklevel=3)
        if not recurrent:
            from .reference import reference_scan
            return reference_scan(args)

    none_decay = facts.none_decay
    logd = None
    if recurrent:
        ins = corrs = None
    elif not none_decay and engine != "loop" and not (exact and raw_grad):
        # (the loop engine, and an exact rule's loops on a raw or signed decay, multiply by Λ: no logs needed)
        lev = facts.log_evaluate
        if lev is None:
            check_decay_values(ev["decay"], form, args.tokens)
        logd = (_full(lev(lay)["logdecay"], B, T, H, dt, args.device).clamp_min(_LOG_FLOOR) if lev is not None
                else _log_decay(ev["decay"]))
    if recurrent:
        pass
    elif exact:
        full = lambda x, c: torch.broadcast_to(x, (B, T, H, *c))      # views: cut() slices B and T
        X = Gram([(full(ev[f"R{r}"], (1, 1)), full(ev[f"u{r}"], (1, K)), full(ev[f"uw{r}"], (1, K)))
                  for r in range(len(form.gram))],
                 full(ev["gram_diag"], (1, K)) if facts.gram_diag else None)
        if not X.terms and X.diag is None:   # no Gram update at all: H stays its initial value
            X = Gram([], torch.zeros(B, T, H, 1, K, dtype=dt, device=args.device))
        ins = [(ev[f"e{m}"], ev[f"w{m}"]) for m in range(len(form.moments))]
    else:
        corrs = [(ev[f"c{r}"], ev[f"a{r}"], ev[f"b{r}"]) for r in range(len(form.corrections))]
        ins = [(ev[f"e{m}"], ev[f"w{m}"]) for m in range(len(form.inputs))]

    def initial(sl, count):
        if args.initial_state is None:
            z = rule.zero_state((count, H), K, V, device=args.device)
            return tuple(x.to(dt) for x in z) if exact else z.to(dt)
        if exact:
            return tuple(x[sl].to(dt) for x in args.initial_state)
        return args.initial_state[sl].to(dt)

    def run(bs, t0, t1, sl):
        cut = lambda x: x[bs, t0:t1]
        count = B if args.cu_seqlens is None else 1
        S0 = initial(sl, count)
        if t1 == t0:
            return torch.zeros(count, 0, H, V, dtype=dt, device=args.device), S0
        if recurrent:
            plan = Plan(lambda inp, L: {nm: _full(x, L, count, H, dt, args.device) for nm, x in evaluate(inp).items()},
                        len(form.corrections), len(form.inputs), not none_decay, (count, t1 - t0, H, V, K))
            tok = {n: x[bs, t0:t1] for n, x in lay.items() if n in tokens}
            return recurrent_scan(plan, tok, {n: x for n, x in lay.items() if n not in tokens}, S0, RECURRENT_BLOCK)
        C = min(chunk_size, t1 - t0)
        ld = None if logd is None else cut(logd)
        if exact:
            if raw_grad:   # Λ = γ itself through x's token loop and G's scan (the recurrent engine or triton's)
                return _exact_engine(None, X.map(cut), cut(ev["ridge"]), [(cut(e), cut(w)) for e, w in ins],
                                     cut(ev["q"]), S0, C, g_engine, decay=cut(ev["decay"]))
            return _exact_engine(ld, X.map(cut), cut(ev["ridge"]), [(cut(e), cut(w)) for e, w in ins],
                                 cut(ev["q"]), S0, C, g_engine, h_loop=args.device.type == "cpu" and g_engine is None)
        if engine == "loop":
            return _loop_engine(None if none_decay else cut(ev["decay"]), [(cut(e), cut(w)) for e, w in ins],
                                cut(ev["q"]), S0, C)
        return _linear_engine(ld, [(cut(c), cut(a), cut(b)) for c, a, b in corrs],
                              [(cut(e), cut(w)) for e, w in ins], cut(ev["q"]), S0, C)

    if args.cu_seqlens is None:
        o, final = run(slice(None), 0, T, slice(None))
    else:
        outs, finals = [], []
        for b, s, e, n in args.segments():
            o_n, f_n = run(slice(b, b + 1), s, e, slice(n, n + 1))
            outs.append(o_n)
            finals.append(f_n)
        o = torch.cat(outs, 1)
        final = (tuple(torch.cat([f[i] for f in finals]) for i in range(2)) if exact
                 else torch.cat(finals))
    o = o.to(args.out_dtype)
    if not args.output_final_state:
        return o, None
    return o, final
