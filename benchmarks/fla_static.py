"""flash-linear-attention's DeltaNet chunk kernels compiled for sm_90 without a GPU: registers, spills, shared memory
and wgmma / mma.sync counts per kernel and launch configuration, to set beside olssm's own
(`python -m olssm.kernels.triton.aot_check`).

    pip install --no-index --no-deps --target /tmp/site .whl/fla_core-*.whl      # fla 0.6 (pure Python)
    pip download triton==3.6.0 --no-deps -d /tmp/t36 && pip install --no-deps --target /tmp/t36site /tmp/t36/*.whl
    PYTHONPATH=/tmp/t36site:/tmp/site:$PWD python benchmarks/fla_static.py [--dk 128] [--chunk 64]

fla's kernels address through tl.make_block_ptr, which Triton 3.9 removed: compile with the Triton the GPU machine
has (3.6 in sessions 7-8). Pointers are bf16 except fla's fp32 ones (A, g, states); absent optional tensors
(gates, varlen maps, initial / final states unless the forward keeps them) are None, as in a DeltaNet call.
fla autotunes num_warps / BV / BK at run time: every configuration in its lists is compiled here.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import itertools

FP32 = {"g", "gk", "A", "h0", "ht", "dht", "dh0", "dh", "dg", "dbeta", "g_gamma"}
NONE = {"g", "gk", "g_gamma", "cu_seqlens", "chunk_offsets", "chunk_indices", "dw", "dg", "v_new", "ht", "h0", "dht",
        "dh0"}


def _jit(kernel):
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):   # autotune / heuristics wrappers
        kernel = kernel.fn
    return kernel


def compile_fla(module: str, name: str, consts: dict, num_warps: int, num_stages: int, keep=(), types=None,
                aligned: bool = True):
    """types: pointer dtypes that differ from FP32's rule for this kernel; aligned: every pointer 16-byte aligned
    (tt.divisibility 16), as a launch with torch's allocations specialises it (without it registers and spills were
    overstated: session 24 had fla's state pass at 255 registers and 256-1168 B of spills, 94-160 / 0 aligned)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = _jit(getattr(importlib.import_module(module), name))
    params = list(inspect.signature(fn.fn).parameters)
    consts = {**{p: None for p in params if p in NONE and p not in keep}, **consts}
    sig = {p: "constexpr" if p in consts else "i32" if p == "T" else "fp32" if p == "scale"
           else "*i32" if p in ("cu_seqlens", "chunk_offsets", "chunk_indices") else "*fp32" if p in FP32 else "*bf16"
           for p in params}
    sig.update({p: t for p, t in (types or {}).items() if p in sig and sig[p] != "constexpr"})
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if aligned and sig[p].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def jobs(K: int, BT: int):
    """(module, kernel, [constexprs per configuration], warps, optional tensors present[, pointer types]) of fla's
    chunk_delta_rule forward and backward, the configurations its autotune lists hold on Hopper (solve_tril's dots
    in "ieee", what fla 0.6 runs there unless FLA_USE_TMA=1; recompute_w_u reads solve_tril's bf16 A)."""
    base = dict(H=16, HV=16, K=K, V=K, BT=BT, IS_VARLEN=False)
    h = dict(USE_G=False, USE_GK=False, USE_INITIAL_STATE=False, STATE_V_FIRST=False)
    return [
        ("fla.ops.common.chunk_scaled_dot_kkt", "chunk_scaled_dot_kkt_fwd_kernel",
         [dict(H=16, HV=16, K=K, BT=BT, BK=bk, IS_VARLEN=False, USE_G=False) for bk in (64, 128)], (4, 8), ()),
        ("fla.ops.utils.solve_tril", "merge_16x16_to_64x64_inverse_kernel",
         [dict(H=16, BT=BT, USE_TMA=False, IS_VARLEN=False, DOT_PRECISION="ieee")], (2, 4, 8), (),
         {"Ai": "*bf16"}),
        ("fla.ops.delta_rule.wy_fast", "recompute_w_u_fwd_kernel",
         [dict(H=16, K=K, V=K, BT=BT, BK=64, BV=64, IS_VARLEN=False)], (4, 8), (), {"A": "*bf16"}),
        ("fla.ops.common.chunk_delta_h", "chunk_gated_delta_rule_fwd_kernel_h_blockdim64",
         [dict(base, BV=bv, STORE_FINAL_STATE=True, SAVE_NEW_VALUE=True, **h) for bv in (32, 64)], (2, 4),
         ("v_new", "ht")),
        ("fla.ops.common.chunk_o", "chunk_fwd_kernel_o",
         [dict(base, BK=bk, BV=bv, USE_G=False, USE_G_GAMMA=False, STATE_V_FIRST=False)
          for bk, bv in ((64, 64), (128, 64), (128, 128))], (4, 8), ()),
        ("fla.ops.common.chunk_delta_h", "chunk_gated_delta_rule_bwd_kernel_dhu_blockdim64",
         [dict(base, BV=bv, USE_FINAL_STATE_GRADIENT=False, **h) for bv in (32, 64)], (2, 4), ()),
        ("fla.ops.common.chunk_o", "chunk_bwd_kernel_dv_local",
         [dict(base, BK=64, BV=64, USE_G=False, USE_G_GAMMA=False, USE_A=False)], (4, 8), ()),
        ("fla.ops.common.chunk_o", "chunk_bwd_kernel_dqkwg",
         [dict(base, B=2, BK=64, BV=64, USE_G=False, USE_G_GAMMA=False, USE_DW=True, STATE_V_FIRST=False)], (4, 8),
         ("dw",)),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dk", type=int, default=128, help="K = V")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--num-stages", type=int, default=2)
    p.add_argument("--unaligned", action="store_true", help="compile without the launch's 16-byte alignment hints")
    a = p.parse_args(argv)
    import triton
    from olssm.kernels.triton.aot_check import _usage
    print(f"fla's chunk_delta_rule kernels, sm_90, Triton {triton.__version__}, K = V = {a.dk}, BT = {a.chunk}, "
          f"{a.num_stages} stages")
    bad = 0
    for module, name, configs, warps, keep, *types in jobs(a.dk, a.chunk):
        for consts, w in itertools.product(configs, warps):
            tag = ",".join(f"{k}={v}" for k, v in consts.items() if k in ("BK", "BV")) or "-"
            try:
                k = compile_fla(module, name, consts, w, a.num_stages, keep, *types, aligned=not a.unaligned)
                print(f"  ok    {name:50s} {tag:13s} {w} warps: {_usage(k)}")
            except Exception as e:  # noqa: BLE001 - report every configuration
                bad += 1
                print(f"  FAIL  {name:50s} {tag:13s} {w} warps: {(str(e).splitlines() or [''])[0][:120]}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
