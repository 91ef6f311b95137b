"""The reference backend: one `rule.step` per token. Slow, obviously correct, the oracle."""
from __future__ import annotations

import torch

from ..derive.rule import exact_readout


def reference_scan(args):
    rule = args.rule
    lay = rule.broadcast_inputs(args.d_k, args.d_v, {**args.tokens, **args.params}, "scan")
    tok = {n: lay[n] for n in args.tokens}
    par = {n: lay[n] for n in args.params}
    step, need = rule._step_fn, set(rule.update_inputs)
    dtype = torch.float64 if args.out_dtype == torch.float64 else torch.float32
    outs = torch.empty(args.B, args.T, args.H, args.d_v, dtype=dtype, device=args.device)
    finals = []
    for b, start, end, n in args.segments():
        if args.initial_state is None:
            first = {nm: x[b, start] for nm, x in args.tokens.items()}  # RLS: P_0 = I/λ at the first token
            S = rule.zero_state((args.H,), args.d_k, args.d_v, device=args.device, dtype=dtype, **args.params, **first)
        elif rule.is_exact:
            S = tuple(x[n].to(dtype) for x in args.initial_state)
        else:
            S = args.initial_state[n].to(dtype)
        for t in range(start, end):
            inp = {nm: x[b, t] for nm, x in tok.items()}
            inp.update(par)
            S = step(S, {nm: inp[nm] for nm in need})
            if rule.is_exact:
                outs[b, t] = exact_readout(rule.form, S, inp)
            else:
                q = inp[rule.query_name] if rule.query_name else None
                outs[b, t] = (S * q).sum(-1)
        finals.append(S)
    o = outs.to(args.out_dtype)
    if not args.output_final_state:
        return o, None
    if rule.is_exact:
        return o, tuple(torch.stack([f[i] for f in finals]) for i in range(2))
    return o, torch.stack(finals)
