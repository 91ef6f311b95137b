"""backend="triton" for recursive-least-squares rules: the Riccati gain scan as a kernel (the split
into a gain scan and S's normal-form scan is olssm/kernels/rls.py; math in TRITON.md, "Recursive
least squares").

``rls_gain_fwd_kernel``: one program per (sequence, head) holds P [d_k, d_k] in registers and
writes g_t = P_t u_t, O(d_k²) per token, sequential by nature; it saves P entering every chunk of
C tokens. ``rls_gain_bwd_kernel`` walks time in reverse with dP = ∂L/∂P_t in registers,
recomputing P_{t-1} of each chunk from its checkpoint (a = P̃u, den = 1 + R uᵀa, g = a/den):

    dâ   = dg/den                               dden  = −(dg·a)/den²
    dâ  −= (R/den)(dP + dPᵀ) a                  dR    = −aᵀdP a/den,   dden += R aᵀdP a/den²
    dR  += (uᵀa)·dden,   ds = R·dden            du    = ds·a,          dâ   += ds·u
    dP̃   = dP + dâ uᵀ                           du   += P̃ᵀ dâ
    dγ   = −⟨dP̃, P̃⟩/γ                            dP_{t-1} = sym(dP̃)/γ

P is kept symmetric (symmetrised after every step), and dP with it: the antisymmetric part of rounding
in either would grow like Π 1/γ (RLS's known loss of symmetry).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..recurrent import first_derivative_only
from ..rls import s_rule
from .chunked import _np2, _sequence
from .scan import checkpoint_interval, longest

#: warps per program of the gain kernels by BK: P (and dP, P̃ in the backward) are [BK, BK] fp32 tiles
#: in registers. sm_90 resource report (aot_check's compiler, fwd / bwd, stack = spills per thread), with P
#: symmetrised every step (session 7): BK 64, 8 warps: 198 / 255 regs, 0 / 96 B; BK 128, 16 warps: 592 / 2056 B
#: of stack (the three tiles alone are 48 K of the 64 K registers)
NUM_WARPS = {16: 4, 32: 4, 64: 8}


def _warps(BK: int) -> int:
    return NUM_WARPS.get(BK, 4 if BK < 16 else 16)


def _gain_block(K: int) -> int:
    """P's tile: at least 16 (a [4, 4] tile over 4 warps is mostly copies of itself)."""
    return max(16, _np2(K))


@triton.jit
def _riccati(P, u, gam, r, m2):
    """One forgetting + Sherman–Morrison step: (P_t, a = P̃ u, den) from P_{t-1}."""
    Pt = P / gam
    a = tl.sum(Pt * u[None, :], axis=1)
    den = 1.0 + r * tl.sum(a * u)
    P = tl.where(m2, Pt - (r / den) * (a[:, None] * a[None, :]), 0.0)
    # symmetrised every step: (R/den)·(a_i a_j) is symmetric on paper, but compiled, a[:, None] and a[None, :] can be
    # different threads' copies of a, reduced in different orders (sm_90, d_k = 3: |P − Pᵀ| reached 9 by T = 160
    # while |P| ≈ 0.4), and the antisymmetric part grows like Π 1/γ
    return 0.5 * (P + tl.trans(P)), Pt, a, den


@triton.jit
def _program(cu_ptr, T, H, DK, BK: tl.constexpr, VARLEN: tl.constexpr):
    """The program's (sequence, head), its token range, and P's [BK, BK] tile: indices, masks, offsets."""
    i_nh = tl.program_id(0)
    bos, eos = _sequence(cu_ptr, i_nh // H, T, VARLEN)
    idx = tl.arange(0, BK)
    km = idx < DK
    # token offsets · H · d_k can pass 2³¹: int64 token indices
    return (i_nh, i_nh % H, bos.to(tl.int64), eos.to(tl.int64), idx, km, km[:, None] & km[None, :],
            idx[:, None] * DK + idx[None, :], i_nh.to(tl.int64) * DK * DK)


@triton.jit
def rls_gain_fwd_kernel(u_ptr, gam_ptr, r_ptr, p0_ptr, g_ptr, pt_ptr, ck_ptr, cu_ptr, T, H, DK, NCK,
                        BK: tl.constexpr, C: tl.constexpr, SAVE_CK: tl.constexpr, VARLEN: tl.constexpr):
    i_nh, i_h, bos, eos, idx, km, m2, poff, base = _program(cu_ptr, T, H, DK, BK, VARLEN)
    P = tl.load(p0_ptr + base + poff, mask=m2, other=0.0)
    # as the reference's step, which symmetrises its input (exact after the first; an empty sequence keeps P_0)
    P = tl.where(eos > bos, 0.5 * (P + tl.trans(P)), P)
    for tt in range(bos, eos):
        if SAVE_CK:
            rel = tt - bos
            if rel % C == 0:
                tl.store(ck_ptr + (i_nh.to(tl.int64) * NCK + rel // C) * DK * DK + poff, P, mask=m2)
        tok = tt * H + i_h
        u = tl.load(u_ptr + tok * DK + idx, mask=km, other=0.0)
        P, Pt, a, den = _riccati(P, u, tl.load(gam_ptr + tok), tl.load(r_ptr + tok), m2)
        tl.store(g_ptr + tok * DK + idx, a / den, mask=km)
    tl.store(pt_ptr + base + poff, P, mask=m2)


@triton.jit
def rls_gain_bwd_kernel(u_ptr, gam_ptr, r_ptr, ck_ptr, scr_ptr, dg_ptr, dpt_ptr, du_ptr, dgam_ptr, dr_ptr,
                        dp0_ptr, cu_ptr, T, H, DK, NCK, BK: tl.constexpr, C: tl.constexpr,
                        USE_DPT: tl.constexpr, VARLEN: tl.constexpr):
    i_nh, i_h, bos, eos, idx, km, m2, poff, base = _program(cu_ptr, T, H, DK, BK, VARLEN)
    scr = scr_ptr + i_nh.to(tl.int64) * C * BK * BK + idx[:, None] * BK + idx[None, :]
    dP = tl.zeros([BK, BK], tl.float32)
    if USE_DPT:
        dP += tl.load(dpt_ptr + base + poff, mask=m2, other=0.0)
    nck = (eos - bos + C - 1) // C
    for jc in range(0, nck):
        ic = nck - 1 - jc
        t0 = bos + ic * C
        t1 = tl.minimum(t0 + C, eos)
        # recompute P_{t-1} of the chunk's tokens from the checkpoint
        P = tl.load(ck_ptr + (i_nh.to(tl.int64) * NCK + ic) * DK * DK + poff, mask=m2, other=0.0)
        for tt in range(t0, t1):
            tl.store(scr + (tt - t0) * BK * BK, P)
            tok = tt * H + i_h
            u = tl.load(u_ptr + tok * DK + idx, mask=km, other=0.0)
            P, Pt, a, den = _riccati(P, u, tl.load(gam_ptr + tok), tl.load(r_ptr + tok), m2)
        tl.debug_barrier()
        for jt in range(0, t1 - t0):
            tt = t1 - 1 - jt
            tok = tt * H + i_h
            u = tl.load(u_ptr + tok * DK + idx, mask=km, other=0.0)
            gam = tl.load(gam_ptr + tok)
            r = tl.load(r_ptr + tok)
            Pn, Pt, a, den = _riccati(tl.load(scr + (tt - t0) * BK * BK), u, gam, r, m2)
            dg = tl.load(dg_ptr + tok * DK + idx, mask=km, other=0.0)
            # g = a/den and P_t = P̃ − (R/den) a aᵀ
            da = dg / den
            dden = -tl.sum(dg * a) / (den * den)
            dPa = tl.sum(dP * a[None, :], axis=1)
            dPTa = tl.sum(dP * a[:, None], axis=0)
            ada = tl.sum(a * dPa)
            da += -(r / den) * (dPa + dPTa)
            dr = -ada / den
            dden += r * ada / (den * den)
            # den = 1 + R uᵀa
            s = tl.sum(a * u)
            dr += s * dden
            ds = r * dden
            du = ds * a
            da += ds * u
            # a = P̃ u, P̃ = P_{t-1}/γ
            dPt = dP + da[:, None] * u[None, :]
            du += tl.sum(Pt * da[:, None], axis=0)
            tl.store(du_ptr + tok * DK + idx, du, mask=km)
            tl.store(dgam_ptr + tok, -tl.sum(tl.where(m2, dPt * Pt, 0.0)) / gam)
            tl.store(dr_ptr + tok, dr)
            dP = tl.where(m2, dPt / gam, 0.0)
            dP = 0.5 * (dP + tl.trans(dP))   # the adjoint of the step's symmetrisation: no Π 1/γ growth
        tl.debug_barrier()
    tl.store(dp0_ptr + base + poff, dP, mask=m2)


# sizes = [B, T, H, d_k, N, C]
def _nck(sizes, max_len):
    return max(1, -(-max_len // sizes[5]))


@torch.library.custom_op("olssm::rls_gain_fwd", mutates_args=())
def rls_gain_fwd(u: Tensor, gamma: Tensor, R: Tensor, P0: Tensor, cu_seqlens: Optional[Tensor], sizes: list[int],
                 max_len: int, save: bool) -> tuple[Tensor, Tensor, Tensor]:
    """g [B, T, H, d_k], P_T [N, H, d_k, d_k], checkpoints [N, H, NCK, d_k, d_k] (fp32)."""
    B, T, H, K, N, C = sizes
    dev = u.device
    g = torch.empty(B, T, H, K, dtype=torch.float32, device=dev)
    Pt = torch.empty(N, H, K, K, dtype=torch.float32, device=dev)
    NCK = _nck(sizes, max_len)
    BK = _gain_block(K)
    alloc = torch.zeros if cu_seqlens is not None else torch.empty   # varlen: unwritten slots of short sequences
    ck = alloc(N, H, NCK, K, K, dtype=torch.float32, device=dev) if save else Pt.new_empty(0)
    rls_gain_fwd_kernel[(N * H,)](u, gamma, R, P0, g, Pt, ck if save else Pt,
                                  cu_seqlens if cu_seqlens is not None else Pt, T, H, K, NCK, BK=BK, C=C,
                                  SAVE_CK=save, VARLEN=cu_seqlens is not None, num_warps=_warps(BK))
    return g, Pt, ck


@rls_gain_fwd.register_fake
def _(u, gamma, R, P0, cu_seqlens, sizes, max_len, save):
    B, T, H, K, N, C = sizes
    ck = u.new_empty(N, H, _nck(sizes, max_len), K, K) if save else u.new_empty(0)
    return u.new_empty(B, T, H, K), u.new_empty(N, H, K, K), ck


@torch.library.custom_op("olssm::rls_gain_bwd", mutates_args=())
def rls_gain_bwd(u: Tensor, gamma: Tensor, R: Tensor, ck: Tensor, cu_seqlens: Optional[Tensor], dg: Tensor,
                 dPt: Optional[Tensor], sizes: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """∂u, ∂γ, ∂R, ∂P_0 from ∂g and ∂P_T."""
    B, T, H, K, N, C = sizes
    BK = _gain_block(K)
    du, dgam, dr = torch.empty_like(u), torch.empty_like(gamma), torch.empty_like(R)
    dP0 = torch.empty(N, H, K, K, dtype=torch.float32, device=u.device)
    scratch = torch.empty(N * H * C * BK * BK, dtype=torch.float32, device=u.device)
    rls_gain_bwd_kernel[(N * H,)](u, gamma, R, ck, scratch, dg.contiguous(), dPt.contiguous() if dPt is not None else dP0,
                                  du, dgam, dr, dP0, cu_seqlens if cu_seqlens is not None else dP0, T, H, K,
                                  ck.shape[2], BK=BK, C=C, USE_DPT=dPt is not None, VARLEN=cu_seqlens is not None,
                                  num_warps=_warps(BK))
    return du, dgam, dr, dP0


@rls_gain_bwd.register_fake
def _(u, gamma, R, ck, cu_seqlens, dg, dPt, sizes):
    B, T, H, K, N, C = sizes
    return torch.empty_like(u), torch.empty_like(gamma), torch.empty_like(R), u.new_empty(N, H, K, K)


def _setup(ctx, inputs, output):
    u, gamma, R, P0, cu_seqlens, sizes, max_len, save = inputs
    ctx.sizes, ctx.save, ctx.has_cu = list(sizes), save, cu_seqlens is not None
    ctx.save_for_backward(u, gamma, R, output[2], *([cu_seqlens] if cu_seqlens is not None else []))
    # an unused output's gradient comes as None, not as zeros: the checkpoints' would be NCK·d_k² per sequence·head
    ctx.set_materialize_grads(False)


def _backward(ctx, dg, dPt, dck):
    first_derivative_only("the RLS gain scan", by="backend='triton'")
    if not ctx.save:
        raise RuntimeError("olssm rls gain scan: no checkpoints were saved (no input required grad)")
    u, gamma, R, ck, *cu = ctx.saved_tensors
    if dg is None:
        dg = torch.zeros_like(u)
    du, dgam, dr, dP0 = rls_gain_bwd(u, gamma, R, ck, cu[0] if ctx.has_cu else None, dg, dPt, ctx.sizes)
    return du, dgam, dr, dP0, None, None, None, None


torch.library.register_autograd("olssm::rls_gain_fwd", _backward, setup_context=_setup)


def _triton_gain_scan(u, gamma, R, P0, cu):
    B, T, H, K = u.shape
    N = P0.shape[0]
    max_len = longest(T, cu)
    sizes = [B, T, H, K, N, checkpoint_interval(max_len)]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (u, gamma, R, P0))
    g, Pt, _ = torch.ops.olssm.rls_gain_fwd(u, gamma, R, P0, cu, sizes, max_len, save)
    return g, Pt


def triton_rls_scan(args):
    """o [B, T, H, d_v] (args.out_dtype) and (if asked) the final (S, P), fp32: the gain kernel, then
    S's scan through the generated kernels."""
    from ..rls import rls_scan
    from .scan import _check_device
    _check_device(args.device)
    if args.initial_state is not None:
        _check_device(args.initial_state[1].device)
    return rls_scan(args, _triton_gain_scan, "triton")


def kernel_source(rule) -> str:
    """The gain kernels (the Riccati recursion, shared by every RLS rule) and the generated S scan."""
    from .codegen import module_source
    return ("# recursive least squares: the gain g_t = P_t u_t comes from the Riccati kernels below (coefficients\n"
            "# evaluated in torch from the rule); S's scan is the generated normal-form module that follows\n"
            "# (olssm/kernels/triton/rls.py)\n\n"
            + "\n\n".join(inspect.getsource(f.fn) for f in (_riccati, _program, rls_gain_fwd_kernel, rls_gain_bwd_kernel))
            + "\n\n" + module_source(s_rule()))
