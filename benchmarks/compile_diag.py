"""Which side is wrong when torch.compile's gradients differ from eager ones (session 14's H100 run:
test_torch_compile_matches_eager[mamba2-33] and test_opcheck_and_torch_compile[deltanet-*], fp32, under those test
files' settings: chunks of 16 and the chunked kernels at any precision; ∂Δ of one head off by its own size; the
same cases with the chunked backward forced on passed, as did Gated DeltaNet and Mamba).

For each case, every input's gradient of one loss through backend="triton": eager (twice: is it deterministic?),
torch.compile with backend "eager" (dynamo alone) and "aot_eager" (dynamo + AOT autograd), and aot_eager with β·v's
backward as torch passes (OLSSM_TRITON_FUSED_SCALE_BWD=0), each against the reference loop in fp64 on the CPU (the
oracle), with the launch configuration each run took (library.run_config's cfg). The cause of session 14's wrong
gradients was found after the lease, on the CPU under torch 2.11 (chunked._Scaled's out= forward, traced by that
torch's dynamo); this confirms the mend on the GPU.

    python benchmarks/compile_diag.py [--cases mamba2:33:chunked,deltanet:20:delta,...]

A case is rule:T:settings, the settings those of a test file (module attributes set for the case, then restored):
  chunked   test_triton_chunked.py's: CHUNK 16, CHECKPOINT 4, the chunked kernels wherever the structure allows
  forced    the same with FORCE "chunk" and CHUNK_BACKWARD True (session 14: these passed)
  delta     test_triton_delta_bwd.py's: CHUNK 16, FORCE "chunk", the chunked delta and row-c backwards
  policy    the library's own defaults
Runs on a GPU or under TRITON_INTERPRET=1 (the CPU's baseline: every row ~1e-7).
"""
import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from olssm.catalogue import ENTRIES, random_inputs  # noqa: E402
from olssm.kernels.triton import chunked_delta_bwd as tdelta  # noqa: E402
from olssm.kernels.triton import library as tlib  # noqa: E402
from olssm.kernels.triton import scan as tscan  # noqa: E402

_CHUNKED = [(tlib, "CHUNK", 16), (tscan, "CHECKPOINT", 4), (tlib, "FORCE", None),
            (tlib, "_chunk_pays", lambda plan, args: True)]
SETTINGS = {
    "chunked": _CHUNKED,
    "forced": _CHUNKED + [(tlib, "FORCE", "chunk"), (tlib, "CHUNK_BACKWARD", True)],
    "delta": [(tlib, "CHUNK", 16), (tlib, "FORCE", "chunk"), (tdelta, "DELTA_BACKWARD", "chunk"),
              (tdelta, "ROW_C_BACKWARD", "chunk"), (tlib, "_chunk_pays", lambda plan, args: True)],
    "policy": [],
}


@contextlib.contextmanager
def settings(name, env=None):
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in SETTINGS[name]]
    old_env = {k: os.environ.get(k) for k in (env or {})}
    try:
        for mod, attr, value in SETTINGS[name]:
            setattr(mod, attr, value)
        os.environ.update(env or {})
        yield
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    p.add_argument("--cases", default="mamba2:33:chunked,mamba2:33:forced,deltanet:20:delta,deltanet:20:policy,"
                                      "gated_deltanet:33:chunked,mamba:6:chunked")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") else "cpu"
    if dev == "cuda":
        from olssm.kernels.triton import toolchain
        toolchain.check(torch.device("cuda"))
    configs = []
    real = tlib.run_config
    tlib.run_config = lambda plan, args, meta, cfg, need: configs.append(cfg) or real(plan, args, meta, cfg, need)
    print(f"device {dev}, torch {torch.__version__}; max |g − g_ref| / max |g_ref| per input (reference: fp64, CPU)")
    print("| case | run | kernel | per-input relative error |")
    print("|---|---|---|---|")
    for case in a.cases.split(","):
        name, T, setting = case.split(":")
        rule = ENTRIES[name].rule
        inp = random_inputs(rule, 1, int(T), 2, 4, 4, seed=8)
        h0 = 0.3 * torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(8))
        ref = grads(loss_of(rule, "reference"), h0, inp, "cpu", torch.float64)
        runs = [("eager", loss_of(rule, "triton"), None), ("eager again", loss_of(rule, "triton"), None)]
        for backend in ("eager", "aot_eager"):
            runs.append((f"compile {backend}", backend, None))
        runs.append(("compile aot_eager, β·v backward in torch", "aot_eager",
                     {"OLSSM_TRITON_FUSED_SCALE_BWD": "0"}))
        for label, fn, env in runs:
            configs.clear()
            with settings(setting, env):
                if isinstance(fn, str):
                    torch._dynamo.reset()
                    fn = torch.compile(loss_of(rule, "triton"), backend=fn)
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
