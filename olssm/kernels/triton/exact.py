"""backend="triton" for exact (sufficient-statistics) rules, as a hybrid (TRITON.md, "Exact rules").

An exact rule keeps G_t = γ_t G_{t-1} + Σ_m e_m w_mᵀ and H_t = γ_t H_{t-1} + X_t and reads
o_t = G_t (H_t + diag λ)⁻¹ q_t. Write x_t = (H_t + diag λ)⁻¹ q_t: then o_t = G_t x_t is a plain
normal-form scan (scalar decay γ, the moments as input terms, readout x). So the chunk backend's
exact engine computes x_t (chunked prefix sums of H, one batched solve for all tokens, in torch)
and the G scan runs through the kernels generated for that normal form — recurrent or chunked,
forward and backward, like any rule's. The per-token solve stays a torch batched solve: a d_k×d_k
factorisation per token inside a sequential kernel would serialise O(d_k) steps per token.
"""
from __future__ import annotations

import functools

import sympy as sp

from ...derive.rule import InputTerm, NormalForm, Rule
from ...objectives import core as O


@functools.lru_cache(maxsize=16)
def g_rule(n_moments: int, decayed: bool, raw: bool = False) -> Rule:
    """The normal form of G's scan: S_t = γ_t S_{t-1} + Σ_m e_m w_mᵀ, o_t = S_t x_t."""
    terms = tuple(InputTerm(O.row(f"olssm_e{m}"), O.key(f"olssm_w{m}")) for m in range(n_moments))
    # the decay as exp(log γ): the engine already holds log γ (no exp/log round trip), and a closed-form
    # log lets the chunked kernels use their exact chunked backward. raw: γ itself, for a raw γ whose
    # gradient is wanted (auto then keeps the recurrent backward, exact at any γ; CHUNK.md §1)
    decay = (O.scalar("olssm_gamma", domain="decay") if raw else sp.exp(O.scalar("olssm_loggamma"))) if decayed else 1
    form = NormalForm(decay=decay, corrections=(), inputs=terms, readout=O.query("olssm_x"), mode="exact (G scan)")
    return Rule(None, form)


def g_engine(logd, ins, x, G0, decay=None, chunk_size=None):
    """chunk._exact_engine's G scan through backend="triton": logd [B, T, H, 1, 1] or None (or decay, γ itself
    [B, T, H, 1, 1]), ins [(e [B, T, H, V|1, 1], w [B, T, H, 1, K])], x [B, T, H, 1, K], G0 [B, H, V, K];
    chunk_size: the caller's, for the G scan's chunked kernels (None: their policy's)."""
    from ..api import scan
    B, T, H = x.shape[:3]
    V = G0.shape[-2]
    inputs = {"olssm_x": x[..., 0, :]}
    for m, (e, w) in enumerate(ins):
        inputs[f"olssm_e{m}"] = e[..., 0].expand(B, T, H, V)
        inputs[f"olssm_w{m}"] = w[..., 0, :]
    if decay is not None:
        inputs["olssm_gamma"] = decay[..., 0, 0]
    elif logd is not None:
        inputs["olssm_loggamma"] = logd[..., 0, 0]
    rule = g_rule(len(ins), logd is not None or decay is not None, decay is not None)
    return scan(rule, backend="triton", initial_state=G0, output_final_state=True, chunk_size=chunk_size, **inputs)


def triton_exact_scan(args):
    """The chunk backend's exact engine (its prefix sums of H in chunks of args.chunk_size) with G's scan on the
    generated kernels, which take the same chunk_size: checked here first, as for every triton call."""
    from ..chunk import chunk_scan
    from .library import check_chunk_size
    check_chunk_size(args.chunk_size)
    return chunk_scan(args, g_engine=functools.partial(g_engine, chunk_size=args.chunk_size))
