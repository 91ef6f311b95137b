"""Autotuning of the Triton scan's launch configuration (TRITON.md, "Autotuning").

A rule can run through several kernels that compute the same scan: the token loop (with different
value-block sizes and warps), the block-parallel scan (rules without corrections), the chunked
kernels (the delta family with its split or fused forward, the diagonal family with its split or fused path,
the chunked or recurrent backward, chunks of 32 or 64 tokens).
Which is fastest depends on the GPU, the shapes and the dtype; the default policy
(`library.policy_config`) encodes one H100's measurements, and several of these kernels were never
timed. With autotuning on (``OLSSM_TRITON_AUTOTUNE=1`` or ``autotune.ENABLED = True``) the first call
of each (rule, dtype, sequences, heads, length bucket, sizes, varlen, gradient or not) times every
candidate on that call's own inputs — the forward, plus the backward when a gradient will be
needed — keeps the fastest (ties: the policy's) and runs it; later calls look the decision up.

- Decisions persist per GPU model and Triton version in the cache directory (``autotune.json``),
  so another process does not time again; ``decisions()`` lists them.
- A candidate that fails to compile or launch (too much shared memory on a smaller GPU, ...) is
  skipped, and reported in ``failures()``.
- A forced kernel (``library.FORCE``, ``OLSSM_TRITON_KERNEL``, ``PARALLEL_SCAN`` on or off) is not
  second-guessed. Under torch.compile nothing is timed (tracing): a stored decision is used, else
  the policy.
- The chunked backward is a candidate only where the policy's accuracy rule allows it (no decay, or
  a closed-form log decay), so tuning never trades accuracy for speed.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading

import torch

from . import library as lib
from .library import LaunchConfig

#: None: on when the environment variable OLSSM_TRITON_AUTOTUNE is set (not "0"); True / False
ENABLED = None
#: milliseconds of timed repetitions per candidate (triton.testing.do_bench's rep)
REP_MS = 40
#: chunk sizes the chunked candidates are also timed at, besides the policy's (library.chunk_size): the two the
#: kernels' blocks were sized for (sm_90: the fused walks spill least at 32, the split paths' dots reach wgmma at 64;
#: which wins was timed per path, not per GPU). Empty: the policy's size only
CHUNKS = (32, 64)

_LOCK = threading.Lock()
_DECISIONS: dict | None = None
_FAILURES: dict = {}
#: decisions this process has validated (or made), by full key: a stored decision is checked against the rule's
#: candidates once, not on every call (the check rebuilt the candidate list, ~0.1 ms of host time per call)
_CHOSEN: dict = {}


def enabled(device) -> bool:
    on = ENABLED if ENABLED is not None else os.environ.get("OLSSM_TRITON_AUTOTUNE", "0") not in ("", "0")
    if not on or lib.forced():
        return False
    # under the CPU interpreter only when asked for in code (tests replace the timer there)
    return device.type == "cuda" or ENABLED is True


def _bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def key_of(plan, args, meta, need: bool) -> str:
    """What a decision is keyed by: the rule, dtype, gradient or not, sequences, heads, the longest
    sequence's power-of-two bucket, d_k, d_v, varlen, the chunk tensors' and the checkpoints' storage dtypes,
    the split delta forward's Ũ storage dtype, whether the chunked delta backward reads the forward's T_c and W̃,
    and the caller's chunk size where it fixed one (scan's chunk_size: then only that size is a candidate)."""
    from . import chunked
    from .chunked import checkpoint_storage, chunk_storage
    parts = (lib.register(plan), str(args.out_dtype).replace("torch.", ""), "grad" if need else "fwd", meta.N,
             args.H, _bucket(meta.max_len), args.d_k, args.d_v, "varlen" if args.cu_seqlens is not None else "dense",
             # the chunk tensors' storage changes the chunked kernels' speed (not a candidate: it rounds them)
             "chunks " + str(chunk_storage(args.out_dtype)).replace("torch.", ""),
             "ck " + str(checkpoint_storage(args.out_dtype)).replace("torch.", ""),
             "u " + str(chunked.delta_u_storage(args.out_dtype)).replace("torch.", ""),
             "core saved" if chunked.SAVE_CHUNK_CORE else "core recomputed")
    if args.chunk_size:   # only then, so that the decisions stored for the policy's sizes keep their keys
        parts += (f"chunk {args.chunk_size}",)
    return "|".join(map(str, parts))


def _device_tag(device) -> str:
    return _tag_of(device.type, device.index if device.index is not None else
                   (torch.cuda.current_device() if device.type == "cuda" else None))


@functools.lru_cache(maxsize=None)
def _tag_of(kind: str, index) -> str:
    # once per device: the name is a driver query (torch does not cache it), and every tuned call asks
    import triton
    name = torch.cuda.get_device_name(index) if kind == "cuda" else "interpreter"
    return f"{name}|triton {triton.__version__}"


def candidates(plan, args, meta, need: bool) -> list:
    """The launch configurations that run this rule (the policy's first)."""
    from .chunked import _c_row, backward_supported, unsupported
    from .scan import _np2
    form = plan.rule.form
    split = bool(form.corrections) and not _c_row(form) and form.decay_kind in ("none", "scalar")
    chunk_bwd = backward_supported(plan, exact_decay_grad=True)
    policy = lib.policy_config(plan, args, meta.max_len)
    diag = not form.corrections and not os.environ.get("OLSSM_TRITON_DIAG_PATH")   # its two paths are candidates
    if policy.kernel == "chunk":   # spelled out, so that its explicit twin below is not timed twice
        from .chunked import _delta_forward, diag_path
        policy = dataclasses.replace(
            policy, delta_forward=_delta_forward() if split else "",
            chunk_backward=chunk_bwd if need and lib.chunk_backward_mode() == "auto" else None,
            diag_path=diag_path(form, args.d_k) if diag else "")
    out = [policy]
    # the default is fla's fused_recurrent, 8 value rows on 1 warp (scan.BLOCK_V); the wider blocks are other
    # geometries up to one block holding every row (bv = next_pow2(d_v): d_v = 16 in one program, 32 rows on 4
    # warps was the default before session 8); a block wider than that only masks rows
    for bv, warps in ((0, 0), (16, 2), (32, 4)):
        if not bv or bv <= _np2(args.d_v):
            out.append(LaunchConfig("recurrent", bv, warps))
    if not form.corrections:
        out.append(LaunchConfig("pscan"))
    if unsupported(plan, args) is None:
        forwards = ("split", "fused") if split else ("",)
        backwards = ((True, False) if chunk_bwd else (False,)) if need else (None,)
        paths = ("fused", "split") if diag else ("",)
        chunked = [LaunchConfig("chunk", delta_forward=f, chunk_backward=b, diag_path=p, chunk=args.chunk_size or 0)
                   for f in forwards for b in backwards for p in paths]
        out += chunked
        # the same at the other chunk sizes (an explicit size: a stored decision keeps it if the policy changes),
        # unless the caller fixed the size (scan's chunk_size)
        out += [dataclasses.replace(c, chunk=C) for c in chunked for C in CHUNKS
                if not args.chunk_size and C != lib.chunk_size(plan, args.d_k, c.delta_forward, c.diag_path)]
    seen, unique = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def _measure(fn, device) -> float:
    """Milliseconds per call of fn (the median of triton.testing.do_bench on a GPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=5, rep=REP_MS, return_mode="median"))
    import time
    fn()
    t = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t)


def _detached(args, need: bool):
    """The call's inputs as fresh leaves (same values; requires_grad as the caller's, when a gradient is needed)."""
    leaf = lambda x: x.detach().requires_grad_(need and x.requires_grad)
    h0 = args.initial_state
    return dataclasses.replace(args, tokens={n: leaf(x) for n, x in args.tokens.items()},
                               params={n: leaf(x) for n, x in args.params.items()},
                               initial_state=None if h0 is None else leaf(h0))


def _path() -> str:
    from .scan import cache_dir
    return os.path.join(cache_dir(), "autotune.json")


def _load() -> dict:
    global _DECISIONS
    if _DECISIONS is None:
        try:
            with open(_path()) as f:
                _DECISIONS = json.load(f)
        except (OSError, ValueError):
            _DECISIONS = {}
        if not isinstance(_DECISIONS, dict):   # valid JSON, but not a decision table
            _DECISIONS = {}
    return _DECISIONS


def _stored_config(hit, plan, args, meta, need: bool):
    """A stored decision, if it is one of the configs that run this rule now: an entry from another olssm
    version (other fields), edited or corrupted (a kernel the rule has no form for, a non-power-of-two block)
    is ignored and the call retuned, instead of crashing every call."""
    if not isinstance(hit, dict):
        return None
    try:
        cfg = LaunchConfig(**hit)
    except TypeError:
        return None
    return cfg if cfg in candidates(plan, args, meta, need) else None


def _store(full_key: str, cfg: LaunchConfig):
    try:                       # merge what other processes stored since this one read the file
        with open(_path()) as f:
            on_disk = json.load(f)
        if isinstance(on_disk, dict):
            _load().update({k: v for k, v in on_disk.items() if k not in _DECISIONS})
    except (OSError, ValueError):
        pass
    _load()[full_key] = dataclasses.asdict(cfg)
    try:
        tmp = f"{_path()}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(_DECISIONS, f, indent=1, sort_keys=True)
        os.replace(tmp, _path())
    except OSError:
        pass   # an unwritable cache only costs the next process a retune


def decisions() -> dict:
    """{device|triton version|key: config (dict)} of every decision known to this process."""
    with _LOCK:
        return dict(_load())


def failures() -> dict:
    """{key: {config: error}} of candidates that failed to compile or launch in this process."""
    return {k: dict(v) for k, v in _FAILURES.items()}


def clear(persisted: bool = False):
    """Forget the decisions of this process (persisted: also delete autotune.json)."""
    global _DECISIONS
    with _LOCK:
        _DECISIONS = {} if persisted else None
        _FAILURES.clear()
        _CHOSEN.clear()
        if persisted:
            try:
                os.remove(_path())
            except OSError:
                pass


def choose(plan, args, meta, need: bool):
    """The fastest LaunchConfig for this call (timing the candidates on first sight), or None (use the policy)."""
    key = key_of(plan, args, meta, need)
    full = f"{_device_tag(args.device)}|{key}"
    with _LOCK:
        known = _CHOSEN.get(full)
        hit = _load().get(full) if known is None else None
    if known is not None:
        return known
    stored = _stored_config(hit, plan, args, meta, need)
    if stored is not None:
        with _LOCK:
            _CHOSEN[full] = stored
        return stored
    if torch.compiler.is_compiling():
        return None
    targs = _detached(args, need)
    leaves = [x for x in [*targs.tokens.values(), *targs.params.values(), targs.initial_state]
              if x is not None and x.requires_grad]

    def once(cfg):
        with torch.enable_grad() if need else torch.no_grad():
            o, _ = lib.run_config(plan, targs, meta, cfg, need)
            if need:
                torch.autograd.grad(o.float().sum(), leaves, allow_unused=True)

    times = {}
    for cfg in candidates(plan, args, meta, need):
        try:
            times[cfg] = _measure(lambda: once(cfg), args.device)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile or launch here is skipped
            _FAILURES.setdefault(key, {})[cfg] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if not times:
        return None
    best = min(times, key=times.get)   # ties: the earliest candidate, the policy's
    with _LOCK:
        _store(full, best)
        _CHOSEN[full] = best
    return best
