"""The Rule: a derived update in normal form, printable, and steppable in torch.

Normal form (the contract with olssm.kernels), per head, S ∈ R^{d_v × d_k}:

    S̃_t = Λ_t ⊙ S_{t-1}
    S_t = S̃_t − Σ_r (c_r ⊙ (S̃_t a_r)) b_rᵀ + Σ_m e_m w_mᵀ
    o_t = S_t q_t

Λ is a coefficient of any kind (none/scalar/row/column/elementwise), c_r a scalar or row
coefficient, a_r, b_r, w_m key-sized (column) vector expressions, e_m a row coefficient that
usually carries the value (ε ⊙ v) — or, rarely, an elementwise one. Every entry is a sympy
expression of the declared inputs, which the kernels print into their own language.

Exact rules carry sufficient statistics instead (NOTES.md):
    H_t = γ_t H_{t-1} + Σ R u wᵀ + diag(δ),   G_t = γ_t G_{t-1} + Σ e wᵀ,   o_t = G_t (H_t + diag(λ))⁻¹ q_t
"""
from __future__ import annotations

import dataclasses
import functools
import math

import sympy as sp
import torch
from sympy.printing.precedence import precedence
from sympy.printing.pytorch import TorchPrinter
from sympy.printing.str import StrPrinter

from ..objectives.core import COLUMN, ELEMENTWISE, ROW, SCALAR, InputSpec, display_name, kind_of, spec_of


@dataclasses.dataclass(frozen=True)
class Correction:
    """c ⊙ (S̃ a) bᵀ, subtracted (for exact rules: R u wᵀ added to H)."""

    coef: sp.Expr
    a: sp.Expr
    b: sp.Expr


@dataclasses.dataclass(frozen=True)
class InputTerm:
    """e wᵀ, added: e a row (or elementwise) coefficient, w a key-sized vector."""

    coef: sp.Expr
    w: sp.Expr


def decay_kind(decay) -> str:
    if sp.sympify(decay) == 1:
        return "none"
    return kind_of(decay)


class _Form:
    """What every normal form offers the kernels: its decay kind and its expressions."""

    readout_fields = ("readout",)

    @property
    def decay_kind(self) -> str:
        return decay_kind(self.decay)

    def expressions(self):
        """Every expression of the form: the update's, then the readout's."""
        yield from self.update_expressions()
        for f in self.readout_fields:
            yield getattr(self, f)


@dataclasses.dataclass(frozen=True)
class NormalForm(_Form):
    decay: sp.Expr
    corrections: tuple
    inputs: tuple
    readout: sp.Expr
    mode: str
    notes: tuple = ()

    @property
    def rank(self) -> int:
        return len(self.corrections)

    def update_expressions(self):
        yield self.decay
        for c in self.corrections:
            yield from (c.coef, c.a, c.b)
        for t in self.inputs:
            yield from (t.coef, t.w)

    @property
    def structure(self) -> str:
        parts = [f"{self.decay_kind} decay" if self.decay_kind != "none" else "identity"]
        if self.corrections:
            vecs = {c.a for c in self.corrections} | {c.b for c in self.corrections}
            parts.append(f"rank-{len({c.a for c in self.corrections})} correction"
                         + (" (projector on " + ", ".join(sorted(map(str, vecs))) + ")"))
        parts.append(f"{len(self.inputs)} input term" + ("s" if len(self.inputs) != 1 else ""))
        return " + ".join(parts)


@dataclasses.dataclass(frozen=True)
class ExactForm(_Form):
    decay: sp.Expr
    gram: tuple          # Correction(R, u, w): H += R u wᵀ
    gram_diag: sp.Expr   # H += diag(δ)
    moments: tuple       # InputTerm(e, w): G += e wᵀ
    ridge: sp.Expr
    readout: sp.Expr
    mode: str = "exact"
    notes: tuple = ()
    readout_fields = ("ridge", "readout")

    @property
    def rank(self) -> int:
        return len(self.gram)

    def update_expressions(self):
        yield from (self.decay, self.gram_diag)
        for c in self.gram:
            yield from (c.coef, c.a, c.b)
        for t in self.moments:
            yield from (t.coef, t.w)

    @property
    def structure(self) -> str:
        return (f"sufficient statistics (G: d_v×d_k, H: d_k×d_k), {self.decay_kind} forgetting, "
                f"rank-{len(self.gram)} Gram update, solve per token")


@dataclasses.dataclass(frozen=True)
class RLSForm(_Form):
    """Recursive least squares with forgetting (a decayed ridge), state (S, P):
        P_t = (P/γ) − R (P/γ)u uᵀ(P/γ) / (1 + R uᵀ(P/γ)u),  S_t = S_{t-1} + (e − R S_{t-1}u)(P_t u)ᵀ,
        o_t = S_t q,  with S_0 = 0, P_0 = I/λ.
    Equal to the sufficient-statistics form with ridge λ Π γ; O(d_k²) per token instead of a solve."""

    decay: sp.Expr
    weight: sp.Expr     # R (scalar)
    key: sp.Expr        # u
    target: sp.Expr     # e = R·y (row)
    ridge: sp.Expr      # λ (initial P = I/λ)
    readout: sp.Expr
    mode: str = "exact"
    notes: tuple = ()
    readout_fields = ("ridge", "readout")

    @property
    def rank(self) -> int:
        return 1

    def update_expressions(self):
        yield from (self.decay, self.weight, self.key, self.target)

    @property
    def structure(self) -> str:
        return (f"recursive least squares (S: d_v×d_k, P = (H_t + λ_t I)⁻¹: d_k×d_k), {self.decay_kind} "
                "forgetting, Sherman–Morrison per token")


# --------------------------------------------------------------------------------------------
# torch code generation (also what rule.kernel_source("torch") shows)

class _TorchPrinter(TorchPrinter):
    def _print_csum(self, e):
        return f"({self._print(e.args[0])}).sum(-1, keepdim=True)"

    def _minmax(self, e, fold, clamp):
        # sympy's torch.max(a, b) refuses a Python number; numbers become one clamp bound instead
        nums = [a for a in e.args if a.is_number]
        out = None
        for a in (a for a in e.args if not a.is_number):
            out = self._print(a) if out is None else f"torch.{fold}({out}, {self._print(a)})"
        if nums:
            bound = max(nums) if fold == "maximum" else min(nums)
            out = f"torch.clamp({out}, {clamp}={float(bound)!r})"
        return out

    def _print_Max(self, e):
        return self._minmax(e, "maximum", "min")

    def _print_Min(self, e):
        return self._minmax(e, "minimum", "max")

    def _print_Symbol(self, e):
        return e.name

    def _print_Integer(self, e):
        # a Python int beyond int64 reaching a tensor op is an OverflowError at the first step (a weight of 1e-20 as
        # a Rational derived ε = 1/(‖k‖² + 100000000000000000000)); past 2**53 a float is as exact as the fp64 math
        if abs(int(e)) < 2 ** 53:
            return str(int(e))
        if not math.isfinite(float(e)):
            raise NotImplementedError(f"the integer {e} overflows float64")
        return repr(float(e))

    def _print_Heaviside(self, e):
        # sympy's torch.heaviside(x, 1/2) passes a Python float where torch wants a tensor
        x = self._print(e.args[0])
        h0 = float(e.args[1]) if len(e.args) > 1 else 0.5
        return f"torch.where(({x}) > 0, 1.0, torch.where(({x}) < 0, 0.0, {h0!r}))"

    def _print_gamma(self, e):
        # sympy prints torch.special.gamma, which torch does not have
        raise NotImplementedError("Γ(x) has no torch function (its log, loggamma, prints as torch.lgamma)")


def check_printable(form) -> None:
    """Print the step once, so that a coefficient no generated code can evaluate is refused at derive time
    (a sympy function without a torch counterpart had derived, then failed in the first step or verify)."""
    from ..objectives.core import DerivationError
    try:
        torch_step_source(form)
    except Exception as e:   # sympy's PrintMethodNotImplementedError, or a printer's refusal above
        raise DerivationError(f"the derived update cannot be printed as torch code: {e}") from None


def _var(sym: sp.Symbol) -> sp.Symbol:
    return sp.Symbol(f"in_{sym.name}")


def _codegen(exprs: dict[str, sp.Expr], printer) -> tuple[list[str], dict[str, str]]:
    """CSE over named expressions; returns assignment lines and name -> printed result."""
    names = list(exprs)
    subs_in = {s: _var(s) for e in exprs.values() for s in sp.sympify(e).free_symbols}
    values = [sp.sympify(exprs[n]).xreplace(subs_in) for n in names]
    reps, reduced = sp.cse(values, symbols=sp.numbered_symbols("t"), optimizations="basic")
    lines = [f"{s} = {printer.doprint(v)}" for s, v in reps]
    return lines, {n: printer.doprint(v) for n, v in zip(names, reduced)}


def _is_one(e) -> bool:
    return sp.sympify(e) == 1


@functools.lru_cache(maxsize=256)
def torch_step_source(form) -> str:
    """Python source of `step(S, inp)` for the normal form (inputs already in broadcast layout); cached per form, so
    derive's check_printable and the rule's first step print it once."""
    p = _TorchPrinter()
    exprs = {}
    if isinstance(form, RLSForm):
        lines, out = _codegen({"g": form.decay, "R": form.weight, "u": form.key, "e": form.target}, p)
        body = [f"    {ln}" for ln in _input_lines(form) + lines]
        body += ["    S, P = S",
                 f"    g, R, u, e = ({out['g']}), ({out['R']}), ({out['u']}), ({out['e']})",
                 # P is kept symmetric: its antisymmetric part (rounding) would grow like Π 1/γ, in P and in
                 # its adjoint (NOTES.md §5); symmetrising the input also symmetrises the adjoint, and
                 # (R/den)·(Pu Puᵀ) is bitwise symmetric where (R·Pu)·Puᵀ/den is not
                 "    P = 0.5 * (P + P.transpose(-1, -2)) / g",
                 "    Pu = (P * u).sum(-1, keepdim=True)                       # P u, [..., d_k, 1]",
                 "    uPu = (Pu * u.transpose(-1, -2)).sum(-2, keepdim=True)     # uᵀ P u",
                 "    den = 1 + R * uPu",
                 "    P = P - (R / den) * (Pu * Pu.transpose(-1, -2))",
                 # P_t u = P̃u / den, exactly; read off the updated P it would carry P_t's cancellation error
                 # (ε·|P̃|, huge once the ridge is small or γ^t is) into a gain that is small in the keys' span
                 "    gain = (Pu / den).transpose(-1, -2)                      # (P_t u)ᵀ, [..., 1, d_k]",
                 "    S = S + (e - R * (S * u).sum(-1, keepdim=True)) * gain",
                 "    return (S, P)"]
        return "def step(S, inp):\n" + "\n".join(body) + "\n"
    if isinstance(form, ExactForm):
        exprs["decay"] = form.decay
        exprs["gram_diag"] = form.gram_diag
        for r, c in enumerate(form.gram):
            exprs[f"R{r}"], exprs[f"u{r}"], exprs[f"uw{r}"] = c.coef, c.a, c.b
        for m, t in enumerate(form.moments):
            exprs[f"e{m}"], exprs[f"w{m}"] = t.coef, t.w
        lines, out = _codegen(exprs, p)
        body = [f"    {ln}" for ln in _input_lines(form) + lines]
        body += ["    G, H = S",
                 f"    G = ({out['decay']}) * G",
                 f"    H = ({out['decay']}) * H"]
        for r in range(len(form.gram)):
            body.append(f"    H = H + ({out[f'R{r}']}) * ({out[f'u{r}']}).transpose(-1, -2) * ({out[f'uw{r}']})")
        if form.gram_diag != 0:
            # as_tensor: a constant weight (1/100·‖S‖²) prints as a Python float, which broadcast_to refuses
            body.append(f"    H = H + torch.diag_embed(torch.broadcast_to(torch.as_tensor({out['gram_diag']}, dtype=H.dtype, "
                        "device=H.device), H.shape[:-2] + (1, H.shape[-1]))[..., 0, :])")
        for m in range(len(form.moments)):
            body.append(f"    G = G + ({out[f'e{m}']}) * ({out[f'w{m}']})")
        body.append("    return (G, H)")
        return "def step(S, inp):\n" + "\n".join(body) + "\n"
    exprs["decay"] = form.decay
    for r, c in enumerate(form.corrections):
        exprs[f"c{r}"], exprs[f"a{r}"], exprs[f"b{r}"] = c.coef, c.a, c.b
    for m, t in enumerate(form.inputs):
        exprs[f"e{m}"], exprs[f"w{m}"] = t.coef, t.w
    lines, out = _codegen(exprs, p)
    body = [f"    {ln}" for ln in _input_lines(form) + lines]
    body.append("    St = S" if _is_one(form.decay) else f"    St = ({out['decay']}) * S")
    for r in range(len(form.corrections)):
        body.append(f"    p{r} = (St * ({out[f'a{r}']})).sum(-1, keepdim=True)")
    new = "St"
    for r in range(len(form.corrections)):
        new += f" - ({out[f'c{r}']}) * p{r} * ({out[f'b{r}']})"
    for m in range(len(form.inputs)):
        new += f" + ({out[f'e{m}']}) * ({out[f'w{m}']})"
    body.append(f"    return {new}")
    return "def step(S, inp):\n" + "\n".join(body) + "\n"


def _input_lines(form, exprs=None) -> list[str]:
    exprs = form.update_expressions() if exprs is None else exprs
    syms = sorted({s for e in exprs for s in sp.sympify(e).free_symbols}, key=lambda s: s.name)
    return [f"in_{s.name} = inp['{s.name}']" for s in syms]


@functools.lru_cache(maxsize=256)
def _compile(source: str):
    scope = {"torch": torch}
    exec(compile(source, "<olssm-step>", "exec"), scope)
    return scope["step"]


# --------------------------------------------------------------------------------------------
# the Rule

_GREEK = ["ε", "η", "κ", "μ", "ν", "ξ", "ρ", "τ", "φ", "ψ", "ω"]
_GREEK_TEX = [r"\varepsilon", r"\eta", r"\kappa", r"\mu", r"\nu", r"\xi", r"\rho", r"\tau", r"\varphi",
              r"\psi", r"\omega"]


def _substitute(form, subs: dict):
    """form with subs applied to every expression (also inside its Correction / InputTerm tuples)."""
    def sub(v):
        if isinstance(v, sp.Basic):
            return v.xreplace(subs)
        if isinstance(v, (Correction, InputTerm)):
            return dataclasses.replace(v, **{f.name: sub(getattr(v, f.name)) for f in dataclasses.fields(v)})
        if isinstance(v, tuple) and v and isinstance(v[0], (Correction, InputTerm)):
            return tuple(sub(x) for x in v)
        return v
    return dataclasses.replace(form, **{f.name: sub(getattr(form, f.name)) for f in dataclasses.fields(form)})


_SUPERSCRIPT = "⁰¹²³⁴⁵⁶⁷⁸⁹"


class _TextPrinter(StrPrinter):
    """sympy's str printer with small integer powers as superscripts: (kᵀk₂)² rather than (kᵀk₂)**2 in a
    rule's text form (the LaTeX form has its own printer)."""

    def _print_Pow(self, expr, rational=False):
        n = expr.exp
        if n.is_Integer and 2 <= int(n) <= 9:
            base = self.parenthesize(expr.base, precedence(expr), strict=False)
            if base[-1] in _SUPERSCRIPT:   # ‖k‖² squared: (‖k‖²)², not ‖k‖²²
                base = f"({base})"
            return base + _SUPERSCRIPT[int(n)]
        return super()._print_Pow(expr, rational)


def text(e) -> str:
    """A coefficient expression as a rule's text form prints it."""
    return _TextPrinter().doprint(sp.sympify(e))


class Rule:
    """A closed-form state update derived from an Objective."""

    def __init__(self, objective, form):
        self.objective = objective
        self.form = form
        self._names = self._name_coefficients()

    # -- introspection ------------------------------------------------------------------------
    def with_log_decays(self) -> "Rule":
        """The same rule reading every per-token input of domain "decay" in log space: α ↦ exp(α') with α' of
        the same name, role and kind and domain "log_decay" (≤ 0). Learned parameters are left as they are.

        Why: a kernel that works with cumulative log decays (the chunked ones) needs log Λ. With a raw α it
        takes log α, and the chain rule back to α divides by α, so ∂L/∂α carries a relative error ~ε/α
        (so a gradient to a raw α takes the slower token loops: triton's recurrent backward under "auto",
        the chunk backend's recurrent engine). From α' the log is
        α' itself: no log, no division, no clamp at float32's tiny, and strong decays never round-trip
        through exp. This is fla's interface too (its gated kernels take g = log α). Layers use it: they
        produce the decay in log space anyway. Returns self when there is nothing to replace."""
        from ..objectives.core import _declare
        subs = {}
        for e in self.form.expressions():
            for s in sp.sympify(e).free_symbols:
                spec = spec_of(s)
                # (a decay-domain input that is also the readout stays raw: o = S q reads it as it is)
                if spec.domain == "decay" and not spec.is_parameter and s != self.form.readout:
                    subs[s] = sp.exp(_declare(spec.name, spec.role, spec.kind, False, "log_decay"))
        if not subs:
            return self
        return Rule(self.objective, _substitute(self.form, subs))

    @property
    def mode(self) -> str:
        return self.form.mode

    @property
    def is_exact(self) -> bool:
        """Rules whose state is a pair ([.., d_v, d_k], [.., d_k, d_k]): exact and RLS forms."""
        return isinstance(self.form, (ExactForm, RLSForm))

    @property
    def is_rls(self) -> bool:
        return isinstance(self.form, RLSForm)

    @property
    def structure(self) -> str:
        return self.form.structure

    @property
    def decay_kind(self) -> str:
        return self.form.decay_kind

    @property
    def inputs(self) -> dict[str, InputSpec]:
        """Every input the rule reads (per-token inputs and learned parameters), by name."""
        return dict(self._inputs_of_form[0])

    @property
    def update_inputs(self) -> dict[str, InputSpec]:
        """The inputs the state update reads (the readout's query excluded)."""
        return dict(self._inputs_of_form[1])

    @functools.cached_property
    def _inputs_of_form(self):
        # every scan call reads these twice: walking the form's sympy trees each time was ~10% of the triton
        # path's host time per call (the form is frozen, so once per rule)
        def specs(exprs):
            syms = {s for e in exprs for s in sp.sympify(e).free_symbols}
            return {s.name: spec_of(s) for s in sorted(syms, key=lambda s: s.name)}
        return specs(self.form.expressions()), specs(self.form.update_expressions())

    @property
    def token_inputs(self) -> dict[str, InputSpec]:
        return {n: s for n, s in self.inputs.items() if not s.is_parameter}

    @property
    def parameters(self) -> dict[str, InputSpec]:
        return {n: s for n, s in self.inputs.items() if s.is_parameter}

    @property
    def query_name(self) -> str:
        q = self.form.readout
        return q.name if isinstance(q, sp.Symbol) else None

    @property
    def coefficients(self) -> dict[str, sp.Expr]:
        """Named coefficient expressions as printed (ε = β/(1 + β kᵀk), ...)."""
        return {name: e for e, (name, _) in self._names.items()}

    def _name_coefficients(self):
        names = {}
        cands = []
        if isinstance(self.form, NormalForm):
            cands = [c.coef for c in self.form.corrections] + [self._strip_values(t.coef)[0] for t in self.form.inputs]
        else:
            cands = [c.coef for c in getattr(self.form, "gram", ())]
        # a letter an input already prints as is skipped: an input named eta had read "η = (−η·…)/…"
        taken = {display_name(n) for n in self.inputs}
        letters = iter([(g, t) for g, t in zip(_GREEK, _GREEK_TEX) if g not in taken]
                       + [(f"c{j}", f"c_{{{j}}}") for j in range(len(cands)) if f"c{j}" not in taken])
        for e in cands:
            if e in names or (-e) in names or e.is_Symbol or e.is_Number or (-e).is_Symbol:
                continue   # (a negation prints as −name: −ε k₂ kᵀ beside ε k kᵀ, not a second letter)
            # the name stands for the sign-free form, so that the term carries the minus (I + ε k₂ kᵀ)
            names[-e if e.could_extract_minus_sign() else e] = next(letters)
        return names

    @staticmethod
    def _strip_values(e):
        """Split e into (coefficient, value-vector factor) for printing (ε·v -> (ε, v))."""
        vals, rest = [], []
        for f in sp.Mul.make_args(sp.sympify(e)):
            is_val = f.is_Symbol and spec_of(f).role == "value"
            (vals if is_val else rest).append(f)
        return sp.Mul(*rest), sp.Mul(*vals)

    def _c(self, e, tex=False) -> str:
        e = sp.sympify(e)
        if e in self._names:
            return self._names[e][1 if tex else 0]
        if (-e) in self._names:
            return "-" + self._names[-e][1 if tex else 0]
        if tex:
            return sp.latex(e)
        s = text(e)
        return f"({s})" if any(ch in s for ch in "+-/ ") else s

    def _signed(self, coef, body: str, sign: str, tex=False) -> str:
        """" ± coef body" as a term after "sign": no factor 1, and a coefficient's own minus folded into the sign
        (I − (−b) k₂ kᵀ had printed so, and H_t's terms as "+ 1 k kᵀ")."""
        c = sp.sympify(coef)
        if c not in self._names and c.could_extract_minus_sign():
            c, sign = -c, "+" if sign == "-" else "-"
        return f" {sign} {body}" if c == 1 else f" {sign} {self._c(c, tex)} {body}"

    def _is_name(self, e) -> bool:
        e = sp.sympify(e)
        return e in self._names or (-e) in self._names

    def _named(self, e, tex=False) -> str:
        """Print e with the named coefficients substituted (exp(−ε k²) rather than the full form)."""
        e = sp.sympify(e)
        if self._is_name(e):
            return self._c(e, tex)
        for expr, (name, name_tex) in self._names.items():
            e = e.subs(expr, sp.Symbol(name_tex if tex else name))
        return sp.latex(e) if tex else text(e)

    def _vec(self, v, tex=False) -> str:
        s = sp.latex(v) if tex else text(v)   # (str gave k/g**2 where the coefficients print g²)
        return s if sp.sympify(v).is_Symbol else (rf"\left({s}\right)" if tex else f"({s})")

    # -- printing -------------------------------------------------------------------------------
    def lines(self, tex=False) -> list[str]:
        T = (lambda a, b: b) if tex else (lambda a, b: a)
        f = self.form
        out = []
        St, Sp = T("S̃_t", r"\tilde S_t"), T("S_{t-1}", r"S_{t-1}")
        odot, top = T(" ⊙ ", r" \odot "), T("ᵀ", r"^\top")
        if isinstance(f, RLSForm):
            g, R, u = self._c(f.decay, tex), self._c(f.weight, tex), self._vec(f.key, tex)
            R = "" if f.weight == 1 else R + ("\\," if tex else " ")
            out.append(T(f"P̃ = P_{{t-1}} / {g},  P_t = P̃ - {R}P̃{u} {u}ᵀP̃ / (1 + {R}{u}ᵀP̃{u}),  P_0 = I/{self._c(f.ridge)}",
                         rf"\tilde P = P_{{t-1}}/{g},\; P_t = \tilde P - \frac{{{R}\tilde P {u} {u}^\top \tilde P}}{{1 + {R}{u}^\top \tilde P {u}}},\; P_0 = I/{sp.latex(f.ridge)}"))
            e = self._input(InputTerm(f.target, f.key), tex).rsplit(" ", 1)[0]
            out.append(T(f"S_t = S_{{t-1}} + ({e} - {R}S_{{t-1}} {u}) (P_t {u})ᵀ",
                         rf"S_t = S_{{t-1}} + \left({e} - {R}S_{{t-1}} {u}\right) (P_t {u})^\top"))
            out.append(T(f"o_t = S_t {self._vec(f.readout)}", rf"o_t = S_t {self._vec(f.readout, True)}"))
        elif isinstance(f, ExactForm):
            g = "" if _is_one(f.decay) else self._c(f.decay, tex) + " "
            hterms = "".join(self._signed(c.coef, f"{self._vec(c.a, tex)} {self._vec(c.b, tex)}{top}", "+", tex)
                             for c in f.gram)
            if f.gram_diag != 0:   # a scalar weight δ I, as the ridge below; any other diag(δ)
                if kind_of(f.gram_diag) != SCALAR:
                    hterms += T(f" + diag({f.gram_diag})", rf" + \operatorname{{diag}}({sp.latex(f.gram_diag)})")
                else:
                    hterms += self._signed(f.gram_diag, T("I", "I"), "+", tex)
            gterms = "".join(self._signed_input(t, tex) for t in f.moments)
            out.append(T(f"H_t = {g}H_{{t-1}}{hterms}", rf"H_t = {g}H_{{t-1}}{hterms}"))
            out.append(T(f"G_t = {g}G_{{t-1}}{gterms}", rf"G_t = {g}G_{{t-1}}{gterms}"))
            col = kind_of(f.ridge) == COLUMN    # a per-column ridge is diag(λ), not λ I (in LaTeX too)
            lam = "" if f.ridge == 0 else T(f" + diag({f.ridge})" if col else f" + {self._c(f.ridge)} I",
                                              rf" + \operatorname{{diag}}({sp.latex(f.ridge)})" if col
                                              else rf" + {sp.latex(f.ridge)} I")
            out.append(T(f"o_t = G_t (H_t{lam})⁻¹ {self._vec(f.readout)}",
                         rf"o_t = G_t \left(H_t{lam}\right)^{{-1}} {self._vec(f.readout, True)}"))
        else:
            base = Sp
            if not _is_one(f.decay):
                d = self._named(f.decay, tex)
                if isinstance(sp.sympify(f.decay), sp.Add) and not self._is_name(f.decay):
                    d = T(f"({d})", rf"\left({d}\right)")   # S̃ = 1 - β ⊙ S_prev had read as 1 − (β ⊙ S_prev)
                out.append(f"{St} = {d}{odot}{Sp}")
                base = St
            rhs = base
            if f.corrections:
                proj = "".join(self._signed(c.coef, f"{self._vec(c.a, tex)} {self._vec(c.b, tex)}{top}", "-", tex)
                               for c in f.corrections)
                rhs = T(f"{base} (I{proj})", rf"{base} \left(I{proj}\right)")
            for t in f.inputs:
                rhs += self._signed_input(t, tex)
            out.append(f"S_t = {rhs}")
            out.append(T(f"o_t = S_t {self._vec(f.readout)}", rf"o_t = S_t {self._vec(f.readout, True)}"))
        named = [(n, e) for e, n in self._names.items()]
        if named:
            defs = ", ".join(f"{n[1 if tex else 0]} = {sp.latex(e) if tex else text(e)}" for n, e in named)
            out.append(T(f"where {defs}", rf"\text{{where }} {defs}"))
        row = [c.coef for c in f.corrections if kind_of(c.coef) == ROW] if isinstance(f, NormalForm) else []
        if row:   # named after the rule's own row coefficient (it had always said ε_i)
            name = self._c(row[0])
            out.append(T(f"(row-wise: value row i of the state uses its own coefficient, e.g. {name}_i)",
                         rf"\text{{(row-wise: value row }} i \text{{ uses its own coefficient, e.g. }} "
                         rf"{self._c(row[0], True)}_i\text{{)}}"))
        return out

    def _signed_input(self, t: InputTerm, tex=False) -> str:
        """" ± term": a coefficient's own minus folded into the sign, as _signed does (+ ((−b₂) ⊙ v₂) k₂ᵀ had printed)."""
        c = sp.sympify(t.coef)
        if c not in self._names and c.could_extract_minus_sign():
            return f" - {self._input(dataclasses.replace(t, coef=-c), tex)}"
        return f" + {self._input(t, tex)}"

    def _input(self, t: InputTerm, tex=False) -> str:
        coef, vals = self._strip_values(t.coef)
        top = r"^\top" if tex else "ᵀ"
        odot = r" \odot " if tex else " ⊙ "
        vs = sp.latex(vals) if tex else str(vals)
        if sp.sympify(t.w) == 1:   # an elementwise term (⟨S, M⟩'s M): the matrix itself, no outer product with 1
            if vals == 1:
                return self._c(coef, tex) if coef != 1 else "1"
            return vs if coef == 1 else f"{self._c(coef, tex)}{odot}{vs}"
        w = self._vec(t.w, tex)
        if vals == 1:
            return f"{self._c(coef, tex)} {w}{top}" if coef != 1 else f"1 {w}{top}"
        if coef == 1:
            return f"{vs} {w}{top}"
        if kind_of(coef) == ELEMENTWISE:   # a d_v × d_k factor multiplies the whole outer product
            return f"{self._c(coef, tex)}{odot}({vs} {w}{top})"
        return f"({self._c(coef, tex)}{odot}{vs}) {w}{top}"

    def __str__(self):
        return "\n".join(self.lines())

    def __repr__(self):
        return f"Rule({self.objective!r})\n" + str(self)

    def latex(self) -> str:
        return r"\begin{aligned}" + r" \\ ".join(self.lines(tex=True)) + r"\end{aligned}"

    def _repr_latex_(self):
        return "$" + self.latex() + "$"

    # -- numerics -----------------------------------------------------------------------------
    def kernel_source(self, target: str = "torch") -> str:
        """The generated source for a target: "torch" (the step) or "triton" (the scan kernels)."""
        if target == "torch":
            return torch_step_source(self.form)
        from ..kernels import kernel_source  # lowering lives in kernels; derive only forwards
        return kernel_source(self, target)

    @functools.cached_property
    def _step_fn(self):
        return _compile(torch_step_source(self.form))

    def state_shape(self, d_k: int, d_v: int):
        if self.is_exact:
            return ((d_v, d_k), (d_k, d_k))
        return (d_v, d_k)

    def zero_state(self, batch_shape, d_k, d_v, device=None, dtype=torch.float32, **inputs):
        """The state before the first token: zeros (RLS: S = 0, P = I/λ, so it needs the ridge input)."""
        z = lambda *s: torch.zeros(*batch_shape, *s, device=device, dtype=dtype)
        if self.is_rls:
            lam = self.form.ridge
            if lam.free_symbols:
                inp = self.broadcast_inputs(d_k, d_v, {s.name: inputs.get(s.name) for s in lam.free_symbols}, "zero_state",
                                            need={s.name: spec_of(s) for s in lam.free_symbols})
                lam = evaluator({"lam": lam})(inp)["lam"].to(dtype)
            else:
                lam = torch.tensor(float(lam), dtype=dtype, device=device)
            eye = torch.eye(d_k, device=device, dtype=dtype)
            return (z(d_v, d_k), (eye / lam).expand(*batch_shape, d_k, d_k).clone())
        if self.is_exact:
            return (z(d_v, d_k), z(d_k, d_k))
        return z(d_v, d_k)

    def broadcast_inputs(self, d_k: int, d_v: int, inputs: dict, where: str = "step", need=None) -> dict:
        """Check per-token inputs/parameters and lay them out for broadcasting against [..., d_v, d_k]."""
        need = self.inputs if need is None else need
        _require(inputs, need, where)
        out = {}
        for n, s in need.items():
            x = inputs[n]
            if not torch.is_tensor(x):
                x = torch.as_tensor(x, dtype=torch.float32)
            if not x.is_floating_point():
                raise TypeError(f"{where}: input {n!r} must be a floating tensor, got {x.dtype}")
            x = x.to(compute_dtype(x))
            if s.kind == SCALAR:
                x = x[..., None, None]
            elif s.kind == ROW:
                _check_last(x, d_v, n, "d_v (value size)", where)
                x = x[..., :, None]
            elif s.kind == COLUMN:
                _check_last(x, d_k, n, "d_k (key size)", where)
                x = x[..., None, :]
            else:
                if x.dim() < 2 or tuple(x.shape[-2:]) != (d_v, d_k):
                    raise ValueError(f"{where}: parameter {n!r} must end in (d_v, d_k) = ({d_v}, {d_k}), "
                                     f"got shape {tuple(x.shape)}")
            out[n] = x
        return out

    def step(self, state, backend: str = "auto", **inputs):
        """One update S_{t-1} -> S_t (state math in fp32).

        backend: "torch" (the generated step, any leading batch shape), "triton" (the fused scan
        kernel with T = 1, as decode; state [B, H, d_v, d_k]), or "auto": triton for such CUDA
        states of normal-form rules, torch otherwise."""
        d_v, d_k = self._state_dims(state)
        unknown = set(inputs) - set(self.inputs) - {self.query_name}
        if unknown:
            raise ValueError(f"step: unexpected input(s) {sorted(unknown)}; this rule reads {sorted(self.inputs)}")
        # before the triton branch fills in a query / ridge for its readout: those fills are only harmless where the
        # update itself does not read them (a query or λ that also weights the loss must come from the caller)
        _require(inputs, self.update_inputs, "step")
        if self._backend(state, backend, "step") == "triton":
            qn = self.query_name
            S = state[0] if self.is_exact else state
            if qn not in inputs:    # the kernel also reads out o = S q: give it a query, drop o
                inputs = {**inputs, qn: S.new_zeros(*S.shape[:-2], d_k)}
            if self.is_exact:       # and an exact rule's readout reads λ: any positive value, o is dropped
                for sym in sp.sympify(self.form.ridge).free_symbols:
                    spec = spec_of(sym)
                    if sym.name not in inputs:
                        lead = S.shape[1:2] if spec.is_parameter else S.shape[:2]
                        size = {SCALAR: (), ROW: (d_v,), COLUMN: (d_k,)}[spec.kind]
                        inputs = {**inputs, sym.name: S.new_ones(*lead, *size)}
            return self.decode(state, backend="triton", **inputs)[1]
        self._check_values(state, inputs, "step")
        inp = self.broadcast_inputs(d_k, d_v, inputs, "step", need=self.update_inputs)
        lead = (state[0] if self.is_exact else state).shape[:-2]
        for n, x in inp.items():    # broadcasting may not enlarge the state's batch (nor fail deep in the step)
            try:
                ok = torch.broadcast_shapes(x.shape[:-2], lead) == lead
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"step: input {n!r} of shape {tuple(inputs[n].shape)} does not broadcast to the "
                                 f"state's batch shape {tuple(lead)} (state [..., d_v, d_k] = "
                                 f"{tuple(lead) + (d_v, d_k)})")
        if self.is_exact:
            return self._step_fn(tuple(s.to(compute_dtype(s)) for s in state), inp)
        return self._step_fn(state.to(compute_dtype(state)), inp)

    def _check_values(self, state, inputs, where):
        """NaN / inf or values outside an input's domain are errors naming the input, as scan's are
        (kernels.api.check_input_values; OLSSM_CHECK_INPUTS): unchecked, a token loop carried a NaN or a gate
        above 1 into every later state silently."""
        from ..kernels.api import check_input_values   # the check lives with scan's; derive only forwards
        check_input_values({n: x for n, x in inputs.items() if torch.is_tensor(x) and n in self.inputs},
                           self.inputs, state, caller=where, state_name="state")

    def read(self, state, **inputs):
        """The readout o = S q (exact rules: G (H + diag λ)⁻¹ q) for the query in inputs."""
        d_v, d_k = self._state_dims(state)
        if self.is_exact and not self.is_rls:
            # G (H + diag λ)⁻¹ q reads the ridge's inputs and the query only (all of the rule's had been required)
            reads = {s.name for e in (self.form.ridge, self.form.readout) for s in sp.sympify(e).free_symbols}
            inp = self.broadcast_inputs(d_k, d_v, inputs, "read", need={n: self.inputs[n] for n in sorted(reads)})
            return exact_readout(self.form, tuple(x.to(compute_dtype(x)) for x in state), inp)
        qn = self.query_name
        if qn not in inputs:
            raise ValueError(f"read: needs the query input {qn!r}")
        S = state[0] if self.is_rls else state
        q = inputs[qn].to(compute_dtype(S))
        _check_last(q, d_k, qn, "d_k (key size)", "read")
        return (S.to(q.dtype) * q.unsqueeze(-2)).sum(-1)

    def decode(self, state, backend: str = "auto", **inputs):
        """One token: (o_t, S_t) from S_{t-1}; the query is read from inputs[query name].

        backend: "torch" (the generated step), "triton" (the fused kernel with T = 1; state
        [B, H, d_v, d_k], inputs [B, H, ...], parameters [H, ...]), or "auto": triton for such
        CUDA states of non-exact rules, torch otherwise."""
        qn = self.query_name
        if qn is None or qn not in inputs:
            raise ValueError(f"decode: needs the query input {qn!r}")
        if self._backend(state, backend, "decode") == "triton":
            self._check_values(state, inputs, "decode")
            from ..kernels.triton import triton_decode  # lowering lives in kernels; derive only forwards
            return triton_decode(self, state, **inputs)
        new = self.step(state, backend="torch", **inputs)
        return self.read(new, **inputs), new

    def _backend(self, state, backend, where) -> str:
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"{where}: backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        if backend == "auto":
            fits = (not self.is_exact and torch.is_tensor(state) and state.is_cuda and state.dim() == 4
                    and self.query_name is not None)
            return "triton" if fits else "torch"
        return backend

    def _state_dims(self, state):
        for part in (state if isinstance(state, (tuple, list)) else (state,)):
            if torch.is_tensor(part) and not part.is_floating_point():   # as scan's initial_state: no silent rounding
                raise ValueError(f"state: must be floating point (the carried state), got {part.dtype}")
        if self.is_exact:
            if not (isinstance(state, (tuple, list)) and len(state) == 2):
                raise ValueError("state: an exact rule's state is a pair (G [..., d_v, d_k], H [..., d_k, d_k])")
            G, H = state
            if H.shape[-1] != H.shape[-2] or G.shape[-1] != H.shape[-1]:
                raise ValueError(f"state: G {tuple(G.shape)} and H {tuple(H.shape)} do not match "
                                 "(G [..., d_v, d_k], H [..., d_k, d_k])")
            return G.shape[-2], G.shape[-1]
        if not torch.is_tensor(state) or state.dim() < 2:
            raise ValueError(f"state: expected a tensor [..., d_v, d_k], got {type(state).__name__} "
                             f"{tuple(getattr(state, 'shape', ()))}")
        return state.shape[-2], state.shape[-1]

    def scan(self, q=None, k=None, v=None, *, initial_state=None, output_final_state=False,
             backend="auto", **inputs):
        """o, final_state = scan over [B, T, H, D] inputs; see olssm.kernels.scan."""
        from ..kernels import scan as _scan
        return _scan(self, q, k, v, initial_state=initial_state, output_final_state=output_final_state,
                     backend=backend, **inputs)


def untraced(fn):
    """fn kept out of torch.compile's trace (a graph break; it runs eagerly), for the sympy work behind a scan: torch
    2.11's dynamo failed inside sympy (InternalTorchDynamoError in Mul.flatten). torch._disable_dynamo imports dynamo
    at the first call, not at olssm's import (torch.compiler.disable would: ~1 s, and triton.language with it, before
    a test module could switch on Triton's interpreter)."""
    lazy = getattr(torch, "_disable_dynamo", None)
    return lazy(fn) if lazy is not None else torch.compiler.disable(fn)


@untraced   # sympy code generation; the function it returns is plain torch, and traced
def evaluator(exprs: dict):
    """Compile named coefficient expressions into one torch function: inp -> {name: tensor}.

    Inputs are in broadcast layout (rows [.., d_v, 1], columns [.., 1, d_k], scalars [.., 1, 1]), so
    the results broadcast against the state; every backend evaluates the normal form through this
    (one printer, one CSE pass), cached by the expressions themselves."""
    return _evaluator(tuple(exprs.items()))


@functools.lru_cache(maxsize=256)
def _evaluator(items):
    names = [n for n, _ in items]
    values = [sp.sympify(e) for _, e in items]
    lines, out = _codegen(dict(zip(names, values)), _TorchPrinter())
    syms = sorted({s for e in values for s in e.free_symbols}, key=lambda s: s.name)
    src = ("def step(S, inp):\n" + "".join(f"    in_{s.name} = inp['{s.name}']\n" for s in syms)
           + "".join(f"    {ln}\n" for ln in lines)
           + "    return (" + ", ".join(out[n] for n in names) + ",)\n")
    fn = _compile(src)
    return lambda inp: dict(zip(names, fn(None, inp)))


def closed_form_log(decay):
    """log Λ without a log when Λ is a product of exp()s and powers (Mamba: log exp(Δ A) = Δ A), so
    that gradients never divide by a tiny decay; None when no such form exists, or when it is not real
    (Λ = −e^a: expand_log gives a + iπ, whose real part a was silently taken)."""
    return _closed_form_log(sp.sympify(decay))


@functools.lru_cache(maxsize=1024)
def _closed_form_log(decay):
    # every scan call asks (10-30 us of expand_log each time): once per decay expression
    le = sp.expand_log(sp.log(decay), force=True)
    return None if le.has(sp.log) or le.has(sp.I) or le.has(sp.zoo, sp.nan) else le


def decay_may_be_negative(decay) -> bool:
    """Λ is not known to be ≥ 0: neither from its inputs' declared domains (sympy's assumptions) nor as a real
    closed-form log. The chunked forms work with log Λ, so such a rule runs the token loops, which multiply by Λ
    (a decay of −0.5 had come out as e^-87 from the chunk backend)."""
    return _may_be_negative(sp.sympify(decay))


@functools.lru_cache(maxsize=1024)
def _may_be_negative(decay) -> bool:
    return not (decay.is_nonnegative or _closed_form_log(decay) is not None)


def exact_readout(form, state, inp: dict):
    """o = G (H + diag λ)⁻¹ q (RLS: o = S q) with inputs in broadcast layout."""
    if isinstance(form, RLSForm):
        return (state[0] * inp[form.readout.name]).sum(-1)
    G, H = state
    ev = evaluator({"ridge": form.ridge, "q": form.readout})(inp)
    # one dtype (fp32 inputs against an fp64 state: linalg.solve does not promote) and one batch shape (an
    # unbatched state read with a batch of queries), as the other rules get from broadcasting
    q = torch.as_tensor(ev["q"], device=H.device)
    dt = torch.promote_types(H.dtype, q.dtype)
    ridge = torch.as_tensor(ev["ridge"], dtype=dt, device=H.device)
    G, H, q = G.to(dt), H.to(dt), q.to(dt)
    K = H.shape[-1]
    batch = torch.broadcast_shapes(G.shape[:-2], H.shape[:-2], q.shape[:-2], ridge.shape[:-2])
    A = torch.broadcast_to(H, batch + (K, K)) + torch.diag_embed(torch.broadcast_to(ridge, batch + (1, K))[..., 0, :])
    x = torch.linalg.solve(A, torch.broadcast_to(q, batch + (1, K)).mT)
    return (G * x.mT).sum(-1)


def compute_dtype(x) -> torch.dtype:
    """State math runs in fp32 (fp64 stays fp64, for verification)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _require(inputs: dict, need: dict, where: str) -> None:
    missing = [n for n in need if n not in inputs or inputs[n] is None]
    if missing:
        raise ValueError(f"{where}: missing input(s) {missing}; this rule reads "
                         + ", ".join(f"{n} ({s.role}, {s.kind})" for n, s in need.items()))


def _check_last(x, size, name, what, where):
    if x.dim() == 0 or x.shape[-1] != size:
        raise ValueError(f"{where}: input {name!r} must have last dimension {what} = {size}, "
                         f"got shape {tuple(x.shape)}")
