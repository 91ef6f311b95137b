"""Host time of one backend="triton" call with every kernel launch stubbed out, on the CPU.

On a GPU a scan call is host-bound when its Python (argument checks, the plan, coefficient evaluation,
torch.library dispatch, autograd) takes longer than its kernels: at (4, 2048, 16, 64) bf16 the chunked
forwards take 0.35-2 ms on an H200 (RESULTS.md, session 7): the short ones are within a few times this overhead. Kernel
launches are replaced by a no-op (Triton's own launch cost, ~20-40 us each, is not counted; the launch
count is printed), so the figure is olssm's own host time, measurable without a GPU:

    python benchmarks/host_overhead.py [--rules deltanet,gla,longhorn,mamba2] [--reps 200]

Rows: the default policy ("policy") and the autotuner answering from a decision it already holds
("autotuned"), forward only and forward+backward, at a tiny shape (the torch ops on CPU tensors then cost
about what their CUDA launches would).

    python benchmarks/host_overhead.py --glue 2,1024,16,128

instead prints the bytes the torch ops around the kernels write in one fwd+bwd at that (B, T, H, D), bf16,
chunked kernels forced (every aten op's outputs outside olssm's kernel ops, by a dispatch mode; fills and
copies count, views and bare allocations do not): the glue the H200 profile put at ~1.6 of DeltaNet's 7.7 ms at
D = 128 (RESULTS.md, session 7).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)   # compiled-mode host path; the launches are stubbed below
os.environ["OLSSM_CACHE_DIR"] = tempfile.mkdtemp(prefix="olssm-host-")   # the fake-timed decisions stay here

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from olssm import catalogue  # noqa: E402
from olssm.catalogue import random_inputs  # noqa: E402
from olssm.kernels.triton import autotune, library  # noqa: E402
from olssm.kernels.triton import scan as tscan  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", default="deltanet,gated_deltanet,gla,longhorn,mamba2,mamba")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--T", type=int, default=2048, help="tokens: the policy picks the kernels by length")
    p.add_argument("--glue", default=None, metavar="B,T,H,D", help="print the torch glue's bytes at this shape")
    a = p.parse_args(argv)
    launches = []
    JITFunction.run = lambda self, *args, **kw: launches.append(self.fn.__name__)
    tscan._check_device = lambda device: None          # CPU tensors through the compiled-mode path
    autotune._measure = lambda fn, device: (fn(), 1.0)[1]   # every candidate ties: the policy's config is kept
    torch.set_num_threads(1)
    if a.glue:
        return _glue(a.rules.split(","), [int(x) for x in a.glue.split(",")])
    print(f"host ms per call, kernel launches stubbed (CPU, 1 thread, bf16, B=1 T={a.T} H=1 d=16, best of 3 x {a.reps})")
    print("| rule | path | fwd ms | launches | fwd+bwd ms | launches |")
    print("|---|---|---|---|---|---|")
    for name in a.rules.split(","):
        rule = catalogue.rule(name).with_log_decays()
        # bf16 as the GPU benchmark: with fp32 inputs the policy takes the exact-fp32 recurrent kernel
        inp = {n: (x.float() if rule.inputs[n].is_parameter else x.to(torch.bfloat16))
               for n, x in random_inputs(rule, 1, a.T, 1, 16, 16, seed=0).items()}

        def fwd():
            with torch.no_grad():
                rule.scan(backend="triton", **inp)

        def fwd_bwd():
            x = {n: t.clone().requires_grad_() for n, t in inp.items()}
            rule.scan(backend="triton", **x)[0].sum().backward()

        for path in ("policy", "autotuned"):
            autotune.ENABLED = path == "autotuned"
            autotune.clear()
            row = []
            for fn in (fwd, fwd_bwd):
                for _ in range(3):
                    fn()                                  # warm: the plan, and the autotuner's decision
                best = float("inf")
                for _ in range(3):
                    launches.clear()
                    t0 = time.perf_counter()
                    for _ in range(a.reps):
                        fn()
                    best = min(best, (time.perf_counter() - t0) / a.reps)
                row += [f"{best * 1e3:.3f}", str(len(launches) // a.reps)]
            print(f"| {name} | {path} | " + " | ".join(row) + " |", flush=True)
    autotune.ENABLED = None
    autotune.clear()


class _Writes:
    """Bytes written by every aten op under it (a TorchDispatchMode): each op's tensor outputs, in-place ops' self;
    views (outputs aliasing an input) and allocations (empty*) write nothing."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(mode, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                # olssm's own ops are the kernels (their outputs are the kernels' writes; the torch inside them runs
                # below this mode and is not seen: their buffers are torch.empty since session 7)
                if func.namespace != "olssm" and not name.startswith("empty"):
                    ins = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                           if torch.is_tensor(t)}
                    inplace = name.endswith("_")
                    for t in torch.utils._pytree.tree_leaves(out):
                        if torch.is_tensor(t) and (inplace or t.untyped_storage().data_ptr() not in ins):
                            self.by_op[name] = self.by_op.get(name, 0) + t.numel() * t.element_size()
                return out

        self.by_op, self.mode = {}, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _glue(rules, shape):
    B, T, H, D = shape
    library.FORCE = "chunk"
    print(f"MB written by torch ops per fwd+bwd (kernels stubbed), bf16, B={B} T={T} H={H} d_k=d_v={D}; "
          f"one [B, T, H, D] bf16 tensor = {B * T * H * D * 2 / 1e6:.1f} MB")
    print("| rule | MB | largest (MB) |")
    print("|---|---|---|")
    for name in rules:
        rule = catalogue.rule(name).with_log_decays()
        inp = {n: (x.float() if rule.inputs[n].is_parameter else x.to(torch.bfloat16))
               for n, x in random_inputs(rule, B, T, H, D, D, seed=0).items()}
        x = {n: t.clone().requires_grad_() for n, t in inp.items()}

        def fwd_bwd():
            for t in x.values():
                t.grad = None
            o = rule.scan(backend="triton", **x)[0]
            o.backward(torch.ones_like(o))
        try:
            fwd_bwd()
        except NotImplementedError as e:   # no chunked kernel for this rule (Mamba's elementwise decay)
            print(f"| {name} | — | {str(e)[:60]} |")
            continue
        with _Writes() as w:
            fwd_bwd()
        top = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in sorted(w.by_op.items(), key=lambda kv: -kv[1])[:5])
        print(f"| {name} | {sum(w.by_op.values()) / 1e6:.0f} | {top} |", flush=True)
    library.FORCE = None


if __name__ == "__main__":
    main()
