"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023), accuracy vs model width.

A sequence lists key-value pairs (k1 v1 k2 v2 ...), then the keys re-appear in random order and the
model must output each key's value. Fixed-size recurrent memories trade recall for width; the
Zoology and Longhorn papers plot recall accuracy against model width for each layer type, which is
what this script reproduces in miniature: every model gets the same width (d_model), depth, MLP and
training budget, and differs only in the sequence mixer (an olssm preset).

    python examples/mqar.py                                      # about 9 minutes on 2 CPU cores
    python examples/mqar.py --widths 32,64,128,256 --num-pairs 16 --seq-len 128 --vocab 256 \\
        --steps 3000 --device auto                               # closer to the papers' setting

Writes results.md / results.json (accuracy per model and width) and accuracy_vs_width.png.
"""
from __future__ import annotations

import sys

from common import (MIXERS, base_parser, build_lm, count_parameters, fit_token_task, get_device,  # noqa: E402
                    int_list, markdown_table, out_dir, plot_series, resolve_mixers, set_seed, str_list, write_results)

from olssm.data import mqar

DEFAULT_MODELS = "longhorn,mamba,deltanet,gated_deltanet,gla,linear_attention,decayed_least_squares"


def main(argv=None) -> dict:
    p = base_parser("mqar", __doc__, steps=300, batch_size=64, lr=3e-3)
    p.add_argument("--models", type=str_list, default=str_list(DEFAULT_MODELS),
                   help=f"comma-separated presets from: {', '.join(MIXERS)}")
    p.add_argument("--widths", type=int_list, default=[32, 64], help="model widths (d_model), comma-separated")
    p.add_argument("--vocab", type=int, default=32, help="vocabulary size (keys and values split it in half)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--num-pairs", type=int, default=4, help="key-value pairs per sequence")
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--test-examples", type=int, default=512)
    args = p.parse_args(argv)
    models = resolve_mixers(args.models)
    out = out_dir(args, "mqar")
    device = get_device(args.device, args.threads)

    task = dict(seq_len=args.seq_len, vocab_size=args.vocab, num_pairs=args.num_pairs)
    test_x, test_y = mqar(args.test_examples, seed=10_000 + args.seed, **task)
    chance = 1.0 / (args.vocab - args.vocab // 2)  # a uniform guess among the value tokens

    rows, curves = [], {}
    for name in models:
        for width in args.widths:
            set_seed(args.seed)  # same initialisation stream and data order for every model
            model = build_lm(args.vocab, width, args.n_layers, mixer=name, n_heads=args.n_heads,
                             mlp_ratio=args.mlp_ratio).to(device)
            res = fit_token_task(model, mqar, task, args, {"test": (test_x, test_y)},
                                 desc=f"{MIXERS[name]} d={width}")
            acc = res["accuracy"]["test"]
            rows.append(dict(model=MIXERS[name], preset=name, width=width, params=count_parameters(model),
                             accuracy=acc, first_loss=res["first_loss"], final_loss=res["last_loss"],
                             seconds=round(res["seconds"], 1)))
            curves.setdefault(MIXERS[name], ([], []))
            curves[MIXERS[name]][0].append(width)
            curves[MIXERS[name]][1].append(acc)
            print(f"{MIXERS[name]:>22s}  d_model={width:<4d} accuracy {acc:.3f}  "
                  f"loss {res['first_loss']:.3f} -> {res['last_loss']:.3f}  ({res['seconds']:.1f}s)")

    # pivot: one row per model, one column per width
    pivot = [dict(model=m, **{f"d={w}": r["accuracy"] for r in rows if r["model"] == m for w in [r["width"]]})
             for m in curves]
    setting = (f"vocab {args.vocab}, sequence length {args.seq_len}, {args.num_pairs} key-value pairs, "
               f"{args.n_layers} layers, {args.steps} steps of batch {args.batch_size}; chance {chance:.3f}")
    write_results(out, "MQAR accuracy vs model width", pivot,
                  notes=f"Setting: {setting}.\n\nAll runs:\n\n"
                        + markdown_table(rows), meta=vars(args))
    plot_series(out / "accuracy_vs_width.png", curves, xlabel="model width (d_model)", ylabel="MQAR accuracy",
                title=f"MQAR ({args.num_pairs} pairs, length {args.seq_len})", logx=True,
                hline=(chance, "chance"))
    return {"rows": rows, "chance": chance, "best_accuracy": max(r["accuracy"] for r in rows), "out": str(out)}


if __name__ == "__main__":
    main()
    sys.exit(0)
