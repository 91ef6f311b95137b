"""Chunked backward of the delta-rule family with a scalar or row c and none / scalar decay (TRITON.md, "Backward");
row decays with corrections have their own kernel at the end (chunk_rowdecay_bwd_kernel).

Forward, per chunk of BT tokens (b = cumulative log decay from the chunk start, Γ = e^b, Γ_L = e^{b_last},
dec = Γ_L/Γ, D_ij = e^{b_i − b_j} for i ≥ j else 0, D_st its strictly lower part):

    N = A Bᵀ ⊙ D_st,   L = diag(c) N,   T_c = (I + L)⁻¹
    R' = Γ ⊙ A S₀ᵀ + Σ_m (A W_mᵀ ⊙ D_st) E_m
    Δ  = T_c diag(c) R'    (= W̃ S₀ᵀ + Ũ of the split forward: Δ_t = c_t γ_t S_{t−1} a_t,
                            and R' − N Δ = γ_t S_{t−1} a_t, the correction's prediction)
    O  = Γ ⊙ Q S₀ᵀ − (Q Bᵀ ⊙ D) Δ + Σ_m (Q W_mᵀ ⊙ D) E_m
    S' = Γ_L S₀ − (dec ⊙ Δ)ᵀ B + Σ_m (dec ⊙ E_m)ᵀ W_m

Backward, with dO = ∂L/∂O and dS = ∂L/∂S' (the chunk end):

    dΔ  = −(Q Bᵀ ⊙ D)ᵀ dO − dec ⊙ (B dSᵀ)                 (∂ through O and S')
    dR  = T_cᵀ dΔ,  dR' = c ⊙ dR                          (∂ of the right-hand side R = c ⊙ R')
    dL  = −dR Δᵀ (strictly lower),  dN = diag(c) dL = −(dR' Δᵀ) ⊙ strict
    dS₀ = Γ_L dS + (Γ ⊙ dO)ᵀ Q + dR'ᵀ (Γ ⊙ A) = Γ_L dS + (Γ ⊙ dO)ᵀ Q + dΔᵀ W̃

So the chunk has two "readouts" of the same shape: Q with dO and the inclusive D, and A with dR' and
D_st (the correction's own prediction γ_t S_{t−1} a_t); with OD = (dO Δᵀ) ⊙ D, OE_m = (dO E_mᵀ) ⊙ D,
RD = (dR' Δᵀ) ⊙ D_st, RE_m = (dR' E_mᵀ) ⊙ D_st:

    dQ   = Γ ⊙ (dO S₀) + Σ_m OE_m W_m − OD B              dA  = Γ ⊙ (dR' S₀) + Σ_m RE_m W_m − RD B
    dB   = −ODᵀ Q − RDᵀ A − (dec ⊙ Δ) dS                   dW_m = OE_mᵀ Q + RE_mᵀ A + (dec ⊙ E_m) dS
    dE_m = (Q W_mᵀ ⊙ D)ᵀ dO + (A W_mᵀ ⊙ D_st)ᵀ dR' + dec ⊙ (W_m dSᵀ)
    ∂c_i = Σ_v dR_iv R'_iv + Σ_j dL_ij N_ij = Γ_i a_i·(dR S₀)_i + Σ_j U_ij,
           U = [Σ_m (dR E_mᵀ) ⊙ (A W_mᵀ) − (dR Δᵀ) ⊙ (A Bᵀ)] ⊙ D_st
    ∂b_i = Γ_i q_i·(dO S₀)_i + Σ_j T_ij − Σ_j T_ji + c_i ∂c_i − Σ_j c_j U_ji − X_i
           T = [Σ_m (dO E_mᵀ) ⊙ (Q W_mᵀ) − (dO Δᵀ) ⊙ (Q Bᵀ)] ⊙ D,
           X_j = dec_j (Σ_m e_m,j·(W_m dSᵀ)_j − Δ_j·(B dSᵀ)_j)
    ∂b_last += Γ_L ⟨dS, S₀⟩ + Σ_j X_j,   ∂(log γ)_t = Σ_{i ≥ t in the chunk} ∂b_i

Four launches (prep and value take the split forward's wide value blocks, ≤ SPLIT_BLOCK_V rows):
- ``chunk_delta_bwd_prep_kernel`` (chunks × heads, parallel): T_c (forward substitution, stored
  [B, T, H, BT]), W̃ and the state-independent part of dΔ, −(Q Bᵀ ⊙ D)ᵀ dO;
- ``chunk_delta_bwd_state_kernel`` (value blocks × sequences·heads, reverse over chunks, dS in registers,
  3 dots per chunk): dh ← dS (the chunk end's gradient, shaped like ck), dΔ −= dec ⊙ (B dSᵀ) (in place),
  dS ← dS₀; dh0 at the end;
- ``chunk_delta_bwd_value_kernel`` (chunks × value blocks × heads): Δ = T_c (c ⊙ R') from ck → dl,
  ∂c_i = Σ_v dR_iv (R' − N Δ)_iv (partial over value blocks), dR' = c ⊙ T_cᵀ dΔ (over dΔ), dE_m;
- ``chunk_delta_bwd_key_kernel`` (chunks × KEY_BLOCK_K key columns × heads, a loop over the value blocks):
  dQ, dA, dB, dW_m and ∂ log γ by the identity ∂b_i = q_i·dQ_i + a_i·dA_i − Σ_m w_m,i·dW_m,i − b_i·dB_i
  (the row sums of T and c ⊙ U and the Γ terms are q·dQ and a·dA, their column sums and X are w·dW and
  b·dB), ∂b_last += Γ_L ⟨dS, S₀⟩ + Σ_j X_j (partial over key blocks). With a = b = w_0 one tensor (SAME_KEY, on:
  DeltaNet, Gated DeltaNet, Longhorn) it writes dQ and dK = dA + dB + dW_0 alone, from E − Δ (_same_key_grads).
The callers sum the partials. Extra memory (fp32): dh like ck, T_c (BT per token·head), W̃, dΔ / dR', Δ; under bf16
operands the buffers that are only ever dot operands are bf16 (chunked.OPERAND_BUFFERS: W̃, T_c, dh without a decay,
dR' in a buffer of its own beside dΔ's, Δ for the general key kernel).
TIED (w_0 = b: DeltaNet, Gated DeltaNet; chunked._tied, as the split forward): A W_0ᵀ ⊙ D_st = N, and since
dΔ = −(Q Bᵀ ⊙ D)ᵀ dO − dec ⊙ (B dSᵀ), dE_0 = Nᵀ dR' − dΔ — the value kernel forms N once and no Q W_0ᵀ, A W_0ᵀ,
W_0 dSᵀ; the key kernel's dQ = Γ ⊙ (dO S₀) + (OE_0 − OD) B + Σ_{m≥1} OE_m W_m (dA likewise), one product
with B instead of two. dB and dW_0 stay separate outputs.

Row c (Longhorn's ε = β/(1 + β kᵀk), one c per value row i): each value row is its own scalar-c delta rule,
Δ[:, i] = T_c⁽ⁱ⁾ (c[:, i] ⊙ R'[:, i]) with T_c⁽ⁱ⁾ = (I + diag(c[:, i]) N)⁻¹, so there is no state-independent
T_c / W̃ per chunk. Per value row the adjoint is the transpose solve, dR[:, i] = T_c⁽ⁱ⁾ᵀ dΔ[:, i], i.e. the
backward substitution dR_s = dΔ_s − Σ_{r>s} N_rs c_r dR_r; ∂c = dR ⊙ (R' − N Δ) elementwise; and since N is
shared by the rows, dN = −Σ_i (c_i ⊙ dR_i) Δ_iᵀ = −(dR' Δᵀ) ⊙ strict as before, so dQ, dA, dB, dW_m, dE_m and
∂ log γ are the formulas above in terms of dR' = c ⊙ dR and Δ, and dS₀ = Γ_L dS + (Γ ⊙ dO)ᵀ Q + dR'ᵀ (Γ ⊙ A)
(= dΔᵀ W̃ of the scalar case). Four launches (``chunked_rowc_backward``):
- ``chunk_rowc_bwd_prep_kernel`` (chunks × value blocks × heads): P = R' − N Δ by the forward substitution per
  row from ck (Δ = c ⊙ P) → p, and dΔ's local part −(Q Bᵀ ⊙ D)ᵀ dO → dd;
- ``chunk_rowc_bwd_state_kernel`` (value blocks × sequences·heads, reverse over chunks, dS in registers):
  dh ← dS, dΔ = dd − dec ⊙ (B dSᵀ), the backward substitution → dR (over dd), dS ← dS₀; dh0 at the end;
- ``chunk_rowc_bwd_value_kernel`` (chunks × value blocks × heads): ∂c = dR ⊙ P, dR' = c ⊙ dR, Δ = c ⊙ P, dE_m;
- ``chunk_delta_bwd_key_kernel`` as above.
Extra memory (fp32): dh like ck, P / Δ and dΔ / dR / dR' ([B, T, H, d_v] each).
"""
from __future__ import annotations


import sympy as sp
import torch
import triton
import triton.language as tl

from ...objectives.core import ROW
from . import chunked as _ch
from .chunked import (_c_row, _chunk_decay, _chunk_value_tile, _delta_chunk, _dot_rows_k, _np2,
                      _delta_tiles, _initial_tile, _mm, _precision, _rank_offset, _row_decay_tiles,
                      _rowdecay_delta_chunk, _sequential_decay, _value_side,
                      _sequential_program, _store_operand, _store_wt, _strict, _token_column, _tokens,
                      _straddle_sum, _straddled_decay_grad, _sum_before, _ut_inverse,
                      fast_span, switch)

#: the delta family's backward (scalar or row c, none / scalar decay): "chunk" (the kernels of this module) or
#: "recurrent" (the fused recurrent backward on the chunked forward's checkpoints, as before).
#: OLSSM_TRITON_DELTA_BACKWARD overrides.
DELTA_BACKWARD = "chunk"
#: key columns per tl.dot operand in the value kernel (sm_90, tf32, 8 warps, BT = 32, d_k = 128, 64-row value
#: blocks: 64 columns spilled 176 B/thread, 32 columns 112 B; d_k = 64: 40 → 0 B)
VALUE_BLOCK_K = 32
#: key columns per program of the key kernel (32 columns spilled more: 256 vs 72 B/thread)
KEY_BLOCK_K = 64
#: a row c (Longhorn): "chunk" (the row-c kernels of this module, under DELTA_BACKWARD = "chunk") or "recurrent"
#: (the fused recurrent backward on the chunked forward's checkpoints, as before; for benchmarking).
#: OLSSM_TRITON_ROW_C_BACKWARD overrides.
ROW_C_BACKWARD = "chunk"
#: the key kernel for a = b = w_0 (one correction, one input term, sympy-equal key sides: DeltaNet, Gated DeltaNet,
#: Longhorn; chunked.chunk_inputs makes them one tensor): autograd summed that tensor's three gradients dA + dB + dW_0
#: (two fp32 [B, T, H, d_k] adds, 34 MB at (2, 1024, 16, 128)); with SAME_KEY the kernel writes dK = dA + dB + dW_0
#: itself, from E − Δ alone (5 value-loop products instead of 8, 4 after it instead of 6 tied or 8 untied:
#: _same_key_grads), and the op returns it once (chunked.shared_key_inputs); sm_90 spills of the key kernel 272 → 32
#: B/thread (DeltaNet, bf16, chunk 64, d 128, 2 stages; TUNING.md, "Same-key key kernel"). On since session 11 (H100
#: 80GB HBM3, Triton 3.6.0; (2, 8192, 16, 128) bf16, one process, the defaults' fwd+bwd spread 0.06 / 0.14 ms):
#: fwd+bwd DeltaNet 6.19 → 5.72 ms (1.07× the faster default row), Gated DeltaNet 7.75 → 7.32 (1.04×), the forward
#: within drift. OLSSM_TRITON_SAME_KEY (0 / 1) overrides; 0 runs the general key kernel and autograd's sum
SAME_KEY = True
#: a scalar decay's ∂g in the key kernel (Gated DeltaNet's α) summed where its pair terms straddle each token
#: (_straddled_decay_grad), not as a reverse sum of per-token ∂b whose pair terms cancel: that left ε·O(1) where a
#: strong decay makes the true ∂g tiny (∂ through a scale of log α: 6.5e-4 relative at scale 100, fp32,
#: interpreter; 1.0e-8 on, the chunk backend 1.0e-7). Costs the pair matrix: two [BT, KB] × [KB, BT] dots per
#: key block (tied, one input term), 2 + 2M untied; untimed on a GPU. OLSSM_TRITON_DELTA_STRADDLE (0 / 1) overrides.
DECAY_STRADDLE = True
#: num_warps / num_stages of the split delta backward's four kernels (the UT transform's adjoint PREP, the reverse state
#: pass STATE, dE / dc VALUE, dQ / dK / ∂ log γ KEY, the last also for the row-c backward), one pair per kernel; None:
#: chunked._launch_opts' (NUM_WARPS, and NUM_STAGES or WIDE_STAGES on the wide-key path). The forward's three are
#: chunked.DELTA_*_WARPS / _STAGES, the reverse pass's value rows chunked.DELTA_STATE_BLOCK_V. Untimed
#: (benchmarks/kernel_sweep.py)
PREP_WARPS = PREP_STAGES = None
STATE_WARPS = STATE_STAGES = None
VALUE_WARPS = VALUE_STAGES = None
KEY_WARPS = KEY_STAGES = None


def dh_storage(prec: str, gated: bool) -> torch.dtype:
    """The dtype of dh (∂L/∂S at every chunk's end: the split delta backward's reverse pass writes it, its value and
    key kernels read it) for dots of precision prec: without a decay every read of dh is a dot operand, so
    chunked.operand_storage's (bf16 under bf16 operands: 268 → 134 MB per backward at (2, 8192, 16, 128), written
    once and read by the key kernel, and by the value kernel with more input terms, without an fp32 → bf16 conversion
    in their loops); fp32 with a decay, whose ∂ log γ sums ⟨dS, S₀⟩ in fp32 (the key kernel's SS), where the
    cancelling terms need dS whole."""
    return torch.float32 if gated else _ch.operand_storage(prec, "dh")


def dr_storage(prec: str) -> torch.dtype:
    """The dtype of dR′ = c ⊙ T_cᵀ dΔ (the value kernel writes it, the key kernel reads it) for dots of precision prec:
    every read is a dot operand (dR′ Δᵀ, dR′ E_mᵀ, dR′ S₀; with one key tensor dR′ (E − Δ)ᵀ and dR′ S₀), so
    chunked.operand_storage's "dr". dΔ, which the value kernel overwrote with dR′ in place, stays fp32 (the reverse
    pass updates it, dE₀ = Nᵀ dR′ − dΔ reads it): a bf16 dR′ is a buffer of its own, the fp32 dΔ freed before the key
    kernel's outputs are allocated."""
    return _ch.operand_storage(prec, "dr")


def dl_storage(prec: str, same: bool) -> torch.dtype:
    """The dtype of the backward's Δ (the value kernel writes it, the key kernel reads it) for dots of precision prec:
    the general key kernel reads it as a dot operand only (dO Δᵀ, dR′ Δᵀ, Δ dS), so chunked.operand_storage's "dl";
    fp32 for the same-key kernel (same), which forms E − Δ in fp32 before its dots."""
    return torch.float32 if same else _ch.operand_storage(prec, "dl")


#: value rows per program of the row-c prep and value kernels (sm_90, tf32, 8 warps, BT = 32, d_k = d_v = 64:
#: 64 rows 172-186 regs and no spills; 32 rows 176-255 regs, value 8 B, at twice the repeated [BT, BT] work)
ROWC_BLOCK_V = 64


def delta_backward(row_c: bool = False) -> str:
    """"chunk" or "recurrent": the delta family's backward (row_c: for a row c, where ROW_C_BACKWARD also applies)."""
    mode = switch("OLSSM_TRITON_DELTA_BACKWARD", DELTA_BACKWARD, ("chunk", "recurrent"), "delta backward")
    if row_c and mode == "chunk":
        mode = switch("OLSSM_TRITON_ROW_C_BACKWARD", ROW_C_BACKWARD, ("chunk", "recurrent"), "row-c backward")
    return mode


def same_key_on() -> bool:
    """SAME_KEY, or OLSSM_TRITON_SAME_KEY (0 / 1) if set; checked."""
    return _ch.switch_on("OLSSM_TRITON_SAME_KEY", SAME_KEY, "same key")


def straddle_on() -> bool:
    """DECAY_STRADDLE, or OLSSM_TRITON_DELTA_STRADDLE (0 / 1) if set; checked."""
    return _ch.switch_on("OLSSM_TRITON_DELTA_STRADDLE", DECAY_STRADDLE, "delta straddle")


def same_key(form) -> bool:
    """SAME_KEY (or OLSSM_TRITON_SAME_KEY: same_key_on) and the rule's key sides are one expression: a = b = w_0, one
    correction and one input term, and not a row decay (its own kernel, chunk_rowdecay_bwd_kernel, has no such path).
    Read by chunked.chunk_inputs, which then hands the op placeholders for w and a; the kernels take the
    placeholders, not this test, as the signal."""
    if not (same_key_on() and len(form.corrections) == 1 and len(form.inputs) == 1 and form.decay_kind != ROW):
        return False
    b = sp.sympify(form.corrections[0].b)
    return sp.sympify(form.corrections[0].a) == b and sp.sympify(form.inputs[0].w) == b


@triton.jit
def chunk_delta_bwd_prep_kernel(q_ptr, a_ptr, b_ptr, c_ptr, g_ptr, do_ptr, tc_ptr, wt_ptr, dd_ptr, cu_ptr, ix_ptr,
                                T, H, DK, DV, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                GATED: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr = "ieee",
                                KB: tl.constexpr = 64, HAVE_TC: tl.constexpr = False, SUB: tl.constexpr = 1,
                                UTB: tl.constexpr = 16, SOLVE: tl.constexpr = "blocks", OFF32: tl.constexpr = False):
    """Per chunk: T_c = (I + diag(c)(A Bᵀ ⊙ D_st))⁻¹ → tc [.., BT], W̃ = T_c (c ⊙ Γ ⊙ A) → wt (unless
    HAVE_TC: the split forward saved both), dΔ's local part −(Q Bᵀ ⊙ D)ᵀ dO → dd (all value blocks, BV
    rows at a time)."""
    i_bh, i_h, c, start, eos = _delta_chunk(ix_ptr, cu_ptr, tl.program_id(0), tl.program_id(1), T, H, BT, VARLEN)
    tt = tl.arange(0, BT)
    tm, base = _tokens(start, tt, eos, H, i_h, OFF32)
    # (no shared throwaway names across the two branches: Triton types every name both branches assign)
    if HAVE_TC:
        D = _chunk_decay(g_ptr, base, tm, BT, GATED, SUB)[0]
    else:
        cc, D, Dst, gam, Tc, N = _ut_inverse(a_ptr, b_ptr, c_ptr, g_ptr, base, tm, DK, BT, BK, KB, GATED, PREC, SUB,
                                             UTB, SOLVE)
        _store_operand(tc_ptr + base[:, None] * BT + tt[None, :], Tc, tm[:, None], PREC)   # (chunked.tc_storage)
        _store_wt(a_ptr, wt_ptr, Tc, cc * gam, base, tm, DK, BK, KB, PREC)
    QBt = tl.trans(_dot_rows_k(q_ptr, b_ptr, base, tm, DK, BT, BK, KB, PREC) * D)
    for i_v in range(0, tl.cdiv(DV, BV)):
        rows = i_v * BV + tl.arange(0, BV)
        vm = tm[:, None] & (rows < DV)[None, :]
        do = tl.load(do_ptr + base[:, None] * DV + rows[None, :], mask=vm, other=0.0).to(tl.float32)
        tl.store(dd_ptr + base[:, None] * DV + rows[None, :], -_mm(QBt, do, PREC), mask=vm)


@triton.jit
def chunk_delta_bwd_state_kernel(q_ptr, g_ptr, b_ptr, wt_ptr, do_ptr, dd_ptr, dht_ptr, dh_ptr, dh0_ptr, cu_ptr,
                                 T, H, DK, DV, NCK, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                 GATED: tl.constexpr, USE_DHT: tl.constexpr, VARLEN: tl.constexpr,
                                 PREC: tl.constexpr = "ieee", SUB: tl.constexpr = 1,
                                 OFF32: tl.constexpr = False, f_ptr=None, FACTORS: tl.constexpr = False):
    """Reverse over chunks: dh ← dS, dΔ = dd − dec ⊙ (B dSᵀ) (in place),
    dS ← Γ_L dS + (Γ ⊙ dO)ᵀ Q + dΔᵀ W̃."""
    i_v, i_bh, i_h, bos, eos, rows, cols, rm, km, m2, soff, tt = _sequential_program(cu_ptr, T, H, DK, DV, BT, BK,
                                                                                      BV, VARLEN)
    dS = _initial_tile(dht_ptr, i_bh, DK, DV, soff, m2, BK, BV, USE_DHT)
    nc = tl.cdiv(eos - bos, BT)
    for cr in range(0, nc):
        c = nc - 1 - cr
        _store_operand(dh_ptr + (i_bh.to(tl.int64) * NCK + c) * DV * DK + soff, dS, m2, PREC)   # (dh_storage)
        tm, base = _tokens(bos + c * BT, tt, eos, H, i_h, OFF32)
        km2 = tm[:, None] & km[None, :]
        vm = tm[:, None] & rm[None, :]
        bv = tl.load(b_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        doff = base[:, None] * DV + rows[None, :]
        d = tl.load(dd_ptr + doff, mask=vm, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + doff, mask=vm, other=0.0).to(tl.float32)
        BdS = _mm(bv, tl.trans(dS), PREC)          # B dSᵀ [BT, BV]
        if GATED:
            gam, dec, gl = _sequential_decay(g_ptr, f_ptr, base, tm, (bos + c * BT).to(tl.int64) * H + i_h, BT,
                                             FACTORS)
            d -= BdS * dec[:, None]
            do = do * gam[:, None]
            dS = dS * gl
        else:
            d -= BdS
        tl.store(dd_ptr + doff, d, mask=vm)
        q = tl.load(q_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        wt = tl.load(wt_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        dS += _mm(tl.trans(do), q, PREC) + _mm(tl.trans(d), wt, PREC)
        dS = tl.where(m2, dS, 0.0)
    tl.store(dh0_ptr + i_bh.to(tl.int64) * DV * DK + soff, dS, mask=m2)


@triton.jit
def _store_de(q_ptr, w_ptr, a_ptr, do_ptr, dh_ptr, de_ptr, dR, D, Dst, dec, base, tm, rows, sm, sbase, voff, vm, DK,
              SW, SE, M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
              KB: tl.constexpr, M0: tl.constexpr = 0):
    """dE_m = (Q W_mᵀ ⊙ D)ᵀ dO + (A W_mᵀ ⊙ D_st)ᵀ dR' + dec ⊙ (W_m dSᵀ) → de for one (chunk, value block) and
    m = M0 .. M − 1 (dR = dR' [BT, BV]; dS from dh, read where sm; KB key columns at a time)."""
    if M0 < M:
        do = tl.load(do_ptr + voff, mask=vm, other=0.0).to(tl.float32)
    for m in tl.static_range(M0, M):
        QW = tl.zeros([BT, BT], dtype=tl.float32)
        AW = tl.zeros([BT, BT], dtype=tl.float32)
        WdS = tl.zeros([BT, BV], dtype=tl.float32)
        for kb in range(0, BK // KB):
            cols = kb * KB + tl.arange(0, KB)
            km = cols < DK
            km2 = tm[:, None] & km[None, :]
            q = tl.load(q_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + _rank_offset(m, SW) + base[:, None] * DK + cols[None, :],
                        mask=km2, other=0.0).to(tl.float32)
            dS = tl.load(dh_ptr + sbase + rows[:, None] * DK + cols[None, :], mask=sm[:, None] & km[None, :],
                         other=0.0).to(tl.float32)
            QW += _mm(q, tl.trans(w), PREC)
            AW += _mm(a, tl.trans(w), PREC)
            WdS += _mm(w, tl.trans(dS), PREC)
        de = (_mm(tl.trans(QW * D), do, PREC) + _mm(tl.trans(AW * Dst), dR, PREC)
              + WdS * dec[:, None])
        tl.store(de_ptr + _rank_offset(m, SE) + voff, de, mask=vm)


@triton.jit
def chunk_delta_bwd_value_kernel(q_ptr, w_ptr, e_ptr, g_ptr, a_ptr, b_ptr, c_ptr, tc_ptr, dd_ptr, dr_ptr, do_ptr,
                                 ck_ptr, dh_ptr, dl_ptr, de_ptr, dc_ptr, cu_ptr, ix_ptr, T, H, DK, DV, NCK, SW, SE, TOKH,
                                 M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                 GATED: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr = "ieee",
                                 KB: tl.constexpr = 64, TIED: tl.constexpr = False, SUB: tl.constexpr = 1,
                                 OFF32: tl.constexpr = False, es_ptr=None, SCALED_E: tl.constexpr = False,
                                 SAME_KEY: tl.constexpr = False):
    """Per (chunk, value block): Δ = T_c (c ⊙ R') → dl, the partial ∂c_i = Σ_v dR_iv (R' − N Δ)_iv → dc
    (R' − N Δ = γ_t S_{t−1} a_t), dR' = c ⊙ T_cᵀ dΔ → dr (dd itself, over dΔ, or a bf16 buffer where the key
    kernel's dots take bf16 operands: chunked.operand_storage's "dr"; dl likewise, "dl", for the general key kernel),
    then dE_m → de. A W_mᵀ is computed in both phases (fewer live tiles).
    TIED (W_0 is B: DeltaNet, Gated DeltaNet, chunked._tied): A W_0ᵀ ⊙ D_st is N, formed once and kept, and
    since dΔ = −(Q Bᵀ ⊙ D)ᵀ dO − dec ⊙ (B dSᵀ), dE_0 = Nᵀ dR' − dΔ: no Q W_0ᵀ, A W_0ᵀ (twice), W_0 dSᵀ over
    d_k, no q / w_0 / dS / dO loads for m = 0 (the m ≥ 1 terms as untied). SAME_KEY (TIED with a = b one tensor,
    chunked.shared_key_inputs): N = A Aᵀ from the A tiles the first loop loads anyway, in the same key blocks and
    order as _dot_rows_k (the same products and sums; the interpreter's numpy rounds A Aᵀ of one array as a symmetric
    product, ~1 ulp apart), instead of loading the key tensor twice more."""
    i_v, i_h, tt, rows, tm, base, vm, sm, sbase, voff = _chunk_value_tile(ix_ptr, cu_ptr, T, H, DK, DV, NCK, BT, BV,
                                                                          VARLEN, OFF32)
    cc = tl.load(c_ptr + base, mask=tm, other=0.0).to(tl.float32)
    D, Dst, gam, dec, gl = _chunk_decay(g_ptr, base, tm, BT, GATED, SUB)
    # phase 1: R' = Γ ⊙ A S₀ᵀ + Σ_m (A W_mᵀ ⊙ D_st) E_m, Δ, ∂c
    R = tl.zeros([BT, BV], dtype=tl.float32)
    N = tl.zeros([BT, BT], dtype=tl.float32)
    for kb in range(0, BK // KB):
        cols = kb * KB + tl.arange(0, KB)
        km = cols < DK
        a = tl.load(a_ptr + base[:, None] * DK + cols[None, :], mask=tm[:, None] & km[None, :],
                    other=0.0).to(tl.float32)
        S0 = tl.load(ck_ptr + sbase + rows[:, None] * DK + cols[None, :], mask=sm[:, None] & km[None, :],
                     other=0.0).to(tl.float32)
        R += _mm(a, tl.trans(S0), PREC)
        if SAME_KEY:
            N += _mm(a, tl.trans(a), PREC)
    R = R * gam[:, None]
    if TIED:           # A W_0ᵀ ⊙ D_st = N: formed once, kept for R' − N Δ and dE_0
        if not SAME_KEY:
            N = _dot_rows_k(a_ptr, b_ptr, base, tm, DK, BT, BK, KB, PREC, False)
        N = N * Dst
        R += _mm(N, _value_side(e_ptr, 0, 0, voff, vm, es_ptr, base, tm, SCALED_E), PREC)
    for m in tl.static_range(1 if TIED else 0, M):
        AW = _dot_rows_k(a_ptr, w_ptr + _rank_offset(m, SW), base, tm, DK, BT, BK, KB, PREC, False) * Dst
        R += _mm(AW, _value_side(e_ptr, m, SE, voff, vm, es_ptr, base, tm, SCALED_E), PREC)
    Tc = tl.load(tc_ptr + base[:, None] * BT + tt[None, :], mask=tm[:, None], other=0.0).to(tl.float32)
    dl = _mm(Tc, R * cc[:, None], PREC)                     # Δ = T_c (c ⊙ R')
    _store_operand(dl_ptr + voff, dl, vm, PREC)                                # (dl_storage)
    if not TIED:
        N = _dot_rows_k(a_ptr, b_ptr, base, tm, DK, BT, BK, KB, PREC, False) * Dst
    R -= _mm(N, dl, PREC)                                                      # R' − N Δ
    dD = tl.load(dd_ptr + voff, mask=vm, other=0.0).to(tl.float32)             # dΔ
    dR = _mm(tl.trans(Tc), dD, PREC)                                           # T_cᵀ dΔ
    tl.store(dc_ptr + i_v.to(tl.int64) * TOKH + base, tl.sum(dR * R, axis=1), mask=tm)
    dR = dR * cc[:, None]                                                      # dR' = c ⊙ dR
    _store_operand(dr_ptr + voff, dR, vm, PREC)            # this program's tile only (over dd's: dr_storage)
    # phase 2: dE_m
    if TIED:           # dE_0 = (Q Bᵀ ⊙ D)ᵀ dO + Nᵀ dR' + dec ⊙ (B dSᵀ) = Nᵀ dR' − dΔ
        tl.store(de_ptr + voff, _mm(tl.trans(N), dR, PREC) - dD, mask=vm)
    _store_de(q_ptr, w_ptr, a_ptr, do_ptr, dh_ptr, de_ptr, dR, D, Dst, dec, base, tm, rows, sm, sbase, voff, vm, DK,
              SW, SE, M, BT, BK, BV, PREC, KB, 1 if TIED else 0)


@triton.jit
def _key_value_block(i_v, BV: tl.constexpr, DV, DVS, tm, base, km):
    """Value block i_v of a key-kernel program: its rows, the token × value mask vm and offsets voff of its [BT, BV]
    tiles, and the mask sm2 of its [BV, KB] ck / dh tiles (DVS = 0 for a padding program, which reads neither)."""
    rows = i_v * BV + tl.arange(0, BV)
    vm = tm[:, None] & (rows < DV)[None, :]
    return rows, vm, base[:, None] * DV + rows[None, :], (rows < DVS)[:, None] & km[None, :]


@triton.jit
def _same_key_grads(q_ptr, e_ptr, g_ptr, k_ptr, dr_ptr, dl_ptr, do_ptr, ck_ptr, dh_ptr, dq_ptr, dg_ptr, dk_ptr, i_k, tm,
                    tt, base, km, km2, koff, cols, sbase, DK, DV, DVS, TOKH, BT: tl.constexpr, BV: tl.constexpr,
                    GATED: tl.constexpr, PREC: tl.constexpr, KB: tl.constexpr, SUB: tl.constexpr, es_ptr,
                    SCALED_E: tl.constexpr, STRADDLE: tl.constexpr):
    """The key kernel where a = b = w_0 = K and M = 1 (DeltaNet, Gated DeltaNet, Longhorn): with
    X = (dO (E − Δ)ᵀ) ⊙ D, Y = (dR' (E − Δ)ᵀ) ⊙ D_st, Z = dec ⊙ ((E − Δ) dS),

        dQ = Γ ⊙ (dO S₀) + X K,   dA = Γ ⊙ (dR' S₀) + Y K,   dB + dW_0 = Z + Xᵀ Q + Yᵀ K,

    so dK = dA + dB + dW_0 → dk; ∂b_i = q_i·dQ_i + k_i·(dA − dB − dW_0)_i and ∂b_last's
    Σ_j (w_j·(dec ⊙ E dS)_j − b_j·(dec ⊙ Δ dS)_j) = Σ_j k_j·Z_j. E and Δ enter only as E − Δ: the value loop sums
    5 products (X, Y, dO S₀, dR' S₀, Z) where the general kernel sums 8 (OD, RD, OE, RE and four [BT, KB] ones)."""
    X = tl.zeros([BT, BT], dtype=tl.float32)                                   # dO (E − Δ)ᵀ
    Y = tl.zeros([BT, BT], dtype=tl.float32)                                   # dR' (E − Δ)ᵀ
    dq = tl.zeros([BT, KB], dtype=tl.float32)
    da = tl.zeros([BT, KB], dtype=tl.float32)
    Z = tl.zeros([BT, KB], dtype=tl.float32)                                   # (E − Δ) dS
    SS = tl.zeros([KB], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(DV, BV)):
        rows, vm, voff, sm2 = _key_value_block(i_v, BV, DV, DVS, tm, base, km)
        do = tl.load(do_ptr + voff, mask=vm, other=0.0).to(tl.float32)
        dr = tl.load(dr_ptr + voff, mask=vm, other=0.0).to(tl.float32)
        ed = (_value_side(e_ptr, 0, 0, voff, vm, es_ptr, base, tm, SCALED_E)
              - tl.load(dl_ptr + voff, mask=vm, other=0.0).to(tl.float32))
        S0 = tl.load(ck_ptr + sbase + rows[:, None] * DK + cols[None, :], mask=sm2, other=0.0).to(tl.float32)
        dS = tl.load(dh_ptr + sbase + rows[:, None] * DK + cols[None, :], mask=sm2, other=0.0).to(tl.float32)
        X += _mm(do, tl.trans(ed), PREC)
        Y += _mm(dr, tl.trans(ed), PREC)
        dq += _mm(do, S0, PREC)
        da += _mm(dr, S0, PREC)
        Z += _mm(ed, dS, PREC)
        SS += tl.sum(dS * S0, axis=0)
    D, Dst, gam, dec, gl = _chunk_decay(g_ptr, base, tm, BT, GATED, SUB)
    q = tl.load(q_ptr + koff, mask=km2, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + koff, mask=km2, other=0.0).to(tl.float32)
    Z = Z * dec[:, None]
    X = X * D
    Y = Y * Dst
    dq = dq * gam[:, None]
    da = da * gam[:, None]
    if GATED and STRADDLE:    # ∂g first (DECAY_STRADDLE), from Γ's terms, T = X ⊙ Q Kᵀ + Y ⊙ K Kᵀ and x = k·Z
        strad = _straddle_sum(X * _mm(q, tl.trans(k), PREC) + Y * _mm(k, tl.trans(k), PREC), tt)
        dg = _straddled_decay_grad(tl.sum(q * dq, axis=1) + tl.sum(k * da, axis=1), gl * tl.sum(SS, axis=0),
                                   strad + _sum_before(tl.sum(k * Z, axis=1), tt), tt, BT)
        tl.store(dg_ptr + i_k.to(tl.int64) * TOKH + base, dg, mask=tm)
    dq += _mm(X, k, PREC)
    da += _mm(Y, k, PREC)
    dbw = Z + _mm(tl.trans(X), q, PREC) + _mm(tl.trans(Y), k, PREC)          # dB + dW_0
    tl.store(dq_ptr + koff, dq, mask=km2)
    tl.store(dk_ptr + koff, da + dbw, mask=km2)
    if GATED and not STRADDLE:
        dbt = tl.sum(q * dq, axis=1) + tl.sum(k * (da - dbw), axis=1)
        xs = tl.sum(tl.sum(k * Z, axis=1), axis=0)
        dbt = tl.where(tt == BT - 1, dbt + gl * tl.sum(SS, axis=0) + xs, dbt)
        dg = tl.cumsum(dbt, axis=0, reverse=True)               # Σ_{i ≥ t} ∂b_i
        tl.store(dg_ptr + i_k.to(tl.int64) * TOKH + base, dg, mask=tm)


@triton.jit
def chunk_delta_bwd_key_kernel(q_ptr, w_ptr, e_ptr, g_ptr, a_ptr, b_ptr, dr_ptr, dl_ptr, do_ptr, ck_ptr, dh_ptr,
                               dq_ptr, dw_ptr, dg_ptr, da_ptr, db_ptr, cu_ptr, ix_ptr, T, H, DK, DV, NCK, SW, SE,
                               TOKH, M: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
                               VARLEN: tl.constexpr, PREC: tl.constexpr = "ieee", KB: tl.constexpr = 64,
                               TIED: tl.constexpr = False, SUB: tl.constexpr = 1, SAME_KEY: tl.constexpr = False,
                               OFF32: tl.constexpr = False, es_ptr=None, SCALED_E: tl.constexpr = False,
                               STRADDLE: tl.constexpr = True):
    """Per (chunk, block of KB key columns), summing over all value blocks: dQ, dA, dB, dW_m, and the
    partial (over key blocks) ∂ log γ from ∂b_i = q_i·dQ_i + a_i·dA_i − Σ_m w_i·dW_i − b_i·dB_i,
    ∂b_last += Γ_L ⟨dS, S₀⟩ + Σ_j (Σ_m w_j·(dec ⊙ E_m dS)_j − b_j·(dec ⊙ Δ dS)_j).
    TIED (W_0 is B): dQ's OE_0 W_0 − OD B = (OE_0 − OD) B = ((dO (E_0 − Δ)ᵀ) ⊙ D) B, dA's likewise with
    (RE_0 − RD) ⊙ D_st: one [BT, BT] × [BT, KB] product each instead of two, and no w_0 load (w_0 = b).
    SAME_KEY (a = b = w_0 = K, M = 1; SAME_KEY below): dQ and dK = dA + dB + dW_0 → db, nothing to da / dw
    (_same_key_grads)."""
    i_k = tl.program_id(1)
    i_bh, i_h, c, start, eos = _delta_chunk(ix_ptr, cu_ptr, tl.program_id(0), tl.program_id(2), T, H, BT,
                                            VARLEN)
    cols = i_k * KB + tl.arange(0, KB)
    km = cols < DK
    tt = tl.arange(0, BT)
    tm, base = _tokens(start, tt, eos, H, i_h, OFF32)
    km2 = tm[:, None] & km[None, :]
    koff = base[:, None] * DK + cols[None, :]
    DVS = tl.where(start < eos, DV, 0)                # a padding program of the varlen map reads no ck / dh
    sbase = (i_bh.to(tl.int64) * NCK + c) * DV * DK
    if SAME_KEY:
        _same_key_grads(q_ptr, e_ptr, g_ptr, b_ptr, dr_ptr, dl_ptr, do_ptr, ck_ptr, dh_ptr, dq_ptr, dg_ptr, db_ptr,
                        i_k, tm, tt, base, km, km2, koff, cols, sbase, DK, DV, DVS, TOKH, BT, BV, GATED, PREC, KB,
                        SUB, es_ptr, SCALED_E, STRADDLE)
    else:
        OD = tl.zeros([BT, BT], dtype=tl.float32)                                  # dO Δᵀ
        RD = tl.zeros([BT, BT], dtype=tl.float32)                                  # dR' Δᵀ
        OE = tl.zeros([BT, BT], dtype=tl.float32)                                  # dO E_0ᵀ
        RE = tl.zeros([BT, BT], dtype=tl.float32)                                  # dR' E_0ᵀ
        dq = tl.zeros([BT, KB], dtype=tl.float32)
        da = tl.zeros([BT, KB], dtype=tl.float32)
        db = tl.zeros([BT, KB], dtype=tl.float32)
        dwS = tl.zeros([BT, KB], dtype=tl.float32)
        SS = tl.zeros([KB], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(DV, BV)):
            rows, vm, voff, sm2 = _key_value_block(i_v, BV, DV, DVS, tm, base, km)
            do = tl.load(do_ptr + voff, mask=vm, other=0.0).to(tl.float32)
            dl = tl.load(dl_ptr + voff, mask=vm, other=0.0).to(tl.float32)
            dr = tl.load(dr_ptr + voff, mask=vm, other=0.0).to(tl.float32)
            e = _value_side(e_ptr, 0, 0, voff, vm, es_ptr, base, tm, SCALED_E)
            S0 = tl.load(ck_ptr + sbase + rows[:, None] * DK + cols[None, :], mask=sm2, other=0.0).to(tl.float32)
            dS = tl.load(dh_ptr + sbase + rows[:, None] * DK + cols[None, :], mask=sm2, other=0.0).to(tl.float32)
            OD += _mm(do, tl.trans(dl), PREC)
            RD += _mm(dr, tl.trans(dl), PREC)
            OE += _mm(do, tl.trans(e), PREC)
            RE += _mm(dr, tl.trans(e), PREC)
            dq += _mm(do, S0, PREC)
            da += _mm(dr, S0, PREC)
            db -= _mm(dl, dS, PREC)
            dwS += _mm(e, dS, PREC)
            SS += tl.sum(dS * S0, axis=0)
        # the decays only scale rows of what the loop summed (fewer live tiles inside it)
        D, Dst, gam, dec, gl = _chunk_decay(g_ptr, base, tm, BT, GATED, SUB)
        q = tl.load(q_ptr + koff, mask=km2, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + koff, mask=km2, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + koff, mask=km2, other=0.0).to(tl.float32)
        db = db * dec[:, None]
        dwS = dwS * dec[:, None]
        x = tl.sum(bv * db, axis=1)            # b_j·(state part of dB)_j: ∂b's share of the state through dec
        OD = OD * D
        RD = RD * Dst
        dq = dq * gam[:, None]
        da = da * gam[:, None]
        if GATED and STRADDLE:   # ∂b's one-signed terms, the state's share x and the straddling pairs apart
            one = tl.sum(q * dq, axis=1) + tl.sum(a * da, axis=1)
            if TIED:       # T = (OE_0 ⊙ D − OD) ⊙ Q Bᵀ + (RE_0 ⊙ D_st − RD) ⊙ A Bᵀ + Σ_{m > 0} ...
                strad = _straddle_sum((OE * D - OD) * _mm(q, tl.trans(bv), PREC)
                                      + (RE * Dst - RD) * _mm(a, tl.trans(bv), PREC), tt)
            else:          # T = −OD ⊙ Q Bᵀ − RD ⊙ A Bᵀ + Σ_m (OE_m ⊙ D) ⊙ Q W_mᵀ + (RE_m ⊙ D_st) ⊙ A W_mᵀ
                strad = _straddle_sum(-(OD * _mm(q, tl.trans(bv), PREC)) - RD * _mm(a, tl.trans(bv), PREC), tt)
        if TIED:           # the first input term rides on B's products
            dq += _mm(OE * D - OD, bv, PREC)
            da += _mm(RE * Dst - RD, bv, PREC)
        else:
            dq -= _mm(OD, bv, PREC)
            da -= _mm(RD, bv, PREC)
        db -= _mm(tl.trans(OD), q, PREC) + _mm(tl.trans(RD), a, PREC)
        dbt = tl.zeros([BT], dtype=tl.float32)                                     # ∂b_i
        for m in tl.static_range(M):
            if m > 0:          # the first input term was accumulated in the loop above
                OE = tl.zeros([BT, BT], dtype=tl.float32)
                RE = tl.zeros([BT, BT], dtype=tl.float32)
                dwS = tl.zeros([BT, KB], dtype=tl.float32)
                for i_v in range(0, tl.cdiv(DV, BV)):
                    rows, vm, voff, sm2 = _key_value_block(i_v, BV, DV, DVS, tm, base, km)
                    do = tl.load(do_ptr + voff, mask=vm, other=0.0).to(tl.float32)
                    dr = tl.load(dr_ptr + voff, mask=vm, other=0.0).to(tl.float32)
                    e = _value_side(e_ptr, m, SE, voff, vm, es_ptr, base, tm, SCALED_E)
                    dS = tl.load(dh_ptr + sbase + rows[:, None] * DK + cols[None, :], mask=sm2, other=0.0).to(tl.float32)
                    OE += _mm(do, tl.trans(e), PREC)
                    RE += _mm(dr, tl.trans(e), PREC)
                    dwS += _mm(e, dS, PREC)
                dwS = dwS * dec[:, None]
            if TIED and m == 0:    # w_0 = b; OE_0 W_0 and RE_0 W_0 are in dq / da already
                w = bv
            else:
                w = tl.load(w_ptr + _rank_offset(m, SW) + koff, mask=km2, other=0.0).to(tl.float32)
            OEm = OE * D
            REm = RE * Dst
            x += tl.sum(w * dwS, axis=1)
            if GATED and STRADDLE and not (TIED and m == 0):
                strad += _straddle_sum(OEm * _mm(q, tl.trans(w), PREC) + REm * _mm(a, tl.trans(w), PREC), tt)
            if not (TIED and m == 0):
                dq += _mm(OEm, w, PREC)
                da += _mm(REm, w, PREC)
            dw = dwS + _mm(tl.trans(OEm), q, PREC) + _mm(tl.trans(REm), a, PREC)
            tl.store(dw_ptr + _rank_offset(m, SW) + koff, dw, mask=km2)
            dbt -= tl.sum(w * dw, axis=1)
        tl.store(dq_ptr + koff, dq, mask=km2)
        tl.store(da_ptr + koff, da, mask=km2)
        tl.store(db_ptr + koff, db, mask=km2)
        if GATED:
            if STRADDLE:
                dg = _straddled_decay_grad(one, gl * tl.sum(SS, axis=0), strad + _sum_before(x, tt), tt, BT)
            else:
                dbt += tl.sum(q * dq, axis=1) + tl.sum(a * da, axis=1) - tl.sum(bv * db, axis=1)
                dbt = tl.where(tt == BT - 1, dbt + gl * tl.sum(SS, axis=0) + tl.sum(x, axis=0), dbt)
                dg = tl.cumsum(dbt, axis=0, reverse=True)               # Σ_{i ≥ t} ∂b_i
            tl.store(dg_ptr + i_k.to(tl.int64) * TOKH + base, dg, mask=tm)


# --------------------------------------------------------------------------------------------
# row c (Longhorn: one c per value row): every value row i has its own T_c⁽ⁱ⁾ = (I + diag(c[:, i]) N)⁻¹, so
# nothing state-independent factors per chunk (no T_c, no W̃). Three kernels per value block instead:
#   prep (parallel):      P = R' − N Δ by the forward substitution per row from ck (Δ = c ⊙ P), dΔ's local part;
#   state (sequential):   dΔ −= dec ⊙ (B dSᵀ), dR = T_c⁽ⁱ⁾ᵀ dΔ by the backward substitution per row, dS ← dS₀;
#   value (parallel):     ∂c = dR ⊙ P, dR' = c ⊙ dR, Δ = c ⊙ P, dE_m;
# then the scalar path's key kernel (its formulas only see dR' and Δ: dN = −(dR' Δᵀ) ⊙ strict for any c).

@triton.jit
def chunk_rowc_bwd_prep_kernel(q_ptr, w_ptr, e_ptr, g_ptr, a_ptr, b_ptr, c_ptr, do_ptr, ck_ptr, p_ptr, dd_ptr,
                               cu_ptr, ix_ptr, T, H, DK, DV, NCK, SW, SE, M: tl.constexpr, BT: tl.constexpr,
                               BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, VARLEN: tl.constexpr,
                               PREC: tl.constexpr = "ieee", KB: tl.constexpr = 64, SUB: tl.constexpr = 1,
                               es_ptr=None, SCALED_E: tl.constexpr = False):
    """Per (chunk, value block), from the checkpoint S₀: R' = Γ ⊙ A S₀ᵀ + Σ_m (A W_mᵀ ⊙ D_st) E_m, then per value
    row the forward substitution P_s = R'_s − Σ_{r<s} N_sr c_r P_r (so Δ = c ⊙ P and P = R' − N Δ, the
    correction's prediction γ_t S_{t−1} a_t) → p; dΔ's local part −(Q Bᵀ ⊙ D)ᵀ dO → dd."""
    i_v, i_h, tt, rows, tm, base, vm, sm, sbase, voff = _chunk_value_tile(ix_ptr, cu_ptr, T, H, DK, DV, NCK, BT, BV,
                                                                          VARLEN)
    R = tl.zeros([BT, BV], dtype=tl.float32)
    QB = tl.zeros([BT, BT], dtype=tl.float32)
    AB = tl.zeros([BT, BT], dtype=tl.float32)
    for kb in range(0, BK // KB):
        cols = kb * KB + tl.arange(0, KB)
        km = cols < DK
        km2 = tm[:, None] & km[None, :]
        a = tl.load(a_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        S0 = tl.load(ck_ptr + sbase + rows[:, None] * DK + cols[None, :], mask=sm[:, None] & km[None, :],
                     other=0.0).to(tl.float32)
        R += _mm(a, tl.trans(S0), PREC)
        QB += _mm(q, tl.trans(bv), PREC)
        AB += _mm(a, tl.trans(bv), PREC)
    D, Dst, gam, _, _ = _chunk_decay(g_ptr, base, tm, BT, GATED, SUB)
    R = R * gam[:, None]
    for m in tl.static_range(M):
        AW = _dot_rows_k(a_ptr, w_ptr + _rank_offset(m, SW), base, tm, DK, BT, BK, KB, PREC, False) * Dst
        R += _mm(AW, _value_side(e_ptr, m, SE, voff, vm, es_ptr, base, tm, SCALED_E), PREC)
    do = tl.load(do_ptr + voff, mask=vm, other=0.0).to(tl.float32)
    tl.store(dd_ptr + voff, -_mm(tl.trans(QB * D), do, PREC), mask=vm)
    N = AB * Dst
    cc = tl.load(c_ptr + voff, mask=vm, other=0.0).to(tl.float32)              # [BT, BV]: c per value row
    P = tl.zeros([BT, BV], dtype=tl.float32)
    for s_ in range(0, BT):                                                    # forward substitution, per row
        sel = (tt == s_)[:, None]
        n_s = tl.sum(tl.where(sel, N, 0.0), axis=0)                            # row s of N, over r (< s)
        p_s = tl.sum(tl.where(sel, R, 0.0), axis=0) - tl.sum(n_s[:, None] * (cc * P), axis=0)
        P = tl.where(sel, p_s[None, :], P)
    tl.store(p_ptr + voff, P, mask=vm)


@triton.jit
def chunk_rowc_bwd_state_kernel(q_ptr, g_ptr, a_ptr, b_ptr, c_ptr, do_ptr, dd_ptr, dht_ptr, dh_ptr, dh0_ptr, cu_ptr,
                                T, H, DK, DV, NCK, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                GATED: tl.constexpr, USE_DHT: tl.constexpr, VARLEN: tl.constexpr,
                                PREC: tl.constexpr = "ieee", KB: tl.constexpr = 64, SUB: tl.constexpr = 1):
    """Reverse over chunks: dh ← dS, dΔ = dd − dec ⊙ (B dSᵀ), per value row the backward substitution
    dR_s = dΔ_s − Σ_{r>s} N_rs c_r dR_r (dR = T_c⁽ⁱ⁾ᵀ dΔ) → dd, dS ← Γ_L dS + (Γ ⊙ dO)ᵀ Q + (Γ ⊙ c ⊙ dR)ᵀ A."""
    i_v, i_bh, i_h, bos, eos, rows, cols, rm, km, m2, soff, tt = _sequential_program(cu_ptr, T, H, DK, DV, BT, BK,
                                                                                      BV, VARLEN)
    dS = _initial_tile(dht_ptr, i_bh, DK, DV, soff, m2, BK, BV, USE_DHT)
    nc = tl.cdiv(eos - bos, BT)
    for cr in range(0, nc):
        c = nc - 1 - cr
        tl.store(dh_ptr + (i_bh.to(tl.int64) * NCK + c) * DV * DK + soff, dS, mask=m2)
        tm, base = _tokens(bos + c * BT, tt, eos, H, i_h)
        km2 = tm[:, None] & km[None, :]
        vm = tm[:, None] & rm[None, :]
        doff = base[:, None] * DV + rows[None, :]
        bv = tl.load(b_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        d = tl.load(dd_ptr + doff, mask=vm, other=0.0).to(tl.float32)
        cc = tl.load(c_ptr + doff, mask=vm, other=0.0).to(tl.float32)
        _, Dst, gam, dec, gl = _chunk_decay(g_ptr, base, tm, BT, GATED, SUB)
        BdS = _mm(bv, tl.trans(dS), PREC)                   # B dSᵀ [BT, BV]
        if GATED:
            d -= BdS * dec[:, None]
        else:
            d -= BdS
        # N = A Bᵀ ⊙ D_st from KB-column operands: only dS stays live as a whole [·, BK] tile (d_k = 128)
        N = _dot_rows_k(a_ptr, b_ptr, base, tm, DK, BT, BK, KB, PREC) * Dst
        dR = tl.zeros([BT, BV], dtype=tl.float32)
        for sr in range(0, BT):                                                # backward substitution, per row
            s_ = BT - 1 - sr
            sel = (tt == s_)[:, None]
            n_s = tl.sum(tl.where((tt == s_)[None, :], N, 0.0), axis=1)        # column s of N, over r (> s)
            x = tl.sum(tl.where(sel, d, 0.0), axis=0) - tl.sum(n_s[:, None] * (cc * dR), axis=0)
            dR = tl.where(sel, x[None, :], dR)
        tl.store(dd_ptr + doff, dR, mask=vm)
        do = tl.load(do_ptr + doff, mask=vm, other=0.0).to(tl.float32)
        dRp = cc * dR                                                          # dR' = c ⊙ dR
        if GATED:
            do = do * gam[:, None]
            dRp = dRp * gam[:, None]
            dS = dS * gl
        q = tl.load(q_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        dS += _mm(tl.trans(do), q, PREC)
        a = tl.load(a_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        dS += _mm(tl.trans(dRp), a, PREC)
        dS = tl.where(m2, dS, 0.0)
    tl.store(dh0_ptr + i_bh.to(tl.int64) * DV * DK + soff, dS, mask=m2)


@triton.jit
def chunk_rowc_bwd_value_kernel(q_ptr, w_ptr, g_ptr, a_ptr, c_ptr, do_ptr, dh_ptr, p_ptr, dd_ptr, dc_ptr, de_ptr,
                                cu_ptr, ix_ptr, T, H, DK, DV, NCK, SW, SE, M: tl.constexpr, BT: tl.constexpr,
                                BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, VARLEN: tl.constexpr,
                                PREC: tl.constexpr = "ieee", KB: tl.constexpr = 64, SUB: tl.constexpr = 1):
    """Per (chunk, value block): ∂c = dR ⊙ P → dc, dR' = c ⊙ dR (over dR in dd), Δ = c ⊙ P (over P in p), dE_m."""
    i_v, i_h, tt, rows, tm, base, vm, sm, sbase, voff = _chunk_value_tile(ix_ptr, cu_ptr, T, H, DK, DV, NCK, BT, BV,
                                                                          VARLEN)
    cc = tl.load(c_ptr + voff, mask=vm, other=0.0).to(tl.float32)
    dR = tl.load(dd_ptr + voff, mask=vm, other=0.0).to(tl.float32)
    P = tl.load(p_ptr + voff, mask=vm, other=0.0).to(tl.float32)
    tl.store(dc_ptr + voff, dR * P, mask=vm)
    dR = dR * cc
    tl.store(dd_ptr + voff, dR, mask=vm)
    tl.store(p_ptr + voff, P * cc, mask=vm)
    D, Dst, _, dec, _ = _chunk_decay(g_ptr, base, tm, BT, GATED, SUB)
    _store_de(q_ptr, w_ptr, a_ptr, do_ptr, dh_ptr, de_ptr, dR, D, Dst, dec, base, tm, rows, sm, sbase, voff, vm, DK,
              SW, SE, M, BT, BK, BV, PREC, KB)


# --------------------------------------------------------------------------------------------
# row decay (one γ per value row) with corrections: every value row is its own scalar-decay delta rule, with its
# own pairwise decays e^{b_t − b_r} in every product, so one sequential kernel per (value block, sequence·head)
# walks the chunks in reverse with the rows' decays as [BT, BV] tiles (the fused forward's row-decay path,
# chunked.chunk_delta_fwd_kernel G_ROW, transposed). Per value row, with P = γ S_{t−1} a (the correction's
# prediction), Δ = c ⊙ P and the totals dΔ (the backward substitution), dP = c ⊙ dΔ, dE_m:
#   ∂b_t = dO_t O_t + dP_t P_t − Σ_m e_m,t dE_m,t − Δ_t dΔ_t   (+ Γ_L ⟨dS, S₀⟩ + Σ_t dec_t X_t at the chunk end,
#          X = Σ_m e_m (W_m dSᵀ) − Δ (B dSᵀ))
# every pairwise factor e^{b_t − b_r} puts t on the side of O or P (the rows that read the state) and r on the
# side of e_m or Δ (what was written), Γ_t = e^{b_t} the former, dec_r = e^{b_L − b_r} the latter; with the
# totals the dec terms cancel but for the chunk end's. Key-side gradients sum over the program's value rows
# (partials over value blocks), with the pair matrices OE_m[t, r] = Σ_i dO_ti e_m,ri e^{b_ti − b_ri} (t ≥ r),
# OD (Δ for e), RE_m, RD (dP for dO, r < t by tokens):
#   dQ = (dO ⊙ Γ) S₀ + Σ_m OE_m W_m − OD B      dA = (dP ⊙ Γ) S₀ + Σ_m RE_m W_m − RD B
#   dW_m = OE_mᵀ Q + RE_mᵀ A + (E_m ⊙ dec) dS   dB = −ODᵀ Q − RDᵀ A − (Δ ⊙ dec) dS
#   dS₀ = Γ_L ⊙ dS + (dO ⊙ Γ)ᵀ Q + (dP ⊙ Γ)ᵀ A
# Chunks whose total log decay is > −FAST_SPAN in every row form each pair product as one dot, with the chunk's
# half-way factorisation e^{b_t − b_r} = e^{x_t}·e^{−x_r} (chunked's module docstring); the others one token column
# at a time with the pairwise exponent (≤ 0), exact for any decay. The two substitutions stay token loops.

@triton.jit
def _straddle_walk(Ko, Kp, Lo, Lp, R, b, tt, BT: tl.constexpr, BV: tl.constexpr):
    """Σ_{s < u ≤ t} (Lo_t Ko_ts + Lp_t Kp_ts) R_s e^{b_t − b_s} per value row, for every token u, on the per-token
    path (any decay): running sums H_u(t) = Σ_{s < u} K_ts R_s e^{b_u − b_s}, rebased at each u by e^{g_{u+1}} ≤ 1,
    read by Σ_{t ≥ u} L_t e^{b_t − b_u} H_u(t) (chunked._column_pair_products' walk, two pair types at once)."""
    strad = tl.zeros([BT, BV], dtype=tl.float32)
    Ho = tl.zeros([BT, BV], dtype=tl.float32)
    Hp = tl.zeros([BT, BV], dtype=tl.float32)
    for j in range(0, BT):
        sel, colj, rj, ex = _token_column(tt, j, R, b)
        strad = tl.where(sel, tl.sum((Lo * Ho + Lp * Hp) * ex, axis=0)[None, :], strad)
        step = _ch._walk_step(ex, tt, j)
        Ho = _ch._walk_on(Ho, tl.sum(tl.where(colj, Ko, 0.0), axis=1), rj, step)
        Hp = _ch._walk_on(Hp, tl.sum(tl.where(colj, Kp, 0.0), axis=1), rj, step)
    return strad


@triton.jit
def _pair_straddle(Ko, Kp, Lo, Lp, R, b, x, fast, tt, BT: tl.constexpr, BV: tl.constexpr, MODE: tl.constexpr):
    """_straddle_walk's sums on the per-token path; with MODE 2 (DIAG_STRADDLE "all") on the factorised path as
    chunked._factored_straddle's (factors e^{±x}, x = b − b_L/2: no exponent per pair)."""
    if MODE == 2:
        if fast:   # (the state's share X is summed apart: _sum_before_rows)
            out = (_ch._factored_straddle(Ko, Lo * tl.exp(x), R * tl.exp(-x), None, tt, BT, BV)
                   + _ch._factored_straddle(Kp, Lp * tl.exp(x), R * tl.exp(-x), None, tt, BT, BV))
        else:
            out = _straddle_walk(Ko, Kp, Lo, Lp, R, b, tt, BT, BV)
    else:
        out = _straddle_walk(Ko, Kp, Lo, Lp, R, b, tt, BT, BV)
    return out


@triton.jit
def chunk_rowdecay_bwd_kernel(q_ptr, w_ptr, e_ptr, g_ptr, a_ptr, b_ptr, c_ptr, do_ptr, dht_ptr, ck_ptr, cu_ptr,
                              dq_ptr, dw_ptr, de_ptr, dg_ptr, da_ptr, db_ptr, dc_ptr, dh0_ptr,
                              T, H, DK, DV, NCK, SW, SE, TOKH, M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                              BV: tl.constexpr, C_ROW: tl.constexpr, USE_DHT: tl.constexpr, VARLEN: tl.constexpr,
                              PREC: tl.constexpr = "ieee", SUB: tl.constexpr = 1, SPAN: tl.constexpr = _ch.FAST_SPAN,
                              es_ptr=None, SCALED_E: tl.constexpr = False, DIAG_STRADDLE: tl.constexpr = 1):
    i_v, i_bh, i_h, bos, eos, rows, cols, rm, km, m2, soff, tt = _sequential_program(cu_ptr, T, H, DK, DV, BT, BK,
                                                                                      BV, VARLEN)
    incl = tt[:, None] >= tt[None, :]
    strict = _strict(tt, SUB)
    dS = _initial_tile(dht_ptr, i_bh, DK, DV, soff, m2, BK, BV, USE_DHT)
    nc = tl.cdiv(eos - bos, BT)
    for cr in range(0, nc):
        c = nc - 1 - cr
        tm, base = _tokens(bos + c * BT, tt, eos, H, i_h)
        km2 = tm[:, None] & km[None, :]
        vm = tm[:, None] & rm[None, :]
        koff = base[:, None] * DK + cols[None, :]
        voff = base[:, None] * DV + rows[None, :]
        S0 = tl.load(ck_ptr + (i_bh.to(tl.int64) * NCK + c) * DV * DK + soff, mask=m2, other=0.0).to(tl.float32)
        q, a, bv, cc = _delta_tiles(q_ptr, a_ptr, b_ptr, c_ptr, base, tm, rows, cols, km2, vm, DK, DV, C_ROW)
        do = tl.load(do_ptr + voff, mask=vm, other=0.0).to(tl.float32)
        G, GL, gam, dec, xh, fast = _row_decay_tiles(g_ptr, voff, vm, SPAN)
        glv = tl.exp(GL.to(tl.float32))
        AB = tl.where(strict, _mm(a, tl.trans(bv), PREC), 0.0)
        QB = tl.where(incl, _mm(q, tl.trans(bv), PREC), 0.0)
        # the forward, recomputed from S₀: O without the corrections' share, P and Δ (chunked._rowdecay_delta_chunk;
        # fast: every row's chunk total log decay > −FAST_SPAN, so e^{b_t − b_r} = e^{x_t}·e^{−x_r} with
        # x = b − b_L/2 and each pair product below is one dot; else one token column at a time)
        o, P, Dl = _rowdecay_delta_chunk(q, a, cc, S0, AB, G, gam, xh, fast, tt, incl, strict, w_ptr, e_ptr, SW, SE,
                                         koff, voff, km2, vm, M, BT, BV, PREC, es_ptr, base, tm, SCALED_E)
        # O's correction share; dΔ's local part −Σ_t D QB dO; then the backward substitution over the totals
        BdS = _mm(bv, tl.trans(dS), PREC)                             # B dSᵀ [BT, BV]
        dd = -BdS * dec
        if fast:
            o -= _mm(QB, Dl * tl.exp(-xh), PREC) * tl.exp(xh)
            dd -= _mm(tl.trans(QB), do * tl.exp(xh), PREC) * tl.exp(-xh)
        else:
            for j in range(0, BT):
                sel, colj, dj, ex = _token_column(tt, j, Dl, G)
                qbj = tl.sum(tl.where(colj, QB, 0.0), axis=1)                            # QB[:, j]
                o -= qbj[:, None] * dj[None, :] * ex
                dd = tl.where(sel, dd - tl.sum(qbj[:, None] * ex * do, axis=0)[None, :], dd)
        dD = tl.zeros([BT, BV], dtype=tl.float32)
        for sr in range(0, BT):                                  # dΔ_r = dd_r − Σ_{s>r} N_sr c_s dΔ_s
            r_ = BT - 1 - sr
            sel, colj, ddr, ex = _token_column(tt, r_, dd, G)
            abr = tl.sum(tl.where(colj, AB, 0.0), axis=1)                                # AB[:, r] (s > r)
            x = ddr - tl.sum(abr[:, None] * ex * (cc * dD), axis=0)
            dD = tl.where(sel, x[None, :], dD)
        dP = cc * dD
        if C_ROW:
            tl.store(dc_ptr + voff, P * dD, mask=vm)
        else:
            tl.store(dc_ptr + i_v.to(tl.int64) * TOKH + base, tl.sum(P * dD, axis=1), mask=tm)
        # the pair matrices of Δ (OD, RD), and per input term de_m, OE_m, RE_m and their key-side products
        if fast:   # the masked-out (t < r) products reach e^{FAST_SPAN}·|·|: finite, and discarded by the where
            dlx = Dl * tl.exp(-xh)
            OD = tl.where(incl, _mm(do * tl.exp(xh), tl.trans(dlx), PREC), 0.0)
            RD = tl.where(strict, _mm(dP * tl.exp(xh), tl.trans(dlx), PREC), 0.0)
        else:
            OD = tl.zeros([BT, BT], dtype=tl.float32)
            RD = tl.zeros([BT, BT], dtype=tl.float32)
            for j in range(0, BT):
                sel, colj, dj, ex = _token_column(tt, j, Dl, G)
                OD = tl.where(colj, tl.sum(do * dj[None, :] * ex, axis=1)[:, None], OD)
                RD = tl.where(colj, tl.sum(dP * dj[None, :] * ex, axis=1)[:, None], RD)
            RD = tl.where(strict, RD, 0.0)
        dq = _mm(do * gam, S0, PREC) - _mm(OD, bv, PREC)
        da = _mm(dP * gam, S0, PREC) - _mm(RD, bv, PREC)
        db = (-_mm(tl.trans(OD), q, PREC) - _mm(tl.trans(RD), a, PREC)
              - _mm(Dl * dec, dS, PREC))
        dbt = do * o + dP * P - Dl * dD                                                  # ∂b, [BT, BV]
        XL = -tl.sum(Dl * BdS * dec, axis=0)                                             # Σ_t dec_t X_t, [BV]
        # DIAG_STRADDLE (chunked.py): ∂g from its one-signed terms, the state's share X and the straddle sums of the
        # pair terms T_ts = L_t K_ts R_s e^{b_t − b_s}, (L, K, R) = (dO, −QB, Δ), (dP, −AB, Δ), (dO, QW_m, e_m),
        # (dP, AW_m, e_m): where the reverse sum of ∂b cancels them across each token (TRITON.md)
        straddled = fast == 0
        if DIAG_STRADDLE == 2:
            straddled = True
        if DIAG_STRADDLE == 0:
            straddled = False
        Xs = -Dl * BdS * dec
        strad = tl.zeros([BT, BV], dtype=tl.float32)
        if straddled:
            strad = _pair_straddle(-QB, -AB, do, dP, Dl, G, xh, fast, tt, BT, BV, DIAG_STRADDLE)
        for m in tl.static_range(M):
            w = tl.load(w_ptr + _rank_offset(m, SW) + koff, mask=km2, other=0.0).to(tl.float32)
            e = _value_side(e_ptr, m, SE, voff, vm, es_ptr, base, tm, SCALED_E)
            AW = tl.where(strict, _mm(a, tl.trans(w), PREC), 0.0)
            QW = tl.where(incl, _mm(q, tl.trans(w), PREC), 0.0)
            WdS = _mm(w, tl.trans(dS), PREC)                          # W dSᵀ [BT, BV]
            de = WdS * dec
            if fast:
                dox, dpx, ex_ = do * tl.exp(xh), dP * tl.exp(xh), e * tl.exp(-xh)
                de += (_mm(tl.trans(QW), dox, PREC)
                       + _mm(tl.trans(AW), dpx, PREC)) * tl.exp(-xh)
                OE = tl.where(incl, _mm(dox, tl.trans(ex_), PREC), 0.0)
                RE = tl.where(strict, _mm(dpx, tl.trans(ex_), PREC), 0.0)
            else:
                OE = tl.zeros([BT, BT], dtype=tl.float32)
                RE = tl.zeros([BT, BT], dtype=tl.float32)
                for j in range(0, BT):
                    sel, colj, ej, ex = _token_column(tt, j, e, G)
                    qwj = tl.sum(tl.where(colj, QW, 0.0), axis=1)
                    awj = tl.sum(tl.where(colj, AW, 0.0), axis=1)
                    de = tl.where(sel, de + tl.sum((qwj[:, None] * do + awj[:, None] * dP) * ex, axis=0)[None, :], de)
                    OE = tl.where(colj, tl.sum(do * ej[None, :] * ex, axis=1)[:, None], OE)
                    RE = tl.where(colj, tl.sum(dP * ej[None, :] * ex, axis=1)[:, None], RE)
                RE = tl.where(strict, RE, 0.0)
            tl.store(de_ptr + _rank_offset(m, SE) + voff, de, mask=vm)
            dq += _mm(OE, w, PREC)
            da += _mm(RE, w, PREC)
            dw = (_mm(tl.trans(OE), q, PREC) + _mm(tl.trans(RE), a, PREC)
                  + _mm(e * dec, dS, PREC))
            tl.store(dw_ptr + (i_v * M + m).to(tl.int64) * TOKH * DK + koff, dw, mask=km2)
            dbt -= e * de
            XL += tl.sum(e * WdS * dec, axis=0)
            Xs += e * WdS * dec
            if straddled:
                strad += _pair_straddle(QW, AW, do, dP, e, G, xh, fast, tt, BT, BV, DIAG_STRADDLE)
        tl.store(dq_ptr + i_v.to(tl.int64) * TOKH * DK + koff, dq, mask=km2)
        tl.store(da_ptr + i_v.to(tl.int64) * TOKH * DK + koff, da, mask=km2)
        tl.store(db_ptr + i_v.to(tl.int64) * TOKH * DK + koff, db, mask=km2)
        dbLg = glv * tl.sum(dS * S0, axis=1)
        last = (tt == BT - 1)[:, None]
        dg = tl.cumsum(tl.where(last, dbt + (dbLg + XL)[None, :], dbt), axis=0, reverse=True)
        if straddled:   # the one-signed terms: dO ⊙ o's and dP ⊙ P's state shares (Γ ⊙ Q S₀ᵀ, Γ ⊙ A S₀ᵀ)
            one = (do * _mm(q, tl.trans(S0), PREC) + dP * _mm(a, tl.trans(S0), PREC)) * gam
            dg = (tl.cumsum(tl.where(last, one + dbLg[None, :], one), axis=0, reverse=True) + strad
                  + _ch._sum_before_rows(Xs, tt))
        tl.store(dg_ptr + voff, dg, mask=vm)
        dS = (dS * glv[:, None] + _mm(tl.trans(do * gam), q, PREC)
              + _mm(tl.trans(dP * gam), a, PREC))
        dS = tl.where(m2, dS, 0.0)
    tl.store(dh0_ptr + i_bh.to(tl.int64) * DV * DK + soff, dS, mask=m2)


def chunked_rowdecay_backward(plan, chunk_in, ck, do, dht, sizes, cu_seqlens=None, sub=1, es=None):
    """chunked_delta_backward for a row decay ([B, T, H, d_v] log decay; c scalar or row): one sequential kernel."""
    B, T, H, d_k, d_v, N, max_len, C = sizes
    BK, BV = _ch._blocks(d_k, d_v)
    NV = -(-d_v // BV)
    q, w, e, g, a, b, c = chunk_in[:7]
    M = w.shape[0]
    c_row = _c_row(plan.rule.form)
    dev = q.device
    TOKH = B * T * H
    z = dict(dtype=torch.float32, device=dev)
    dq, da, db = (_ch.written(NV, B, T, H, d_k, device=dev) for _ in range(3))
    dw = _ch.written(NV, M, B, T, H, d_k, device=dev)
    de = _ch.written(M, B, T, H, d_v, device=dev)
    dg = _ch.written(B, T, H, d_v, device=dev)
    dc = _ch.written(*((B, T, H, d_v) if c_row else (NV, B, T, H)), device=dev)
    dh0 = torch.empty(N, H, d_v, d_k, **z)
    chunk_rowdecay_bwd_kernel[(NV, N * H)](
        q, w, e, g, a, b, c, do.contiguous(), dht.contiguous() if dht is not None else dh0, ck,
        cu_seqlens if cu_seqlens is not None else dh0, dq, dw, de, dg, da, db, dc, dh0, T, H, d_k, d_v, ck.shape[2],
        w[0].numel(), e[0].numel(), TOKH, M=M, BT=C, BK=BK, BV=BV, C_ROW=c_row, USE_DHT=dht is not None,
        VARLEN=cu_seqlens is not None, PREC=_precision(do.dtype), SUB=sub, SPAN=fast_span(),
        **_ch._launch_opts(walk=True), **_ch._scale_args(es), DIAG_STRADDLE=_ch.diag_straddle())
    return [dq.sum(0), dw.sum(0), de, dg, da.sum(0), db.sum(0), dc if c_row else dc.sum(0)], dh0


def chunked_rowc_backward(plan, chunk_in, ck, do, dht, sizes, cu_seqlens=None, sub=1, same=False, es=None):
    """chunked_delta_backward for a row c ([B, T, H, d_v]); ∂c has c's shape."""
    B, T, H, d_k, d_v, N, max_len, C = sizes
    BK, BV = _ch._blocks(d_k, d_v)
    BVW = max(16, min(_np2(d_v), ROWC_BLOCK_V))
    q, w, e, g, a, b, c = chunk_in[:7]
    M = w.shape[0]
    gated = plan.rule.form.decay_kind != "none"
    dev = q.device
    NCK = ck.shape[2]
    do = do.contiguous()
    varlen = cu_seqlens is not None
    dh0 = torch.empty(N, H, d_v, d_k, dtype=torch.float32, device=dev)
    ix, NTG, G = _ch._chunk_grid(cu_seqlens, C, T, N, B, H, dh0)
    cu = cu_seqlens if varlen else dh0
    common = dict(BT=C, GATED=gated, VARLEN=varlen, PREC=_precision(do.dtype), SUB=sub, **_ch._launch_opts())
    z = dict(dtype=torch.float32, device=dev)
    p = torch.empty(B, T, H, d_v, **z)      # P = R' − N Δ (prep), then Δ (value kernel)
    dd = torch.empty(B, T, H, d_v, **z)     # dΔ's local part (prep), dR (state), dR' (value kernel)
    dh = torch.empty(ck.shape, **z)        # fp32 whatever ck's dtype (the key kernel sums cancelling terms)
    NVW = -(-d_v // BVW)
    KBV = min(BK, VALUE_BLOCK_K)
    chunk_rowc_bwd_prep_kernel[(NTG, NVW, G)](q, w, e, g, a, b, c, do, ck, p, dd, cu, ix, T, H, d_k, d_v, NCK,
                                              w[0].numel(), e[0].numel(), M=M, BK=BK, BV=BVW, KB=KBV, **common,
                                              **_ch._scale_args(es))
    chunk_rowc_bwd_state_kernel[(-(-d_v // BV), N * H)](
        q, g, a, b, c, do, dd, dht.contiguous() if dht is not None else dh0, dh, dh0, cu, T, H, d_k, d_v, NCK,
        BK=BK, BV=BV, KB=min(BK, _ch.SPLIT_BLOCK_K), USE_DHT=dht is not None, **common)
    dc = _ch.written(B, T, H, d_v, device=dev)
    de = _ch.written(M, B, T, H, d_v, device=dev)
    chunk_rowc_bwd_value_kernel[(NTG, NVW, G)](q, w, g, a, c, do, dh, p, dd, dc, de, cu, ix, T, H, d_k, d_v, NCK,
                                               w[0].numel(), e[0].numel(), M=M, BK=BK, BV=BVW, KB=KBV, **common)
    dq, dw, dg, da, db = _key_grads(q, w, e, g, a, b, dd, p, do, ck, dh, cu, ix, sizes, NTG, G, M, BK, BV, common,
                                    same=same, es=es)
    return [dq, dw, de, dg, da, db, dc], dh0


def _key_grads(q, w, e, g, a, b, dr, dl, do, ck, dh, cu, ix, sizes, NTG, G, M, BK, BV, common, tied=False,
               same=False, es=None):
    """The key kernel (dr = dR', dl = Δ): dQ, dW, ∂ log γ (summed over key blocks), dA, dB (tied: w_0 = b); same
    (a = b = w_0 one tensor: chunked.shared_key_inputs): dW and dA None, and dK = dA + dB + dW_0 in dB's place."""
    B, T, H, d_k, d_v = sizes[:5]
    KB = min(BK, KEY_BLOCK_K)
    NKB = BK // KB
    z = dict(dtype=torch.float32, device=q.device)
    dq = _ch.written(B, T, H, d_k, device=q.device)
    db = _ch.written(B, T, H, d_k, device=q.device)
    # same: the kernel writes neither (dq stands in for their pointers)
    da = dq if same else _ch.written(B, T, H, d_k, device=q.device)
    dw = dq if same else _ch.written(M, B, T, H, d_k, device=q.device)
    # without a decay the kernel writes no ∂ log γ: zeros (the chunk inputs' zero log decay has no gradient anyway)
    dg = _ch.written(NKB, B, T, H, device=q.device) if common["GATED"] else torch.zeros(1, B, T, H, **z)
    chunk_delta_bwd_key_kernel[(NTG, NKB, G)](
        q, w, e, g, a, b, dr, dl, do, ck, dh, dq, dw, dg, da, db, cu, ix, T, H, d_k, d_v, ck.shape[2], w[0].numel(),
        e[0].numel(), B * T * H, M=M, BV=BV, KB=KB, TIED=tied, SAME_KEY=same, STRADDLE=straddle_on(),
        **_ch._kernel_launch(common, KEY_WARPS, KEY_STAGES), **_ch._scale_args(es))
    return dq, None if same else dw, dg[0] if dg.shape[0] == 1 else dg.sum(0), None if same else da, db


def chunked_delta_backward(plan, chunk_in, ck, do, dht, sizes, cu_seqlens=None, core=None):
    """∂ of chunk_in = [q, w [M,...], e [M,...], log decay, a, b, c] and ∂h0 for the delta family with a
    scalar or row c and none / scalar decay (∂ log decay is zeros without a decay), from the forward's ck
    (and core = (T_c, W̃) when the split forward saved them: _ch.saved_chunk_core). sizes in tokens; a rank-R
    rule runs on sub-tokens (_ch.sub_tokens) and its a, b, c and their gradients are [R, ...]. With chunk_inputs'
    same-key placeholders for w and a (_ch.shared_key_inputs) their gradients are None and ∂b is dA + dB + dW_0; with
    its input scale (_ch.input_scale), ∂ of the input in e's slot and of the scale (_ch.scaled_input_grads)."""
    chunk_in, es = _ch.input_scale(plan.rule.form, chunk_in)
    chunk_in, same = _ch.shared_key_inputs(chunk_in)
    R = _ch.sub_tokens(plan.rule.form)
    if R > 1:
        assert es is None, "chunk_inputs scales no input term on load for a rule on sub-tokens"
        assert not same, "the same-key placeholders are for one correction (chunked_delta_bwd.same_key)"
        grads, dh0 = _delta_backward(plan, _ch.to_sub_tokens(chunk_in, R), ck, _ch._spread(do, R, R - 1, 1), dht,
                                     _ch.sub_sizes(sizes, R), cu_seqlens * R if cu_seqlens is not None else None,
                                     core, R)
        return _ch.from_sub_tokens(grads, R, len(plan.rule.form.corrections)), dh0
    grads, dh0 = _delta_backward(plan, chunk_in, ck, do, dht, sizes, cu_seqlens, core, same=same, es=es)
    return _ch.scaled_input_grads(chunk_in, es, grads), dh0


def _delta_backward(plan, chunk_in, ck, do, dht, sizes, cu_seqlens=None, core=None, sub=1, same=False, es=None):
    if plan.rule.form.decay_kind == ROW:
        assert not same, "the same-key placeholders are not for row decays (chunked_delta_bwd.same_key)"
        return chunked_rowdecay_backward(plan, chunk_in, ck, do, dht, sizes, cu_seqlens, sub, es)
    if _c_row(plan.rule.form):
        return chunked_rowc_backward(plan, chunk_in, ck, do, dht, sizes, cu_seqlens, sub, same, es)
    B, T, H, d_k, d_v, N, max_len, C = sizes
    wide_keys = _ch.wide(plan.rule.form, d_k)   # the forward's choice (chunk size, stages, precision)
    BK, BV, BVW, KB, BVS = _ch.split_blocks(d_k, d_v)   # the split forward's blocks
    q, w, e, g, a, b, c = chunk_in[:7]
    M = w.shape[0]
    gated = plan.rule.form.decay_kind != "none"
    tied = _ch._tied(plan.rule.form)   # w_0 = b (DeltaNet, Gated DeltaNet): TIED value and key kernels
    dev = q.device
    TOKH = B * T * H
    NCK = ck.shape[2]
    do = do.contiguous()
    varlen = cu_seqlens is not None
    dh0 = torch.empty(N, H, d_v, d_k, dtype=torch.float32, device=dev)
    ix, NTG, G = _ch._chunk_grid(cu_seqlens, C, T, N, B, H, dh0)
    cu = cu_seqlens if varlen else dh0
    common = dict(BT=C, GATED=gated, VARLEN=varlen, PREC=_precision(do.dtype, _ch.bf16_operands(plan.rule.form, d_k)), SUB=sub,
                  OFF32=_ch.offsets32_fit(sizes), **_ch._launch_opts(wide_keys))
    z = dict(dtype=torch.float32, device=dev)
    tc, wt = core if core is not None else (torch.empty(B, T, H, C, dtype=_ch.tc_storage(common["PREC"]), device=dev),
                                            torch.empty(B, T, H, d_k, dtype=_ch.operand_storage(common["PREC"], "wt"),
                                                        device=dev))
    dd = torch.empty(B, T, H, d_v, **z)     # dΔ (prep: its local part; state: all of it)
    dh = torch.empty(ck.shape, dtype=dh_storage(common["PREC"], gated), device=dev)
    chunk_delta_bwd_prep_kernel[(NTG, G)](q, a, b, c, g, do, tc, wt, dd, cu, ix, T, H, d_k, d_v, BK=BK, BV=BVW,
                                          KB=KB, HAVE_TC=core is not None, UTB=int(_ch.UT_BLOCK),
                                          SOLVE=_ch.ut_solve(), **_ch._kernel_launch(common, PREP_WARPS, PREP_STAGES))
    factors = _ch.decay_factors(g, (ix, NTG, G), cu, varlen, T, H, C, common["OFF32"]) if gated else None
    chunk_delta_bwd_state_kernel[(-(-d_v // BVS), N * H)](
        q, g, b, wt, do, dd, dht.contiguous() if dht is not None else dh0, dh, dh0, cu, T, H, d_k, d_v, NCK,
        BK=BK, BV=BVS, USE_DHT=dht is not None, **_ch._kernel_launch(common, STATE_WARPS, STATE_STAGES),
        **_ch._factor_args(factors))
    NVW = -(-d_v // BVW)
    dl = torch.empty(B, T, H, d_v, dtype=dl_storage(common["PREC"], same), device=dev)
    # dR' (value kernel) over dΔ in dd, or in a bf16 buffer of its own (dr_storage)
    dr = dd if dr_storage(common["PREC"]) == torch.float32 else torch.empty(B, T, H, d_v, dtype=torch.bfloat16,
                                                                            device=dev)
    de = _ch.written(M, B, T, H, d_v, device=dev)
    dc = _ch.written(NVW, B, T, H, device=dev)
    chunk_delta_bwd_value_kernel[(NTG, NVW, G)](
        q, w, e, g, a, b, c, tc, dd, dr, do, ck, dh, dl, de, dc, cu, ix, T, H, d_k, d_v, NCK, w[0].numel(),
        e[0].numel(), TOKH, M=M, BK=BK, BV=BVW, KB=min(BK, VALUE_BLOCK_K), TIED=tied, SAME_KEY=same and tied,
        **_ch._kernel_launch(common, VALUE_WARPS, VALUE_STAGES), **_ch._scale_args(es))
    dd = None   # a bf16 dr leaves dΔ unread from here: its memory can take the key kernel's outputs
    dq, dw, dg, da, db = _key_grads(q, w, e, g, a, b, dr, dl, do, ck, dh, cu, ix, sizes, NTG, G, M, BK, BV, common,
                                    tied, same, es)
    return [dq, dw, de, dg, da, db, dc[0] if dc.shape[0] == 1 else dc.sum(0)], dh0
