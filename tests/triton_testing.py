"""Shared by the Triton test modules: the device they run on, the tolerance check, and the
triton-vs-reference comparison of o, the final state and every gradient.

Importing this first sets TRITON_INTERPRET=1 (it must be set before triton is imported) unless
OLSSM_TRITON_DEVICE=cuda asks for the compiled kernels on a GPU.
"""
import os

DEVICE = os.environ.get("OLSSM_TRITON_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
    from interpreter_patch import install as _install_interpreter_patch
    if not os.environ.get("OLSSM_NO_INTERPRETER_PATCH"):
        _install_interpreter_patch()

import torch  # noqa: E402

#: fp32 tolerances, relative to max|reference|: o and gradients; the final state (a sum over every
#: token, summed in another order); absolute slack of every comparison (for entries near zero)
RTOL, STATE_RTOL, ABS = 1e-5, 2e-5, 1e-6


def dev(x):
    return x.to(DEVICE)


def close(a, b, rtol, what):
    """max|a − b| <= rtol·max|b| + ABS, and a finite."""
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    assert err <= rtol * scale + ABS, f"{what}: max abs error {err:.3g} vs scale {scale:.3g} (rtol {rtol})"


def run(rule, inp, h0, backend, cu_seqlens=None, grad=True, **scan_kw):
    """o, the final state and (grad) the gradients of a fixed random projection of both w.r.t. every
    input and the initial state (scan_kw: more of scan's arguments, e.g. chunk_size)."""
    x = {n: dev(t).clone().requires_grad_(grad) for n, t in inp.items()}
    h = None if h0 is None else dev(h0).clone().requires_grad_(grad)
    o, f = rule.scan(backend=backend, output_final_state=True, initial_state=h, cu_seqlens=cu_seqlens, **scan_kw, **x)
    if not grad:
        return o, f, {}
    g = torch.Generator().manual_seed(7)
    loss = (o.float() * dev(torch.randn(o.shape, generator=g))).sum() \
        + (f * dev(torch.randn(f.shape, generator=g))).sum()
    leaves = dict(x, **({"h0": h} if h is not None else {}))
    return o, f, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))



def decay_scale_errors(rule, inp, decay, u, g, scales):
    """∂ through a scale s of a decay input (decay = −s·u), triton in fp32 against the fp64 reference, for each s:
    [(s, relative error, the two gradients)]; loss Σ o ⊙ g. Strong decays (s ≫ 1) make the true ∂g_t ~ e^{g_t} tiny,
    where a reverse sum of per-token terms that cancel left ε·O(1) (the straddle tests)."""
    out = []
    for scale in scales:
        grads = {}
        for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
            s = torch.tensor(-float(scale), dtype=dtype, device=DEVICE, requires_grad=True)
            x = {n: dev(t).to(dtype) for n, t in inp.items()}
            x[decay] = s * dev(u).to(dtype)
            (rule.scan(backend=backend, **x)[0] * dev(g).to(dtype)).sum().backward()
            grads[backend] = float(s.grad)
        out.append((scale, abs(grads["triton"] - grads["reference"]) / abs(grads["reference"]), grads))
    return out

def compare(rule, inp, h0=None, cu_seqlens=None, grad=True, rtol=RTOL, state_rtol=STATE_RTOL, **scan_kw):
    """backend="triton" against the reference loop: o, final state, every gradient; returns triton's gradients."""
    o1, f1, g1 = run(rule, inp, h0, "reference", cu_seqlens, grad)
    o2, f2, g2 = run(rule, inp, h0, "triton", cu_seqlens, grad, **scan_kw)
    assert o2.dtype == o1.dtype and f2.dtype == torch.float32
    close_all((o1, f1, g1), (o2, f2, g2), rtol, state_rtol)
    return g2


def close_all(ref, got, rtol, state_rtol, check=close):
    """o, the final state and every gradient of got = (o, f, grads) against ref (same names, shapes and
    dtypes), each with check(a, b, tol, what)."""
    (o1, f1, g1), (o2, f2, g2) = ref, got
    check(o2, o1, rtol, "o")
    check(f2, f1, state_rtol, "final state")
    assert set(g1) == set(g2)
    for n in g1:
        assert g2[n].shape == g1[n].shape and g2[n].dtype == g1[n].dtype
        check(g2[n], g1[n], rtol, f"d{n}")


#: CHECKPOINT_STORAGE = "input" against "fp32" on the same bf16 inputs (compare_checkpoint_storage), relative to
#: max|fp32 run|. Only the stored copy of the state entering each chunk is rounded (≤ 2⁻⁸ relative per entry for
#: bf16, 2⁻¹¹ for fp16); it feeds o's inter-chunk term Γ ⊙ Q S₀ᵀ and the backward's recompute from S₀ (the
#: chunked kernels' S₀ terms, or the recurrent backward's states S_t rebuilt from the checkpoint). o and the
#: gradients are low-precision outputs, so the runs can also differ by one ulp of the largest entry (2⁻⁷ relative
#: for bf16) after a difference of a few 2⁻⁸-rounded terms: 2e-2 ≈ 5·2⁻⁸ (as STORAGE_RTOL). The final state does
#: not depend on the stored copy (every forward kernel carries its running state in fp32 registers): equal.
CHECKPOINT_RTOL = 2e-2


def compare_checkpoint_storage(rule, inp, h0, monkeypatch, dtype=torch.bfloat16, cu_seqlens=None, rtol=CHECKPOINT_RTOL):
    """Run the chunked forward on the same low-precision inputs with chunked.CHECKPOINT_STORAGE "fp32" and "input":
    check the checkpoints' dtype where the forward writes them and where the backward reads them (fp32 / dtype),
    that the final state is bit-identical and that o and every gradient agree (rtol, relative to the fp32 run's
    max). Returns the measured relative differences {what: err / scale}."""
    from olssm.kernels.triton import chunked as tchunk
    from olssm.kernels.triton import chunked_delta_bwd as tdelta
    from olssm.kernels.triton import library as tlib
    seen = {"fwd": [], "bwd": []}

    def watch(module, name, where, i):   # records the dtype of the i-th positional argument (ck)
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: seen[where].append(a[i].dtype) or real(*a, **k))

    watch(tchunk, "chunked_forward", "fwd", 5)           # (plan, chunk_in, h0, o, ht, ck, ...)
    watch(tchunk, "chunked_backward", "bwd", 2)          # (plan, chunk_in, ck, ...)
    watch(tdelta, "chunked_delta_backward", "bwd", 2)
    watch(tlib, "triton_scan_bwd", "bwd", 5)             # the recurrent backward on the chunked checkpoints
    low = {n: x.to(dtype) for n, x in inp.items()}
    monkeypatch.setattr(tchunk, "RAW_INPUTS", False)   # "fp32": every chunk tensor an fp32 copy (the same values)
    monkeypatch.delenv("OLSSM_TRITON_RAW_INPUTS", raising=False)
    res = {}
    for mode in ("fp32", "input"):
        monkeypatch.setattr(tchunk, "CHECKPOINT_STORAGE", mode)
        res[mode] = run(rule, low, h0, "triton", cu_seqlens)
    assert len(seen["fwd"]) == 2 and len(seen["bwd"]) == 2, f"the chunked forward / a backward did not run: {seen}"
    for where, dts in seen.items():
        assert dts == [torch.float32, dtype], (where, dts)
    (o1, f1, g1), (o2, f2, g2) = res["fp32"], res["input"]
    assert o2.dtype == o1.dtype == dtype and f2.dtype == f1.dtype == torch.float32
    assert torch.equal(f1, f2), "the final state must not depend on the stored checkpoints"
    rel = {}

    def check(a, b, tol, what):
        close(a, b, tol, f"CHECKPOINT_STORAGE input vs fp32: {what}")
        rel[what] = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()

    close_all((o1, f1, g1), (o2, f2, g2), rtol, 0.0, check)
    return rel


def spy(monkeypatch, module, name):
    """Counts the calls of module.name (still calling it): the list grows by one per call."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def spy_launches(monkeypatch, module, kernels, record):
    """Stand-ins for the Triton kernels module.<name> (kernels: {name: label}, or names as their own labels): each
    launch kernel[grid](*args, **kwargs) calls record(label, kwargs) first and runs inside the context manager
    that record returns (None: none)."""
    labels = kernels if isinstance(kernels, dict) else {n: n for n in kernels}

    class Launch:
        def __init__(self, kernel, label):
            self.kernel, self.label = kernel, label

        def __getitem__(self, grid):
            run = self.kernel[grid]

            def call(*args, **kwargs):
                ctx = record(self.label, kwargs)
                if ctx is None:
                    return run(*args, **kwargs)
                with ctx:
                    return run(*args, **kwargs)
            return call
    for name, label in labels.items():
        monkeypatch.setattr(module, name, Launch(getattr(module, name), label))


def separate_sequences_match(rule, inp, h0, cu):
    """A varlen triton scan (packed sequences cu, one initial state each) equals each sequence scanned
    on its own; an empty sequence keeps its initial state."""
    cu_t = dev(torch.tensor(cu, dtype=torch.int32))
    x = {n: dev(t) for n, t in inp.items()}
    o, f = rule.scan(backend="triton", output_final_state=True, initial_state=dev(h0), cu_seqlens=cu_t, **x)
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        part = {n: (t if rule.inputs[n].is_parameter else t[:, a:b]) for n, t in x.items()}
        if b == a:
            close(f[i], h0[i], 0, "empty sequence keeps its state")
            continue
        oi, fi = rule.scan(backend="triton", output_final_state=True, initial_state=dev(h0[i:i + 1]), **part)
        close(o[:, a:b], oi, RTOL, f"o of sequence {i}")
        close(f[i], fi[0], RTOL, f"state of sequence {i}")


#: CHUNK_STORAGE = "input" against "fp32" on the same bf16 inputs (compare_storage), relative to max|fp32 run|.
#: The only difference is the rounding of the evaluated entries (β·v, Δ·v, Longhorn's c and e, ...; q, k, v
#: themselves are bf16 already) to bf16, ≤ 2⁻⁸ relative each, and of the chunk tensors' gradients to bf16 inside
#: the op (which autograd does anyway, one step later, at the entry's bf16 cast). o and the gradients are bf16,
#: so two runs can also differ by one bf16 ulp of the largest entry (2⁻⁷ relative) after a difference of a few
#: 2⁻⁸-rounded terms: 2e-2 ≈ 5·2⁻⁸. The final state is fp32: a sum of O(T) terms, each perturbed by
#: ≤ 2⁻⁸, measured ≤ 2e-3 relative at T ≤ 43: 1e-2.
STORAGE_RTOL, STORAGE_STATE_RTOL = 2e-2, 1e-2


def compare_storage(rule, inp, h0, monkeypatch, dtype=torch.bfloat16, cu_seqlens=None, rtol=STORAGE_RTOL,
                    state_rtol=STORAGE_STATE_RTOL):
    """Run the chunked kernels on the same low-precision inputs with chunked.CHUNK_STORAGE "fp32" and "input":
    check the chunk tensors the forward kernels got (fp32 / dtype, the log decay fp32 always) and that o, the
    final state and every gradient agree (rtol, state_rtol: relative to the fp32 run's max). Returns the
    measured relative differences {what: err / scale}."""
    from olssm.kernels.triton import chunked as tchunk
    real = tchunk.chunked_forward
    seen = []
    monkeypatch.setattr(tchunk, "chunked_forward",
                        lambda plan, chunk_in, *a, **k: seen.append([x.dtype for x in chunk_in]) or
                        real(plan, chunk_in, *a, **k))
    low = {n: x.to(dtype) for n, x in inp.items()}
    monkeypatch.setattr(tchunk, "RAW_INPUTS", False)   # "fp32": every chunk tensor an fp32 copy (the same values)
    monkeypatch.setattr(tchunk, "SCALE_ON_LOAD", False)   # and β·v, Δ·v products, stored as the mode says
    for env in ("OLSSM_TRITON_RAW_INPUTS", "OLSSM_TRITON_SCALE_ON_LOAD"):
        monkeypatch.delenv(env, raising=False)
    res = {}
    for mode in ("fp32", "input"):
        monkeypatch.setattr(tchunk, "CHUNK_STORAGE", mode)
        res[mode] = run(rule, low, h0, "triton", cu_seqlens)
    assert len(seen) == 2, "the chunked forward did not run (twice)"
    for mode, dts in zip(("fp32", "input"), seen):
        want = [torch.float32 if mode == "fp32" or i == 3 else dtype for i in range(len(dts))]
        assert dts == want, (mode, dts)
    (o1, f1, g1), (o2, f2, g2) = res["fp32"], res["input"]
    assert o2.dtype == o1.dtype == dtype and f2.dtype == f1.dtype == torch.float32
    rel = {}

    def check(a, b, tol, what):
        close(a, b, tol, f"CHUNK_STORAGE input vs fp32: {what}")
        rel[what] = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()

    close_all((o1, f1, g1), (o2, f2, g2), rtol, state_rtol, check)
    return rel


def pin_fp32_storage(monkeypatch):
    """The chunked path's chunk tensors, checkpoints and the split delta forward's Ũ in fp32 (the knobs' defaults),
    whatever the environment says: tests that count or compare kernels rely on it."""
    from olssm.kernels.triton import chunked
    for knob in ("CHUNK_STORAGE", "CHECKPOINT_STORAGE", "DELTA_U_STORAGE"):
        monkeypatch.setattr(chunked, knob, "fp32")
        monkeypatch.delenv(f"OLSSM_TRITON_{knob}", raising=False)


def split_scan_matches(rule, inp, cut, rtol=RTOL):
    """backend="triton": scanning tokens [0, cut) and then [cut, T) from the first part's final state
    gives the whole scan's o and final state."""
    inp = {n: dev(x) for n, x in inp.items()}
    part = lambda a, b: {n: (x if rule.inputs[n].is_parameter else x[:, a:b]) for n, x in inp.items()}
    T = next(x.shape[1] for n, x in inp.items() if not rule.inputs[n].is_parameter)
    o, f = rule.scan(backend="triton", output_final_state=True, **inp)
    o1, f1 = rule.scan(backend="triton", output_final_state=True, **part(0, cut))
    o2, f2 = rule.scan(backend="triton", output_final_state=True, initial_state=f1, **part(cut, T))
    close(torch.cat([o1, o2], 1), o, rtol, "o (split)")
    close(f2, f, rtol, "final state (split)")


def elementwise_row_csum_rule():
    """An elementwise decay whose generator holds a row-kind key sum, exp(−Δ P / (1 + Σ_j P_ij k_j²)): the
    in-kernel chain rule must treat the sum as a row node (its adjoint a [BV, 1] tile; [BT, BV, 1] in the
    block scan). Used by the loop-kernel and the block-scan tests."""
    import sympy as sp

    import olssm
    from olssm import objectives as O
    S, Sp = O.states()
    k, v = O.key("k"), O.value("v")
    dt, P = O.row("dt", domain="timestep"), O.parameter("P", "matrix", positive=True)
    lam = sp.exp(-dt * P / (1 + O.csum(P * k ** 2)))
    rule = olssm.derive(O.Objective(O.sqnorm(S - lam * Sp) / 2 - O.inner(S @ k, v)))
    assert rule.decay_kind == "elementwise"
    return rule


def benchmark_module(name):
    """benchmarks/<name>.py imported as a module (the benchmark scripts are not a package)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"olssm_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_interpreted_script(name, args, timeout, **env):
    """benchmarks/<name>.py in a fresh process under the interpreter, with interpreter_patch installed there as here
    (env: extra variables). Returns the CompletedProcess (text output)."""
    import pathlib
    import subprocess
    import sys
    tests = pathlib.Path(__file__).parent
    path = os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])
    boot = ("import os, runpy, sys, interpreter_patch; os.environ.get('OLSSM_NO_INTERPRETER_PATCH') or "
            "interpreter_patch.install(); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", boot, str(tests.parent / "benchmarks" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path, **env))
