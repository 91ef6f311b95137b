"""Reference vs chunk backend on the CPU: fwd and fwd+bwd time and peak memory, as a markdown table.

    python benchmarks/scan.py                       # B=2, H=4, d=64, T in {512, 2048, 8192}
    python benchmarks/scan.py --quick               # T in {128, 512}
    python benchmarks/scan.py --T 512 2048 --ref-max-T 2048 --rules deltanet gla
    python benchmarks/scan.py --T 2048 --rounds 3     # reference and chunk in turn, 3 times: for a drifting machine

Time: best of --repeat runs (after one warm-up), the reference too (--ref-repeat; sessions 1-3 timed it
once, which overstated the ratios: see RESULTS.md, session 4). Memory: high-water mark of the resident set above the
pre-run baseline, measured in a forked child per cell (torch's CPU allocator is invisible to
tracemalloc). fp32 throughout. The reference is skipped above --ref-max-T (autograd through its token
loop keeps every state: 2–4.5 GB at T = 8192, d = 64) and marked "skipped". Sessions 1–4 measured a
reference whose backward was quadratic in T (per-token slicing); RESULTS.md, session 4, says by how much.

--peers adds a second table: the same recurrence through other libraries' CPU paths where they are
installed (optional, never dependencies): flash-linear-attention's torch references
(fla.ops.delta_rule.naive.delta_rule_chunkwise, fla.ops.gla.naive.naive_recurrent_gla) and mambapy's
parallel (Blelloch) scan for the Mamba rule, timed and measured like the cells above, against
olssm's chunk backend in the same run. `pip install -e ".[peers]"` installs both (pure Python; they use
the torch already installed).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from olssm import catalogue as cat  # noqa: E402
from olssm.kernels import scan  # noqa: E402

SHAPES = {  # rule name -> what it stands for in the table
    "deltanet": "DeltaNet (identity + rank-1, scalar β)",
    "longhorn": "Longhorn (per-row rank-1)",
    "gla": "GLA (column decay)",
    "mamba": "Mamba (elementwise exp(Δ A))",
    "mamba2": "Mamba-2 (scalar decay)",
    "gated_deltanet": "Gated DeltaNet",
    "rls": "RLS (Riccati gain loop + chunked S)",
}


#: decay gates in log space (rule.with_log_decays(), what OnlineSSM runs, fla's convention) unless --raw-decays:
#: a gradient to a raw gate runs the chunk backend's token loops (exact ∂L/∂Λ; CHUNK.md §1)
RAW_DECAYS = False


def _rule(name):
    rule = cat.rule(name)
    return rule if RAW_DECAYS or rule.is_rls else rule.with_log_decays()


def _once(name, inp, backend, chunk, bwd):
    """Seconds for one forward (bwd: forward and backward) of rule `name` on backend "reference",
    "chunk" or "peer" (the other library's path, _peer)."""
    if backend == "peer":
        fn = _peer(name)[1]
        run = lambda x: (fn(x, chunk), None)
    else:
        rule = _rule(name)
        run = lambda x: scan(rule, backend=backend, chunk_size=chunk, output_final_state=True, **x)
    if bwd:
        leaves = {n: x.detach().clone().requires_grad_(True) for n, x in inp.items()}
        t = time.perf_counter()
        o, f = run(leaves)
        states = () if f is None else f if isinstance(f, tuple) else (f,)   # exact rules: a pair
        (o.square().mean() + sum(x.square().mean() for x in states)).backward()
    else:
        t = time.perf_counter()
        with torch.no_grad():
            run(inp)
    return time.perf_counter() - t


def _peer(name):
    """(peer label, fn(inputs) -> o) for the rule `name`, or None when the peer is not installed.
    Inputs are olssm's [B, T, H, d] layout; each peer gets its own layout. fla's references scale q by
    d^-1/2 (o differs by that factor: timing only)."""
    try:
        if name == "deltanet":
            from fla.ops.delta_rule.naive import delta_rule_chunkwise

            def fn(x, chunk):
                t = lambda a: a.transpose(1, 2)
                return delta_rule_chunkwise(t(x["q"]), t(x["k"]), t(x["v"]), t(x["beta"]), chunk_size=chunk)[0]
            return "fla delta_rule_chunkwise (torch)", fn
        if name == "gla":
            from fla.ops.gla.naive import naive_recurrent_gla
            return "fla naive_recurrent_gla (torch)", lambda x, chunk: naive_recurrent_gla(
                x["q"], x["k"], x["v"], torch.log(x["g"]) if RAW_DECAYS else x["g"])[0]
        if name == "mamba":
            from mambapy.pscan import pscan

            def fn(x, chunk):
                B, T, H, dk = x["k"].shape
                dv = x["v"].shape[-1]
                dA = torch.exp(x["dt"][..., None] * x["A"]).reshape(B, T, H * dv, dk)
                X = ((x["dt"] * x["v"])[..., None] * x["k"][:, :, :, None, :]).reshape(B, T, H * dv, dk)
                hs = pscan(dA, X)                                   # [B, T, H·dv, dk]
                return (hs.view(B, T, H, dv, dk) * x["q"][:, :, :, None, :]).sum(-1)
            return "mambapy pscan (Blelloch)", fn
    except ImportError:
        return None
    return None


def _rss_kb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _cell(q, name, B, T, H, d, backend, chunk, bwd, repeat, threads):
    torch.set_num_threads(threads)
    rule = _rule(name)
    inp = cat.random_inputs(rule, B, T, H, d, d, seed=0)
    # warm-up (codegen, allocator) on an eighth of the tokens: ru_maxrss is the process's high-water mark, so a
    # warm-up as long as the cell (T <= 2·chunk had been) set the peak itself and the cell read ~0 MB
    small = cat.random_inputs(rule, B, max(1, min(T // 8, 2 * chunk)), H, d, d, seed=0)
    _once(name, small, backend, chunk, bwd)
    base = _rss_kb()
    times = [_once(name, inp, backend, chunk, bwd) for _ in range(repeat)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q.put((min(times), max(0, peak - base) / 1024))


def measure(*a):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_cell, args=(q, *a))
    p.start()
    out = q.get()
    p.join()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--quick", action="store_true", help="T in {128, 512}, one repeat")
    ap.add_argument("--rules", nargs="+", default=["deltanet", "longhorn", "gla", "mamba"])
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ref-max-T", type=int, default=8192, help="skip the reference above this T")
    ap.add_argument("--ref-repeat", type=int, default=None,
                    help="runs of the reference per cell (default: --repeat; the first run in a fresh process "
                         "pays the page faults of its large autograd graph, up to 2x its best time here)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure each row's cells this many times, the reference and the chunk backend in turn "
                         "(each time in a fresh process, best of --repeat), and keep each cell's best time and largest "
                         "memory: a machine whose speed drifts over minutes (±20–30 %% seen in session 13) then "
                         "drifts under both sides of a ratio alike")
    ap.add_argument("--peers", action="store_true", help="also time other libraries' CPU paths (if installed)")
    ap.add_argument("--raw-decays", action="store_true",
                    help="decay gates as raw values in (0, 1] (their gradients then run the token loops) instead of "
                         "log space")
    args = ap.parse_args(argv)
    global RAW_DECAYS
    RAW_DECAYS = args.raw_decays
    Ts = [128, 512] if args.quick else args.T
    repeat = 1 if args.quick else args.repeat
    if args.ref_repeat is None:
        args.ref_repeat = repeat
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}; fp32, B={args.B}, H={args.H}, "
          f"d_k=d_v={args.d}, chunk_size={args.chunk}, decay gates {'raw' if RAW_DECAYS else 'in log space'}; time = best of {repeat} (reference: best of {args.ref_repeat})"
          f"{f' in each of {args.rounds} alternating rounds' if args.rounds > 1 else ''}; mem = peak RSS above baseline\n")
    print("| rule | T | ref fwd s | chunk fwd s | fwd × | ref fwd+bwd s | chunk fwd+bwd s | fwd+bwd × "
          "| ref mem MB (f+b) | chunk mem MB (f+b) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.rules:
        for T in Ts:
            res = {}
            for _ in range(max(1, args.rounds)):
                for backend in ("reference", "chunk"):
                    for bwd in (False, True):
                        if backend == "reference" and T > args.ref_max_T:
                            res[backend, bwd] = None
                            continue
                        t, mem = measure(name, args.B, T, args.H, args.d, backend, args.chunk, bwd,
                                         args.ref_repeat if backend == "reference" else repeat, args.threads)
                        best = res.get((backend, bwd))
                        res[backend, bwd] = (t, mem) if best is None else (min(best[0], t), max(best[1], mem))
            f = lambda r, i=0, fmt="{:.3f}": "skipped" if r is None else fmt.format(r[i])
            ratio = lambda a, b: "—" if a is None else f"{a[0] / b[0]:.1f}"
            print(f"| {SHAPES.get(name, name)} | {T} | {f(res['reference', False])} | {f(res['chunk', False])} "
                  f"| {ratio(res['reference', False], res['chunk', False])} | {f(res['reference', True])} "
                  f"| {f(res['chunk', True])} | {ratio(res['reference', True], res['chunk', True])} "
                  f"| {f(res['reference', True], 1, '{:.0f}')} | {f(res['chunk', True], 1, '{:.0f}')} |", flush=True)
    if args.peers:
        _peers_table(args, Ts, repeat)


def _peers_table(args, Ts, repeat):
    print("\n| rule | T | peer | peer fwd s | chunk fwd s | peer / chunk fwd | peer fwd+bwd s | chunk fwd+bwd s "
          "| peer / chunk fwd+bwd | peer mem MB (f+b) | chunk mem MB (f+b) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.rules:
        peer = _peer(name)
        if peer is None:
            print(f"| {SHAPES.get(name, name)} | — | not installed or none known | | | | | | | | |")
            continue
        for T in [t for t in Ts if t <= args.ref_max_T and t % args.chunk == 0]:
            r = {}
            for bwd in (False, True):
                r["peer", bwd] = measure(name, args.B, T, args.H, args.d, "peer", args.chunk, bwd, repeat,
                                         args.threads)
                r["chunk", bwd] = measure(name, args.B, T, args.H, args.d, "chunk", args.chunk, bwd, repeat,
                                          args.threads)
            print(f"| {SHAPES.get(name, name)} | {T} | {peer[0]} | {r['peer', False][0]:.3f} | {r['chunk', False][0]:.3f} "
                  f"| {r['peer', False][0] / r['chunk', False][0]:.1f} | {r['peer', True][0]:.3f} "
                  f"| {r['chunk', True][0]:.3f} | {r['peer', True][0] / r['chunk', True][0]:.1f} "
                  f"| {r['peer', True][1]:.0f} | {r['chunk', True][1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
