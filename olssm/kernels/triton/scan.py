"""backend="triton": compile the generated kernels, launch them, and wrap them for autograd."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
import tempfile
import threading
import weakref

import sympy as sp
import torch

from ...derive.rule import _TorchPrinter
from ...objectives.core import spec_of
from . import codegen as cg
from .printer import codegen as _cse

#: tokens between saved states in the forward (the backward recomputes one chunk at a time);
#: None picks the power of two nearest sqrt(longest sequence), clamped to [8, 64], which balances
#: the checkpoints (∝ T/C states) against the backward's scratch buffer (∝ C states)
CHECKPOINT = None
#: value rows per program; None picks min(next_pow2(d_v), 8). With 1 warp (loop_warps; fla's fused_recurrent
#: forward geometry, its backward takes 32 rows on 2 warps) a program holds the same [BV, BK] state per thread as
#: 32 rows on 4 warps did, and there are 4x the programs: at (2, 8192, 16, 128) bf16 the old 32 rows / 4 warps
#: made 128 programs for 132 SMs. H200, one process (benchmarks/RESULTS.md, session 8): DeltaNet 20.08 / 79.19 ->
#: 9.22 / 41.45 ms fwd / fwd+bwd (fla's fused_recurrent, another process: 9.68 / 55.92), Gated DeltaNet
#: 18.77 / 84.56 -> 9.88 / 39.07. Not timed at d = 64 (the same 128 programs at B = 4 there). The autotuner still
#: tries 16 / 2 and 32 / 4
BLOCK_V = None
#: warps per program of the recurrent kernels (see BLOCK_V); None: loop_warps
NUM_WARPS = None


def loop_warps(BK: int) -> int:
    """Warps per recurrent program: NUM_WARPS, else 1, and 2 when BK > 128, so that a thread's share of a
    [8, BK] state tile stays at most 32 elements up to d_k = 256 (the in-kernel reverse mode holds ~15 such
    tiles)."""
    return int(NUM_WARPS) if NUM_WARPS else 1 if BK <= 128 else 2


_LOCK = threading.Lock()
_MODULES: dict = {}
_PLANS: dict = {}
_RULE_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def form_key(form) -> str:
    """A normal form as text for cache keys, its expressions in sympy's srepr, whose Floats carry every digit
    (repr prints 15: rules whose constants differed past them shared one plan and one op)."""
    if dataclasses.is_dataclass(form):
        return f"{type(form).__name__}(" + ", ".join(f"{f.name}={form_key(getattr(form, f.name))}"
                                                       for f in dataclasses.fields(form)) + ")"
    if isinstance(form, (tuple, list)):
        return "(" + ", ".join(form_key(x) for x in form) + ",)"
    return sp.srepr(form) if isinstance(form, sp.Basic) else repr(form)


def cache_dir() -> str:
    base = os.environ.get("OLSSM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "olssm")
    path = os.path.join(base, "triton")
    try:
        os.makedirs(path, exist_ok=True)
        # one probe file per thread: another thread removing a shared one made this one fall back to the temp dir
        probe = os.path.join(path, f".probe-{os.getpid()}-{threading.get_ident()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError:
        path = os.path.join(tempfile.gettempdir(), f"olssm-triton-{os.getuid() if hasattr(os, 'getuid') else 0}")
        os.makedirs(path, exist_ok=True)
    return path


def _load_module(source: str):
    """Write the generated source to the cache dir (keyed by its hash) and import it:
    triton.jit needs functions that live in a real source file."""
    key = cg.source_hash(source)
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        path = os.path.join(cache_dir(), f"olssm_{key}.py")
        if not (os.path.exists(path) and pathlib.Path(path).read_text() == source):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(source)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(f"olssm_triton_{key}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _MODULES[key] = mod
        return mod


class Plan:
    """Everything derived once per normal form: the kernels and the torch entry evaluator."""

    def __init__(self, rule):
        form = rule.form
        self.rule = rule
        self.source = cg.module_source(rule)
        self.module = _load_module(self.source)
        self.syms = cg.symbols_of(form)
        t = cg.entry_table(form)
        self.entries, self.cls, self.kind, self.inkernel, self.vars = t.entries, t.cls, t.kind, t.inkernel, t.vars
        # names of the raw inputs of the in-kernel entries (their chain rule runs in the backward kernel)
        self.raw = [x.name for x in t.raw]
        # torch evaluation of the entries (for the backward's chain rule), printed like rule.step
        lines, out = _cse({n: self.entries[n] for n in self.vars}, _TorchPrinter())
        used = sorted({s.name for n in self.vars for s in self.entries[n].free_symbols})
        body = [f"    in_{s} = inp['{s}']" for s in used] + [f"    {ln}" for ln in lines]
        body.append("    return (" + "".join(f"{out[n]}, " for n in self.vars) + ")")
        scope = {"torch": torch}
        exec(compile("def entries(inp):\n" + "\n".join(body) + "\n", "<olssm-triton-entries>", "exec"), scope)
        self.eval_entries = scope["entries"]


@torch.compiler.disable   # sympy code generation is not traceable (torch 2.11's dynamo fails inside sp.cse)
def plan_for(rule) -> Plan:
    # remembered per rule object (rules are immutable), so that a call does not print its form again (~0.2 ms
    # a scan), and weakly, so that the rule stays picklable and collectable; form_key: every constant to full
    # precision; symbols print by name only, so the specs (kinds) join the key
    p = _RULE_PLANS.get(rule)
    if p is None:
        key = (form_key(rule.form), tuple(spec_of(s) for s in cg.symbols_of(rule.form)))
        p = _PLANS.get(key)
        if p is None:
            p = _PLANS[key] = Plan(rule)
        _RULE_PLANS[rule] = p
    return p


def kernel_source(rule) -> str:
    if rule.is_rls:
        from .rls import kernel_source as rls_source
        return rls_source(rule)
    if rule.is_exact:
        from .exact import g_rule
        form = rule.form
        header = ("# exact rule: x_t = (H_t + diag λ)⁻¹ q_t is solved in torch (chunk backend); this is the\n"
                  "# generated scan of its G statistics, o_t = G_t x_t (olssm/kernels/triton/exact.py)\n")
        return header + cg.module_source(g_rule(len(form.moments), form.decay_kind != "none"))
    _check_rule(rule)
    return cg.module_source(rule)


def _check_rule(rule):
    if rule.is_rls:
        raise NotImplementedError(
            "triton: recursive-least-squares rules run through olssm.kernels.scan(backend='triton') (a gain "
            "scan for P, then the generated kernels for S's scan: triton/rls.py), not through the normal-form "
            "kernels directly")
    if rule.is_exact:
        raise NotImplementedError(
            "triton: exact rules run through olssm.kernels.scan(backend='triton') (a torch solve per token "
            "and the generated kernels for G's scan), not through the normal-form kernels directly")


def interpreted() -> bool:
    """Whether TRITON_INTERPRET asks for the CPU interpreter (kernels interpreted, not compiled)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")


def _check_device(device):
    if device.type == "cuda":
        from . import toolchain
        toolchain.check(device)   # once per device: Triton's bundled ptxas miscompiles on Hopper (toolchain.py)
        return
    if interpreted():
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(tl.standard.sum, InterpretedFunction):
            raise RuntimeError("triton backend on CPU: TRITON_INTERPRET=1 was set after triton.language was "
                               "imported, so the interpreter is not active; set it before the first import of "
                               "triton (e.g. at the top of the test file or in the shell)")
        return
    raise RuntimeError("triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for the CPU interpreter "
                       f"(got tensors on {device}; set the variable before triton is first imported)")


def _blocks(d_k, d_v):
    BK = _np2(d_k)
    BV = BLOCK_V or min(_np2(d_v), 8)
    return BK, BV


def _auto_checkpoint(T: int) -> int:
    c = 1 << max(0, round(math.log2(max(1.0, math.sqrt(max(1, T))))))
    return max(8, min(64, c))


def longest(T: int, cu_seqlens) -> int:
    """The longest sequence: T, or the longest packed one of cu_seqlens."""
    if cu_seqlens is None:
        return T
    cu = cu_seqlens.tolist()
    return max([b - a for a, b in zip(cu, cu[1:])] + [0])


def checkpoint_interval(max_len: int) -> int:
    """Tokens between the states a recurrent forward saves for its backward (CHECKPOINT, else ≈ √max_len)."""
    return int(CHECKPOINT) if CHECKPOINT else _auto_checkpoint(max_len)


class _Meta:
    def __init__(self, args, names):
        self.B, self.T, self.H, self.d_k, self.d_v = args.B, args.T, args.H, args.d_k, args.d_v
        self.N = args.num_sequences
        self.cu = None if args.cu_seqlens is None else args.cu_seqlens.to(args.device).contiguous()
        self.max_len = longest(args.T, args.cu_seqlens)
        self.names = names
        self.out_dtype = args.out_dtype
        self.params = {n for n in names if n in args.params}
        self.has_h0 = args.initial_state is not None
        self.checkpoint = checkpoint_interval(self.max_len)


def triton_scan(args):
    """o [B, T, H, d_v] (args.out_dtype) and the final state [N, H, d_v, d_k] fp32 (or None).

    Runs through the torch.library ops of library.py (torch.compile-able; chunked kernels when
    the rule's structure has them, chunked.py)."""
    from .library import run_scan
    return run_scan(args)


def triton_decode(rule, state, **inputs):
    """One token with the fused kernel: (o [B, H, d_v], S_t [B, H, d_v, d_k] fp32) from
    S_{t-1} [B, H, d_v, d_k] and per-token inputs [B, H, ...] (parameters [H, ...]).

    The same forward kernel with T = 1 and the state as initial_state (differentiable too);
    meant for `rule.step`/decoding on CUDA, where it saves the torch step's many small kernels.
    """
    from ..api import scan
    specs = rule.inputs
    unknown = sorted(set(inputs) - set(specs))
    if unknown:
        raise ValueError(f"decode: unexpected input(s) {unknown}; this rule reads {sorted(specs)}")
    for st in (state if rule.is_exact else (state,)):
        if not torch.is_tensor(st) or st.dim() != 4:
            raise ValueError("decode(backend='triton'): the state must be [B, H, d_v, d_k] (exact rules: a pair with "
                             f"H [B, H, d_k, d_k]), got {tuple(getattr(st, 'shape', ())) or type(st).__name__}; "
                             "backend='torch' takes any leading shape")
    tok = {n: (x if specs[n].is_parameter else x.unsqueeze(1)) for n, x in inputs.items()}
    try:
        o, new = scan(rule, initial_state=state, output_final_state=True, backend="triton", **tok)
    except ValueError as e:   # scan's checks, in decode's terms: the token axis (T = 1) is decode's own
        raise ValueError(f"decode(backend='triton') runs scan on one token [B, 1, H, ...] with the state as "
                         f"initial_state; per-token inputs are [B, H, ...]: {e}") from None
    return o[:, 0], new
