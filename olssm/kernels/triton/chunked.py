"""Chunked Triton kernels for two normal-form families (math: TRITON.md, "Chunked kernels").

    chunk_fwd_kernel:        S_t = Λ_t ⊙ S_{t-1} + Σ_m e_m w_mᵀ,  Λ none / scalar / row (d_v) / column (d_k)
    chunk_delta_fwd_kernel:  S_t = γ_t S_{t-1} (I − c_t a_t b_tᵀ) + Σ_m e_m w_mᵀ,  γ none / scalar / row,
                             c scalar / row (UT transform: one forward substitution per chunk)
    chunk_delta_{prep,state,out}_kernel: the same recurrence for c scalar and γ none / scalar, split
                             in three launches (DELTA_FORWARD = "split", the default there)
    o_t = S_t q_t

R ≥ 2 corrections, S_t = S̃_t − Σ_r (c_r ⊙ S̃_t a_r) b_rᵀ + ..., run through the same delta kernels on a
sub-token layout (sub_tokens, to_sub_tokens): one correction per sub-token, and the triangular system's
strict mask strict between tokens (constexpr SUB), since all corrections of a token read the same S̃_t.

(linear attention, RetNet, Mamba-2, GLA; DeltaNet, Gated DeltaNet, Longhorn; and any derived rule
with one of those structures: `unsupported` says why a rule is not). The rule's
entries are evaluated per token in torch from the Rule's sympy expressions (printed by the same
torch printer as `rule.step`): q, w (the key side), e (the value side, broadcast to d_v) and
log Λ — in closed form when sympy can expand it (Mamba-2: log exp(Δ a) = Δ a, so strong decays
never round-trip through exp), else log(Λ) clamped at log(float32 tiny). The kernel is generic in
those tensors and specialised by the decay kind (a constexpr).

One program = one (batch, head) × block of BV value rows; it walks the chunks in order with the
state in registers (inter-chunk state passing) and, per chunk of BT tokens, with b = cumulative
log decay *from the chunk start* (so every exponent below is ≤ 0 and nothing overflows):

    o     = (Q Kᵀ ⊙ D) V  +  (Q ⊙ e^{b}) Sᵀ        D_ij = e^{b_i − b_j} (i ≥ j), else 0
    S_new = e^{b_last} ⊙ S + (V ⊙ e^{b_last − b})ᵀ K    (row decay: on V's side; column: on K's side)

The cumulative log decays b are summed and differenced in fp64 (then rounded to fp32 for exp):
in fp32, b_i − b_j of two tokens after a strong decay (|b| ≈ 400 within a chunk) cancels to an
absolute error ≈ |b|·2⁻²⁴ ≈ 2e-5, i.e. a relative error of that size in e^{b_i − b_j}; fp64 keeps
it at the fp32 rounding of the difference. (On GPUs with slow fp64 this is the first thing to
revisit: the fp64 work per chunk is O(BT²) for scalar decays, O(BT·BK) for row/column decays on
the fast path below, O(BT²·BK) on their per-token loop.)
Scalar decays use one [BT, BT] decay matrix. Column (GLA) and row decays have one per key column /
value row; where it is safe they factorise it about the chunk's half-way point, x = b − b_last/2:

    e^{b_i − b_j} = e^{x_i}·e^{−x_j}:   column  A = ((Q ⊙ e^{x}) (K ⊙ e^{−x})ᵀ) ⊙ causal
                                        row     o += ((Q Kᵀ ⊙ causal) (V ⊙ e^{−x})) ⊙ e^{x}

(one dot each; the backward's dQ, dK terms likewise). Safe means b_last > −FAST_SPAN (= 60) in
every column / row of the chunk: then |x| ≤ 30, both factors lie in e^{±30} ≈ 1e∓13 (normal fp32,
products far below its 3e38 max), every kept (i ≥ j) entry is a sum of the exact terms
q_ik k_jk e^{b_ik − b_jk} (each ≤ |q_ik k_jk|: no cancellation is introduced), the masked-out i < j
entries (up to e^{60}·|q||k|) are discarded by tl.where, and rounding x to fp32 costs
≤ 60·2⁻²⁴ ≈ 4e-6 relative, as rounding a pairwise exponent |b_i − b_j| ≤ 60 does. The reference
point at b_last/2 rather than the chunk start doubles that span. Other chunks (the branch is per
chunk, at run time) build the matrix one key/value column j at a time with the pairwise exponent
b_i − b_j, exact for any decay (the factors would overflow).

The delta family's fused kernel runs the UT transform's forward substitution (over [BT, BV] tiles)
inside that sequential walk. With a scalar c and none / scalar decay the split forward instead
(like flash-linear-attention's chunk_delta_rule) factors the transform into state-independent
parts, Δ = W̃ S₀ᵀ + Ũ with T_c = (I + diag(c) N)⁻¹, W̃ = T_c diag(c ⊙ Γ) A and
Ũ = T_c diag(c) Σ_m (A W_mᵀ ⊙ D_strict) E_m: ``prep`` (parallel over chunks × heads) inverts the
[BT, BT] triangle and writes W̃, Ũ; ``state`` (sequential over chunks per (value block, head),
dots only) writes ck and Δ; ``out`` (parallel over chunks × value blocks × heads) computes o from
ck and Δ. Varlen grids over chunks read a host-built (sequence, chunk) map.

The forward also stores the state entering every chunk (``ck``). Backward: ``chunk_bwd_kernel``
for decays without corrections (gradients of q, w, e, log Λ; torch chains them to
the raw inputs), chunked_delta_bwd.py for the delta family with scalar or row c and none / scalar / row decay
— so every structure with a chunked forward has a chunked backward — or, where "auto" wants an exact decay
gradient and log Λ has no closed form, the fused recurrent backward kernel (scan.py / codegen.py) run with
those checkpoints (checkpoint interval = chunk size). All exact.
"""
from __future__ import annotations

import collections
import functools
import math
import os
from typing import NamedTuple

import sympy as sp
import torch
import triton
import triton.language as tl

from ...derive.rule import NormalForm, closed_form_log, decay_may_be_negative, evaluator
from ...objectives.core import COLUMN, ROW, SCALAR, kind_of
from ..chunk import check_decay_values
from ..recurrent import first_derivative_only
from . import scan as _scan

_TINY = torch.finfo(torch.float32).tiny
_LOG_FLOOR = math.log(_TINY)
#: the floor of every log decay, for the kernels (a raw log gate reaches them unfloored: RAW_INPUTS)
LOG_FLOOR: tl.constexpr = tl.constexpr(_LOG_FLOOR)
DECAY_CODE = {"none": 0, SCALAR: 1, ROW: 2, COLUMN: 3}
#: row / column decays: a chunk whose total log decay (every row / key column) is > −FAST_SPAN
#: takes the factorised intra-chunk dots, the others the per-token loop (module docstring). Read at each launch and
#: handed to the kernels as their SPAN constexpr (a jit global instead made compiled kernels refuse to run once it
#: changed: session 14's H100 run, where tests that set it failed every later kernel in their process).
FAST_SPAN = 60.0


def fast_span() -> float:
    """FAST_SPAN as the kernels' SPAN constexpr (±inf allowed: every chunk factorised, or none)."""
    return float(FAST_SPAN)


#: rows per diagonal block of the UT inverse T_c in the split delta kernels (_ut_inverse): the forward
#: substitution takes UT_BLOCK − 1 dependent steps (on all blocks at once) instead of BT − 1, then
#: log2(BT / UT_BLOCK) block merges of two [BT, BT] dots each (fla's solve_tril: 16). UT_BLOCK ≥ BT is the
#: plain row-by-row substitution. Passed to each launch as the constexpr UTB (a jit global could not be changed
#: once a compiled kernel had read it).
UT_BLOCK = 16
#: where the UT inverse's 15 substitution steps run (_ut_inverse): "masked", on the whole [BT, BT] tile with the
#: other blocks masked off, or "blocks", on the diagonal blocks alone as a [BT/UB, UB, UB] tile (TRITON.md,
#: "Blocked inverse"). Every "masked" step reduces over BT² elements across warps, of which BT·UB matter (1024 of
#: 4096 at chunk 64), and the prep kernel was the largest forward kernel (0.97 ms of DeltaNet's 2.06 at D = 128,
#: session 7). Compiled for sm_90 (aot_check --ptx-loops; d_k = d_v = 128, chunk 64, 2 stages, 8 warps), one step
#: of the forward prep's loop goes from 335 PTX instructions, 14 bar.sync, 20 shared-memory accesses and 82 shuffles
#: to 77, 0, 0 and 16 (chunk 32 at d_k = 64: 149, 10, 11, 35 before), and the kernel's spills from 424 to 408
#: B/thread with tf32 operands, 480 to 208 with bf16 (the backward's prep, Gated DeltaNet: 552 → 592, 584 → 264).
#: "blocks" is the default since session 11 (H100 80GB HBM3, Triton 3.6.0; (2, 8192, 16, 128) bf16, one process,
#: the defaults' spread 0.02 ms fwd, 0.06 / 0.14 fwd+bwd): DeltaNet fwd 2.18 → 1.91 ms (1.13× the faster default
#: row), fwd+bwd 6.19 → 5.96 (1.03×); Gated DeltaNet fwd 2.51 → 2.22 (1.12×), fwd+bwd 7.75 → 7.50 (within drift).
#: OLSSM_TRITON_UT_SOLVE ("masked" / "blocks") overrides; read at each launch (ut_solve()), passed as the constexpr
#: SOLVE, whose default in the kernels is this one (aot_check's rows without a solve compile it).
UT_SOLVE = "blocks"


@triton.jit
def _bf16_rounded(x):
    """x (fp32) rounded to the nearest bf16, ties to even, kept in fp32: what the GPU's fp32 → bf16 conversion
    does. The CPU interpreter's .to(tl.bfloat16) truncates instead, and its dots read bf16 operands as raw
    integers, so "bf16" runs there as fp32 dots of these rounded operands (products of two bf16 values are exact
    in fp32: the same arithmetic as the tensor cores' bf16 dot with fp32 accumulation, up to summation order)."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _rank_offset(m, stride):
    """m · stride in int64: the offset of rank term m's slice of a stacked [M, B, T, H, d] tensor (stride its
    B·T·H·d). The stride arrives as an int32 scalar whenever it fits, and m · stride in int32 wraps from
    m = 2 once a slice holds 2³⁰ elements (M ≥ 3, e.g. B·T·H·d = 2 · 65536 · 64 · 128): a silent read of
    another address. tests/test_triton_chunked.py checks this helper against the wrap under the interpreter."""
    return tl.full([], m, tl.int64) * stride


@triton.jit
def _mm(x, y, PREC: tl.constexpr):
    """x @ y with fp32 accumulation. PREC "bf16" rounds both operands to bf16 first (fla's choice: its dots take
    the inputs' dtype and a bf16 copy of the state), which halves the operands' registers / shared memory and
    doubles the tensor-core rate over tf32; the state and every accumulator stay fp32 ("bf16_interpreted": the
    same under the CPU interpreter, _bf16_rounded). Otherwise PREC is tl.dot's input_precision."""
    if PREC == "bf16":
        return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16))
    elif PREC == "bf16_interpreted":
        return tl.dot(_bf16_rounded(x.to(tl.float32)), _bf16_rounded(y.to(tl.float32)), input_precision="ieee")
    else:
        return tl.dot(x, y, input_precision=PREC)


@triton.jit
def _mm_inverse(x, y, PREC: tl.constexpr):
    """The UT inverse's merge products (T ← T − T L_o T): tf32 under "bf16", since a rounding of T_c there
    multiplies into every W̃ and Ũ of the chunk."""
    if PREC == "bf16" or PREC == "bf16_interpreted":
        return tl.dot(x, y, input_precision="tf32")
    else:
        return tl.dot(x, y, input_precision=PREC)


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def unsupported(plan, args):
    """None when the chunked kernel runs this rule and these arguments, else the reason."""
    return _unsupported_form(plan.rule.form)


@functools.lru_cache(maxsize=256)
def _unsupported_form(form):
    # asked on every call: the answer depends on the (frozen) form alone
    if not isinstance(form, NormalForm):
        return "not a normal-form rule"
    if form.corrections and form.decay_kind not in ("none", SCALAR, ROW):
        return f"a {form.decay_kind} decay together with a correction (delta kernel: none/scalar/row decay)"
    for cr in form.corrections:
        if sp.sympify(cr.coef).free_symbols and kind_of(cr.coef) not in (SCALAR, ROW):
            return f"a correction coefficient of kind {kind_of(cr.coef)} (delta kernel: scalar or row)"
        for what, e in (("a", cr.a), ("b", cr.b)):
            if not sp.sympify(e).free_symbols or kind_of(e) != COLUMN:
                return f"the correction's {what} vector is not key-sized"
    if not form.inputs:
        return "no input term"
    if form.decay_kind not in DECAY_CODE:
        return f"{form.decay_kind} decay"
    if decay_may_be_negative(form.decay):
        return ("a decay that can be negative (its inputs' domains do not make it >= 0): the chunked kernels work "
                "with log Λ")
    for t in form.inputs:
        if sp.sympify(t.coef).free_symbols and kind_of(t.coef) not in (SCALAR, ROW):
            return f"an input coefficient of kind {kind_of(t.coef)}"
    for what, e in [(f"w{m}", t.w) for m, t in enumerate(form.inputs)] + [("q", form.readout)]:
        if not sp.sympify(e).free_symbols or kind_of(e) != COLUMN:
            return f"the {what} vector is not key-sized"
    return None


def _c_row(form) -> bool:
    """Some correction's coefficient varies over value rows (Longhorn's ε): the kernels then take a row c for
    every correction."""
    return any(bool(sp.sympify(cr.coef).free_symbols) and kind_of(cr.coef) == ROW for cr in form.corrections)


def sub_tokens(form) -> int:
    """How many sub-tokens each token occupies in the delta kernels: 1 for one correction; for R ≥ 2
    corrections next_pow2(R), one correction per sub-token (the padding ones have c = 0), so that a chunk of
    BT sub-tokens holds whole tokens (TRITON.md, "Rank-R corrections")."""
    R = len(form.corrections)
    return _np2(R) if R > 1 else 1


def sub_sizes(sizes, R: int) -> list:
    """The op's sizes (tokens) as the kernels see them with R sub-tokens per token."""
    B, T, H, d_k, d_v, N, max_len, C = sizes[:8]
    return [B, T * R, H, d_k, d_v, N, max_len * R, C * R]


def _spread(x, R: int, slot: int, t_axis: int):
    """x with time axis t_axis of length T → length T·R, x at sub-token `slot` of every token, zeros elsewhere."""
    out = x.new_zeros(*x.shape[:t_axis + 1], R, *x.shape[t_axis + 1:])
    out.select(t_axis + 1, slot).copy_(x)
    return out.flatten(t_axis, t_axis + 1)


def _pick(x, R: int, slot: int, t_axis: int):
    """_spread's adjoint: sub-token `slot` of every token."""
    return x.unflatten(t_axis, (x.shape[t_axis] // R, R)).select(t_axis + 1, slot)


def to_sub_tokens(chunk_in, R: int) -> list:
    """chunk_inputs of a rank-R rule ([R, B, T, H, ·] a, b, c) laid out as R' = sub_tokens sub-tokens per token:
    correction r at sub-token r (its a, b, c; zeros in the padding slots), the token's decay at the first
    sub-token (log 1 = 0 at the others: the corrections all read S̃_t = Λ_t S_{t−1}), q and the input terms at
    the last (o_t reads S_t after every correction; the input terms are added after them)."""
    q, w, e, g, a, b, c = chunk_in
    R0 = a.shape[0]

    def corr(x):
        out = x.new_zeros(*x.shape[1:3], R, *x.shape[3:])
        out[:, :, :R0] = x.movedim(0, 2)
        return out.flatten(1, 2)
    return [_spread(q, R, R - 1, 1), _spread(w, R, R - 1, 2), _spread(e, R, R - 1, 2), _spread(g, R, 0, 1),
            corr(a), corr(b), corr(c)]


def from_sub_tokens(grads, R: int, R0: int) -> list:
    """The gradients of to_sub_tokens' outputs → those of its inputs (R0 corrections), contiguous (the backward
    op's fake implementation promises its inputs' shapes with contiguous strides)."""
    dq, dw, de, dg, da, db, dc = grads

    def corr(x):
        return x.unflatten(1, (x.shape[1] // R, R))[:, :, :R0].movedim(2, 0)
    return [x.contiguous() for x in (_pick(dq, R, R - 1, 1), _pick(dw, R, R - 1, 2), _pick(de, R, R - 1, 2),
                                     _pick(dg, R, 0, 1), corr(da), corr(db), corr(dc))]


def _log_expr(decay):
    """log Λ in closed form (a number, or an expression without log: Mamba-2's Δ·a), else None."""
    decay = sp.sympify(decay)
    if decay.is_number:   # a constant decay (0 for a rule that forgets everything)
        return sp.Float(math.log(float(decay))) if float(decay) > 0 else sp.Float(_LOG_FLOOR)
    return closed_form_log(decay)


def _safe_log(d):
    """log d, = log(float32 tiny) where d ≤ tiny, with a zero (not NaN) gradient there."""
    ok = d > _TINY
    return torch.where(ok, torch.log(torch.where(ok, d, torch.ones_like(d))), torch.full_like(d, _LOG_FLOOR))


def _token_input(expr, kind) -> bool:
    """expr is a per-token input (not a parameter) of this kind: its [B, T, H, d] tensor is the entry itself."""
    spec = getattr(expr, "spec", None)
    return isinstance(expr, sp.Symbol) and spec is not None and not spec.is_parameter and spec.kind == kind


def _direct(expr, kind):
    """(input symbol, scalar-kind factor or None) where a key- or value-sized entry is a per-token input of its kind as
    it is (q, k, v) or one times a scalar-kind factor that does not read it (DeltaNet's β·v, Mamba-2's Δ·v), else None
    (Longhorn's β/(1 + β‖k‖²)·v: its β is per value row, so the factor is as large as v)."""
    if kind not in (ROW, COLUMN):
        return None
    if _token_input(expr, kind):
        return expr, None
    if isinstance(expr, sp.Mul):
        big = [f for f in expr.args if _token_input(f, kind)]
        if len(big) == 1:
            rest = sp.Mul(*[f for f in expr.args if f is not big[0]])
            if rest.free_symbols and big[0] not in rest.free_symbols and kind_of(rest) == SCALAR:
                return big[0], rest
    return None


class _Entries(NamedTuple):
    """How chunk_inputs makes the chunk tensors of a form (_entries)."""
    direct: dict       # entry -> (input, its scalar factor's name among the evaluator's results or None, lifted)
    evaluate: object   # evaluator of the other entries, the scalar factors and the log decay (None: nothing)
    need: tuple        # the inputs the evaluator reads
    raw_log: object    # a row or column log decay that is an input as it is (GLA's log gate): its name, else None


@functools.lru_cache(maxsize=64)
@torch.compiler.disable   # sympy work (log-decay forms, the entries' structure); the evaluator it returns is traced
def _entries(form) -> _Entries:
    """The key- and value-sized entries that are an input (times a scalar factor) are made from that input's tensor
    (chunk_inputs); the others, the factors, c and the log decay are evaluated in torch from the inputs up-cast to
    fp32 (Rule.broadcast_inputs). A direct entry whose input the evaluator reads as well (Longhorn's k, in ‖k‖²) is
    made from that up-cast copy ("lifted"), so that the input's gradients still meet, and are summed, in fp32."""
    row_c = _c_row(form)
    exprs = {"q": (form.readout, COLUMN)}
    for m, t in enumerate(form.inputs):
        exprs[f"w{m}"], exprs[f"e{m}"] = (t.w, COLUMN), (t.coef, ROW)
    for r, cr in enumerate(form.corrections):
        exprs.update({f"c{r}": (cr.coef, ROW if row_c else SCALAR), f"a{r}": (cr.a, COLUMN), f"b{r}": (cr.b, COLUMN)})
    direct, rest = {}, {}
    for name, (expr, kind) in exprs.items():
        how = _direct(sp.sympify(expr), kind)
        if how is None:
            rest[name] = expr
        else:
            direct[name] = (how[0].name, None if how[1] is None else f"scale_{name}")
            if how[1] is not None:
                rest[f"scale_{name}"] = how[1]
    raw_log = None
    if form.decay_kind != "none":
        le = _log_expr(form.decay)
        others = {s.name for e in rest.values() for s in sp.sympify(e).free_symbols} | {x for x, _ in direct.values()}
        if (le is not None and not form.corrections and form.decay_kind in (ROW, COLUMN)
                and _token_input(le, form.decay_kind) and le.name not in others):
            raw_log = le.name   # chunk_inputs takes it as it is (no up-cast copy for the evaluator)
        elif le is not None:
            rest["ld"] = le
        else:
            rest["decay"] = form.decay
    need = sorted({s.name for e in rest.values() for s in sp.sympify(e).free_symbols})
    direct = {n: (x, scale, x in need) for n, (x, scale) in direct.items()}
    return _Entries(direct, evaluator(rest) if rest else None, tuple(need), raw_log)


class _Scaled(torch.autograd.Function):
    """s ⊙ x for a per-token input x [B, T, H, d] and a scalar factor s [B, T, H, 1] (broadcast), written once into a
    contiguous tensor of dtype dt: the fp32 (fp64) product rounded to dt, what evaluating it on x cast up to fp32 and
    casting the result gave, without x's up-cast copy nor (dt = bf16) an fp32 product to cast back. The backward is
    that path's chain rule too, rounding for rounding: ∂x = ∂out ⊙ s in the product's dtype, rounded once to x's;
    ∂s = Σ ∂out ⊙ x with the products and the sum in the product's dtype."""

    @staticmethod
    def forward(ctx, s, x, dt):
        ctx.save_for_backward(s, x)
        if torch.compiler.is_compiling():
            # torch 2.11's dynamo traced an out= forward (or a same-dtype .to, which returns its input) into wrong
            # gradients under aot_eager, on any device (session 14; torch 2.13 is right): the product, then one
            # rounding to dt, the same bits, which a compiler fuses anyway
            prod = torch.mul(s, x)
            return prod if prod.dtype == dt else prod.to(dt)
        out = torch.empty(x.shape, dtype=dt, device=x.device)
        torch.mul(s, x, out=out)   # in promote(s, x); a GPU converts the mixed dtypes inside the elementwise kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        first_derivative_only("triton scan (an input's scale)", by="backend='triton'")
        s, x = ctx.saved_tensors
        return (*scale_chain_rule(s, x, dout, *ctx.needs_input_grad[:2]), None)


def scale_chain_rule(s, x, dout, need_s: bool = True, need_x: bool = True) -> tuple:
    """(∂s in s's shape, ∂x), None where not needed, of out = s ⊙ x (s broadcast along x's last axis) from ∂out:
    _Scaled's backward, and that of the product the kernels form on load (scaled_input_grads). scaled_bwd_kernel
    where it runs (FUSED_SCALE_BWD), else torch passes with the forward's rounding: ∂x = ∂out ⊙ s in the product's
    dtype, rounded once to x's; ∂s = Σ ∂out ⊙ x with the products and the sum in the product's dtype."""
    if fused_scale_backward(s, x, dout):
        ds, dx = scaled_backward(s, x, dout)
        return (ds if need_s else None), (dx if need_x else None)
    wide = torch.promote_types(s.dtype, x.dtype)   # the forward's product
    ds = dx = None
    if need_s:
        if torch.promote_types(dout.dtype, x.dtype) == wide:
            prod = torch.mul(dout, x)
        else:   # bf16 ∂out and x: a one-element zero of the wide dtype promotes the products, copying neither
            prod = torch.addcmul(dout.new_zeros((1,) * dout.dim(), dtype=wide), dout, x)
        ds = prod.sum_to_size(s.shape)
    if need_x:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        torch.mul(dout if torch.promote_types(dout.dtype, s.dtype) == wide else dout.to(wide), s, out=dx)
    return ds, dx


#: _Scaled's backward in one Triton launch (scaled_bwd_kernel: reads ∂out and x once, writes ∂x and the per-token
#: ∂s) instead of three torch passes (the fp32 product ∂out ⊙ x written and summed, then ∂out ⊙ s): DeltaNet's β·v at
#: (2, 8192, 16, 128), bf16 v, fp32 chunk tensors, 673 → 268 MB per backward (glue_ops.py), the same rounding (∂x: the
#: fp32 product rounded once to x's dtype; ∂s: an fp32 sum, in another order). Where the triton backend runs: a CUDA
#: tensor or the interpreter; fp32 s, x and ∂out of dtype bf16 / fp16 / fp32. OLSSM_TRITON_FUSED_SCALE_BWD (0 / 1)
#: overrides; read at each backward.
FUSED_SCALE_BWD = True
#: d (the scaled tensor's last axis) above which _Scaled keeps the torch backward (one program holds BR × d)
_SCALED_BWD_MAX_D = 1024
SCALED_BWD_WARPS = 4


def fused_scale_backward(s, x, dout) -> bool:
    """Whether _Scaled's backward runs scaled_bwd_kernel (FUSED_SCALE_BWD) for these tensors."""
    floats = (torch.bfloat16, torch.float16, torch.float32)
    return (switch_on("OLSSM_TRITON_FUSED_SCALE_BWD", FUSED_SCALE_BWD, "fused scale backward")
            and (x.is_cuda or (_scan.interpreted() and x.device.type == "cpu"))
            and s.dtype == torch.float32 and x.dtype in floats and dout.dtype in floats
            and x.shape[-1] <= _SCALED_BWD_MAX_D and x.numel() > 0)


@triton.jit
def scaled_bwd_kernel(dout_ptr, x_ptr, s_ptr, dx_ptr, ds_ptr, N, D, BR: tl.constexpr, BD: tl.constexpr,
                      DX_BF16: tl.constexpr):
    """Rows r of out = s_r · x_r (N rows of D): ∂x_r = ∂out_r · s_r rounded once to ∂x's dtype, ∂s_r = Σ ∂out_r ⊙ x_r,
    both in fp32. DX_BF16: ∂x is bf16, rounded to nearest here (_bf16_rounded) so that the interpreter's truncating
    conversion stores the GPU's value."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    in_rows = rows < N
    m = in_rows[:, None] & (cols[None, :] < D)
    off = rows[:, None] * D + cols[None, :]
    g = tl.load(dout_ptr + off, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=in_rows, other=0.0).to(tl.float32)
    tl.store(ds_ptr + rows, tl.sum(g * x, axis=1), mask=in_rows)
    dx = g * s[:, None]
    if DX_BF16:
        dx = _bf16_rounded(dx)
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)


def scaled_backward(s, x, dout):
    """(∂s in s's shape, ∂x) of out = s ⊙ x, x [..., d] and s broadcast along d (and possibly along leading axes: ∂s is
    summed back to s's shape): scaled_bwd_kernel over the rows of x, through the op olssm::scaled_bwd."""
    rows_shape = x.shape[:-1]
    s_rows = torch.broadcast_to(s, (*rows_shape, 1)).reshape(math.prod(rows_shape)).contiguous()
    ds, dx = torch.ops.olssm.scaled_bwd(s_rows, x.contiguous(), dout.contiguous())
    return ds.reshape(*rows_shape, 1).sum_to_size(s.shape), dx


# A torch.library op, as every other launch of the scan (library.py), so that torch.compile calls it as it is instead
# of tracing the launch inside _Scaled's backward.
@torch.library.custom_op("olssm::scaled_bwd", mutates_args=())
def scaled_bwd(s_rows: torch.Tensor, x: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂s [N] fp32, ∂x) of out = s_rows[r] · x_r over the N rows of a contiguous x [..., D] (dout likewise)."""
    D, N = x.shape[-1], s_rows.numel()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ds = torch.empty(N, dtype=torch.float32, device=x.device)
    BR, BD = scaled_bwd_tile(D)
    _scan._check_device(x.device)
    scaled_bwd_kernel[(triton.cdiv(N, BR),)](dout, x, s_rows, dx, ds, N, D, BR=BR, BD=BD,
                                            DX_BF16=x.dtype == torch.bfloat16, num_warps=SCALED_BWD_WARPS)
    return ds, dx


@scaled_bwd.register_fake
def _(s_rows, x, dout):
    return s_rows.new_empty(s_rows.shape, dtype=torch.float32), x.new_empty(x.shape)


def scaled_bwd_tile(D: int) -> tuple[int, int]:
    """(rows BR, columns BD) of one scaled_bwd_kernel program for rows of D: whole rows, 2048 elements (16 per thread
    and loaded tile on its 4 warps: sm_90 at D = 128, 78 registers; 4096 took 128, a quarter of the SM's warps for a
    kernel that only streams memory)."""
    BD = max(16, triton.next_power_of_2(D))
    return max(1, min(64, 2048 // BD)), BD


def backward_supported(plan, exact_decay_grad: bool = True) -> bool:
    """The chunked backward kernels cover none / scalar / row / column decays without corrections and (with
    chunked_delta_bwd.DELTA_BACKWARD = "chunk") the delta family with a scalar or row c (the latter unless
    chunked_delta_bwd.ROW_C_BACKWARD = "recurrent") and none / scalar / row decay;
    with exact_decay_grad only where log Λ has a closed form (no division by Λ in the chain rule)."""
    form = plan.rule.form
    if form.corrections:
        from .chunked_delta_bwd import delta_backward
        if (form.decay_kind not in ("none", SCALAR, ROW)
                or delta_backward(row_c=_c_row(form)) != "chunk"):
            return False
    elif form.decay_kind not in ("none", SCALAR, ROW, COLUMN):
        return False
    return not exact_decay_grad or form.decay_kind == "none" or _log_expr(form.decay) is not None


#: storage dtype of the chunk tensors q, w, e, a, b, c (chunk_inputs): "fp32", or "input": the scan's input dtype
#: where that is bf16 / fp16 (args.out_dtype; fp32 inputs stay fp32). The log decay stays fp32 either way (the
#: kernels sum it cumulatively in fp64). The kernels load every chunk tensor and convert it to fp32 at once, so
#: "input" changes the math only by rounding the evaluated entries (β·k, ...) to the input dtype (≤ 2⁻⁸ relative
#: for bf16; none where the entry was already evaluated in bf16 from bf16 inputs) and halves their bytes; the
#: chunked backward's gradients of those tensors are returned in their dtype (as autograd requires). An input that
#: is an entry itself and already has the storage dtype (bf16 q, k, v under "input") is handed over without a copy,
#: and β·v is written straight into the storage dtype, with the same rounding (_entries, _Scaled).
#: OLSSM_TRITON_CHUNK_STORAGE overrides. Read at call time.
CHUNK_STORAGE = "fp32"


def _storage(env: str, value: str, what: str, out_dtype) -> torch.dtype:
    """A storage switch's dtype ("fp32", or "input": out_dtype where that is bf16 / fp16) for a scan whose inputs
    (output) have dtype out_dtype; the environment variable env overrides the module's value."""
    mode = switch(env, value, ("fp32", "input"), what)
    return out_dtype if mode == "input" and out_dtype in (torch.bfloat16, torch.float16) else torch.float32


def chunk_storage(out_dtype=torch.float32) -> torch.dtype:
    """The dtype chunk_inputs stores q, w, e, a, b, c in for a scan whose inputs (output) have dtype out_dtype."""
    return _storage("OLSSM_TRITON_CHUNK_STORAGE", CHUNK_STORAGE, "chunk storage", out_dtype)


#: storage dtype of the chunked forward's checkpoints ck (the state entering every chunk, [N, H, NCK, d_v, d_k]):
#: "fp32", or "input": the scan's input dtype where that is bf16 / fp16 (fp32 inputs stay fp32). Only the stored
#: copy is rounded (≤ 2⁻⁸ relative per entry for bf16): every sequential kernel carries its running state in fp32
#: registers, so the rounding does not compound across chunks; it perturbs each chunk's inter-chunk share of o and
#: the backward's recompute from S₀. Every reader converts ck to fp32 after the load (the chunked kernels and the
#: generated recurrent backward, which reads it when the chunked forward is followed by the recurrent backward).
#: The recurrent and block-scan kernels keep fp32 checkpoints, and the chunked delta backward's dh stays fp32
#: (its key kernel sums cancelling terms). OLSSM_TRITON_CHECKPOINT_STORAGE overrides. Read at call time
#: (library.run_config passes the result to the op as its ck_dtype argument).
CHECKPOINT_STORAGE = "fp32"


def checkpoint_storage(out_dtype=torch.float32) -> torch.dtype:
    """The dtype of the chunked forward's checkpoints ck for a scan whose inputs (output) have dtype out_dtype."""
    return _storage("OLSSM_TRITON_CHECKPOINT_STORAGE", CHECKPOINT_STORAGE, "checkpoint storage", out_dtype)


#: storage dtype of the split delta forward's Ũ, then Δ (E_0 − Δ for a tied input term) (written by prep, read and
#: rewritten in place by the state pass, read by out; [B, T, H, d_v], 268 MB of fp32 at (2, 8192, 16, 128), so ~0.5 GB of each forward's traffic):
#: "fp32", or "input": the scan's input dtype where that is bf16 / fp16, as fla keeps its u and v_new. Not free: Ũ
#: rounded to bf16 enters the state update (the state pass adds W̃ S₀ᵀ to it in fp32 and updates S from that), so
#: DeltaNet's final state moves from 2e-7 to 2e-3 of the fp64 reference on bf16 inputs (interpreter, T = 256, d = 32;
#: o, rounded to bf16 anyway, 5e-3 either way), where every other storage knob costs nothing on bf16 inputs since
#: RAW_INPUTS and SCALE_ON_LOAD. The backward recomputes Δ in fp32 and does not read it. Under bf16 operands with
#: "fp32", Δ goes to a bf16 buffer of its own (OPERAND_BUFFERS' "delta": the output kernel reads it as a dot operand
#: only, so that is exact) and Ũ alone stays fp32. OLSSM_TRITON_DELTA_U_STORAGE overrides; read at call time. Untimed.
DELTA_U_STORAGE = "fp32"


def delta_u_storage(out_dtype=torch.float32) -> torch.dtype:
    """The dtype of the split delta forward's Ũ / Δ buffer for a scan whose inputs (output) have dtype out_dtype."""
    return _storage("OLSSM_TRITON_DELTA_U_STORAGE", DELTA_U_STORAGE, "delta u storage", out_dtype)


def written(*shape, device) -> torch.Tensor:
    """A float32 output buffer of which the launching kernel writes every element: left uninitialised (the zero
    fills were full passes over memory, ~0.7 GB per DeltaNet fwd+bwd at (2, 8192, 16, 128)). With
    OLSSM_TRITON_POISON=1 (tests/conftest.py sets it) it is filled with NaN instead, so an element a kernel
    leaves unwritten fails the tests' finiteness and gradient checks."""
    if os.environ.get("OLSSM_TRITON_POISON", "0") not in ("", "0"):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _stack(xs):
    return xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)


def chunk_inputs(plan, args, grad: bool = False) -> list:
    """[q [B,T,H,K], w (key sides) [M,B,T,H,K], e (value sides) [M,B,T,H,V], log decay ([B,T,H] / [B,T,H,V] / [B,T,H,K];
    zeros when a correction has no decay)] + (with a correction) [a, b [B,T,H,K], c [B,T,H] (a row c: [B,T,H,V])],
    with R ≥ 2 corrections stacked [R, ...]: the log decay fp32, the others in chunk_storage(args.out_dtype) (fp32
    unless CHUNK_STORAGE = "input" and bf16 / fp16 inputs). grad and chunked_delta_bwd.same_key: w and a are empty
    placeholders for b (shared_key_inputs). SCALE_ON_LOAD: e holds the input x of e_0 = s·x and s [B, T, H] (fp32)
    is appended (input_scale)."""
    rule, form = plan.rule, plan.rule.form
    B, T, H, K, V = args.B, args.T, args.H, args.d_k, args.d_v
    sdt = chunk_storage(args.out_dtype)
    ent = _entries(form)
    as_they_are = _raw_inputs(form, ent, sdt, grad)
    scale_on_load = _scales_on_load(form, ent, grad)
    on_load = []   # the input scale, where the kernels apply it (input_scale)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):   # grad: the chunked backward's chain rule
        lay, ev = {}, {}
        if ent.evaluate is not None:   # up-casts (compute_dtype) only the inputs read by an evaluated expression
            lay = rule.broadcast_inputs(K, V, {**args.tokens, **args.params}, "scan",
                                        need={n: rule.inputs[n] for n in ent.need})
            ev = ent.evaluate(lay)

        def full(x, X, Y):
            x = torch.as_tensor(x, dtype=torch.float32, device=args.device).to(torch.float32)
            while x.dim() < 2:
                x = x.unsqueeze(0)
            return torch.broadcast_to(x, (B, T, H, X, Y))

        def entry(name, kind):
            """The entry [B, T, H(, d)] of this kind (scalar, row: d_v, column: d_k) in the storage dtype. A key- or
            value-sized input (q, k, v) is taken as it is where it has that dtype and is contiguous (the caller's
            tensor, which then receives the op's gradient directly), else cast once; one times a scalar factor is
            written once (_Scaled); both from the up-cast copy where the evaluator reads the input too (_entries).
            Anything else is evaluated and broadcast in fp32, then stored (autograd sums over a broadcast parameter
            in fp32)."""
            if name in ent.direct:
                sym, scale, lifted = ent.direct[name]
                x = args.tokens[sym] if not lifted else lay[sym].squeeze(-1 if kind == ROW else -2)
                if scale is not None:
                    s = torch.as_tensor(ev[scale], device=args.device)   # its evaluated dtype: fp32 (fp64 inputs: fp64)
                    while s.dim() < 2:
                        s = s.unsqueeze(0)
                    s = torch.broadcast_to(s, (B, T, H, 1, 1)).squeeze(-1)
                    if (name == "e0" and scale_on_load and s.dtype == torch.float32
                            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)):
                        on_load.append(s.squeeze(-1).contiguous())   # [B, T, H]: read by the kernels (SCALE_ON_LOAD)
                        return x.contiguous()
                    x = _Scaled.apply(s, x, sdt)
                elif sym in as_they_are and x.dtype in (torch.bfloat16, torch.float16):
                    return x.contiguous()   # RAW_INPUTS: read in its own dtype by kernels that load it into fp32
                return x.to(sdt).contiguous()
            if kind == SCALAR:
                return full(ev[name], 1, 1).squeeze(-1).squeeze(-1).to(sdt)
            return (full(ev[name], V, 1).squeeze(-1) if kind == ROW else full(ev[name], 1, K).squeeze(-2)).to(sdt)

        shared = {}

        def key_side(name, expr):
            """[B, T, H, K] (storage dtype), one tensor per distinct expression: DeltaNet's w = a = b = k (and a
            query equal to the key) are one copy, read from L2 by the kernels instead of three from HBM."""
            e = sp.sympify(expr)
            if e not in shared:
                shared[e] = entry(name, COLUMN).contiguous()
            return shared[e]

        # size-1 axes dropped by squeeze and one term put in a stack by unsqueeze: both are views, whose backward
        # is a view too (a select's backward writes a zero tensor and copies in; a stack's copies)
        M = len(form.inputs)
        ws = [key_side(f"w{m}", t.w) for m, t in enumerate(form.inputs)]
        out = [key_side("q", form.readout),
               _stack(ws),                                                  # [M, B, T, H, K]
               _stack([entry(f"e{m}", ROW) for m in range(M)])]             # [M, B, T, H, V]
        kind = form.decay_kind
        gate = args.tokens[ent.raw_log] if ent.raw_log is not None else None
        if gate is not None and _raw_log_decay(gate, (B, T, H, V if kind == ROW else K)):
            out.append(gate.contiguous())   # floored on load, its gradient masked in the kernels (_log_decay)
        elif kind != "none":
            if gate is not None:   # the log gate not taken as it is: up-cast and laid out as the evaluator's ld
                ld = rule.broadcast_inputs(K, V, {ent.raw_log: gate}, "scan",
                                           need={ent.raw_log: rule.inputs[ent.raw_log]})[ent.raw_log]
                ld = torch.as_tensor(ld, dtype=torch.float32, device=args.device)
            elif "ld" in ev:
                ld = torch.as_tensor(ev["ld"], dtype=torch.float32, device=args.device)
            else:
                raw = torch.as_tensor(ev["decay"], dtype=torch.float32, device=args.device)
                check_decay_values(raw, form, args.tokens)   # one host sync, raw decays only (layers give logs)
                ld = _safe_log(raw)
            if kind == SCALAR:
                ld = full(ld, 1, 1).squeeze(-1).squeeze(-1)
            elif kind == ROW:
                ld = full(ld, V, 1).squeeze(-1)
            else:
                ld = full(ld, 1, K).squeeze(-2)
            out.append(ld.clamp_min(_LOG_FLOOR))
        elif form.corrections:
            out.append(torch.zeros(B, T, H, device=args.device))
        if form.corrections:
            row = _c_row(form)
            cs = [entry(f"c{r}", ROW if row else SCALAR) for r in range(len(form.corrections))]
            a_s = [key_side(f"a{r}", cr.a) for r, cr in enumerate(form.corrections)]
            b_s = [key_side(f"b{r}", cr.b) for r, cr in enumerate(form.corrections)]
            out += [a_s[0], b_s[0], cs[0]] if len(cs) == 1 else [torch.stack(a_s), torch.stack(b_s), torch.stack(cs)]
            if grad:
                from .chunked_delta_bwd import same_key
                if same_key(form):   # one key tensor takes the whole key gradient (shared_key_inputs)
                    out[1] = out[4] = out[5].new_empty(0)
        out += on_load
    return [x.contiguous() for x in out]


#: under CHUNK_STORAGE "fp32", a bf16 / fp16 input that is a chunk tensor itself (q, k, v: no factor, not read by an
#: evaluated expression) goes to the kernels as it is instead of as an fp32 copy. Every chunked kernel converts what it
#: loads to fp32 first (test_every_chunked_load_converts), and bf16 → fp32 is exact, so results are bit-identical
#: (tested); the copies were DeltaNet's q and k, 403 MB written and read again per forward at (2, 8192, 16, 128) bf16,
#: and the kernels read half the bytes. With gradients, an input that fills more than one slot (w = a = b = k without
#: the same-key kernel, a query equal to the key) keeps the fp32 copy: autograd would sum its slots' gradients in
#: the input's dtype, one rounding each. OLSSM_TRITON_RAW_INPUTS (0 / 1) overrides; read at call time.
RAW_INPUTS = True


def _raw_log_decay(gate, shape) -> bool:
    """Whether a row or column log gate that is an input as it is (_Entries.raw_log: GLA's) reaches the kernels as the
    caller gave it (RAW_INPUTS; fp32 / bf16 / fp16, the chunk tensor's shape), floored on load and its gradient
    masked there (_log_decay, _log_decay_grad), instead of as an fp32 copy floored by torch (at (2, 8192, 16, 128):
    the cast, the floor and the floor's backward, ~0.9 GB of GLA's glue per fwd+bwd)."""
    return (switch_on("OLSSM_TRITON_RAW_INPUTS", RAW_INPUTS, "raw inputs")
            and gate.dtype in (torch.float32, torch.bfloat16, torch.float16) and tuple(gate.shape) == tuple(shape))


def _slot_uses(form, ent, grad: bool) -> collections.Counter:
    """How many chunk-tensor slots each input fills as a direct entry (_entries), the same-key placeholders for w and
    a not counting (with gradients they hand their share to b: shared_key_inputs). An input in one slot can go to the
    kernels as it is: autograd then sums no slot gradients in its dtype (RAW_INPUTS, SCALE_ON_LOAD)."""
    placeholders = set()
    if grad and form.corrections:
        from .chunked_delta_bwd import same_key
        placeholders = {"w0", "a0"} if same_key(form) else set()
    return collections.Counter(sym for name, (sym, _, _) in ent.direct.items() if name not in placeholders)


def _raw_inputs(form, ent, sdt, grad: bool) -> set:
    """The input symbols chunk_inputs hands over in their own dtype (RAW_INPUTS): those filling one slot of the
    chunk tensors as they are (any number without gradients), the same-key placeholders not counting."""
    if sdt != torch.float32 or not switch_on("OLSSM_TRITON_RAW_INPUTS", RAW_INPUTS, "raw inputs"):
        return set()
    uses = _slot_uses(form, ent, grad)
    return {sym for name, (sym, scale, lifted) in ent.direct.items()
            if scale is None and not lifted and (not grad or uses[sym] == 1)}


#: a value side that is one input times a per-token scalar factor (Mamba-2's Δ·x, DeltaNet's β·v), in a rule with one
#: input term, goes to the kernels as the input x and the factor s [B, T, H] (fp32), multiplied on load (_value_side)
#: instead of as the product chunk_inputs would write: at (2, 8192, 16, 128) with bf16 x the product was 202 MB of
#: torch traffic per forward under fp32 storage (glue_ops.py), and the kernels read 134 MB of fp32 e where they now
#: read 67 MB of x. The kernels form the same fp32 product (x up-cast exactly, times s), so under fp32 storage o and
#: the states are bit-identical; under CHUNK_STORAGE "input" they skip the product's rounding to bf16 (2⁻⁸). Their ∂e
#: becomes ∂x and ∂s as _Scaled's backward forms them (scaled_input_grads). With gradients, an x that fills another
#: slot too keeps the product (as RAW_INPUTS). OLSSM_TRITON_SCALE_ON_LOAD (0 / 1) overrides; read at call time.
SCALE_ON_LOAD = True


def _scales_on_load(form, ent, grad: bool) -> bool:
    """Whether chunk_inputs hands e_0 over as its input and factor (SCALE_ON_LOAD): one input term, not on sub-tokens,
    e_0 an input times a scalar factor, its input in no other slot with gradients (nor read by the evaluator:
    "lifted"). chunk_inputs checks the dtypes (fp32 factor; bf16 / fp16 / fp32 input) as it makes them; the chunk
    storage does not matter (the kernels convert every load)."""
    if (len(form.inputs) != 1 or sub_tokens(form) != 1 or "e0" not in ent.direct
            or not switch_on("OLSSM_TRITON_SCALE_ON_LOAD", SCALE_ON_LOAD, "scale on load")):
        return False
    sym, scale, lifted = ent.direct["e0"]
    return scale is not None and not lifted and (not grad or _slot_uses(form, ent, grad)[sym] == 1)


def _chunk_slots(form) -> int:
    """How many tensors chunk_inputs makes for this form before an input scale: q, w, e, the log decay (with a decay
    or a correction), a, b, c (with corrections)."""
    return 3 + (form.decay_kind != "none" or bool(form.corrections)) + 3 * bool(form.corrections)


def input_scale(form, chunk_in) -> tuple:
    """(chunk_in without its input scale, the scale [B, T, H] or None): chunk_inputs appends the factor of an e_0 it
    hands over as its input (SCALE_ON_LOAD); the kernels take it as es_ptr (_scale_args)."""
    n = _chunk_slots(form)
    if len(chunk_in) == n + 1:
        return list(chunk_in[:n]), chunk_in[n]
    return list(chunk_in), None


def _scale_args(es) -> dict:
    """The launch arguments of an input scale (input_scale) for the kernels that read e."""
    return {} if es is None else dict(es_ptr=es, SCALED_E=True)


def scaled_input_grads(chunk_in, es, grads) -> list:
    """The backward's gradients of chunk_in without its input scale (∂e in e's slot) → those of chunk_in with it: ∂x
    in e's slot and ∂s appended, as _Scaled's backward forms them from ∂e (scale_chain_rule)."""
    if es is None:
        return grads
    ds, dx = scale_chain_rule(es.unsqueeze(0).unsqueeze(-1), chunk_in[2], grads[2])   # s per row of x [1, B, T, H, d_v]
    return [*grads[:2], dx, *grads[3:], ds.reshape(es.shape)]


def shared_key_inputs(chunk_in) -> tuple:
    """(chunk_in, same): with chunk_inputs' placeholders for w and a (empty 1-D tensors, where
    chunked_delta_bwd.same_key holds: a = b = w_0) replaced by b[None] and b, and whether they were. The
    placeholders tell the backward op that the three uses share one tensor, so it returns dA + dB + dW_0 once, as
    ∂b, and nothing for w and a: autograd then has no three [B, T, H, K] fp32 gradients to add. Full chunk
    tensors pass through (same False)."""
    if len(chunk_in) < 7 or chunk_in[4].dim() != 1:
        return list(chunk_in), False
    q, w, e, g, a, b, c = chunk_in[:7]
    return [q, b.unsqueeze(0), e, g, b, b, c, *chunk_in[7:]], True


@triton.jit
def _sequence(cu_ptr, i_n, T, VARLEN: tl.constexpr):
    """[bos, eos) of batch row i_n, or of packed sequence i_n with VARLEN (then B = 1, packed along T)."""
    if VARLEN:
        bos = tl.load(cu_ptr + i_n).to(tl.int32)
        eos = tl.load(cu_ptr + i_n + 1).to(tl.int32)
    else:
        bos = i_n * T
        eos = bos + T
    return bos, eos


@triton.jit
def _tokens(start, tt, eos, H, i_h, OFF32: tl.constexpr = False):
    """Mask and flat (token, head) row index of the tokens start + tt of a chunk (those < eos are real): int64, or
    with OFF32 (OFFSETS32: the host checked that every row · width product fits) int32, so that the kernel's
    row · width + column offsets stay int32 tiles."""
    tok = start + tt
    if OFF32:
        base = tok * H + i_h
    else:
        base = tok.to(tl.int64) * H + i_h
    return tok < eos, base


@triton.jit
def _initial_tile(ptr, i_bh, DK, DV, soff, m2, BK: tl.constexpr, BV: tl.constexpr, USE: tl.constexpr):
    """The program's [BV, BK] fp32 tile of a state given per sequence·head at ptr (h0, or dS at the end; soff, m2
    from _state_tile); zeros unless USE."""
    S = tl.zeros([BV, BK], dtype=tl.float32)
    if USE:
        S += tl.load(ptr + i_bh.to(tl.int64) * DV * DK + soff, mask=m2, other=0.0).to(tl.float32)
    return S


@triton.jit
def _sequential_program(cu_ptr, T, H, DK, DV, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        VARLEN: tl.constexpr, KEY_BLOCKS: tl.constexpr = False):
    """The opening of a kernel that walks one sequence's chunks in order, one program per (value block,
    sequence × head) — with KEY_BLOCKS per (value block, key block of BK, sequence × head), the grid's second axis
    the key block: i_v, i_bh, i_h, the sequence's bounds, its state tile (_state_tile) and the chunk's token
    index tt."""
    i_v = tl.program_id(0)
    if KEY_BLOCKS:
        i_k = tl.program_id(1)
        i_bh = tl.program_id(2)
    else:
        i_k = 0
        i_bh = tl.program_id(1)
    bos, eos = _sequence(cu_ptr, i_bh // H, T, VARLEN)
    rows, cols, rm, km, m2, soff = _state_tile(i_v, DK, DV, BK, BV, i_k)
    return i_v, i_bh, i_bh % H, bos, eos, rows, cols, rm, km, m2, soff, tl.arange(0, BT)


@triton.jit
def _state_tile(i_v, DK, DV, BK: tl.constexpr, BV: tl.constexpr, i_k=0):
    """The program's [BV, BK] block of the state: row / column indices and masks, and the mask and offsets of the
    tile in the [.., DV, DK] layout of h0 / ck / ht / dh. i_k: the key block (the split diagonal path's state passes;
    else 0, all keys)."""
    rows = i_v * BV + tl.arange(0, BV)
    cols = i_k * BK + tl.arange(0, BK)
    rm = rows < DV
    km = cols < DK
    return rows, cols, rm, km, rm[:, None] & km[None, :], rows[:, None] * DK + cols[None, :]


@triton.jit
def _chunk_decay(g_ptr, base, tm, BT: tl.constexpr, GATED: tl.constexpr, SUB: tl.constexpr = 1):
    """D (inclusive), D_st (strict), Γ, dec = Γ_L/Γ, Γ_L of a chunk (fp64 cumulative sums: module docstring).
    SUB > 1 (rank-R corrections laid out as SUB sub-tokens per token, sub_tokens()): D_st is strict between
    *tokens*, so the corrections of one token never see each other (they all read the same S̃_t)."""
    tt = tl.arange(0, BT)
    incl = tt[:, None] >= tt[None, :]
    if GATED:
        g = tl.load(g_ptr + base, mask=tm, other=0.0).to(tl.float64)
        G = tl.cumsum(g, axis=0)
        GL = tl.sum(g, axis=0)
        D = tl.exp(tl.where(incl, (G[:, None] - G[None, :]).to(tl.float32), float("-inf")))
        gam = tl.exp(G.to(tl.float32))
        dec = tl.exp((GL - G).to(tl.float32))
        gl = tl.exp(GL.to(tl.float32))
    else:
        D = tl.where(incl, 1.0, 0.0)
        gam = tl.full([BT], 1.0, tl.float32)
        dec = tl.full([BT], 1.0, tl.float32)
        gl = 1.0
    return D, tl.where(_strict(tt, SUB), D, 0.0), gam, dec, gl


@triton.jit
def chunk_decay_factors_kernel(g_ptr, f_ptr, cu_ptr, ix_ptr, T, H, BT: tl.constexpr, VARLEN: tl.constexpr,
                               OFF32: tl.constexpr = False):
    """Per chunk, parallel over chunks: Γ, dec = Γ_L/Γ and Γ_L of a scalar decay (_chunk_decay's values, from its fp64
    scan and sum) → f [B·T·H, 3] (Γ_L at every token of its chunk), for the sequential state passes
    (_sequential_decay), so that no scan or cross-warp sum is left in their loops (DECAY_FACTORS)."""
    i_bh, i_h, c, start, eos = _delta_chunk(ix_ptr, cu_ptr, tl.program_id(0), tl.program_id(1), T, H, BT, VARLEN)
    tm, base = _tokens(start, tl.arange(0, BT), eos, H, i_h, OFF32)
    _, _, gam, dec, gl = _chunk_decay(g_ptr, base, tm, BT, True)
    tl.store(f_ptr + 3 * base, gam, mask=tm)
    tl.store(f_ptr + 3 * base + 1, dec, mask=tm)
    tl.store(f_ptr + 3 * base + 2, gam * 0.0 + gl, mask=tm)


@triton.jit
def _sequential_decay(g_ptr, f_ptr, base, tm, first, BT: tl.constexpr, FACTORS: tl.constexpr):
    """(Γ, dec = Γ_L/Γ, Γ_L) of a scalar decay's chunk for a sequential kernel: loaded from the pre-pass's f (FACTORS;
    first: the chunk's first (token, head) row) or formed here by _chunk_decay (an fp64 scan and sum in the loop)."""
    if FACTORS:
        gam = tl.load(f_ptr + 3 * base, mask=tm, other=1.0).to(tl.float32)
        dec = tl.load(f_ptr + 3 * base + 1, mask=tm, other=1.0).to(tl.float32)
        gl = tl.load(f_ptr + 3 * first + 2).to(tl.float32)
    else:
        _, _, gam, dec, gl = _chunk_decay(g_ptr, base, tm, BT, True)
    return gam, dec, gl


@triton.jit
def _strict(tt, SUB: tl.constexpr):
    """[BT, BT]: token i after token j; with SUB sub-tokens per token, i's token after j's (sub_tokens). SUB = 1
    keeps the plain comparison, so the rank-1 kernels compile exactly as before (sm_90 report unchanged)."""
    if SUB == 1:
        out = tt[:, None] > tt[None, :]
    else:
        out = (tt // SUB)[:, None] > (tt // SUB)[None, :]
    return out


@triton.jit
def _token_column(tt, j, x, b):
    """The per-token path of the row / column / per-row decay kernels, exact for any decay: token j's row
    selector [BT, 1] and column selector [1, BT], its row of x, and the pairwise factors e^{b_i − b_j}
    (i ≥ j; 0 above, never an overflowing exponent)."""
    sel = (tt == j)[:, None]
    xj = tl.sum(tl.where(sel, x, 0.0), axis=0)
    bj = tl.sum(tl.where(sel, b, 0.0), axis=0)
    ex = tl.exp(tl.where((tt >= j)[:, None], (b - bj[None, :]).to(tl.float32), float("-inf")))
    return sel, (tt == j)[None, :], xj, ex


@triton.jit
def _delta_tiles(q_ptr, a_ptr, b_ptr, c_ptr, base, tm, rows, cols, km2, vm, DK, DV, C_ROW: tl.constexpr):
    """A delta-family chunk's q, a, b [BT, BK] and c ([BT, BV] for a row coefficient, where every value row has its
    own transform; else [BT, 1])."""
    koff = base[:, None] * DK + cols[None, :]
    q = tl.load(q_ptr + koff, mask=km2, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + koff, mask=km2, other=0.0).to(tl.float32)
    bv = tl.load(b_ptr + koff, mask=km2, other=0.0).to(tl.float32)
    if C_ROW:
        cc = tl.load(c_ptr + base[:, None] * DV + rows[None, :], mask=vm, other=0.0).to(tl.float32)
    else:
        cc = tl.load(c_ptr + base, mask=tm, other=0.0).to(tl.float32)[:, None]
    return q, a, bv, cc


@triton.jit
def _value_side(e_ptr, m, SE, voff, vm, es_ptr, base, tm, SCALED_E: tl.constexpr):
    """Input term m's value side E_m at the tile offsets voff, in fp32: as chunk_inputs stored it, or with SCALED_E
    (one input term, SCALE_ON_LOAD) its input x times the per-token factor s at es_ptr (base: the tile's token rows),
    the product (Δ·x, β·v) that chunk_inputs then does not write: the fp32 product of x and s, which torch wrote as
    it is under fp32 chunk storage (and rounded to bf16 / fp16 under "input")."""
    e = tl.load(e_ptr + _rank_offset(m, SE) + voff, mask=vm, other=0.0).to(tl.float32)
    if SCALED_E:
        e = e * tl.load(es_ptr + base, mask=tm, other=0.0).to(tl.float32)[:, None]
    return e


@triton.jit
def _log_decay(g_ptr, offs, mask):
    """A row or column log decay tile in fp64, floored at log(float32 tiny) as chunk_inputs floors the log decays it
    forms (a raw log gate comes as the caller gave it: RAW_INPUTS); NaN stays NaN."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    return tl.where(g < LOG_FLOOR, LOG_FLOOR, g)


@triton.jit
def _log_decay_grad(dg, g_ptr, offs, mask):
    """∂ of a raw log gate from ∂ of its floored value (_log_decay): zero where the gate is below the floor, as torch's
    clamp_min passes none there."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    return tl.where(g < LOG_FLOOR, 0.0, dg)


@triton.jit
def _row_decay_tiles(g_ptr, voff, vm, SPAN: tl.constexpr):
    """A row decay's chunk: b (fp64 cumulative log decay from the chunk start, [BT, BV]), b_L [BV], Γ = e^b and
    dec = e^{b_L − b} ([BT, BV]), and the factorisation about the chunk's half-way point: x = b − b_L/2 (fp32) and
    `fast`, whether every row's b_L > −SPAN (FAST_SPAN), so that e^{b_i − b_j} = e^{x_i}·e^{−x_j} is safe (module
    docstring)."""
    g = _log_decay(g_ptr, voff, vm)
    G = tl.cumsum(g, axis=0)
    GL = tl.sum(g, axis=0)
    return (G, GL, tl.exp(G.to(tl.float32)), tl.exp((GL[None, :] - G).to(tl.float32)),
            (G - 0.5 * GL[None, :]).to(tl.float32), tl.min(GL, axis=0) > -SPAN)


@triton.jit
def _rowdecay_delta_chunk(q, a, cc, S0, AB, G, gam, xh, fast, tt, incl, strict, w_ptr, e_ptr, SW, SE, koff, voff,
                          km2, vm, M: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                          es_ptr, base, tm, SCALED_E: tl.constexpr):
    """One chunk of a delta rule with a row decay (every value row its own scalar-decay rule), from the state S₀
    entering it: o without the corrections' share, P = γ S_{t−1} a (the corrections' predictions) and Δ = c ⊙ P.
    R′ = Γ ⊙ A S₀ᵀ + Σ_m (A W_mᵀ ⊙ D_st) E_m and the input terms' share of o take factorised dots when `fast`
    (every row's total log decay > −FAST_SPAN, x = b − b_L/2), else one token column at a time; the forward
    substitution P_s = R′_s − Σ_{r<s} N_sr Δ_r (N = A Bᵀ ⊙ D_st per row) is a loop. The fused forward and the
    row-decay backward's recompute both use it."""
    Rp = _mm(a, tl.trans(S0), PREC) * gam
    o = _mm(q, tl.trans(S0), PREC) * gam
    for m in tl.static_range(M):
        w = tl.load(w_ptr + _rank_offset(m, SW) + koff, mask=km2, other=0.0).to(tl.float32)
        e = _value_side(e_ptr, m, SE, voff, vm, es_ptr, base, tm, SCALED_E)
        AW = tl.where(strict, _mm(a, tl.trans(w), PREC), 0.0)
        QW = tl.where(incl, _mm(q, tl.trans(w), PREC), 0.0)
        if fast:   # Σ_j X_ij e^{b_i − b_j} e_j = e^{x_i} ⊙ Σ_j X_ij (e^{−x_j} ⊙ e_j)
            ex_ = e * tl.exp(-xh)
            Rp += _mm(AW, ex_, PREC) * tl.exp(xh)
            o += _mm(QW, ex_, PREC) * tl.exp(xh)
        else:
            for j in range(0, BT):
                sel, colj, ej, ex = _token_column(tt, j, e, G)
                Rp += tl.sum(tl.where(colj, AW, 0.0), axis=1)[:, None] * ej[None, :] * ex
                o += tl.sum(tl.where(colj, QW, 0.0), axis=1)[:, None] * ej[None, :] * ex
    P = tl.zeros([BT, BV], dtype=tl.float32)
    Dl = tl.zeros([BT, BV], dtype=tl.float32)
    for s_ in range(0, BT):
        sel = (tt == s_)[:, None]
        n_s = tl.sum(tl.where(sel, AB, 0.0), axis=0)                              # row s of N, over r
        Gs = tl.sum(tl.where(sel, G, 0.0), axis=0)
        ex = tl.exp(tl.where((tt < s_)[:, None], (Gs[None, :] - G).to(tl.float32), float("-inf")))
        p_s = tl.sum(tl.where(sel, Rp, 0.0), axis=0) - tl.sum(n_s[:, None] * ex * Dl, axis=0)
        P = tl.where(sel, p_s[None, :], P)
        Dl = tl.where(sel, (tl.sum(tl.where(sel, cc, 0.0), axis=0) * p_s)[None, :], Dl)
    return o, P, Dl


@triton.jit
def _column_scores(q, k, b, x, fast, tt, BT: tl.constexpr, PREC: tl.constexpr):
    """A column decay's causal scores Q Wᵀ ⊙ D over the key columns of q and k [BT, BK] (b their cumulative log decay,
    x = b − b_L/2): a dot of the factors e^{±x} when `fast` (every column's chunk total > −SPAN: both factors in
    [e^{−SPAN/2}, e^{SPAN/2}]), else one token column at a time with pairwise exponents, exact for any decay."""
    if fast:
        A = tl.where(tt[:, None] >= tt[None, :], _mm(q * tl.exp(x), tl.trans(k * tl.exp(-x)), PREC), 0.0)
    else:
        A = tl.zeros([BT, BT], dtype=tl.float32)
        for j in range(0, BT):
            _, colj, kj, ex = _token_column(tt, j, k, b)
            A = tl.where(colj, tl.sum(q * kj[None, :] * ex, axis=1)[:, None], A)
    return A


@triton.jit
def _diag_chunk(q, S, k_ptr, v_ptr, g_ptr, base, tm, rows, cols, rm, km, tt, DK, DV, SW, SE, M: tl.constexpr,
                BT: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr, OUT: tl.constexpr,
                STATE: tl.constexpr, SPAN: tl.constexpr, es_ptr, SCALED_E: tl.constexpr, f_ptr=None, first=0,
                FACTORS: tl.constexpr = False):
    """One chunk of the diagonal family (no correction) from S, the [BV, BK'] state tile entering it (value rows ×
    key columns): o [BT, BV] with OUT (q: the chunk's query tile, whose key columns must then be all of them, since o
    sums over keys), and with STATE S at the chunk's end (then cols may be any key block: a diagonal decay keeps key
    columns apart). The fused kernel runs both per chunk; the split path's state pass runs STATE, its output kernel
    OUT. Returns (o, S); o is 0.0 without OUT, S unchanged without STATE."""
    causal = tt[:, None] >= tt[None, :]
    qk_m = tm[:, None] & km[None, :]
    vm = tm[:, None] & rm[None, :]
    o = 0.0
    # the decay of the chunk, the carried state's share of o, and the carried state decayed
    if DECAY == 0:
        if OUT:
            o = _mm(q, tl.trans(S), PREC)
    elif DECAY == 1 and not OUT:   # the split state pass: dec and Γ_L alone (from the pre-pass with FACTORS)
        _, decv, glv = _sequential_decay(g_ptr, f_ptr, base, tm, first, BT, FACTORS)
        dec = decv[:, None]
        if STATE:
            S = S * glv
    elif DECAY == 1:
        g = tl.load(g_ptr + base, mask=tm, other=0.0).to(tl.float64)
        b = tl.cumsum(g, axis=0)                                  # fp64: see the module docstring
        bl = tl.sum(g, axis=0)
        dec = tl.exp((bl - b).to(tl.float32))[:, None]            # [BT, 1]
        if OUT:
            D = tl.exp(tl.where(causal, (b[:, None] - b[None, :]).to(tl.float32), float("-inf")))
            o = _mm(q, tl.trans(S), PREC) * tl.exp(b.to(tl.float32))[:, None]
        if STATE:
            S = S * tl.exp(bl.to(tl.float32))
    elif DECAY == 3:   # column decay (d_k), GLA
        g = _log_decay(g_ptr, base[:, None] * DK + cols[None, :], qk_m)
        b = tl.cumsum(g, axis=0)                                  # [BT, BK], fp64
        bl = tl.sum(g, axis=0)                                    # [BK]
        dec = tl.exp((bl[None, :] - b).to(tl.float32))            # [BT, BK]
        if OUT:
            fast = tl.min(bl, axis=0) > -SPAN                     # module docstring
            x = (b - 0.5 * bl[None, :]).to(tl.float32)            # log decay from the chunk's half-way point
            o = _mm(q * tl.exp(b.to(tl.float32)), tl.trans(S), PREC)
        if STATE:
            S = S * tl.exp(bl.to(tl.float32))[None, :]
    else:              # row decay (d_v)
        b, bl, gv, dec, x, fast = _row_decay_tiles(g_ptr, base[:, None] * DV + rows[None, :], vm, SPAN)
        if OUT:
            o = _mm(q, tl.trans(S), PREC) * gv
        if STATE:
            S = S * tl.exp(bl.to(tl.float32))[:, None]
    # the input terms e_m w_mᵀ of the chunk
    for m in tl.static_range(M):
        k = tl.load(k_ptr + _rank_offset(m, SW) + base[:, None] * DK + cols[None, :], mask=qk_m,
                    other=0.0).to(tl.float32)
        v = _value_side(v_ptr, m, SE, base[:, None] * DV + rows[None, :], vm, es_ptr, base, tm, SCALED_E)
        if DECAY == 0:
            if OUT:
                A = tl.where(causal, _mm(q, tl.trans(k), PREC), 0.0)
                o += _mm(A, v, PREC)
            if STATE:
                S += _mm(tl.trans(v), k, PREC)
        elif DECAY == 1:
            if OUT:
                A = _mm(q, tl.trans(k), PREC) * D
                o += _mm(A, v, PREC)
            if STATE:
                S += _mm(tl.trans(v * dec), k, PREC)
        elif DECAY == 3:
            if OUT:
                o += _mm(_column_scores(q, k, b, x, fast, tt, BT, PREC), v, PREC)
            if STATE:
                S += _mm(tl.trans(v), k * dec, PREC)
        else:
            if OUT:
                QK = tl.where(causal, _mm(q, tl.trans(k), PREC), 0.0)
                if fast:   # Σ_j QK_ij e^{b_i − b_j} v_j = e^{x_i} ⊙ Σ_j QK_ij (e^{−x_j} ⊙ v_j)
                    o += _mm(QK, v * tl.exp(-x), PREC) * tl.exp(x)
                else:
                    for j in range(0, BT):
                        sel, colj, vj, ex = _token_column(tt, j, v, b)
                        qkj = tl.sum(tl.where(colj, QK, 0.0), axis=1)   # [BT]
                        o += qkj[:, None] * vj[None, :] * ex
            if STATE:
                S += _mm(tl.trans(v * dec), k, PREC)
    return o, S


@triton.jit
def chunk_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, ck_ptr, cu_ptr, T, H, DK, DV, NCK, SW, SE,
                     M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                     USE_H0: tl.constexpr, SAVE_CK: tl.constexpr, VARLEN: tl.constexpr,
                     PREC: tl.constexpr = "ieee", OUT: tl.constexpr = True, KEY_BLOCKS: tl.constexpr = False,
                     SPAN: tl.constexpr = FAST_SPAN, es_ptr=None, SCALED_E: tl.constexpr = False, f_ptr=None,
                     FACTORS: tl.constexpr = False):
    """The diagonal family's walk over a sequence's chunks, the state carried in registers (_diag_chunk). The fused
    path (diag_path() "fused"): one program per (value block, sequence·head), each chunk's o formed in the walk. With
    OUT False (and SAVE_CK, KEY_BLOCKS), the split path's sequential pass: the state entering every chunk → ck and the
    last → ht, one program per (value block, key block, sequence·head): S ← Γ_L ⊙ S + Σ_m (E_m ⊙ dec)ᵀ W_m, no
    query, no [BT, BT] product (q_ptr, o_ptr unread)."""
    i_v, i_bh, i_h, bos, eos, rows, cols, rm, km, m2, soff, tt = _sequential_program(cu_ptr, T, H, DK, DV, BT, BK,
                                                                                      BV, VARLEN,
                                                                                      KEY_BLOCKS=KEY_BLOCKS)
    S = _initial_tile(h0_ptr, i_bh, DK, DV, soff, m2, BK, BV, USE_H0)
    for c in range(0, tl.cdiv(eos - bos, BT)):
        if SAVE_CK:
            tl.store(ck_ptr + (i_bh.to(tl.int64) * NCK + c) * DV * DK + soff, S.to(ck_ptr.dtype.element_ty), mask=m2)
        tm, base = _tokens(bos + c * BT, tt, eos, H, i_h)
        if OUT:
            q = tl.load(q_ptr + base[:, None] * DK + cols[None, :], mask=tm[:, None] & km[None, :],
                        other=0.0).to(tl.float32)
            o, S = _diag_chunk(q, S, k_ptr, v_ptr, g_ptr, base, tm, rows, cols, rm, km, tt, DK, DV, SW, SE, M, BT,
                               DECAY, PREC, True, True, SPAN, es_ptr, SCALED_E)
            tl.store(o_ptr + base[:, None] * DV + rows[None, :], o.to(o_ptr.dtype.element_ty),
                     mask=tm[:, None] & rm[None, :])
        else:
            _, S = _diag_chunk(None, S, k_ptr, v_ptr, g_ptr, base, tm, rows, cols, rm, km, tt, DK, DV, SW, SE, M, BT,
                               DECAY, PREC, False, True, SPAN, es_ptr, SCALED_E, f_ptr,
                               (bos + c * BT).to(tl.int64) * H + i_h, FACTORS)
        S = tl.where(m2, S, 0.0)
    tl.store(ht_ptr + i_bh.to(tl.int64) * DV * DK + soff, S, mask=m2)


@triton.jit
def chunk_diag_out_kernel(q_ptr, k_ptr, v_ptr, g_ptr, ck_ptr, o_ptr, cu_ptr, ix_ptr, T, H, DK, DV, NCK, SW, SE,
                          M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          DECAY: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr = "ieee",
                          SPAN: tl.constexpr = FAST_SPAN, es_ptr=None, SCALED_E: tl.constexpr = False,
                          KB: tl.constexpr = 0):
    """The split diagonal path's output, parallel over chunks: o of one (chunk, value block) from S₀ = ck. KB > 0 (no
    or a scalar decay, one input term; DIAG_OUT_KEY_BLOCK): the key columns in a loop of KB at a time, as fla's
    chunk_fwd_kernel_o, accumulating Q S₀ᵀ and Q Wᵀ, then o = Γ ⊙ Q S₀ᵀ + (Q Wᵀ ⊙ D) E — the same products as
    _diag_chunk's, summed over keys in blocks."""
    i_v, i_h, tt, rows, tm, base, vm, sm, sbase, voff = _chunk_value_tile(ix_ptr, cu_ptr, T, H, DK, DV, NCK, BT, BV,
                                                                          VARLEN)
    if KB > 0 and DECAY < 2 and M == 1:
        qs = tl.zeros([BT, BV], dtype=tl.float32)   # Q S₀ᵀ
        A = tl.zeros([BT, BT], dtype=tl.float32)    # Q Wᵀ
        for i_k in range(0, tl.cdiv(DK, KB)):
            kc = i_k * KB + tl.arange(0, KB)
            qk_m = tm[:, None] & (kc < DK)[None, :]
            S0 = tl.load(ck_ptr + sbase + rows[:, None] * DK + kc[None, :], mask=sm[:, None] & (kc < DK)[None, :],
                         other=0.0).to(tl.float32)
            q = tl.load(q_ptr + base[:, None] * DK + kc[None, :], mask=qk_m, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + base[:, None] * DK + kc[None, :], mask=qk_m, other=0.0).to(tl.float32)
            qs += _mm(q, tl.trans(S0), PREC)
            A += _mm(q, tl.trans(k), PREC)
        v = _value_side(v_ptr, 0, 0, voff, vm, es_ptr, base, tm, SCALED_E)
        if DECAY == 1:
            D, _, gam, _, _ = _chunk_decay(g_ptr, base, tm, BT, True)
            o = qs * gam[:, None] + _mm(A * D, v, PREC)
        else:
            o = qs + _mm(tl.where(tt[:, None] >= tt[None, :], A, 0.0), v, PREC)
        tl.store(o_ptr + voff, o.to(o_ptr.dtype.element_ty), mask=vm)
        return
    cols = tl.arange(0, BK)
    km = cols < DK
    S0 = tl.load(ck_ptr + sbase + rows[:, None] * DK + cols[None, :], mask=sm[:, None] & km[None, :],
                 other=0.0).to(tl.float32)
    q = tl.load(q_ptr + base[:, None] * DK + cols[None, :], mask=tm[:, None] & km[None, :], other=0.0).to(tl.float32)
    o, _ = _diag_chunk(q, S0, k_ptr, v_ptr, g_ptr, base, tm, rows, cols, rows < DV, km, tt, DK, DV, SW, SE, M, BT,
                       DECAY, PREC, True, False, SPAN, es_ptr, SCALED_E)
    tl.store(o_ptr + voff, o.to(o_ptr.dtype.element_ty), mask=vm)


@triton.jit
def chunk_delta_fwd_kernel(q_ptr, w_ptr, e_ptr, g_ptr, a_ptr, b_ptr, c_ptr, h0_ptr, o_ptr, ht_ptr, ck_ptr,
                           cu_ptr, T, H, DK, DV, NCK, SW, SE, M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr,
                           C_ROW: tl.constexpr, G_ROW: tl.constexpr, USE_H0: tl.constexpr, SAVE_CK: tl.constexpr,
                           VARLEN: tl.constexpr, PREC: tl.constexpr = "ieee", SUB: tl.constexpr = 1,
                           OFF32: tl.constexpr = False, SPAN: tl.constexpr = FAST_SPAN, es_ptr=None,
                           SCALED_E: tl.constexpr = False):
    """S_t = γ_t S_{t-1} (I − c_t a_t b_tᵀ) + e_t w_tᵀ, chunk by chunk (UT transform, TRITON.md); SUB as in
    _chunk_decay (strict between tokens); OFF32 as in _tokens (OFFSETS32)."""
    i_v, i_bh, i_h, bos, eos, rows, cols, rm, km, m2, soff, tt = _sequential_program(cu_ptr, T, H, DK, DV, BT, BK,
                                                                                      BV, VARLEN)
    incl = tt[:, None] >= tt[None, :]
    strict = _strict(tt, SUB)
    S = _initial_tile(h0_ptr, i_bh, DK, DV, soff, m2, BK, BV, USE_H0)
    for c in range(0, tl.cdiv(eos - bos, BT)):
        if SAVE_CK:
            tl.store(ck_ptr + (i_bh.to(tl.int64) * NCK + c) * DV * DK + soff, S.to(ck_ptr.dtype.element_ty), mask=m2)
        tm, base = _tokens(bos + c * BT, tt, eos, H, i_h, OFF32)
        km2 = tm[:, None] & km[None, :]
        vm = tm[:, None] & rm[None, :]
        q, a, bv, cc = _delta_tiles(q_ptr, a_ptr, b_ptr, c_ptr, base, tm, rows, cols, km2, vm, DK, DV, C_ROW)
        if not G_ROW:   # none / scalar decay: one [BT, BT] decay matrix
            g = tl.load(g_ptr + base, mask=tm, other=0.0).to(tl.float64)
            G = tl.cumsum(g, axis=0)                                      # fp64 cumulative log decay
            GL = tl.sum(g, axis=0)
            dG = (G[:, None] - G[None, :]).to(tl.float32)
            Dinc = tl.exp(tl.where(incl, dG, float("-inf")))              # Γ_i/Γ_j, i ≥ j
            Dst = tl.where(strict, Dinc, 0.0)
            gam = tl.exp(G.to(tl.float32))                                # Γ_i (from the chunk start)
            dec = tl.exp((GL - G).to(tl.float32))[:, None]                # Γ_L/Γ_i (to the chunk end)
            # Δ_s = R_s − c_s ⊙ Σ_{r<s} N_sr Δ_r,  N = A Bᵀ ⊙ Dst,
            # R = c ⊙ (Γ ⊙ A S₀ᵀ + Σ_m (A W_mᵀ ⊙ Dst) E_m)
            N = _mm(a, tl.trans(bv), PREC) * Dst
            R = _mm(a, tl.trans(S), PREC) * gam[:, None]
            o = _mm(q, tl.trans(S), PREC) * gam[:, None]
            S = S * tl.exp(GL.to(tl.float32))
            for m in tl.static_range(M):
                w = tl.load(w_ptr + _rank_offset(m, SW) + base[:, None] * DK + cols[None, :],
                            mask=km2, other=0.0).to(tl.float32)
                e = _value_side(e_ptr, m, SE, base[:, None] * DV + rows[None, :], vm, es_ptr, base, tm, SCALED_E)
                R += _mm(_mm(a, tl.trans(w), PREC) * Dst, e, PREC)
                o += _mm(_mm(q, tl.trans(w), PREC) * Dinc, e, PREC)
                S += _mm(tl.trans(e * dec), w, PREC)
            R = cc * R
            Dl = tl.zeros([BT, BV], dtype=tl.float32)
            for s_ in range(0, BT):                                       # forward substitution
                sel = (tt == s_)[:, None]
                n_s = tl.sum(tl.where(sel, N, 0.0), axis=0)               # row s of N, over r
                r_s = tl.sum(tl.where(sel, R, 0.0), axis=0)               # [BV]
                c_s = tl.sum(tl.where(sel, cc, 0.0), axis=0)              # [BV] or [1]
                d_s = r_s - c_s * tl.sum(n_s[:, None] * Dl, axis=0)
                Dl = tl.where(sel, d_s[None, :], Dl)
            o -= _mm(_mm(q, tl.trans(bv), PREC) * Dinc, Dl, PREC)
            S -= _mm(tl.trans(Dl * dec), bv, PREC)
        else:           # row decay (d_v): every value row is its own scalar-decay delta rule
            G, GL, gam, dec, xh, fast = _row_decay_tiles(g_ptr, base[:, None] * DV + rows[None, :], vm, SPAN)
            AB = tl.where(strict, _mm(a, tl.trans(bv), PREC), 0.0)
            QB = tl.where(incl, _mm(q, tl.trans(bv), PREC), 0.0)
            koff, voff = base[:, None] * DK + cols[None, :], base[:, None] * DV + rows[None, :]
            o, _, Dl = _rowdecay_delta_chunk(q, a, cc, S, AB, G, gam, xh, fast, tt, incl, strict, w_ptr, e_ptr,
                                             SW, SE, koff, voff, km2, vm, M, BT, BV, PREC, es_ptr, base, tm,
                                             SCALED_E)
            S = S * tl.exp(GL.to(tl.float32))[:, None]
            for m in tl.static_range(M):                              # the input terms' share of the new state
                w = tl.load(w_ptr + _rank_offset(m, SW) + koff, mask=km2, other=0.0).to(tl.float32)
                e = _value_side(e_ptr, m, SE, voff, vm, es_ptr, base, tm, SCALED_E)
                S += _mm(tl.trans(e * dec), w, PREC)
            if fast:                                                  # corrections' share of o
                o -= _mm(QB, Dl * tl.exp(-xh), PREC) * tl.exp(xh)
            else:
                for j in range(0, BT):
                    sel, colj, dj, ex = _token_column(tt, j, Dl, G)
                    o -= tl.sum(tl.where(colj, QB, 0.0), axis=1)[:, None] * dj[None, :] * ex
            S -= _mm(tl.trans(Dl * dec), bv, PREC)
        S = tl.where(m2, S, 0.0)
        tl.store(o_ptr + base[:, None] * DV + rows[None, :], o.to(o_ptr.dtype.element_ty), mask=vm)
    tl.store(ht_ptr + i_bh.to(tl.int64) * DV * DK + soff, S, mask=m2)


# --------------------------------------------------------------------------------------------
# delta family, scalar c and none / scalar decay: the forward split in three kernels (TRITON.md)
#
#   Δ = T_c R = W̃ S₀ᵀ + Ũ,  T_c = (I + diag(c) N)⁻¹,  W̃ = T_c diag(c ⊙ Γ) A,
#   Ũ = T_c diag(c) Σ_m (A W_mᵀ ⊙ D_strict) E_m
#
# W̃ and Ũ do not depend on the state, so the triangular solve runs parallel over all chunks
# (prep); only S₀ → S_new is sequential (state: dots only); o is parallel again (out).

@triton.jit
def _delta_chunk(ix_ptr, cu_ptr, i_t, i_g, T, H, BT: tl.constexpr, VARLEN: tl.constexpr):
    """(i_bh, i_h, chunk index in its sequence, first token, end of the sequence) of program (i_t, i_g).
    VARLEN: i_t indexes the host's chunk map (sequence, chunk) and i_g is the head; past the last
    chunk the map holds a chunk that starts after its sequence's end (every token masked)."""
    if VARLEN:
        i_n = tl.load(ix_ptr + 2 * i_t).to(tl.int32)
        c = tl.load(ix_ptr + 2 * i_t + 1).to(tl.int32)
        bos, eos = _sequence(cu_ptr, i_n, T, True)
        i_h = i_g
        i_bh = i_n * H + i_g
    else:
        i_bh = i_g
        i_h = i_g % H
        c = i_t
        bos = (i_g // H) * T
        eos = bos + T
    return i_bh, i_h, c, bos + c * BT, eos


@triton.jit
def _chunk_value_tile(ix_ptr, cu_ptr, T, H, DK, DV, NCK, BT: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
                      OFF32: tl.constexpr = False):
    """The (chunk, value block) of a program of a grid (chunk-map rows, value blocks, heads): its value block
    i_v, head i_h, token lanes tt and mask tm, token·head offsets base, value rows and mask vm, the offset of
    its [BT, BV] value tiles voff, and of its state in ck / dh, sbase. sm masks the state's rows: empty for a
    padding program of the varlen map (start ≥ eos), which must not read ck / dh past their end."""
    i_v = tl.program_id(1)
    i_bh, i_h, c, start, eos = _delta_chunk(ix_ptr, cu_ptr, tl.program_id(0), tl.program_id(2), T, H, BT,
                                            VARLEN)
    rows = i_v * BV + tl.arange(0, BV)
    tt = tl.arange(0, BT)
    tm, base = _tokens(start, tt, eos, H, i_h, OFF32)
    vm = tm[:, None] & (rows < DV)[None, :]
    sm = rows < tl.where(start < eos, DV, 0)
    sbase = (i_bh.to(tl.int64) * NCK + c) * DV * DK
    return i_v, i_h, tt, rows, tm, base, vm, sm, sbase, base[:, None] * DV + rows[None, :]


@triton.jit
def _dot_rows_block(x_ptr, y_ptr, base, tm, DK, kb, KB: tl.constexpr, PREC: tl.constexpr):
    """Key block kb (KB columns) of X Yᵀ [BT, BT] for two [BT, DK] token tiles."""
    cols = kb * KB + tl.arange(0, KB)
    msk = tm[:, None] & (cols < DK)[None, :]
    x = tl.load(x_ptr + base[:, None] * DK + cols[None, :], mask=msk, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + base[:, None] * DK + cols[None, :], mask=msk, other=0.0).to(tl.float32)
    return _mm(x, tl.trans(y), PREC)


@triton.jit
def _dot_rows_k(x_ptr, y_ptr, base, tm, DK, BT: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr,
                PREC: tl.constexpr, UNROLL: tl.constexpr = True):
    """X Yᵀ [BT, BT] of two [BT, DK] token tiles, KB key columns at a time: unrolled, or (UNROLL False: the
    backward's prep and value kernels) a loop."""
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    if UNROLL:
        for kb in tl.static_range(BK // KB):
            acc += _dot_rows_block(x_ptr, y_ptr, base, tm, DK, kb, KB, PREC)
    else:
        for kb in range(0, BK // KB):
            acc += _dot_rows_block(x_ptr, y_ptr, base, tm, DK, kb, KB, PREC)
    return acc


@triton.jit
def _ut_substitute_masked(L, BT: tl.constexpr, UB: tl.constexpr):
    """The inverse of I + L's UB-row block diagonal (L strictly lower) by forward substitution on the whole
    [BT, BT] tile: row i of every block per step (the blocks occupy disjoint columns of one [BT] vector)."""
    tt = tl.arange(0, BT)
    Tc = tl.where(tt[:, None] == tt[None, :], 1.0, 0.0)
    for i in range(1, UB):
        sel = (tt % UB == i)[:, None] & ((tt[:, None] // UB) == (tt[None, :] // UB))
        li = tl.sum(tl.where(sel, L, 0.0), axis=0)                            # row i of every diagonal block
        ti = tl.where(tt % UB == i, 1.0, 0.0) - tl.sum(li[:, None] * Tc, axis=0)
        Tc = tl.where(sel, ti[None, :], Tc)
    return Tc


@triton.jit
def _ut_substitute_blocks(L, BT: tl.constexpr, UB: tl.constexpr):
    """The same substitution on the diagonal blocks alone (UT_SOLVE "blocks"): a [BT/UB, UB, UB] tile, each step
    reducing over UB elements per block instead of masking all BT². T is kept transposed, Tt[block, column, row],
    so that both reductions of a step run along the last axis: compiled for sm_90 in the prep kernel (8 warps,
    BT = 64) the loop then holds no bar.sync and no shared-memory access (with T untransposed, [block, row,
    column], 6 bar.sync and 9 accesses were left; the masked loop has 14 and 20: UT_SOLVE). The same fp32
    products as the masked loop, each sum without its exact zeros; the block-diagonal [BT, BT] T is rebuilt
    for the merges."""
    NB: tl.constexpr = BT // UB
    blk = tl.arange(0, NB)
    r = tl.arange(0, UB)
    on_diagonal = blk[:, None, None, None] == blk[None, None, :, None]        # [NB, 1, NB, 1]
    Lb = tl.sum(tl.where(on_diagonal, tl.reshape(L, [NB, UB, NB, UB]), 0.0), axis=2)    # [block, row, column]
    # the identity of every block ((blk >= 0) only broadcasts it to [NB, UB, UB])
    Tt = tl.where((r[:, None] == r[None, :])[None, :, :] & (blk >= 0)[:, None, None], 1.0, 0.0)
    for i in range(1, UB):
        li = tl.sum(tl.where((r == i)[None, :, None], Lb, 0.0), axis=1)      # [NB, UB]: row i of each block
        ti = tl.where(r == i, 1.0, 0.0)[None, :] - tl.sum(li[:, None, :] * Tt, axis=2)
        Tt = tl.where((r == i)[None, None, :], ti[:, :, None], Tt)
    Tb = tl.permute(Tt, (0, 2, 1))
    return tl.reshape(tl.where(on_diagonal, Tb[:, :, None, :], 0.0), [BT, BT])


@triton.jit
def _ut_inverse(a_ptr, b_ptr, c_ptr, g_ptr, base, tm, DK, BT: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr,
                GATED: tl.constexpr, PREC: tl.constexpr, SUB: tl.constexpr = 1, UTB: tl.constexpr = 16,
                SOLVE: tl.constexpr = "blocks"):
    """The state-independent core of a delta-family chunk (split forward and its backward):
    c, D, D_st, Γ, T_c = (I + diag(c) N)⁻¹ and N = A Bᵀ ⊙ D_st.

    T_c in UTB-row diagonal blocks (UT_BLOCK; fla's solve_tril does 16): the forward substitution
    T_i = e_i − Σ_{j<i} L_ij T_j (L = diag(c) N) runs on every diagonal block at once — row i of all blocks
    in one step, UB − 1 steps instead of BT − 1 (L restricted to the diagonal blocks is block diagonal) —
    on the masked [BT, BT] tile or on the blocks alone (SOLVE, UT_SOLVE) — then the blocks are merged
    pairwise, s = UB, 2·UB, ... < BT: with T the inverse of I + L's s-block diagonal and L_o the part of L
    below it inside each 2s-block, (I + L_2s) = (I + L_s)(I + T L_o) and (T L_o)² = 0, so
    T ← T − T L_o T (two [BT, BT] dots per level)."""
    tt = tl.arange(0, BT)
    cc = tl.load(c_ptr + base, mask=tm, other=0.0).to(tl.float32)
    D, Dst, gam, dec, gl = _chunk_decay(g_ptr, base, tm, BT, GATED, SUB)
    N = _dot_rows_k(a_ptr, b_ptr, base, tm, DK, BT, BK, KB, PREC) * Dst
    L = N * cc[:, None]                                                       # diag(c) N, strictly lower
    UB: tl.constexpr = UTB if UTB < BT else BT
    if SOLVE == "blocks":
        Tc = _ut_substitute_blocks(L, BT, UB)
    else:
        Tc = _ut_substitute_masked(L, BT, UB)
    for lvl in tl.static_range(0, 6):                                         # merges: s = UB·2^lvl < BT
        if (UB << lvl) < BT:
            s2 = 2 * (UB << lvl)
            Lo = tl.where(((tt[:, None] // s2) == (tt[None, :] // s2)) & ((tt[:, None] // (UB << lvl)) !=
                                                                         (tt[None, :] // (UB << lvl))), L, 0.0)
            Tc = Tc - _mm_inverse(_mm_inverse(Tc, Lo, PREC), Tc, PREC)
    return cc, D, Dst, gam, Tc, N


@triton.jit
def _store_operand(ptr, x, mask, PREC: tl.constexpr):
    """Store the fp32 tile x, which is only ever read back as a dot operand, in ptr's dtype (bf16 where the dots take
    bf16 operands: wt_storage, chunked_delta_bwd.dh_storage). A bf16 ptr under the interpreter gets the GPU's round
    to nearest (_bf16_rounded; the interpreter's cast truncates), so that the dots read the operands they would have
    rounded themselves."""
    if PREC == "bf16_interpreted":
        if ptr.dtype.element_ty == tl.bfloat16:
            x = _bf16_rounded(x)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_wt(a_ptr, wt_ptr, Tc, cg, base, tm, DK, BK: tl.constexpr, KB: tl.constexpr, PREC: tl.constexpr):
    """W̃ = T_c (c ⊙ Γ ⊙ A) → wt, KB key columns at a time (cg = c ⊙ Γ)."""
    for kb in tl.static_range(BK // KB):
        cols = kb * KB + tl.arange(0, KB)
        km2 = tm[:, None] & (cols < DK)[None, :]
        a = tl.load(a_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        _store_operand(wt_ptr + base[:, None] * DK + cols[None, :], _mm(Tc, a * cg[:, None], PREC), km2, PREC)


@triton.jit
def _store_left_product(Y, e_ptr, u_ptr, base, tm, DV, BV: tl.constexpr, PREC: tl.constexpr, es_ptr,
                        SCALED_E: tl.constexpr):
    """Ũ = Y E_0 → u for a chunk's [BT, BT] left factor Y, BV value rows at a time (the one-input-term prep)."""
    for i_v in range(0, tl.cdiv(DV, BV)):
        rows = i_v * BV + tl.arange(0, BV)
        vm = tm[:, None] & (rows < DV)[None, :]
        e = _value_side(e_ptr, 0, 0, base[:, None] * DV + rows[None, :], vm, es_ptr, base, tm, SCALED_E)
        tl.store(u_ptr + base[:, None] * DV + rows[None, :], _mm(Y, e, PREC).to(u_ptr.dtype.element_ty), mask=vm)


@triton.jit
def chunk_delta_prep_kernel(w_ptr, e_ptr, g_ptr, a_ptr, b_ptr, c_ptr, wt_ptr, u_ptr, tc_ptr, cu_ptr, ix_ptr,
                            T, H, DK, DV, SW, SE, M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                            BV: tl.constexpr, GATED: tl.constexpr, VARLEN: tl.constexpr,
                            PREC: tl.constexpr = "ieee", KB: tl.constexpr = 64, TIED: tl.constexpr = False,
                            SAVE_TC: tl.constexpr = False, SUB: tl.constexpr = 1, UTB: tl.constexpr = 16,
                            SOLVE: tl.constexpr = "blocks", OFF32: tl.constexpr = False, es_ptr=None,
                            SCALED_E: tl.constexpr = False):
    """Per chunk, independent of the state:
        W̃ = T_c (c ⊙ Γ ⊙ A) → wt,   Ũ = T_c (c ⊙ Σ_m (A W_mᵀ ⊙ D_strict) E_m) → u,
    and (SAVE_TC, for the chunked backward, which then skips its own inverse) T_c → tc [.., BT].
    The [BT, BK] tiles are taken KB key columns at a time (whole [BT, 128] operands spilled ~0.5 KB/thread).
    TIED: W_0 is B (DeltaNet, Gated DeltaNet: w = b = k), so A W_0ᵀ ⊙ D_st is N, already formed for T_c."""
    i_bh, i_h, c, start, eos = _delta_chunk(ix_ptr, cu_ptr, tl.program_id(0), tl.program_id(1), T, H, BT, VARLEN)
    tt = tl.arange(0, BT)
    tm, base = _tokens(start, tt, eos, H, i_h, OFF32)
    cc, _, Dst, gam, Tc, Nab = _ut_inverse(a_ptr, b_ptr, c_ptr, g_ptr, base, tm, DK, BT, BK, KB, GATED, PREC, SUB,
                                           UTB, SOLVE)
    _store_wt(a_ptr, wt_ptr, Tc, cc * gam, base, tm, DK, BK, KB, PREC)
    if SAVE_TC:   # (tc_storage)
        _store_operand(tc_ptr + base[:, None] * BT + tt[None, :], Tc, tm[:, None], PREC)
    Tc = Tc * cc[None, :]                                                     # T_c diag(c)
    if M == 1:   # one [BT, BT] left factor for every value block
        if TIED:
            Y = _mm(Tc, Nab, PREC)
        else:
            Y = _mm(Tc, _dot_rows_k(a_ptr, w_ptr, base, tm, DK, BT, BK, KB, PREC) * Dst, PREC)
        _store_left_product(Y, e_ptr, u_ptr, base, tm, DV, BV, PREC, es_ptr, SCALED_E)
    else:
        for i_v in range(0, tl.cdiv(DV, BV)):
            rows = i_v * BV + tl.arange(0, BV)
            vm = tm[:, None] & (rows < DV)[None, :]
            P = tl.zeros([BT, BV], dtype=tl.float32)
            for m in tl.static_range(M):
                if TIED and m == 0:
                    AW = Nab
                else:
                    AW = _dot_rows_k(a_ptr, w_ptr + _rank_offset(m, SW), base, tm, DK, BT, BK, KB, PREC) * Dst
                e = _value_side(e_ptr, m, SE, base[:, None] * DV + rows[None, :], vm, es_ptr, base, tm, SCALED_E)
                P += _mm(AW, e, PREC)
            tl.store(u_ptr + base[:, None] * DV + rows[None, :], _mm(Tc, P, PREC).to(u_ptr.dtype.element_ty),
                     mask=vm)


@triton.jit
def chunk_delta_state_kernel(w_ptr, e_ptr, g_ptr, b_ptr, wt_ptr, u_ptr, dl_ptr, h0_ptr, ht_ptr, ck_ptr, cu_ptr,
                             T, H, DK, DV, NCK, SW, SE, M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                             BV: tl.constexpr, GATED: tl.constexpr, USE_H0: tl.constexpr, VARLEN: tl.constexpr,
                             PREC: tl.constexpr = "ieee", TIED: tl.constexpr = False, SUB: tl.constexpr = 1,
                             OFF32: tl.constexpr = False, es_ptr=None, SCALED_E: tl.constexpr = False, f_ptr=None,
                             FACTORS: tl.constexpr = False):
    """The sequential pass: per chunk, ck ← S₀, Δ = W̃ S₀ᵀ + Ũ (→ dl: u itself, over Ũ, or a bf16 buffer where the
    output kernel's dots take bf16 operands: operand_storage's "delta"),
    S ← Γ_L S₀ − (Δ ⊙ Γ_L/Γ)ᵀ B + Σ_m (E_m ⊙ Γ_L/Γ)ᵀ W_m; ht ← the last S.
    TIED (W_0 is B): S ← Γ_L S₀ + ((E_0 − Δ) ⊙ Γ_L/Γ)ᵀ B + Σ_{m≥1} ... — 2 + M − 1 dots and [BT, BK] loads
    per chunk instead of 2 + M (fla's h += Kᵀ (U − W h)); dl then holds E_0 − Δ (fla's v_new), which the output
    kernel reads in place of E_0 and Δ."""
    i_v, i_bh, i_h, bos, eos, rows, cols, rm, km, m2, soff, tt = _sequential_program(cu_ptr, T, H, DK, DV, BT, BK,
                                                                                      BV, VARLEN)
    S = _initial_tile(h0_ptr, i_bh, DK, DV, soff, m2, BK, BV, USE_H0)
    for c in range(0, tl.cdiv(eos - bos, BT)):
        tl.store(ck_ptr + (i_bh.to(tl.int64) * NCK + c) * DV * DK + soff, S.to(ck_ptr.dtype.element_ty), mask=m2)
        tm, base = _tokens(bos + c * BT, tt, eos, H, i_h, OFF32)
        km2 = tm[:, None] & km[None, :]
        vm = tm[:, None] & rm[None, :]
        wt = tl.load(wt_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        uoff = base[:, None] * DV + rows[None, :]
        u = tl.load(u_ptr + uoff, mask=vm, other=0.0).to(tl.float32)
        # r = E_0 − Δ (TIED: the first input term rides on B's dot) or −Δ, the dot subtracted from the loaded tiles.
        # Written as Ũ + W̃ S₀ᵀ, Triton made the load the dot's accumulator, which it does not software-pipeline: a
        # synchronous global load (LDG → STS → BAR → LDSM) on every step of this sequential loop (sm_90 SASS, session
        # 24); a dot subtracted from it is not folded, and the load is prefetched (cp.async) like the others
        if TIED:
            r = (_value_side(e_ptr, 0, 0, uoff, vm, es_ptr, base, tm, SCALED_E) - u) - _mm(wt, tl.trans(S), PREC)
            _store_operand(dl_ptr + uoff, r, vm, PREC)
        else:
            r = -u - _mm(wt, tl.trans(S), PREC)
            _store_operand(dl_ptr + uoff, -r, vm, PREC)
        bv = tl.load(b_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        if GATED:   # dec = Γ_L/Γ_i ≤ 1
            _, dec, gl = _sequential_decay(g_ptr, f_ptr, base, tm, (bos + c * BT).to(tl.int64) * H + i_h, BT, FACTORS)
            S = S * gl
            S += _mm(tl.trans(r * dec[:, None]), bv, PREC)
        else:
            S += _mm(tl.trans(r), bv, PREC)
        for m in tl.static_range(1 if TIED else 0, M):   # TIED: m = 0 rode on B's dot
            w = tl.load(w_ptr + _rank_offset(m, SW) + base[:, None] * DK + cols[None, :],
                        mask=km2, other=0.0).to(tl.float32)
            e = _value_side(e_ptr, m, SE, base[:, None] * DV + rows[None, :], vm, es_ptr, base, tm, SCALED_E)
            if GATED:
                e = e * dec[:, None]
            S += _mm(tl.trans(e), w, PREC)
        S = tl.where(m2, S, 0.0)
    tl.store(ht_ptr + i_bh.to(tl.int64) * DV * DK + soff, S, mask=m2)


@triton.jit
def chunk_delta_out_kernel(q_ptr, w_ptr, e_ptr, g_ptr, b_ptr, u_ptr, ck_ptr, o_ptr, cu_ptr, ix_ptr,
                           T, H, DK, DV, NCK, SW, SE, M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, GATED: tl.constexpr, VARLEN: tl.constexpr,
                           PREC: tl.constexpr = "ieee", KB: tl.constexpr = 64, TIED: tl.constexpr = False,
                           SUB: tl.constexpr = 1, OFF32: tl.constexpr = False, es_ptr=None,
                           SCALED_E: tl.constexpr = False):
    """o = Γ ⊙ Q S₀ᵀ − (Q Bᵀ ⊙ D) Δ + Σ_m (Q W_mᵀ ⊙ D) E_m per (chunk, value block), S₀ from ck and Δ
    from u (the state kernel's dl: only ever this dot's operand); KB key columns at a time, like prep. TIED (W_0 is
    B): (Q Bᵀ ⊙ D)(E_0 − Δ), one [BT, BT] product and its dot fewer, E_0 − Δ as the state kernel left it in u."""
    i_v, i_h, tt, rows, tm, base, vm, sm, sbase, voff = _chunk_value_tile(ix_ptr, cu_ptr, T, H, DK, DV, NCK, BT, BV,
                                                                          VARLEN, OFF32)
    sbase = ck_ptr + sbase
    o = tl.zeros([BT, BV], dtype=tl.float32)
    QB = tl.zeros([BT, BT], dtype=tl.float32)
    for kb in tl.static_range(BK // KB):
        cols = kb * KB + tl.arange(0, KB)
        km = cols < DK
        km2 = tm[:, None] & km[None, :]
        q = tl.load(q_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + base[:, None] * DK + cols[None, :], mask=km2, other=0.0).to(tl.float32)
        S0 = tl.load(sbase + rows[:, None] * DK + cols[None, :], mask=sm[:, None] & km[None, :],
                     other=0.0).to(tl.float32)
        o += _mm(q, tl.trans(S0), PREC)
        QB += _mm(q, tl.trans(bv), PREC)
    D, _, gam, _, _ = _chunk_decay(g_ptr, base, tm, BT, GATED)
    if GATED:
        o = o * gam[:, None]
    d = tl.load(u_ptr + base[:, None] * DV + rows[None, :], mask=vm, other=0.0).to(tl.float32)
    if TIED:   # the first input term rides on Q Bᵀ: u holds E_0 − Δ (the state kernel's)
        o += _mm(QB * D, d, PREC)
    else:
        o -= _mm(QB * D, d, PREC)
    for m in tl.static_range(1 if TIED else 0, M):
        QW = _dot_rows_k(q_ptr, w_ptr + _rank_offset(m, SW), base, tm, DK, BT, BK, KB, PREC)
        e = _value_side(e_ptr, m, SE, voff, vm, es_ptr, base, tm, SCALED_E)
        o += _mm(QW * D, e, PREC)
    tl.store(o_ptr + base[:, None] * DV + rows[None, :], o.to(o_ptr.dtype.element_ty), mask=vm)


#: tl.dot precision: "auto" (the default), "ieee", "tf32", "tf32x3" or "bf16" (operands rounded to bf16, fp32
#: accumulation and state: fla's precision; _mm). "auto" is "tf32" (bf16 on the wide-key path without a decay,
#: WIDE_KEYS) when the scan's inputs are bf16/fp16 (their own rounding, 2⁻⁸ for bf16, exceeds tf32's 2⁻¹¹) and "ieee"
#: (true fp32, ~1e-6 of the reference) for fp32 inputs. Measured on an H100 (benchmarks/RESULTS.md): "ieee" dots are
#: lowered to FMA loops that spill 3–10 KB per thread and run 10–40× slower, so backend="auto" runs fp32 inputs through
#: the recurrent kernel instead. See TRITON.md.
DOT_PRECISION = "auto"
DOT_PRECISIONS = ("auto", "ieee", "tf32", "tf32x3", "bf16")
#: warps per program of the chunked kernels: 8 keeps the [BT, BK] and [BV, BK] tiles of d_k=64..128
#: in registers with tf32 dots (sm_90 report: 4 warps spill 100–700 B/thread, 8 warps 0–300 B)
NUM_WARPS = 8
#: software-pipelining stages of the chunked kernels' loops (None: Triton's default, 3; WIDE_STAGES on the
#: wide-key path). Shared memory grows
#: with the stages: at chunk 64 and d_k = 128 the state kernels need ~270 KB with 3 (over an H100's 227 KB);
#: 2 is what would let chunk 64 launch there (wgmma needs 64-row operands: chunk 32 compiles to mma.sync).
#: Timed once with chunk 64 at d = 128 (H200, session 7: DeltaNet 6.97 vs chunk 32's 7.70 ms fwd+bwd, across calls);
#: benchmarks/triton_kernels.py --num-stages, gpu_session.sh lease
NUM_STAGES = None


#: registers per thread ptxas may use (.maxnreg) in the fused walks (chunk_delta_fwd_kernel, chunk_bwd_kernel,
#: chunk_rowdecay_bwd_kernel: one program per sequence·head·value block, B·H·⌈d_v/32⌉ of them, about one per SM at the
#: benchmark shapes, so a second resident program per SM buys nothing). Without it ptxas held these kernels to 128
#: or even 32 registers at d = 128, chunk 32 (sm_90, Triton 3.9) and spilled the rest: the fused delta forward
#: (Longhorn, row decays) 32 registers and 5976-6040 B of stack per thread → 255 and 1128-1192 B with it; the fused
#: diagonal backward 1368 / 1624 / 1968 → 840 / 992 / 1288 B (none / scalar / row decay); the row-decay delta backward
#: 4744 → 4136 B. At d = 64 they already take 255 registers and nothing changes. Not for the parallel kernels: .maxnreg
#: made ptxas fill 255 registers there and spill (the backward key kernel 194 registers / 0 B → 255 / 72 B). Untimed
#: (row `mr0` of the lease turns it off); None leaves ptxas its choice. OLSSM_TRITON_WALK_MAXNREG overrides (0: None).
WALK_MAXNREG = 255


def _launch_opts(wide: bool = False, walk: bool = False) -> dict:
    """num_warps / num_stages of every chunked launch (wide: the wide-key settings, WIDE_KEYS), and for the fused
    walks (walk) .maxnreg (WALK_MAXNREG)."""
    stages = NUM_STAGES or (WIDE_STAGES if wide else None)
    opts = dict(num_warps=NUM_WARPS, **({"num_stages": int(stages)} if stages else {}))
    maxnreg = walk_maxnreg() if walk and _has_maxnreg() else None
    return {**opts, "maxnreg": maxnreg} if maxnreg else opts


def _block(name: str) -> int:
    """The block constant `name` of this module (DIAG_*_BLOCK_*, DIAG_OUT_TILE, DIAG_OUT_KEY_BLOCK,
    DELTA_STATE_BLOCK_V), checked: tl.arange takes powers of two only, and a value such as 48 had failed inside the
    launch with the interpreter's or the compiler's message, which named neither the constant nor its value."""
    value = globals()[name]
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"triton: chunked.{name} must be a power of two, got {value!r}")
    return value


def diag_state_blocks(d_k: int, d_v: int) -> tuple:
    """(key columns, value rows) per program of the split diagonal path's two state passes (DIAG_STATE_BLOCK_K / _V),
    which both launches read."""
    return (min(_blocks(d_k, d_v)[0], _block("DIAG_STATE_BLOCK_K")),
            max(16, min(_np2(d_v), _block("DIAG_STATE_BLOCK_V"))))


def diag_out_rows(d_k: int, d_v: int) -> int:
    """Value rows per program of the split diagonal output kernel for no, a scalar or a column decay (a row decay's
    take the state's): DIAG_OUT_BLOCK_V, as many as keep its [BV, d_k] state tile within DIAG_OUT_TILE."""
    return max(16, min(_np2(d_v), _block("DIAG_OUT_BLOCK_V"), _block("DIAG_OUT_TILE") // _np2(d_k)))


def _kernel_launch(opts: dict, warps, stages) -> dict:
    """opts (launch options and arguments) with one kernel's own num_warps / num_stages where set (the split
    diagonal path's DIAG_*_WARPS / _STAGES, the split delta path's DELTA_*_WARPS / _STAGES and chunked_delta_bwd's
    *_WARPS / *_STAGES; None keeps opts')."""
    return dict(opts, **({"num_warps": int(warps)} if warps else {}), **({"num_stages": int(stages)} if stages else {}))


@functools.lru_cache(maxsize=None)
def _has_maxnreg() -> bool:
    """Whether the installed Triton takes the maxnreg launch option (its CUDA backend's options have it since 3.x;
    olssm accepts Triton >= 3.0)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "maxnreg" in getattr(CUDAOptions, "__dataclass_fields__", {})


def walk_maxnreg():
    """WALK_MAXNREG, or OLSSM_TRITON_WALK_MAXNREG if set (0: none)."""
    env = os.environ.get("OLSSM_TRITON_WALK_MAXNREG")
    if env is None or env == "":
        return WALK_MAXNREG
    return checked_maxnreg(env, "OLSSM_TRITON_WALK_MAXNREG")


def checked_maxnreg(value, what: str = "WALK_MAXNREG"):
    """A .maxnreg setting: None for 0 (ptxas's choice), else a register count within 24..255; a ValueError naming
    `what` otherwise."""
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"triton: {what} must be a register count or 0, got {value!r}") from None
    if n and not 24 <= n <= 255:
        raise ValueError(f"triton: {what} must be 0 or within 24..255, got {n}")
    return n or None


def _precision(dtype=torch.float32, bf16_operands: bool = False) -> str:
    """The dots' precision for inputs of this dtype (DOT_PRECISION / OLSSM_TRITON_DOT_PRECISION; bf16_operands:
    the wide-key path without a decay, where "auto" takes bf16 operands for bf16 inputs, see WIDE_KEYS)."""
    p = os.environ.get("OLSSM_TRITON_DOT_PRECISION") or DOT_PRECISION
    if p not in DOT_PRECISIONS:
        raise ValueError(f"triton: dot precision must be {', '.join(DOT_PRECISIONS)}, got {p!r}")
    if p == "auto":
        p = "ieee" if dtype == torch.float32 else "bf16" if bf16_operands and dtype == torch.bfloat16 else "tf32"
    if p == "bf16" and _scan.interpreted():
        p = "bf16_interpreted"   # _mm
    return p


#: head sizes d_k above WIDE_KEYS on the split delta path with one correction and one input term (scalar c, none /
#: scalar decay: DeltaNet, Gated DeltaNet) take the wide-key settings: chunks of library.WIDE_CHUNK (64) tokens,
#: WIDE_STAGES pipeline stages (3 would need ~270 KB of shared memory at chunk 64 and d_k 128, over an H100's 227 KB;
#: more input terms or rank-R sub-tokens need 262-279 KB even with 2) and, for bf16 inputs without a decay (DeltaNet)
#: under "auto", bf16 dot operands (fla's precision: halves the operands' registers; sm_90, DeltaNet's split state
#: kernel at chunk 64 / 2 stages spills 168 -> 48 B/thread, Triton 3.9 AOT; the 392 -> 136 quoted before matches no
#: fp32-storage compile here, bf16 chunk tensors at chunk 32 give 424 -> 136). wide() does not read DELTA_FORWARD: the
#: fused forward takes the stages and operands (untimed), its chunks stay CHUNK (library.chunk_size). H200, (2, 8192, 16, 128) bf16 (benchmarks/RESULTS.md, session 8):
#: DeltaNet 2.83 / 6.97 -> 2.06 / 5.70 ms fwd / fwd+bwd (one process; o's error unchanged, 4.3e-3); Gated DeltaNet 3.03
#: / 8.43 -> 2.38 / 7.23 with tf32 operands (separate processes), 2.20 / 6.53 with bf16 ones. A decay keeps tf32
#: operands because ∂ log γ is a reverse cumulative sum over the chunk of differences of products (the key kernel's
#: dbt): with bf16 operands it was 2.1 % of its largest value off the reference at chunk 64, d_k = 72 (1.2 % at chunk
#: 32; 0.55 % from rounding the inputs alone), found by a probing helper under the interpreter. At d_k = 64 neither
#: setting paid in fwd+bwd (within the run-to-run spread). None: off (library.WIDE_CHUNK = None turns off only the chunk
#: size)
WIDE_KEYS = 64
WIDE_STAGES = 2


#: the split delta path's seven kernels (forward prep, state, out; backward prep, state, value, key) and the fused delta
#: forward (row c: Longhorn; row decays) form their (token · head) row offsets in int32 instead of int64 (_tokens'
#: OFF32), where every row · width product of the call fits (offsets32_fit). Off: untimed. Why: the int64 row index
#: times a width is a per-element int64 tile in every load and store, and register pressure bounds these kernels.
#: aot_check, sm_90, chunk 64, d 128, bf16 operands, 2 stages, 8 warps, spills B per thread (Triton 3.9): forward
#: prep 440 -> 352 (untied 448 -> 232), out 280 -> 32 untied, state (key-major) 48-104 -> 0, backward prep 456 ->
#: 304, key 776 -> 448 (tied 272 -> 0, same-key 56 -> 0); worse: backward value 672 -> 776 and 800 -> 872 (untied),
#: the tied forms of it and of out within 16 B. Over the 116 aot_check variants it changes, 35.7 -> 22.5 KB of spills
#: summed, 95 fewer, 8 more (TRITON.md, "Int32 row offsets"). The fused forward: 280 -> 272 B at d 64 (chunk 32,
#: tf32), 1888 -> 1376 at d 128. OLSSM_TRITON_OFFSETS32 (0 / 1) overrides (offsets32)
OFFSETS32 = False


def offsets32() -> bool:
    """OFFSETS32, or OLSSM_TRITON_OFFSETS32 if set (the split forward's and the delta backward's launches read it)."""
    return switch_on("OLSSM_TRITON_OFFSETS32", OFFSETS32, "int32 offsets")


def offsets32_fit(sizes) -> bool:
    """Whether a call of the split delta path may take int32 row offsets: every [B, T, H, width] token tensor it
    indexes by row (widths d_k, d_v and the chunk, T_c's) has fewer than 2³¹ elements (sizes in (sub-)tokens)."""
    B, T, H, d_k, d_v, N, max_len, C = sizes
    return offsets32() and B * T * H * max(d_k, d_v, C) < 2 ** 31


def bf16_operands(form, d_k: int) -> bool:
    """Whether "auto" takes bf16 dot operands for bf16 inputs: the wide-key path without a decay (WIDE_KEYS)."""
    return wide(form, d_k) and form.decay_kind == "none"


def wide(form, d_k: int) -> bool:
    """Whether a call takes the wide-key settings (WIDE_KEYS): decided from the rule's structure and d_k alone,
    so that the forward, its backward and the chunk size (library) agree without passing it along."""
    return (WIDE_KEYS is not None and d_k > WIDE_KEYS and len(form.corrections) == 1 and len(form.inputs) == 1
            and not _c_row(form) and form.decay_kind != ROW)


def wide_diag(form, d_k: int, path: str = "") -> bool:
    """Whether a call of the split diagonal path (path, "" for diag_path()) takes library.WIDE_CHUNK: no correction,
    one input term, no, a scalar or a column decay (the whole-gradient kernels), d_k > WIDE_KEYS. Its gradient kernels
    issue wgmma only at 64-row chunks and spill at 32 (sm_90, d = 128, scalar decay: dqk 544 B on mma.sync at chunk
    32, 16 B at 64; RESULTS.md session 15), and fla runs chunk_simple_gla / chunk_gla at 64. The fused walk keeps
    CHUNK (its backward spills 1 KB at 32, 3.2 KB at 64)."""
    return _wide_diag_call(form, d_k) and (path or diag_path(form, d_k)) == "split"


def _wide_diag_call(form, d_k: int) -> bool:
    """What wide_diag asks of the rule and head size, whichever path runs (DIAG_PATH = "wide" splits exactly these)."""
    return (WIDE_KEYS is not None and d_k > WIDE_KEYS and not form.corrections and len(form.inputs) == 1
            and form.decay_kind != ROW)


def _blocks(d_k, d_v):
    BK = max(16, _np2(d_k))
    BV = max(16, min(_np2(d_v), 32))
    return BK, BV


class SplitBlocks(NamedTuple):
    """The split delta path's block sizes. Its forward and its backward must agree on them (the backward's state
    pass walks the forward's ck, and its prep and value kernels mirror the forward's prep), so both read this."""
    BK: int   # key columns of the state tile: the whole (padded) d_k
    BV: int   # value rows per step of the backward key kernel's loop over values
    BVW: int  # value rows per program of the parallel kernels (forward prep and out; backward prep and value)
    KB: int   # key columns per tl.dot operand in the forward's prep and out and the backward's prep
    BVS: int  # value rows per program of the two sequential state passes (DELTA_STATE_BLOCK_V)


def split_blocks(d_k: int, d_v: int) -> SplitBlocks:
    """SplitBlocks for one call (module constants read at call time, as the launches do). The parallel kernels take
    wider value blocks than the state passes: they have parallelism to spare, and each value block repeats the
    [BT, BT] work (the inverse in prep, Q Bᵀ and Q Wᵀ in out)."""
    BK, BV = _blocks(d_k, d_v)
    return SplitBlocks(BK=BK, BV=BV, BVW=max(16, min(_np2(d_v), SPLIT_BLOCK_V)), KB=min(BK, SPLIT_BLOCK_K),
                       BVS=max(16, min(_np2(d_v), _block("DELTA_STATE_BLOCK_V"))))


#: the delta family's forward with a scalar c and none / scalar decay: "split" (three kernels:
#: the UT transform parallel over chunks, a sequential state pass of dots only, the output parallel
#: over chunks; like flash-linear-attention's chunk_delta_rule) or "fused" (one program per
#: sequence·head·value block walks the chunks and solves each chunk's triangular system inside the
#: walk; measured 1.8-24x slower than fla on an H100, benchmarks/RESULTS.md). Row c (Longhorn) and
#: row decays always run fused. OLSSM_TRITON_DELTA_FORWARD overrides.
DELTA_FORWARD = "split"
#: value rows per program of the split's parallel kernels (prep, out); the state passes take DELTA_STATE_BLOCK_V
SPLIT_BLOCK_V = 64
#: value rows per program of the split delta path's two state passes, the forward's (chunk_delta_state_kernel) and the
#: backward's (chunked_delta_bwd.chunk_delta_bwd_state_kernel); ck, dh and Δ do not depend on it. Each program walks
#: every chunk of one sequence·head with a [rows, d_k] tile, so at (2, T, 16, 128) 32 rows make 128 programs, one per
#: SM or fewer, and 16 rows 256. flash-linear-attention's forward state pass (chunk_gated_delta_rule_fwd_h) takes 32 or
#: 64 value columns by autotuning, with 2-4 warps. Untimed at any other value (benchmarks/kernel_sweep.py, rows
#: "sv16" / "sv64")
DELTA_STATE_BLOCK_V = 32
#: num_warps / num_stages of the split delta forward's three kernels (the UT transform PREP, the state pass STATE, the
#: output OUT), one pair per kernel; None: _launch_opts' (NUM_WARPS, and NUM_STAGES or WIDE_STAGES on the wide-key
#: path). The same choice for the split diagonal path's kernels won 1.03-1.26x (session 23, DIAG_*_WARPS): the state
#: pass holds a [DELTA_STATE_BLOCK_V, d_k] tile, which 8 warps split into 16 fp32 registers a thread (d_k = 128), the
#: parallel kernels [BT, d_k] and [BT, BT] tiles. Untimed (benchmarks/kernel_sweep.py; chunked_delta_bwd has the
#: backward's four)
DELTA_PREP_WARPS = DELTA_PREP_STAGES = None
DELTA_STATE_WARPS = DELTA_STATE_STAGES = None
DELTA_OUT_WARPS = DELTA_OUT_STAGES = None
#: the diagonal family's chunked kernels (no correction: linear attention, RetNet, Mamba-2, GLA, row decays):
#: "fused" (chunk_fwd_kernel / chunk_bwd_kernel: one program per sequence·head·value block walks the chunks, each
#: chunk's o or gradients formed inside the walk) or "split" (a sequential pass of one dot per chunk for the states
#: entering the chunks — the backward's for ∂L/∂S at their ends — parallel over value and key blocks, then o or the
#: gradients in a kernel parallel over chunks; flash-linear-attention's chunk_simple_gla / chunk_gla layout). The
#: fused walk has B·H·⌈d_v/32⌉ programs: 128 at (2, T, 16, 128), under one per SM of an H100, each a chain of
#: ⌈T/C⌉ chunks of dependent dots (Mamba-2 at (2, 8192, 16, 128): 1.46 ms forward, 7.11 fwd+bwd, session 8).
#: Both read and write the same checkpoints ck, so either backward follows either forward. "wide" (the default):
#: "split" where the split path takes its wide-key chunk (wide_diag: d_k > WIDE_KEYS, one input term, no row decay),
#: "fused" elsewhere. H200, (2, 8192, 16, 128) bf16, one process (session 22, benchmarks/RESULTS.md): the split path
#: at chunk 64 against the fused walk, Mamba-2 0.75 / 3.44 against 0.77 / 4.89 ms fwd / fwd+bwd (1.41x fwd+bwd),
#: GLA 2.17 / 7.12 against 2.27 / 11.46 (1.61x), the drift 0.04 ms; d = 64 untimed (that stage's time ran out), so
#: the fused walk stays below WIDE_KEYS. OLSSM_TRITON_DIAG_PATH overrides; read at each launch.
DIAG_PATH = "wide"
#: key columns per program of the split diagonal path's two state passes (a diagonal decay keeps key columns apart,
#: so they split over keys as well as values: 2× the programs at d_k = 128)
DIAG_STATE_BLOCK_K = 64
#: value rows per program of the same two passes (the layout of ck and dh does not depend on it)
DIAG_STATE_BLOCK_V = 32
#: value rows per program of the split diagonal path's output kernel: each block forms the chunk's [BT, BT] Q Wᵀ again,
#: so d_v = 128 in one block forms it once (sm_90, chunk 64, 8 warps, bf16 inputs, as launched: 104 / 544 B/thread of
#: spills for a scalar / column decay, against 0 / 320 at 64 rows, and still faster: H200, (2, 8192, 16, 128) bf16,
#: session 23, forward 1.12× for GLA against 64 rows; 32 rows lost 0.80×)
DIAG_OUT_BLOCK_V = 128
#: key columns per step of a loop over keys in the output kernel (no or a scalar decay, one input term), as fla's
#: chunk_fwd_kernel_o; 0: every key at once (_diag_chunk's body, shared with the fused walk). A static count after
#: session 23's lease (sm_90, chunk 64, d = 128, 128 value rows, 8 warps): 32 keys per step take 124 registers and no
#: spills against 255 and 104 B, two programs per SM instead of one, and ck through cp.async; the same instructions
#: otherwise. Untimed: the next lease's `ok32` row decides
DIAG_OUT_KEY_BLOCK = 0
#: elements of the output kernel's [BV, d_k] state tile at most (fewer value rows per program at wider keys): 128 rows
#: at d_k = 256 took 160 / 192 KB of shared memory (scalar / column decay, sm_90, chunk 64), over an A100's 164 KB;
#: 64 rows, what d_k = 256 ran before session 23, 96 / 144 KB
DIAG_OUT_TILE = 128 * 128
#: num_warps / num_stages of the split diagonal path's kernels, one pair per kernel (None: _launch_opts' NUM_WARPS /
#: NUM_STAGES): the forward's state pass (STATE), the reverse pass (DH), the output (OUT), dQ / dW / ∂g (DQK) and dE
#: (DV). They hold different things: the state passes a [BV, BK] tile walked over chunks (8 warps for a 32 × 64 tile
#: left most of them idle), the parallel kernels [BT, BK] and [BT, BT] tiles. Session 23 timed each kernel's settings
#: alone (benchmarks/kernel_sweep.py, H200, (2, 8192, 16, 128) bf16; RESULTS.md): 4 warps won for the state pass
#: (GLA forward 1.28×), the reverse pass (1.05× fwd+bwd) and dE (1.06×); dqk lost with every other block, warps and
#: stages tried. All four together (with DIAG_OUT_BLOCK_V = 128), one process: GLA 2.18 / 7.18 → 1.47 / 5.70 ms fwd /
#: fwd+bwd (1.26×), Mamba-2 3.39 → 3.28 fwd+bwd (1.03×), the defaults timed twice identical
DIAG_STATE_WARPS, DIAG_STATE_STAGES = 4, None
DIAG_DH_WARPS, DIAG_DH_STAGES = 4, None
DIAG_OUT_WARPS = DIAG_OUT_STAGES = None
DIAG_DQK_WARPS = DIAG_DQK_STAGES = None
DIAG_DV_WARPS, DIAG_DV_STAGES = 4, None
#: key columns per block of the split diagonal path's parallel backward (chunk_diag_bwd_kernel walks them in turn; rules
#: with one input term: more run the fused backward). sm_90, d_k = d_v = 128, chunk 32 (library.CHUNK), tf32, 8 warps,
#: spills in B/thread for none / scalar / row / column decays: whole [BT, 128] tiles 2384 / 2968 / 552 / 6176, blocks of
#: 64: 624 / 896 / 928 / 1488, blocks of 32: 24 / 296 / 712 / 656 (the fused walk: 1368 / 1624 / 1968 / 1296)
DIAG_BWD_BLOCK_K = 32
#: the split forward folds the first input term into the correction's products where its key side is the
#: correction's b (w = b = k: DeltaNet, Gated DeltaNet; sympy-equal expressions): S ← ... + ((E_0 − Δ) ⊙ dec)ᵀ B,
#: o ← ... + (Q Bᵀ ⊙ D)(E_0 − Δ), A W_0ᵀ ⊙ D_st = N — one dot and one [BT, d_k] load fewer per step of the
#: sequential state pass (3 → 2 dots per chunk), one [BT, BT] product over d_k fewer in prep and in out.
#: False: the general path (for comparison).
TIE_INPUT_TERM = True
#: the split forward keeps T_c and W̃ of every chunk for the chunked delta backward (saves_chunk_core; fla keeps
#: A likewise): (C + d_k) fp32 per token and head for one UT inverse per chunk fewer. False: the backward
#: recomputes both (for comparison: benchmarks/triton_kernels.py --no-save-core)
SAVE_CHUNK_CORE = True
#: key columns per tl.dot operand in prep and out (sm_90, tf32, 8 warps, d_k = 128: whole [32, 128]
#: operands spilled 350-530 B/thread in prep, 64-column blocks 8-64 B)
SPLIT_BLOCK_K = 64


#: a row or column decay's ∂g (per value row / key column: GLA's gate, a per-row forget gate) in the diagonal
#: backward kernels: "slow" sums its pair terms where they straddle each token on the per-token path (chunks whose
#: decay spans more than FAST_SPAN), "all" on the factorised path too (a loop of BT steps beside its dots), "off"
#: takes the reverse sum of ∂b everywhere. The reverse sum cancels pair terms on either side of a token, ε·O(1)
#: where the true ∂g_u is ~e^{g_u}: ∂ through a scale s of the log gate (fp32, interpreter, T = 128, chunk 32) was
#: 1.3e-5 / 1.0e-4 / 2.0e-4 / 8.6e-5 relative at s = 3 / 10 / 100 / 1000 for GLA, 1.8e-5 / 5.8e-5 / 2.9e-3 / 4.9e-5
#: for a row decay (TRITON.md). The per-token path already takes BT steps, so "slow" adds steps of the same size
#: there; "all" is untimed on a GPU (stage `diag`'s rows sta / sto decide). OLSSM_TRITON_DIAG_STRADDLE overrides.
DIAG_STRADDLE = "slow"
_DIAG_STRADDLE_CODE = {"off": 0, "slow": 1, "all": 2}


def diag_straddle() -> int:
    """DIAG_STRADDLE, or OLSSM_TRITON_DIAG_STRADDLE if set, as the kernels' DIAG_STRADDLE constexpr; checked."""
    return _DIAG_STRADDLE_CODE[switch("OLSSM_TRITON_DIAG_STRADDLE", DIAG_STRADDLE, tuple(_DIAG_STRADDLE_CODE),
                                        "diagonal straddle (OLSSM_TRITON_DIAG_STRADDLE)")]


def _diag_straddle_arg(decay: int) -> dict:
    return {"DIAG_STRADDLE": diag_straddle()} if decay in (DECAY_CODE[ROW], DECAY_CODE[COLUMN]) else {}


def switch(env: str, value: str, allowed: tuple, what: str) -> str:
    """A kernel choice: the environment variable env if set, else the module's value; checked."""
    mode = os.environ.get(env) or value
    if mode not in allowed:
        raise ValueError(f"triton: {what} must be {' or '.join(map(repr, allowed))}, got {mode!r}")
    return mode


def switch_on(env: str, value: bool, what: str) -> bool:
    """An on / off kernel choice: the environment variable env ("0" / "1") if set, else the module's value; checked."""
    return switch(env, "1" if value else "0", ("0", "1"), f"{what} ({env})") == "1"


def ut_solve() -> str:
    """UT_SOLVE, or OLSSM_TRITON_UT_SOLVE if set; checked (the forward prep and the backward's prep read it)."""
    return switch("OLSSM_TRITON_UT_SOLVE", UT_SOLVE, ("masked", "blocks"), "UT solve (OLSSM_TRITON_UT_SOLVE)")


def diag_path(form=None, d_k: int = 0) -> str:
    """DIAG_PATH, or OLSSM_TRITON_DIAG_PATH if set, as a call of this rule (form) at this head size runs it: "fused" or
    "split" ("wide" resolved; without a form, "fused"); checked (the forward and the backward launches each read it)."""
    mode = switch("OLSSM_TRITON_DIAG_PATH", DIAG_PATH, ("fused", "split", "wide"),
                  "diagonal path (OLSSM_TRITON_DIAG_PATH)")
    if mode == "wide":
        return "split" if form is not None and _wide_diag_call(form, d_k) else "fused"
    return mode


def _delta_forward() -> str:
    return switch("OLSSM_TRITON_DELTA_FORWARD", DELTA_FORWARD, ("split", "fused"), "delta forward")


def _chunk_map(cu, BT, T, N):
    """Varlen grids parallel over chunks: int32 [NTG, 2] of (sequence, chunk in it) for every chunk
    of every sequence (chunks start at each sequence's bos), NTG = ⌈T/BT⌉ + N ≥ Σ_n ⌈len_n/BT⌉
    so that no device → host sync is needed for the grid; the rows past the last chunk name
    sequence 0's chunk ⌈T/BT⌉ + 1, which starts after its end (masked, see _delta_chunk)."""
    NTG = -(-T // BT) + N
    nc = (cu[1:] - cu[:-1]).to(torch.int64).add(BT - 1).div(BT, rounding_mode="floor")
    end = torch.cumsum(nc, 0)
    i = torch.arange(NTG, device=cu.device, dtype=torch.int64)
    n = torch.searchsorted(end, i, right=True)
    ok = n < N
    n = n.clamp_max(N - 1)
    c = i - (end[n] - nc[n])
    ix = torch.stack([torch.where(ok, n, 0), torch.where(ok, c, -(-T // BT) + 1)], 1)
    return ix.to(torch.int32).contiguous(), NTG


def _tied(form) -> bool:
    """The first input term's key side is the correction's b (DeltaNet, Gated DeltaNet: w = b = k): the split
    forward then folds that term into B's products (TIE_INPUT_TERM)."""
    return (TIE_INPUT_TERM and len(form.corrections) == 1
            and sp.sympify(form.inputs[0].w) == sp.sympify(form.corrections[0].b))


def chunk_core_numel(form, sizes, out_dtype=torch.float32) -> int:
    """fp32 elements of the forward op's aux holding the T_c and W̃ the split forward keeps (saves_chunk_core), in the
    kernels' sub-token layout: T_c and W̃ in core_storage's dtypes, two bf16 values to an fp32 slot, so that aux's size
    says which dtypes the forward wrote (saved_chunk_core)."""
    B, T, H, d_k, d_v, N, max_len, C = sub_sizes(sizes, sub_tokens(form))
    return _core_numel(B * T * H, C, d_k, *core_storage(form, d_k, out_dtype))


def _core_numel(n: int, C: int, d_k: int, tc_dtype, wt_dtype) -> int:
    """fp32 slots of n tokens' T_c (C each) and W̃ (d_k each) in these dtypes (_slots)."""
    return _slots(n * C, tc_dtype) + _slots(n * d_k, wt_dtype)


def _slots(count: int, dtype) -> int:
    """fp32 slots of count values of dtype: two bf16 values to a slot, the last one half used if count is odd."""
    return -(-count // 2) if dtype == torch.bfloat16 else count


#: the split delta buffers that are only ever read back as tl.dot operands, which operand_storage keeps in the
#: operands' dtype under bf16 operands (the dots round them to bf16 anyway: bit-identical, half the bytes); a name
#: left out keeps its buffer fp32 (for comparison). "wt": W̃ (both state passes' W̃ S₀ᵀ and dΔᵀ W̃; wt_storage);
#: "tc": T_c (the backward value kernel's T_c (c ⊙ R′) and T_cᵀ dΔ; only with "wt", so that the op's aux size tells
#: both dtypes apart); "delta": the forward's Δ / E₀ − Δ (the output kernel's (Q Bᵀ ⊙ D) Δ; a bf16 buffer beside the
#: fp32 Ũ, which the state pass reads elementwise); "dh": without a decay (chunked_delta_bwd.dh_storage); "dr": dR′
#: (the key kernel's dR′ Δᵀ, dR′ E_mᵀ, dR′ S₀; a bf16 buffer beside the fp32 dΔ, which the reverse pass updates and
#: the tied value kernel's dE₀ = Nᵀ dR′ − dΔ reads elementwise); "dl": the backward's Δ for the general key kernel
#: (dO Δᵀ, dR′ Δᵀ, Δ dS; the same-key kernel forms E − Δ elementwise and keeps it fp32). Sessions 24 ("wt", "dh")
#: and 26 (the rest; at (2, 8192, 16, 128), chunk 64, DeltaNet bf16: T_c 67 → 34 MB kept in aux, 201 → 101 MB moved;
#: Δ 268 → 134 MB moved per forward; dR′ 403 → 201 MB per backward; TUNING.md "The backward against fla's")
OPERAND_BUFFERS = ("wt", "tc", "delta", "dh", "dr", "dl")


def operand_storage(prec: str, buffer: str = "wt") -> torch.dtype:
    """The dtype of a split delta buffer (OPERAND_BUFFERS' names) that is only ever read back as a dot operand, for
    dots of precision prec (_precision): bf16 where they take bf16 operands, which round it to bf16 there anyway (the
    same numbers from half the bytes; _store_operand writes it), fp32 otherwise or where OPERAND_BUFFERS leaves the
    buffer out."""
    return torch.bfloat16 if prec.startswith("bf16") and buffer in OPERAND_BUFFERS else torch.float32


def wt_storage(form, d_k: int, out_dtype) -> torch.dtype:
    """W̃'s dtype in the split delta path for inputs of out_dtype: operand_storage of the precision the launches take
    (bf16 operands: DeltaNet at wide keys). W̃ is only ever a dot operand (the two state passes' W̃ S₀ᵀ and dΔᵀ W̃), so
    no fp32 → bf16 conversion in the sequential loops (sm_90, 64 state rows at 4 warps: 255 registers and 16 B of
    spills → 0, 7172 → 6610 instructions per chunk and head; 32 rows at 8 warps 151 → 122 registers; a helper's static
    count, session 24)."""
    return operand_storage(_precision(out_dtype, bf16_operands(form, d_k)), "wt")


def tc_storage(prec: str) -> torch.dtype:
    """T_c's dtype for dots of precision prec: operand_storage's "tc", and bf16 only where W̃ is bf16 too (the op's aux
    then has one size per pair of dtypes: saved_chunk_core). T_c's one reader is the backward value kernel, whose
    T_c (c ⊙ R′) and T_cᵀ dΔ take it as an operand (the UT inverse's own merge products, _mm_inverse, run in tf32 on
    the registers, before the store)."""
    both = operand_storage(prec, "tc") == operand_storage(prec, "wt") == torch.bfloat16
    return torch.bfloat16 if both else torch.float32


def core_storage(form, d_k: int, out_dtype) -> tuple:
    """(T_c's dtype, W̃'s dtype) in the split delta path for inputs of out_dtype (tc_storage, wt_storage)."""
    return tc_storage(_precision(out_dtype, bf16_operands(form, d_k))), wt_storage(form, d_k, out_dtype)


def saved_chunk_core(form, aux, sizes):
    """(T_c [B, T, H, C], W̃ [B, T, H, d_k]) (T, C in sub-tokens) as views into the forward op's `aux` output (one
    flat fp32 tensor: the op returns a fixed number of tensors), or None when the forward did not save them. Each is
    bf16 (in the first half of its fp32 span) where aux has chunk_core_numel's size for that pair of dtypes (fp32 /
    fp32, fp32 / bf16 or bf16 / bf16: tc_storage): the backward reads what the forward wrote, whatever precision it
    runs at itself."""
    if aux is None or aux.numel() == 0:
        return None
    B, T, H, d_k, d_v, N, max_len, C = sub_sizes(sizes, sub_tokens(form))
    n = B * T * H
    f32, bf16 = torch.float32, torch.bfloat16
    fits = [dts for dts in ((f32, f32), (f32, bf16), (bf16, bf16)) if _core_numel(n, C, d_k, *dts) == aux.numel()]
    assert len(fits) == 1, f"aux: {aux.numel()} elements fit no T_c and W̃ of sizes {sizes}"
    (tc_dt, wt_dt), views, at = fits[0], [], 0
    for w, dt in ((C, tc_dt), (d_k, wt_dt)):
        span = _slots(n * w, dt)
        x = aux[at:at + span]
        views.append((x.view(bf16)[:n * w] if dt == bf16 else x).view(B, T, H, w))
        at += span
    return tuple(views)


def _runs_split(form) -> bool:
    """Whether the chunked forward of this delta-family rule is the split one (scalar c, no row decay,
    DELTA_FORWARD = "split"): chunked_forward's choice, which saves_chunk_core must agree with."""
    return not _c_row(form) and form.decay_kind != ROW and _delta_forward() == "split"


def saves_chunk_core(plan, chunked: bool, save: bool, chunk_bwd: bool) -> bool:
    """Whether the forward op keeps T_c and W̃ for the chunked delta backward: the split forward computes
    them anyway (its prep kernel), and the backward would otherwise recompute both (a UT inverse per
    chunk). The fake op and the real one decide alike from the same arguments."""
    form = plan.rule.form
    return (SAVE_CHUNK_CORE and chunked and save and chunk_bwd and bool(form.corrections)
            and _runs_split(form))


def _delta_split_forward(chunk_in, h0, o, ht, ck, sizes, gated, cu_seqlens, tied=False, core=None, sub=1,
                         wide_keys=False, bf16=False, es=None):
    B, T, H, d_k, d_v, N, max_len, C = sizes
    BK, _, BVW, KB, BVS = split_blocks(d_k, d_v)
    q, w, e, g, a, b, c = chunk_in[:7]
    M = w.shape[0]
    dev = q.device
    NCK = ck.shape[2]
    varlen = cu_seqlens is not None
    ix, NTG, G = _chunk_grid(cu_seqlens, C, T, N, B, H, ht)
    cu = cu_seqlens if varlen else ht
    common = dict(BT=C, BK=BK, GATED=gated, VARLEN=varlen, PREC=_precision(o.dtype, bf16),
                  TIED=tied, SUB=sub, OFF32=offsets32_fit(sizes), **_launch_opts(wide_keys), **_scale_args(es))
    # W̃ (and T_c) in the operands' dtype (wt_storage, tc_storage; the op's aux was sized for the same choice)
    tc, wt = core if core is not None else (ht, torch.empty(B, T, H, d_k, dtype=operand_storage(common["PREC"], "wt"),
                                                            device=dev))
    # Ũ (prep), then Δ (E_0 − Δ when tied; state kernel): in place in u, or in a bf16 dl where the output kernel's
    # dots take bf16 operands and u is fp32 (operand_storage's "delta": the state pass reads Ũ elementwise)
    u = torch.empty(B, T, H, d_v, dtype=delta_u_storage(o.dtype), device=dev)
    dl = (torch.empty(B, T, H, d_v, dtype=torch.bfloat16, device=dev)
          if u.dtype == torch.float32 and operand_storage(common["PREC"], "delta") == torch.bfloat16 else u)
    chunk_delta_prep_kernel[(NTG, G)](w, e, g, a, b, c, wt, u, tc, cu, ix, T, H, d_k, d_v, w[0].numel(),
                                      e[0].numel(), M=M, BV=BVW, KB=KB, SAVE_TC=core is not None, UTB=int(UT_BLOCK),
                                      SOLVE=ut_solve(), **_kernel_launch(common, DELTA_PREP_WARPS, DELTA_PREP_STAGES))
    state_args = (w, e, g, b, wt, u, dl, h0.contiguous() if h0 is not None else ht, ht, ck, cu, T, H, d_k, d_v, NCK,
                  w[0].numel(), e[0].numel())
    factors = decay_factors(g, (ix, NTG, G), cu, varlen, T, H, C, common["OFF32"]) if gated else None
    chunk_delta_state_kernel[(-(-d_v // BVS), N * H)](
        *state_args, M=M, BV=BVS, USE_H0=h0 is not None, **_kernel_launch(common, DELTA_STATE_WARPS, DELTA_STATE_STAGES),
        **_factor_args(factors))
    chunk_delta_out_kernel[(NTG, -(-d_v // BVW), G)](q, w, e, g, b, dl, ck, o, cu, ix, T, H, d_k, d_v, NCK,
                                                     w[0].numel(), e[0].numel(), M=M, BV=BVW, KB=KB,
                                                     **_kernel_launch(common, DELTA_OUT_WARPS, DELTA_OUT_STAGES))


def chunked_forward(plan, chunk_in, h0, o, ht, ck, sizes, save, cu_seqlens=None, core=None):
    """Launch the chunked forward: fills o, ht (and ck, the state entering every chunk; and core = (T_c, W̃)
    buffers when given: saved_chunk_core). sizes in tokens; a rank-R rule runs on sub-tokens (sub_tokens).
    chunk_in may hold chunk_inputs' same-key placeholders (shared_key_inputs) and its input scale (input_scale)."""
    chunk_in, es = input_scale(plan.rule.form, chunk_in)
    chunk_in = shared_key_inputs(chunk_in)[0]
    R = sub_tokens(plan.rule.form)
    if R > 1:
        assert es is None, "chunk_inputs scales no input term on load for a rule on sub-tokens"
        B, T, H, d_v = o.shape
        o_sub = torch.empty(B, T * R, H, d_v, dtype=o.dtype, device=o.device)
        _chunked_forward(plan, to_sub_tokens(chunk_in, R), h0, o_sub, ht, ck, sub_sizes(sizes, R), save,
                         cu_seqlens * R if cu_seqlens is not None else None, core, R)
        o.copy_(_pick(o_sub, R, R - 1, 1))
    else:
        _chunked_forward(plan, chunk_in, h0, o, ht, ck, sizes, save, cu_seqlens, core, es=es)


def _chunked_forward(plan, chunk_in, h0, o, ht, ck, sizes, save, cu_seqlens=None, core=None, sub=1, es=None):
    B, T, H, d_k, d_v, N, max_len, C = sizes
    BK, BV = _blocks(d_k, d_v)
    cu = cu_seqlens if cu_seqlens is not None else ht
    NV = -(-d_v // BV)
    q, k, v = chunk_in[:3]
    g = chunk_in[3] if len(chunk_in) > 3 else q
    decay = DECAY_CODE[plan.rule.form.decay_kind]
    NCK = ck.shape[2] if save else 1
    if plan.rule.form.corrections:
        a, b, c = chunk_in[4:7]
        c_row, g_row = _c_row(plan.rule.form), plan.rule.form.decay_kind == ROW
        wide_keys, bf16 = wide(plan.rule.form, d_k), bf16_operands(plan.rule.form, d_k)
        if _runs_split(plan.rule.form):
            if not save:   # the output kernel reads S₀ of every chunk: a scratch ck (ck's dtype), not returned
                ck = torch.empty(N, H, max(1, -(-max_len // C)), d_v, d_k, dtype=ck.dtype, device=q.device)
            _delta_split_forward(chunk_in, h0, o, ht, ck, sizes, plan.rule.form.decay_kind != "none", cu_seqlens,
                                 _tied(plan.rule.form), core, sub, wide_keys, bf16, es)
            return
        chunk_delta_fwd_kernel[(NV, N * H)](
            q, k, v, g, a, b, c, h0.contiguous() if h0 is not None else ht, o, ht, ck if save else ht,
            cu, T, H, d_k, d_v, NCK, k[0].numel(), v[0].numel(), M=k.shape[0], BT=C, BK=BK, BV=BV,
            C_ROW=c_row, G_ROW=g_row, USE_H0=h0 is not None,
            SAVE_CK=save, VARLEN=cu_seqlens is not None,
            PREC=_precision(o.dtype, bf16), SUB=sub, OFF32=offsets32_fit(sizes), SPAN=fast_span(),
            **_launch_opts(wide_keys, walk=True), **_scale_args(es))
        return
    if diag_path(plan.rule.form, d_k) == "split":
        _diag_split_forward(chunk_in, h0, o, ht, ck if save else None, sizes, decay, cu_seqlens, es)
        return
    chunk_fwd_kernel[(NV, N * H)](
        q, k, v, g, h0.contiguous() if h0 is not None else ht, o, ht, ck if save else ht, cu, T, H, d_k, d_v, NCK,
        k[0].numel(), v[0].numel(), M=k.shape[0], BT=C, BK=BK, BV=BV, DECAY=decay, USE_H0=h0 is not None,
        SAVE_CK=save, VARLEN=cu_seqlens is not None, PREC=_precision(o.dtype), SPAN=fast_span(), **_launch_opts(),
        **_scale_args(es))


#: a scalar decay's per-chunk factors Γ, Γ_L/Γ and Γ_L for the sequential state passes (the split diagonal
#: path's forward and reverse passes, the split delta forward's and the delta backward's state kernels) from a
#: pre-pass parallel over chunks (chunk_decay_factors_kernel) instead of an fp64 scan and a cross-warp sum inside
#: their loops, as fla's state kernels read a chunk-local cumsum computed before them. The same values (the same
#: helper, _chunk_decay; compiled, its fp64 scan's association may follow the launch's layout: equal to fp32
#: rounding). sm_90, d = 128, chunk 64, per chunk of the sequential loop (aot_check --ptx-loops): barriers 8 → 3
#: (diagonal state and reverse passes), 14 → 8 (tied delta state), 16 → 8 (untied delta state, delta backward
#: state), warp shuffles 24 → 0, instructions about the same (629 → 634, 1270 → 1149, 1483 → 1515: three strided
#: loads per token replace the scan); spills +48 / +80 B in the untied delta state / delta backward state. One extra
#: launch and B·T·H·12 bytes (3 MB at (2, 8192, 16, 128)). H200, (2, 8192, 16, 128) bf16 (session 22, one process
#: each): Gated DeltaNet 1.71 / 6.43-6.45 → 1.64 / 6.21 ms fwd / fwd+bwd (row `df`, drift 0.02); Mamba-2's split path
#: 746 / 3260 → 718 / 3206 µs (profile, `ds64df`). On since. OLSSM_TRITON_DECAY_FACTORS (0 / 1) overrides; read at
#: call time.
DECAY_FACTORS = True


def decay_factors(g, grid, cu, varlen, T, H, C, off32: bool = False):
    """f [B·T·H, 3] (Γ, Γ_L/Γ, Γ_L per token) of the scalar log decay g over the chunk grid (ix, NTG, G) of
    _chunk_grid (cu: cu_seqlens with varlen, else any tensor), or None where DECAY_FACTORS is off. off32: int32 row
    offsets, as the launches it feeds take them (offsets32_fit: 3·B·T·H fits where B·T·H·16 does)."""
    if not switch_on("OLSSM_TRITON_DECAY_FACTORS", DECAY_FACTORS, "decay factors"):
        return None
    ix, NTG, G = grid
    f = torch.empty(g.numel(), 3, dtype=torch.float32, device=g.device)
    chunk_decay_factors_kernel[(NTG, G)](g, f, cu, ix, T, H, BT=C, VARLEN=varlen, OFF32=off32, num_warps=2)
    return f


def _factor_args(f) -> dict:
    """The launch arguments of decay_factors' result for the sequential kernels."""
    return {} if f is None else dict(f_ptr=f, FACTORS=True)


def _chunk_grid(cu_seqlens, C, T, N, B, H, dummy):
    """(ix, NTG, G) of a grid parallel over chunks, (chunk-map rows, ..., G): with cu_seqlens the chunk map
    (_chunk_map) and G = H heads, else ⌈T/C⌉ chunks of each of G = B·H sequence·heads (ix unused: dummy)."""
    if cu_seqlens is not None:
        return (*_chunk_map(cu_seqlens, C, T, N), H)
    return dummy, -(-T // C), B * H


def _diag_split_forward(chunk_in, h0, o, ht, ck, sizes, decay, cu_seqlens, es=None):
    """DIAG_PATH = "split": the states entering the chunks (chunk_fwd_kernel without OUT; into ck, or a scratch one of the
    checkpoints' dtype when the forward keeps none), then o (chunk_diag_out_kernel)."""
    B, T, H, d_k, d_v, N, max_len, C = sizes
    BK, BV = _blocks(d_k, d_v)
    BKS, BVS = diag_state_blocks(d_k, d_v)
    q, k, v = chunk_in[:3]
    g = chunk_in[3] if decay else q
    if ck is None:
        ck = torch.empty(N, H, max(1, -(-max_len // C)), d_v, d_k, dtype=checkpoint_storage(o.dtype),
                         device=q.device)
    NCK = ck.shape[2]
    varlen = cu_seqlens is not None
    cu = cu_seqlens if varlen else ht
    ix, NTG, G = _chunk_grid(cu_seqlens, C, T, N, B, H, ht)
    common = dict(M=k.shape[0], BT=C, DECAY=decay, VARLEN=varlen, PREC=_precision(o.dtype), SPAN=fast_span(),
                  **_launch_opts(), **_scale_args(es))
    factors = decay_factors(g, (ix, NTG, G), cu, varlen, T, H, C) if decay == 1 else None
    chunk_fwd_kernel[(-(-d_v // BVS), -(-d_k // BKS), N * H)](
        k, k, v, g, h0.contiguous() if h0 is not None else ht, ht, ht, ck, cu, T, H, d_k, d_v, NCK, k[0].numel(),
        v[0].numel(), BK=BKS, BV=BVS, USE_H0=h0 is not None, SAVE_CK=True, OUT=False, KEY_BLOCKS=True,
        **_kernel_launch(common, DIAG_STATE_WARPS, DIAG_STATE_STAGES), **_factor_args(factors))
    # the output takes wider value blocks (DIAG_OUT_BLOCK_V) than a row decay's (its D per value row: sm_90, d = 128,
    # chunk 32, 64 rows spill 952 B), as many as keep its [BV, d_k] state tile within DIAG_OUT_TILE
    BVO = BV if decay == 2 else diag_out_rows(d_k, d_v)
    KB = min(BK, _block("DIAG_OUT_KEY_BLOCK")) if DIAG_OUT_KEY_BLOCK else 0
    chunk_diag_out_kernel[(NTG, -(-d_v // BVO), G)](q, k, v, g, ck, o, cu, ix, T, H, d_k, d_v, NCK, k[0].numel(),
                                                    v[0].numel(), BK=BK, BV=BVO, KB=KB,
                                                    **_kernel_launch(common, DIAG_OUT_WARPS, DIAG_OUT_STAGES))


# --------------------------------------------------------------------------------------------
# chunked backward for the diagonal family: none / scalar / row / column decay (no correction)

@triton.jit
def _column_pair_products(P, q, k, b, bl, tt, fast, BT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                          WITH_A: tl.constexpr = False, X=None, STRADDLE: tl.constexpr = 0):
    """A column decay's intra-chunk shares of dQ and dW from the causal P = dO Eᵀ: dq_i = Σ_{j ≤ i} P_ij w_j ⊙
    e^{b_i − b_j}, dw_j = Σ_{i ≥ j} P_ij q_i ⊙ e^{b_i − b_j} (b [BT, BK] the cumulative log decay, bl its chunk total),
    and WITH_A the causal A_ij = Σ_k q_ik w_jk e^{b_ik − b_jk} for dE = Aᵀ dO (else A is 0). Where `fast` (every
    column's total exceeds −SPAN: the forward's factorisation) as dots over factors e^{±x}, x = b − bl/2, P and A
    causal so no masked-out product is formed; else one token column at a time, exact for any decay.
    With STRADDLE (DIAG_STRADDLE: 1 on the per-token path, 2 on both) also the straddle sums of ∂g per key
    column, strad_u = Σ_{s < u ≤ t} P_ts q_t w_s e^{b_t − b_s} + Σ_{s < u} X_s (X: the state's share w ⊙ dw_state),
    else strad is 0 (_column_decay_grad)."""
    if WITH_A:
        A = tl.zeros([BT, BT], dtype=tl.float32)
    else:
        A = 0.0
    if STRADDLE > 0:
        strad = tl.zeros([BT, BK], dtype=tl.float32)
    else:
        strad = 0.0
    if fast:
        x = (b - 0.5 * bl[None, :]).to(tl.float32)
        kx = k * tl.exp(-x)
        qx = q * tl.exp(x)
        dqi = _mm(P, kx, PREC) * tl.exp(x)
        if WITH_A:
            A = tl.where((tt[:, None] >= tt[None, :]), _mm(qx, tl.trans(kx), PREC), 0.0)
        dki = _mm(tl.trans(P), qx, PREC) * tl.exp(-x)
        if STRADDLE == 2:
            strad = _factored_straddle(P, qx, kx, X, tt, BT, BK)
    else:
        dqi = tl.zeros([BT, BK], dtype=tl.float32)
        dki = tl.zeros([BT, BK], dtype=tl.float32)
        if STRADDLE > 0:
            H = tl.zeros([BT, BK], dtype=tl.float32)   # Σ_{s < j} P_ts w_s e^{b_j − b_s}: rebased at each j
            xacc = tl.zeros([BK], dtype=tl.float32)    # Σ_{s < j} X_s
        for j in range(0, BT):
            sel, colj, kj, ex = _token_column(tt, j, k, b)
            if WITH_A:
                A = tl.where(colj, tl.sum(q * kj[None, :] * ex, axis=1)[:, None], A)
            pj = tl.sum(tl.where(colj, P, 0.0), axis=1)   # P[:, j]
            dqi += pj[:, None] * kj[None, :] * ex
            dki = tl.where(sel, tl.sum(pj[:, None] * q * ex, axis=0)[None, :], dki)
            if STRADDLE > 0:
                strad = tl.where(sel, (tl.sum(q * ex * H, axis=0) + xacc)[None, :], strad)
                H = _walk_on(H, pj, kj, _walk_step(ex, tt, j))
                xacc += tl.sum(tl.where(sel, X, 0.0), axis=0)
    return dqi, dki, A, strad


@triton.jit
def _walk_step(ex, tt, j):
    """e^{g_{j+1}} ≤ 1: row j + 1 of the per-token loop's pairwise factors ex = e^{b_t − b_j} (_token_column)."""
    return tl.sum(tl.where((tt == j + 1)[:, None], ex, 0.0), axis=0)


@triton.jit
def _walk_on(H, kcol, rj, step):
    """One step of the per-token straddle walk: H_{j+1} = e^{g_{j+1}} (H_j + K[:, j] ⊗ R_j), from H_j(t) =
    Σ_{s < j} K_ts R_s e^{b_j − b_s} rebased at j (so that every factor is ≤ 1); kcol = K[:, j], rj = R_j, step =
    _walk_step's e^{g_{j+1}}."""
    return (H + kcol[:, None] * rj[None, :]) * step[None, :]


@triton.jit
def _factored_straddle(P, qx, kx, X, tt, BT: tl.constexpr, BK: tl.constexpr):
    """strad_u = Σ_{s < u ≤ t} P_ts qx_t kx_s + Σ_{s < u} X_s per key column on the factorised path (qx = q e^{x},
    kx = w e^{−x}: each product is e^{b_t − b_s} ≤ 1, no term cancels another): a running prefix H over s, one token
    at a time (BT²·BK work, no exponent). X None: the pairs alone."""
    strad = tl.zeros([BT, BK], dtype=tl.float32)
    H = tl.zeros([BT, BK], dtype=tl.float32)
    xacc = tl.zeros([BK], dtype=tl.float32)
    for j in range(0, BT):
        sel = (tt == j)[:, None]
        strad = tl.where(sel, (tl.sum(tl.where((tt >= j)[:, None], qx * H, 0.0), axis=0) + xacc)[None, :], strad)
        pj = tl.sum(tl.where((tt == j)[None, :], P, 0.0), axis=1)
        H += pj[:, None] * tl.sum(tl.where(sel, kx, 0.0), axis=0)[None, :]
        if X is not None:
            xacc += tl.sum(tl.where(sel, X, 0.0), axis=0)
    return strad


@triton.jit
def _column_decay_grad(one, pair, dbLg, dbLx, strad, fast, tt, BT: tl.constexpr, STRADDLE: tl.constexpr):
    """∂g_u per key column of a column decay (GLA) from ∂b's one-signed terms `one` (Γ's: q ⊙ Γ ⊙ dO S₀) and Γ_L's
    dbLg, its pair terms and the state's share X as the old reverse sum took them (`pair` = q ⊙ dq_intra − w ⊙ dw,
    dbLx = Σ X), and their straddle sums `strad` (_column_pair_products). The reverse sum Σ_{i ≥ u} ∂b_i cancels the
    pairs on either side of u: ε·O(1) left where a strong decay makes the true ∂g_u ~e^{g_u} (2.0e-4 relative on a
    gate's scale at s = 100, TRITON.md); straddled, each term carries e^{g_u}. DIAG_STRADDLE: 0 the reverse sum,
    1 straddled on the per-token path (chunks spanning > SPAN, where such decays live), 2 everywhere."""
    last = (tt == BT - 1)[:, None]
    if STRADDLE == 2:
        dg = tl.cumsum(tl.where(last, one + dbLg[None, :], one), axis=0, reverse=True) + strad
    else:
        dg = tl.cumsum(tl.where(last, one + pair + (dbLg + dbLx)[None, :], one + pair), axis=0, reverse=True)
        if STRADDLE == 1:
            dg = tl.where(fast, dg, tl.cumsum(tl.where(last, one + dbLg[None, :], one), axis=0, reverse=True) + strad)
    return dg


@triton.jit
def _diag_bwd_keys(q, do, S0, dS, k_ptr, v_ptr, g_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr, base, tm, rows, cols, rm, km,
                   tt, i_v, DK, DV, SW, SE, TOKH, M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr, STORE_DV: tl.constexpr = True,
                   SPAN: tl.constexpr = FAST_SPAN, es_ptr=None, SCALED_E: tl.constexpr = False,
                   DIAG_STRADDLE: tl.constexpr = 1):
    """One chunk of the diagonal family's backward over one block of key columns `cols` (BK wide: all of them in the
    fused walk), from the chunk's query and ∂o tiles q, do and that block of S₀ (the state entering the chunk) and of
    dS = ∂L/∂S at its end (chunk_bwd_kernel's formulas). Stores the block's columns of dQ, dW_m (as the value block
    i_v's partial sums) and of a column decay's ∂g; with STORE_DV dE_m too. What sums over key columns comes back
    as this block's share, for _diag_bwd_finish: (qs, dos, glast, dE (the last term's), ∂b, ∂b_L, pairs), where
    dS₀ = glast ⊙ dS + dosᵀ qs is the step back to the chunk's start (the fused walk's carry; whole only with all
    the keys) and ∂b, ∂b_L are the cumulative log decay's gradient before its reverse sum (scalar, row decays). A
    scalar decay's ∂b holds only its one-signed terms (Γ's, and Γ_L's in ∂b_L); its pair terms come back as the
    [BT, BT] matrix `pairs` (with the chunk end's X in the last row), summed where they straddle the token
    (_scalar_decay_grad)."""
    causal = tt[:, None] >= tt[None, :]
    qk_m = tm[:, None] & km[None, :]
    vm = tm[:, None] & rm[None, :]
    if DECAY == 3:     # column decay (GLA): b [BT, BK]; ∂b = q ⊙ dq − w ⊙ dw (+ the chunk end's terms)
        g = _log_decay(g_ptr, base[:, None] * DK + cols[None, :], qk_m)
        b = tl.cumsum(g, axis=0)
        bl = tl.sum(g, axis=0)
        gq = tl.exp(b.to(tl.float32))                             # [BT, BK]
        decw = tl.exp((bl[None, :] - b).to(tl.float32))           # [BT, BK]
        glk = tl.exp(bl.to(tl.float32))                           # [BK]
        fast = tl.min(bl, axis=0) > -SPAN
        dq = _mm(do, S0, PREC) * gq
        one = q * dq                                              # Γ's one-signed terms
        pair = tl.zeros([BT, BK], dtype=tl.float32)
        dbLg = glk * tl.sum(dS * S0, axis=0)                      # [BK]: Γ_L's
        dbLx = tl.zeros([BK], dtype=tl.float32)
        strad = tl.zeros([BT, BK], dtype=tl.float32)
        for m in tl.static_range(M):
            k = tl.load(k_ptr + _rank_offset(m, SW) + base[:, None] * DK + cols[None, :],
                        mask=qk_m, other=0.0).to(tl.float32)
            v = _value_side(v_ptr, m, SE, base[:, None] * DV + rows[None, :], vm, es_ptr, base, tm, SCALED_E)
            P = tl.where(causal, _mm(do, tl.trans(v), PREC), 0.0)   # dO E_mᵀ
            dks = _mm(v, dS, PREC) * decw       # [BT, BK]: state's share of dW
            X = k * dks
            dqi, dki, A, strad_m = _column_pair_products(P, q, k, b, bl, tt, fast, BT, BK, PREC, WITH_A=True, X=X,
                                                         STRADDLE=DIAG_STRADDLE)
            kdS = _mm(k * decw, tl.trans(dS), PREC)   # [BT, BV]
            dq += dqi
            dk = dki + dks
            dv = _mm(tl.trans(A), do, PREC) + kdS
            tl.store(dk_ptr + (i_v * M + m).to(tl.int64) * TOKH * DK + base[:, None] * DK + cols[None, :], dk,
                     mask=qk_m)
            if STORE_DV:
                tl.store(dv_ptr + _rank_offset(m, SE) + base[:, None] * DV + rows[None, :], dv, mask=vm)
            pair += q * dqi - k * dk
            dbLx += tl.sum(X, axis=0)
            strad += strad_m
        tl.store(dq_ptr + i_v.to(tl.int64) * TOKH * DK + base[:, None] * DK + cols[None, :], dq, mask=qk_m)
        dg = _column_decay_grad(one, pair, dbLg, dbLx, strad, fast, tt, BT, DIAG_STRADDLE)
        tl.store(dg_ptr + i_v.to(tl.int64) * TOKH * DK + base[:, None] * DK + cols[None, :],
                 _log_decay_grad(dg, g_ptr, base[:, None] * DK + cols[None, :], qk_m), mask=qk_m)
        db, dbL = 0.0, 0.0
        qs, dos, glast, pairs = q * gq, do, glk[None, :], 0.0
    elif DECAY == 2:   # row decay (d_v): the column case's transpose, ∂b = dO ⊙ o − Σ_m e_m ⊙ de_m (+ chunk end)
        b, bl, gv, decv, x, fast = _row_decay_tiles(g_ptr, base[:, None] * DV + rows[None, :], vm, SPAN)   # Γ, Γ_L/Γ
        glv = tl.exp(bl.to(tl.float32))                           # [BV]
        dog = do * gv
        dq = _mm(dog, S0, PREC)                                   # (dO ⊙ Γ) S₀
        one = do * _mm(q, tl.trans(S0), PREC) * gv                # Γ's one-signed terms: dO ⊙ o's state share
        pair = tl.zeros([BT, BV], dtype=tl.float32)
        dbLg = glv * tl.sum(dS * S0, axis=1)                      # [BV]: Γ_L's
        dbLx = tl.zeros([BV], dtype=tl.float32)
        if DIAG_STRADDLE > 0:
            strad = tl.zeros([BT, BV], dtype=tl.float32)
        else:
            strad = 0.0
        for m in tl.static_range(M):
            k = tl.load(k_ptr + _rank_offset(m, SW) + base[:, None] * DK + cols[None, :],
                        mask=qk_m, other=0.0).to(tl.float32)
            v = _value_side(v_ptr, m, SE, base[:, None] * DV + rows[None, :], vm, es_ptr, base, tm, SCALED_E)
            QK = tl.where(causal, _mm(q, tl.trans(k), PREC), 0.0)
            kdS = _mm(k, tl.trans(dS), PREC)   # [BT, BV]: W dSᵀ
            X = v * kdS * decv                 # the state's share of −∂b_t (and of ∂b_L, summed)
            if fast:   # D_i(t, s) = e^{x_ti}·e^{−x_si}, as in the forward
                vx = v * tl.exp(-x)
                dox = do * tl.exp(x)
                om = _mm(QK, vx, PREC) * tl.exp(x)
                P = tl.where(causal, _mm(dox, tl.trans(vx), PREC), 0.0)   # Σ_i dO e D
                dvl = _mm(tl.trans(QK), dox, PREC) * tl.exp(-x)
                if DIAG_STRADDLE == 2:   # the pairs T_ts = dO_t QK_ts e_s e^{b_t − b_s} per row, as GLA's per column
                    strad += _factored_straddle(QK, dox, vx, X, tt, BT, BV)
            else:      # pairwise exponents, one token column j at a time
                om = tl.zeros([BT, BV], dtype=tl.float32)
                P = tl.zeros([BT, BT], dtype=tl.float32)
                dvl = tl.zeros([BT, BV], dtype=tl.float32)
                if DIAG_STRADDLE > 0:
                    Hs = tl.zeros([BT, BV], dtype=tl.float32)   # Σ_{s < j} QK_ts e_s e^{b_j − b_s}, rebased at each j
                    xacc = tl.zeros([BV], dtype=tl.float32)     # Σ_{s < j} X_s
                for j in range(0, BT):
                    sel, colj, vj, ex = _token_column(tt, j, v, b)
                    qkj = tl.sum(tl.where(colj, QK, 0.0), axis=1)  # [BT]: QK[:, j]
                    om += qkj[:, None] * vj[None, :] * ex
                    P = tl.where(colj, tl.sum(do * vj[None, :] * ex, axis=1)[:, None], P)
                    dvj = tl.sum(qkj[:, None] * do * ex, axis=0)  # [BV]
                    dvl = tl.where(sel, dvj[None, :], dvl)
                    if DIAG_STRADDLE > 0:   # _column_pair_products' walk with (P, q, w) → (QK, dO, e)
                        strad = tl.where(sel, strad + (tl.sum(do * ex * Hs, axis=0) + xacc)[None, :], strad)
                        Hs = _walk_on(Hs, qkj, vj, _walk_step(ex, tt, j))
                        xacc += tl.sum(tl.where(sel, X, 0.0), axis=0)
            dk = _mm(tl.trans(P), q, PREC) + _mm(v * decv, dS, PREC)
            dv = dvl + kdS * decv
            dq += _mm(P, k, PREC)
            tl.store(dk_ptr + (i_v * M + m).to(tl.int64) * TOKH * DK + base[:, None] * DK + cols[None, :], dk,
                     mask=qk_m)
            if STORE_DV:
                tl.store(dv_ptr + _rank_offset(m, SE) + base[:, None] * DV + rows[None, :], dv, mask=vm)
            pair += do * om - v * dvl - X
            dbLx += tl.sum(X, axis=0)
        tl.store(dq_ptr + i_v.to(tl.int64) * TOKH * DK + base[:, None] * DK + cols[None, :], dq, mask=qk_m)
        # ∂b for _diag_bwd_finish's reverse sum: straddled (DIAG_STRADDLE), the one-signed terms only, the pairs and
        # X in `pairs` as their straddle sums; else the whole ∂b as before
        if DIAG_STRADDLE == 2:
            db, dbL, pairs = one, dbLg, strad
        elif DIAG_STRADDLE == 1:
            db = tl.where(fast, one + pair, one)
            dbL = tl.where(fast, dbLg + dbLx, dbLg)
            pairs = tl.where(fast, 0.0, strad)
        else:
            db, dbL, pairs = one + pair, dbLg + dbLx, 0.0
        qs, dos, glast = q, dog, glv[:, None]
    else:
        D, _, gam, dec, gl = _chunk_decay(g_ptr, base, tm, BT, DECAY == 1)
        # carried state's share
        dSq = _mm(do, S0, PREC)                # [BT, BK]: dO S₀
        dq = dSq * gam[:, None]
        db = tl.sum(dSq * q, axis=1) * gam                        # ∂b_i from Γ_i
        dbL = gl * tl.sum(tl.sum(dS * S0, axis=1), axis=0)        # ∂b_L from Γ_L
        pairs = tl.zeros([BT, BT], dtype=tl.float32)
        for m in tl.static_range(M):
            k = tl.load(k_ptr + _rank_offset(m, SW) + base[:, None] * DK + cols[None, :],
                        mask=qk_m, other=0.0).to(tl.float32)
            v = _value_side(v_ptr, m, SE, base[:, None] * DV + rows[None, :], vm, es_ptr, base, tm, SCALED_E)
            P = _mm(do, tl.trans(v), PREC) * D  # [BT, BT]
            A = _mm(q, tl.trans(k), PREC) * D
            dq += _mm(P, k, PREC)
            vd = v * dec[:, None]
            dk = _mm(tl.trans(P), q, PREC) + _mm(vd, dS, PREC)
            kdS = _mm(k, tl.trans(dS), PREC)  # [BT, BV]: W dSᵀ
            dv = _mm(tl.trans(A), do, PREC) + kdS * dec[:, None]
            tl.store(dk_ptr + (i_v * M + m).to(tl.int64) * TOKH * DK + base[:, None] * DK + cols[None, :], dk,
                     mask=qk_m)
            if STORE_DV:
                tl.store(dv_ptr + _rank_offset(m, SE) + base[:, None] * DV + rows[None, :], dv, mask=vm)
            if DECAY == 1:
                pairs += P * _mm(q, tl.trans(k), PREC)             # ∂L/∂D ⊙ D
                X = tl.sum(vd * kdS, axis=1)                       # ∂ from dec_j = e^{b_L − b_j}
                pairs += tl.where((tt == BT - 1)[:, None], X[None, :], 0.0)
        tl.store(dq_ptr + i_v.to(tl.int64) * TOKH * DK + base[:, None] * DK + cols[None, :], dq, mask=qk_m)
        qs, dos, glast = q, do * gam[:, None], gl
    return qs, dos, glast, dv, db, dbL, pairs


@triton.jit
def _scalar_decay_grad(db, dbL, pairs, tt, BT: tl.constexpr):
    """∂g_u = Σ_{i ≥ u} ∂b_i of a scalar decay, with no cancellation. ∂b_i = (one-signed Γ / Γ_L terms) +
    rowsum_i(T) − colsum_i(T) − X_i (+ ΣX at the chunk end), T = (dO Eᵀ ⊙ D) ⊙ Q Wᵀ: summed over i ≥ u, the pairs
    (t, s) with u ≤ s ≤ t cancel in exact arithmetic, but in fp32 each leaves ε·|T_ts|, O(1) even where a strong
    decay at u makes the true ∂g_u tiny, and a Δ of 10³ multiplies that into ∂A (Mamba-2: 23× the true ∂A at
    Δ·|A| ~ 1.7e3). Every term of the true ∂g_u straddles u, so it is summed as that:
        ∂g_u = Σ_{i ≥ u} (∂b_i + [i = L] ∂b_L) + Σ_{s < u} Σ_{t ≥ u} pairs_ts
    (pairs = T, with X in its last row: Σ_{s < u} X_s is X's part), each term carrying the decay e^{g_u}."""
    return _straddled_decay_grad(db, dbL, _straddle_sum(pairs, tt), tt, BT)


@triton.jit
def _straddled_decay_grad(one, dbL, strad, tt, BT: tl.constexpr):
    """∂g_u = Σ_{i ≥ u} (one_i + [i = L] ∂b_L) + strad_u: a scalar decay's gradient from its one-signed terms and
    the straddle sums of its pair terms (_scalar_decay_grad; the delta key kernel's _same_key_grads and general
    path form strad term by term)."""
    return tl.cumsum(tl.where(tt == BT - 1, one + dbL, one), axis=0, reverse=True) + strad


@triton.jit
def _straddle_sum(pairs, tt):
    """Σ_{s < u} Σ_{t ≥ u} pairs_ts for every token u of the chunk: the pair terms that straddle u."""
    return tl.sum(tl.where(tt[None, :] < tt[:, None], tl.cumsum(pairs, axis=0, reverse=True), 0.0), axis=1)


@triton.jit
def _sum_before(x, tt):
    """Σ_{s < u} x_s for every token u, summed as that: cumsum(x) − x would cancel x_u against itself, ε·|x_u| where
    the true sum is tiny (a strong decay at u)."""
    return tl.sum(tl.where(tt[None, :] < tt[:, None], x[None, :], 0.0), axis=1)


@triton.jit
def _sum_before_rows(x, tt):
    """Σ_{s < u} x_s for every token u and column of x [BT, C], as that (no cumsum(x) − x: _sum_before): one masked
    row extraction per token, BT²·C work."""
    acc = tl.zeros([x.shape[1]], dtype=tl.float32)
    out = tl.zeros(x.shape, dtype=tl.float32)
    for j in range(0, x.shape[0]):
        sel = (tt == j)[:, None]
        out = tl.where(sel, acc[None, :], out)
        acc += tl.sum(tl.where(sel, x, 0.0), axis=0)
    return out


@triton.jit
def _diag_bwd_finish(db, dbL, pairs, dg_ptr, g_ptr, base, tm, rows, rm, tt, i_v, DV, TOKH, BT: tl.constexpr,
                     DECAY: tl.constexpr):
    """∂g of a chunk from ∂b, ∂b_L (and a scalar decay's pairs) summed over its key blocks (_diag_bwd_keys): ∂b_L
    joins the last token's ∂b, then ∂g_t = Σ_{i ≥ t} ∂b_i within the chunk (a scalar decay's as the value block
    i_v's partial sum, _scalar_decay_grad; a row decay's whole: each program owns its value rows). A column decay's
    ∂g is per key column, stored by _diag_bwd_keys."""
    if DECAY == 1:
        tl.store(dg_ptr + i_v.to(tl.int64) * TOKH + base, _scalar_decay_grad(db, dbL, pairs, tt, BT), mask=tm)
    elif DECAY == 2:   # pairs: the straddle sums where DIAG_STRADDLE took them (_diag_bwd_keys), else 0
        db = tl.where((tt == BT - 1)[:, None], db + dbL[None, :], db)
        dg = tl.cumsum(db, axis=0, reverse=True) + pairs
        voff = base[:, None] * DV + rows[None, :]
        vm = tm[:, None] & rm[None, :]
        tl.store(dg_ptr + voff, _log_decay_grad(dg, g_ptr, voff, vm), mask=vm)


@triton.jit
def chunk_bwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, dht_ptr, ck_ptr, cu_ptr,
                     dq_ptr, dk_ptr, dv_ptr, dg_ptr, dh0_ptr, dh_ptr, T, H, DK, DV, NCK, SW, SE, TOKH,
                     M: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                     USE_DHT: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr = "ieee",
                     GRADS: tl.constexpr = True, KEY_BLOCKS: tl.constexpr = False, SPAN: tl.constexpr = FAST_SPAN,
                     es_ptr=None, SCALED_E: tl.constexpr = False, f_ptr=None, FACTORS: tl.constexpr = False,
                     DIAG_STRADDLE: tl.constexpr = 1):
    """Reverse over chunks with dS (∂L/∂S at the chunk end) in registers; per chunk, with P_m = (dO E_mᵀ) ⊙ D:
        dQ   = Σ_m P_m W_m + Γ ⊙ (dO S₀)            dW_m = P_mᵀ Q + dec ⊙ (E_m dS)
        dE_m = (Q W_mᵀ ⊙ D)ᵀ dO + dec ⊙ (W_m dSᵀ)     dS₀  = Γ_L dS + (Γ ⊙ dO)ᵀ Q
        ∂b_i (cumulative log decay) from D, Γ, dec, Γ_L; ∂g = reverse cumsum of ∂b (a scalar decay's pair terms
        summed where they straddle the token: _scalar_decay_grad).
    dQ, dW and ∂g are partial sums over the value-row blocks (summed by the caller). With GRADS False (and
    KEY_BLOCKS) the split path's reverse pass: only dS, at the end of every chunk → dh (ck's layout) and at the start
    → dh0, one program per (value block, key block, sequence·head), one dot per chunk (_diag_back_factors; the
    gradient pointers and ck unread)."""
    i_v, i_bh, i_h, bos, eos, rows, cols, rm, km, m2, soff, tt = _sequential_program(cu_ptr, T, H, DK, DV, BT, BK,
                                                                                      BV, VARLEN,
                                                                                      KEY_BLOCKS=KEY_BLOCKS)
    dS = _initial_tile(dht_ptr, i_bh, DK, DV, soff, m2, BK, BV, USE_DHT)
    nc = tl.cdiv(eos - bos, BT)
    for cr in range(0, nc):
        c = nc - 1 - cr
        tm, base = _tokens(bos + c * BT, tt, eos, H, i_h)
        q = tl.load(q_ptr + base[:, None] * DK + cols[None, :], mask=tm[:, None] & km[None, :],
                    other=0.0).to(tl.float32)
        do = tl.load(do_ptr + base[:, None] * DV + rows[None, :], mask=tm[:, None] & rm[None, :],
                     other=0.0).to(tl.float32)
        if GRADS:
            S0 = tl.load(ck_ptr + (i_bh.to(tl.int64) * NCK + c) * DV * DK + soff, mask=m2,
                         other=0.0).to(tl.float32)
            qs, dos, glast, _, db, dbL, pairs = _diag_bwd_keys(q, do, S0, dS, k_ptr, v_ptr, g_ptr, dq_ptr, dk_ptr,
                                                               dv_ptr, dg_ptr, base, tm, rows, cols, rm, km, tt, i_v,
                                                               DK, DV, SW, SE, TOKH, M, BT, BK, BV, DECAY, PREC,
                                                               SPAN=SPAN, es_ptr=es_ptr, SCALED_E=SCALED_E,
                                                               DIAG_STRADDLE=DIAG_STRADDLE)
            _diag_bwd_finish(db, dbL, pairs, dg_ptr, g_ptr, base, tm, rows, rm, tt, i_v, DV, TOKH, BT, DECAY)
        else:
            tl.store(dh_ptr + (i_bh.to(tl.int64) * NCK + c) * DV * DK + soff, dS, mask=m2)
            qs, dos, glast = _diag_back_factors(q, do, g_ptr, base, tm, rows, cols, rm, km, DK, DV, DECAY, f_ptr,
                                                (bos + c * BT).to(tl.int64) * H + i_h, BT, FACTORS)
        dS = tl.where(m2, dS * glast + _mm(tl.trans(dos), qs, PREC), 0.0)
    tl.store(dh0_ptr + i_bh.to(tl.int64) * DV * DK + soff, dS, mask=m2)


@triton.jit
def _diag_back_factors(q, do, g_ptr, base, tm, rows, cols, rm, km, DK, DV, DECAY: tl.constexpr, f_ptr, first,
                       BT: tl.constexpr, FACTORS: tl.constexpr):
    """(qs, dos, glast) of a chunk's step back, dS₀ = glast ⊙ dS + dosᵀ qs (what _diag_bwd_keys returns), from the
    chunk's query and ∂o tiles alone: the split path's reverse state pass, which forms nothing else."""
    if DECAY == 3:
        g = _log_decay(g_ptr, base[:, None] * DK + cols[None, :], tm[:, None] & km[None, :])
        qs, dos, glast = q * tl.exp(tl.cumsum(g, axis=0).to(tl.float32)), do, tl.exp(tl.sum(g, axis=0).to(
            tl.float32))[None, :]
    elif DECAY == 2:
        _, bl, gv, _, _, _ = _row_decay_tiles(g_ptr, base[:, None] * DV + rows[None, :], tm[:, None] & rm[None, :],
                                              0.0)   # `fast` unused
        qs, dos, glast = q, do * gv, tl.exp(bl.to(tl.float32))[:, None]
    elif DECAY == 1:   # Γ and Γ_L (from the pre-pass with FACTORS)
        gam, _, glast = _sequential_decay(g_ptr, f_ptr, base, tm, first, BT, FACTORS)
        qs, dos = q, do * gam[:, None]
    else:
        qs, dos, glast = q, do, 1.0
    return qs, dos, glast


@triton.jit
def chunk_diag_bwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, ck_ptr, dh_ptr, cu_ptr, ix_ptr, dq_ptr, dk_ptr, dv_ptr,
                          dg_ptr, T, H, DK, DV, NCK, SW, SE, TOKH, M: tl.constexpr, BT: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, VARLEN: tl.constexpr,
                          PREC: tl.constexpr = "ieee", NKB: tl.constexpr = 1, SPAN: tl.constexpr = FAST_SPAN,
                          es_ptr=None, SCALED_E: tl.constexpr = False, DIAG_STRADDLE: tl.constexpr = 1):
    """The split diagonal path's gradients, parallel over chunks: one (chunk, value block) from S₀ = ck and
    dS = dh, into the same partial-sum slots as chunk_bwd_kernel, walking the key columns in NKB blocks of BK
    (_diag_bwd_keys per block: no [BT, d_k] tile is live beyond its block). One input term when NKB > 1 (its dE
    and ∂b, ∂b_L are summed over the blocks here); chunked_backward runs more in the fused walk: at NKB = 1 this
    kernel held two terms' whole [BT, 128] tiles in 32 registers and 10 KB of stack per thread (sm_90, chunk 32)."""
    i_v, i_h, tt, rows, tm, base, vm, sm, sbase, voff = _chunk_value_tile(ix_ptr, cu_ptr, T, H, DK, DV, NCK, BT, BV,
                                                                          VARLEN)
    rm = rows < DV
    do = tl.load(do_ptr + voff, mask=vm, other=0.0).to(tl.float32)
    dv = tl.zeros([BT, BV], dtype=tl.float32)
    if DECAY == 2:
        db = tl.zeros([BT, BV], dtype=tl.float32)
        dbL = tl.zeros([BV], dtype=tl.float32)
    else:
        db = tl.zeros([BT], dtype=tl.float32)
        dbL = tl.sum(db, axis=0)
    if DECAY == 2:   # a row decay's straddle sums (DIAG_STRADDLE), per value row
        pairs = tl.zeros([BT, BV], dtype=tl.float32)
    else:
        pairs = tl.zeros([BT, BT], dtype=tl.float32)
    for kb in range(0, NKB):
        cols = kb * BK + tl.arange(0, BK)
        km = cols < DK
        smask = sm[:, None] & km[None, :]
        soff = sbase + rows[:, None] * DK + cols[None, :]
        S0 = tl.load(ck_ptr + soff, mask=smask, other=0.0).to(tl.float32)
        dS = tl.load(dh_ptr + soff, mask=smask, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + base[:, None] * DK + cols[None, :], mask=tm[:, None] & km[None, :],
                    other=0.0).to(tl.float32)
        _, _, _, dv_k, db_k, dbL_k, pairs_k = _diag_bwd_keys(q, do, S0, dS, k_ptr, v_ptr, g_ptr, dq_ptr, dk_ptr,
                                                             dv_ptr, dg_ptr, base, tm, rows, cols, rm, km, tt, i_v, DK,
                                                             DV, SW, SE, TOKH, M, BT, BK, BV, DECAY, PREC, NKB == 1,
                                                             SPAN, es_ptr, SCALED_E, DIAG_STRADDLE)
        dv += dv_k
        if DECAY == 1 or DECAY == 2:
            db += db_k
            dbL += dbL_k
        if DECAY == 1 or DECAY == 2:
            pairs += pairs_k
    if NKB > 1:
        tl.store(dv_ptr + voff, dv, mask=vm)
    _diag_bwd_finish(db, dbL, pairs, dg_ptr, g_ptr, base, tm, rows, rm, tt, i_v, DV, TOKH, BT, DECAY)


@triton.jit
def _diag_chunk_keys(ix_ptr, cu_ptr, T, H, DK, NCK, DV, BT: tl.constexpr, BK: tl.constexpr, VARLEN: tl.constexpr):
    """The (chunk, key block) of a program of a grid (chunk-map rows × key blocks, 1, heads), chunk_diag_dqk_kernel's:
    its token lanes tt, mask tm and token·head offsets base, key columns cols and mask km, the offset of its state
    in ck / dh, the bound of the state rows it may read (0 for a padding program of the varlen map, which must not
    read ck / dh past their end), and its key block. A chunk's key blocks are adjacent program ids, so they run side
    by side and the second reads the chunk's dO and E (which every key block reads whole) from L2; with key blocks on
    an axis of their own they were ⌈T / C⌉·B programs apart (session 23's static count: 134 MB of such rereads per
    Mamba-2 fwd+bwd at (2, 8192, 16, 128)). Both on axis 0, whose 2³¹ − 1 programs bound no chunk map."""
    NK = tl.cdiv(DK, BK)
    kb = tl.program_id(0) % NK
    i_bh, i_h, c, start, eos = _delta_chunk(ix_ptr, cu_ptr, tl.program_id(0) // NK, tl.program_id(2), T, H, BT,
                                            VARLEN)
    tt = tl.arange(0, BT)
    tm, base = _tokens(start, tt, eos, H, i_h)
    cols = kb * BK + tl.arange(0, BK)
    return tt, tm, base, cols, cols < DK, (i_bh.to(tl.int64) * NCK + c) * DV * DK, tl.where(start < eos, DV, 0), kb


@triton.jit
def chunk_diag_dqk_kernel(q_ptr, k_ptr, v_ptr, g_ptr, do_ptr, ck_ptr, dh_ptr, cu_ptr, ix_ptr, dq_ptr, dk_ptr, dg_ptr,
                          T, H, DK, DV, NCK, TOKH, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          DECAY: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr = "ieee",
                          SPAN: tl.constexpr = FAST_SPAN, es_ptr=None, SCALED_E: tl.constexpr = False,
                          DIAG_STRADDLE: tl.constexpr = 1):
    """The split diagonal path's dQ, dW and ∂g for no, a scalar or a column decay and one input term, one program per
    (chunk, key block), from S₀ = ck and dS = dh (TRITON.md, "Split diagonal path"). What sums over value rows is
    summed here, one value block after another, so dQ and dW are stored whole:
        dQ = Γ ⊙ (dO S₀) + (P ⊙ D) W      dW = dec ⊙ (E dS) + (P ⊙ D)ᵀ Q      P = dO Eᵀ
        ∂b = rowsum(T) − colsum(T) + Γ ⊙ rowsum(dO S₀ ⊙ Q) − X  (+ ⟨dS, S_L⟩ at the chunk's last token)
    with T = (P ⊙ D) ⊙ Q Wᵀ, X = rowsum(W ⊙ dec ⊙ (E dS)), ⟨dS, S_L⟩ = Γ_L ⟨dS, S₀⟩ + ΣX; ∂g is ∂b's reverse cumsum,
    taken with T and X where they straddle each token (_scalar_decay_grad). That is rowsum(Q ⊙ dQ − W ⊙ dW)
    rearranged: the same sum taken that way cancels D's diagonal (1 however strong the decay) between two
    differently rounded products, which a Δ of 10³ multiplies into ∂A (off by 0.06 against 6.5e-7, tests). ∂g is
    this key block's share (slot i_k; the caller sums the ⌈d_k / BK⌉ slots, a scalar per
    token). A column decay (GLA) keeps key columns apart, so its ∂g is whole per block, formed as _diag_bwd_keys forms
    it (D per column: the factorised dots where the chunk's decay spans less than SPAN, else one token at a time)."""
    tt, tm, base, cols, km, sbase, srows, kb = _diag_chunk_keys(ix_ptr, cu_ptr, T, H, DK, NCK, DV, BT, BK, VARLEN)
    qk_m = tm[:, None] & km[None, :]
    dqs = tl.zeros([BT, BK], dtype=tl.float32)   # dO S₀
    dks = tl.zeros([BT, BK], dtype=tl.float32)   # E dS
    P = tl.zeros([BT, BT], dtype=tl.float32)     # dO Eᵀ
    # ⟨dS, S₀⟩ by key column, summed over value rows once after the loop: a sum across warps in it had cost 3 of the
    # loop's 6 barriers per value block (session 23's static count, sm_90)
    sds_rows = tl.zeros([BV, BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(DV, BV)):
        rows = i_v * BV + tl.arange(0, BV)
        rm = rows < DV
        vm = tm[:, None] & rm[None, :]
        smask = (rows < srows)[:, None] & km[None, :]
        soff = sbase + rows[:, None] * DK + cols[None, :]
        do = tl.load(do_ptr + base[:, None] * DV + rows[None, :], mask=vm, other=0.0).to(tl.float32)
        v = _value_side(v_ptr, 0, 0, base[:, None] * DV + rows[None, :], vm, es_ptr, base, tm, SCALED_E)
        S0 = tl.load(ck_ptr + soff, mask=smask, other=0.0).to(tl.float32)
        dS = tl.load(dh_ptr + soff, mask=smask, other=0.0).to(tl.float32)
        dqs += _mm(do, S0, PREC)
        dks += _mm(v, dS, PREC)
        P += _mm(do, tl.trans(v), PREC)
        sds_rows += dS * S0
    sds = tl.sum(sds_rows, axis=0)
    q = tl.load(q_ptr + base[:, None] * DK + cols[None, :], mask=qk_m, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + base[:, None] * DK + cols[None, :], mask=qk_m, other=0.0).to(tl.float32)
    if DECAY == 3:
        g = _log_decay(g_ptr, base[:, None] * DK + cols[None, :], qk_m)
        b = tl.cumsum(g, axis=0)
        bl = tl.sum(g, axis=0)
        P = tl.where(tt[:, None] >= tt[None, :], P, 0.0)
        fast = tl.min(bl, axis=0) > -SPAN
        dks = dks * tl.exp((bl[None, :] - b).to(tl.float32))
        X = k * dks
        dqi, dki, _, strad = _column_pair_products(P, q, k, b, bl, tt, fast, BT, BK, PREC, X=X, STRADDLE=DIAG_STRADDLE)
        dq = dqs * tl.exp(b.to(tl.float32))
        dk = dki + dks
        dg = _column_decay_grad(q * dq, q * dqi - k * dk, tl.exp(bl.to(tl.float32)) * sds, tl.sum(X, axis=0), strad,
                                fast, tt, BT, DIAG_STRADDLE)
        dq += dqi
        tl.store(dg_ptr + base[:, None] * DK + cols[None, :], _log_decay_grad(dg, g_ptr, base[:, None] * DK + cols[None, :],
                                                                               qk_m), mask=qk_m)
    else:
        D, _, gam, dec, gl = _chunk_decay(g_ptr, base, tm, BT, DECAY == 1)
        P = P * D
        dks = dks * dec[:, None]
        dq = dqs * gam[:, None] + _mm(P, k, PREC)
        dk = dks + _mm(tl.trans(P), q, PREC)
    tl.store(dq_ptr + base[:, None] * DK + cols[None, :], dq, mask=qk_m)
    tl.store(dk_ptr + base[:, None] * DK + cols[None, :], dk, mask=qk_m)
    if DECAY == 1:   # ∂g as the fused walk's: the pair terms summed where they straddle (_scalar_decay_grad)
        X = tl.sum(k * dks, axis=1)
        pairs = P * _mm(q, tl.trans(k), PREC) + tl.where((tt == BT - 1)[:, None], X[None, :], 0.0)
        _diag_bwd_finish(tl.sum(dqs * q, axis=1) * gam, gl * tl.sum(sds, axis=0), pairs, dg_ptr, g_ptr, base, tm,
                         cols, km, tt, kb, DV, TOKH, BT, DECAY)


@triton.jit
def chunk_diag_dv_kernel(q_ptr, k_ptr, g_ptr, do_ptr, dh_ptr, cu_ptr, ix_ptr, dv_ptr, T, H, DK, DV, NCK,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                         VARLEN: tl.constexpr, PREC: tl.constexpr = "ieee", SPAN: tl.constexpr = FAST_SPAN):
    """The split diagonal path's dE for no, a scalar or a column decay and one input term, one program per (chunk,
    value block), the key columns summed one block of BK after another: dE = (Q Wᵀ ⊙ D)ᵀ dO + dec ⊙ (W dSᵀ); a
    column decay's D and dec are per key column, so they enter each block's A = Q Wᵀ ⊙ D and (W ⊙ dec) dSᵀ."""
    i_v, i_h, tt, rows, tm, base, vm, sm, sbase, voff = _chunk_value_tile(ix_ptr, cu_ptr, T, H, DK, DV, NCK, BT, BV,
                                                                          VARLEN)
    A = tl.zeros([BT, BT], dtype=tl.float32)     # Q Wᵀ
    kdS = tl.zeros([BT, BV], dtype=tl.float32)   # W dSᵀ
    for i_k in range(0, tl.cdiv(DK, BK)):
        cols = i_k * BK + tl.arange(0, BK)
        km = cols < DK
        qk_m = tm[:, None] & km[None, :]
        q = tl.load(q_ptr + base[:, None] * DK + cols[None, :], mask=qk_m, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + base[:, None] * DK + cols[None, :], mask=qk_m, other=0.0).to(tl.float32)
        dS = tl.load(dh_ptr + sbase + rows[:, None] * DK + cols[None, :], mask=sm[:, None] & km[None, :],
                     other=0.0).to(tl.float32)
        if DECAY == 3:   # D and dec per key column: each block's share of A = Q Wᵀ ⊙ D and of (W ⊙ dec) dSᵀ
            g = _log_decay(g_ptr, base[:, None] * DK + cols[None, :], qk_m)
            b = tl.cumsum(g, axis=0)
            bl = tl.sum(g, axis=0)
            A += _column_scores(q, k, b, (b - 0.5 * bl[None, :]).to(tl.float32), tl.min(bl, axis=0) > -SPAN, tt,
                                BT, PREC)
            kdS += _mm(k * tl.exp((bl[None, :] - b).to(tl.float32)), tl.trans(dS), PREC)
        else:
            A += _mm(q, tl.trans(k), PREC)
            kdS += _mm(k, tl.trans(dS), PREC)
    do = tl.load(do_ptr + voff, mask=vm, other=0.0).to(tl.float32)
    if DECAY == 3:
        dv = _mm(tl.trans(A), do, PREC) + kdS
    else:
        D, _, _, dec, _ = _chunk_decay(g_ptr, base, tm, BT, DECAY == 1)
        dv = _mm(tl.trans(A * D), do, PREC) + kdS * dec[:, None]
    tl.store(dv_ptr + voff, dv, mask=vm)


def chunked_backward(plan, chunk_in, ck, do, dht, sizes, cu_seqlens=None):
    """∂ of (q, w [M,...], e [M,...], log decay) and ∂h0 for chunk_fwd_kernel (any decay kind it takes); with an
    input scale (input_scale), ∂ of the input in e's slot and of the scale (scaled_input_grads)."""
    chunk_in, es = input_scale(plan.rule.form, chunk_in)
    grads, dh0 = _chunked_backward(plan, chunk_in, ck, do, dht, sizes, cu_seqlens, es)
    return scaled_input_grads(chunk_in, es, grads), dh0


def _chunked_backward(plan, chunk_in, ck, do, dht, sizes, cu_seqlens, es):
    B, T, H, d_k, d_v, N, max_len, C = sizes
    BK, BV = _blocks(d_k, d_v)
    NV = -(-d_v // BV)
    q, k, v = chunk_in[:3]
    M = k.shape[0]
    decay = DECAY_CODE[plan.rule.form.decay_kind]
    g = chunk_in[3] if decay else q
    dev = q.device
    TOKH = B * T * H
    dh0 = torch.empty(N, H, d_v, d_k, dtype=torch.float32, device=dev)
    split = diag_path(plan.rule.form, d_k) == "split" and M == 1   # more input terms: the fused walk (the split kernels hold one)
    if split and decay != 2:   # a row decay's D is per value row: the older kernel, over value blocks
        return _diag_split_backward_whole(chunk_in, ck, do, dht, sizes, decay, cu_seqlens, dh0, es), dh0
    dq = written(NV, B, T, H, d_k, device=dev)
    dk = written(NV, M, B, T, H, d_k, device=dev)
    dv = written(M, B, T, H, d_v, device=dev)
    # row decay: each program owns its value rows, so its ∂g is whole (the first slot); other kinds: partial sums
    dg = written(1 if decay == 2 else NV, B, T, H, *((d_k,) if decay == 3 else (d_v,) if decay == 2 else ()),
                 device=dev)
    if split:
        _diag_split_backward(chunk_in, ck, do, dht, sizes, decay, cu_seqlens, dq, dk, dv, dg, dh0, es)
    else:
        chunk_bwd_kernel[(NV, N * H)](
            q, k, v, g, do.contiguous(), dht.contiguous() if dht is not None else dh0, ck,
            cu_seqlens if cu_seqlens is not None else dh0, dq, dk, dv, dg, dh0, dh0, T, H, d_k, d_v, ck.shape[2],
            k[0].numel(), v[0].numel(), TOKH, M=M, BT=C, BK=BK, BV=BV, DECAY=decay, USE_DHT=dht is not None,
            VARLEN=cu_seqlens is not None, PREC=_precision(do.dtype), SPAN=fast_span(), **_launch_opts(walk=True),
            **_scale_args(es), **_diag_straddle_arg(decay))
    out = [dq.sum(0), dk.sum(0), dv]
    if decay:
        out.append(dg.sum(0))
    return out, dh0


def _diag_dh(chunk_in, ck, do, dht, sizes, decay, cu_seqlens, dh0):
    """The split path's reverse pass: ∂L/∂S at the end of every chunk (chunk_bwd_kernel without GRADS) into a dh
    of ck's layout, fp32, and dh0; then the (ix, NTG, G) grid of the parallel gradient kernels and their common
    launch arguments."""
    B, T, H, d_k, d_v, N, max_len, C = sizes
    BKS, BVS = diag_state_blocks(d_k, d_v)
    q = chunk_in[0]
    g = chunk_in[3] if decay else q
    dh = written(*ck.shape, device=q.device)
    varlen = cu_seqlens is not None
    cu = cu_seqlens if varlen else dh0
    common = dict(BT=C, DECAY=decay, VARLEN=varlen, PREC=_precision(do.dtype), **_launch_opts())
    grid = _chunk_grid(cu_seqlens, C, T, N, B, H, dh0)
    factors = decay_factors(g, grid, cu, varlen, T, H, C) if decay == 1 else None
    chunk_bwd_kernel[(-(-d_v // BVS), -(-d_k // BKS), N * H)](
        q, q, q, g, do, dht.contiguous() if dht is not None else dh0, dh0, cu, dh0, dh0, dh0, dh0, dh0, dh, T, H, d_k,
        d_v, ck.shape[2], 0, 0, 0, M=1, BK=BKS, BV=BVS, USE_DHT=dht is not None, GRADS=False, KEY_BLOCKS=True,
        SPAN=fast_span(), **_kernel_launch(common, DIAG_DH_WARPS, DIAG_DH_STAGES), **_factor_args(factors))
    return dh, cu, grid, common


#: the split diagonal path's gradient kernels for no, a scalar or a column decay (chunk_diag_dqk_kernel: key columns
#: per program, value rows per step of its loop; chunk_diag_dv_kernel: value rows per program, key columns per step).
#: sm_90, Triton 3.9, tf32, bf16 inputs, 8 warps, chunk 64, blocks as key columns / value rows (regs / spills B per
#: thread; scalar decay): dqk 64 / 32 248 / 0 (64 / 64: 255 / 184, 32 / 64: 230 / 0, 128 / 64: 1392 B); dv 32 / 64
#: 164 / 0, a column decay 255 / 8 (64 / 64: 8 and 472 B; 64 / 32: 0 and 248 B, and each value block forms Q Wᵀ
#: again); at chunk 32 dqk spills 256 B and issues mma.sync only; 4 warps spill 0.7-1.5 KB. The fused walk's backward
#: spills 3.2 KB at chunk 64, 1 KB at 32 (RESULTS.md, session 15)
DIAG_DQK_BLOCK_K = 64
DIAG_DQK_BLOCK_V = 32
DIAG_DV_BLOCK_V = 64
DIAG_DV_BLOCK_K = 32


def _diag_split_backward_whole(chunk_in, ck, do, dht, sizes, decay, cu_seqlens, dh0, es=None):
    """DIAG_PATH = "split", no, a scalar or a column decay, one input term: the reverse pass (_diag_dh), then dQ, dW,
    ∂g parallel over (chunk, key block) and dE over (chunk, value block), each summing over the other side in a loop,
    so that no gradient is a partial sum over value blocks (the fused walk stores ⌈d_v / 32⌉ of dQ and dW for the
    caller to add: 1.3 GB of torch traffic per Mamba-2 fwd+bwd at (2, 8192, 16, 128)). [dq, dk, dv(, dg)]: a
    scalar decay's ∂g summed over the key blocks' slots, a column decay's whole per key column."""
    B, T, H, d_k, d_v, N, max_len, C = sizes
    q, k, v = chunk_in[:3]
    g = chunk_in[3] if decay else q
    do = do.contiguous()
    dh, cu, (ix, NTG, G), common = _diag_dh(chunk_in, ck, do, dht, sizes, decay, cu_seqlens, dh0)
    BKQ = min(max(16, _np2(d_k)), _block("DIAG_DQK_BLOCK_K"))
    NK = -(-d_k // BKQ)
    dev = q.device
    dq = written(B, T, H, d_k, device=dev)
    dk = written(1, B, T, H, d_k, device=dev)
    dv = written(1, B, T, H, d_v, device=dev)
    dg = written(B, T, H, d_k, device=dev) if decay == 3 else written(NK, B, T, H, device=dev) if decay else dh0
    common = dict(common, SPAN=fast_span())
    chunk_diag_dqk_kernel[(NTG * NK, 1, G)](
        q, k, v, g, do, ck, dh, cu, ix, dq, dk, dg, T, H, d_k, d_v, ck.shape[2], B * T * H, BK=BKQ,
        BV=min(max(16, _np2(d_v)), _block("DIAG_DQK_BLOCK_V")),
        **_kernel_launch(common, DIAG_DQK_WARPS, DIAG_DQK_STAGES),
        **_scale_args(es), **_diag_straddle_arg(decay))
    BVD = min(max(16, _np2(d_v)), _block("DIAG_DV_BLOCK_V"))
    chunk_diag_dv_kernel[(NTG, -(-d_v // BVD), G)](q, k, g, do, dh, cu, ix, dv, T, H, d_k, d_v, ck.shape[2],
                                                   BK=min(max(16, _np2(d_k)), _block("DIAG_DV_BLOCK_K")),
                                                   BV=BVD,
                                                   **_kernel_launch(common, DIAG_DV_WARPS, DIAG_DV_STAGES))
    if decay == 1:   # the key blocks' slots
        dg = dg[0] if NK == 1 else dg.sum(0)
    return [dq, dk, dv] + ([dg] if decay else [])


def _diag_split_backward(chunk_in, ck, do, dht, sizes, decay, cu_seqlens, dq, dk, dv, dg, dh0, es=None):
    """DIAG_PATH = "split", row decays: the reverse pass (_diag_dh), then every gradient (chunk_diag_bwd_kernel)
    into chunked_backward's buffers (partial sums over value blocks: a row decay's D is per value row)."""
    B, T, H, d_k, d_v, N, max_len, C = sizes
    BK, BV = _blocks(d_k, d_v)
    q, k, v = chunk_in[:3]
    g = chunk_in[3] if decay else q
    do = do.contiguous()
    dh, cu, (ix, NTG, G), common = _diag_dh(chunk_in, ck, do, dht, sizes, decay, cu_seqlens, dh0)
    NCK = ck.shape[2]
    common = dict(common, BV=BV, SPAN=fast_span())
    BKB = min(BK, _block("DIAG_BWD_BLOCK_K"))
    chunk_diag_bwd_kernel[(NTG, -(-d_v // BV), G)](q, k, v, g, do, ck, dh, cu, ix, dq, dk, dv, dg, T, H, d_k, d_v,
                                                   NCK, k[0].numel(), v[0].numel(), B * T * H, M=k.shape[0], BK=BKB,
                                                   NKB=BK // BKB, **common, **_scale_args(es), **_diag_straddle_arg(decay))
