"""The split paths' launch settings, one kernel at a time, on a GPU (TRITON.md, "Split diagonal path" and "Per-kernel
launch settings").

    python benchmarks/kernel_sweep.py --rules mamba2,gla --B 2 --T 8192 --H 16 --d 128
    python benchmarks/kernel_sweep.py --rules deltanet,gated_deltanet --peers

Each rule runs the kernels of its family. The split diagonal path (no correction: Mamba-2, GLA) runs five: the
forward's state pass (state) and output (out), the reverse pass (dh), dQ / dW / ∂g (dqk) and dE (dv); their blocks and
num_warps / num_stages are chunked.DIAG_*. The split delta path (DeltaNet, Gated DeltaNet) runs seven: the forward's
UT transform (delta_prep), state pass (delta_state) and output (delta_out), the backward's prep (delta_bprep), reverse
pass (delta_bstate), dE / dc (delta_value) and dQ / dK / ∂ log γ (delta_key); chunked.DELTA_* and
chunked_delta_bwd.*_WARPS / *_STAGES. Session 22's profile put each diagonal kernel at 2-3.5x the time of
flash-linear-attention's counterpart at (2, 8192, 16, 128), session 11's the delta forward's prep and state kernels at
~2x. Per rule this times the
defaults twice (their spread is the drift), then each candidate setting of one kernel with the others at their
defaults, in one process. The forward's kernels are judged on the forward's time, the backward's and
the settings both state passes read on forward+backward. A candidate *wins* when it beats the faster default timing
by more than the spread and by WIN_MARGIN. Then every kernel's best winner together, timed again, with its output
and gradients against the defaults' (the same sums in another order and blocking: the largest relative difference,
which a wrong block boundary would make O(1)); last, the constants that would make it the default.

On a CPU it runs under TRITON_INTERPRET=1 at tiny shapes (tests/test_triton_chunked.py runs it so): the gradient
comparison is then the check, the times mean nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from olssm import catalogue
from olssm.catalogue import random_inputs
from olssm.kernels.triton import chunked, library
from olssm.kernels.triton.scan import plan_for

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_kernels import (_VARIANT_KEYS, _fla_peers, _settings, _time as _seconds,  # noqa: E402  (beside it)
                            lift_fla_hopper_guard)

#: a winner must beat the faster default timing by this fraction as well as by the drift
WIN_MARGIN = 0.02

#: candidate settings per kernel: {label: {triton_kernels.py --variants key: value}} (state_bv: chunked.
#: DIAG_STATE_BLOCK_V, ...), each against today's defaults (in brackets).
#: Chosen from the registers and spills aot_check reports for sm_90 at chunk 64, d = 128, bf16 inputs (session 23,
#: compiled then without the launch's alignment hints, which overstated spills): state / dh at [32] value rows issue
#: mma.sync (M = 32), at 64 wgmma; out [128 rows] beat 64 and 32 rows; dqk [64 keys / 32 rows, 8 warps] lost against
#: every setting of session 23's sweep (32 keys, 16 / 64 rows, 1-2 stages); with every key in one block (128: 255
#: registers, 384 B of spills as launched)
#: it would form dO Eᵀ and run its ∂g tail once per chunk instead of twice (32 % fewer instructions per chunk, static
#: count); dv [32 / 64, 4 warps]. Session 23's H200 rows: RESULTS.md
DIAG_CANDIDATES = {
    "state": {"s64": {"state_bv": 64}, "sw8": {"state_warps": 8}, "sw2": {"state_warps": 2},
              "ss2": {"state_stages": 2}, "sk128": {"state_bk": 128}},
    "dh": {"hw8": {"dh_warps": 8}, "hw2": {"dh_warps": 2}, "hs2": {"dh_stages": 2}},
    "out": {"ok32": {"out_kb": 32}, "ok64": {"out_kb": 64}, "o64": {"out_bv": 64},
            "ow4": {"out_warps": 4}},
    "dqk": {"q128": {"dqk_bk": 128}, "q128v64": {"dqk_bk": 128, "dqk_bv": 64},
            "q32": {"dqk_bk": 32}, "qv64": {"dqk_bv": 64}, "qs2": {"dqk_stages": 2}},
    "dv": {"v64": {"dv_bk": 64}, "v128": {"dv_bv": 128}, "vw8": {"dv_warps": 8},
           "v128w8": {"dv_bv": 128, "dv_warps": 8},
           "vs2": {"dv_stages": 2}},
}
#: the split delta path's, against its defaults (8 warps, 2 stages on the wide-key path at d_k > 64, 32 value rows per
#: state pass). From aot_check at sm_90, chunk 64, d = 128, bf16 inputs and dot operands (DeltaNet's), 2 stages, as
#: launched (session 24; registers / spilled B per thread, 8 → 4 warps): forward state 148 / 0 → 194 / 0 (fp32 inputs
#: 194 / 0 → 255 / 80), out 121 / 0 → 137 / 0, prep 214 / 0 → 255 / 0; backward state 212 / 0 → 255 / 152, value
#: 190 / 0 → 230 / 0, key 194 / 0 → 255 / 32 (Gated DeltaNet's 238 / 0 → 255 / 704), prep 79 / 0 → 102 / 0. So 4 warps
#: for the forward's three, the value and the prep kernels, not for the reverse pass or the key kernel, except as a
#: row to confirm it; 16 value rows per state pass make 256 programs at (2, T, 16, 128) where 32 make 128, on 132 SMs.
#: fla's forward state pass autotunes over 2 / 4 warps, 32 / 64 value columns and 2-4 stages on Hopper (sw2, sv64w4,
#: ss3). Other stage settings are left out: none won on the diagonal path (session 23), and each candidate compiles
#: its kernels anew, which bounds how many one device call can time
DELTA_CANDIDATES = {   # the likeliest first: a call that runs out of time cuts the last
    "delta_state": {"sw4": {"delta_state_warps": 4}, "sv16": {"delta_state_bv": 16},
                    "sv16w4": {"delta_state_bv": 16, "delta_state_warps": 4}, "sv64": {"delta_state_bv": 64},
                    "sw2": {"delta_state_warps": 2}, "sv64w4": {"delta_state_bv": 64, "delta_state_warps": 4},
                    "ss3": {"delta_state_stages": 3}},
    "delta_out": {"ow4": {"delta_out_warps": 4}},
    "delta_value": {"vw4": {"delta_value_warps": 4}},
    "delta_prep": {"pw4": {"delta_prep_warps": 4}},
    "delta_bprep": {"bpw4": {"delta_bprep_warps": 4}},
    "delta_bstate": {"bsw4": {"delta_bstate_warps": 4}},
    "delta_key": {"kw4": {"delta_key_warps": 4}},
}
CANDIDATES = {**DIAG_CANDIDATES, **DELTA_CANDIDATES}
#: the fused walk's chunk (library.CHUNK before --chunk changes it)
POLICY_CHUNK = library.CHUNK
#: settings timed beside the candidates but never chosen: they change the numbers, not only their order
INFO = {"bf16 operands": {"precision": "bf16"}}
#: the kernels judged on the forward's time, unless a setting also changes the reverse pass (SHARED)
FORWARD_KERNELS = ("state", "out", "delta_prep", "delta_state", "delta_out")
#: settings both state passes read (the forward's and the reverse one): judged on forward+backward
SHARED = ("state_bv", "state_bk", "delta_state_bv")


def family_kernels(rule) -> tuple:
    """The kernels a rule's split path runs: the delta path's with a correction, the diagonal path's without."""
    return tuple(DELTA_CANDIDATES if rule.form.corrections else DIAG_CANDIDATES)


def _column(kernel: str, settings: dict) -> int:
    """0: judged on the forward's time, 1: on forward+backward."""
    return 0 if kernel in FORWARD_KERNELS and not any(n in SHARED for n in settings) else 1


def _time(fn, reps) -> float:
    """Median milliseconds per call (triton_kernels._time: CUDA events on a GPU, the host clock elsewhere)."""
    return _seconds(fn, "cuda" if torch.cuda.is_available() else "cpu", reps) * 1e3


def _run(rule, inp, grad: bool):
    """o (and the gradients of every floating input under a fixed random cotangent) from the triton chunked path."""
    args = {n: (x.detach().clone().requires_grad_() if grad and x.is_floating_point() else x) for n, x in inp.items()}
    with torch.set_grad_enabled(grad):
        o, _ = rule.scan(backend="triton", **args)
    if not grad:
        return o, {}
    cot = torch.randn(o.shape, generator=torch.Generator().manual_seed(5)).to(o.device, o.dtype)
    (o.float() * cot.float()).sum().backward()
    return o, {n: x.grad for n, x in args.items() if getattr(x, "grad", None) is not None}


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def differences(rule, inp, settings: dict) -> dict:
    """The largest relative difference of o and of each input's gradient under `settings` (--variants keys) from the
    defaults': the same sums in another order and blocking (~1e-7 in fp32, a bf16 rounding at most in bf16), where a
    wrong block boundary would make it O(1)."""
    ref_o, ref_g = _run(rule, inp, True)
    with _settings(settings):
        o, g = _run(rule, inp, True)
    return {"o": _rel(o, ref_o), **{f"d{n}": _rel(g[n], ref_g[n]) for n in ref_g}}


def _peer_rows(name, rule, inp, reps, base):
    """flash-linear-attention's chunk kernel for the rule where benchmarks/triton_kernels.py maps one (fla installed)."""
    peers, args = _fla_peers(name, rule, inp)
    fn = peers.get("fla-chunk")
    if fn is None:
        return
    grad_args = tuple(x.detach().clone().requires_grad_() if x.is_floating_point() else x for x in args)

    def fwd_bwd():
        fn(grad_args).float().sum().backward()

    try:
        with torch.no_grad():
            tf = _time(lambda: fn(args), reps)
        try:
            tb = _time(fwd_bwd, reps)
        except RuntimeError as e:
            if not lift_fla_hopper_guard(e):
                raise
            tb = _time(fwd_bwd, reps)
        print(f"| — | fla chunk | {tf:.3f} | {tb:.3f} | the defaults at {base[1] / tb:.2f}x its fwd+bwd time |",
              flush=True)
    except Exception as e:   # noqa: BLE001 - a peer refusing these inputs
        print(f"| — | fla chunk | — | — | {type(e).__name__}: {str(e).splitlines()[0][:60]} |", flush=True)


def sweep(name, a) -> dict:
    rule = catalogue.rule(name).with_log_decays()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    inp = {n: x.to(dev) for n, x in random_inputs(rule, a.B, a.T, a.H, a.d, a.d, seed=0).items()}
    inp = {n: (x if rule.inputs[n].is_parameter else x.to(dtype)) for n, x in inp.items()}

    def fwd():
        with torch.no_grad():
            rule.scan(backend="triton", **inp)

    grad_inp = {n: (x.detach().clone().requires_grad_() if x.is_floating_point() else x) for n, x in inp.items()}

    def fwd_bwd():
        rule.scan(backend="triton", **grad_inp)[0].float().sum().backward()

    def timed(settings):
        with _settings(settings):
            return _time(fwd, a.reps), _time(fwd_bwd, a.reps)

    delta = bool(rule.form.corrections)
    path = f"delta forward {chunked._delta_forward()}" if delta else f"diag path {chunked.diag_path(rule.form, a.d)}"
    print(f"\n== {name}: (B, T, H, d) = ({a.B}, {a.T}, {a.H}, {a.d}), {str(dtype)[6:]}, {path}, "
          f"chunk {library.chunk_size(plan_for(rule), a.d)}")
    print("| kernel | setting | fwd ms | fwd+bwd ms | verdict |")
    print("|---|---|---|---|---|")
    base = [timed({}), None]
    print(f"| — | defaults | {base[0][0]:.3f} | {base[0][1]:.3f} | |", flush=True)
    if a.fused_row and not delta:   # the fused walk (DIAG_PATH "fused", its own chunk size): the path the split one must beat
        try:
            t = timed({"diag_path": "fused", "chunk": POLICY_CHUNK})
            print(f"| — | fused walk | {t[0]:.3f} | {t[1]:.3f} | the defaults at {base[0][1] / t[1]:.2f}x its "
                  "fwd+bwd time |", flush=True)
        except Exception as e:   # noqa: BLE001
            print(f"| — | fused walk | — | — | {type(e).__name__}: {str(e).splitlines()[0][:60]} |", flush=True)
    if a.peers and dev == "cuda":
        _peer_rows(name, rule, inp, a.reps, base[0])
    for label, settings in (INFO.items() if a.info else ()):   # timed and reported, never a winner: they change the numbers
        try:
            t = timed(settings)
            with _settings(settings), torch.no_grad():
                o = rule.scan(backend="triton", **inp)[0]
            with torch.no_grad():
                ref = rule.scan(backend="triton", **inp)[0]
            print(f"| all | {label} | {t[0]:.3f} | {t[1]:.3f} | o {_rel(o, ref):.1e} from the defaults' |",
                  flush=True)
        except Exception as e:   # noqa: BLE001
            print(f"| all | {label} | — | — | {type(e).__name__}: {str(e).splitlines()[0][:60]} |", flush=True)
    results = {}
    for kernel in [k for k in a.kernels if k in family_kernels(rule)]:   # in the order asked for
        cands = CANDIDATES[kernel]
        for label, settings in cands.items():
            try:
                t = timed(settings)
            except Exception as e:   # noqa: BLE001 - a setting the GPU cannot launch: the others still count
                print(f"| {kernel} | {label} | — | — | {type(e).__name__}: {str(e).splitlines()[0][:60]} |",
                      flush=True)
                continue
            results[(kernel, label)] = t
            print(f"| {kernel} | {label} | {t[0]:.3f} | {t[1]:.3f} | |", flush=True)
    base[1] = timed({})
    print(f"| — | defaults again | {base[1][0]:.3f} | {base[1][1]:.3f} | |", flush=True)
    winners, lines = {}, []
    for col, what in ((0, "fwd"), (1, "fwd+bwd")):
        lo, hi = min(b[col] for b in base), max(b[col] for b in base)
        for (kernel, label), t in results.items():
            if _column(kernel, CANDIDATES[kernel][label]) != col:
                continue
            gain = lo / t[col]
            verdict = "wins" if t[col] < lo - (hi - lo) and t[col] < lo * (1 - WIN_MARGIN) else \
                "loses" if t[col] > hi + (hi - lo) else "within drift"
            lines.append(f"  {kernel} {label}: {what} {t[col]:.3f} ms against {lo:.3f}-{hi:.3f}: {verdict} "
                         f"({gain:.2f}x)")
            # a kernel's candidates are judged on different columns (a shared state block on fwd+bwd, a forward
            # setting on fwd): its best winner is the one with the largest gain in its own column
            if verdict == "wins" and (kernel not in winners or gain > winners[kernel][1]):
                winners[kernel] = (label, gain)
    print("\n".join(lines))
    best = {}
    for kernel, (label, _) in winners.items():
        best.update(CANDIDATES[kernel][label])
    if not best:
        print(f"{name}: no setting beats the defaults beyond the drift")
        return {}
    t = timed(best)
    diffs = differences(rule, inp, best)
    print(f"{name}: every winner together ({', '.join(f'{k} {v[0]}' for k, v in winners.items())}): "
          f"fwd {t[0]:.3f} ms, fwd+bwd {t[1]:.3f} ms against {min(b[0] for b in base):.3f} / "
          f"{min(b[1] for b in base):.3f} ({min(b[1] for b in base) / t[1]:.2f}x fwd+bwd)")
    print(f"{name}: largest relative difference from the defaults' o and gradients: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    print(f"{name}: constants: " + ", ".join(f"{_VARIANT_KEYS[k][0].__name__.rsplit('.', 1)[1]}.{attr} = {v}"
                                             for k, v in best.items() for attr in _VARIANT_KEYS[k][1]))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", default="mamba2,gla")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--d", type=int, default=128, help="d_k = d_v")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--kernels", default=",".join(CANDIDATES),
                   help="which kernels' candidates to time (each rule times those of its own path among them)")
    p.add_argument("--watchdog", type=float, default=None, help="seconds after which to print every thread's stack "
                   "and exit")
    p.add_argument("--no-info", dest="info", action="store_false", help="skip the INFO rows (bf16 operands)")
    p.add_argument("--fused-row", action="store_true", help="time the fused walk (DIAG_PATH 'fused') as a row")
    p.add_argument("--peers", action="store_true", help="time fla's chunk kernel where it has one for the rule")
    p.add_argument("--chunk", type=int, default=None,
                   help="tokens per chunk of the split path (library.CHUNK and WIDE_CHUNK; the fused row keeps the "
                        "policy's CHUNK): d = 64 takes chunk 32 under the policy, where the split path's dots issue "
                        "mma.sync only")
    p.add_argument("--path", default=None, choices=("split", "wide", "fused"),
                   help="chunked.DIAG_PATH for the run (d = 64 takes the split path only under 'split')")
    a = p.parse_args(argv)
    a.kernels = a.kernels.split(",")
    unknown = [k for k in a.kernels if k not in CANDIDATES]
    if unknown:
        raise SystemExit(f"--kernels: unknown {', '.join(unknown)}; kernels: {', '.join(CANDIDATES)}")
    saved = (library.FORCE, library.CHUNK, library.WIDE_CHUNK, chunked.DIAG_PATH)
    try:
        _main(a)
    finally:   # a caller in the same process (the tests) keeps its own settings
        library.FORCE, library.CHUNK, library.WIDE_CHUNK, chunked.DIAG_PATH = saved


def _main(a):
    if a.watchdog:   # a call about to run out of time says where it stood (a stuck compile, a hang)
        import faulthandler
        faulthandler.dump_traceback_later(a.watchdog, exit=True)
    if a.chunk:
        library.CHUNK = library.WIDE_CHUNK = a.chunk
    library.FORCE = "chunk"
    if a.path:
        chunked.DIAG_PATH = a.path
    if torch.cuda.is_available():
        from olssm.kernels.triton import toolchain
        toolchain.check(torch.device("cuda"))
        print(f"{torch.cuda.get_device_name()}, {toolchain.ptxas_report()}")
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("kernel_sweep: no GPU; on a CPU run it under TRITON_INTERPRET=1 at a tiny shape")
    for name in a.rules.split(","):
        sweep(name, a)


if __name__ == "__main__":
    main()
