"""The public scan entry point: argument checking shared by every backend, then dispatch."""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import os

import sympy
import torch

from ..derive import Rule, derive
from ..objectives.core import COLUMN, ELEMENTWISE, ROW, SCALAR, Objective

BACKENDS = ("auto", "reference", "chunk", "triton")


@dataclasses.dataclass
class ScanArgs:
    """Validated scan inputs: token inputs [B, T, H, ...], parameters [H, ...], sizes."""

    rule: Rule
    tokens: dict          # name -> tensor [B, T, H] / [B, T, H, d]
    params: dict          # name -> tensor [H] / [H, d] / [H, d_v, d_k]
    B: int
    T: int
    H: int
    d_k: int
    d_v: int
    out_dtype: torch.dtype
    device: torch.device
    initial_state: object  # None, tensor [N, H, d_v, d_k] or (G, H) pair
    cu_seqlens: torch.Tensor | None
    output_final_state: bool
    chunk_size: int | None = None   # tokens per chunk of the chunk-parallel algorithms (None: the backend's)

    @property
    def state_dtype(self) -> torch.dtype:
        """The torch backends' state math: fp64 when any input is fp64 (verification), else fp32 (the triton
        kernels: always fp32)."""
        wide = any(x.dtype == torch.float64 for x in (*self.tokens.values(), *self.params.values()))
        return torch.float64 if wide else torch.float32

    @property
    def num_sequences(self) -> int:
        return self.B if self.cu_seqlens is None else len(self.cu_seqlens) - 1

    def pieces(self):
        """What a token loop scans at once: (batch rows, start, end, state rows) — the whole batch, or each
        packed sequence as a batch of one (scan_pieces)."""
        return scan_pieces(self.B, self.T, self.cu_seqlens)

    def segments(self):
        """(batch index, start, end, state index) of each sequence."""
        if self.cu_seqlens is None:
            return [(b, 0, self.T, b) for b in range(self.B)]
        cu = self.cu_seqlens.tolist()
        return [(0, cu[n], cu[n + 1], n) for n in range(len(cu) - 1)]


def scan_pieces(B: int, T: int, cu_seqlens):
    """(batch rows, start, end, state rows) of each piece a token loop scans at once: all B rows over
    [0, T), or each packed sequence of cu_seqlens as a batch of one."""
    if cu_seqlens is None:
        return [(slice(None), 0, T, slice(None))]
    cu = cu_seqlens.tolist()
    return [(slice(0, 1), cu[n], cu[n + 1], slice(n, n + 1)) for n in range(len(cu) - 1)]


def _shape(x):
    return tuple(x.shape)


def _majority(values: list):
    """The value most entries have (ties: the first in the list, which puts keys, queries and values first):
    the entry that disagrees is then the one an error names."""
    return max(dict.fromkeys(values), key=values.count)


def expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """[B, T, G, ...] -> [B, T, H, ...] for G dividing H: head h reads group h // (H / G), the grouping of
    Mamba-2's B/C (ngroups), fla's grouped-value heads and grouped-query attention. G = 1 is a view;
    otherwise a copy (no stride repeats each group H / G times). Gradients sum over each group."""
    G = x.shape[2]
    if G == H:
        return x
    if G < 1 or H % G:
        raise ValueError(f"expand_heads: {G} heads do not divide H = {H}")
    if G == 1:
        return x.expand(*x.shape[:2], H, *x.shape[3:])
    return x.repeat_interleave(H // G, dim=2)


#: the values each input domain admits, as far as the backends need them (closed bounds: a decay of exactly 0 or 1, a
#: gate at 0, are meant), and whether −inf is one of them (a log decay of −inf is a decay of exactly 0). A decay's
#: upper bound (log Λ ≤ 0) is what the chunked forms' factorised products assume; a "unit" input above 1 is computed
#: alike by every backend (DeltaNet's β ∈ (0, 2), negative eigenvalues: fla's allow_neg_eigval), so only its sign is
#: checked
_DOMAIN_BOUNDS = {"real": (None, None, False), "positive": (0.0, None, False), "unit": (0.0, None, False),
                  "decay": (0.0, 1.0, False), "timestep": (0.0, None, False), "negative": (None, 0.0, False),
                  "log_decay": (None, 0.0, True)}


def check_inputs_mode() -> str:
    """Whether scan checks its inputs' values here: OLSSM_CHECK_INPUTS "auto" (default: on CPU tensors, where the
    check is a few passes beside the scan's; on a GPU it is a host sync per call, so off), "1" (everywhere), "0"."""
    mode = os.environ.get("OLSSM_CHECK_INPUTS", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"OLSSM_CHECK_INPUTS must be 'auto', '0' or '1', got {mode!r}")
    return mode


def checks_on(mode: str, device) -> bool:
    """Whether the value checks (check_input_values, rls.check_rls_values) look at tensors on this device now, under
    check_inputs_mode() `mode`: not while torch.compile traces or inside an inner scan, not on the meta device, and
    under "auto" on the CPU only."""
    return (mode != "0" and not torch.compiler.is_compiling() and not _INNER_SCAN.get()
            and device.type != "meta" and (mode == "1" or device.type == "cpu"))


def check_input_values(inputs: dict, need: dict, initial_state=None, caller: str = "scan",
                       state_name: str = "initial_state") -> None:
    """A value no input of its domain can take is an error naming the input (CHUNK.md, "Input values"): NaN or ±inf
    anywhere (−inf allowed in a log decay), or outside the declared domain (a decay above 1 or below 0, a negative
    gate or timestep, a positive Mamba A). Unchecked, the backends disagreed: the chunked forms' matmuls spread a NaN
    to every token of its chunk (the token loops keep it causal), a negative decay was an error on the log paths
    and multiplied through by the loops, a β making Longhorn's ε infinite gave inf silently."""
    mode = check_inputs_mode()
    pair = isinstance(initial_state, (tuple, list))
    states = [] if initial_state is None else list(initial_state) if pair else [initial_state]
    named = [*inputs.items(),
             *((f"{state_name}[{i}]" if pair else state_name, st) for i, st in enumerate(states)
               if torch.is_tensor(st))]
    for n, x in named:
        if (x.numel() == 0 or not checks_on(mode, x.device)
                or torch._C._functorch.is_functorch_wrapped_tensor(x)):   # vmap / grad transforms: no .item()
            continue
        spec = need.get(n)
        domain = spec.domain if spec is not None else "real"
        lo, hi, minus_inf = _DOMAIN_BOUNDS.get(domain, (None, None, False))
        x = x.detach()
        # one reduction, no token-sized temporary (min and max carry a NaN); the index only once something is wrong
        mn, mx = (float(t) for t in torch.aminmax(x))
        what = None
        if math.isnan(mn) or mx == math.inf or (mn == -math.inf and not minus_inf):
            what, where = "NaN or infinite values", torch.isnan(x) | torch.isinf(x) & ((x > 0) | (not minus_inf))
        elif lo is not None and mn < lo:
            what, where = f"values below {lo:g} (min {mn:.3g})", x < lo
        elif hi is not None and mx > hi:
            what, where = f"values above {hi:g} (max {mx:.3g})", x > hi
        if what:
            first = tuple(int(i) for i in where.nonzero()[0].tolist())
            label = (state_name.replace("_", " ") if spec is None else
                     f"{'parameter' if spec.is_parameter else spec.role}, domain {domain!r}")
            fix = ("a diverged run?" if what.startswith("NaN") else
                   f"declare the input with a domain that admits them ({', '.join(_ADMITTING)}) where such values "
                   "are meant")
            raise ValueError(f"{caller}: {n!r} ({label}) has {what}, first at index {first}, which its domain rules "
                             f"out ({_DOMAIN_TEXT.get(domain, 'finite')}): {fix} (OLSSM_CHECK_INPUTS=0 skips this check)")


#: set while a backend scans inputs it formed from checked ones (RLS's inner scan of S: olssm_g, olssm_u, ...)
_INNER_SCAN = contextvars.ContextVar("olssm_inner_scan", default=False)


@contextlib.contextmanager
def inner_scan():
    """Scans inside this block skip check_input_values: their inputs were formed from inputs already checked."""
    token = _INNER_SCAN.set(True)
    try:
        yield
    finally:
        _INNER_SCAN.reset(token)


_ADMITTING = ("domain='real'", "'positive' for a growth factor")
_DOMAIN_TEXT = {"real": "finite", "positive": "finite, ≥ 0", "unit": "finite, ≥ 0", "decay": "in [0, 1]",
                "timestep": "finite, ≥ 0", "negative": "finite, ≤ 0", "log_decay": "≤ 0, −inf allowed"}


def check_scan_args(rule, q, k, v, *, initial_state, output_final_state, cu_seqlens, inputs,
                    chunk_size=None) -> ScanArgs:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"scan: chunk_size must be a positive int (or None: the backend's default), got {chunk_size!r}")
    if isinstance(rule, Objective):
        rule = derive(rule)
    if not isinstance(rule, Rule):
        raise TypeError(f"scan: expected a Rule or Objective, got {type(rule).__name__}")
    given = dict(inputs)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is not None:
            if name in given:
                raise TypeError(f"scan: {name!r} given twice")
            given[name] = x
    need = rule.inputs
    missing = [n for n in need if given.get(n) is None]
    unknown = sorted(n for n, x in given.items() if n not in need and x is not None)
    if missing:   # (with the unexpected ones: a misspelt betta= had been reported as a missing beta only)
        raise ValueError("scan: missing input(s) " + ", ".join(repr(m) for m in missing)
                         + (f" (and unexpected {unknown})" if unknown else "") + "; this rule reads "
                         + ", ".join(f"{n} ({s.role}, {s.kind})" for n, s in need.items()))
    if unknown:
        raise ValueError(f"scan: unexpected input(s) {unknown}; this rule reads {sorted(need)}")
    tokens = {n: given[n] for n, s in need.items() if not s.is_parameter}
    params = {n: given[n] for n, s in need.items() if s.is_parameter}
    for n, x in given.items():
        if n in need:
            if not torch.is_tensor(x):
                raise TypeError(f"scan: input {n!r} must be a torch.Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"scan: input {n!r} must be floating point (fp32/bf16/fp16), got {x.dtype}")
    # (B, T), H and the sizes are the ones most inputs agree on, so that the input that disagrees is the one named
    ordered = sorted(tokens, key=lambda n: (need[n].role not in ("key", "query", "value"), n))
    first = tokens[ordered[0]] if ordered else None
    if first is None or first.dim() < 3:
        raise ValueError("scan: needs per-token inputs laid out [B, T, H, ...]")
    B, T = _majority([tuple(tokens[n].shape[:2]) for n in ordered if tokens[n].dim() >= 3])
    # H: the value-sized and scalar inputs' head count by vote; key-sized ones (maybe grouped) only break a tie
    heads = [tokens[n].shape[2] for n in ordered if tokens[n].dim() >= 3 and need[n].kind != COLUMN]
    key_heads = [tokens[n].shape[2] for n in ordered if tokens[n].dim() >= 3 and need[n].kind == COLUMN]
    if heads:
        top = max(heads.count(h) for h in heads)
        H = max(dict.fromkeys(h for h in heads if heads.count(h) == top), key=key_heads.count)
    else:
        H = max(key_heads)                                   # keys only: the ungrouped ones have the most heads
    # the key and value sizes by the same vote (a wrong beta must not blame v)
    sizes = {kind: [tokens[n].shape[-1] for n in ordered if need[n].kind == kind and tokens[n].dim() == 4]
             for kind in (COLUMN, ROW)}
    d_k = _majority(sizes[COLUMN]) if sizes[COLUMN] else None
    d_v = _majority(sizes[ROW]) if sizes[ROW] else None
    for n, x in tokens.items():
        s = need[n]
        nd = 3 if s.kind == SCALAR else 4
        grouped = s.kind == COLUMN and x.dim() == nd and x.shape[2] >= 1 and H % x.shape[2] == 0
        if x.dim() != nd or _shape(x)[:2] != (B, T) or not (x.shape[2] == H or grouped):
            lay = "[B, T, H]" if s.kind == SCALAR else "[B, T, H, d]"
            also = " or [B, T, G, d] with G dividing H (grouped heads)" if s.kind == COLUMN else ""
            raise ValueError(f"scan: input {n!r} ({s.role}) must be {lay}{also} with (B, T, H) = {(B, T, H)}, "
                             f"got {_shape(x)}")
        if x.shape[2] != H:
            tokens[n] = x = expand_heads(x, H)
        if s.kind == COLUMN and x.shape[-1] != d_k:
            raise ValueError(f"scan: input {n!r} has key size {x.shape[-1]}, other key-sized inputs have {d_k}")
        if s.kind == ROW and x.shape[-1] != d_v:
            raise ValueError(f"scan: input {n!r} has value size {x.shape[-1]}, other value-sized inputs have {d_v}")
    # a size no per-token input carries may be a parameter's ([H, d_v] row, [H, d_k] column, [H, d_v, d_k] matrix:
    # −⟨S, M⟩ reads no value input), checked against the rest below like any parameter
    for n, x in params.items():
        kind = need[n].kind
        if d_v is None and kind in (ROW, ELEMENTWISE) and x.dim() == (2 if kind == ROW else 3):
            d_v = x.shape[1]
        if d_k is None and kind in (COLUMN, ELEMENTWISE) and x.dim() == (2 if kind == COLUMN else 3):
            d_k = x.shape[-1]
    if d_k is None or d_v is None:
        st = initial_state[0] if isinstance(initial_state, (tuple, list)) else initial_state
        if st is None:
            unknown = [f"{d} (it reads no {kind}-sized input)"
                       for d, kind, size in (("d_k", "key", d_k), ("d_v", "value", d_v)) if size is None]
            raise ValueError(f"scan: cannot infer {' or '.join(unknown)}; pass initial_state, whose shape "
                             "[B, H, d_v, d_k] gives it")
        d_v, d_k = (d_v or st.shape[-2]), (d_k or st.shape[-1])
    for n, x in params.items():
        s = need[n]
        want = {SCALAR: (H,), ROW: (H, d_v), COLUMN: (H, d_k), ELEMENTWISE: (H, d_v, d_k)}[s.kind]
        if _shape(x) != want:
            raise ValueError(f"scan: parameter {n!r} ({s.kind}) must have shape {want} (per head), got {_shape(x)}")
    device = first.device
    for n, x in {**tokens, **params}.items():
        if x.device != device:
            raise ValueError(f"scan: input {n!r} is on {x.device}, others on {device}")
    if cu_seqlens is not None:
        if not torch.is_tensor(cu_seqlens):
            raise TypeError(f"scan: cu_seqlens must be a 1-D int32/int64 tensor [N+1] of cumulative lengths, got "
                            f"{type(cu_seqlens).__name__}")
        if B != 1:
            raise ValueError(f"scan: with cu_seqlens the sequences are packed along T and B must be 1, got B={B}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
            raise ValueError("scan: cu_seqlens must be a 1-D int32/int64 tensor [N+1] of cumulative lengths")
        c = cu_seqlens.tolist()
        if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"scan: cu_seqlens must start at 0, end at T={T} and not decrease; got {c}")
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if rule.is_rls and initial_state is None and output_final_state:
        # P_0 = I/λ is read at a sequence's first token: an empty one has none, and no final state to return
        per_token = sorted(s.name for s in sympy.sympify(rule.form.ridge).free_symbols if s.name in tokens)
        empty = ([i for i, (a, b) in enumerate(zip(c, c[1:])) if a == b] if cu_seqlens is not None
                 else list(range(N)) if T == 0 else [])
        if per_token and empty:
            raise ValueError(f"scan: sequence(s) {empty} have no tokens, and this RLS rule's ridge reads per-token "
                             f"input(s) {per_token}: P_0 = I/λ has no token to read λ from, so their final state is "
                             "undefined; pass initial_state, or output_final_state=False")
    if initial_state is not None:
        shapes = rule.state_shape(d_k, d_v)
        sts = initial_state if rule.is_exact else (initial_state,)
        if rule.is_exact and not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
            raise ValueError("scan: an exact rule's initial_state is a pair (G [N, H, d_v, d_k], H [N, H, d_k, d_k])")
        for st, shp in zip(sts, shapes if rule.is_exact else (shapes,)):
            if not torch.is_tensor(st) or _shape(st) != (N, H, *shp):
                raise ValueError(f"scan: initial_state must have shape {(N, H, *shp)} "
                                 f"({'sequences' if cu_seqlens is not None else 'batch'}, heads, state), "
                                 f"got {_shape(st) if torch.is_tensor(st) else type(st).__name__}")
            if not st.is_floating_point():   # an int state was taken and rounded silently
                raise ValueError(f"scan: initial_state must be a floating-point tensor, got {st.dtype}")
    # the caller's tensors (a grouped key before expand_heads): the index named is one of theirs
    check_input_values({n: given[n] for n in need}, need, initial_state)
    out_dtype = next((tokens[n] for n in ordered if need[n].role == "value"), first).dtype
    return ScanArgs(rule, tokens, params, B, T, H, d_k, d_v, out_dtype, device, initial_state,
                    cu_seqlens, output_final_state, chunk_size)


def scan(rule, q=None, k=None, v=None, *, initial_state=None, output_final_state=False, backend="auto",
         cu_seqlens=None, chunk_size=None, **inputs):
    """Run a rule over a sequence: o [B, T, H, d_v] and (if asked) the final state(s) in fp32 (fp64 on the torch
    backends when an input is fp64: ScanArgs.state_dtype).

    Per-token inputs are [B, T, H, ...]; key-sized ones (keys, queries, column coefficients) may be
    grouped, [B, T, G, d_k] with G dividing H: head h reads group h // (H / G) (Mamba-2's ngroups,
    grouped-value heads). H is then the head count of the value-sized and scalar inputs.

    backend: "reference" (step loop, the oracle), "chunk" (chunk-parallel torch), "triton"
    (generated kernels; CUDA or TRITON_INTERPRET=1), "auto" (triton on CUDA, chunk on CPU and for exact
    sufficient-statistics rules: auto_backend).

    chunk_size: tokens per chunk of the chunk-parallel algorithms, None for each backend's own: the chunk backend's
    (chunk.CHUNK_SIZE, 64; any positive int) and the triton backend's chunked kernels (library.chunk_size's policy,
    or the autotuner's pick; a power of two up to library.MAX_CHUNK, at least 16 when compiled). Rank-R rules count
    it in sub-tokens (about chunk_size / R tokens per chunk; kernels/CHUNK.md §2). Paths without chunks (the
    reference, the token-loop kernels and engines) do not read it.
    """
    if backend not in BACKENDS:
        # "recurrent" is a layer's backend (OnlineSSM's token loop over rule.decode); a probe reached for it here
        hint = ("; 'recurrent' is OnlineSSM's token loop over rule.decode (loop yourself with rule.decode, or take "
                "'reference', the step loop)" if backend == "recurrent" else "")
        raise ValueError(f"scan: backend must be one of {BACKENDS}, got {backend!r}{hint}")
    args = check_scan_args(rule, q, k, v, initial_state=initial_state, output_final_state=output_final_state,
                           cu_seqlens=cu_seqlens, inputs=inputs, chunk_size=chunk_size)
    if backend == "auto":
        backend = auto_backend(args.rule, args.device)
    if args.T == 0 or args.B == 0 or args.H == 0 or args.d_k == 0 or (args.d_v == 0 and not args.rule.is_exact):
        return _nothing_to_scan(args)
    if args.rule.is_rls:
        from .rls import check_rls_values
        check_rls_values(args, torch.float32 if backend == "triton" else args.state_dtype)   # rls_scan's P dtype
    elif args.rule.is_exact:
        from .rls import check_ridge_values
        check_ridge_values(args)
    # under torch.autocast the backends' matmuls (chunk products, UT inverses, exact solves) would run in bf16 and
    # the fp32 state would be only bf16-accurate (DeltaNet's o off by 6e-3 relative): the scan keeps its own dtypes
    with _autocast_off(args.device):
        return _dispatch(args, backend)


def _autocast_off(device):
    kind = torch.device(device).type
    try:
        on = torch.is_autocast_enabled(kind)
    except (RuntimeError, TypeError, ValueError):   # a device type autocast does not know (meta)
        on = False
    return torch.autocast(kind, enabled=False) if on else contextlib.nullcontext()


def _dispatch(args: ScanArgs, backend: str):
    if backend == "reference":
        from .reference import reference_scan
        return reference_scan(args)
    if backend == "chunk" and args.rule.is_rls:
        # the gain (Riccati) recursion as a torch loop, S's scan by the chunk engines (rls.py)
        from .rls import rls_scan, torch_gain_scan
        return rls_scan(args, torch_gain_scan, "chunk")
    if backend == "chunk":
        from .chunk import chunk_scan
        return chunk_scan(args)
    if args.rule.is_rls:
        from .triton.rls import triton_rls_scan
        return triton_rls_scan(args)
    if args.rule.is_exact:
        from .triton.exact import triton_exact_scan
        return triton_exact_scan(args)
    from .triton import triton_scan
    return triton_scan(args)


def auto_backend(rule: Rule, device) -> str:
    """What backend="auto" runs: triton on CUDA, chunk elsewhere — and chunk for exact (sufficient-statistics)
    rules on CUDA too: their per-token solve is torch either way (triton would run only G's scan), and the
    chunk backend saves the extra launches. RLS rules take triton (their gain scan is a kernel). Chunk also for a
    rule with a coefficient the Triton printer has no lowering for (Piecewise, floor, atan: torch evaluates them;
    "auto" had picked triton on CUDA and raised its NotImplementedError)."""
    sufficient_stats = rule.is_exact and not rule.is_rls
    if torch.device(device).type != "cuda" or sufficient_stats:
        return "chunk"
    return "triton" if triton_prints(rule.form) else "chunk"


@functools.lru_cache(maxsize=256)
def triton_prints(form) -> bool:
    """Whether the Triton printer lowers every coefficient of the form (the generated kernels print them)."""
    from .triton.printer import TritonPrinter
    printer = TritonPrinter()
    try:
        for e in form.expressions():
            printer.doprint(sympy.sympify(e))
    except NotImplementedError:
        return False
    return True


def _nothing_to_scan(args: ScanArgs):
    """Nothing to scan, whatever the backend: no tokens (T = 0), no sequences or heads (B, H = 0), or an empty
    state (d_k = 0: o = S q = 0; d_v = 0). o is zeros, and each sequence ends in the state it started from (its
    initial_state, or the zero state: RLS's P = I/λ), which is also right when the state has no entries.
    fp32 states, fp64 for fp64 inputs."""
    dtype = args.state_dtype
    o = torch.zeros(args.B, args.T, args.H, args.d_v, dtype=args.out_dtype, device=args.device)
    if not args.output_final_state:
        return o, None
    st = args.initial_state
    if st is None:
        return o, args.rule.zero_state((args.num_sequences, args.H), args.d_k, args.d_v, device=args.device,
                                       dtype=dtype, **args.params)
    return o, (tuple(x.to(dtype).clone() for x in st) if args.rule.is_exact else st.to(dtype).clone())


def kernel_source(rule, target: str) -> str:
    if target == "triton":
        from .triton import kernel_source as triton_source
        return triton_source(rule)
    raise ValueError(f"kernel_source: unknown target {target!r} (torch, triton)")
