"""Where the time of one scan goes on a GPU: torch.profiler over the forward alone and over forward+backward,
per rule, kernel family and setting, with fla's chunk kernels at the same shape beside them (--peers).

    python benchmarks/profile_gpu.py --rules linear_attention,gla --B 4 --T 2048 --H 16 --d 64
    python benchmarks/profile_gpu.py --rules deltanet --kernels chunk --B 2 --T 8192 --H 16 --d 128 --peers \
        --variants 'narrow=wide:off'

Per (rule, kernel, setting) it prints one line per device kernel, microseconds per call, for the forward under
no_grad and for forward+backward, and their sums: the breakdown that says which of our kernels stands where
fla's do. --variants takes benchmarks/triton_kernels.py's settings (LABEL=KEY:VALUE,...; the defaults always run
first). On a CPU (TRITON_INTERPRET=1, tiny shapes) it only smoke-tests itself: the times are the interpreter's.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from olssm.catalogue import ENTRIES, random_inputs
from olssm.kernels.triton import library
from triton_kernels import _changes, _fla_peers, _settings, _variants, _with_grad, lift_fla_hopper_guard


def _kernel_times(fn, calls: int, device: str) -> dict:
    """{kernel name: device µs per call} over `calls` calls of fn (after two warm-up calls)."""
    for _ in range(2):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    return _per_call(prof.key_averages(), calls, device)


def _per_call(events, calls: int, device: str) -> dict:
    """{kernel name: µs per call} from the profiler's averaged rows. The device's own rows are the kernels: a CPU
    op's self device time is its kernels' time again (summing both counted every kernel twice). On a CPU the top-level
    olssm ops stand in for the kernels (a smoke test only)."""
    times = defaultdict(float)
    for ev in events:
        if device == "cuda":
            t = ev.self_device_time_total if ev.device_type != DeviceType.CPU else 0
        else:
            t = ev.self_cpu_time_total if ev.key.startswith("olssm::") else 0
        if t > 0:
            times[ev.key] += t / calls
    return dict(times)


def _table(title: str, times: dict, top: int) -> str:
    rows = sorted(times.items(), key=lambda kv: -kv[1])
    lines = [f"  {title}: {sum(times.values()):.0f} µs per call"]
    lines += [f"    {t:9.1f} µs  {name[:90]}" for name, t in rows[:top]]
    if len(rows) > top:
        lines.append(f"    {sum(t for _, t in rows[top:]):9.1f} µs  ({len(rows) - top} more)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", default="linear_attention,gla,deltanet")
    p.add_argument("--kernels", default="chunk,recurrent")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--peers", action="store_true", help="profile fla's chunk kernel for the rule too, where installed")
    p.add_argument("--variants", default="", help="settings profiled after the defaults (triton_kernels.py's syntax)")
    a = p.parse_args(argv)
    variants = {"default": {}, **_variants(a.variants)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":   # the assembler first (toolchain.check may switch it), so that every row gets the same
        from olssm.kernels.triton import toolchain
        toolchain.check(torch.device("cuda"))
        print(f"{torch.cuda.get_device_name()}, {toolchain.ptxas_report()}")
    for name in a.rules.split(","):
        rule = ENTRIES[name].rule.with_log_decays()    # gates in log space, as the layers give them
        inp = {n: x.to(device) for n, x in random_inputs(rule, a.B, a.T, a.H, a.d, a.d, seed=0).items()}
        inp = {n: (x if rule.inputs[n].is_parameter else x.to(torch.bfloat16)).requires_grad_() for n, x in inp.items()}
        runs = []
        for kernel in a.kernels.split(","):
            for label, setting in variants.items():
                if not _changes(setting, kernel):   # e.g. a chunked setting on the recurrent row: the same kernels
                    continue
                runs.append((f"{kernel}@{label}", setting,
                             lambda: rule.scan(backend="triton", **inp)[0], kernel))
        peers, args = _fla_peers(name, rule, inp) if a.peers else ({}, ())
        if "fla-chunk" in peers:
            # leaves of their own: fla's v·Δ and Δ·A are products of our inputs, whose graph the first backward freed
            # ("backward through the graph a second time" lost session 19's dry run its fla row); and right after our
            # defaults, before the variants, so that a stage's timeout cuts a variant rather than the comparison
            args = _with_grad(args)
            runs.insert(1, ("fla-chunk", {}, lambda f=peers["fla-chunk"]: f(args), None))
        for label, setting, forward, force in runs:
            library.FORCE = force

            def fwd():
                with torch.no_grad():
                    forward()

            def fwd_bwd():
                for x in (*inp.values(), *args):   # no gradient accumulation kernels in the table (fresh grads)
                    x.grad = None
                forward().float().sum().backward()
            try:
                with _settings(setting):
                    f = _kernel_times(fwd, a.calls, device)
                    try:
                        fb = _kernel_times(fwd_bwd, a.calls, device)
                    except RuntimeError as e:   # fla 0.6's Hopper guard on its gated backward (triton_kernels.py)
                        if force is not None or not lift_fla_hopper_guard(e):
                            raise
                        fb = _kernel_times(fwd_bwd, a.calls, device)
            except NotImplementedError as e:   # no such kernel for this rule (e.g. chunked Mamba)
                print(f"== {name} / {label}: {e}")
                continue
            except Exception as e:   # noqa: BLE001 - fla refusing (its autotuner needs a GPU driver)
                if force is not None:
                    raise
                print(f"== {name} / {label}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}")
                continue
            print(f"== {name} / {label} ({a.B}, {a.T}, {a.H}, {a.d}) bf16, {a.calls} calls")
            print(_table("forward", f, a.top))
            print(_table("forward+backward", fb, a.top), flush=True)
    library.FORCE = None


if __name__ == "__main__":
    main()
