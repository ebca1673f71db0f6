"""The trainer end to end on a tiny synthetic dataset made with the real commands (synth,
normalize --size 64x64, embed --clip-pretrained none): learning, checkpoints, exact resume after
SIGKILL, cached vs inline CLIP, refusals, a diverging loss, DDP on CPU."""

from __future__ import annotations

import csv
import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.errors import BadInputError
from pipeline.formats.manifest import read_manifest
from pipeline.formats.prepared import PreparedDataset
from pipeline.formats.shards import split_shards
from salmm import train
from salmm.data.stages import SaliencyShards
from salmm.evaluation import metrics
from salmm.model.checkpoint import load_checkpoint
from salmm.model.official import load_official
from salmm.train import parse_args
from salmm.training import config as train_config
from salmm.training import inputs as train_inputs
from salmm.training import loop as train_loop
from salmm.training import trainer as train_trainer
from salmm.training.config import TrainConfig
from tests._prepared import (
    REPO,
    subprocess_env,
    write_fake_cache,
    write_prepared,
)
from tests._single_thread import single_thread  # noqa: F401 (autouse fixture)

EPOCHS = 5
STEPS = 5          # per epoch: 9 training samples in batches of 2


@pytest.fixture(scope="module")
def prepared(commands_prepared) -> Path:
    return commands_prepared


def args(prepared: Path, out: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return ["--cached-clip", "--prepared", str(prepared), "--clip-pretrained", "none",
            "--size", "64x64", "--batch-size", "2", "--epochs", str(epochs), "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def reference_run(prepared, tmp_path_factory) -> Path:
    """An uninterrupted cached-CLIP run, in this process (one torch thread, like the
    subprocesses), data loaded inline."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert train.main(args(prepared, out, "--workers", "0")) == 0
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- learning and what a run leaves behind ---------------------------------------------------


def test_tiny_run_learns_and_leaves_loadable_checkpoints_and_logs(prepared, reference_run):
    rows = read_csv(reference_run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert int(rows[-1]["step"]) == EPOCHS * STEPS
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.9 * losses[0]
    assert all(int(r["valid_samples"]) == 9 for r in rows)
    assert (reference_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((reference_run / "tb").glob("events.out.tfevents.*"))
    log_text = (reference_run / "train.log").read_text()
    assert f"epoch {EPOCHS}/{EPOCHS}" in log_text and "numba scan" in log_text
    assert json.loads((reference_run / "config.json").read_text())["scan"] == "numba"

    last = torch.load(reference_run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == EPOCHS and last["step"] == EPOCHS * STEPS and last["scan"] == "numba"
    assert {"state_dict", "optim_dict", "valid_loss", "rng", "config", "git_commit"} <= set(last)
    assert last["dataset_version"] == read_manifest(str(prepared))["version_id"]
    assert last["cache_identity"]["encoder"]["weights"] == "random-seed0"
    assert last["config"]["cached_clip"] is True and last["config"]["size"] == [64, 64]
    best = load_checkpoint(reference_run / "best.pt")
    valid = [float(r["valid_loss"]) for r in rows]
    assert best["epoch"] == 1 + int(np.argmin(valid))
    assert best["valid_loss"] == pytest.approx(min(valid))

    # the authors' loader takes it, and the loaded model scores a validation batch
    model = load_official(reference_run / "best.pt", backend="builtin").eval()
    cache = train_inputs.open_checked_cache(parse_args(args(prepared, reference_run)),
                                            PreparedDataset.open(prepared))[0]
    batch = next(iter(SaliencyShards(split_shards(str(prepared), read_manifest(str(prepared)),
                                                  "valid"), split="valid", train=False, seed=0,
                                     batch_size=3, size=(64, 64), cache_path=cache)))
    with torch.no_grad():
        pred = model(batch["frame"].float() / 255, batch["emb"])
    assert pred.shape == (3, 1, 64, 64)
    scores = metrics.evaluate_frame(pred[0, 0].numpy(), batch["label"][0, 0].numpy(), None,
                                    rng=np.random.default_rng(0))
    assert all(math.isfinite(scores[m]) for m in ("CC", "SIM", "KLD"))


def test_evaluation_of_the_best_checkpoint_repeats_its_validation_scores(prepared,
                                                                        reference_run, tmp_path):
    from salmm import evaluate

    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(reference_run / "best.pt"), "--prepared",
                          str(prepared), "--split", "valid", "--out", str(out), "--cached-clip",
                          "--workers", "0"]) == 0
    means = json.loads((out / "summary.json").read_text())["means"]
    best = load_checkpoint(reference_run / "best.pt")
    row = best["history"][best["epoch"] - 1]
    for name in ("CC", "SIM", "KLD"):
        assert means[name] == pytest.approx(row[name], rel=1e-5), name   # float32 batching


KILL_AFTER_FIRST_EPOCH = """
import os, signal, sys
from salmm import train
from salmm.training import records as train_records
save = train_records.save_checkpoint
def save_then_die(path, checkpoint):
    save(path, checkpoint)
    if str(path).endswith("last.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
train_records.save_checkpoint = save_then_die
sys.exit(train.main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_same_weights(prepared, reference_run, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "salmm.train", *args(prepared, out, "--workers", "1")]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH, *command[3:]],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    killed_at = load_checkpoint(out / "last.pt")["epoch"]
    assert killed_at == 1, "killed right after the first epoch's last.pt"

    resumed = subprocess.run([*command, "--resume", str(out / "last.pt")], cwd=REPO,
                             env=subprocess_env(), capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = load_checkpoint(out / "last.pt")
    want = load_checkpoint(reference_run / "last.pt")
    assert final["epoch"] == EPOCHS
    assert same_weights(final["state_dict"], want["state_dict"])
    got_rows, want_rows = read_csv(out / "metrics.csv"), read_csv(reference_run / "metrics.csv")
    for column in ("epoch", "step", "train_loss", "valid_loss", "CC", "SIM", "KLD"):
        assert [r[column] for r in got_rows] == [r[column] for r in want_rows], column


@pytest.mark.slow
def test_the_same_command_gives_the_same_weights_beside_a_busy_process(prepared, tmp_path):
    """The user's environment (no OMP_NUM_THREADS), the default thread count: once on a quiet
    machine, once beside a process that keeps a core busy."""
    env = {k: v for k, v in subprocess_env().items() if k != "OMP_NUM_THREADS"}

    def run(name: str) -> dict:
        out = tmp_path / name
        result = subprocess.run([sys.executable, "-m", "salmm.train",
                                 *args(prepared, out, "--workers", "1", epochs=2)],
                                cwd=REPO, env=env, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        return load_checkpoint(out / "last.pt")

    quiet = run("quiet")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = run("loaded")
    finally:
        busy.kill()
        busy.wait()
    assert quiet["threads"] == loaded["threads"] == train_config.DEFAULT_TRAIN_THREADS
    assert same_weights(quiet["state_dict"], loaded["state_dict"])


# ---- cached vs inline CLIP --------------------------------------------------------------------


def test_cached_and_inline_clip_give_the_same_outputs_with_flips(prepared):
    cfg = parse_args(args(prepared, prepared / "unused"))
    manifest = read_manifest(str(prepared))
    cache, _ = train_inputs.open_checked_cache(cfg, PreparedDataset.open(prepared))
    data = SaliencyShards(split_shards(str(prepared), manifest, "train"), split="train",
                          train=True, seed=42, batch_size=9, size=(64, 64), cache_path=cache)
    batch = next(iter(data))
    assert batch["flipped"].any() and not batch["flipped"].all()

    torch.manual_seed(0)
    cached = train_trainer.build_model(cfg, torch.device("cpu")).eval()
    cached.CrossModelAtt.gamma.data.fill_(1.0)      # 0 at init would hide the embedding
    inline = train_trainer.build_model(TrainConfig.from_dict({**cfg.as_dict(), "cached_clip": False}),
                               torch.device("cpu")).eval()
    inline.load_state_dict(cached.state_dict())
    frames = batch["frame"].float() / 255
    with torch.no_grad():
        want = inline(frames)
        got = cached(frames, batch["emb"])
        unflipped_emb = torch.stack([torch.from_numpy(data.table.lookup(i, k, False))
                                     for i, k in zip(batch["index"], batch["key"])])
        wrong = cached(frames, unflipped_emb)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the embedding matters: the unflipped one gives other outputs for the flipped frames
    flipped = batch["flipped"]
    assert (wrong[flipped] - want[flipped]).abs().max() > 1e-3
    torch.testing.assert_close(wrong[~flipped], want[~flipped], rtol=0, atol=1e-5)


# ---- refusals ---------------------------------------------------------------------------------


def test_a_cache_made_with_another_profile_is_refused_in_one_line(prepared, tmp_path):
    cache = prepared / "clip" / "ViT-B-32-salmm-random-seed0.zarr"
    result = subprocess.run(
        [sys.executable, "-m", "salmm.train",
         *args(prepared, tmp_path / "run", "--cache", str(cache), "--profile", "openclip")],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "made with CLIP profile 'salmm', but 'openclip' is required" in lines[0]
    assert not (tmp_path / "run").exists()


def test_no_cache_for_the_default_weights_names_the_one_there_and_the_offline_command(
        prepared, tmp_path):
    argv = [a for a in args(prepared, tmp_path / "run") if a not in ("--clip-pretrained",
                                                                      "none")]
    with pytest.raises(BadInputError) as err:
        train_trainer.train(parse_args(argv))
    text = str(err.value)
    assert "ViT-B-32-salmm-openai.zarr: no CLIP cache" in text
    assert "use it with --clip-pretrained none" in text and "--clip-pretrained none for random" \
        in text and "\n" not in text


@pytest.mark.parametrize("case, message", [
    ("other_version", "made from prepared dataset version"),
    ("no_cache", ("no CLIP cache for these CLIP options; it holds"
                  " ViT-B-32-salmm-random-seed0.zarr (use it with --clip-pretrained none); make"
                  " it with `python -m pipeline embed --prepared")),
    ("size", "prepared at 64x64 (width x height) but the run asks --size 32x32"),
    ("weights", "made with CLIP weights 'random-seed0', but 'openai' is required"),
])
def test_mismatched_inputs_are_refused_before_training(prepared, tmp_path, case, message):
    extra: list[str] = []
    if case == "other_version":
        other = write_prepared(tmp_path / "other", {"train": [2], "valid": [1]}, (64, 64))
        extra = ["--cache", str(write_fake_cache(other, tmp_path / "other.zarr"))]
    elif case == "no_cache":
        extra = ["--clip-model", "ViT-B-16"]
    elif case == "size":
        extra = ["--size", "32x32"]
    argv = args(prepared, tmp_path / "run", *extra)
    if case == "weights":
        argv = [*argv, "--cache", str(prepared / "clip" / "ViT-B-32-salmm-random-seed0.zarr"),
                "--clip-pretrained", "openai"]
    with pytest.raises(BadInputError) as err:
        train_trainer.train(parse_args(argv))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_resume_with_another_recipe_or_into_a_used_folder_is_refused(prepared, reference_run,
                                                                     tmp_path):
    resume = ["--resume", str(reference_run / "last.pt")]
    with pytest.raises(BadInputError, match=r"last\.pt: trained with other options"
                                            r" \(--lr 0\.001 -> 0\.01\)"):
        train_trainer.train(parse_args(args(prepared, tmp_path / "r", *resume, "--lr", "0.01")))
    with pytest.raises(BadInputError, match="already holds a run"):
        train_trainer.train(parse_args(args(prepared, reference_run)))
    official = tmp_path / "official.tar"
    torch.save({"epoch": 1, "state_dict": load_checkpoint(reference_run / "last.pt")["state_dict"],
                "optim_dict": {}, "valid_loss": 0.5}, official)
    with pytest.raises(BadInputError, match="not a salmm training checkpoint"):
        train_trainer.train(parse_args(args(prepared, tmp_path / "r", "--resume", str(official))))


# ---- a diverging loss -------------------------------------------------------------------------


def test_non_finite_loss_stops_with_the_last_good_state(prepared, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_loop.bce_loss

    def loss_that_diverges(pred, target):
        calls["n"] += 1
        value = real(pred, target)
        return value * float("nan") if calls["n"] == STEPS + 2 else value  # epoch 2, step 2

    monkeypatch.setattr(train_loop, "bce_loss", loss_that_diverges)
    out = tmp_path / "run"
    assert train.main(args(prepared, out, "--workers", "0", epochs=3)) == 3
    good = load_checkpoint(out / "last-good.pt")
    assert good["stopped"]["epoch"] == 2 and good["stopped"]["step"] == STEPS + 2
    assert "non-finite training loss" in good["stopped"]["reason"]
    assert good["epoch"] == 1 and good["step"] == STEPS + 1
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())
    # the weights after the last finite step: epoch 1's checkpoint plus one more step
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 1 and not same_weights(good["state_dict"], last["state_dict"])
    assert len(read_csv(out / "metrics.csv")) == 1


# ---- DDP --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu_split_shards_by_rank(prepared, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp_path / "ddp"
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "salmm.train",
         *args(prepared, out, "--workers", "0", "--device", "cpu", epochs=1)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_csv(out / "metrics.csv")
    # shards of 4, 4 and 1 samples: one rank reads two shards, the other one; both take as many
    # steps as the smaller share allows, and validation counts every sample once
    assert int(row["valid_samples"]) == 9
    assert 0 < int(row["train_samples"]) <= 9 and int(row["step"]) >= 1
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["world_size"] == 2
    load_official(out / "last.pt", backend="builtin")


# ---- pieces -----------------------------------------------------------------------------------


def test_bce_is_torch_bce_loss_forward_and_backward_even_at_saturation():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8) * 3
    logits[0, 0, 0, :4] = torch.tensor([20.0, 40.0, -120.0, -20.0])  # sigmoid: exactly 1.0 / 0.0
    target = torch.rand(2, 1, 8, 8)
    grads = []
    for loss_fn in (train_loop.bce_loss, torch.nn.BCELoss()):
        x = logits.clone().requires_grad_()
        pred = torch.sigmoid(x)
        loss = loss_fn(pred, target)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    assert torch.sigmoid(logits)[0, 0, 0, :2].eq(1.0).all()       # saturated in float32
    (ours, ours_grad), (theirs, theirs_grad) = grads
    assert torch.equal(ours, theirs) and torch.equal(ours_grad, theirs_grad)
    assert torch.isfinite(ours_grad).all()
    nan_pred = torch.sigmoid(logits)
    nan_pred[1, 0, 3, 3] = float("nan")
    with pytest.raises(train_loop.NonFinite, match="non-finite prediction"):
        train_loop.bce_loss(nan_pred, target)


def test_non_finite_gradient_stops_before_the_step_with_a_finite_last_good_state(
        prepared, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_loop.bce_loss

    def loss_with_nan_gradient(pred, target):
        calls["n"] += 1
        value = real(pred, target)
        if calls["n"] == 2:      # finite forward (0), NaN backward: 0 * clamp'(log(0)) * 1/0
            value = value + (torch.log(pred * 0).clamp_min(-100) * 0).sum()
        return value

    monkeypatch.setattr(train_loop, "bce_loss", loss_with_nan_gradient)
    out = tmp_path / "run"
    assert train.main(args(prepared, out, "--workers", "0", epochs=1)) == 3
    good = load_checkpoint(out / "last-good.pt")
    assert "non-finite gradient" in good["stopped"]["reason"]
    assert good["step"] == 1 and good["stopped"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())
    moments = [v for s in good["optim_dict"]["state"].values() for v in s.values()
               if torch.is_tensor(v) and v.is_floating_point()]
    assert moments and all(torch.isfinite(v).all() for v in moments)


def test_a_state_with_a_non_finite_tensor_is_not_good():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    assert train_loop.state_is_finite(model, optimizer)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    assert not train_loop.state_is_finite(model, optimizer)


def test_defaults_follow_the_published_recipe():
    cfg = parse_args(["--prepared", "p"])
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.size, cfg.seed, cfg.epochs) == (
        1e-3, 1e-4, 32, (256, 256), 42, 100)
    assert (cfg.cached_clip, cfg.clip_model, cfg.clip_pretrained, cfg.profile) == (
        False, "ViT-B-32", "openai", "salmm")
    assert (cfg.amp, cfg.threads, train_config.DEFAULT_TRAIN_THREADS) == ("off", None, 1)  # float32
    assert parse_args(["--prepared", "p", "--size", "128x64"]).size == (64, 128)
    assert TrainConfig.from_dict(cfg.as_dict()) == cfg
    with pytest.raises(SystemExit):
        parse_args(["--prepared", "p", "--cache", "c.zarr"])           # needs --cached-clip
