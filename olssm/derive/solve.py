"""Closed-form solutions of the first-order conditions: implicit, explicit, exact (see NOTES.md)."""
from __future__ import annotations

import itertools
import os
import sys
import warnings
from collections import defaultdict

import numpy as np
import sympy as sp

from ..objectives.core import (COLUMN, ELEMENTWISE, ROW, SCALAR, DerivationError, IndefiniteHessianWarning,
                               InputSymbol, MemorylessWarning, Objective, UnknownSignWarning, csum, kind_of, spec_of)
from .gradient import check_quadratic, gradient, is_proximal, split_vector
from .rule import Correction, ExactForm, InputTerm, NormalForm, RLSForm, check_printable, text

MAX_RANK = 4


def simplify(e) -> sp.Expr:
    e = sp.sympify(e)
    if e.is_Number or e.is_Symbol:
        return e
    e = sp.cancel(sp.together(e))
    f = sp.factor(e)
    e = f if sp.count_ops(f) <= sp.count_ops(e) else e
    num, den = sp.fraction(e)
    if den != 1 and den.could_extract_minus_sign():
        # cancel() may leave −(…)/(−…); print the positive-leading form (1 + β‖k‖², not −1 − β‖k‖²)
        num, den = sp.expand(-num) if num.is_Add else -num, sp.expand(-den)
        return sp.Mul(num, sp.Pow(den, -1), evaluate=False)
    return e


class _Row:
    """A row vector  Σ coef (S̃·a) bᵀ + ident·S̃ + Σ coef wᵀ, the algebra of one solved row."""

    def __init__(self):
        self.proj = defaultdict(lambda: sp.Integer(0))   # (a, b) -> coef of (S̃ a) bᵀ
        self.const = defaultdict(lambda: sp.Integer(0))  # w -> coef of wᵀ

    def dot(self, u):
        """(this row)·u as (dict a -> coef of S̃a, scalar/row constant); S̃ itself contributes S̃u."""
        proj = defaultdict(lambda: sp.Integer(0))
        proj[u] += 1
        for (a, b), c in self.proj.items():
            proj[a] += c * csum(b * u)
        const = sp.Integer(0)
        for w, c in self.const.items():
            if kind_of(c) == ELEMENTWISE:
                raise DerivationError(
                    f"the input term {c}·{w} is elementwise and meets a low-rank correction: "
                    "its projection onto a key has no closed form here")
            const += c * csum(w * u)
        return proj, const


def _vec(table: dict, coef, vec):
    c, v = split_vector(vec)
    table[v] += coef * c


def _finish(rule_decay, row: _Row, mode: str, obj: Objective, extra_notes=()) -> NormalForm:
    corrections = []
    for (a, b), c in row.proj.items():
        c = simplify(-c)
        if c != 0:
            corrections.append(Correction(c, a, b))
    inputs = []
    for w, e in row.const.items():
        e = simplify(e)
        if e != 0:
            inputs.append(InputTerm(e, w))
    return NormalForm(decay=simplify(rule_decay), corrections=tuple(corrections), inputs=tuple(inputs),
                      readout=obj.readout, mode=mode, notes=tuple(extra_notes))


def _hessian_split(delta, has_lowrank, what):
    """δ = row part × column part: B⁻¹ = diag(1/col)/row. Elementwise δ only without low rank."""
    k = kind_of(delta)
    if k in (SCALAR, ROW):
        return delta, sp.Integer(1)
    if k == COLUMN:
        return sp.Integer(1), delta
    # a product of per-row and per-column factors (a row weight β on ‖(S − S_prev) diag(g)‖²: δ = β g²) splits as it
    # stands; it had been refused as elementwise
    factors = sp.Mul.make_args(sp.factor(delta))
    row_part = sp.Mul(*[f for f in factors if kind_of(f) in (SCALAR, ROW)])
    col_part = sp.Mul(*[f for f in factors if kind_of(f) == COLUMN])
    if sp.cancel(row_part * col_part - delta) == 0 and kind_of(col_part) == COLUMN:
        return row_part, col_part
    if has_lowrank:
        raise DerivationError(
            f"{what}: the diagonal part of the Hessian, {delta}, depends on both the value row and the "
            "key column while a low-rank part is present; (diag + low rank)⁻¹ then has no row-shared "
            "factors. Make the diagonal weights per row or per column, or drop the regression term")
    return delta, sp.Integer(1)  # elementwise: handled as an elementwise decay, no corrections


def _caller_level() -> int:
    """warnings.warn's stacklevel of the first frame outside olssm (the user's derive call, however deep)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(root + os.sep):
        level, frame = level + 1, frame.f_back
    return level


def _holds(e, prop: str) -> bool:
    """sympy's sign query `prop` ('is_positive', 'is_nonnegative', ...) on e, true where it is provable from the
    declared domains: sympy's assumptions state only the lower bounds, so the query is also asked of e with every
    'unit' input c written as 1/(1 + t), t > 0 ((0, 1)) and every 'decay' input as 1/(1 + t), t ≥ 0 ((0, 1]), an
    onto reparameterisation. Without it 1 − c² (a 'unit' cross-term weight beside two squared losses) or a
    Hessian diagonal 1 − c read as of open sign and warned. A sum of nonnegative terms (‖k‖²) is asked about as
    positive (_nonzero_norms): b/‖k‖² is ≥ 0 wherever it is defined, and had warned of an open sign."""
    e = sp.sympify(e)
    if getattr(e, prop) is True:
        return True
    subs = _nonzero_norms(e)
    for x in e.free_symbols:
        if isinstance(x, InputSymbol) and x.spec.domain in ("unit", "decay"):
            t = (sp.Dummy(f"t_{x.name}", positive=True) if x.spec.domain == "unit"
                 else sp.Dummy(f"t_{x.name}", nonnegative=True))
            subs[x] = 1 / (1 + t)
    if not subs:
        return False
    b = sp.together(e.xreplace(subs))
    return getattr(b, prop) is True or getattr(sp.factor(sp.cancel(b)), prop) is True


def _nonzero_norms(e) -> dict:
    """{csum(x): a positive dummy} for each sum over the key index of nonnegative terms in e (‖k‖², kᵀk): where one is
    0 an expression dividing by it is infinite, whatever its sign or realness, so the sign and realness queries read
    it as positive."""
    return {c: sp.Dummy(f"norm{i}", positive=True)
            for i, c in enumerate(sorted(sp.sympify(e).atoms(csum), key=sp.default_sort_key)) if c.is_nonnegative}


def _no_negative_squares(g, where, shared: set):
    """A squared loss ‖S u − y‖² with a weight that is negative for every input adds −c u uᵀ to the Hessian:
    the objective then has no minimum once ‖u‖ is large (the "minimiser" a derivation would return is a
    saddle point). A vector that shares an independent part with another (S k beside S (k + k₁)) is read over the
    parts by _coupled_squares instead: ½‖S (k + k₁)‖² + ½‖S (k − k₁)‖² − ½‖S k‖² is positive definite, and had been
    refused for its −½‖S k‖² (shared: _shared_vectors(g))."""
    for (u, w), c in g.lowrank.items():
        if u == w and u not in shared:
            # of open sign: the closed form is the minimiser only while the weight is >= 0 (a layer feeds a
            # real-domain input from a plain linear projection: negative values came out as NaN where 1 + c‖u‖²
            # crossed 0)
            _nonnegative(c, f"{where}: the squared loss on S {u} has weight {c} < 0, so the objective is not convex "
                            f"in S and has no minimum for large ‖{u}‖; use a nonnegative weight",
                         f"{where}: the squared loss on S {u} has weight {c}")


def _coupled_squares(g, obj, where, shared: set):
    """The low-rank part of the Hessian per row is U R Uᵀ (U = [u_1 … u_p], R the weights of the squared losses on
    S u_m and of the cross terms ⟨S u_m, S u_n⟩ between them). A vector may be a combination of others (S (k + a k₁)
    beside ⟨S k, S k₁⟩), so U = A C with A the independent vectors the u_m are made of (_independent_vectors: the
    declared inputs and their elementwise products, anything else one vector of its own) and the form is
    A (Cᵀ R C) Aᵀ: R read over the u_m as if independent had warned on objectives that are positive definite
    (½‖S (k + k₁) − v‖² − ⟨S k, S k₁⟩ = ½‖S k‖² + ½‖S k₁‖² − …). For vectors A in general position A R' Aᵀ
    (R' = Cᵀ R C) has R''s inertia on span(A) and grows with ‖a‖², so P = diag(δ) + A R' Aᵀ is positive definite for
    every key only if R' is positive semidefinite; a negative eigenvalue of R' makes the stationary point a saddle
    once the keys are large. R' is PSD iff every principal minor is ≥ 0. Without cross terms R is diagonal, its
    entries the squared losses' weights, which _no_negative_squares checks, and then R' ⪰ 0 too: nothing to read.
    Otherwise the diagonal entries of R' that are not such a weight are read, and the minors of blocks with a cross
    term, within each group of coupled vectors (R' is block diagonal over them), every one up to ALL_MINORS_UP_TO
    vectors and beyond that the eigenvalues (a numeric block; a 5×5 R' can have every smaller principal minor ≥ 0
    and a negative determinant, e.g. I − 0.22 J) or the leading minors (a symbolic one): a minor or eigenvalue < 0
    (a minor ≤ 0 and not 0) warns IndefiniteHessianWarning, a minor of open sign UnknownSignWarning, ≥ 0 for every
    input nothing."""
    pairs = {k: v for k, v in g.lowrank.items() if v != 0}
    coupled = {(u, w) for (u, w) in pairs if u != w}
    if not coupled and not shared:
        return
    vecs = sorted({x for pair in pairs for x in pair}, key=sp.default_sort_key)
    R = sp.Matrix(len(vecs), len(vecs), lambda m, n: (sp.sympify(pairs.get((vecs[m], vecs[n]), 0))
                                                       + pairs.get((vecs[n], vecs[m]), 0)) / 2)
    parts = {u: _independent_vectors(u) for u in vecs}
    weights = "the weights of the squared losses and cross terms on them"
    if all(parts[u] == {u: 1} for u in vecs):
        basis, read_diagonal = vecs, set()
    else:
        weights += " (with " + ", ".join(text(u) for u in vecs if parts[u] != {u: 1}) + " written over their parts)"
        basis = sorted({a for u in vecs for a in parts[u]}, key=sp.default_sort_key)
        C = sp.Matrix(len(vecs), len(basis), lambda m, n: parts[vecs[m]].get(basis[n], 0))
        R = (C.T * R * C).applyfunc(sp.cancel)
        # a diagonal entry of R' that is not one squared loss's weight (checked already) can be negative alone:
        # ⟨S (k + k₁), S (k − k₁)⟩ = ‖S k‖² − ‖S k₁‖² has R' = diag(2, −2)
        read_diagonal = {i for i, a in enumerate(basis) if sp.cancel(R[i, i] - pairs.get((a, a), 0)) != 0}
    group = {i: {i} for i in range(len(basis))}       # connected components of the coupling graph
    for m, n in itertools.combinations(range(len(basis)), 2):
        if R[m, n] != 0:
            merged = group[m] | group[n]
            for i in merged:
                group[i] = merged
    components = {frozenset(c) for c in group.values() if len(c) > 1 or c & read_diagonal}
    open_minor, symbolic = None, 0
    for comp in sorted(components, key=min):          # basis is sorted: the block of the first vector first
        idx_all = sorted(comp)
        for idx in itertools.chain(((i,) for i in idx_all if i in read_diagonal), _minor_indices(idx_all, R)):
            sub = R.extract(list(idx), list(idx))
            if len(idx) > 1 and sub.is_diagonal():    # its diagonal entries are weights or read above
                continue
            if sub.free_symbols:
                symbolic += 1
                if symbolic > SYMBOLIC_MINORS:
                    break
            names = [basis[i] for i in idx]
            if not sub.free_symbols and len(idx) > ALL_MINORS_UP_TO:
                # a numeric block: its smallest eigenvalue decides at once (2^p principal minors would not)
                lowest = float(np.linalg.eigvalsh(np.array(sub.evalf(), dtype=float))[0])
                if lowest < -1e-12 * max(1.0, float(max(abs(x) for x in sub.evalf()))):
                    _warn_indefinite(obj, where, names, sub, f"the eigenvalue {lowest:.3g}", "negative", weights)
                    return
                continue
            minor = simplify(sub.det(method="berkowitz")) if len(idx) > 1 else simplify(sub[0, 0])
            if minor == 0:
                continue
            if _holds(minor, 'is_nonpositive'):
                sign = ("negative for every input" if _holds(minor, 'is_negative') else
                        "≤ 0 for every input and 0 only where the coupling vanishes")
                _warn_indefinite(obj, where, names, sub, f"the principal minor {text(minor)}", sign, weights)
                return
            if open_minor is None and not _holds(minor, 'is_nonnegative'):
                open_minor = (names, sub, minor)
    if open_minor is not None:
        names, sub, minor = open_minor
        _open_sign(f"{where}: {_coupling_terms(obj, names)}; {weights}, R = {_matrix_text(sub)}, are positive "
                   f"semidefinite (and the Hessian in S with them, for every key) only while the principal minor "
                   f"{text(minor)} is >= 0", minor, ">= 0")


def _shared_vectors(g) -> set:
    """The squared losses' and cross terms' vectors that share an independent part (_independent_vectors) with
    another of them: their weights mean something only over the parts."""
    vecs = {x for pair, c in g.lowrank.items() if c != 0 for x in pair}
    parts = {u: set(_independent_vectors(u)) for u in vecs}
    return {u for u in vecs if any(parts[u] & parts[w] for w in vecs if w != u)}


def _independent_vectors(u) -> dict:
    """u as {vector: coefficient}, a combination of vectors that are independent for inputs in general position: the
    products of key-indexed factors (k, k ⊙ g, exp(k), 1) with the scalar or per-row rest as coefficients, so that
    k + a·k₁ is {k: 1, k₁: a}. A factor sympy does not expand (exp(k + k₁)) stays one vector, as before: treating
    dependent vectors as independent can only make the check stricter (R ⪰ 0 implies Cᵀ R C ⪰ 0)."""
    out = defaultdict(lambda: sp.Integer(0))
    for term in sp.Add.make_args(sp.expand(u, mul=True, multinomial=True, power_exp=False, power_base=False,
                                           log=False)):
        vec, coef = [], []
        for f in sp.Mul.make_args(term):
            (vec if kind_of(f) in (COLUMN, ELEMENTWISE) else coef).append(f)
        out[sp.Mul(*vec)] += sp.Mul(*coef)
    return {v: c for v, c in out.items() if c != 0}


#: symbolic principal minors read per objective at most, smallest first (each sign query on 'unit' / 'decay' inputs
#: takes ~0.1-1 s: eight keys coupled by 'unit' weights had taken minutes); the rest are not checked (NOTES.md)
SYMBOLIC_MINORS = 40
#: principal minors of a coupled block read at every size up to this one (2^p of them for p vectors: 57 symbolic
#: 6×6 determinants took 19 s, 8 vectors minutes). A larger block is decided by its eigenvalues when it is numeric,
#: else by these minors plus its leading principal minors of every larger size: necessary conditions only, so a
#: large symbolic block can be indefinite without a warning (derive/NOTES.md)
ALL_MINORS_UP_TO = 4


def _minor_indices(idx_all, R):
    """The principal submatrices _coupled_squares reads (ALL_MINORS_UP_TO), smallest first."""
    p = len(idx_all)
    for size in range(2, min(p, ALL_MINORS_UP_TO) + 1):
        yield from itertools.combinations(idx_all, size)
    if p > ALL_MINORS_UP_TO:
        if not R.extract(idx_all, idx_all).free_symbols:
            yield tuple(idx_all)                       # numeric: the eigenvalues of the whole block
        else:
            for size in range(ALL_MINORS_UP_TO + 1, p + 1):
                yield tuple(idx_all[:size])


def _warn_indefinite(obj, where, names, sub, evidence, sign, weights):
    """IndefiniteHessianWarning: the weights R on these vectors are not positive semidefinite (evidence: a minor or
    an eigenvalue of R, and its sign; weights: what R is, in words)."""
    warnings.warn(
        f"{where}: the Hessian in S is indefinite for large keys: {_coupling_terms(obj, names)}, "
        f"and {weights}, R = {_matrix_text(sub)}, have "
        f"{evidence}, {sign} (R is not positive semidefinite). Once the keys are large enough that U R Uᵀ outweighs "
        "the diagonal part (the proximal term / ridge), the objective has no minimum and the derived update is a "
        "stationary point (a saddle), not the minimiser; olssm.verify reports those steps as 'no minimum'. "
        + (f"Make the coupling part of a squared norm (e.g. ‖S ({' + '.join(map(str, names))}) − v‖²), or use "
           if len(names) > 1 else "Use ")
        + "update='explicit' (a gradient step needs no minimum)", IndefiniteHessianWarning, stacklevel=_caller_level())


def _matrix_text(M) -> str:
    return "[" + "; ".join(", ".join(text(M[i, j]) for j in range(M.cols)) for i in range(M.rows)) + "]"


def _coupling_terms(obj, names) -> str:
    """'the term(s) … couple(s) S u and S w': the objective's terms that pair S u with S w for two different vectors,
    or square a combination of vectors (‖S (k + k₁) − v‖²), where both u and w are made of vectors in `names`, as the
    user wrote them."""
    found, names = [], set(names)
    for t in obj.expr.terms:
        if is_proximal(t):
            continue
        for u, w in gradient([t]).lowrank:
            parts_u, parts_w = _independent_vectors(u), _independent_vectors(w)
            if (u != w or len(parts_u) > 1) and names & set(parts_u) and names & set(parts_w):
                ab = f"‖{t.a}‖²" if t.a is t.b else f"⟨{t.a}, {t.b}⟩"
                weight = "" if t.weight == 1 else f"_{t.weight}"
                c = "" if t.coef == 1 else f"{t.coef}·"
                found.append(f"{c}{ab}{weight}")
                break
    pair = " and ".join(f"S {text(x)}" for x in sorted(names, key=sp.default_sort_key))
    # one vector: a diagonal entry of R' (⟨S (k + k₁), S (k − k₁)⟩ weighs ‖S k₁‖² by −1), which no term couples alone
    verb = ("acts on", "act on") if len(names) == 1 else ("couples", "couple")
    if len(found) == 1:
        return f"the term {found[0]} {verb[0]} {pair}"
    return f"the terms {' and '.join(found)} {verb[1]} {pair}" if found else f"cross terms {verb[1]} {pair}"


def _open_sign(what, expr, need):
    """An UnknownSignWarning at the user's line, naming the expression's inputs and their declared domains."""
    warnings.warn(f"{what}, whose sign the declared domains do not fix ({_domains(expr)}); the derived update is the "
                  f"minimiser only while it is {need}. Declare the inputs' domains so that it is (e.g. "
                  "domain='positive' or 'unit'; a layer then keeps them so)", UnknownSignWarning,
                  stacklevel=_caller_level())


def derive_implicit(obj: Objective) -> NormalForm:
    g = gradient(obj.expr.terms)
    if not g.has_state:
        raise DerivationError(
            f"implicit update of {obj.expr}: the objective is linear in S (no quadratic term), so it has "
            "no minimiser; add a proximal term such as sqnorm(S - S_prev)/2, or use update='explicit'")
    if g.diag == 0:
        raise DerivationError(
            f"implicit update of {obj.expr}: the Hessian is pure low rank (no identity/diagonal part), "
            "so the minimiser is not unique; add a proximal term sqnorm(S - S_prev)/2 or a ridge")
    if _holds(g.diag, 'is_nonpositive'):
        raise DerivationError(f"implicit update of {obj.expr}: the diagonal of the Hessian, {g.diag}, is "
                              "never positive: the objective has no minimum")
    if not _holds(g.diag, 'is_positive'):   # e.g. ½‖S − S_prev‖² + ½ b‖S‖² with b of open sign: 1 + b
        _open_sign(f"implicit update of {obj.expr}: the diagonal of the Hessian is {g.diag}", g.diag, "> 0")
    shared = _shared_vectors(g)
    _no_negative_squares(g, f"implicit update of {obj.expr}", shared)
    if len({x for pair in g.lowrank for x in pair}) <= MAX_RANK:   # more is refused below
        _coupled_squares(g, obj, f"implicit update of {obj.expr}", shared)
    row_part, col_part = _hessian_split(g.diag, bool(g.lowrank), f"implicit update of {obj.expr}")
    decay = -g.prev_diag / g.diag
    row = _Row()
    # r B⁻¹ with r = −(p ⊙ π + Σ Q (p·u)uᵀ + Σ z wᵀ) and B⁻¹ = diag(1/col)/row
    if g.prev_lowrank:
        if simplify(decay - 1) != 0:
            raise DerivationError(
                f"implicit update of {obj.expr}: a term projects S_prev onto a key ({_first(g.prev_lowrank)}) "
                f"while S_prev is also decayed by {simplify(decay)}; the normal form projects only the "
                "decayed state S̃. Remove the projection of S_prev or the decay")
        for (u, w), c in g.prev_lowrank.items():
            row.proj[(u, _div(w, col_part))] += -c / row_part
    for w, c in g.const.items():
        _vec(row.const, -c / row_part, _div(w, col_part))
    if g.lowrank:
        vecs = sorted({v for pair in g.lowrank for v in pair}, key=sp.default_sort_key)
        p = len(vecs)
        if p > MAX_RANK:
            raise DerivationError(f"implicit update of {obj.expr}: the low-rank part has rank {p} > {MAX_RANK} "
                                  f"(the closed form inverts a {p}×{p} matrix symbolically); use at most {MAX_RANK} "
                                  "distinct vectors in the squared losses, or update='exact' (sufficient statistics, "
                                  "any number of keys) or update='explicit' (one gradient step)")
        R = sp.Matrix(p, p, lambda m, n: g.lowrank.get((vecs[m], vecs[n]), 0))
        G = sp.Matrix(p, p, lambda m, n: csum(vecs[m] * vecs[n] / col_part) / row_part)
        A = sp.eye(p) + G * R
        det = sp.cancel(A.det(method="berkowitz"))
        if det == 0:
            raise DerivationError(f"implicit update of {obj.expr}: I + G R is singular for every input")
        M = R * A.adjugate(method="berkowitz") / det
        # s = rB⁻¹ − Σ_kl M_kl (rB⁻¹·u_k) (B⁻¹u_l)ᵀ
        dots = [row.dot(v) for v in vecs]
        for kk in range(p):
            proj, const = dots[kk]
            for ll in range(p):
                m = sp.cancel(M[kk, ll])
                if m == 0:
                    continue
                b = _div(vecs[ll], col_part)
                for a, c in proj.items():
                    row.proj[(a, b)] += -m * c / row_part
                if const != 0:
                    _vec(row.const, -m * const / row_part, b)
    return _finish(decay, row, "implicit", obj)


def _div(w, col_part):
    return w if col_part == 1 else w / col_part


def _first(d):
    return next(iter(d))


def derive_explicit(obj: Objective) -> NormalForm:
    prox_terms = [t for t in obj.expr.terms if is_proximal(t)]
    loss_terms = [t for t in obj.expr.terms if not is_proximal(t)]
    weight = sp.Integer(1)   # the proximal part's weight ω: its gradient is ω ⊙ (S − C)
    if obj.decay is not None or not prox_terms:
        centre = sp.Integer(1) if obj.decay is None else obj.decay
        loss_terms = obj.expr.terms
        if obj.decay is not None and prox_terms:
            gp = gradient(prox_terms)
            if gp.prev_diag != 0:
                raise DerivationError(
                    f"explicit update of {obj.expr}: give the proximal centre either as decay= or as a "
                    "term sqnorm(S - C)/2 in the objective, not both")
    else:
        gp = gradient(prox_terms)
        if gp.diag == 0 or gp.lowrank or gp.prev_lowrank or gp.const:
            raise DerivationError(
                f"explicit update of {obj.expr}: the proximal part {[str(t.a) for t in prox_terms]} must "
                "be of the form ‖S − Λ⊙S_prev‖² (its minimiser is the centre of the gradient step)")
        centre = -gp.prev_diag / gp.diag
        weight = gp.diag
        # the step minimises ω ⊙ ‖S − C‖²/2 plus the linearised loss: a minimum only where ω > 0 (ω < 0 steps up the
        # loss's gradient, ω = 0 divides by 0). Unchecked, −‖S − S_prev‖²/2 had derived a gradient ascent silently
        if _holds(weight, "is_nonpositive"):
            raise DerivationError(
                f"explicit update of {obj.expr}: the proximal part's weight {weight} is ≤ 0, so the step "
                "C − η ∇ℓ(C) ⊘ ω has no minimum behind it (a weight < 0 steps up the gradient); use a positive "
                "weight (e.g. sqnorm(S - S_prev)/2, or a weight of domain 'positive')")
        if not _holds(weight, "is_positive"):
            _open_sign(f"explicit update: the proximal part's weight is {weight}", weight, "> 0")
    eta = sp.Integer(1) if obj.step_size is None else obj.step_size
    if kind_of(eta) not in (SCALAR, ROW):
        raise DerivationError(f"explicit update: step_size {eta} must be a scalar or per-row rate, "
                              f"got a {kind_of(eta)} expression")
    g = gradient(loss_terms)
    if not (g.has_state or g.const or g.prev_diag != 0 or g.prev_lowrank):
        raise DerivationError(f"explicit update of {obj.expr}: the loss does not depend on S")
    # the step minimises the proximal part plus the loss linearised at C: ω ⊙ (S − C) + η ∇ℓ(C) = 0, so
    # S = C − η ∇ℓ(C) ⊘ ω (ω had been dropped: c‖S − S_prev‖²/2 stepped as if c = 1). A scalar or per-row ω divides
    # the coefficients, a per-column one the key side of each term; an elementwise one cannot factor a low-rank term
    by_row, by_col = (weight, 1) if kind_of(weight) in (SCALAR, ROW) else (1, weight)
    if kind_of(weight) == ELEMENTWISE and (g.lowrank or g.prev_lowrank or g.const):
        raise DerivationError(
            f"explicit update of {obj.expr}: the proximal part's weight {weight} is elementwise, so the step "
            "C − η ∇ℓ(C) ⊘ ω divides each low-rank term (S̃ a) bᵀ entry by entry, which the normal form cannot "
            "express; use a scalar, per-row or per-column weight, or update='implicit'")
    row = _Row()
    decay = centre
    if g.diag != 0 or g.prev_diag != 0:
        if g.lowrank or g.prev_lowrank:
            raise DerivationError(
                f"explicit update of {obj.expr}: the loss has both an elementwise part ({g.diag} on S) and "
                "a low-rank part; one gradient step then rescales S̃ after projecting it, which the "
                "normal form S̃ − Σ c (S̃a)bᵀ cannot express. Use update='implicit' or move the "
                "elementwise term into decay=")
        decay = centre - eta * (centre * g.diag + g.prev_diag) / weight
    for (u, w), c in g.lowrank.items():
        row.proj[(u, w / by_col)] += -eta * c / by_row
    if g.prev_lowrank:
        if simplify(centre - 1) != 0:
            raise DerivationError(
                f"explicit update of {obj.expr}: the loss projects S_prev onto a key while the centre is "
                f"{centre}⊙S_prev; project the state S instead")
        for (u, w), c in g.prev_lowrank.items():
            row.proj[(u, w / by_col)] += -eta * c / by_row
    for w, c in g.const.items():
        _vec(row.const, -eta * c / by_row, w / by_col)
    return _finish(decay, row, "explicit", obj)


def derive_exact(obj: Objective) -> ExactForm:
    g = gradient(obj.expr.terms)
    where = f"exact (decayed least squares) update of {obj.expr}"
    if g.prev_diag != 0 or g.prev_lowrank:
        raise DerivationError(f"{where}: the per-token loss may not depend on S_prev (the prefix sum "
                              "replaces the proximal term); drop S_prev or use update='implicit'")
    if not g.has_state:
        raise DerivationError(f"{where}: the per-token loss is linear in S; least squares needs squares")
    shared = _shared_vectors(g)
    _no_negative_squares(g, where, shared)
    _coupled_squares(g, obj, where, shared)
    for (u, w), c in g.lowrank.items():
        if kind_of(c) != SCALAR:
            raise DerivationError(
                f"{where}: the weight {c} of the regression term on {u} differs per value row; then every "
                "row has its own Gram matrix (d_v·d_k² state). Use a scalar (per-head) weight")
    if kind_of(g.diag) not in (SCALAR, COLUMN):
        raise DerivationError(f"{where}: the diagonal term {g.diag} must be scalar or per key column")
    gamma = sp.Integer(1) if obj.decay is None else obj.decay
    if kind_of(gamma) != SCALAR:
        raise DerivationError(f"{where}: decay {gamma} must be a scalar per head and token (a forgetting "
                              f"factor), got a {kind_of(gamma)} expression")
    ridge = sp.Integer(0) if obj.ridge is None else obj.ridge
    if kind_of(ridge) not in (SCALAR, COLUMN):
        raise DerivationError(f"{where}: ridge {ridge} must be scalar or per key column")
    if g.diag == 0 and ridge == 0:
        raise DerivationError(f"{where}: no ridge and no diagonal term, so H_t = Σ γ k kᵀ is singular until d_k "
                              "independent keys have arrived and x_t = H_t⁻¹ q_t has no value on the first tokens; "
                              "pass ridge= (e.g. O.parameter('lam', 'scalar', domain='positive'))")
    _exact_signs(g.diag, ridge, gamma, where)
    notes = ()
    gram = tuple(Correction(simplify(c), u, w) for (u, w), c in g.lowrank.items())
    moments = tuple(InputTerm(simplify(-c), w) for w, c in g.const.items())
    if obj.ridge_decays:
        return _rls_form(obj, where, simplify(gamma), gram, simplify(g.diag), moments, simplify(ridge))
    return ExactForm(decay=simplify(gamma), gram=gram, gram_diag=simplify(g.diag), moments=moments,
                     ridge=simplify(ridge), readout=obj.readout, mode="exact", notes=notes)


def _exact_signs(diag, ridge, gamma, where):
    """H_t + λ I = Σ_i Π γ (R_i u_i u_iᵀ + diag_i) + λ I is positive definite for every key only if the forgetting
    factor and the per-token ‖S‖² weight are ≥ 0 (older tokens' terms keep their sign, the diagonal accumulates)
    and the first token's diagonal diag + λ is > 0 (on keys orthogonal to u it is H_0's eigenvalue). Negative for
    every input: a refusal, as for a negative squared-loss weight; of open sign: UnknownSignWarning. These had not
    been checked: a 'real' ridge derived silently and verify reported steps without a minimum."""
    if gamma != 1:
        _nonnegative(gamma, f"{where}: the forgetting factor {gamma} is negative, so the previous token's squared "
                            "loss enters H_t with a negative weight and the prefix objective has no minimum for "
                            "large keys; use a decay in (0, 1] (domain='decay')",
                     f"{where}: the forgetting factor is {gamma}")
    warned = diag != 0 and _nonnegative(
        diag, f"{where}: the per-token term on ‖S‖² has weight {diag} < 0; it accumulates over the prefix, so H_t "
              "loses its minimum on long sequences; use a nonnegative weight (or the ridge= for a prior)",
        f"{where}: the per-token term on ‖S‖² has weight {diag} (it accumulates over the prefix)")
    h0 = simplify(diag + ridge)
    if _holds(h0, "is_nonpositive"):
        raise DerivationError(f"{where}: the first token's Hessian is R u uᵀ + ({h0}) I, whose eigenvalue {h0} ≤ 0 "
                              "(on keys orthogonal to u) leaves the objective without a minimum; use a positive "
                              "ridge (e.g. O.parameter('lam', 'scalar', domain='positive'))")
    if not warned and not _holds(h0, "is_positive"):
        what = "the ridge" if diag == 0 else "the ridge plus the per-token ‖S‖² weight"
        _open_sign(f"{where}: {what} is {h0}, the first token's Hessian's eigenvalue on keys orthogonal to u",
                   h0, "> 0")


def _nonnegative(x, refusal: str, what: str) -> bool:
    """x must be ≥ 0 for every input: a DerivationError (refusal) where it is negative for all of them, an
    UnknownSignWarning (what ...) where its sign is open; True when it warned."""
    if _holds(x, "is_negative"):
        raise DerivationError(refusal)
    if not _holds(x, "is_nonnegative"):
        _open_sign(what, x, ">= 0")
        return True
    return False


def _rls_form(obj, where, gamma, gram, gram_diag, moments, ridge) -> RLSForm:
    """With a decaying ridge, A_t = H_t + λ_t I obeys A_t = γ A_{t-1} + R u uᵀ, so P_t = A_t⁻¹ follows
    by Sherman–Morrison and S_t = G_t P_t = S_{t-1} + (e − R S_{t-1} u) (P_t u)ᵀ (NOTES.md §5)."""
    if len(gram) != 1 or gram[0].a != gram[0].b or gram_diag != 0:
        raise DerivationError(f"{where}: the recursive-least-squares form needs exactly one rank-one "
                              "regression term R‖S u − y‖² per token (Sherman–Morrison); use "
                              "ridge_decays=False for the sufficient-statistics form")
    if kind_of(ridge) != SCALAR:
        raise DerivationError(f"{where}: the RLS form needs a scalar ridge (P_0 = I/λ), got {ridge}")
    if gamma.is_zero:
        raise DerivationError(f"{where}: the RLS form with decay 0 forgets the ridge with the data: A_t = R u uᵀ is "
                              "singular from the first token on (P̃ = P/γ divides by 0); use ridge_decays=False")
    u = gram[0].a
    if any(t.w != u for t in moments) or not moments:
        raise DerivationError(f"{where}: the RLS form needs the targets on the same key as the Gram term")
    target = simplify(sum(t.coef for t in moments))
    return RLSForm(decay=gamma, weight=gram[0].coef, key=u, target=target, ridge=ridge,
                   readout=obj.readout)


def _check_real_finite(form):
    """A coefficient i, nan or ∞ derived a rule that no scan or solver can run (ε = 1/(‖k‖² − i), NaN states). So does
    a part of one that is not real for any input its domain allows (√x with x 'negative': sympy proves it, and the
    torch and triton evaluators, in real arithmetic, returned NaN outputs silently); a function of real inputs whose
    result is real for some of their values only (log y, √y, asin y with y 'real') warns (UnknownSignWarning)."""
    warned = set()
    for e in map(sp.sympify, form.expressions()):
        bad = [a for a in (sp.I, sp.nan, sp.oo, -sp.oo, sp.zoo) if e.has(a)]
        if bad:
            raise DerivationError(f"the derived update has a coefficient that is not a finite real number ({bad[0]} "
                                  f"in {e}): the objective's weights, decays, ridges and step sizes must be real and "
                                  "finite")
        for part in sp.preorder_traversal(e):
            if not isinstance(part, sp.Expr) or not part.args:
                continue
            where = f"the derived update's coefficient {e}" + ("" if part == e else f" contains {part}, which")
            if part.is_extended_real is False:
                raise DerivationError(f"{where} is not real for any "
                                      f"value its inputs' declared domains allow ({_domains(part)}): every scan would "
                                      "return NaN; check the expression or the inputs' domains")
            if part not in warned and _real_for_some_inputs_only(part):
                warned.add(part)
                warnings.warn(f"{where} is real only for some "
                              f"values of its inputs ({_domains(part)}); where it is not, scans return NaN. Declare "
                              "the inputs' domains so that it is real for all of them (e.g. domain='positive')",
                              UnknownSignWarning, stacklevel=_caller_level())


def _domains(expr) -> str:
    return ", ".join(f"{s.name!r}: domain {spec_of(s).domain!r}"
                     for s in sorted(sp.sympify(expr).free_symbols, key=lambda s: s.name))


def _real_for_some_inputs_only(part) -> bool:
    """A function or power of real arguments whose realness sympy cannot decide from their domains: log, a fractional
    power, asin of a 'real' input. (A negative integer power is a division, and 1/√‖k‖² too once the norm is read as
    nonzero: real wherever they are defined.)"""
    if part.is_extended_real is not None or not isinstance(part, (sp.Function, sp.Pow)):
        return False
    if isinstance(part, sp.Pow) and part.exp.is_integer:
        return False
    if part.xreplace(_nonzero_norms(part)).is_extended_real:
        return False
    return all(a.is_extended_real for a in part.args)


def derive_form(obj: Objective):
    form = _derive_form(obj)
    _check_real_finite(form)
    check_printable(form)
    if isinstance(form, NormalForm) and sp.sympify(form.decay) == 0:
        # an explicit step centred on a ridge's minimiser 0 had derived S̃ = 0 silently: weight decay meant, a
        # memoryless rule got
        how = ("its centre, the minimiser of the proximal part, is S = 0; for weight decay give decay=γ (or "
               "½‖S − γ S_prev‖²) instead of λ‖S‖²/2" if obj.update == "explicit" else
               "the objective has no ‖S − S_prev‖² term; add one to keep a memory")
        warnings.warn(f"{obj.update} update of {obj.expr}: the derived rule does not read S_prev (S̃ = 0): each "
                      f"token's state is built from that token alone; {how}", MemorylessWarning,
                      stacklevel=_caller_level())
    return form


def _derive_form(obj: Objective):
    check_quadratic(obj.expr)
    if obj.update == "implicit":
        for f in ("step_size",):
            if getattr(obj, f) is not None:
                raise DerivationError(f"implicit update: {f}= has no meaning (the minimiser is exact); "
                                      "scale the loss term's weight instead")
        if obj.decay is not None or obj.ridge is not None:
            raise DerivationError("implicit update: write decay and ridge into the objective, e.g. "
                                  "sqnorm(S - a*S_prev)/2 + lam*sqnorm(S)/2")
        return derive_implicit(obj)
    if obj.update == "explicit":
        if obj.ridge is not None:
            # (its advice had been lam*sqnorm(S)/2 in the loss with decay=, which the low-rank check then refused)
            raise DerivationError("explicit update: ridge= is for update='exact'; for weight decay give decay=γ, "
                                  "or write the proximal part as sqnorm(S - S_prev)/2 + lam*sqnorm(S)/2 (centre "
                                  "S_prev/(1 + λ), gradient step divided by 1 + λ)")
        return derive_explicit(obj)
    if obj.step_size is not None:
        raise DerivationError("exact update: step_size= has no meaning for least squares over the prefix")
    return derive_exact(obj)
