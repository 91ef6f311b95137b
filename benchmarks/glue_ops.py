"""The torch ops around the chunked Triton kernels that touch a whole token tensor, listed per op, on the CPU.

    python benchmarks/glue_ops.py [--rules deltanet,gated_deltanet] [--storage fp32,input] [--shape 2,192,5,128]

Runs backend="triton" (chunked kernels forced) under the Triton interpreter with bf16 inputs, forward and
forward+backward, and lists every aten op outside the Triton launches that reads or writes a tensor with a token
axis ([B, T, H, ...] or [B·T, H, ...]): copies, casts, fills, elementwise ops, reductions. olssm's own ops
(olssm::triton_*) are entered, so the torch inside them is listed too; the interpreter's own work inside a launch
is not. Views and bare allocations move no data and are left out. Bytes are each op's reads (an input's distinct
elements: a broadcast reads its source once) and writes, scaled from the run's shape to --scale (default the H100
profile's (2, 8192, 16, 128)) by the token count B·T·H (d_k = d_v: give the run the target's head size, so that the
chunk size and wide-key settings are those of the profile).
"""
from __future__ import annotations

import argparse
import os
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class GlueOps:
    """Records (phase, op, [(shape, dtype) of inputs], [(shape, dtype) of outputs], bytes) of every aten op under it
    that touches a token tensor (token(shape) is true), entering olssm's ops and skipping Triton launches."""

    def __init__(self, token):
        self.token, self.ops, self.phase, self._launch = token, [], "fwd", 0

    def __enter__(self):
        import triton.runtime.interpreter as interp
        self._real = interp.GridExecutor.__call__
        rec = self

        def launch(ex, *a, **k):   # the interpreter copies the launch's arguments: kernel work, not glue
            rec._launch += 1
            try:
                return rec._real(ex, *a, **k)
            finally:
                rec._launch -= 1
        interp.GridExecutor.__call__ = launch
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        import triton.runtime.interpreter as interp
        self._mode.__exit__(*exc)
        interp.GridExecutor.__call__ = self._real

    def table(self, scale: float = 1.0):
        """[(phase, op, signature, count, scaled MB per call)], largest first."""
        agg = Counter()
        n = Counter()
        for phase, op, ins, outs, nbytes in self.ops:
            key = (phase, op, _sig(ins), _sig(outs))
            agg[key] += nbytes * scale
            n[key] += 1
        return [(k, n[k], v / 1e6) for k, v in sorted(agg.items(), key=lambda kv: -kv[1])]


def _sig(ts):
    return ", ".join(f"{list(s)} {str(d).replace('torch.', '')}" for s, d in ts)


def _distinct_bytes(t):
    """Bytes a read of t touches: its elements, or its storage where t broadcasts (stride 0) a smaller one."""
    return min(t.numel(), t.untyped_storage().nbytes() // max(1, t.element_size())) * t.element_size()


class _Mode(TorchDispatchMode):
    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.rec
        if func.namespace == "olssm":   # run its Python body under a fresh mode, so that its torch is seen
            from olssm.kernels.triton import chunked, library, rls   # the modules that define the ops
            name = func.overloadpacket.__name__
            impl = next(getattr(m, name) for m in (library, chunked, rls) if hasattr(m, name))._init_fn
            with _Mode(rec):
                return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        if rec._launch or rec.phase is None:
            return out
        name = func.overloadpacket.__name__
        # an out= argument is written, not read
        leaves_in = [t for t in torch.utils._pytree.tree_leaves((args, {k: v for k, v in kwargs.items() if k != "out"}))
                     if torch.is_tensor(t)]
        leaves_out = [t for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t)]
        if func.is_view or name.startswith("empty") or name in ("new_empty", "detach", "alias", "lift_fresh"):
            return out
        if not any(rec.token(t.shape) for t in leaves_in + leaves_out):
            return out
        inplace = name.endswith("_")
        ptr_in = {t.untyped_storage().data_ptr() for t in leaves_in}
        fills = name.startswith("new_") or name.endswith("_like") or name in ("fill_", "zero_")   # read no input
        nbytes = sum(_distinct_bytes(t) for t in leaves_in
                     if not (fills or name == "copy_" and t is leaves_in[0]))
        nbytes += sum(t.numel() * t.element_size() for t in leaves_out
                      if inplace or t.untyped_storage().data_ptr() not in ptr_in)
        rec.ops.append((rec.phase, name, [(tuple(t.shape), t.dtype) for t in leaves_in],
                        [(tuple(t.shape), t.dtype) for t in leaves_out], nbytes))
        return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", default="deltanet,gated_deltanet")
    p.add_argument("--storage", default="fp32,input", help="chunked.CHUNK_STORAGE values")
    p.add_argument("--shape", default="2,192,5,128", help="B,T,H,D of the run (T and H distinct from D)")
    p.add_argument("--same-key", action=argparse.BooleanOptionalAction, default=None,
                   help="chunked_delta_bwd.SAME_KEY on / off (default: the module's, on since session 11)")
    p.add_argument("--scale", default="2,8192,16,128", help="B,T,H,D the bytes are scaled to")
    a = p.parse_args(argv)
    from olssm.kernels.triton import chunked, chunked_delta_bwd, library
    saved = library.FORCE, chunked.CHUNK_STORAGE, chunked_delta_bwd.SAME_KEY
    try:
        library.FORCE = "chunk"
        if a.same_key is not None:
            chunked_delta_bwd.SAME_KEY = a.same_key
        a.same_key = chunked_delta_bwd.same_key_on()
        _tables(a)
    finally:
        library.FORCE, chunked.CHUNK_STORAGE, chunked_delta_bwd.SAME_KEY = saved


def _tables(a):
    from olssm.catalogue import ENTRIES, random_inputs
    from olssm.kernels.triton import chunked
    B, T, H, D = (int(x) for x in a.shape.split(","))
    sB, sT, sH, sD = (int(x) for x in a.scale.split(","))
    assert D == sD, "the run's head size must be the target's (chunk size, wide-key path)"
    scale = (sB * sT * sH) / (B * T * H)

    def token(shape):   # [.., B, T, H, ..] or [.., B·T, H, ..] (the recurrent backward's entries)
        s = list(shape)
        return any(s[i:i + 3] == [B, T, H] or s[i:i + 2] == [B * T, H] for i in range(len(s)))

    one = sB * sT * sH * sD
    print(f"run (B, T, H, D) = {(B, T, H, D)} bf16 under the interpreter, SAME_KEY {a.same_key}, "
          f"bytes scaled to {(sB, sT, sH, sD)} "
          f"(one [B, T, H, D] bf16 tensor = {one * 2 / 1e6:.1f} MB, fp32 {one * 4 / 1e6:.1f} MB)")
    for name in a.rules.split(","):
        rule = ENTRIES[name].rule.with_log_decays()   # gates in log space, as the layers and profile_gpu.py give them
        inp = {n: x.to(torch.bfloat16) for n, x in random_inputs(rule, B, T, H, D, D, seed=0).items()}
        for storage in a.storage.split(","):
            chunked.CHUNK_STORAGE = storage
            for grad in (False, True):
                x = {n: t.clone().requires_grad_(grad) for n, t in inp.items()}
                for _ in range(2):   # the first call makes the plans and kernels; the second is listed
                    with GlueOps(token) as rec:
                        o, f = rule.scan(backend="triton", output_final_state=True, **x)
                        if grad:   # ∂o in o's dtype, as a loss on o hands it back (made unrecorded)
                            rec.phase = None
                            do, df = torch.ones_like(o), torch.ones_like(f)
                            rec.phase = "bwd"
                            torch.autograd.grad((o, f), list(x.values()), (do, df))
                rows = rec.table(scale)
                total = sum(mb for _, _, mb in rows)
                print(f"\n## {name}, CHUNK_STORAGE {storage!r}, {'fwd+bwd' if grad else 'fwd'}: "
                      f"{total:.0f} MB in {sum(c for _, c, _ in rows)} ops")
                print("| phase | op | inputs | outputs | calls | MB |")
                print("|---|---|---|---|---|---|")
                for (phase, op, ins, outs), cnt, mb in rows:
                    print(f"| {phase} | {op} | {ins} | {outs} | {cnt} | {mb:.0f} |")


if __name__ == "__main__":
    main()
