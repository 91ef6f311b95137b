"""The Triton scan as `torch.library` custom ops, so that `torch.compile` sees one opaque op per scan.

    olssm::triton_scan_fwd(key, syms, E, chunk_in, h0, cu_seqlens, sizes, out_dtype, save, chunked, chunk_bwd,
                           ck_dtype)
        -> (o [B, T, H, d_v], final state [N, H, d_v, d_k] fp32, checkpoints [N, H, NCK, d_v, d_k] fp32
            (chunked: ck_dtype, None = fp32; chunked.CHECKPOINT_STORAGE = "input" makes it bf16 / fp16),
            aux: T_c and W̃ of every chunk, flat fp32, when the chunked delta backward reads them, else empty)
    olssm::triton_scan_bwd(key, syms, E, h0, cu_seqlens, ck, do, dht, sizes, has_dht)
        -> [∂E..., ∂raw (in-kernel entries' inputs)..., ∂h0]

A rule is not a tensor, so the ops take a *rule key* (a string: a hash of the normal form and its
input specs) and look the Plan up in `_REGISTRY` (filled by `register`); the variable set of
inputs of different rules travels as lists of tensors in the plan's symbol order:

- ``syms``: the raw inputs (tokens and parameters), what the forward kernel reads;
- ``E``: the evaluated normal-form entries ([B·T, H, RV, CK] per-token, [H, RV, CK] parameter-only),
  computed by torch *outside* the op (so autograd/AOT differentiate the entry expressions) and
  read only by the backward kernel; empty when no gradient is needed;
- ``chunk_in``: the chunked kernel's evaluated coefficients (see chunked.py); empty for the
  fused recurrent kernel.

The backward of the forward op (``register_autograd``) calls the backward op and returns ∂E
(torch chains it to the raw inputs through the traced entry expressions), ∂syms for the raw
inputs of in-kernel (elementwise) entries, and ∂h0. Both ops have fake (meta) implementations:
the checkpoint count NCK comes from ``sizes`` (computed on the host before the op).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from typing import Optional

import torch
from torch import Tensor

from ...objectives.core import ELEMENTWISE, ROW, spec_of
from ..recurrent import first_derivative_only
from . import codegen as cg
from . import scan as _scan   # read at call time: BLOCK_V / NUM_WARPS are knobs

_REGISTRY: dict = {}


def register(plan) -> str:
    """The key of a plan (and remember it): sha256 of the normal form and its input specs."""
    key = getattr(plan, "_op_key", None)
    if key is None:
        ident = repr((_scan.form_key(plan.rule.form), tuple(spec_of(s) for s in plan.syms)))
        key = hashlib.sha256(ident.encode()).hexdigest()[:32]
        plan._op_key = key
    _REGISTRY.setdefault(key, plan)
    return key


def _plan(key: str):
    try:
        return _REGISTRY[key]
    except KeyError:
        raise RuntimeError(f"olssm triton op: unknown rule key {key!r} (register the plan first: "
                           "olssm.kernels.triton.library.register)") from None


# sizes = [B, T, H, d_k, d_v, N, max_len, C(, BT, BV, NW)]: the launch geometry of the non-chunked kernels,
# optional trailing entries, 0 = the default: BT > 0 selects the block-parallel scan kernels pfwd/pbwd
# with BT tokens per block (then C = BT, a checkpoint per block); BV value rows and NW warps per program
# (the autotuner's choices travel here, so the backward op launches what the forward was tuned with)
def _nck(sizes):
    return max(1, -(-sizes[6] // sizes[7]))


def _launch(sizes) -> tuple[int, int, int]:
    """(BT, BV, NW) of sizes' optional trailing entries (0: default)."""
    BT, BV, NW = (list(sizes[8:11]) + [0, 0, 0])[:3]
    return int(BT), int(BV), int(NW)


#: value rows per program of the token loop's backward when the rule has in-kernel (elementwise) entries
#: and no BV was chosen (BLOCK_V / the autotuner): their reverse mode holds ~15 [BV, BK] tiles. sm_90,
#: d_k = 64, 4 warps (aot_check): Mamba's bwd spills 824 B/thread at BV 32, 8 B at 16, none at 8 (Longhorn-
#: diag 896 / 24 / 0); the forward keeps its BV (the checkpoints do not depend on it)
INKERNEL_BWD_BLOCK_V = 16


def _geometry(d_k: int, d_v: int, sizes, backward: bool = False, inkernel: bool = False):
    """(BT, BK, BV, num_warps) of the loop (BT = 0) or block-scan kernels for this call."""
    from .scan import BLOCK_V, _blocks
    BT, BV, NW = _launch(sizes)
    if BT:
        BK, bv = pscan_blocks(d_k, d_v, BT, backward)
        return BT, BK, BV or bv, NW or PSCAN_NUM_WARPS
    BK, bv = _blocks(d_k, d_v)
    if backward and inkernel and not BLOCK_V:
        bv = min(bv, INKERNEL_BWD_BLOCK_V)
    return 0, BK, BV or bv, NW or _scan.loop_warps(BK)


#: the block-parallel scan (pscan.py) for rules without corrections on the non-chunked path:
#: "auto" uses it for elementwise decays (Mamba, Longhorn-diagonal: no chunked form; mamba_ssm's
#: kernel is a block scan too) when the longest sequence has > PSCAN_BLOCK_T tokens; True for every
#: rule without corrections; False never. OLSSM_TRITON_PSCAN=auto|1|0 overrides "auto".
#: Never timed on a GPU: benchmarks/triton_kernels.py --pscan both times it against the loop kernel.
PARALLEL_SCAN = "auto"
#: tokens per block of the block-parallel scan (also its checkpoint interval)
PSCAN_BLOCK_T = 16
#: fp32 elements of one [BT, BV, BK] tile of the forward / the backward: BV = TILE // (BT·BK) rounded
#: down to a power of two (≥ 1, ≤ next_pow2(d_v)); PSCAN_BLOCK_V overrides BV. The two grids are
#: independent (the checkpoints are [N, H, NCK, d_v, d_k] whatever BV). sm_90 report (aot_check, 4 warps):
#: pfwd at 4096 holds ≤ 255 registers without spills; pbwd (~10 live tiles) spilled 0.3–1.4 KB/thread at
#: 4096 and ≤ 144 B at 2048
PSCAN_TILE = 4096
PSCAN_BWD_TILE = 2048
PSCAN_BLOCK_V = None
PSCAN_NUM_WARPS = 4


def pscan_blocks(d_k: int, d_v: int, BT: int, backward: bool = False):
    """(BK, BV) of the block-parallel scan: one [BT, BV, BK] fp32 tile ≈ PSCAN_TILE (PSCAN_BWD_TILE) elements."""
    from .scan import _np2
    BK = _np2(d_k)
    if PSCAN_BLOCK_V:
        return BK, int(PSCAN_BLOCK_V)
    bv = max(1, (PSCAN_BWD_TILE if backward else PSCAN_TILE) // (BT * BK))
    bv = 1 << (bv.bit_length() - 1)
    return BK, max(1, min(bv, _np2(d_v)))


def _pscan_mode():
    mode = PARALLEL_SCAN
    if mode == "auto":
        mode = os.environ.get("OLSSM_TRITON_PSCAN") or "auto"
    mode = {"1": True, "0": False, "true": True, "false": False}.get(str(mode).lower(), mode)
    if mode not in (True, False, "auto"):
        raise ValueError(f"triton: PARALLEL_SCAN must be 'auto', True or False, got {mode!r}")
    return mode


def _pscan_choice(plan, max_len: int) -> int:
    """BT of the block-parallel scan for this call, or 0 for the loop kernel (non-chunked path)."""
    if plan.rule.form.corrections:
        return 0
    mode = _pscan_mode()
    BT = int(PSCAN_BLOCK_T)
    if mode == "auto":
        return BT if plan.rule.form.decay_kind == ELEMENTWISE and max_len > BT else 0
    return BT if mode else 0


@torch.library.custom_op("olssm::triton_scan_fwd", mutates_args=())
def triton_scan_fwd(key: str, syms: list[Tensor], E: list[Tensor], chunk_in: list[Tensor], h0: Optional[Tensor],
                    cu_seqlens: Optional[Tensor], sizes: list[int], out_dtype: torch.dtype, save: bool,
                    chunked: bool, chunk_bwd: bool, ck_dtype: Optional[torch.dtype]
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """o, the final state, the checkpoints (the state entering every chunk / checkpoint interval) and aux:
    T_c and W̃ of every chunk, flat, when the chunked delta backward will read them (chunked.saves_chunk_core;
    else empty)."""
    plan = _plan(key)
    B, T, H, d_k, d_v, N, max_len, C = sizes[:8]
    dev = syms[0].device
    o = torch.empty(B, T, H, d_v, dtype=out_dtype, device=dev)
    ht = torch.empty(N, H, d_v, d_k, dtype=torch.float32, device=dev)
    NCK = _nck(sizes)
    ckdt = _ck_dtype(ck_dtype, chunked)
    # varlen: a sequence shorter than the longest never writes its trailing checkpoint slots; zeros, so that the
    # op's outputs are a function of its inputs (opcheck, torch.compile's AOT dispatch compare them)
    alloc = torch.zeros if cu_seqlens is not None else torch.empty
    ck = alloc(N, H, NCK, d_v, d_k, dtype=ckdt, device=dev) if save else torch.empty(0, dtype=ckdt, device=dev)
    aux = torch.empty(_aux_numel(plan, sizes, save, chunked, chunk_bwd, out_dtype), dtype=torch.float32, device=dev)
    if chunked:
        from .chunked import chunked_forward, saved_chunk_core
        with _diag_path(sizes), _fits_on_chip(sizes, "forward"):
            chunked_forward(plan, chunk_in, h0, o, ht, ck, sizes[:8], save, cu_seqlens,
                            saved_chunk_core(plan.rule.form, aux, sizes))
        return o, ht, ck, aux
    BT, BK, BV, warps = _geometry(d_k, d_v, sizes)
    if BT:   # the block-parallel scan (pscan.py): checkpoints every C = BT tokens
        kernel, blk = plan.module.pfwd_kernel, dict(BT=BT)
    else:
        kernel, blk = plan.module.fwd_kernel, dict(C=C)
    NV = -(-d_v // BV)
    dummy = ht
    kernel[(NV, N * H)](
        *[x.contiguous() for x in syms], o, h0.contiguous() if h0 is not None else dummy, ht,
        ck if save else dummy, cu_seqlens if cu_seqlens is not None else dummy, T, H, d_k, d_v, NCK,
        BK=BK, BV=BV, **blk, USE_H0=h0 is not None, STORE_HT=True, SAVE_CK=save, VARLEN=cu_seqlens is not None,
        num_warps=warps)
    return o, ht, ck, aux


def _aux_numel(plan, sizes, save, chunked, chunk_bwd, out_dtype) -> int:
    from .chunked import chunk_core_numel, saves_chunk_core
    return chunk_core_numel(plan.rule.form, sizes, out_dtype) if saves_chunk_core(plan, chunked, save, chunk_bwd) else 0


@triton_scan_fwd.register_fake
def _(key, syms, E, chunk_in, h0, cu_seqlens, sizes, out_dtype, save, chunked, chunk_bwd, ck_dtype):
    B, T, H, d_k, d_v, N, max_len, C = sizes[:8]
    x = syms[0]
    o = x.new_empty(B, T, H, d_v, dtype=out_dtype)
    ht = x.new_empty(N, H, d_v, d_k, dtype=torch.float32)
    ckdt = _ck_dtype(ck_dtype, chunked)
    ck = x.new_empty(N, H, _nck(sizes), d_v, d_k, dtype=ckdt) if save else x.new_empty(0, dtype=ckdt)
    aux = x.new_empty(_aux_numel(_plan(key), sizes, save, chunked, chunk_bwd, out_dtype), dtype=torch.float32)
    return o, ht, ck, aux


def _ck_dtype(ck_dtype, chunked: bool) -> torch.dtype:
    """The checkpoints' dtype: ck_dtype (None: fp32) on the chunked path; the recurrent and block-scan kernels
    keep fp32 checkpoints."""
    if ck_dtype is None or ck_dtype == torch.float32:
        return torch.float32
    if not chunked:
        raise ValueError(f"olssm triton scan: checkpoints in {ck_dtype} are for the chunked kernels only")
    if ck_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"olssm triton scan: checkpoint dtype must be fp32, bf16 or fp16, got {ck_dtype}")
    return ck_dtype


def _entry_shapes(plan, sizes):
    """Shapes of the E tensors and of the raw-input gradients, in order."""
    B, T, H, d_k, d_v, N = sizes[:6]
    out = []
    for n in plan.vars:
        kind = plan.kind[n]
        RV = d_v if cg.HAS_ROWS[kind] else 1
        CK = d_k if cg.HAS_COLS[kind] else 1
        out.append((B * T, H, RV, CK) if plan.cls[n] == "token" else (H, RV, CK))
    return out


@torch.library.custom_op("olssm::triton_scan_bwd", mutates_args=())
def triton_scan_bwd(key: str, syms: list[Tensor], E: list[Tensor], h0: Optional[Tensor], cu_seqlens: Optional[Tensor],
                    ck: Tensor, do: Tensor, dht: Optional[Tensor], sizes: list[int]) -> list[Tensor]:
    plan = _plan(key)
    B, T, H, d_k, d_v, N, max_len, C = sizes[:8]
    dev = ck.device
    BT, BK, BV, warps = _geometry(d_k, d_v, sizes, backward=True, inkernel=bool(plan.inkernel))
    NV = -(-d_v // BV)
    NCK = ck.shape[2]
    TOK = B * T
    D = []
    for n, shp in zip(plan.vars, _entry_shapes(plan, sizes)):
        P = 1 if cg.HAS_ROWS[plan.kind[n]] else NV
        D.append(torch.zeros(P, *(shp if plan.cls[n] == "token" else (N, *shp)), dtype=torch.float32, device=dev))
    names = [s.name for s in plan.syms]
    specs = plan.rule.inputs
    X, RG = [], []
    for x in plan.raw:
        sx = specs[x]
        RV = d_v if cg.HAS_ROWS[sx.kind] else 1
        CK = d_k if cg.HAS_COLS[sx.kind] else 1
        P = 1 if cg.HAS_ROWS[sx.kind] else NV
        X.append(syms[names.index(x)].contiguous())
        RG.append(torch.zeros(P, N if sx.is_parameter else TOK, H, RV, CK, dtype=torch.float32, device=dev))
    dh0 = torch.empty(N, H, d_v, d_k, dtype=torch.float32, device=dev)
    common = (do.contiguous(), dht.contiguous() if dht is not None else dh0, dh0, ck)
    flags = dict(USE_DHT=dht is not None, VARLEN=cu_seqlens is not None)
    cu = cu_seqlens if cu_seqlens is not None else dh0
    if BT:   # the block-parallel scan's adjoint (pscan.py): no scratch, checkpoints every BT tokens
        plan.module.pbwd_kernel[(NV, N * H)](
            *[e.contiguous() for e in E], *X, *D, *RG, *common, cu, T, TOK, N, H, d_k, d_v, NCK,
            BK=BK, BV=BV, BT=BT, **flags, num_warps=warps)
    else:
        scratch = torch.empty(N * H * NV * C * BV * BK, dtype=torch.float32, device=dev)
        plan.module.bwd_kernel[(NV, N * H)](
            *[e.contiguous() for e in E], *X, *D, *RG, *common, scratch, cu, T, TOK, N, H, d_k, d_v, NCK,
            BK=BK, BV=BV, C=C, **flags, num_warps=warps)
    out = []
    for n, d in zip(plan.vars, D):
        g = d.sum(0)
        out.append(g.sum(0) if plan.cls[n] == "param" else g)
    for x, rg in zip(plan.raw, RG):
        i = names.index(x)
        g = rg.sum(0)
        out.append((g.sum(0) if specs[x].is_parameter else g).reshape(syms[i].shape).to(syms[i].dtype))
    out.append(dh0)
    return out


@triton_scan_bwd.register_fake
def _(key, syms, E, h0, cu_seqlens, ck, do, dht, sizes):
    plan = _plan(key)
    names = [s.name for s in plan.syms]
    x = ck
    out = [x.new_empty(shp, dtype=torch.float32) for shp in _entry_shapes(plan, sizes)]
    for r in plan.raw:
        s = syms[names.index(r)]
        out.append(s.new_empty(s.shape))
    B, T, H, d_k, d_v, N = sizes[:6]
    out.append(x.new_empty(N, H, d_v, d_k, dtype=torch.float32))
    return out


@torch.library.custom_op("olssm::triton_chunk_bwd", mutates_args=())
def triton_chunk_bwd(key: str, chunk_in: list[Tensor], ck: Tensor, aux: Tensor, do: Tensor, dht: Optional[Tensor],
                     cu_seqlens: Optional[Tensor], sizes: list[int]) -> list[Tensor]:
    """Chunked backward: [∂q, ∂w, ∂e, (∂ log decay), ∂h0] (chunked.chunk_bwd_kernel), with a correction
    [∂q, ∂w, ∂e, ∂ log decay, ∂a, ∂b, ∂c, ∂h0] (chunked_delta_bwd; c scalar or per value row). The kernels
    accumulate in fp32; each gradient is returned in its chunk tensor's dtype (bf16 / fp16 under
    chunked.CHUNK_STORAGE = "input": autograd would cast it to that dtype anyway), ∂h0 in fp32. Where chunk_in holds
    chunk_inputs' same-key placeholders for w and a (chunked.shared_key_inputs), ∂b is the shared key's whole
    gradient dA + dB + dW_0 and their slots get placeholders back (empty, as the fake's x.new_empty(x.shape))."""
    plan = _plan(key)
    from .chunked import saved_chunk_core
    core = saved_chunk_core(plan.rule.form, aux, sizes)
    if plan.rule.form.corrections:
        from . import chunked_delta_bwd
        with _fits_on_chip(sizes, "backward"):
            grads, dh0 = chunked_delta_bwd.chunked_delta_backward(plan, chunk_in, ck, do, dht, sizes[:8], cu_seqlens,
                                                                  core)
    else:
        from . import chunked
        with _diag_path(sizes), _fits_on_chip(sizes, "backward"):
            grads, dh0 = chunked.chunked_backward(plan, chunk_in, ck, do, dht, sizes[:8], cu_seqlens)
    return [*(x.new_empty(x.shape) if g is None else g.to(x.dtype) for g, x in zip(grads, chunk_in)), dh0]


@triton_chunk_bwd.register_fake
def _(key, chunk_in, ck, aux, do, dht, cu_seqlens, sizes):
    B, T, H, d_k, d_v, N = sizes[:6]
    return [x.new_empty(x.shape) for x in chunk_in] + \
        [ck.new_empty(N, H, d_v, d_k, dtype=torch.float32)]


def _setup(ctx, inputs, output):
    key, syms, E, chunk_in, h0, cu_seqlens, sizes, out_dtype, save, chunked, chunk_bwd, ck_dtype = inputs
    o, ht, ck, aux = output
    ctx.key, ctx.sizes, ctx.save, ctx.chunk_bwd = key, list(sizes), save, chunk_bwd
    ctx.n_syms, ctx.n_E, ctx.n_chunk = len(syms), len(E), len(chunk_in)
    ctx.has_h0, ctx.has_cu = h0 is not None, cu_seqlens is not None
    ctx.out_dtypes = [s.dtype for s in syms]
    ctx.save_for_backward(ck, aux, *syms, *E, *(chunk_in if ctx.chunk_bwd else []), *([h0] if h0 is not None else []),
                          *([cu_seqlens] if cu_seqlens is not None else []))
    # unused outputs' gradients come as None rather than zeros: ck and aux are never differentiated, and their
    # zeros were most of the backward's fills (DeltaNet at (2, 8192, 16, 128): 0.54 GB for ck alone per call)
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dht, dck, daux):
    first_derivative_only("triton scan", by="backend='triton'")
    if not ctx.save:
        raise RuntimeError("olssm triton scan: no checkpoints were saved (the forward ran with save=False, "
                           "i.e. without any input requiring grad)")
    ck, aux, *rest = ctx.saved_tensors
    syms = rest[:ctx.n_syms]
    E = rest[ctx.n_syms:ctx.n_syms + ctx.n_E]
    i = ctx.n_syms + ctx.n_E
    chunk_in = rest[i:i + ctx.n_chunk] if ctx.chunk_bwd else []
    i += len(chunk_in)
    h0 = rest[i] if ctx.has_h0 else None
    cu = rest[i + ctx.has_h0] if ctx.has_cu else None
    B, T, H, d_k, d_v = ctx.sizes[:5]
    if do is None:
        do = torch.zeros(B, T, H, d_v, dtype=torch.float32, device=ck.device)
    if ctx.chunk_bwd:
        grads = triton_chunk_bwd(ctx.key, list(chunk_in), ck, aux, do, dht, cu, ctx.sizes)
        dh0 = grads[-1]
        return (None, [None] * ctx.n_syms, [None] * ctx.n_E, list(grads[:-1]), dh0.to(h0.dtype) if ctx.has_h0 else None,
                None, None, None, None, None, None, None)
    plan = _plan(ctx.key)
    if ctx.n_E != len(plan.vars):
        raise RuntimeError("olssm triton scan: the entries E were not passed to the forward op, so no gradient")
    grads = triton_scan_bwd(ctx.key, list(syms), list(E), h0, cu, ck, do, dht, ctx.sizes)
    nE = len(plan.vars)
    dE = grads[:nE]
    draw = dict(zip(plan.raw, grads[nE:nE + len(plan.raw)]))
    dh0 = grads[-1]
    names = [s.name for s in plan.syms]
    dsyms = [draw.get(n) for n in names]
    return (None, dsyms, list(dE), [None] * ctx.n_chunk, dh0.to(h0.dtype) if ctx.has_h0 else None, None, None, None,
            None, None, None, None)


torch.library.register_autograd("olssm::triton_scan_fwd", _backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------
# host side: evaluate the entries (differentiable torch), pick the kernel, call the op

def evaluate_entries(plan, ins: dict, sizes) -> list:
    """The normal-form entries the backward kernel reads, as contiguous fp32 tensors
    ([B·T, H, RV, CK] per-token, [H, RV, CK] parameter-only), differentiable w.r.t. ins."""
    B, T, H, d_k, d_v = sizes[:5]
    lay = plan.rule.broadcast_inputs(d_k, d_v, ins, "scan", need=plan.rule.inputs)
    vals = plan.eval_entries(lay)
    E = []
    for n, val, shp in zip(plan.vars, vals, _entry_shapes(plan, sizes)):
        val = torch.as_tensor(val, dtype=torch.float32, device=lay[next(iter(lay))].device).to(torch.float32)
        if plan.cls[n] == "token":
            val = torch.broadcast_to(val, (B, T, *shp[1:])).reshape(shp)
        else:
            val = torch.broadcast_to(val, shp)
        E.append(val.contiguous())
    return E


#: force the kernel family: "chunk" (raises where unsupported), "prefer-chunk" (chunked wherever
#: supported, any T) or "recurrent"; None: chunked when supported and the longest sequence has
#: >= 2·CHUNK tokens (2·chunk_size where the caller gave one). The environment variable OLSSM_TRITON_KERNEL does
#: the same.
FORCE = None
#: tokens per chunk of the chunked kernels (also the backward's checkpoint interval on that path)
CHUNK = 32
#: the longest chunk a caller may ask for (scan's chunk_size): at 128 tokens the sm_90 compile of the fused walks
#: at d = 64 spills 0.8-3.9 KB per thread and asks for up to 288 KB of shared memory, more than an H100 gives a
#: block (227 KB: aot_check marks them OVER)
MAX_CHUNK = 64
#: tokens per chunk where the wide-key settings apply (chunked.wide: the delta path with scalar c and none / scalar
#: decay at d_k > 64; with 2 pipeline stages, and bf16 dot operands for bf16 inputs without a decay), and on the split
#: diagonal path at d_k > 64 (chunked.wide_diag). None: CHUNK everywhere (the stages and operands stay:
#: chunked.WIDE_KEYS = None turns those off)
WIDE_CHUNK = 64


def check_chunk_size(C) -> None:
    """A caller's chunk_size (scan's; None: the policy's) as the chunked kernels can run it: a power of two (the
    chunk's token lanes are one tl.arange), at most MAX_CHUNK, and at least 16 when compiled (tl.dot's smallest
    dimension; the interpreter has no such limit). Checked for every triton call, chunked or not, so that a size
    does not become an error only on the inputs where the chunked kernels take over."""
    if C is None:
        return
    if C & (C - 1) or C > MAX_CHUNK or (C < 16 and not _scan.interpreted()):
        low = 16 if not _scan.interpreted() else 1
        raise ValueError(f"scan: backend='triton' runs chunks of a power of two from {low} to {MAX_CHUNK} tokens "
                         f"(sub-tokens for rank-R rules{'' if low > 1 else '; from 16 when compiled'}), got "
                         f"chunk_size={C}")


def chunk_size(plan, d_k: int, delta_forward: str = "", diag_path: str = "") -> int:
    """Tokens per chunk for this rule and head size (before the sub-token split of rank-R rules). WIDE_CHUNK on the
    wide-key path where the delta forward is the split one (delta_forward, "" for chunked.DELTA_FORWARD): the fused
    forward was never timed at chunk 64 and spills ~1.7 KB/thread there at d_k = 128 (sm_90 compile); and on the
    split diagonal path at d_k > 64 (diag_path, "" for chunked.DIAG_PATH; chunked.wide_diag)."""
    from .chunked import _delta_forward, wide, wide_diag
    split = (delta_forward or _delta_forward()) == "split"
    form = plan.rule.form
    C = WIDE_CHUNK if WIDE_CHUNK and (split and wide(form, d_k) or wide_diag(form, d_k, diag_path)) else CHUNK
    # tl.dot needs every dimension >= 16 when compiled (the interpreter has no such limit)
    return C if _scan.interpreted() else max(16, C)


#: the chunked backward kernels (none / scalar / row / column decay without corrections; the delta family with
#: scalar or row c and none / scalar / row decay, see chunked_delta_bwd.DELTA_BACKWARD / ROW_C_BACKWARD): "auto" uses them
#: when the rule has no decay or its log decay has a closed form (Mamba-2: Δ·a), so that the chain
#: rule never divides by Λ (∂Λ = ∂logΛ / Λ loses ~eps/Λ relative accuracy: 1e-3 at Λ = 1e-4);
#: True: whenever the structure allows; False: always the recurrent backward on the chunked
#: forward's checkpoints. OLSSM_TRITON_CHUNK_BWD=auto|1|0 overrides.
CHUNK_BACKWARD = "auto"


def chunk_backward_mode():
    """CHUNK_BACKWARD, or OLSSM_TRITON_CHUNK_BWD: "auto", True or False."""
    mode = os.environ.get("OLSSM_TRITON_CHUNK_BWD") or CHUNK_BACKWARD
    mode = {"1": True, "0": False, "true": True, "false": False}.get(str(mode).lower(), mode)
    if mode not in (True, False, "auto"):
        raise ValueError(f"triton: CHUNK_BACKWARD must be 'auto', True or False, got {mode!r}")
    return mode


def _choice(plan, args, max_len):
    force = FORCE or os.environ.get("OLSSM_TRITON_KERNEL") or None
    if force not in (None, "chunk", "recurrent", "prefer-chunk"):
        raise ValueError(f"triton: kernel must be 'chunk', 'prefer-chunk' or 'recurrent', got {force!r}")
    if force == "recurrent":
        return False, None
    from .chunked import unsupported
    why = unsupported(plan, args)
    if force == "chunk":
        if why:
            raise NotImplementedError(f"triton: no chunked kernel for this rule: {why} (structure: {plan.rule.structure})")
        return True, None
    if force == "prefer-chunk":   # chunked whenever the structure allows, at any length (testing)
        return why is None, None
    # two chunks at least: the caller's (scan's chunk_size) where it gave one
    return (why is None and max_len >= 2 * (args.chunk_size or CHUNK) and _chunk_pays(plan, args)), None


def _chunk_pays(plan, args) -> bool:
    """Where the compiled chunked kernels were measured slower than the recurrent one, auto keeps the recurrent
    kernel (benchmarks/RESULTS.md):
    - fp32 inputs: "ieee" dots are FMA loops that spill (H100: DeltaNet chunk fwd 22.8 ms vs 3.5 recurrent);
    - row decays: untimed since their factorised fast path was built (the H100's loop over the chunk's
      tokens had lost). Column decays (GLA) were timed on an H200 in session 7: chunked 0.45 / 2.13 ms fwd /
      fwd+bwd against the recurrent kernel's 3.09 / 10.23, so they now take the chunked kernels.
    The interpreter keeps the structural rule (it exercises the chunked kernels in tests)."""
    if _scan.interpreted():
        return True
    from .chunked import _precision
    if _precision(args.out_dtype) == "ieee":
        return False
    return plan.rule.form.decay_kind != ROW


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How one scan runs: what the speed policy (`policy_config`) or the autotuner (autotune.py) picks.
    Every config computes the same thing (the tests hold each kernel to the reference); they differ in speed."""
    kernel: str                             # "recurrent" (token loop), "pscan" (block-parallel scan), "chunk"
    block_v: int = 0                        # value rows per program of the loop / block-scan kernels (0: default)
    warps: int = 0                          # warps per program of those kernels (0: default)
    delta_forward: str = ""                 # chunked delta family: "split" / "fused" ("": chunked.DELTA_FORWARD)
    diag_path: str = ""                     # chunked diagonal family: "split" / "fused" ("": chunked.DIAG_PATH)
    chunk_backward: Optional[bool] = None   # chunked: the chunked backward where "auto" allows it (None: CHUNK_BACKWARD)
    chunk: int = 0                          # chunked: tokens per chunk (0: chunk_size's policy)


def policy_config(plan, args, max_len: int) -> LaunchConfig:
    """The measured-speed policy (FORCE, _chunk_pays, PARALLEL_SCAN) as a LaunchConfig."""
    chunked, _ = _choice(plan, args, max_len)
    if chunked:
        return LaunchConfig("chunk", chunk=args.chunk_size or 0)
    return LaunchConfig("pscan" if _pscan_choice(plan, max_len) else "recurrent")


def forced() -> bool:
    """Whether a kernel family is forced (FORCE / OLSSM_TRITON_KERNEL, or PARALLEL_SCAN / OLSSM_TRITON_PSCAN
    switched on or off): the autotuner then leaves the choice to them."""
    return bool(FORCE or os.environ.get("OLSSM_TRITON_KERNEL")) or _pscan_mode() in (True, False)


#: a chunked call's sizes[8], where a launch configuration picks the diagonal family's path: 1 + its index here
_DIAG_PATHS = ("fused", "split")


@contextlib.contextmanager
def _fits_on_chip(sizes, what: str):
    """Triton's OutOfResources from a chunked launch as a ValueError naming the chunk and the head sizes. The policy's
    chunks fit (aot_check, the compiled tests); a caller's chunk_size of 64 at d_k > 64 may not outside the wide-key
    paths (H200, session 22: GLA's fused backward asked for 278528 B of shared memory, the block has 232448). Earlier
    launches of the same call may have run; the error drops their outputs with the call."""
    try:
        yield
    except Exception as e:   # noqa: BLE001 - Triton's error class moved between releases; matched by name
        if type(e).__name__ != "OutOfResources":
            raise
        B, T, H, d_k, d_v, N, max_len, C = sizes[:8]
        need, limit = getattr(e, "required", "?"), getattr(e, "limit", "?")
        raise ValueError(
            f"scan: backend='triton' cannot launch this rule's chunked {what} at chunks of {C} (sub-)tokens with "
            f"d_k={d_k}, d_v={d_v}: a kernel needs {need} of {getattr(e, 'name', 'a resource')} per block, this GPU "
            f"gives {limit}; pass a smaller chunk_size (32) (with none given, this chunk is the policy's: a bug to "
            f"report)") from e


@contextlib.contextmanager
def _diag_path(sizes):
    """chunked.DIAG_PATH as the launch configuration picked it (sizes[8] of a chunked call: run_config), for the
    forward op and, from the sizes it saved, the backward op, so that both run the path the autotuner timed."""
    from . import chunked
    old = chunked.DIAG_PATH
    if len(sizes) > 8 and sizes[8]:
        chunked.DIAG_PATH = _DIAG_PATHS[sizes[8] - 1]
    try:
        yield
    finally:
        chunked.DIAG_PATH = old


@contextlib.contextmanager
def _delta_forward(value: str):
    from . import chunked
    old = chunked.DELTA_FORWARD
    if value:
        chunked.DELTA_FORWARD = value
    try:
        yield
    finally:
        chunked.DELTA_FORWARD = old


def run_scan(args):
    """backend="triton": o [B, T, H, d_v] (args.out_dtype) and the final state [N, H, d_v, d_k] fp32 (or None)."""
    from .scan import _Meta, _check_device, _check_rule, plan_for
    rule = args.rule
    _check_rule(rule)
    _check_device(args.device)
    check_chunk_size(args.chunk_size)
    h0 = args.initial_state
    if h0 is not None:
        _check_device(h0.device)
        if h0.device != args.device:
            raise ValueError(f"scan: initial_state is on {h0.device}, inputs on {args.device}")
    plan = plan_for(rule)
    names = [s.name for s in plan.syms]
    ins = {**args.tokens, **args.params}
    meta = _Meta(args, names)
    need = torch.is_grad_enabled() and any(t.requires_grad for t in list(ins.values()) + ([h0] if h0 is not None else []))
    from . import autotune
    cfg = autotune.choose(plan, args, meta, need) if autotune.enabled(args.device) else None
    return run_config(plan, args, meta, cfg or policy_config(plan, args, meta.max_len), need)


def run_config(plan, args, meta, cfg: LaunchConfig, need: bool):
    """Run the scan with one launch configuration (need: a backward will follow)."""
    key = register(plan)
    ins = {**args.tokens, **args.params}
    syms = [ins[n] for n in meta.names]
    h0 = args.initial_state
    chunked = cfg.kernel == "chunk"
    BT = int(PSCAN_BLOCK_T) if cfg.kernel == "pscan" else 0
    C = (cfg.chunk or chunk_size(plan, args.d_k, cfg.delta_forward, cfg.diag_path)) if chunked else BT or meta.checkpoint
    if chunked:   # a rank-R rule: chunks of C / R' tokens = C sub-tokens (chunked.sub_tokens)
        from .chunked import sub_tokens
        C = max(1, C // sub_tokens(plan.rule.form))
    sizes = [args.B, args.T, args.H, args.d_k, args.d_v, meta.N, meta.max_len, int(C)]
    if not chunked and (BT or cfg.block_v or cfg.warps):
        sizes += [BT, int(cfg.block_v), int(cfg.warps)]
    if chunked and cfg.diag_path:   # the op's forward and its backward read it there (_diag_path)
        sizes.append(_DIAG_PATHS.index(cfg.diag_path) + 1)
    chunk_bwd = False
    chunk_in = []
    ck_dtype = None   # fp32 checkpoints
    if chunked:
        from .chunked import backward_supported, checkpoint_storage, chunk_inputs
        mode = chunk_backward_mode() if cfg.chunk_backward is None else "auto" if cfg.chunk_backward else False
        chunk_bwd = need and bool(mode) and backward_supported(plan, exact_decay_grad=mode == "auto")
        chunk_in = chunk_inputs(plan, args, grad=chunk_bwd)
        if checkpoint_storage(args.out_dtype) != torch.float32:   # CHECKPOINT_STORAGE = "input", bf16 / fp16 inputs
            ck_dtype = checkpoint_storage(args.out_dtype)
    E = evaluate_entries(plan, ins, sizes) if need and not chunk_bwd else []
    with _delta_forward(cfg.delta_forward if chunked else ""):
        o, ht, _, _ = torch.ops.olssm.triton_scan_fwd(key, syms, E, chunk_in, h0, meta.cu, sizes, args.out_dtype,
                                                      need, chunked, chunk_bwd, ck_dtype)
    return o, (ht if args.output_final_state else None)
