"""In-context linear regression (Garg et al. 2022; Sushma et al. 2024, "State-space models can learn
in-context by gradient descent").

Every prompt has its own weight vector w: context pairs (x_i, y_i = wᵀx_i + noise), i = 1..C, then a
query x_q. A one-layer model reads the prompt and predicts y_q; it never sees w, so it must regress
in context. A linear-attention memory S = Σ y_i x_iᵀ read with x_q gives (up to a step size) exactly
the prediction of one gradient-descent step from w = 0 — the construction of von Oswald et al. and
Sushma et al.; a decayed-least-squares memory can go further, towards least squares.

Token design: one token per (x_i, y_i) pair, [x_i, y_i, 0], and the query token [x_q, 0, 1]; a
linear embedding feeds one OnlineSSM (no convolution, so each token's key and value come from its own
pair: key from x, value from y), and a linear regression head reads the output at the query.

Compared on the same held-out prompts: the predict-zero baseline, one step of gradient descent (its
step size tuned on training prompts), and least squares.

    python examples/icl_regression.py                            # about 30 s on 2 CPU cores
    python examples/icl_regression.py --dim 20 --num-context 40 --steps 5000 --d-model 128
"""
from __future__ import annotations

import sys

from common import (MIXERS, base_parser, count_parameters, get_device, layers, out_dir, plot_series,  # noqa: E402
                    resolve_mixers, set_seed, str_list, train, write_results)

import torch
import torch.nn.functional as F
from torch import nn

from olssm.data import gradient_descent_prediction, icl_linear_regression, least_squares_prediction


def prompt_tokens(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """[N, C+1, d] inputs and [N, C+1] targets -> [N, C+1, d+2] tokens: (x, y, 0) for the context,
    (x_q, 0, 1) for the query (its target is hidden)."""
    y = ys.clone()
    y[:, -1] = 0
    flag = torch.zeros_like(ys)
    flag[:, -1] = 1
    return torch.cat([xs, y.unsqueeze(-1), flag.unsqueeze(-1)], dim=-1)


class ICLRegressor(nn.Module):
    """tokens -> Linear embedding -> one OnlineSSM mixer -> Linear head at the query position."""

    def __init__(self, mixer: str, dim: int, d_model: int, n_heads: int, **layer_kw):
        super().__init__()
        self.embed = nn.Linear(dim + 2, d_model)
        self.mixer = layers().PRESETS[mixer](d_model, n_heads=n_heads, **layer_kw)
        self.head = nn.Linear(d_model, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.mixer(self.embed(tokens))
        return self.head(h[:, -1]).squeeze(-1)


def best_gd_lr(xs, ys, grid=None) -> float:
    """The step size of one-step GD with the lowest MSE on (training) prompts."""
    grid = grid if grid is not None else [0.05 * i for i in range(1, 41)]
    errs = [float(((gradient_descent_prediction(xs, ys, lr) - ys[:, -1]) ** 2).mean()) for lr in grid]
    return grid[min(range(len(grid)), key=errs.__getitem__)]


def main(argv=None) -> dict:
    p = base_parser("icl_regression", __doc__, steps=400, batch_size=64, lr=3e-3)
    p.add_argument("--models", type=str_list, default=str_list("linear_attention,deltanet,decayed_least_squares"),
                   help=f"comma-separated presets from: {', '.join(MIXERS)}")
    p.add_argument("--dim", type=int, default=4, help="dimension of x")
    p.add_argument("--num-context", type=int, default=16, help="context pairs per prompt")
    p.add_argument("--noise-std", type=float, default=0.1)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--n-heads", type=int, default=1)
    p.add_argument("--conv-size", type=int, default=0, help="short convolution of the mixer (0: none)")
    p.add_argument("--out-norm", action="store_true",
                   help="keep the mixer's output RMSNorm (off by default: it discards the scale of the "
                        "readout, which a regression needs)")
    p.add_argument("--feature-map", default="identity",
                   help="feature map of keys/queries (identity keeps linear attention's readout bilinear, "
                        "as in the one-step-GD construction; 'preset' keeps each preset's own)")
    p.add_argument("--test-examples", type=int, default=2048)
    args = p.parse_args(argv)
    models = resolve_mixers(args.models)
    out = out_dir(args, "icl_regression")
    device = get_device(args.device, args.threads)
    task = dict(num_context=args.num_context, dim=args.dim, noise_std=args.noise_std)

    # held-out prompts, and the classical baselines on them
    test_xs, test_ys = icl_linear_regression(args.test_examples, seed=10_000 + args.seed, **task)
    target = test_ys[:, -1]
    tune_xs, tune_ys = icl_linear_regression(4096, seed=20_000 + args.seed, **task)
    lr_gd = best_gd_lr(tune_xs, tune_ys)
    mse = lambda pred: float(((pred.float() - target) ** 2).mean())  # noqa: E731
    baselines = {"predict zero": mse(torch.zeros_like(target)),
                 f"one GD step (lr {lr_gd:.2f})": mse(gradient_descent_prediction(test_xs, test_ys, lr_gd)),
                 "least squares": mse(least_squares_prediction(test_xs, test_ys))}

    g = torch.Generator().manual_seed(args.seed + 1)

    def batch_fn(step):
        xs, ys = icl_linear_regression(args.batch_size, generator=g, **task)
        return prompt_tokens(xs, ys).to(device), ys[:, -1].to(device)

    def loss_fn(model, batch):
        tokens, y = batch
        return F.mse_loss(model(tokens), y)

    rows = [dict(predictor=name, test_mse=v, params=0) for name, v in baselines.items()]
    curves = {}
    test_tokens = prompt_tokens(test_xs, test_ys).to(device)
    for name in models:
        set_seed(args.seed)
        layer_kw = dict(conv_size=args.conv_size, out_norm=args.out_norm)
        if args.feature_map != "preset":
            layer_kw["feature_map"] = None if args.feature_map == "none" else args.feature_map
        model = ICLRegressor(name, args.dim, args.d_model, args.n_heads, **layer_kw).to(device)
        hist = train(model, batch_fn, loss_fn, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                     desc=MIXERS[name], progress=not args.no_progress)
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(test_tokens[i:i + 512]) for i in range(0, len(test_tokens), 512)]).cpu()
        rows.append(dict(predictor=f"{MIXERS[name]} (1 layer, trained)", test_mse=mse(pred),
                         params=count_parameters(model)))
        k = max(1, len(hist["losses"]) // 50)  # smoothed training curve for the plot
        curves[MIXERS[name]] = (list(range(0, len(hist["losses"]), k)),
                                [sum(hist["losses"][i:i + k]) / len(hist["losses"][i:i + k])
                                 for i in range(0, len(hist["losses"]), k)])
        print(f"{MIXERS[name]:>22s}  train MSE {hist['first_loss']:.3f} -> {hist['last_loss']:.3f}  "
              f"test MSE {rows[-1]['test_mse']:.4f}  ({hist['seconds']:.1f}s)")

    for name, v in baselines.items():  # baselines as flat lines
        curves[name] = ([0, args.steps - 1], [v, v])
    write_results(out, "In-context linear regression: query MSE", rows,
                  notes=f"dim {args.dim}, {args.num_context} context pairs, noise std {args.noise_std}; "
                        f"{args.test_examples} held-out prompts; models trained {args.steps} steps of batch "
                        f"{args.batch_size}.", meta=vars(args))
    plot_series(out / "mse.png", curves, xlabel="training step", ylabel="query MSE (training batches)",
                title="in-context linear regression", logy=True)
    model_rows = rows[len(baselines):]
    return {"rows": rows, "baselines": baselines,
            "model_mse": {m: r["test_mse"] for m, r in zip(models, model_rows)},
            "best_model_mse": min(r["test_mse"] for r in model_rows), "out": str(out)}


if __name__ == "__main__":
    main()
    sys.exit(0)
