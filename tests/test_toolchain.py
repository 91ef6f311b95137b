"""The ptxas check at the first launch on a CUDA device (olssm/kernels/triton/toolchain.py), with the device,
Triton's assembler and the machine's other assemblers faked: which assembler compiles the kernels, and what the
user is told, per policy. Runs without a GPU."""
import os
import stat
import warnings

import pytest
import torch

from olssm.kernels.triton import scan as tscan
from olssm.kernels.triton import toolchain as tc

BUNDLED, TOOLKIT, OLD_TOOLKIT = "/triton/bin/ptxas", "/usr/local/cuda/bin/ptxas", "/usr/local/cuda-12.4/bin/ptxas"
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def machine(monkeypatch):
    """A Hopper GPU whose Triton bundles ptxas 12.8, with a CUDA 13.0 and a 12.4 toolkit installed; TRITON_PTXAS_PATH
    unset (restored after the test); returns the list of times Triton's cached assembler version was forgotten."""
    releases = {BUNDLED: (12, 8), TOOLKIT: (13, 0), OLD_TOOLKIT: (12, 4)}
    monkeypatch.setattr(tc, "_CHECKED", {})
    monkeypatch.setattr(tc, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(tc, "triton_ptxas", lambda arch=90: os.environ.get("TRITON_PTXAS_PATH") or BUNDLED)
    monkeypatch.setattr(tc, "assembler_variable", lambda arch=90: "TRITON_PTXAS_PATH")
    monkeypatch.setattr(tc, "release_of", lambda path: releases.get(path))
    monkeypatch.setattr(tc, "candidates", lambda: [OLD_TOOLKIT, TOOLKIT])
    forgotten = []
    monkeypatch.setattr(tc, "_forget_assembler_version", lambda: forgotten.append(1))
    monkeypatch.setenv("TRITON_PTXAS_PATH", "x")   # recorded as unset: restored so after the test
    monkeypatch.delenv("TRITON_PTXAS_PATH")
    monkeypatch.delenv("OLSSM_TRITON_PTXAS", raising=False)
    monkeypatch.setattr(tc, "PTXAS_POLICY", "auto")
    return releases, forgotten


def test_auto_switches_hopper_to_the_newest_good_assembler_once(machine):
    _, forgotten = machine
    with pytest.warns(tc.AssemblerWarning, match=r"ptxas 12\.8.*Switched Triton to ptxas 13\.0"):
        report = tc.check(CUDA0)
    assert os.environ["TRITON_PTXAS_PATH"] == TOOLKIT and forgotten == [1]
    assert report["switched_from"] == BUNDLED and report["release"] == (13, 0)
    assert "13.0" in tc.ptxas_report(CUDA0) and "switched" in tc.ptxas_report(CUDA0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the second launch neither warns nor looks again
        assert tc.check(CUDA0) is report


def test_auto_warns_when_no_good_assembler_is_found(machine, monkeypatch):
    monkeypatch.setattr(tc, "candidates", lambda: [OLD_TOOLKIT])
    with pytest.warns(tc.AssemblerWarning, match=r"no ptxas of release >= 13\.0 was found; results may be wrong.*"
                                            r"TRITON_PTXAS_PATH"):
        tc.check(CUDA0)
    assert "TRITON_PTXAS_PATH" not in os.environ


def test_strict_raises_each_launch_without_a_good_assembler(machine, monkeypatch):
    monkeypatch.setattr(tc, "candidates", lambda: [])
    monkeypatch.setenv("OLSSM_TRITON_PTXAS", "strict")
    for _ in range(2):   # not remembered as checked: every launch refuses
        with pytest.raises(RuntimeError, match=r"ptxas 12\.8.*no ptxas of release >= 13\.0"):
            tc.check(CUDA0)


def test_the_users_own_assembler_is_kept_and_judged(machine, monkeypatch):
    monkeypatch.setenv("TRITON_PTXAS_PATH", OLD_TOOLKIT)
    with pytest.warns(tc.AssemblerWarning, match=r"ptxas 12\.4.*TRITON_PTXAS_PATH chose it"):
        tc.check(CUDA0)
    assert os.environ["TRITON_PTXAS_PATH"] == OLD_TOOLKIT
    monkeypatch.setattr(tc, "_CHECKED", {})
    monkeypatch.setenv("OLSSM_TRITON_PTXAS", "strict")
    with pytest.raises(RuntimeError, match="TRITON_PTXAS_PATH chose it"):
        tc.check(CUDA0)
    monkeypatch.setattr(tc, "_CHECKED", {})
    monkeypatch.setenv("TRITON_PTXAS_PATH", TOOLKIT)   # a good choice: nothing to say, even strict
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tc.check(CUDA0)["release"] == (13, 0)


@pytest.mark.parametrize("capability, bundled", [((8, 0), (12, 8)), ((10, 0), (12, 8)), ((9, 0), (13, 1))])
def test_nothing_happens_off_hopper_or_with_a_good_bundled_assembler(machine, monkeypatch, capability, bundled):
    releases, forgotten = machine
    releases[BUNDLED] = bundled
    monkeypatch.setattr(tc, "_capability", lambda device: capability)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tc.check(CUDA0)
    assert "TRITON_PTXAS_PATH" not in os.environ and not forgotten


def test_keep_does_not_look(machine, monkeypatch):
    monkeypatch.setattr(tc, "PTXAS_POLICY", "keep")
    monkeypatch.setattr(tc, "_capability", lambda device: pytest.fail("keep queried the device"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tc.check(CUDA0)
    assert "TRITON_PTXAS_PATH" not in os.environ


def test_a_bad_policy_names_the_variable(machine, monkeypatch):
    monkeypatch.setenv("OLSSM_TRITON_PTXAS", "newest")
    with pytest.raises(ValueError, match="OLSSM_TRITON_PTXAS.*'newest'"):
        tc.check(CUDA0)


def _fake_ptxas(directory, release):
    fake = directory / "ptxas"
    fake.write_text("#!/bin/sh\necho 'ptxas: NVIDIA (R) Ptx optimizing assembler'\n"
                    f"echo 'Cuda compilation tools, release {release}, V{release}.93'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return fake


def test_release_of_reads_the_version_line(tmp_path):
    assert tc.release_of(str(_fake_ptxas(tmp_path, "12.8"))) == (12, 8)
    assert tc.release_of(str(tmp_path / "missing")) is None


def test_the_variable_set_redirects_the_installed_tritons_assembler_for_hopper(tmp_path, monkeypatch):
    # the real Triton: the variable check() would set is the one that changes what sm_90 code is assembled with
    # (Triton 3.6: TRITON_PTXAS_PATH; 3.9: TRITON_PTXAS_BLACKWELL_PATH, its ptxas-blackwell serving sm_90 and up)
    pytest.importorskip("triton.backends.nvidia.compiler")
    before = tc.triton_ptxas(90)
    assert before and tc.release_of(before) is not None
    variable = tc.assembler_variable(90)
    fake = _fake_ptxas(tmp_path, "13.0")
    monkeypatch.setenv(variable, str(fake))
    assert tc.triton_ptxas(90) == str(fake)


def test_every_cuda_launch_goes_through_the_check(monkeypatch):
    seen = []
    monkeypatch.setattr(tc, "check", lambda device: seen.append(device))
    tscan._check_device(CUDA0)
    assert seen == [CUDA0]
