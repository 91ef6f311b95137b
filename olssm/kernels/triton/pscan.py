"""Generate the block-parallel-scan kernels (``pfwd_kernel`` / ``pbwd_kernel``) of a normal-form rule
without corrections (see TRITON.md, "Block-parallel scan"):

    S_t = Λ_t ⊙ S_{t-1} + Σ_m e_m w_mᵀ,        o_t = S_t q_t

One program = one value block × sequence·head, like the loop kernels, but BT tokens at a time:
every input is a 3-D tile ([BT, 1, 1] scalar, [BT, BV, 1] row, [BT, 1, BK] column, [BT, BV, BK]
elementwise; parameters [1, ...] / 0-d, loaded once), the printed entries broadcast by themselves,
and the recurrence inside the block is ``tl.associative_scan`` along axis 0 over the affine maps
x ↦ Λ ⊙ x + B (combine (a1, b1), (a2, b2) → (a1·a2, a2·b1 + b2)). The backward is the same
scan run on the adjoint, in reverse. Checkpoints: the state entering every block (C = BT).
"""
from __future__ import annotations

import sympy as sp

from ...objectives.core import COLUMN, ELEMENTWISE, ROW, SCALAR, spec_of
from .codegen import (PROLOGUE, backward_head, backward_tail, entries, entry_table, forward_head, input_ptr,
                      lift_csums, partial_slot, reverse_mode, symbols_of)
from .printer import TritonPrinter, codegen

#: the printer of the block kernels: csum(x) is a masked sum over the key axis (2) of [BT, BV, BK] tiles
def printer3() -> TritonPrinter:
    return TritonPrinter(key_mask="km3", key_axis=2)


COMBINE = '''\
@triton.jit
def _pscan_combine(a1, b1, a2, b2):
    # (x -> a2*x + b2) after (x -> a1*x + b1): the affine maps of S_t = Λ_t ⊙ S_{t-1} + B_t
    return a1 * a2, a2 * b1 + b2
'''

_PROLOGUE = PROLOGUE + """\
    # [BT, BV, BK] block tiles: token j of the block, value row, key column
    jt3 = tl.arange(0, BT)[:, None, None]
    r3 = rows[None, :, None]
    c3 = cols[None, None, :]
    rm3 = r3 < DV
    km3 = c3 < DK
    m23 = rm3 & km3
    nb = (eos - bos + BT - 1) // BT
"""


def _block_masks(indent: str, t0: str) -> list[str]:
    return [f"{indent}t3 = {t0} + jt3",
            f"{indent}tm3 = t3 < eos",
            f"{indent}tok3 = t3 * H + i_h",
            f"{indent}m3 = tm3 & m23",
            f"{indent}tk3 = tm3 & km3"]


# --------------------------------------------------------------------------------------------
# 3-D tile addressing

def _off(kind: str, base: str) -> str:
    return {SCALAR: f"{base}", ROW: f"({base}) * DV + r3", COLUMN: f"({base}) * DK + c3",
            ELEMENTWISE: f"({base}) * DV * DK + r3 * DK + c3"}[kind]


def _mask(kind: str, tmask) -> str | None:
    lane = {SCALAR: None, ROW: "rm3", COLUMN: "km3", ELEMENTWISE: "m23"}[kind]
    if tmask is None:
        return lane
    return tmask if lane is None else f"{tmask} & {lane}"


def _load3(ptr: str, base: str, kind: str, tmask) -> str:
    """A [BT, ...] tile (tmask: the token mask) or, tmask None, a parameter tile ([1, ...], 0-d scalar)."""
    mask = _mask(kind, tmask)
    if mask is None:
        return f"tl.load({ptr} + {base}).to(tl.float32)"
    return f"tl.load({ptr} + {_off(kind, base)}, mask={mask}, other=0.0).to(tl.float32)"


def _store3(ptr: str, base: str, kind: str, val: str, tmask) -> str:
    mask = _mask(kind, tmask)
    if mask is None:
        return f"tl.store({ptr} + {base}, {val})"
    return f"tl.store({ptr} + {_off(kind, base)}, {val}, mask={mask})"


def _zeros_tok(kind: str) -> str:
    return {SCALAR: "tl.zeros([BT, 1, 1], tl.float32)", ROW: "tl.zeros([BT, BV, 1], tl.float32)",
            COLUMN: "tl.zeros([BT, 1, BK], tl.float32)", ELEMENTWISE: "tl.zeros([BT, BV, BK], tl.float32)"}[kind]


def _zeros_par(kind: str) -> str:
    return {SCALAR: "0.0", ROW: "tl.zeros([1, BV, 1], tl.float32)", COLUMN: "tl.zeros([1, 1, BK], tl.float32)",
            ELEMENTWISE: "tl.zeros([1, BV, BK], tl.float32)"}[kind]


def _red_tok(kind: str, w: str) -> str:
    """Reduce a full [BT, BV, BK] tile (already selected) to a per-token tile of the given kind."""
    return {SCALAR: f"tl.sum(tl.sum({w}, axis=2, keep_dims=True), axis=1, keep_dims=True)",
            ROW: f"tl.sum({w}, axis=2, keep_dims=True)", COLUMN: f"tl.sum({w}, axis=1, keep_dims=True)",
            ELEMENTWISE: w}[kind]


def _red_par(kind: str, w: str) -> str:
    """Reduce a full [BT, BV, BK] tile (already selected) to a parameter tile (summed over the block)."""
    if kind == SCALAR:
        return f"tl.sum({w})"
    return f"tl.sum({_red_tok(kind, w)}, axis=0, keep_dims=True)"


def _full(expr: str, mask: str, other: str) -> str:
    """Select expr onto a full [BT, BV, BK] tile (tl.where broadcasts against the full mask m3)."""
    return f"tl.where({mask}, {expr}, {other})"


# --------------------------------------------------------------------------------------------
# forward

def pforward_source(form) -> str:
    syms = symbols_of(form)
    ents = entries(form)
    M = len(form.inputs)
    lines, out = codegen(ents, printer3())
    src = forward_head("pfwd_kernel", syms, "BT", _PROLOGUE, " ([1, ...] tiles)",
                       lambda s, kind: _load3(input_ptr(s), "i_h", kind, None))
    src += [
        "    for ib in range(0, nb):",
        "        t0 = bos + ib * BT",
        "        if SAVE_CK:   # the state entering the block (checkpoint interval C = BT)",
        "            tl.store(ck_ptr + (i_nh.to(tl.int64) * NCK + ib) * DV * DK + soff, S, mask=m2)",
    ]
    src += _block_masks("        ", "t0")
    src.append("        # per-token inputs ([BT, ...] tiles, zero past the sequence end)")
    for s in syms:
        sp_ = spec_of(s)
        if not sp_.is_parameter:
            src.append(f"        in_{s.name} = {_load3(input_ptr(s.name), 'tok3', sp_.kind, 'tm3')}")
    src.append("        # normal-form entries, printed from sympy (cse)")
    src += [f"        {ln}" for ln in lines]
    bterm = " + ".join(f"({out[f'e{m}']}) * ({out[f'w{m}']})" for m in range(M)) or "0.0"
    # padded tokens / lanes: Λ = 1, B = 0 (selected, so NaN/inf of an expression on zero padding never enter)
    src.append(f"        bb = {_full(bterm, 'm3', '0.0')}")
    if "lam" in ents:
        src.append(f"        lam = {_full(out['lam'], 'm3', '1.0')}")
        src.append("        ca, cb = tl.associative_scan((lam, bb), 0, _pscan_combine)")
        src.append("        h = ca * S[None, :, :] + cb")
    else:
        src.append("        h = S[None, :, :] + tl.cumsum(bb, 0)")
    src += [
        f"        v_q = {_full(out['q'], 'tk3', '0.0')}",
        "        o = tl.sum(h * v_q, axis=2, keep_dims=True)",
        "        tl.store(o_ptr + tok3 * DV + r3, o.to(o_ptr.dtype.element_ty), mask=tm3 & rm3)",
        "        S = tl.sum(tl.where(jt3 == BT - 1, h, 0.0), axis=0)",
        "    if STORE_HT:",
        "        tl.store(ht_ptr + i_nh.to(tl.int64) * DV * DK + soff, S, mask=m2)",
    ]
    return "\n".join(src) + "\n"


# --------------------------------------------------------------------------------------------
# backward

def pbackward_source(form) -> str:
    M = len(form.inputs)
    t = entry_table(form)
    ents, cls, kind, ink, raw = t.entries, t.cls, t.kind, t.inkernel, t.raw
    p = printer3()
    const = {n: p.doprint(e) for n, e in ents.items() if cls[n] == "const"}
    lifted = {n: lift_csums(ents[n], n) for n in ink}
    src = backward_head("pbwd_kernel", t, "", "BT", _PROLOGUE, lambda ptr, k: _load3(ptr, "i_h", k, None),
                        _zeros_par)

    def part(n):
        return partial_slot(kind[n])

    def evaluate(indent, names, tag, tok, tmask):
        """Lines evaluating entries `names` at the tokens `tok` (mask `tmask`); returns (lines, ref):
        tag '' for the block's own tokens, 'm_' / 'p_' for the tokens before / after."""
        L, ref = [], {}
        for n in names:
            if cls[n] == "const":
                ref[n] = const[n]
            elif cls[n] == "param":
                ref[n] = f"v_{n}"
            elif n not in ink:
                L.append(f"{indent}v_{tag}{n} = {_load3('E_' + n, tok, kind[n], tmask)}")
                ref[n] = f"v_{tag}{n}"
        need = [n for n in names if n in ink]
        if need:
            for x in raw:
                sx = spec_of(x)
                if not sx.is_parameter:
                    L.append(f"{indent}in_{tag}{x.name} = {_load3('X_' + x.name, tok, sx.kind, tmask)}")
        for n in need:
            top, defs = lifted[n]
            ren = {x: sp.Symbol(tag + x.name, **x.assumptions0) for x in raw if not spec_of(x).is_parameter}
            ren.update({sym: sp.Symbol(tag + sym.name, real=True) for sym, _i, _k in defs})
            for sym, inner, _k in defs:
                L.append(f"{indent}in_{tag}{sym.name} = tl.sum(tl.where(km3, {_pr(inner.xreplace(ren))}, 0.0), "
                         "axis=2, keep_dims=True)")
            lines, out = codegen({"v": top.xreplace(ren)}, p, prefix=f"x{tag}v_{n}_")
            L += [f"{indent}{ln}" for ln in lines]
            L.append(f"{indent}v_{tag}{n} = {out['v']}")
            ref[n] = f"v_{tag}{n}"
        return L, ref

    def _pr(e):
        return p.doprint(e.xreplace({x: sp.Symbol(f"in_{x.name}") for x in e.free_symbols}))

    def inkernel_grad(indent, n, g):
        """dL/d(raw inputs) of an in-kernel entry from its [BT, BV, BK] gradient tile g (codegen's reverse
        mode, vectorised over the block's tokens)."""
        return reverse_mode(indent, n, lifted[n], g, p, "m3", "tk3", _zeros_tok, _red_tok, _red_par)

    def grad(indent, n, g, ref):
        if cls[n] == "const":
            return []
        if n in ink:
            return inkernel_grad(indent, n, g)
        w = f"tl.where(m3, {g}, 0.0)"
        if cls[n] == "param":
            return [f"{indent}g_{n} += {_red_par(kind[n], w)}"]
        return [f"{indent}{_store3('D_' + n, f'{part(n)} * TOK * H + tok3', kind[n], _red_tok(kind[n], w), 'tm3')}"]

    I = "        "
    upd = (["lam"] if "lam" in ents else []) + [f"e{m}" for m in range(M)] + [f"w{m}" for m in range(M)]
    src += [
        "    dS = tl.zeros([BV, BK], tl.float32)",
        "    if USE_DHT:",
        "        dS += tl.load(dht_ptr + i_nh.to(tl.int64) * DV * DK + soff, mask=m2, other=0.0)",
        "    for jb in range(0, nb):",
        "        ib = nb - 1 - jb",
        "        t0 = bos + ib * BT",
        "        S0 = tl.load(ck_ptr + (i_nh.to(tl.int64) * NCK + ib) * DV * DK + soff, mask=m2, other=0.0)",
    ]
    src += _block_masks(I, "t0")
    # h_{t-1}: the forward scan over the entries at t-1, led by the map x -> S0 (Λ = 0, B = S0)
    src += [f"{I}# h_(t-1) for every token of the block: scan of the maps at t-1, the first one x -> S0",
            f"{I}tmm3 = (jt3 > 0) & (t3 - 1 < eos)",
            f"{I}mm3 = tmm3 & m23"]
    L, refm = evaluate(I, upd, "m_", "tok3 - H", "tmm3")
    src += L
    bterm_m = " + ".join(f"({refm[f'e{m}']}) * ({refm[f'w{m}']})" for m in range(M)) or "0.0"
    src.append(f"{I}bbm = tl.where(jt3 == 0, S0[None, :, :], {_full(bterm_m, 'mm3', '0.0')})")
    if "lam" in ents:
        src.append(f"{I}lamm = tl.where(jt3 == 0, 0.0, {_full(refm['lam'], 'mm3', '1.0')})")
        src.append(f"{I}_ca, hp = tl.associative_scan((lamm, bbm), 0, _pscan_combine)")
    else:
        src.append(f"{I}hp = tl.cumsum(bbm, 0)")
    # the block's own tokens: every entry, h_t
    src.append(f"{I}# the block's tokens: every entry, h_t = Λ_t ⊙ h_(t-1) + B_t")
    L, ref = evaluate(I, list(ents), "", "tok3", "tm3")
    src += L
    for x in raw:
        if not spec_of(x).is_parameter:
            src.append(f"{I}r_{x.name} = {_zeros_tok(spec_of(x).kind)}")
    bterm = " + ".join(f"({ref[f'e{m}']}) * ({ref[f'w{m}']})" for m in range(M)) or "0.0"
    src.append(f"{I}bb = {_full(bterm, 'm3', '0.0')}")
    if "lam" in ents:
        src.append(f"{I}lam = {_full(ref['lam'], 'm3', '1.0')}")
        src.append(f"{I}h = lam * hp + bb")
    else:
        src.append(f"{I}h = hp + bb")
    # the adjoint g_t = ∂L/∂h_t = do_t q_tᵀ + Λ_(t+1) ⊙ g_(t+1): reverse scan, the last map folding in dS
    src += [f"{I}# adjoint g_t = do_t q_t^T + Λ_(t+1) ⊙ g_(t+1): reverse scan; dS (from the next block) enters at the end",
            f"{I}do = tl.load(do_ptr + tok3 * DV + r3, mask=tm3 & rm3, other=0.0).to(tl.float32)",
            f"{I}xq = tl.where(m3, do * ({ref['q']}), 0.0) + tl.where(jt3 == BT - 1, dS[None, :, :], 0.0)"]
    if "lam" in ents:
        src += [f"{I}tmp3 = t3 + 1 < eos", f"{I}mp3 = tmp3 & m23"]
        L, refp = evaluate(I, ["lam"], "p_", "tok3 + H", "tmp3")
        src += L
        src.append(f"{I}lamp = {_full(refp['lam'], 'mp3', '1.0')}")
        src.append(f"{I}_cg, g = tl.associative_scan((lamp, xq), 0, _pscan_combine, reverse=True)")
    else:
        src.append(f"{I}g = tl.cumsum(xq, 0, reverse=True)")
    # gradients of the entries
    src += grad(I, "q", "h * do", ref)
    for m in range(M):
        src += grad(I, f"e{m}", f"g * ({ref[f'w{m}']})", ref)
        src += grad(I, f"w{m}", f"g * ({ref[f'e{m}']})", ref)
    if "lam" in ents:
        src += grad(I, "lam", "g * hp", ref)
        src.append(f"{I}dS = tl.sum(tl.where(jt3 == 0, lam * g, 0.0), axis=0)")
    else:
        src.append(f"{I}dS = tl.sum(tl.where(jt3 == 0, g, 0.0), axis=0)")
    for x in raw:
        sx = spec_of(x)
        if not sx.is_parameter:
            slot = partial_slot(sx.kind)
            src.append(f"{I}{_store3('R_' + x.name, f'{slot} * TOK * H + tok3', sx.kind, 'r_' + x.name, 'tm3')}")
    src += backward_tail(t, lambda ptr, off, k, val: _store3(ptr, off, k, val, None))
    return "\n".join(src) + "\n"


def module_source(form) -> str:
    """The block-scan kernels of a rule without corrections ('' for rules with corrections)."""
    if form.corrections:
        return ""
    return COMBINE + "\n\n" + pforward_source(form) + "\n\n" + pbackward_source(form)
