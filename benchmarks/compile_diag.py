"""Which side is wrong when torch.compile's gradients differ from eager ones (session 14's H100 run: Mamba-2 at T = 33
and DeltaNet at T = 20, fp32, through the policy's recurrent kernel; ∂Δ of one head off by its own size).

For each case, every input's gradient of one loss, through backend="triton" eager (twice: is it deterministic?),
torch.compile with backend "eager" (dynamo alone) and "aot_eager" (dynamo + AOT autograd), each against the reference
loop in fp64 on the CPU (the oracle). Also which launch configuration each run took (library.run_config's cfg).

    python benchmarks/compile_diag.py [--cases mamba2:33,deltanet:20,gated_deltanet:33,mamba:6]

Runs on a GPU or under TRITON_INTERPRET=1 (where it is the CPU's baseline: every row should be ~1e-7).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from olssm.catalogue import ENTRIES, random_inputs  # noqa: E402
from olssm.kernels.triton import library as tlib  # noqa: E402


def loss_of(rule, backend):
    def fn(h0, inp):
        o, f = rule.scan(backend=backend, initial_state=h0, output_final_state=True, **inp)
        return (o * o).sum() + (f * torch.arange(f.numel(), device=f.device).reshape(f.shape)).sum() * 1e-2
    return fn


def grads(fn, h0, inp, device, dtype):
    x = {n: t.to(device, dtype).clone().requires_grad_() for n, t in inp.items()}
    h = h0.to(device, dtype).clone().requires_grad_()
    loss = fn(h, x)
    return dict(zip(["h0", *x], (g.double().cpu() for g in torch.autograd.grad(loss, [h, *x.values()]))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="mamba2:33,deltanet:20,gated_deltanet:33,mamba:6")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") else "cpu"
    if dev == "cuda":
        from olssm.kernels.triton import toolchain
        toolchain.check(torch.device("cuda"))
    configs = []
    real = tlib.run_config
    tlib.run_config = lambda plan, args, meta, cfg, need: configs.append(cfg) or real(plan, args, meta, cfg, need)
    print(f"device {dev}, torch {torch.__version__}; max |g − g_ref| / max |g_ref| per input (reference: fp64, CPU)")
    print("| case | run | kernel | " + "per-input relative error |")
    print("|---|---|---|---|")
    for case in a.cases.split(","):
        name, T = case.split(":")
        rule = ENTRIES[name].rule
        inp = random_inputs(rule, 1, int(T), 2, 4, 4, seed=8)
        h0 = 0.3 * torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(8))
        ref = grads(loss_of(rule, "reference"), h0, inp, "cpu", torch.float64)
        runs = [("eager", loss_of(rule, "triton")), ("eager again", loss_of(rule, "triton"))]
        for backend in ("eager", "aot_eager"):
            torch._dynamo.reset()
            runs.append((f"compile {backend}", torch.compile(loss_of(rule, "triton"), backend=backend)))
        for label, fn in runs:
            configs.clear()
            try:
                g = grads(fn, h0, inp, dev, torch.float32)
            except Exception as e:   # noqa: BLE001 - a diagnostic: print and go on
                print(f"| {case} | {label} | — | {type(e).__name__}: {str(e)[:80]} |")
                continue
            errs = ", ".join(f"{n} {(g[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30):.1e}"
                             for n in ref)
            cfg = (f"{configs[0].kernel} bv={configs[0].block_v} w={configs[0].warps}" if configs else "?")
            print(f"| {case} | {label} | {cfg} | {errs} |", flush=True)


if __name__ == "__main__":
    main()
