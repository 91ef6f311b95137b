"""Find the kernel launch where compiled Triton code departs from the interpreter.

A test that fails only compiled (on a GPU) says *that* o or a gradient is wrong, not *which* of the
dozen launches of a chunked forward and backward produced it. This script records every launch of
the olssm Triton kernels of one case (the tensors each launch was handed, before and after it ran),
once under TRITON_INTERPRET=1 on the CPU and once compiled on the GPU, and lists the launches whose
written values differ. The first one whose inputs still agreed is the miscompiled (or racy) kernel.

    # on the CPU: the interpreter's traces of every case into DIR
    TRITON_INTERPRET=1 python benchmarks/kernel_trace.py record --dir DIR
    # on the GPU (unset TRITON_INTERPRET): compiled traces, each case in its own process (an illegal
    # memory access poisons a CUDA context), compared with DIR's; plus o / final state / gradient
    # errors against the reference scan for each case and each bisection setting
    python benchmarks/kernel_trace.py compare --dir DIR [--out OUTDIR] [--cases a,b] [--jobs 8]

Written elements are the ones that differ from the buffer's content before the launch in either
run (unwritten padding keeps each run's own garbage and is skipped). The interpreter computes dots in
fp32 where compiled code uses tf32 or bf16 operands, so differences of ~1e-3 relative are rounding;
the cases that motivated this differ by 10 % to 100 %: FLAG_REL = 2e-2 separates the two.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

FLAG_REL = 2e-2


class Case(NamedTuple):
    rule: str
    B: int
    T: int
    H: int
    K: int            # d_k
    V: int            # d_v
    seed: int
    dtype: str        # of the inputs: "fp32" or "bf16"
    cu: Optional[list]   # cu_seqlens (packed sequences) or None
    nh: int           # initial states (sequences; 0: none)
    knobs: dict       # {"module.CONSTANT": value}
    env: dict


def _case_settings():
    """name -> Case. The first three are the compiled failures of session 11's lease (H100, Triton 3.6); the others
    change one thing of one of them."""
    every = {"chunked.OFFSETS32": True,
             "chunked.UT_SOLVE": "blocks", "chunked_delta_bwd.SAME_KEY": True,
             "chunked.CHUNK_STORAGE": "input"}
    bwd = {"OLSSM_TRITON_CHUNK_BWD": "1"}
    cases = {
        # test_wide_keys_bf16_operands_only_without_a_decay[deltanet-True]: o 1.38 off at scale 1.24
        "bf16_wide": Case("deltanet", 1, 70, 1, 72, 8, 6, "bf16", None, 0, {"chunked.DOT_PRECISION": "auto"}, {}),
        # test_offsets32_paths[untied]: o 10 % off
        "o32_untied": Case("gated_deltanet", 1, 140, 1, 72, 20, 18, "fp32", None, 1,
                           {"chunked.OFFSETS32": True, "chunked.TIE_INPUT_TERM": False}, bwd),
        # test_wide_key_variants_together[deltanet-bf16 chunk tensors]: illegal memory access
        "all_bf16": Case("deltanet", 1, 140, 1, 72, 20, 14, "bf16", [0, 70, 71, 140], 3, every, bwd),
    }
    # bisection: each failing case with one setting changed
    out = dict(cases)
    for name, case in cases.items():
        out[f"{name}/stages1"] = case._replace(knobs={**case.knobs, "chunked.WIDE_STAGES": 1, "chunked.NUM_STAGES": 1})
        out[f"{name}/warps4"] = case._replace(knobs={**case.knobs, "chunked.NUM_WARPS": 4})
        out[f"{name}/k64"] = case._replace(K=64)
        out[f"{name}/k128"] = case._replace(K=128)
        out[f"{name}/tf32"] = case._replace(knobs={**case.knobs, "chunked.DOT_PRECISION": "tf32"})
    out["bf16_wide/fp32in_bf16dots"] = cases["bf16_wide"]._replace(dtype="fp32", knobs={"chunked.DOT_PRECISION": "bf16"})
    out["o32_untied/no_o32"] = cases["o32_untied"]._replace(knobs={"chunked.TIE_INPUT_TERM": False})
    out["o32_untied/tied"] = cases["o32_untied"]._replace(knobs={"chunked.OFFSETS32": True})
    # session 11's second call: the shape that triggers it (BV = 16 / 32 tiles at d_v = 8 / 20, the partial last
    # chunk), and a newer ptxas than Triton's own (in the variable that picks sm_90's assembler; its own cache: the
    # cache key may not see it)
    from olssm.kernels.triton.toolchain import assembler_variable
    alt = {assembler_variable(90): os.environ.get("ALT_PTXAS", "/usr/local/cuda/bin/ptxas"),
           "TRITON_CACHE_DIR": "/tmp/olssm-alt-ptxas-cache"}
    for name in ("bf16_wide", "all_bf16"):
        for dv in (32, 64):
            out[f"{name}/dv{dv}"] = cases[name]._replace(V=dv)
        out[f"{name}/ptxas"] = cases[name]._replace(env={**cases[name].env, **alt})
    out["bf16_wide/t128"] = cases["bf16_wide"]._replace(T=128)
    out["bf16_wide/h4"] = cases["bf16_wide"]._replace(H=4)
    out["bf16_wide/k128dv64"] = cases["bf16_wide"]._replace(K=128, V=64)
    out["bf16_wide/k128t128dv64"] = cases["bf16_wide"]._replace(T=128, K=128, V=64)
    # session 12's split diagonal path (chunked.DIAG_PATH), never yet compiled on a GPU: d = 128 on packed sequences
    # (Mamba-2: the scalar decay) and a partial key block (GLA: the column decay's loops), the chunked backward forced
    split = {"chunked.DIAG_PATH": "split"}
    out["diag_split_mamba2"] = Case("mamba2", 1, 140, 2, 128, 64, 21, "bf16", [0, 70, 71, 140], 3, split, bwd)
    out["diag_split_gla"] = Case("gla", 2, 140, 2, 72, 20, 22, "bf16", None, 2, split, bwd)
    for knob in every:
        out[f"all_bf16/without_{knob.split('.')[1].lower()}"] = cases["all_bf16"]._replace(
            knobs={k: v for k, v in every.items() if k != knob})
    # every case under session 11's defaults, as its failures ran (the UT solve and the same-key kernel became the
    # defaults after it), unless the case sets them: all_bf16/without_ut_solve is the masked solve again
    s11 = {"chunked.UT_SOLVE": "masked", "chunked_delta_bwd.SAME_KEY": False}
    return {name: case._replace(knobs={**s11, **case.knobs}) for name, case in out.items()}


CASES = _case_settings()


def _kernel_modules():
    from olssm.kernels.triton import chunked, chunked_delta_bwd, library, pscan, scan
    return {"chunked": chunked, "chunked_delta_bwd": chunked_delta_bwd, "library": library, "pscan": pscan,
            "scan": scan}


class _Traced:
    """Stands in for a kernel: records the tensors of each launch before and after it ran."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        import torch
        run = self.kernel[grid]

        def launch(*args, **kwargs):
            named = list(zip(self.kernel.arg_names, args)) + list(kwargs.items())
            tensors = [(n, x) for n, x in named if torch.is_tensor(x)]
            before = {n: x.detach().cpu().clone() for n, x in tensors}
            consts = {n: x for n, x in kwargs.items() if isinstance(x, (bool, int, float, str))}
            entry = {"kernel": self.name, "before": before, "consts": consts}
            self.log.append(entry)   # before the launch: an exception leaves the launch it stopped at last
            result = run(*args, **kwargs)
            if any(x.is_cuda for _, x in tensors):
                torch.cuda.synchronize()
            entry["after"] = {n: x.detach().cpu().clone() for n, x in tensors}
            return result
        return launch


@contextlib.contextmanager
def case_settings(name):
    """The case's module settings and environment, restored on exit."""
    knobs, env = CASES[name].knobs, CASES[name].env
    mods = _kernel_modules()
    saved_env = {k: os.environ.get(k) for k in env}
    saved = {key: getattr(mods[key.split(".")[0]], key.split(".")[1]) for key in knobs}
    try:
        os.environ.update(env)
        for key, value in knobs.items():
            setattr(mods[key.split(".")[0]], key.split(".")[1], value)
        yield
    finally:
        for key, value in saved.items():
            setattr(mods[key.split(".")[0]], key.split(".")[1], value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def tracing(log):
    """Every olssm *_kernel in the kernel modules stands in as a _Traced appending to log; restored on exit."""
    from triton.runtime.jit import JITFunction
    kinds = (JITFunction,)
    try:
        from triton.runtime.interpreter import InterpretedFunction
        kinds += (InterpretedFunction,)
    except ImportError:
        pass
    swapped = []
    try:
        for mod in _kernel_modules().values():
            for attr, value in list(vars(mod).items()):
                if isinstance(value, kinds) and attr.endswith("_kernel"):   # not the jit helpers they call
                    swapped.append((mod, attr, value))
                    setattr(mod, attr, _Traced(attr, value, log))
        yield log
    finally:
        for mod, attr, value in swapped:
            setattr(mod, attr, value)


def case_inputs(name, upcast=False):
    """(rule, inputs, h0, cu_seqlens) of a case on the CPU; upcast: the low-precision inputs back in fp32."""
    import torch
    from olssm.catalogue import ENTRIES, random_inputs
    c = CASES[name]
    rule = ENTRIES[c.rule].rule
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[c.dtype]
    inp = {n: x if rule.inputs[n].is_parameter else (x.to(dtype).float() if upcast else x.to(dtype))
           for n, x in random_inputs(rule, c.B, c.T, c.H, c.K, c.V, seed=c.seed).items()}
    h0 = None if not c.nh else 0.3 * torch.randn(c.nh, c.H, c.V, c.K, generator=torch.Generator().manual_seed(c.seed))
    return rule, inp, h0, c.cu


def run_case(name, device, log=None):
    """o, final state and gradients (CPU tensors) of case `name` with backend="triton" on `device`, its launches
    appended to log (if given)."""
    rule, inp, h0, cu = case_inputs(name)
    with case_settings(name), (tracing(log) if log is not None else contextlib.nullcontext()):
        return _scan(rule, inp, h0, cu, "triton", device)


def _scan(rule, inp, h0, cu, backend, device):
    import torch
    x = {n: t.to(device).clone().requires_grad_(True) for n, t in inp.items()}
    h = None if h0 is None else h0.to(device).clone().requires_grad_(True)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    o, f = rule.scan(backend=backend, output_final_state=True, initial_state=h, cu_seqlens=cu_t, **x)
    g = torch.Generator().manual_seed(7)
    loss = (o.float() * torch.randn(o.shape, generator=g).to(device)).sum() \
        + (f * torch.randn(f.shape, generator=g).to(device)).sum()
    leaves = dict(x, **({"h0": h} if h is not None else {}))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach().cpu(), f.detach().cpu(), {n: d.cpu() for n, d in zip(leaves, grads)}


def reference_errors(name, o, f, g):
    """max |triton − reference| / max |reference| of o, the final state and each gradient (fp32 reference on the
    case's inputs upcast)."""
    rule, inp, h0, cu = case_inputs(name, upcast=True)
    o1, f1, g1 = _scan(rule, inp, h0, cu, "reference", "cpu")
    rel = lambda a, b: ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
    return {"o": rel(o, o1), "final": rel(f, f1), **{f"d{n}": rel(g[n], g1[n]) for n in g1}}


def _written_diff(b1, a1, b2, a2):
    """(max abs difference of written elements / max abs of them, number written) between two runs' tensors."""
    import torch
    if a1.shape != a2.shape:
        return float("inf"), -1
    if not a1.is_floating_point():
        return (0.0 if torch.equal(a1, a2) else float("inf")), a1.numel()
    a1, a2, b1, b2 = (t.double() for t in (a1, a2, b1, b2))
    changed = lambda a, b: (a != b) & ~(torch.isnan(a) & torch.isnan(b))
    mask = changed(a1, b1) | changed(a2, b2)
    if not mask.any():
        return 0.0, 0
    x, y = a1[mask], a2[mask]
    if not torch.isfinite(x).all():
        return float("nan"), int(mask.sum())
    return ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item(), int(mask.sum())


def compare_logs(compiled, interpreted):
    """One line per launch: kernel, its written tensors' relative differences; flags those over FLAG_REL."""
    lines = []
    if [e["kernel"] for e in compiled] != [e["kernel"] for e in interpreted]:
        lines.append("launch sequences differ: compiled " + " ".join(e["kernel"] for e in compiled)
                     + " | interpreted " + " ".join(e["kernel"] for e in interpreted))
    for i, (c, r) in enumerate(zip(compiled, interpreted)):
        if "after" not in c or "after" not in r:
            lines.append(f"!! {i:2d} {c['kernel']}: did not finish")
            continue
        diffs = []
        for n in c["after"]:
            if n not in r["after"]:
                continue
            d, count = _written_diff(c["before"][n], c["after"][n], r["before"][n], r["after"][n])
            if count:
                diffs.append((n, d, count))
        bad = [x for x in diffs if not (x[1] <= FLAG_REL)]
        text = ", ".join(f"{n} {d:.1e} ({count})" for n, d, count in diffs)
        lines.append(f"{'!!' if bad else '  '} {i:2d} {c['kernel']} {c['consts']}: {text}")
    return lines


def _one(name, directory):
    """Child process: a case compiled (twice: a second run that differs bitwise means a race or a read of memory
    nothing wrote), compared with the interpreter's trace and the reference."""
    import traceback
    import torch
    log = []
    try:
        o, f, g = run_case(name, "cuda", log)
        o2, f2, g2 = run_case(name, "cuda")
    except Exception as exc:   # an illegal memory access: the launches before it, and the one it stopped at
        print(f"== {name}: {type(exc).__name__}: {str(exc)[:300]}\n   launches: "
              + " ".join(e["kernel"] + ("(raised)" if "after" not in e else "") for e in log)
              + "\n" + "".join(traceback.format_exc().splitlines(True)[-6:]), flush=True)
        return
    same = torch.equal(o, o2) and torch.equal(f, f2) and all(torch.equal(g[n], g2[n]) for n in g)
    lines = [f"== {name}: errors against the reference: "
             + ", ".join(f"{k} {v:.1e}" for k, v in reference_errors(name, o, f, g).items())
             + ("" if same else "; A SECOND RUN DIFFERED (race?)")]
    ref = Path(directory) / (name.replace("/", "__") + ".pt")
    if ref.exists():
        lines += compare_logs(log, torch.load(ref, weights_only=False)["log"])
    else:
        lines.append(f"(no interpreter trace {ref})")
    print("\n".join(lines), flush=True)


def _record(name, directory):
    """Child process: a case interpreted on the CPU, its launch log saved to directory."""
    import torch
    t0 = time.time()
    log = []
    o, f, g = run_case(name, "cpu", log)
    torch.save({"log": log}, Path(directory) / (name.replace("/", "__") + ".pt"))
    errors = reference_errors(name, o, f, g)
    print(f"== {name}: {len(log)} launches, {time.time() - t0:.1f} s; errors against the reference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["record", "compare", "one"])
    ap.add_argument("--dir", default=".traces")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", default=None, help="comma-separated names (default: all); a name ending in / "
                                                  "takes every case under it")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=240)
    args = ap.parse_args()
    names = list(CASES)
    if args.cases:
        want = args.cases.split(",")
        names = [n for n in names if n in want or any(w.endswith("/") and n.startswith(w) for w in want)]
    if args.mode == "one":   # a child: each case in its own process (knobs are module constants; an illegal
        # memory access poisons the CUDA context)
        if os.environ.get("TRITON_INTERPRET") == "1":
            _record(names[0], args.dir)
        else:
            _one(names[0], args.dir)
        return
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONUNBUFFERED="1")
    env.update({"TRITON_INTERPRET": "1"} if args.mode == "record" else {"CUDA_LAUNCH_BLOCKING": "1"})

    def child(name):
        cmd = [sys.executable, __file__, "one", "--dir", args.dir, "--cases", name]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            text = p.stdout + ("" if p.returncode == 0 else f"== {name}: exit {p.returncode}\n" + p.stderr[-1500:])
        except subprocess.TimeoutExpired:
            text = f"== {name}: timed out after {args.timeout} s\n"
        return name, text
    sink = open(Path(args.out) / "trace.txt", "w") if args.out else None
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        for name, text in pool.map(child, names):
            print(text, flush=True)
            if sink:
                sink.write(text + "\n")
                sink.flush()


if __name__ == "__main__":
    main()
