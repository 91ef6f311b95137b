"""backend="triton" vs the reference backend: forward, every gradient, varlen, dtypes, errors.

Runs the generated kernels under the Triton CPU interpreter (TRITON_INTERPRET=1, set before
triton is imported), so shapes are tiny. On a GPU run the same file with
`OLSSM_TRITON_DEVICE=cuda pytest tests/test_triton.py` (see olssm/kernels/TRITON.md).

Tolerances: fp32 inputs: max|triton - reference| <= 1e-5 * max|reference| (plus 1e-6 absolute)
for o, the final state and every gradient; bf16/fp16 inputs vs the fp32 reference on the same
(rounded) values: 2e-2 relative for o/state, 5e-2 for gradients.
"""
import os

from triton_testing import (DEVICE as _DEVICE, close as _close, dev as _dev,  # noqa: E402  (sets TRITON_INTERPRET first)
                            elementwise_row_csum_rule, separate_sequences_match, split_scan_matches)

import pytest  # noqa: E402
import sympy as sp  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import olssm  # noqa: E402
from olssm import objectives as O  # noqa: E402
from strategies import objectives  # noqa: E402
from olssm.catalogue import ENTRIES, random_inputs  # noqa: E402
from olssm.kernels.triton import TritonPrinter  # noqa: E402
from olssm.kernels.triton import scan as tscan  # noqa: E402
from olssm.kernels.rls import RLSConditioningWarning  # noqa: E402

NORMAL = [n for n, e in ENTRIES.items() if not e.rule.is_exact]
EXACT = [n for n, e in ENTRIES.items() if e.rule.is_exact]
FP32_RTOL, ABS = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # 4-token checkpoints (T=9, 13 are not multiples) and 4-row value blocks (d_v=6: 2 blocks, masked)
    monkeypatch.setattr(tscan, "CHECKPOINT", 4)
    monkeypatch.setattr(tscan, "BLOCK_V", 4)




def _run(rule, inp, h0, backend, cu_seqlens=None, seed=7, want=None):
    x = {n: _dev(t).clone().requires_grad_(want is None or n in want) for n, t in inp.items()}
    h = None if h0 is None else _dev(h0).clone().requires_grad_(want is None or "h0" in want)
    o, f = rule.scan(backend=backend, output_final_state=True, initial_state=h, cu_seqlens=cu_seqlens, **x)
    g = torch.Generator().manual_seed(seed)
    loss = (o.float() * _dev(torch.randn(o.shape, generator=g))).sum() \
        + (f * _dev(torch.randn(f.shape, generator=g))).sum()
    leaves = {n: t for n, t in x.items() if t.requires_grad}
    if h is not None and h.requires_grad:
        leaves["h0"] = h
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o, f, dict(zip(leaves, grads))


def _compare(rule, inp, h0=None, rtol=FP32_RTOL, grtol=None, cu_seqlens=None, ref_inp=None, want=None):
    grtol = rtol if grtol is None else grtol
    o1, f1, g1 = _run(rule, ref_inp or inp, h0, "reference", cu_seqlens, want=want)
    o2, f2, g2 = _run(rule, inp, h0, "triton", cu_seqlens, want=want)
    assert o2.dtype == o1.dtype if ref_inp is None else True
    assert f2.dtype == torch.float32
    _close(o2, o1, rtol, "o")
    _close(f2, f1, rtol, "final state")
    assert set(g1) == set(g2)
    for n in g1:
        assert g2[n].shape == g1[n].shape and g2[n].dtype == (inp[n].dtype if n in inp else torch.float32)
        _close(g2[n], g1[n], grtol, f"d{n}")
    return g2


# ---- the catalogue ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NORMAL)
def test_catalogue_forward_and_all_gradients(name):
    rule = ENTRIES[name].rule
    inp = random_inputs(rule, 2, 9, 2, 5, 6, seed=1)
    h0 = 0.3 * torch.randn(2, 2, 6, 5, generator=torch.Generator().manual_seed(2))
    g = _compare(rule, inp, h0)
    assert set(g) == set(rule.inputs) | {"h0"}


@pytest.mark.parametrize("name", ["gated_deltanet", "mamba", "longhorn"])
@pytest.mark.parametrize("T, d_k, d_v", [(1, 5, 3), (13, 20, 3), (6, 3, 9)])
def test_odd_shapes(name, T, d_k, d_v):
    rule = ENTRIES[name].rule
    _compare(rule, random_inputs(rule, 1, T, 2, d_k, d_v, seed=T + d_k), None)


def test_only_some_inputs_need_grad():
    rule = ENTRIES["gated_deltanet"].rule
    inp = random_inputs(rule, 1, 7, 2, 5, 6, seed=3)
    g = _compare(rule, inp, torch.zeros(1, 2, 6, 5), want={"v", "beta"})
    assert set(g) == {"v", "beta"}



@pytest.mark.parametrize("name, dtype, chunk", [("deltanet", torch.float32, 16), ("mamba2", torch.float64, 16),
                                                 ("gla", torch.float32, None), ("rls", torch.float32, None)])
def test_second_derivative_raises(name, dtype, chunk, monkeypatch):
    """The kernels' backwards are first-order only. With create_graph the first derivative had come back with a
    grad_fn that failed only at the second backward ("no autograd formula"), and with fp64 inputs torch's
    "functions with out=... arguments don't support automatic differentiation" from the scale's backward; now the
    first backward names backend='triton' (chunked and recurrent kernels, the RLS gain scan). First order unchanged.
    The chunked cases are forced there (40 tokens, 3 chunks of 16): compiled, fp32 / fp64 inputs keep the token loop."""
    from olssm.kernels.triton import library
    if chunk:
        monkeypatch.setattr(library, "FORCE", "prefer-chunk")
    rule = ENTRIES[name].rule
    inp = {n: _dev(x).to(dtype).requires_grad_() for n, x in random_inputs(rule, 1, 40, 1, 4, 4, seed=0).items()}
    for create_graph in (True, False):
        o, _ = rule.scan(backend="triton", chunk_size=chunk, **inp)
        if create_graph:
            with pytest.raises(RuntimeError, match="second derivatives .* backend='triton'; use backend='reference'"):
                torch.autograd.grad(o.square().sum(), [inp["k"]], create_graph=True)
        else:
            (g,) = torch.autograd.grad(o.square().sum(), [inp["k"]])
            assert g is not None and torch.isfinite(g).all()

def test_no_grad_forward_and_final_state_flag():
    rule = ENTRIES["longhorn"].rule
    inp = {n: _dev(x) for n, x in random_inputs(rule, 2, 5, 2, 5, 6, seed=4).items()}
    with torch.no_grad():
        o, f = rule.scan(backend="triton", **inp)
    assert f is None and o.shape == (2, 5, 2, 6)
    o_ref, _ = rule.scan(backend="reference", **inp)
    _close(o, o_ref, FP32_RTOL, "o")


def test_one_token_decode_matches_rule_step():
    from olssm.kernels.triton import triton_decode
    rule = ENTRIES["gated_deltanet"].rule
    inp = {n: _dev(x[:, 0]) for n, x in random_inputs(rule, 3, 1, 2, 5, 6, seed=12).items()}
    S0 = _dev(0.3 * torch.randn(3, 2, 6, 5, generator=torch.Generator().manual_seed(12)))
    o, S1 = triton_decode(rule, S0, **inp)
    o_ref, S1_ref = rule.decode(S0, **inp)
    _close(S1, S1_ref, FP32_RTOL, "state")
    _close(o, o_ref, FP32_RTOL, "o")


@pytest.mark.parametrize("name", ["longhorn", "mamba"])
def test_rule_decode_dispatches_to_the_kernel(name):
    """rule.decode(backend="triton") (what backend="auto" picks for CUDA states) equals the torch step."""
    rule = ENTRIES[name].rule
    raw = random_inputs(rule, 3, 1, 2, 5, 6, seed=13)
    inp = {n: _dev(x if rule.inputs[n].is_parameter else x[:, 0]) for n, x in raw.items()}
    S0 = _dev(0.3 * torch.randn(3, 2, 6, 5, generator=torch.Generator().manual_seed(13)))
    o, S1 = rule.decode(S0, backend="triton", **inp)
    o_ref, S1_ref = rule.decode(S0, backend="torch", **inp)
    _close(S1, S1_ref, FP32_RTOL, "state")
    _close(o, o_ref, FP32_RTOL, "o")
    with pytest.raises(ValueError, match="backend"):
        rule.decode(S0, backend="cuda", **inp)
    # rule.step (state only, no query needed) goes through the same kernel
    upd = {n: x for n, x in inp.items() if n in rule.update_inputs}
    _close(rule.step(S0, backend="triton", **upd), rule.step(S0, backend="torch", **upd), FP32_RTOL, "step")


# ---- state round trip and varlen ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gated_deltanet", "mamba"])
def test_initial_final_state_round_trip(name):
    rule = ENTRIES[name].rule
    split_scan_matches(rule, random_inputs(rule, 2, 10, 2, 5, 6, seed=5), 4, FP32_RTOL)


@pytest.mark.parametrize("name", ["deltanet", "longhorn_diag", "mamba2"])
def test_varlen_equals_separate_sequences(name):
    rule = ENTRIES[name].rule
    cu = [0, 3, 3, 10, 13]       # an empty sequence included
    inp = random_inputs(rule, 1, 13, 2, 5, 6, seed=6)
    h0 = 0.3 * torch.randn(4, 2, 6, 5, generator=torch.Generator().manual_seed(6))
    cu_t = _dev(torch.tensor(cu, dtype=torch.int32))
    # varlen triton == varlen reference, gradients included
    _compare(rule, inp, h0, cu_seqlens=cu_t)
    # and == each sequence scanned on its own
    separate_sequences_match(rule, inp, h0, cu)


# ---- low precision inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gated_deltanet", "mamba", "longhorn"])
def test_low_precision_inputs_vs_fp32_reference(name, dtype):
    rule = ENTRIES[name].rule
    inp = random_inputs(rule, 1, 8, 2, 5, 6, seed=8)
    low = {n: x.to(dtype) for n, x in inp.items()}
    ref = {n: x.float() for n, x in low.items()}    # same rounded values, fp32 math
    o, f = rule.scan(backend="triton", output_final_state=True, **{n: _dev(x) for n, x in low.items()})
    assert o.dtype == dtype and f.dtype == torch.float32
    _compare(rule, low, None, rtol=2e-2, grtol=5e-2, ref_inp=ref)


def test_rls_low_precision_inputs():
    # bf16 inputs: the gain and S scans run in fp32 on the rounded values, so (S, P) match the fp32
    # reference on those values to fp32 accuracy and o to its bf16 rounding (2^-8 ≈ 4e-3 relative)
    rule = ENTRIES["rls"].rule
    low = {n: x.to(torch.bfloat16) for n, x in random_inputs(rule, 1, 8, 2, 5, 6, seed=8).items()}
    o, (S, P) = rule.scan(backend="triton", output_final_state=True, **{n: _dev(x) for n, x in low.items()})
    o1, (S1, P1) = rule.scan(backend="reference", output_final_state=True, **{n: x.float() for n, x in low.items()})
    assert o.dtype == torch.bfloat16 and S.dtype == P.dtype == torch.float32
    _close(o, o1, 1e-2, "o")
    _close(S, S1, FP32_RTOL, "S")
    _close(P, P1, FP32_RTOL, "P")


def test_fp64_inputs_run_in_fp32():
    rule = ENTRIES["gla"].rule
    inp = random_inputs(rule, 1, 6, 2, 5, 6, seed=9, dtype=torch.float64)
    _compare(rule, inp, None, rtol=1e-5)


def test_non_contiguous_inputs():
    rule = ENTRIES["gated_deltanet"].rule
    inp = random_inputs(rule, 2, 6, 2, 5, 6, seed=10)
    inp["k"] = inp["k"].transpose(0, 1).contiguous().transpose(0, 1)   # non-contiguous, same values
    assert not inp["k"].is_contiguous()
    _compare(rule, inp, None)


# ---- custom objectives (hypothesis) -----------------------------------------------------------------

@settings(max_examples=int(os.environ.get("OLSSM_TRITON_EXAMPLES", 8)), deadline=None, suppress_health_check=list(HealthCheck))
@given(objectives(), st.integers(0, 3))
def test_custom_objectives_match_reference(obj, seed):
    try:
        rule = olssm.derive(obj)
    except O.DerivationError:
        return
    if rule.is_exact:
        return
    inp = random_inputs(rule, 1, 6, 1, 4, 5, seed=seed)
    _compare(rule, inp, 0.3 * torch.randn(1, 1, 5, 4, generator=torch.Generator().manual_seed(seed)))


def test_two_key_woodbury_rule():
    S, Sp = O.states()
    obj = O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ O.key("k0") - O.value("v0"), weight=O.row("b0", positive=True)) / 2
                      + O.sqnorm(S @ O.key("k1") - O.value("v1"), weight=O.scalar("b1", positive=True)) / 2)
    rule = olssm.derive(obj)
    assert rule.form.rank >= 2
    _compare(rule, random_inputs(rule, 1, 7, 2, 4, 5, seed=11), None)


def test_elementwise_generator_with_row_csum():
    # an elementwise decay whose generator holds a row-kind key sum: the in-kernel chain rule
    # must treat csum(P k²) as a row-sum node (its adjoint a [BV, 1] tile)
    rule = elementwise_row_csum_rule()
    _compare(rule, random_inputs(rule, 2, 7, 2, 5, 6, seed=3),
             0.3 * torch.randn(2, 2, 6, 5, generator=torch.Generator().manual_seed(3)))


# ---- generated source, printer, errors -------------------------------------------------------------

def test_kernel_source_prints_the_coefficients():
    src = ENTRIES["longhorn"].rule.kernel_source("triton")
    assert "@triton.jit" in src and "def fwd_kernel" in src and "def bwd_kernel" in src
    assert "tl.sum(tl.where(km2, ((in_k) * (in_k)), 0.0), axis=1, keep_dims=True)" in src  # kᵀk, printed
    assert src == ENTRIES["longhorn"].rule.kernel_source("triton")                        # deterministic
    mamba = ENTRIES["mamba"].rule.kernel_source("triton")
    assert "tl.exp(in_A*in_dt)" in mamba                          # the generator, printed into both kernels
    assert "E_lam" not in mamba and "R_dt" in mamba and "R_A" in mamba  # Λ never materialised, even in the backward
    assert os.path.isdir(tscan.cache_dir())


def test_printer():
    x, y = sp.symbols("x y", positive=True)
    p = TritonPrinter()
    assert p.doprint(sp.sqrt(x)) == "tl.sqrt(x)"
    assert p.doprint(x ** -2) == "(1.0 / ((x) * (x)))"
    assert p.doprint(sp.exp(x) + sp.log(y)) in ("tl.exp(x) + tl.log(y)", "tl.log(y) + tl.exp(x)")
    assert p.doprint(x ** sp.Rational(3, 2)) == "tl.exp(((3.0 / 2.0)) * tl.log(x))"
    assert p.doprint(O.csum(O.key("k") ** 2)) == "tl.sum(tl.where(km2, ((k) * (k)), 0.0), axis=1, keep_dims=True)"
    with pytest.raises(NotImplementedError, match="Piecewise"):
        p.doprint(sp.Piecewise((x, x > 1), (y, True)))
    # sympy's Python printer knows these as math.<name>, which a kernel cannot call: generation refuses
    for f in (sp.floor, sp.atan, sp.erf, sp.tan):
        with pytest.raises(NotImplementedError, match=f"no Triton lowering for function {f.__name__}"):
            p.doprint(1 / (1 + f(x)))


def _lowered_functions_rule():
    # step size 1/cosh(a) (cosh lowered through exp) and an elementwise decay exp(−|dt| P) whose in-kernel
    # reverse mode differentiates Abs to sign: both printed once printed as math.cosh / math.copysign, which
    # the interpreter ran wrongly (o off by 0.18, ∂dt all zero)
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    a, dt = O.scalar("a", domain="real"), O.row("dt", domain="real")
    P = O.parameter("P", "matrix", domain="positive")
    return olssm.derive(O.Objective(O.sqnorm(S - sp.exp(-sp.Abs(dt) * P) * Sp) / 2
                                    - O.inner(S @ k, v) / sp.cosh(a), name="cosh and abs"))


def test_sign_cosh_lowerings_match_reference():
    rule = _lowered_functions_rule()
    inp = random_inputs(rule, 1, 7, 2, 4, 3, seed=15)
    inp["dt"] = inp["dt"] - 0.5                     # both signs of dt
    g = _compare(rule, inp, None)
    assert float(g["dt"].abs().max()) > 0


def test_decode_errors_name_the_problem():
    rule = ENTRIES["deltanet"].rule
    inp = {n: _dev(x[:, 0]) for n, x in random_inputs(rule, 2, 1, 2, 5, 6, seed=3).items()}
    S0 = _dev(torch.zeros(2, 2, 6, 5))
    with pytest.raises(ValueError, match=r"unexpected input\(s\) \['foo'\]"):
        rule.decode(S0, backend="triton", foo=_dev(torch.ones(2, 2)), **inp)
    with pytest.raises(ValueError, match=r"state must be \[B, H, d_v, d_k\]"):
        rule.decode(S0[0], backend="triton", **{n: x[0] for n, x in inp.items()})
    # scan's checks surface in decode's terms (they had read as a scan error about T = 1)
    with pytest.raises(ValueError, match=r"decode\(backend='triton'\).*initial_state must have shape \(2, 2, 6, 5\)"):
        rule.decode(S0[:1], backend="triton", **inp)
    with pytest.raises(ValueError, match=r"decode\(backend='triton'\).*floating-point tensor, got torch.int32"):
        rule.decode(S0.int(), backend="triton", **inp)


def test_exact_rule_step_through_the_kernel():
    # rule.step(backend="triton") on an exact rule's (G, H) pair: the kernel wants a query, made from G
    rule = ENTRIES["decayed_least_squares"].rule
    raw = random_inputs(rule, 2, 1, 2, 4, 3, seed=16)
    inp = {n: _dev(x if rule.inputs[n].is_parameter else x[:, 0]) for n, x in raw.items() if n in rule.update_inputs}
    g = torch.Generator().manual_seed(16)
    A = torch.randn(2, 2, 4, 4, generator=g)
    state = (_dev(torch.randn(2, 2, 3, 4, generator=g)), _dev(A @ A.mT + torch.eye(4)))
    got = rule.step(state, backend="triton", **inp)
    want = rule.step(state, backend="torch", **inp)
    for a, b in zip(got, want):
        _close(a, b, FP32_RTOL, "state")


def test_step_through_the_kernel_requires_what_the_update_reads():
    """rule.step(backend="triton") fills a query (and an exact rule's λ) for the kernel's readout, whose output it
    drops. Where the update itself reads them (a query that weights a loss term, a λ that also weights the loss),
    a missing one had been filled with zeros / ones: a wrong state (off by 0.67 / 1.89) where the torch step raised."""
    S, Sp = O.states()
    k, v, q = O.key("k"), O.value("v"), O.query("q")
    bq = O.scalar("bq", domain="unit")
    rule = olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ q - v, weight=bq) / 2 - O.inner(S @ k, v)))
    g = torch.Generator().manual_seed(21)
    inp = dict(k=torch.randn(1, 2, 4, generator=g), v=torch.randn(1, 2, 3, generator=g),
               bq=torch.rand(1, 2, generator=g), q=torch.randn(1, 2, 4, generator=g))
    inp = {n: _dev(x) for n, x in inp.items()}
    S0 = _dev(torch.randn(1, 2, 3, 4, generator=g))
    _close(rule.step(S0, backend="triton", **inp), rule.step(S0, backend="torch", **inp), FP32_RTOL, "step")
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=r"step: missing input\(s\) \['q'\]"):
            rule.step(S0, backend=backend, **{n: x for n, x in inp.items() if n != "q"})
        with pytest.raises(ValueError, match=r"step: unexpected input\(s\) \['foo'\]"):
            rule.step(S0, backend=backend, foo=inp["bq"], **inp)
    lam, gam = O.scalar("lam", domain="positive"), O.scalar("g", domain="decay")
    exact = olssm.derive(O.Objective(O.sqnorm(S @ k - v, weight=lam) / 2, update="exact", decay=gam, ridge=lam))
    xi = dict(k=inp["k"], v=inp["v"], g=_dev(torch.rand(1, 2, generator=g)))
    pair = (S0, _dev(torch.eye(4).expand(1, 2, 4, 4).clone()))
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=r"step: missing input\(s\) \['lam'\]"):
            exact.step(pair, backend=backend, **xi)
    want = exact.step(pair, backend="torch", lam=_dev(torch.full((1, 2), 0.1)), **xi)
    for a, b in zip(exact.step(pair, backend="triton", lam=_dev(torch.full((1, 2), 0.1)), **xi), want):
        _close(a, b, FP32_RTOL, "exact state")


@pytest.mark.parametrize("name", EXACT + ["decayed_least_squares/varlen", "rls/varlen", "decayed_least_squares:log",
                                  "decayed_least_squares:log/varlen"])
def test_exact_rules_hybrid_matches_reference(name):
    # x_t = (H_t + λ)⁻¹ q_t in torch, o_t = G_t x_t through the generated kernels (RLS: the gain
    # scan kernel, then S's generated scan): o, both final states and every gradient (inputs and
    # the initial pair) equal the reference step loop. A raw γ requiring grad takes x's token loop and
    # G's scan on γ itself; ":log" (γ in log space) the chunked H and the log-γ G scan
    name, _, varlen = name.partition("/")
    name, _, log = name.partition(":")
    rule = ENTRIES[name].rule.with_log_decays() if log else ENTRIES[name].rule
    g = torch.Generator().manual_seed(3)
    B, T, H, K, V = (1, 11, 2, 5, 6) if varlen else (2, 9, 2, 5, 6)
    cu = _dev(torch.tensor([0, 4, 4, 11], dtype=torch.int32)) if varlen else None
    N = 3 if varlen else B
    A = torch.randn(N, H, K, K, generator=g)
    # (G_0, H_0) for the sufficient statistics, (S_0, P_0) for RLS: P_0 symmetric positive definite
    h0 = (0.3 * torch.randn(N, H, V, K, generator=g), 0.1 * A @ A.transpose(-1, -2) + 0.5 * torch.eye(K))
    inp = random_inputs(rule, B, T, H, K, V, seed=4)
    res = {}
    for backend in ("reference", "triton"):
        x = {n: _dev(t).clone().requires_grad_() for n, t in inp.items()}
        h = tuple(_dev(t).clone().requires_grad_() for t in h0)
        o, (G, Hs) = rule.scan(backend=backend, output_final_state=True, initial_state=h, cu_seqlens=cu, **x)
        gw = torch.Generator().manual_seed(5)
        loss = sum((t * _dev(torch.randn(t.shape, generator=gw))).sum() for t in (o, G, Hs))
        leaves = {**x, "G0": h[0], "H0": h[1]}
        # allow_unused: RLS reads its ridge λ only for P_0 = I/λ, and P_0 is given here
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        res[backend] = (o, G, Hs, dict(zip(leaves, grads)))
    (o1, G1, H1, g1), (o2, G2, H2, g2) = res["reference"], res["triton"]
    for what, a, b in (("o", o2, o1), ("G", G2, G1), ("H", H2, H1)):
        _close(a, b, FP32_RTOL, what)   # fp32 solves: measured ≤ 1.4e-6 relative (dλ), 1e-7 for o
    for n in g1:
        assert (g1[n] is None) == (g2[n] is None), f"d{n}: used by one backend only"
        if g1[n] is not None:
            _close(g2[n], g1[n], FP32_RTOL, f"d{n}")


def test_rls_gain_kernel_long_sequence():
    # 160 tokens with γ ∈ [0.8, 1]: the gain kernels keep P and dP symmetric (the antisymmetric rounding grew like
    # Π 1/γ: o was off by 1e3 relative at T = 300); o, P_T and every gradient against the reference (fp32, 1e-4:
    # measured 2e-7 / 8e-7)
    rule = ENTRIES["rls"].rule
    inp = random_inputs(rule, 1, 160, 1, 3, 2, seed=0)
    res = {}
    for backend in ("reference", "triton"):
        x = {n: _dev(t).clone().requires_grad_() for n, t in inp.items()}
        o, (S, P) = rule.scan(backend=backend, output_final_state=True, **x)
        res[backend] = (o, P, torch.autograd.grad(o.sum() + S.sum(), list(x.values())))
    (o1, P1, g1), (o2, P2, g2) = res["reference"], res["triton"]
    _close(o2, o1, 1e-4, "o")
    _close(P2, P1, 1e-4, "P_T")
    for n, a, b in zip(inp, g2, g1):
        _close(a, b, 1e-4, f"d{n}")


def test_rls_overflow_is_an_error_not_nan(monkeypatch):
    # γ = 0.05 at d_k = 16 grows P past fp32's range (test_reference_scan's case): the gain kernel's NaN from finite
    # inputs is a FloatingPointError naming a token, as on the torch backends (OLSSM_CHECK_INPUTS=1: on a GPU "auto"
    # skips the check). Unchecked, the outputs are NaN (so the case still overflows and the test can fail)
    rule = ENTRIES["rls"].rule
    inp = random_inputs(rule, 1, 130, 2, 16, 16, seed=0)
    inp["gamma"] = torch.full_like(inp["gamma"], 0.05)
    x = {n: _dev(t) for n, t in inp.items()}
    monkeypatch.setenv("OLSSM_CHECK_INPUTS", "0")
    o, _ = rule.scan(backend="triton", **x)
    assert not bool(torch.isfinite(o).all())
    monkeypatch.setenv("OLSSM_CHECK_INPUTS", "1")
    with pytest.warns(RLSConditioningWarning), pytest.raises(FloatingPointError, match=r"overflowed float32: .* t = \d+"):
        rule.scan(backend="triton", **x)


def test_exact_rule_raw_gamma_gradient_at_zero_and_tiny_gamma():
    # γ = 0 (a reset) and 1e-10 at one token: ∂γ equals the reference's (through log γ it was lost at 0 and
    # ~ε/γ off at 1e-10; CHUNK.md §1)
    rule = ENTRIES["decayed_least_squares"].rule
    inp = random_inputs(rule, 1, 9, 1, 3, 2, seed=6)
    w = torch.randn(1, 9, 1, 2, generator=torch.Generator().manual_seed(6))
    for value in (1e-10, 0.0):
        inp["gamma"][:, 4] = value
        grads = {}
        for backend in ("reference", "triton"):
            x = {n: _dev(t).clone().requires_grad_() for n, t in inp.items()}
            o, (G, Hs) = rule.scan(backend=backend, output_final_state=True, **x)
            loss = (o * _dev(w)).sum() + G.sum() + Hs.sum()
            grads[backend] = dict(zip(x, torch.autograd.grad(loss, list(x.values()))))
        for n in grads["reference"]:
            _close(grads["triton"][n], grads["reference"][n], FP32_RTOL, f"d{n} at γ = {value}")


def test_exact_and_rls_kernel_sources():
    src = ENTRIES["decayed_least_squares"].rule.kernel_source("triton")
    assert "solved in torch" in src and "olssm_x" in src
    rls = ENTRIES["rls"].rule.kernel_source("triton")
    assert "def rls_gain_fwd_kernel" in rls and "def rls_gain_bwd_kernel" in rls   # the Riccati kernels
    assert "def fwd_kernel(arg_olssm_R, arg_olssm_e, arg_olssm_g" in rls         # S's generated scan


def _weighted_rls():
    S, _ = O.states()
    k, v = O.key("k"), O.value("v")
    return olssm.derive(O.Objective(O.sqnorm(S @ k - v, weight=O.scalar("w", positive=True)) / 2, update="exact",
                                    decay=O.scalar("gamma", domain="decay"), ridge=O.parameter("lam", "scalar",
                                    domain="positive"), ridge_decays=True))


@pytest.mark.parametrize("s_kernel", ["recurrent", "prefer-chunk"])
@pytest.mark.parametrize("name", ["rls", "weighted rls"])
def test_rls_from_the_default_state(name, s_kernel, monkeypatch):
    # no initial state: P_0 = I/λ built in torch, so ∂λ flows through the gain kernel's ∂P_0; S's scan
    # on the recurrent kernel and on the chunked delta kernels (c = R, a = u, b = w = g: a ≠ b)
    from olssm.kernels.triton import library
    monkeypatch.setattr(library, "FORCE", s_kernel)
    rule = ENTRIES["rls"].rule if name == "rls" else _weighted_rls()
    B, T, H, K, V = 2, 13, 2, 5, 6
    inp = random_inputs(rule, B, T, H, K, V, seed=8)
    inp["q"] = torch.randn(B, T, H, K, generator=torch.Generator().manual_seed(9))
    res = {}
    for backend in ("reference", "triton"):
        x = {n: _dev(t).clone().requires_grad_() for n, t in inp.items()}
        o, (S, P) = rule.scan(backend=backend, output_final_state=True, **x)
        gw = torch.Generator().manual_seed(5)
        loss = sum((t * _dev(torch.randn(t.shape, generator=gw))).sum() for t in (o, S, P))
        res[backend] = (o, S, P, dict(zip(x, torch.autograd.grad(loss, list(x.values())))))
    (o1, S1, P1, g1), (o2, S2, P2, g2) = res["reference"], res["triton"]
    for what, a, b in (("o", o2, o1), ("S", S2, S1), ("P", P2, P1)):
        _close(a, b, FP32_RTOL, what)
    assert set(g1) == {"k", "v", "q", "gamma", "lam"} | ({"w"} if name != "rls" else set())
    for n in g1:
        _close(g2[n], g1[n], FP32_RTOL, f"d{n}")


@pytest.mark.skipif(_DEVICE != "cpu", reason="checks the CPU guard")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    rule = ENTRIES["deltanet"].rule
    inp = random_inputs(rule, 1, 3, 1, 4, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        rule.scan(backend="triton", **inp)


def test_bad_inputs_are_named():
    rule = ENTRIES["gated_deltanet"].rule
    inp = {n: _dev(x) for n, x in random_inputs(rule, 1, 3, 2, 4, 3).items()}
    with pytest.raises(ValueError, match="'beta'"):
        rule.scan(backend="triton", **{**inp, "beta": inp["beta"][..., None]})
    with pytest.raises(ValueError, match="initial_state"):
        rule.scan(backend="triton", initial_state=_dev(torch.zeros(1, 2, 4, 3)), **inp)
    with pytest.raises(ValueError, match="cu_seqlens"):
        rule.scan(backend="triton", cu_seqlens=_dev(torch.tensor([0, 2], dtype=torch.int32)), **inp)


def test_loop_backward_of_an_elementwise_generator_takes_its_own_value_blocks(monkeypatch):
    # Mamba's token-loop backward runs value blocks of at most library.INKERNEL_BWD_BLOCK_V rows (the in-kernel
    # reverse mode spills at 32; 4 here, under the default 8) while its forward runs 8-row blocks for d_v = 20:
    # the checkpoints do not depend on the split, and the gradients must not either
    from olssm.kernels.triton import library
    monkeypatch.setattr(tscan, "BLOCK_V", None)
    monkeypatch.setattr(library, "PARALLEL_SCAN", False)
    monkeypatch.setattr(library, "INKERNEL_BWD_BLOCK_V", 4)
    assert library._geometry(8, 20, [1] * 8)[2] == 8
    assert library._geometry(8, 20, [1] * 8, backward=True, inkernel=True)[2] == 4
    rule = ENTRIES["mamba"].rule
    inp = random_inputs(rule, 1, 9, 1, 8, 20, seed=4)
    _compare(rule, inp, 0.3 * torch.randn(1, 1, 20, 8, generator=torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("kernel", ["recurrent", "pscan", "chunk"])
def test_inputs_named_like_the_kernels_own_arguments(kernel, monkeypatch):
    # an input named o, h0, do, ... made the generated kernel a SyntaxError (a duplicate argument o_ptr): input
    # pointers are now arg_{name}. o, final state and every gradient against the reference, each kernel family
    from olssm.kernels.triton import library as tlib
    monkeypatch.setattr(tlib, "FORCE", "chunk" if kernel == "chunk" else "recurrent")
    monkeypatch.setattr(tlib, "PARALLEL_SCAN", kernel == "pscan")
    monkeypatch.setattr(tlib, "CHUNK", 16)
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    rule = olssm.derive(O.Objective(O.sqnorm(S - O.row("do", domain="unit") * Sp) / 2
                                    + O.sqnorm(S @ k - v, weight=O.scalar("o", domain="unit")) / 2))
    if kernel == "pscan":   # the block scan takes rules without corrections: a plain decayed linear attention
        rule = olssm.derive(O.Objective(O.sqnorm(S - O.row("do", domain="unit") * Sp) / 2
                                        - O.inner(S @ k, O.scalar("o", domain="unit") * v)))
    _compare(rule, random_inputs(rule, 1, 37, 2, 5, 4, seed=9))
