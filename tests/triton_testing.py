"""Shared by the Triton test modules: the device they run on and the tolerance check.

Importing this first sets TRITON_INTERPRET=1 (it must be set before triton is imported) unless
OLSSM_TRITON_DEVICE=cuda asks for the compiled kernels on a GPU.
"""
import os

DEVICE = os.environ.get("OLSSM_TRITON_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

#: absolute slack of every comparison (for entries near zero)
ABS = 1e-6


def dev(x):
    return x.to(DEVICE)


def close(a, b, rtol, what):
    """max|a − b| <= rtol·max|b| + ABS, and a finite."""
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    assert err <= rtol * scale + ABS, f"{what}: max abs error {err:.3g} vs scale {scale:.3g} (rtol {rtol})"
