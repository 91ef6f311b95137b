"""backend="triton": chunked kernels (chunked.py) and torch.compile / torch.library (library.py).

Under the Triton CPU interpreter (TRITON_INTERPRET=1, set before triton is imported) with tiny
shapes and 16-token chunks (the smallest chunk tl.dot accepts on a GPU). On a GPU:
`OLSSM_TRITON_DEVICE=cuda pytest tests/test_triton_chunked.py` (see olssm/kernels/TRITON.md).

Tolerances (fp32): o and every gradient: max|chunked - reference| <= 1e-5 * max|reference| + 1e-6,
as for the fused kernel. The final state gets 2e-5: the chunked kernel sums a chunk's
contributions as one matrix product (V ⊙ e^{b_last - b})ᵀ K instead of token by token, and
scales the carried state by the chunk's total decay e^{Σ log Λ} rather than the running product
of Λ, so its rounding differs from the step loop's by a few ulps per chunk (errors do not grow
with T: the carried state is contracted by the decay).
"""
import os

from triton_testing import (DEVICE as _DEVICE, RTOL, STATE_RTOL, close as _close, compare as _compare,  # noqa: E402
                            compare_checkpoint_storage as _compare_ck, compare_storage as _compare_storage,
                            benchmark_module, decay_scale_errors, dev as _dev, pin_fp32_storage, run as _run, spy,
                            run_interpreted_script, spy_launches)  # (sets TRITON_INTERPRET first)

import pytest  # noqa: E402
from pathlib import Path  # noqa: E402
import sympy as sp  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import olssm  # noqa: E402
from olssm import objectives as O  # noqa: E402
from strategies import objectives  # noqa: E402
from olssm import catalogue as cat  # noqa: E402
from olssm.catalogue import ENTRIES, random_inputs  # noqa: E402
from olssm.kernels.triton import chunked as tchunk  # noqa: E402
from olssm.kernels.triton import library as tlib  # noqa: E402
from olssm.kernels.triton import scan as tscan  # noqa: E402

CHUNKED = ["linear_attention", "retnet", "mamba2", "gla", "deltanet", "gated_deltanet", "longhorn"]


def _row_decay_rule():
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    r = O.row("r", domain="decay")
    return olssm.derive(O.Objective(O.sqnorm(S - O.diag(r) @ Sp) / 2 - O.inner(S @ k, v), name="row decay"))


def _row_decay_delta_rule():
    # per-value-row decay and a row-weighted squared loss (explicit step): row decay + row-c correction
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    r = O.row("r", domain="decay")
    return olssm.derive(O.Objective(O.sqnorm(S - O.diag(r) @ Sp) / 2 + O.sqnorm(S @ k - v, weight=O.row("b", positive=True)) / 2,
                                    update="explicit", name="row decay delta"))


def _log_gla_rule():
    # GLA with the column decay written in log space, Λ = exp(−a): log Λ in closed form, so "auto"
    # runs the chunked backward (GLA's own log g does not have one) and ∂a is exact at any decay
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    a = O.column("a", positive=True)
    return olssm.derive(O.Objective(O.sqnorm(S - Sp @ O.diag(sp.exp(-a))) / 2 - O.inner(S @ k, v), name="log GLA"))


def _rule(name):
    if name == "log_gla":
        return _log_gla_rule()
    if name == "row_decay":
        return _row_decay_rule()
    if name == "log_row_decay":   # the row decay read in log space: log Λ in closed form, the chunked backward
        return _row_decay_rule().with_log_decays()
    if name in cat.DERIVED:       # rank-2 corrections: the delta kernels on two sub-tokens per token
        return cat.rule(name)
    if name == "row_decay_delta":
        return _row_decay_delta_rule()
    return ENTRIES[name].rule


@pytest.fixture(autouse=True)
def _small(monkeypatch):
    monkeypatch.setattr(tlib, "CHUNK", 16)
    monkeypatch.setattr(tlib, "FORCE", None)
    monkeypatch.delenv("OLSSM_TRITON_KERNEL", raising=False)
    monkeypatch.setattr(tscan, "CHECKPOINT", 4)
    # these tests check the chunked kernels wherever the structure allows them; auto's speed policy
    # (compiled fp32 and row/column decays stay recurrent) has its own test below
    monkeypatch.setattr(tlib, "_chunk_pays", lambda plan, args: True)
    pin_fp32_storage(monkeypatch)


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of the chunked forward kernel."""
    return spy(monkeypatch, tchunk, "chunked_forward")




# ---- chunked kernels vs the reference ---------------------------------------------------------------

@pytest.mark.parametrize("name", CHUNKED + ["row_decay", "row_decay_delta"])
def test_chunked_forward_state_and_gradients(name, launches):
    rule = _rule(name)
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=1)       # 37 = 2 chunks of 16 + 5
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(2))
    _compare(rule, inp, h0)
    assert len(launches) == 1


@pytest.mark.parametrize("name, G", [("mamba2", 1), ("gated_deltanet", 2)])
def test_grouped_keys(name, G, launches):
    # key-sized inputs with G of H = 4 heads (Mamba-2's ngroups): through the chunked kernels, forward and
    # every gradient (each group's summed over its heads) against the reference, which
    # test_reference_scan holds equal to the inputs repeated per head
    rule = _rule(name)
    inp = random_inputs(rule, 1, 37, 4, 5, 6, seed=8)       # 37 = 2 chunks of 16 + 5
    inp = {n: (x[:, :, :G].contiguous() if rule.inputs[n].kind == "column" and not rule.inputs[n].is_parameter else x)
           for n, x in inp.items()}
    _compare(rule, inp, 0.3 * torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(8)))
    assert len(launches) == 1


@pytest.mark.parametrize("name", ["mamba2", "linear_attention", "gla", "row_decay", "log_row_decay"])
def test_chunked_backward_kernel_and_recurrent_backward_agree(name, monkeypatch):
    # decays without corrections use chunk_bwd_kernel; the recurrent backward on the chunked forward's
    # checkpoints is the other path (CHUNK_BACKWARD=False): both against the reference
    calls = spy(monkeypatch, tchunk, "chunked_backward")
    rule = _rule(name)
    inp = random_inputs(rule, 1, 40, 2, 5, 6, seed=14)
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(14))
    _compare(rule, inp, h0)
    raw = name in ("gla", "row_decay")
    assert len(calls) == (0 if raw else 1)              # auto: a raw decay's log has no closed form
    monkeypatch.setattr(tlib, "CHUNK_BACKWARD", True)   # fine for decays ≫ eps (here g ∈ [0.8, 1])
    _compare(rule, inp, h0)
    assert len(calls) == (1 if raw else 2)
    calls.clear()
    monkeypatch.setattr(tlib, "CHUNK_BACKWARD", False)
    _compare(rule, inp, h0)
    assert len(calls) == 0


@pytest.mark.parametrize("name", ["retnet", "gla"])
def test_chunked_without_initial_state_and_no_grad(name, launches):
    rule = _rule(name)
    inp = random_inputs(rule, 1, 40, 2, 4, 20, seed=3)      # d_v = 20: two 16-row blocks, masked
    _compare(rule, inp, None, grad=False)
    assert len(launches) == 1


@pytest.mark.parametrize("name, path", [(n, "fused") for n in ("mamba2", "gla", "row_decay", "gated_deltanet",
                                                                  "row_decay_delta", "log_row_decay", "two_keys")]
                         + [(n, "split") for n in ("mamba2", "gla", "log_row_decay")])
def test_strong_and_zero_decays_stay_finite(name, path, monkeypatch):
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", path)   # the diagonal rules' two paths (DIAG_PATH)
    rule = _rule(name)
    inp = random_inputs(rule, 1, 35, 2, 5, 6, seed=4)
    if name == "mamba2":
        inp["dt"] = inp["dt"] * 2000.0            # Δ·a ≈ -300..-5000 per token: exp underflows to 0
    elif name == "log_row_decay":                 # the chunked backward, under auto
        inp["r"][:, ::3] = -69.0
        inp["r"][:, 5::7] = -400.0                # e^{-400} = 0 in fp32: a reset, without a log
    else:
        dn = {"gla": "g", "row_decay": "r", "gated_deltanet": "alpha", "row_decay_delta": "r", "two_keys": "alpha"}[name]
        d = inp[dn]
        d[:, ::3] = 1e-30                         # e^{-69} per token; Σ over a chunk ≈ -400
        d[:, 5::7] = 0.0                          # exact resets (log clamped at log(float32 tiny))
        inp[dn] = d
    h0 = torch.randn(1, 2, 6, 5)
    tlib.FORCE = "chunk"
    o, f, g = _run(rule, inp, h0, "triton")
    assert all(torch.isfinite(x).all() for x in (o, f, *g.values()))
    o1, f1, g1 = _run(rule, inp, h0, "reference")
    _close(o, o1, RTOL, "o")
    _close(f, f1, STATE_RTOL, "final state")
    for n in g1:   # auto backward: the decay gradient is exact (no ∂logΛ / Λ with Λ = 0 or 1e-30)
        _close(g[n], g1[n], RTOL, f"d{n}")


def _log_decay_input(name, inp, log_decay):
    """Set the log decay of the rule's decay input (`log_decay`: [T, d] or broadcastable)."""
    if name == "log_gla":
        inp["a"] = (-log_decay).expand_as(inp["a"]).clone()
    elif name == "log_row_decay":
        inp["r"] = log_decay.expand_as(inp["r"]).clone()
    else:
        dn = {"gla": "g", "row_decay": "r"}[name]
        inp[dn] = torch.exp(log_decay).expand_as(inp[dn]).clone()


@pytest.mark.parametrize("name, path", [("gla", "fused"), ("log_gla", "fused"), ("row_decay", "fused"),
                                        ("log_row_decay", "fused"), ("log_gla", "split")])
def test_row_and_column_decays_fast_path_and_loop_per_chunk(name, path, monkeypatch):
    # chunks of 16: 0 mild; 1 one token at log decay −50 in every column (total > −FAST_SPAN: the
    # factorised dots, factors up to e^{±25}); 2 three tokens at −80 in one column (total −240 <
    # −FAST_SPAN: the per-token loop; factors e^{±120} would overflow); 3 a partial chunk of 5. "split": the split
    # diagonal path, whose gradient kernels (chunk_diag_dqk_kernel, chunk_diag_dv_kernel) take either per chunk too
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", path)
    calls = spy(monkeypatch, tchunk, "chunked_backward")
    rule = _rule(name)
    T, K, V = 53, 5, 6
    inp = random_inputs(rule, 1, T, 2, K, V, seed=31)
    d = V if name in ("row_decay", "log_row_decay") else K
    ld = -0.2 * torch.rand(T, 1, d, generator=torch.Generator().manual_seed(32))
    ld[20] = -50.0
    ld[[36, 40, 44], :, 1] = -80.0
    _log_decay_input(name, inp, ld)
    span = tchunk.fast_span()
    tot = ld[:48].reshape(3, 16, d).sum(1).amin(1)                # each full chunk's min over columns
    assert tot[0] > -span and -span < tot[1] < -40 and tot[2] < -span
    h0 = 0.3 * torch.randn(1, 2, V, K, generator=torch.Generator().manual_seed(33))
    _compare(rule, inp, h0)
    assert len(calls) == (1 if name.startswith("log") else 0)   # log decays: the chunked backward's two paths


@pytest.mark.parametrize("name", ["log_gla", "row_decay", "log_row_decay"])
def test_fast_path_and_loop_agree(name, monkeypatch):
    # FAST_SPAN = +inf takes the factorised dots in every chunk, −inf the per-token loop: on mild decays
    # (log decay −0.2..0 per token) both must agree to fp32 rounding, forward and (log GLA) backward
    rule = _rule(name)
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=34)
    d = 6 if name in ("row_decay", "log_row_decay") else 5
    _log_decay_input(name, inp, -0.2 * torch.rand(37, 1, d, generator=torch.Generator().manual_seed(35)))
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(36))
    tlib.FORCE = "chunk"
    res = []
    for span in (float("inf"), float("-inf")):
        monkeypatch.setattr(tchunk, "FAST_SPAN", span)
        res.append(_run(rule, inp, h0, "triton"))
    (o1, f1, g1), (o2, f2, g2) = res
    assert not torch.equal(o1, o2)                                # two different computations
    _close(o1, o2, RTOL, "o: fast path vs loop")
    _close(f1, f2, RTOL, "final state: fast path vs loop")
    for n in g1:
        _close(g1[n], g2[n], RTOL, f"d{n}: fast path vs loop")


@pytest.mark.parametrize("name, dtype", [("gla", torch.bfloat16), ("gated_deltanet", torch.float16)])
def test_low_precision_inputs(name, dtype, launches):
    # same rounded values in fp32 through the reference: the kernels accumulate in fp32, so o differs
    # by its rounding to the output dtype (2e-2 relative, as for the fused kernel); the fp32 final
    # state by the dots' precision: "auto" runs low-precision inputs through tf32 tensor-core dots
    # when compiled (10-bit mantissa, 2^-11 per product; measured 3e-4..7e-4 relative on an H100 at
    # T=33), exact fp32 under the interpreter
    rule = _rule(name)
    low = {n: x.to(dtype) for n, x in random_inputs(rule, 1, 33, 1, 4, 5, seed=12).items()}
    with torch.no_grad():
        o, f = rule.scan(backend="triton", output_final_state=True, **{n: _dev(x) for n, x in low.items()})
        o1, f1 = rule.scan(backend="reference", output_final_state=True, **{n: x.float() for n, x in low.items()})
    assert o.dtype == dtype and f.dtype == torch.float32 and len(launches) == 1
    _close(o, o1, 2e-2, "o")
    _close(f, f1, 1e-5 if _DEVICE == "cpu" else 2e-3, "final state")


#: DOT_PRECISION "bf16" against the fp32 reference on the same bf16 inputs, relative to max|reference|: every dot
#: operand is rounded to bf16 (≤ 2⁻⁹ relative each, so ≤ 2⁻⁸ per product) and o and the gradients are bf16 outputs
#: (one more 2⁻⁹ rounding); a few such terms differ in sign, so 2e-2 ≈ 5·2⁻⁸ (as STORAGE_RTOL). The final state is
#: fp32 but every chunk's update is a dot of rounded operands: measured ≤ 6.5e-3 at T = 45 under the interpreter,
#: 2e-2. A kernel that dropped or mis-scaled a term is off by O(1).
BF16_DOT_RTOL = 2e-2


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "longhorn", "gla", "mamba2", "two_keys"])
def test_bf16_dot_operands(name, launches, monkeypatch):
    # the split and fused delta forwards, the chunked delta, row-c and decay backwards and the sub-token layout,
    # each with bf16 operands (_mm); the same inputs' fp32 reference is the oracle
    rule = _rule(name)
    low = {n: x if rule.inputs[n].is_parameter else x.to(torch.bfloat16)
           for n, x in random_inputs(rule, 2, 45, 2, 8, 8, seed=3).items()}
    h0 = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(tchunk, "DOT_PRECISION", "bf16")
    monkeypatch.delenv("OLSSM_TRITON_DOT_PRECISION", raising=False)
    o, f, g = _run(rule, low, h0, "triton")
    assert len(launches) == 1
    o1, f1, g1 = _run(rule, {n: x.float() for n, x in low.items()}, h0, "reference")
    _close(o, o1, BF16_DOT_RTOL, "o")
    _close(f, f1, BF16_DOT_RTOL, "final state")
    for n in g1:
        _close(g[n], g1[n], BF16_DOT_RTOL, f"d{n}")
    # the operands were rounded: the fp32 state is off by more than fp32 dots would leave (≤ 2e-5, STATE_RTOL)
    monkeypatch.setattr(tchunk, "DOT_PRECISION", "ieee")
    _, f2, _ = _run(rule, low, h0, "triton", grad=False)
    assert (f - f2).abs().max() > 1e-4 * f2.abs().max()


def test_wide_key_settings(monkeypatch):
    # measured policy (chunked.WIDE_KEYS, benchmarks/RESULTS.md session 8): the split delta path at d_k > 64 takes
    # chunks of 64, 2 pipeline stages and, for bf16 inputs under "auto", bf16 dot operands; nothing else does
    monkeypatch.setattr(tchunk, "DOT_PRECISION", "auto")
    monkeypatch.setattr(tchunk, "NUM_STAGES", None)
    monkeypatch.delenv("OLSSM_TRITON_DOT_PRECISION", raising=False)
    monkeypatch.setattr(tscan, "interpreted", lambda: False)
    for name, wide in [("deltanet", True), ("gated_deltanet", True), ("two_keys", False), ("longhorn", False),
                       ("longhorn_forget", False), ("gla", False), ("mamba2", False), ("linear_attention", False)]:
        plan = tscan.plan_for(_rule(name) if name != "longhorn_forget" else cat.rule(name))
        assert tchunk.wide(plan.rule.form, 128) is wide, name
        assert not tchunk.wide(plan.rule.form, 64), name
        # 16: the _small fixture's CHUNK; 64 on the split diagonal path too, where DIAG_PATH's default ("wide",
        # session 22) takes it at d_k > 64
        wide_diag = name in ("gla", "mamba2", "linear_attention")
        assert tlib.chunk_size(plan, 128) == (64 if wide or wide_diag else 16), name
        assert tlib.chunk_size(plan, 64) == 16, name
        assert tlib.chunk_size(plan, 128, "fused", "fused") == 16, name   # the fused forwards keep CHUNK
    # the split diagonal path at d_k > 64 (chunked.wide_diag, session 15): chunks of 64 for no, a scalar or a column
    # decay with one input term (its whole-gradient kernels); a row decay, a rule with corrections that is not on the
    # wide-key delta path (two_keys: rank 2), the fused walk and d_k = 64 keep CHUNK
    for name, wide in [("mamba2", True), ("gla", True), ("linear_attention", True), ("retnet", True),
                       ("row_decay", False), ("two_keys", False)]:
        plan = tscan.plan_for(_rule(name))
        assert tlib.chunk_size(plan, 128, "", "split") == (64 if wide else 16), name
        assert tlib.chunk_size(plan, 64, "", "split") == 16, name
        assert tlib.chunk_size(plan, 128, "", "fused") == 16, name
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", "fused")   # the path the launch would take when the config names none
    assert tlib.chunk_size(tscan.plan_for(_rule("mamba2")), 128) == 16
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", "split")
    assert tlib.chunk_size(tscan.plan_for(_rule("mamba2")), 128) == 64
    monkeypatch.delenv("OLSSM_TRITON_DIAG_PATH")
    assert tchunk._launch_opts(True)["num_stages"] == 2 and "num_stages" not in tchunk._launch_opts(False)
    assert tchunk._precision(torch.bfloat16, True) in ("bf16", "bf16_interpreted")
    assert tchunk._precision(torch.bfloat16, False) == tchunk._precision(torch.float16, True) == "tf32"
    assert tchunk._precision(torch.float32, True) == "ieee"
    monkeypatch.setattr(tchunk, "NUM_STAGES", 3)   # an explicit setting wins
    assert tchunk._launch_opts(True)["num_stages"] == 3
    monkeypatch.setattr(tchunk, "WIDE_KEYS", None)
    assert not tchunk.wide(tscan.plan_for(_rule("deltanet")).rule.form, 128)


@pytest.mark.parametrize("name, bf16_operands", [("deltanet", True), ("gated_deltanet", False)])
def test_wide_keys_bf16_operands_only_without_a_decay(name, bf16_operands, monkeypatch):
    # bf16 inputs at d_k = 72: every launch of the forward and the backward asks _precision for bf16 operands on
    # DeltaNet and never on Gated DeltaNet, whose ∂ log γ (a reverse cumulative sum of differences of products)
    # was 2.1 % off with them at chunk 64 (WIDE_KEYS); both against the fp32 reference at BF16_DOT_RTOL
    from olssm.kernels.triton import chunked_delta_bwd as tdbw
    asked = []
    real = tchunk._precision
    spy_precision = lambda dtype=torch.float32, bf16_operands=False: asked.append(bf16_operands) or real(dtype, bf16_operands)
    monkeypatch.setattr(tchunk, "_precision", spy_precision)
    monkeypatch.setattr(tdbw, "_precision", spy_precision)
    monkeypatch.setattr(tchunk, "DOT_PRECISION", "auto")
    monkeypatch.delenv("OLSSM_TRITON_DOT_PRECISION", raising=False)
    rule = _rule(name)
    low = {n: x if rule.inputs[n].is_parameter else x.to(torch.bfloat16)
           for n, x in random_inputs(rule, 1, 70, 1, 72, 8, seed=6).items()}
    o, f, g = _run(rule, low, None, "triton")
    o1, f1, g1 = _run(rule, {n: x.float() for n, x in low.items()}, None, "reference")
    assert asked and set(asked) == {bf16_operands}, asked
    _close(o, o1, BF16_DOT_RTOL, "o")
    _close(f, f1, BF16_DOT_RTOL, "final state")
    for n in g1:
        _close(g[n], g1[n], BF16_DOT_RTOL, f"d{n}")


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_wide_keys_run_chunks_of_64(name, monkeypatch):
    # d_k = 72 > 64: the policy's chunk of 64 tokens (3 chunks, the last partial), every gradient against the
    # reference at the fp32 tolerances (RTOL, STATE_RTOL); the chunk size the forward ran is checked, so that
    # a policy that stopped applying could not pass
    seen = []
    real = tchunk.chunked_forward
    monkeypatch.setattr(tchunk, "chunked_forward",
                        lambda plan, chunk_in, h0, o, ht, ck, sizes, *a, **k: seen.append(sizes[7]) or
                        real(plan, chunk_in, h0, o, ht, ck, sizes, *a, **k))
    rule = _rule(name)
    inp = random_inputs(rule, 1, 140, 1, 72, 20, seed=8)
    _compare(rule, inp, 0.3 * torch.randn(1, 1, 20, 72, generator=torch.Generator().manual_seed(9)))
    assert seen == [64]


@pytest.mark.parametrize("name", ["mamba2", "log_gla"])
def test_split_diagonal_path_runs_chunks_of_64_at_wide_keys(name, monkeypatch):
    # d_k = 72 > 64 on the split diagonal path (chunked.wide_diag): chunks of 64 tokens (3, the last partial) through
    # the state passes, the output and the whole-gradient kernels, o, the final state and every gradient against the
    # reference (RTOL, STATE_RTOL); the chunk the forward ran is checked, so a policy that stopped applying fails here
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", "split")
    seen = []
    real = tchunk.chunked_forward
    monkeypatch.setattr(tchunk, "chunked_forward",
                        lambda plan, chunk_in, h0, o, ht, ck, sizes, *a, **k: seen.append(sizes[7]) or
                        real(plan, chunk_in, h0, o, ht, ck, sizes, *a, **k))
    whole = spy(monkeypatch, tchunk, "_diag_split_backward_whole")
    rule = _rule(name)
    inp = random_inputs(rule, 1, 140, 1, 72, 20, seed=10)
    _compare(rule, inp, 0.3 * torch.randn(1, 1, 20, 72, generator=torch.Generator().manual_seed(11)))
    assert seen == [64] and len(whole) == 1


@pytest.mark.parametrize("path", ["fused", "split"])
def test_raw_log_gate_matches_the_floored_copy(path, monkeypatch):
    # GLA's log gate (a column input as it is: _Entries.raw_log) reaches the kernels as the caller gave it (RAW_INPUTS),
    # floored at log(float32 tiny) on load and its gradient masked there, on both diagonal paths; against
    # OLSSM_TRITON_RAW_INPUTS=0 (an fp32 copy floored by torch): o, the final state and every gradient agree to fp32
    # rounding, with gates below the floor (−200, −inf: a reset, zero gradient). The spy sees which tensor the kernels
    # got: the caller's (a leaf) or torch's floored copy; bf16 gates go as bf16
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", path)
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    tlib.FORCE = "chunk"
    rule = ENTRIES["gla"].rule.with_log_decays()
    assert tchunk._entries(rule.form).raw_log == "g"
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=41)
    inp["g"][:, 3] = -200.0
    inp["g"][:, 20, :, 1] = float("-inf")
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(41))
    gates = []
    real = tchunk.chunk_inputs
    monkeypatch.setattr(tchunk, "chunk_inputs", lambda *a, **k: (lambda out: gates.append(out[3]) or out)(real(*a, **k)))
    got = _run(rule, inp, h0, "triton")
    assert gates[-1].is_leaf and gates[-1].dtype == torch.float32
    assert (got[2]["g"][:, 3] == 0).all() and got[2]["g"][:, 20, :, 1].eq(0).all()
    monkeypatch.setenv("OLSSM_TRITON_RAW_INPUTS", "0")
    ref = _run(rule, inp, h0, "triton")
    assert not gates[-1].is_leaf
    _close(got[0], ref[0], 1e-6, "o")
    _close(got[1], ref[1], 1e-6, "final state")
    for n in ref[2]:
        _close(got[2][n], ref[2][n], 1e-6, f"d{n}")
    monkeypatch.delenv("OLSSM_TRITON_RAW_INPUTS")
    low = {n: x.to(torch.bfloat16) for n, x in inp.items()}
    o, f, g = _run(rule, low, h0, "triton")
    assert gates[-1].dtype == torch.bfloat16 and all(torch.isfinite(x).all() for x in (o, f, *g.values()))


def test_auto_speed_policy_when_compiled(monkeypatch):
    # measured (benchmarks/RESULTS.md): compiled fp32 ("ieee") chunked dots are slower than the recurrent kernel
    # (H100), GLA's column decay chunked is 4.8x faster fwd+bwd (H200, session 7); row decays stay recurrent
    # (untimed since their fast path)
    monkeypatch.undo()
    monkeypatch.setattr(tscan, "interpreted", lambda: False)
    monkeypatch.setattr(tchunk, "DOT_PRECISION", "auto")
    monkeypatch.delenv("OLSSM_TRITON_DOT_PRECISION", raising=False)
    for name, dtype, pays in [("deltanet", torch.bfloat16, True), ("mamba2", torch.float16, True),
                              ("deltanet", torch.float32, False), ("gla", torch.bfloat16, True),
                              ("longhorn_forget", torch.bfloat16, False)]:
        rule = ENTRIES[name].rule if name in ENTRIES else cat.rule(name)
        inp = {n: x.to(dtype) if not rule.inputs[n].is_parameter else x
               for n, x in random_inputs(rule, 1, 4, 1, 4, 4, seed=0).items()}
        args = olssm.kernels.api.check_scan_args(rule, None, None, None, initial_state=None,
                                                 output_final_state=False, cu_seqlens=None, inputs=inp)
        assert tlib._chunk_pays(tscan.plan_for(rule), args) is pays, (name, dtype)


def test_auto_selection_and_forcing(launches, monkeypatch):
    rule = ENTRIES["retnet"].rule
    short = {n: _dev(x) for n, x in random_inputs(rule, 1, 31, 1, 4, 4, seed=5).items()}   # T < 2 chunks
    long = {n: _dev(x) for n, x in random_inputs(rule, 1, 32, 1, 4, 4, seed=5).items()}
    with torch.no_grad():
        rule.scan(backend="triton", **short)
        assert len(launches) == 0
        o_c, _ = rule.scan(backend="triton", **long)
        assert len(launches) == 1
        monkeypatch.setenv("OLSSM_TRITON_KERNEL", "recurrent")
        o_r, _ = rule.scan(backend="triton", **long)
        assert len(launches) == 1
        monkeypatch.setenv("OLSSM_TRITON_KERNEL", "chunk")
        rule.scan(backend="triton", **short)
        assert len(launches) == 2
    _close(o_c, o_r, RTOL, "chunked vs recurrent")


def test_unsupported_structures_use_the_recurrent_kernel(launches):
    for name in ["mamba", "longhorn_diag"]:      # elementwise decays
        rule = ENTRIES[name].rule
        with torch.no_grad():
            rule.scan(backend="triton", **{n: _dev(x) for n, x in random_inputs(rule, 1, 33, 1, 4, 4).items()})
    assert len(launches) == 0
    tlib.FORCE = "chunk"
    rule = ENTRIES["mamba"].rule
    with pytest.raises(NotImplementedError, match="no chunked kernel"):
        rule.scan(backend="triton", **{n: _dev(x) for n, x in random_inputs(rule, 1, 33, 1, 4, 4).items()})


@pytest.mark.parametrize("name", ["mamba2", "gated_deltanet"])
def test_varlen_chunked(name, launches):
    rule = ENTRIES[name].rule
    cu = [0, 35, 35, 40, 72]        # 35 = 2 chunks + 3, an empty sequence, a 5-token one, 32 = 2 chunks
    inp = random_inputs(rule, 1, 72, 1, 4, 5, seed=6)
    h0 = 0.3 * torch.randn(4, 1, 5, 4, generator=torch.Generator().manual_seed(6))
    cu_t = _dev(torch.tensor(cu, dtype=torch.int32))
    res = {}
    for backend in ("reference", "triton"):
        x = {n: _dev(t).clone().requires_grad_() for n, t in inp.items()}
        h = _dev(h0).clone().requires_grad_()
        o, f = rule.scan(backend=backend, cu_seqlens=cu_t, initial_state=h, output_final_state=True, **x)
        loss = (o * torch.cos(torch.arange(o.numel(), device=o.device)).reshape(o.shape)).sum() + (f * f).sum()
        res[backend] = (o, f, torch.autograd.grad(loss, [h, *x.values()]))
    assert len(launches) == 1
    (o1, f1, g1), (o2, f2, g2) = res["reference"], res["triton"]
    _close(o2, o1, RTOL, "o")
    _close(f2, f1, STATE_RTOL, "final states")
    _close(f2[1], h0[1], 0, "the empty sequence keeps its state")
    for a, b in zip(g2, g1):
        _close(a, b, RTOL, "grad")


@pytest.mark.parametrize("prox", ["scalar", "column", "row_delta"])
def test_two_input_terms(prox, launches):
    S, Sp = O.states()
    k, v, kl, vl = O.key("k"), O.value("v"), O.key("kl"), O.value("vl")
    if prox == "scalar":
        expr = O.sqnorm(S - O.scalar("a", domain="decay") * Sp) / 2
    elif prox == "column":
        expr = O.sqnorm(S - Sp @ O.diag(O.column("c", domain="decay"))) / 2
    else:
        expr = O.sqnorm(S - O.diag(O.row("r", domain="decay")) @ Sp) / 2 + O.sqnorm(S @ k - v) / 2
        k = O.key("k2")
    rule = olssm.derive(O.Objective(expr - O.inner(S @ k, v) - O.inner(S @ kl, O.row("s") * vl)))
    assert len(rule.form.inputs) >= 2
    tlib.FORCE = "chunk"
    _compare(rule, random_inputs(rule, 1, 21, 1, 4, 5, seed=13), 0.3 * torch.randn(1, 1, 5, 4))
    assert len(launches) == 1


def test_two_key_rule_runs_the_chunked_kernels(launches):
    # rank-4 corrections (Woodbury mixing of k0, k1): the delta kernels on 4 sub-tokens per token
    # (test_triton_delta_bwd.py has the rank-R tests: backwards, varlen, layout)
    S, Sp = O.states()
    obj = O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ O.key("k0") - O.value("v0")) / 2
                      + O.sqnorm(S @ O.key("k1") - O.value("v1"), weight=O.scalar("b1", positive=True)) / 2)
    rule = olssm.derive(obj)
    assert rule.form.rank >= 2
    _compare(rule, random_inputs(rule, 1, 33, 1, 4, 5, seed=11), None)
    assert len(launches) == 1


@settings(max_examples=int(os.environ.get("OLSSM_TRITON_EXAMPLES", 6)), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(objectives(prox_kinds=("none", "plain", "scalar", "row", "column", "log_scalar"), max_keys=2), st.integers(0, 3))
def test_custom_objectives_chunked_match_reference(obj, seed):
    try:
        rule = olssm.derive(obj)
    except O.DerivationError:
        return
    inp = random_inputs(rule, 1, 18, 1, 4, 5, seed=seed)
    h0 = 0.3 * torch.randn(1, 1, 5, 4, generator=torch.Generator().manual_seed(seed))
    if rule.is_exact:
        return
    # the initial state gives d_k, d_v even to rules that read no key- or value-sized input
    args = olssm.kernels.api.check_scan_args(rule, None, None, None, initial_state=h0, output_final_state=True,
                                             cu_seqlens=None, inputs=inp)
    if tchunk.unsupported(tscan.plan_for(rule), args):
        return
    tlib.FORCE = "chunk"
    saved = tchunk.DIAG_PATH
    try:
        for tchunk.DIAG_PATH in ("fused", "split"):   # the split diagonal path too (the delta family ignores it)
            _compare(rule, inp, h0)
    finally:
        tchunk.DIAG_PATH = saved


@pytest.mark.parametrize("path", ["fused", "split"])
def test_long_sequences_with_strong_decays(path, monkeypatch):
    # T = 4096 (256 chunks of 16) of Mamba-2 with Δ·A from −0.01 to −50 per token, resets included (Δ·A = −1e4): no
    # overflow or NaN anywhere, and o, the final state and every gradient match the reference, on both diagonal paths
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", path)
    rule = ENTRIES["mamba2"].rule
    inp = random_inputs(rule, 1, 4096, 1, 4, 4, seed=41)
    g = torch.Generator().manual_seed(41)
    inp["dt"] = torch.exp(torch.empty(1, 4096, 1).uniform_(-4.6, 3.9, generator=g))   # Δ·A ∈ [−0.01 |A|, −50 |A|]
    inp["dt"][:, ::997] = 1e4                                                              # resets
    tlib.FORCE = "chunk"
    # (compare's check asserts every triton output finite before it compares)
    _compare(rule, inp, 0.3 * torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(41)))


# ---- torch.compile / torch.library --------------------------------------------------------------------

def _loss_fn(rule):
    def fn(h0, inp):
        o, f = rule.scan(backend="triton", initial_state=h0, output_final_state=True, **inp)
        return (o * o).sum() + (f * torch.arange(f.numel(), device=f.device).reshape(f.shape)).sum() * 1e-2
    return fn


# recurrent (in-kernel grads); chunked forward + recurrent backward; chunked forward + chunked backward (with Δ·x's
# Function, chunked._Scaled, traced: under torch 2.11 its old out= forward gave wrong compiled gradients, session 14);
# forced: FORCE "chunk", the chunked backward on, and a spy on scaled_backward (its kernel ran in both runs; the
# spy's side effect keeps dynamo from tracing the Function, which is how these passed on the H100 while the others
# failed)
@pytest.mark.parametrize("name, T, forced", [("mamba", 6, False), ("gated_deltanet", 33, False), ("mamba2", 33, False),
                                             ("mamba2", 33, True), ("deltanet", 20, True)])
def test_torch_compile_matches_eager(name, T, forced, monkeypatch):
    torch._dynamo.reset()
    if forced:
        monkeypatch.setattr(tlib, "FORCE", "chunk")
        monkeypatch.setattr(tlib, "CHUNK_BACKWARD", True)
        scaled = spy(monkeypatch, tchunk, "scaled_backward")
    rule = ENTRIES[name].rule
    inp = random_inputs(rule, 1, T, 2, 4, 4, seed=8)
    h0 = _dev(0.3 * torch.randn(1, 2, 4, 4))
    fn = _loss_fn(rule)
    outs = []
    for f in (fn, torch.compile(fn, backend="aot_eager")):
        x = {n: _dev(t).clone().requires_grad_() for n, t in inp.items()}
        h = h0.clone().requires_grad_()
        loss = f(h, x)
        outs.append((loss, torch.autograd.grad(loss, [h, *x.values()])))
    (l1, g1), (l2, g2) = outs
    _close(l2, l1, 1e-6, "loss")
    for a, b in zip(g2, g1):
        _close(a, b, 1e-6, "grad")
    if forced:
        assert len(scaled) >= 2   # eager and compiled


def test_scaled_function_is_traced_with_its_product(monkeypatch):
    # under torch.compile β·v's autograd.Function is traced into the graph (higher_order.autograd_function_apply) with
    # the product then one rounding as its forward (not out=, which torch 2.11's dynamo turned into wrong gradients:
    # session 14, test_torch_compile_matches_eager[mamba2-33] failing on an H100 and on the CPU under torch 2.11).
    # With SCALE_ON_LOAD (the default under fp32 chunk storage) there is no product to trace: v and β go to the op
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    monkeypatch.delenv("OLSSM_TRITON_SCALE_ON_LOAD", raising=False)
    rule = ENTRIES["deltanet"].rule
    for on in (False, True):
        monkeypatch.setattr(tchunk, "SCALE_ON_LOAD", on)
        torch._dynamo.reset()
        inp = {n: _dev(t).requires_grad_() for n, t in random_inputs(rule, 1, 20, 2, 4, 4, seed=8).items()}
        graphs = []

        def keep(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch.compile(_loss_fn(rule), backend=keep)(None, inp).backward()
        nodes = [n for gm in graphs for n in gm.graph.nodes]
        targets = [str(n.target) for n in nodes]
        assert any(t.startswith("olssm.triton_scan_fwd") for t in targets), targets
        assert any("autograd_function_apply" in t for t in targets) != on, targets
        bodies = [m for gm in graphs for name, m in gm.named_children() if name.startswith("fwd_body")]
        assert bool(bodies) != on and not any("out" in n.kwargs for m in bodies for n in m.graph.nodes), \
            [m.code for m in bodies]
        assert inp["beta"].grad is not None and torch.isfinite(inp["beta"].grad).all()


def test_torch_compile_op_is_in_the_graph():
    torch._dynamo.reset()
    rule = ENTRIES["retnet"].rule
    inp = {n: _dev(t) for n, t in random_inputs(rule, 1, 5, 1, 4, 4, seed=9).items()}
    ex = torch._dynamo.explain(_loss_fn(rule))(None, inp)
    targets = [str(n.target) for gm in ex.graphs for n in gm.graph.nodes]
    assert any(t.startswith("olssm.triton_scan_fwd") for t in targets), targets


def _op_inputs(name, T, H, K, V, N, max_len, C, extra=()):
    """(rule, plan, op key, inputs, their symbols, sizes, evaluated entries) for calling triton_scan_fwd."""
    rule = ENTRIES[name].rule
    plan = tscan.plan_for(rule)
    inp = {n: _dev(t).requires_grad_() for n, t in random_inputs(rule, 1, T, H, K, V, seed=10).items()}
    sizes = [1, T, H, K, V, N, max_len, C, *extra]
    E = [e.detach().requires_grad_() for e in tlib.evaluate_entries(plan, inp, sizes)]
    return rule, plan, tlib.register(plan), inp, [inp[s.name] for s in plan.syms], sizes, E


@pytest.mark.parametrize("name, chunked, chunk_bwd", [("gated_deltanet", False, False), ("gla", True, False),
                                                     ("retnet", True, True)])
def test_opcheck(name, chunked, chunk_bwd):
    B, T, H, K, V = 1, 5, 1, 4, 4
    rule, plan, key, inp, syms, sizes, E = _op_inputs(name, T, H, K, V, B, T, 16 if chunked else 4)
    chunk_in = []
    if chunked:
        args = olssm.kernels.api.check_scan_args(rule, None, None, None, initial_state=None, output_final_state=True,
                                                 cu_seqlens=None, inputs=inp)
        chunk_in = tchunk.chunk_inputs(plan, args, grad=chunk_bwd)
        if chunk_bwd:
            chunk_in = [x.detach().requires_grad_() for x in chunk_in]
            E = []
    h0 = _dev(torch.randn(B, H, V, K)).requires_grad_()
    torch.library.opcheck(torch.ops.olssm.triton_scan_fwd.default,
                          (key, syms, E, chunk_in, h0, None, sizes, torch.float32, True, chunked, chunk_bwd, None))


@pytest.mark.parametrize("name, extra", [("mamba", []), ("gla", [4, 0, 0]), ("longhorn", [0, 2, 1])])
def test_opcheck_varlen(name, extra):
    # packed sequences 4, 0 and 5 long: the short and the empty one never write their trailing checkpoint slots,
    # which were uninitialised memory (two identical calls differed; opcheck's AOT comparison failed)
    T, H, K, V = 9, 2, 5, 6
    _, _, key, _, syms, sizes, E = _op_inputs(name, T, H, K, V, 3, 5, 4, extra)
    cu = _dev(torch.tensor([0, 4, 4, T]))
    h0 = _dev(torch.randn(3, H, V, K)).requires_grad_()
    torch.library.opcheck(torch.ops.olssm.triton_scan_fwd.default,
                          (key, syms, E, [], h0, cu, sizes, torch.float32, True, False, False, None))


def test_plans_of_constants_equal_to_15_digits_differ():
    # repr prints a Float to 15 digits: two rules differing past them shared one plan (the first one's kernel)
    S, Sp = O.states()
    rules = [olssm.derive(O.Objective(O.sqnorm(S - c * Sp) / 2 - O.inner(S @ O.key("k"), O.value("v"))))
             for c in (sp.Float(0.9), sp.Float(0.9000000000000001))]
    assert repr(rules[0].form) == repr(rules[1].form)
    assert tscan.plan_for(rules[0]) is not tscan.plan_for(rules[1])
    assert tlib.register(tscan.plan_for(rules[0])) != tlib.register(tscan.plan_for(rules[1]))


def test_cache_dir_under_threads(monkeypatch, tmp_path):
    # every thread probed the same file: one removing it made another fall back to the temp dir
    import threading
    monkeypatch.setenv("OLSSM_CACHE_DIR", str(tmp_path))
    seen, lock = [], threading.Lock()

    def work():
        for _ in range(300):
            d = tscan.cache_dir()
            with lock:
                seen.append(d)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(seen) == {os.path.join(str(tmp_path), "triton")}


@pytest.mark.skipif(not os.environ.get("OLSSM_TRITON_AOT"), reason="opt-in (~35 s): OLSSM_TRITON_AOT=1")
def test_chunked_kernels_compile_for_sm90():
    # the GPU compile pipeline (to a cubin, with the wheel's ptxas) runs without a GPU
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "olssm.kernels.triton.aot_check", "--arch", "90"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gpu_benchmark_script_runs_and_agrees(monkeypatch, tmp_path):
    """benchmarks/triton_kernels.py is what a GPU session runs first: it must work end to end (here
    under the interpreter, tiny shapes; the autotuner's row too) and its kernels must agree with the
    torch chunk backend."""
    import importlib.util
    import pathlib
    from olssm.kernels.triton import autotune
    monkeypatch.setenv("OLSSM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "CHUNKS", ())   # the policy's chunk only: with 32 / 64 too, 62 s instead of 28
    autotune.clear()
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "triton_kernels.py"
    spec = importlib.util.spec_from_file_location("triton_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = [getattr(module, name) for module, name in bench._MAIN_SETTINGS]
    rows = bench.main(["--B", "1", "--T", "8", "--H", "1", "--dk", "8", "--dv", "8", "--dtype", "fp32",
                       "--reps", "1", "--chunk", "4", "--rules", "deltanet,gla,rls", "--no-peers", "--autotune"])
    autotune.clear()
    # its flags' settings do not outlive it (a leaked WIDE_CHUNK = 4 ran a later test's wide-key path in chunks of 4)
    assert [getattr(module, name) for module, name in bench._MAIN_SETTINGS] == before
    assert (tlib.CHUNK, tlib.WIDE_CHUNK) == (16, 64)   # this module's fixture sets CHUNK 16
    errs = [float(r.rstrip(" |").rsplit("|", 1)[1]) for r in rows if "(" not in r]
    assert len(errs) >= 12 and max(errs) < 1e-5, rows
    assert sum("autotuned" in r for r in rows) == 3


def _bench_module():
    return benchmark_module("triton_kernels")


@pytest.mark.parametrize("spec, says", [
    ("wide:off", "needs a label"),             # had timed the defaults again, labelled 'wide:off'
    ("=chunk:16", "needs a label"),            # had run chunk 16 on the unlabelled default rows too
    ("x=chunk:abc", "bad value 'abc' for 'chunk'"),   # had been a bare int() traceback
    ("x=chunk", "needs a value"),
    ("x=chunk:48", "power of two"),            # had failed in tl.arange on the GPU, after the other rows
    ("x=chunk:0", "power of two"),             # had silently run chunks of 1 (interpreter) or 16 (GPU)
    ("x=precision:fp8", "one of auto"),        # had failed row by row at run time
    ("x=stages:0", ">= 1"),                    # had silently meant the default
    ("x=block_v:3", "power of two"),
    ("x=warps:-1", "power of two"),
    ("x=wide:no", "bad value 'no' for 'wide'"),
    ("x=foo:1", "unknown key 'foo'"),
    ("a=chunk:16;a=chunk:32", "appears twice"),
    ("a=chunk:16,chunk:32", "appears twice"),
])
def test_benchmark_variants_reject_bad_specs(spec, says):
    """benchmarks/triton_kernels.py --variants: a bad spec stops the run before anything is timed (a GPU lease is
    short), with a message naming the part and what it wants."""
    bench = _bench_module()
    with pytest.raises(SystemExit, match=says):
        bench._variants(spec)


def test_benchmark_variants_parse_the_session_specs():
    bench = _bench_module()
    assert bench._variants("narrow=wide:off;rec32=block_v:32,warps:4;again=") == {
        "narrow": {"wide": None}, "rec32": {"block_v": 32, "warps": 4}, "again": {}}
    assert bench._variants("bf16=precision:bf16;c64=chunk:64,stages:2;w=wide:128;o32=offsets32:1") == {
        "bf16": {"precision": "bf16"}, "c64": {"chunk": 64, "stages": 2}, "w": {"wide": 128},
        "o32": {"offsets32": True}}
    assert bench._variants("utb=ut_solve:blocks;again=") == {"utb": {"ut_solve": "blocks"}, "again": {}}
    assert bench._variants("sk=same_key:1;again=") == {"sk": {"same_key": True}, "again": {}}
    # session 11's defaults the old way round (gpu_session.sh's utm / nsk rows)
    assert bench._variants("utm=ut_solve:masked;nsk=same_key:0;again=") == {
        "utm": {"ut_solve": "masked"}, "nsk": {"same_key": False}, "again": {}}
    assert bench._changes({"same_key": True}, "chunk") and not bench._changes({"same_key": True}, "recurrent")
    assert bench._changes({"same_key": False}, "chunk") and bench._changes({"ut_solve": "masked"}, "chunk")
    with pytest.raises(SystemExit, match="expected"):
        bench._variants("utb=ut_solve:rows")
    assert bench._variants("") == {}



def test_benchmark_verdicts_judge_settings_against_the_drift_of_the_defaults():
    """The decision table under a --variants run: a setting wins only when it beats the fastest default row by more
    than the default rows' spread (their drift within the process), and the fastest chunked row is set against fla's
    chunk kernel. Synthetic times (ms); nothing runs."""
    bench = _bench_module()
    variants = bench._variants("km=offsets32:1;utb=ut_solve:blocks;slow=same_key:1;again=")
    timed = [("deltanet", "recurrent", 9.0, 40.0), ("deltanet", "chunk", 2.06, 5.70),
             ("deltanet", "chunk@km", 1.50, 5.00), ("deltanet", "chunk@utb", 2.00, 5.69),
             ("deltanet", "chunk@slow", 2.50, 7.00), ("deltanet", "chunk@again", 2.10, 5.72),
             ("deltanet", "fla-chunk", 0.55, 2.79), ("gla", "chunk", 1.0, None), ("gla", "chunk@km", 0.5, None)]
    lines = bench.verdicts(timed, variants)
    row = {line.split(" | ")[1]: line for line in lines if line.startswith("| deltanet")}
    # spread 0.04 / 0.02 ms: km wins both, utb wins fwd (2.00 < 2.06 - 0.04) but not fwd+bwd, slow loses both
    assert "1.37× (wins)" in row["chunk@km"] and "1.14× (wins)" in row["chunk@km"]
    assert "1.03× (wins)" in row["chunk@utb"] and "1.00× (within drift)" in row["chunk@utb"]
    assert row["chunk@slow"].count("(loses)") == 2
    assert "recurrent" not in "".join(row) and "again" not in "".join(row)
    gla = [line for line in lines if line.startswith("| gla")]
    assert len(gla) == 1 and "| 2.00× (wins) | — |" in gla[0]   # no backward timed: no fwd+bwd verdict
    assert lines[-1] == ("deltanet: fastest olssm chunked row against fla-chunk: forward chunk@km 2.73×, fwd+bwd "
                         "chunk@km 1.79× (target ≤ 1.2×)")
    assert bench.verdicts(timed, {}) == []
    # with each row's error of o: a fast setting that changed the output is wrong, not a win, and no fla comparison
    with_err = [(*row, 5e-3) for row in timed]
    with_err[2] = (*timed[2], 4e-2)                                   # chunk@km: 8× the defaults' error
    lines = bench.verdicts(with_err, variants)
    row = {line.split(" | ")[1]: line for line in lines if line.startswith("| deltanet")}
    assert "wrong: error of o 4.0e-02 against the defaults' 5.0e-03" in row["chunk@km"] and "wins" not in row["chunk@km"]
    assert "1.03× (wins)" in row["chunk@utb"]
    assert lines[-1].startswith("deltanet: fastest olssm chunked row against fla-chunk: forward chunk@utb 3.64×")


def test_profile_rows_skip_settings_of_the_other_kernel_family(monkeypatch, capsys):
    """benchmarks/profile_gpu.py profiles a --variants setting only on the rows it changes, as triton_kernels.py times
    them: a chunked setting on the recurrent row (or block_v on the chunk row) had been profiled again under its label,
    the defaults' kernels named as if they were the setting's. _kernel_times is stubbed: nothing runs."""
    import sys
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    for name in ("triton_kernels", "profile_gpu"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import profile_gpu
    bench = sys.modules["triton_kernels"]
    assert bench._changes({}, "recurrent") and bench._changes({"offsets32": True}, "chunk-fused")
    assert not bench._changes({"offsets32": True}, "recurrent") and not bench._changes({"block_v": 32}, "chunk")
    monkeypatch.setattr(profile_gpu, "_kernel_times", lambda fn, calls, device: {})
    profile_gpu.main(["--rules", "deltanet", "--B", "1", "--T", "8", "--H", "1", "--d", "4",
                      "--variants", "km=offsets32:1;rec=block_v:32;again="])
    rows = [line.split(" / ")[1].split(" (")[0] for line in capsys.readouterr().out.splitlines()
            if line.startswith("== ")]
    assert rows == ["chunk@default", "chunk@km", "chunk@again", "recurrent@default", "recurrent@rec",
                    "recurrent@again"], rows


def test_profile_runs_fla_row_twice_after_the_defaults_and_lifts_its_hopper_guard(monkeypatch, capsys):
    """profile_gpu's fla row (Mamba-2 through fla's chunk_simple_gla, a stand-in here) had two faults that a GPU
    session would have met (session 19's dry run of gpu_session.sh): fla's v·Δ and Δ·A were products of our inputs,
    so the profiler's second fwd+bwd call backpropagated through a freed graph ("backward through the graph a second
    time"); and fla 0.6's Hopper guard on its gated backward, which triton_kernels.py lifts, ended the row. Both are
    gone, and the row runs right after our defaults, before the variants a timeout would cut."""
    import sys
    import types
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    for name in ("triton_kernels", "profile_gpu"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    chunk_o = types.ModuleType("fla.ops.common.chunk_o")
    chunk_o.TRITON_ABOVE_3_7_1 = False   # fla 0.6's flag: its guard refuses the backward while False

    class Guarded(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            if not chunk_o.TRITON_ABOVE_3_7_1:
                raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results")
            return g

    def chunk_simple_gla(q, k, v, g=None, scale=1.0):   # any function of all four that autograd can run twice
        return (Guarded.apply(v.float() * torch.sigmoid(g)[..., None]) * (q * k).float().sum(-1, keepdim=True),)

    simple_gla = types.ModuleType("fla.ops.simple_gla")
    simple_gla.chunk_simple_gla = chunk_simple_gla
    for mod in ("fla", "fla.ops", "fla.ops.common"):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla", simple_gla)
    monkeypatch.setitem(sys.modules, "fla.ops.common.chunk_o", chunk_o)
    import profile_gpu
    profile_gpu.main(["--rules", "mamba2", "--kernels", "chunk", "--B", "1", "--T", "16", "--H", "1", "--d", "4",
                      "--calls", "1", "--peers", "--variants", "c16=chunk:16"])
    out = capsys.readouterr().out
    rows = [line[3:].split(" (")[0].split(":")[0] for line in out.splitlines() if line.startswith("== ")]
    assert rows == ["mamba2 / chunk@default", "mamba2 / fla-chunk", "mamba2 / chunk@c16"], out
    assert chunk_o.TRITON_ABOVE_3_7_1 is True


def test_profile_counts_each_kernel_once(monkeypatch):
    """profile_gpu's per-call table on a GPU: the kernel rows only. A CPU op's self device time is the time of the
    kernels it launched, which have rows of their own; summing both had counted every kernel twice."""
    import sys
    from types import SimpleNamespace
    from torch.autograd import DeviceType
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    monkeypatch.delitem(sys.modules, "profile_gpu", raising=False)
    import profile_gpu
    rows = [SimpleNamespace(key="olssm::triton_scan_fwd", device_type=DeviceType.CPU, self_device_time_total=30.0,
                            self_cpu_time_total=500.0),
            SimpleNamespace(key="chunk_delta_prep_kernel", device_type=DeviceType.CUDA, self_device_time_total=18.0,
                            self_cpu_time_total=0.0),
            SimpleNamespace(key="chunk_delta_out_kernel", device_type=DeviceType.CUDA, self_device_time_total=12.0,
                            self_cpu_time_total=0.0)]
    assert profile_gpu._per_call(rows, 3, "cuda") == {"chunk_delta_prep_kernel": 6.0, "chunk_delta_out_kernel": 4.0}
    assert profile_gpu._per_call(rows, 1, "cpu") == {"olssm::triton_scan_fwd": 500.0}


def test_gpu_session_variant_specs_parse():
    """Every --variants spec benchmarks/gpu_session.sh passes (the variables its commands name, as bash expands them,
    and its literal ones) parses: a typo there would cost a call of a rare GPU lease before anything is timed."""
    import re
    import subprocess
    bench = _bench_module()
    script = (Path(__file__).parent.parent / "benchmarks" / "gpu_session.sh").read_text()
    names = sorted(set(re.findall(r'--variants "\$(\w+)"', script)))
    assignments = "\n".join(re.findall(r"^variants\w*=.*$", script, re.M))
    expanded = subprocess.run(["bash", "-uc", assignments + "\n" + "".join(f'printf "%s\\n" "${n}"\n' for n in names)],
                              capture_output=True, text=True)
    assert expanded.returncode == 0, f"gpu_session.sh uses a variable it never sets: {expanded.stderr}"
    literal = re.findall(r"--variants '([^']*)'", script) + re.findall(r'--variants "([^"$]*)"', script)
    specs = expanded.stdout.splitlines() + literal
    assert len(names) >= 4 and len(literal) >= 2, (names, literal)   # `variants`' and `diag`'s own
    assert "variants_diag" in names and "mr0=walk_maxnreg:0;again=" in literal
    for spec in specs:
        assert bench._variants(spec), spec


def test_decays_that_can_be_negative_run_the_recurrent_kernel(monkeypatch):
    """A decay its inputs' domains do not make >= 0 (a scalar declared domain="real") has no real log: the chunked
    kernels refuse it (forced: NotImplementedError naming it), the policy runs the recurrent kernel, which multiplies
    by Λ: o, final state and every gradient against the reference with a = -0.5. A declared decay outside its
    domain (RetNet's γ = -0.5) on the chunked path is a ValueError naming γ, not log(clamp(γ))."""
    S, Sp = O.states()
    rule = olssm.derive(O.Objective(O.sqnorm(S - O.scalar("a") * Sp) / 2 - O.inner(S @ O.key("k"), O.value("v"))))
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=3)
    inp["a"] = torch.full_like(inp["a"], -0.5)
    assert "negative" in tchunk.unsupported(tscan.plan_for(rule), None)
    _compare(rule, inp)
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    with pytest.raises(NotImplementedError, match="can be negative"):
        rule.scan(backend="triton", **{n: _dev(x) for n, x in inp.items()})
    retnet = cat.rule("retnet")
    x = random_inputs(retnet, 1, 37, 2, 5, 6, seed=3)
    x["gamma"] = torch.tensor([-0.5, 0.9])
    with pytest.raises(ValueError, match="'gamma' \\(parameter, domain 'decay'\\)"):
        retnet.scan(backend="triton", **{n: _dev(t) for n, t in x.items()})


def test_host_overhead_script_counts_the_policys_launches():
    """benchmarks/host_overhead.py (kernel launches stubbed, CPU tensors through the compiled-mode path): DeltaNet's
    bf16 policy at T = 2048 is the split forward (prep, state, out: 3 launches) and the chunked backward (4 more),
    and the autotuner answering from a held decision (every candidate tied: the policy's) runs the same kernels."""
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "host_overhead.py"), "--rules", "deltanet",
                        "--reps", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:7]]
            for line in r.stdout.splitlines() if line.startswith("| deltanet")}
    assert rows["policy"][1::2] == ["3", "7"] and rows["autotuned"][1::2] == ["3", "7"], r.stdout


@pytest.mark.skipif(_DEVICE != "cpu", reason="the script picks the GPU itself there (gpu_session.sh compile)")
def test_compile_diag_script_sets_every_gradient_against_the_reference():
    """benchmarks/compile_diag.py (the next lease's check of torch.compile's gradients) under the interpreter: a row per
    run (eager twice, dynamo alone, aot_eager, aot_eager with β·v's backward in torch), each naming its kernel (the
    chunked one under the test files' settings, the recurrent one under the policy's at T = 33) and every input's
    relative error against the fp64 reference, all at fp32 rounding here (≤ 1e-5; session 14's wrong gradients were
    off by O(1))."""
    import re
    r = run_interpreted_script("compile_diag", ["--cases", "mamba2:33:chunked,mamba2:33:policy"], timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    for setting, kernel in (("chunked", "chunk"), ("policy", "recurrent")):
        rows = [line for line in r.stdout.splitlines() if line.startswith(f"| mamba2:33:{setting} |")]
        assert [row.split("|")[2].strip() for row in rows] == [
            "eager", "eager again", "compile eager", "compile aot_eager", "compile aot_eager, β·v backward in torch"
        ], r.stdout
        for row in rows:
            assert row.split("|")[3].split()[0] == kernel, row
            errs = dict(re.findall(r"(\w+) ([0-9.]+e[-+][0-9]+)", row.split("|")[4]))
            assert set(errs) == {"h0", "A", "dt", "k", "q", "v"} and max(map(float, errs.values())) <= 1e-5, row


# the script runs the interpreter whatever the device: on the GPU machine (Triton 3.6, numpy 2.5, session 14) its
# interpreter failed on a loop bound (TypeError: only 0-dimensional arrays can be converted to Python scalars) before
# any of our code's output, so there the test checks the machine's interpreter, not the glue
@pytest.mark.skipif(_DEVICE != "cpu", reason="an interpreter run (benchmarks/glue_ops.py): the CPU suite's")
def test_glue_ops_script_lists_the_torch_around_the_kernels():
    """benchmarks/glue_ops.py (interpreter, bf16 DeltaNet) lists the forward's up-casts of [B, T, H, d] inputs under
    CHUNK_STORAGE "fp32" without RAW_INPUTS, each reading 2 and writing 4 bytes per element of the target shape
    (2, 8192, 16, 16): the bytes are scaled by B·T·H. With RAW_INPUTS (the default), and under "input", it lists no
    such cast (q and k are taken as they are). The product β·v is listed where SCALE_ON_LOAD is off (the first run
    turns both off) and not with the defaults (the kernels form it)."""
    import re
    tables = {}
    for raw in ("0", "1"):
        r = run_interpreted_script("glue_ops", ["--rules", "deltanet", "--shape", "1,40,3,16", "--scale", "2,8192,16,16"],
                                   timeout=300, OLSSM_TRITON_RAW_INPUTS=raw, OLSSM_TRITON_SCALE_ON_LOAD=raw)
        assert r.returncode == 0, r.stdout + r.stderr
        tables[raw] = {head: body for head, body in (part.split("\n", 1) for part in r.stdout.split("\n## ")[1:])}
    fwd = {(raw, storage): t[next(h for h in t if f"'{storage}', fwd:" in h)] for raw, t in tables.items()
           for storage in ("fp32", "input")}
    cast = r"\| fwd \| _to_copy \| \[1, 40, 3, 16\] bfloat16 \| \[1, 40, 3, 16\] float32 \| (\d+) \| (\d+) \|"
    rows = re.findall(cast, fwd["0", "fp32"])
    assert len(rows) == 1 and int(rows[0][1]) == round(2 * 8192 * 16 * 16 * 6 / 1e6 * int(rows[0][0])), fwd["0", "fp32"]
    assert not re.findall(cast, fwd["1", "fp32"]), fwd["1", "fp32"]
    product = r"\| fwd \| mul \| [^|]*\[1, 40, 3, 16\] bfloat16 \| \[1, 40, 3, 16\] (bfloat16|float32) \|"
    for raw in ("0", "1"):
        assert "_to_copy | [1, 40, 3, 16]" not in fwd[raw, "input"], fwd[raw, "input"]
        for storage in ("fp32", "input"):
            assert len(re.findall(product, fwd[raw, storage])) == (raw == "0"), (raw, storage, fwd[raw, storage])


# ---- delta family: the split forward (prep / state / out kernels) against the fused one -----------------

def _two_term_delta_rule():
    # gated delta rule with a second input term: scalar c, scalar decay, M = 2
    S, Sp = O.states()
    expr = O.sqnorm(S - O.scalar("a", domain="decay") * Sp) / 2 \
        + O.sqnorm(S @ O.key("k") - O.value("v"), weight=O.scalar("beta", positive=True)) / 2
    return olssm.derive(O.Objective(expr - O.inner(S @ O.key("kl"), O.row("s") * O.value("vl")), update="explicit"))


def _chunked_direct(rule, inp, h0, cu, mode, save, monkeypatch):
    """chunked_forward called directly (o, final state and every chunk's entering state ck)."""
    monkeypatch.setattr(tchunk, "DELTA_FORWARD", mode)
    plan = tscan.plan_for(rule)
    inp = {n: _dev(x) for n, x in inp.items()}
    cu_t = None if cu is None else _dev(torch.tensor(cu, dtype=torch.int32))
    args = olssm.kernels.api.check_scan_args(rule, None, None, None, initial_state=h0, output_final_state=True,
                                             cu_seqlens=cu_t, inputs=inp)
    B, T, H, K, V = args.B, args.T, args.H, args.d_k, args.d_v
    N = B if cu is None else len(cu) - 1
    max_len = T if cu is None else max(b - a for a, b in zip(cu, cu[1:]))
    C = tlib.CHUNK
    sizes = [B, T, H, K, V, N, max_len, C]
    o = torch.full((B, T, H, V), float("nan"), device=_DEVICE)
    ht = torch.full((N, H, V, K), float("nan"), device=_DEVICE)
    ck = torch.zeros(N, H, -(-max_len // C), V, K, device=_DEVICE)
    tchunk.chunked_forward(plan, tchunk.chunk_inputs(plan, args), None if h0 is None else _dev(h0), o, ht, ck,
                           sizes, save, cu_t)
    return o, ht, ck


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "two_term"])
@pytest.mark.parametrize("varlen", [True, False])
def test_delta_split_forward_matches_fused(name, varlen, monkeypatch):
    rule = _two_term_delta_rule() if name == "two_term" else ENTRIES[name].rule
    H, K, V = 2, 20, 20                     # d_k = 20: BK = 32, masked
    if varlen:   # sequences of 5, 0, 1, 37 tokens: chunks restart at every bos, the last is partial
        cu, B, T = [0, 5, 5, 6, 43], 1, 43
    else:
        cu, B, T = None, 2, 37
    N = B if cu is None else len(cu) - 1
    inp = random_inputs(rule, B, T, H, K, V, seed=21)
    dn = {"gated_deltanet": "alpha", "two_term": "a"}.get(name)
    if dn:
        inp[dn][:, 3::4] = torch.exp(torch.tensor(-30.0))    # log decay −30 per token: Σ ≈ −120 per chunk
    h0 = 0.3 * torch.randn(N, H, V, K, generator=torch.Generator().manual_seed(22))
    if varlen:   # prep/out: two value blocks of 16 rows (the state pass: one of 32), two key blocks of 16
        monkeypatch.setattr(tchunk, "SPLIT_BLOCK_V", 16)
        monkeypatch.setattr(tchunk, "SPLIT_BLOCK_K", 16)
    fused = _chunked_direct(rule, inp, h0, cu, "fused", True, monkeypatch)
    split = _chunked_direct(rule, inp, h0, cu, "split", True, monkeypatch)
    for what, a, b in zip(("o", "final state", "ck"), split, fused):
        _close(a, b, 1e-5, f"split vs fused: {what}")
    o, ht, _ = _chunked_direct(rule, inp, None, cu, "split", False, monkeypatch)   # no ck saved: scratch ck
    o1, ht1, _ = _chunked_direct(rule, inp, None, cu, "fused", False, monkeypatch)
    _close(o, o1, 1e-5, "split vs fused without h0, no save: o")
    _close(ht, ht1, 1e-5, "split vs fused without h0, no save: final state")


def _two_term_column_rule():
    # two input terms (M = 2) under a column decay: the diagonal kernels' rank loop
    S, Sp = O.states()
    k, v, kl, vl = O.key("k"), O.value("v"), O.key("kl"), O.value("vl")
    prox = O.sqnorm(S - Sp @ O.diag(O.column("c", domain="decay"))) / 2
    return olssm.derive(O.Objective(prox - O.inner(S @ k, v) - O.inner(S @ kl, O.row("s") * vl))).with_log_decays()


@pytest.mark.parametrize("name, varlen, slow", [
    ("linear_attention", False, False), ("linear_attention", True, False), ("retnet", False, False),
    ("mamba2", False, False), ("mamba2", True, False), ("log_gla", False, False), ("log_gla", True, False),
    ("log_gla", False, True), ("log_row_decay", False, False), ("log_row_decay", True, True),
    ("two_term_column", False, False), ("two_term_column", True, True)])
def test_diag_split_path_matches_reference(name, varlen, slow, monkeypatch):
    # DIAG_PATH = "split": the state passes over (value block, key block) programs, o and the gradients over chunks.
    # Forward, final state and every gradient against the reference loop (the tolerances of this file); d_k = 20 in key
    # blocks of 16 (two, the second masked; in the state passes and, with one input term, the backward's), packed
    # sequences of 35, 0, 5 and 32 tokens (a partial chunk, an empty sequence, a lone partial chunk, two whole ones);
    # slow: FAST_SPAN 0, the per-token pairwise loops of the row and column decays in both kernels
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", "split")
    monkeypatch.setattr(tchunk, "DIAG_STATE_BLOCK_K", 16)
    monkeypatch.setattr(tchunk, "DIAG_BWD_BLOCK_K", 16)   # the parallel backward walks two key blocks (M = 1)
    for n in ("DIAG_DQK_BLOCK_K", "DIAG_DQK_BLOCK_V", "DIAG_DV_BLOCK_V", "DIAG_DV_BLOCK_K"):
        monkeypatch.setattr(tchunk, n, 16)   # no / scalar decay: two blocks on each side of both gradient kernels
    if slow:
        monkeypatch.setattr(tchunk, "FAST_SPAN", 0.0)
    fwd = spy(monkeypatch, tchunk, "_diag_split_forward")
    whole = name in ("linear_attention", "retnet", "mamba2", "log_gla")   # chunk_diag_dqk_kernel and _dv_kernel
    bwd = spy(monkeypatch, tchunk, "_diag_split_backward_whole" if whole else "_diag_split_backward")
    rule = _two_term_column_rule() if name == "two_term_column" else _rule(name)
    if name == "retnet":   # a raw γ parameter: "auto" differentiates it in the recurrent backward (γ ≫ eps here)
        monkeypatch.setattr(tlib, "CHUNK_BACKWARD", True)
    cu = [0, 35, 35, 40, 72] if varlen else None
    B, T, N = (1, 72, 4) if varlen else (2, 37, 2)
    if varlen:   # the output and the state passes in two value blocks of 16 rows (row decays' output: the state's),
        # and the output's loop over two key blocks of 16 (DIAG_OUT_KEY_BLOCK: no or a scalar decay; the others ignore it)
        monkeypatch.setattr(tchunk, "DIAG_OUT_BLOCK_V", 16)
        monkeypatch.setattr(tchunk, "DIAG_STATE_BLOCK_V", 16)
        monkeypatch.setattr(tchunk, "DIAG_OUT_KEY_BLOCK", 16)
    inp = random_inputs(rule, B, T, 2, 20, 20, seed=31)
    h0 = 0.3 * torch.randn(N, 2, 20, 20, generator=torch.Generator().manual_seed(31))
    _compare(rule, inp, h0, cu_seqlens=_dev(torch.tensor(cu, dtype=torch.int32)) if varlen else None)
    assert len(fwd) == 1 and len(bwd) == (0 if name == "two_term_column" else 1)   # two terms: the fused backward


def test_kernel_sweep_runs_and_tells_a_changed_number_from_a_reordered_sum(monkeypatch, capsys):
    # benchmarks/kernel_sweep.py (session 23's first GPU call) end to end under the interpreter, and the check it makes
    # of the settings it would choose: every block setting gives the defaults' o and gradients (d = 32 cut into blocks
    # of 16 on every side of every kernel, against one block of 32), while bf16 dot operands, which change the numbers,
    # are told apart (> 1e-4 against < 1e-5: the fp32 reordering floor is ~1e-7). Each rule times its own path's
    # kernels only (DeltaNet the delta path's, Mamba-2 the diagonal path's)
    sweep = benchmark_module("kernel_sweep")
    saved = (tlib.FORCE, tlib.CHUNK, tlib.WIDE_CHUNK, tchunk.DIAG_PATH)
    sweep.main(["--B", "1", "--T", "16", "--H", "1", "--d", "16", "--reps", "1", "--path", "split", "--chunk", "16",
                "--rules", "mamba2,deltanet", "--kernels", "dv,delta_out", "--no-info"])
    assert (tlib.FORCE, tlib.CHUNK, tlib.WIDE_CHUNK, tchunk.DIAG_PATH) == saved   # its settings do not outlive it
    out = capsys.readouterr().out
    mamba2, deltanet = out.split("== deltanet")
    assert all(f"| dv | {label} |" in mamba2 for label in sweep.CANDIDATES["dv"]), out
    assert all(f"| delta_out | {label} |" in deltanet for label in sweep.CANDIDATES["delta_out"]), out
    assert "| delta_out |" not in mamba2 and "| dv |" not in deltanet, out
    assert mamba2.count("| — | defaults again |") == deltanet.count("| — | defaults again |") == 1
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", "split")
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    rule = _rule("log_gla")
    inp = {n: _dev(x) for n, x in random_inputs(rule, 1, 40, 1, 32, 32, seed=41).items()}
    blocks = {n: 16 for n in ("state_bk", "state_bv", "out_bv", "dqk_bk", "dqk_bv", "dv_bk", "dv_bv")}
    same = sweep.differences(rule, inp, blocks)
    assert set(same) == {"o", "dq", "dk", "dv", "da"} and max(same.values()) < 1e-5, same
    changed = sweep.differences(rule, inp, {"precision": "bf16"})
    assert max(changed.values()) > 1e-4, changed


def test_split_delta_kernels_take_their_own_launch_settings(monkeypatch):
    # chunked.DELTA_* and chunked_delta_bwd.*_WARPS / _STAGES (kernel_sweep's delta candidates) reach the launches
    # they name and no other (every launch runs the defaults or its own setting), and 16 value rows per state pass (two
    # programs where one walked 32 rows) give the defaults' o and gradients for a scalar decay (Gated DeltaNet: the
    # decay factors' pass and ∂ log γ)
    from olssm.kernels.triton import chunked_delta_bwd as tdbw
    sweep = benchmark_module("kernel_sweep")
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    launched = []
    record = lambda label, kw: launched.append((label, kw.get("BV"), kw.get("num_warps"), kw.get("num_stages")))
    spy_launches(monkeypatch, tchunk, ["chunk_delta_prep_kernel", "chunk_delta_state_kernel", "chunk_delta_out_kernel"],
                 record)
    spy_launches(monkeypatch, tdbw, ["chunk_delta_bwd_prep_kernel", "chunk_delta_bwd_state_kernel",
                                     "chunk_delta_bwd_value_kernel", "chunk_delta_bwd_key_kernel"], record)
    rule = _rule("gated_deltanet")
    inp = {n: _dev(x) for n, x in random_inputs(rule, 1, 40, 1, 32, 32, seed=43).items()}
    own = {"delta_state_bv": 16, "delta_prep_warps": 2, "delta_state_warps": 4, "delta_out_stages": 1,
           "delta_bprep_stages": 2, "delta_bstate_warps": 2, "delta_value_warps": 4, "delta_key_stages": 1}
    same = sweep.differences(rule, inp, own)
    assert max(same.values()) < 1e-5, same
    default_warps, default_stages = tchunk.NUM_WARPS, tchunk.NUM_STAGES
    want = {("chunk_delta_prep_kernel", None, 2, None), ("chunk_delta_state_kernel", 16, 4, None),
            ("chunk_delta_out_kernel", None, default_warps, 1), ("chunk_delta_bwd_prep_kernel", None, default_warps, 2),
            ("chunk_delta_bwd_state_kernel", 16, 2, None), ("chunk_delta_bwd_value_kernel", None, 4, None),
            ("chunk_delta_bwd_key_kernel", None, default_warps, 1)}
    seen = {(label, bv if "state" in label else None, warps, stages) for label, bv, warps, stages in launched}
    defaults = {(label, 32 if "state" in label else None, default_warps, default_stages) for label, *_ in want}
    assert seen == want | defaults, (sorted((want | defaults) - seen), sorted(seen - want - defaults))


@pytest.mark.parametrize("name", ["retnet", "log_gla", "log_row_decay"])
def test_diag_split_path_without_initial_state_or_gradients(name, monkeypatch):
    # a forward that keeps no checkpoints (no gradient) runs the split path on a scratch ck, and no initial state
    # reads none: o and the final state as the fused walk's (both exact against the reference elsewhere)
    rule = _rule(name)
    inp = {n: _dev(x) for n, x in random_inputs(rule, 2, 45, 2, 20, 20, seed=33).items()}
    tlib.FORCE = "chunk"
    out = {}
    for path in ("fused", "split"):
        monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", path)
        with torch.no_grad():
            out[path] = rule.scan(backend="triton", output_final_state=True, **inp)
    for a, b, what in zip(out["split"], out["fused"], ("o", "final state")):
        _close(a, b, 1e-5, f"split vs fused, no h0, no gradient: {what}")


@pytest.mark.parametrize("name, d_k, path", [("mamba2", 72, "split"), ("mamba2", 8, "fused"), ("log_gla", 72, "split"),
                                             ("log_row_decay", 72, "fused"), ("two_term_column", 72, "fused")])
def test_wide_diag_path_splits_the_wide_single_term_rules(name, d_k, path, monkeypatch):
    # DIAG_PATH = "wide": the split path (at library.WIDE_CHUNK) where d_k > WIDE_KEYS with one input term and no row
    # decay, the fused walk elsewhere; the forward and the backward both run the path it resolves to (spied), and o,
    # the final state and every gradient match the reference
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", "wide")
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    tlib.FORCE = "chunk"
    rule = _two_term_column_rule() if name == "two_term_column" else _rule(name)
    assert tchunk.diag_path(rule.form, d_k) == path and tchunk.diag_path() == "fused"
    launched = set()
    spy_launches(monkeypatch, tchunk, ["chunk_fwd_kernel", "chunk_bwd_kernel", "chunk_diag_out_kernel"],
                 lambda label, kwargs: launched.add((label, kwargs.get("OUT", True) and kwargs.get("GRADS", True),
                                                     kwargs["BT"])))
    inp = random_inputs(rule, 1, 70, 1, d_k, 6, seed=9)
    _compare(rule, inp, 0.3 * torch.randn(1, 1, 6, d_k, generator=torch.Generator().manual_seed(9)))
    C = tlib.WIDE_CHUNK if path == "split" else tlib.CHUNK
    walks = {("chunk_fwd_kernel", True, C), ("chunk_bwd_kernel", True, C)}
    split = {("chunk_fwd_kernel", False, C), ("chunk_diag_out_kernel", True, C), ("chunk_bwd_kernel", False, C)}
    assert launched == (split if path == "split" else walks), launched


@pytest.mark.parametrize("path, seed", [("fused", 114), ("split", 113)])
def test_decay_gradient_takes_suffix_sums_directly(path, seed, monkeypatch):
    # ∂g_t = Σ_{i ≥ t} ∂b_i within a chunk is a reverse cumulative sum (tl.cumsum(reverse=True)), not total − prefix
    # + ∂b_t: that difference of two larger sums lost Mamba-2's ∂A (a per-head scalar summed over every token) to
    # 5.8e-5 relative on the fused walk and 1.7e-5 on the split path at chunk 64 on these two of 16 draws (d_k = 72,
    # T = 64-199; 2.4e-6 and 4.7e-6 now, worst of the 16 draws 6.4e-6 / 1.1e-5; the median is 2e-6 either way).
    # Against the reference at RTOL: the fused draw fails with the old formula, the split one (its ∂A is smaller than
    # the absolute floor ABS lets through there) only covers that path
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", path)
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    monkeypatch.setattr(tlib, "CHUNK", 32)
    tlib.FORCE = "chunk"
    rule = ENTRIES["mamba2"].rule
    inp = random_inputs(rule, 1, 64 + 9 * (seed - 100), 1, 72, 8, seed=seed)
    o1, f1, g1 = _run(rule, inp, None, "reference")
    o2, f2, g2 = _run(rule, inp, None, "triton")
    _close(g2["A"], g1["A"], RTOL, f"dA ({path})")


@pytest.mark.parametrize("path, backward", [("fused", "chunk_bwd_kernel"), ("split", "chunk_diag_dqk_kernel")])
def test_scalar_decay_gradient_at_strong_decays(path, backward, monkeypatch):
    # Mamba-2 with Δ up to 10³ (Δ·|A| up to 1.7e3: tokens that all but reset the state). ∂A = Σ_t Δ_t ∂g_t, and
    # ∂g_t as a reverse sum of per-token ∂b cancelled the pair terms on either side of t, leaving ε·O(1) where the
    # true ∂g_t is ~e^{g_t}: ∂A came out 23× the true 3.0e-5 (5.7e-4 relative at Δ·|A| ~ 170). Summed where they
    # straddle t (_scalar_decay_grad), every term carries e^{g_t}: 1.6e-6 relative, the fp32 chunk backend's 1.2e-6.
    # Against the fp64 reference at 1e-4 relative (no ABS floor: the true ∂A is 3e-5); each path's backward spied
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", path)
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    monkeypatch.setattr(tlib, "CHUNK", 32)
    tlib.FORCE = "chunk"
    launched = set()
    spy_launches(monkeypatch, tchunk, ["chunk_bwd_kernel", "chunk_diag_dqk_kernel", "chunk_diag_bwd_kernel"],
                 lambda label, kwargs: launched.add(label) if kwargs.get("GRADS", True) else None)
    rule = ENTRIES["mamba2"].rule
    inp = random_inputs(rule, 1, 128, 1, 4, 4, seed=1, dtype=torch.float64)
    inp["dt"] = inp["dt"] * 1000
    g = torch.randn(1, 128, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        x = {n: _dev(t).detach().to(dtype).requires_grad_() for n, t in inp.items()}
        (rule.scan(backend=backend, **x)[0] * _dev(g).to(dtype)).sum().backward()
        grads[backend] = x["A"].grad.double().cpu()
    err = float((grads["triton"] - grads["reference"]).abs().max() / grads["reference"].abs().max())
    assert err < 1e-4, (err, grads)
    assert backward in launched, launched


@pytest.mark.parametrize("name, path, mode", [("gla", "fused", "slow"), ("gla", "split", "slow"),
                                              ("gla", "fused", "all"), ("gla", "split", "all"),
                                              ("two_term_column", "fused", "slow"), ("two_term_column", "fused", "all"),
                                              ("log_row_decay", "fused", "slow"), ("log_row_decay", "split", "slow"),
                                              ("log_row_decay", "fused", "all"), ("longhorn_forget", "fused", "slow"),
                                              ("longhorn_forget", "fused", "all")])
def test_diag_decay_gradient_at_strong_decays(name, path, mode, monkeypatch):
    # A row or column decay's ∂g (GLA's per key column; a forget gate per value row). As a reverse sum of per-token
    # ∂b its pair terms cancel between the tokens on either side of t, each leaving ε·O(1) in fp32 where the true
    # ∂g_t carries e^{g_t}: ∂ through a scale s of the log gate was, at s = 3 / 10 / 100 / 1000 (T = 128, chunk 32;
    # "off" reproduces them), 1.3e-5 / 1.0e-4 / 2.0e-4 / 8.6e-5 relative for GLA and 1.8e-5 / 5.8e-5 / 2.9e-3 /
    # 4.9e-5 for the row decay, 1.4e-5 / 7.1e-5 / 1.5e-3 / 6.4e-4 for Longhorn with a forget gate (the delta family's
    # row-decay kernel). Summed where they straddle t (DIAG_STRADDLE): 5e-7 / 7e-8 / 2e-7 / 1e-7, 8e-7 / 6e-7 / 4e-7 /
    # 1e-7 and 2e-7 / 2e-7 / 2e-7 / 2e-7, as the chunk backend's fp64 cumsums (5e-9 to 4e-7). "slow" straddles the per-token
    # path (chunks spanning more than FAST_SPAN: s = 100, 1000 here), "all" the factorised one too (s = 3: every
    # chunk of 16 spans ~24). Against the fp64 reference at 1e-5 relative, T = 70 (a partial last chunk); each
    # backward launch spied to carry the mode (the split row path: chunk_diag_bwd_kernel, over two key blocks)
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", path)
    monkeypatch.setenv("OLSSM_TRITON_DIAG_STRADDLE", mode)
    # two key blocks: of 4 keys under the interpreter, of 16 when compiled (tl.dot's smallest K; the H200 refused 4)
    block_k = 4 if tscan.interpreted() else 16
    monkeypatch.setattr(tchunk, "DIAG_BWD_BLOCK_K", block_k)
    seen = []
    from olssm.kernels.triton import chunked_delta_bwd as tdelta
    record = lambda label, kwargs: seen.append(kwargs.get("DIAG_STRADDLE")) if kwargs.get("GRADS", True) else None  # noqa: E731
    spy_launches(monkeypatch, tchunk, ["chunk_bwd_kernel", "chunk_diag_dqk_kernel", "chunk_diag_bwd_kernel"], record)
    spy_launches(monkeypatch, tdelta, ["chunk_rowdecay_bwd_kernel"], record)
    rule = {"two_term_column": _two_term_column_rule, "gla": lambda: ENTRIES["gla"].rule.with_log_decays(),
            "longhorn_forget": lambda: cat.rule("longhorn_forget").with_log_decays()}.get(name, lambda: _rule(name))()
    [decay] = [n for n, s in rule.inputs.items() if "decay" in s.domain and not s.is_parameter]
    inp = random_inputs(rule, 1, 70, 1, 2 * block_k, 4, seed=1, dtype=torch.float64)
    u = torch.rand(inp[decay].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = torch.randn(1, 70, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for scale, err, grads in decay_scale_errors(rule, inp, decay, u, g, (3, 100) if mode == "all" else (100, 1000)):
        assert err < 1e-5, (scale, err, grads)
    assert seen and set(seen) == {tchunk._DIAG_STRADDLE_CODE[mode]}, seen


@pytest.mark.parametrize("name", ["DIAG_OUT_BLOCK_V", "DIAG_STATE_BLOCK_V", "DIAG_DQK_BLOCK_K"])
def test_a_split_diagonal_block_that_is_no_power_of_two_is_named(name, monkeypatch):
    # 48 had failed inside the launch ("arange's range must be a power of 2"), naming neither the constant nor 48
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", "split")
    monkeypatch.setattr(tchunk, name, 48)
    tlib.FORCE = "chunk"
    rule = ENTRIES["mamba2"].rule
    x = {n: _dev(t).requires_grad_() for n, t in random_inputs(rule, 1, 20, 1, 20, 20, seed=2).items()}
    with pytest.raises(ValueError, match=f"chunked.{name} must be a power of two, got 48"):
        rule.scan(backend="triton", **x)[0].sum().backward()


def test_diag_path_is_checked(monkeypatch):
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", "parallel")
    with pytest.raises(ValueError, match="OLSSM_TRITON_DIAG_PATH"):
        tchunk.diag_path()


def test_delta_forward_mode_is_checked(monkeypatch):
    rule = ENTRIES["deltanet"].rule
    inp = {n: _dev(x) for n, x in random_inputs(rule, 1, 33, 1, 4, 4, seed=23).items()}
    monkeypatch.setenv("OLSSM_TRITON_DELTA_FORWARD", "fast")
    with pytest.raises(ValueError, match="'split' or 'fused'"):
        with torch.no_grad():
            rule.scan(backend="triton", **inp)
    monkeypatch.setenv("OLSSM_TRITON_DELTA_FORWARD", "fused")
    calls = []
    monkeypatch.setattr(tchunk, "_delta_split_forward", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        rule.scan(backend="triton", **inp)
    assert not calls
    monkeypatch.delenv("OLSSM_TRITON_DELTA_FORWARD")
    with torch.no_grad():
        rule.scan(backend="triton", **inp)
    assert calls == [1]


# ---- CHUNK_STORAGE = "input": bf16 / fp16 chunk tensors ---------------------------------------------------

def _args(rule, inp):
    return olssm.kernels.api.check_scan_args(rule, None, None, None, initial_state=None, output_final_state=True,
                                             cu_seqlens=None, inputs={n: _dev(x) for n, x in inp.items()})


@pytest.mark.parametrize("name", ["deltanet", "mamba2", "gla", "linear_attention"])
def test_chunk_storage_dtypes(name, monkeypatch):
    # "input" + bf16/fp16 inputs: q, w, e (a, b, c) in the input dtype, the log decay fp32; fp32 inputs, or the
    # knob at "fp32": all fp32. Values: the fp32 tensors rounded. DeltaNet's w = a = b stay one tensor.
    rule = ENTRIES[name].rule
    plan = tscan.plan_for(rule)
    inp = random_inputs(rule, 1, 20, 2, 4, 5, seed=41)
    monkeypatch.setattr(tchunk, "RAW_INPUTS", False)   # "fp32" copies every tensor (raw inputs: their own test)
    monkeypatch.setattr(tchunk, "SCALE_ON_LOAD", False)   # β·v, Δ·v written as products (their own test)
    monkeypatch.delenv("OLSSM_TRITON_SCALE_ON_LOAD", raising=False)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        low = {n: x.to(dtype) for n, x in inp.items()}
        monkeypatch.setattr(tchunk, "CHUNK_STORAGE", "fp32")
        ref = tchunk.chunk_inputs(plan, _args(rule, low))
        assert all(x.dtype == torch.float32 for x in ref)
        monkeypatch.setattr(tchunk, "CHUNK_STORAGE", "input")
        got = tchunk.chunk_inputs(plan, _args(rule, low))
        assert len(got) == len(ref)
        for i, (x, y) in enumerate(zip(got, ref)):
            want = torch.float32 if i == 3 else dtype
            assert x.dtype == want and x.is_contiguous() and x.shape == y.shape, (name, dtype, i)
            assert torch.equal(x, y.to(want)), (name, dtype, i)
        if name == "deltanet":
            q, w, e, g, a, b, c = got
            assert w.data_ptr() == a.data_ptr() == b.data_ptr()
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_STORAGE", "fp32")   # the environment overrides the module
    assert tchunk.chunk_storage(torch.bfloat16) == torch.float32
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_STORAGE", "bf16")
    with pytest.raises(ValueError, match="chunk storage"):
        tchunk.chunk_storage(torch.bfloat16)


@pytest.mark.parametrize("name, dtype", [("linear_attention", torch.bfloat16), ("retnet", torch.bfloat16),
                                         ("gla", torch.bfloat16), ("mamba2", torch.bfloat16),
                                         ("mamba2", torch.float16)])
def test_chunk_storage_input_matches_fp32(name, dtype, monkeypatch):
    # chunk_fwd_kernel + chunk_bwd_kernel (CHUNK_BACKWARD = True: GLA's log g has no closed form) on bf16 / fp16
    # chunk tensors against the same rule on fp32 chunk tensors, same low-precision inputs (tolerance:
    # triton_testing.STORAGE_RTOL)
    monkeypatch.setattr(tlib, "CHUNK_BACKWARD", True)
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    calls = spy(monkeypatch, tchunk, "chunked_backward")
    rule = _rule(name)
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=42)
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(42))
    _compare_storage(rule, inp, h0, monkeypatch, dtype)
    assert len(calls) == 2


@pytest.mark.parametrize("name", ["retnet", "gla"])
def test_chunk_storage_kernels_read_bf16_exactly(name, monkeypatch):
    # the kernels convert every chunk tensor to fp32 right after loading it: bf16 chunk tensors and fp32 ones
    # holding the same (bf16-rounded) values give the same o, state, checkpoints and gradients (fp32 rounding)
    rule = _rule(name)
    plan = tscan.plan_for(rule)
    B, T, H, K, V = 1, 37, 2, 5, 20
    inp = {n: _dev(x) for n, x in random_inputs(rule, B, T, H, K, V, seed=43).items()}
    monkeypatch.setattr(tchunk, "CHUNK_STORAGE", "fp32")
    ref = tchunk.chunk_inputs(plan, _args(rule, inp))
    low = [x if i == 3 else x.to(torch.bfloat16) for i, x in enumerate(ref)]
    ref = [x.to(torch.float32) for x in low]
    gen = torch.Generator().manual_seed(44)
    h0, do, dht = (_dev(torch.randn(*s, generator=gen)) for s in ((B, H, V, K), (B, T, H, V), (B, H, V, K)))
    sizes = [B, T, H, K, V, B, T, tlib.CHUNK]
    out = []
    for chunk_in in (ref, low):
        o, ht = _dev(torch.empty(B, T, H, V)), _dev(torch.empty(B, H, V, K))
        ck = _dev(torch.empty(B, H, -(-T // tlib.CHUNK), V, K))
        tchunk.chunked_forward(plan, chunk_in, h0, o, ht, ck, sizes, True)
        grads, dh0 = tchunk.chunked_backward(plan, chunk_in, ck, do, dht, sizes)
        out.append([o, ht, ck, *grads, dh0])
    for what, a, b in zip(["o", "ht", "ck", "dq", "dw", "de", "dg", "dh0"], out[1], out[0]):
        assert a.dtype == torch.float32
        _close(a, b, RTOL, f"bf16 vs fp32 chunk tensors of equal values: {what}")


class _TokenWrites:
    """The aten ops under it, outside olssm's own ops, that write a token-sized tensor ([.., B, T, H, d] with d one of
    sizes): (op name, output dtype), in order. Views and bare allocations write nothing and are not listed."""

    def __init__(self, B, T, H, sizes):
        from torch.utils._python_dispatch import TorchDispatchMode
        rec = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                if func.namespace != "olssm" and not func.is_view and not name.startswith(("empty", "new_empty")):
                    for t in torch.utils._pytree.tree_leaves(out):
                        if torch.is_tensor(t) and t.dim() >= 4 and tuple(t.shape[-4:-1]) == (B, T, H) \
                                and t.shape[-1] in sizes:
                            rec.ops.append((name, t.dtype))
                return out

        self.ops, self.mode = [], Mode()

    def casts(self):
        return [op for op in self.ops if op[0] in ("_to_copy", "clone", "copy_")]

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_chunk_inputs_take_bf16_inputs_as_they_are(name, monkeypatch):
    # The torch around the chunked op, bf16 inputs (H100 profile, benchmarks/logs/2026-11-26-h100-s11: ~0.64 ms of
    # DeltaNet's 1.81 ms forward at (2, 8192, 16, 128) in copies and casts). q, k, v are bf16 [B, T, H, d] tensors
    # already. Under CHUNK_STORAGE "input" q and k go to the op as they are; under "fp32" too (RAW_INPUTS; they were
    # each cast once, w = a = b one tensor). Before that, broadcast_inputs cast q, k, v up to fp32 and chunk_inputs
    # cast q, k and e back (bf16 → fp32 → bf16 round trips). The one token-sized tensor the forward still wrote was e =
    # β·v (bf16 or fp32 by the storage); since session 16 the kernels form it on load from v and β (SCALE_ON_LOAD), so
    # the forward writes nothing token-sized under either storage. The backward under "input" (SAME_KEY: the op
    # returns one key gradient, so autograd adds none) casts nothing token-sized either: ∂q, ∂k come back from the op
    # in bf16, and ∂v, ∂β from ∂e as _Scaled's chain rule forms them (∂v one bf16 write, ∂β an fp32 row sum).
    from olssm.kernels.triton import chunked_delta_bwd as tdelta
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    monkeypatch.setattr(tdelta, "SAME_KEY", True)
    for env in ("OLSSM_TRITON_CHUNK_STORAGE", "OLSSM_TRITON_SAME_KEY"):
        monkeypatch.delenv(env, raising=False)
    B, T, H, K, V = 1, 40, 2, 6, 5                                # d_k, d_v: no other axis has these sizes
    rule = _rule(name).with_log_decays()   # as the layers run it: log α has a closed form, the chunked backward runs
    inp = {n: _dev(x).to(torch.bfloat16) for n, x in random_inputs(rule, B, T, H, K, V, seed=45).items()}
    seen, made = {}, []
    real = tchunk.chunked_forward
    monkeypatch.setattr(tchunk, "chunked_forward", lambda plan, chunk_in, *a, **k: made.append(chunk_in) or
                        real(plan, chunk_in, *a, **k))
    for storage in ("input", "fp32"):
        monkeypatch.setattr(tchunk, "CHUNK_STORAGE", storage)
        made.clear()
        x = {n: t.clone().requires_grad_() for n, t in inp.items()}
        with _TokenWrites(B, T, H, (K, V)) as fwd:
            o, f = rule.scan(backend="triton", output_final_state=True, **x)
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(46)).to(o)
        with _TokenWrites(B, T, H, (K, V)) as bwd:
            grads = torch.autograd.grad(o, list(x.values()), do)
        (q, w, e, g, a, b, c, *scale), = made
        taken = q.data_ptr() == x["q"].data_ptr() and b.data_ptr() == x["k"].data_ptr()
        assert e.data_ptr() == x["v"].data_ptr() and scale   # SCALE_ON_LOAD: v itself, β appended
        seen[storage] = fwd.ops, bwd.casts(), [g.detach() for g in grads], taken
    # nothing token-sized is written by either: q, k, v are read as they are (under "fp32": RAW_INPUTS with the
    # same-key kernel's one key slot) and β·v is formed on load (SCALE_ON_LOAD)
    assert seen["input"][0] == [] and seen["fp32"][0] == [], (seen["input"][0], seen["fp32"][0])
    assert seen["input"][1] == [], seen["input"][1]
    assert seen["input"][3] and seen["fp32"][3]           # both: the op reads the caller's q and k
    for gi, gf in zip(seen["input"][2], seen["fp32"][2]):   # the storages' results differ by β·v's rounding alone
        _close(gi, gf, 2e-2, "input vs fp32 storage")


def _same_bits(names, got, want, why):
    """got and want (o, the final state, gradients, named) equal bit for bit under the interpreter. Compiled, each
    setting is its own specialisation, whose register layouts (so fp32 sum orders) may differ: equal to the last
    rounding there (bf16 results, o and the inputs' gradients: 2⁻⁸·|x|; the final state STATE_RTOL; the rest RTOL)."""
    for what, a, b in zip(names, got, want):
        assert a.dtype == b.dtype, what
        if _DEVICE == "cpu":
            assert torch.equal(a, b), what
        else:
            rtol = 2.0 ** -8 if a.dtype == torch.bfloat16 else STATE_RTOL if what == "final state" else RTOL
            _close(a, b, rtol, f"{what}: {why}")


@pytest.mark.parametrize("name, same_key", [("deltanet", True), ("deltanet", False), ("gated_deltanet", True),
                                            ("gla", True), ("mamba2", True), ("longhorn", True)])
def test_raw_inputs_are_bit_identical(name, same_key, monkeypatch):
    # RAW_INPUTS under CHUNK_STORAGE "fp32": bf16 q, k, v that are chunk tensors themselves reach the kernels as they
    # are. The oracle is the fp32 copies they replace: o, the final state and every gradient equal bit for bit under
    # the interpreter (the kernels convert every load to fp32, exactly, and the arithmetic after is the same).
    # Compiled, each pointer dtype is its own specialisation, whose register layouts (so the order of a tile's fp32
    # sums) may differ: there equal to fp32 rounding (on the H100, session 14, the final state was not bit for bit).
    # Which tensors went raw: q always (one slot); k only where it fills one slot with gradients (the same-key
    # kernel's placeholders), and in a forward without gradients. SCALE_ON_LOAD off: its own test below
    from olssm.kernels.triton import chunked_delta_bwd as tdelta
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    monkeypatch.setattr(tlib, "CHUNK_BACKWARD", True)
    monkeypatch.setattr(tdelta, "SAME_KEY", same_key)
    monkeypatch.setattr(tchunk, "CHUNK_STORAGE", "fp32")
    monkeypatch.setattr(tchunk, "SCALE_ON_LOAD", False)
    for env in ("OLSSM_TRITON_CHUNK_STORAGE", "OLSSM_TRITON_SAME_KEY", "OLSSM_TRITON_RAW_INPUTS",
                "OLSSM_TRITON_SCALE_ON_LOAD"):
        monkeypatch.delenv(env, raising=False)
    rule = _rule(name).with_log_decays()
    inp = {n: _dev(x).to(torch.bfloat16) for n, x in random_inputs(rule, 1, 37, 2, 5, 6, seed=47).items()}
    h0 = _dev(0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(47)))
    made = []
    real = tchunk.chunked_forward
    monkeypatch.setattr(tchunk, "chunked_forward", lambda plan, chunk_in, *a, **k: made.append(chunk_in) or
                        real(plan, chunk_in, *a, **k))
    out = {}
    for raw in (False, True):
        monkeypatch.setattr(tchunk, "RAW_INPUTS", raw)
        made.clear()
        x = {n: t.clone().requires_grad_() for n, t in inp.items()}
        o, f = rule.scan(backend="triton", output_final_state=True, initial_state=h0, **x)
        grads = torch.autograd.grad((o.float() * torch.cos(o.float())).sum() + f.square().sum(), list(x.values()))
        with torch.no_grad():
            rule.scan(backend="triton", output_final_state=True, initial_state=h0, **inp)
        out[raw] = [o, f, *grads], [t.dtype for t in made[0][:3]], made[1][0].dtype, made[1][1].dtype
    _same_bits(["o", "final state", *inp], out[True][0], out[False][0], "raw inputs vs fp32 copies")
    bf16, fp32 = torch.bfloat16, torch.float32
    assert out[False][1] == [fp32, fp32, fp32]
    q_dt, w_dt, e_dt = out[True][1]
    lifted = name == "longhorn"   # its k is read by an evaluated expression too (‖k‖²): the up-cast copy
    assert q_dt == bf16 and out[True][2] == bf16 and out[True][3] == (fp32 if lifted else bf16)   # no gradients
    # k is w: raw with gradients only through the same-key placeholders (or a diagonal rule's single slot)
    assert w_dt == (fp32 if lifted else bf16 if same_key or not ENTRIES[name].rule.form.corrections else fp32)
    assert e_dt == (fp32 if name in ("deltanet", "gated_deltanet", "longhorn", "mamba2") else bf16)   # β·v, Δ·v


def _scaled_value_rule(name):
    """Rules whose value side is an input times a per-token scalar (SCALE_ON_LOAD) on the delta kernels the catalogue
    leaves out: a row decay with a scalar step (the fused walk and chunk_rowdecay_bwd_kernel), a row c (the row-c
    backward), an input term on another key than the correction's (the untied split forward and backward)."""
    S, Sp = O.states()
    k, v, u = O.key("k"), O.value("v"), O.key("u")
    step = O.scalar("b", positive=True)
    beta = O.scalar("beta", positive=True)
    if name == "row_decay_scalar_step":
        expr = O.sqnorm(S - O.diag(O.row("r", domain="decay")) @ Sp) / 2 + O.sqnorm(S @ k - v, weight=step) / 2
    elif name == "row_c_scalar_input":
        expr = O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k, weight=O.row("b", positive=True)) / 2 - O.inner(S @ k, v, weight=beta)
    else:
        expr = (O.sqnorm(S - O.scalar("a", domain="decay") * Sp) / 2 + O.sqnorm(S @ k, weight=step) / 2
                - O.inner(S @ u, v, weight=beta))
    return olssm.derive(O.Objective(expr, update="explicit", name=name))


@pytest.mark.parametrize("name, path", [("mamba2", "fused"), ("mamba2", "split"), ("deltanet", "split"),
                                        ("deltanet", "fused"), ("gated_deltanet", "split"),
                                        ("row_decay_scalar_step", "fused"), ("row_c_scalar_input", "fused"),
                                        ("untied_input", "split")])
def test_scale_on_load_is_bit_identical(name, path, monkeypatch):
    # SCALE_ON_LOAD: a value side s·x with s one scalar per token (Mamba-2's Δ·x, DeltaNet's β·v) reaches the kernels
    # as the input x itself and s [B, T, H], multiplied where every kernel that reads e loads it (_value_side). The
    # oracle is the product chunk_inputs writes otherwise (SCALE_ON_LOAD off): o, the final state and every gradient
    # equal bit for bit under the interpreter, bf16 and fp32 inputs, varlen with an empty sequence and an initial
    # state (the kernels form the same fp32 product; ∂e becomes ∂x and ∂s through the same scaled_bwd_kernel);
    # compiled, to fp32 rounding (another specialisation's register layouts). path: the diagonal path (Mamba-2) or
    # the delta forward; the backward is the chunked one (the delta family's, the row-c or the row-decay kernels)
    from olssm.kernels.triton import chunked_delta_bwd as tdelta
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    monkeypatch.setattr(tlib, "CHUNK_BACKWARD", True)
    monkeypatch.setattr(tdelta, "DELTA_BACKWARD", "chunk")
    monkeypatch.setattr(tdelta, "ROW_C_BACKWARD", "chunk")
    for env in ("OLSSM_TRITON_SCALE_ON_LOAD", "OLSSM_TRITON_DELTA_BACKWARD", "OLSSM_TRITON_ROW_C_BACKWARD"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", path)
    monkeypatch.setenv("OLSSM_TRITON_DELTA_FORWARD", path)
    rule = ENTRIES[name].rule.with_log_decays() if name in ENTRIES else _scaled_value_rule(name)
    made = []
    real = tchunk.chunked_forward
    monkeypatch.setattr(tchunk, "chunked_forward", lambda plan, chunk_in, *a, **k: made.append(chunk_in) or
                        real(plan, chunk_in, *a, **k))
    backward = spy(monkeypatch, tdelta if rule.form.corrections else tchunk,
                   "chunked_delta_backward" if rule.form.corrections else "chunked_backward")
    cu = _dev(torch.tensor([0, 16, 16, 37], dtype=torch.int32))
    for dtype in (torch.bfloat16, torch.float32):
        inp = {n: _dev(x).to(dtype) for n, x in random_inputs(rule, 1, 37, 2, 5, 6, seed=49).items()}
        h0 = 0.3 * torch.randn(3, 2, 6, 5, generator=torch.Generator().manual_seed(49))
        out = {}
        for on in (True, False):
            monkeypatch.setattr(tchunk, "SCALE_ON_LOAD", on)
            made.clear()
            o, f, g = _run(rule, inp, h0, "triton", cu_seqlens=cu)
            with torch.no_grad():
                _run(rule, inp, h0, "triton", cu_seqlens=cu, grad=False)
            n = tchunk._chunk_slots(rule.form)
            assert [len(c) for c in made] == [n + on] * 2          # the scale appended, with and without gradients
            assert made[0][2].dtype == (dtype if on else torch.float32)   # e's slot: x itself (raw), or the product
            if on:
                assert made[0][n].shape == (1, 37, 2) and made[0][n].dtype == torch.float32
            out[on] = [o, f, *g.values()]
        _same_bits(["o", "final state", *g], out[True], out[False], "scaled on load vs the product")
    assert len(backward) == 4


def test_scale_on_load_stays_off_where_the_product_is_needed(monkeypatch):
    # SCALE_ON_LOAD hands over x and s only where e_0 is x times a per-token scalar, alone in its slot: not for
    # Longhorn (its factor β/(1 + β‖k‖²) is per value row), GLA (e = v, nothing to scale), a rank-2 rule (sub-tokens),
    # nor with the switch off
    monkeypatch.delenv("OLSSM_TRITON_SCALE_ON_LOAD", raising=False)

    def scales(rule, grad=True):
        return tchunk._scales_on_load(rule.form, tchunk._entries(rule.form), grad)
    assert scales(ENTRIES["mamba2"].rule) and scales(ENTRIES["deltanet"].rule)
    assert scales(_scaled_value_rule("untied_input"))
    assert not scales(ENTRIES["longhorn"].rule) and not scales(ENTRIES["gla"].rule)
    assert not scales(cat.rule(next(iter(cat.DERIVED))))
    monkeypatch.setenv("OLSSM_TRITON_SCALE_ON_LOAD", "0")
    assert not scales(ENTRIES["mamba2"].rule)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_entries_round_as_the_fp32_evaluation(dt, x_dtype, fused, monkeypatch):
    # _Scaled (chunk_inputs' s ⊙ x from the input x itself) against what it replaced, s ⊙ x evaluated on x cast up to
    # fp32 and the product cast to the storage dtype dt: equal, and so are both gradients, for a ∂out in dt. The
    # fused backward (scaled_bwd_kernel, FUSED_SCALE_BWD) rounds ∂x as that path does (equal) and sums ∂s in fp32 in
    # another order: within n fp32 roundings of Σ|∂out ⊙ x| (n terms per entry of ∂s). s is one factor per token and head, and one
    # per head broadcast over the tokens (a learned per-head β): ∂s summed back to its shape; d = 130 spreads the
    # 54 rows over seven programs of 8, the last one partly masked.
    monkeypatch.setattr(tchunk, "FUSED_SCALE_BWD", fused)
    monkeypatch.delenv("OLSSM_TRITON_FUSED_SCALE_BWD", raising=False)
    launches = spy(monkeypatch, tchunk, "scaled_backward")
    gen = torch.Generator().manual_seed(47)
    for s_shape, d in (((2, 9, 3, 1), 7), ((1, 1, 3, 1), 7), ((2, 9, 3, 1), 130)):
        s = _dev(torch.rand(*s_shape, generator=gen)).requires_grad_()
        x = _dev(torch.randn(2, 9, 3, d, generator=gen)).to(x_dtype).requires_grad_()
        dout = _dev(torch.randn(2, 9, 3, d, generator=gen)).to(dt)
        got = tchunk._Scaled.apply(s.expand(2, 9, 3, 1), x, dt)
        ref = (s * x.to(torch.float32)).to(dt)
        assert got.dtype == dt and got.is_contiguous() and torch.equal(got, ref)
        (ds, dx), (ds_ref, dx_ref) = (torch.autograd.grad(y, (s, x), dout) for y in (got, ref))
        assert dx.dtype == dx_ref.dtype and torch.equal(dx, dx_ref)
        assert ds.dtype == ds_ref.dtype and ds.shape == ds_ref.shape
        if fused or s_shape[1] == 1 or d > 7:   # (torch too sums a broadcast s's or a long row's terms in its own order)
            bound = x.numel() // ds.numel() * 2.0 ** -24 * (dout.float() * x.float()).abs().sum_to_size(s.shape)
            assert ((ds - ds_ref).abs() <= bound).all(), (ds - ds_ref).abs().max()
        else:
            assert torch.equal(ds, ds_ref)
    assert len(launches) == (3 if fused else 0)


# ---- CHECKPOINT_STORAGE = "input": bf16 / fp16 checkpoints ck ---------------------------------------------

@pytest.mark.parametrize("name, dtype, chunk_bwd", [("linear_attention", torch.bfloat16, True),
                                                    ("retnet", torch.bfloat16, True),
                                                    ("mamba2", torch.bfloat16, True),
                                                    ("mamba2", torch.float16, True),
                                                    # the chunked forward's ck read by the recurrent backward
                                                    ("gla", torch.bfloat16, False),
                                                    ("row_decay", torch.bfloat16, False),
                                                    ("row_decay_delta", torch.bfloat16, False)])
def test_checkpoint_storage_input_matches_fp32(name, dtype, chunk_bwd, monkeypatch):
    # chunk_fwd_kernel (chunk_delta_fwd_kernel for the row-decay delta rule) writing bf16 / fp16 checkpoints, read
    # by chunk_bwd_kernel or by the generated recurrent bwd_kernel (GLA with CHUNK_BACKWARD False, row decays),
    # against the same run with fp32 checkpoints (tolerance: triton_testing.CHECKPOINT_RTOL; final state equal)
    monkeypatch.setattr(tlib, "CHUNK_BACKWARD", chunk_bwd)
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    chunked_bwd = spy(monkeypatch, tchunk, "chunked_backward")
    rule = _rule(name)
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=42)
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(42))
    rel = _compare_ck(rule, inp, h0, monkeypatch, dtype)
    assert len(chunked_bwd) == (2 if chunk_bwd else 0)
    assert rel["o"] == 0.0, rel   # the forward computes o from its fp32 register state; only the backward reads ck
    print(name, dtype, {k: f"{v:.2e}" for k, v in rel.items()})


def test_checkpoint_storage_dtypes(monkeypatch):
    # ck's dtype with the knob off / on, for bf16 / fp16 / fp32 inputs (fp32 ignores it), the environment
    # override, an invalid value; the recurrent path keeps fp32 checkpoints under the knob
    assert tchunk.checkpoint_storage(torch.bfloat16) == torch.float32
    monkeypatch.setattr(tchunk, "CHECKPOINT_STORAGE", "input")
    assert tchunk.checkpoint_storage(torch.bfloat16) == torch.bfloat16
    assert tchunk.checkpoint_storage(torch.float16) == torch.float16
    assert tchunk.checkpoint_storage(torch.float32) == torch.float32
    monkeypatch.setenv("OLSSM_TRITON_CHECKPOINT_STORAGE", "fp32")      # the environment overrides the module
    assert tchunk.checkpoint_storage(torch.bfloat16) == torch.float32
    monkeypatch.setenv("OLSSM_TRITON_CHECKPOINT_STORAGE", "bf16")
    with pytest.raises(ValueError, match="checkpoint storage"):
        tchunk.checkpoint_storage(torch.bfloat16)
    monkeypatch.delenv("OLSSM_TRITON_CHECKPOINT_STORAGE")
    rule = ENTRIES["retnet"].rule
    inp = random_inputs(rule, 1, 20, 1, 4, 4, seed=47)
    seen = []
    real = tchunk.chunked_forward
    monkeypatch.setattr(tchunk, "chunked_forward", lambda *a, **k: seen.append(a[5].dtype) or real(*a, **k))
    ck_seen = []
    real_bwd = tlib.triton_scan_bwd
    monkeypatch.setattr(tlib, "triton_scan_bwd", lambda *a, **k: ck_seen.append(a[5].dtype) or real_bwd(*a, **k))
    for mode, dtype, want in [("fp32", torch.bfloat16, torch.float32), ("input", torch.bfloat16, torch.bfloat16),
                              ("input", torch.float16, torch.float16), ("input", torch.float32, torch.float32)]:
        monkeypatch.setattr(tchunk, "CHECKPOINT_STORAGE", mode)
        seen.clear()
        monkeypatch.setattr(tlib, "FORCE", "chunk")
        _run(rule, {n: x.to(dtype) for n, x in inp.items()}, None, "triton")
        assert seen == [want], (mode, dtype, seen)
        monkeypatch.setattr(tlib, "FORCE", "recurrent")   # the token loop: fp32 checkpoints whatever the knob
        ck_seen.clear()
        _run(rule, {n: x.to(dtype) for n, x in inp.items()}, None, "triton")
        assert seen == [want] and ck_seen == [torch.float32], (mode, dtype, ck_seen)
    # the op: ck_dtype None / fp32 → fp32; bf16 only on the chunked path
    plan = tscan.plan_for(rule)
    key = tlib.register(plan)
    x = {n: _dev(t) for n, t in inp.items()}
    syms = [x[s.name] for s in plan.syms]
    with pytest.raises(ValueError, match="chunked kernels only"):
        torch.ops.olssm.triton_scan_fwd(key, syms, [], [], None, None, [1, 20, 1, 4, 4, 1, 20, 4], torch.float32,
                                        True, False, False, torch.bfloat16)


def test_generated_backward_converts_checkpoints():
    # the recurrent bwd_kernel reads the chunked forward's ck where no chunked backward runs: with
    # CHECKPOINT_STORAGE = "input" that ck is bf16 / fp16, so its load converts to fp32 (the scratch stays fp32)
    from olssm.kernels.triton import codegen
    for name in ("gla", "retnet", "deltanet"):
        src = codegen.backward_source(ENTRIES[name].rule.form)
        loads = [ln for ln in src.splitlines() if "tl.load(ck_ptr" in ln]
        assert loads and all(ln.rstrip().rstrip('",').endswith(".to(tl.float32)") for ln in loads), loads


def test_every_chunked_load_converts():
    # CHUNK_STORAGE = "input" relies on every kernel converting what it loads before any arithmetic (tl.dot refuses
    # bf16 × fp32, but elementwise ops would silently run in bf16): every tl.load( in the chunked kernels' modules
    # is followed by .to(tl.float32), .to(tl.float64) (log decays) or .to(tl.int32) (cu_seqlens, the chunk map), or
    # wrapped in _operand (a dot operand in the dot's dtype)
    import inspect
    import re
    from olssm.kernels.triton import chunked_delta_bwd
    n = 0
    for mod in (tchunk, chunked_delta_bwd):
        src = inspect.getsource(mod)
        for m in re.finditer(r"tl\.load\(", src):
            i, depth = m.end(), 1
            while depth:
                depth += {"(": 1, ")": -1}.get(src[i], 0)
                i += 1
            n += 1
            line = src.count("\n", 0, m.start()) + 1
            # or the load is a dot operand: chunked._operand converts it (to fp32, or to bf16 for a bf16 dot)
            assert (re.match(r"\.to\(tl\.(float32|float64|int32)\)", src[i:])
                    or src[:m.start()].endswith("_operand(")), f"{mod.__name__}:{line}: {src[m.start():i]}"
    assert n > 90


def test_benchmark_lifts_only_flas_hopper_guard(monkeypatch):
    # fla 0.6 refuses its gated backward on Hopper with Triton 3.4-3.7.0 by a module flag; the benchmark lifts that
    # flag once to time the backward (row marked "gradients unchecked"), and nothing else
    import sys
    import types
    bench = _bench_module()
    chunk_o = types.ModuleType("fla.ops.common.chunk_o")
    chunk_o.TRITON_ABOVE_3_7_1 = False
    for name, module in (("fla", types.ModuleType("fla")), ("fla.ops", types.ModuleType("fla.ops")),
                         ("fla.ops.common", types.ModuleType("fla.ops.common")), ("fla.ops.common.chunk_o", chunk_o)):
        monkeypatch.setitem(sys.modules, name, module)
    refusal = RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results for gated ...")
    assert not bench.lift_fla_hopper_guard(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert chunk_o.TRITON_ABOVE_3_7_1 is False
    assert bench.lift_fla_hopper_guard(refusal) and chunk_o.TRITON_ABOVE_3_7_1 is True
    assert not bench.lift_fla_hopper_guard(refusal)   # a second refusal is not retried


_RANK_PROBE = None


def _rank_probe():
    """A kernel that stores _rank_offset(m, stride) and the plain product m · stride for m < 3 (built once)."""
    global _RANK_PROBE
    if _RANK_PROBE is None:
        import triton
        import triton.language as tl

        @triton.jit
        def probe(out_ptr, stride, M: tl.constexpr):
            for m in tl.static_range(M):
                tl.store(out_ptr + 2 * m, tchunk._rank_offset(m, stride))
                tl.store(out_ptr + 2 * m + 1, m * stride)

        _RANK_PROBE = probe
    return _RANK_PROBE


@pytest.mark.skipif(_DEVICE != "cpu", reason="the wrap is the interpreter's int32 arithmetic, as compiled")
def test_rank_offsets_are_int64_where_int32_would_wrap():
    # A rank slice of 2³⁰ + 5 elements (B·T·H·d of a long rank-3 call) arrives as an int32 scalar: m · stride wraps at
    # m = 2 (the oracle: Python's exact product), which the second column shows happens, and _rank_offset does not.
    stride = 2 ** 30 + 5
    out = torch.zeros(6, dtype=torch.int64)
    _rank_probe()[(1,)](out, stride, M=3)
    got, plain = out[0::2].tolist(), out[1::2].tolist()
    assert got == [0, stride, 2 * stride]
    assert plain[2] != 2 * stride   # the interpreter wraps like the compiled kernel: the probe can fail
    # a stride of 1 is specialised to a constant: the helper takes that too
    _rank_probe()[(1,)](out, 1, M=3)
    assert out[0::2].tolist() == [0, 1, 2]


def test_rank_terms_are_addressed_through_rank_offset():
    # every stacked rank-term tensor (k / w through SW, v / e through SE) is offset by _rank_offset in the chunked
    # kernels' source, never by an int32 product m · SW / m · SE (the test above shows the wrap)
    import re
    from olssm.kernels.triton import chunked_delta_bwd
    for mod in (tchunk, chunked_delta_bwd):
        src = Path(mod.__file__).read_text()
        assert not re.findall(r"\b[a-z]\w* \* S[EW]\b", src), mod.__name__
        assert "_rank_offset(m, SE)" in src


def test_fused_walks_launch_with_maxnreg(monkeypatch):
    # WALK_MAXNREG reaches the three fused walks' launches (and no other kernel's): the fused delta forward
    # (a row-decay delta rule), its row-decay backward, the diagonal family's fused backward (Mamba-2); 0 in the
    # environment turns it off, and a bad value is an error naming the variable. (The interpreter ignores .maxnreg:
    # the register counts are aot_check's, TRITON.md.)
    from olssm.kernels.triton import chunked_delta_bwd as tdelta
    walks = ["chunk_delta_fwd_kernel", "chunk_bwd_kernel", "chunk_rowdecay_bwd_kernel"]
    seen = {}
    record = lambda name, kwargs: seen.update({name: kwargs.get("maxnreg")})   # noqa: E731
    spy_launches(monkeypatch, tchunk, walks[:2], record)
    spy_launches(monkeypatch, tdelta, walks[2:], record)
    monkeypatch.setattr(tchunk, "DIAG_PATH", "fused")
    monkeypatch.delenv("OLSSM_TRITON_DIAG_PATH", raising=False)
    monkeypatch.setattr(tlib, "CHUNK_BACKWARD", True)   # the row decay is raw: "auto" would take the recurrent backward
    for env, want in ((None, 255), ("0", None)):
        if env is not None:
            monkeypatch.setenv("OLSSM_TRITON_WALK_MAXNREG", env)
        seen.clear()
        for name in ("row_decay_delta", "mamba2"):
            rule = _rule(name)
            inp = random_inputs(rule, 1, 37, 1, 5, 6, seed=9)
            _compare(rule, inp, 0.3 * torch.randn(1, 1, 6, 5, generator=torch.Generator().manual_seed(9)))
        assert seen == {n: want for n in walks}, seen
    assert "maxnreg" not in tchunk._launch_opts()
    monkeypatch.setenv("OLSSM_TRITON_WALK_MAXNREG", "many")
    with pytest.raises(ValueError, match="OLSSM_TRITON_WALK_MAXNREG"):
        tchunk.walk_maxnreg()


@pytest.mark.parametrize("name", ["mamba2", "retnet", "gated_deltanet"])
def test_decay_factors_are_bit_identical(name, monkeypatch):
    # DECAY_FACTORS: a scalar decay's Γ, Γ_L/Γ and Γ_L from a pre-pass parallel over chunks (chunk_decay_factors_kernel)
    # instead of an fp64 scan and sum inside the sequential state passes: the split diagonal path's forward and
    # reverse passes (Mamba-2's Δ·A, RetNet's per-head constant), the split delta forward's and the delta backward's
    # state kernels (Gated DeltaNet). Oracle: the passes forming them themselves (DECAY_FACTORS off); o, the final
    # state and every gradient equal bit for bit under the interpreter (the same helper on the same values), varlen
    # with an empty sequence and an initial state. The spy checks which launches took the factors
    from olssm.kernels.triton import chunked_delta_bwd as tdelta
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    monkeypatch.setattr(tlib, "CHUNK_BACKWARD", True)
    monkeypatch.setattr(tdelta, "DELTA_BACKWARD", "chunk")
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", "split")
    monkeypatch.setenv("OLSSM_TRITON_DELTA_FORWARD", "split")
    monkeypatch.delenv("OLSSM_TRITON_DECAY_FACTORS", raising=False)
    took = []
    kernels = {"chunk_fwd_kernel": "state", "chunk_bwd_kernel": "reverse", "chunk_delta_state_kernel": "state",
               "chunk_decay_factors_kernel": "pre-pass"}
    spy_launches(monkeypatch, tchunk, {k: v for k, v in kernels.items() if k != "chunk_delta_state_kernel"},
                 lambda label, kw: took.append((label, kw.get("FACTORS", False))))
    spy_launches(monkeypatch, tchunk, {"chunk_delta_state_kernel": "state"},
                 lambda label, kw: took.append((label, kw.get("FACTORS", False))))
    spy_launches(monkeypatch, tdelta, {"chunk_delta_bwd_state_kernel": "reverse"},
                 lambda label, kw: took.append((label, kw.get("FACTORS", False))))
    rule = ENTRIES[name].rule.with_log_decays()
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=53)
    h0 = 0.3 * torch.randn(3, 2, 6, 5, generator=torch.Generator().manual_seed(53))
    cu = _dev(torch.tensor([0, 16, 16, 37], dtype=torch.int32))
    out = {}
    for on in (True, False):
        monkeypatch.setattr(tchunk, "DECAY_FACTORS", on)
        took.clear()
        out[on] = _run(rule, inp, h0, "triton", cu_seqlens=cu)
        want = [("pre-pass", False), ("state", True), ("pre-pass", False), ("reverse", True)] if on else \
            [("state", False), ("reverse", False)]
        assert [t for t in took if t[0] != "pre-pass" or on] == want, took
    (o1, f1, g1), (o2, f2, g2) = out[True], out[False]
    # compiled, the fp64 scan's association may also follow the launch's layout
    _same_bits(["o", "final state", *g1], [o1, f1, *g1.values()], [o2, f2, *g2.values()], "decay factors vs in-loop")
