"""A token loop with a hand-written adjoint: the chunk backend's CPU engine for the structures that a
CPU cannot chunk profitably (elementwise decays, per-row corrections). Math: CHUNK.md §5.

Why a loop: an elementwise decay has no matmul form, and per-row corrections need one triangular
inverse per value row and chunk. Both make chunked tensors of T·d_v·d_k or T·d_v·C elements whose
passes through memory cost more than the token loop's L2-resident steps on a [B, H, d_v, d_k] state.
Autograd through a loop keeps every per-token state and coefficient; here the backward is written
out: states are recomputed from checkpoints block by block, the adjoint state runs backwards token by
token, and the gradients of the normal-form entries flow to the user's inputs through one autograd
call per block of re-evaluated coefficients (so an elementwise entry such as Mamba's exp(Δ A) is
never materialised for all tokens). Memory: the inputs plus T/16 states.
"""
from __future__ import annotations

import contextlib

import torch

#: states of at most this many elements run their token loops on one intra-op thread (_serial): each per-token op
#: on them is too small to split. Up to aten's grain (2¹⁵) elementwise ops run on one thread anyway, while BLAS still
#: splits each GEMV S a, S q across threads, and its synchronisation costs more than the half-work saves. Two
#: threads, fwd+bwd, CHUNK.md §5: Longhorn at B·H·d_v·d_k = 2·4·64·64 (T = 2048) 0.93 → 0.60 s, Mamba and
#: Longhorn-diag equal or faster; at twice that state (B = 4, T = 1024) two threads win again (Mamba 0.55 s serial
#: against 0.37–0.41 s), so the bound is 2¹⁵
SERIAL_STATE_NUMEL = 1 << 15


@contextlib.contextmanager
def _serial(numel: int):
    """One intra-op thread inside, for a token loop over a state of numel elements (SERIAL_STATE_NUMEL)."""
    threads = torch.get_num_threads()
    if threads == 1 or numel > SERIAL_STATE_NUMEL:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _contract(x, y, X, Y, out=None):
    """Σ of x ⊙ y over the axes an entry of per-token shape [..., X, Y] broadcasts along (X ∈ {1, d_v},
    Y ∈ {1, d_k}): the gradient of a broadcast factor. Operands are contiguous per-token tensors (a
    strided GEMV copies first and costs 4× as much on a CPU)."""
    V, K = max(x.shape[-2], y.shape[-2]), max(x.shape[-1], y.shape[-1])
    sx, sy = tuple(x.shape[-2:]), tuple(y.shape[-2:])
    if out is not None and X == V and Y == K and K > 1:
        return torch.mul(x, y, out=out)
    if K == 1 or (X == V and Y == K):                  # nothing to contract over columns
        r = x * y
        if X == 1 and V > 1:
            r = r.sum(-2, keepdim=True)
    elif Y == 1 and X == V and sx == (V, K) and sy == (1, K):
        r = x @ y.mT                                   # [.., V, K] @ [.., K, 1]: one GEMV
    elif Y == 1 and X == V and sy == (V, K) and sx == (1, K):
        r = y @ x.mT
    elif Y == 1 and X == V:
        r = torch.linalg.vecdot(x, y).unsqueeze(-1)
    elif X == 1 and Y == K and sx == (V, K) and sy == (V, 1):
        r = y.mT @ x                                   # [.., 1, V] @ [.., V, K]: one GEMV
    elif X == 1 and Y == K and sy == (V, K) and sx == (V, 1):
        r = x.mT @ y
    else:
        r = (x * y).sum([d for d, keep in ((-2, X == V), (-1, Y == K)) if not keep], keepdim=True)
    if Y == 1 and r.shape[-1] != 1:
        r = r.sum(-1, keepdim=True)
    if X == 1 and r.shape[-2] != 1:
        r = r.sum(-2, keepdim=True)
    return r.expand(*r.shape[:-2], X, Y) if r.shape[-2:] != (X, Y) else r


class Plan:
    """What the loop needs to know about a normal form: R corrections, M input terms, whether there
    is a decay, and `entries(inputs, L)`: every normal-form entry for a block of L tokens as
    [L, B, H, X, Y] tensors from token inputs given as [L, B, ...] (the chunk backend's evaluator,
    broadcast; time leading, so that each token's entry is one contiguous piece)."""

    def __init__(self, entries, R, M, decay, shape):
        self.entries, self.R, self.M, self.decay = entries, R, M, decay
        self.B, self.T, self.H, self.V, self.K = shape
        self.corr = [(f"c{r}", f"a{r}", f"b{r}") for r in range(R)]
        self.ins = [(f"e{m}", f"w{m}") for m in range(M)]


def view_key(x):
    """Equal for tensors that are the same view of the same memory, hence the same values without
    reading them (DeltaNet's evaluated a, b and w are all broadcast views of k)."""
    return x.data_ptr(), tuple(x.shape), x.stride(), x.dtype


def _per_token(ent, L):
    """[L, B, H, X, Y] entries -> L dicts of contiguous [B, H, X, Y] tensors (a copy only for entries
    that are views of the inputs, once per distinct tensor: DeltaNet's a = b = w = k is one)."""
    cols, seen = {}, {}
    for n, x in ent.items():
        key = view_key(x)
        if key not in seen:
            seen[key] = x.contiguous().unbind(0)
        cols[n] = seen[key]
    return [{n: c[i] for n, c in cols.items()} for i in range(L)]


def _rowdot(S, k, out=None):
    """Σ_j S[., j] k[., j] per value row, [..., d_v, 1]: one GEMV for a key vector k [..., 1, d_k], a
    row-wise dot for any other broadcast shape (an entry varying over rows, or constant over columns).
    The GEMV takes k as a transposed row: torch's CPU matmul first copies a [..., n, 1] right operand
    whose strides are (1, 1) (measured 21 µs against 7.6 µs at n = 64)."""
    if k.shape[-2] == 1 and k.shape[-1] == S.shape[-1]:
        return torch.matmul(S, k.mT, out=out)
    if out is None:
        return torch.linalg.vecdot(S, k).unsqueeze(-1)
    torch.linalg.vecdot(S, k, out=out[..., 0])
    return out


def _advance_(S, e, plan, ps=None):
    """One token of the normal form into S, in place, S holding S̃ = Λ ⊙ S_{t-1} on entry; returns
    [p_r] = [S̃ a_r] (into the tensors `ps` if given), formed before S changes. Writing in place matters
    on a CPU: a fresh 128 KB state per token is an mmap and its page faults."""
    if ps is None:
        ps = [_rowdot(S, e[a]) for _, a, _ in plan.corr]
    else:
        for (_, a, _), p in zip(plan.corr, ps):
            _rowdot(S, e[a], out=p)
    for (c, _, b), p in zip(plan.corr, ps):
        S.addcmul_(e[c] * p, e[b], value=-1)
    for en, wn in plan.ins:
        S.addcmul_(e[en], e[wn])
    return ps


def first_derivative_only(where: str, by: str = "the chunk backend's token loops") -> None:
    """Called first in a hand-written backward: with create_graph (a second derivative on the way) grad mode
    is on there, and the hand-written adjoint is not itself differentiable. once_differentiable guarded only
    .backward(); torch.autograd.grad(..., inputs=...) went around it and gave None or wrong values (the Triton
    op's: a first derivative with a grad_fn that failed only at the second backward, or a torch error about out=)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{where}: second derivatives (create_graph=True) are not implemented by {by}; use "
                           "backend='reference' (autograd through the step loop)")


class _RecurrentScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, block, names, tokens, S0, *flat):
        T = plan.T
        inputs = dict(zip(names, flat))
        # outputs go into one buffer: T small tensors interleaved with each block's large coefficient
        # tensors fragment glibc's heap (measured: +24 MB resident per block for Mamba at d = 64)
        o = S0.new_empty(T, plan.B, plan.H, plan.V, 1)
        ckpts = S0.new_empty(-(-T // block), *S0.shape)
        S = S0.clone()
        for j, t0 in enumerate(range(0, T, block)):
            ckpts[j].copy_(S)
            L = min(block, T - t0)
            toks = _per_token(plan.entries(_block(inputs, tokens, t0, L), L), L)
            with _serial(S.numel()):
                for i, e in enumerate(toks):
                    if plan.decay:
                        S.mul_(e["decay"])
                    _advance_(S, e, plan)
                    _rowdot(S, e["q"], out=o[t0 + i])
        ctx.plan, ctx.block, ctx.names, ctx.tokens = plan, block, names, tokens
        ctx.save_for_backward(ckpts, *flat)
        return o[..., 0].transpose(0, 1), S

    @staticmethod
    def backward(ctx, do, dS):
        first_derivative_only("chunk backend (recurrent engine)")
        plan, block, names, tokens = ctx.plan, ctx.block, ctx.names, ctx.tokens
        ckpts, *flat = ctx.saved_tensors
        decay, T = plan.decay, plan.T
        need = dict(zip(names, ctx.needs_input_grad[5:]))
        inputs = dict(zip(names, flat))
        grads = {n: None for n in names}
        G = dS.clone()
        # every per-token quantity that lives until the end of its block goes into a buffer allocated
        # once: small tensors kept alive between each block's large ones fragment glibc's heap. Views
        # into them are made once too (Python overhead is a good part of a CPU token loop).
        Lmax = min(block, T)
        states = G.new_empty(Lmax + 1, *G.shape).unbind(0)      # states[i]: S entering token i
        p_buf = G.new_empty(Lmax, plan.R, *G.shape[:-1], 1)
        p_tok = [p.unbind(0) for p in p_buf.unbind(0)]
        full, dent_tok = {}, {}
        VK = tuple(G.shape[-2:])
        for j in reversed(range(ckpts.shape[0])):
            t0 = j * block
            L = min(block, T - t0)
            with torch.enable_grad():
                leaves = {n: x.detach().requires_grad_(need[n]) for n, x in _block(inputs, tokens, t0, L).items()}
                ent = plan.entries(leaves, L)
            live = [n for n, x in ent.items() if x.requires_grad]
            shape = {n: tuple(x.shape[-2:]) for n, x in ent.items()}
            for n in live:
                if n not in full:
                    full[n] = G.new_empty(Lmax, *G.shape[:-2], *shape[n])
                    dent_tok[n] = full[n].unbind(0)
            toks = _per_token({n: x.detach() for n, x in ent.items()}, L)
            do_j = do[:, t0:t0 + L].transpose(0, 1).unsqueeze(-1).contiguous().unbind(0)
            states[0].copy_(ckpts[j])
            with _serial(G.numel()):   # the per-token loops; the block's autograd call keeps its threads
                for i, e in enumerate(toks):
                    S = states[i + 1]
                    if decay:
                        torch.mul(e["decay"], states[i], out=S)
                    else:
                        S.copy_(states[i])
                    _advance_(S, e, plan, p_tok[i])
                memo = {}

                def contract(x, y, XY):
                    """_contract, once per token for a repeated (x, y) pair: DeltaNet-like rules read G b
                    and G w with b = w. The memo keeps x and y alive, so that ids stay unique."""
                    key = (id(x), id(y), XY)
                    hit = memo.get(key)
                    if hit is None:
                        hit = memo[key] = (x, y, _contract(x, y, *XY))
                    return hit[2]

                def put(n, i, x, y, negate=False):
                    """The gradient of entry n at token i: ± Σ x ⊙ y over n's broadcast axes."""
                    out = dent_tok[n][i]
                    if shape[n] == VK and VK[-1] > 1:
                        _contract(x, y, *VK, out=out)
                    else:
                        out.copy_(contract(x, y, shape[n]))
                    if negate:
                        out.neg_()

                for i in reversed(range(L)):
                    e, ps, prev, S = toks[i], p_tok[i], states[i], states[i + 1]
                    memo.clear()
                    do_i = do_j[i]
                    G.addcmul_(do_i, e["q"])                 # G is ours: a clone or a product of this loop
                    if "q" in full:
                        put("q", i, do_i, S)
                    for en, wn in plan.ins:
                        if en in full:
                            put(en, i, G, e[wn])
                        if wn in full:
                            put(wn, i, G, e[en])
                    if plan.corr:
                        St = e["decay"] * prev if decay else prev
                    dps = []
                    for (cn, an, bn), p in zip(plan.corr, ps):   # every correction reads the same S̃ and G
                        c = e[cn]
                        cp = c * p
                        dcp = -contract(G, e[bn], tuple(cp.shape[-2:]))
                        if bn in full:
                            put(bn, i, G, cp, True)
                        if cn in full:
                            put(cn, i, dcp, p)
                        dp = _contract(dcp, c, p.shape[-2], 1)
                        if an in full:
                            put(an, i, dp, St)
                        dps.append(dp)
                    for (_, an, _), dp in zip(plan.corr, dps):
                        G.addcmul_(dp, e[an])                # G is dS̃ now
                    if decay:
                        if "decay" in full:
                            put("decay", i, G, prev)
                        G.mul_(e["decay"])
            if live:
                wrt = [n for n in names if need[n]]
                gouts = [full[n][:L] for n in live]
                got = torch.autograd.grad([ent[n] for n in live], [leaves[n] for n in wrt], gouts, allow_unused=True)
                for n, g in zip(wrt, got):
                    if g is None:
                        continue
                    if n in tokens:
                        if grads[n] is None:
                            grads[n] = torch.zeros_like(inputs[n])
                        grads[n][:, t0:t0 + L] += g.transpose(0, 1)
                    else:
                        grads[n] = g if grads[n] is None else grads[n] + g
        return (None, None, None, None, G, *[grads[n] for n in names])


def _block(inputs, tokens, t0, L):
    """The inputs named in `tokens` at tokens t0..t0+L as [L, B, ...]; the others (parameters) whole."""
    return {n: (x[:, t0:t0 + L].transpose(0, 1).contiguous() if n in tokens else x) for n, x in inputs.items()}


def recurrent_scan(plan, tokens, params, S0, block):
    """o [B, T, H, d_v] and the final state of the normal form `plan` on inputs `tokens` ([B, T, ...],
    sliced along T per block of `block` tokens, the checkpoint interval) and `params` (whole), from S0
    [B, H, d_v, d_k] in the compute dtype."""
    names = tuple(tokens) + tuple(params)
    if plan.T == 0:
        return S0.new_zeros(plan.B, 0, plan.H, plan.V), S0
    return _RecurrentScan.apply(plan, block, names, frozenset(tokens), S0, *tokens.values(), *params.values())


class _ExactXLoop(torch.autograd.Function):
    """x_t = (H_t + diag λ_t)⁻¹ q_t with H_t = γ_t H_{t−1} + X_t, X_t = Σ_r R_r u_r w_rᵀ + diag δ, token by token with
    the adjoint written out (CHUNK.md §4). X is kept in its factors: a full [B, T, H, d_k, d_k] X and its gradient
    would be 2·T·d_k² per head. H is recurrent, but given a block's states the systems are independent: per block
    of `block` tokens the states are formed one after the other, then the block's systems are factorised and
    solved in one batched call; the LU factors are kept (T·d_k² per head, what autograd through a solve keeps)
    for the backward's transposed solves, and H is checkpointed per block and recomputed there (for ∂γ).
    With A_t = H_t + diag λ_t, y_t = A_t⁻ᵀ ∂x_t and G the gradient of H_t (the later tokens' γ_{t+1} G_{t+1} and
    the final H's):

        ∂q_t = y_tᵀ    G += −y_t x_tᵀ    ∂λ_t = −y_t ⊙ x_t    ∂γ_t = ⟨G, H_{t−1}⟩    G ← γ_t G (after)
        ∂R_r = u_rᵀ G w_r    ∂u_r = R_r G w_r    ∂w_r = R_r Gᵀ u_r    ∂δ = diag G

    Autograd through the loop keeps every H_t, H_t + diag λ_t, LU factor and X_t (MesaNet at T = 2048, d_k = 64,
    B·H = 8: 2.2 GB). First derivatives only."""

    @staticmethod
    def _states(Hbuf, H_prev, t0, gt, diag, terms):
        """Hbuf[i] = H of token t0 + i, from H_prev (the state before the block)."""
        for i in range(Hbuf.shape[0]):
            t = t0 + i
            prev = H_prev if i == 0 else Hbuf[i - 1]
            h = Hbuf[i]
            if gt is None:
                h.copy_(prev)
            else:
                torch.mul(prev, gt[t], out=h)
            for R, u, w in terms:
                h.addcmul_(u[t].mT * R[t], w[t])
            if diag is not None:
                h.diagonal(dim1=-2, dim2=-1).add_(diag[t][..., 0, :])
        return Hbuf

    @staticmethod
    def forward(ctx, block, gam, ridge, q, H0, diag, *factors):
        B, T, Hh, _, K = q.shape
        tm = lambda v, c: None if v is None else torch.broadcast_to(v, (B, T, Hh, *c)).transpose(0, 1)  # [T, B, H, ·]
        terms = [(tm(R, (1, 1)), tm(u, (1, K)), tm(w, (1, K))) for R, u, w in zip(*[iter(factors)] * 3)]
        gt, lam, qt, dg = tm(gam, (1, 1)), tm(ridge, (1, K)), tm(q, (1, K)), tm(diag, (1, K))
        x = q.new_empty(T, B, Hh, K, 1)
        LU = q.new_empty(T, B, Hh, K, K)
        piv = torch.empty(T, B, Hh, K, dtype=torch.int32, device=q.device)
        cks = q.new_empty(-(-T // block), B, Hh, K, K)
        H = H0.detach().to(q.dtype)
        for i, t0 in enumerate(range(0, T, block)):
            t1 = min(T, t0 + block)
            cks[i] = H
            Hb = _ExactXLoop._states(LU[t0:t1], H, t0, gt, dg, terms)          # the states, in LU's storage
            H = Hb[-1].clone()
            Hb.diagonal(dim1=-2, dim2=-1).add_(lam[t0:t1][..., 0, :])         # A = H + diag λ, in place
            lu, pv, _ = torch.linalg.lu_factor_ex(Hb)
            LU[t0:t1], piv[t0:t1] = lu, pv
            x[t0:t1] = torch.linalg.lu_solve(lu, pv, qt[t0:t1].mT)
        ctx.block, ctx.n = block, len(terms)
        ctx.shapes = [None if v is None else v.shape for v in (gam, ridge, q, H0, diag, *factors)]
        ctx.save_for_backward(gam, diag, x, LU, piv, cks, *factors)
        return x.transpose(0, 1), H

    @staticmethod
    def backward(ctx, dx, dHT):
        first_derivative_only("chunk backend (exact rules' x loop)")
        gam, diag, x, LU, piv, cks, *factors = ctx.saved_tensors
        block = ctx.block
        T, B, Hh, K, _ = x.shape
        need = ctx.needs_input_grad
        need_g, need_l, need_q, need_h0, need_d = need[1:6]
        tm = lambda v, c: None if v is None else torch.broadcast_to(v, (B, T, Hh, *c)).transpose(0, 1)
        terms = [(tm(R, (1, 1)), tm(u, (1, K)), tm(w, (1, K))) for R, u, w in zip(*[iter(factors)] * 3)]
        gt, dg = tm(gam, (1, 1)), tm(diag, (1, K))
        dx = torch.zeros_like(x) if dx is None else dx.transpose(0, 1)
        Y = torch.linalg.lu_solve(LU, piv, dx, adjoint=True)                  # A_t⁻ᵀ ∂x_t, all tokens at once
        G = torch.zeros_like(cks[0]) if dHT is None else dHT.to(x.dtype).clone()
        dgam = x.new_zeros(T, B, Hh, 1, 1) if need_g and gam is not None else None
        ddiag = x.new_empty(T, B, Hh, 1, K) if need_d and diag is not None else None
        dterms = [[x.new_empty(T, B, Hh, 1, 1), x.new_empty(T, B, Hh, 1, K), x.new_empty(T, B, Hh, 1, K)]
                  for _ in terms]
        Hbuf = x.new_empty(block, B, Hh, K, K) if dgam is not None else None
        for i in reversed(range(cks.shape[0])):
            t0, t1 = i * block, min(T, (i + 1) * block)
            Hb = _ExactXLoop._states(Hbuf[:t1 - t0], cks[i], t0, gt, dg, terms) if dgam is not None else None
            for t in reversed(range(t0, t1)):
                G.sub_(Y[t] @ x[t].mT)
                for (R, u, w), (dR, du, dw) in zip(terms, dterms):
                    Gw = G @ w[t].mT                                           # [B, H, K, 1]
                    dR[t] = u[t] @ Gw               # assigned, not out=: under bf16 autocast @ returns bf16
                    torch.mul(Gw.mT, R[t], out=du[t])
                    torch.mul(u[t] @ G, R[t], out=dw[t])
                if ddiag is not None:
                    ddiag[t] = G.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)
                if gt is not None:
                    if dgam is not None:
                        dgam[t] = (G * (Hb[t - t0 - 1] if t > t0 else cks[i])).sum((-2, -1), keepdim=True)
                    G.mul_(gt[t])
        sg, sl, sq, sh, sd, *sf = ctx.shapes
        out = lambda v, shape: v.transpose(0, 1).sum_to_size(shape)
        df = []
        for r, (dR, du, dw) in enumerate(dterms):
            df += [out(dR, sf[3 * r]) if need[6 + 3 * r] else None, out(du, sf[3 * r + 1]) if need[7 + 3 * r] else None,
                   out(dw, sf[3 * r + 2]) if need[8 + 3 * r] else None]
        return (None, out(dgam, sg) if dgam is not None else None, out(-(Y * x).mT, sl) if need_l else None,
                out(Y.mT, sq) if need_q else None, G.to(dx.dtype) if need_h0 else None,
                out(ddiag, sd) if ddiag is not None else None, *df)


def exact_x_loop(gam, terms, diag, ridge, q, H0, block: int):
    """x [B, T, H, K, 1] and H_T for x_t = (H_t + diag λ_t)⁻¹ q_t, H_t = γ_t H_{t−1} + Σ_r R_r u_rᵀ w_r + diag δ (γ, δ
    None: absent); terms [(R [.., 1, 1], u [.., 1, K], w [.., 1, K])], δ, λ (ridge), q per token [B, T, H, 1, ·]
    (broadcastable), H0 [B, H, K, K]. _ExactXLoop: a token loop with a written-out backward."""
    flat = [f for term in terms for f in term]
    if torch.compiler.is_compiling():
        # torch.compile runs the loop as it is (a graph break) instead of tracing it: dynamo unrolled it, so the
        # compile time grew with T (an exact rule at T = 10 / 20 / 40: 21 / 31 / 47 s, ~0.9 s a token). Decorated
        # here, not where it is defined: importing torch._dynamo imports triton.language, which must come after a
        # caller's TRITON_INTERPRET=1
        from torch import _dynamo
        return _dynamo.disable(_ExactXLoop.apply)(block, gam, ridge, q, H0, diag, *flat)
    return _ExactXLoop.apply(block, gam, ridge, q, H0, diag, *flat)
