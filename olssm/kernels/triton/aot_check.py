"""Compile the chunked kernels for an NVIDIA target without a GPU, and report their resource usage.

    python -m olssm.kernels.triton.aot_check [--arch 90] [--num-warps 4] [--chunk 32] [--dk 64] [--dv 32]

`triton.compile` runs the whole pipeline (TTIR → TTGIR → LLVM → PTX → cubin, with the ptxas that
ships in the triton wheel) for a `GPUTarget`, so GPU-only compile errors (types, layouts,
unsupported ops) show up on a CPU-only machine; `cuobjdump --dump-resource-usage` then gives
registers and stack (spills) per thread, and a variant that asks for more shared memory than the
architecture gives a block (SHARED_LIMIT) is marked OVER: it compiles but cannot launch. Must run with
TRITON_INTERPRET unset (the kernels must be JITFunctions). Exit status 1 when a variant fails to compile.
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile


def _usage(kernel) -> str:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (f"regs {m.group(1)}, stack {m.group(2)} B/thread" if m else "resource usage unavailable") + \
        f", shared {kernel.metadata.shared} B, {_mma_kinds(kernel.asm['ptx'])}"


def _mma_kinds(ptx: str) -> str:
    """How many tensor-core instructions of each kind the PTX holds: wgmma (sm_90's warpgroup MMA, issued only for
    dots of M a multiple of 64 rows) or mma.sync (the warp-level MMA every smaller dot is lowered to)."""
    return f"wgmma {len(re.findall(r'wgmma.mma_async', ptx))}, mma.sync {len(re.findall(r'mma.sync', ptx))}"


def ptx_loops(ptx: str) -> list:
    """Every loop of a PTX listing, in order: a label and a later branch back to it. Per loop (nested ones counted in
    their parents too): (label, instructions, bar.sync, shared-memory loads, shared-memory stores, warp shuffles),
    the per-iteration cost that cross-warp reductions leave in a sequential loop (a reduction across warps goes
    through shared memory between two barriers; one inside a warp through shuffles)."""
    lines = [line.strip() for line in ptx.splitlines()]
    seen, loops = {}, []
    for n, line in enumerate(lines):
        label = re.match(r"(\$L__BB\d+_\d+):", line)
        if label:
            seen[label.group(1)] = n
        back = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if back and back.group(1) in seen:
            body = [x for x in lines[seen[back.group(1)]:n + 1] if x and x[0] not in "/${}."]
            loops.append((back.group(1), len(body), sum("bar.sync" in x or "barrier.sync" in x for x in body),
                          sum(re.search(r"\bld\.shared|\bldmatrix", x) is not None for x in body),
                          sum(re.search(r"\bst\.shared|\bstmatrix", x) is not None for x in body),
                          sum("shfl.sync" in x for x in body)))
    return loops


#: the pointers of the chunk tensors (chunked.chunk_inputs' q, w, e, a, b, c: k / v in the diagonal kernels, x / y in
#: the helpers) and of the scan's o / dO, which are bf16 in a bf16 scan under chunked.CHUNK_STORAGE = "input", and
#: the split delta forward's Ũ / Δ (u; chunked.DELTA_U_STORAGE = "input"). The log decay g, the checkpoints ck and
#: the backward's other scratch tensors stay fp32; the split delta path's dot-operand buffers (W̃, T_c, Δ, dh, dR′)
#: take the dtypes their launches give them (main's bf16_ptrs)
BF16_PTRS = {p: "*bf16" for p in ("q_ptr", "k_ptr", "v_ptr", "w_ptr", "e_ptr", "a_ptr", "b_ptr", "c_ptr", "o_ptr",
                                  "do_ptr", "u_ptr")}
#: the kernels also compiled with BF16_PTRS (--bf16 some): name prefixes of variants()
BF16_VARIANTS = ("diag decay=none varlen=False", "diag decay=scalar varlen=False", "diag decay=column varlen=False",
                 "backward decay=", "delta split prep decay=scalar varlen=True",
                 "delta split state decay=scalar varlen=True", "delta split out decay=scalar varlen=True",
                 "delta bwd value decay=scalar varlen", "delta bwd key decay=scalar varlen")


#: the same plus the checkpoints ck (chunked.CHECKPOINT_STORAGE = "input"): "[bf16 ck]" variants of the kernels that
#: write ck (chunk_fwd, chunk_delta_fwd, the split state kernel) or read it (the split out kernel, the chunked
#: backward kernels, the generated recurrent bwd_kernel on the chunked path); dh and the scratch stay fp32
BF16_CK_PTRS = {**BF16_PTRS, "ck_ptr": "*bf16"}
#: the kernels compiled with BF16_CK_PTRS under --bf16 some (name prefixes; "all": every variant with a ck_ptr)
BF16_CK_VARIANTS = ("diag decay=", "delta decay=", "backward decay=", "delta split state decay=",
                    "delta split out decay=scalar varlen=True", "delta bwd value decay=scalar varlen",
                    "delta bwd key decay=scalar varlen", "rowc bwd prep decay=scalar varlen")
#: generated rules whose token-loop backward (bwd_kernel) reads the chunked forward's ck (no chunked backward, or
#: CHUNK_BACKWARD False): compiled with a bf16 ck_ptr as well
BF16_CK_GENERATED = ("gla", "retnet")


#: the integer arguments a launch at the benchmark shapes passes as multiples of 16 (B = 2, T = 8192, H = 16, d = 128,
#: chunk 64), which Triton's JIT then specialises on, as it does on 16-byte aligned pointers
DIVISIBLE_INTS = ("T", "H", "DK", "DV", "NCK", "TOKH")


def compile_for(fn, consts: dict, arch: int, num_warps: int, ptr_types: dict | None = None, num_stages=None,
                maxnreg=None, aligned: bool = True):
    """Compile fn for sm_<arch>: every pointer *fp32 (ix_ptr / cu_ptr *i32) unless ptr_types names it. aligned: as a
    launch compiles it — pointers 16-byte aligned and DIVISIBLE_INTS multiples of 16 (tt.divisibility), so that its
    loads and stores vectorise. Without (--unaligned) every access was a scalar one: session 23 found the split
    path's dqk kernel at 255 registers and 16 B of spills that way, 240 and none as launched."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig_params = inspect.signature(fn.fn).parameters
    params = list(sig_params)
    # constexprs the variant leaves out take their defaults, as at launch (they were compiled as *fp32 pointer
    # arguments, i.e. runtime branches: HAVE_TC / SAVE_TC's register counts were wrong)
    consts = {**{p: v.default for p, v in sig_params.items() if v.default is not inspect.Parameter.empty},
              **consts}
    # pointers that are None (a constexpr) by default, compiled as pointers where their switch is on
    for switch, ptr in (("SCALED_E", "es_ptr"), ("FACTORS", "f_ptr")):
        if consts.get(switch):
            consts.pop(ptr)
    ints = {"T", "H", "DK", "DV", "NCK", "SW", "SE", "TOKH", "TOK", "N", "D"}
    ptrs = {**(ptr_types or {}), "ix_ptr": "*i32", "cu_ptr": "*i32"}   # the varlen chunk map and cu_seqlens: int32
    sig = {p: ("constexpr" if p in consts else "i32" if p in ints else ptrs.get(p, "*fp32")) for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if aligned and (sig[p].startswith("*") or (sig[p] == "i32" and p in DIVISIBLE_INTS))}
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in consts.items()}, attrs=attrs)
    opts = {"num_warps": num_warps, **({"num_stages": int(num_stages)} if num_stages else {}),
            **({"maxnreg": int(maxnreg)} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


#: variants compiled again with the value side scaled on load (chunked.SCALE_ON_LOAD, SCALED_E: x and its factor s
#: read instead of e = s·x): Mamba-2's, DeltaNet's and Gated DeltaNet's kernels on every path, and one variant of
#: each other kernel that reads e
SCALED_VARIANTS = (
    "diag decay=scalar varlen=True", "backward decay=scalar", "diag split state decay=scalar varlen=True",
    "diag split out decay=scalar varlen=True", "diag split backward dqk decay=scalar varlen=True",
    "diag split backward decay=row varlen=True", "delta decay=none/scalar c=scalar", "delta decay=row c=scalar",
    "delta split prep decay=scalar varlen=True tied", "delta split prep decay=scalar varlen=True tied SAVE_TC",
    "delta split state decay=scalar varlen=True tied", "delta split out decay=scalar varlen=True tied",
    "delta split prep decay=scalar varlen=True", "delta split state decay=scalar varlen=True",
    "delta split out decay=scalar varlen=True", "delta bwd value decay=scalar varlen=True tied",
    "delta bwd key decay=scalar varlen=True tied", "delta bwd key decay=scalar varlen=True SAME_KEY",
    "delta bwd value decay=scalar varlen=True", "delta bwd key decay=scalar varlen=True",
    "rowc bwd prep decay=scalar varlen=True", "rowdecay bwd c=scalar")


#: the sequential state passes compiled again reading a scalar decay's factors from the pre-pass (chunked.DECAY_FACTORS,
#: FACTORS)
FACTOR_VARIANTS = ("diag split state decay=scalar varlen=True", "diag split backward state decay=scalar varlen=True",
                   "delta split state decay=scalar varlen=True tied", "delta split state decay=scalar varlen=True",
                   "delta bwd state decay=scalar varlen=True")


def _own_launch(name: str) -> tuple:
    """(num_warps, num_stages) a kernel of variant `name` is launched with where it has its own (the split diagonal
    path's chunked.DIAG_*, the split delta forward's chunked.DELTA_*, the delta backward's chunked_delta_bwd.*_WARPS /
    _STAGES); None for either: the common settings."""
    from . import chunked as ch, chunked_delta_bwd as dbw
    own = (("diag split state", "DIAG_STATE", ch), ("diag split out", "DIAG_OUT", ch),
           ("diag split backward state", "DIAG_DH", ch), ("diag split backward dqk", "DIAG_DQK", ch),
           ("diag split backward dv", "DIAG_DV", ch), ("delta split prep", "DELTA_PREP", ch),
           ("delta split state", "DELTA_STATE", ch), ("delta split out", "DELTA_OUT", ch),
           ("delta bwd prep", "PREP", dbw), ("delta bwd state", "STATE", dbw), ("delta bwd value", "VALUE", dbw),
           ("delta bwd key", "KEY", dbw))
    name = name.removeprefix("rank4 ")
    for prefix, constant, module in own:
        if name.startswith(prefix):
            return getattr(module, f"{constant}_WARPS"), getattr(module, f"{constant}_STAGES")
    return None, None


def variants(BT, BK, BV, prec, BVW=None, out_rows=None, state_rows=None):
    """Every chunked kernel variant (_variants), those of SCALED_VARIANTS again with SCALED_E and those of
    FACTOR_VARIANTS with FACTORS, and the decay-factor pre-pass. out_rows: the split diagonal output kernel's value
    rows (_diag_split_forward's; default: BVW); state_rows: the split delta path's state passes' (SplitBlocks.BVS;
    default: BV)."""
    from . import chunked as ch
    for name, fn, consts in _variants(BT, BK, BV, prec, BVW, out_rows, state_rows):
        yield name, fn, consts
        if name in SCALED_VARIANTS:
            yield f"{name} SCALED_E", fn, dict(consts, SCALED_E=True)
        if name in FACTOR_VARIANTS:
            yield f"{name} FACTORS", fn, dict(consts, FACTORS=True)
    yield "decay factors varlen=True", ch.chunk_decay_factors_kernel, dict(BT=BT, VARLEN=True)


def _variants(BT, BK, BV, prec, BVW=None, out_rows=None, state_rows=None):
    from . import chunked as ch
    BVW = BVW or BV
    BVS = state_rows or BV
    base = dict(BT=BT, BK=BK, BV=BV, M=1, USE_H0=True, SAVE_CK=True, PREC=prec)
    for name, code in (("none", 0), ("scalar", 1), ("row", 2), ("column", 3)):
        for varlen in (False, True):
            yield f"diag decay={name} varlen={varlen}", ch.chunk_fwd_kernel, dict(base, DECAY=code, VARLEN=varlen)
    for grow in (False, True):
        for crow in (False, True):
            yield (f"delta decay={'row' if grow else 'none/scalar'} c={'row' if crow else 'scalar'}",
                   ch.chunk_delta_fwd_kernel, dict(base, C_ROW=crow, G_ROW=grow, VARLEN=True))
    yield "diag decay=scalar, 2 input terms", ch.chunk_fwd_kernel, dict(base, DECAY=1, VARLEN=False, M=2)
    bwd = {k: v for k, v in base.items() if k not in ("USE_H0", "SAVE_CK")}
    for name, code in (("none", 0), ("scalar", 1), ("row", 2), ("column", 3)):
        yield f"backward decay={name}", ch.chunk_bwd_kernel, dict(bwd, DECAY=code, USE_DHT=True, VARLEN=True)
    for name, code in (("row", 2), ("column", 3)):
        for mode in ("off", "all"):   # DIAG_STRADDLE's other settings ("slow", the default, above)
            yield (f"backward decay={name} straddle={mode}", ch.chunk_bwd_kernel,
                   dict(bwd, DECAY=code, USE_DHT=True, VARLEN=True, DIAG_STRADDLE=ch._DIAG_STRADDLE_CODE[mode]))
    yield "delta decay=scalar, 2 input terms", ch.chunk_delta_fwd_kernel, dict(base, C_ROW=False, G_ROW=False,
                                                                                 VARLEN=False, M=2)
    # the split diagonal path (DIAG_PATH = "split"): state passes over (value block, key block), o and gradients
    # over chunks
    BKS = min(BK, ch.DIAG_STATE_BLOCK_K)
    for name, code in (("none", 0), ("scalar", 1), ("row", 2), ("column", 3)):
        tag = f"decay={name} varlen=True"
        yield (f"diag split state {tag}", ch.chunk_fwd_kernel,
               dict(BT=BT, BK=BKS, BV=BV, M=1, PREC=prec, DECAY=code, USE_H0=True, SAVE_CK=True, VARLEN=True,
                    OUT=False, KEY_BLOCKS=True))
        rows = BV if code == 2 else out_rows or BVW
        yield (f"diag split out {tag}", ch.chunk_diag_out_kernel,
               dict(BT=BT, BK=BK, BV=rows, M=1, PREC=prec, DECAY=code, VARLEN=True))
        if code < 2:   # the opt-in loop over keys (DIAG_OUT_KEY_BLOCK; 32 keys a step while it is off)
            yield (f"diag split out {tag} key loop", ch.chunk_diag_out_kernel,
                   dict(BT=BT, BK=BK, BV=rows, M=1, PREC=prec, DECAY=code, VARLEN=True,
                        KB=min(BK, ch.DIAG_OUT_KEY_BLOCK or 32)))
        yield (f"diag split backward state {tag}", ch.chunk_bwd_kernel,
               dict(BT=BT, BK=BKS, BV=BV, M=1, PREC=prec, DECAY=code, USE_DHT=True, VARLEN=True, GRADS=False,
                    KEY_BLOCKS=True))
        if code != 2:   # no / scalar / column decay: dQ, dW, ∂g over key blocks and dE over value blocks, whole
            dqk = dict(BT=BT, BK=min(BK, ch.DIAG_DQK_BLOCK_K), BV=min(max(16, ch._np2(BVW)), ch.DIAG_DQK_BLOCK_V),
                       PREC=prec, DECAY=code, VARLEN=True)
            yield f"diag split backward dqk {tag}", ch.chunk_diag_dqk_kernel, dqk
            for mode in (("off", "all") if code == 3 else ()):
                yield (f"diag split backward dqk {tag} straddle={mode}", ch.chunk_diag_dqk_kernel,
                       dict(dqk, DIAG_STRADDLE=ch._DIAG_STRADDLE_CODE[mode]))
            yield (f"diag split backward dv {tag}", ch.chunk_diag_dv_kernel,
                   dict(BT=BT, BK=min(BK, ch.DIAG_DV_BLOCK_K), BV=min(max(16, ch._np2(BVW)), ch.DIAG_DV_BLOCK_V),
                        PREC=prec, DECAY=code, VARLEN=True))
            continue
        BKB = min(BK, ch.DIAG_BWD_BLOCK_K)
        yield (f"diag split backward {tag}", ch.chunk_diag_bwd_kernel,
               dict(BT=BT, BK=BKB, BV=BV, M=1, PREC=prec, DECAY=code, VARLEN=True, NKB=BK // BKB))
    # the split delta forward: prep and out take wide value blocks and KB-column key blocks
    # (tied: w_0 = b, DeltaNet / Gated DeltaNet, chunked._tied; untied: the general path)
    state = dict(BT=BT, BK=BK, BV=BVS, M=1, PREC=prec, USE_H0=True)
    wide = dict(BT=BT, BK=BK, BV=BVW, M=1, PREC=prec, KB=min(BK, ch.SPLIT_BLOCK_K))
    for gated in (False, True):
        for varlen in (False, True):
            for tied in (True, False):
                tag = f"decay={'scalar' if gated else 'none'} varlen={varlen}{' tied' if tied else ''}"
                kw = dict(GATED=gated, VARLEN=varlen, TIED=tied)
                yield f"delta split prep {tag}", ch.chunk_delta_prep_kernel, dict(wide, **kw)
                if tied:   # training: T_c kept for the backward (chunked.saves_chunk_core)
                    yield (f"delta split prep {tag} SAVE_TC", ch.chunk_delta_prep_kernel,
                           dict(wide, SAVE_TC=True, **kw))
                yield f"delta split state {tag}", ch.chunk_delta_state_kernel, dict(state, **kw)
                yield f"delta split out {tag}", ch.chunk_delta_out_kernel, dict(wide, **kw)
    two = dict(GATED=True, VARLEN=False, M=2)
    yield "delta split prep decay=scalar, 2 input terms", ch.chunk_delta_prep_kernel, dict(wide, TIED=False, **two)
    yield "delta split state decay=scalar, 2 input terms", ch.chunk_delta_state_kernel, dict(state, TIED=False, **two)
    yield "delta split out decay=scalar, 2 input terms", ch.chunk_delta_out_kernel, dict(wide, TIED=False, **two)
    # the delta family's chunked backward (chunked_delta_bwd.py): prep / value take the split's wide value blocks
    from . import chunked_delta_bwd as dbw
    value = dict(wide, KB=min(BK, dbw.VALUE_BLOCK_K))
    key = dict(BT=BT, BV=BV, M=1, PREC=prec, KB=min(BK, dbw.KEY_BLOCK_K))
    for gated in (False, True):
        tag = f"decay={'scalar' if gated else 'none'} varlen=True"
        prep = {k: v for k, v in wide.items() if k != "M"}
        yield f"delta bwd prep {tag}", dbw.chunk_delta_bwd_prep_kernel, dict(prep, GATED=gated, VARLEN=True)
        yield (f"delta bwd prep {tag} HAVE_TC", dbw.chunk_delta_bwd_prep_kernel,
               dict(prep, GATED=gated, VARLEN=True, HAVE_TC=True))
        yield (f"delta bwd state {tag}", dbw.chunk_delta_bwd_state_kernel,
               dict(BT=BT, BK=BK, BV=BVS, PREC=prec, GATED=gated, USE_DHT=True, VARLEN=True))
        for tied in (False, True):     # tied: w_0 = b (DeltaNet / Gated DeltaNet, chunked._tied)
            t = f"{tag}{' tied' if tied else ''}"
            kw = dict(GATED=gated, VARLEN=True, TIED=tied)
            yield f"delta bwd value {t}", dbw.chunk_delta_bwd_value_kernel, dict(value, **kw)
            yield f"delta bwd key {t}", dbw.chunk_delta_bwd_key_kernel, dict(key, **kw)
        # a = b = w_0 (chunked_delta_bwd.SAME_KEY, on by default: DeltaNet, Gated DeltaNet, and Longhorn's row-c key
        # launch; with SAME_KEY = 0 they run the rows above, tied for the first two, untied for Longhorn)
        yield (f"delta bwd key {tag} SAME_KEY", dbw.chunk_delta_bwd_key_kernel,
               dict(key, GATED=gated, VARLEN=True, SAME_KEY=True))
        yield (f"delta bwd value {tag} tied SAME_KEY", dbw.chunk_delta_bwd_value_kernel,
               dict(value, GATED=gated, VARLEN=True, TIED=True, SAME_KEY=True))
    for tied in (False, True):
        t = " tied" if tied else ""
        yield (f"delta bwd value decay=scalar, 2 input terms{t}", dbw.chunk_delta_bwd_value_kernel,
               dict(value, TIED=tied, **two))
        yield f"delta bwd key decay=scalar, 2 input terms{t}", dbw.chunk_delta_bwd_key_kernel, dict(key, TIED=tied, **two)
    # the row-c (Longhorn) chunked backward: prep / value take ROWC_BLOCK_V value rows, the state pass BV
    rowc = dict(wide, BV=max(16, min(BVW, dbw.ROWC_BLOCK_V)), KB=min(BK, dbw.VALUE_BLOCK_K))
    for gated in (False, True):
        tag = f"decay={'scalar' if gated else 'none'} varlen=True"
        yield f"rowc bwd prep {tag}", dbw.chunk_rowc_bwd_prep_kernel, dict(rowc, GATED=gated, VARLEN=True)
        yield (f"rowc bwd state {tag}", dbw.chunk_rowc_bwd_state_kernel,
               dict(BT=BT, BK=BK, BV=BV, PREC=prec, GATED=gated, USE_DHT=True, VARLEN=True,
                    KB=min(BK, ch.SPLIT_BLOCK_K)))
        yield f"rowc bwd value {tag}", dbw.chunk_rowc_bwd_value_kernel, dict(rowc, GATED=gated, VARLEN=True)
    yield "rowc bwd prep decay=scalar, 2 input terms", dbw.chunk_rowc_bwd_prep_kernel, dict(rowc, **two)
    yield "rowc bwd value decay=scalar, 2 input terms", dbw.chunk_rowc_bwd_value_kernel, dict(rowc, **two)
    # row decays with corrections: one sequential backward kernel (c scalar / row; rank 4 on sub-tokens)
    rowd = dict(BT=BT, BK=BK, BV=BV, M=1, PREC=prec, USE_DHT=True, VARLEN=True)
    for crow in (False, True):
        yield (f"rowdecay bwd c={'row' if crow else 'scalar'}", dbw.chunk_rowdecay_bwd_kernel,
               dict(rowd, C_ROW=crow))
    yield "rank4 rowdecay bwd c=scalar, 2 input terms", dbw.chunk_rowdecay_bwd_kernel, dict(rowd, C_ROW=False, M=2,
                                                                                          SUB=4)
    for mode in ("off", "all"):   # DIAG_STRADDLE's other settings ("slow", the default, above)
        yield (f"rowdecay bwd c=scalar straddle={mode}", dbw.chunk_rowdecay_bwd_kernel,
               dict(rowd, C_ROW=False, DIAG_STRADDLE=ch._DIAG_STRADDLE_CODE[mode]))
    # rank-R corrections on 4 sub-tokens per token (chunked.sub_tokens: the strict mask between tokens, SUB)
    sub = dict(GATED=True, VARLEN=True, M=2, SUB=4)
    # the UT substitution on the whole masked tile (chunked.UT_SOLVE = "masked"; the rows without a solve take the
    # kernels' default, "blocks"): both callers of _ut_inverse
    for gated in (False, True):
        tag = f"decay={'scalar' if gated else 'none'} varlen=True"
        yield (f"delta split prep {tag} tied SAVE_TC masked", ch.chunk_delta_prep_kernel,
               dict(wide, GATED=gated, VARLEN=True, TIED=True, SAVE_TC=True, SOLVE="masked"))
        yield (f"delta bwd prep {tag} masked", dbw.chunk_delta_bwd_prep_kernel,
               dict(prep, GATED=gated, VARLEN=True, SOLVE="masked"))
    yield "rank4 delta fwd c=row", ch.chunk_delta_fwd_kernel, dict(base, C_ROW=True, G_ROW=False, VARLEN=True, M=2,
                                                                   SUB=4)
    yield "rank4 delta split prep SAVE_TC", ch.chunk_delta_prep_kernel, dict(wide, TIED=False, SAVE_TC=True, **sub)
    yield "rank4 delta bwd prep", dbw.chunk_delta_bwd_prep_kernel, dict(prep, GATED=True, VARLEN=True, SUB=4)
    yield ("rank4 delta bwd prep masked", dbw.chunk_delta_bwd_prep_kernel,
           dict(prep, GATED=True, VARLEN=True, SUB=4, SOLVE="masked"))
    yield "rank4 delta bwd value", dbw.chunk_delta_bwd_value_kernel, dict(value, TIED=False, **sub)
    yield "rank4 delta bwd key", dbw.chunk_delta_bwd_key_kernel, dict(key, TIED=False, **sub)
    yield "rank4 rowc bwd prep", dbw.chunk_rowc_bwd_prep_kernel, dict(rowc, **sub)
    yield ("rank4 rowc bwd state", dbw.chunk_rowc_bwd_state_kernel,
           dict(BT=BT, BK=BK, BV=BV, PREC=prec, GATED=True, USE_DHT=True, VARLEN=True, KB=min(BK, ch.SPLIT_BLOCK_K),
                SUB=4))
    yield "rank4 rowc bwd value", dbw.chunk_rowc_bwd_value_kernel, dict(rowc, **sub)


#: the most shared memory a block may ask for (opt-in, bytes) per compute capability: a kernel that needs more
#: compiles but raises OutOfResources at launch (Triton compares metadata.shared with the device's limit). sm_90 and
#: sm_100: 227 KB; sm_80 / 87: 163 KB; sm_86 / 89 / 120: 99 KB
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

#: catalogue rules whose generated modules (pscan.py's block-scan kernels and, for comparison, the
#: loop kernels of codegen.py) are compiled: elementwise, column, scalar (parameter) decays
GENERATED_RULES = ("mamba", "longhorn_diag", "gla", "retnet")


def generated_variants(d_k, d_v, BT, rules=GENERATED_RULES):
    """The generated kernels of a few catalogue rules: pfwd/pbwd (block scan, BT tokens per block,
    library.pscan_blocks' BV) and fwd/bwd (the token loop, scan._blocks' BV, C = 16)."""
    from ...catalogue import ENTRIES
    from . import library
    from .scan import _blocks, plan_for
    for name in rules:
        mod = plan_for(ENTRIES[name].rule).module
        BK, BV = library.pscan_blocks(d_k, d_v, BT)
        fwd = dict(BK=BK, BV=BV, BT=BT, USE_H0=True, STORE_HT=True, SAVE_CK=True, VARLEN=True)
        yield f"{name} pfwd (BT={BT}, BV={BV})", mod.pfwd_kernel, fwd
        BK, BV = library.pscan_blocks(d_k, d_v, BT, backward=True)
        yield f"{name} pbwd (BT={BT}, BV={BV})", mod.pbwd_kernel, dict(BK=BK, BV=BV, BT=BT, USE_DHT=True,
                                                                        VARLEN=True)
        BK, BV = _blocks(d_k, d_v)
        yield f"{name} fwd loop (BV={BV})", mod.fwd_kernel, dict(BK=BK, BV=BV, C=16, USE_H0=True, STORE_HT=True,
                                                                  SAVE_CK=True, VARLEN=True)
        yield f"{name} bwd loop (BV={BV})", mod.bwd_kernel, dict(BK=BK, BV=BV, C=16, USE_DHT=True, VARLEN=True)


def main(argv=None) -> int:
    from .scan import interpreted
    if interpreted():
        print("aot_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
        return 2
    p = argparse.ArgumentParser()
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--num-warps", type=int, default=8)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--dk", type=int, default=64)
    p.add_argument("--dv", type=int, default=32)
    p.add_argument("--precision", default="tf32")
    p.add_argument("--offsets32", action="store_true",
                   help="compile the split delta path's kernels with int32 row offsets (chunked.OFFSETS32)")
    p.add_argument("--unaligned", action="store_true",
                   help="compile without the launch's 16-byte alignment and divisibility hints (compile_for)")
    p.add_argument("--num-stages", type=int, default=None,
                   help="software-pipelining stages of the chunked kernels (chunked.NUM_STAGES; default Triton's 3)")
    p.add_argument("--bf16", default="some", choices=("some", "all", "none"),
                   help="also compile the chunked kernels with bf16 chunk tensors and o / dO (BF16_PTRS), and those "
                        "that write or read ck with bf16 ck too (BF16_CK_PTRS, '[bf16 ck]'; the generated loop "
                        "backward of BF16_CK_GENERATED too): some: BF16_VARIANTS / BF16_CK_VARIANTS; all: every "
                        "chunked variant")
    p.add_argument("--only", default="all", choices=("all", "chunked", "generated", "rls"),
                   help="chunked: the chunked kernels; generated: the generated kernels of GENERATED_RULES "
                        "(block scan pfwd/pbwd and the loop kernels); rls: the RLS gain kernels")
    p.add_argument("--pscan-bt", type=int, default=None, help="tokens per block of pfwd/pbwd (library.PSCAN_BLOCK_T)")
    p.add_argument("--pscan-warps", type=int, default=None,
                   help="warps of the generated kernels (default: library.PSCAN_NUM_WARPS / scan.loop_warps)")
    p.add_argument("--pscan-tile", type=int, default=None,
                   help="fp32 elements of a [BT, BV, BK] tile of pfwd (library.PSCAN_TILE)")
    p.add_argument("--pscan-bwd-tile", type=int, default=None, help="the same for pbwd (library.PSCAN_BWD_TILE)")
    p.add_argument("--maxnreg", type=int, default=None,
                   help="registers per thread ptxas may use (.maxnreg) in every variant (0: none); default: as the "
                        "launches do (chunked.WALK_MAXNREG for the fused walks)")
    p.add_argument("--match", default=None,
                   help="compile only the variants whose names contain one of these comma-separated strings "
                        "(e.g. 'split state,split prep')")
    p.add_argument("--ptx-loops", action="store_true",
                   help="also list every loop of each kernel's PTX with its bar.sync, shared-memory and shuffle "
                        "instructions (ptx_loops)")
    a = p.parse_args(argv)
    from . import library as _lib
    _lib.PSCAN_TILE = a.pscan_tile or _lib.PSCAN_TILE
    _lib.PSCAN_BWD_TILE = a.pscan_bwd_tile or _lib.PSCAN_BWD_TILE
    from .chunked import _np2, split_blocks
    BK, BV, BVW, _, BVS = split_blocks(a.dk, a.dv)
    from .chunked import diag_out_rows
    out_rows = diag_out_rows(a.dk, a.dv)
    print(f"sm_{a.arch}, num_warps={a.num_warps} (the split paths' kernels: their own chunked.DIAG_* / DELTA_* and "
          f"chunked_delta_bwd.*_WARPS where set), BT={a.chunk}, BK={BK}, BV={BV} (split prep/out: {BVW}, delta state "
          f"passes: {BVS}), "
          f"dot precision {a.precision}")
    from . import library
    from . import scan as _scan
    todo = []

    def bf16_ptrs(name, ck=False):
        """BF16_PTRS (ck: BF16_CK_PTRS), with the split delta path's dot-operand buffers in the dtypes the launches
        give them at this precision (chunked.operand_storage): W̃, T_c (chunked.tc_storage), the forward's Δ (the
        state kernel's dl; the output kernel's u is bf16 in BF16_PTRS already), and the backward's dh, dR′ and Δ
        (chunked_delta_bwd.dh_storage, dr_storage, dl_storage)."""
        import torch
        from .chunked import operand_storage, tc_storage
        from .chunked_delta_bwd import dh_storage, dl_storage, dr_storage
        ptrs = dict(BF16_CK_PTRS if ck else BF16_PTRS)
        bf16 = torch.bfloat16
        name = name.removeprefix("rank4 ")
        if operand_storage(a.precision, "wt") == bf16:
            ptrs["wt_ptr"] = "*bf16"
        if tc_storage(a.precision) == bf16:
            ptrs["tc_ptr"] = "*bf16"
        if name.startswith("delta split state") and operand_storage(a.precision, "delta") == bf16:
            ptrs["dl_ptr"] = "*bf16"
        if name.startswith("delta bwd") and dh_storage(a.precision, "decay=none" not in name) == bf16:
            ptrs["dh_ptr"] = "*bf16"
        if name.startswith(("delta bwd value", "delta bwd key")):
            if dr_storage(a.precision) == bf16:
                ptrs["dr_ptr"] = "*bf16"
            if dl_storage(a.precision, "SAME_KEY" in name) == bf16:
                ptrs["dl_ptr"] = "*bf16"
        return ptrs

    if a.only in ("all", "chunked"):
        todo += [(n, f, c, a.num_warps) for n, f, c in variants(a.chunk, BK, BV, a.precision, BVW, out_rows, BVS)]
        todo += [(f"{n} [bf16]", f, c, a.num_warps, bf16_ptrs(n))
                 for n, f, c in variants(a.chunk, BK, BV, a.precision, BVW, out_rows, BVS)
                 if a.bf16 == "all" or (a.bf16 == "some" and n.startswith(BF16_VARIANTS))]
        todo += [(f"{n} [bf16 ck]", f, c, a.num_warps, bf16_ptrs(n, ck=True))
                 for n, f, c in variants(a.chunk, BK, BV, a.precision, BVW, out_rows, BVS)
                 if "ck_ptr" in inspect.signature(f.fn).parameters
                 and (a.bf16 == "all" or (a.bf16 == "some" and n.startswith(BF16_CK_VARIANTS)))]
        # _Scaled's backward (β·v's chain rule) at d_v, the tile chunked.scaled_backward launches: ∂out fp32, v bf16
        from .chunked import SCALED_BWD_WARPS, scaled_bwd_kernel, scaled_bwd_tile
        BR, BD = scaled_bwd_tile(a.dv)
        todo.append(("scaled backward [bf16 x]", scaled_bwd_kernel, dict(BR=BR, BD=BD, DX_BF16=True),
                     SCALED_BWD_WARPS, {"x_ptr": "*bf16", "dx_ptr": "*bf16"}))
    if a.only in ("all", "generated"):
        BT = a.pscan_bt or library.PSCAN_BLOCK_T
        print(f"generated kernels at d_k={a.dk}, d_v={a.dv}: block scan {a.pscan_warps or library.PSCAN_NUM_WARPS} "
              f"warps, loop kernels {a.pscan_warps or _scan.loop_warps(_np2(a.dk))} warps")
        for n, f, c in generated_variants(a.dk, a.dv, BT):
            warps = a.pscan_warps or (library.PSCAN_NUM_WARPS if "BT" in c else _scan.loop_warps(c["BK"]))
            todo.append((n, f, c, warps))
            if a.bf16 != "none" and " bwd loop " in n and n.split()[0] in BF16_CK_GENERATED:
                todo.append((f"{n} [bf16 ck]", f, c, warps, {"ck_ptr": "*bf16", "do_ptr": "*bf16"}))
    if a.only in ("all", "rls"):
        from . import rls
        bk = rls._gain_block(a.dk)   # the tile the launch uses (at least 16)
        for name, fn, flag in (("rls gain fwd", rls.rls_gain_fwd_kernel, "SAVE_CK"),
                               ("rls gain bwd", rls.rls_gain_bwd_kernel, "USE_DPT")):
            todo.append((name, fn, dict(BK=bk, C=a.chunk, VARLEN=True, **{flag: True}), rls._warps(bk)))
    if a.match:
        todo = [t for t in todo if any(m in t[0] for m in a.match.split(","))]
    if a.offsets32:   # the kernels that take chunked.OFFSETS32's int32 row offsets
        todo = [(n, f, dict(c, OFF32=True) if "OFF32" in inspect.signature(f.fn).parameters else c, *rest)
                for n, f, c, *rest in todo]
    from . import chunked as _ch, chunked_delta_bwd as _dbw
    walks = (_ch.chunk_delta_fwd_kernel, _ch.chunk_bwd_kernel, _dbw.chunk_rowdecay_bwd_kernel)   # _launch_opts(walk)
    bad, over = 0, []
    limit = SHARED_LIMIT.get(a.arch)
    for name, fn, consts, warps, *ptr_types in todo:
        own_warps, own_stages = _own_launch(name)
        warps = own_warps or warps
        walk = fn in walks and consts.get("OUT", True) and consts.get("GRADS", True)   # not the split passes
        maxnreg = a.maxnreg if a.maxnreg is not None else _ch.walk_maxnreg() if walk else None
        try:
            k = compile_for(fn, consts, a.arch, warps, *(ptr_types or [None]), num_stages=own_stages or a.num_stages,
                            maxnreg=maxnreg or None, aligned=not a.unaligned)
            big = limit is not None and k.metadata.shared > limit
            over += [name] * big
            print(f"  {'OVER' if big else 'ok':5s} {name:45s} {_usage(k)}")
            for label, instr, bars, lds, sts, shfl in (ptx_loops(k.asm["ptx"]) if a.ptx_loops else ()):
                print(f"          loop {label}: {instr} instructions, {bars} bar.sync, {lds} shared loads, "
                      f"{sts} shared stores, {shfl} shfl")
        except Exception as e:  # noqa: BLE001 - report every variant
            bad += 1
            why = " ".join(f"{str(x).splitlines()[0][:200]}" if str(x) else type(x).__name__
                           for x in (e, e.__cause__) if x is not None)   # CompilationError: "at l:c:" + the cause
            print(f"  FAIL  {name:45s} {why}")
    if over:   # compiled, but no launch of them can run on this architecture: the launches must not pick them
        print(f"{len(over)} variant(s) OVER sm_{a.arch}'s {limit} B of shared memory per block at "
              f"{a.num_stages or 3} pipeline stages (OutOfResources at launch; the wide-key launches use "
              f"chunked.WIDE_STAGES, --num-stages; the autotuner skips such candidates): " + "; ".join(over))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
