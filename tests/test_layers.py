"""OnlineSSM and the presets: step == forward, gradients, domains, mixed precision, errors."""
import math
import re
import warnings

import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import olssm.objectives as O
from olssm import catalogue, derive
from olssm.layers import PRESETS, OnlineSSM, available_backends, get_preset

# every scan backend importable here, plus the layer's own batched token loop
BACKENDS = [b for b in available_backends() if b != "triton"] + ["recurrent"]
D_MODEL, H = 16, 2


def _preset(name, backend, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    if name == "mamba2":
        kw.setdefault("d_k", 8)  # Mamba-2's d_state 128 is needlessly large for these checks
    return PRESETS[name](D_MODEL, H, backend=backend, **kw).to(dtype)


def _state_close(a, b, tol):
    if isinstance(a, tuple):
        return all(_state_close(x, y, tol) for x, y in zip(a, b))
    return torch.allclose(a, b, rtol=tol, atol=tol)


def _step_all(layer, x):
    cache = layer.init_cache(x.shape[0])
    ys = []
    for t in range(x.shape[1]):
        y, cache = layer.step(x[:, t], cache)
        ys.append(y)
    return torch.stack(ys, 1), cache


# tolerance: float64 throughout; the step path and the scan differ only by summation order
STEP_TOL = 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_step_equals_forward(name, backend):
    layer = _preset(name, backend)
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    y, cache = layer(x, return_cache=True)
    ys, cache_s = _step_all(layer, x)
    assert y.shape == x.shape
    assert torch.allclose(y, ys, rtol=STEP_TOL, atol=STEP_TOL), (y - ys).abs().max()
    assert _state_close(cache["state"], cache_s["state"], STEP_TOL)
    for n in cache["conv"]:
        assert torch.allclose(cache["conv"][n], cache_s["conv"][n], rtol=STEP_TOL, atol=STEP_TOL)
    # prefill then continue: forward(x[:, :4]) with a cache, then forward(x[:, 4:], cache) == forward(x)
    y1, c1 = layer(x[:, :4], return_cache=True)
    y2 = layer(x[:, 4:], cache=c1)
    assert torch.allclose(torch.cat([y1, y2], 1), y, rtol=STEP_TOL, atol=STEP_TOL)


@pytest.mark.parametrize("name", ["longhorn", "gated_deltanet", "decayed_least_squares", "mamba"])
def test_backends_agree_with_reference(name):
    """Every available backend: same outputs and gradients as the reference scan (fp64)."""
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    ref = _preset(name, "reference")
    y_ref = ref(x)
    g_ref = torch.autograd.grad(y_ref.pow(2).sum(), list(ref.parameters()), allow_unused=True)
    for backend in BACKENDS:
        layer = _preset(name, backend)
        layer.load_state_dict(ref.state_dict())
        y = layer(x)
        assert torch.allclose(y, y_ref, rtol=1e-8, atol=1e-10), backend
        g = torch.autograd.grad(y.pow(2).sum(), list(layer.parameters()), allow_unused=True)
        for a, b in zip(g, g_ref):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.allclose(a, b, rtol=1e-7, atol=1e-9), backend


def _custom_objective():
    """Not a catalogue entry: a decayed (learned per-head γ) Longhorn with a per-row learning rate."""
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    beta = O.row("beta", domain="unit")
    gamma = O.parameter("gamma", "scalar", domain="decay")
    return O.Objective(O.sqnorm(S - gamma * Sp) / 2 + O.sqnorm(S @ k - v, weight=beta) / 2, name="custom")


def test_custom_objective_gradcheck():
    torch.manual_seed(0)
    layer = OnlineSSM(_custom_objective(), 4, n_heads=2, d_k=2, d_v=2, conv_size=2,
                      backend="reference").double()
    # the input, the rule parameter (γ, log-space), the β projection and the key conv
    names = ["params_raw.gamma", "coef_proj.beta.weight", "conv.k.weight"]
    own = dict(layer.named_parameters())
    params = tuple(own[n].detach().clone().requires_grad_(True) for n in names)
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def _all_domains_objective():
    """Per-token coefficients in every domain and parameters in several, in one derivable objective."""
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    dt = O.scalar("dt", domain="timestep")
    A = O.parameter("A", "column", domain="negative")
    g = O.row("g", domain="decay")
    eta = O.row("eta", domain="positive")
    beta = O.scalar("beta", domain="unit")
    c = O.scalar("c", domain="real")
    lam = O.parameter("lam", "row", domain="positive")
    u = O.parameter("u", "scalar", domain="unit")
    gamma = O.parameter("gamma", "matrix", domain="decay")
    w = O.parameter("w", "scalar")
    decay = sp.exp(dt * A) * g * gamma
    return O.Objective(O.sqnorm(S - decay * Sp) / 2 + O.sqnorm(S @ k - v, weight=beta * u * lam) / 2
                       - O.inner(S @ k, (eta + c * w) * v), name="all domains")


@pytest.mark.parametrize("decay_style", ["softplus", "mamba"])
def test_domains_are_kept(decay_style):
    torch.manual_seed(0)
    obj = _all_domains_objective()
    layer = OnlineSSM(obj, 8, n_heads=2, d_k=3, d_v=4, backend="recurrent", decay_style=decay_style)
    x = 3 * torch.randn(4, 5, 8)
    inputs, params = layer.scan_inputs(x)
    specs = layer.rule.inputs
    assert set(inputs) | set(params) == set(specs)
    check = {"unit": lambda t: ((t > 0) & (t < 1)).all(), "decay": lambda t: ((t > 0) & (t <= 1)).all(),
             "positive": lambda t: (t > 0).all(), "timestep": lambda t: (t > 0).all(),
             "negative": lambda t: (t < 0).all(), "real": lambda t: torch.isfinite(t).all(),
             "log_decay": lambda t: ((t <= 0) & torch.isfinite(t)).all()}
    for n, t in {**inputs, **params}.items():
        assert bool(check[specs[n].domain](t)), (n, specs[n].domain)
    assert specs["g"].domain == "log_decay"        # the layer hands its per-token decays over in log space
    # shapes follow the scan layout
    assert inputs["dt"].shape == (4, 5, 2) and inputs["g"].shape == (4, 5, 2, 4)
    assert params["A"].shape == (2, 3) and params["gamma"].shape == (2, 4, 3) and params["w"].shape == (2,)
    # and for other (random, moderate) raw weights: the domains come from the parameterisation
    # (fp32 saturates sigmoid / exp for |raw| >~ 16, so the raw values are kept moderate)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    inputs, params = layer.scan_inputs(x)
    for n, t in {**inputs, **params}.items():
        assert bool(check[specs[n].domain](t)), (n, specs[n].domain)
    y = layer(x)
    assert torch.isfinite(y).all()


def test_published_initialisations():
    torch.manual_seed(0)
    retnet = PRESETS["retnet"](32, 4, backend="recurrent")
    gamma = retnet.parameter_values(torch.float64)["gamma"]
    assert torch.allclose(gamma, 1 - 2.0 ** (-5 - torch.arange(4, dtype=torch.float64)), rtol=1e-6)
    assert not retnet.params_raw["gamma"].requires_grad  # RetNet's γ is fixed
    mamba = PRESETS["mamba"](32, 4, backend="recurrent")
    A = mamba.parameter_values()["A"]
    assert A.shape == (4, 16, 16)  # [H, d_v = 2 * 32 / 4, d_state = 16]
    assert torch.allclose(A, -torch.arange(1, 17.0).expand(4, 16, 16))  # S4D-real
    assert mamba.coef_rank == {"dt": 2}  # ceil(32 / 16)
    dt = torch.nn.functional.softplus(mamba.coef_bias["dt"])
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 1e-1 * (1 + 1e-5)).all()
    mamba2 = PRESETS["mamba2"](32, 4, backend="recurrent")
    A2 = mamba2.parameter_values()["A"]
    assert A2.shape == (4,) and ((A2 <= -1 + 1e-5) & (A2 >= -16 - 1e-4)).all()
    longhorn = PRESETS["longhorn"](32, 4, backend="recurrent")
    assert set(longhorn.rule.inputs) == {"beta", "k", "q", "v"}  # no A: no forget gate
    assert longhorn.D is not None and longhorn.qk_heads == 1 and longhorn.project_from == "value"
    dn = PRESETS["deltanet"](32, 4, backend="recurrent")
    x = torch.randn(2, 5, 32)
    inputs, _ = dn.scan_inputs(x)
    assert torch.allclose(inputs["k"].norm(dim=-1), torch.ones(2, 5, 4), atol=1e-5)
    assert torch.allclose(inputs["q"].norm(dim=-1), torch.ones(2, 5, 4), atol=1e-5)


def test_param_init_override_and_freeze():
    layer = OnlineSSM(_custom_objective(), 8, 2, param_init={"gamma": [0.5, 0.25]}, freeze=("gamma",),
                      backend="recurrent")
    assert torch.allclose(layer.parameter_values()["gamma"], torch.tensor([0.5, 0.25]))
    assert not layer.params_raw["gamma"].requires_grad
    with pytest.raises(ValueError, match="outside its domain"):
        OnlineSSM(_custom_objective(), 8, 2, param_init={"gamma": 1.5})
    # a value of another shape is named with the parameter's (torch's broadcast error had named neither)
    with pytest.raises(ValueError, match=r"param_init\['gamma'\] of shape \(3,\) does not broadcast to the "
                                         r"parameter's shape \(2,\)"):
        OnlineSSM(_custom_objective(), 8, 2, param_init={"gamma": [0.5, 0.5, 0.5]})


def test_a_log_decay_parameter_is_the_log_of_a_decay_parameter():
    """A learned parameter declared in the 'log_decay' domain (≤ 0) is log γ: the layer reading exp(g) is the
    one reading a 'decay' γ, initialised alike (RetNet's γ_h) and with param_init in log space. The oracle is the
    decay-domain layer with the same weights (float64, 1e-12). It had been read as 'real': g = +1 at init (a
    state growing by e per token, NaN by T = 200) and param_init raised KeyError."""
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    g = O.parameter("g", "scalar", domain="log_decay")
    gamma = O.parameter("gamma", "scalar", domain="decay")
    logged = O.Objective(O.sqnorm(S - sp.exp(g) * Sp) / 2 - O.inner(S @ k, v))
    raw = O.Objective(O.sqnorm(S - gamma * Sp) / 2 - O.inner(S @ k, v))
    x = torch.randn(2, 200, 8, dtype=torch.float64)
    for init_log, init_raw in ((None, None), ({"g": [math.log(0.5), math.log(0.25)]}, {"gamma": [0.5, 0.25]})):
        torch.manual_seed(0)
        a = OnlineSSM(logged, 8, 2, backend="chunk", param_init=init_log).double()
        torch.manual_seed(0)
        b = OnlineSSM(raw, 8, 2, backend="chunk", param_init=init_raw).double()
        torch.testing.assert_close(a.parameter_values(torch.float64)["g"].exp(),
                                   b.parameter_values(torch.float64)["gamma"], rtol=1e-12, atol=0)
        state = {n.replace("params_raw.gamma", "params_raw.g"): t for n, t in b.state_dict().items()}
        a.load_state_dict(state)
        torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"param_init\['g'\] is outside its domain 'log_decay'"):
        OnlineSSM(logged, 8, 2, param_init={"g": 0.5})
    # the closed ends of the domains (log γ = 0, γ = 1) are in them but out of −exp(w) / exp(−exp(w)): the message
    # had said "outside its domain 'log_decay' (≤ 0, ...)" of 0
    with pytest.raises(ValueError, match=r"'log_decay' as the layer parameterises it: < 0, as −exp\(w\)"):
        OnlineSSM(logged, 8, 2, param_init={"g": 0.0})
    with pytest.raises(ValueError, match=r"'decay' as the layer parameterises it: in \(0, 1\), as exp"):
        OnlineSSM(raw, 8, 2, param_init={"gamma": 1.0})


@pytest.mark.parametrize("backend", ["auto", "recurrent"])
@pytest.mark.parametrize("name", ["longhorn", "gated_deltanet", "decayed_least_squares", "mamba2"])
def test_bf16_autocast(name, backend):
    torch.manual_seed(0)
    layer = PRESETS[name](32, 4, backend=backend, **({"d_k": 16} if name == "mamba2" else {}))
    x = torch.randn(2, 6, 32)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y, cache = layer(x, return_cache=True)
        y.float().sum().backward()
        y_step, _ = layer.step(x[:, 0], layer.init_cache(2))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    states = cache["state"] if isinstance(cache["state"], tuple) else (cache["state"],)
    assert all(s.dtype == torch.float32 for s in states)
    assert (y.float() - y32).abs().max() < 0.05 * y32.abs().max() + 0.05
    assert y_step.dtype == torch.bfloat16 and (y_step.float() - y32[:, 0]).abs().max() < 0.05 * y32.abs().max() + 0.05
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters())


def test_rule_or_objective_and_repr():
    obj = _custom_objective()
    a = OnlineSSM(obj, 8, 2)
    b = OnlineSSM(derive(obj), 8, 2)
    assert a.rule is b.rule or str(a.rule) == str(b.rule)
    assert "custom" in repr(a)
    with pytest.raises(TypeError, match="Objective or Rule"):
        OnlineSSM("longhorn", 8, 2)


def test_auto_backend_runs():
    layer = PRESETS["deltanet"](16, 2)  # backend="auto"
    x = torch.randn(1, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = layer(x)
    ref = PRESETS["deltanet"](16, 2, backend="reference")
    ref.load_state_dict(layer.state_dict())
    assert torch.allclose(y, ref(x), rtol=1e-4, atol=1e-5)


def test_auto_falls_back_with_a_warning(monkeypatch):
    import olssm.layers.online_ssm as mod
    monkeypatch.setattr(mod, "available_backends", lambda: ("reference",))
    layer = PRESETS["deltanet"](16, 2).double()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="using the 'recurrent' token loop"):
        y = layer(x)
    ref = PRESETS["deltanet"](16, 2, backend="reference").double()
    ref.load_state_dict(layer.state_dict())
    assert torch.allclose(y, ref(x), rtol=1e-10, atol=1e-12)


def test_bad_configs():
    obj = _custom_objective()
    with pytest.raises(ValueError, match="not divisible by n_heads = 3"):
        OnlineSSM(obj, 16, n_heads=3)
    OnlineSSM(obj, 16, n_heads=3, d_k=4, d_v=4)  # explicit sizes need no divisibility
    with pytest.raises(ValueError, match="backend must be one of"):
        OnlineSSM(obj, 16, 2, backend="cuda")
    with pytest.raises(ValueError, match="n_heads must be an integer"):
        OnlineSSM(obj, 16, n_heads=0)
    with pytest.raises(ValueError, match="coef_rank names \\['dt'\\]"):
        OnlineSSM(obj, 16, 2, coef_rank={"dt": 2})
    with pytest.raises(ValueError, match="freeze names"):
        OnlineSSM(obj, 16, 2, freeze=("A",))
    with pytest.raises(ValueError, match="feature_map"):
        OnlineSSM(obj, 16, 2, feature_map="tanh")
    for bad in (0.0, -1.0, float("nan")):   # the softplus log decay is divided by it: NaN / sign-flipped decays
        with pytest.raises(ValueError, match="decay_normalizer must be a finite number > 0"):
            OnlineSSM(obj, 16, 2, decay_normalizer=bad)
    with pytest.raises(ValueError, match="qk_heads = 3 must divide n_heads = 2"):
        OnlineSSM(obj, 16, 2, qk_heads=3)
    with pytest.raises(ValueError, match="unknown mixer preset 'transformer'"):
        get_preset("transformer")
    with pytest.raises(ValueError, match="d_inner"):
        PRESETS["mamba"](10, 3)
    layer = OnlineSSM(obj, 16, 2, backend="recurrent")
    with pytest.raises(ValueError, match=r"x must be \[B, T, d_model\] with d_model=16, got \(2, 3, 8\)"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"x must be \[B, d_model\]"):
        layer.step(torch.randn(2, 3, 16), layer.init_cache(2))
    # (each of these was accepted, or failed far from its cause: coef_rank 0 built a full-rank projection, a NaN
    # q_scale made every output NaN, dt_min = 0 raised 'math domain error')
    with pytest.raises(ValueError, match=r"coef_rank\['beta'\] must be an integer >= 1, got 0"):
        PRESETS["deltanet"](16, 2, coef_rank=0)
    with pytest.raises(ValueError, match="q_scale must be a finite number"):
        OnlineSSM(obj, 16, 2, q_scale=float("nan"))
    for name, bad in (("dt_min", 0.0), ("dt_max", -1.0), ("dt_init_floor", float("inf"))):
        with pytest.raises(ValueError, match=f"{name} must be a finite number > 0"):
            PRESETS["mamba"](16, 2, **{name: bad})
    with pytest.raises(ValueError, match="dt_min must be <= dt_max"):
        PRESETS["mamba"](16, 2, dt_min=0.5, dt_max=0.1)
    # (each of these had been a raw torch / Python error far from its cause, or accepted: a negative norm_eps
    # made the output NaN, an invalid decay_init with the mamba style was ignored)
    with pytest.raises(ValueError, match=r"x is torch.float64 and the layer's weights torch.float32"):
        layer(torch.randn(2, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be a floating-point tensor, got torch.int64"):
        layer(torch.ones(2, 3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="norm_eps must be a finite number >= 0"):
        OnlineSSM(obj, 16, 2, norm_eps=-1.0)
    for bad in (0.9, (2.0, 3.0), (0.5, 0.1)):
        for style in ("softplus", "mamba"):
            with pytest.raises(ValueError, match="decay_init must be None or a pair"):
                OnlineSSM(obj, 16, 2, decay_style=style, decay_init=bad)
    with pytest.raises(ValueError, match="decay_normalizer=16.0 divides the 'softplus' style"):
        PRESETS["gated_deltanet"](16, 2, decay_normalizer=16.0)


def test_a_decay_starts_in_decay_init_in_either_style():
    """decay_init = (lo, hi) is where the decay starts at x = 0: through the projection's bias (softplus style)
    or dt_bias given A (mamba style, where it had been ignored). None keeps each style's own start: Gated
    DeltaNet's Δ in [dt_min, dt_max], so α = exp(−A Δ) with A < 16."""
    x = torch.zeros(1, 1, 16)
    for name in ("gla", "gated_deltanet"):
        layer = PRESETS[name](16, 2, decay_init=(0.01, 0.02))
        inputs, _ = layer.scan_inputs(x)
        decay = torch.exp(inputs["g" if name == "gla" else "alpha"])
        assert ((decay >= 0.01 * (1 - 1e-5)) & (decay <= 0.02 * (1 + 1e-5))).all(), (name, decay)
    torch.manual_seed(0)
    alpha = torch.exp(PRESETS["gated_deltanet"](16, 2).scan_inputs(x)[0]["alpha"])
    assert (alpha >= math.exp(-16 * 0.1) * (1 - 1e-5)).all() and (alpha < 1).all()


def test_project_from_value_reads_the_value_stream_at_any_width():
    """Mamba's block projects keys, queries and Δ from the convolved value stream. The layer had told the two
    sources apart by width, so with H·d_v = d_model it read the raw input instead (|Δk| = 1.8)."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 16)
    for d_v in (16, 8):                         # H·d_v = 32, and = d_model
        layer = PRESETS["mamba"](16, 2, d_v=d_v)
        inputs, _ = layer.scan_inputs(x)
        stream = layer._conv("v", layer.proj["v"](x), None)[0]
        torch.testing.assert_close(inputs["k"], layer.proj["k"](stream).unflatten(-1, (1, -1)), rtol=0, atol=0)
        dt = torch.nn.functional.softplus(layer.coef_proj["dt"](stream) + layer.coef_bias["dt"])
        torch.testing.assert_close(inputs["dt"], dt.unflatten(-1, (2, -1)), rtol=0, atol=0)


def test_presets_take_a_value_size_that_makes_the_sizes_valid():
    """Any preset default can be overridden: with d_v given, d_inner = expand · d_model need not divide by
    n_heads (it had been checked before the overrides were applied)."""
    for name in ("mamba", "longhorn", "mamba2"):
        assert PRESETS[name](10, 3, d_v=4, d_k=8).d_v == 4
    assert PRESETS["retnet"](16, 2, freeze="gamma").params_raw["gamma"].requires_grad is False  # one name


@pytest.mark.parametrize("name", ["deltanet", "mamba", "decayed_least_squares"])
def test_a_cache_for_another_batch_or_layer_is_named(name):
    """step and forward check the cache against the layer and the batch: step had failed inside torch.cat (a cache
    for another batch) or blamed the key input (a state of another d_k); forward had only the state checked."""
    layer = PRESETS[name](16, 2, backend="recurrent")
    x = torch.randn(2, 16)
    state = layer.init_cache(2)["state"]
    first = state[0] if isinstance(state, tuple) else state
    B, H, d_v, d_k = first.shape
    with pytest.raises(ValueError, match=rf"step: cache\['state'\] must be \(2, {H}, {d_v}, {d_k}\).*got"):
        layer.step(x, layer.init_cache(3))
    if layer.conv:
        conv = {n: t[:, :, :0] for n, t in layer.init_cache(2)["conv"].items()}
        with pytest.raises(ValueError, match=r"forward: cache\['conv'\]\['.*'\] must be \(2, "):
            layer(torch.randn(2, 3, 16), cache={"state": state, "conv": conv})
        # a cache without its conv tails (one built by hand from a scan's final state) had restarted the conv at
        # the boundary: the continuation off by O(1) (1.43 for DeltaNet), no error
        tails = layer.init_cache(2)["conv"]
        some = dict(list(tails.items())[:1])
        cases = [(None, r"cache\['conv'\] must be a dict"), ({}, r"lacks the short-conv tail")]
        if len(tails) > 1:   # some tails, not all
            cases.append((some, r"lacks the short-conv tail\(s\) " + re.escape(str(sorted(set(tails) - set(some))))))
        for conv, says in cases:
            with pytest.raises(ValueError, match=says):
                layer(torch.randn(2, 3, 16), cache={"state": state, **({} if conv is None else {"conv": conv})})
            with pytest.raises(ValueError, match=says):
                layer.step(x, {"state": state, "conv": conv})
    with pytest.raises(ValueError, match="cache must be a dict"):
        layer.step(x, [state])


def test_presets_use_catalogue_objectives():
    from olssm import catalogue
    for name, cls in PRESETS.items():
        layer = cls(32, 4, backend="recurrent", **({"d_k": 8} if name == "mamba2" else {}))
        assert isinstance(layer, OnlineSSM)
        assert layer.rule.objective is catalogue.get(name).objective or \
            str(layer.rule) == str(catalogue.get(name).rule)
        assert math.isfinite(float(layer(torch.randn(1, 3, 32)).sum()))


@settings(max_examples=15, deadline=None)
@given(H=st.integers(1, 4), d_k=st.integers(1, 4), d_v=st.integers(1, 4), conv=st.integers(0, 3),
       B=st.integers(1, 2), T=st.integers(1, 6), groups=st.integers(0, 2), d_skip=st.sampled_from([False, "channel", "head"]),
       gate=st.booleans(), norm=st.booleans(), backend=st.sampled_from(BACKENDS))
def test_shapes_and_step_equals_forward_hypothesis(H, d_k, d_v, conv, B, T, groups, d_skip, gate, norm, backend):
    torch.manual_seed(0)
    qk_heads = [g for g in (1, 2, H) if H % g == 0]
    qk_heads = qk_heads[groups % len(qk_heads)]                     # shared, grouped (H = 4: 2) or per head
    layer = OnlineSSM(_custom_objective(), 6, H, d_k=d_k, d_v=d_v, conv_size=conv, qk_heads=qk_heads,
                      d_skip=d_skip, gate=gate, out_norm=norm, backend=backend).double()
    x = torch.randn(B, T, 6, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (B, T, 6)
    ys, _ = _step_all(layer, x)
    assert torch.allclose(y, ys, rtol=1e-9, atol=1e-9)


def test_grouped_keys_equal_their_projections_repeated_per_head():
    """qk_heads = G: head h reads key / query group h // (H / G). The oracle: a per-head layer whose key and
    query projection (and conv) rows are the grouped layer's, repeated per head, gives the same output."""
    torch.manual_seed(0)
    H, G, d_k = 4, 2, 3
    kw = dict(d_k=d_k, d_v=2, conv_size=3, backend="chunk")
    grouped = OnlineSSM(catalogue.get("gated_deltanet").objective, 8, H, qk_heads=G, **kw).double()
    full = OnlineSSM(catalogue.get("gated_deltanet").objective, 8, H, **kw).double()
    heads = torch.arange(H) // (H // G)
    rows = (heads[:, None] * d_k + torch.arange(d_k)).flatten()       # head h's rows: its group's
    with torch.no_grad():
        for (n, p), (n2, p2) in zip(grouped.named_parameters(), full.named_parameters()):
            assert n == n2
            repeat = n.split(".")[1] in ("k", "q") and n.split(".")[0] in ("proj", "conv")
            p2.copy_(p[rows] if repeat else p)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    assert grouped.proj["k"].out_features == G * d_k
    torch.testing.assert_close(grouped(x), full(x), rtol=1e-10, atol=1e-12)


def test_mamba_family_parameter_counts_match_reference_code():
    """Same parameter count as the reference modules (mamba_simple.Mamba, longhorn.Longhorn, Mamba2)."""
    d, n, E, K = 32, 16, 64, 4  # d_model, d_state, d_inner = 2 d_model, d_conv
    r = math.ceil(d / 16)
    conv = E * K + E
    mamba = d * 2 * E + conv + E * (r + 2 * n) + (r * E + E) + E * n + E + E * d
    longhorn = d * 2 * E + conv + E * (r + 2 * n) + (r * E + E) + E + E * d
    H, N = 4, 128
    mamba2 = d * (2 * E + 2 * N + H) + (E + 2 * N) * (K + 1) + 3 * H + E + E * d
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(PRESETS["mamba"](d, 4)) == mamba
    assert count(PRESETS["longhorn"](d, 4)) == longhorn
    assert count(PRESETS["mamba2"](d, H)) == mamba2


def test_rls_rule_layer_decodes_like_its_forward():
    """An RLS rule starts from P = I/λ (not zeros): init_cache and the token loop must read the ridge
    parameter, or decoding diverges from the forward (float64, 1e-12)."""
    from olssm import catalogue
    torch.manual_seed(0)
    layer = OnlineSSM(catalogue.ENTRIES["rls"].objective, d_model=16, n_heads=2).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    y = layer(x)
    cache, ys = layer.init_cache(2), []
    for t in range(6):
        y_t, cache = layer.step(x[:, t], cache)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-12, atol=1e-12)


def test_rls_rule_with_a_per_token_ridge_decodes_from_its_first_token():
    """An RLS rule whose ridge is a per-token input starts from P = I/λ with the first token's λ (verify's and the
    forward's reading). init_cache cannot know it: it raised 'zero_state: missing input(s)', and step(x, None),
    which called it, made the rule undecodable. step(x, None) now starts from the first token's λ, as the forward's
    token loop does; the oracle is the forward (float64, 1e-12). init_cache names why it cannot."""
    S, _ = O.states()
    k, v = O.key("k"), O.value("v")
    obj = O.Objective(O.sqnorm(S @ k - v) / 2, update="exact", decay=O.scalar("gamma", domain="decay"),
                      ridge=O.scalar("lam", domain="positive"), ridge_decays=True)
    torch.manual_seed(0)
    layer = OnlineSSM(obj, 8, 2, backend="chunk").double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    y = layer(x)
    cache, ys = None, []
    for t in range(6):
        y_t, cache = layer.step(x[:, t], cache)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"init_cache: .*per-token input\(s\) \['lam'\].*step\(x_t, None\)"):
        layer.init_cache(2)


@pytest.mark.parametrize("name", ["longhorn", "mamba", "gated_deltanet"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_equal_separate_forwards(name, backend):
    """forward(x, cu_seqlens) on packed sequences equals each sequence run alone: the conv and the state
    restart at every boundary (float64, 1e-10); the returned cache holds each sequence's final state (an empty
    sequence: the zero state, as a forward on no tokens gives)."""
    torch.manual_seed(0)
    layer = PRESETS[name](D_MODEL, n_heads=H, backend=backend).double()
    lens = [5, 1, 0, 7]
    xs = [torch.randn(1, n, D_MODEL, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, 5, 6, 6, 13])
    y, cache = layer(torch.cat(xs, 1), cu_seqlens=cu, return_cache=True)
    for i, x in enumerate(xs):
        y_i, c_i = layer(x, return_cache=True)
        torch.testing.assert_close(y[:, cu[i]:cu[i + 1]], y_i, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cache["state"][i:i + 1], c_i["state"], rtol=1e-10, atol=1e-10)
        for n in c_i["conv"]:
            torch.testing.assert_close(cache["conv"][n][i:i + 1], c_i["conv"][n], rtol=1e-10, atol=1e-10)
    assert not cache["state"][2].any()
    # no tokens after a prefix: nothing comes out and the cache is unchanged
    y0, after = layer(xs[0][:, :0], cache={"state": cache["state"][:1], "conv": {n: c[:1] for n, c in
                                                                                 cache["conv"].items()}},
                      return_cache=True)
    assert y0.shape == (1, 0, D_MODEL)
    torch.testing.assert_close(after["state"], cache["state"][:1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch"):
        layer(torch.randn(2, 13, D_MODEL, dtype=torch.float64), cu_seqlens=cu)
    with pytest.raises(ValueError, match="end at T"):
        layer(torch.cat(xs, 1), cu_seqlens=torch.tensor([0, 5, 12]))
