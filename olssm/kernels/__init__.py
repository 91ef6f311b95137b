"""Lowering: run a Rule over sequences (reference loop, chunk-parallel torch, generated Triton)."""
from .api import BACKENDS, ScanArgs, auto_backend, check_scan_args, expand_heads, kernel_source, scan

__all__ = ["scan", "kernel_source", "check_scan_args", "expand_heads", "auto_backend", "ScanArgs", "BACKENDS"]
