"""The reference backend: one `rule.step` per token. Slow, obviously correct, the oracle."""
from __future__ import annotations

import torch

from ..derive.rule import exact_readout


def reference_scan(args):
    rule = args.rule
    lay = rule.broadcast_inputs(args.d_k, args.d_v, {**args.tokens, **args.params}, "scan")
    tok = {n: lay[n] for n in args.tokens}
    par = {n: lay[n] for n in args.params}
    need = set(rule.update_inputs)
    dtype = args.state_dtype
    # whole batches step together; packed (varlen) sequences one after another, batch of one
    outs, finals = [], []
    for rows, start, end, states in args.pieces():
        if args.initial_state is None:
            # RLS: P_0 = I/λ at the first token (an empty sequence: the nearest one, as rls.initial_p)
            first = {nm: x[rows, min(start, args.T - 1)] for nm, x in args.tokens.items()}
            batch = args.B if args.cu_seqlens is None else 1
            S = rule.zero_state((batch, args.H), args.d_k, args.d_v, device=args.device, dtype=dtype,
                                **args.params, **first)
        elif rule.is_exact:
            S = tuple(x[states].to(dtype) for x in args.initial_state)
        else:
            S = args.initial_state[states].to(dtype)
        # per-token slices through one unbind per input: x[rows, t] would make autograd add T full-size
        # zero gradients per input (a backward quadratic in T)
        steps = {nm: x[rows, start:end].unbind(1) for nm, x in tok.items()}
        for i in range(end - start):
            inp = {nm: xs[i] for nm, xs in steps.items()}
            inp.update(par)
            S = rule._step_fn(S, {nm: inp[nm] for nm in need})
            if rule.is_exact:
                outs.append(exact_readout(rule.form, S, inp))
            else:
                outs.append((S * inp[rule.query_name]).sum(-1))
        finals.append(S)
    # a list and one stack: writing into a preallocated buffer makes autograd keep T copies of it
    if outs:
        o = _assemble(outs, args)
    else:
        o = torch.zeros(args.B, args.T, args.H, args.d_v, dtype=dtype, device=args.device)
    if rule.is_rls:   # P's overflow, as the other backends report it (rls.check_rls_result)
        from .rls import check_rls_result
        check_rls_result(args, o, torch.cat([f[1] for f in finals]))
    o = o.to(args.out_dtype)
    if not args.output_final_state:
        return o, None
    if rule.is_exact:
        return o, tuple(torch.cat([f[i] for f in finals]) for i in range(2))
    return o, torch.cat(finals)


def _assemble(outs, args):
    """Per-step outputs ([batch, H, d_v] each) back to [B, T, H, d_v]."""
    if args.cu_seqlens is None:
        return torch.stack(outs, dim=1)
    return torch.cat(outs, dim=0).unsqueeze(0)
