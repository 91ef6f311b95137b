#!/usr/bin/env bash
# One GPU session's measurements, in stages that each fit a 10-minute device call (TUNING.md,
# "Status on a GPU"). Run from the repository root on the GPU machine:
#
#     bash benchmarks/gpu_session.sh STAGE
#
# Output goes to $OUT/<stage>.txt (the device tool's output folder; /tmp/olssm-gpu otherwise).
# Stages, in the order a session should spend its time:
#   next         the next lease's first call (timeouts add to 570 s): the compiled tests (session 22's test mends and
#                defaults, session 23's launch settings, session 24's delta launch settings), Mamba-2 / GLA at D = 128
#                under the defaults with fla's Mamba-2 row and the split path's open rows (`sto`, `bf`, `q128`,
#                `ok32`), then the split delta path's launch settings one kernel at a time for DeltaNet at D = 128
#                beside fla's chunk_delta_rule (kernel_sweep.py)
#   next2        the second call: Gated DeltaNet's delta sweep, GLA at D = 64 with the split path at chunk 64 (`ds64`:
#                decides DIAG_PATH "split" against "wide"), bf16 operands' gradient errors; then `fla-gdn`
#   dsweep       the delta sweep alone: DeltaNet (with fla) and Gated DeltaNet at D = 128
#   sweep        session 23's first call: the split diagonal path's launch settings one kernel at a time
#                (kernel_sweep.py) at D = 128 (Mamba-2 beside fla, GLA) and D = 64 (against the fused walk)
#   next22       session 22's first call (compile_diag, the compiled tests, Mamba-2's profile, Gated DeltaNet's rows)
#   gated        Gated DeltaNet's bf16 storage rows alone, with more time
#   compile      torch.compile's gradients against eager ones and the reference (compile_diag.py; in `next`), also
#                with blocking launches
#   one          session 14's single call (timeouts add to 540 s): the compiled tests, the D = 128 delta rows never
#                timed, the split diagonal path and .maxnreg at D = 128
#   lease        the first call of a lease (its timeouts add to 370 s): the compiled tests; DeltaNet / Gated DeltaNet
#                at D = 128 against fla's chunk with the remaining chunked settings as rows of one process
#                ($variants128). (D = 64: stage variants)
#   diag         the second call (timeouts add to 400 s): Mamba-2 and GLA at D = 128 and D = 64, the split diagonal path
#                (`ds`, `ds64`) against the fused one and fla's chunk_simple_gla, .maxnreg off (`mr0`); Longhorn at
#                D = 128 with and without .maxnreg
#   profile-diag Mamba-2 at D = 128 kernel by kernel (fused walk, split path, fla), the largest gap after session 14
#   profile128   DeltaNet at D = 128 kernel by kernel (forward alone and fwd+bwd) beside fla's, defaults and `nkm`
#   variants     the second call (timeouts add to 520 s): the D = 64 table with fla's kernels (but chunk_gla), the
#                recurrent kernel's old 32 rows / 4 warps and bf16 operands as rows; the session-9 variants at
#                D = 64; fla's chunk_gla against ours at D = 64
#   tests        the Triton test files with compiled kernels (no interpreter), 8 workers
#   tests1/2     the same in two halves, if `tests` ran past its 570 s
#   delta64      (4, 2048, 16, 64) bf16: DeltaNet, Gated DeltaNet, Longhorn, RLS, derived rules (two_keys: rank-2
#                corrections; longhorn_forget: a row decay with a row c) — split vs fused forward,
#                chunked vs recurrent backward, the autotuner's row, fla's kernels
#   diag64       (4, 2048, 16, 64) bf16: GLA, linear attention, RetNet, Mamba-2, Mamba, Longhorn-diag —
#                block scan vs token loop, chunked, the autotuner's row, fla's recurrent GLA
#   d128         (2, 8192, 16, 128) bf16: DeltaNet, Gated DeltaNet, GLA, Mamba, with the autotuner's row
#   delta-ab     the split forward's blocked UT inverse / tied input term / bf16 chunk tensors against the default
#   delta-ab2    bf16 checkpoints, both bf16 storages, chunk 64 (with 2 pipeline stages at D = 128)
#   delta-ab3    T_c and W̃ kept from the forward (the default) against the backward recomputing them
#   fla-gla      fla's chunk_gla alone (its own autotuning takes minutes)
#   fla-gdn      fla's chunk_gated_delta_rule alone at D = 128 (likewise: it outlasted two of session 14's calls)
#   profile      the top kernels by device time (torch.profiler)
#   trace        each kernel_trace.py case compiled, in its own process, against the interpreter's launches and the
#                reference (session 11 found ptxas 12.8's miscompiles this way); CASES=a,b limits it
# fla-core (pure Python) is installed from .whl/ for the benchmark stages when the wheel was carried
# (device tool: carry [".whl"]); the tests run without it.
set -uo pipefail
export PYTHONUNBUFFERED=1   # every stage: a timeout's kill keeps the lines printed before it
stage=${1:?usage: gpu_session.sh next|next2|dsweep|sweep|next22|gated|compile|one|lease|profile-diag|fla-gdn|diag|profile128|variants|tests|tests1|tests2|delta64|diag64|d128|delta-ab|delta-ab2|delta-ab3|fla-gla|profile|trace}
out=${OUT:-/tmp/olssm-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt"
# which ptxas assembles the kernels (session 11: Triton 3.6's bundled 12.8.93 miscompiled them on an H100; the
# library switches Hopper to a ptxas >= 13.0 when the machine has one, olssm/kernels/triton/toolchain.py)
python -c "
import torch
from olssm.kernels.triton import toolchain
print(toolchain.check(torch.device('cuda')) if torch.cuda.is_available() else 'no GPU', toolchain.ptxas_report())
" >> "$out/gpu.txt" 2>&1

with_fla() {
    if ls .whl/*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=/tmp/site:$PWD
    fi
}

bench=(python benchmarks/triton_kernels.py --dtype bf16 --autotune)
# the chunked settings timed against the defaults (benchmarks/triton_kernels.py --variants): bf16 chunk tensors (`cs`:
# no fp32 copies of q, k, v), bf16 checkpoints (`ck`: fla keeps h in bf16; ck is 268 MB of fp32 at (2, 8192, 16, 128),
# written once and read three times), session 11's two new defaults the old way round (`utm`: the UT substitution on
# the whole masked tile, where "blocks" won the forward by 1.12-1.13x; `nsk`: the general backward key kernel and
# autograd's dA + dB + dW, where the same-key kernel won fwd+bwd by 1.04-1.07x), int32 row offsets in the split path's
# seven kernels (`o32`: spills 440 -> 352 in prep, 272 -> 0 in the backward's tied key kernel, aot_check; within the
# drift in session 11). Session 12: `nraw`, the fp32 copies of bf16 q, k, v back (RAW_INPUTS off; on, the same bits in
# fewer bytes: 608 -> 205 MB of forward glue). Session 13: `nfs`, β·v's backward as three torch passes again
# (FUSED_SCALE_BWD off; on, one Triton launch: 673 -> 268 MB per backward at D = 128, glue_ops.py). `nkm` holds the
# storage settings and int32 offsets together. Session 16: `nsl`, β·v (Δ·x) written by torch again (SCALE_ON_LOAD
# off; on, the kernels multiply v's tiles by β on load: 205 -> 3 MB of forward glue, the same bits); `us`, the split
# delta forward's Ũ / Δ in bf16 (DELTA_U_STORAGE: ~0.5 GB of fp32 traffic per forward at D = 128, as fla keeps u);
# `fl`, fla's storage (bf16 chunk tensors, checkpoints and Ũ) together. Gone since session 15, after the H100 timed
# them (session 11): wide blocks (`wb`, lost 12-20 %), the key-major state tile (`km`, lost 6-9 %), the prep in two
# launches (`ps`, lost 5 % of the forward), the forward's state pass in key halves (`ks`, `ks4`: within the drift
# twice)
# Session 19: `nst`, Gated DeltaNet's ∂ log α as a reverse sum of per-token ∂b again (DECAY_STRADDLE off; on, the
# key kernel sums the pair terms where they straddle each token: two more [BT, KB] x [KB, BT] dots per key block, 6.5e-4
# -> 1e-7 relative at strong decays, interpreter). Keep it on unless `nst` wins fwd+bwd beyond the drift (`again`)
# Triton's on-disk cache carries the profile's compiles over to the table
variants_nkm='chunk_storage:input,offsets32:1,checkpoint_storage:input'
# rows in order of need (a timeout cuts the last): those never timed first, then session 11's losers and draws
variants128="nkm=$variants_nkm;cs=chunk_storage:input;ck=checkpoint_storage:input;us=u_storage:input;fl=chunk_storage:input,checkpoint_storage:input,u_storage:input;again=;nraw=raw_inputs:0;nfs=fused_scale_bwd:0;nsl=scale_on_load:0;utm=ut_solve:masked;nsk=same_key:0;o32=offsets32:1"
variants128_profile="nkm=$variants_nkm"
# the diagonal family (session 12): the split path (`ds`), and chunks of 64 tokens with it and without (the split's
# parallel kernels get wgmma at 64-row tiles: none at chunk 32, the diagonal rules' default). Since session 15 the
# split path takes chunks of 64 by itself at d_k > 64 (chunked.wide_diag), so `ds` and `ds64` are the same
# configuration at D = 128 (two rows of it: a second measure of the drift); at D = 64 `ds` runs chunk 32
# `mr0`: the fused walks without .maxnreg 255 (WALK_MAXNREG, session 12: ptxas had held them to 128 or 32 registers
# at d = 128 and spilled 1.4-6 KB per thread)
# Session 20: GLA's ∂g per key column (and a row decay's per value row) summed where its pair terms straddle each
# token (DIAG_STRADDLE, default "slow": on the per-token path only, which these inputs never take): `sto` ("off")
# times what compiling that walk in costs the factorised path, `sta` ("all": a BT-step loop beside its dots; 1.3e-5
# -> 5e-7 relative at moderate decays, interpreter) what it would cost there. Keep "slow" unless `sto` wins beyond
# the drift (`again`); take "all" if `sta` is within it (no-ops for Mamba-2's rows)
variants_diag="ds=diag_path:split;ds64=diag_path:split,chunk:64;ds64ck=diag_path:split,chunk:64,checkpoint_storage:input;sta=diag_straddle:all;sto=diag_straddle:off;c64=chunk:64;mr0=walk_maxnreg:0;again="
variants64="nkm=$variants_nkm;cs=chunk_storage:input;ck=checkpoint_storage:input;again=;o32=offsets32:1;utm=ut_solve:masked;nsk=same_key:0"
# peers whose first call autotunes for minutes (fla 0.6's chunk_gla; its chunk_gated_delta_rule at D = 128 outlasted
# session 14's calls): their own stages, fla-gla and fla-gdn
skip_slow_peers="gla:fla-chunk,gated_deltanet:fla-chunk"
triton_tests=(tests/test_triton.py tests/test_triton_chunked.py tests/test_triton_delta_bwd.py tests/test_triton_pscan.py
              tests/test_triton_autotune.py)
gbs=3350; grep -q H200 "$out/gpu.txt" && gbs=4800   # vendor HBM bandwidth (GB/s), for the HBM % column

# the five Triton test files compiled on 16 workers, into $out/tests.txt: compiled_tests SECONDS [PYTEST_FLAGS...]
compiled_tests() {
    local secs=$1; shift
    OLSSM_TRITON_DEVICE=cuda timeout "$secs" python -m pytest "$@" -rfE -n 16 -p no:cacheprovider "${triton_tests[@]}" \
        > "$out/tests.txt" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$out/tests.txt" | tail -40
}

# rows at (2, 8192, 16, 128) bf16, the D = 128 shape: at128 SECONDS OUTFILE TRITON_KERNELS_FLAGS...
at128() {
    local secs=$1 file=$2; shift 2
    timeout "$secs" python benchmarks/triton_kernels.py --dtype bf16 --B 2 --T 8192 --H 16 --dk 128 --dv 128 \
        --peak-gbs $gbs --reps 5 "$@" 2>&1 | tee "$out/$file"
}

# the split delta path's launch settings one kernel at a time at (2, 8192, 16, 128) bf16 (kernel_sweep.py, with a
# watchdog 10 s inside the timeout): delta_sweep SECONDS RULE [FLAGS...]
delta_sweep() {
    local secs=$1 rule=$2; shift 2
    timeout "$secs" python benchmarks/kernel_sweep.py --rules "$rule" --watchdog $((secs - 10)) "$@" 2>&1 \
        | tee "$out/dsweep128-$rule.txt"
}

# torch.compile's gradients against eager ones and the fp64 reference (compile_diag.py): compile_check SECONDS
# OUTFILE [FLAGS...]
compile_check() {
    local secs=$1 file=$2; shift 2
    # (the whole output kept beside the table: a traceback had left only an empty table)
    timeout "$secs" python benchmarks/compile_diag.py "$@" 2>&1 | tee "$out/${file%.txt}-full.txt" \
        | grep -E "^\||device" | tee "$out/$file"
}

# Mamba-2's D = 128 time kernel by kernel, the fused walk and the split path beside fla's: mamba2_profile SECONDS.
# `ds64` is the split path at fla's chunk (64; its own policy at d_k > 64 since session 15) with session 15's
# whole-gradient kernels (chunk_diag_dqk_kernel, chunk_diag_dv_kernel: no per-value-block partial sums; no spills at
# chunk 64 statically), `ds64ck` with bf16 checkpoints (fla keeps its h in the inputs' dtype), `ds64bf` with bf16 dot
# operands as well (fla's precision); `nsl` the product Δ·x written by torch again (chunked.SCALE_ON_LOAD off,
# session 16: the kernels multiply on load by default); `ds64df` the split path reading its scalar decay's factors
# from a pre-pass (DECAY_FACTORS: 8 -> 3 barriers per chunk in its sequential passes)
mamba2_profile() {
    timeout "$1" python benchmarks/profile_gpu.py --rules mamba2 --kernels chunk --B 2 --T 8192 --H 16 --d 128 \
        --peers --variants "$variants_ds" 2>&1 | grep -v "^USDT" | tee "$out/profile-diag.txt"
}
# Gated DeltaNet's rows (stages next, gated): `nst` and the drift's `again` first (session 19's dry run: at ~15 s a
# row, next's 90 s would have cut the last three), then the storage settings
variants_gated="nst=straddle:0;again=;cs=chunk_storage:input;ck=checkpoint_storage:input;us=u_storage:input;fl=chunk_storage:input,checkpoint_storage:input,u_storage:input;df=decay_factors:1;nsl=scale_on_load:0"
variants_ds="ds64=diag_path:split,chunk:64;ds64df=diag_path:split,chunk:64,decay_factors:1;ds64ck=diag_path:split,chunk:64,checkpoint_storage:input;ds64bf=diag_path:split,chunk:64,checkpoint_storage:input,precision:bf16;nsl=scale_on_load:0"
case $stage in
    lease)
        # the next lease's first call (timeouts add to 370 s; `diag`, 400 s, is the second): the compiled tests, which
        # session 11 found failing with Triton 3.6's ptxas 12.8 and passing with 13.0 (toolchain.check now switches;
        # gpu.txt says to which), and which have not run compiled under sessions 11-12's defaults nor on the split
        # diagonal path; then D = 128 DeltaNet / Gated DeltaNet against fla's chunk kernels with the remaining
        # settings as rows of one process
        with_fla
        compiled_tests 160 -vv
        at128 210 bench128.txt --skip "$skip_slow_peers,*:torch-chunk,*:fla-recurrent,*:recurrent" \
            --rules deltanet,gated_deltanet --variants "$variants128" ;;
    compile)
        # torch.compile's gradients against eager ones and the fp64 reference, per input, with the launch
        # configuration each run took (session 14: Mamba-2 at T = 33 and DeltaNet at T = 20, fp32, under the test
        # files' settings, differed on the H100 while the CPU agreed; the same with the chunked backward forced, Gated
        # DeltaNet and Mamba passed there); then with blocking launches (a mismatch that goes away there is a race
        # between launches or streams)
        compile_check 200 compile.txt
        CUDA_LAUNCH_BLOCKING=1 compile_check 120 compile-blocking.txt --cases mamba2:33:chunked,deltanet:20:delta ;;
    fla-gdn)
        # fla's chunk_gated_delta_rule alone at D = 128 (its autotuning outlasted two of session 14's calls)
        with_fla
        at128 570 fla-gdn.txt --skip "*:torch-chunk,*:fla-recurrent,*:recurrent" --rules gated_deltanet ;;
    one)
        # session 14's single call (15 minutes of device time, ~30 s of it the start; logs/2026-11-26-h100-s14): the
        # compiled tests, the never-timed D = 128 delta rows, the diagonal family's split path and the walks'
        # .maxnreg at D = 128
        with_fla
        compiled_tests 160
        at128 170 bench128.txt --skip "$skip_slow_peers,*:torch-chunk,*:fla-recurrent,*:recurrent" \
            --rules deltanet,gated_deltanet --variants "nkm=$variants_nkm;cs=chunk_storage:input;ck=checkpoint_storage:input;again=;nraw=raw_inputs:0;nfs=fused_scale_bwd:0"
        at128 140 diag128.txt --skip "gla:fla-chunk,*:torch-chunk,*:fla-recurrent,*:recurrent" \
            --rules mamba2,gla --variants "ds=diag_path:split;ds64=diag_path:split,chunk:64;mr0=walk_maxnreg:0;again="
        at128 70 walk128.txt --skip "*:torch-chunk,*:fla-recurrent,*:recurrent" --rules longhorn \
            --variants "mr0=walk_maxnreg:0;again=" ;;
    sweep)
        # session 23's first call (timeouts add to 500 s; device timeout_s 560, carry [".whl"]): the split diagonal
        # path's five kernels' blocks, warps and stages, one kernel at a time against the defaults timed twice
        # (benchmarks/kernel_sweep.py; it prints the winners together, their gradients against the defaults' and the
        # constants to set), at D = 128 for Mamba-2 (with fla's chunk_simple_gla) and GLA, then at D = 64 on the split
        # path at chunk 64 against the fused walk (which DIAG_PATH "split" would replace there)
        with_fla
        # (session 23: this Mamba-2 process stalled after its fla and bf16 rows until the timeout, and the D = 64
        # one behind fla's autotuning at a new shape: the watchdog prints where a process stands before its timeout,
        # and D = 64 runs without fla)
        timeout 190 python benchmarks/kernel_sweep.py --rules mamba2 --peers --watchdog 180 2>&1 \
            | tee "$out/sweep128-mamba2.txt"
        timeout 200 python benchmarks/kernel_sweep.py --rules gla --watchdog 190 2>&1 | tee "$out/sweep128-gla.txt"
        timeout 110 python benchmarks/kernel_sweep.py --rules gla,mamba2 --B 4 --T 2048 --d 64 --path split --chunk 64 \
            --fused-row --no-info --kernels state,out,dqk --watchdog 100 2>&1 | tee "$out/sweep64.txt" ;;
    next)
        # the next lease's first call (timeouts add to 570 s; device timeout_s 600, carry [".whl"]). Sessions 22-24
        # left: the compiled tests after session 22's mends (7 test-side failures), session 23's launch settings and
        # session 24's delta ones (None by default: the same launches), every D = 128 ratio under the new defaults in
        # one process, DIAG_STRADDLE's cost on the split path (`sto`: "off"), bf16 dot operands on the split diagonal
        # path (`bf`: fla's precision; 1.44x in session 22's profile, but 1.3x slower in session 23's one timing, in a
        # process that then hung: rel err o beside it), the dqk kernel over every key in one program (`q128`: 32 %
        # fewer instructions by session 23's static count), the output kernel's loop over 32 keys at a time (`ok32`:
        # 124 registers against 255 and 104 B of spills); then DeltaNet's split delta kernels one at a time (the
        # largest gap to fla, 2.0x at D = 128; their warps, stages and state rows were never varied per kernel, and
        # 4 warps won the diagonal path's state passes 1.05-1.28x)
        with_fla
        compiled_tests 170
        at128 160 next128.txt --skip "gla:fla-chunk,*:torch-chunk,*:fla-recurrent,*:recurrent" \
            --rules mamba2,gla --variants "sto=diag_straddle:off;bf=precision:bf16;q128=dqk_bk:128;ok32=out_kb:32;again="
        delta_sweep 230 deltanet --peers --no-info ;;   # (--no-info: DeltaNet already takes bf16 operands)
    next2)
        # the second call (timeouts add to 500 s): Gated DeltaNet's delta sweep without fla (its chunk kernel autotunes
        # for minutes: fla-gdn), then GLA at D = 64 (session 23: Mamba-2's split path at chunk 64 lost to the walk at
        # D = 64 by 1.11x; GLA's is untimed), then bf16 dot operands' gradient errors compiled (the interpreter's,
        # session 22: up to 2x the bf16 floor)
        delta_sweep 250 gated_deltanet
        with_fla
        timeout 150 python benchmarks/triton_kernels.py --dtype bf16 --B 4 --T 2048 --H 16 --dk 64 --dv 64 \
            --peak-gbs $gbs --reps 5 --skip "gla:fla-chunk,*:torch-chunk,*:fla-recurrent,*:recurrent" \
            --rules gla --variants "ds64=diag_path:split,chunk:64;again=" 2>&1 | tee "$out/diag64.txt"
        OLSSM_TRITON_DEVICE=cuda timeout 60 python benchmarks/bf16_accuracy.py mamba2 gla 2>&1 | tee "$out/bf16acc.txt" ;;
    dsweep)
        with_fla
        delta_sweep 250 deltanet --peers --no-info
        delta_sweep 250 gated_deltanet ;;
    next22)
        # session 22's first call (timeouts add to 560 s; device timeout_s 590, carry [".whl"]): torch.compile's
        # gradients against the reference (the mends after session 14), the compiled tests (session 15's split-path
        # gradient kernels among them), Mamba-2's D = 128 fwd+bwd kernel by kernel beside fla's with the split path
        # at chunk 64 ($variants_ds), then Gated DeltaNet's storage rows (stage `gated`; fla's row: stage fla-gdn)
        with_fla
        compile_check 90 compile.txt
        compiled_tests 170
        mamba2_profile 210
        at128 90 gated128.txt --skip "$skip_slow_peers,*:torch-chunk,*:fla-recurrent,*:recurrent" \
            --rules gated_deltanet --variants "$variants_gated" ;;
    gated)
        # Gated DeltaNet's bf16 storage rows at D = 128 (session 14's timeouts cut them; the tail of `next`)
        with_fla
        at128 200 gated128.txt --skip "$skip_slow_peers,*:torch-chunk,*:fla-recurrent,*:recurrent" \
            --rules gated_deltanet --variants "$variants_gated" ;;
    diag)
        # the diagonal family's split path (DIAG_PATH = "split", session 12: correct under the interpreter, untimed)
        # against the fused walk (the default) and fla's chunk_simple_gla (Mamba-2's recurrence) as rows of one
        # process at D = 128, then D = 64 ($variants_diag), then Longhorn at D = 128 (fla's chunk_gla's autotuning
        # takes minutes: stage fla-gla). Timeouts add to 400 s. If `ds` or `ds64` wins beyond the drift (`again`), flip
        # DIAG_PATH (and library.CHUNK for rules without a correction): "wide" if it wins at D = 128 only, "split"
        # if at D = 64 too; if `mr0` wins, set WALK_MAXNREG = None.
        with_fla
        at128 180 diag128.txt --skip "gla:fla-chunk,*:torch-chunk,*:fla-recurrent,*:recurrent" \
            --rules mamba2,gla --variants "$variants_diag"
        timeout 120 python benchmarks/triton_kernels.py --dtype bf16 --B 4 --T 2048 --H 16 --dk 64 --dv 64 \
            --peak-gbs $gbs --reps 5 --skip "gla:fla-chunk,*:torch-chunk,*:fla-recurrent,*:recurrent" \
            --rules mamba2,gla --variants "$variants_diag" 2>&1 | tee "$out/diag64.txt"
        # Longhorn and a row-decay delta rule through the fused delta walk at D = 128 (32 registers, 6 KB of stack per
        # thread without .maxnreg). GLA against fla's chunk_gla: stage fla-gla
        at128 100 walk128.txt --skip "*:torch-chunk,*:fla-recurrent,*:recurrent" --rules longhorn,longhorn_forget \
            --variants "mr0=walk_maxnreg:0;again=" ;;
    profile128)
        # where DeltaNet's D = 128 time goes, kernel by kernel beside fla's (session 11 profiled the old defaults:
        # a third of it was torch glue), the defaults and `nkm`
        with_fla
        timeout 150 python benchmarks/profile_gpu.py --rules deltanet --kernels chunk --B 2 --T 8192 --H 16 --d 128 \
            --peers --variants "$variants128_profile" 2>&1 | grep -v "^USDT" | tee "$out/profile128.txt" ;;
    profile-diag)
        # where Mamba-2's D = 128 backward goes (session 14: 4.3 of 5.1 ms fwd+bwd, 2.9x fla's chunk_simple_gla), the
        # fused walk and the split path beside fla's kernels; glue_ops.py counts 1.34 GB of torch sums over the walk's
        # per-value-block partials of dq and dk per fwd+bwd at this shape
        with_fla
        mamba2_profile 200 ;;
    variants)
        # the D = 64 table with fla's kernels (but chunk_gla), the recurrent kernel's old 32 rows / 4 warps (its 8 rows /
        # 1 warp default was set from D = 128 rows) and bf16 operands as rows of one process (session 8: separate
        # processes drifted, DeltaNet's D = 64 chunk row 2.46 -> 3.65 ms between calls), then the session-9 variants at
        # D = 64, then fla's chunk_gla alone at D = 64 (timeouts add to 520 s)
        with_fla
        timeout 170 python benchmarks/triton_kernels.py --dtype bf16 --B 4 --T 2048 --H 16 --dk 64 --dv 64 \
            --peak-gbs 4800 --reps 5 --rules deltanet,gated_deltanet,mamba2,gla,longhorn \
            --skip '*:torch-chunk,gla:fla-chunk' \
            --variants 'bf16=precision:bf16;rec32=block_v:32,warps:4;again=' 2>&1 | tee "$out/variants64.txt"
        timeout 150 python benchmarks/triton_kernels.py --dtype bf16 --B 4 --T 2048 --H 16 --dk 64 --dv 64 \
            --peak-gbs 4800 --reps 5 --rules deltanet,gated_deltanet --no-peers \
            --skip '*:torch-chunk,*:recurrent' --variants "$variants64" 2>&1 | tee "$out/variants64b.txt"
        timeout 200 python benchmarks/triton_kernels.py --dtype bf16 --B 4 --T 2048 --H 16 --dk 64 --dv 64 \
            --peak-gbs 4800 --reps 5 --rules gla --skip '*:torch-chunk,*:recurrent,*:fla-recurrent' 2>&1 \
            | tee "$out/fla-gla64.txt" ;;
    tests)
        OLSSM_TRITON_DEVICE=cuda timeout 570 python -m pytest -rfE -n 8 -p no:cacheprovider \
            tests/test_triton.py tests/test_triton_chunked.py tests/test_triton_delta_bwd.py \
            tests/test_triton_pscan.py tests/test_triton_autotune.py 2>&1 | tail -60 | tee "$out/tests.txt" ;;
    tests1|tests2)
        # the same files in two halves, each its own 10-minute call, if `tests` ran out of time (every kernel
        # variant compiles on first use; sessions 3-5 added many)
        if [ "$stage" = tests1 ]; then files="tests/test_triton.py tests/test_triton_chunked.py"
        else files="tests/test_triton_delta_bwd.py tests/test_triton_pscan.py tests/test_triton_autotune.py"; fi
        OLSSM_TRITON_DEVICE=cuda timeout 570 python -m pytest -rfE -n 8 -p no:cacheprovider $files 2>&1 \
            | tail -60 | tee "$out/$stage.txt" ;;
    delta64)
        with_fla
        timeout 570 "${bench[@]}" --B 4 --T 2048 --H 16 --dk 64 --dv 64 --delta-forward both --delta-backward both \
            --rules deltanet,gated_deltanet,longhorn,rls,two_keys,longhorn_forget 2>&1 | tee "$out/delta64.txt" ;;
    diag64)
        with_fla
        timeout 570 "${bench[@]}" --B 4 --T 2048 --H 16 --dk 64 --dv 64 --pscan both \
            --rules gla,linear_attention,retnet,mamba2,mamba,longhorn_diag 2>&1 | tee "$out/diag64.txt" ;;
    d128)
        with_fla
        timeout 570 "${bench[@]}" --B 2 --T 8192 --H 16 --dk 128 --dv 128 --delta-forward both \
            --delta-backward both --pscan both --reps 5 --rules deltanet,gated_deltanet,gla,mamba 2>&1 \
            | tee "$out/d128.txt" ;;
    delta-ab|delta-ab2|delta-ab3)
        # the split forward's blocked UT inverse, tied input term, bf16 storages and chunk 64, each against the
        # default (two stages: each run compiles its kernels afresh). Plain chunk 64: D = 64 only (the untied
        # state kernels need ~270 KB of shared memory at D = 128 with 3 pipeline stages; with --num-stages 2
        # every DeltaNet kernel fits under the H100's 227 KB)
        if [ "$stage" = delta-ab ]; then
            set -- "" "--ut-block 64" "--no-tie" "--chunk-storage input"
        elif [ "$stage" = delta-ab3 ]; then
            set -- "" "--no-save-core"
        else
            set -- "--checkpoint-storage input" "--chunk-storage input --checkpoint-storage input" \
                "--chunk 64 --num-stages 2" "--chunk 64"
        fi
        for flags in "$@"; do
            timeout 135 python benchmarks/triton_kernels.py --dtype bf16 --B 4 --T 2048 --H 16 --dk 64 --dv 64 \
                --no-peers --rules deltanet,gated_deltanet $flags 2>&1
            [ "$flags" = "--chunk 64" ] || timeout 150 python benchmarks/triton_kernels.py --dtype bf16 --B 2 --T 8192 \
                --H 16 --dk 128 --dv 128 --no-peers --rules deltanet --reps 5 $flags 2>&1
        done | tee "$out/$stage.txt" ;;
    fla-gla)
        with_fla
        timeout 570 python benchmarks/triton_kernels.py --dtype bf16 --B 4 --T 2048 --H 16 --dk 64 --dv 64 \
            --rules gla 2>&1 | tee "$out/fla-gla.txt" ;;
    profile)
        timeout 570 python benchmarks/profile_gpu.py --rules deltanet,longhorn,mamba,gla --kernels chunk,recurrent \
            2>&1 | tee "$out/profile.txt" ;;
    trace)
        # the interpreter's launches first (16 processes, seconds each; Triton 3.6's interpreter fails some bf16 cases,
        # which then print their reference errors only), then each case compiled with blocking launches
        python benchmarks/kernel_trace.py record --dir /tmp/olssm-traces --jobs 16 ${CASES:+--cases $CASES} \
            > "$out/record.txt" 2>&1
        timeout 450 python benchmarks/kernel_trace.py compare --dir /tmp/olssm-traces --out "$out" --jobs 12 \
            --timeout 200 ${CASES:+--cases $CASES} 2>&1 | grep -E "^(==|!!)" ;;
    *)
        echo "unknown stage $stage" >&2; exit 2 ;;
esac
