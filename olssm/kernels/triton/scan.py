"""backend="triton": compile the generated kernels, launch them, and wrap them for autograd."""
from __future__ import annotations

import importlib.util
import math
import os
import tempfile
import threading

import torch
from torch.autograd.function import once_differentiable

from ...derive.rule import _TorchPrinter
from ...objectives.core import spec_of
from . import codegen as cg
from .printer import codegen as _cse

#: tokens between saved states in the forward (the backward recomputes one chunk at a time);
#: None picks the power of two nearest sqrt(longest sequence), clamped to [8, 64], which balances
#: the checkpoints (∝ T/C states) against the backward's scratch buffer (∝ C states)
CHECKPOINT = None
#: value rows per program; None picks min(next_pow2(d_v), 32) (16 when d_k > 128)
BLOCK_V = None

_LOCK = threading.Lock()
_MODULES: dict = {}
_PLANS: dict = {}


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cache_dir() -> str:
    base = os.environ.get("OLSSM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "olssm")
    path = os.path.join(base, "triton")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".probe-{os.getpid()}")
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
        if not (os.path.exists(path) and open(path).read() == source):
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
        self.entries = cg.entries(form)
        self.cls = {n: cg.entry_class(e) for n, e in self.entries.items()}
        self.kind = {n: cg.entry_kind(e) for n, e in self.entries.items()}
        self.inkernel = cg.inkernel_entries(form)
        self.vars = [n for n in self.entries if self.cls[n] != "const" and n not in self.inkernel]
        # raw inputs of the in-kernel entries (their chain rule runs in the backward kernel)
        self.raw = sorted({x.name for n in self.inkernel for x in self.entries[n].free_symbols})
        # torch evaluation of the entries (for the backward's chain rule), printed like rule.step
        lines, out = _cse({n: self.entries[n] for n in self.vars}, _TorchPrinter())
        used = sorted({s.name for n in self.vars for s in self.entries[n].free_symbols})
        body = [f"    in_{s} = inp['{s}']" for s in used] + [f"    {ln}" for ln in lines]
        body.append("    return (" + "".join(f"{out[n]}, " for n in self.vars) + ")")
        scope = {"torch": torch}
        exec(compile("def entries(inp):\n" + "\n".join(body) + "\n", "<olssm-triton-entries>", "exec"), scope)
        self.eval_entries = scope["entries"]


def plan_for(rule) -> Plan:
    # repr(form) prints symbols by name only: the specs (kinds) are part of the key
    key = (repr(rule.form), tuple(spec_of(s) for s in cg.symbols_of(rule.form)))
    p = _PLANS.get(key)
    if p is None:
        p = _PLANS[key] = Plan(rule)
    return p


def kernel_source(rule) -> str:
    _check_rule(rule)
    return cg.module_source(rule)


def _check_rule(rule):
    if rule.is_exact:
        raise NotImplementedError(
            "triton: exact rules (sufficient statistics G, H with a solve per token) have no Triton kernel "
            "yet; use backend='chunk' or 'reference'")


def _check_device(device):
    if device.type == "cuda":
        return
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
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
    BV = BLOCK_V or min(_np2(d_v), 32 if BK <= 128 else 16)
    return BK, BV


def _auto_checkpoint(T: int) -> int:
    c = 1 << max(0, round(math.log2(max(1.0, math.sqrt(max(1, T))))))
    return max(8, min(64, c))


class _Meta:
    def __init__(self, args, names):
        self.B, self.T, self.H, self.d_k, self.d_v = args.B, args.T, args.H, args.d_k, args.d_v
        self.N = args.num_sequences
        self.cu = None if args.cu_seqlens is None else args.cu_seqlens.to(args.device).contiguous()
        self.max_len = args.T if args.cu_seqlens is None else max(
            [b - a for a, b in zip(args.cu_seqlens.tolist(), args.cu_seqlens.tolist()[1:])] + [0])
        self.names = names
        self.out_dtype = args.out_dtype
        self.params = {n for n in names if n in args.params}
        self.has_h0 = args.initial_state is not None
        self.checkpoint = int(CHECKPOINT) if CHECKPOINT else _auto_checkpoint(self.max_len)


class TritonScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, meta, *tensors):
        ins = dict(zip(meta.names, tensors))
        h0 = tensors[len(meta.names)] if meta.has_h0 else None
        dev = tensors[0].device
        B, T, H, d_k, d_v, N = meta.B, meta.T, meta.H, meta.d_k, meta.d_v, meta.N
        BK, BV = _blocks(d_k, d_v)
        NV = -(-d_v // BV)
        C = meta.checkpoint
        save = any(ctx.needs_input_grad[2:])
        NCK = max(1, -(-meta.max_len // C))
        o = torch.empty(B, T, H, d_v, dtype=meta.out_dtype, device=dev)
        ht = torch.empty(N, H, d_v, d_k, dtype=torch.float32, device=dev)
        ck = torch.empty(N, H, NCK, d_v, d_k, dtype=torch.float32, device=dev) if save else ht
        dummy = ht
        ptrs = [ins[s.name].contiguous() for s in plan.syms]
        plan.module.fwd_kernel[(NV, N * H)](
            *ptrs, o, h0.contiguous() if h0 is not None else dummy, ht, ck,
            meta.cu if meta.cu is not None else dummy, T, H, d_k, d_v, NCK,
            BK=BK, BV=BV, C=C, USE_H0=h0 is not None, STORE_HT=True, SAVE_CK=save,
            VARLEN=meta.cu is not None)
        ctx.plan, ctx.meta = plan, meta
        if save:
            ctx.save_for_backward(ck, *tensors)
        return o, ht

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):
        plan, meta = ctx.plan, ctx.meta
        ck, *tensors = ctx.saved_tensors
        ins = dict(zip(meta.names, tensors))
        h0 = tensors[len(meta.names)] if meta.has_h0 else None
        B, T, H, d_k, d_v, N = meta.B, meta.T, meta.H, meta.d_k, meta.d_v, meta.N
        dev = ck.device
        BK, BV = _blocks(d_k, d_v)
        NV = -(-d_v // BV)
        C = meta.checkpoint
        NCK = ck.shape[2]
        TOK = B * T
        need = ctx.needs_input_grad[2:]
        # evaluate the entries in torch, under autograd, for the chain rule to the raw inputs
        leaves = {n: tensors[i].detach().requires_grad_(need[i]) for i, n in enumerate(meta.names)}
        with torch.enable_grad():
            lay = plan.rule.broadcast_inputs(d_k, d_v, leaves, "scan", need=plan.rule.inputs)
            vals = plan.eval_entries(lay)
            E, D = [], []
            for n, val in zip(plan.vars, vals):
                kind = plan.kind[n]
                RV = d_v if cg.HAS_ROWS[kind] else 1
                CK = d_k if cg.HAS_COLS[kind] else 1
                val = torch.as_tensor(val, dtype=torch.float32, device=dev)
                if plan.cls[n] == "token":
                    val = torch.broadcast_to(val, (B, T, H, RV, CK)).reshape(TOK, H, RV, CK)
                    X = TOK
                else:
                    val = torch.broadcast_to(val, (H, RV, CK))
                    X = N
                val = val.to(torch.float32).contiguous()
                P = 1 if cg.HAS_ROWS[kind] else NV
                E.append(val)
                D.append(torch.zeros(P, X, H, RV, CK, dtype=torch.float32, device=dev))
        specs = plan.rule.inputs
        X, RG = [], []
        for x in plan.raw:
            sx = specs[x]
            RV = d_v if cg.HAS_ROWS[sx.kind] else 1
            CK = d_k if cg.HAS_COLS[sx.kind] else 1
            P = 1 if cg.HAS_ROWS[sx.kind] else NV
            X.append(ins[x].contiguous())
            RG.append(torch.zeros(P, N if sx.is_parameter else TOK, H, RV, CK, dtype=torch.float32, device=dev))
        dh0 = torch.empty(N, H, d_v, d_k, dtype=torch.float32, device=dev)
        scratch = torch.empty(N * H * NV * C * BV * BK, dtype=torch.float32, device=dev)
        do = do.contiguous() if do is not None else torch.zeros(B, T, H, d_v, dtype=torch.float32, device=dev)
        plan.module.bwd_kernel[(NV, N * H)](
            *[e.detach() for e in E], *X, *D, *RG, do, dht.contiguous() if dht is not None else dh0, dh0, ck, scratch,
            meta.cu if meta.cu is not None else dh0, T, TOK, N, H, d_k, d_v, NCK,
            BK=BK, BV=BV, C=C, USE_DHT=dht is not None, VARLEN=meta.cu is not None)
        grads_out = []
        for n, e, d in zip(plan.vars, E, D):
            g = d.sum(0)
            if plan.cls[n] == "param":
                g = g.sum(0)
            grads_out.append(g)
        want = [leaves[n] for i, n in enumerate(meta.names) if need[i]]
        res = {}
        if want:
            pairs = [(e, g) for e, g in zip(E, grads_out) if e.requires_grad]
            if pairs:
                gs = torch.autograd.grad([e for e, _ in pairs], want, [g for _, g in pairs], allow_unused=True)
                res = {id(w): g for w, g in zip(want, gs) if g is not None}
        for x, rg in zip(plan.raw, RG):   # gradients the kernel pushed to raw inputs itself
            i = meta.names.index(x)
            if need[i]:
                g = rg.sum(0)
                g = (g.sum(0) if specs[x].is_parameter else g).reshape(tensors[i].shape)
                prev = res.get(id(leaves[x]))
                res[id(leaves[x])] = g if prev is None else prev + g
        out = []
        for i, n in enumerate(meta.names):
            if need[i]:
                g = res.get(id(leaves[n]))
                out.append(torch.zeros_like(tensors[i]) if g is None else g.to(tensors[i].dtype))
            else:
                out.append(None)
        if meta.has_h0:
            out.append(dh0.to(h0.dtype) if ctx.needs_input_grad[2 + len(meta.names)] else None)
        return (None, None, *out)


def triton_scan(args):
    """o [B, T, H, d_v] (args.out_dtype) and the final state [N, H, d_v, d_k] fp32 (or None).

    Runs through the torch.library ops of library.py (torch.compile-able; chunked kernels when
    the rule's structure has them, chunked.py); `_triton_scan_function` is the former
    autograd.Function path, kept for comparison."""
    from .library import run_scan
    return run_scan(args)


def _triton_scan_function(args):
    rule = args.rule
    _check_rule(rule)
    _check_device(args.device)
    if args.initial_state is not None:
        _check_device(args.initial_state.device)
        if args.initial_state.device != args.device:
            raise ValueError(f"scan: initial_state is on {args.initial_state.device}, inputs on {args.device}")
    plan = plan_for(rule)
    names = [s.name for s in plan.syms]
    ins = {**args.tokens, **args.params}
    tensors = [ins[n] for n in names]
    if args.initial_state is not None:
        tensors.append(args.initial_state)
    meta = _Meta(args, names)
    if args.T == 0:
        raise ValueError("scan: T must be >= 1")
    o, ht = TritonScanFn.apply(plan, meta, *tensors)
    return o, (ht if args.output_final_state else None)


def triton_decode(rule, state, **inputs):
    """One token with the fused kernel: (o [B, H, d_v], S_t [B, H, d_v, d_k] fp32) from
    S_{t-1} [B, H, d_v, d_k] and per-token inputs [B, H, ...] (parameters [H, ...]).

    The same forward kernel with T = 1 and the state as initial_state (differentiable too);
    meant for `rule.step`/decoding on CUDA, where it saves the torch step's many small kernels.
    """
    from ..api import scan
    specs = rule.inputs
    tok = {n: (x if specs[n].is_parameter else x.unsqueeze(1)) for n, x in inputs.items()}
    o, new = scan(rule, initial_state=state, output_final_state=True, backend="triton", **tok)
    return o[:, 0], new
