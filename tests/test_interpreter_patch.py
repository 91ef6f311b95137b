"""tests/interpreter_patch.py, which speeds up Triton's CPU interpreter for the test run, changes no value: the
chunked kernels of a delta rule and a diagonal rule (forward, backward, final state), run with it and without it,
agree bit for bit, and with it the per-helper re-patching is skipped, which is where the time went."""
from triton_testing import DEVICE, run  # (sets TRITON_INTERPRET first, installs the patch)

import pytest  # noqa: E402
import torch  # noqa: E402

import interpreter_patch  # noqa: E402
from olssm.catalogue import ENTRIES, random_inputs  # noqa: E402
from olssm.kernels.triton import library as tlib  # noqa: E402


@pytest.mark.skipif(DEVICE != "cpu", reason="patches the CPU interpreter")
@pytest.mark.parametrize("name", ["deltanet", "gla"])
def test_patched_interpreter_computes_the_same_bits(name, monkeypatch):
    was_installed = interpreter_patch.installed()     # (not under OLSSM_NO_INTERPRETER_PATCH=1)
    if not was_installed and not interpreter_patch.install():
        pytest.skip("this Triton's interpreter lacks the internals interpreter_patch replaces")
    monkeypatch.setattr(tlib, "FORCE", "chunk")
    rule = ENTRIES[name].rule
    inp = random_inputs(rule, 1, 37, 2, 8, 8, seed=5)
    h0 = 0.3 * torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    before = dict(interpreter_patch.COUNTS)
    fast = run(rule, inp, h0, "triton", chunk_size=16)
    real = interpreter_patch.COUNTS["real_patches"] - before["real_patches"]
    skipped = interpreter_patch.COUNTS["skipped_patches"] - before["skipped_patches"]
    interpreter_patch.uninstall()
    try:
        slow = run(rule, inp, h0, "triton", chunk_size=16)
    finally:
        if was_installed:
            interpreter_patch.install()
    # every launch patches once (twice where tl.standard's helpers see tl.core); the helpers' calls are skipped
    assert real > 0 and skipped > 5 * real, (real, skipped)
    (o1, f1, g1), (o2, f2, g2) = fast, slow
    assert torch.equal(o1, o2) and torch.equal(f1, f2)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)
