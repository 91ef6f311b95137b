"""backend="triton": fused recurrent kernels generated from a Rule's normal form (see TRITON.md).

    triton_scan(args)      forward + backward (torch.library custom ops), CUDA or TRITON_INTERPRET=1
    triton_decode(rule, S, **inputs)  one token with the same kernel (T = 1), for decoding on CUDA
    kernel_source(rule)    the generated Triton module source (forward and backward kernels)

The scan runs through the torch.library ops olssm::triton_scan_fwd / _bwd (library.py, for
torch.compile); chunked kernels for the diagonal-decay and delta-rule families live in chunked.py.
"""
from .printer import TritonPrinter
from . import library  # noqa: F401  (registers the olssm::triton_scan_* custom ops)
from .scan import cache_dir, kernel_source, triton_decode, triton_scan

__all__ = ["triton_scan", "triton_decode", "kernel_source", "TritonPrinter", "cache_dir"]
