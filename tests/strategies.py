"""Hypothesis strategies shared by the test modules: objectives drawn from the language's grammar."""
import sympy as sp
from hypothesis import strategies as st

from olssm import objectives as O

#: proximal terms: none, ‖S − S_prev‖², decayed centres of every decay kind, and a scalar decay read in log
#: space (exp(a), a in the log_decay domain: what Rule.with_log_decays produces)
PROX = ("none", "plain", "scalar", "row", "column", "elementwise", "log_scalar")


@st.composite
def objectives(draw, prox_kinds=PROX, max_keys=2):
    """A proximal term × 0..max_keys weighted regression terms × optional ridge × optional linear
    term, implicit or explicit. Some draws have no closed form; derive() must then say why."""
    S, Sp = O.states()
    prox = draw(st.sampled_from(prox_kinds))
    n_keys = draw(st.integers(0, max_keys))
    weights = [draw(st.sampled_from(["none", "scalar", "row"])) for _ in range(n_keys)]
    ridge, linear = draw(st.booleans()), draw(st.booleans())
    mode = draw(st.sampled_from(["implicit", "explicit"]))
    expr = 0
    if prox == "plain":
        expr = O.sqnorm(S - Sp) / 2
    elif prox == "scalar":
        expr = O.sqnorm(S - O.scalar("a", domain="decay") * Sp) / 2
    elif prox == "log_scalar":
        expr = O.sqnorm(S - sp.exp(O.scalar("la", domain="log_decay")) * Sp) / 2
    elif prox == "row":
        expr = O.sqnorm(S - O.diag(O.row("r", domain="decay")) @ Sp) / 2
    elif prox == "column":
        expr = O.sqnorm(S - Sp @ O.diag(O.column("c", domain="decay"))) / 2
    elif prox == "elementwise":
        expr = O.sqnorm(S - sp.exp(-O.row("dt", positive=True) * O.parameter("P", "matrix", positive=True)) * Sp) / 2
    for i, w in enumerate(weights):
        k, v = O.key(f"k{i}"), O.value(f"v{i}")
        wt = None if w == "none" else O.scalar(f"b{i}", positive=True) if w == "scalar" else O.row(f"b{i}", positive=True)
        expr = expr + O.sqnorm(S @ k - v, weight=wt) / 2
    if ridge:
        expr = expr + O.scalar("lam", positive=True) * O.sqnorm(S) / 2
    if linear:
        expr = expr - O.inner(S @ O.key("kl"), O.value("vl"))
    if isinstance(expr, int):
        expr = O.sqnorm(S @ O.key("k0") - O.value("v0")) / 2
    return O.Objective(expr, update=mode)
