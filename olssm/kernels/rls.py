"""Recursive least squares as a gain scan plus a normal-form scan (TRITON.md, "Recursive least squares").

An RLS rule keeps (S, P), P = (H_t + λ_t I)⁻¹; per token (γ forgetting, R weight, u key, e = R·y
target, q readout):

    P̃ = P_{t-1}/γ,  a = P̃ u,  den = 1 + R uᵀa,  P_t = P̃ − (R/den) a aᵀ,  g_t = P_t u = a/den
    S_t = S_{t-1} + (e − R S_{t-1} u) g_tᵀ = S_{t-1}(I − R u g_tᵀ) + e g_tᵀ,   o_t = S_t q

The gain g_t depends on P alone, never on S or the values. So the scan is (1) the gain scan, the
Riccati recursion, sequential by nature but one rank-1 update per token (a torch loop here, a
kernel on backend="triton": triton/rls.py), then (2) S's scan, a normal-form rule with one
correction (c = R, a = u, b = g) and one input term e gᵀ (`s_rule`), run by the chunk backend's
engines or the generated Triton kernels like any derived rule. Everything is differentiable:
autograd chains both scans' gradients to the raw inputs through the coefficient expressions.
"""
from __future__ import annotations

import functools
import math
import warnings

import sympy as sp
import torch

from ..derive.rule import Correction, InputTerm, NormalForm, Rule, evaluator
from ..derive.solve import _caller_level
from ..objectives import core as O
from .api import inner_scan, scan, scan_pieces
from .recurrent import _rowdot, _serial, first_derivative_only


@functools.lru_cache(maxsize=1)
def s_rule() -> Rule:
    """The normal form of S's scan given the gain: S_t = S_{t-1}(I − R u gᵀ) + e gᵀ, o_t = S_t q."""
    g = O.key("olssm_g")
    form = NormalForm(decay=1, corrections=(Correction(O.scalar("olssm_R"), O.key("olssm_u"), g),),
                      inputs=(InputTerm(O.row("olssm_e"), g),), readout=O.query("olssm_q"), mode="rls (S scan)")
    return Rule(None, form)


def _full(x, shape, device, dtype):
    return torch.broadcast_to(torch.as_tensor(x, dtype=dtype, device=device).to(dtype), shape)


def _evaluated(args, **exprs) -> dict:
    """The rule's expressions exprs evaluated on the scan's inputs, in broadcast layout."""
    lay = args.rule.broadcast_inputs(args.d_k, args.d_v, {**args.tokens, **args.params}, "scan", need=args.rule.inputs)
    return evaluator(exprs)(lay)


def coefficients(args, dtype=torch.float32):
    """γ, R [B, T, H], u, q [B, T, H, d_k], e [B, T, H, d_v]: contiguous, differentiable."""
    form = args.rule.form
    B, T, H, K, V = args.B, args.T, args.H, args.d_k, args.d_v
    ev = _evaluated(args, gamma=form.decay, R=form.weight, u=form.key, e=form.target, q=form.readout)
    full = lambda x, *shape: _full(x, shape, args.device, dtype)
    return (full(ev["gamma"], B, T, H, 1, 1)[..., 0, 0].contiguous(),
            full(ev["R"], B, T, H, 1, 1)[..., 0, 0].contiguous(),
            full(ev["u"], B, T, H, 1, K)[..., 0, :].contiguous(),
            full(ev["e"], B, T, H, V, 1)[..., 0].contiguous(),
            full(ev["q"], B, T, H, 1, K)[..., 0, :].contiguous())


def initial_p(args, dtype=torch.float32):
    """P_0 = I/λ per sequence [N, H, d_k, d_k] (λ read at each sequence's first token, as the reference does)."""
    rule = args.rule
    starts = [0] if args.cu_seqlens is None else args.cu_seqlens.tolist()[:-1]
    batch = args.B if args.cu_seqlens is None else 1
    Ps = []
    for s in starts:
        first = {n: x[:, min(s, args.T - 1)] for n, x in args.tokens.items()}
        Ps.append(rule.zero_state((batch, args.H), args.d_k, args.d_v, device=args.device, dtype=dtype,
                                  **args.params, **first)[1])
    return torch.cat(Ps).contiguous()


#: tokens between the torch gain scan's checkpoints of P (its backward recomputes P in blocks of this many)
GAIN_BLOCK = 16


def _riccati_(P, x, gm, r, Pt=None):
    """One token in place: P becomes P_t = P̃ − (R/den) a aᵀ with P̃ = P/γ, a = P̃ u, den = 1 + R uᵀa; P̃ is
    written into Pt when given (the backward keeps it), else formed in P itself. Returns (a, den). In
    place because a fresh [B, H, d_k, d_k] tensor per token is an mmap and its page faults on a CPU."""
    if Pt is None:
        Pt = P.div_(gm[:, :, None, None])
    else:
        torch.div(P, gm[:, :, None, None], out=Pt)
    a = _rowdot(Pt, x.unsqueeze(-2))[..., 0]                                 # P̃ u
    den = 1 + r[:, :, None] * (a * x).sum(-1, keepdim=True)
    # P̃ − c a aᵀ as P̃ − (±b)bᵀ with b = a √|c|: (±b_i)·b_j = ±(b_j·b_i), so P stays bitwise symmetric; with
    # (c a_i)·a_j it did not, and the antisymmetric rounding grew like Π 1/γ (P_T ~ 1e8 at T = 512, γ ~ 0.9)
    c = r[:, :, None] / den
    b = a * c.abs().sqrt()
    torch.addcmul(Pt, (b * c.sign()).unsqueeze(-1), b.unsqueeze(-2), value=-1, out=P)
    return a, den


def _sym_(X):
    """X ← (X + Xᵀ)/2 in place (through one temporary: X.add_(X.mT) would read what it writes)."""
    X.copy_(X + X.mT).mul_(0.5)
    return X


def _time_major(u, gamma, R, rows, start, end):
    """Per-token contiguous slices of a piece (a strided GEMV operand is copied first, 4× the cost)."""
    return tuple(x[rows, start:end].transpose(0, 1).contiguous().unbind(0) for x in (u, gamma, R))


class _GainScan(torch.autograd.Function):
    """The Riccati gain scan with its adjoint written out (TRITON.md, "Recursive least squares": the same
    formulas as rls_gain_bwd_kernel): P checkpointed every GAIN_BLOCK tokens and recomputed per block in
    the backward, where autograd through the loop kept every token's P̃ and a aᵀ (T·d_k² each)."""

    @staticmethod
    def forward(ctx, u, gamma, R, P0, cu_seqlens):
        B, T = u.shape[:2]
        g = torch.empty_like(u)
        PT, ckpts = [], []
        with _serial(P0[:1].numel() * B):   # per-token ops on a small P (recurrent.SERIAL_STATE_NUMEL)
            for rows, start, end, seq in scan_pieces(B, T, cu_seqlens):
                P = P0[seq].clone()
                if end > start:                      # the reference's step symmetrises its input; after it, exact
                    _sym_(P)
                us, gs, Rs = _time_major(u, gamma, R, rows, start, end)
                for i in range(end - start):
                    if i % GAIN_BLOCK == 0:
                        ckpts.append(P.clone())
                    a, den = _riccati_(P, us[i], gs[i], Rs[i])
                    g[rows, start + i] = a / den
                PT.append(P)
        ctx.cu = cu_seqlens
        ctx.save_for_backward(u, gamma, R, *ckpts)
        return g, torch.cat(PT)

    @staticmethod
    def backward(ctx, dg, dPT):
        first_derivative_only("the RLS gain scan")
        u, gamma, R, *ckpts = ctx.saved_tensors
        B, T = u.shape[:2]
        du, dgam, dR = torch.zeros_like(u), torch.zeros_like(gamma), torch.zeros_like(R)
        dP0 = torch.empty_like(dPT)
        P = torch.empty_like(ckpts[0]) if ckpts else None
        Pts = P.new_empty(GAIN_BLOCK, *P.shape).unbind(0) if ckpts else None   # P̃ per token (P's device)
        k = 0
        with _serial(dPT[:1].numel() * B):   # per-token ops on a small P (recurrent.SERIAL_STATE_NUMEL)
            for rows, start, end, seq in scan_pieces(B, T, ctx.cu):
                nblk = -(-(end - start) // GAIN_BLOCK)
                dP = dPT[seq].clone()
                us, gs, Rs = _time_major(u, gamma, R, rows, start, end)
                for j in reversed(range(nblk)):
                    b0 = start + j * GAIN_BLOCK
                    b1 = min(b0 + GAIN_BLOCK, end)
                    P.copy_(ckpts[k + j])
                    saved = [_riccati_(P, us[t - start], gs[t - start], Rs[t - start], Pts[t - b0]) for t in range(b0, b1)]
                    for t in reversed(range(b0, b1)):
                        x, gm, r = us[t - start], gs[t - start], Rs[t - start]
                        Pt, (a, den) = Pts[t - b0], saved[t - b0]
                        rr = r[:, :, None]
                        dgt = dg[rows, t]
                        dPa = _rowdot(dP, a.unsqueeze(-2))[..., 0]                 # dP a
                        aPa = (a * dPa).sum(-1, keepdim=True)                      # aᵀ dP a
                        dPta = (a.unsqueeze(-2) @ dP)[..., 0, :]                   # dPᵀ a (no transposed copy)
                        dden = -(dgt * a).sum(-1, keepdim=True) / den ** 2 + rr * aPa / den ** 2
                        ds = rr * dden
                        da = dgt / den - (rr / den) * (dPa + dPta) + ds * x
                        dR[rows, t] = (-aPa / den + (x * a).sum(-1, keepdim=True) * dden)[..., 0]
                        du[rows, t] = ds * a + (da.unsqueeze(-2) @ Pt)[..., 0, :]
                        dP.addcmul_(da.unsqueeze(-1), x.unsqueeze(-2))           # dP̃ (dP is ours: a clone)
                        dgam[rows, t] = -(dP.flatten(-2).unsqueeze(-2) @ Pt.flatten(-2).unsqueeze(-1))[..., 0, 0] / gm
                        _sym_(dP.div_(gm[:, :, None, None]))     # the adjoint of that symmetrisation: dP_{t-1} sym
                dP0[seq] = dP
                k += nblk
        return du, dgam, dR, dP0, None


def torch_gain_scan(u, gamma, R, P0, cu_seqlens=None):
    """g [B, T, H, d_k] and P_T [N, H, d_k, d_k] by a loop over tokens (all sequences of a batch together,
    packed sequences one after another), with a hand-written backward that recomputes P from
    checkpoints (memory: T/GAIN_BLOCK states, not T)."""
    return _GainScan.apply(u, gamma, R, P0, cu_seqlens)


def _first_not_positive(x: torch.Tensor):
    """The index of x's first value that is not > 0 (NaN included), or None: all are, or x is wrapped by a functorch
    transform (vmap, grad), whose values cannot be read (check_input_values skips those too)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(x) or not x.numel():
        return None
    bad = ~(x > 0)
    return tuple(int(i) for i in bad.nonzero()[0].tolist()) if bool(bad.any()) else None


def check_rls_values(args, state_dtype) -> None:
    """RLS divides by its forgetting factor γ and starts from P_0 = I/λ: γ = 0 or λ = 0 lie in their inputs' closed
    domains (a decay of 0, a ridge of 0) but have no RLS step, and had come out as non-finite outputs (reference) or
    as an error naming the inner scan's olssm_g (chunk). An error naming the rule's γ and λ instead, where
    api.check_input_values runs (CPU tensors by default). Then warns when γ makes P too ill-conditioned for
    state_dtype, the dtype P is scanned in (warn_if_ill_conditioned)."""
    from .api import check_inputs_mode, checks_on
    if not checks_on(check_inputs_mode(), args.device):
        return
    form = args.rule.form
    # γ alone (coefficients would also copy u, e, q out to [B, T, H, d]), broadcast as coefficients does
    gamma = _full(_evaluated(args, gamma=form.decay)["gamma"], (args.B, args.T, args.H, 1, 1), args.device,
                  args.state_dtype)[..., 0, 0]
    first = _first_not_positive(gamma)
    if first is not None:
        raise ValueError(f"scan: this RLS rule divides by its forgetting factor {form.decay}, which is ≤ 0 (or NaN) "
                         f"at [B, T, H] index {first}; RLS needs it > 0")
    if args.initial_state is None and args.T > 0:
        P0 = initial_p(args, args.state_dtype)
        if not bool(torch.isfinite(P0).all()):
            raise ValueError(f"scan: this RLS rule's P_0 = I/({form.ridge}) is not finite: its ridge {form.ridge} must be "
                             "> 0 at each sequence's first token (or pass initial_state)")
    warn_if_ill_conditioned(args, gamma, state_dtype)


class RLSConditioningWarning(RuntimeWarning):
    """An RLS scan whose forgetting makes P so ill-conditioned that its state dtype keeps few correct digits
    (TRITON.md, "Recursive least squares", Conditioning)."""


#: warn when the relative error an RLS scan is predicted to lose to its conditioning exceeds this (0: always)
RLS_WARN_ERROR = 1e-3


def predicted_rls_error(args, gamma, dtype) -> tuple[float, tuple]:
    """ε(dtype) · max over windows of d_k consecutive tokens of Π 1/γ, and where that window ends ([B, T, H]): a key
    direction excited d_k tokens ago is weighted by that product in H_t against the newest key's 1, so P's
    condition number grows to about it, and the covariance-form step P̃ − (R/den) a aᵀ cancels that many digits.
    Measured (fp32 chunk backend against fp64, T = 200, random unit keys, γ fixed or uniform in [γ_min, 1], d_k
    4-64): the scan's relative error is 0.3-6× this wherever this is below 1e-2; at d_k = 128 it overestimates (up to
    370× at γ = 0.9: a long window of random keys excites every direction better than its oldest key does). It
    does not see a small ridge's loss while the first d_k keys arrive (λ = 1e-6: up to O(1) around t ≈ d_k, washed
    out later). Windows stay inside each packed sequence."""
    log_decay = -gamma.detach().double().log()
    worst, where = -math.inf, None
    for rows, start, end, _ in scan_pieces(args.B, args.T, args.cu_seqlens):
        if end == start:
            continue
        piece = log_decay[rows, start:end]
        width = min(args.d_k, end - start)
        totals = torch.nn.functional.pad(piece.cumsum(1), (0, 0, 1, 0))
        windows = totals[:, width:] - totals[:, :-width]              # [b, end - start - width + 1, H]
        top = float(windows.max())
        if top > worst:
            b, t, h = (int(i) for i in (windows == windows.max()).nonzero()[0].tolist())
            worst, where = top, ((b if args.cu_seqlens is None else 0), start + t + width - 1, h)
    return math.exp(min(worst, 700.0)) * torch.finfo(dtype).eps, where


def warn_if_ill_conditioned(args, gamma, dtype) -> None:
    """RLSConditioningWarning when predicted_rls_error exceeds RLS_WARN_ERROR (the message's numbers rounded to a
    decade, so that Python's once-per-message filter does not repeat it every training step)."""
    error, where = predicted_rls_error(args, gamma, dtype)
    if error <= RLS_WARN_ERROR:
        return
    condition = error / torch.finfo(dtype).eps
    decade = lambda x: f"1e{round(math.log10(x)):+d}"
    warnings.warn(
        f"scan: this recursive least squares forgets fast for its key size (d_k = {args.d_k}): its forgetting factors "
        f"multiply to ~{decade(1 / condition)} over d_k consecutive tokens (the worst window ends at [B, T, H] {where}), "
        f"so P = (H_t + λ_t I)⁻¹ reaches a condition number of ~{decade(condition)} and the {_name(dtype)} outputs may "
        f"be off by ~{decade(error) if error < 1 else 'their own size'} relative. {_remedy(dtype)}",
        RLSConditioningWarning, stacklevel=_caller_level())


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _remedy(dtype) -> str:
    """What the conditioning warning and the overflow error advise (a larger λ only delays the overflow: λ Π γ
    decays with the rest)."""
    return ("Run it " + ("in float64, " if dtype != torch.float64 else "") + "with forgetting factors closer to 1, "
            "or use decayed least squares (catalogue 'decayed_least_squares'), whose ridge does not decay")


def check_ridge_values(args) -> None:
    """An exact rule's readout solves (H_t + λ) x = q. derive refuses an objective without a ridge because H_t is
    singular until d_k independent keys have arrived; a ridge that is 0 at run time (inside the "positive" domain's
    closed bound) is the same singular solve, and each backend had returned its own numbers for it (the reference
    and triton differing from the chunk backend by O(1), or torch's LinAlgError, or NaN). Refused, naming λ, where
    api.check_input_values runs. A diagonal term in H (gram_diag) may keep it regular: then λ is left alone."""
    from .api import check_inputs_mode, checks_on
    form = args.rule.form
    if form.gram_diag != 0 or not checks_on(check_inputs_mode(), args.device):
        return
    given = {**args.tokens, **args.params}
    if isinstance(form.ridge, sp.Symbol) and form.ridge.name in given:   # name the caller's tensor and its index
        lam, where = given[form.ridge.name].detach(), f"input {form.ridge.name!r}"
    else:
        lam, where = _evaluated(args, lam=form.ridge)["lam"], "its broadcast layout [..., d_v, d_k]"
        lam = lam if torch.is_tensor(lam) else torch.tensor(float(lam))
    first = _first_not_positive(lam)
    if first is not None:
        raise ValueError(f"scan: this exact rule's ridge {form.ridge} is ≤ 0 (or NaN) at index {first} of {where}; "
                         f"the readout solves (H_t + {form.ridge}) x = q, singular while H_t has rank < d_k (the "
                         "first tokens), so the ridge must be > 0 (OLSSM_CHECK_INPUTS=0 skips this check)")


def check_rls_result(args, o, P_T, g=None) -> None:
    """RLS with forgetting has no bounded P: in key directions the last ~1/(1 − γ) keys leave unexcited, H_t's
    eigenvalues decay like γ^t and so does the ridge λ_t = λ Π γ (ridge_decays), so P grows like γ^−t there (the
    covariance "wind-up" of adaptive filtering), and past the dtype's range the scan's outputs and P are NaN or inf
    on every backend, the reference included. From inputs check_input_values passed, that is a FloatingPointError
    naming the first token the gain (else the output) broke at, where api.check_input_values runs (CPU tensors by
    default). Short of overflow, the same growth costs accuracy, predicted from γ before the scan
    (warn_if_ill_conditioned; TRITON.md, "Recursive least squares", Conditioning)."""
    from .api import check_inputs_mode, checks_on
    if not checks_on(check_inputs_mode(), args.device) or torch._C._functorch.is_functorch_wrapped_tensor(o):
        return
    # the gain's token first (exact on every backend), then o's (a chunked S scan spreads a NaN to its chunk's
    # earlier tokens)
    bad = next((b for b in (~torch.isfinite(x.detach()) for x in (g, o) if x is not None) if bool(b.any())), None)
    if bad is None and bool(torch.isfinite(P_T.detach()).all()):
        return
    where = ""
    if bad is not None:
        b, t, h = (int(i) for i in bad.flatten(3).any(-1).nonzero()[0].tolist())
        where = f" from token t = {t} (batch row {b}, head {h})"
    name = _name(P_T.dtype)
    raise FloatingPointError(
        f"scan: recursive least squares overflowed {name}: its outputs or P are not finite{where}, from finite inputs. "
        "P = (H_t + λ_t I)⁻¹ grows like γ^−t in key directions the recent keys leave unexcited (its ridge λ_t decays "
        f"with γ), here past {name}'s range. {_remedy(P_T.dtype)}")


def rls_scan(args, gain_scan, backend: str):
    """o [B, T, H, d_v] (args.out_dtype) and (if asked) the final (S, P) fp32 (fp64 for fp64 inputs on
    the chunk backend, as verification wants): the gain by gain_scan(u, γ, R, P_0, cu_seqlens) ->
    (g, P_T), then S's scan on `backend` ("chunk" / "triton")."""
    dtype = args.state_dtype if backend == "chunk" else torch.float32
    gamma, R, u, e, q = coefficients(args, dtype)
    if args.initial_state is None:
        S0, P0 = None, initial_p(args, dtype)
    else:
        S0, P0 = (x.to(dtype).contiguous() for x in args.initial_state)
        if P0.device != args.device:
            raise ValueError(f"scan: initial_state is on {P0.device}, inputs on {args.device}")
    cu = None if args.cu_seqlens is None else args.cu_seqlens.to(args.device).contiguous()
    g, Pt = gain_scan(u, gamma, R, P0, cu)
    with inner_scan():   # S's inputs come from checked ones (and the check named the gain scan's olssm_g)
        o, St = scan(s_rule(), backend=backend, initial_state=S0, output_final_state=args.output_final_state,
                     cu_seqlens=args.cu_seqlens, chunk_size=args.chunk_size, olssm_R=R, olssm_u=u, olssm_g=g,
                     olssm_e=e, olssm_q=q)
    check_rls_result(args, o, Pt, g)
    return o.to(args.out_dtype), ((St, Pt) if args.output_final_state else None)
