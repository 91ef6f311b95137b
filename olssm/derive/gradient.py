"""First-order conditions of a quadratic objective, per value row.

For one value row i (s = S[i, :], p = S_prev[i, :]) the gradient of any objective the
language can build has the form

    ∇_s L = s ⊙ δ + Σ_mn R_mn (s·u_m) u_nᵀ + p ⊙ π + Σ_mn Q_mn (p·u_m) u_nᵀ + Σ_n z_n w_nᵀ

with δ, π elementwise coefficients (the diagonal part), R, Q per-row coefficients on outer
products of key-sized vectors u (the low-rank part) and z_n w_nᵀ the constant part, written as
a sum of (row-or-elementwise coefficient) × (key-sized vector). GradForm holds exactly that.
It is computed pairing by pairing (d/dS <a, b>_ρ = ρ (∂a* b + ∂b* a)), never by sympy's matrix
calculus (which silently drops terms, see DESIGN.md), and every coefficient is a sympy
expression that later stages simplify and print.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import sympy as sp

from ..objectives.core import (COLUMN, ELEMENTWISE, ROW, SCALAR, DerivationError, MatrixAffine,
                               Pairing, Quadratic, VectorAffine, kind_of)

ONE = sp.Integer(1)


def split_vector(u) -> tuple[sp.Expr, sp.Expr]:
    """Split a column-kind product into (non-column factor, column factor): 2*beta*k -> (2*beta, k)."""
    u = sp.sympify(u)
    if u.is_Mul:
        col, rest = [], []
        for f in u.args:
            (col if kind_of(f) in (COLUMN, ELEMENTWISE) else rest).append(f)
        return sp.Mul(*rest), sp.Mul(*col)
    if kind_of(u) == SCALAR:
        return u, ONE
    return ONE, u


def separate(expr) -> list[tuple[sp.Expr, sp.Expr]]:
    """Write an (elementwise) constant as Σ coefficient × column vector.

    Each additive term is split into its key-indexed factors (the vector) and the rest; a factor
    that mixes both indices (exp(dt*A)) stays in the coefficient, which is then elementwise.
    """
    out: dict = defaultdict(lambda: sp.Integer(0))
    for term in sp.Add.make_args(sp.expand(sp.sympify(expr), deep=False)):
        if term == 0:
            continue
        col, rest = [], []
        for f in sp.Mul.make_args(term):
            (col if kind_of(f) == COLUMN else rest).append(f)
        out[sp.Mul(*col)] += sp.Mul(*rest)
    return [(c, w) for w, c in out.items() if c != 0]


@dataclasses.dataclass
class GradForm:
    diag: sp.Expr = sp.Integer(0)                                  # δ
    prev_diag: sp.Expr = sp.Integer(0)                             # π
    lowrank: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: sp.Integer(0)))
    prev_lowrank: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: sp.Integer(0)))
    const: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: sp.Integer(0)))
    matrix_const: sp.Expr = sp.Integer(0)

    def add_lowrank(self, table, coef, u_left, u_right):
        """Add coef * (x·u_left) u_rightᵀ, normalising the vectors to their key-indexed factor."""
        cl, vl = split_vector(u_left)
        cr, vr = split_vector(u_right)
        table[(vl, vr)] += coef * cl * cr

    def add_const(self, coef, w):
        cw, vw = split_vector(w)
        self.const[vw] += coef * cw

    def finish(self) -> "GradForm":
        for c, w in separate(self.matrix_const):
            self.const[w] += c
        self.matrix_const = sp.Integer(0)
        # products are distributed, powers of sums are not: a weight (b + λ + 1)²⁰ expanded into its 231 monomials had
        # cost simplify's cancel 34 s (3 s kept whole). Zero is still read off the full expansion (a weight
        # (b + 1)² − b² − 2b − 1 on the proximal part is no Hessian diagonal), which is cheap beside that cancel
        def expand(x):
            e = sp.expand(x, multinomial=False)
            return sp.Integer(0) if e != 0 and e.has(sp.Pow) and sp.expand(e) == 0 else e

        for table in (self.lowrank, self.prev_lowrank, self.const):
            for key_ in list(table):
                table[key_] = expand(table[key_])
                if table[key_] == 0:
                    del table[key_]
        self.diag, self.prev_diag = expand(self.diag), expand(self.prev_diag)
        return self

    @property
    def has_state(self) -> bool:
        return self.diag != 0 or bool(self.lowrank)


def _as_affine(x, shape):
    if isinstance(x, (MatrixAffine, VectorAffine)):
        return x
    z = sp.Integer(0)
    if shape == "matrix":
        return MatrixAffine(z, z, sp.sympify(x), str(x), sp.latex(x))
    return VectorAffine([], [], sp.sympify(x), str(x), sp.latex(x))


def gradient(terms: list[Pairing], into: GradForm | None = None) -> GradForm:
    g = into or GradForm()
    for t in terms:
        shape = t.a.shape if hasattr(t.a, "shape") else t.b.shape
        a, b = _as_affine(t.a, shape), _as_affine(t.b, shape)
        scale = t.coef * t.weight
        if shape == "matrix":
            # d/dS_ij ρ a_ij b_ij = ρ (α_a b_ij + α_b a_ij), all elementwise
            for x, y in ((a, b), (b, a)):
                if x.s_coef == 0:
                    continue
                g.diag += scale * x.s_coef * y.s_coef
                g.prev_diag += scale * x.s_coef * y.prev_coef
                g.matrix_const += scale * x.s_coef * y.const
        else:
            # d/ds_i ρ_i a_i b_i = ρ_i (Σ γ u · b_i + Σ γ' u' · a_i)
            for x, y in ((a, b), (b, a)):
                for gam, u in x.s_proj:
                    for gam2, u2 in y.s_proj:
                        g.add_lowrank(g.lowrank, scale * gam * gam2, u2, u)
                    for eta, u2 in y.prev_proj:
                        g.add_lowrank(g.prev_lowrank, scale * gam * eta, u2, u)
                    if y.const != 0:
                        g.add_const(scale * gam * y.const, u)
    return g.finish()


def check_quadratic(expr: Quadratic) -> None:
    if expr.blocked:
        raise DerivationError(f"no closed form: {expr.blocked}")


def is_proximal(t: Pairing) -> bool:
    """A matrix pairing (‖S − C‖², ridge, ⟨S, M⟩) as opposed to a loss on predictions S u."""
    return getattr(t.a, "shape", getattr(t.b, "shape", None)) == "matrix"


__all__ = ["GradForm", "gradient", "separate", "split_vector", "check_quadratic", "is_proximal",
           "ROW", "SCALAR", "COLUMN", "ELEMENTWISE"]
