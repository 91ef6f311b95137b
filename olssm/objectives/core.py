"""Objective language: declared inputs, affine expressions in the state, quadratic objectives.

Everything here is index notation over one value row ``i`` (0..d_v) and one key column ``j``
(0..d_k). A *coefficient* is a sympy expression whose free symbols are declared inputs; its
*kind* says which indices it carries:

    scalar        no index            (one number per head and token)
    row           i                   (value-sized vectors: values, per-row rates)
    column        j                   (key-sized vectors: keys, queries, per-column rates)
    elementwise   i and j             (an outer product v*k, a generator exp(dt*A), ...)

so ``beta*k`` is a row*column = elementwise coefficient, ``csum(k*k)`` (= kᵀk) is a scalar.
The state S and S_prev are *not* sympy symbols: they only enter through the affine classes
below, which keeps every objective visibly quadratic (see NOTES.md).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import sympy as sp


class DerivationError(ValueError):
    """An objective that has no closed form in the asked mode, or is malformed."""


class _StateInSympy(DerivationError, sp.SympifyError):
    """Raised by sympify of a state-dependent term. Also a SympifyError, so that sympy's binary operators still
    return NotImplemented and hand `b * (S k)` to our __rmul__; a sympy function of S (exp(S k)) reaches the user
    as this DerivationError."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.expr, self.base_exc = message, None

    def __str__(self):
        return self.expr


class UnknownSignWarning(UserWarning):
    """A derived update that is the objective's minimiser only for one sign of an input whose declared domain
    ('real') leaves the sign open, e.g. a squared loss weighted by it."""


class IndefiniteHessianWarning(UserWarning):
    """A derived implicit / exact update whose objective has a Hessian in S that is not positive semidefinite for
    large enough keys whatever the inputs' values, e.g. a cross term ⟨S k₀, S k₁⟩ that no squared loss on S k₀,
    S k₁ dominates: the closed form is then a stationary point (a saddle), not the minimiser, once the keys are
    large."""


class MemorylessWarning(UserWarning):
    """A derived implicit / explicit update that does not read S_prev (its decay is 0): each token's state is built
    from that token alone. E.g. an explicit step whose proximal part is a ridge λ‖S‖²/2 (its minimiser, the step's
    centre, is S = 0), or an implicit objective with a ridge and no ‖S − S_prev‖² term."""


# --------------------------------------------------------------------------------------------
# index kinds

SCALAR, ROW, COLUMN, ELEMENTWISE = "scalar", "row", "column", "elementwise"

_INPUT_KINDS = {
    "key": COLUMN, "query": COLUMN, "column": COLUMN,
    "value": ROW, "row": ROW,
    "scalar": SCALAR,
}
_PARAM_KINDS = {"scalar": SCALAR, "row": ROW, "column": COLUMN, "matrix": ELEMENTWISE}


class csum(sp.Function):
    """Sum of a column-kind expression over the key index j: ``csum(k*q)`` = kᵀq."""

    nargs = 1
    is_real = True

    @classmethod
    def eval(cls, arg):
        if arg == 0:
            return sp.Integer(0)
        if not _has_column(arg):
            # the evaluators sum over a broadcast axis of size 1: csum(v²) came out as v² (printed ‖v‖²), where the
            # sum over the key index is d_k·v²
            raise DerivationError(f"csum({arg}): its argument has no key index to sum over (a {_kind_name(arg)} "
                                  "expression), so the sum would just multiply by d_k; write that factor "
                                  "explicitly (csum sums key-sized expressions: csum(k*q) = kᵀq)")
        if arg.is_Mul:
            outer, inner = [], []
            for f in arg.args:
                (inner if _has_column(f) else outer).append(f)
            if outer and inner:
                return sp.Mul(*outer) * cls(sp.Mul(*inner))
        if arg.is_Add:
            return sp.Add(*[cls(a) for a in arg.args])
        return None

    # a sum of nonnegative entries is nonnegative (‖k‖² = csum(k²)): a weight β/‖k‖² or dot(k, k) had warned of an
    # open sign
    def _eval_is_nonnegative(self):
        return True if self.args[0].is_nonnegative else None

    def _eval_is_positive(self):
        return True if self.args[0].is_positive else None

    def _latex(self, printer, exp=None):
        tex = self._latex_base(printer)
        return tex if exp is None else rf"\left({tex}\right)^{{{exp}}}"

    def _latex_base(self, printer):
        a = self.args[0]
        if a.is_Pow and a.exp == 2 and a.base.is_Symbol:
            return rf"\|{printer._print(a.base)}\|^2"
        if a.is_Mul and len(a.args) == 2 and all(x.is_Symbol for x in a.args):
            x, y = (printer._print(t) for t in a.args)
            return rf"({x}^\top {y})"
        return r"\mathbf{1}^\top\left(" + printer._print(a) + r"\right)"

    def _sympystr(self, printer):
        a = self.args[0]
        if a.is_Pow and a.exp == 2 and a.base.is_Symbol:
            return f"‖{printer._print(a.base)}‖²"
        if a.is_Mul and len(a.args) == 2 and all(x.is_Symbol for x in a.args):
            return f"({printer._print(a.args[0])}ᵀ{printer._print(a.args[1])})"
        return f"Σⱼ({printer._print(a)})"


def display_name(name: str) -> str:
    """beta -> β, lam -> λ, dt -> Δ, k2 -> k₂: how symbols print (their names stay ASCII)."""
    from sympy.printing.pretty.pretty_symbology import greek_unicode
    special = {"lam": "λ", "lambda_": "λ", "dt": "Δ", "Delta": "Δ"}
    base, digits = name.rstrip("0123456789"), name[len(name.rstrip("0123456789")):]
    sub = "".join("₀₁₂₃₄₅₆₇₈₉"[int(d)] for d in digits)
    if base in special:
        return special[base] + sub
    return greek_unicode.get(base, base) + sub if base else name


@dataclasses.dataclass(frozen=True, order=True)
class InputSpec:
    """What a declared symbol is: its role and its index kind."""

    name: str
    role: str          # key | query | value | scalar | row | column | parameter
    kind: str          # scalar | row | column | elementwise
    positive: bool = False
    domain: str = "real"   # how a layer parameterises it: see DOMAINS

    @property
    def is_parameter(self) -> bool:
        return self.role == "parameter"


class InputSymbol(sp.Symbol):
    """A sympy symbol that knows what input it is; its spec is part of its identity, so the same
    name may be a per-row rate in one objective and a per-head one in another."""

    __slots__ = ("spec",)

    def __new__(cls, spec: "InputSpec", **assumptions):
        obj = sp.Symbol.__xnew__(cls, spec.name, **assumptions)
        obj.spec = spec
        return obj

    def __getnewargs_ex__(self):
        return ((self.spec,), self.assumptions0)

    def _hashable_content(self):
        return super()._hashable_content() + (self.spec,)

    def _sympystr(self, printer):
        return display_name(self.name)

    def _latex(self, printer):
        base, digits = self.name.rstrip("0123456789"), self.name[len(self.name.rstrip("0123456789")):]
        tex = {"lam": r"\lambda", "dt": r"\Delta"}.get(base)
        tex = tex or sp.latex(sp.Symbol(base or self.name))
        return f"{tex}_{{{digits}}}" if digits and base else tex


#: value domains of coefficients; layers pick the parameterisation from these
DOMAINS = {
    "real": "unconstrained (linear projection)",
    "positive": "> 0 (softplus of a projection)",
    "unit": "in (0, 1) (sigmoid of a projection), e.g. DeltaNet's β",
    "decay": "in (0, 1], parameterised in log space (exp(-softplus)), e.g. forget gates",
    "timestep": "Mamba's Δ: softplus(projection + bias), bias initialised for Δ ∈ [1e-3, 1e-1]",
    "negative": "< 0 (−exp(log-parameter)), e.g. Mamba's A with S4D-real initialisation",
    "log_decay": "≤ 0, the log of a decay: the rule reads exp(·) (Rule.with_log_decays), so the kernels get "
                 "log Λ in closed form; layers produce it as the decay's log-space parameterisation",
}
_POSITIVE_DOMAINS = ("positive", "unit", "decay", "timestep")


#: the names rule.scan (olssm.kernels.scan) takes as its own arguments besides the inputs
_SCAN_ARGUMENTS = ("self", "rule", "initial_state", "output_final_state", "backend", "cu_seqlens", "chunk_size")


def _declare(name: str, role: str, kind: str, positive: bool, domain: str = "real") -> sp.Symbol:
    if domain not in DOMAINS:
        raise DerivationError(f"input {name!r}: domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    if positive and domain == "real":
        domain = "positive"
    positive = positive or domain in _POSITIVE_DOMAINS
    if not isinstance(name, str) or not name.isidentifier():
        raise DerivationError(f"input name {name!r} must be a Python identifier")
    if name in ("S", "S_prev", "state"):
        raise DerivationError(f"input name {name!r} is reserved for the state")
    if name in _SCAN_ARGUMENTS:   # rule.scan(..., name=x) would bind the argument, never the input
        raise DerivationError(f"input name {name!r} is taken by rule.scan's own argument of that name; rename the "
                              f"input (scan's arguments: {', '.join(_SCAN_ARGUMENTS)})")
    spec = InputSpec(name, role, kind, positive, domain)
    if domain == "negative":
        return InputSymbol(spec, real=True, negative=True)
    if domain == "log_decay":
        return InputSymbol(spec, real=True, nonpositive=True)
    return InputSymbol(spec, real=True, positive=True) if positive else InputSymbol(spec, real=True)


def spec_of(sym: sp.Symbol) -> InputSpec:
    spec = getattr(sym, "spec", None)
    if spec is None:
        raise DerivationError(
            f"symbol {sym} is not a declared input: declare it with olssm.objectives.key/value/"
            "query/scalar/row/column/parameter")
    return spec


def key(name: str = "k") -> sp.Symbol:
    """Per-token key, a d_k vector (layout [B, T, H, d_k])."""
    return _declare(name, "key", COLUMN, False)


def query(name: str = "q") -> sp.Symbol:
    """Per-token query, a d_k vector; the readout is o = S q."""
    return _declare(name, "query", COLUMN, False)


def value(name: str = "v") -> sp.Symbol:
    """Per-token value, a d_v vector (layout [B, T, H, d_v])."""
    return _declare(name, "value", ROW, False)


def scalar(name: str, positive: bool = False, domain: str = "real") -> sp.Symbol:
    """Per-token coefficient, one per head (layout [B, T, H])."""
    return _declare(name, "scalar", SCALAR, positive, domain)


def row(name: str, positive: bool = False, domain: str = "real") -> sp.Symbol:
    """Per-token coefficient, one per value row (layout [B, T, H, d_v])."""
    return _declare(name, "row", ROW, positive, domain)


def column(name: str, positive: bool = False, domain: str = "real") -> sp.Symbol:
    """Per-token coefficient, one per key column (layout [B, T, H, d_k])."""
    return _declare(name, "column", COLUMN, positive, domain)


def parameter(name: str, kind: str = "scalar", positive: bool = False, domain: str = "real") -> sp.Symbol:
    """A learned constant, per head: kind scalar [H], row [H, d_v], column [H, d_k], matrix [H, d_v, d_k]."""
    if kind not in _PARAM_KINDS:
        raise DerivationError(f"parameter {name!r}: kind must be one of {sorted(_PARAM_KINDS)}, got {kind!r}")
    return _declare(name, "parameter", _PARAM_KINDS[kind], positive, domain)


def kind_of(expr) -> str:
    """Index kind of a coefficient expression (raises on undeclared symbols)."""
    has_row, has_col = _indices(sp.sympify(expr))
    if has_row and has_col:
        return ELEMENTWISE
    return ROW if has_row else COLUMN if has_col else SCALAR


def _kind_name(expr) -> str:
    try:
        kind = kind_of(expr)
    except DerivationError:
        return "non-key"
    return "value-sized" if kind == ROW else kind


def _has_column(expr) -> bool:
    """Like kind_of, but tolerant of sympy's internal dummies (used while sympy rewrites csum)."""
    try:
        return _indices(sp.sympify(expr))[1]
    except DerivationError:
        return True


def _indices(expr) -> tuple[bool, bool]:
    if expr.is_Symbol:
        k = spec_of(expr).kind
        return k in (ROW, ELEMENTWISE), k in (COLUMN, ELEMENTWISE)
    if isinstance(expr, csum):
        return _indices(expr.args[0])[0], False  # the key index is summed out, a row index survives
    row = col = False
    for a in expr.args:
        r, c = _indices(a)
        row, col = row or r, col or c
    return row, col


def dot(a, b) -> sp.Expr:
    """aᵀb for two key-sized (column) expressions."""
    for name, x in (("first", a), ("second", b)):
        if kind_of(x) not in (COLUMN, SCALAR):
            raise DerivationError(f"dot(): the {name} argument {x} is a {kind_of(x)} expression; "
                                  "dot() sums over the key index and needs key-sized vectors")
    prod = sp.sympify(a) * sp.sympify(b)
    if kind_of(prod) != COLUMN:
        raise DerivationError(f"dot({a}, {b}): neither argument is key-sized, so the sum over the key "
                              "index would just multiply by d_k; write that factor explicitly")
    return csum(prod)


def _as_coef(x, what: str) -> sp.Expr:
    if isinstance(x, (Affine, Quadratic)):
        raise DerivationError(f"{what}: expected a coefficient without the state, got {x}")
    if isinstance(x, str):   # sympify parses it: "E" became Euler's number, "beta" / "S" internal errors
        raise DerivationError(f"{what}: {x!r} is a string; declare the input (O.scalar({x!r}), O.row, O.column, "
                              "O.parameter) and pass that")
    try:
        e = sp.sympify(x, strict=True)
    except Exception:
        raise DerivationError(f"{what}: cannot use {x!r} (a {type(x).__name__}) as a coefficient: give a number, "
                              "a declared input or a sympy expression of them") from None
    if not isinstance(e, sp.Expr):
        raise DerivationError(f"{what}: cannot use {x!r} (a {type(x).__name__}) as a coefficient")
    for s in e.free_symbols:
        spec_of(s)
    return e


def _tex(e) -> str:
    return sp.latex(e)


# --------------------------------------------------------------------------------------------
# affine expressions in the state

class Affine:
    """Base of expressions that are affine in S (and may contain S_prev)."""

    shape: str  # "matrix" (d_v x d_k) or "vector" (d_v)
    text: str
    tex: str

    def __repr__(self):
        return self.text

    def __radd__(self, other):
        return self.__add__(other)

    def __rsub__(self, other):
        return (-self).__add__(other)

    def __sub__(self, other):
        r = self.__add__(-other if isinstance(other, Affine) else -_as_coef(other, f"{self} - {other}"))
        o_text = other.text if isinstance(other, Affine) else str(other)
        o_tex = other.tex if isinstance(other, Affine) else _tex(other)
        if _needs_paren_text(o_text):
            o_text, o_tex = f"({o_text})", rf"\left({o_tex}\right)"
        r.text, r.tex = f"{self.text} - {o_text}", f"{self.tex} - {o_tex}"
        return r

    def __neg__(self):
        return self.__mul__(-1)

    def __rmul__(self, other):
        return self.__mul__(other)

    def __truediv__(self, other):
        return self.__mul__(1 / _as_coef(other, f"{self} / {other}"))

    def __pow__(self, p):
        raise DerivationError(f"({self})**{p}: use sqnorm() for squares; powers of the state are not quadratic")

    def _bad_op(self, op, other):
        raise DerivationError(f"{self} {op} {other}: the product of two state-dependent terms is not "
                              "an affine expression; build quadratics with sqnorm() or inner()")

    def _sympy_(self):
        # sympy functions of the state (exp(S k), sin(...)) had escaped as a SympifyError from inside sympy
        raise _StateInSympy(f"{self} depends on the state S, so it cannot enter a sympy function or coefficient "
                            "(exp, sin, sqrt, ...): an objective is quadratic in S, built from sqnorm() and "
                            "inner() of affine expressions in S")


@dataclasses.dataclass(repr=False)
class MatrixAffine(Affine):
    """α ⊙ S + β ⊙ S_prev + C, all elementwise (d_v x d_k)."""

    s_coef: sp.Expr
    prev_coef: sp.Expr
    const: sp.Expr
    text: str
    tex: str
    shape: str = "matrix"

    def __add__(self, other):
        if isinstance(other, VectorAffine):
            raise DerivationError(f"{self} + {other}: adds a d_v x d_k matrix to a d_v vector")
        if isinstance(other, MatrixAffine):
            return MatrixAffine(self.s_coef + other.s_coef, self.prev_coef + other.prev_coef,
                                self.const + other.const, f"{self} + {other}", f"{self.tex} + {other.tex}")
        c = _as_coef(other, f"{self} + {other}")
        if kind_of(c) != ELEMENTWISE and c != 0:
            raise DerivationError(
                f"{self} + {c}: adds a {kind_of(c)} expression to a d_v x d_k matrix; "
                "use an outer product such as v*k (value times key) for a matrix constant")
        return MatrixAffine(self.s_coef, self.prev_coef, self.const + c, f"{self} + {c}",
                            f"{self.tex} + {_tex(c)}")

    def __mul__(self, other):
        if isinstance(other, Affine):
            self._bad_op("*", other)
        c = _as_coef(other, f"{other} * {self}")
        text, tex = _scaled_text(c, self)
        return MatrixAffine(c * self.s_coef, c * self.prev_coef, c * self.const, text, tex)

    def __matmul__(self, other):
        if isinstance(other, Diag):
            if other.kind_needed != COLUMN:
                raise DerivationError(f"{self} @ diag({other.vec}): right-multiplying a d_v x d_k matrix "
                                      f"needs a key-sized (d_k) diagonal, got a {kind_of(other.vec)} one")
            r = self.__mul__(other.vec)
            inner_t, inner_x = (f"({self})", rf"\left({self.tex}\right)") if _needs_paren(self) else (self.text, self.tex)
            r.text, r.tex = f"{inner_t} diag({other.vec})", rf"{inner_x}\operatorname{{diag}}({_tex(other.vec)})"
            return r
        if isinstance(other, Affine):
            self._bad_op("@", other)
        u = _as_coef(other, f"{self} @ {other}")
        ku = kind_of(u)
        if ku not in (COLUMN,):
            raise DerivationError(
                f"{self} @ {u}: S is d_v x d_k and needs a key-sized (d_k) vector on the right; "
                f"{u} is a {ku} expression" + (" (a value, d_v)" if ku == ROW else ""))

        def project(coef, name):
            if coef == 0:
                return []
            kc = kind_of(coef)
            if kc == ELEMENTWISE:
                raise DerivationError(
                    f"({self}) @ {u}: an elementwise factor {coef} on {name} does not factor out of "
                    "the product with a vector; only scalar, row and column factors do")
            if kc == COLUMN:
                return [(sp.Integer(1), coef * u)]
            return [(coef, u)]

        const = csum(self.const * u) if self.const != 0 else sp.Integer(0)
        # a sum on the right keeps its parentheses: S (k + k₂), not S k + k₂
        ut, ux = (f"({u})", rf"\left({_tex(u)}\right)") if isinstance(u, sp.Add) else (f"{u}", _tex(u))
        return VectorAffine(project(self.s_coef, "S"), project(self.prev_coef, "S_prev"), const,
                            f"({self}) {ut}" if _needs_paren(self) else f"{self} {ut}",
                            rf"\left({self.tex}\right) {ux}" if _needs_paren(self) else rf"{self.tex}\,{ux}")

    def __rmatmul__(self, other):
        if isinstance(other, Diag):
            if other.kind_needed != ROW:
                raise DerivationError(f"diag({other.vec}) @ {self}: left-multiplying a d_v x d_k matrix "
                                      f"needs a value-sized (d_v) diagonal, got a {kind_of(other.vec)} one")
            r = self.__mul__(other.vec)
            inner_t, inner_x = (f"({self})", rf"\left({self.tex}\right)") if _needs_paren(self) else (self.text, self.tex)
            r.text, r.tex = f"diag({other.vec}) {inner_t}", rf"\operatorname{{diag}}({_tex(other.vec)}){inner_x}"
            return r
        raise DerivationError(f"{other} @ {self}: only diag(row) may multiply the state from the left")


@dataclasses.dataclass(repr=False)
class VectorAffine(Affine):
    """Σ γ_m (S u_m) + Σ η_m (S_prev u'_m) + c: a value-sized (d_v) vector, affine in S."""

    s_proj: list          # [(row-or-scalar coefficient, column vector)]
    prev_proj: list
    const: sp.Expr        # row or scalar expression
    text: str
    tex: str
    shape: str = "vector"

    def __add__(self, other):
        if isinstance(other, MatrixAffine):
            raise DerivationError(f"{self} + {other}: adds a d_v vector to a d_v x d_k matrix")
        if isinstance(other, VectorAffine):
            return VectorAffine(self.s_proj + other.s_proj, self.prev_proj + other.prev_proj,
                                self.const + other.const, f"{self} + {other}", f"{self.tex} + {other.tex}")
        c = _as_coef(other, f"{self} + {other}")
        if kind_of(c) not in (ROW, SCALAR):
            raise DerivationError(f"{self} + {c}: adds a {kind_of(c)} expression to a value-sized (d_v) "
                                  "vector; expected a value or a row coefficient")
        return VectorAffine(self.s_proj, self.prev_proj, self.const + c, f"{self} + {c}",
                            f"{self.tex} + {_tex(c)}")

    def __mul__(self, other):
        if isinstance(other, Affine):
            self._bad_op("*", other)
        c = _as_coef(other, f"{other} * {self}")
        if kind_of(c) not in (ROW, SCALAR):
            raise DerivationError(f"{c} * ({self}): a value-sized vector can be scaled by a scalar or a "
                                  f"row coefficient, not a {kind_of(c)} one")
        text, tex = _scaled_text(c, self)
        return VectorAffine([(c * g, u) for g, u in self.s_proj], [(c * g, u) for g, u in self.prev_proj],
                            c * self.const, text, tex)

    def __rmatmul__(self, other):
        if isinstance(other, Diag):
            return self.__mul__(other.vec)
        raise DerivationError(f"{other} @ {self}: unsupported product with a vector")

    def __matmul__(self, other):
        raise DerivationError(f"{self} @ {other}: a value-sized vector cannot be multiplied on the right")


@dataclasses.dataclass
class Diag:
    vec: sp.Expr

    @property
    def kind_needed(self):
        return kind_of(self.vec)

    def __matmul__(self, other):
        if isinstance(other, Affine):
            return other.__rmatmul__(self)
        raise DerivationError(f"diag({self.vec}) @ {other}: only the state may follow a diag()")


def diag(vec) -> Diag:
    """diag(row) @ S scales value rows; S @ diag(column) scales key columns."""
    v = _as_coef(vec, "diag()")
    if kind_of(v) not in (ROW, COLUMN):
        raise DerivationError(f"diag({v}): needs a row (d_v) or column (d_k) vector, got a {kind_of(v)} expression")
    return Diag(v)


def states() -> tuple[MatrixAffine, MatrixAffine]:
    """The new state S (the variable) and the previous state S_prev (a constant), both d_v x d_k."""
    z = sp.Integer(0)
    return (MatrixAffine(sp.Integer(1), z, z, "S", "S"),
            MatrixAffine(z, sp.Integer(1), z, "S_prev", r"S_{t-1}"))


def _needs_paren_text(t: str) -> bool:
    return "+" in t or " - " in t


def _needs_paren(a: Affine) -> bool:
    return any(ch in a.text for ch in "+-⊙")


def _scaled_text(c, a: Affine) -> tuple[str, str]:
    inner_t = f"({a.text})" if _needs_paren(a) else a.text
    inner_x = rf"\left({a.tex}\right)" if _needs_paren(a) else a.tex
    if c == -1:
        return f"-{inner_t}", f"-{inner_x}"
    op_t = " " if kind_of(c) == SCALAR else " ⊙ "
    op_x = r"\," if kind_of(c) == SCALAR else r" \odot "
    return f"{_paren(c)}{op_t}{inner_t}", f"{_tex_paren(c)}{op_x}{inner_x}"


def _paren(c) -> str:
    s = str(c)
    return f"({s})" if any(ch in s for ch in "+-/ ") else s


def _tex_paren(c) -> str:
    s = _tex(c)
    return rf"\left({s}\right)" if any(ch in str(c) for ch in "+-") else s


# --------------------------------------------------------------------------------------------
# quadratic objectives

@dataclasses.dataclass(frozen=True)
class Pairing:
    """coef * <A, B>_weight, a bilinear (or linear, or constant) term of an objective."""

    coef: sp.Expr
    a: Affine | sp.Expr
    b: Affine | sp.Expr
    weight: sp.Expr


class Quadratic:
    """A scalar objective: a sum of weighted Frobenius / Euclidean pairings."""

    def __init__(self, terms: list[Pairing], text: str, tex: str, blocked: str | None = None,
                 atomic: bool = False):
        # atomic: one norm/inner product (possibly scaled), printed without parentheses
        self.terms, self.text, self.tex, self.blocked, self.atomic = terms, text, tex, blocked, atomic

    def __repr__(self):
        return self.text

    def _sympy_(self):
        # exp / sqrt of an objective term had escaped as a SympifyError from inside sympy
        raise _StateInSympy(f"{self} is quadratic in the state S; a sympy function of it (exp, sqrt, ...) is not, "
                            "and no closed-form step exists for it: an objective is a sum of sqnorm() and "
                            "inner() terms with coefficients free of S")

    def __add__(self, other):
        if isinstance(other, Quadratic):
            if other.text.startswith("-"):  # a + -b reads a - b
                text, tex = f"{self} - {other.text[1:]}", f"{self.tex} - {other.tex[1:]}"
            else:
                text, tex = f"{self} + {other}", f"{self.tex} + {other.tex}"
            return Quadratic(self.terms + other.terms, text, tex, self.blocked or other.blocked)
        if isinstance(other, Affine):
            raise DerivationError(f"{self} + {other}: adds a matrix/vector to a scalar objective")
        c = _as_coef(other, f"{self} + {other}")
        if c == 0:
            return self
        if kind_of(c) != SCALAR:
            raise DerivationError(f"{self} + {c}: adds a {kind_of(c)} expression to a scalar objective")
        return Quadratic(self.terms, f"{self} + {c}", f"{self.tex} + {_tex(c)}", self.blocked)

    __radd__ = __add__

    def __neg__(self):
        return self * -1

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, other):
        if isinstance(other, Quadratic):
            return Quadratic(self.terms + other.terms, f"({self})·({other})",
                             rf"\left({self.tex}\right)\left({other.tex}\right)",
                             f"({self})·({other}) is a product of two objective terms: quartic in S, "
                             "not quadratic")
        if isinstance(other, Affine):
            raise DerivationError(f"({self}) * ({other}): a scalar objective times a matrix is not a scalar")
        c = _as_coef(other, f"{other} * ({self})")
        if kind_of(c) != SCALAR:
            raise DerivationError(
                f"{c} * ({self}): an objective can only be scaled by a scalar coefficient; {c} is a "
                f"{kind_of(c)} expression — pass it as weight= of sqnorm()/inner() instead")
        single = self.atomic
        if c == -1:
            text, tex = (f"-{self}", rf"-{self.tex}") if single else (f"-({self})", rf"-\left({self.tex}\right)")
        elif c.is_Rational and c.p == 1 and single:          # ‖S - S_prev‖²/2 rather than (1/2)·(…)
            text, tex = f"{self}/{c.q}", rf"\tfrac{{1}}{{{c.q}}}{self.tex}"
        elif single:
            text, tex = f"{_paren(c)}·{self}", rf"{_tex_paren(c)}\,{self.tex}"
        else:
            text, tex = f"{_paren(c)}·({self})", rf"{_tex_paren(c)}\left({self.tex}\right)"
        return Quadratic([dataclasses.replace(t, coef=c * t.coef) for t in self.terms], text, tex, self.blocked,
                         atomic=single)

    __rmul__ = __mul__

    def __truediv__(self, other):
        if isinstance(other, (Quadratic, Affine)):
            return Quadratic(self.terms, f"({self}) / ({other})", self.tex,
                             f"({self}) / ({other}) divides by a state-dependent term: not quadratic in S")
        return self * (1 / _as_coef(other, f"({self}) / {other}"))

    def __pow__(self, p):
        return Quadratic(self.terms, f"({self})**{p}", rf"\left({self.tex}\right)^{{{p}}}",
                         f"({self})**{p} raises an objective term to a power: not quadratic in S")


def _pair_operand(x, what):
    if isinstance(x, Affine):
        return x
    return _as_coef(x, what)


def inner(a, b, weight=None) -> Quadratic:
    """Frobenius / Euclidean inner product <a, b>, optionally row-weighted: Σ_i w_i Σ_j a_ij b_ij."""
    a_, b_ = _pair_operand(a, "inner()"), _pair_operand(b, "inner()")
    shapes = {getattr(x, "shape", None) for x in (a_, b_)} - {None}
    if len(shapes) > 1:
        raise DerivationError(f"inner({a}, {b}): a d_v x d_k matrix paired with a d_v vector")
    if not shapes:
        raise DerivationError(f"inner({a}, {b}): neither argument contains the state S")
    shape = shapes.pop()
    for x in (a_, b_):
        if not isinstance(x, Affine):
            k = kind_of(x)
            ok = (ELEMENTWISE,) if shape == "matrix" else (ROW, SCALAR)
            if k not in ok and x != 0:
                raise DerivationError(f"inner({a}, {b}): {x} is a {k} expression but the other argument "
                                      f"is a {'d_v x d_k matrix' if shape == 'matrix' else 'd_v vector'}")
    w = sp.Integer(1) if weight is None else _as_coef(weight, "inner(weight=)")
    _check_weight(w, shape, f"inner({a}, {b}, weight={weight})")
    wt = "" if weight is None else f", weight={w}"
    wtex = "" if weight is None else rf"_{{{_tex(w)}}}"
    atex = a_.tex if isinstance(a_, Affine) else _tex(a_)
    btex = b_.tex if isinstance(b_, Affine) else _tex(b_)
    return Quadratic([Pairing(sp.Integer(1), a_, b_, w)], f"⟨{a}, {b}{wt}⟩",
                     rf"\left\langle {atex},\, {btex} \right\rangle{wtex}", atomic=True)


def _check_weight(w, shape, what):
    k = kind_of(w)
    if shape == "vector" and k not in (SCALAR, ROW):
        raise DerivationError(f"{what}: a weight on a value-sized vector must be scalar or per row, "
                              f"got a {k} expression")


def sqnorm(x, weight=None) -> Quadratic:
    """Squared Euclidean / Frobenius norm, optionally row-weighted: Σ_i w_i ‖x_i‖²."""
    if isinstance(x, Quadratic):
        raise DerivationError(f"sqnorm({x}): the argument is already quadratic in S, so its square is quartic: "
                              "sqnorm() takes an affine expression in S (S k − v, S − S_prev, ...)")
    if not isinstance(x, Affine):
        raise DerivationError(f"sqnorm({x}): the argument does not contain the state S (a constant term "
                              "does not change the minimiser; drop it)")
    w = sp.Integer(1) if weight is None else _as_coef(weight, "sqnorm(weight=)")
    _check_weight(w, x.shape, f"sqnorm({x}, weight={weight})")
    wt = "" if weight is None else f"_{w}"
    wtex = "" if weight is None else rf"_{{\operatorname{{diag}}({_tex(w)})}}"
    sub = "F" if x.shape == "matrix" else ""
    tex = rf"\left\| {x.tex} \right\|^2" + (wtex or (f"_{{{sub}}}" if sub else ""))
    return Quadratic([Pairing(sp.Integer(1), x, x, w)], f"‖{x}‖²{wt}", tex, atomic=True)


def norm(x, weight=None) -> Quadratic:
    """The (unsquared) norm: differentiable but not quadratic; derive() rejects it with a reason."""
    q = sqnorm(x, weight)
    return Quadratic(q.terms, f"‖{x}‖", rf"\left\| {x.tex} \right\|",
                     f"‖{x}‖ is a norm, not a squared norm: not quadratic in S (use sqnorm)")


# --------------------------------------------------------------------------------------------
# the objective

UPDATES = ("implicit", "explicit", "exact")


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """A per-token objective L_t(S) and how the state is updated from it.

    implicit: S_t = argmin_S L_t(S)
    explicit: S_t = argmin_S P_t(S) + η ⟨∇ℓ_t(C), S⟩, one proximal gradient step: P_t the objective's
              proximal part (its matrix terms, ‖S − Λ⊙S_prev‖²-like), C its minimiser, ℓ_t the rest,
              η = step_size (1 when not given). With P_t = ½ ω ⊙ ‖S − C‖²: S_t = C − η ∇ℓ_t(C) ⊘ ω.
              decay= gives C = decay ⊙ S_prev and P_t = ½‖S − C‖² (then every term is loss)
    exact:    S_t = argmin_S Σ_{i≤t} (Π_{m=i+1..t} decay_m) ℓ_i(S) + ½ ridge ‖S‖²
              (ridge_decays=True: the ridge is forgotten with the data, ½ (Π_{m≤t} decay_m) ridge ‖S‖²,
              which is what recursive least squares computes — derive() then returns the RLS form)
    """

    expr: Quadratic
    update: str = "implicit"
    step_size: object = None
    decay: object = None
    ridge: object = None
    readout: object = None
    name: str | None = None
    ridge_decays: bool = False

    def __post_init__(self):
        if not isinstance(self.expr, Quadratic):
            raise DerivationError(f"Objective(expr): expected an objective built from sqnorm()/inner(), "
                                  f"got {type(self.expr).__name__}: {self.expr}")
        if self.update not in UPDATES:
            raise DerivationError(f"Objective(update={self.update!r}): must be one of {UPDATES}")
        for field in ("step_size", "decay", "ridge", "readout"):
            v = getattr(self, field)
            if v is not None:
                object.__setattr__(self, field, _as_coef(v, f"Objective({field}=)"))
        if self.ridge_decays and (self.update != "exact" or self.ridge is None):
            raise DerivationError("Objective(ridge_decays=True) needs update='exact' and a ridge=")
        if self.readout is None:
            object.__setattr__(self, "readout", query("q"))
        if not (isinstance(self.readout, sp.Symbol) and kind_of(self.readout) == COLUMN):
            raise DerivationError(f"Objective(readout={self.readout}): the readout o = S q needs a key-sized "
                                  f"(d_k) input symbol such as query('q'), got {self.readout}")

    def __repr__(self):
        extra = "".join(f", {f}={v}" for f, v in self._options())
        extra += ", ridge_decays=True" if self.ridge_decays else ""
        return f"Objective({self.expr}, update={self.update!r}{extra})"

    def _options(self):
        return [(f, getattr(self, f)) for f in ("step_size", "decay", "ridge") if getattr(self, f) is not None]

    def summary(self) -> str:
        """The loss with the options that change the rule (decay, ridge, step size): a table cell. The loss
        alone reads the same for DeltaNet and Gated DeltaNet (decay α)."""
        parts = [str(self.expr)] + [f"{f} {v}" for f, v in self._options()]
        return "; ".join(parts + (["decaying ridge"] if self.ridge_decays else []))

    def latex(self) -> str:
        """The loss, and (as text) the options that change the rule, like summary()."""
        opts = [rf"\text{{{f.replace('_', ' ')} }}{sp.latex(v)}" for f, v in self._options()]
        opts += [r"\text{decaying ridge}"] if self.ridge_decays else []
        return "; ".join([self.expr.tex] + opts)

    @property
    def key(self) -> str:
        """Canonical text used as the derivation cache key."""
        specs = tuple(self.inputs().values())
        return repr(self) + "|" + "|".join(srepr_term(t) for t in self.expr.terms) + f"|{self.readout}|{specs}"

    def inputs(self) -> dict[str, InputSpec]:
        """Every declared input the objective mentions, by name (readout included)."""
        syms: set = set()
        for t in self.expr.terms:
            syms |= _term_symbols(t)
        for f in (self.step_size, self.decay, self.ridge, self.readout):
            if f is not None:
                syms |= sp.sympify(f).free_symbols
        out = {}
        for s in sorted(syms, key=lambda s: s.name):
            if s.name in out and out[s.name] != spec_of(s):
                a, b = out[s.name], spec_of(s)
                raise DerivationError(f"two different inputs are named {s.name!r} ({a.role} {a.kind}, domain "
                                      f"{a.domain!r} and {b.role} {b.kind}, domain {b.domain!r}); rename one")
            out[s.name] = spec_of(s)
        shown = {}
        for name in out:   # a rule's text shows display names: "beta" and "β" would read as one input twice
            other = shown.setdefault(display_name(name), name)
            if other != name:
                raise DerivationError(f"inputs {other!r} and {name!r} both print as {display_name(name)}, so the "
                                      f"derived rule would read as one input; rename one")
        return out


def _affine_exprs(x) -> Iterable[sp.Expr]:
    if isinstance(x, MatrixAffine):
        yield from (x.s_coef, x.prev_coef, x.const)
    elif isinstance(x, VectorAffine):
        for g, u in x.s_proj + x.prev_proj:
            yield g
            yield u
        yield x.const
    else:
        yield sp.sympify(x)


def _term_symbols(t: Pairing) -> set:
    out = set(sp.sympify(t.coef).free_symbols) | set(t.weight.free_symbols)
    for x in (t.a, t.b):
        for e in _affine_exprs(x):
            out |= sp.sympify(e).free_symbols
    return out


def srepr_term(t: Pairing) -> str:
    return sp.srepr((t.coef, t.weight, tuple(_affine_exprs(t.a)), tuple(_affine_exprs(t.b)),
                     getattr(t.a, "shape", "c"), getattr(t.b, "shape", "c")))
