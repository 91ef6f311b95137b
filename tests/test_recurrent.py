"""The chunk backend's CPU recurrent engine (olssm/kernels/recurrent.py: a token loop with a
hand-written adjoint) against independent oracles: finite differences (torch.autograd.gradcheck,
fp64) and the reference backend (autograd through the step loop).

The engine's forward is the reference's arithmetic in the same order, so fp64 outputs agree to
rounding (1e-12 relative); its backward is written out, so gradcheck's default fp64 tolerances
(atol 1e-5, rtol 1e-3 on finite differences with eps 1e-6) are the check that the adjoint is right.
"""
import warnings

import pytest
import sympy
import torch

import olssm
import olssm.kernels.chunk as chunk_mod
from olssm import catalogue as cat
from olssm import objectives as O
from olssm.kernels import scan
from olssm.kernels.chunk import ChunkFallbackWarning


def _elementwise_with_corrections():
    """Elementwise decay (a generator) with a per-row correction and a second key/value input: no
    chunked form exists (ChunkFallbackWarning); the recurrent engine runs it."""
    S, Sp = O.states()
    k, v, k2, v2 = O.key("k"), O.value("v"), O.key("k2"), O.value("v2")
    dt = O.row("dt", domain="timestep")
    beta = O.row("beta", domain="unit")
    A = O.parameter("A", "matrix", domain="negative")
    return olssm.derive(O.Objective(O.sqnorm(S - sympy.exp(dt * A) * Sp) / 2 + O.sqnorm(S @ k - v, weight=beta) / 2
                                    - O.inner(S @ k2, v2)))


def _two_row_corrections():
    """Two per-row corrections (two row-weighted regression terms) and a row decay."""
    S, Sp = O.states()
    k, v, k2, v2 = O.key("k"), O.value("v"), O.key("k2"), O.value("v2")
    b1, b2 = O.row("b1", domain="unit"), O.row("b2", domain="unit")
    g = O.row("g", domain="decay")
    return olssm.derive(O.Objective(O.sqnorm(S - g * Sp) / 2 + O.sqnorm(S @ k - v, weight=b1) / 2
                                    + O.sqnorm(S @ k2 - v2, weight=b2) / 2, update="explicit"))


RULES = {
    "two row corrections, row decay": _two_row_corrections,
    "mamba": lambda: cat.ENTRIES["mamba"].rule,
    "longhorn": lambda: cat.ENTRIES["longhorn"].rule,
    "longhorn_diag": lambda: cat.ENTRIES["longhorn_diag"].rule,
    "elementwise decay + row correction": _elementwise_with_corrections,
}


def _uses_engine(rule, inp, monkeypatch):
    calls = []
    real = chunk_mod.recurrent_scan
    monkeypatch.setattr(chunk_mod, "recurrent_scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChunkFallbackWarning)
        scan(rule, backend="chunk", **inp)
    return bool(calls)


@pytest.mark.parametrize("which", list(RULES))
def test_gradcheck(which, monkeypatch):
    """Every gradient (token inputs, parameters, initial state) against finite differences, with
    blocks of 2 tokens so that T = 5 crosses checkpoints."""
    monkeypatch.setattr(chunk_mod, "RECURRENT_BLOCK", 2)
    rule = RULES[which]()
    inp = {n: x.double().requires_grad_() for n, x in cat.random_inputs(rule, 1, 5, 2, 3, 2, seed=4).items()}
    assert _uses_engine(rule, inp, monkeypatch)
    S0 = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    names = list(inp)

    def f(*xs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ChunkFallbackWarning)
            return scan(rule, backend="chunk", initial_state=xs[-1], output_final_state=True,
                        **dict(zip(names, xs[:-1])))
    assert torch.autograd.gradcheck(f, (*inp.values(), S0))


def test_routing(monkeypatch):
    """Elementwise decays, per-row corrections and unchunkable structures take the engine on a CPU;
    shared-row rules keep the chunked linear engine (faster there: matmuls over chunks)."""
    for which, make in RULES.items():
        rule = make()
        assert _uses_engine(rule, cat.random_inputs(rule, 1, 4, 1, 3, 2), monkeypatch), which
    for name in ("deltanet", "gla", "gated_deltanet", "mamba2"):
        rule = cat.ENTRIES[name].rule
        assert not _uses_engine(rule, cat.random_inputs(rule, 1, 4, 1, 3, 2), monkeypatch), name


def test_unchunkable_structure_warns_and_matches_reference():
    rule = _elementwise_with_corrections()
    inp = cat.random_inputs(rule, 2, 9, 2, 3, 4, seed=1)
    with pytest.warns(ChunkFallbackWarning, match="token loop"):
        o, f = scan(rule, backend="chunk", output_final_state=True, **inp)
    o_ref, f_ref = scan(rule, backend="reference", output_final_state=True, **inp)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-6)


def test_frozen_inputs_get_no_gradient_and_others_match():
    """Inputs without requires_grad are skipped (no work, None gradient); the rest still match the
    reference's autograd (fp64, 1e-10)."""
    rule = cat.ENTRIES["mamba"].rule
    base = {n: x.double() for n, x in cat.random_inputs(rule, 2, 7, 2, 4, 3, seed=2).items()}
    grads = {}
    for backend in ("reference", "chunk"):
        inp = {n: x.clone().requires_grad_(n in ("dt", "v")) for n, x in base.items()}
        o, _ = scan(rule, backend=backend, output_final_state=True, **inp)
        o.sin().sum().backward()
        grads[backend] = {n: x.grad for n, x in inp.items()}
    for n in base:
        if n in ("dt", "v"):
            torch.testing.assert_close(grads["chunk"][n], grads["reference"][n], rtol=1e-10, atol=1e-10)
        else:
            assert grads["chunk"][n] is None


def test_bf16_inputs():
    """bf16 inputs, fp32 state: o and gradients (in bf16, the inputs' dtype) against the fp32
    reference within 3e-2 of the largest value (bf16 keeps 8 bits: 4e-3 per rounding, a few roundings
    of the inputs and of o)."""
    rule = cat.ENTRIES["longhorn"].rule
    base = cat.random_inputs(rule, 1, 24, 2, 8, 8, seed=3)
    out = {}
    for backend, dtype in (("reference", torch.float32), ("chunk", torch.bfloat16)):
        inp = {n: x.detach().to(dtype).requires_grad_() for n, x in base.items()}
        o, f = scan(rule, backend=backend, output_final_state=True, **inp)
        assert f.dtype == torch.float32 and o.dtype == dtype
        (o.float().square().sum() + f.sum()).backward()
        out[backend] = (o.detach().float(), {n: x.grad.float() for n, x in inp.items()})
    scale = lambda x: max(1.0, float(x.abs().max()))
    assert float((out["chunk"][0] - out["reference"][0]).abs().max()) <= 3e-2 * scale(out["reference"][0])
    for n, g in out["reference"][1].items():
        assert float((out["chunk"][1][n] - g).abs().max()) <= 3e-2 * scale(g), n


def _naive_scan(ent, S0, R, M, decay):
    """The normal-form step of rule.step (torch_step_source) per token, under autograd: the oracle for
    recurrent_scan called directly on entries of any broadcast shape."""
    S, outs = S0, []
    for t in range(ent["q"].shape[1]):
        e = {n: x[:, t] for n, x in ent.items()}
        St = e["decay"] * S if decay else S
        new = St
        for r in range(R):
            new = new - e[f"c{r}"] * (St * e[f"a{r}"]).sum(-1, keepdim=True) * e[f"b{r}"]
        for m in range(M):
            new = new + e[f"e{m}"] * e[f"w{m}"]
        S = new
        outs.append((S * e["q"]).sum(-1))
    return torch.stack(outs, 1), S


SHAPES = [(1, 1), (4, 1), (1, 3), (4, 3)]    # scalar, row, column, elementwise (d_v = 4, d_k = 3)


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_engine_on_entries_of_every_shape(decay, seed):
    """recurrent_scan on two corrections and two input terms whose entries take random broadcast
    shapes (scalar / row / column / elementwise, including key vectors that vary over rows, which no
    chunked engine takes), T = 7 across blocks of 3, against the autograd loop (fp64, 1e-10)."""
    from olssm.kernels.recurrent import Plan, recurrent_scan
    g = torch.Generator().manual_seed(seed)
    B, T, H, V, K, R, M = 2, 7, 2, 4, 3, 2, 2
    names = ["q"] + [f"{x}{r}" for r in range(R) for x in "cab"] + [f"{x}{m}" for m in range(M) for x in "ew"]
    if decay:
        names.append("decay")
    raw = {}
    for n in names:
        X, Y = SHAPES[int(torch.randint(4, (1,), generator=g))]
        x = torch.randn(B, T, H, X, Y, generator=g, dtype=torch.float64)
        if n == "decay":
            x = torch.rand(B, T, H, X, Y, generator=g, dtype=torch.float64) * 0.5 + 0.5
        elif n.startswith("c"):
            x = 0.3 * x
        raw[n] = x.requires_grad_()
    S0 = torch.randn(B, H, V, K, generator=g, dtype=torch.float64, requires_grad=True)
    full = {n: x.expand(B, T, H, *x.shape[-2:]) for n, x in raw.items()}
    o_ref, S_ref = _naive_scan(full, S0, R, M, decay)
    plan = Plan(lambda inp, L: {n: inp[n] for n in names}, R, M, decay, (B, T, H, V, K))
    o, S = recurrent_scan(plan, raw, {}, S0, block=3)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)
    w_o = torch.randn(o.shape, generator=g, dtype=torch.float64)
    w_S = torch.randn(S.shape, generator=g, dtype=torch.float64)
    leaves = [*raw.values(), S0]
    want = torch.autograd.grad((o_ref * w_o).sum() + (S_ref * w_S).sum(), leaves)
    got = torch.autograd.grad((o * w_o).sum() + (S * w_S).sum(), leaves)
    for n, a, b in zip([*raw, "S0"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=n)


@pytest.mark.parametrize("varlen", [False, True])
def test_rls_gain_scan_adjoint(varlen, monkeypatch):
    """The chunk backend's RLS gain scan (kernels/rls.py, a hand-written adjoint of the Riccati
    recursion with P checkpointed every GAIN_BLOCK tokens) against finite differences (gradcheck, fp64),
    with blocks of 2 so that T = 5 crosses checkpoints, dense and with packed sequences (lengths 2, 0, 3)."""
    from olssm.kernels import rls
    monkeypatch.setattr(rls, "GAIN_BLOCK", 2)
    g = torch.Generator().manual_seed(5)
    B, T, H, K = (1, 5, 2, 3) if varlen else (2, 5, 2, 3)
    N = 3 if varlen else B
    u = torch.randn(B, T, H, K, generator=g, dtype=torch.float64).requires_grad_()
    gamma = (0.7 + 0.3 * torch.rand(B, T, H, generator=g, dtype=torch.float64)).requires_grad_()
    R = (0.5 + torch.rand(B, T, H, generator=g, dtype=torch.float64)).requires_grad_()
    A = torch.randn(N, H, K, K, generator=g, dtype=torch.float64)
    P0 = (A @ A.mT + torch.eye(K, dtype=torch.float64)).requires_grad_()
    cu = torch.tensor([0, 2, 2, 5]) if varlen else None
    assert torch.autograd.gradcheck(lambda *x: rls.torch_gain_scan(*x, cu_seqlens=cu), (u, gamma, R, P0))


@pytest.mark.parametrize("name", ["longhorn", "rls", "decayed_least_squares"])
def test_second_derivative_raises(name):
    """The hand-written backwards are first-order only: asking for a graph of the gradient (create_graph, a
    gradient penalty or a Hessian-vector product) must raise, not return second-order terms of zero — for
    autograd.grad with inputs= too, which went around once_differentiable's guard (None, or wrong values
    for DLS and RLS)."""
    rule = cat.ENTRIES[name].rule
    inp = {n: x.double().requires_grad_() for n, x in cat.random_inputs(rule, 1, 5, 1, 3, 3).items()}
    o, _ = scan(rule, backend="chunk", **inp)
    with pytest.raises(RuntimeError, match="second derivatives .* use backend='reference'"):
        torch.autograd.grad(o.square().sum(), [inp["k"]], create_graph=True)
    o, _ = scan(rule, backend="chunk", **inp)
    (g,) = torch.autograd.grad(o.square().sum(), [inp["k"]])          # first order is fine


@pytest.mark.parametrize("decay", [False, True])
def test_exact_x_loop_gradcheck(decay):
    """The exact rules' CPU token loop (x_t = (H_t + diag λ_t)⁻¹ q_t, H_t = γ_t H_{t−1} + R u wᵀ + diag δ, X kept in
    its factors) with its written-out adjoint, against finite differences (fp64): blocks of 3 over T = 7 (a
    partial last block), broadcast ridge, δ and decay, u ≠ w (a non-symmetric H: A⁻ᵀ in the adjoint matters),
    two Gram terms, every input and H0."""
    from olssm.kernels.recurrent import exact_x_loop
    g = torch.Generator().manual_seed(5)
    B, T, H, K = 2, 7, 1, 3
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    terms = [((r(B, T, H, 1, 1).abs() + 0.1).requires_grad_(), (0.5 * r(B, T, H, 1, K)).requires_grad_(),
              (0.5 * r(B, T, H, 1, K)).requires_grad_()) for _ in range(2)]
    delta = (r(1, 1, H, 1, K).abs() + 0.1).requires_grad_()
    ridge = (r(1, 1, H, 1, K).abs() + 1.0).requires_grad_()
    q = r(B, T, H, 1, K).requires_grad_()
    H0 = (torch.eye(K, dtype=torch.float64) + 0.1 * r(B, H, K, K)).requires_grad_()
    gam = (0.5 + 0.5 * torch.rand(B, 1, H, 1, 1, generator=g, dtype=torch.float64)).requires_grad_()
    flat = [f for term in terms for f in term]
    ins = [delta, ridge, q, H0, *flat] + ([gam] if decay else [])

    def f(delta, ridge, q, H0, *rest):
        fs, gg = (rest[:-1], rest[-1]) if decay else (rest, None)
        return exact_x_loop(gg, [fs[0:3], fs[3:6]], delta, ridge, q, H0, 3)
    assert torch.autograd.gradcheck(f, ins, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("batch, serial", [(2, True), (3, False)])
def test_token_loops_run_serially_on_small_states(batch, serial, monkeypatch):
    # recurrent.SERIAL_STATE_NUMEL: the per-token loops of a state of at most 2¹⁵ elements run on one intra-op thread
    # (BLAS split each GEMV across threads for less than it cost; CHUNK.md §5), larger ones on all of them, and the
    # caller's thread count is back afterwards, also after an error inside. Here d_k = d_v = 64, H = 4: B = 2 is
    # 2¹⁵ elements, B = 3 is more. Results are checked against the reference by the other tests in this file.
    import olssm.kernels.recurrent as rec
    seen = []
    real = rec._advance_
    monkeypatch.setattr(rec, "_advance_", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    rule = cat.ENTRIES["longhorn"].rule
    inp = {n: x.requires_grad_() for n, x in cat.random_inputs(rule, batch, 5, 4, 64, 64, seed=3).items()}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        o, _ = scan(rule, backend="chunk", **inp)
        o.square().sum().backward()
        assert torch.get_num_threads() == 2
        assert len(seen) == 10 and set(seen) == ({1} if serial else {2})   # 5 tokens forward, 5 recomputed
        monkeypatch.setattr(rec, "_advance_", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            scan(rule, backend="chunk", **inp)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_rls_gain_loop_runs_serially_on_small_states(monkeypatch):
    # the RLS gain scan's token loops (rls._GainScan) likewise: P [B, H, d_k, d_k] of 2·4·64·64 = 2¹⁵ elements
    import olssm.kernels.rls as rls
    seen = []
    real = rls._riccati_
    monkeypatch.setattr(rls, "_riccati_", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    rule = cat.ENTRIES["rls"].rule
    inp = {n: x.requires_grad_() for n, x in cat.random_inputs(rule, 2, 3, 4, 64, 8, seed=3).items()}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        o, _ = scan(rule, backend="chunk", **inp)
        o.square().sum().backward()
        assert torch.get_num_threads() == 2 and len(seen) == 6 and set(seen) == {1}
    finally:
        torch.set_num_threads(before)
