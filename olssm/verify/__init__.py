"""Check a derived rule against an independent numerical online solver.

The oracle never looks at the derivation: it evaluates the objective itself (the user's
sqnorm/inner terms, numerically, in float64), and
  implicit  minimises L_t(S) over vec(S) with scipy.optimize (trust-region, autograd derivatives),
  explicit  takes C − η ∇ℓ_t(C) with ∇ from autograd (C: decay ⊙ S_prev, or the numerical
            minimiser of the objective's proximal part),
  exact     minimises the decayed prefix sum Σ_i Π γ ℓ_i(S) + ½ λ‖S‖² with scipy.optimize,
from the oracle's *own* previous state, so errors cannot hide by sharing a trajectory.

Inputs are drawn from their declared domains (`random_inputs`): a 'real' input takes both signs, so a derivation
that silently assumed a sign fails the default check. Where the drawn inputs leave a step's objective without a
minimum (its Hessian in S has a negative eigenvalue: an open-sign loss weight that came out negative, an indefinite
cross term), the report is never OK and its note says which step, by how much, and which open-sign inputs it drew
(NOTES.md beside this file). On an ill-conditioned objective the tolerance widens to the solver's own accuracy,
~cond(H)·ε, and past 1e-2 the report is INCONCLUSIVE (NOTES.md).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.optimize
import sympy as sp
import torch

from ..derive import Rule, derive
from ..derive.gradient import gradient, is_proximal
from ..derive.rule import evaluator
from ..objectives.core import COLUMN, ELEMENTWISE, ROW, SCALAR, MatrixAffine, Objective, VectorAffine

torch_dtype = torch.float64


def _eval(expr, inp: dict):
    """Evaluate a coefficient expression on inputs in broadcast layout ([d_v|1, d_k|1])."""
    expr = sp.sympify(expr)
    if not expr.free_symbols:
        return torch.tensor(float(expr), dtype=torch_dtype)
    return evaluator({"x": expr})(inp)["x"]


def _affine(x, S, Sp, inp):
    if isinstance(x, MatrixAffine):
        return _eval(x.s_coef, inp) * S + _eval(x.prev_coef, inp) * Sp + _eval(x.const, inp)
    if isinstance(x, VectorAffine):
        out = _eval(x.const, inp) * torch.ones(S.shape[0], 1, dtype=torch_dtype)
        for g, u in x.s_proj:
            out = out + _eval(g, inp) * (S * _eval(u, inp)).sum(-1, keepdim=True)
        for g, u in x.prev_proj:
            out = out + _eval(g, inp) * (Sp * _eval(u, inp)).sum(-1, keepdim=True)
        return out
    return _eval(x, inp)


def objective_value(terms, S, Sp, inp):
    """The objective Σ coef·⟨a, b⟩_weight evaluated numerically (S, Sp: [d_v, d_k] float64)."""
    total = torch.zeros((), dtype=torch_dtype)
    for t in terms:
        a, b = _affine(t.a, S, Sp, inp), _affine(t.b, S, Sp, inp)
        total = total + _eval(t.coef, inp) * (_eval(t.weight, inp) * a * b).sum()
    return total


#: a step's Hessian in vec(S) is "not positive semidefinite" when its smallest eigenvalue is below
#: -NO_MINIMUM_RTOL x its largest magnitude (floored at 1). The objective is quadratic, autograd gives its Hessian
#: exactly up to float64 rounding (~1e-16 relative, and eigvalsh adds ~d·1e-16), so a PSD Hessian (a singular one
#: included) never reads below -1e-14 relative; 1e-9 leaves five orders of margin either side, while the open-sign
#: weights that break convexity give eigenvalues of order -0.01..-1 relative (-0.037 for a cross term at seed 3).
NO_MINIMUM_RTOL = 1e-9
#: the oracle's own accuracy. A backward-stable float64 minimiser of a quadratic finds its argmin to about
#: cond(H)·ε relative (ε = 2.2e-16): a proximal weight of 1e-11 against a unit loss (cond ~ 4e11) left the solver
#: 2.9e-5 from a rule right to 1e-16, and verify had reported MISMATCH. So the tolerance a report applies is
#: max(tolerance, ORACLE_SLACK·ε·cond), cond the largest condition number among the Hessians the oracle solved
#: with; measured, the solver's error is 0.06-1.0 ε·cond (proximal weights 1e-9..1e-15, seeds 0-4; NOTES.md).
ORACLE_SLACK = 10.0
EPS = float(np.finfo(np.float64).eps)
#: past this widened tolerance the oracle's argmin has (almost) no correct digits: the report is INCONCLUSIVE,
#: never OK (a rule wrong by 1% could not be told from a right one)
ORACLE_LIMIT = 1e-2


def _minimise(f, x0_shape, x0=None):
    """(argmin of f over a [x0_shape] matrix, the smallest eigenvalue of f's Hessian relative to its largest one, the
    Hessian's condition number). f is quadratic, so the Hessian at the start is the Hessian everywhere; a negative
    relative eigenvalue means f has no minimum (the solver then runs off, and the returned point is not an argmin);
    the condition number bounds how well any float64 solver finds the argmin (ORACLE_SLACK)."""
    n = int(np.prod(x0_shape))

    def fun(x):
        X = torch.tensor(x, dtype=torch_dtype, requires_grad=True)
        val = f(X.view(x0_shape))
        (g,) = torch.autograd.grad(val, X)
        return val.item(), g.numpy()

    def hess(x):
        X = torch.tensor(x, dtype=torch_dtype)
        return torch.autograd.functional.hessian(lambda y: f(y.view(x0_shape)), X).numpy()

    start = np.zeros(n) if x0 is None else x0.reshape(-1).numpy()
    H = hess(start)
    eig = np.linalg.eigvalsh(H)
    top = float(np.abs(eig).max())
    lowest = float(eig.min() / max(1.0, top))
    # floored at ε·top: a singular Hessian (a minimiser that is not unique) reads as cond 1/ε, never as "exact"
    cond = top / max(float(eig.min()), EPS * top) if top > 0 else 1.0
    # scipy caps the trust radius at 1000 by default, so a minimiser farther than ~200 x 1000 from the start (a
    # state grown by 1/(1 + λ) per step with a 'real' λ drawn near −1) was never reached and a right rule read
    # MISMATCH. Where a minimum exists, let the radius grow to the length of the Newton step (the radius still
    # starts at 1 and only doubles while the quadratic model is exact, so ordinary steps are unchanged); where
    # none exists the default cap keeps the runaway finite.
    max_radius = 1000.0
    if lowest >= -NO_MINIMUM_RTOL:
        newton = np.linalg.lstsq(H, fun(start)[1], rcond=None)[0]
        max_radius = max(max_radius, 4.0 * float(np.linalg.norm(newton)))
    res = scipy.optimize.minimize(fun, start, jac=True, hess=hess, method="trust-exact",
                                  options={"gtol": 1e-12, "maxiter": 200, "max_trust_radius": max_radius})
    return torch.tensor(res.x, dtype=torch_dtype).view(x0_shape), lowest, cond


def _in_domain(u, spec, sign=None):
    """u ~ U(0.1, 1) moved into the input's domain (a derivation may rely on a symbol's sign): negated for
    'negative', its log for 'log_decay', times `sign` (±1) for 'real', as drawn for every other domain."""
    if spec.domain == "negative":
        return -u
    if spec.domain == "log_decay":
        return torch.log(u)
    if spec.domain == "real" and sign is not None:
        return sign * u
    return u


def _signs(g, shape, steps: int | None, seed: int):
    """±1 for a 'real' input, one per element (per step for a per-token input: shape [steps, *shape]), each
    element taking both signs over the steps when there are two or more; a parameter's elements both signs when it
    has two or more, and a scalar parameter (one number per run) is negative for an even seed, positive for an odd
    one (seeds 0 and 1 check both)."""
    full = shape if steps is None else (steps, *shape)
    s = torch.randint(0, 2, full, generator=g).to(torch_dtype) * 2 - 1
    flat = s.reshape(-1) if steps is None else s.reshape(steps, -1)
    if steps is None:
        if flat.numel() == 1:
            flat[0] = -1.0 if seed % 2 == 0 else 1.0
        elif bool((flat == flat[0]).all()):
            flat[int(torch.randint(0, flat.numel(), (), generator=g))] *= -1
    elif steps >= 2:
        same = (flat == flat[:1]).all(0)                      # elements that drew one sign at every step
        at = torch.randint(0, steps, (flat.shape[1],), generator=g)
        cols = same.nonzero().flatten()
        flat[at[cols], cols] *= -1
    return flat.reshape(full)


def _open_sign(spec) -> bool:
    """A coefficient or parameter (not a key, query or value vector) whose declared domain leaves its sign open."""
    return spec.domain == "real" and spec.role not in ("key", "query", "value")


def _input_specs(rule: Rule) -> dict:
    """Every input the rule and its objective read; the rule's spec where both have one (its log decays, the one
    difference _check_rule_inputs lets through)."""
    return {**rule.objective.inputs(), **rule.inputs}


def _check_rule_inputs(rule: Rule) -> None:
    """The rule must read each input its objective declares as the objective declares it (kind, role, parameter or
    per-token, domain), but for a decay read as its log (rule.with_log_decays()). The oracle draws and lays out
    inputs by these specs, and had taken the rule's: a hand-built rule declaring GLA's column gate as a row gate, or
    a decay |a| with a re-declared 'positive' a, verified OK against objectives that say otherwise (a probe,
    session 26)."""
    declared = rule.objective.inputs()
    for n, s in rule.inputs.items():
        o = declared.get(n)
        if o is None:
            continue
        logged = s.domain == "log_decay" and o.domain == "decay"
        if (s.kind, s.role, s.is_parameter) != (o.kind, o.role, o.is_parameter) or (s.domain != o.domain and not logged):
            what = lambda x: (f"a {'parameter' if x.is_parameter else 'per-token'} {x.kind} input (role {x.role!r}, "
                              f"domain {x.domain!r})")
            raise ValueError(f"verify: the rule reads input {n!r} as {what(s)}, its objective declares it as {what(o)}; "
                             "a rule must read its objective's inputs as declared (only a decay may be read as its "
                             "log, rule.with_log_decays())")


def random_inputs(rule: Rule, steps: int, d_k: int, d_v: int, seed: int = 0) -> list[dict]:
    """Random per-step inputs: vectors ~ N(0, 1/d); coefficients and parameters of magnitude ~ U(0.1, 1), as drawn
    for a positive domain (positive, unit, decay, timestep), negated for 'negative', its log for 'log_decay', and
    of both signs for 'real' (every element of a per-token input takes both signs over two or more steps; a
    scalar 'real' parameter is negative for an even seed, positive for an odd one). A derivation that assumed a
    sign the declared domain leaves open therefore fails the default check instead of passing it."""
    g = torch.Generator().manual_seed(seed)
    gs = torch.Generator().manual_seed(seed + 2)   # the signs' own stream: every other draw is as it was
    names = _input_specs(rule)
    size_of = {n: {SCALAR: (), ROW: (d_v,), COLUMN: (d_k,), ELEMENTWISE: (d_v, d_k)}[s.kind]
               for n, s in names.items()}
    signs = {n: _signs(gs, size_of[n], None if s.is_parameter else steps, seed) for n, s in names.items()
             if _open_sign(s)}
    params = {}
    out = []
    for t in range(steps):
        inp = {}
        for n, s in names.items():
            size = size_of[n]
            if s.is_parameter:
                if n not in params:
                    params[n] = _in_domain(0.1 + 0.9 * torch.rand(size, generator=g, dtype=torch_dtype), s,
                                           signs.get(n))
                inp[n] = params[n]
            elif s.role in ("key", "query", "value"):
                inp[n] = torch.randn(size, generator=g, dtype=torch_dtype) / np.sqrt(size[0]) * 1.5
            else:
                inp[n] = _in_domain(0.1 + 0.9 * torch.rand(size, generator=g, dtype=torch_dtype), s,
                                    signs[n][t] if n in signs else None)
        out.append(inp)
    return out


@dataclasses.dataclass
class VerifyReport:
    name: str
    mode: str
    steps: int
    d_k: int
    d_v: int
    state_error: float
    output_error: float
    per_step: list
    tolerance: float = 1e-8
    note: str = ""
    #: (step, smallest eigenvalue of the step's Hessian in vec(S) relative to its largest) for every step whose
    #: drawn inputs leave the objective the oracle minimises without a minimum: never OK (there is no argmin to
    #: agree with), and the note says why
    no_minimum: tuple = ()
    #: (condition number, step): the worst-conditioned Hessian the oracle minimised with, which bounds the
    #: oracle's own accuracy (ORACLE_SLACK); (1.0, None) where it solved nothing (an explicit rule without a
    #: proximal part)
    condition: tuple = (1.0, None)

    @property
    def max_error(self) -> float:
        # NaN wins (max(0.1, nan) is 0.1: a NaN output error had read OK)
        return _worst(self.state_error, self.output_error)

    @property
    def applied_tolerance(self) -> float:
        """The tolerance the verdict applies: `tolerance`, or the oracle's own accuracy ORACLE_SLACK·ε·cond where
        that is worse (an ill-conditioned objective)."""
        return max(self.tolerance, ORACLE_SLACK * EPS * self.condition[0])

    @property
    def inconclusive(self) -> bool:
        """The objective is too ill-conditioned for a float64 solver to check the rule (ORACLE_LIMIT)."""
        return self.applied_tolerance > ORACLE_LIMIT

    @property
    def ok(self) -> bool:
        return bool(self.max_error <= self.applied_tolerance) and not self.no_minimum and not self.inconclusive

    def __str__(self):
        verdict = "OK" if self.ok else "INCONCLUSIVE" if self.inconclusive and not self.no_minimum else "MISMATCH"
        if self.no_minimum:
            verdict += f", no minimum at step(s) {', '.join(str(t) for t, _ in self.no_minimum)}"
        tol = f"tolerance {self.tolerance:.0e}"
        if self.applied_tolerance > self.tolerance:
            cond, t = self.condition
            tol += (f", widened to {self.applied_tolerance:.1e}: the objective's Hessian has condition number "
                    f"{cond:.1e} at step {t}, and the solver finds its argmin only to ~cond·ε")
            if self.inconclusive:
                tol += (f", past {ORACLE_LIMIT:.0e}, so this check cannot tell a right rule from a wrong one"
                        + ("; the Hessian is singular to float64 precision: the minimiser is not unique, or not "
                           "resolvable" if cond * EPS > 0.5 else "")
                        + "; make the objective better conditioned (e.g. a larger proximal weight or ridge) or pass "
                        "inputs=")
        lines = [f"verify {self.name} ({self.mode}): {self.steps} steps, d_k={self.d_k}, d_v={self.d_v}",
                 f"  max relative error, state : {self.state_error:.2e}",
                 f"  max relative error, output: {self.output_error:.2e}",
                 f"  {verdict} ({tol}, float64)"]
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)

    __repr__ = __str__


def _worst(a: float, b: float) -> float:
    """max that keeps a NaN (Python's max(x, nan) is x: a NaN step would have read as OK)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


#: one token's per-token input of each kind: its dimensions, and how an error says it
_ONE_TOKEN = {SCALAR: (0, "a scalar (0-d)"), ROW: (1, "a vector [d_v]"), COLUMN: (1, "a vector [d_k]")}


def _given(rule: Rule, inputs: list) -> tuple[list[dict], int | None, int | None]:
    """User-given steps as float64 tensors (the oracle's precision), each with every input the rule and the
    objective read, checked one by one (shapes: scalars 0-d, rows [d_v], columns [d_k], parameters as the rule
    reads them); and the (d_k, d_v) they imply (None where no input tells)."""
    if isinstance(inputs, dict) or not isinstance(inputs, (list, tuple)):
        raise TypeError(f"verify: inputs must be a list of per-step dicts {{name: value}}, got "
                        f"{type(inputs).__name__}" + (" (one step? wrap it in a list)" if isinstance(inputs, dict)
                                                      else ""))
    need = _input_specs(rule)
    seq, sizes = [], {COLUMN: None, ROW: None}
    for t, step in enumerate(inputs):
        if not isinstance(step, dict):
            raise TypeError(f"verify: step {t} of inputs must be a dict {{name: value}}, got {type(step).__name__}")
        missing = sorted(set(need) - set(step))
        if missing:
            raise ValueError(f"verify: step {t} of inputs lacks {missing}; each step needs {sorted(need)}")
        out = {}
        for n, x in step.items():
            if x is None:
                raise ValueError(f"verify: step {t}, input {n!r} is None")
            x = torch.as_tensor(x, dtype=torch_dtype)
            if not torch.isfinite(x).all():
                raise ValueError(f"verify: step {t}, input {n!r} has non-finite values")
            spec = need.get(n)
            if spec is not None and not spec.is_parameter:
                if spec.kind in _ONE_TOKEN and x.dim() != _ONE_TOKEN[spec.kind][0]:
                    raise ValueError(f"verify: step {t}, input {n!r} ({spec.kind}) must be "
                                     f"{_ONE_TOKEN[spec.kind][1]} for one token, got shape {tuple(x.shape)}")
                if spec.kind in sizes:
                    if sizes[spec.kind] is None:
                        sizes[spec.kind] = x.shape[-1]
                    elif x.shape[-1] != sizes[spec.kind]:
                        raise ValueError(f"verify: step {t}, input {n!r} has size {x.shape[-1]}, another "
                                         f"{'value' if spec.kind == ROW else 'key'}-sized input {sizes[spec.kind]}")
            out[n] = x
        seq.append(out)
    return seq, sizes[COLUMN], sizes[ROW]


def _rel(a, b):
    # relative to the oracle, floored at 1e-6 so that an exactly-zero state (e.g. a pure ridge
    # objective) does not turn rounding at 1e-17 into a "relative" error of 1e-5
    return float((a - b).norm() / b.norm().clamp_min(1e-6))


def verify(objective_or_rule, steps: int = 6, d_k: int | None = None, d_v: int | None = None, seed: int = 0,
           tolerance: float = 1e-8, inputs: list[dict] | None = None) -> VerifyReport:
    """Run the derived rule and an independent numerical solver side by side; report the errors. d_k, d_v: the
    sizes of drawn inputs (4, 3); with `inputs` given, the sizes they have.

    Drawn inputs follow their declared domains (random_inputs): a 'real' coefficient or parameter takes both
    signs. That includes an input derive() flagged with UnknownSignWarning (a squared-loss weight or a Hessian
    diagonal of open sign): where a drawn value leaves a step's objective without a minimum (its Hessian in S has
    a negative eigenvalue, NO_MINIMUM_RTOL), the report is not OK, `no_minimum` lists the steps, and the note
    names the open-sign inputs drawn there; the steps where a negative value still leaves a minimum are checked
    like any other. A scalar 'real' parameter is one number per run: verify runs the drawn inputs and the same with
    it negated, and reports the first run that is not OK. So a rule is OK only if it is the minimiser over the
    declared domains; to check a narrower range, declare it (domain='positive', 'unit', ...) or pass `inputs=`
    (olssm/verify/NOTES.md)."""
    rule = derive(objective_or_rule)
    obj: Objective = rule.objective
    _check_rule_inputs(rule)
    if inputs is not None:
        seq, k_given, v_given = _given(rule, inputs)
        for name, asked, given in (("d_k", d_k, k_given), ("d_v", d_v, v_given)):
            if asked is not None and given is not None and asked != given:
                raise ValueError(f"verify: {name}={asked} was passed, but the given inputs have size {given}")
        d_k, d_v = d_k or k_given or 4, d_v or v_given or 3
    else:
        if steps < 1:
            raise ValueError(f"verify: needs at least one step, got steps={steps}")
        d_k, d_v = d_k or 4, d_v or 3
        seq = random_inputs(rule, steps, d_k, d_v, seed)
        one_sign = [n for n, s in _input_specs(rule).items()
                    if s.is_parameter and s.kind == SCALAR and s.domain == "real"]
        if one_sign:
            return _both_signs(rule, seq, one_sign, d_k, d_v, seed, tolerance)
    steps = len(seq)
    if steps < 1:
        raise ValueError(f"verify: needs at least one step, got {steps}")
    sym_kind = {**{n: s.kind for n, s in obj.inputs().items()}, **{n: s.kind for n, s in rule.inputs.items()}}
    # rule.with_log_decays() reads α' where the objective has α = exp(α'): the oracle gets α
    logged = {n for n, s in rule.inputs.items()
              if s.domain == "log_decay" and n in obj.inputs() and obj.inputs()[n].domain != "log_decay"}

    def lay(inp, as_the_objective=True):
        inp = {n: (torch.exp(x) if n in logged and as_the_objective else x) for n, x in inp.items()}
        return {n: (x[:, None] if sym_kind.get(n) == ROW else x[None, :] if sym_kind.get(n) == COLUMN else x)
                for n, x in inp.items()}

    g = torch.Generator().manual_seed(seed + 1)
    S0 = torch.randn(d_v, d_k, generator=g, dtype=torch_dtype) * 0.5
    qn = obj.readout.name   # the oracle reads out with the objective's readout; the rule with its own (form.readout)
    per_step, s_err, o_err, no_min, worst_cond = [], 0.0, 0.0, [], (1.0, None)

    def solve(f, t, x0=None):
        nonlocal worst_cond
        S, lowest, cond = _minimise(f, (d_v, d_k), x0)
        if lowest < -NO_MINIMUM_RTOL:
            no_min.append((t, lowest))
        elif cond > worst_cond[0]:
            worst_cond = (cond, t)
        return S

    if rule.is_exact:
        state = rule.zero_state((), d_k, d_v, dtype=torch_dtype, **seq[0])  # RLS: P_0 = I/λ_0
        weights, history = [], []
        ridge_weight = torch.tensor(1.0, dtype=torch_dtype)
        for t, inp in enumerate(seq):
            state = rule.step(state, **{n: inp[n] for n in rule.update_inputs})
            o_rule = rule.read(state, **{n: inp[n] for n in rule.inputs})
            L = lay(inp)
            gamma = _eval(obj.decay, L) if obj.decay is not None else torch.tensor(1.0, dtype=torch_dtype)
            weights = [w * gamma for w in weights] + [torch.tensor(1.0, dtype=torch_dtype)]
            ridge_weight = ridge_weight * gamma if obj.ridge_decays else ridge_weight
            history.append(L)
            ridge = obj.ridge

            def total(S, hist=tuple(history), ws=tuple(weights), rw=ridge_weight):
                val = sum(w * objective_value(obj.expr.terms, S, torch.zeros_like(S), h) for w, h in zip(ws, hist))
                if ridge is not None:
                    # a decaying ridge is the prior at t = 0 (its λ is read there); otherwise λ_t
                    lam_t = _eval(ridge, hist[0] if obj.ridge_decays else L)
                    val = val + 0.5 * rw * (lam_t * S * S).sum()
                return val

            S_or = solve(total, t)
            if rule.is_rls:
                S_rule = state[0]
            else:
                G, H = state
                # the rule's state with the rule's own ridge (G, H and λ all scaled by 2 read out the same o: with the
                # objective's λ that had read as a wrong state, 0.36)
                ridge_form = rule.form.ridge
                lam = (_eval(ridge_form, lay(inp, as_the_objective=False)) if ridge_form is not None
                       else torch.tensor(0.0, dtype=torch_dtype))
                S_rule = torch.linalg.solve((H + torch.diag_embed(torch.broadcast_to(lam, (1, d_k))[0])).T, G.T).T
            o_or = S_or @ inp[qn]
            e1, e2 = _rel(S_rule, S_or), _rel(o_rule, o_or)
            per_step.append((t, e1, e2))
            s_err, o_err = _worst(s_err, e1), _worst(o_err, e2)
    else:
        S_rule, S_or = S0.clone(), S0.clone()
        for t, inp in enumerate(seq):
            S_rule = rule.step(S_rule, **{n: inp[n] for n in rule.update_inputs})
            L = lay(inp)
            Sp = S_or
            if obj.update == "implicit":
                S_or = solve(lambda S: objective_value(obj.expr.terms, S, Sp, L), t, x0=Sp)
            else:
                S_or = _explicit_oracle(obj, Sp, L, d_v, d_k, lambda f, x0: solve(f, t, x0))
            o_rule, o_or = rule.read(S_rule, **inp), S_or @ inp[qn]
            e1, e2 = _rel(S_rule, S_or), _rel(o_rule, o_or)
            per_step.append((t, e1, e2))
            s_err, o_err = _worst(s_err, e1), _worst(o_err, e2)
    specs = _input_specs(rule)
    return VerifyReport(obj.name or str(obj.expr), rule.mode, steps, d_k, d_v, s_err, o_err, per_step,
                        tolerance, note=_no_minimum_note(no_min, seq, specs, _hessian_inputs(obj) if no_min else ()),
                        no_minimum=tuple(no_min), condition=worst_cond)


def _hessian_inputs(obj: Objective) -> set:
    """Names of the inputs the Hessian in S reads (the quadratic part: diagonal, squared losses and cross terms;
    for exact least squares also the ridge and the forgetting factor), not those of S_prev's decay or the linear
    terms, which cannot take a minimum away."""
    g = gradient(obj.expr.terms)
    exprs = [g.diag, *g.lowrank.values(), *(x for pair in g.lowrank for x in pair)]
    if obj.update == "exact":
        exprs += [e for e in (obj.ridge, obj.decay) if e is not None]
    return {x.name for e in exprs for x in sp.sympify(e).free_symbols}


def _both_signs(rule, seq, names, d_k, d_v, seed, tolerance) -> VerifyReport:
    """A scalar 'real' parameter is one number per run, so one run checks one sign (negative for an even seed): a
    rule right only for that sign (−|a| for a) had verified OK by default. Run the drawn inputs, then the same
    inputs with those parameters negated; report the first run that is not OK (its note says which signs), else
    the first run with the worse errors of both."""
    runs = []
    for flip in (False, True):
        steps = [dict(x, **{n: -x[n] for n in names}) for x in seq] if flip else seq
        runs.append((verify(rule, d_k=d_k, d_v=d_v, seed=seed, tolerance=tolerance, inputs=steps), steps))
    drawn = ", ".join(f"{n} = {float(runs[0][1][0][n]):.2g}" for n in names)
    for i, (rep, steps) in enumerate(runs):
        if not rep.ok:
            which = ", ".join(f"{n} = {float(steps[0][n]):.2g}" for n in names)
            why = (f"a scalar 'real' parameter is one number per run, so verify checks both signs; this run has "
                   f"{which}" + (f" (the drawn {drawn} verified OK)" if i else ""))
            return dataclasses.replace(rep, note=why + (f"; {rep.note}" if rep.note else ""))
    (a, _), (b, _) = runs
    return dataclasses.replace(a, state_error=_worst(a.state_error, b.state_error),
                               output_error=_worst(a.output_error, b.output_error),
                               condition=max(a.condition, b.condition, key=lambda c: c[0]))


def _no_minimum_note(no_min, seq, specs, hessian_inputs) -> str:
    """Why a step has no minimum: its Hessian's eigenvalue, and the open-sign ('real') inputs drawn there that the
    Hessian reads (a 'real' decay of S_prev beside an indefinite cross term had been blamed, and the user told to
    declare its domain)."""
    if not no_min:
        return ""
    t, lowest = no_min[0]
    open_sign = [n for n, s in specs.items() if _open_sign(s) and n in hessian_inputs]

    def shown(x):
        x = torch.as_tensor(x)
        return f"{float(x):.2g}" if x.numel() == 1 else f"[{float(x.min()):.2g} .. {float(x.max()):.2g}]"

    drawn = ", ".join(f"{n} = {shown(seq[t][n])}" for n in open_sign if n in seq[t])
    why = (f"; the open-sign ('real'-domain) inputs drawn there: {drawn} (derive's UnknownSignWarning names those "
           "the minimiser needs of one sign): declare their domain (e.g. 'positive' or 'unit'), or pass inputs= "
           "within the range you use" if drawn else
           "; no input of open sign enters its Hessian, so the objective's quadratic part is not positive semidefinite "
           "for these inputs (derive's IndefiniteHessianWarning names the term, e.g. a cross term ⟨S k₀, S k₁⟩)")
    return (f"the objective has no minimum at step {t} (the smallest eigenvalue of its Hessian in S is "
            f"{lowest:.2g} relative to the largest magnitude): the rule returns a stationary point that is not a "
            f"minimiser, the solver runs off, and from step {t} on the errors compare with it" + why)


def _explicit_oracle(obj: Objective, Sp, L, d_v, d_k, minimise):
    """One proximal gradient step: the minimiser of the proximal part plus η times the loss linearised at C, C the
    proximal part's own minimiser (or decay ⊙ S_prev, the proximal part ½‖S − C‖², when decay= is given)."""
    terms = obj.expr.terms
    prox = [t for t in terms if is_proximal(t)]
    eta = _eval(obj.step_size, L) if obj.step_size is not None else 1.0
    if obj.decay is not None or not prox:
        C = (_eval(obj.decay, L) if obj.decay is not None else 1.0) * Sp
        C = torch.broadcast_to(C, (d_v, d_k))
        loss = terms
    else:
        C = minimise(lambda S: objective_value(prox, S, Sp, L), Sp)
        loss = [t for t in terms if not is_proximal(t)]
    X = C.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective_value(loss, X, Sp, L), X)
    if obj.decay is not None or not prox:
        return (C - eta * grad).detach()
    step = (eta * grad).detach()
    return minimise(lambda S: objective_value(prox, S, Sp, L) + (step * S).sum(), C)


__all__ = ["verify", "VerifyReport", "objective_value", "random_inputs"]
