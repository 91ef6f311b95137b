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

import torch

from ..derive.rule import Correction, InputTerm, NormalForm, Rule, evaluator
from ..objectives import core as O


@functools.lru_cache(maxsize=1)
def s_rule() -> Rule:
    """The normal form of S's scan given the gain: S_t = S_{t-1}(I − R u gᵀ) + e gᵀ, o_t = S_t q."""
    g = O.key("olssm_g")
    form = NormalForm(decay=1, corrections=(Correction(O.scalar("olssm_R"), O.key("olssm_u"), g),),
                      inputs=(InputTerm(O.row("olssm_e"), g),), readout=O.query("olssm_q"), mode="rls (S scan)")
    return Rule(None, form)


def _full(x, shape, device, dtype):
    return torch.broadcast_to(torch.as_tensor(x, dtype=dtype, device=device).to(dtype), shape)


def coefficients(args, dtype=torch.float32):
    """γ, R [B, T, H], u, q [B, T, H, d_k], e [B, T, H, d_v]: contiguous, differentiable."""
    rule, form = args.rule, args.rule.form
    B, T, H, K, V = args.B, args.T, args.H, args.d_k, args.d_v
    lay = rule.broadcast_inputs(K, V, {**args.tokens, **args.params}, "scan", need=rule.inputs)
    ev = evaluator({"gamma": form.decay, "R": form.weight, "u": form.key, "e": form.target, "q": form.readout})(lay)
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


def torch_gain_scan(u, gamma, R, P0, cu_seqlens=None):
    """g [B, T, H, d_k] and P_T [N, H, d_k, d_k] by a loop over tokens (all sequences of a batch
    together; packed sequences one after another). Autograd through it keeps O(T·d_k²) memory, like the
    reference loop, with a third of its launches per token."""
    B, T = u.shape[:2]
    if cu_seqlens is None:
        pieces = [(slice(None), 0, T, slice(None))]
    else:
        cu = cu_seqlens.tolist()
        pieces = [(slice(0, 1), cu[n], cu[n + 1], slice(n, n + 1)) for n in range(len(cu) - 1)]
    gains, finals = [], []
    for rows, start, end, seq in pieces:
        P = P0[seq]
        # per-token slices through one unbind each: x[:, t] would make autograd add T full-size zero
        # gradients (quadratic in T; it was most of RLS's backward at T = 2048)
        us, gs, Rs = (x[rows, start:end].unbind(1) for x in (u, gamma, R))
        for x, gm, r in zip(us, gs, Rs):
            Pt = P / gm[:, :, None, None]
            a = (Pt * x.unsqueeze(-2)).sum(-1)                                   # P̃ u
            den = 1 + r[:, :, None] * (a * x).sum(-1, keepdim=True)
            P = Pt - (r[:, :, None] / den).unsqueeze(-1) * a.unsqueeze(-1) * a.unsqueeze(-2)
            gains.append(a / den)
        finals.append(P)
    g = torch.stack(gains, 1) if cu_seqlens is None else torch.stack(gains, 1).reshape(1, T, *u.shape[2:])
    return g, torch.cat(finals)


def rls_scan(args, gain_scan, backend: str, chunk_size: int = 64):
    """o [B, T, H, d_v] (args.out_dtype) and (if asked) the final (S, P) fp32 (fp64 for fp64 inputs on
    the chunk backend, as verification wants): the gain by gain_scan(u, γ, R, P_0, cu_seqlens) ->
    (g, P_T), then S's scan on `backend` ("chunk" / "triton")."""
    from .api import scan
    if args.T == 0:
        raise ValueError("scan: T must be >= 1")
    dtype = torch.float64 if backend == "chunk" and args.out_dtype == torch.float64 else torch.float32
    gamma, R, u, e, q = coefficients(args, dtype)
    if args.initial_state is None:
        S0, P0 = None, initial_p(args, dtype)
    else:
        S0, P0 = (x.to(dtype).contiguous() for x in args.initial_state)
        if P0.device != args.device:
            raise ValueError(f"scan: initial_state is on {P0.device}, inputs on {args.device}")
    cu = None if args.cu_seqlens is None else args.cu_seqlens.to(args.device).contiguous()
    g, Pt = gain_scan(u, gamma, R, P0, cu)
    o, St = scan(s_rule(), backend=backend, initial_state=S0, output_final_state=args.output_final_state,
                 cu_seqlens=args.cu_seqlens, chunk_size=chunk_size, olssm_R=R, olssm_u=u, olssm_g=g, olssm_e=e,
                 olssm_q=q)
    return o.to(args.out_dtype), ((St, Pt) if args.output_final_state else None)
