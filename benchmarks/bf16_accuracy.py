"""bf16 dot operands (fla's precision) against the default ("auto": fp32 products for bf16 inputs under the
interpreter, tf32 compiled) on the split diagonal path: o's and every gradient's error against the fp64 reference on
the same bf16 inputs, relative to max |reference| per tensor. Both triton rows return bf16 o and gradients, so ~2e-3
to 6e-3 is their rounding floor; what bf16 operands add shows as the difference between the rows.

    python benchmarks/bf16_accuracy.py mamba2 gla            # CPU: the Triton interpreter (minutes)
    OLSSM_TRITON_DEVICE=cuda python benchmarks/bf16_accuracy.py mamba2 gla
"""
import argparse
import os
import sys

if os.environ.get("OLSSM_TRITON_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from olssm.catalogue import ENTRIES, random_inputs  # noqa: E402
from olssm.kernels.triton import library  # noqa: E402


def errors(name, B, T, H, d_k, d_v, device):
    rule = ENTRIES[name].rule.with_log_decays()
    inp = {n: t.to(torch.bfloat16) for n, t in random_inputs(rule, B, T, H, d_k, d_v, seed=3).items()}
    g = torch.randn(B, T, H, d_v, generator=torch.Generator().manual_seed(1))
    res = {}
    for label, prec, backend, dtype, dev in (("reference", None, "reference", torch.float64, "cpu"),
                                             ("auto", "auto", "triton", None, device),
                                             ("bf16", "bf16", "triton", None, device)):
        if prec:
            os.environ["OLSSM_TRITON_DOT_PRECISION"] = prec
        x = {n: (t.to(dtype) if dtype else t).to(dev).clone().requires_grad_() for n, t in inp.items()}
        o, _ = rule.scan(backend=backend, **x)
        (o.double() * g.to(dev).double()).sum().backward()
        res[label] = {"o": o.double().cpu(), **{n: t.grad.double().cpu() for n, t in x.items()}}
    os.environ.pop("OLSSM_TRITON_DOT_PRECISION", None)
    ref = res["reference"]
    return {label: {n: ((res[label][n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref}
            for label in ("auto", "bf16")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rules", nargs="+")
    p.add_argument("--shape", type=int, nargs=5, default=(1, 256, 2, 72, 16), metavar=("B", "T", "H", "DK", "DV"))
    a = p.parse_args()
    device = os.environ.get("OLSSM_TRITON_DEVICE", "cpu")
    library.FORCE = "prefer-chunk"
    os.environ["OLSSM_TRITON_DIAG_PATH"] = "split"
    print(f"(B, T, H, d_k, d_v) = {tuple(a.shape)}, bf16 inputs, split diagonal path, device {device}")
    print("| rule | dots | " + " | ".join(["o", "inputs' gradients (max error / max |ref|)"]) + " |")
    print("|---|---|---|---|")
    for name in a.rules:
        for label, errs in errors(name, *a.shape, device).items():
            grads = ", ".join(f"{n} {v:.1e}" for n, v in errs.items() if n != "o")
            print(f"| {name} | {label} | {errs['o']:.1e} | {grads} |", flush=True)


if __name__ == "__main__":
    main()
