"""backend="triton": the delta family's chunked backward (chunked_delta_bwd.py), scalar or row c (Longhorn),
none / scalar decay.

Under the Triton CPU interpreter (TRITON_INTERPRET=1, set before triton is imported) with tiny shapes and
16-token chunks (4 in one test). On a GPU: `OLSSM_TRITON_DEVICE=cuda pytest tests/test_triton_delta_bwd.py`.
Tolerances as in test_triton_chunked.py: max|triton − reference| <= 1e-5·max|reference| + 1e-6 (final
state 2e-5). The direct tests call the kernels on chunk tensors with independent a, b, w (the catalogue's
rules have a = b = w = k, so torch sums their gradients; the untied kernels) or with b = w_0 (the TIED value and
key kernels, chunked._tied) against an fp64 autograd loop; the `ties` fixture records which the launches took.
"""
from triton_testing import (DEVICE as _DEVICE, RTOL, STATE_RTOL, close as _close, compare as _compare,  # noqa: E402
                            CHECKPOINT_RTOL, STORAGE_RTOL, STORAGE_STATE_RTOL, compare_checkpoint_storage as _compare_ck,
                            compare_storage as _compare_storage, decay_scale_errors, run as _run,
                            dev as _dev, pin_fp32_storage, split_scan_matches, spy)  # (sets TRITON_INTERPRET first)

import pytest  # noqa: E402
import sympy as sp  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402

import olssm  # noqa: E402
from olssm import objectives as O  # noqa: E402
from olssm.catalogue import ENTRIES, random_inputs  # noqa: E402
from olssm.kernels.triton import chunked as tchunk  # noqa: E402
from olssm.kernels.triton import chunked_delta_bwd as tdelta  # noqa: E402
from olssm.kernels.triton import library as tlib  # noqa: E402
from olssm.kernels.triton import scan as tscan  # noqa: E402



@pytest.fixture(autouse=True)
def _small(monkeypatch):
    monkeypatch.setattr(tlib, "CHUNK", 16)
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    monkeypatch.setattr(tdelta, "DELTA_BACKWARD", "chunk")
    monkeypatch.setattr(tdelta, "ROW_C_BACKWARD", "chunk")
    for var in ("OLSSM_TRITON_KERNEL", "OLSSM_TRITON_CHUNK_BWD", "OLSSM_TRITON_DELTA_BACKWARD",
                "OLSSM_TRITON_ROW_C_BACKWARD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tlib, "_chunk_pays", lambda plan, args: True)
    pin_fp32_storage(monkeypatch)


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the delta family's chunked backward."""
    return spy(monkeypatch, tdelta, "chunked_delta_backward")


@pytest.fixture
def row_calls(monkeypatch):
    """Counts calls of the row-c chunked backward."""
    return spy(monkeypatch, tdelta, "chunked_rowc_backward")


class _Launch:
    """Stands in for a kernel: kernel[grid](*args, **constexprs) appends record(constexprs) to seen, then launches
    (works compiled and interpreted)."""

    def __init__(self, kernel, record, seen):
        self.kernel, self.record, self.seen = kernel, record, seen

    def __getitem__(self, grid):
        run = self.kernel[grid]
        return lambda *a, **k: self.seen.append(self.record(k)) or run(*a, **k)


@pytest.fixture
def ties(monkeypatch):
    """The TIED constexpr of every launch of the value and key kernels: [(kernel, TIED), ...]."""
    seen = []
    for name in ("chunk_delta_bwd_value_kernel", "chunk_delta_bwd_key_kernel"):
        short = name.split("_")[3]
        monkeypatch.setattr(tdelta, name, _Launch(getattr(tdelta, name),
                                                  lambda k, short=short: (short, k.get("TIED", False)), seen))
    return seen




def _log_gated_deltanet():
    # decay exp(la): log Λ in closed form, so "auto" takes the chunked backward
    S, _ = O.states()
    beta = O.scalar("beta", domain="unit")
    la = O.scalar("la", domain="negative")
    return olssm.derive(O.Objective(O.sqnorm(S @ O.key("k") - O.value("v"), weight=beta) / 2, update="explicit",
                                    decay=sp.exp(la), name="log-gated DeltaNet"))


def _two_term_rule(row=False):
    S, _ = O.states()
    beta = O.row("beta", domain="unit") if row else O.scalar("beta", domain="unit")
    decay = sp.exp(O.scalar("la", domain="negative")) if row else O.scalar("alpha", domain="decay")
    return olssm.derive(O.Objective(O.sqnorm(S @ O.key("k") - O.value("v"), weight=beta) / 2
                                    - O.inner(S @ O.key("kl"), O.scalar("s") * O.value("vl")), update="explicit",
                                    decay=decay, name="two-term gated DeltaNet" + (", row β" if row else "")))


def _gated_longhorn():
    # a row c with a scalar decay exp(la) (closed-form log: "auto" takes the chunked backward)
    S, Sp = O.states()
    beta = O.row("beta", domain="unit")
    la = O.scalar("la", domain="negative")
    return olssm.derive(O.Objective(O.sqnorm(S - sp.exp(la) * Sp) / 2
                                    + O.sqnorm(S @ O.key("k") - O.value("v"), weight=beta) / 2,
                                    name="gated Longhorn"))


def _blocks16(monkeypatch):
    for mod, name in [(tchunk, "SPLIT_BLOCK_V"), (tchunk, "SPLIT_BLOCK_K"), (tdelta, "VALUE_BLOCK_K"),
                      (tdelta, "KEY_BLOCK_K")]:
        monkeypatch.setattr(mod, name, 16)


# ---- through rule.scan, against the reference backend --------------------------------------------------

@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_catalogue_rules_and_the_recurrent_switch(name, calls, ties, monkeypatch):
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")            # Gated DeltaNet: log α has no closed form
    rule = ENTRIES[name].rule
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=1)           # 37 = 2 chunks of 16 + 5
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(2))
    g_chunk = _compare(rule, inp, h0)
    assert len(calls) == 1
    assert ties == [("value", True), ("key", True)]              # w = b = k: the TIED value and key kernels
    monkeypatch.setattr(tdelta, "DELTA_BACKWARD", "recurrent")
    assert not tchunk.backward_supported(tscan.plan_for(rule), exact_decay_grad=False)
    g_rec = _compare(rule, inp, h0)
    assert len(calls) == 1
    for n in g_chunk:
        _close(g_chunk[n], g_rec[n], RTOL, f"d{n}: chunk vs recurrent backward")
    monkeypatch.setattr(tdelta, "DELTA_BACKWARD", "chunk")
    monkeypatch.setenv("OLSSM_TRITON_DELTA_BACKWARD", "recurrent")
    assert not tchunk.backward_supported(tscan.plan_for(rule), exact_decay_grad=False)
    monkeypatch.setenv("OLSSM_TRITON_DELTA_BACKWARD", "bogus")
    with pytest.raises(ValueError, match="delta backward"):
        tchunk.backward_supported(tscan.plan_for(rule))


def test_auto_policy(calls, monkeypatch):
    # "auto": the chunked delta backward where there is no decay or log Λ has a closed form (scalar or row c)
    monkeypatch.setattr(tlib, "FORCE", None)
    plan = tscan.plan_for
    assert tchunk.backward_supported(plan(ENTRIES["deltanet"].rule))
    assert tchunk.backward_supported(plan(_log_gated_deltanet()))
    assert not tchunk.backward_supported(plan(ENTRIES["gated_deltanet"].rule))
    assert tchunk.backward_supported(plan(ENTRIES["gated_deltanet"].rule), exact_decay_grad=False)
    assert tchunk.backward_supported(plan(ENTRIES["longhorn"].rule))      # row c, no decay
    rule = ENTRIES["gated_deltanet"].rule
    _compare(rule, random_inputs(rule, 1, 33, 1, 4, 5, seed=3), None)
    assert len(calls) == 0
    # the same rule reading log α (Rule.with_log_decays, what the layers hand over): the chunked backward
    rule = rule.with_log_decays()
    assert tchunk.backward_supported(plan(rule))
    _compare(rule, random_inputs(rule, 1, 33, 1, 4, 5, seed=3), None)
    assert len(calls) == 1


def test_strong_decay_closed_form_log(calls):
    rule = _log_gated_deltanet()
    inp = random_inputs(rule, 1, 40, 2, 5, 6, seed=5)
    inp["la"][:, 20] = -30.0                                     # one token forgets (nearly) everything
    inp["la"][:, 3] = -1e-3
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(5))
    _compare(rule, inp, h0)
    assert len(calls) == 1


@pytest.mark.parametrize("tie", [True, False])
def test_two_input_terms(tie, calls, ties, monkeypatch):
    # the first input term's w is k = b: TIED (m = 0 folded, m = 1 as untied); TIE_INPUT_TERM off: untied
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    monkeypatch.setattr(tchunk, "TIE_INPUT_TERM", tie)
    rule = _two_term_rule()
    assert len(rule.form.inputs) == 2 and len(rule.form.corrections) == 1
    _compare(rule, random_inputs(rule, 1, 21, 1, 4, 5, seed=13), 0.3 * torch.randn(1, 1, 5, 4))
    assert len(calls) == 1
    assert ties == [("value", tie), ("key", tie)]


def test_varlen(calls, ties, monkeypatch):
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    rule = ENTRIES["gated_deltanet"].rule
    cu = [0, 5, 5, 6, 43]                                        # lengths 5, 0, 1, 37
    inp = random_inputs(rule, 1, 43, 2, 4, 5, seed=6)
    h0 = 0.3 * torch.randn(4, 2, 5, 4, generator=torch.Generator().manual_seed(6))
    g = _compare(rule, inp, h0, cu_seqlens=_dev(torch.tensor(cu, dtype=torch.int32)))
    assert len(calls) == 1
    assert g["h0"][1].abs().max() > 0                            # the empty sequence passes dht to dh0
    assert ties == [("value", True), ("key", True)]


@pytest.mark.parametrize("name, cu", [("gated_deltanet", None), ("deltanet", [0, 5, 5, 6, 43])])
def test_backward_reads_the_forwards_chunk_core(name, cu, calls, monkeypatch):
    """The split forward keeps T_c and W̃ (chunked.saves_chunk_core: the op's aux output) and the backward's
    prep kernel skips its own UT inverse (HAVE_TC): every gradient bit-identical to the backward that
    recomputes both (the same _ut_inverse on the same chunk tensors), and both against the reference."""
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    have_tc = []
    real = tdelta.chunk_delta_bwd_prep_kernel

    class Launch:
        def __getitem__(self, grid):
            return lambda *a, **k: have_tc.append(k.get("HAVE_TC", False)) or real[grid](*a, **k)

    monkeypatch.setattr(tdelta, "chunk_delta_bwd_prep_kernel", Launch())
    rule = ENTRIES[name].rule
    T = 43 if cu else 37
    inp = random_inputs(rule, 1, T, 2, 4, 5, seed=6)
    h0 = 0.3 * torch.randn(4 if cu else 1, 2, 5, 4, generator=torch.Generator().manual_seed(6))
    cu_t = _dev(torch.tensor(cu, dtype=torch.int32)) if cu else None
    g_saved = _compare(rule, inp, h0, cu_seqlens=cu_t)
    monkeypatch.setattr(tchunk, "SAVE_CHUNK_CORE", False)      # the knob: the backward recomputes both
    g_recomputed = _compare(rule, inp, h0, cu_seqlens=cu_t)
    assert have_tc == [True, False] and len(calls) == 2
    for n in g_saved:
        assert torch.equal(g_saved[n], g_recomputed[n]), n


def test_value_and_key_blocks(calls, ties, monkeypatch):
    # d_k = 20 (BK = 32: two 16-column blocks, two key-kernel programs), d_v = 40: three 16-row blocks in
    # prep / value (partial ∂c), two 32-row blocks in the state pass and the key kernel's loop; no initial state
    _blocks16(monkeypatch)
    rule = ENTRIES["deltanet"].rule
    _compare(rule, random_inputs(rule, 1, 35, 1, 20, 40, seed=8), None)
    assert len(calls) == 1
    assert ties == [("value", True), ("key", True)]


#: DOT_PRECISION "bf16" (operands rounded to bf16, fp32 state and accumulators) against the fp32 reference: as
#: test_triton_chunked.BF16_DOT_RTOL (≤ 2⁻⁸ per product, a few terms of either sign: 2e-2); fp32 inputs and outputs here
BF16_DOT_RTOL = 2e-2


# ---- the same-key key kernel (chunked_delta_bwd.SAME_KEY): through rule.scan, against the reference ------------

@pytest.fixture
def same_keys(monkeypatch):
    """Per launch of the key kernel: [its SAME_KEY constexpr, its BT, its programs, how many of them ran
    _same_key_grads]. The interpreter looks _same_key_grads up in the module at each call, so a wrapper there
    counts the programs that took the branch (a constexpr the kernel ignored would show 0). None when compiled (a
    plain function cannot stand in for a jit helper there)."""
    if not tscan.interpreted():
        return None
    launches = []
    real_kernel, real_helper = tdelta.chunk_delta_bwd_key_kernel, tdelta._same_key_grads

    def helper(*a, **k):
        launches[-1][3] += 1
        return real_helper(*a, **k)

    class Launch:
        def __getitem__(self, grid):
            run = real_kernel[grid]

            def call(*a, **k):
                launches.append([k.get("SAME_KEY", False), k["BT"], grid[0] * grid[1] * grid[2], 0])
                return run(*a, **k)
            return call

    monkeypatch.setattr(tdelta, "_same_key_grads", helper)
    monkeypatch.setattr(tdelta, "chunk_delta_bwd_key_kernel", Launch())
    return launches


def _same_key_rule(name):
    # Gated DeltaNet reading log α, as the layers hand it over (the chunked backward under "auto")
    return ENTRIES[name].rule.with_log_decays() if name == "gated_deltanet" else ENTRIES[name].rule


@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("case", ["wide keys", "wide keys, bf16 operands", "chunk 16 varlen"])
@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "longhorn"])
def test_same_key_kernel(name, case, same, calls, same_keys, monkeypatch):
    # SAME_KEY on (the default): the key kernel writes dK = dA + dB + dW_0 for the one key tensor (a = b = w_0 = k)
    # and the op returns it once; off: the general key kernel on three full tensors and autograd's sum. o, the final
    # state and every gradient (dk above all) against the reference (RTOL, STATE_RTOL), with initial states. "wide
    # keys": d_k = 72, d_v = 20, 140 tokens (DeltaNet, Gated DeltaNet: the wide-key path's chunks of 64, the last
    # partial; Longhorn's row c keeps chunks of 16); with bf16 dot operands (BF16_DOT_RTOL: the same-key kernel
    # rounds E − Δ once where the general one rounds E and Δ); "chunk 16 varlen": packed sequences of 5, 0, 1 and 37
    # tokens. Every program of the one key launch took the same-key branch (on) or none did (off)
    monkeypatch.setattr(tdelta, "SAME_KEY", same)
    monkeypatch.delenv("OLSSM_TRITON_SAME_KEY", raising=False)
    rule = _same_key_rule(name)
    assert tdelta.same_key(rule.form) is same
    rtol, state_rtol = RTOL, STATE_RTOL
    if case.startswith("wide keys"):
        T, H, K, V, cu = 140, 1, 72, 20, None
    else:
        T, H, K, V, cu = 43, 2, 4, 5, [0, 5, 5, 6, 43]
    if case.endswith("bf16 operands"):
        monkeypatch.setattr(tchunk, "DOT_PRECISION", "bf16")
        monkeypatch.delenv("OLSSM_TRITON_DOT_PRECISION", raising=False)
        rtol, state_rtol = BF16_DOT_RTOL, BF16_DOT_RTOL
    N = len(cu) - 1 if cu else 1
    h0 = 0.3 * torch.randn(N, H, V, K, generator=torch.Generator().manual_seed(12))
    g = _compare(rule, random_inputs(rule, 1, T, H, K, V, seed=12), h0, rtol=rtol, state_rtol=state_rtol,
                 cu_seqlens=_dev(torch.tensor(cu, dtype=torch.int32)) if cu else None)
    assert len(calls) == 1
    if cu:
        assert g["h0"][1].abs().max() > 0                        # the empty sequence passes dht to dh0
    if same_keys is not None:
        chunk = 64 if case.startswith("wide keys") and name != "longhorn" else 16
        [(knob, BT, programs, took)] = same_keys
        assert knob is same and BT == chunk and programs > 0 and took == (programs if same else 0)


def _split_path_case(case, monkeypatch):
    """(rule, packed lengths as cu_seqlens or None, T, H, d_k, d_v, rtol, state_rtol) of a case the opt-in split-path
    tests share, with the module setting it needs: Gated DeltaNet on the wide-key path (d_k = 72 → chunks of 64, the
    last partial) unless the case says otherwise; "deltanet wide", "varlen" (lengths 5, 0, 1, 37), "untied", "two
    terms", "rank 4" (sub-tokens), "chunk 32" (d_k = 40), "bf16 operands"; any other case keeps the defaults."""
    rule, cu, rtol, state_rtol = ENTRIES["gated_deltanet"].rule, None, RTOL, STATE_RTOL
    T, H, K, V = 140, 1, 72, 20
    if case == "deltanet wide":
        rule = ENTRIES["deltanet"].rule
    elif case == "varlen":
        cu, T, H, K, V = [0, 5, 5, 6, 43], 43, 2, 4, 5
    elif case == "untied":
        monkeypatch.setattr(tchunk, "TIE_INPUT_TERM", False)
    elif case == "two terms":
        rule, T, K, V = _two_term_rule(), 21, 4, 5
    elif case == "rank 4":
        rule, T, K, V = _multi_key_rule("decay"), 21, 4, 5
    elif case == "chunk 32":
        monkeypatch.setattr(tlib, "CHUNK", 32)
        rule, T, K, V = ENTRIES["deltanet"].rule, 70, 40, 20
    elif case == "bf16 operands":
        monkeypatch.setattr(tchunk, "DOT_PRECISION", "bf16")
        monkeypatch.delenv("OLSSM_TRITON_DOT_PRECISION", raising=False)
        rule, rtol, state_rtol = ENTRIES["deltanet"].rule, BF16_DOT_RTOL, BF16_DOT_RTOL
    return rule, cu, T, H, K, V, rtol, state_rtol


# ---- int32 row offsets on the split delta path (chunked.OFFSETS32) -----------------------------------------------

@pytest.fixture
def offset_kinds(monkeypatch):
    """The OFF32 flag of every _tokens call the kernels made (interpreted: the helper is looked up in the module's
    globals at each call, in chunked and in chunked_delta_bwd, which imports it by name), as a set. None when
    compiled."""
    if not tscan.interpreted():
        return None
    seen = set()
    real = tchunk._tokens

    def tokens(start, tt, eos, H, i_h, OFF32=False):
        seen.add(bool(OFF32))
        return real(start, tt, eos, H, i_h, OFF32)
    monkeypatch.setattr(tchunk, "_tokens", tokens)
    monkeypatch.setattr(tdelta, "_tokens", tokens)
    return seen


@pytest.mark.parametrize("case", ["deltanet wide", "gated wide", "varlen", "untied", "two terms", "rank 4", "longhorn"])
def test_offsets32_paths(case, calls, row_calls, offset_kinds, monkeypatch):
    # the split forward and the chunked delta backward with int32 row offsets, against the reference (o, final
    # state, every gradient): the wide-key path (d_k = 72, chunks of 64, the last partial) for DeltaNet and Gated
    # DeltaNet, packed sequences (lengths 5, 0, 1, 37) with initial states, the untied input term, two input terms,
    # a rank-4 rule on sub-tokens; and Longhorn (a row c: the fused forward takes OFF32 too, its row-c backward keeps
    # int64). Interpreted: every row index the split path's kernels formed was int32
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    monkeypatch.setattr(tchunk, "OFFSETS32", True)
    monkeypatch.delenv("OLSSM_TRITON_OFFSETS32", raising=False)
    rule, cu, T, H, K, V, _, _ = _split_path_case(case, monkeypatch)
    if case == "longhorn":
        rule = ENTRIES["longhorn"].rule
    N = len(cu) - 1 if cu else 1
    h0 = 0.3 * torch.randn(N, H, V, K, generator=torch.Generator().manual_seed(18))
    g = _compare(rule, random_inputs(rule, 1, T, H, K, V, seed=18), h0,
                 cu_seqlens=_dev(torch.tensor(cu, dtype=torch.int32)) if cu else None)
    assert (len(row_calls), len(calls)) == ((1, 1) if case == "longhorn" else (0, 1))   # rowc: via the delta entry
    if case == "varlen":
        assert g["h0"][1].abs().max() > 0
    if offset_kinds is not None:   # Longhorn: the fused forward's rows int32, its row-c backward's int64
        assert offset_kinds == ({True, False} if case == "longhorn" else {True})


def test_offsets32_stand_down_past_int32(monkeypatch):
    # offsets32_fit: on only where every [B, T, H, width] token tensor of the call (widths d_k, d_v, the chunk) has
    # fewer than 2³¹ elements; OLSSM_TRITON_OFFSETS32 overrides the constant, and a bad value is refused by name
    monkeypatch.setattr(tchunk, "OFFSETS32", True)
    monkeypatch.delenv("OLSSM_TRITON_OFFSETS32", raising=False)
    assert tchunk.offsets32_fit((2, 8192, 16, 128, 128, 2, 8192, 64))
    assert not tchunk.offsets32_fit((64, 16384, 16, 128, 128, 64, 16384, 64))   # 2³¹ elements exactly
    assert not tchunk.offsets32_fit((1, 2 ** 20, 1, 64, 64, 1, 2 ** 20, 2 ** 12))  # the chunk is the widest
    monkeypatch.setenv("OLSSM_TRITON_OFFSETS32", "0")
    assert not tchunk.offsets32_fit((2, 8192, 16, 128, 128, 2, 8192, 64))
    monkeypatch.setenv("OLSSM_TRITON_OFFSETS32", "yes")
    with pytest.raises(ValueError, match="OLSSM_TRITON_OFFSETS32"):
        tchunk.offsets32()


@pytest.mark.parametrize("storage", ["fp32", "bf16 chunk tensors", "bf16 checkpoints"])
@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_wide_key_variants_together(name, storage, calls, same_keys, solves, offset_kinds, monkeypatch):
    # the next lease's `nkm` row (benchmarks/gpu_session.sh): int32 row offsets and (the defaults since session 11, set
    # here all the same) the UT substitution on the diagonal blocks and the same-key key kernel at once, on the
    # wide-key path (d_k = 72: chunks of 64, the last partial), packed sequences with initial states. fp32: o, the
    # final state and every gradient against the reference (RTOL, STATE_RTOL). bf16 chunk tensors and bf16 checkpoints
    # (CHUNK_STORAGE / CHECKPOINT_STORAGE "input", the row's two other settings): bf16 inputs, "input" against "fp32"
    # storage under the same knobs (compare_storage's STORAGE_RTOL, compare_checkpoint_storage's CHECKPOINT_RTOL).
    # Each knob reached its kernels (interpreted): every row index int32, every UT solve on blocks, every key program
    # through _same_key_grads at chunks of 64 (a knob dropped on the way had still passed the comparisons)
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    monkeypatch.setattr(tchunk, "OFFSETS32", True)
    monkeypatch.setattr(tchunk, "UT_SOLVE", "blocks")
    monkeypatch.delenv("OLSSM_TRITON_UT_SOLVE", raising=False)
    monkeypatch.setattr(tdelta, "SAME_KEY", True)
    monkeypatch.delenv("OLSSM_TRITON_SAME_KEY", raising=False)
    rule = _same_key_rule(name)
    cu = [0, 70, 71, 140]
    h0 = 0.3 * torch.randn(3, 1, 20, 72, generator=torch.Generator().manual_seed(14))
    inp = random_inputs(rule, 1, 140, 1, 72, 20, seed=14)
    cu_seqlens = _dev(torch.tensor(cu, dtype=torch.int32))
    if storage == "fp32":
        _compare(rule, inp, h0, cu_seqlens=cu_seqlens)
        assert len(calls) == 1
    elif storage == "bf16 checkpoints":
        _compare_ck(rule, inp, h0, monkeypatch, cu_seqlens=cu_seqlens)
    else:
        _compare_storage(rule, inp, h0, monkeypatch, cu_seqlens=cu_seqlens)
    runs = 1 if storage == "fp32" else 2
    if same_keys is not None:
        assert len(same_keys) == runs
        assert all(knob is True and BT == 64 and took == programs > 0 for knob, BT, programs, took in same_keys)
    if solves is not None:
        assert solves and set(solves) == {"blocks"}
    if offset_kinds is not None:   # every row index int32 (offsets32)
        assert offset_kinds == {True}


@pytest.mark.parametrize("same", [True, False])
def test_variant_knobs_take_their_environment_overrides(same, same_keys, solves, monkeypatch):
    # OLSSM_TRITON_SAME_KEY and OLSSM_TRITON_UT_SOLVE switch the same-key kernel and the blocks solve on with the
    # constants off, or off ("0", "masked": the settings before session 11) with them on, as they are by default;
    # exact against the reference. A value other than 0 / 1 (masked / blocks) is refused naming the variable
    solve = "blocks" if same else "masked"
    monkeypatch.setenv("OLSSM_TRITON_SAME_KEY", "1" if same else "0")
    monkeypatch.setenv("OLSSM_TRITON_UT_SOLVE", solve)
    monkeypatch.setattr(tdelta, "SAME_KEY", not same)
    monkeypatch.setattr(tchunk, "UT_SOLVE", "masked" if same else "blocks")
    rule = ENTRIES["deltanet"].rule
    h0 = 0.3 * torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(15))
    _compare(rule, random_inputs(rule, 1, 37, 2, 4, 5, seed=15), h0)
    if same_keys is not None:
        [(knob, BT, programs, took)] = same_keys
        assert knob is same and programs > 0 and took == (programs if same else 0)
    if solves is not None:
        assert solves and set(solves) == {solve}
    for var in ("OLSSM_TRITON_SAME_KEY", "OLSSM_TRITON_UT_SOLVE"):
        monkeypatch.setenv(var, "yes")
        with pytest.raises(ValueError, match=var):
            tdelta.same_key(rule.form) if "KEY" in var else tchunk.ut_solve()
        monkeypatch.delenv(var)
    assert tdelta.same_key(rule.form) is not same
    assert tchunk.ut_solve() == ("masked" if same else "blocks")


@pytest.mark.parametrize("case", ["two input terms", "two keys", "independent keys", "independent keys, row c"])
def test_same_key_stays_off_where_the_keys_differ(case, calls, same_keys, ties, monkeypatch):
    # SAME_KEY on where its identity does not hold, exact against the reference or the fp64 loop: two input terms
    # (w_0 = b = k but a second w: M = 2), two keys (rank 2 on sub-tokens), and the kernels on chunk tensors with
    # independent a, b, w under the DeltaNet / Longhorn plans (the structure says a = b = w_0, the tensors do not:
    # no placeholders, so the general kernel); no key launch took the same-key branch
    monkeypatch.setattr(tdelta, "SAME_KEY", True)
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")            # the two-key rule's raw α has no closed-form log
    if case.startswith("independent"):
        crow = case.endswith("row c")
        _kernels_on_chunk_tensors(True, True, 16, 1, 20, 20, crow, False, None, False, ties, monkeypatch)
    else:
        rule = _two_term_rule() if case == "two input terms" else _multi_key_rule("explicit")
        assert not tdelta.same_key(rule.form)
        _compare(rule, random_inputs(rule, 1, 21, 2, 4, 5, seed=13), 0.3 * torch.randn(1, 2, 5, 4))
        assert len(calls) == 1
    if same_keys is not None:
        assert same_keys and all(knob is False and took == 0 for knob, _, _, took in same_keys), same_keys


def _query_is_key_rule(row):
    # o = S k: the readout is the key too, so chunk_inputs' q is the very tensor b (key_side) and autograd must add
    # the op's ∂q to the same-key kernel's dK = dA + dB + dW_0 in that one tensor
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    if row:
        return olssm.derive(O.Objective(O.sqnorm(S - Sp) / 2 + O.sqnorm(S @ k - v, weight=O.row("beta", domain="unit"))
                                        / 2, readout=k, name="Longhorn reading S k"))
    return olssm.derive(O.Objective(O.sqnorm(S @ k - v, weight=O.scalar("beta", domain="unit")) / 2, update="explicit",
                                    decay=sp.exp(O.scalar("la", domain="negative")), readout=k,
                                    name="log-gated DeltaNet reading S k"))


@pytest.mark.parametrize("case", ["fused forward", "query is key", "query is key, row c", "raw decay, forced",
                                  "raw decay, auto", "recurrent backward", "autotuned"])
def test_same_key_host_paths(case, calls, same_keys, monkeypatch, tmp_path):
    # SAME_KEY on through the other paths that make or read chunk_inputs' placeholders, against the reference (o,
    # the final state, every gradient, packed sequences of 5, 0, 1 and 37 tokens with initial states): the fused
    # forward (rebuilds w and a from b as the split one does); a rule reading S k (q is b: ∂q and dK meet in one
    # tensor), with a scalar and a row c; Gated DeltaNet's raw α under OLSSM_TRITON_CHUNK_BWD=1 (the chunked backward
    # through log α: placeholders) and under "auto" (the recurrent backward: none); the recurrent delta backward
    # (none); the autotuner timing candidates with the chunked and the recurrent backward in one process. Where the
    # placeholders were made, every key program took _same_key_grads; where not, no key launch ran
    monkeypatch.setattr(tdelta, "SAME_KEY", True)
    rule = _same_key_rule("gated_deltanet")
    made, real_inputs = [], tchunk.chunk_inputs

    def chunk_inputs(plan, args, grad=False):   # whether each call handed out the placeholders
        out = real_inputs(plan, args, grad)
        made.append(len(out) >= 7 and out[4].dim() == 1)
        return out

    monkeypatch.setattr(tchunk, "chunk_inputs", chunk_inputs)
    if case == "fused forward":
        monkeypatch.setattr(tchunk, "DELTA_FORWARD", "fused")
    elif case.startswith("query is key"):
        rule = _query_is_key_rule(case.endswith("row c"))
        assert tdelta.same_key(rule.form) and sp.sympify(rule.form.readout) == sp.sympify(rule.form.corrections[0].b)
    elif case.startswith("raw decay"):
        rule = ENTRIES["gated_deltanet"].rule
        if case.endswith("forced"):
            monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    elif case == "recurrent backward":
        monkeypatch.setenv("OLSSM_TRITON_DELTA_BACKWARD", "recurrent")
    else:
        from olssm.kernels.triton import autotune
        monkeypatch.setenv("OLSSM_CACHE_DIR", str(tmp_path))
        monkeypatch.setattr(tlib, "FORCE", None)
        monkeypatch.setattr(autotune, "ENABLED", True)
        # each candidate runs once (the interpreter's times mean nothing) at its policy's chunk size (the other
        # sizes: test_triton_autotune); timing them all twice at both sizes took this case 99 s
        monkeypatch.setattr(autotune, "CHUNKS", ())
        monkeypatch.setattr(autotune, "_measure", lambda fn, device: fn() or 1.0)
        autotune.clear()
    cu = [0, 5, 5, 6, 43]
    h0 = 0.3 * torch.randn(4, 2, 5, 4, generator=torch.Generator().manual_seed(16))
    try:
        _compare(rule, random_inputs(rule, 1, 43, 2, 4, 5, seed=16), h0,
                 cu_seqlens=_dev(torch.tensor(cu, dtype=torch.int32)))
        if case == "autotuned":   # a candidate that raised would only have been skipped
            assert not autotune.failures(), autotune.failures()
    finally:
        if case == "autotuned":
            autotune.clear()
    if case == "autotuned":
        assert True in made and False in made, made   # both backwards were timed, each with its own chunk inputs
        return
    placeholders = case not in ("raw decay, auto", "recurrent backward")
    assert made == [placeholders] and len(calls) == placeholders
    if same_keys is not None:
        assert all(knob and took == programs > 0 for knob, _, programs, took in same_keys) and \
            len(same_keys) == placeholders


@pytest.mark.parametrize("name", ["deltanet", "longhorn"])
def test_same_key_leaves_autograd_no_key_gradients_to_add(name, monkeypatch):
    # the point of the host side: without the knob autograd adds the key tensor's three gradients dA + dB + dW_0
    # (two adds of fp32 [B, T, H, d_k] tensors); with it the op hands back one and autograd adds none. Counted by a
    # dispatch mode over the backward; dk the same either way
    from torch.utils._python_dispatch import TorchDispatchMode
    B, T, H, K, V = 1, 20, 1, 6, 5                             # d_k = 6: no other tensor has this shape
    rule = ENTRIES[name].rule
    inp = random_inputs(rule, B, T, H, K, V, seed=14)

    class Adds(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("add", "add_") and torch.is_tensor(out) \
                    and out.dtype == torch.float32 and tuple(out.shape) == (B, T, H, K):
                self.n += 1
            return out

    counts, grads = {}, {}
    for knob in (False, True):
        monkeypatch.setattr(tdelta, "SAME_KEY", knob)
        x = {n: _dev(t).clone().requires_grad_() for n, t in inp.items()}
        o, _ = rule.scan(backend="triton", **x)
        with Adds() as adds:
            o.backward(_dev(torch.randn(o.shape, generator=torch.Generator().manual_seed(15))))
        counts[knob], grads[knob] = adds.n, x["k"].grad
    assert counts == {False: 2, True: 0}
    _close(grads[True], grads[False], RTOL, "dk: same key vs three gradients")


# ---- row c (Longhorn): through rule.scan, against the reference backend --------------------------------

def test_longhorn_and_the_recurrent_switch(row_calls, monkeypatch):
    rule = ENTRIES["longhorn"].rule
    plan = tscan.plan_for(rule)
    assert tchunk.backward_supported(plan)                     # no decay: "auto" takes it
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=1)           # 37 = 2 chunks of 16 + 5
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(2))
    g_chunk = _compare(rule, inp, h0)
    assert len(row_calls) == 1
    monkeypatch.setattr(tdelta, "ROW_C_BACKWARD", "recurrent")
    assert not tchunk.backward_supported(plan)
    assert tchunk.backward_supported(tscan.plan_for(ENTRIES["deltanet"].rule))   # scalar c keeps its kernels
    g_rec = _compare(rule, inp, h0)
    assert len(row_calls) == 1
    for n in g_chunk:
        _close(g_chunk[n], g_rec[n], RTOL, f"d{n}: chunk vs recurrent backward")
    monkeypatch.setattr(tdelta, "ROW_C_BACKWARD", "chunk")
    monkeypatch.setenv("OLSSM_TRITON_DELTA_BACKWARD", "recurrent")   # the family's switch covers row c too
    assert not tchunk.backward_supported(plan)
    monkeypatch.delenv("OLSSM_TRITON_DELTA_BACKWARD")
    monkeypatch.setenv("OLSSM_TRITON_ROW_C_BACKWARD", "recurrent")
    assert not tchunk.backward_supported(plan)
    monkeypatch.setenv("OLSSM_TRITON_ROW_C_BACKWARD", "bogus")
    with pytest.raises(ValueError, match="row-c backward"):
        tchunk.backward_supported(plan)


def test_row_c_scalar_decay(row_calls):
    rule = _gated_longhorn()
    assert tchunk.backward_supported(tscan.plan_for(rule))
    inp = random_inputs(rule, 1, 40, 2, 5, 6, seed=5)
    inp["la"][:, 20] = -30.0                                     # one token forgets (nearly) everything
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(5))
    _compare(rule, inp, h0)
    assert len(row_calls) == 1


def test_row_c_varlen_and_two_input_terms(row_calls):
    rule = ENTRIES["longhorn"].rule
    cu = [0, 5, 5, 6, 43]                                        # lengths 5, 0, 1, 37
    inp = random_inputs(rule, 1, 43, 2, 4, 5, seed=6)
    h0 = 0.3 * torch.randn(4, 2, 5, 4, generator=torch.Generator().manual_seed(6))
    g = _compare(rule, inp, h0, cu_seqlens=_dev(torch.tensor(cu, dtype=torch.int32)))
    assert g["h0"][1].abs().max() > 0                            # the empty sequence passes dht to dh0
    rule = _two_term_rule(row=True)
    assert len(rule.form.inputs) == 2 and tchunk._c_row(rule.form)
    _compare(rule, random_inputs(rule, 1, 21, 1, 4, 5, seed=13), 0.3 * torch.randn(1, 1, 5, 4))
    assert len(row_calls) == 2


def test_row_c_value_and_key_blocks(row_calls, monkeypatch):
    # d_k = 20 (two 16-column key blocks), d_v = 40: three 16-row blocks in the row-c prep / value kernels,
    # two 32-row blocks in the state pass and the key kernel's loop; T = 37, no initial state
    _blocks16(monkeypatch)
    monkeypatch.setattr(tdelta, "ROWC_BLOCK_V", 16)
    rule = _gated_longhorn()
    _compare(rule, random_inputs(rule, 1, 37, 1, 20, 40, seed=8), None)
    assert len(row_calls) == 1


# ---- the kernels on chunk tensors, against an fp64 autograd loop -------------------------------------

def _loop(q, w, e, ld, a, b, c, h0, bounds):
    """S_t = γ_t S_{t-1} (I − c_t a_t b_tᵀ) + Σ_m e_m,t w_m,tᵀ, o_t = S_t q_t, over [bos, eos) of each
    sequence."""
    outs, finals = {}, []
    for n, (row, s0, s1) in enumerate(bounds):
        S = h0[n]                                                # [H, V, K]
        for t in range(s0, s1):
            Sa = torch.einsum("hvk,hk->hv", S, a[row, t])
            ct = c[row, t][:, None, None] if c.dim() == 3 else c[row, t][..., None]   # scalar / row c
            S = ld[row, t].exp()[:, None, None] * (S - ct * Sa[..., None] * b[row, t][:, None, :])
            S = S + torch.einsum("mhv,mhk->hvk", e[:, row, t], w[:, row, t])
            outs[(row, t)] = torch.einsum("hvk,hk->hv", S, q[row, t])
        finals.append(S)
    B, T = q.shape[:2]
    zero = torch.zeros_like(q[0, 0, :, :1].expand(-1, e.shape[-1]))
    o = torch.stack([torch.stack([outs.get((r, t), zero) for t in range(T)]) for r in range(B)])
    return o, torch.stack(finals)


@pytest.mark.parametrize("gated, varlen, chunk, M, K, V, crow, tied, ut, low",
                         [(True, False, 16, 2, 6, 5, False, False, None, False),
                          (False, False, 16, 1, 6, 5, False, False, 8, False),
                          (True, True, 16, 1, 20, 20, False, False, None, False),
                          (True, True, 4, 2, 6, 5, False, False, None, False),
                          (True, False, 16, 2, 6, 5, True, False, None, False),
                          (False, True, 16, 1, 20, 20, True, False, None, False),
                          (True, True, 16, 1, 20, 20, False, True, 4, False),
                          (False, False, 16, 2, 6, 5, False, True, 4, False),
                          (True, True, 16, 2, 20, 20, False, True, None, False),   # tied, m = 1 untied, blocks
                          # bf16 chunk tensors (CHUNK_STORAGE = "input"): split + fused forward, scalar and row c
                          (True, True, 16, 2, 20, 20, False, False, None, True),
                          (True, False, 16, 1, 6, 5, False, True, 8, True),
                          (True, True, 16, 2, 20, 20, True, False, None, True)])
def test_kernels_on_chunk_tensors(gated, varlen, chunk, M, K, V, crow, tied, ut, low, ties, monkeypatch):
    """tied: b = w_0 (DeltaNet's w = b = k), the split forward's and the backward's TIE_INPUT_TERM path (the
    TIED value and key kernels); else independent a, b, w with TIE_INPUT_TERM off (the plan says w = b, these
    tensors do not: the untied kernels). ut: UT_BLOCK (4 / 8 at chunk 16: the
    blocked inverse with 2 / 1 merge levels). low: q, w, e, a, b, c rounded to bf16 and passed to the kernels
    as bf16 tensors (the log decay fp32), the reference loop on the same rounded values: the kernels convert
    every load to fp32, so the fp32 tolerances hold."""
    _kernels_on_chunk_tensors(gated, varlen, chunk, M, K, V, crow, tied, ut, low, ties, monkeypatch)


def _kernels_on_chunk_tensors(gated, varlen, chunk, M, K, V, crow, tied, ut, low, ties, monkeypatch):
    """test_kernels_on_chunk_tensors: the split (or fused) forward and the chunked backward, which recomputes T_c
    (no saved chunk core), on chunk tensors, against the fp64 autograd loop: o, final state, every gradient."""
    if chunk < 16 and _DEVICE != "cpu":
        pytest.skip("compiled tl.dot needs chunks of >= 16 tokens (library.run_scan clamps; this calls the kernels)")
    monkeypatch.setattr(tchunk, "TIE_INPUT_TERM", tied)
    if ut is not None:
        monkeypatch.setattr(tchunk, "UT_BLOCK", ut)
    if K > 16:
        _blocks16(monkeypatch)                                   # several key and value blocks
        monkeypatch.setattr(tdelta, "ROWC_BLOCK_V", 16)
    gen = torch.Generator().manual_seed(11 + M + chunk)
    H = 2
    if varlen:
        cu = [0, 5, 5, 6, 43]
        B, T = 1, 43
        bounds = [(0, s, t) for s, t in zip(cu[:-1], cu[1:])]
    else:
        B, T = 2, 37
        bounds = [(r, 0, T) for r in range(B)]
    N = len(bounds)
    max_len = max(t - s for _, s, t in bounds)

    def key(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)

    q, a, b = key(B, T, H, K), key(B, T, H, K), key(B, T, H, K)
    w, e = key(M, B, T, H, K), torch.randn(M, B, T, H, V, generator=gen)
    if tied:
        b = w[0].clone()
    c = 0.1 + 0.8 * torch.rand(B, T, H, *((V,) if crow else ()), generator=gen)   # row c: one per value row
    ld = -0.3 * torch.rand(B, T, H, generator=gen) if gated else torch.zeros(B, T, H)
    if gated:
        ld[:, 20, 0] = -30.0                                     # a strong decay on one token
    h0 = 0.3 * torch.randn(N, H, V, K, generator=gen)
    do, dht = torch.randn(B, T, H, V, generator=gen), torch.randn(N, H, V, K, generator=gen)
    if low:
        q, w, e, a, b, c = (x.to(torch.bfloat16) for x in (q, w, e, a, b, c))
    chunk_in = [_dev(x).contiguous() for x in (q, w, e, ld, a, b, c)]
    if low:
        q, w, e, a, b, c = (x.float() for x in (q, w, e, a, b, c))
        assert [x.dtype for x in chunk_in] == [torch.bfloat16] * 3 + [torch.float32] + [torch.bfloat16] * 3
    if crow:
        plan = tscan.plan_for(_gated_longhorn() if gated else ENTRIES["longhorn"].rule)
    else:
        plan = tscan.plan_for(ENTRIES["gated_deltanet" if gated else "deltanet"].rule)
    sizes = [B, T, H, K, V, N, max_len, chunk]
    cu_t = _dev(torch.tensor(cu, dtype=torch.int32)) if varlen else None
    o = _dev(torch.empty(B, T, H, V))
    ht = _dev(torch.empty(N, H, V, K))
    ck = _dev(torch.empty(N, H, -(-max_len // chunk), V, K))
    tchunk.chunked_forward(plan, chunk_in, _dev(h0), o, ht, ck, sizes, True, cu_t)
    grads, dh0 = tdelta.chunked_delta_backward(plan, chunk_in, ck, _dev(do), _dev(dht), sizes, cu_t)
    assert ties == ([("key", False)] if crow else [("value", tied), ("key", tied)])   # row c: untied

    ref_in = [x.double().requires_grad_() for x in (q, w, e, ld, a, b, c, h0)]
    o1, f1 = _loop(*ref_in, bounds)
    ref = torch.autograd.grad((o1 * do.double()).sum() + (f1 * dht.double()).sum(), ref_in)
    _close(o, o1, RTOL, "o")
    _close(ht, f1, STATE_RTOL, "final state")
    names = ["q", "w", "e", "log decay", "a", "b", "c", "h0"]
    for n, got, want in zip(names, [*grads, dh0], ref):
        assert got.shape == want.shape, n
        if n != "log decay" or gated:
            _close(got, want, RTOL, f"d{n}")


# ---- the UT substitution: on the diagonal blocks alone (chunked.UT_SOLVE = "blocks", the default) or masked ------

@pytest.fixture
def solves(monkeypatch):
    """Which substitution every _ut_inverse ran, in call order ("masked" / "blocks"): the helpers are looked up in
    chunked's globals at each call under the interpreter, so wrapping them records the branch the kernels took
    (a knob the host passes on but a kernel ignores fails too). None when compiled (a plain function cannot stand
    in for a jit helper there)."""
    if not tscan.interpreted():
        return None
    seen = []
    for name, what in (("_ut_substitute_masked", "masked"), ("_ut_substitute_blocks", "blocks")):
        real = getattr(tchunk, name)
        monkeypatch.setattr(tchunk, name, lambda *a, _real=real, _what=what, **k: seen.append(_what) or _real(*a, **k))
    return seen


@pytest.mark.parametrize("gated, varlen, chunk, M, K, V, tied, ut",
                         [(True, True, 16, 1, 20, 20, True, None),     # one 16-row block, no merge
                          (False, False, 16, 2, 6, 5, False, 4),       # 4 blocks of 4, 2 merge levels
                          (True, False, 32, 1, 20, 20, True, None),    # 2 blocks, 1 merge
                          (True, True, 64, 1, 72, 16, True, None),     # the wide-key shape: 4 blocks, 2 merges
                          (False, True, 64, 2, 72, 16, False, 64)])    # UT_BLOCK ≥ BT: one block of 64
@pytest.mark.parametrize("solve", ["blocks", "masked"])
def test_ut_solve_on_chunk_tensors(solve, gated, varlen, chunk, M, K, V, tied, ut, ties, solves, monkeypatch):
    """UT_SOLVE = "blocks" (the default) and "masked": the split forward and the chunked backward recomputing T_c (no
    saved chunk core), with an initial state, against the fp64 autograd loop (o, final state, every gradient;
    test_triton_chunked.py's tolerances), at chunks of 16 / 32 / 64 (d_k = 72 at 64), gated, varlen (padded rows in
    every last chunk); and both prep kernels took that branch."""
    monkeypatch.setattr(tchunk, "UT_SOLVE", solve)
    monkeypatch.delenv("OLSSM_TRITON_UT_SOLVE", raising=False)
    _kernels_on_chunk_tensors(gated, varlen, chunk, M, K, V, False, tied, ut, False, ties, monkeypatch)
    if solves is not None:
        assert solves and set(solves) == {solve}
        assert len(solves) % 2 == 0   # one per chunk program, in the forward prep and again in the backward prep


@pytest.mark.parametrize("solve", ["blocks", "masked"])
def test_ut_solve_rank_r(solve, calls, solves, monkeypatch):
    """Sub-tokens (SUB = 4: 4 corrections per token, the strict mask between tokens) with UT_SOLVE = "blocks" (the
    default) and "masked", UT_BLOCK = 8 (two tokens per block, 2 blocks per 16-sub-token chunk, one merge), through
    rule.scan against the reference: o, final state, every gradient."""
    monkeypatch.setattr(tchunk, "UT_SOLVE", solve)
    monkeypatch.delenv("OLSSM_TRITON_UT_SOLVE", raising=False)
    monkeypatch.setattr(tchunk, "UT_BLOCK", 8)
    monkeypatch.setattr(tchunk, "SAVE_CHUNK_CORE", False)      # the backward recomputes T_c too
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    rule = _multi_key_rule("decay")
    assert tchunk.sub_tokens(rule.form) == 4
    inp = random_inputs(rule, 1, 21, 2, 4, 5, seed=17)
    h0 = 0.3 * torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(17))
    _compare(rule, inp, h0)
    assert len(calls) == 1
    if solves is not None:
        assert solves and set(solves) == {solve}


def _prep_tc(k, c, ld, chunk, cu, gated):
    """T_c as the split forward's prep kernel stores it (the saved chunk core), for a = b = w = k: [B, T, H, chunk],
    row t holding its chunk's row of T_c (columns past the chunk's last token unwritten: NaN)."""
    B, T, H, K = k.shape
    V = 4
    plan = tscan.plan_for(ENTRIES["gated_deltanet" if gated else "deltanet"].rule)
    chunk_in = [_dev(x).contiguous() for x in (torch.zeros(B, T, H, K), k[None], torch.zeros(1, B, T, H, V), ld,
                                               k, k, c)]
    bounds = list(zip(cu[:-1], cu[1:]))
    N, max_len = len(bounds), max(t - s for s, t in bounds)
    tc = _dev(torch.full((B, T, H, chunk), float("nan")))
    ck = _dev(torch.empty(N, H, -(-max_len // chunk), V, K))
    tchunk.chunked_forward(plan, chunk_in, None, _dev(torch.empty(B, T, H, V)), _dev(torch.empty(N, H, V, K)), ck,
                           [B, T, H, K, V, N, max_len, chunk], True, _dev(torch.tensor(cu, dtype=torch.int32)),
                           core=(tc, _dev(torch.empty(B, T, H, K))))
    return tc.cpu()


@pytest.mark.parametrize("chunk, gated", [(16, False), (32, True), (64, False), (64, True)])
def test_ut_solve_blocks_inverse_of_nearly_parallel_keys(chunk, gated, solves, monkeypatch):
    """T_c = (I + diag(β) (K Kᵀ ⊙ D_st))⁻¹ of both substitutions against torch.linalg.inv in fp64, for nearly
    parallel unit keys (k_t = k + 1e-3·noise, normalised: K Kᵀ ≈ 1 everywhere) and β ∈ [1.5, 2] (|T_c| up to 2,
    entries alternating in sign: a product / Neumann form would cancel catastrophically here; the substitution
    does not). Two sequences of 50 and 78 tokens, so each ends inside a chunk and its padded rows must leave the
    valid part exact. Tolerance: max error ≤ 5e-5·max|T_c| for both (measured ≈ 4e-6 under the interpreter),
    and "blocks" within 2× the masked path's error (+ 1e-6·max|T_c|): the same fp32 products, summed in
    another order."""
    gen = torch.Generator().manual_seed(21 + chunk)
    B, T, H, K = 1, 128, 2, 72
    cu = [0, 50, 128]
    k = torch.nn.functional.normalize(torch.randn(K, generator=gen) + 1e-3 * torch.randn(B, T, H, K, generator=gen),
                                      dim=-1)
    c = 1.5 + 0.5 * torch.rand(B, T, H, generator=gen)
    ld = -0.05 * torch.rand(B, T, H, generator=gen) if gated else torch.zeros(B, T, H)
    ref = torch.full((B, T, H, chunk), float("nan"), dtype=torch.float64)
    for s, t in zip(cu[:-1], cu[1:]):
        for c0 in range(s, t, chunk):
            kk, n = k[0, c0:min(c0 + chunk, t)].double(), min(chunk, t - c0)     # [n, H, K]
            G = ld[0, c0:c0 + n].double().cumsum(0)                              # [n, H]
            strict = torch.ones(n, n, dtype=torch.bool).tril(-1)
            Dst = torch.where(strict, (G.T[:, :, None] - G.T[:, None, :]).exp(), 0.0)     # [H, n, n]
            L = c[0, c0:c0 + n].double().T[:, :, None] * torch.einsum("ihk,jhk->hij", kk, kk) * Dst
            ref[0, c0:c0 + n, :, :n] = torch.linalg.inv(torch.eye(n, dtype=torch.float64) + L).permute(1, 0, 2)
    valid = ~ref.isnan()
    scale = ref[valid].abs().max().item()
    errs = {}
    monkeypatch.delenv("OLSSM_TRITON_UT_SOLVE", raising=False)
    for solve in ("masked", "blocks"):
        monkeypatch.setattr(tchunk, "UT_SOLVE", solve)
        got = _prep_tc(k, c, ld, chunk, cu, gated).double()
        assert torch.isfinite(got[valid]).all(), solve
        errs[solve] = (got[valid] - ref[valid]).abs().max().item()
        assert errs[solve] <= 5e-5 * scale, f"{solve}: max error {errs[solve]:.3g} vs max|T_c| {scale:.3g}"
    assert errs["blocks"] <= 2 * errs["masked"] + 1e-6 * scale, errs
    if solves is not None:
        n = len(solves) // 2
        assert solves == ["masked"] * n + ["blocks"] * n and n > 0


# ---- torch.library / torch.compile ----------------------------------------------------------------------

@pytest.mark.parametrize("name, dtype, ck, same", [("deltanet", torch.float32, "fp32", False),
                                                   ("longhorn", torch.float32, "fp32", False),
                                                   ("deltanet", torch.bfloat16, "fp32", False),
                                                   ("longhorn", torch.bfloat16, "fp32", False),
                                                   ("deltanet", torch.bfloat16, "input", False),
                                                   ("longhorn", torch.bfloat16, "input", False),
                                                   ("deltanet", torch.float32, "fp32", True),
                                                   ("longhorn", torch.bfloat16, "input", True)])
def test_opcheck_and_torch_compile(name, dtype, ck, same, calls, monkeypatch):
    # bf16: CHUNK_STORAGE = "input", so the op takes bf16 chunk tensors and returns their gradients in bf16;
    # ck "input": CHECKPOINT_STORAGE = "input", the op's ck output (ck_dtype) is bf16 and the fake must say so;
    # same: chunked_delta_bwd.SAME_KEY, the op takes empty placeholders for w and a and hands empty ones back
    monkeypatch.setattr(tchunk, "CHUNK_STORAGE", "input")
    monkeypatch.setattr(tchunk, "CHECKPOINT_STORAGE", ck)
    monkeypatch.setattr(tdelta, "SAME_KEY", same)
    rule = ENTRIES[name].rule
    plan = tscan.plan_for(rule)
    key = tlib.register(plan)
    B, T, H, K, V = 1, 20, 1, 4, 4
    inp = {n: _dev(t).to(dtype).requires_grad_() for n, t in random_inputs(rule, B, T, H, K, V, seed=10).items()}
    args = olssm.kernels.api.check_scan_args(rule, None, None, None, initial_state=None, output_final_state=True,
                                             cu_seqlens=None, inputs=inp)
    chunk_in = [x.detach().requires_grad_() for x in tchunk.chunk_inputs(plan, args, grad=True)]
    # DeltaNet's β·v: v in e's slot and β appended in fp32 (chunked.SCALE_ON_LOAD); Longhorn's row factor is a product
    assert len(chunk_in) == 7 + (name == "deltanet")
    assert [x.numel() == 0 for x in chunk_in] == [same if i in (1, 4) else False for i in range(len(chunk_in))]
    assert [x.dtype for x in chunk_in] == [torch.float32 if i in (3, 7) else dtype for i in range(len(chunk_in))]
    h0 = _dev(torch.randn(B, H, V, K)).requires_grad_()
    sizes = [B, T, H, K, V, B, T, 16]
    ck_dtype = tchunk.checkpoint_storage(dtype)
    assert ck_dtype == (dtype if ck == "input" else torch.float32)
    op_args = (key, [inp[s.name] for s in plan.syms], [], chunk_in, h0, None, sizes, dtype, True, True, True,
               None if ck_dtype == torch.float32 else ck_dtype)
    torch.library.opcheck(torch.ops.olssm.triton_scan_fwd.default, op_args)
    assert calls
    o, ht, ckpt, _ = torch.ops.olssm.triton_scan_fwd(*op_args)
    assert ckpt.dtype == ck_dtype and ht.dtype == torch.float32
    grads = torch.autograd.grad((o.float() * o.float()).sum() + ht.sum(), [*chunk_in, h0])
    assert [g.dtype for g in grads] == [x.dtype for x in (*chunk_in, h0)]
    torch._dynamo.reset()

    def fn(h, x):
        o, f = rule.scan(backend="triton", initial_state=h, output_final_state=True, **x)
        return (o * o).sum() + (f * torch.arange(f.numel(), device=f.device).reshape(f.shape)).sum() * 1e-2

    outs = []
    for f in (fn, torch.compile(fn, backend="aot_eager")):
        x = {n: t.detach().clone().requires_grad_() for n, t in inp.items()}
        h = h0.detach().clone().requires_grad_()
        loss = f(h, x)
        outs.append((loss, torch.autograd.grad(loss, [h, *x.values()])))
    (l1, g1), (l2, g2) = outs
    _close(l2, l1, 1e-6, "loss")
    for a, b in zip(g2, g1):
        _close(a, b, 1e-6, "grad")


# ---- CHUNK_STORAGE = "input": bf16 chunk tensors through rule.scan ----------------------------------------

@pytest.mark.parametrize("name, forward", [("deltanet", "split"), ("deltanet", "fused"), ("gated_deltanet", "split"),
                                           ("gated_deltanet", "fused"), ("longhorn", "fused"), ("two_term", "split"),
                                           ("two_keys", "split"), ("row_decay_delta", "fused")])
def test_chunk_storage_input_matches_fp32(name, forward, calls, monkeypatch):
    # the split (prep / state / out) or fused forward and the chunked backward (scalar c: prep / state / value /
    # key; Longhorn's row c: its own prep / state / value and the key kernel) on bf16 chunk tensors against the
    # same rule on fp32 chunk tensors, same bf16 inputs (tolerance: triton_testing.STORAGE_RTOL); Longhorn's
    # row c always runs the fused forward
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")            # Gated DeltaNet: log α has no closed form
    monkeypatch.setattr(tchunk, "DELTA_FORWARD", forward)
    split = spy(monkeypatch, tchunk, "_delta_split_forward")
    rule = {"two_term": _two_term_rule, "two_keys": lambda: olssm.catalogue.rule("two_keys"),   # rank 2 (sub-tokens)
            "row_decay_delta": lambda: _row_decay_delta("row c")}.get(name, lambda: ENTRIES[name].rule)()
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=45)
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(45))
    _compare_storage(rule, inp, h0, monkeypatch)
    assert len(calls) == 2 and len(split) == (2 if forward == "split" and name != "row_decay_delta" else 0)


# ---- CHECKPOINT_STORAGE = "input": bf16 checkpoints ck ----------------------------------------------------

@pytest.mark.parametrize("name, forward, chunks", [("deltanet", "split", "fp32"), ("deltanet", "fused", "fp32"),
                                                   ("gated_deltanet", "split", "fp32"),
                                                   ("gated_deltanet", "fused", "fp32"), ("longhorn", "fused", "fp32"),
                                                   ("gated_deltanet", "split", "input")])
def test_checkpoint_storage_input_matches_fp32(name, forward, chunks, calls, monkeypatch):
    # bf16 ck written by the split state kernel (read by the out kernel) or the fused forward, read by the chunked
    # backward (scalar c: value / key kernels; Longhorn's row c: its prep and the key kernel); dh stays fp32;
    # against the same run with fp32 ck (tolerance: triton_testing.CHECKPOINT_RTOL; final state equal; the fused
    # forward computes o from the fp32 register state, so o is equal too); chunks "input": bf16 chunk tensors in both
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")            # Gated DeltaNet: log α has no closed form
    monkeypatch.setattr(tchunk, "DELTA_FORWARD", forward)
    monkeypatch.setattr(tchunk, "CHUNK_STORAGE", chunks)
    split = spy(monkeypatch, tchunk, "_delta_split_forward")
    seen = []   # (ck, dh) dtypes reaching the key kernel: (q, w, e, g, a, b, dr, dl, do, ck, dh, ...)
    real = tdelta._key_grads
    monkeypatch.setattr(tdelta, "_key_grads", lambda *a, **k: seen.append((a[9].dtype, a[10].dtype)) or real(*a, **k))
    rule = ENTRIES[name].rule
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=45)
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(45))
    rel = _compare_ck(rule, inp, h0, monkeypatch)
    assert len(calls) == 2 and len(split) == (2 if forward == "split" else 0)
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)], seen   # dh stays fp32
    if forward == "fused":
        assert rel["o"] == 0.0, rel
    print(name, forward, {k: f"{v:.2e}" for k, v in rel.items()})


@pytest.mark.parametrize("gated", [False, True])
def test_checkpoint_storage_split_scratch(gated, monkeypatch):
    # without a gradient the split forward's ck is scratch (not returned): it follows the knob too; o matches
    # the fp32-checkpoint run (CHECKPOINT_RTOL) and the final state is equal
    monkeypatch.setattr(tchunk, "DELTA_FORWARD", "split")
    seen = []
    real = tchunk._delta_split_forward
    monkeypatch.setattr(tchunk, "_delta_split_forward", lambda *a, **k: seen.append(a[4].dtype) or real(*a, **k))
    rule = ENTRIES["gated_deltanet" if gated else "deltanet"].rule
    inp = {n: _dev(x).to(torch.bfloat16) for n, x in random_inputs(rule, 1, 37, 2, 5, 6, seed=48).items()}
    out = []
    for mode in ("fp32", "input"):
        monkeypatch.setattr(tchunk, "CHECKPOINT_STORAGE", mode)
        with torch.no_grad():
            out.append(rule.scan(backend="triton", output_final_state=True, **inp))
    assert seen == [torch.float32, torch.bfloat16]
    (o1, f1), (o2, f2) = out
    assert torch.equal(f1, f2)
    _close(o2, o1, CHECKPOINT_RTOL, "o, bf16 scratch ck vs fp32")


def test_chunk_storage_varlen(calls, monkeypatch):
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    rule = ENTRIES["gated_deltanet"].rule
    cu = [0, 5, 5, 6, 43]                                        # lengths 5, 0, 1, 37
    inp = random_inputs(rule, 1, 43, 2, 4, 5, seed=46)
    h0 = 0.3 * torch.randn(4, 2, 5, 4, generator=torch.Generator().manual_seed(46))
    _compare_storage(rule, inp, h0, monkeypatch, cu_seqlens=_dev(torch.tensor(cu, dtype=torch.int32)))
    assert len(calls) == 2


# ---- rank-R corrections: R' = next_pow2(R) sub-tokens per token (chunked.sub_tokens, TRITON.md) ------------

def _multi_key_rule(kind):
    """Objectives with several keys. Implicit ones give R = n² corrections (the Woodbury mixing of k_0..k_{n−1}:
    a = k_i, b = k_j), the explicit one R = 2."""
    S, Sp = O.states()
    k0, v0, k1, v1 = O.key("k0"), O.value("v0"), O.key("k1"), O.value("v1")
    if kind == "explicit":      # scalar c, a raw decay α (no closed-form log): split forward, R = 2
        return olssm.derive(O.Objective(O.sqnorm(S @ k0 - v0, weight=O.scalar("b0", domain="unit")) / 2
                                        + O.sqnorm(S @ k1 - v1, weight=O.scalar("b1", domain="unit")) / 2,
                                        update="explicit", decay=O.scalar("alpha", domain="decay"),
                                        name="two-key explicit"))
    prox = O.sqnorm(S - (sp.exp(O.scalar("la", domain="negative")) if kind == "decay" else 1) * Sp) / 2
    w0 = O.row("b0", positive=True) if kind == "row" else None   # a row weight: row c (fused forward, row-c bwd)
    keys = 3 if kind == "three" else 2
    loss = O.sqnorm(S @ k0 - v0, weight=w0) / 2 + O.sqnorm(S @ k1 - v1, weight=O.scalar("b1", positive=True)) / 2
    if keys == 3:
        loss = loss + O.sqnorm(S @ O.key("k2") - O.value("v2")) / 2
    return olssm.derive(O.Objective(prox + loss, name=f"multi-key {kind}"))


@pytest.fixture
def subs(monkeypatch):
    """The sub-tokens per token of every chunked forward launch (the `sub` of chunked._chunked_forward)."""
    seen = []
    real = tchunk._chunked_forward
    monkeypatch.setattr(tchunk, "_chunked_forward", lambda *a, **k: seen.append(a[-1] if len(a) > 10 else 1)
                        or real(*a, **k))
    return seen


@pytest.mark.parametrize("kind, R, sub", [("explicit", 2, 2), ("decay", 4, 4), ("row", 4, 4), ("three", 9, 16)])
def test_rank_r_corrections(kind, R, sub, calls, subs, monkeypatch):
    # every correction of a token reads the same S̃_t: the kernels keep the corrections of one token out of each
    # other's triangular system (D_st strict between tokens); chunks of 16 sub-tokens = 16 / R' tokens, T = 21 is
    # not a multiple of them; the chunked backward and the recurrent one (on the sub-token checkpoints, read as
    # checkpoints every 16 / R' tokens) against the reference
    rule = _multi_key_rule(kind)
    assert len(rule.form.corrections) == R and tchunk.sub_tokens(rule.form) == sub
    inp = random_inputs(rule, 1, 21, 2, 4, 5, seed=11)
    h0 = 0.3 * torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(11))
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    g_chunk = _compare(rule, inp, h0)
    assert len(calls) == 1 and subs == [sub]
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "0")
    g_rec = _compare(rule, inp, h0)
    assert len(calls) == 1 and subs == [sub, sub]
    for n in g_chunk:
        _close(g_chunk[n], g_rec[n], RTOL, f"d{n}: chunk vs recurrent backward")


@pytest.mark.parametrize("forward", ["split", "fused"])
def test_rank_r_varlen_and_state_round_trip(forward, calls, monkeypatch):
    # sequences start at sub-token bos·R'; an empty sequence keeps its state and passes dht to dh0
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    monkeypatch.setattr(tchunk, "DELTA_FORWARD", forward)
    rule = _multi_key_rule("decay")
    cu = [0, 5, 5, 6, 27]
    inp = random_inputs(rule, 1, 27, 2, 4, 5, seed=16)
    h0 = 0.3 * torch.randn(4, 2, 5, 4, generator=torch.Generator().manual_seed(16))
    g = _compare(rule, inp, h0, cu_seqlens=_dev(torch.tensor(cu, dtype=torch.int32)))
    assert len(calls) == 1 and g["h0"][1].abs().max() > 0
    split_scan_matches(rule, inp, 10)


def test_rank_r_opcheck_and_layout(calls):
    # the op's fake output (aux holds T_c and W̃ in the sub-token layout) and autograd registration; and the
    # layout's gather is the adjoint of its spread: <spread(x), y> = <x, gather(y)>
    rule = _multi_key_rule("decay")
    plan = tscan.plan_for(rule)
    key = tlib.register(plan)
    B, T, H, K, V = 1, 9, 1, 4, 4
    inp = {n: _dev(t).requires_grad_() for n, t in random_inputs(rule, B, T, H, K, V, seed=12).items()}
    args = olssm.kernels.api.check_scan_args(rule, None, None, None, initial_state=None, output_final_state=True,
                                             cu_seqlens=None, inputs=inp)
    chunk_in = [x.detach().requires_grad_() for x in tchunk.chunk_inputs(plan, args, grad=True)]
    assert chunk_in[4].shape == (4, B, T, H, K) and chunk_in[6].shape == (4, B, T, H)
    h0 = _dev(torch.randn(B, H, V, K)).requires_grad_()
    op_args = (key, [inp[s.name] for s in plan.syms], [], chunk_in, h0, None, [B, T, H, K, V, B, T, 4], torch.float32,
               True, True, True, None)
    torch.library.opcheck(torch.ops.olssm.triton_scan_fwd.default, op_args)
    assert calls
    _, _, _, aux = torch.ops.olssm.triton_scan_fwd(*op_args)
    assert aux.numel() == B * T * 4 * H * (16 + K)

    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(c.shape, generator=gen, dtype=torch.float64) for c in chunk_in]
    x[4:] = [t[:3] for t in x[4:]]   # three corrections in four sub-tokens: one padding slot
    sx = tchunk.to_sub_tokens(x, 4)
    y = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in sx]
    lhs = sum((a * b).sum() for a, b in zip(sx, y))
    rhs = sum((a * b).sum() for a, b in zip(x, tchunk.from_sub_tokens(y, 4, 3)))
    assert torch.allclose(lhs, rhs, rtol=1e-12)
    assert sx[0].unflatten(1, (T, 4))[:, :, :3].abs().max() == 0        # q only at the last sub-token
    assert sx[3].unflatten(1, (T, 4))[:, :, 1:].abs().max() == 0        # the decay only at the first
    assert sx[6].unflatten(1, (T, 4))[:, :, 3].abs().max() == 0         # the padding correction has c = 0

    # and through torch.compile (aot_eager: the ops' fake implementations, rank-R sizes included) = eager
    torch._dynamo.reset()

    def fn(xs):
        o, f = rule.scan(backend="triton", output_final_state=True, **xs)
        return (o * o).sum() + f.sum()
    outs = []
    for f in (fn, torch.compile(fn, backend="aot_eager")):
        xs = {n: t.detach().clone().requires_grad_() for n, t in inp.items()}
        loss = f(xs)
        outs.append((loss.detach(), torch.autograd.grad(loss, list(xs.values()))))
    (l1, g1), (l2, g2) = outs
    _close(l2, l1, 1e-6, "loss")
    for a_, b_ in zip(g2, g1):
        _close(a_, b_, 1e-6, "grad")


# ---- row decays with corrections: chunk_rowdecay_bwd_kernel ----------------------------------------------

def _row_decay_delta(kind):
    """A per-value-row decay r with a correction: explicit with a row weight (row c), implicit (scalar c), explicit
    with a second input term, and two keys (rank 4: four sub-tokens per token)."""
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    prox = O.sqnorm(S - O.diag(O.row("r", domain="decay")) @ Sp) / 2
    if kind == "row c":
        return olssm.derive(O.Objective(prox + O.sqnorm(S @ k - v, weight=O.row("b", positive=True)) / 2,
                                        update="explicit"))
    if kind == "implicit":
        return olssm.derive(O.Objective(prox + O.sqnorm(S @ k - v, weight=O.scalar("b", positive=True)) / 2))
    if kind == "two terms":
        return olssm.derive(O.Objective(prox + O.sqnorm(S @ k - v, weight=O.scalar("b", domain="unit")) / 2
                                        - O.inner(S @ O.key("kl"), O.value("vl")), update="explicit"))
    return olssm.derive(O.Objective(prox + O.sqnorm(S @ k - v) / 2 + O.sqnorm(S @ O.key("k1") - O.value("v1")) / 2))


@pytest.fixture
def rowdecay_calls(monkeypatch):
    return spy(monkeypatch, tdelta, "chunked_rowdecay_backward")


@pytest.mark.parametrize("kind", ["row c", "implicit", "two terms", "two keys"])
def test_row_decay_corrections_chunked_backward(kind, rowdecay_calls, monkeypatch):
    # each value row a scalar-decay delta rule with its own pairwise decays: against the reference and against the
    # recurrent backward on the same chunked forward's checkpoints
    rule = _row_decay_delta(kind)
    assert rule.decay_kind == "row" and tchunk.backward_supported(tscan.plan_for(rule), exact_decay_grad=False)
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=21)
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(21))
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")               # r is a raw decay: auto keeps the recurrent one
    g_chunk = _compare(rule, inp, h0)
    assert len(rowdecay_calls) == 1
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "0")
    g_rec = _compare(rule, inp, h0)
    assert len(rowdecay_calls) == 1
    for n in g_chunk:
        _close(g_chunk[n], g_rec[n], RTOL, f"d{n}: chunk vs recurrent backward")


def test_row_decay_corrections_log_space_auto_varlen_strong(rowdecay_calls):
    # read in log space (Rule.with_log_decays) "auto" takes the chunked backward; packed sequences with an empty
    # one; decays of e^{-69} per token and resets (e^{-400} = 0 in fp32) stay finite and exact
    rule = _row_decay_delta("row c").with_log_decays()
    assert rule.inputs["r"].domain == "log_decay"
    cu = [0, 5, 5, 6, 43]
    inp = random_inputs(rule, 1, 43, 2, 4, 5, seed=22)
    inp["r"][:, ::3] = -69.0
    inp["r"][:, 7::11] = -400.0
    h0 = 0.3 * torch.randn(4, 2, 5, 4, generator=torch.Generator().manual_seed(22))
    g = _compare(rule, inp, h0, cu_seqlens=_dev(torch.tensor(cu, dtype=torch.int32)))
    assert len(rowdecay_calls) == 1 and g["h0"][1].abs().max() > 0
    assert all(torch.isfinite(x).all() for x in g.values())


def test_gated_deltanet_layer_trains_through_the_chunked_backward(calls, monkeypatch):
    # the layer hands its decay over in log space (Rule.with_log_decays), so under "auto" a Gated DeltaNet layer's
    # backward is the chunked one (the catalogue rule, reading α raw, keeps the recurrent one: test_auto_policy);
    # the layer's output and every parameter gradient equal the chunk backend's
    from olssm.layers.presets import GatedDeltaNet
    monkeypatch.setattr(tlib, "FORCE", None)
    torch.manual_seed(0)
    layer = GatedDeltaNet(16, n_heads=2, d_k=4, d_v=4, expand_v=1.0)
    assert layer.rule.inputs["alpha"].domain == "log_decay"
    x = torch.randn(1, 40, 16)
    outs = []
    for backend, dev in (("triton", _DEVICE), ("chunk", "cpu")):
        layer.to(dev)
        layer.backend = backend
        layer.zero_grad()
        y = layer(x.to(dev))
        (y.float() * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
        outs.append((y.detach().cpu(), {n: p.grad.detach().cpu().clone() for n, p in layer.named_parameters()}))
    assert len(calls) == 1
    (y1, g1), (y2, g2) = outs
    _close(y1, y2, RTOL, "layer output")
    for n in g2:   # weight gradients sum 40 tokens' products through the projections and norms: 1e-4 of the max
        _close(g1[n], g2[n], 1e-4, f"d{n}")


@pytest.mark.parametrize("kind", ["row c", "two terms"])
def test_row_decay_corrections_fast_path_and_loop_agree(kind, rowdecay_calls, monkeypatch):
    # FAST_SPAN = +inf: every pair product of the row-decay delta backward as a factorised dot; −inf: one token
    # column at a time. On mild decays both agree to fp32 rounding, and both equal the reference
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    rule = _row_decay_delta(kind)
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=23)
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(23))
    grads = []
    for span in (float("inf"), float("-inf")):
        monkeypatch.setattr(tchunk, "FAST_SPAN", span)   # read at each launch (chunked.fast_span)
        grads.append(_compare(rule, inp, h0))
    assert len(rowdecay_calls) == 2
    assert any(not torch.equal(grads[0][n], grads[1][n]) for n in grads[0])   # two different computations
    for n in grads[0]:
        _close(grads[0][n], grads[1][n], RTOL, f"d{n}: fast path vs loop")


def test_row_decay_delta_forward_fast_path_and_loop_agree(monkeypatch):
    # the fused forward's row-decay path: factorised dots (FAST_SPAN = +inf) or token columns (−inf)
    rule = _row_decay_delta("two terms")
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=24)
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(24))
    res = []
    for span in (float("inf"), float("-inf")):
        monkeypatch.setattr(tchunk, "FAST_SPAN", span)
        with torch.no_grad():
            res.append(rule.scan(backend="triton", initial_state=_dev(h0), output_final_state=True,
                                 **{n: _dev(x) for n, x in inp.items()}))
    (o1, f1), (o2, f2) = res
    assert not torch.equal(o1, o2)
    _close(o1, o2, RTOL, "o: fast path vs loop")
    _close(f1, f2, RTOL, "final state: fast path vs loop")
    _compare(rule, inp, h0)                                     # and the default path against the reference


@pytest.mark.parametrize("name", ["longhorn_forget", "two_keys"])
def test_derived_rules_odd_shapes_and_value_blocks(name, monkeypatch):
    # d_v = 33: two 32-row value blocks, whose key-side partial gradients (dq, da, db, dw) and scalar-c partials
    # are summed on the host; d_k = 20 (masked key lanes); B = 2; T = 40 (a partial last chunk)
    monkeypatch.setenv("OLSSM_TRITON_CHUNK_BWD", "1")
    rule = olssm.catalogue.rule(name)
    inp = random_inputs(rule, 2, 40, 2, 20, 33, seed=40)
    _compare(rule, inp, 0.3 * torch.randn(2, 2, 33, 20, generator=torch.Generator().manual_seed(40)))


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "two_term"])
def test_delta_u_storage_input_matches_fp32(name, monkeypatch):
    # chunked.DELTA_U_STORAGE "input": the split forward's Ũ / Δ buffer in the inputs' dtype (bf16 here; fp32 inputs
    # keep fp32), against "fp32" on the same bf16 inputs: o, the final state and every gradient within the storage
    # tolerances (Ũ's rounding enters the state update; the backward recomputes Δ in fp32). The dtype is the one the
    # state kernel got (spied); the two-term rule stores Ũ through the prep's M > 1 branch
    monkeypatch.setenv("OLSSM_TRITON_DELTA_FORWARD", "split")
    monkeypatch.delenv("OLSSM_TRITON_DELTA_U_STORAGE", raising=False)
    rule = _two_term_rule() if name == "two_term" else ENTRIES[name].rule.with_log_decays()
    seen = []
    real = tchunk.chunk_delta_state_kernel

    class Spy:   # the state kernel's sixth argument is u
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append(a[5].dtype) or real[grid](*a, **k)

    monkeypatch.setattr(tchunk, "chunk_delta_state_kernel", Spy())
    inp = {n: _dev(x) for n, x in random_inputs(rule, 1, 37, 2, 5, 6, seed=51).items()}
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(51))
    res = {}
    for mode, dtype in (("fp32", torch.bfloat16), ("input", torch.bfloat16), ("input", torch.float32)):
        monkeypatch.setattr(tchunk, "DELTA_U_STORAGE", mode)
        seen.clear()
        res[mode, dtype] = _run(rule, {n: x.to(dtype) for n, x in inp.items()}, h0, "triton")
        assert seen == [torch.bfloat16 if (mode, dtype) == ("input", torch.bfloat16) else torch.float32], seen
    (o1, f1, g1), (o2, f2, g2) = res["fp32", torch.bfloat16], res["input", torch.bfloat16]
    _close(o2.float(), o1.float(), STORAGE_RTOL, "o")
    _close(f2, f1, STORAGE_STATE_RTOL, "final state")
    for n in g1:
        _close(g2[n].float(), g1[n].float(), STORAGE_RTOL, f"d{n}")
    monkeypatch.setenv("OLSSM_TRITON_DELTA_U_STORAGE", "bf16")
    with pytest.raises(ValueError, match="delta u storage"):
        tchunk.delta_u_storage(torch.bfloat16)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_value_kernel_forms_n_from_the_key_tiles_it_loads(name, monkeypatch):
    # the value kernel with SAME_KEY (a = b one tensor, chunked.shared_key_inputs): N = A Aᵀ from the key tiles its
    # first loop loads, in _dot_rows_k's key blocks and order, against N formed from two more loads of the key tensor
    # (SAME_KEY forced off at the launch): o and the final state bit for bit, every gradient within 2e-6 of its largest
    # value (the interpreter's numpy computes A Aᵀ of one array as a symmetric product, whose sums round differently
    # from A Bᵀ's, ~1 ulp; a wrong block or mask would be O(1)); d_k = 72 is four blocks of VALUE_BLOCK_K columns,
    # the last partly masked. The launch got SAME_KEY (spied)
    rule = _same_key_rule(name)
    inp = random_inputs(rule, 1, 70, 2, 72, 12, seed=53)
    h0 = 0.3 * torch.randn(1, 2, 12, 72, generator=torch.Generator().manual_seed(53))
    flags, force = [], []
    real = tdelta.chunk_delta_bwd_value_kernel

    class Spy:
        def __getitem__(self, grid):
            def call(*a, **k):
                flags.append(k.get("SAME_KEY"))
                return real[grid](*a, **(dict(k, SAME_KEY=False) if force else k))
            return call

    monkeypatch.setattr(tdelta, "chunk_delta_bwd_value_kernel", Spy())
    own = _run(rule, inp, h0, "triton")
    force.append(True)
    loaded = _run(rule, inp, h0, "triton")
    assert flags == [True, True], flags
    (o1, f1, g1), (o2, f2, g2) = own, loaded
    assert torch.equal(o1, o2) and torch.equal(f1, f2)
    for n in g1:
        _close(g1[n], g2[n], 2e-6, f"d{n}, N from the loaded tiles against two more loads")


@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("inputs", ["bf16, auto", "fp32, bf16 operands"])
@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_dot_operands_kept_in_bf16_where_the_dots_take_bf16_operands(name, inputs, same, monkeypatch):
    # The split delta buffers that are only ever dot operands (chunked.OPERAND_BUFFERS): W̃ (chunked.wt_storage), T_c
    # (tc_storage), the forward's Δ / E₀ − Δ, dh without a decay (chunked_delta_bwd.dh_storage), dR′ (dr_storage) and,
    # for the general key kernel (same off), the backward's Δ (dl_storage). Under bf16 operands (DeltaNet's bf16 inputs
    # at wide keys under "auto"; any rule under DOT_PRECISION "bf16") they are kept in bf16 (T_c and W̃ each in half
    # its fp32 span of the op's aux). o, the final state and every gradient are bit for bit those of fp32 buffers
    # (the dots round them to bf16 the same way; under the interpreter _store_operand rounds to nearest as the GPU
    # does), and the backward reads the dtypes the forward wrote, from aux's size — also for session 24's pair alone
    # (W̃ and dh: a bf16 W̃ beside an fp32 T_c). Gated DeltaNet keeps dh in fp32 (its ∂ log γ sums ⟨dS, S₀⟩), the
    # same-key kernel Δ (it forms E − Δ in fp32), and under "auto" Gated DeltaNet has tf32 operands and fp32 buffers
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    monkeypatch.delenv("OLSSM_TRITON_DOT_PRECISION", raising=False)
    monkeypatch.setattr(tdelta, "SAME_KEY", same)
    monkeypatch.delenv("OLSSM_TRITON_SAME_KEY", raising=False)
    dtype = torch.bfloat16 if inputs.startswith("bf16") else torch.float32
    monkeypatch.setattr(tchunk, "DOT_PRECISION", "auto" if inputs.endswith("auto") else "bf16")
    rule = _same_key_rule(name)
    inp = {n: x if rule.inputs[n].is_parameter else x.to(dtype)
           for n, x in random_inputs(rule, 1, 70, 2, 72, 12, seed=52).items()}
    h0 = 0.3 * torch.randn(1, 2, 12, 72, generator=torch.Generator().manual_seed(52))
    seen = []
    real_core = tchunk.saved_chunk_core
    monkeypatch.setattr(tchunk, "saved_chunk_core",
                        lambda *a: (lambda core: seen.append(("core", core[0].dtype, core[1].dtype)) or core)(
                            real_core(*a)))

    def spy(module, kernel, args):   # the dtypes of these positional arguments of every launch of kernel
        real = getattr(module, kernel)

        class Spy:
            def __getitem__(self, grid):
                return lambda *a, **k: seen.append((kernel, *(a[i].dtype for i in args))) or real[grid](*a, **k)

        monkeypatch.setattr(module, kernel, Spy())

    spy(tchunk, "chunk_delta_state_kernel", (5, 6))            # Ũ (u), Δ (dl)
    spy(tchunk, "chunk_delta_out_kernel", (5,))                # Δ
    spy(tdelta, "chunk_delta_bwd_state_kernel", (7,))          # dh
    spy(tdelta, "chunk_delta_bwd_value_kernel", (7, 8, 9, 13))  # T_c, dΔ, dR′, Δ

    def run(buffers):
        monkeypatch.setattr(tchunk, "OPERAND_BUFFERS", buffers)
        seen.clear()
        return _run(rule, inp, h0, "triton"), sorted(seen, key=str)

    kept, got = run(("wt", "tc", "delta", "dh", "dr", "dl"))
    f32, bf16 = torch.float32, torch.bfloat16
    b = bf16 if name == "deltanet" or inputs.endswith("operands") else f32
    want = [("chunk_delta_bwd_state_kernel", bf16 if b == bf16 and name == "deltanet" else f32),
            ("chunk_delta_bwd_value_kernel", b, f32, b, f32 if same else b),
            ("chunk_delta_out_kernel", b), ("chunk_delta_state_kernel", f32, b), ("core", b, b), ("core", b, b)]
    assert got == sorted(want, key=str), got
    fp32, got = run(())
    assert got == sorted([("chunk_delta_bwd_state_kernel", f32), ("chunk_delta_bwd_value_kernel", f32, f32, f32, f32),
                          ("chunk_delta_out_kernel", f32), ("chunk_delta_state_kernel", f32, f32), ("core", f32, f32),
                          ("core", f32, f32)], key=str), got
    runs = [fp32]
    if b == bf16 and not same:   # session 24's pair alone: aux holds an fp32 T_c beside a bf16 W̃
        pair, got = run(("wt", "dh"))
        assert [x for x in got if x[0] == "core"] == [("core", f32, bf16)] * 2, got
        runs.append(pair)
    o1, f1, g1 = kept
    for o2, f2, g2 in runs:
        assert torch.equal(o1, o2) and torch.equal(f1, f2)
        assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1), \
            {n: float((g1[n] - g2[n]).abs().max()) for n in g1}


@pytest.mark.parametrize("case", ["gated_deltanet", "general kernel", "untied", "two terms", "gated longhorn",
                                  "rank 4"])
def test_key_kernel_decay_gradient_at_strong_decays(case, monkeypatch):
    # ∂ of a scalar decay at strong decays, through the key kernel. Its ∂g_t had been a reverse sum of per-token ∂b,
    # whose pair terms cancel between the tokens on either side of t but each left ε·O(1) in fp32 where the true
    # ∂g_t carries e^{g_t}: ∂ through a scale s of log α was 6.5e-4 relative at s = 100 for Gated DeltaNet (1.7e-4
    # on the general kernel). Summed where they straddle t (DECAY_STRADDLE): 1e-8 to 1e-6, as the chunk backend's
    # fp64 cumsums (1e-7). Against the fp64 reference at 1e-5 relative, s = 100 and 1000 (log α down to −1000 per
    # token: tokens that reset the state); every key launch spied to have STRADDLE on
    monkeypatch.delenv("OLSSM_TRITON_DELTA_STRADDLE", raising=False)
    monkeypatch.setattr(tdelta, "SAME_KEY", case == "gated_deltanet")
    monkeypatch.delenv("OLSSM_TRITON_SAME_KEY", raising=False)
    if case == "untied":
        monkeypatch.setattr(tchunk, "TIE_INPUT_TERM", False)
    rule = {"two terms": lambda: _two_term_rule().with_log_decays(), "gated longhorn": _gated_longhorn,
            "rank 4": lambda: _multi_key_rule("decay")}.get(case, lambda: _same_key_rule("gated_deltanet"))()
    seen = []
    monkeypatch.setattr(tdelta, "chunk_delta_bwd_key_kernel",
                        _Launch(tdelta.chunk_delta_bwd_key_kernel, lambda k: k.get("STRADDLE"), seen))
    inp = random_inputs(rule, 1, 64, 1, 8, 4, seed=1, dtype=torch.float64)
    [decay] = [n for n, s in rule.inputs.items() if s.domain in ("log_decay", "negative")]
    u = torch.rand(1, 64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = torch.randn(1, 64, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for scale, err, grads in decay_scale_errors(rule, inp, decay, u, g, (100, 1000)):
        assert err < 1e-5, (scale, err, grads)
    assert seen and all(seen), seen
