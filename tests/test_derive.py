"""Derivation: derived rules against the numerical solver (olssm.verify), the published
recurrences, and the error contract. Tolerances: verify runs in float64; a closed form that is
right agrees with the trust-region solver to ~1e-12, so 1e-6 can only fail on a wrong rule."""
import re
import warnings

import pytest
import sympy as sp
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import olssm
from olssm import catalogue
from olssm import objectives as O
from strategies import objectives


def longhorn_objective():
    # β declared 'unit' (as the README's): a 'real' β is of open sign, derive warns, and verify draws it of both
    # signs, where the objective can lack a minimum (test_verify_draws_real_inputs_of_both_signs)
    S, Sp = O.states()
    k, v, beta = O.key("k"), O.value("v"), O.row("beta", domain="unit")
    return O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=beta) / 2, update="implicit")


def test_issue_example_end_to_end():
    obj = longhorn_objective()
    rule = olssm.derive(obj)
    text = str(rule)
    assert "S_t = S_{t-1} (I - ε k kᵀ) + (ε ⊙ v) kᵀ" in text
    assert "ε = β/(β*‖k‖² + 1)" in text and "row-wise" in text
    assert r"\varepsilon" in rule.latex()
    g = torch.Generator().manual_seed(0)
    S0 = torch.randn(2, 3, 5, 4, generator=g)
    k, v, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 5, generator=g), torch.rand(2, 3, 5, generator=g)
    S1 = rule.step(S0, k=k, v=v, beta=b)
    eps = b / (1 + b * (k * k).sum(-1, keepdim=True))
    expect = S0 - (eps * ((S0 * k[..., None, :]).sum(-1) - v))[..., None] * k[..., None, :]
    torch.testing.assert_close(S1, expect, rtol=1e-5, atol=1e-6)
    assert olssm.verify(obj).ok


@pytest.mark.parametrize("name", list(catalogue.ENTRIES))
def test_catalogue_matches_published_and_solver(name):
    entry = catalogue.ENTRIES[name]
    assert catalogue.check_published(entry) < 1e-10
    report = olssm.verify(entry.objective, steps=5)
    assert report.ok, str(report)


def test_objectives_no_catalogue_names():
    S, Sp = O.states()
    k, v, k2, v2 = O.key("k"), O.value("v"), O.key("k2"), O.value("v2")
    beta, a, lam = O.row("beta", domain="unit"), O.scalar("a", domain="decay"), O.scalar("lam", positive=True)
    c = O.column("c", positive=True)
    objs = {
        "ridge": O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=beta) / 2 + lam * O.sqnorm(S) / 2),
        "decayed centre": O.Objective(O.sqnorm(S - a * Sp) / 2 + O.sqnorm(S @ k - v, weight=beta) / 2),
        "two keys": O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=beta) / 2
                                + O.sqnorm(S @ k2 - v2) / 2),
        "explicit per-row rate": O.Objective(O.sqnorm(S @ k - v) / 2, update="explicit", step_size=beta),
        "dls with ridge": O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", decay=a, ridge=lam),
        "weighted rls": O.Objective(O.sqnorm(S @ k - v, weight=O.scalar("w", positive=True)) / 2, update="exact",
                                    decay=a, ridge=lam, ridge_decays=True),
        "column ridge": O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ O.diag(c)) / 2
                                    + O.sqnorm(S @ k - v, weight=beta) / 2),
    }
    for name, obj in objs.items():
        rep = olssm.verify(obj, steps=5, d_k=5, d_v=3)
        assert rep.ok, (name, str(rep))
    two = olssm.derive(objs["two keys"])
    assert two.form.rank == 4 and "rank-2" in two.structure  # Woodbury: 2x2 mixing of k, k2
    ridge = olssm.derive(objs["ridge"])
    assert ridge.decay_kind == "scalar"  # the ridge shrinks the state: S̃ = S_prev / (1 + λ)


# ---- hypothesis: random objectives from the grammar --------------------------------------------

@settings(max_examples=40)
@given(objectives(), st.integers(0, 3), st.integers(1, 6), st.integers(1, 4))
def test_random_objectives_derive_and_verify(obj, seed, d_k, d_v):
    try:
        rule = olssm.derive(obj)
    except O.DerivationError as e:
        event("refused")
        msg = str(e)
        # the only refusals the grammar can trigger, each with its reason
        assert any(s in msg for s in ("linear in S", "pure low rank", "both an elementwise", "depends on both",
                                      "proximal part", "does not depend on S")), msg
        return
    event(f"derived {rule.mode}")
    report = olssm.verify(rule, steps=3, d_k=d_k, d_v=d_v, seed=seed)
    assert report.ok, f"{obj}\n{rule}\n{report}"


# ---- contractivity: the point of the Longhorn paper ----------------------------------------------

def _transition(rule, k, **coef):
    """The per-row linear map s -> s T of one step with a zero value, as a matrix."""
    d = k.shape[-1]
    basis = torch.eye(d, dtype=torch.float64).unsqueeze(1)  # d states of shape [1, d]
    out = rule.step(basis, k=k.expand(d, d), v=torch.zeros(d, 1, dtype=torch.float64),
                    **{n: x.expand(d, *x.shape) for n, x in coef.items()})
    return out[:, 0, :]


@given(st.floats(0.0, 50.0), st.integers(0, 10_000))
def test_implicit_update_is_contractive_for_every_beta(beta, seed):
    rule = catalogue.ENTRIES["longhorn"].rule
    k = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    T = _transition(rule, k, beta=torch.tensor([beta], dtype=torch.float64))
    eig = torch.linalg.eigvalsh((T + T.T) / 2)
    assert eig.min() >= -1e-12 and eig.max() <= 1 + 1e-12


@given(st.floats(0.0, 50.0), st.integers(0, 10_000))
def test_explicit_update_expands_once_beta_kk_exceeds_two(beta, seed):
    rule = catalogue.ENTRIES["deltanet"].rule
    k = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    T = _transition(rule, k, beta=torch.tensor(beta, dtype=torch.float64))
    spectral = torch.linalg.eigvalsh((T + T.T) / 2).abs().max().item()
    bkk = beta * float(k @ k)
    if bkk > 2 + 1e-9:
        assert spectral > 1.0  # eigenvalue 1 − β kᵀk < −1 along k
    else:
        assert spectral <= 1 + 1e-12


# ---- errors name the blocking term -----------------------------------------------------------------

def _S():
    return O.states()


@pytest.mark.parametrize("build, match", [
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S @ k - v) ** 2), "not quadratic"),
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S - Sp) * O.sqnorm(S @ k - v)), "quartic"),
    (lambda S, Sp, k, v: O.Objective(O.norm(S @ k - v) + O.sqnorm(S - Sp)), "not a squared norm"),
    (lambda S, Sp, k, v: O.Objective(-O.inner(S @ k, v)), "linear in S"),
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S @ k - v) / 2), "pure low rank"),
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(sp.exp(O.row("dt") * O.column("c")) * (S - Sp)) / 2
                                     + O.sqnorm(S @ k - v) / 2), "depends on both"),
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S @ k - v, weight=O.row("b")) / 2, update="exact"), "Gram"),
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S @ k - v) / 2 + O.scalar("l") * O.sqnorm(S) / 2,
                                     update="explicit", decay=O.scalar("a")), "elementwise part"),
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S - Sp) / 2, update="sideways"), "update="),
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S @ k - v) / 2 + O.sqnorm(S @ O.key("k2") - v) / 2, update="exact",
                                     ridge=O.scalar("l", positive=True), ridge_decays=True), "Sherman"),
    # H_t = Σ γ k kᵀ is singular on the first tokens: x_t = H_t⁻¹ q_t has no value there
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", decay=O.scalar("g", domain="decay")),
     "no ridge"),
    # Hessian I − k kᵀ: a saddle for ‖k‖ > 1, not a minimum (the derivation would return the stationary point)
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=-1) / 2), "not convex"),
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S @ k - v, weight=O.scalar("n", domain="negative")) / 2, update="exact",
                                     ridge=O.parameter("lam", "scalar", domain="positive")), "not convex"),
    # an explicit step minimises ω‖S − C‖²/2 plus the linearised loss: ω < 0 had derived a gradient ascent silently
    (lambda S, Sp, k, v: O.Objective(-O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v) / 2, update="explicit"),
     r"proximal part's weight -1 is ≤ 0"),
    # malformed pieces had escaped as sympy's / Python's own errors (or, for "E", read as Euler's number)
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(sp.exp(S @ k) - v)), "cannot enter a sympy function"),
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S - Sp) + sp.sqrt(O.sqnorm(S @ k - v))), "a sympy function of it"),
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S @ k - v, weight="E")), "'E' is a string; declare the input"),
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S @ k - v, weight=[1, 2])), r"cannot use \[1, 2\] \(a list\)"),
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(O.sqnorm(S @ k - v))), "already quadratic in S"),
    # a zero proximal weight written as an unexpanded power (finish keeps powers of sums whole since session 21)
    (lambda S, Sp, k, v: O.Objective(O.sqnorm(S - Sp, weight=(O.scalar("b") + 1) ** 2 - O.scalar("b") ** 2
                                              - 2 * O.scalar("b") - 1) / 2 + O.sqnorm(S @ k - v) / 2), "pure low rank"),
])
def test_derivation_errors_name_the_problem(build, match):
    S, Sp = _S()
    with pytest.raises(O.DerivationError, match=match):
        olssm.derive(build(S, Sp, O.key("k"), O.value("v")))



@pytest.mark.parametrize("name", ["initial_state", "output_final_state", "backend", "cu_seqlens", "chunk_size", "self",
                                  "rule", "S_prev"])
def test_input_names_that_rule_scan_takes_are_refused(name):
    # rule.scan(q, k, v, initial_state=x) binds scan's own argument: an input named so could never be given (scan then
    # reported it missing, or chunk_size's check saw a tensor, or Python "multiple values for argument 'self'")
    with pytest.raises(O.DerivationError, match=rf"input name {name!r} is (taken by rule.scan|reserved for the state)"):
        O.scalar(name, domain="unit")
    O.scalar("inputs", domain="unit")   # scan's **inputs: any name but its own arguments'


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "decayed_least_squares", "rls"])
def test_verify_reads_log_decays_as_the_rule_does(name):
    """rule.with_log_decays() reads α' where the objective has α = exp(α'): verify samples α' in the log
    domain and hands the solver exp(α'), so the log rule verifies like the raw one (it reported MISMATCH
    when the solver was given α' itself)."""
    rule = catalogue.ENTRIES[name].rule.with_log_decays()
    assert any(s.domain == "log_decay" for s in rule.inputs.values())
    report = olssm.verify(rule, steps=4)
    assert report.ok, report


def test_verify_exact_rule_with_a_ridge_per_key_column():
    S, _ = _S()
    k, v = O.key("k"), O.value("v")
    obj = O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", decay=O.scalar("g", domain="decay"),
                      ridge=O.column("cr", domain="positive"))
    report = olssm.verify(obj, steps=5)
    assert report.ok, report


@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_max_min_with_a_number(backend):
    """Max(a, 1/10) and Min(a, 9/10) as step sizes: the torch printer turns the number into a clamp bound
    (sympy's torch.max(0.1, a) refused a Python number). Oracle: the plain rule with a clamped beforehand."""
    S, _ = _S()
    k, v = O.key("k"), O.value("v")
    a = O.scalar("a", domain="real")
    plain = olssm.derive(O.Objective(O.sqnorm(S @ k - v) / 2, update="explicit", step_size=a))
    for bound, clamp in ((sp.Max(a, sp.Rational(1, 10)), dict(min=0.1)), (sp.Min(a, sp.Rational(9, 10)), dict(max=0.9))):
        rule = olssm.derive(O.Objective(O.sqnorm(S @ k - v) / 2, update="explicit", step_size=bound))
        inp = catalogue.random_inputs(plain, 1, 6, 2, 4, 3, seed=2)
        inp["a"] = torch.linspace(-0.5, 1.5, 12).reshape(1, 6, 2)
        o, _ = rule.scan(backend=backend, **inp)
        o_want, _ = plain.scan(backend="reference", **dict(inp, a=inp["a"].clamp(**clamp)))
        torch.testing.assert_close(o, o_want, rtol=1e-5, atol=1e-6)


def test_verify_input_contract():
    rule = catalogue.ENTRIES["deltanet"].rule
    from olssm.verify import random_inputs
    seq = random_inputs(rule, 4, 4, 3)
    # a NaN input is an error naming it (it had been a MISMATCH report; a NaN *error* still makes one:
    # test_verify_catches_a_wrong_readout_and_a_nan_output)
    bad = [dict(s) for s in seq]
    bad[1]["beta"] = torch.tensor(float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="step 1, input 'beta' has non-finite values"):
        olssm.verify(rule, inputs=bad)
    # fp32 inputs run in the oracle's float64; a missing input and no steps are errors naming them
    assert olssm.verify(rule, inputs=[{n: x.float() for n, x in s.items()} for s in seq]).ok
    with pytest.raises(ValueError, match=r"step 0 of inputs lacks \['beta'\]"):
        olssm.verify(rule, inputs=[{n: x for n, x in seq[0].items() if n != "beta"}])
    with pytest.raises(ValueError, match="at least one step"):
        olssm.verify(catalogue.ENTRIES["decayed_least_squares"].objective, steps=0)
    from olssm.__main__ import main
    with pytest.raises(SystemExit):
        main(["table", "--steps", "0"])


def test_log_decays_leave_a_decay_domain_readout_raw():
    """A readout symbol of domain "decay" is the query o = S q reads, not a decay: with_log_decays() turned it
    into exp(ac), the rule lost its query and every scan raised KeyError: None. Oracle: the raw rule's scan."""
    S, Sp = _S()
    k, v = O.key("k"), O.value("v")
    ac, a = O.column("ac", domain="decay"), O.scalar("a", domain="decay")
    for obj in (O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=O.scalar("b", domain="unit")) / 2,
                            readout=ac),
                O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", decay=a, ridge=O.parameter("lam", "scalar",
                            domain="positive"), readout=ac)):
        raw = olssm.derive(obj)
        log = raw.with_log_decays()
        assert log.query_name == "ac"
        inp = catalogue.random_inputs(log, 1, 5, 1, 4, 3, seed=1, dtype=torch.float64)
        o_log, _ = log.scan(backend="reference", **inp)
        raw_inp = {n: (torch.exp(x) if log.inputs[n].domain == "log_decay" else x) for n, x in inp.items()}
        o_raw, _ = raw.scan(backend="reference", **raw_inp)
        torch.testing.assert_close(o_log, o_raw)
        assert olssm.verify(log, steps=3).ok


def test_exact_rule_latex_prints_a_column_ridge_as_diag():
    S, _ = _S()
    rule = olssm.derive(O.Objective(O.sqnorm(S @ O.key("k") - O.value("v")) / 2, update="exact",
                                    decay=O.scalar("a", domain="decay"), ridge=O.column("c", positive=True)))
    assert "diag(c)" in str(rule)
    assert r"\operatorname{diag}(c)" in rule.latex() and "c I" not in rule.latex()


def test_malformed_objectives_fail_at_construction():
    S, Sp = _S()
    k, v = O.key("k"), O.value("v")
    with pytest.raises(O.DerivationError, match="key-sized"):
        S @ v
    with pytest.raises(O.DerivationError, match="not a declared input"):
        O.sqnorm(S @ k - v, weight=sp.Symbol("mystery"))
    with pytest.raises(O.DerivationError, match="matrix"):
        S + k
    with pytest.raises(O.DerivationError, match="scalar coefficient"):
        O.row("r") * O.sqnorm(S - Sp)
    with pytest.raises(O.DerivationError, match="named 'beta'"):
        olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=O.row("beta")) / 2
                                 + O.sqnorm(S @ O.key("k2") - v, weight=O.scalar("beta")) / 2))
    # two names that print alike ("beta" shows as β): ε = (β + β)/(β‖k‖² + β‖k‖² + 1) had read as 2β
    for a, b in [("beta", "β"), ("lam", "λ"), ("Delta", "dt")]:
        with pytest.raises(O.DerivationError, match=f"inputs '{a}' and '{b}' both print as"):
            olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=O.row(a)) / 2
                                     + O.sqnorm(S @ k - v, weight=O.row(b)) / 2))


def test_derivation_is_cached_and_fast():
    import time
    obj = longhorn_objective()
    r1 = olssm.derive(obj)
    t0 = time.perf_counter()
    r2 = olssm.derive(obj)
    assert r2 is r1 and time.perf_counter() - t0 < 0.05


# ---- log-space decays ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gated_deltanet", "gla", "decayed_least_squares"])
def test_with_log_decays_is_the_same_rule(name):
    # α ↦ exp(α'): the scan of the log rule on log α equals the rule's on α, and so do the gradients chained
    # through torch.log (reference backend both: an oracle that never takes a log itself)
    from olssm.catalogue import ENTRIES, random_inputs
    rule = ENTRIES[name].rule
    log_rule = rule.with_log_decays()
    replaced = {n for n, s in rule.inputs.items() if s.domain == "decay" and not s.is_parameter}
    assert replaced and set(log_rule.inputs) == set(rule.inputs)
    for n, s in log_rule.inputs.items():
        old = rule.inputs[n]
        assert (s.role, s.kind) == (old.role, old.kind)
        assert s.domain == ("log_decay" if n in replaced else old.domain)
    assert log_rule.with_log_decays() is log_rule
    inp = {n: x.double().requires_grad_() for n, x in random_inputs(rule, 2, 9, 2, 4, 5, seed=3).items()}
    o1, f1 = rule.scan(backend="reference", output_final_state=True, **inp)
    o2, f2 = log_rule.scan(backend="reference", output_final_state=True,
                           **{n: (torch.log(x) if n in replaced else x) for n, x in inp.items()})
    assert torch.allclose(o1, o2, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(o1)
    g1 = torch.autograd.grad((o1 * w).sum(), list(inp.values()))
    g2 = torch.autograd.grad((o2 * w).sum(), list(inp.values()))
    for n, a, b in zip(inp, g1, g2):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), n


def test_with_log_decays_leaves_parameters_and_other_decays():
    from olssm.catalogue import ENTRIES
    for name in ("retnet", "mamba", "mamba2", "deltanet"):   # a decay parameter; exp(Δ A); no decay domain
        assert ENTRIES[name].rule.with_log_decays() is ENTRIES[name].rule


def test_derived_examples_verify():
    # catalogue.DERIVED: objectives no paper names (the benchmarks time them beside the catalogue's rules)
    for name, make in catalogue.DERIVED.items():
        rep = olssm.verify(make(), steps=5, d_k=5, d_v=3)
        assert rep.ok, (name, str(rep))
    assert catalogue.rule("two_keys").form.rank == 2
    assert catalogue.rule("longhorn_forget").decay_kind == "row"
    with pytest.raises(KeyError, match="two_keys"):
        catalogue.rule("nope")


def test_coefficient_names_avoid_the_inputs_names():
    # an input named eta printed as η, and the second derived coefficient was named η too: "η = (−η·kᵀk₂)/…"
    S, Sp = O.states()
    k, v, k2, v2 = O.key("k"), O.value("v"), O.key("k2"), O.value("v2")
    rule = olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=O.scalar("eta", domain="unit"))
                                    / 2 + O.sqnorm(S @ k2 - v2) / 2))
    where = str(rule).split("where ", 1)[1]
    defined = [part.split(" = ")[0] for part in where.split(", ") if " = " in part]
    assert "η" not in defined and defined[:2] == ["ε", "κ"], defined
    assert "η" in where                                       # the input itself still prints as η


def test_a_loss_weight_of_open_sign_warns():
    # a real-domain weight: the closed form is the minimiser only while it is >= 0 (negative values gave NaN in
    # a layer, whose real-domain inputs are plain projections); declared positive / unit: no warning
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    with pytest.warns(O.UnknownSignWarning, match="'w': domain 'real'.*domain='positive' or 'unit'"):
        olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=O.scalar("w")) / 2))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", O.UnknownSignWarning)
        olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=O.scalar("w", domain="unit")) / 2))
        for entry in catalogue.ENTRIES.values():
            olssm.derive(entry.objective)


def test_an_exact_readout_reads_the_ridge_and_the_query_only():
    S = O.states()[0]
    k, v = O.key("k"), O.value("v")
    rule = olssm.derive(O.Objective(O.sqnorm(S @ k - v, weight=O.scalar("beta", positive=True)) / 2, update="exact",
                                    decay=O.scalar("gamma", domain="decay"),
                                    ridge=O.parameter("lam", "column", domain="positive")))
    state = rule.zero_state((1, 1), 4, 3, lam=torch.ones(1, 4))
    assert rule.read(state, q=torch.randn(1, 1, 4), lam=torch.ones(1, 4)).shape == (1, 1, 3)   # no k, v, β, γ
    with pytest.raises(ValueError, match=r"read: missing input\(s\) \['lam'\]"):
        rule.read(state, q=torch.randn(1, 1, 4))


def test_cli_derives_a_users_objective(tmp_path, capsys):
    # `python -m olssm derive FILE.py:NAME`: the rule, its structure and inputs, and the solver check; exit status
    # 0 when it agrees, 3 for an objective with no closed form, 4 where the solver cannot check it, 2 (argparse's
    # usage status) with a message naming what the file holds for a NAME it lacks
    from olssm.__main__ import main
    f = tmp_path / "mine.py"
    f.write_text("import olssm.objectives as O\n"
                 "S, Sp = O.states()\n"
                 "k, v = O.key('k'), O.value('v')\n"
                 "gated = O.Objective(O.sqnorm(S - O.scalar('a', domain='decay') * Sp) / 2\n"
                 "                    + O.sqnorm(S @ k - v, weight=O.scalar('beta', domain='unit')) / 2)\n"
                 "def no_minimum():\n"
                 "    return O.Objective(O.sqnorm(S @ k - v) / 2)\n"
                 "unsquared = O.Objective(O.sqnorm(S - Sp) / 2 + O.norm(S @ k - v))\n"
                 "flat = O.Objective(1e-15 * O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v) / 2)\n")
    assert main(["derive", f"{f}:gated", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "S̃_t = a ⊙ S_{t-1}" in out and "where ε = β/(β*‖k‖² + 1)" in out and "OK (tolerance" in out
    assert main(["derive", f"{f}:no_minimum"]) == 3
    assert "no closed form: implicit update" in capsys.readouterr().out
    assert main(["derive", f"{f}:unsquared"]) == 3
    out = capsys.readouterr().out   # (its reason begins with "no closed form" itself, which had been printed twice)
    assert out.startswith("no closed form: ") and "no closed form: no closed form" not in out, out
    # too ill-conditioned for the float64 solver to check (verify's INCONCLUSIVE): 4, not a disagreement (1)
    assert main(["derive", f"{f}:flat", "--steps", "2"]) == 4
    assert "INCONCLUSIVE" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["derive", f"{f}:nope"])
    err = capsys.readouterr().err   # (and the functions, which NAME may also be: they had gone unlisted)
    assert exit_.value.code == 2 and "has no 'nope'; Objectives there: ['flat', 'gated', 'unsquared']" in err, err
    assert "functions there (NAME may be one returning an Objective): ['no_minimum']" in err, err
    # the file's own errors are loading errors (2), not a disagreement with the solver (1, which they had been)
    (tmp_path / "broken.py").write_text("x = undefined_name\n")
    (tmp_path / "raises.py").write_text("def boom():\n    raise RuntimeError('user bug')\n")
    for spec, said in ((f"{tmp_path / 'broken.py'}:x", "failed: NameError"), (f"{tmp_path / 'raises.py'}:boom",
                                                                               "raised RuntimeError: user bug")):
        with pytest.raises(SystemExit) as exit_:
            main(["derive", spec])
        assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_coefficients_that_no_rule_can_run_are_refused_at_derive_time():
    """A complex, NaN or infinite weight derived a rule (ε = 1/(‖k‖² − i)) that verify then failed on with a numpy
    error; a function without a torch counterpart (Γ, LambertW) derived, then failed in the first step; the RLS form
    with decay 0 derived P̃ = P/0. All are DerivationErrors now; Heaviside prints as a torch.where and steps."""
    import sympy as sp
    S, Sp = O.states()
    k, v, x = O.key("k"), O.value("v"), O.scalar("x", domain="positive")
    for w, said in ((sp.I, "not a finite real number"), (sp.nan, "not a finite real number"),
                    (sp.oo, "not a finite real number"), (sp.gamma(x) + 1, "Γ"), (sp.LambertW(x) + 1, "LambertW")):
        with pytest.raises(O.DerivationError, match=said):
            olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=w) / 2))
    with pytest.raises(O.DerivationError, match="decay 0"):
        olssm.derive(O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", decay=0, ridge=1, ridge_decays=True))
    rule = olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=sp.Heaviside(x)) / 2))
    assert olssm.verify(rule).ok


def test_coefficients_real_for_no_input_are_refused_and_for_some_inputs_warn():
    """√x with x declared 'negative' is imaginary for every input the domain allows (sympy proves it): it derived, and
    every scan returned NaN silently (verify failed with numpy's "array must not contain infs or NaNs"; a probe,
    session 26). Refused at derive time now, naming the part and the domain. log y / √y of a 'real' y are real for some
    inputs only: they warn, naming the domain; a 'positive' y, exp, a division and a sigmoid do not."""
    import sympy as sp
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    x, y, p = O.scalar("x", domain="negative"), O.scalar("y"), O.scalar("p", domain="positive")
    objective = lambda decay: O.Objective(O.sqnorm(S - decay * Sp) / 2 + O.sqnorm(S @ k - v) / 2)
    for decay, part in ((sp.sqrt(x), "sqrt(x)"), (1 / (1 + sp.sqrt(x)), "sqrt(x)")):
        with pytest.raises(O.DerivationError, match=rf"{re.escape(part)}.* not real for any value .*'x': domain "
                                                     "'negative'"):
            olssm.derive(objective(decay))
    for decay in (sp.log(y), sp.sqrt(y) / 2):
        with pytest.warns(O.UnknownSignWarning, match=r"real only for some values of its inputs \('y': domain 'real'"):
            olssm.derive(objective(decay))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for decay in (sp.log(p), sp.exp(y), 1 / (1 + y ** 2), 1 / (1 + sp.exp(-y)), sp.Abs(y) ** p):
            olssm.derive(objective(decay))
        # a normalised key k/‖k‖ (1/√‖k‖², real wherever defined) under a 'unit' weight: the weight b/‖k‖² had
        # also warned of an open sign, though it is ≥ 0 wherever it is defined
        olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ (k / sp.sqrt(O.dot(k, k))) - v,
                                                              weight=O.scalar("b", domain="unit")) / 2))


def test_csum_of_an_expression_without_a_key_index_is_refused():
    """csum(v*v) printed as ‖v‖², and the evaluators summed over a broadcast axis of size 1: the rule weighted the loss
    by v_i² where the sum over the key index is d_k·v_i² (verify agreed, from the same evaluator; a probe, session
    26). Refused, as dot() refuses two non-key arguments; kᵀk still works and csum(0) is 0."""
    k, v = O.key("k"), O.value("v")
    for arg, kind in ((v * v, "value-sized"), (O.scalar("b"), "scalar"), (sp.Integer(2), "scalar")):
        with pytest.raises(O.DerivationError, match=rf"no key index to sum over \(a {kind} expression\)"):
            O.csum(arg)
    assert O.csum(k * k) == O.dot(k, k) and O.csum(sp.Integer(0)) == 0


def test_an_exact_rule_with_a_constant_weight_on_the_state_runs():
    """½‖S k − v‖² + (1/100)·½‖S‖² (update="exact") derived, and then every step failed: the generated step passed the
    weight, a Python float, to torch.broadcast_to (a probe, session 26). It runs now, against verify and across the
    torch backends with gradients (fp64: 1e-10), and prints as H_t = H_{t-1} + k kᵀ + (1/100) I."""
    S, _ = O.states()
    k, v = O.key("k"), O.value("v")
    rule = olssm.derive(O.Objective(O.sqnorm(S @ k - v) / 2 + sp.Rational(1, 100) * O.sqnorm(S) / 2, update="exact",
                                    decay=O.scalar("g", domain="decay")))
    assert str(rule).startswith("H_t = g H_{t-1} + k kᵀ + (1/100) I\n"), str(rule)
    assert olssm.verify(rule).ok
    inp = catalogue.random_inputs(rule, 2, 11, 2, 4, 3, dtype=torch.float64)
    got = {}
    for backend in ("reference", "chunk"):
        x = {n: t.clone().requires_grad_() for n, t in inp.items()}
        o, (G, H) = rule.scan(backend=backend, output_final_state=True, **x)
        got[backend] = (o, G, H, *torch.autograd.grad((o ** 2).sum() + G.sum() + H.sum(), list(x.values())))
    for a, b in zip(got["chunk"], got["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_sum_of_keys_keeps_its_parentheses_in_print():
    # S @ (k + k2) had printed as ‖S k + k₂ - v‖², which reads as (S k) + k₂ (the math was right)
    S, _ = O.states()
    obj = O.Objective(O.sqnorm(S @ (O.key("k") + O.key("k2")) - O.value("v")) / 2, update="exact",
                      ridge=O.parameter("lam", "scalar", domain="positive"))
    assert "S (k + k₂)" in obj.summary() or "S (k + k2)" in obj.summary(), obj.summary()
    assert r"S\,\left(k + k_{2}\right)" in obj.latex(), obj.latex()


def test_printed_terms_carry_their_sign_and_no_factor_one():
    """A coefficient's minus goes to the term's sign under one name (it had printed I − ε k₂ kᵀ − η k kᵀ with
    ε = −β/…, η = β/…), and unit coefficients print no factor (H_t = g H + 1 k kᵀ, I − 1 k kᵀ)."""
    S, Sp = O.states()
    k, k2, v, v2 = O.key("k"), O.key("k2"), O.value("v"), O.value("v2")
    beta, g = O.scalar("beta", domain="unit"), O.scalar("g", domain="decay")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proj = olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - Sp @ k2, weight=beta) / 2))
    assert "S_{t-1} (I + ε k₂ kᵀ - ε k kᵀ)" in str(proj) and "where ε = β/(β*‖k‖² + 1)" in str(proj), str(proj)
    assert r"\left(I + \varepsilon k_{2} k^\top - \varepsilon k k^\top\right)" in proj.latex(), proj.latex()
    exact = olssm.derive(O.Objective(O.sqnorm(S @ k - v) / 2 + O.sqnorm(S @ k2 - v2) / 2, update="exact", decay=g,
                                     ridge=O.scalar("lam", domain="positive")))
    assert "H_t = g H_{t-1} + k kᵀ + k₂ k₂ᵀ" in str(exact), str(exact)
    step = olssm.derive(O.Objective(O.sqnorm(S @ k - v) / 2, update="explicit", decay=O.row("r", domain="decay")))
    assert "(I - k kᵀ)" in str(step), str(step)
    # input terms too, and the two shapes of input term that printed as something else (a probe, session 26):
    # "+ ((−b₂) ⊙ v₂) k₂ᵀ", ⟨S, M⟩'s "M (1)ᵀ", and an elementwise factor as "(ε ⊙ v) kᵀ" (ε read value-sized)
    b1, b2 = O.scalar("b1", domain="unit"), O.scalar("b2", domain="unit")
    signs = olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 - O.inner(S @ k, v, weight=b1) + O.inner(S @ k2, v2, weight=b2)))
    assert "S_t = S_{t-1} + (b₁ ⊙ v) kᵀ - (b₂ ⊙ v₂) k₂ᵀ" in str(signs), str(signs)
    assert r"- (b_{2} \odot v_{2}) k_{2}^\top" in signs.latex(), signs.latex()
    matrix = olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 - O.inner(S, O.parameter("M", "matrix"))))
    assert str(matrix).startswith("S_t = S_{t-1} + M\n"), str(matrix)
    A, dt = O.parameter("A", "matrix", domain="negative"), O.scalar("dt", domain="timestep")
    gated = olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 - O.inner(S, sp.exp(A * dt) * v * k)))
    assert "S_t = S_{t-1} + ε ⊙ (v kᵀ)" in str(gated), str(gated)
    for rule in (signs, matrix, gated):
        assert olssm.verify(rule).ok


def test_explicit_proximal_weight_of_open_sign_warns_and_big_integers_run():
    """An explicit step's proximal weight ω of open sign warns (as an implicit rule's loss weights do); one declared
    positive does not. A Rational weight of 1e-20 derived ε = 1/(‖k‖² + 10²⁰), whose Python int overflowed torch at
    the first step: it prints as a float now. dot(k, k) as a weight is known ≥ 0 (it had warned of an open sign)."""
    S, Sp = _S()
    k, v = O.key("k"), O.value("v")
    loss = O.sqnorm(S @ k - v, weight=O.row("beta", domain="unit")) / 2
    with pytest.warns(O.UnknownSignWarning, match="proximal part's weight is c"):
        olssm.derive(O.Objective(O.scalar("c") * O.sqnorm(S - Sp) / 2 + loss, update="explicit"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        olssm.derive(O.Objective(O.sqnorm(S - Sp, weight=O.column("g", domain="positive")) / 2 + loss,
                                 update="explicit"))
        olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=O.dot(k, k)) / 2))
    obj = O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=sp.Rational(1, 10 ** 20)) / 2)
    rule = olssm.derive(obj)
    g = torch.Generator().manual_seed(0)
    S0, kk, vv = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((3, 4), (4,), (3,)))
    eps = 1 / (float(kk @ kk) + 1e20)                 # Sherman–Morrison with β = 1e-20, written out
    want = S0 - eps * torch.outer(S0 @ kk, kk) + eps * torch.outer(vv, kk)
    torch.testing.assert_close(rule.step(S0, backend="torch", k=kk, v=vv), want, rtol=1e-15, atol=0)
    assert olssm.verify(obj, steps=2).ok


def test_a_row_times_column_hessian_diagonal_splits():
    """A row weight β on ‖(S − S_prev) diag(g)‖² gives δ = β_i g_j², which factors as row × column (B⁻¹ = diag(1/g²)/β
    per row), so a regression term beside it has a closed form; it had been refused as an elementwise diagonal.
    Checked by the numerical solver, and its scans against the reference in fp64 (outputs, final state, gradients)."""
    from olssm.catalogue import random_inputs
    S, Sp = _S()
    k, v = O.key("k"), O.value("v")
    beta, g = O.row("beta", domain="unit"), O.column("g", domain="positive")
    obj = O.Objective(O.sqnorm((S - Sp) @ O.diag(g), weight=beta) / 2 + O.sqnorm(S @ k - v) / 2)
    rule = olssm.derive(obj)
    assert "ε = 1/(β + Σⱼ(k²/g²))" in str(rule), str(rule)
    assert olssm.verify(obj, steps=4).ok
    inp = {n: x.double().requires_grad_() for n, x in random_inputs(rule, 2, 21, 2, 5, 3, seed=1).items()}
    outs = {}
    for backend in ("chunk", "reference"):
        o, f = rule.scan(**inp, backend=backend, chunk_size=8, output_final_state=True)
        outs[backend] = (o, f, torch.autograd.grad(o.square().sum() + f.square().sum(), list(inp.values())))
    for a, b in zip(outs["chunk"][:2] + outs["chunk"][2], outs["reference"][:2] + outs["reference"][2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_verify_catches_a_wrong_readout_and_a_nan_output():
    # the oracle had read out with the rule's own query symbol (a rule reading S k instead of S q passed), and a NaN
    # output error beside a finite state error read as OK (max(0.1, nan) is 0.1)
    import dataclasses
    from olssm.derive import Rule
    from olssm.verify import VerifyReport
    entry = catalogue.ENTRIES["longhorn"]
    rule = olssm.derive(entry.objective)
    wrong = Rule(entry.objective, dataclasses.replace(rule.form, readout=O.key("k")))
    assert olssm.verify(rule).ok and not olssm.verify(wrong).ok
    report = VerifyReport("x", "implicit", 1, 4, 3, state_error=1e-16, output_error=float("nan"), per_step=[])
    assert not report.ok and "MISMATCH" in str(report)


def test_open_sign_warnings_repeat_and_name_the_domains():
    # an equal objective built again hit the derive cache and derived silently; a weight a - 0.5 with a declared
    # 'unit' was said to be of domain 'real'; a Hessian diagonal 1 + b of open sign went unwarned
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    for _ in range(2):
        with pytest.warns(O.UnknownSignWarning) as caught:
            olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=O.scalar("b_open")) / 2))
        assert caught[0].filename == __file__
    with pytest.warns(O.UnknownSignWarning, match="'a': domain 'unit'"):
        olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2
                                 + O.sqnorm(S @ k - v, weight=O.scalar("a", domain="unit") - 0.5) / 2))
    with pytest.warns(O.UnknownSignWarning, match="diagonal of the Hessian is .*'b': domain 'real'"):
        olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.scalar("b") * O.sqnorm(S) / 2 + O.sqnorm(S @ k - v) / 2))


def test_verify_takes_its_sizes_from_given_inputs_and_names_bad_ones():
    # given inputs of d_k = 5 had failed inside rule.step ("d_k (key size) = 4", a size the user never set); a
    # dict for the list iterated its keys; None, a batched vector and NaN failed far from the input
    import numpy as np
    obj = catalogue.ENTRIES["longhorn"].objective
    g = np.random.default_rng(0)
    steps = [dict(k=g.standard_normal(5), v=g.standard_normal(2), q=g.standard_normal(5), beta=g.random(2))
             for _ in range(3)]
    report = olssm.verify(obj, inputs=steps)
    assert report.ok and (report.d_k, report.d_v) == (5, 2)
    with pytest.raises(TypeError, match="wrap it in a list"):
        olssm.verify(obj, inputs=steps[0])
    for bad, msg in ((dict(steps[0], beta=None), "'beta' is None"),
                     (dict(steps[0], k=np.ones((2, 5))), r"'k' \(column\) must be a vector \[d_k\]"),
                     (dict(steps[0], v=np.full(2, np.nan)), "'v' has non-finite values")):
        with pytest.raises(ValueError, match=msg):
            olssm.verify(obj, inputs=[bad])
    with pytest.raises(ValueError, match="d_k=4 was passed, but the given inputs have size 5"):
        olssm.verify(obj, inputs=steps, d_k=4)
    with pytest.raises(ValueError, match="got steps=-3"):
        olssm.verify(obj, steps=-3)


def test_an_indefinite_cross_term_warns_and_a_convex_coupling_does_not():
    # ½‖S − S_prev‖² + ⟨S k₀, S k₁⟩ − ⟨S k, v⟩: per row the Hessian is I + k₀k₁ᵀ + k₁k₀ᵀ, eigenvalue
    # 1 + k₀ᵀk₁ − ‖k₀‖‖k₁‖ < 0 for large keys, so the derived stationary point is a saddle. derive had said nothing
    # (verify reported MISMATCH without a reason).
    import warnings
    S, Sp = O.states()
    k, v, k0, k1 = O.key("k"), O.value("v"), O.key("k0"), O.key("k1")
    obj = O.Objective(O.sqnorm(S - Sp) / 2 + O.inner(S @ k0, S @ k1) - O.inner(S @ k, v))
    with pytest.warns(O.IndefiniteHessianWarning, match=r"⟨S k₀, S k₁⟩ couples S k₀ and S k₁.*principal minor -1") as w:
        rule = olssm.derive(obj)
    assert w[0].filename == __file__
    # independent check that it is a saddle: at large orthogonal-ish keys the hand-built Hessian has a negative
    # eigenvalue, the rule's state has zero gradient (float64: 1e-10 is rounding) and moving along that eigenvector
    # lowers the objective
    g = torch.Generator().manual_seed(0)
    kk0, kk1, kq, vv = (torch.randn(4, generator=g, dtype=torch.float64) * 2 for _ in range(4))
    vv = vv[:3]
    Sp0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    P = torch.eye(4, dtype=torch.float64) + torch.outer(kk0, kk1) + torch.outer(kk1, kk0)
    lam, vecs = torch.linalg.eigh(P)
    assert lam[0] < -0.5
    S1 = rule.step(Sp0, k=kq, v=vv, k0=kk0, k1=kk1)
    grad = (S1 - Sp0) + (S1 @ kk1)[:, None] * kk0 + (S1 @ kk0)[:, None] * kk1 - vv[:, None] * kq
    assert grad.abs().max() < 1e-10

    def L(X):
        return 0.5 * ((X - Sp0) ** 2).sum() + ((X @ kk0) * (X @ kk1)).sum() - (vv * (X @ kq)).sum()

    d = torch.zeros(3, 4, dtype=torch.float64)
    d[0] = vecs[:, 0]
    assert L(S1 + d) < L(S1) - 0.25                 # ½ λ_min ‖d‖² with λ_min < −0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", O.IndefiniteHessianWarning)
        rep = olssm.verify(obj)
    assert not rep.ok and rep.no_minimum and "IndefiniteHessianWarning" in rep.note
    # a weight of open sign on the cross term: the minor 1 − c² of open sign, UnknownSignWarning naming c
    c = O.scalar("c")
    with pytest.warns(O.UnknownSignWarning, match=r"principal minor 1 - c² is >= 0.*'c': domain 'real'"):
        olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k0 - v) / 2 + O.sqnorm(S @ k1 - v) / 2
                                 + c * O.inner(S @ k0, S @ k1)))
    # exact mode reads the same Gram weights
    with pytest.warns(O.IndefiniteHessianWarning, match="exact"):
        olssm.derive(O.Objective(O.sqnorm(S @ k0 - v) / 2 + O.sqnorm(S @ k1 - v) / 2 + 2 * O.inner(S @ k0, S @ k1),
                                 update="exact", ridge=O.parameter("lam", domain="positive")))
    # positive semidefinite couplings derive silently, and so does every catalogue and DERIVED objective
    b0, b1 = O.scalar("b0", domain="unit"), O.scalar("b1", domain="unit")
    convex = [O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k0 - v) / 2 + O.sqnorm(S @ k1 - v) / 2
                          + O.inner(S @ k0, S @ k1)),                     # ½‖S k₀ + S k₁‖² + …: R = [1 1; 1 1]
              O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k0 + S @ k1 - v, weight=b0) / 2
                          + O.sqnorm(S @ k1 - v, weight=b1) / 2)]         # minor b₀b₁ > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for o in convex:
            assert olssm.verify(o, steps=4).ok
        for entry in catalogue.ENTRIES.values():
            olssm.derive(entry.objective)
        for make in catalogue.DERIVED.values():
            olssm.derive(make())


def test_a_combined_key_is_read_over_its_parts():
    # S (k + k₁) is a combination of S k and S k₁; R had been read over {k, k₁, k + k₁} as if they were independent,
    # so ½‖S (k + k₁) − v‖² − ⟨S k, S k₁⟩ = ½‖S k‖² + ½‖S k₁‖² − ⟨S (k + k₁), v⟩ + … (positive definite) read the
    # minor −1 of the cross term alone and warned IndefiniteHessianWarning. Over the parts R' = Cᵀ R C = I
    S, Sp = O.states()
    k, k1, v = O.key("k"), O.key("k1"), O.value("v")
    a = O.scalar("a")
    lam = O.parameter("lam", domain="positive")
    convex = {
        "combined key": O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ (k + k1) - v) / 2 - O.inner(S @ k, S @ k1)),
        # a 'real' scale a: ½‖S k‖² + ½ a²‖S k₁‖², R' = diag(1, a²); read over the vectors, the minor −a² had warned
        "scaled part": O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ (k + a * k1) - v) / 2
                                   - a * O.inner(S @ k, S @ k1)),
        # sympy writes 2 (k + k₁) as 2k + 2k₁: 2‖S k‖² + 2‖S k₁‖²
        "numeric scale": O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ (2 * (k + k1)) - v) / 2
                                     - 4 * O.inner(S @ k, S @ k1)),
        "exact": O.Objective(O.sqnorm(S @ (k + k1) - v) / 2 - O.inner(S @ k, S @ k1), update="exact", ridge=lam),
        # no cross term, but S k is a part of S (k ± k₁): I + k kᵀ + 2 k₁ k₁ᵀ is positive definite, and the −½‖S k‖²
        # read alone had been refused as "not convex" (a probe, session 21)
        "negative square of a part": O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ (k + k1) - v) / 2
                                                 + O.sqnorm(S @ (k - k1)) / 2 - O.sqnorm(S @ k) / 2),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for obj in convex.values():
            olssm.derive(obj)
    for name, obj in convex.items():
        assert olssm.verify(obj, steps=4).ok, name
    # the rewrite does not hide an indefinite form: a cross term outweighing the square (R' = [1 −2; −2 1]), in
    # either mode, and ⟨S (k + k₁), S (k − k₁)⟩ = ‖S k‖² − ‖S k₁‖², no squared loss at all and R' = diag(2, −2)
    # (a diagonal entry of R' that is no squared loss's weight is read on its own)
    indefinite = {
        r"terms 1/2·‖S \(k \+ k₁\) - v‖² and -3·⟨S k, S k₁⟩ couple S k and S k₁.*R = \[1, -2; -2, 1\].*minor -3":
            O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ (k + k1) - v) / 2 - 3 * O.inner(S @ k, S @ k1)),
        "exact.*minor -3": O.Objective(O.sqnorm(S @ (k + k1) - v) / 2 - 3 * O.inner(S @ k, S @ k1), update="exact",
                                       ridge=lam),
        r"acts on S k₁.*R = \[-2\], have the principal minor -2":
            O.Objective(O.sqnorm(S - Sp) / 2 + O.inner(S @ (k + k1), S @ (k - k1)) - O.inner(S @ k, v)),
        # the same reading without a cross term: −2‖S k‖² outweighs the combined square's share, R' = [−3 1; 1 1]
        r"written over their parts.*minor -3":
            O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ (k + k1) - v) / 2 - 2 * O.sqnorm(S @ k)),
    }
    for match, obj in indefinite.items():
        with pytest.warns(O.IndefiniteHessianWarning, match=match):
            olssm.derive(obj)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", O.IndefiniteHessianWarning)
            rep = olssm.verify(obj, steps=4)
        assert not rep.ok and rep.no_minimum, match
    # a cross-term weight of open sign beside a combined key: R' = [1 1 + c; 1 + c 1], minor −c(c + 2)
    c = O.scalar("c")
    with pytest.warns(O.UnknownSignWarning, match=r"k \+ k₁ written over their parts.*minor -c\*\(c \+ 2\)"):
        olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ (k + k1) - v) / 2
                                 + c * O.inner(S @ k, S @ k1)))


def test_independent_vectors_split_combinations_and_keep_the_rest_whole():
    from olssm.derive.solve import _independent_vectors
    k, k1 = O.key("k"), O.key("k1")
    a, r, g = O.scalar("a"), O.row("r"), O.column("g")
    assert _independent_vectors(k) == {k: 1}
    assert _independent_vectors(k + a * k1) == {k: 1, k1: a}
    assert _independent_vectors(a * (k + r * (k1 - k))) == {k: a - a * r, k1: a * r}
    assert _independent_vectors(g * (k + k1)) == {g * k: 1, g * k1: 1}      # elementwise products: their own vectors
    assert _independent_vectors(sp.exp(k + k1) + k) == {sp.exp(k + k1): 1, k: 1}
    assert _independent_vectors(k - k) == {}


def test_unit_and_decay_upper_bounds_count_in_the_sign_checks():
    # sympy's assumptions say only that a 'unit' input is positive, so 1 − c², 1 − c and b₀(1 − b₀/4) read as of
    # open sign and derive warned UnknownSignWarning on objectives that are convex for every c in (0, 1)
    import warnings
    S, Sp = O.states()
    k, v, k1, v1 = O.key("k"), O.value("v"), O.key("k1"), O.value("v1")
    c, b0 = O.scalar("c", domain="unit"), O.scalar("b0", domain="unit")
    convex = {
        "unit cross term": O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v) / 2 + O.sqnorm(S @ k1 - v1) / 2
                                       + c * O.inner(S @ k, S @ k1)),            # minor 1 − c² > 0
        "unit anti-ridge": O.Objective(O.sqnorm(S - Sp) / 2 - c * O.sqnorm(S) / 2 - O.inner(S @ k, v)),  # δ = 1 − c
        "unit complement weight": O.Objective(O.sqnorm(S - Sp) / 2 + (1 - c) * O.sqnorm(S @ k - v) / 2),
        "exact, unit cross term": O.Objective(b0 * O.sqnorm(S @ k - v) / 2 + O.sqnorm(S @ k1 - v1) / 2
                                              + b0 * O.inner(S @ k, S @ k1) / 2, update="exact",
                                              ridge=O.parameter("lam", domain="positive")),   # b₀(1 − b₀/4) > 0
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for name, obj in convex.items():
            olssm.derive(obj)
    for name, obj in convex.items():
        assert olssm.verify(obj, steps=4).ok, name
    # the bounds are used, not assumed away: 1 − g with g in (0, 1] (a 'decay') is 0 at g = 1, and 1 − 2c is
    # negative for c > ½
    g = O.scalar("g", domain="decay")
    with pytest.warns(O.UnknownSignWarning, match="diagonal of the Hessian is 1 - g"):
        olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 - g * O.sqnorm(S) / 2 - O.inner(S @ k, v)))
    with pytest.warns(O.UnknownSignWarning, match="1 - 2"):
        olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + (1 - 2 * c) * O.sqnorm(S @ k - v) / 2))


def test_exact_mode_checks_the_sign_of_the_ridge_diagonal_and_decay():
    # exact mode checked the squared-loss weights only: a 'real' ridge (the default domain of parameter()) derived
    # silently, while H_0 + λ = k kᵀ + λ I has the eigenvalue λ < 0 on keys orthogonal to k, and verify reported
    # every even seed "no minimum", its note pointing to an UnknownSignWarning that derive had not given
    import warnings
    S, _ = O.states()
    k, v = O.key("k"), O.value("v")
    g = O.scalar("g", domain="decay")
    real_ridge = O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", decay=g, ridge=O.parameter("lam"))
    with pytest.warns(O.UnknownSignWarning, match=r"the ridge is λ.*'lam': domain 'real'") as w:
        olssm.derive(real_ridge)
    assert w[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", O.UnknownSignWarning)
        rep = olssm.verify(real_ridge, steps=2)
    assert not rep.ok and rep.no_minimum and "lam = -" in rep.note and "UnknownSignWarning" in rep.note
    with pytest.warns(O.UnknownSignWarning, match="the ridge is λ"):
        olssm.derive(O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", decay=g, ridge=O.parameter("lam"),
                                 ridge_decays=True))
    with pytest.warns(O.UnknownSignWarning, match="per-token term on ‖S‖² has weight b"):
        olssm.derive(O.Objective(O.sqnorm(S @ k - v) / 2 + O.scalar("b") * O.sqnorm(S) / 2, update="exact",
                                 ridge=O.parameter("lam", domain="positive")))
    with pytest.warns(O.UnknownSignWarning, match="forgetting factor is a"):
        olssm.derive(O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", decay=O.scalar("a"),
                                 ridge=O.parameter("lam", domain="positive")))
    for obj, msg in ((O.Objective(O.sqnorm(S @ k - v) / 2, update="exact",
                                  ridge=O.parameter("lam", domain="negative")), "eigenvalue λ ≤ 0"),
                     (O.Objective(O.sqnorm(S @ k - v) / 2 - O.sqnorm(S) / 2, update="exact",
                                  ridge=O.parameter("lam", domain="positive")), "weight -1 < 0"),
                     (O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", decay=O.scalar("n", domain="negative"),
                                  ridge=O.parameter("lam", domain="positive")), "forgetting factor n is negative")):
        with pytest.raises(O.DerivationError, match=msg):
            olssm.derive(obj)
    # a positive ridge beside a 'real' one that only adds to it is silent: 1 + b² > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        olssm.derive(O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", decay=g,
                                 ridge=1 + O.parameter("b") ** 2))


def test_coupled_squares_reads_every_minor_of_a_large_exact_block():
    # exact mode takes any number of keys; the minors had been read up to 4×4 only. R = 0.78 I − 0.22 (J − I) on
    # five keys has every principal minor of size ≤ 4 positive (0.12 at 4×4) and det R = −0.1 (eigenvalue −0.1):
    # derive was silent, and with large keys the prefix objective has no minimum. A numeric block larger than
    # ALL_MINORS_UP_TO is decided by its eigenvalues
    import numpy as np
    S, _ = O.states()
    ks, v = [O.key(f"k{i}") for i in range(5)], O.value("v")
    w, c = sp.Rational(78, 100), sp.Rational(-22, 100)
    expr = -O.inner(S @ ks[0], v)
    for i in range(5):
        expr = expr + w * O.sqnorm(S @ ks[i]) / 2
        for j in range(i + 1, 5):
            expr = expr + c * O.inner(S @ ks[i], S @ ks[j])
    obj = O.Objective(expr, update="exact", ridge=O.parameter("lam", domain="positive"))
    R = np.full((5, 5), -0.22) + np.eye(5)
    assert np.linalg.eigvalsh(R)[0] == pytest.approx(-0.1) and np.linalg.det(R[:4, :4]) > 0.1
    with pytest.warns(O.IndefiniteHessianWarning, match="eigenvalue -0.1"):   # numeric 5×5: its eigenvalues
        rule = olssm.derive(obj)
    g = torch.Generator().manual_seed(0)
    big = [dict({f"k{i}": 4 * torch.randn(6, generator=g, dtype=torch.float64) for i in range(5)},
                v=torch.randn(3, dtype=torch.float64), q=torch.randn(6, dtype=torch.float64),
                lam=torch.tensor(0.5, dtype=torch.float64))]
    rep = olssm.verify(rule, inputs=big)
    assert not rep.ok and rep.no_minimum, rep


def test_cli_prints_derives_warnings_as_its_own(tmp_path, capsys):
    # `python -m olssm derive` on an indefinite objective printed "<frozen runpy>:88: IndefiniteHessianWarning: …"
    # (the first frame outside olssm is runpy's); now the command prints each warning once, as its own, and exits 1
    # (the solver finds no minimum)
    from olssm.__main__ import main
    f = tmp_path / "saddle.py"
    f.write_text("import olssm.objectives as O\n"
                 "S, Sp = O.states()\n"
                 "k, v, k1 = O.key('k'), O.value('v'), O.key('k1')\n"
                 "obj = O.Objective(O.sqnorm(S - Sp) / 2 + O.inner(S @ k, S @ k1) - O.inner(S @ k, v))\n")
    assert main(["derive", f"{f}:obj", "--steps", "2"]) == 1
    cap = capsys.readouterr()
    assert cap.err.count("olssm derive: IndefiniteHessianWarning: implicit update") == 1, cap.err
    assert "no minimum at step(s)" in cap.out and "IndefiniteHessianWarning names the term" in cap.out


def test_coupled_squares_bounds_its_symbolic_minors(monkeypatch):
    # eight keys coupled by 'unit' weights c_i c_j / 10 (R = I + C with |C| ≤ 0.1 per entry: diagonally dominant,
    # positive definite): all 2^8 principal minors, each a sign query on the reparameterised 'unit' inputs, had
    # taken minutes; at most SYMBOLIC_MINORS determinants are formed now, and nothing warns
    from olssm.derive import solve
    formed = []
    real_det = sp.MutableDenseMatrix.det
    monkeypatch.setattr(sp.MutableDenseMatrix, "det", lambda self, *a, **k: formed.append(self.rows) or
                        real_det(self, *a, **k))
    S, _ = O.states()
    ks, v = [O.key(f"k{i}") for i in range(8)], O.value("v")
    cs = [O.scalar(f"c{i}", domain="unit") for i in range(8)]
    expr = -O.inner(S @ ks[0], v)
    for i in range(8):
        expr = expr + O.sqnorm(S @ ks[i]) / 2
        for j in range(i + 1, 8):
            expr = expr + cs[i] * cs[j] / 10 * O.inner(S @ ks[i], S @ ks[j])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        olssm.derive(O.Objective(expr, update="exact", ridge=O.parameter("lam", domain="positive")))
    assert 0 < len(formed) <= solve.SYMBOLIC_MINORS, len(formed)


def test_a_rule_that_forgets_everything_says_so():
    # an explicit step whose proximal part is a ridge λ‖S‖²/2 is centred on its minimiser, 0: the rule derived
    # S̃ = 0 ⊙ S_prev silently (weight decay meant, a memoryless rule got). Now a MemorylessWarning names the cause
    # for that and for an implicit ridge without ‖S − S_prev‖²; rules that read S_prev, and exact ones, stay silent
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    lam, beta = O.scalar("lam", domain="positive"), O.scalar("beta", domain="unit")
    for obj, said in ((O.Objective(lam * O.sqnorm(S) / 2 + O.sqnorm(S @ k - v, weight=beta) / 2, update="explicit"),
                       "its centre, the minimiser of the proximal part, is S = 0"),
                      (O.Objective(lam * O.sqnorm(S) / 2 - O.inner(S @ k, v)), "no ‖S − S_prev‖² term")):
        with pytest.warns(olssm.MemorylessWarning, match=f"does not read S_prev.*{said}"):
            rule = olssm.derive(obj)
        assert sp.sympify(rule.form.decay) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for obj in (O.Objective(O.sqnorm(S @ k - v, weight=beta) / 2, update="explicit",
                                decay=O.scalar("a", domain="decay")),
                    O.Objective(O.sqnorm(S - Sp) / 2 + lam * O.sqnorm(S) / 2 - O.inner(S @ k, v)),
                    O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", ridge=lam)):
            olssm.derive(obj)


def test_an_explicit_step_divides_by_the_proximal_weight():
    # c‖S − S_prev‖²/2 + ½β‖S k − v‖², explicit: the step minimises the proximal part plus the linearised loss,
    # c (S − S_prev) + β (S_prev k − v) kᵀ = 0, so S_t = S_prev − (β/c)(S_prev k − v) kᵀ. c had been dropped (the
    # rule stepped as if c = 1, and verify's oracle agreed: it took C − η∇ℓ(C) too). Now the oracle minimises the
    # proximal part plus η⟨∇ℓ(C), S⟩ numerically, and the rule divides by c: per row for a row weight, on the key
    # side for a column weight (k/g²); an elementwise weight cannot factor (S̃ k) kᵀ and is refused
    import dataclasses
    from olssm.derive import Rule
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    c, beta = O.scalar("c", domain="positive"), O.scalar("beta", domain="unit")
    obj = O.Objective(c * O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=beta) / 2, update="explicit")
    rule = olssm.derive(obj)
    g = torch.Generator().manual_seed(0)
    S0, kk, vv = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3, 4), (4,), (3,)))
    cc, bb = torch.tensor(2.5, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    torch.testing.assert_close(rule.step(S0, k=kk, v=vv, c=cc, beta=bb),
                               S0 - (bb / cc) * (S0 @ kk - vv)[:, None] * kk[None, :], rtol=1e-12, atol=1e-12)
    assert olssm.verify(obj).ok
    (corr,) = rule.form.corrections
    (term,) = rule.form.inputs
    unweighted = Rule(obj, dataclasses.replace(rule.form, corrections=(dataclasses.replace(corr, coef=beta),),
                                               inputs=(dataclasses.replace(term, coef=term.coef * c),)))
    bad = olssm.verify(unweighted)
    assert not bad.ok and bad.max_error > 0.1, bad
    gcol = O.column("g", domain="positive")
    col = olssm.derive(O.Objective(O.sqnorm((S - Sp) @ O.diag(gcol)) / 2 + O.sqnorm(S @ k - v, weight=beta) / 2,
                                   update="explicit"))
    assert "(k/g²)ᵀ" in str(col), str(col)
    gg = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    torch.testing.assert_close(col.step(S0, k=kk, v=vv, g=gg, beta=bb),
                               S0 - bb * (S0 @ kk - vv)[:, None] * (kk / gg ** 2)[None, :], rtol=1e-12, atol=1e-12)
    with pytest.raises(olssm.DerivationError, match="elementwise"):
        both = O.column("g", domain="positive") * O.row("r", domain="positive")
        olssm.derive(O.Objective(O.sqnorm(S - Sp, weight=both) / 2 + O.sqnorm(S @ k - v) / 2, update="explicit"))


def test_a_decay_that_is_a_sum_prints_in_parentheses():
    # S̃_t = 1 - β ⊙ S_{t-1} read as 1 − (β ⊙ S_{t-1}); the rule is (1 − β) ⊙ S_{t-1}
    S, Sp = O.states()
    beta = O.scalar("beta", domain="unit")
    rule = olssm.derive(O.Objective(O.sqnorm(S - (1 - beta) * Sp) / 2 + O.sqnorm(S @ O.key("k") - O.value("v")) / 2))
    assert "S̃_t = (1 - β) ⊙ S_{t-1}" in str(rule), str(rule)
    assert r"\left(1 - \beta\right) \odot S_{t-1}" in rule.latex(), rule.latex()
