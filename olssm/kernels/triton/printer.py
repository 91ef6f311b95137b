"""Print sympy coefficient expressions as Triton tile code.

Tile conventions inside the generated kernels (one program = one head, one block of BV value rows):

    scalar       a 0-d value                      (per-head scalar, e.g. beta_t, gamma)
    row          a [BV, 1] tile                   (value-sized, e.g. v_t, dt_t)
    column       a [1, BK] tile                   (key-sized, e.g. k_t, q_t)
    elementwise  a [BV, BK] tile                  (e.g. Mamba's A, or exp(dt * A))

so ordinary broadcasting gives every expression the right shape. ``csum(x)`` (a sum over the key
index) becomes a masked ``tl.sum(..., axis=1, keep_dims=True)``: the padded key lanes (BK is the
next power of two >= d_k) are selected away, never multiplied, so a NaN/inf there cannot leak.
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

#: name of the [1, BK] key-lane mask in the generated kernels
KEY_MASK = "km2"
#: the sympy functions TritonPrinter lowers; any other raises NotImplementedError at generation time
LOWERED = frozenset({"exp", "log", "Abs", "sin", "cos", "tanh", "Max", "Min", "csum", "sign", "cosh", "sinh"})


class TritonPrinter(PythonCodePrinter):
    """sympy -> Triton (triton.language as tl) expression text."""

    printmethod = "_tritoncode"

    def __init__(self, settings=None, key_mask: str = KEY_MASK, key_axis: int = 1):
        super().__init__({"strict": True, **(settings or {})})
        # the block-scan kernels (pscan.py) hold [BT, BV, BK] tiles: key axis 2, mask km3
        self.key_mask, self.key_axis = key_mask, key_axis

    # -- atoms ----------------------------------------------------------------------------------
    def _print_Symbol(self, e):
        return e.name

    def _print_Integer(self, e):
        return f"{int(e)}.0"

    def _print_Rational(self, e):
        return f"({e.p}.0 / {e.q}.0)"

    def _print_Half(self, e):
        return "0.5"

    def _print_Float(self, e):
        return repr(float(e))

    def _print_NegativeOne(self, e):
        return "-1.0"

    def _print_One(self, e):
        return "1.0"

    def _print_Zero(self, e):
        return "0.0"

    def _print_Exp1(self, e):
        return repr(float(sp.E))

    def _print_Pi(self, e):
        return repr(float(sp.pi))

    # -- the key-index sum ----------------------------------------------------------------------
    def _print_csum(self, e):
        return (f"tl.sum(tl.where({self.key_mask}, {self._print(e.args[0])}, 0.0), axis={self.key_axis}, "
                "keep_dims=True)")

    # -- elementary functions -------------------------------------------------------------------
    def _fn(self, name, e):
        return f"{name}({', '.join(self._print(a) for a in e.args)})"

    def _print_exp(self, e):
        return self._fn("tl.exp", e)

    def _print_log(self, e):
        if len(e.args) != 1:
            raise NotImplementedError("triton printer: log with a base; write log(x)/log(b)")
        return self._fn("tl.log", e)

    def _print_Abs(self, e):
        return self._fn("tl.abs", e)

    def _print_sin(self, e):
        return self._fn("tl.sin", e)

    def _print_cos(self, e):
        return self._fn("tl.cos", e)

    def _print_tanh(self, e):
        x = self._print(e.args[0])
        return f"(2.0 / (1.0 + tl.exp(-2.0 * ({x}))) - 1.0)"

    def _print_Max(self, e):
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"tl.maximum({out}, {self._print(a)})"
        return out

    def _print_Min(self, e):
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"tl.minimum({out}, {self._print(a)})"
        return out

    def _print_Pow(self, e, rational=False):
        b, x = e.as_base_exp()
        base = self._print(b)
        if x == sp.Rational(1, 2):
            return f"tl.sqrt({base})"
        if x == -sp.Rational(1, 2):
            return f"(1.0 / tl.sqrt({base}))"
        if x.is_Integer:
            n = int(x)
            if n == 0:
                return "1.0"
            if abs(n) <= 8:
                prod = " * ".join([f"({base})"] * abs(n))
                return f"({prod})" if n > 0 else f"(1.0 / ({prod}))"
            return f"tl.exp({n}.0 * tl.log(tl.abs({base})))" + ("" if n % 2 == 0 else f" * tl.where({base} < 0.0, -1.0, 1.0)")
        # non-integer exponent: defined for a positive base
        return f"tl.exp(({self._print(x)}) * tl.log({base}))"

    def _print_sign(self, e):   # also what the in-kernel reverse mode makes of Abs
        x = self._print(e.args[0])
        return f"tl.where(({x}) > 0.0, 1.0, tl.where(({x}) < 0.0, -1.0, 0.0))"

    def _print_cosh(self, e):
        x = self._print(e.args[0])
        return f"(0.5 * (tl.exp({x}) + tl.exp(-({x}))))"

    def _print_sinh(self, e):
        x = self._print(e.args[0])
        return f"(0.5 * (tl.exp({x}) - tl.exp(-({x}))))"

    def doprint(self, expr, assign_to=None):
        # PythonCodePrinter prints every function it knows (floor, atan, erf, ...) as math.<name>, which a
        # kernel cannot call (and the interpreter runs wrongly): anything without a lowering here raises
        for f in sp.sympify(expr).atoms(sp.Function):
            if type(f).__name__ not in LOWERED and not isinstance(f, sp.Piecewise):
                raise NotImplementedError(f"triton printer: no Triton lowering for function {type(f).__name__} "
                                          f"(lowered: {', '.join(sorted(LOWERED))})")
        return super().doprint(expr, assign_to)

    def _print_Piecewise(self, e):
        raise NotImplementedError("triton printer: Piecewise coefficients are not supported")

    def _print_Function(self, e):
        raise NotImplementedError(f"triton printer: no Triton lowering for function {e.func.__name__}")


def codegen(exprs: dict, printer=None, prefix: str = "x_") -> tuple[list[str], dict[str, str]]:
    """sympy.cse over named expressions; (assignment lines, name -> printed expression).

    Input symbols print as ``in_<name>`` (the loaded tiles); common subexpressions as ``x_<i>``.
    """
    printer = printer or TritonPrinter()
    names = list(exprs)
    values = [sp.sympify(exprs[n]) for n in names]
    subs = {s: sp.Symbol(f"in_{s.name}") for v in values for s in v.free_symbols}
    values = [v.xreplace(subs) for v in values]
    reps, reduced = sp.cse(values, symbols=sp.numbered_symbols(prefix), optimizations="basic")
    lines = [f"{s} = {printer.doprint(v)}" for s, v in reps]
    return lines, {n: printer.doprint(v) for n, v in zip(names, reduced)}
