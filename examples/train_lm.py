"""Train a small character-level language model on the built-in English-like corpus.

    python examples/train_lm.py                                   # single process, about a minute on CPU
    python examples/train_lm.py --mixer gated_deltanet --steps 2000 --d-model 256 --n-layers 4 --device auto
    torchrun --nproc_per_node=2 examples/train_lm.py              # DistributedDataParallel (gloo on CPU,
                                                                  # nccl on GPU), detected from RANK/WORLD_SIZE
    python examples/train_lm.py --steps 600 --resume              # continue from the last checkpoint

Prints train / validation loss, saves checkpoints (CausalLM.save_pretrained plus the optimizer state
and step) every --save-every steps and at the end, and finishes with a sample from generate().
Writes results.md / results.json and loss.png into the output folder (default runs/train_lm/).
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from common import (MIXERS, base_parser, count_parameters, get_device, models, out_dir,  # noqa: E402
                    plot_series, positive_int, set_seed, token_loss, train, make_optimizer, write_results)

import torch

from olssm.data import CharTokenizer, char_corpus

TRAINER_STATE = "trainer.pt"


# --------------------------------------------------------------------------------------------
# distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run has none of them

def init_distributed(device_name: str):
    """(rank, world_size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return 0, 1, get_device(device_name)
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("cuda", "auto") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def cleanup_distributed(world: int):
    if world > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            # every rank tears gloo down together: rank 0 writes results and samples after the last step while the
            # others reach this point at once, and a rank that destroyed its group meanwhile aborted ("terminate
            # called without an active exception", SIGABRT) under load (seen once in the test suite)
            dist.barrier()
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# data

def load_corpus(num_chars: int, val_frac: float, seed: int):
    tok = CharTokenizer()
    ids = tok.encode(char_corpus(num_chars, seed=seed))
    n_val = max(1, int(len(ids) * val_frac))
    return tok, ids[:-n_val], ids[-n_val:]


def require_window(ids: torch.Tensor, seq_len: int, what: str) -> None:
    """A text split must hold one window of seq_len + 1 characters (input and shifted target)."""
    if len(ids) < seq_len + 1:
        raise ValueError(f"the {what} text has {len(ids)} characters, fewer than one window of seq_len + 1 = "
                         f"{seq_len + 1}: raise --corpus-chars (or --val-frac), or lower --seq-len")


def random_windows(ids: torch.Tensor, batch_size: int, seq_len: int, g: torch.Generator):
    """(inputs, targets) [B, seq_len]: random windows, targets shifted by one character."""
    require_window(ids, seq_len, "training")
    starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=g)   # the last window ends at the text's end
    w = torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, seq_len: int, batch_size: int, device, max_batches: int = 8) -> float:
    """Mean next-character loss per character over the first max_batches·batch_size consecutive windows of the
    validation text (a short last batch weighs by its size, not as a whole batch)."""
    require_window(ids, seq_len, "validation")
    was = model.training
    model.eval()
    n = min((len(ids) - 1) // seq_len, batch_size * max_batches)
    x = ids[:n * seq_len].view(n, seq_len)
    y = ids[1:n * seq_len + 1].view(n, seq_len)
    total = 0.0
    for i in range(0, n, batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        total += float(token_loss(model(xb.to(device)), yb.to(device))) * len(xb)
    model.train(was)
    return total / n


# --------------------------------------------------------------------------------------------
# checkpoints: <ckpt>/model (save_pretrained) + <ckpt>/trainer.pt (optimizer, step, history)

def save_checkpoint(ckpt: Path, model, optimizer, step: int, history: dict, args, recent=()) -> None:
    """recent: the training losses since the last evaluation (a resumed run's first logged mean needs them)."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    model.save_pretrained(str(tmp / "model"))
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "history": history, "args": vars(args),
                "rng": torch.get_rng_state(), "recent": list(recent)}, tmp / TRAINER_STATE)
    if ckpt.exists():  # replace atomically enough: the old checkpoint survives a crash while saving
        old = ckpt.with_name(ckpt.name + ".old")
        if old.exists():
            _rmtree(old)
        ckpt.rename(old)
        tmp.rename(ckpt)
        _rmtree(old)
    else:
        tmp.rename(ckpt)


def _rmtree(p: Path):
    import shutil
    shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(ckpt: Path, device):
    M = models()
    model = M.CausalLM.from_pretrained(str(ckpt / "model")).to(device)
    state = torch.load(ckpt / TRAINER_STATE, map_location=device, weights_only=False)
    return model, state


def main(argv=None) -> dict:
    p = base_parser("train_lm", __doc__, steps=300, batch_size=16, lr=3e-3, weight_decay=0.1)
    p.add_argument("--mixer", default="longhorn", choices=list(MIXERS))
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--corpus-chars", type=int, default=200_000)
    p.add_argument("--val-frac", type=float, default=0.05)
    p.add_argument("--eval-every", type=positive_int, default=100)
    p.add_argument("--save-every", type=positive_int, default=100)
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default <out>/checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if there is one")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--sample-chars", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy sampling")
    args = p.parse_args(argv)

    rank, world, device = init_distributed(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    is_main = rank == 0
    out = out_dir(args, "train_lm")
    ckpt = Path(args.checkpoint) if args.checkpoint else out / "checkpoint"
    log = print if is_main else (lambda *a, **k: None)

    tok, train_ids, val_ids = load_corpus(args.corpus_chars, args.val_frac, args.seed)
    require_window(val_ids, args.seq_len, "validation")   # before any step, not at the first evaluation
    set_seed(args.seed)

    # model and optimizer: fresh, or from the checkpoint
    start_step, history = 0, {"step": [], "train": [], "val": []}
    resumed, recent_losses = False, []
    if args.resume and (ckpt / TRAINER_STATE).exists():
        model, state = load_checkpoint(ckpt, device)
        optimizer = make_optimizer(model, args.lr, args.weight_decay)
        optimizer.load_state_dict(state["optimizer"])
        start_step, history, resumed = state["step"] + 1, state["history"], True
        recent_losses = list(state.get("recent", []))
        log(f"resumed from {ckpt} at step {start_step}")
    else:
        if args.resume:
            log(f"--resume: no checkpoint in {ckpt}, starting from scratch")
        M = models()
        model = M.CausalLM(M.LMConfig(vocab_size=tok.vocab_size, d_model=args.d_model, n_layers=args.n_layers,
                                      mixer=args.mixer, n_heads=args.n_heads, mlp_ratio=args.mlp_ratio)).to(device)
        optimizer = make_optimizer(model, args.lr, args.weight_decay)
    log(f"{MIXERS[args.mixer]} LM: {count_parameters(model):,} parameters, {len(train_ids):,} training characters, "
        f"world size {world}, device {device}")

    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # every rank draws its own batches; the stream is re-seeded by the step so a resumed run
    # sees the same batches as an uninterrupted one
    def batch_fn(step):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 101 + rank)
        x, y = random_windows(train_ids, args.batch_size, args.seq_len, g)
        return x.to(device), y.to(device)

    def loss_fn(m, batch):
        x, y = batch
        return token_loss(m(x), y)

    recent: list[float] = recent_losses

    def callback(step, loss):
        recent.append(loss)
        last = step == args.steps - 1
        if is_main and (step % args.eval_every == 0 or last):
            val = evaluate(model, val_ids, args.seq_len, 32, device)
            train_loss = sum(recent) / len(recent)
            recent.clear()
            history["step"].append(step)
            history["train"].append(train_loss)
            history["val"].append(val)
            log(f"step {step:6d}  train loss {train_loss:.4f}  val loss {val:.4f}  "
                f"(val bits/char {val / math.log(2):.3f})")
        if is_main and ((step + 1) % args.save_every == 0 or last):
            save_checkpoint(ckpt, model, optimizer, step, history, args, recent)

    t0 = time.perf_counter()
    hist = {"losses": [], "first_loss": float("nan"), "last_loss": float("nan")}
    if start_step < args.steps:
        hist = train(wrapped, batch_fn, loss_fn, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                     optimizer=optimizer, start_step=start_step, desc=f"LM ({args.mixer})",
                     progress=not args.no_progress, callback=callback, rank=rank)
    seconds = time.perf_counter() - t0
    del wrapped   # DDP's reducer holds the process group: released before cleanup_distributed destroys the group

    result = {"rank": rank, "world_size": world, "start_step": start_step, "resumed": resumed,
              "losses": hist["losses"], "first_loss": hist["first_loss"], "last_loss": hist["last_loss"],
              "history": history, "checkpoint": str(ckpt), "model": model, "out": str(out), "seconds": seconds}
    if is_main:
        model.eval()
        prompt = tok.encode(args.prompt).unsqueeze(0).to(device)
        g = torch.Generator(device=device).manual_seed(args.seed)
        ids = model.generate(prompt, max_new_tokens=args.sample_chars, temperature=args.temperature,
                             generator=g if args.temperature > 0 else None)
        sample = tok.decode(ids[0].cpu())
        log("\nsample:\n" + sample + "\n")
        val = history["val"][-1] if history["val"] else float("nan")
        rows = [dict(step=s, train_loss=tr, val_loss=v, val_bits_per_char=v / math.log(2))
                for s, tr, v in zip(history["step"], history["train"], history["val"])]
        write_results(out, f"Character LM ({MIXERS[args.mixer]}, d_model {args.d_model}, {args.n_layers} layers)",
                      rows, notes=f"Sample (prompt {args.prompt!r}, temperature {args.temperature}):\n\n```\n"
                                  f"{sample}\n```", meta={k: v for k, v in vars(args).items()})
        if history["step"]:
            plot_series(out / "loss.png", {"train": (history["step"], history["train"]),
                                           "validation": (history["step"], history["val"])},
                        xlabel="step", ylabel="loss (nats/char)", title="character LM")
        result.update(sample=sample, val_loss=val)
    cleanup_distributed(world)
    return result


if __name__ == "__main__":
    if main()["world_size"] > 1:
        # under torchrun, leave without the interpreter's teardown: a rank aborted there now and then after its
        # group was destroyed ("terminate called without an active exception", SIGABRT, under a loaded test
        # suite), though every result was written and the group shut down
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(0)
