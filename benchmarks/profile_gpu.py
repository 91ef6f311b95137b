"""Where the time of one scan goes on a GPU: torch.profiler over forward+backward, the top kernels
by device time, per rule and kernel family.

    python benchmarks/profile_gpu.py --rules linear_attention,gla --B 4 --T 2048 --H 16 --d 64
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from olssm.catalogue import ENTRIES, random_inputs
from olssm.kernels.triton import library


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rules", default="linear_attention,gla,deltanet")
    p.add_argument("--kernels", default="chunk,recurrent")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--top", type=int, default=8)
    a = p.parse_args(argv)
    for name in a.rules.split(","):
        rule = ENTRIES[name].rule.with_log_decays()    # gates in log space, as the layers give them
        inp = {n: x.cuda() for n, x in random_inputs(rule, a.B, a.T, a.H, a.d, a.d, seed=0).items()}
        inp = {n: (x if rule.inputs[n].is_parameter else x.to(torch.bfloat16)).requires_grad_() for n, x in inp.items()}
        for kernel in a.kernels.split(","):
            library.FORCE = kernel

            def step():
                o, _ = rule.scan(backend="triton", **inp)
                o.float().sum().backward()
            try:
                for _ in range(2):
                    step()
            except NotImplementedError as e:   # no such kernel for this rule (e.g. chunked Mamba)
                print(f"== {name} / {kernel}: {e}")
                continue
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            print(f"== {name} / {kernel} (3 fwd+bwd calls)")
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=a.top, max_name_column_width=60))
    library.FORCE = None


if __name__ == "__main__":
    main()
