"""The autotuner of the Triton scan's launch configuration (olssm/kernels/triton/autotune.py).

Under the interpreter times mean nothing, so the timer is replaced by a table keyed by the candidate
being run: the tests check that the fastest candidate is chosen, run and remembered (in memory and on
disk), that failing candidates are skipped, and — against the reference backend, every gradient — that
a tuned launch geometry (value rows, warps) reaches both the forward and the backward kernels.
"""
from triton_testing import compare, dev, run, spy_launches  # noqa: F401,E402  (sets TRITON_INTERPRET first)

import pytest  # noqa: E402
import torch  # noqa: E402

from olssm.catalogue import ENTRIES, random_inputs  # noqa: E402
from olssm.kernels.triton import autotune, library  # noqa: E402
from olssm.kernels.triton.library import LaunchConfig  # noqa: E402


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """Autotuning on, a private cache directory, and a fake timer: fake.times[config] ms (default 5),
    fake.calls the configs measured."""
    monkeypatch.setenv("OLSSM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OLSSM_TRITON_KERNEL", raising=False)
    monkeypatch.delenv("OLSSM_TRITON_PSCAN", raising=False)
    monkeypatch.setattr(autotune, "ENABLED", True)
    autotune.clear()

    class Fake:
        times, calls, fail = {}, [], set()
        last = None

    real_run = library.run_config

    def run_config(plan, args, meta, cfg, need):
        Fake.last = cfg
        return real_run(plan, args, meta, cfg, need)

    def measure(fn, device):
        fn()
        cfg = Fake.last
        Fake.calls.append(cfg)
        if cfg.kernel in Fake.fail:
            raise RuntimeError(f"no {cfg.kernel} here")
        return Fake.times.get(cfg, 5.0)

    monkeypatch.setattr(library, "run_config", run_config)
    monkeypatch.setattr(autotune, "_measure", measure)
    yield Fake
    autotune.clear()


def _inputs(name, T=6, seed=3):
    rule = ENTRIES[name].rule
    return rule, random_inputs(rule, 1, T, 2, 5, 6, seed=seed)


def _scan(rule, inp, grad=False):
    """rule.scan on the test device (compare moves its inputs itself; these calls did not, and failed on a GPU)."""
    return rule.scan(backend="triton", **{n: dev(x).clone().requires_grad_(grad) for n, x in inp.items()})


def test_candidates_cover_the_kernels_that_run_the_rule():
    class Meta:
        N, max_len = 1, 64
    from olssm.kernels.triton.scan import plan_for

    def kinds(name, need=True):
        rule, inp = _inputs(name)
        args = rule_args(rule, inp)
        return autotune.candidates(plan_for(rule), args, Meta, need)

    delta = kinds("deltanet")
    assert {(c.kernel, c.delta_forward, c.chunk_backward) for c in delta if c.kernel == "chunk"} == \
        {("chunk", f, b) for f in ("split", "fused") for b in (True, False)}
    assert not any(c.kernel == "pscan" for c in delta)              # corrections: no block scan
    rowc = kinds("longhorn")
    assert {c.delta_forward for c in rowc if c.kernel == "chunk"} == {""}   # row c: no split forward
    mamba = kinds("mamba")
    assert mamba[0].kernel == "pscan" and not any(c.kernel == "chunk" for c in mamba)   # policy first
    assert all(c.chunk_backward is None for c in kinds("deltanet", need=False))


def test_recurrent_candidates_up_to_one_block_of_every_value_row():
    # the default geometry is 8 value rows (scan.BLOCK_V): 16 rows on 2 warps and 32 on 4 (the default before
    # session 8) are other launches wherever they hold at most next_pow2(d_v) rows. The filter had kept
    # "bv < next_pow2(d_v)" from when the default was 32 rows, so d_v = 16 got no alternative and d_v = 32 lost 32 / 4
    class Meta:
        N, max_len = 1, 64
    from olssm.kernels.triton.scan import plan_for
    rule = ENTRIES["deltanet"].rule
    for d_v, want in [(6, [(0, 0)]), (12, [(0, 0), (16, 2)]), (16, [(0, 0), (16, 2)]),
                      (20, [(0, 0), (16, 2), (32, 4)]), (32, [(0, 0), (16, 2), (32, 4)]),
                      (128, [(0, 0), (16, 2), (32, 4)])]:
        args = rule_args(rule, random_inputs(rule, 1, 6, 2, 5, d_v, seed=3))
        got = [(c.block_v, c.warps) for c in autotune.candidates(plan_for(rule), args, Meta, True)
               if c.kernel == "recurrent"]
        assert got == want, (d_v, got)


def test_a_block_of_every_value_row_matches_the_reference(monkeypatch):
    # d_v = 12 in one 16-row block (4 rows masked) in the forward and the backward kernel: o, the final state and
    # every gradient against the reference at the fp32 tolerances (triton_testing.compare)
    rule = ENTRIES["gated_deltanet"].rule
    inp = random_inputs(rule, 1, 9, 2, 5, 12, seed=3)
    monkeypatch.setattr(library, "policy_config", lambda plan, args, max_len: LaunchConfig("recurrent", 16, 2))
    compare(rule, inp, 0.3 * torch.randn(1, 2, 12, 5, generator=torch.Generator().manual_seed(2)))


def rule_args(rule, inp, chunk_size=None):
    from olssm.kernels.api import check_scan_args
    return check_scan_args(rule, inp.get("q"), inp.get("k"), inp.get("v"), initial_state=None,
                           output_final_state=True, cu_seqlens=None, chunk_size=chunk_size,
                           inputs={n: x for n, x in inp.items() if n not in ("q", "k", "v")})


def test_the_fastest_candidate_runs_and_is_remembered(tuner):
    rule, inp = _inputs("mamba")
    tuner.times = {LaunchConfig("recurrent"): 1.0}        # the token loop "wins" over the policy's pscan
    compare(rule, inp)                                     # tuned results = reference, every gradient
    (decision,) = autotune.decisions().values()
    assert decision == {"kernel": "recurrent", "block_v": 0, "warps": 0, "delta_forward": "",
                        "chunk_backward": None, "diag_path": "", "chunk": 0}
    assert tuner.last == LaunchConfig("recurrent")        # and the real call ran it
    measured = len(tuner.calls)
    assert measured >= 2
    _scan(rule, inp, grad=True)
    assert len(tuner.calls) == measured                    # looked up, not timed again
    autotune.clear()                                       # a new process: the decision comes from disk
    _scan(rule, inp, grad=True)
    assert len(tuner.calls) == measured and tuner.last == LaunchConfig("recurrent")
    _, longer = _inputs("mamba", T=40)                     # another length bucket: timed afresh
    _scan(rule, longer, grad=True)
    assert len(tuner.calls) > measured and len(autotune.decisions()) == 2


@pytest.mark.parametrize("entry", [
    {"kernel": "recurrent", "block_v": 0, "warps": 0, "delta_forward": "", "chunk_backward": None, "new_field": 1},
    {"kernel": "chunk"},                       # Mamba has no chunked form
    {"kernel": "recurrent", "block_v": 3},     # not a power of two
    {"kernel": "bogus"},
    "recurrent",
])
def test_a_stored_decision_that_does_not_run_the_rule_is_retuned(tuner, entry):
    """A decision from another olssm version (a field this one lacks), edited or corrupted, is ignored and the
    call retuned, with results equal to the reference; it was passed to LaunchConfig as is and crashed every
    call (TypeError, a kernel the rule has no form for, an arange of 3)."""
    import json
    rule, inp = _inputs("mamba")
    compare(rule, inp)
    (key,) = autotune.decisions()
    path = autotune._path()
    with open(path) as f:
        stored = json.load(f)
    stored[key] = entry
    with open(path, "w") as f:
        json.dump(stored, f)
    autotune.clear()                                        # a new process reads the edited file
    measured = len(tuner.calls)
    compare(rule, inp)
    assert len(tuner.calls) > measured                      # retuned
    assert isinstance(autotune.decisions()[key], dict) and autotune.decisions()[key] != entry


def test_decision_files_merge_across_processes(tuner):
    """Two processes tuning different rules: each store merges what the other wrote since it read the file
    (each rewrote its whole table, so one decision was lost)."""
    import json
    rule, inp = _inputs("mamba")
    compare(rule, inp)
    path = autotune._path()
    with open(path) as f:
        stored = json.load(f)
    stored["elsewhere|another process's decision"] = {"kernel": "recurrent"}
    with open(path, "w") as f:
        json.dump(stored, f)
    rule2, inp2 = _inputs("gla")
    compare(rule2, inp2)                                    # this process stores after the other one wrote
    with open(path) as f:
        assert "elsewhere|another process's decision" in json.load(f)


def test_forward_only_and_training_calls_are_tuned_separately(tuner):
    rule, inp = _inputs("retnet")
    with torch.no_grad():
        _scan(rule, inp)
    _scan(rule, inp, grad=True)
    assert sorted(k.split("|")[4] for k in autotune.decisions()) == ["fwd", "grad"]


def test_failing_candidates_are_skipped(tuner):
    rule, inp = _inputs("deltanet", T=8)
    tuner.fail = {"chunk", "recurrent"}
    tuner.times = {}
    compare(rule, inp)
    fails = autotune.failures()
    assert fails and all(c.kernel in tuner.fail for f in fails.values() for c in f)
    # every candidate failed: the policy runs (and nothing is stored)
    assert autotune.decisions() == {}


def test_forced_kernels_are_not_tuned(tuner, monkeypatch):
    monkeypatch.setattr(library, "FORCE", "recurrent")
    rule, inp = _inputs("gla")
    _scan(rule, inp)
    assert tuner.calls == [] and autotune.decisions() == {}


@pytest.mark.parametrize("cfg", [LaunchConfig("recurrent", block_v=2, warps=1), LaunchConfig("pscan", block_v=2),
                                 LaunchConfig("chunk", delta_forward="fused", chunk_backward=False)])
@pytest.mark.parametrize("name", ["gated_deltanet", "mamba"])
def test_a_tuned_geometry_reaches_forward_and_backward(name, cfg, monkeypatch):
    # d_v = 6 in blocks of 2 value rows: 3 programs per head in both kernels, or a wrong answer
    rule, inp = _inputs(name, T=9)
    if cfg.kernel == "pscan" and name == "gated_deltanet" or cfg.kernel == "chunk" and name == "mamba":
        pytest.skip("no such kernel for this rule")
    monkeypatch.setattr(library, "policy_config", lambda plan, args, max_len: cfg)
    h0 = 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(2))
    compare(rule, inp, h0)


def test_the_diagonal_paths_are_candidates(monkeypatch):
    # rules without a correction: the fused walk and the split path (chunked.DIAG_PATH) each with either backward,
    # the policy's spelled out first (not timed twice); with OLSSM_TRITON_DIAG_PATH set, only the path it names
    class Meta:
        N, max_len = 1, 64
    from olssm.kernels.triton.scan import plan_for
    monkeypatch.delenv("OLSSM_TRITON_DIAG_PATH", raising=False)
    rule, inp = _inputs("mamba2")
    got = autotune.candidates(plan_for(rule), rule_args(rule, inp), Meta, True)
    chunk = [(c.diag_path, c.chunk_backward) for c in got if c.kernel == "chunk" and not c.chunk]
    assert sorted(chunk) == [(p, b) for p in ("fused", "split") for b in (False, True)] and len(got) == len(set(got))
    delta = autotune.candidates(plan_for(ENTRIES["deltanet"].rule), rule_args(*_inputs("deltanet")), Meta, True)
    assert {c.diag_path for c in delta} == {""}
    monkeypatch.setenv("OLSSM_TRITON_DIAG_PATH", "split")
    got = autotune.candidates(plan_for(rule), rule_args(rule, inp), Meta, True)
    assert {c.diag_path for c in got} == {""}


@pytest.mark.parametrize("path", ["split", "fused"])
def test_a_tuned_diagonal_path_reaches_forward_and_backward(path, monkeypatch):
    # the config's path is handed to the forward op and, through the sizes it saves, to its backward: both launch
    # that path's kernels (spied), whatever chunked.DIAG_PATH says, and o, the final state and every gradient match
    # the reference
    from olssm.kernels.triton import chunked
    monkeypatch.delenv("OLSSM_TRITON_DIAG_PATH", raising=False)
    monkeypatch.setattr(chunked, "DIAG_PATH", "fused" if path == "split" else "split")
    launched = []
    # the walks run the split path's state passes too (OUT / GRADS False): named apart
    passes = lambda name, kwargs: launched.append(   # noqa: E731
        name + ("" if kwargs.get("OUT", True) and kwargs.get("GRADS", True) else " state pass"))
    spy_launches(monkeypatch, chunked, ["chunk_fwd_kernel", "chunk_bwd_kernel", "chunk_diag_out_kernel",
                                        "chunk_diag_bwd_kernel", "chunk_diag_dqk_kernel", "chunk_diag_dv_kernel"],
                 passes)
    cfg = LaunchConfig("chunk", chunk_backward=True, diag_path=path)
    monkeypatch.setattr(library, "policy_config", lambda plan, args, max_len: cfg)
    rule = ENTRIES["mamba2"].rule
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=5)
    compare(rule, inp, 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(5)))
    want = {"split": {"chunk_fwd_kernel state pass", "chunk_diag_out_kernel", "chunk_bwd_kernel state pass",
                      "chunk_diag_dqk_kernel", "chunk_diag_dv_kernel"},   # a scalar decay's whole gradients
            "fused": {"chunk_fwd_kernel", "chunk_bwd_kernel"}}[path]
    assert set(launched) == want, launched
    assert chunked.DIAG_PATH == ("fused" if path == "split" else "split")   # restored


def test_chunk_sizes_are_candidates(monkeypatch):
    # every chunked candidate at the policy's chunk size (chunk 0) and at the other of autotune.CHUNKS: d_k = 5 takes
    # 32 on every path, so the others are 64; d_k = 72 takes 64 on the split paths (library.WIDE_CHUNK), so there
    # the other is 32; CHUNKS empty: the policy's only
    class Meta:
        N, max_len = 1, 64
    from olssm.kernels.triton.scan import plan_for
    monkeypatch.delenv("OLSSM_TRITON_DIAG_PATH", raising=False)
    monkeypatch.delenv("OLSSM_TRITON_DELTA_FORWARD", raising=False)
    for name, d_k, want in [("mamba2", 5, {"fused": {0, 64}, "split": {0, 64}}),
                            ("mamba2", 72, {"fused": {0, 64}, "split": {0, 32}}),
                            ("deltanet", 72, {"split": {0, 32}, "fused": {0, 64}})]:
        rule = ENTRIES[name].rule
        args = rule_args(rule, random_inputs(rule, 1, 6, 2, d_k, 6, seed=3))
        got = [c for c in autotune.candidates(plan_for(rule), args, Meta, True) if c.kernel == "chunk"]
        by = {}
        for c in got[1:]:   # the policy's own first, then its explicit twin among the rest
            by.setdefault(c.diag_path or c.delta_forward, set()).add(c.chunk)
        assert by == want, (name, d_k, by)
        assert len(got) == len(set(got))
    monkeypatch.setattr(autotune, "CHUNKS", ())
    rule = ENTRIES["mamba2"].rule
    got = autotune.candidates(plan_for(rule), rule_args(rule, random_inputs(rule, 1, 6, 2, 5, 6, seed=3)), Meta, True)
    assert {c.chunk for c in got} == {0}


@pytest.mark.parametrize("name, chunk", [("mamba2", 16), ("deltanet", 64)])
def test_a_tuned_chunk_size_reaches_forward_and_backward(name, chunk, monkeypatch):
    # the config's chunk size goes to the forward op in its sizes (sizes[7]) and from there to the backward: both
    # launch chunks of that many tokens (spied), and o, the final state and every gradient match the reference
    seen = _spy_chunks(monkeypatch)
    cfg = LaunchConfig("chunk", chunk_backward=True, chunk=chunk)
    monkeypatch.setattr(library, "policy_config", lambda plan, args, max_len: cfg)
    rule = ENTRIES[name].rule.with_log_decays()
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=6)
    compare(rule, inp, 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(6)))
    backward = "chunked_delta_backward" if name == "deltanet" else "chunked_backward"
    assert seen == [("chunked_forward", chunk), (backward, chunk)], seen


def _spy_chunks(monkeypatch):
    """[(function, sizes[7])] of every chunked forward / backward launch from now on."""
    from olssm.kernels.triton import chunked, chunked_delta_bwd
    seen = []
    for module, fn, i in [(chunked, "chunked_forward", 6), (chunked, "chunked_backward", 5),
                          (chunked_delta_bwd, "chunked_delta_backward", 5)]:
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _real=real, _i=i, _fn=fn, **k: seen.append((_fn, a[_i][7])) or
                            _real(*a, **k))
    return seen


@pytest.mark.parametrize("name, chunk, sizes7", [("mamba2", 16, 16), ("deltanet", 64, 64), ("two_keys", 16, 8)])
def test_a_callers_chunk_size_reaches_forward_and_backward(name, chunk, sizes7, monkeypatch):
    # scan's chunk_size, not the policy's (32 here), is the chunk of the forward and the backward launches (a rank-2
    # rule's op counts tokens: 16 sub-tokens are 8 tokens), and o, the final state and every gradient match the
    # reference; 37 tokens reach the chunked kernels only with a chunk of at most 18 (two chunks), so deltanet's
    # 64 is forced. Compiled, every case is forced: fp32 inputs keep the token loop there (library._chunk_pays), and
    # the sizes are ones a compiled kernel runs (16 and up)
    from olssm import catalogue
    seen = _spy_chunks(monkeypatch)
    rule = (catalogue.rule(name) if name in catalogue.DERIVED else ENTRIES[name].rule).with_log_decays()
    if chunk > 18 or not library._scan.interpreted():
        monkeypatch.setattr(library, "FORCE", "prefer-chunk")
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=6)
    compare(rule, inp, 0.3 * torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(6)), chunk_size=chunk)
    backward = "chunked_backward" if name == "mamba2" else "chunked_delta_backward"
    assert seen == [("chunked_forward", sizes7), (backward, sizes7)], seen
    seen.clear()   # without chunk_size: the policy's chunk; the threshold for the chunked kernels is 2 of them
    monkeypatch.setattr(library, "FORCE", None)
    run(rule, inp, None, "triton")
    assert seen == [], seen   # 37 tokens < 2 · 32


def test_a_callers_chunk_size_reaches_an_exact_rules_g_scan(monkeypatch):
    # decayed least squares on triton: the chunk backend's exact engine solves for x_t in torch and runs G's scan
    # through the generated kernels; scan's chunk_size is their chunk too (it had stopped at the torch part), and o,
    # the final state and every gradient match the reference
    from triton_testing import close
    seen = _spy_chunks(monkeypatch)
    monkeypatch.setattr(library, "FORCE", "prefer-chunk")
    rule = ENTRIES["decayed_least_squares"].rule.with_log_decays()
    inp = random_inputs(rule, 1, 37, 2, 5, 6, seed=6)
    res = {}
    for backend in ("reference", "triton"):
        x = {n: dev(t).clone().requires_grad_() for n, t in inp.items()}
        o, (G, _) = rule.scan(backend=backend, output_final_state=True, chunk_size=16, **x)
        gw = torch.Generator().manual_seed(5)
        loss = sum((t * dev(torch.randn(t.shape, generator=gw))).sum() for t in (o, G))
        res[backend] = [o, G, *torch.autograd.grad(loss, list(x.values()))]
    for what, got, want in zip(["o", "G", *inp], res["triton"], res["reference"]):
        close(got, want, 1e-5, what)   # fp32 solves: ≤ 1.4e-6 relative (test_exact_rules_hybrid_matches_reference)
    assert seen == [("chunked_forward", 16), ("chunked_backward", 16)], seen


@pytest.mark.parametrize("where", ["chunked_forward", "chunked_backward", "chunked_delta_backward"])
def test_a_chunk_the_gpu_cannot_hold_is_named(where, monkeypatch):
    # Triton's OutOfResources (raised at launch, before the kernel runs, where a block asks for more shared memory
    # than the GPU has: GLA's fused backward at chunk 64, d = 128 on the H200, session 22) reaches the caller as a
    # ValueError naming the chunk, the head sizes and what to pass instead; the interpreter has no such limit, so the
    # launch is made to raise it as the compiled one did
    from triton.runtime.errors import OutOfResources
    from olssm.kernels.triton import chunked, chunked_delta_bwd
    module = chunked_delta_bwd if where == "chunked_delta_backward" else chunked

    def over(*a, **k):
        raise OutOfResources(278528, 232448, "shared memory")
    monkeypatch.setattr(module, where, over)
    monkeypatch.setattr(library, "FORCE", "prefer-chunk")
    rule = ENTRIES["deltanet" if where == "chunked_delta_backward" else "mamba2"].rule
    x = {n: dev(t).requires_grad_() for n, t in random_inputs(rule, 1, 37, 2, 5, 6, seed=6).items()}
    with pytest.raises(ValueError, match=r"chunked (forward|backward) at chunks of 16 .*d_k=5, d_v=6: a kernel needs "
                                         r"278528 of shared memory per block, this GPU gives 232448; pass a smaller "
                                         r"chunk_size") as e:
        rule.scan(backend="triton", chunk_size=16, **x)[0].sum().backward()
    assert ("forward" in str(e.value)) == (where == "chunked_forward")
    assert isinstance(e.value.__cause__, OutOfResources)


def test_a_callers_chunk_size_is_the_only_candidate(tuner):
    # with scan's chunk_size the autotuner times the chunked candidates at that size only, under a key of its own
    # (so a decision for the policy's sizes is not reused for it, nor the other way round)
    from olssm.kernels.triton.scan import plan_for

    class Meta:
        N, max_len = 1, 64
    rule = ENTRIES["mamba2"].rule
    inp = random_inputs(rule, 1, 6, 2, 5, 6, seed=3)
    fixed, free = rule_args(rule, inp, chunk_size=16), rule_args(rule, inp)
    got = [c for c in autotune.candidates(plan_for(rule), fixed, Meta, True) if c.kernel == "chunk"]
    assert got and {c.chunk for c in got} == {16}
    assert {c.chunk for c in autotune.candidates(plan_for(rule), free, Meta, True) if c.kernel == "chunk"} == {0, 64}
    k_fixed, k_free = (autotune.key_of(plan_for(rule), a, Meta, True) for a in (fixed, free))
    assert k_fixed == k_free + "|chunk 16"
    compare(rule, random_inputs(rule, 1, 40, 2, 5, 6, seed=4), chunk_size=16)   # tuned among them, then run
    assert {c.chunk for c in tuner.calls if c.kernel == "chunk"} == {16}


def test_a_chunk_size_the_kernels_cannot_run_is_refused(monkeypatch):
    # a power of two up to library.MAX_CHUNK, at least 16 when compiled; refused on every triton call (the rule below
    # would run the token loop at this length), with the size named; the torch backends take any positive int
    rule = ENTRIES["deltanet"].rule
    inp = {n: dev(x) for n, x in random_inputs(rule, 1, 6, 2, 5, 6, seed=3).items()}
    dls = ENTRIES["decayed_least_squares"].rule   # an exact rule's hybrid (torch solves, G scan on the kernels) too
    dls_inp = {n: dev(x) for n, x in random_inputs(dls, 1, 6, 2, 5, 6, seed=3).items()}
    for bad in (48, 2 * library.MAX_CHUNK):
        with pytest.raises(ValueError, match=f"chunk_size={bad}"):
            rule.scan(backend="triton", chunk_size=bad, **inp)
        with pytest.raises(ValueError, match=f"chunk_size={bad}"):
            dls.scan(backend="triton", chunk_size=bad, **dls_inp)
    if library._scan.interpreted():
        rule.scan(backend="triton", chunk_size=4, **inp)   # the interpreter has no tl.dot minimum, and says so
        with pytest.raises(ValueError, match="from 1 to .*from 16 when compiled"):
            library.check_chunk_size(48)
    else:
        with pytest.raises(ValueError, match="from 16 to .*chunk_size=4"):
            rule.scan(backend="triton", chunk_size=4, **inp)
    monkeypatch.setattr(library._scan, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="from 16 to .*chunk_size=8"):
        library.check_chunk_size(8)
    library.check_chunk_size(16)
    library.check_chunk_size(None)
