"""Benchmark backend="triton" (recurrent vs chunked kernels) against the torch chunk backend, on CUDA.

    python benchmarks/triton_kernels.py [--B 4] [--T 2048] [--H 8] [--dk 64] [--dv 64] [--rules a,b,...]

Prints the forward and forward+backward time (ms, median of CUDA-event timings) per rule and
kernel, and the largest relative error of o against the torch chunk backend. Not meant for the
CPU interpreter (use tests/test_triton_chunked.py there).
"""
from __future__ import annotations

import argparse

import torch

from olssm.catalogue import ENTRIES, random_inputs
from olssm.kernels.triton import library


def _time(fn, reps=10):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--dk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--precision", default="ieee", help="chunked kernels' tl.dot precision: ieee, tf32, tf32x3")
    p.add_argument("--chunk", type=int, default=library.CHUNK)
    p.add_argument("--rules", default="linear_attention,retnet,mamba2,gla,deltanet,gated_deltanet,longhorn,mamba")
    a = p.parse_args(argv)
    dev = "cuda"
    from . import chunked
    chunked.DOT_PRECISION = a.precision
    library.CHUNK = a.chunk
    print(f"B={a.B} T={a.T} H={a.H} d_k={a.dk} d_v={a.dv} chunk={library.CHUNK} dot={a.precision} on {torch.cuda.get_device_name()}")
    print(f"{'rule':18s} {'kernel':10s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'rel err o':>10s}")
    for name in a.rules.split(","):
        rule = ENTRIES[name].rule
        inp = {n: x.to(dev) for n, x in random_inputs(rule, a.B, a.T, a.H, a.dk, a.dv, seed=0).items()}
        with torch.no_grad():
            ref, _ = rule.scan(backend="chunk", **inp)
        for kernel in ("recurrent", "chunk", "torch-chunk"):
            backend = "chunk" if kernel == "torch-chunk" else "triton"
            library.FORCE = None if kernel == "torch-chunk" else kernel
            try:
                with torch.no_grad():
                    o, _ = rule.scan(backend=backend, **inp)
                x = {n: t.clone().requires_grad_() for n, t in inp.items()}

                def fwd():
                    with torch.no_grad():
                        rule.scan(backend=backend, **inp)

                def fwdbwd():
                    out, _ = rule.scan(backend=backend, **x)
                    out.float().sum().backward()

                tf, tb = _time(fwd), _time(fwdbwd)
                err = float((o.float() - ref.float()).abs().max() / ref.float().abs().max())
                print(f"{name:18s} {kernel:10s} {tf:9.2f} {tb:11.2f} {err:10.2e}")
            except NotImplementedError as e:
                print(f"{name:18s} {kernel:10s} {'-':>9s} {'-':>11s}   ({str(e)[:60]})")
    library.FORCE = None


if __name__ == "__main__":
    main()
