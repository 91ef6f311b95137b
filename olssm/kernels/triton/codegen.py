"""Generate the Triton source of the fused recurrent kernels of a normal-form Rule.

Two kernels per rule, one module (see TRITON.md for the math):

- ``fwd_kernel``: the recurrence on the raw inputs, with every normal-form entry printed from
  sympy into the loop body (``TritonPrinter`` + ``sympy.cse``); saves the state at checkpoints
  every C tokens when a backward pass will follow.
- ``bwd_kernel``: reverse-time adjoint on the *evaluated* normal-form entries (Λ, c_r, a_r, b_r,
  e_m, w_m, q; evaluated in torch, under autograd): per chunk, recompute the states from the
  checkpoint into a scratch buffer, then walk the chunk backwards producing dS_{t-1} and the
  gradient of every entry. The chain rule from the entries to the raw inputs is torch autograd.

The structure (decay kind, number of corrections and input terms, the kind of every entry) picks
the template; the coefficient expressions are printed in.
"""
from __future__ import annotations

import dataclasses
import hashlib

import sympy as sp

from ...derive.rule import NormalForm
from ...objectives.core import COLUMN, ELEMENTWISE, ROW, SCALAR, csum, kind_of, spec_of
from .printer import TritonPrinter, codegen

HAS_ROWS = {SCALAR: False, ROW: True, COLUMN: False, ELEMENTWISE: True}
HAS_COLS = {SCALAR: False, ROW: False, COLUMN: True, ELEMENTWISE: True}


def entries(form: NormalForm) -> dict:
    """The normal-form entries by kernel name (decay 'lam' only when there is a decay)."""
    out = {}
    if form.decay_kind != "none":
        out["lam"] = sp.sympify(form.decay)
    for r, c in enumerate(form.corrections):
        out[f"c{r}"], out[f"a{r}"], out[f"b{r}"] = (sp.sympify(x) for x in (c.coef, c.a, c.b))
    for m, t in enumerate(form.inputs):
        out[f"e{m}"], out[f"w{m}"] = sp.sympify(t.coef), sp.sympify(t.w)
    out["q"] = sp.sympify(form.readout)
    return out


def entry_class(expr) -> str:
    """'const' (a number), 'param' (learned parameters only), 'token' (reads a per-token input)."""
    syms = expr.free_symbols
    if not syms:
        return "const"
    return "param" if all(spec_of(s).is_parameter for s in syms) else "token"


def entry_kind(expr) -> str:
    return SCALAR if not expr.free_symbols else kind_of(expr)


def inkernel_entries(form) -> list:
    """Entries whose chain rule runs inside the backward kernel: the per-token elementwise ones
    (Mamba's exp(Δ·A), ...), which would otherwise be materialised as [B·T, H, d_v, d_k]."""
    ents = entries(form)
    return [n for n, e in ents.items() if entry_class(e) == "token" and entry_kind(e) == ELEMENTWISE]


@dataclasses.dataclass(frozen=True)
class EntryTable:
    """How the backward kernels treat each normal-form entry: one table for the loop and block-scan
    templates and the host side (scan.Plan, library) that evaluates and feeds them."""
    entries: dict    # name -> expression ('lam' only with a decay)
    cls: dict        # name -> 'const' | 'param' | 'token' (entry_class)
    kind: dict       # name -> scalar / row / column / elementwise (entry_kind)
    inkernel: list   # entries whose chain rule runs inside the backward kernel (inkernel_entries)
    vars: list       # the others that are not constants: evaluated in torch, passed as E_<name>, ∂ as D_<name>
    raw: list        # sympy symbols: the raw inputs of the in-kernel entries (X_ / R_<name>), by name


def entry_table(form) -> EntryTable:
    ents = entries(form)
    cls = {n: entry_class(e) for n, e in ents.items()}
    ink = inkernel_entries(form)
    return EntryTable(ents, cls, {n: entry_kind(e) for n, e in ents.items()}, ink,
                      [n for n in ents if cls[n] != "const" and n not in ink],
                      sorted({x for n in ink for x in ents[n].free_symbols}, key=lambda x: x.name))


def lift_csums(expr, tag: str):
    """Replace every csum(x) node (innermost first) by a fresh symbol σ: returns the top expression
    and [(σ, inner expression, kind of σ)] in evaluation order."""
    defs, seen = [], {}

    def rec(e):
        if isinstance(e, csum):
            if e not in seen:
                inner = rec(e.args[0])
                sym = sp.Symbol(f"sg_{tag}_{len(defs)}", real=True)
                defs.append((sym, inner, kind_of(e)))
                seen[e] = sym
            return seen[e]
        if not e.args:
            return e
        new = [rec(a) for a in e.args]
        return e.func(*new) if any(a is not b for a, b in zip(new, e.args)) else e

    return rec(sp.sympify(expr)), defs


def _sym_kind(sym, sig_kinds) -> str:
    return sig_kinds[sym] if sym in sig_kinds else spec_of(sym).kind


def symbols_of(form) -> list:
    syms = {s for e in form.expressions() for s in sp.sympify(e).free_symbols}
    return sorted(syms, key=lambda s: s.name)


# --------------------------------------------------------------------------------------------
# tile addressing

def _tile(kind: str) -> tuple[str, str, str]:
    """(offset within one [RV, CK] slab, mask, slab size) for a tile of the given kind."""
    return {
        SCALAR: ("0", None, "1"),
        ROW: ("r2", "rm2", "DV"),
        COLUMN: ("c2", "km2", "DK"),
        ELEMENTWISE: ("r2 * DK + c2", "m2", "DV * DK"),
    }[kind]


def _load(ptr: str, base: str, kind: str) -> str:
    off, mask, size = _tile(kind)
    if kind == SCALAR:
        return f"tl.load({ptr} + {base}).to(tl.float32)"
    return f"tl.load({ptr} + ({base}) * {size} + {off}, mask={mask}, other=0.0).to(tl.float32)"


def _store(ptr: str, base: str, kind: str, val: str) -> str:
    off, mask, size = _tile(kind)
    if kind == SCALAR:
        return f"tl.store({ptr} + {base}, {val})"
    return f"tl.store({ptr} + ({base}) * {size} + {off}, {val}, mask={mask})"


def _reduce(kind: str, g: str) -> str:
    """Reduce a [BV, BK] gradient tile to the shape of an entry of the given kind."""
    w = f"tl.where(m2, {g}, 0.0)"
    return {SCALAR: f"tl.sum({w})", ROW: f"tl.sum({w}, axis=1, keep_dims=True)",
            COLUMN: f"tl.sum({w}, axis=0, keep_dims=True)", ELEMENTWISE: w}[kind]


def _zeros(kind: str) -> str:
    return {SCALAR: "0.0", ROW: "tl.zeros([BV, 1], tl.float32)", COLUMN: "tl.zeros([1, BK], tl.float32)",
            ELEMENTWISE: "tl.zeros([BV, BK], tl.float32)"}[kind]


#: a scan program's opening: its (value block, sequence·head), the sequence's [bos, eos) and the [BV, BK]
#: state tile's indices, masks and offsets (the loop templates here and the block scan, pscan.py)
PROLOGUE = """\
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    if VARLEN:
        bos = tl.load(cu_ptr + i_n).to(tl.int64)
        eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    rows = i_v * BV + tl.arange(0, BV)
    cols = tl.arange(0, BK)
    r2 = rows[:, None]
    c2 = cols[None, :]
    rm2 = r2 < DV
    km2 = c2 < DK
    m2 = rm2 & km2
    soff = r2 * DK + c2
"""


def _update_lines(indent: str, ref: dict, R: int, M: int) -> list[str]:
    """S (in) -> St, p_r, S (out): the normal-form step on printed entries (ref: entry name -> text;
    'lam' present only when there is a decay). The forward and the backward's recompute share it."""
    L = [f"{indent}St = ({ref['lam']}) * S" if "lam" in ref else f"{indent}St = S"]
    for r in range(R):
        L.append(f"{indent}p{r} = tl.sum(St * ({ref[f'a{r}']}), axis=1, keep_dims=True)")
    new = "St"
    for r in range(R):
        new += f" - ({ref[f'c{r}']}) * p{r} * ({ref[f'b{r}']})"
    for m in range(M):
        new += f" + ({ref[f'e{m}']}) * ({ref[f'w{m}']})"
    L.append(f"{indent}S = tl.where(m2, {new}, 0.0)")
    return L


def input_ptr(name: str) -> str:
    """The kernel argument of an input's pointer. A prefix rather than a `_ptr` suffix: the kernels' own
    arguments end in `_ptr` (o_ptr, h0_ptr, ht_ptr, ck_ptr, cu_ptr, do_ptr, ...), and an input named o or h0
    had made the generated source a SyntaxError (a duplicate argument); values are `in_{name}`."""
    return f"arg_{name}"


def forward_head(name, syms, block, prologue, tiles, load_param) -> list[str]:
    """The signature, prologue, parameter loads and initial state of a forward kernel (the token loop's
    fwd_kernel: block "C"; the block scan's pfwd_kernel: "BT"); load_param(symbol name, kind) prints the
    load of a learned parameter, loaded once per program (tiles: how they are shaped, for the comment)."""
    ptrs = ", ".join(input_ptr(s.name) for s in syms)
    pad = " " * (len(name) + 5)
    src = [
        "@triton.jit",
        f"def {name}({ptrs}, o_ptr, h0_ptr, ht_ptr, ck_ptr, cu_ptr, T, H, DK, DV, NCK,",
        f"{pad}BK: tl.constexpr, BV: tl.constexpr, {block}: tl.constexpr, USE_H0: tl.constexpr,",
        f"{pad}STORE_HT: tl.constexpr, SAVE_CK: tl.constexpr, VARLEN: tl.constexpr):",
        prologue.rstrip("\n"),
        f"    # learned parameters: loaded once per program{tiles}",
    ]
    for s in syms:
        sp_ = spec_of(s)
        if sp_.is_parameter:
            src.append(f"    in_{s.name} = {load_param(s.name, sp_.kind)}")
    return src + [
        "    S = tl.zeros([BV, BK], tl.float32)",
        "    if USE_H0:",
        "        S += tl.load(h0_ptr + i_nh.to(tl.int64) * DV * DK + soff, mask=m2, other=0.0).to(tl.float32)",
    ]


def backward_head(name, table, scratch, block, prologue, load, zeros, after_prologue=()) -> list[str]:
    """The signature, prologue and once-per-program parameter loads of a backward kernel (the token loop's
    bwd_kernel: scratch "scr_ptr, ", block "C"; the block scan's pbwd_kernel: "", "BT"): every entry's
    gradient D_ and every in-kernel input's gradient R_ are outputs; load(pointer, kind) and zeros(kind)
    print a parameter's load and its zero accumulator in the kernel's tile vocabulary."""
    vars_, raw = table.vars, table.raw
    args = ", ".join([f"E_{n}" for n in vars_] + [f"X_{x.name}" for x in raw]
                     + [f"D_{n}" for n in vars_] + [f"R_{x.name}" for x in raw])
    pad = " " * (len(name) + 5)
    src = [
        "@triton.jit",
        f"def {name}({args}, do_ptr, dht_ptr, dh0_ptr, ck_ptr, {scratch}cu_ptr, T, TOK, N, H, DK, DV, NCK,",
        f"{pad}BK: tl.constexpr, BV: tl.constexpr, {block}: tl.constexpr, USE_DHT: tl.constexpr,",
        f"{pad}VARLEN: tl.constexpr):",
        prologue.rstrip("\n"),
        *after_prologue,
    ]
    # parameter-only entries: loaded once, gradients accumulated over the sequence
    for n in vars_:
        if table.cls[n] == "param":
            src.append(f"    v_{n} = {load('E_' + n, table.kind[n])}")
            src.append(f"    g_{n} = {zeros(table.kind[n])}")
    # raw inputs of the in-kernel entries: parameters loaded once, gradients accumulated
    for x in raw:
        sx = spec_of(x)
        if sx.is_parameter:
            src.append(f"    in_{x.name} = {load('X_' + x.name, sx.kind)}")
            src.append(f"    gr_{x.name} = {zeros(sx.kind)}")
    return src


def backward_tail(table, store) -> list[str]:
    """The end of a backward kernel: ∂h0, then the gradients accumulated over the sequence for the
    parameter-only entries and the in-kernel entries' parameter inputs; store(pointer, offset, kind,
    value) prints a store in the kernel's tile vocabulary."""
    src = ["    tl.store(dh0_ptr + i_nh.to(tl.int64) * DV * DK + soff, dS, mask=m2)"]
    for n in table.vars:
        if table.cls[n] == "param":
            src.append(f"    {store('D_' + n, f'({partial_slot(table.kind[n])} * N + i_n) * H + i_h', table.kind[n], 'g_' + n)}")
    for x in table.raw:
        sx = spec_of(x)
        if sx.is_parameter:
            src.append(f"    {store('R_' + x.name, f'({partial_slot(sx.kind)} * N + i_n) * H + i_h', sx.kind, 'gr_' + x.name)}")
    return src


def partial_slot(kind) -> str:
    """Partial-sum slot of an entry's gradient: entries without a row index are summed over the value blocks
    (one slot per block, reduced on the host)."""
    return "0" if HAS_ROWS[kind] else "i_v"


def forward_source(form) -> str:
    syms = symbols_of(form)
    ents = entries(form)
    R = len(form.corrections)
    lines, out = codegen(ents, TritonPrinter())
    src = forward_head("fwd_kernel", syms, "C", PROLOGUE, "", lambda s, kind: _load(input_ptr(s), "i_h", kind))
    src += [
        "    for tt in range(bos, eos):",
        "        if SAVE_CK:",
        "            rel = tt - bos",
        "            if rel % C == 0:",
        "                tl.store(ck_ptr + (i_nh.to(tl.int64) * NCK + rel // C) * DV * DK + soff, S, mask=m2)",
        "        tok = tt * H + i_h",
        "        # per-token inputs (fp32/bf16/fp16 in memory, fp32 math)",
    ]
    for s in syms:
        sp_ = spec_of(s)
        if not sp_.is_parameter:
            src.append(f"        in_{s.name} = {_load(input_ptr(s.name), 'tok', sp_.kind)}")
    src.append("        # normal-form entries, printed from sympy (cse)")
    src += [f"        {ln}" for ln in lines]
    for r in range(R):   # reduced vectors: select the padded key lanes away
        src.append(f"        v_a{r} = tl.where(km2, {out[f'a{r}']}, 0.0)")
    src += _update_lines("        ", {**out, **{f"a{r}": f"v_a{r}" for r in range(R)}}, R, len(form.inputs))
    src += [
        f"        v_q = tl.where(km2, {out['q']}, 0.0)",
        "        o = tl.sum(S * v_q, axis=1)",
        "        tl.store(o_ptr + tok * DV + rows, o.to(o_ptr.dtype.element_ty), mask=rows < DV)",
        "    if STORE_HT:",
        "        tl.store(ht_ptr + i_nh.to(tl.int64) * DV * DK + soff, S, mask=m2)",
    ]
    return "\n".join(src) + "\n"


def _sum_to(kind: str, tile: str) -> str:
    """Sum an (already selected) [BV, BK] tile down to the shape of an input of the given kind."""
    return {SCALAR: f"tl.sum({tile})", ROW: f"tl.sum({tile}, axis=1, keep_dims=True)",
            COLUMN: f"tl.sum({tile}, axis=0, keep_dims=True)", ELEMENTWISE: tile}[kind]


def reverse_mode(indent, n, lifted, g, printer, full, scalar_mask, zeros, red, red_par) -> list[str]:
    """Lines accumulating dL/d(raw inputs) of an in-kernel entry n from its gradient tile g: reverse mode
    over the lifted expression (lift_csums: the top expression and its csum σ's, whose adjoints a_σ are
    row / scalar tiles) into a_σ, gr_x (parameters) and r_x (per-token inputs). The tile vocabulary is the
    kernel's (the loop kernels' [BV, BK] tiles, the block scan's [BT, BV, BK]): `full` / `scalar_mask` select
    the entry's lanes / a scalar σ's (which must not be counted once per value row), zeros(kind) starts a σ
    adjoint, red / red_par(kind, tile) sum a selected tile down to a token / parameter input of that kind."""
    top, defs = lifted
    sig_kind = {sym: k for sym, _i, k in defs}
    L = [f"{indent}gt_{n} = tl.where({full}, {g}, 0.0)"]
    for sym, _i, k in defs:
        L.append(f"{indent}a_{sym.name} = {zeros(k)}")
    # derivative expressions, cse'd together
    dexprs, uses = {}, []
    for x in sorted(top.free_symbols, key=lambda x: x.name):
        dexprs[f"t_{x.name}"] = sp.diff(top, x)
        uses.append((x, f"t_{x.name}", f"gt_{n}", full))
    for sym, inner, k in reversed(defs):
        for x in sorted(inner.free_symbols, key=lambda x: x.name):
            key = f"{sym.name}_{x.name}"
            dexprs[key] = sp.diff(inner, x)
            uses.append((x, key, f"a_{sym.name}", full if k != SCALAR else scalar_mask))
    lines, out = codegen(dexprs, printer, prefix=f"xg_{n}_")
    L += [f"{indent}{ln}" for ln in lines]
    # contributions in order: the top level first, then the σ's from the outermost down,
    # so every σ adjoint is complete before it is propagated
    for x, key, adj, mask in uses:
        tile = f"tl.where({mask}, {adj} * ({out[key]}), 0.0)"
        kx = _sym_kind(x, sig_kind)
        if x in sig_kind:
            L.append(f"{indent}a_{x.name} += {red(kx, tile)}")
        elif spec_of(x).is_parameter:
            L.append(f"{indent}gr_{x.name} += {red_par(kx, tile)}")
        else:
            L.append(f"{indent}r_{x.name} += {red(kx, tile)}")
    return L


def backward_source(form) -> str:
    R, M = len(form.corrections), len(form.inputs)
    t = entry_table(form)
    ents, cls, kind, ink, vars_, raw = t.entries, t.cls, t.kind, t.inkernel, t.vars, t.raw
    p = TritonPrinter()
    const = {n: p.doprint(e) for n, e in ents.items() if cls[n] == "const"}
    ref = {n: (const[n] if cls[n] == "const" else f"v_{n}") for n in ents}
    src = backward_head(
        "bwd_kernel", t, "scr_ptr, ", "C", PROLOGUE, lambda ptr, k: _load(ptr, "i_h", k), _zeros,
        ["    scr = scr_ptr + (i_nh.to(tl.int64) * tl.num_programs(0) + i_v) * C * BV * BK + tl.arange(0, BV)[:, None] * BK + c2"])

    def part(n):
        return partial_slot(kind[n])

    # in-kernel entries: value code (csums lifted to σ tiles) and reverse-mode code
    lifted = {n: lift_csums(ents[n], n) for n in ink}

    def pr(e):
        e = sp.sympify(e)
        return p.doprint(e.xreplace({x: sp.Symbol(f"in_{x.name}") for x in e.free_symbols}))

    def load_tokens(indent):
        L = [f"{indent}v_{n} = {_load('E_' + n, 'tok', kind[n])}" for n in vars_ if cls[n] == "token"]
        for x in raw:
            sx = spec_of(x)
            if not sx.is_parameter:
                L.append(f"{indent}in_{x.name} = {_load('X_' + x.name, 'tok', sx.kind)}")
        for n in ink:
            top, defs = lifted[n]
            for sym, inner, _k in defs:
                L.append(f"{indent}in_{sym.name} = tl.sum(tl.where(km2, {pr(inner)}, 0.0), axis=1, keep_dims=True)")
            lines, out = codegen({"v": top}, p, prefix=f"xv_{n}_")
            L += [f"{indent}{ln}" for ln in lines]
            L.append(f"{indent}v_{n} = {out['v']}")
        return L

    def inkernel_grad(indent, n, g):
        """dL/d(raw inputs) of an in-kernel entry from its [BV, BK] gradient tile g."""
        return reverse_mode(indent, n, lifted[n], g, p, "m2", "km2", _zeros, _sum_to, _sum_to)

    def step(indent):
        return _update_lines(indent, ref, R, M)

    def grad(indent, n, g):
        """Emit the gradient of entry n from the [BV, BK] tile expression g."""
        if cls[n] == "const":
            return []
        if n in ink:
            return inkernel_grad(indent, n, g)
        red = _reduce(kind[n], g)
        if cls[n] == "param":
            return [f"{indent}g_{n} += {red}"]
        base = f"{part(n)} * TOK * H + tok"
        return [f"{indent}{_store('D_' + n, base, kind[n], red)}"]

    def raw_init(indent):
        return [f"{indent}r_{x.name} = {_zeros(spec_of(x).kind)}" for x in raw if not spec_of(x).is_parameter]

    def raw_store(indent):
        L = []
        for x in raw:
            sx = spec_of(x)
            if not sx.is_parameter:
                slot = partial_slot(sx.kind)
                L.append(f"{indent}{_store('R_' + x.name, f'{slot} * TOK * H + tok', sx.kind, 'r_' + x.name)}")
        return L

    src += [
        "    dS = tl.zeros([BV, BK], tl.float32)",
        "    if USE_DHT:",
        "        dS += tl.load(dht_ptr + i_nh.to(tl.int64) * DV * DK + soff, mask=m2, other=0.0)",
        "    nck = (eos - bos + C - 1) // C",
        "    for jc in range(0, nck):",
        "        ic = nck - 1 - jc",
        "        t0 = bos + ic * C",
        "        t1 = tl.minimum(t0 + C, eos)",
        "        S = tl.load(ck_ptr + (i_nh.to(tl.int64) * NCK + ic) * DV * DK + soff, mask=m2, other=0.0).to(tl.float32)",
        "        # recompute the chunk's states S_{t-1} into the scratch buffer",
        "        for tt in range(t0, t1):",
        "            tl.store(scr + (tt - t0) * BV * BK, S)",
        "            tok = tt * H + i_h",
    ]
    src += load_tokens("            ")
    src += step("            ")
    src += [
        "        tl.debug_barrier()",
        "        # adjoint, backwards through the chunk",
        "        for jt in range(0, t1 - t0):",
        "            tt = t1 - 1 - jt",
        "            tok = tt * H + i_h",
        "            Sp = tl.load(scr + (tt - t0) * BV * BK)",
    ]
    I = "            "
    src += load_tokens(I)
    src += raw_init(I)
    src.append(f"{I}S = Sp")
    src += step(I)
    src += [f"{I}do = tl.load(do_ptr + tok * DV + r2, mask=rm2, other=0.0).to(tl.float32)",
            f"{I}dS += do * {ref['q']}"]
    src += grad(I, "q", "S * do")
    for m in range(M):
        src += grad(I, f"e{m}", f"dS * {ref[f'w{m}']}")
        src += grad(I, f"w{m}", f"dS * {ref[f'e{m}']}")
    src.append(f"{I}dSt = dS")
    for r in range(R):
        c, a, b = ref[f"c{r}"], ref[f"a{r}"], ref[f"b{r}"]
        src += grad(I, f"c{r}", f"-dS * p{r} * {b}")
        src += grad(I, f"b{r}", f"-dS * {c} * p{r}")
        src.append(f"{I}dp{r} = -tl.sum(tl.where(m2, dS * {c} * {b}, 0.0), axis=1, keep_dims=True)")
        src.append(f"{I}dSt += dp{r} * {a}")
    for r in range(R):
        src += grad(I, f"a{r}", f"dp{r} * St")
    if "lam" in ents:
        src += grad(I, "lam", "dSt * Sp")
        src.append(f"{I}dS = tl.where(m2, dSt * {ref['lam']}, 0.0)")
    else:
        src.append(f"{I}dS = tl.where(m2, dSt, 0.0)")
    src += raw_store(I)
    src.append("        tl.debug_barrier()")
    src += backward_tail(t, _store)
    return "\n".join(src) + "\n"


HEADER = '''\
# Generated by olssm.kernels.triton from a derived Rule. Do not edit.
#
{rule}
#
# structure: {structure}
import triton
import triton.language as tl

'''


def module_source(rule) -> str:
    from .pscan import module_source as pscan_source
    form = rule.form
    text = "\n".join("#   " + ln for ln in str(rule).splitlines())
    ps = pscan_source(form)   # block-parallel-scan kernels pfwd/pbwd (rules without corrections)
    return (HEADER.format(rule=text, structure=form.structure)
            + forward_source(form) + "\n\n" + backward_source(form) + ("\n\n" + ps if ps else ""))


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:20]
