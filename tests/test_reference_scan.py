"""The reference scan against repeated Rule.step (its definition), state round trips, varlen,
and the argument checks every backend shares. fp32 throughout; the scan and the step loop do the
same arithmetic in the same order, so they agree to rounding (1e-6)."""
import pytest
import torch

import olssm.objectives as O
from olssm import catalogue, derive
from olssm.kernels.api import check_scan_args
from olssm.kernels.rls import RLSConditioningWarning

NAMES = list(catalogue.ENTRIES)


def _inputs(rule, B=2, T=7, H=3, d_k=5, d_v=4, seed=0):
    return catalogue.random_inputs(rule, B, T, H, d_k, d_v, seed)


def _slice(rule, inp, b, t0, t1):
    return {n: (x if rule.inputs[n].is_parameter else x[b:b + 1, t0:t1]) for n, x in inp.items()}


@pytest.mark.parametrize("name", NAMES)
def test_scan_is_repeated_step(name):
    rule = catalogue.ENTRIES[name].rule
    inp = _inputs(rule)
    o, final = rule.scan(backend="reference", output_final_state=True, **inp)
    assert o.shape == (2, 7, 3, 4)
    B, T, H = 2, 7, 3
    state = rule.zero_state((B, H), 5, 4, **{n: x for n, x in inp.items() if rule.inputs[n].is_parameter})
    for t in range(T):
        step_in = {n: (x if rule.inputs[n].is_parameter else x[:, t]) for n, x in inp.items()}
        o_t, state = rule.decode(state, **step_in)
        torch.testing.assert_close(o[:, t], o_t, rtol=1e-5, atol=1e-6)
    for a, b in zip(final if rule.is_exact else (final,), state if rule.is_exact else (state,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["longhorn", "mamba", "gated_deltanet", "decayed_least_squares", "rls"])
def test_initial_state_round_trip(name):
    rule = catalogue.ENTRIES[name].rule
    inp = _inputs(rule, T=9)
    o, final = rule.scan(backend="reference", output_final_state=True, **inp)
    first = {n: (x if rule.inputs[n].is_parameter else x[:, :4]) for n, x in inp.items()}
    rest = {n: (x if rule.inputs[n].is_parameter else x[:, 4:]) for n, x in inp.items()}
    _, mid = rule.scan(backend="reference", output_final_state=True, **first)
    o2, final2 = rule.scan(backend="reference", initial_state=mid, output_final_state=True, **rest)
    torch.testing.assert_close(o[:, 4:], o2, rtol=1e-5, atol=1e-6)
    for a, b in zip(final if rule.is_exact else (final,), final2 if rule.is_exact else (final2,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["longhorn", "gla"])
def test_varlen_equals_separate_sequences(name):
    rule = catalogue.ENTRIES[name].rule
    lens = [3, 5, 1]
    inp = _inputs(rule, B=1, T=sum(lens))
    cu = torch.tensor([0, 3, 8, 9])
    init = torch.randn(3, 3, 4, 5)
    o, finals = rule.scan(backend="reference", cu_seqlens=cu, initial_state=init, output_final_state=True, **inp)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        seg = _slice(rule, inp, 0, a, b)
        o_n, f_n = rule.scan(backend="reference", initial_state=init[n:n + 1], output_final_state=True, **seg)
        torch.testing.assert_close(o[:, a:b], o_n)
        torch.testing.assert_close(finals[n:n + 1], f_n)


def test_gradients_flow_to_every_input():
    rule = catalogue.ENTRIES["mamba"].rule
    inp = {n: x.requires_grad_() for n, x in _inputs(rule, T=4).items()}
    o, _ = rule.scan(backend="reference", **inp)
    o.square().sum().backward()
    for n, x in inp.items():
        assert x.grad is not None and x.grad.abs().sum() > 0, n


def _ungrouped(x, H):
    """Each group's slice repeated for its H / G consecutive heads, built group by group (the oracle for
    the scan's grouped-head layout)."""
    G = x.shape[2]
    return torch.cat([x[:, :, g:g + 1].expand(-1, -1, H // G, -1) for g in range(G)], 2)


@pytest.mark.parametrize("backend", ["reference", "chunk"])
@pytest.mark.parametrize("name,G", [("mamba2", 1), ("gated_deltanet", 2), ("gla", 2), ("longhorn", 1),
                                    ("mamba", 2), ("decayed_least_squares", 2)])
def test_grouped_key_inputs_equal_repeated_heads(name, G, backend):
    """Key-sized inputs with G < H heads (Mamba-2's ngroups, grouped-value heads): the scan equals the scan of
    the same inputs repeated per head, and each group's gradient is the sum over the heads that read it.
    fp32; the grouped and the repeated run do the same arithmetic, so 1e-6 (rounding)."""
    rule = catalogue.ENTRIES[name].rule
    H = 4
    inp = _inputs(rule, H=H, T=9, seed=3)
    keyed = [n for n, s in rule.inputs.items() if s.kind == "column" and not s.is_parameter]
    assert keyed
    grouped = {n: (x[:, :, :G].clone() if n in keyed else x).requires_grad_() for n, x in inp.items()}
    full = {n: (_ungrouped(x, H) if n in keyed else x).detach().clone().requires_grad_() for n, x in grouped.items()}
    o, final = rule.scan(backend=backend, output_final_state=True, **grouped)
    o_full, final_full = rule.scan(backend=backend, output_final_state=True, **full)
    torch.testing.assert_close(o, o_full, rtol=1e-5, atol=1e-6)
    for a, b in zip(final if rule.is_exact else (final,), final_full if rule.is_exact else (final_full,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(o)
    (o * w).sum().backward()
    (o_full * w).sum().backward()
    for n, x in grouped.items():
        want = full[n].grad
        if n in keyed:
            want = want.unflatten(2, (G, H // G)).sum(3)
        torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} d{n}: {m}")


def test_grouped_inputs_must_divide_the_heads():
    rule = catalogue.ENTRIES["gated_deltanet"].rule
    inp = _inputs(rule, H=4)
    with pytest.raises(ValueError, match=r"'k'.*G dividing H.*H\) = \(2, 7, 4\)"):
        rule.scan(**{**inp, "k": inp["k"][:, :, :3]}, backend="reference")
    # value-sized and scalar inputs set H and are never grouped: a wrong head count is an error
    with pytest.raises(ValueError, match=r"'beta'.*\[B, T, H\] with"):
        rule.scan(**{**inp, "beta": inp["beta"][:, :, :2]}, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "chunk"])
@pytest.mark.parametrize("name", ["gated_deltanet", "mamba", "decayed_least_squares", "rls"])
def test_no_tokens_keeps_the_initial_state(name, backend):
    """T = 0 on every backend: o has no rows and the final state is the one the scan started from, with its
    gradient; without an initial state, zeros (RLS: S = 0, P = I/λ)."""
    rule = catalogue.ENTRIES[name].rule
    inp = _inputs(rule, T=0)
    o, final = rule.scan(backend=backend, output_final_state=True, **inp)
    assert o.shape == (2, 0, 3, 4)
    finals = final if rule.is_exact else (final,)
    assert not any(f.any() for f in finals[:1])
    if rule.is_rls:
        want = torch.eye(5) / inp["lam"][:, None, None]
        torch.testing.assert_close(finals[1], want.expand(2, 3, 5, 5))
    h0 = [torch.rand(2, 3, *s, requires_grad=True) for s in (rule.state_shape(5, 4) if rule.is_exact else [(4, 5)])]
    _, final = rule.scan(backend=backend, output_final_state=True, initial_state=tuple(h0) if rule.is_exact else h0[0],
                         **inp)
    finals = final if rule.is_exact else (final,)
    for f, h in zip(finals, h0):
        torch.testing.assert_close(f, h)
        f.sum().backward()
        assert torch.equal(h.grad, torch.ones_like(h))


@pytest.mark.parametrize("name", ["deltanet", "gla", "decayed_least_squares"])
@pytest.mark.parametrize("B, H, d_k, d_v", [(0, 3, 5, 4), (2, 0, 5, 4), (2, 3, 0, 4), (2, 3, 5, 0)])
def test_empty_batch_heads_or_state(name, B, H, d_k, d_v):
    """No sequences, no heads or an empty state dimension: every torch backend returns o of the right shape
    (zeros: d_k = 0 makes o = S q an empty sum) and the same final state as the reference (the chunk engines
    reshaped empty tensors and failed)."""
    rule = catalogue.ENTRIES[name].rule
    inp = _inputs(rule, B=B, H=H, d_k=d_k, d_v=d_v)
    o_ref, f_ref = rule.scan(backend="reference", output_final_state=True, **inp)
    o, f = rule.scan(backend="chunk", output_final_state=True, **inp)
    assert o.shape == o_ref.shape == (B, 7, H, d_v) and not o.any()
    for a, b in zip(f if rule.is_exact else (f,), f_ref if rule.is_exact else (f_ref,)):
        torch.testing.assert_close(a, b)


def test_empty_last_sequence_keeps_its_initial_state():
    rule = catalogue.ENTRIES["rls"].rule
    inp = _inputs(rule, B=1, T=4)
    cu = torch.tensor([0, 4, 4])
    _, (S, P) = rule.scan(backend="reference", cu_seqlens=cu, output_final_state=True, **inp)
    _, (S_c, P_c) = rule.scan(backend="chunk", cu_seqlens=cu, output_final_state=True, **inp)
    assert not S[1].any()
    torch.testing.assert_close(P[1], torch.eye(5) / inp["lam"][:, None, None])
    torch.testing.assert_close((S, P), (S_c, P_c), rtol=1e-5, atol=1e-6)


def test_an_empty_sequence_has_no_rls_state_when_the_ridge_is_per_token():
    """P_0 = I/λ is read at a sequence's first token. With λ a per-token input an empty sequence has none: its final
    state was taken from a neighbour's token (chunk, reference) or failed with 'missing input' (T = 0). Refused,
    naming the sequence; without output_final_state, or with an initial_state, it runs."""
    S, _ = O.states()
    obj = O.Objective(O.sqnorm(S @ O.key("k") - O.value("v")) / 2, update="exact",
                      decay=O.scalar("gamma", domain="decay"), ridge=O.scalar("lam", domain="positive"),
                      ridge_decays=True)
    rule = derive(obj)
    inp = _inputs(rule, B=1, T=7)
    cu = torch.tensor([0, 3, 3, 7])
    for backend in ("reference", "chunk"):
        with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] have no tokens.*per-token input\(s\) \['lam'\]"):
            rule.scan(backend=backend, cu_seqlens=cu, output_final_state=True, **inp)
        with pytest.raises(ValueError, match=r"sequence\(s\) \[0, 1\] have no tokens"):
            rule.scan(backend=backend, output_final_state=True, **_inputs(rule, B=2, T=0))
        o, _ = rule.scan(backend=backend, cu_seqlens=cu, **inp)
        o_alone, _ = rule.scan(backend=backend, **{n: (x if rule.inputs[n].is_parameter else x[:, 3:]) for n, x in
                                                   inp.items()})
        torch.testing.assert_close(o[:, 3:], o_alone)


@pytest.mark.parametrize("backend", ["reference", "chunk", "decode"])
def test_rls_gain_stays_accurate_at_a_small_ridge(backend):
    """RLS in fp32 with λ = 1e-6 and d_k > T (directions no key excites keep P ~ 1/λ), against the
    information form solved in fp64: o_t = G_t (H_t + λ Π γ I)⁻¹ q_t. The gain P_t u read off the updated P
    carried P_t's cancellation error ε·‖P̃‖ ≈ 1e-7 · 1e6 into it: 12 % wrong (and 4e15 at λ = 1e-9). As
    P̃u / (1 + uᵀP̃u) it is ~2e-7; 1e-5 leaves room for fp32 rounding of the d_k = 16 dot products."""
    rule = catalogue.ENTRIES["rls"].rule
    T, d_k, d_v = 12, 16, 2
    inp = catalogue.random_inputs(rule, 1, T, 1, d_k, d_v, 5, dtype=torch.float64)
    inp["lam"] = torch.full_like(inp["lam"], 1e-6)
    g, k, v, q = (inp[n][0, :, 0] for n in ("gamma", "k", "v", "q"))
    A, G, expect = 1e-6 * torch.eye(d_k, dtype=torch.float64), torch.zeros(d_v, d_k, dtype=torch.float64), []
    for t in range(T):
        A, G = g[t] * A + torch.outer(k[t], k[t]), g[t] * G + torch.outer(v[t], k[t])
        expect.append(G @ torch.linalg.solve(A, q[t]))
    expect = torch.stack(expect)
    x32 = {n: x.float() for n, x in inp.items()}
    if backend == "decode":
        state, got = rule.zero_state((1, 1), d_k, d_v, lam=x32["lam"]), []
        for t in range(T):
            o_t, state = rule.decode(state, **{n: (x if n == "lam" else x[:, t]) for n, x in x32.items()})
            got.append(o_t[0, 0])
        got = torch.stack(got)
    else:
        got = rule.scan(backend=backend, **x32)[0][0, :, 0]
    err = float((got.double() - expect).abs().max() / expect.abs().max())
    assert err < 1e-5, err


@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_rls_overflow_is_an_error_not_nan(backend, monkeypatch):
    """RLS with strong forgetting (γ = 0.05, d_k = 16 > the ~1 token it remembers): P grows like γ^−t in the
    directions the last keys leave unexcited, past fp32's range by t ~ 30 (fp64's only past t ~ 240). Unchecked, the
    fp32 scan returns NaN from finite inputs on both backends (asserted first, so this test fails if the case stops
    overflowing); checked, a FloatingPointError naming the dtype and a token, after the conditioning warning. The same
    inputs in fp64 stay finite and are not refused."""
    monkeypatch.delenv("OLSSM_CHECK_INPUTS", raising=False)
    rule = catalogue.ENTRIES["rls"].rule
    inp = catalogue.random_inputs(rule, 1, 130, 2, 16, 16, seed=0)
    inp["gamma"] = torch.full_like(inp["gamma"], 0.05)
    monkeypatch.setenv("OLSSM_CHECK_INPUTS", "0")
    o, _ = rule.scan(backend=backend, **inp)
    assert not bool(torch.isfinite(o).all())
    monkeypatch.delenv("OLSSM_CHECK_INPUTS")
    with pytest.warns(RLSConditioningWarning, match="d_k = 16"):    # the warning comes first, from γ alone
        with pytest.raises(FloatingPointError, match=r"overflowed float32: .* from token t = \d+ .*in float64"):
            rule.scan(backend=backend, **inp)
    # finite in fp64, and not refused, but 0.05^−16 · 2.2e-16 ~ 1e5: warned as no more accurate than their size
    with pytest.warns(RLSConditioningWarning, match="float64 outputs may be off by ~their own size"):
        o64, (S, P) = rule.scan(backend=backend, output_final_state=True, **{n: x.double() for n, x in inp.items()})
    assert bool(torch.isfinite(o64).all()) and bool(torch.isfinite(P).all())


@pytest.mark.parametrize("d_k,gamma", [(8, 0.5), (16, 0.6), (16, 0.5), (32, 0.8), (32, 0.7), (16, 0.9)])
def test_rls_conditioning_warning_predicts_the_fp32_error(d_k, gamma, recwarn):
    """The warning's prediction, ε · max over d_k-token windows of Π 1/γ, against the fp32 chunk backend's error
    measured on the fp64 reference (relative to max |o|, T = 200): within a factor 8 either way (measured 0.2-6×
    over d_k 4-64, rls.predicted_rls_error). It warns exactly when the prediction passes RLS_WARN_ERROR (1e-3:
    (16, 0.5) at a measured 4e-2 and (32, 0.7) at 1e-2 warn; (16, 0.9) at 1e-6 does not)."""
    from olssm.kernels import rls
    rule = catalogue.ENTRIES["rls"].rule
    inp = catalogue.random_inputs(rule, 1, 200, 2, d_k, d_k, seed=1)
    inp["gamma"] = torch.full_like(inp["gamma"], gamma)
    ref, _ = rule.scan(backend="reference", **{n: x.double() for n, x in inp.items()})
    recwarn.clear()
    o, _ = rule.scan(backend="chunk", **inp)
    measured = float((o.double() - ref).abs().max() / ref.abs().max())
    args = check_scan_args(rule, None, None, None, initial_state=None, output_final_state=False, cu_seqlens=None,
                           inputs=inp)
    predicted, _ = rls.predicted_rls_error(args, inp["gamma"], torch.float32)
    assert predicted / 8 < measured < predicted * 8, (measured, predicted)
    warned = [w for w in recwarn.list if w.category is RLSConditioningWarning]
    assert len(warned) == (predicted > rls.RLS_WARN_ERROR), (predicted, [str(w.message) for w in warned])


@pytest.mark.parametrize("name", ["deltanet", "decayed_least_squares"])
def test_mixed_precision_inputs_agree_across_backends(name):
    """One fp64 input among fp32 ones: every torch backend runs the state in fp64 (and the exact readout
    solves in it: linalg.solve refused the mix); o takes the value input's dtype. Against the all-fp64 run
    (whose inputs hold the same, fp32-rounded values): 1e-6, the fp32 rounding of the evaluated coefficients."""
    rule = catalogue.ENTRIES[name].rule
    inp = _inputs(rule, T=9)
    mixed = dict(inp, v=inp["v"].double())
    wide = {n: x.double() for n, x in inp.items()}
    o64, f64 = rule.scan(backend="reference", output_final_state=True, **wide)
    for backend in ("reference", "chunk"):
        o, f = rule.scan(backend=backend, output_final_state=True, **mixed)
        assert o.dtype == torch.float64
        for a, b in zip(f if rule.is_exact else (f,), f64 if rule.is_exact else (f64,)):
            assert a.dtype == torch.float64, backend
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(o, o64, rtol=1e-6, atol=1e-6)


def test_output_dtype_is_the_value_inputs():
    two = catalogue.rule("two_keys")
    inp = _inputs(two)
    o, _ = two.scan(backend="reference", **dict(inp, k0=inp["k0"].bfloat16()))
    assert o.dtype == torch.float32                 # v0 / v1 are fp32; a bf16 key does not set it
    o, _ = two.scan(backend="reference", **dict(inp, v0=inp["v0"].bfloat16(), v1=inp["v1"].bfloat16()))
    assert o.dtype == torch.bfloat16


def test_chunk_backend_on_the_meta_device():
    """Shapes without values (FakeTensor / meta tracing): GLA's column decay chose its intra-chunk form
    from the values; on meta it takes the pairwise one."""
    rule = catalogue.ENTRIES["gla"].rule
    inp = {n: x.to("meta") for n, x in _inputs(rule, T=20).items()}
    o, f = rule.scan(backend="chunk", output_final_state=True, chunk_size=8, **inp)
    assert o.shape == (2, 20, 3, 4) and o.device.type == "meta" and f.shape == (2, 3, 4, 5)


def test_auto_backend():
    """auto: triton on CUDA, chunk elsewhere, and chunk for exact sufficient-statistics rules on CUDA too (their
    solve is torch either way); the layer resolves "auto" the same way (it sent every CUDA rule to triton)."""
    from olssm.kernels import auto_backend
    from olssm.layers import OnlineSSM
    E = catalogue.ENTRIES
    assert auto_backend(E["deltanet"].rule, "cuda") == "triton" and auto_backend(E["deltanet"].rule, "cpu") == "chunk"
    assert auto_backend(E["rls"].rule, "cuda") == "triton"
    assert auto_backend(E["decayed_least_squares"].rule, "cuda") == "chunk"
    layer = OnlineSSM(E["decayed_least_squares"].objective, 16, 2)
    assert layer._resolve_backend(torch.device("cuda"))[0] == "chunk"


def test_a_rule_without_value_inputs_takes_d_v_from_the_initial_state():
    """A rule whose per-token inputs are all key-sized (S_prev k₂ as the target) leaves d_v to the initial state;
    without one the error names d_v alone (it had said the rule read no key- or value-sized input)."""
    S, Sp = O.states()
    k, k2, beta = O.key("k"), O.key("k2"), O.scalar("beta", domain="unit")
    rule = derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - Sp @ k2, weight=beta) / 2))
    g = torch.Generator().manual_seed(3)
    inp = dict(q=torch.randn(1, 9, 2, 4, generator=g), k=torch.randn(1, 9, 2, 4, generator=g),
               k2=torch.randn(1, 9, 2, 4, generator=g), beta=torch.rand(1, 9, 2, generator=g))
    with pytest.raises(ValueError, match=r"cannot infer d_v \(it reads no value-sized input\); pass "
                                         r"initial_state"):
        rule.scan(backend="chunk", **inp)
    S0 = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    inp = {n: x.double() for n, x in inp.items()}
    o, f = rule.scan(backend="chunk", initial_state=S0, output_final_state=True, chunk_size=4, **inp)
    o_ref, f_ref = rule.scan(backend="reference", initial_state=S0, output_final_state=True, **inp)
    assert o.shape == (1, 9, 2, 3)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f, f_ref, rtol=1e-12, atol=1e-12)


def test_bad_arguments_name_what_is_wrong():
    rule = catalogue.ENTRIES["longhorn"].rule
    inp = _inputs(rule)
    with pytest.raises(ValueError, match="missing input.*'beta'"):
        rule.scan(**{n: x for n, x in inp.items() if n != "beta"}, backend="reference")
    # a misspelt name: both sides of the mistake (it had said only that beta was missing)
    with pytest.raises(ValueError, match=r"missing input\(s\) 'beta' \(and unexpected \['betta'\]\)"):
        rule.scan(**{n: x for n, x in inp.items() if n != "beta"}, betta=inp["beta"], backend="reference")
    with pytest.raises(ValueError, match="'beta'.*\\[B, T, H, d\\]"):
        rule.scan(**{**inp, "beta": inp["beta"][:, :3]}, backend="reference")
    with pytest.raises(ValueError, match="value size"):
        rule.scan(**{**inp, "beta": torch.rand(2, 7, 3, 9)}, backend="reference")
    with pytest.raises(TypeError, match="floating"):
        rule.scan(**{**inp, "k": inp["k"].long()}, backend="reference")
    with pytest.raises(ValueError, match="unexpected input"):
        rule.scan(**inp, gamma=torch.rand(2, 7, 3), backend="reference")
    with pytest.raises(ValueError, match="'recurrent' is OnlineSSM's token loop"):   # a layer's backend, not scan's
        rule.scan(**inp, backend="recurrent")
    with pytest.raises(ValueError, match="initial_state must have shape"):
        rule.scan(**inp, initial_state=torch.zeros(2, 3, 5, 5), backend="reference")
    with pytest.raises(ValueError, match="initial_state must be a floating-point tensor, got torch.int32"):
        S0 = rule.zero_state((2, 3), inp["k"].shape[-1], inp["v"].shape[-1])
        rule.scan(**inp, initial_state=(tuple(x.int() for x in S0) if rule.is_exact else S0.int()),
                  backend="reference")
    with pytest.raises(ValueError, match="backend"):
        rule.scan(**inp, backend="cuda-magic")
    with pytest.raises(ValueError, match="cu_seqlens"):
        rule.scan(**{n: x[:1] for n, x in inp.items()}, cu_seqlens=torch.tensor([0, 9]), backend="reference")
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D int32/int64 tensor.*got list"):
        rule.scan(**{n: x[:1] for n, x in inp.items()}, cu_seqlens=[0, 3, 7], backend="reference")
    # H and the value size are voted too: a wrong beta is named, not the v beside it (it used to be)
    with pytest.raises(ValueError, match="input 'beta' has value size 6, other value-sized inputs have 4"):
        rule.scan(**{**inp, "beta": torch.rand(2, 7, 3, 6)}, backend="reference")
    with pytest.raises(ValueError, match=r"input 'v' \(value\) must be .* got \(2, 7, 4, 4\)"):
        rule.scan(**{**inp, "v": torch.randn(2, 7, 4, 4)}, backend="reference")
    # (B, T) are the ones most inputs agree on: the key with one token too few is the input named
    with pytest.raises(ValueError, match=r"input 'k' .*\(B, T, H\) = \(2, 7, 3\), got \(2, 6, 3, 5\)"):
        rule.scan(**{**inp, "k": inp["k"][:, :6]}, backend="reference")
    mamba = catalogue.ENTRIES["mamba"].rule
    minp = _inputs(mamba)
    with pytest.raises(ValueError, match="parameter 'A'.*\\(3, 4, 5\\)"):
        mamba.scan(**{**minp, "A": minp["A"][0]}, backend="reference")
    with pytest.raises(ValueError, match="last dimension d_k"):
        rule.step(torch.zeros(4, 5), k=torch.zeros(3), v=torch.zeros(4), beta=torch.zeros(4))


def test_token_by_token_inputs_are_checked_as_scans_are(monkeypatch):
    """rule.step / rule.decode (and so a layer's step and its "recurrent" backend, OnlineSSM's loop over decode) check
    values and shapes as scan does (a probe, session 25): a NaN, a gate above 1 or a NaN state had gone through
    silently into every later state, and an input that does not broadcast to the state's batch shape failed deep
    in the generated step with torch's size message, or enlarged the state's batch."""
    from olssm.layers.presets import DeltaNet
    monkeypatch.delenv("OLSSM_CHECK_INPUTS", raising=False)
    gla, dn = catalogue.rule("gla"), catalogue.rule("deltanet")
    tok = lambda rule: {n: (x if rule.inputs[n].is_parameter else x[:, 0]) for n, x in _inputs(rule).items()}
    S = torch.randn(2, 3, 4, 5)
    g = tok(gla)
    for name, index, value, says in [("g", (1, 2, 0), 2.0, r"step: 'g' \(column, domain 'decay'\) has values above 1"),
                                     ("k", (0, 1, 3), float("nan"),
                                      r"'k' \(key, domain 'real'\) has NaN.*\(0, 1, 3\)")]:
        x = g[name].clone()
        x[index] = value
        for call in (gla.decode, gla.step):                  # (decode's torch path is step's, and says so)
            with pytest.raises(ValueError, match=says):
                call(S, **{**g, name: x})
    bad = S.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"step: 'state' \(state\) has NaN"):
        gla.decode(bad, **g)
    d = tok(dn)
    for inputs, state, says in [({**d, "beta": torch.rand(3, 2)}, torch.randn(2, 3, 4, 5), r"'beta' of shape \(3, 2\)"),
                                (d, torch.randn(2, 2, 4, 5), r"'beta' of shape \(2, 3\) does not broadcast to the "
                                                             r"state's batch shape \(2, 2\)"),
                                (d, torch.randn(3, 4, 5), r"batch shape \(3,\)")]:
        with pytest.raises(ValueError, match=says):
            dn.decode(state, **inputs)
    o, new = dn.decode(torch.randn(2, 3, 4, 5), **d)                       # the shapes the check lets through
    assert o.shape == (2, 3, 4) and new.shape == (2, 3, 4, 5)
    o1, new1 = dn.decode(torch.randn(2, 3, 4, 5), **{**d, "beta": d["beta"][:1]})   # a batch of one broadcasts
    assert new1.shape == (2, 3, 4, 5)
    # an integer state was rounded to fp32 silently (scan refuses such an initial_state)
    dls = catalogue.ENTRIES["decayed_least_squares"].rule
    ints = torch.zeros(2, 3, 5, 5, dtype=torch.int32)
    for call in (lambda: dn.decode(torch.ones(2, 3, 4, 5, dtype=torch.int64), **d),
                 lambda: dn.step(torch.ones(2, 3, 4, 5, dtype=torch.int64), **d),
                 lambda: dls.step((torch.zeros(2, 3, 4, 5), ints), **tok(dls))):
        with pytest.raises(ValueError, match=r"state: must be floating point .* got torch.int"):
            call()
    # a layer's token loop: the same error as its chunked forward, where before it returned NaN
    x = torch.randn(2, 7, 16)
    x[0, 3] = float("nan")
    for backend in ("chunk", "recurrent"):
        with pytest.raises(ValueError, match="NaN or infinite"):
            DeltaNet(16, 2, backend=backend)(x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        DeltaNet(16, 2).step(x[:, 3], None)


@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_input_values_outside_their_domain_are_named(backend, monkeypatch):
    """Values no input of its domain takes are a ValueError naming the input, its domain and the first bad index, on
    every backend (check_scan_args; CHUNK.md, "Input values"). Unchecked they had split the backends: a NaN reached
    the earlier tokens of its chunk on the chunked forms only, a negative GLA gate was refused by the chunk backend
    without a gradient and multiplied through with one, a gate of 2 or a Mamba A > 0 grew the state silently."""
    monkeypatch.delenv("OLSSM_CHECK_INPUTS", raising=False)
    gla, mamba = catalogue.rule("gla"), catalogue.rule("mamba")
    bad = []
    for rule, name, index, value, says in [
            (gla, "g", (0, 2, 1, 3), -0.1, r"'g' \(column, domain 'decay'\) has values below 0 \(min -0.1\), first at "
                                           r"index \(0, 2, 1, 3\).*in \[0, 1\]"),
            (gla, "g", (1, 0, 0, 0), 2.0, r"'g' .* has values above 1 \(max 2\)"),
            (gla, "k", (0, 5, 2, 1), float("nan"), r"'k' \(key, domain 'real'\) has NaN or infinite values, first at "
                                                   r"index \(0, 5, 2, 1\)"),
            (gla, "v", (1, 6, 0, 0), float("-inf"), r"'v' .* NaN or infinite"),
            (mamba, "A", (1, 2, 0), 0.5, r"'A' \(parameter, domain 'negative'\) has values above 0"),
            (mamba, "dt", (0, 3, 1, 2), -1e-3, r"'dt' \(\w+, domain 'timestep'\) has values below 0")]:
        inp = _inputs(rule)
        x = inp[name].clone()
        x[index] = value
        bad.append((rule, {**inp, name: x}))
        for grad in (False, True):   # with a gradient too: the chunk backend had taken the token loops unchecked
            with pytest.raises(ValueError, match=says):
                rule.scan(**{n: t.requires_grad_(grad and n == name) for n, t in bad[-1][1].items()}, backend=backend)
    inp = _inputs(gla)
    S0 = torch.zeros(2, 3, 4, 5)
    S0[1, 2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'initial_state' \(initial state\) has NaN"):
        gla.scan(**inp, initial_state=S0, backend=backend)
    # the domains' edges are values: decays of exactly 0 and 1, a log decay of −inf (a decay of 0), Δ = 0
    inp["g"][:, 3] = 0.0
    inp["g"][:, 4] = 1.0
    o0 = gla.scan(**inp, backend=backend)[0]
    log = gla.with_log_decays()
    o1 = log.scan(**{**inp, "g": inp["g"].log()}, backend=backend)[0]
    assert torch.isinf(inp["g"].log()).any() and torch.allclose(o1, o0, atol=1e-5)
    m = _inputs(mamba)
    m["dt"][:, 2] = 0.0
    assert torch.isfinite(mamba.scan(**m, backend=backend)[0]).all()
    # what the check leaves alone (a probe's false positives): a "unit" input above 1 (DeltaNet's β ∈ (0, 2), computed
    # alike by every backend), vmap over the scan (no .item() on a batched tensor); a grouped key's bad value is named
    # at its own head index, not at the expanded one
    dn = catalogue.rule("deltanet")
    x = _inputs(dn)
    x["beta"] = 2 * x["beta"]
    assert torch.isfinite(dn.scan(**x, backend=backend)[0]).all()
    gi = _inputs(gla)
    out = torch.func.vmap(lambda q: gla.scan(**{**gi, "q": q}, backend=backend)[0])(torch.stack([gi["q"]] * 2))
    assert torch.allclose(out[1], gla.scan(**gi, backend=backend)[0], atol=1e-6)
    gd = catalogue.rule("gated_deltanet")
    x = _inputs(gd, H=4)
    x["k"], x["q"] = x["k"][:, :, :2].clone(), x["q"][:, :, :2]    # two key groups for four heads
    x["k"][0, 3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"'k' .* first at index \(0, 3, 1, 2\)"):
        gd.scan(**x, backend=backend)
    # RLS divides by γ and starts from I/λ: 0 is in their closed domains but has no step (had been non-finite
    # outputs on the reference, an error naming the inner scan's olssm_g on the chunk backend)
    rls = catalogue.rule("rls")
    for name, index, says in (("gamma", (0, 3, 1), r"forgetting factor γ, which is ≤ 0 .* index \(0, 3, 1\)"),
                              ("lam", (1,), r"P_0 = I/\(λ\) is not finite")):
        x = _inputs(rls)
        x[name][index] = 0.0
        with pytest.raises(ValueError, match=says):
            rls.scan(**x, backend=backend)
    # an exact rule's readout solves (H_t + λ) x = q: λ = 0 is singular on the first tokens, where the backends had
    # each returned their own numbers (O(1) apart), torch's LinAlgError or NaN
    dls = catalogue.rule("decayed_least_squares")
    x = _inputs(dls)
    x["lam"][1] = 0.0
    with pytest.raises(ValueError, match=r"ridge λ is ≤ 0 .* index \(1,\) of input 'lam'.* must be > 0"):
        dls.scan(**x, backend=backend)
    # an exact rule's initial state is a pair: the bad one is named
    G0, H0 = dls.zero_state((2, 3), 5, 4)
    H0 = H0.clone()
    H0[0, 1, 2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"'initial_state\[1\]' \(initial state\) has NaN"):
        dls.scan(**_inputs(dls), initial_state=(G0, H0), backend=backend)
    # "0" turns the check off: the gate of 2 runs (and grows the state)
    monkeypatch.setenv("OLSSM_CHECK_INPUTS", "0")
    rule, inp = bad[1]
    assert torch.isfinite(rule.scan(**inp, backend=backend)[0]).all()
    monkeypatch.setenv("OLSSM_CHECK_INPUTS", "yes")
    with pytest.raises(ValueError, match="OLSSM_CHECK_INPUTS must be 'auto', '0' or '1'"):
        rule.scan(**inp, backend=backend)


def test_auto_takes_chunk_on_cuda_for_coefficients_triton_cannot_print():
    """An atan or Piecewise weight derives and runs on the torch backends, but the Triton printer has no lowering for
    it: backend="auto" picked triton on CUDA and raised NotImplementedError there (a probe, session 26). It picks the
    chunk backend for such a rule now (decided from the device alone: no CUDA needed here), triton for the catalogue."""
    import sympy as sp
    from olssm.kernels.api import auto_backend
    S, Sp = O.states()
    k, v, y = O.key("k"), O.value("v"), O.scalar("y")
    for weight in (sp.atan(y) ** 2, sp.Piecewise((y ** 2, y > 0), (0, True))):
        rule = derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=weight) / 2))
        assert auto_backend(rule, "cuda") == "chunk" and auto_backend(rule, "cpu") == "chunk"
    for name in ("deltanet", "gla", "mamba", "rls"):
        assert auto_backend(catalogue.rule(name), "cuda") == "triton"
    assert auto_backend(catalogue.rule("decayed_least_squares"), "cuda") == "chunk"


def test_a_size_only_a_parameter_carries_is_read_from_it():
    """−⟨S, M⟩ with M a [H, d_v, d_k] parameter reads no value-sized per-token input: scan refused it without an
    initial_state ("cannot infer d_v"; a probe, session 26). d_v comes from M now: o and the final state against the
    rule's own step loop, with and without cu_seqlens."""
    S, Sp = O.states()
    rule = derive(O.Objective(O.sqnorm(S - Sp) / 2 - O.inner(S, O.parameter("M", "matrix"))))
    inp = _inputs(rule, B=1, T=8, H=2, d_k=4, d_v=3)
    o, final = rule.scan(backend="reference", output_final_state=True, **inp)
    state, outs = rule.zero_state((1, 2), 4, 3), []
    for t in range(8):
        o_t, state = rule.decode(state, M=inp["M"], q=inp["q"][:, t])
        outs.append(o_t)
    torch.testing.assert_close(o, torch.stack(outs, 1))
    torch.testing.assert_close(final, state)
    for backend in ("reference", "chunk"):
        packed, _ = rule.scan(backend=backend, cu_seqlens=torch.tensor([0, 3, 8]), **inp)
        alone, _ = rule.scan(backend=backend, M=inp["M"], q=inp["q"][:, 3:])
        torch.testing.assert_close(packed[:, 3:], alone)
