"""The block-parallel-scan kernels (pfwd_kernel / pbwd_kernel, olssm/kernels/triton/pscan.py) against
the reference backend: o, the final state and every gradient (q, k, v, coefficients, parameters, the
initial state), forced on (library.PARALLEL_SCAN = True, FORCE = "recurrent") under the interpreter.

Tolerances (tests/triton_testing.py, as tests/test_triton.py): fp32, max|triton − reference| ≤
1e-5·max|reference| + 1e-6 for o and every gradient, 2e-5 for the final state; bf16 inputs vs the fp32
reference on the same rounded values: 2e-2 (o, state) and 5e-2 (gradients).
Blocks are small (BT = 4 tokens, BV = 4 value rows: d_v = 6 gives two value blocks, one masked) so
that short sequences cross several blocks; T is never a multiple of BT.
"""
import os

from triton_testing import (DEVICE, close, compare, dev, elementwise_row_csum_rule, run,  # noqa: E402  (sets TRITON_INTERPRET first)
                            separate_sequences_match, split_scan_matches, spy)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import olssm  # noqa: E402
from olssm import objectives as O  # noqa: E402
from olssm.catalogue import ENTRIES, random_inputs  # noqa: E402
from olssm.kernels.triton import library  # noqa: E402
from olssm.kernels.triton import scan as tscan  # noqa: E402
from strategies import objectives  # noqa: E402

RULES = ["mamba", "longhorn_diag", "gla", "retnet", "mamba2", "linear_attention"]


@pytest.fixture(autouse=True)
def _pscan(monkeypatch):
    monkeypatch.setattr(library, "PARALLEL_SCAN", True)
    monkeypatch.setattr(library, "FORCE", "recurrent")
    monkeypatch.setattr(library, "PSCAN_BLOCK_T", 4)
    monkeypatch.setattr(library, "PSCAN_BLOCK_V", 4)


@pytest.fixture
def calls(monkeypatch):
    """Counts pscan_blocks calls: one per pfwd / pbwd launch."""
    return spy(monkeypatch, library, "pscan_blocks")


def _h0(N, H, V, K, seed):
    return 0.3 * torch.randn(N, H, V, K, generator=torch.Generator().manual_seed(seed))


# ---- the catalogue -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RULES)
def test_catalogue_forward_and_all_gradients(name, calls):
    rule = ENTRIES[name].rule
    g = compare(rule, random_inputs(rule, 2, 9, 2, 5, 6, seed=1), _h0(2, 2, 6, 5, 2))
    assert set(g) == set(rule.inputs) | {"h0"}
    assert len(calls) == 2          # pfwd and pbwd ran (not the loop kernels)


@pytest.mark.parametrize("name, T, d_k, d_v, bt", [
    (n, *shape) for n in ("mamba", "longhorn_diag", "gla") for shape in ((1, 5, 3, 4), (6, 3, 9, 4))]
    + [("mamba", 37, 20, 3, 16), ("longhorn_diag", 37, 20, 3, 8)])
def test_odd_shapes(name, T, d_k, d_v, bt, monkeypatch):
    # T = 37 with the default 16-token blocks: three blocks, the last one 5 tokens (8-token blocks: five);
    # d_k = 20 → BK = 32. One head at T = 37: the interpreter runs tl.associative_scan element by element
    monkeypatch.setattr(library, "PSCAN_BLOCK_T", bt)
    rule = ENTRIES[name].rule
    H = 1 if T > 9 else 2
    compare(rule, random_inputs(rule, 1, T, H, d_k, d_v, seed=T + d_k), _h0(1, H, d_v, d_k, T))


def test_default_block_sizes(monkeypatch, calls):
    # library's own BV choice (PSCAN_TILE / PSCAN_BWD_TILE), forward and backward grids differing
    monkeypatch.setattr(library, "PSCAN_BLOCK_V", None)
    monkeypatch.setattr(library, "PSCAN_TILE", 256)
    monkeypatch.setattr(library, "PSCAN_BWD_TILE", 128)
    assert library.pscan_blocks(5, 6, 4) == (8, 8) and library.pscan_blocks(5, 6, 4, backward=True) == (8, 4)
    calls.clear()
    rule = ENTRIES["mamba"].rule
    compare(rule, random_inputs(rule, 1, 7, 2, 5, 6, seed=3), _h0(1, 2, 6, 5, 3))
    assert len(calls) == 2


# ---- state round trip, varlen, strong decays ------------------------------------------------------

@pytest.mark.parametrize("name", ["mamba", "gla"])
def test_initial_final_state_round_trip(name):
    rule = ENTRIES[name].rule
    split_scan_matches(rule, random_inputs(rule, 2, 11, 2, 5, 6, seed=5), 5)


@pytest.mark.parametrize("name", ["mamba", "longhorn_diag", "retnet"])
def test_varlen_equals_separate_sequences(name):
    rule = ENTRIES[name].rule
    cu = [0, 3, 3, 10, 13]       # an empty sequence, one shorter than a block, one crossing blocks
    inp = random_inputs(rule, 1, 13, 2, 5, 6, seed=6)
    h0 = _h0(4, 2, 6, 5, 6)
    cu_t = dev(torch.tensor(cu, dtype=torch.int32))
    compare(rule, inp, h0, cu_seqlens=cu_t)
    separate_sequences_match(rule, inp, h0, cu)


@pytest.mark.parametrize("name", ["mamba", "longhorn_diag", "gla"])
def test_strong_decay_stays_finite(name):
    # decays that underflow to 0 within a block (cumulative products of exp(−100)), zero decays (resets)
    rule = ENTRIES[name].rule
    inp = random_inputs(rule, 1, 11, 2, 5, 6, seed=7)
    if name == "mamba":
        inp["dt"] = inp["dt"] * torch.tensor([1.0, 1e4, 1.0, 1.0, 1e4, 1.0, 1.0, 1.0, 1e4, 1.0, 1.0])[None, :, None, None]
    elif name == "longhorn_diag":   # β‖k‖² ≫ 1 with β in its domain (0, 1]: ε ≈ 1/‖k‖², decays e^{−k²/‖k‖²}
        inp["k"] = inp["k"] * 600.0
    else:
        inp["g"][:, ::3] = 0.0
        inp["g"][:, 1::3] = 1e-30
    compare(rule, inp, _h0(1, 2, 6, 5, 7))    # (also asserts that o, the state and every gradient are finite)


def test_low_precision_inputs():
    rule = ENTRIES["mamba"].rule
    low = {n: x.to(torch.bfloat16) for n, x in random_inputs(rule, 1, 9, 2, 5, 6, seed=8).items()}
    o1, f1, g1 = run(rule, {n: x.float() for n, x in low.items()}, None, "reference")
    o2, f2, g2 = run(rule, low, None, "triton")
    assert o2.dtype == torch.bfloat16 and f2.dtype == torch.float32
    close(o2, o1, 2e-2, "o")
    close(f2, f1, 2e-2, "final state")
    for n in g1:
        assert g2[n].dtype == torch.bfloat16
        close(g2[n], g1[n], 5e-2, f"d{n}")


# ---- generated expressions: csum nodes, custom objectives ------------------------------------------

def test_elementwise_generator_with_row_csum():
    # a row-kind key sum inside the decay's generator: its adjoint is a [BT, BV, 1] tile in pbwd
    rule = elementwise_row_csum_rule()
    compare(rule, random_inputs(rule, 2, 7, 2, 5, 6, seed=3), _h0(2, 2, 6, 5, 3))


@settings(max_examples=int(os.environ.get("OLSSM_TRITON_EXAMPLES", 4)), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(objectives(max_keys=1), st.integers(0, 3))
def test_custom_objectives_without_corrections(obj, seed):
    # every decay kind, 0 or 1 input terms, ridge / linear terms (draws with corrections are discarded)
    try:
        rule = olssm.derive(obj)
    except O.DerivationError:
        assume(False)
    assume(not rule.is_exact and not rule.form.corrections)
    compare(rule, random_inputs(rule, 1, 6, 1, 4, 5, seed=seed), _h0(1, 1, 5, 4, seed))


# ---- policy, source, torch.library ----------------------------------------------------------------

def test_auto_policy(monkeypatch):
    monkeypatch.setattr(library, "PARALLEL_SCAN", "auto")
    monkeypatch.setattr(library, "PSCAN_BLOCK_T", 16)
    monkeypatch.delenv("OLSSM_TRITON_PSCAN", raising=False)
    plan = lambda n: tscan.plan_for(ENTRIES[n].rule)
    assert library._pscan_choice(plan("mamba"), 64) == 16            # elementwise decay, > BT tokens
    assert library._pscan_choice(plan("longhorn_diag"), 17) == 16
    assert library._pscan_choice(plan("mamba"), 16) == 0             # one block (decode: T = 1)
    assert library._pscan_choice(plan("gla"), 64) == 0               # other decays: not before a GPU timing
    assert library._pscan_choice(plan("deltanet"), 64) == 0          # corrections: never
    monkeypatch.setenv("OLSSM_TRITON_PSCAN", "1")
    assert library._pscan_choice(plan("gla"), 1) == 16 and library._pscan_choice(plan("deltanet"), 64) == 0
    monkeypatch.setenv("OLSSM_TRITON_PSCAN", "0")
    assert library._pscan_choice(plan("mamba"), 64) == 0
    monkeypatch.setattr(library, "PARALLEL_SCAN", "sometimes")
    with pytest.raises(ValueError, match="PARALLEL_SCAN"):
        library._pscan_choice(plan("mamba"), 64)


def test_kernel_source_has_the_block_scan_kernels():
    src = ENTRIES["mamba"].rule.kernel_source("triton")
    assert "def pfwd_kernel" in src and "def pbwd_kernel" in src and "tl.associative_scan" in src
    assert "reverse=True" in src and "E_lam" not in src           # Λ printed in-kernel, never materialised
    assert "def fwd_kernel" in src and "def bwd_kernel" in src    # the loop kernels are still there
    assert "pfwd_kernel" not in ENTRIES["deltanet"].rule.kernel_source("triton")


def test_chunked_path_ignores_the_knob(monkeypatch, calls):
    monkeypatch.setattr(library, "FORCE", "prefer-chunk")
    rule = ENTRIES["gla"].rule
    compare(rule, random_inputs(rule, 1, 9, 1, 4, 4, seed=2), None)
    assert not calls


@pytest.mark.skipif(DEVICE != "cpu", reason="opcheck under the interpreter")
def test_opcheck():
    import olssm.kernels.triton.library as tlib
    rule = ENTRIES["mamba"].rule
    plan = tscan.plan_for(rule)
    key = tlib.register(plan)
    B, T, H, K, V = 1, 6, 1, 4, 4
    inp = {n: dev(t).requires_grad_() for n, t in random_inputs(rule, B, T, H, K, V, seed=10).items()}
    syms = [inp[s.name] for s in plan.syms]
    sizes = [B, T, H, K, V, B, T, 4, 4]          # C = BT = 4: the block scan
    E = [e.detach().requires_grad_() for e in tlib.evaluate_entries(plan, inp, sizes)]
    h0 = dev(torch.randn(B, H, V, K)).requires_grad_()
    torch.library.opcheck(torch.ops.olssm.triton_scan_fwd.default,
                          (key, syms, E, [], h0, None, sizes, torch.float32, True, False, False, None))


def test_torch_compile_matches_eager(calls):
    # the op's signature is unchanged (sizes carries BT as a 9th entry): aot_eager traces the same graph
    torch._dynamo.reset()
    rule = ENTRIES["mamba"].rule
    inp = {n: dev(t) for n, t in random_inputs(rule, 1, 6, 1, 4, 4, seed=11).items()}
    h0 = dev(_h0(1, 1, 4, 4, 11))

    def fn(h, x):
        o, f = rule.scan(backend="triton", initial_state=h, output_final_state=True, **x)
        return (o * o).sum() + (f * f).sum()

    outs = []
    for f in (fn, torch.compile(fn, backend="aot_eager")):
        x = {n: t.clone().requires_grad_() for n, t in inp.items()}
        h = h0.clone().requires_grad_()
        loss = f(h, x)
        outs.append((loss, torch.autograd.grad(loss, [h, *x.values()])))
    (l1, g1), (l2, g2) = outs
    assert len(calls) == 4              # pfwd + pbwd, eager and compiled
    close(l2, l1, 1e-6, "loss")
    for a, b in zip(g2, g1):
        close(a, b, 1e-6, "grad")
