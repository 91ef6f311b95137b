"""Smoke tests of examples/: each script's main(argv) runs in-process with tiny flags and must reach a
real outcome (verified table rows, a decreasing loss, accuracy above chance, a checkpoint round trip).
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    """Import examples/<name>.py as a module (the scripts import their helpers as `common`)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    mod_name = f"olssm_example_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _restore_threads():
    """The examples default to one torch thread; do not leak that into other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def need_api(*names):
    reason = load("common").api_missing(*names)
    if reason:
        pytest.skip(f"layer/model API not available: {reason}")


def common_flags(tmp_path, steps):
    return ["--steps", str(steps), "--out", str(tmp_path), "--no-progress", "--seed", "0"]


def test_framework_table(tmp_path):
    from olssm import catalogue
    res = load("framework_table").main(["--out", str(tmp_path), "--quiet"])
    assert res["all_ok"], [r for r in res["rows"] if not r["ok"]]
    assert res["n_ok"] == len(res["rows"]) == len(catalogue.ENTRIES)
    assert all(r["published_error"] < 1e-10 and r["solver_error"] < 1e-6 for r in res["rows"])
    md = (tmp_path / "results.md").read_text()
    tex = (tmp_path / "results.tex").read_text()
    assert f"{len(catalogue.ENTRIES)}/{len(catalogue.ENTRIES)} derived rules match" in md
    assert r"\begin{tabular}" in tex and tex.count(r"\\") >= len(catalogue.ENTRIES)
    assert (tmp_path / "errors.png").stat().st_size > 0


def test_new_objective(tmp_path, capsys):
    need_api("layers")
    res = load("new_objective").main(common_flags(tmp_path, 80) + [
        "--vocab", "16", "--seq-len", "16", "--num-pairs", "2", "--d-model", "32", "--batch-size", "32",
        "--verify-steps", "4"])
    assert res["verify_error"] < 1e-6
    assert set(res["verify_errors"]) == {"ridge_forget", "two_keys"}
    assert res["last_loss"] < res["first_loss"] - 0.1, (res["first_loss"], res["last_loss"])
    printed = capsys.readouterr().out
    assert "def step(S, inp):" in printed            # the generated torch kernel is shown
    assert "OK (tolerance" in printed                 # the verification report is shown
    assert (tmp_path / "results.md").exists() and (tmp_path / "loss.png").exists()


def test_mqar_learns_above_chance(tmp_path):
    need_api()
    res = load("mqar").main(common_flags(tmp_path, 100) + [
        "--models", "deltanet,linear_attention", "--widths", "32", "--vocab", "16", "--seq-len", "16",
        "--num-pairs", "2", "--n-layers", "1", "--test-examples", "256", "--lr", "1e-2"])
    assert len(res["rows"]) == 2
    assert res["best_accuracy"] > res["chance"] + 0.3, res["rows"]
    assert "| DeltaNet |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy_vs_width.png").exists()


@pytest.mark.parametrize("name", ["selective_copying", "induction_heads"])
def test_length_generalisation_loss_decreases(tmp_path, name):
    need_api()
    res = load(name).main(common_flags(tmp_path, 40) + [
        "--models", "deltanet", "--d-model", "32", "--n-layers", "1", "--train-len", "16",
        "--test-lens", "16,32", "--test-examples", "64"])
    (row,) = res["rows"]
    assert row["final_loss"] < row["first_loss"], row
    assert {"L=16", "L=32"} <= set(row)
    assert all(0.0 <= row[f"L={L}"] <= 1.0 for L in (16, 32))
    assert (tmp_path / "accuracy_vs_length.png").exists()


def test_icl_regression_beats_predict_zero(tmp_path):
    need_api("layers")
    res = load("icl_regression").main(common_flags(tmp_path, 400) + [
        "--models", "linear_attention,deltanet", "--dim", "4", "--num-context", "8", "--d-model", "32",
        "--test-examples", "512"])
    zero = res["baselines"]["predict zero"]
    assert all(m < zero for m in res["model_mse"].values()), (res["model_mse"], res["baselines"])
    assert res["best_model_mse"] < 0.8 * zero, (res["model_mse"], res["baselines"])
    assert res["baselines"]["least squares"] < zero
    assert (tmp_path / "mse.png").exists()


def test_train_lm_loss_decreases_and_resumes(tmp_path):
    need_api()
    ex = load("train_lm")
    flags = ["--out", str(tmp_path), "--no-progress", "--mixer", "deltanet", "--d-model", "32", "--n-layers", "1",
             "--seq-len", "32", "--batch-size", "8", "--corpus-chars", "20000", "--eval-every", "10",
             "--save-every", "10", "--sample-chars", "20", "--lr", "1e-2"]
    first = ex.main(flags + ["--steps", "30"])
    assert first["world_size"] == 1 and not first["resumed"]
    assert first["last_loss"] < first["first_loss"] - 0.3, (first["first_loss"], first["last_loss"])
    assert first["history"]["val"][-1] < first["history"]["val"][0]
    assert isinstance(first["sample"], str) and first["sample"].startswith("The ")

    # checkpoint round trip: the saved model gives the trained model's logits
    ckpt = Path(first["checkpoint"])
    loaded, state = ex.load_checkpoint(ckpt, torch.device("cpu"))
    assert state["step"] == 29
    ids = torch.randint(0, loaded.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    first["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), first["model"](ids))

    # resume: continues at step 30 with the saved optimizer state, and keeps the history
    second = ex.main(flags + ["--steps", "35", "--resume"])
    assert second["resumed"] and second["start_step"] == 30
    assert len(second["losses"]) == 5 and all(math.isfinite(x) for x in second["losses"])
    assert second["history"]["step"][:len(first["history"]["step"])] == first["history"]["step"]
    assert second["history"]["step"][-1] == 34


def test_train_lm_interrupted_run_equals_uninterrupted(tmp_path, monkeypatch):
    """A run that dies at step 22 and resumes from its step-19 checkpoint logs the same history as one that
    did not die: the training losses since the last evaluation are checkpointed too (the first mean after a
    resume covered one step), and the evaluation is a per-character mean (a short last batch had the weight
    of a whole one)."""
    need_api()
    ex = load("train_lm")
    flags = ["--no-progress", "--mixer", "deltanet", "--d-model", "16", "--n-layers", "1", "--seq-len", "16",
             "--batch-size", "4", "--corpus-chars", "6000", "--eval-every", "10", "--save-every", "10",
             "--sample-chars", "0", "--steps", "30"]
    whole = ex.main(flags + ["--out", str(tmp_path / "whole")])
    real, calls = ex.random_windows, []

    def dies_at_step_22(*a, **k):
        calls.append(1)
        if len(calls) == 23:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(ex, "random_windows", dies_at_step_22)
    with pytest.raises(KeyboardInterrupt):
        ex.main(flags + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(ex, "random_windows", real)
    resumed = ex.main(flags + ["--out", str(tmp_path / "cut"), "--resume"])
    assert resumed["start_step"] == 20
    assert resumed["history"]["step"] == whole["history"]["step"]
    for key in ("train", "val"):
        assert resumed["history"][key] == pytest.approx(whole["history"][key], rel=1e-6), key
    # the validation loss is the mean over characters: equal to one pass over every window at once
    model, val_ids = whole["model"], ex.load_corpus(6000, 0.05, 0)[2]
    n = min((len(val_ids) - 1) // 16, 32 * 8)
    x, y = val_ids[:n * 16].view(n, 16), val_ids[1:n * 16 + 1].view(n, 16)
    with torch.no_grad():
        want = float(ex.token_loss(model(x), y))
    assert ex.evaluate(model, val_ids, 16, 7, torch.device("cpu")) == pytest.approx(want, rel=1e-5)


def test_train_lm_torchrun_two_processes(tmp_path):
    """torchrun --nproc_per_node=2: DistributedDataParallel over gloo on the CPU."""
    need_api()
    import os
    import shutil
    import subprocess
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", str(EXAMPLES / "train_lm.py"),
           "--out", str(tmp_path), "--no-progress", "--mixer", "linear_attention", "--d-model", "16",
           "--n-layers", "1", "--seq-len", "16", "--batch-size", "4", "--corpus-chars", "5000",
           "--steps", "6", "--eval-every", "5", "--save-every", "5", "--sample-chars", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("Address already in use", "EADDRINUSE",
                                                               "RendezvousError", "DistNetworkError")):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)  # port race: once more
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    assert (tmp_path / "checkpoint" / "trainer.pt").exists()
    assert (tmp_path / "results.md").exists()
