"""Which ptxas assembles olssm's kernels on Hopper GPUs.

Triton lowers a kernel to PTX and hands it to ptxas, by default a copy its wheel bundles. Which copy depends on the
Triton release: 3.6.0 assembles sm_90 with its `ptxas`, CUDA 12.8.93 (TRITON_PTXAS_PATH overrides); 3.9.0 with its
`ptxas-blackwell`, CUDA 13.4 (TRITON_PTXAS_BLACKWELL_PATH overrides; its 12.9 `ptxas` serves older GPUs). On an H100
(session 11, Triton 3.6.0, benchmarks/logs/2026-11-26-h100-s11) ptxas 12.8.93 turned correct PTX of the chunked
delta-rule kernels into wrong machine code at some shapes:

- DeltaNet, bf16 inputs, d_k = 72, d_v = 8 (value tiles of 16): o wrong by 110 % of its scale, or an illegal
  memory access in chunk_delta_out_kernel, varying from run to run (the same at d_k = 128, T = 128, H = 4);
- bf16 chunk tensors on packed sequences: compute-sanitizer's "out-of-range shared or local address" at a bf16
  tl.dot of chunk_delta_bwd_state_kernel; NaN in o at d_v = 32 and 64;
- wider value tiles (d_v = 32, 64) of the first case, and every D = 128 benchmark shape, were right.

The same PTX assembled by the system's ptxas 13.0.88 (TRITON_PTXAS_PATH) gave errors of 3.6e-3 to 6.4e-3 against
the fp32 reference (bf16 rounding), and the compiled test suite passed. flash-linear-attention reports the same
assembler producing wrong results and invalid shared-memory writes in its Hopper state kernels (its PR #1262).
The interpreter cannot see this, and nor can a test on a machine without the GPU: hence a check at the first
launch on each device.

PTXAS_POLICY (env OLSSM_TRITON_PTXAS overrides; read at the first launch on each device):

- "auto": on a Hopper device (compute capability 9.x) whose Triton assembler is a release below GOOD_RELEASE and
  that the user did not choose (the variable that picks it unset), point Triton at the newest ptxas of release
  ≥ GOOD_RELEASE found on the machine (a CUDA toolkit, PATH, pip's nvidia compiler wheels) and warn once that it
  did. This sets the variable for the whole process, so the user's own Triton kernels compiled afterwards get that
  assembler too: the bundled one is the defective part. With none found: warn, naming the fix.
- "strict": as "auto", but raise instead of warning when the kernels would be assembled by a release below
  GOOD_RELEASE on Hopper (the user's own choice included).
- "keep": leave Triton's choice alone, silently.

Triton 3.9's 13.4 passes the check; it has not run on a GPU here.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import warnings
from typing import Optional

class AssemblerWarning(RuntimeWarning):
    """The kernels are (or would have been) assembled by a ptxas known to miscompile them on this GPU."""


PTXAS_POLICY = "auto"
POLICIES = ("auto", "strict", "keep")
#: the oldest ptxas release whose code for these kernels was right on an H100 (13.0.88, session 11)
GOOD_RELEASE = (13, 0)

_CHECKED: dict = {}   # device index -> what the check found (ptxas_report)


def policy() -> str:
    from .chunked import switch
    return switch("OLSSM_TRITON_PTXAS", PTXAS_POLICY, POLICIES, "ptxas policy (OLSSM_TRITON_PTXAS)")


def release_of(path: str) -> Optional[tuple]:
    """(major, minor) of the ptxas at path, from its --version; None if it does not run."""
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def triton_ptxas(arch: int = 90) -> Optional[str]:
    """The path of the ptxas Triton would assemble for sm_<arch> with now (its override variable if set and the
    binary runs, else the bundled copy)."""
    try:
        from triton.backends.nvidia import compiler as nvc
        return nvc.get_ptxas(arch).path
    except Exception:   # a Triton without get_ptxas (< 3.4): the bundled ptxas beside the backend
        pass
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    return path if os.path.exists(path) else None


def assembler_variable(arch: int = 90) -> str:
    """The environment variable that picks Triton's ptxas for sm_<arch>: TRITON_PTXAS_PATH (Triton 3.6 at sm_90) or
    TRITON_PTXAS_BLACKWELL_PATH (3.9 assembles sm_90 and newer with its ptxas-blackwell)."""
    try:
        from triton import knobs
        from triton.backends.nvidia import compiler as nvc
        used = nvc.get_ptxas(arch).path
        for name in ("ptxas", "ptxas_blackwell"):
            knob = type(knobs.nvidia).__dict__.get(name)
            if knob is not None and getattr(knobs.nvidia, name).path == used:
                return knob.key
    except Exception:
        pass
    return "TRITON_PTXAS_PATH"


def candidates() -> list:
    """ptxas binaries on this machine other than Triton's own: CUDA toolkits, PATH, pip's nvidia compiler wheels."""
    paths = [os.path.join(os.environ[v], "bin", "ptxas") for v in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT")
             if os.environ.get(v)]
    paths += ["/usr/local/cuda/bin/ptxas", *sorted(glob.glob("/usr/local/cuda-*/bin/ptxas"))]
    on_path = shutil.which("ptxas")
    if on_path:
        paths.append(on_path)
    try:
        import nvidia   # nvidia-cuda-nvcc-cu12 (nvidia/cuda_nvcc/bin), the CUDA 13 wheels (nvidia/cu13/bin)
        for root in getattr(nvidia, "__path__", []):
            paths += sorted(glob.glob(os.path.join(root, "*", "bin", "ptxas")))
    except ImportError:
        pass
    seen, out = set(), []
    for p in paths:
        real = os.path.realpath(p)
        if real not in seen and os.path.isfile(real) and os.access(real, os.X_OK):
            seen.add(real)
            out.append(p)
    return out


def _capability(device) -> tuple:
    import torch
    return torch.cuda.get_device_capability(device)


def _forget_assembler_version():
    """Triton keys its kernel cache by the ptxas version, read once per process (lru_cache): forget it, so that
    kernels assembled by the new ptxas are cached under their own key and none assembled by the old one is
    reused."""
    try:
        from triton.backends.nvidia import compiler as nvc
    except Exception:
        return
    for fn in (getattr(nvc, "get_ptxas_version", None), getattr(getattr(nvc, "CUDABackend", None), "hash", None)):
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


def _fix_text(variable):
    return ("install a CUDA toolkit of release >= {}.{} (or `pip install nvidia-cuda-nvcc`) and set {} to its "
            "bin/ptxas, or upgrade Triton (3.9 assembles Hopper code with ptxas 13.4); OLSSM_TRITON_PTXAS=keep "
            "silences this".format(*GOOD_RELEASE, variable))


def check(device) -> dict:
    """At the first launch on a CUDA device: make sure a ptxas known to assemble these kernels correctly on Hopper
    is in use, per policy() (module docstring). Returns (and remembers) what it found; a refusal (strict) is not
    remembered, so every launch refuses."""
    index = getattr(device, "index", None)
    index = 0 if index is None else index
    if index not in _CHECKED:
        _CHECKED[index] = _judge(device, policy())
    return _CHECKED[index]


def _judge(device, mode) -> dict:
    report = {"policy": mode, "capability": None, "ptxas": None, "release": None, "switched_from": None}
    if mode == "keep":
        return report
    report["capability"] = _capability(device)
    if report["capability"][0] != 9:
        return report
    arch = 10 * report["capability"][0] + report["capability"][1]
    variable = assembler_variable(arch)
    current = triton_ptxas(arch)
    report["ptxas"], report["release"] = current, (release_of(current) if current else None)
    if report["release"] is None or report["release"] >= GOOD_RELEASE:
        return report
    bad = "ptxas {}.{} ({})".format(*report["release"], current)
    why = (f"olssm: Triton assembles kernels for this Hopper GPU with {bad}; ptxas 12.8 produced wrong results and "
           "illegal memory accesses in olssm's chunked kernels on an H100 (olssm/kernels/triton/toolchain.py)")
    if os.environ.get(variable):   # the user's own choice: not overridden
        if mode == "strict":
            raise RuntimeError(f"{why}. {variable} chose it; {_fix_text(variable)}")
        warnings.warn(f"{why}. {variable} chose it; {_fix_text(variable)}", AssemblerWarning, stacklevel=4)
        return report
    good = [(r, p) for p in candidates() for r in [release_of(p)] if r is not None and r >= GOOD_RELEASE]
    if good:
        release, path = max(good, key=lambda rp: rp[0])
        os.environ[variable] = path
        _forget_assembler_version()
        report.update(ptxas=path, release=release, switched_from=current)
        warnings.warn(f"{why}. Switched Triton to ptxas {release[0]}.{release[1]} ({path}) for this process "
                      f"({variable}; OLSSM_TRITON_PTXAS=keep to leave Triton's choice alone)",
                      AssemblerWarning, stacklevel=4)
        return report
    if mode == "strict":
        raise RuntimeError(f"{why}, and no ptxas of release >= {GOOD_RELEASE[0]}.{GOOD_RELEASE[1]} was found: "
                           f"{_fix_text(variable)}")
    warnings.warn(f"{why}, and no ptxas of release >= {GOOD_RELEASE[0]}.{GOOD_RELEASE[1]} was found; results may "
                  f"be wrong: {_fix_text(variable)}", AssemblerWarning, stacklevel=4)
    return report


def ptxas_report(device=None) -> str:
    """One line for benchmark headers: the assembler that compiled olssm's kernels on device (after check)."""
    index = 0 if device is None or getattr(device, "index", None) is None else device.index
    r = _CHECKED.get(index)
    if not r or not r.get("ptxas"):
        path = triton_ptxas()
        rel = release_of(path) if path else None
        return f"ptxas {rel[0]}.{rel[1]}" if rel else "ptxas ?"
    text = "ptxas {}.{}".format(*r["release"]) if r["release"] else "ptxas ?"
    return text + (" (switched from Triton's bundled copy)" if r["switched_from"] else "")
