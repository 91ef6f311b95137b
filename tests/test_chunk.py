"""backend="chunk" against backend="reference": outputs, final states and gradients.

Tolerances. fp32: 2e-4, normwise relative to max(1, max |reference|). The chunked form sums the same
terms in a different order (blocked matmuls, cumulative log-decays, a triangular solve) than the
token loop; with T <= 64 and |o| = O(1) that moves fp32 results by ~1e-6..1e-5, and gradients pass
through the triangular solve (condition number a few for β < 1, unit keys), hence 2e-4 with margin.
fp64: 1e-9 (the same algebra, rounding only).
"""
import warnings

import pytest
import sympy
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import olssm
from olssm import catalogue as cat
from olssm import objectives as O
from olssm.kernels import scan
from olssm.kernels.chunk import ChunkFallbackWarning
from olssm.objectives.core import DerivationError

TOL32, TOL64 = 2e-4, 1e-9


def _close(a, b, tol, what=""):
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


def _states(f, exact):
    return list(f) if exact else [f]


def _run(rule, inp, backend, *, init=None, chunk_size=16, grad_seed=None, cu_seqlens=None):
    """o, final states, and (if grad_seed) gradients of a random projection w.r.t. every leaf."""
    leaves = {n: x.detach().clone().requires_grad_(grad_seed is not None) for n, x in inp.items()}
    init_l = None
    if init is not None:
        init_l = tuple(x.detach().clone().requires_grad_(grad_seed is not None) for x in init) if rule.is_exact \
            else init.detach().clone().requires_grad_(grad_seed is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChunkFallbackWarning)
        o, f = scan(rule, backend=backend, output_final_state=True, initial_state=init_l, chunk_size=chunk_size,
                    cu_seqlens=cu_seqlens, **leaves)
    fs = _states(f, rule.is_exact)
    if grad_seed is None:
        return o.detach(), [x.detach() for x in fs], None
    g = torch.Generator().manual_seed(grad_seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum()
    for x in fs:
        loss = loss + (x * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)).sum()
    inits = [] if init_l is None else list(init_l) if rule.is_exact else [init_l]
    wrt = list(leaves.values()) + inits
    names = list(leaves) + [f"initial_state[{i}]" for i in range(len(inits))]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return o.detach(), [x.detach() for x in fs], dict(zip(names, grads))


def _compare(rule, inp, *, tol, init=None, chunk_size=16, grads=True, cu_seqlens=None, what=""):
    seed = 123 if grads else None
    o1, f1, g1 = _run(rule, inp, "reference", init=init, grad_seed=seed, cu_seqlens=cu_seqlens)
    o2, f2, g2 = _run(rule, inp, "chunk", init=init, chunk_size=chunk_size, grad_seed=seed, cu_seqlens=cu_seqlens)
    _close(o2, o1, tol, f"{what} output")
    for i, (a, b) in enumerate(zip(f2, f1)):
        _close(a, b, tol, f"{what} final state {i}")
    if grads:
        for n in g1:
            if g1[n] is None:
                assert g2[n] is None or float(g2[n].abs().max()) == 0.0, f"{what} grad {n}"
                continue
            assert g2[n] is not None, f"{what}: chunk gives no gradient for {n}"
            _close(g2[n], g1[n], tol, f"{what} grad {n}")


def _init(rule, N, H, d_k, d_v, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    if rule.is_exact:
        Gm = torch.randn(N, H, d_v, d_k, generator=g, dtype=dtype)
        X = torch.randn(N, H, d_k, d_k, generator=g, dtype=dtype)
        return (Gm, X @ X.transpose(-1, -2) / d_k)
    return torch.randn(N, H, d_v, d_k, generator=g, dtype=dtype) * 0.5


CHUNKABLE = list(cat.ENTRIES)   # RLS too: a torch gain loop, then S's scan by the chunk engines
# rules whose decay is read raw: a gradient to it runs the token loops (chunk.py, _raw_decay_grads); in log
# space ("name:log", what the layers run) the same rule takes the chunked engines' decay gradients
RAW_DECAY = [n for n in cat.ENTRIES if any(s.domain == "decay" for s in cat.ENTRIES[n].rule.inputs.values())
             and not cat.ENTRIES[n].rule.is_rls]


def _rule(name):
    base, _, log = name.partition(":")
    rule = cat.ENTRIES[base].rule
    return rule.with_log_decays() if log else rule


# --------------------------------------------------------------------------------------------
# catalogue

@pytest.mark.parametrize("name", CHUNKABLE + [n + ":log" for n in RAW_DECAY])
def test_catalogue_fp32_with_grads(name):
    rule = _rule(name)
    B, T, H, d_k, d_v = 2, 37, 2, 6, 5        # T not a multiple of the chunk size
    inp = cat.random_inputs(rule, B, T, H, d_k, d_v, seed=0)
    _compare(rule, inp, tol=TOL32, chunk_size=8, what=name)
    _compare(rule, inp, tol=TOL32, init=_init(rule, B, H, d_k, d_v, torch.float32), chunk_size=16,
             what=name + " +initial_state")


@pytest.mark.parametrize("name", CHUNKABLE + [n + ":log" for n in RAW_DECAY])
def test_catalogue_fp64(name):
    rule = _rule(name)
    B, T, H, d_k, d_v = 1, 23, 2, 4, 3
    inp = cat.random_inputs(rule, B, T, H, d_k, d_v, seed=1, dtype=torch.float64)
    for C in (1, 5, 64):
        _compare(rule, inp, tol=TOL64, init=_init(rule, B, H, d_k, d_v, torch.float64), chunk_size=C,
                 grads=(C == 5), what=f"{name} C={C}")


@pytest.mark.parametrize("name", ["deltanet", "gla:log", "retnet", "longhorn", "rls", "decayed_least_squares"])
def test_state_math_stays_fp32_under_autocast(name):
    # under torch.autocast(bf16) the chunk backend's matmuls ran in bf16: DeltaNet's o and final state were 6e-3 off
    # (relative norm) at T = 256 while the reference stayed at 2e-7. scan now turns autocast off around the backends:
    # o and S to fp32 accuracy against the fp64 reference (measured <= 3.2e-6, RLS; 2e-5 allowed), and the
    # gradients equal those of the same call without autocast (1e-6 relative)
    rule = _rule(name)
    inp = cat.random_inputs(rule, 1, 256, 2, 32, 32, seed=1)
    ref, S_ref = rule.scan(**{n: x.double() for n, x in inp.items()}, backend="reference", output_final_state=True)
    grads = []
    for autocast in (True, False):
        x = {n: t.clone().requires_grad_() for n, t in inp.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o, S = rule.scan(**x, backend="chunk", output_final_state=True)
        o.float().sum().backward()
        grads.append({n: t.grad for n, t in x.items()})
        if autocast:
            S, S_r = (S[0], S_ref[0]) if rule.is_exact else (S, S_ref)
            for what, a, b in (("o", o, ref), ("S", S, S_r)):
                rel = ((a.double() - b).norm() / b.norm()).item()
                assert rel < 2e-5, f"{name} {what} under autocast: relative error {rel:.2e}"
    for n in grads[0]:
        err = (grads[0][n] - grads[1][n]).abs().max() / grads[1][n].abs().max().clamp_min(1e-30)
        assert err < 1e-6, f"{name} d{n}: autocast changed the gradient by {err:.2e} relative"


def _signed_decay_rules():
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    real = olssm.derive(O.Objective(O.sqnorm(S - O.scalar("a") * Sp) / 2 - O.inner(S @ k, v)))
    minus_exp = olssm.derive(O.Objective(O.sqnorm(S + sympy.exp(O.scalar("a", domain="log_decay")) * Sp) / 2
                                         - O.inner(S @ k, v)))
    with pytest.warns(O.UnknownSignWarning, match="forgetting factor"):   # a negative γ: no minimum for large keys
        exact = olssm.derive(O.Objective(O.sqnorm(S @ k - v, weight=O.scalar("beta", positive=True)) / 2,
                                         update="exact", decay=O.scalar("a"), ridge=O.parameter("lam", positive=True)))
    return {"real a": (real, -0.5), "-exp(a)": (minus_exp, -0.1), "exact, real a": (exact, -0.5)}


@pytest.mark.parametrize("name", ["real a", "-exp(a)", "exact, real a"])
def test_decays_that_can_be_negative_run_the_loops(name):
    # a decay its inputs' domains do not make >= 0 has no real log: the chunked forms had clamped a = -0.5 to
    # e^-87 (o off by 1.3; exact with grads, which took the loops), and read log(-e^a) = a + iπ as a (o off by 7);
    # an exact rule's first fix raised a self-contradictory domain error. Now they take the token loops: o, final
    # state and every gradient against the reference (fp64, 1e-12)
    rule, value = _signed_decay_rules()[name]
    from olssm.derive.rule import closed_form_log, decay_may_be_negative
    assert decay_may_be_negative(rule.form.decay) and closed_form_log(rule.form.decay) is None
    inp = cat.random_inputs(rule, 1, 9, 2, 3, 2, seed=0, dtype=torch.float64)
    inp["a"] = torch.full_like(inp["a"], value)
    for grads in (False, True):
        _compare(rule, inp, tol=TOL64, chunk_size=4, grads=grads, what=f"{name} grads={grads}")


def test_a_decay_input_outside_its_domain_is_an_error():
    # RetNet's γ is declared a decay, in (0, 1]: γ = -0.5 came out of the chunk backend silently wrong (o off by
    # 1.2 against the reference), since the chunked form takes log γ
    rule = cat.rule("retnet")
    inp = cat.random_inputs(rule, 1, 8, 2, 3, 2, dtype=torch.float64)
    inp["gamma"] = torch.tensor([-0.5, 0.9], dtype=torch.float64)
    with pytest.raises(ValueError, match="'gamma' \\(parameter, domain 'decay'\\)"):
        rule.scan(**inp, backend="chunk")


@pytest.mark.parametrize("name", CHUNKABLE)
def test_state_round_trip(name):
    """scan(a + b) == scan(b, initial_state=final(a))."""
    rule = cat.ENTRIES[name].rule
    inp = cat.random_inputs(rule, 2, 40, 2, 4, 3, seed=2)
    toks = {n for n in inp if not rule.inputs[n].is_parameter}
    cut = lambda s: {n: (x[:, s] if n in toks else x) for n, x in inp.items()}
    o, f = scan(rule, backend="chunk", output_final_state=True, chunk_size=8, **inp)
    oa, fa = scan(rule, backend="chunk", output_final_state=True, chunk_size=8, **cut(slice(0, 13)))
    ob, fb = scan(rule, backend="chunk", output_final_state=True, chunk_size=8, initial_state=fa,
                  **cut(slice(13, 40)))
    _close(torch.cat([oa, ob], 1), o, TOL32, f"{name} round trip output")
    for a, b in zip(_states(fb, rule.is_exact), _states(f, rule.is_exact)):
        _close(a, b, TOL32, f"{name} round trip state")


@pytest.mark.parametrize("name", ["gated_deltanet", "longhorn", "mamba", "gla", "decayed_least_squares", "rls"])
def test_varlen_equals_separate(name):
    rule = cat.ENTRIES[name].rule
    lens = [5, 17, 0, 9]
    cu = torch.tensor([0, 5, 22, 22, 31])
    inp = cat.random_inputs(rule, 1, 31, 2, 4, 3, seed=3)
    init = _init(rule, len(lens), 2, 4, 3, torch.float32)
    o, f = scan(rule, backend="chunk", output_final_state=True, chunk_size=4, cu_seqlens=cu,
                initial_state=init, **inp)
    toks = {n for n in inp if not rule.inputs[n].is_parameter}
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {n: (x[:, s:e] if n in toks else x) for n, x in inp.items()}
        st0 = tuple(x[i:i + 1] for x in init) if rule.is_exact else init[i:i + 1]
        if e > s:
            oi, fi = scan(rule, backend="chunk", output_final_state=True, chunk_size=4, initial_state=st0, **part)
            _close(o[:, s:e], oi, TOL32, f"{name} varlen seq {i}")
        else:
            fi = st0
        for a, b in zip(_states(f, rule.is_exact), _states(fi, rule.is_exact)):
            _close(a[i:i + 1], b, TOL32, f"{name} varlen state {i}")
    # and against the reference, gradients included
    _compare(rule, inp, tol=TOL32, init=init, chunk_size=4, cu_seqlens=cu, what=f"{name} varlen")


# --------------------------------------------------------------------------------------------
# long sequences with strong decays

def _strong(rule, T, seed, d=4):
    inp = cat.random_inputs(rule, 1, T, 1, d, d, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    for n, s in rule.inputs.items():
        if s.domain == "decay" and not s.is_parameter:
            x = torch.rand(inp[n].shape, generator=g, dtype=torch.float64)
            x = torch.where(x < 0.5, x * 1e-3, x)              # half the decays strong (<= 5e-4)
            x = torch.where(torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.02, 0.0, x)  # resets
            inp[n] = x
        if s.domain == "timestep" and not s.is_parameter:
            inp[n] = inp[n] * 50                                # exp(dt A) down to ~e^-100
    return inp


@pytest.mark.parametrize("name", ["gla", "mamba2", "gated_deltanet", "mamba", "retnet"])
def test_long_strong_decay(name):
    rule = cat.ENTRIES[name].rule
    T = 4096
    inp64 = _strong(rule, T, seed=7)
    if name == "retnet":
        inp64["gamma"] = torch.tensor([1e-3], dtype=torch.float64)
    o_ref, f_ref = scan(rule, backend="reference", output_final_state=True, **inp64)
    inp32 = {n: x.float() for n, x in inp64.items()}
    o, f = scan(rule, backend="chunk", output_final_state=True, chunk_size=64, **inp32)
    assert torch.isfinite(o).all() and torch.isfinite(f).all()
    _close(o.double(), o_ref, 1e-4, f"{name} long output")
    _close(f.double(), f_ref, 1e-4, f"{name} long final state")


def test_column_decay_both_paths():
    """GLA with its gate in log space: the factorised intra-chunk form (mild decays) and the pairwise one
    (strong) agree with the reference, every gradient included."""
    rule = cat.ENTRIES["gla"].rule.with_log_decays()
    mild = cat.random_inputs(rule, 1, 50, 2, 4, 3, seed=4, dtype=torch.float64)
    strong = dict(mild, g=mild["g"] * 400)                       # chunk total log decay far below -30
    for inp in (mild, strong):
        o1, f1, g1 = _run(rule, inp, "reference", grad_seed=1)
        o2, f2, g2 = _run(rule, inp, "chunk", chunk_size=16, grad_seed=1)
        _close(o2, o1, TOL64, "gla output")
        _close(f2[0], f1[0], TOL64, "gla state")
        for n in g1:
            _close(g2[n], g1[n], TOL64, f"gla grad {n}")


def _rls_by_solve(x, d_k, d_v):
    """RLS from its definition: A_t = γ A_{t-1} + k kᵀ (A_0 = λ I), G_t = γ G_{t-1} + v kᵀ, S_t = G_t A_t⁻¹ — one
    solve per token, no Riccati recursion (B = H = 1)."""
    A = x["lam"][0] * torch.eye(d_k, dtype=torch.float64)
    G = torch.zeros(d_v, d_k, dtype=torch.float64)
    outs = []
    for t in range(x["k"].shape[1]):
        g, k, v = x["gamma"][0, t, 0], x["k"][0, t, 0], x["v"][0, t, 0]
        A, G = g * A + torch.outer(k, k), g * G + torch.outer(v, k)
        S = torch.linalg.solve(A.T, G.T).T
        outs.append(S @ x["q"][0, t, 0])
    return torch.stack(outs)[None, :, None], S


@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_rls_long_sequence_stays_accurate(backend):
    """RLS over 512 tokens with γ ∈ [0.8, 1] against one solve per token (fp64, o, S_T and every gradient to
    1e-9). The covariance-form Riccati step let P's antisymmetric rounding grow like Π 1/γ (|P_T| 3e8 against
    0.29 on the chunk backend; wrong gradients on both, the reference's autograd included): P and its adjoint
    are now kept symmetric."""
    rule = cat.ENTRIES["rls"].rule
    inp = cat.random_inputs(rule, 1, 512, 1, 3, 2, seed=0, dtype=torch.float64)
    x = {n: t.clone().requires_grad_() for n, t in inp.items()}
    o_true, S_true = _rls_by_solve(x, 3, 2)
    g_true = torch.autograd.grad(o_true.sum() + S_true.sum(), list(x.values()))
    y = {n: t.clone().requires_grad_() for n, t in inp.items()}
    o, (S, P) = scan(rule, backend=backend, output_final_state=True, **y)
    g = torch.autograd.grad(o.sum() + S.sum(), list(y.values()))
    _close(o, o_true, 1e-9, "o")
    _close(S[0, 0], S_true, 1e-9, "S_T")
    assert torch.equal(P, P.mT)
    for n, a, b in zip(y, g, g_true):
        _close(a, b, 1e-9, f"d{n}")


def test_constant_zero_decay():
    """λ‖S‖²/2 − ⟨S k, v⟩ derives S_t = v kᵀ/λ: the decay is the constant 0 (nothing carried over). Its log
    is the floor, not log 0 = NaN (the chunk backend returned NaN everywhere)."""
    S, _ = O.states()
    obj = O.Objective(O.scalar("lam", positive=True) * O.sqnorm(S) / 2 - O.inner(S @ O.key("k"), O.value("v")))
    rule = olssm.derive(obj)
    assert sympy.sympify(rule.form.decay) == 0
    inp = cat.random_inputs(rule, 2, 21, 2, 4, 3, seed=5)
    _compare(rule, inp, tol=TOL32, init=_init(rule, 2, 2, 4, 3, torch.float32), chunk_size=8, what="zero decay")


def test_which_decays_take_the_token_loops(monkeypatch):
    """A per-token raw gate that needs a gradient runs the recurrent engine; in log space, without a gradient,
    or as a learned per-head parameter (RetNet's γ) it keeps the chunked engine."""
    from olssm.kernels import chunk as chunk_mod
    calls = []
    real = chunk_mod.recurrent_scan
    monkeypatch.setattr(chunk_mod, "recurrent_scan", lambda *a, **k: calls.append(1) or real(*a, **k))

    def runs_loop(rule, grad):
        calls.clear()
        inp = {n: x.requires_grad_(grad) for n, x in cat.random_inputs(rule, 1, 20, 2, 4, 3, seed=1).items()}
        o, _ = scan(rule, backend="chunk", chunk_size=8, **inp)
        if grad:
            o.sum().backward()
        return bool(calls)

    gla = cat.ENTRIES["gla"].rule
    assert runs_loop(gla, grad=True)
    assert not runs_loop(gla, grad=False)
    assert not runs_loop(gla.with_log_decays(), grad=True)
    retnet = cat.ENTRIES["retnet"].rule
    assert not runs_loop(retnet, grad=True)
    # a learned decay parameter with a tiny or zero value takes the loops, and its gradient is the reference's
    inp = cat.random_inputs(retnet, 1, 20, 2, 4, 3, seed=1)
    for gamma in (0.0, 1e-30):
        calls.clear()
        _compare(retnet, dict(inp, gamma=torch.tensor([gamma, 0.9])), tol=TOL32, chunk_size=8, what=f"γ = {gamma}")
        assert calls


@pytest.mark.parametrize("name,gate", [("gla", "g"), ("gated_deltanet", "alpha"), ("decayed_least_squares", "gamma")])
def test_raw_decay_gradients_at_tiny_and_zero_decays(name, gate):
    """A raw decay of 1e-6, 1e-10 or exactly 0 (a reset) at one token: the gradient to it equals the
    reference's (fp32, 1e-5 of the largest). Through log Λ it would not: ∂L/∂Λ = ∂L/∂log Λ / Λ made
    ~ε/Λ errors (GLA at 1e-10: 7e3 against 1.45) and a zero decay got no gradient."""
    rule = cat.ENTRIES[name].rule
    inp = cat.random_inputs(rule, 1, 24, 2, 3, 2, seed=1)
    for value in (1e-6, 1e-10, 0.0):
        inp[gate][:, 5] = value
        inp[gate][:, 17] = value
        o1, f1, g1 = _run(rule, inp, "reference", grad_seed=3)
        o2, f2, g2 = _run(rule, inp, "chunk", chunk_size=8, grad_seed=3)
        _close(o2, o1, 1e-5, f"{name} output")
        for n in g1:
            _close(g2[n], g1[n], 1e-5, f"{name} grad {n} at decay {value}")


@pytest.mark.parametrize("name", ["mamba2", "mamba", "longhorn_diag"])
def test_strong_exp_decay_grads_fp32(name):
    """Decays written as exp(x) are taken to log space symbolically: fp32 gradients stay accurate even
    when the decays reach e^-100 (checked against the fp64 reference)."""
    rule = cat.ENTRIES[name].rule
    inp64 = _strong(rule, 300, seed=11)
    o1, f1, g1 = _run(rule, inp64, "reference", grad_seed=2)
    o2, f2, g2 = _run(rule, {n: x.float() for n, x in inp64.items()}, "chunk", chunk_size=32, grad_seed=2)
    _close(o2.double(), o1, 1e-4, f"{name} output")
    for n in g1:
        _close(g2[n].double(), g1[n], 1e-3, f"{name} grad {n}")


# --------------------------------------------------------------------------------------------
# hypothesis: objectives no catalogue entry names

def _decay(kind):
    return {"none": None, "scalar": O.scalar("a", domain="decay"), "row": O.row("ar", domain="decay"),
            "column": O.column("g", domain="decay"),
            "elementwise": sympy.exp(O.row("dt", domain="timestep") * O.parameter("A", "matrix", domain="negative"))
            }[kind]


def _objective(mode, dkind, terms):
    S, Sp = O.states()
    keys, vals = [O.key("k"), O.key("k2")], [O.value("v"), O.value("v2")]
    loss = None
    for i, (typ, wk) in enumerate(terms):
        w = {"none": None, "scalar": O.scalar(f"b{i}", domain="unit"), "row": O.row(f"br{i}", domain="unit")}[wk]
        t = O.sqnorm(S @ keys[i] - vals[i], weight=w) / 2 if typ == "sq" else -O.inner(S @ keys[i], vals[i])
        loss = t if loss is None else loss + t
    d = _decay(dkind)
    if mode == "implicit":
        prox = (O.sqnorm(S - Sp) / 2 if d is None else O.sqnorm(S - Sp @ O.diag(d)) / 2 if dkind == "column"
                else O.sqnorm(S - d * Sp) / 2)
        return O.Objective(prox + loss)
    if mode == "explicit":
        return O.Objective(loss, update="explicit", decay=d)
    return O.Objective(loss, update="exact", decay=d, ridge=O.parameter("lam", "scalar", domain="positive"))


_term = st.tuples(st.sampled_from(["sq", "inner"]), st.sampled_from(["none", "scalar", "row"]))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(mode=st.sampled_from(["implicit", "explicit", "exact"]),
       dkind=st.sampled_from(["none", "scalar", "row", "column", "elementwise"]),
       terms=st.lists(_term, min_size=1, max_size=2),
       T=st.integers(1, 30), chunk=st.sampled_from([1, 3, 8, 16]), d_k=st.integers(1, 5), d_v=st.integers(1, 4),
       with_init=st.booleans(), seed=st.integers(0, 1000))
def test_custom_objectives(mode, dkind, terms, T, chunk, d_k, d_v, with_init, seed):
    terms = [(t, "none" if t == "inner" else w) for t, w in terms]
    try:
        rule = olssm.derive(_objective(mode, dkind, terms))
    except DerivationError:
        assume(False)
    B, H = 2, 2
    inp = cat.random_inputs(rule, B, T, H, d_k, d_v, seed=seed)
    init = _init(rule, B, H, d_k, d_v, torch.float32, seed) if with_init else None
    _compare(rule, inp, tol=TOL32, init=init, chunk_size=chunk, what=f"{mode} {dkind} {terms}")


@pytest.mark.parametrize("name", list(cat.DERIVED))
def test_derived_rules_default_chunk(name):
    # rank-R rules run chunks of chunk_size // R tokens (here 64 → 32): T = 75 spans three of them; a row decay
    # with a row c runs the CPU recurrent engine
    rule = cat.rule(name)
    inp = cat.random_inputs(rule, 2, 75, 2, 6, 5, seed=8)
    _compare(rule, inp, tol=TOL32, init=_init(rule, 2, 2, 6, 5, torch.float32), chunk_size=64, what=name)


def _elementwise_objectives():
    S, Sp = O.states()
    k, v, k2, v2 = O.key("k"), O.value("v"), O.key("k2"), O.value("v2")
    A = O.parameter("A", "matrix", domain="negative")
    dt = O.row("dt", domain="timestep")
    return {
        "elementwise decay, elementwise input": O.Objective(O.sqnorm(S - sympy.exp(dt * A) * Sp) / 2
                                                            - O.inner(S, A * dt * v * k)),
        "no decay, elementwise input": O.Objective(O.sqnorm(S - Sp) / 2 - O.inner(S, A * v * k)),
        "elementwise decay, two inputs": O.Objective(O.sqnorm(S - sympy.exp(dt * A) * Sp) / 2
                                                     - O.inner(S @ k, v) - O.inner(S @ k2, dt * v2)),
    }


@pytest.mark.parametrize("which", list(_elementwise_objectives()))
def test_loop_engine_objectives(which):
    """Elementwise decays / input coefficients without corrections (the loop engine)."""
    rule = olssm.derive(_elementwise_objectives()[which])
    inp = cat.random_inputs(rule, 2, 29, 2, 4, 3, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChunkFallbackWarning)      # must not fall back
        scan(rule, backend="chunk", chunk_size=8, **inp)
    _compare(rule, inp, tol=TOL32, init=_init(rule, 2, 2, 4, 3, torch.float32), chunk_size=8, what=which)


# --------------------------------------------------------------------------------------------
# fallback and arguments

def test_fallback_warns_and_matches_reference():
    rule = olssm.derive(_objective("implicit", "elementwise", [("sq", "scalar")]))
    inp = cat.random_inputs(rule, 1, 9, 2, 3, 3, seed=0)
    with pytest.warns(ChunkFallbackWarning, match="elementwise decay together with low-rank corrections"):
        o, _ = scan(rule, backend="chunk", **inp)
    o_ref, _ = scan(rule, backend="reference", **inp)
    _close(o, o_ref, 1e-6, "fallback")


def test_bad_chunk_size():
    # refused by every backend (scan checks it before dispatch), a bool too (True would be chunks of 1); None is
    # the backend's default (chunk.CHUNK_SIZE here: o equal to an explicit 64)
    rule = cat.ENTRIES["deltanet"].rule
    inp = cat.random_inputs(rule, 1, 4, 1, 3, 3)
    for backend in ("chunk", "reference"):
        for bad in (0, -8, True, 2.5, "64"):
            with pytest.raises(ValueError, match="chunk_size"):
                scan(rule, backend=backend, chunk_size=bad, **inp)
    inp = cat.random_inputs(rule, 1, 150, 1, 3, 3)
    o, _ = scan(rule, backend="chunk", **inp)
    assert torch.equal(o, scan(rule, backend="chunk", chunk_size=64, **inp)[0])
    assert not torch.equal(o, scan(rule, backend="chunk", chunk_size=16, **inp)[0])   # the size is used


def test_bf16_inputs_fp32_state():
    rule = cat.ENTRIES["gated_deltanet"].rule
    inp = cat.random_inputs(rule, 1, 20, 2, 8, 8, seed=1)
    o32, f32 = scan(rule, backend="reference", output_final_state=True, **inp)
    o, f = scan(rule, backend="chunk", output_final_state=True, chunk_size=8,
                **{n: x.bfloat16() for n, x in inp.items()})
    assert o.dtype == torch.bfloat16 and f.dtype == torch.float32
    _close(o.float(), o32, 5e-2, "bf16")


def test_loop_engine_three_passes_equal_one_pass():
    """On a CPU the elementwise-decay engine runs one pass over T; the chunk-parallel three-pass form
    (used on other devices) must give the same outputs, final state and gradients (fp64, 1e-10)."""
    from olssm.kernels.chunk import _loop_engine
    g = torch.Generator().manual_seed(3)
    B, T, H, V, K = 2, 11, 2, 3, 4
    decay = torch.rand(B, T, H, V, K, generator=g, dtype=torch.float64).requires_grad_()
    e = torch.randn(B, T, H, V, 1, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(B, T, H, 1, K, generator=g, dtype=torch.float64)
    q = torch.randn(B, T, H, 1, K, generator=g, dtype=torch.float64)
    S0 = torch.randn(B, H, V, K, generator=g, dtype=torch.float64)
    outs = []
    for C in (T, 4):
        o, S = _loop_engine(decay, [(e, w)], q, S0, C)
        grads = torch.autograd.grad((o.sin().sum() + S.cos().sum()), (decay, e))
        outs.append((o, S, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["mamba", "longhorn_diag", "longhorn"])
def test_cpu_recurrent_engine_across_blocks(name, monkeypatch):
    """On a CPU these rules run the token loop with a hand-written adjoint (recurrent.py), which
    checkpoints and evaluates coefficients a block of tokens at a time; with blocks of 3 tokens,
    sequences of 11 span several blocks: outputs, final states and every gradient must still equal the
    reference (fp64, 1e-9), with and without packed sequences."""
    import olssm.kernels.chunk as chunk_mod
    monkeypatch.setattr(chunk_mod, "RECURRENT_BLOCK", 3)
    rule = cat.ENTRIES[name].rule
    inp = {n: x.double() for n, x in cat.random_inputs(rule, 2, 11, 2, 4, 3, seed=7).items()}
    _compare(rule, inp, tol=1e-9, init=_init(rule, 2, 2, 4, 3, torch.float64), what=f"{name} blocks")
    packed = {n: (x if rule.inputs[n].is_parameter else x[:1]) for n, x in inp.items()}
    _compare(rule, packed, tol=1e-9, cu_seqlens=torch.tensor([0, 4, 5, 11]), what=f"{name} blocks varlen")


def _row_decay_delta_rule():
    """A delta rule with a row decay (per value row) and a scalar c: the other per-row structure."""
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    r = O.row("r", domain="decay")
    return olssm.derive(O.Objective(O.sqnorm(S - O.diag(r) @ Sp) / 2
                                    + O.sqnorm(S @ k - v, weight=O.scalar("beta", positive=True)) / 2))


@pytest.mark.parametrize("name", ["longhorn", "row_decay_delta:log"])
def test_per_row_linear_engine_on_cpu(name, monkeypatch):
    """Corrections whose transition differs per value row (Longhorn's row c; a row decay) run the linear engine's
    per-row mode (one UT inverse per value row and chunk, the s_0 product applied in the chunk pass) on every device
    but a CPU, where CPU_ROW_ENGINE = "recurrent" sends them to the token loop. Forced here on the CPU: outputs,
    final state and every gradient against the reference (fp64, 1e-9), T = 29 over chunks of 8 (the per-row cap)
    with a partial last chunk, and packed sequences. The row decay in log space (a raw one with a gradient takes the
    token loops on every device)."""
    import olssm.kernels.chunk as chunk_mod
    monkeypatch.setattr(chunk_mod, "CPU_ROW_ENGINE", "chunk")
    used = []
    real = chunk_mod._linear_engine
    monkeypatch.setattr(chunk_mod, "_linear_engine", lambda *a, **k: used.append(1) or real(*a, **k))
    base, log = name.split(":")[0], name.endswith(":log")
    rule = _row_decay_delta_rule() if base == "row_decay_delta" else cat.ENTRIES[base].rule
    rule = rule.with_log_decays() if log else rule
    inp = {n: x.double() for n, x in cat.random_inputs(rule, 2, 29, 2, 4, 3, seed=7).items()}
    _compare(rule, inp, tol=1e-9, init=_init(rule, 2, 2, 4, 3, torch.float64), chunk_size=64, what=f"{name} per-row")
    packed = {n: (x if rule.inputs[n].is_parameter else x[:1]) for n, x in inp.items()}
    _compare(rule, packed, tol=1e-9, chunk_size=64, cu_seqlens=torch.tensor([0, 4, 5, 29]), what=f"{name} varlen")
    assert used


@pytest.mark.parametrize("decay", [False, True])
def test_exact_engine_chunked_h_equals_token_loop(decay):
    """Exact rules: on a CPU the chunk backend forms H_t and x_t = (H_t + diag λ)⁻¹ q_t token by token
    (faster there); other devices use chunked prefix sums of H (CHUNK.md §4). Both forms must give the
    same o, final (G, H) and gradients (fp64, 1e-10), with T = 37 across chunks of 8 / H-chunks of 16."""
    from olssm.kernels.chunk import Gram, _exact_engine
    g = torch.Generator().manual_seed(11)
    B, T, H, K, V = 2, 37, 2, 4, 3
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    # H's update in factors, X_t = R u wᵀ + diag δ with u ≠ w (a non-symmetric H: A⁻ᵀ in the loop's adjoint)
    leaves = dict(R=(r(B, T, H, 1, 1).abs() + 0.1).requires_grad_(), u=r(B, T, H, 1, K).requires_grad_(),
                  uw=r(B, T, H, 1, K).requires_grad_(), delta=(r(1, 1, H, 1, K).abs() + 0.2).requires_grad_(),
                  ridge=(r(1, 1, H, 1, K).abs() + 0.5).requires_grad_(),
                  q=r(B, T, H, 1, K).requires_grad_(), e=r(B, T, H, V, 1).requires_grad_(),
                  w=r(B, T, H, 1, K).requires_grad_(),
                  logd=(-torch.rand(B, T, H, 1, 1, generator=g, dtype=torch.float64)).requires_grad_())
    S0 = (r(B, H, V, K), (torch.eye(K, dtype=torch.float64) * 3).expand(B, H, K, K).clone())
    full = lambda x: torch.broadcast_to(x, (B, T, H, *x.shape[-2:]))
    X = Gram([(leaves["R"], leaves["u"], leaves["uw"])], full(leaves["delta"]))
    outs = []
    for h_loop in (False, True):
        o, (G, Hf) = _exact_engine(leaves["logd"] if decay else None, X, leaves["ridge"],
                                   [(leaves["e"], leaves["w"])], leaves["q"], S0, 8, h_loop=h_loop)
        names = [n for n in leaves if decay or n != "logd"]
        grads = torch.autograd.grad(o.sin().sum() + G.cos().sum() + Hf.square().sum(), [leaves[n] for n in names])
        outs.append((o, G, Hf, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m", [5, 16, 64])
def test_unit_lower_inverse_adjoint(m):
    # the UT inverse's written-out adjoint ∂N = −tril₋₁(Tᵀ ∂T Tᵀ) against finite differences (gradcheck, fp64, first
    # and second derivatives, m ≤ 16) and against autograd through the block recursion it replaced (to 1e-12, every
    # m); only N's strict lower triangle is read, so the rest gets no gradient. m = 5: the recursion's padding to 8.
    from olssm.kernels.chunk import _block_unit_lower_inverse, _unit_lower_inverse
    N = 0.3 * torch.randn(3, m, m, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    if m <= 16:   # finite differences over every entry: 2 minutes at m = 64
        assert torch.autograd.gradcheck(_unit_lower_inverse, (N[:1].clone().requires_grad_(),))
        assert torch.autograd.gradgradcheck(_unit_lower_inverse, (N[:1].clone().requires_grad_(),))
    inv = _unit_lower_inverse(N)
    assert torch.allclose(inv @ (torch.eye(m, dtype=N.dtype) + N.tril(-1)), torch.eye(m, dtype=N.dtype), atol=1e-12)
    a, b = N.clone().requires_grad_(), N.clone().requires_grad_()
    w = torch.randn(3, m, m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (_unit_lower_inverse(a) * w).sum().backward()
    (_block_unit_lower_inverse(b) * w).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-12) and not a.grad.triu().any()


def test_scan_benchmark_rounds_keep_each_cells_best_time_and_largest_memory(monkeypatch, capsys):
    # benchmarks/scan.py --rounds: the reference's and the chunk backend's cells measured in turn, several times, each
    # cell's best time and largest memory kept (a drifting machine then drifts under both sides of a ratio). The
    # measurements are stubbed: round 1 is slow for the reference, round 2 for the chunk backend
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "scan.py"
    spec = importlib.util.spec_from_file_location("olssm_benchmark_scan", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    table = {("reference", False): [(0.9, 10.0), (0.3, 30.0)], ("reference", True): [(2.0, 50.0), (1.0, 40.0)],
             ("chunk", False): [(0.1, 5.0), (0.2, 4.0)], ("chunk", True): [(0.25, 8.0), (0.5, 9.0)]}

    def measure(name, B, T, H, d, backend, chunk, bwd, repeat, threads):
        calls.append((backend, bwd))
        return table[backend, bwd][sum(c == (backend, bwd) for c in calls) - 1]

    monkeypatch.setattr(bench, "measure", measure)
    bench.main(["--T", "64", "--rules", "deltanet", "--rounds", "2", "--repeat", "1"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| DeltaNet")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["0.300", "0.100", "3.0", "1.000", "0.250", "4.0", "50", "9"], cells
    # in turn: both backends in round 1 before either in round 2
    assert calls == [("reference", False), ("reference", True), ("chunk", False), ("chunk", True)] * 2


# --------------------------------------------------------------------------------------------
# torch.compile

def test_torch_compile_leaves_the_exact_token_loop_untraced():
    # an exact rule's CPU token loop (recurrent.exact_x_loop) runs as it is under torch.compile (a graph break):
    # traced, dynamo unrolled it, and compiling took ~0.9 s more per token (47 s at T = 40, minutes at T = 512). What
    # dynamo captures is then the same at T = 8 and T = 24 (one chunk either way)
    rule = cat.ENTRIES["decayed_least_squares"].rule
    sizes = []
    for T in (8, 24):
        torch._dynamo.reset()
        nodes = []

        def count(gm, example_inputs):
            nodes.append(len(gm.graph.nodes))
            return gm.forward
        inp = cat.random_inputs(rule, 1, T, 2, 4, 4, seed=8)
        torch.compile(lambda x: rule.scan(backend="chunk", **x), backend=count)(inp)
        sizes.append(sum(nodes))
    torch._dynamo.reset()
    assert sizes[0] == sizes[1] > 0, sizes


@pytest.mark.parametrize("name", ["deltanet", "mamba", "rls", "decayed_least_squares"])
def test_torch_compile_matches_eager(name):
    # the chunk backend under torch.compile (aot_eager): the same o, final state and gradients as eager, for the
    # linear engine, the recurrent engine (Mamba's elementwise decay), RLS's gain scan and an exact rule. The sympy
    # behind each call (evaluators, decay facts) stays outside the trace: torch 2.11's dynamo had failed inside it
    # (InternalTorchDynamoError from sympy's Mul.flatten; session 14, reproduced on the CPU). Tolerance 1e-5 relative:
    # the same aten ops run either way, fp32
    torch._dynamo.reset()
    rule = cat.ENTRIES[name].rule
    inp = cat.random_inputs(rule, 1, 40, 2, 4, 4, seed=8)

    def fn(x):
        o, f = rule.scan(backend="chunk", output_final_state=True, **x)
        f = f[0] if isinstance(f, tuple) else f
        return o, f

    outs = []
    for f in (fn, torch.compile(fn, backend="aot_eager")):
        x = {n: t.clone().requires_grad_() for n, t in inp.items()}
        o, fin = f(x)
        g = torch.Generator().manual_seed(9)   # the same random projection of o and the final state both times
        loss = (o * torch.randn(o.shape, generator=g)).sum() + (fin * torch.randn(fin.shape, generator=g)).sum()
        outs.append([o.detach(), fin.detach(), *torch.autograd.grad(loss, list(x.values()))])
    for what, a, b in zip(["o", "final state", *inp], *outs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())), what
