"""Shared helpers of the examples: paths, device and seed, the training loop, accuracy, result tables
and plots. Every example script imports from here so that no loop is written twice.

The examples run from a checkout without installing the package (`python examples/mqar.py`): the
repository root is put on sys.path when `olssm` is not importable.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
try:
    import olssm  # noqa: F401
except ImportError:  # running from a checkout: python examples/<name>.py
    sys.path.insert(0, str(ROOT))
    import olssm  # noqa: F401

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

#: the sequence mixers the task examples compare: preset name -> label in tables and plots
MIXERS = {
    "longhorn": "Longhorn",
    "mamba": "Mamba",
    "mamba2": "Mamba-2",
    "deltanet": "DeltaNet",
    "gated_deltanet": "Gated DeltaNet",
    "gla": "GLA",
    "linear_attention": "Linear attention",
    "retnet": "RetNet",
    "decayed_least_squares": "Decayed least squares",
}


# --------------------------------------------------------------------------------------------
# the layer / model API (written concurrently in olssm.layers and olssm.models)

class APIMissing(RuntimeError):
    """olssm.layers / olssm.models do not provide what an example needs (yet)."""


def api_missing(*names: str) -> str | None:
    """Why the layer/model API is unusable, or None. names: 'layers', 'models' (default both)."""
    names = names or ("layers", "models")
    want = {"layers": ("OnlineSSM", "PRESETS"), "models": ("LMConfig", "CausalLM")}
    for mod in names:
        try:
            m = __import__(f"olssm.{mod}", fromlist=["_"])
        except Exception as e:  # noqa: BLE001 - any import failure makes the example unusable
            return f"olssm.{mod} cannot be imported: {type(e).__name__}: {e}"
        lacking = [a for a in want[mod] if not hasattr(m, a)]
        if lacking:
            return f"olssm.{mod} does not define {', '.join(lacking)} yet"
    return None


def require_api(*names: str):
    reason = api_missing(*names)
    if reason:
        raise APIMissing(reason)


def layers():
    require_api("layers")
    import olssm.layers
    return olssm.layers


def models():
    require_api("models")
    import olssm.models
    return olssm.models


def build_lm(vocab_size: int, d_model: int, n_layers: int = 2, mixer: str | None = "longhorn",
             objective=None, n_heads: int = 4, mlp_ratio: float = 2, mixer_kwargs: dict | None = None,
             **config_kw):
    """A CausalLM whose mixers are a preset (mixer=...) or any Objective (objective=...)."""
    M = models()
    kw = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
              mlp_ratio=mlp_ratio, mixer_kwargs=dict(mixer_kwargs or {}), **config_kw)
    if objective is not None:
        kw["mixer_objective"] = objective
    else:
        kw["mixer"] = mixer
    return M.CausalLM(M.LMConfig(**kw))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# device, seed, command line

def get_device(name: str = "cpu", threads: int = 0) -> torch.device:
    """The device to run on; on the CPU also sets torch's thread count when threads > 0."""
    if threads and threads > 0:
        torch.set_num_threads(threads)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the script's docstring layout and shows every flag's default."""

    def _get_help_string(self, action):
        h = "" if action.help == "-" else (action.help or "").strip()
        if action.default not in (argparse.SUPPRESS, None) and action.option_strings and action.nargs != 0:
            d = action.default
            d = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else d
            h += f" (default: {d})"
        return h.strip()


class _Parser(argparse.ArgumentParser):
    def add_argument(self, *args, **kw):
        kw.setdefault("help", "-")  # argparse lists no default for a flag without help text
        return super().add_argument(*args, **kw)


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (an interval of 0 divided by zero)."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def base_parser(name: str, description: str, **defaults) -> argparse.ArgumentParser:
    """Flags every training example shares; defaults= overrides their default values."""
    p = _Parser(prog=f"python examples/{name}.py", description=description, formatter_class=_Formatter)
    p.add_argument("--steps", type=int, default=defaults.get("steps", 300), help="training steps")
    p.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 32))
    p.add_argument("--lr", type=float, default=defaults.get("lr", 3e-3), help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=defaults.get("weight_decay", 0.0))
    p.add_argument("--seed", type=int, default=defaults.get("seed", 0))
    p.add_argument("--device", default=defaults.get("device", "cpu"), help="cpu, cuda, or auto")
    p.add_argument("--threads", type=int, default=defaults.get("threads", 1),
                   help="CPU threads for torch (small models run fastest on one; 0 keeps torch's default)")
    p.add_argument("--out", default=None, help=f"output folder (default runs/{name}/)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def out_dir(args, name: str) -> Path:
    d = Path(args.out) if getattr(args, "out", None) else Path("runs") / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# --------------------------------------------------------------------------------------------
# training

def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and per-head parameters (anything below 2-D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98))


def train(model: torch.nn.Module, batch_fn: Callable[[int], object], loss_fn: Callable, *, steps: int,
          lr: float, weight_decay: float = 0.0, warmup: int | None = None, clip: float = 1.0,
          optimizer: torch.optim.Optimizer | None = None, start_step: int = 0, desc: str = "train",
          progress: bool = True, callback: Callable[[int, float], None] | None = None,
          rank: int = 0) -> dict:
    """The one training loop of the examples.

    batch_fn(step) -> batch; loss_fn(model, batch) -> scalar loss. The schedule is a function of the
    absolute step, so a run resumed at start_step continues the same schedule. callback(step, loss)
    runs after each optimizer step (evaluation, checkpoints). Returns the loss history and timings.
    """
    from tqdm.auto import tqdm

    warmup = max(1, steps // 10) if warmup is None else max(1, warmup)
    opt = optimizer if optimizer is not None else make_optimizer(model, lr, weight_decay)
    model.train()
    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(start_step, steps), desc=desc, disable=not progress or rank != 0, leave=False,
               dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        batch = batch_fn(step)
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        val = float(loss.detach())
        if not math.isfinite(val):
            raise FloatingPointError(f"{desc}: loss became {val} at step {step}")
        losses.append(val)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{val:.4f}")
        if callback is not None:
            callback(step, val)
    bar.close()
    seconds = time.perf_counter() - t0
    return {"losses": losses, "optimizer": opt, "seconds": seconds,
            "first_loss": smoothed(losses, first=True), "last_loss": smoothed(losses, first=False)}


def smoothed(losses: Sequence[float], first: bool, frac: float = 0.1) -> float:
    """Mean of the first (or last) 10% of a loss history (at least one value; nan if empty)."""
    if not losses:
        return float("nan")
    n = max(1, int(len(losses) * frac))
    part = losses[:n] if first else losses[-n:]
    return float(sum(part) / len(part))


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the scored positions (targets != -100)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def lm_task_loss(model, batch):
    """loss_fn for token tasks: batch = (inputs, targets) already aligned (see olssm.data.synthetic)."""
    x, y = batch
    return token_loss(model(x), y)


@torch.no_grad()
def token_accuracy(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   batch_size: int = 128) -> float:
    """Fraction of scored positions (targets != -100) where the argmax prediction is right."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
        pred = model(x).argmax(-1)
        mask = y != IGNORE_INDEX
        correct += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
    model.train(was)
    return correct / max(1, total)


def sampler(make: Callable[..., tuple], batch_size: int, seed: int, device: torch.device, **task_kw):
    """batch_fn for a generator of olssm.data.synthetic: a fresh batch per step from one seeded stream."""
    g = torch.Generator().manual_seed(seed)

    def batch_fn(step):
        return tuple(t.to(device) for t in make(batch_size, generator=g, **task_kw))
    return batch_fn


def fit_token_task(model: torch.nn.Module, make: Callable[..., tuple], task_kw: dict, args,
                   eval_sets: dict, desc: str, device: torch.device | None = None) -> dict:
    """Train a token model on a generator of olssm.data.synthetic and score held-out sets.

    task_kw: the generator's keyword arguments for training batches; eval_sets {label: (inputs,
    targets)}; args: the parsed base_parser flags (steps, batch_size, lr, weight_decay, seed,
    no_progress). Returns losses, smoothed first/last loss, accuracy per eval set, seconds.
    """
    device = device or next(model.parameters()).device
    batch_fn = sampler(make, args.batch_size, args.seed + 1, device, **task_kw)
    hist = train(model, batch_fn, lm_task_loss, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                 desc=desc, progress=not args.no_progress)
    acc = {label: token_accuracy(model, x, y) for label, (x, y) in eval_sets.items()}
    return {"losses": hist["losses"], "first_loss": hist["first_loss"], "last_loss": hist["last_loss"],
            "accuracy": acc, "seconds": hist["seconds"]}


def length_generalisation(args, name: str, title: str, make: Callable[..., tuple],
                          task_kw: Callable[[int], dict], chance: float, vocab_size: int) -> dict:
    """Train each model of args.models at args.train_len, score it at every length of args.test_lens
    (Mamba paper, §4.1). task_kw(length) -> the generator's keyword arguments for that length.
    Writes results.md/json and accuracy_vs_length.png into the output folder; returns the rows."""
    models = resolve_mixers(args.models)
    out = out_dir(args, name)
    device = get_device(args.device, args.threads)
    lengths = sorted(set(args.test_lens) | {args.train_len})
    eval_sets = {L: make(args.test_examples, seed=10_000 + args.seed + L, **task_kw(L)) for L in lengths}
    rows, curves, histories = [], {}, {}
    for m in models:
        set_seed(args.seed)
        model = build_lm(vocab_size, args.d_model, args.n_layers, mixer=m, n_heads=args.n_heads,
                         mlp_ratio=args.mlp_ratio).to(device)
        res = fit_token_task(model, make, task_kw(args.train_len), args, eval_sets, desc=MIXERS[m])
        row = dict(model=MIXERS[m], first_loss=res["first_loss"], final_loss=res["last_loss"],
                   **{f"L={L}": res["accuracy"][L] for L in lengths}, seconds=round(res["seconds"], 1))
        rows.append(row)
        curves[MIXERS[m]] = (lengths, [res["accuracy"][L] for L in lengths])
        histories[m] = res["losses"]
        print(f"{MIXERS[m]:>22s}  loss {res['first_loss']:.3f} -> {res['last_loss']:.3f}  accuracy "
              + "  ".join(f"L={L}: {res['accuracy'][L]:.3f}" for L in lengths) + f"  ({res['seconds']:.1f}s)")
    notes = (f"Trained at length {args.train_len} ({args.steps} steps of batch {args.batch_size}, d_model "
             f"{args.d_model}, {args.n_layers} layers), tested at lengths {lengths}; chance {chance:.3f}.")
    write_results(out, f"{title}: accuracy vs test length", rows, notes=notes, meta=vars(args))
    plot_series(out / "accuracy_vs_length.png", curves, xlabel="test sequence length", ylabel="accuracy",
                title=f"{title} (trained at length {args.train_len})", logx=True, hline=(chance, "chance"))
    return {"rows": rows, "losses": histories, "chance": chance, "lengths": lengths, "out": str(out)}


def add_length_flags(p: argparse.ArgumentParser, models: str, train_len: int, test_lens: str) -> None:
    p.add_argument("--models", type=str_list, default=str_list(models),
                   help=f"comma-separated presets from: {', '.join(MIXERS)}")
    p.add_argument("--train-len", type=int, default=train_len, help="training sequence length")
    p.add_argument("--test-lens", type=int_list, default=int_list(test_lens), help="test lengths, comma-separated")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--test-examples", type=int, default=256)


# --------------------------------------------------------------------------------------------
# results: markdown tables, JSON, plots

def _fmt(x) -> str:
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.4g}"
        return f"{x:.2e}"
    return str(x)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None,
                   headers: dict | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    headers = headers or {}
    head = "| " + " | ".join(headers.get(c, c) for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_results(out: Path, title: str, rows: Sequence[dict], columns: Sequence[str] | None = None,
                  headers: dict | None = None, notes: str = "", meta: dict | None = None,
                  quiet: bool = False) -> str:
    """Print a markdown table and write results.md and results.json into out."""
    md = f"## {title}\n\n" + markdown_table(rows, columns, headers) + "\n"
    if notes:
        md += "\n" + notes.strip() + "\n"
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"title": title, "rows": list(rows), "meta": meta or {}},
                                                 indent=2, default=str))
    if not quiet:
        print("\n" + md)
        print(f"wrote {out / 'results.md'}")
    return md


def plot_series(path: Path, series: dict, xlabel: str, ylabel: str, title: str = "",
                logx: bool = False, logy: bool = False, hline: tuple[float, str] | None = None,
                xticklabels: Sequence[str] | None = None, quiet: bool = False) -> Path:
    """One line per entry of series {label: (xs, ys)}, saved as a PNG (Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)))
        ax.set_xticklabels(xticklabels, rotation=45, ha="right", fontsize=7)
    if logx:
        ax.set_xscale("log", base=2)
        xs_all = sorted({float(x) for xs, _ in series.values() for x in xs})
        if xs_all and len(xs_all) <= 12:  # label the measured x values themselves (16, 32, 64, ...)
            ax.set_xticks(xs_all)
            ax.set_xticklabels([f"{x:g}" for x in xs_all])
            ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    if not quiet:
        print(f"wrote {path}")
    return path


def resolve_mixers(names: Iterable[str]) -> list[str]:
    names = list(names)
    bad = [n for n in names if n not in MIXERS]
    if bad:
        raise SystemExit(f"unknown model(s) {bad}; choose from {', '.join(MIXERS)}")
    return names


__all__ = ["ROOT", "MIXERS", "APIMissing", "api_missing", "require_api", "layers", "models", "build_lm",
           "count_parameters", "get_device", "set_seed", "base_parser", "out_dir", "int_list", "str_list",
           "lr_at", "make_optimizer", "train", "smoothed", "token_loss", "lm_task_loss", "token_accuracy",
           "sampler", "fit_token_task", "length_generalisation", "add_length_flags", "markdown_table", "write_results", "plot_series", "resolve_mixers"]
