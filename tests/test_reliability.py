"""Reliability: crashes, kills and signals never lose more than the work since the last
checkpoint, resumed runs are bit-identical to uninterrupted ones, and NaNs are caught."""
import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launch.pipeline import main

from conftest import (ROOT, assert_same_model, cli_command, cli_env, load_model, metrics,
                      run_cli)

# 10 batches an epoch, 2 epochs, a checkpoint every 3 batches; dropout draws from the
# per-unit generators, so a resume that lost their state would not match.
ARGS = ["--model", "mlp", "--num-layers", "3", "--num-hidden", "64", "--dataset", "MNIST",
        "--limit-train", "640", "--limit-test", "100", "--batch-size", "64", "--epochs", "2",
        "--dropout", "0.2", "--checkpoint-every", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def straight(mnist_root, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    save = tmp_path_factory.mktemp("straight")
    assert main(ARGS + ["--data-root", mnist_root, "--save-dir", str(save)]) == 0
    return save


def _gone(marker: str) -> bool:
    return not subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout


def test_sigkill_of_one_rank_stops_all_then_resume_auto_is_exact(straight, mnist_root,
                                                                  tmp_path):
    args = ARGS + ["--data-root", mnist_root, "--save-dir", str(tmp_path), "--stages", "3"]
    start = time.monotonic()
    killed = run_cli(*args, torchrun=3, env={"LOCALPIPE_INJECT_FAULT": "1:5:kill"}, timeout=120)
    assert killed.returncode != 0 and time.monotonic() - start < 60
    assert "lost the link to stage 1" in killed.stderr, killed.stderr[-3000:]
    assert _gone(str(tmp_path)), "a stage process outlived the run"
    assert not (tmp_path / "model.pt").exists()
    resumed = run_cli(*args, "--resume", "auto", torchrun=3, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step-000000003" in resumed.stdout
    assert_same_model(load_model(straight), load_model(tmp_path))


def test_max_restarts_continues_with_no_manual_step(straight, mnist_root, tmp_path):
    result = run_cli(*ARGS, "--data-root", mnist_root, "--save-dir", str(tmp_path), "--stages",
                     "3", "--resume", "auto", torchrun=3, torchrun_args=("--max-restarts", "1"),
                     env={"LOCALPIPE_INJECT_FAULT": "1:5:kill"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("resuming from") == 3  # every rank of the restarted group
    assert_same_model(load_model(straight), load_model(tmp_path))


def test_crash_mid_epoch_then_resume_with_other_stages_is_exact(straight, mnist_root, tmp_path,
                                                                monkeypatch):
    args = ARGS + ["--data-root", mnist_root, "--save-dir", str(tmp_path)]
    monkeypatch.setenv("LOCALPIPE_INJECT_FAULT", "1:8")
    assert main(args + ["--stages", "2"]) == 1
    monkeypatch.delenv("LOCALPIPE_INJECT_FAULT")
    assert main(args + ["--stages", "4", "--resume", "auto"]) == 0
    assert_same_model(load_model(straight), load_model(tmp_path))
    epochs = [r["epoch"] for r in metrics(tmp_path)]
    assert epochs == [1, 2]
    assert [r["test_error"] for r in metrics(tmp_path)] == \
        [r["test_error"] for r in metrics(straight)]
    assert metrics(tmp_path)[0]["train_samples"] == 64 * 4  # batches 7-10 of epoch 1
    # the meters were checkpointed too: the epoch's train figures cover all 10 batches
    assert [r["train_error"] for r in metrics(tmp_path)] == \
        [r["train_error"] for r in metrics(straight)]


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(straight, mnist_root, tmp_path):
    args = ARGS + ["--data-root", mnist_root, "--save-dir", str(tmp_path)]
    proc = subprocess.Popen(cli_command(*args), env=cli_env({"LOCALPIPE_TEST_SAVE_PAUSE": "2"}),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # wait for a complete one and a half-written next
            done = list(checkpoints.glob("*/manifest.json"))
            writing = [d for d in checkpoints.glob("step-*") if not (d / "manifest.json").exists()
                       and list(d.glob(".tmp-*"))]
            if done and writing:
                break
            time.sleep(0.05)
        else:
            pytest.fail("never saw a checkpoint being written")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (writing[0] / "manifest.json").exists()
    assert main(args + ["--resume", "auto"]) == 0
    assert_same_model(load_model(straight), load_model(tmp_path))


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(mnist_root, tmp_path):
    # wide and long enough (30 batches) that the second epoch lasts seconds: the signal lands
    # inside it
    args = ARGS + ["--data-root", mnist_root, "--num-hidden", "1024", "--limit-train", "1920",
                   "--stages", "2", "--checkpoint-every", "0"]
    assert main(args + ["--save-dir", str(tmp_path / "straight")]) == 0
    save = tmp_path / "stopped"
    proc = subprocess.Popen(cli_command(*args, "--save-dir", str(save)), env=cli_env(),
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:  # the first epoch is done: stop in the second
        if line.startswith("Test"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received, saving a checkpoint" in err
    manifests = [json.loads(p.read_text()) for p in (save / "checkpoints").glob("*/manifest.json")]
    assert sorted((m["epoch"], m["step"] > 0) for m in manifests) == [(2, False), (2, True)]
    assert main(args + ["--save-dir", str(save), "--resume", "auto"]) == 0
    assert_same_model(load_model(tmp_path / "straight"), load_model(save))


def test_nan_stops_the_run_naming_stage_block_epoch_and_step(mnist_root, tmp_path,
                                                             monkeypatch, capsys):
    args = ARGS + ["--data-root", mnist_root, "--save-dir", str(tmp_path), "--stages", "2",
                   "--balance", "2,2"]
    monkeypatch.setenv("LOCALPIPE_INJECT_FAULT", "1:5:nan")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stage 1 failed: NonFiniteLoss: unit 2: loss is nan at epoch 1, batch 5" in err, err
    good = sorted((tmp_path / "checkpoints").glob("*/manifest.json"))
    assert [p.parent.name for p in good] == ["step-000000003"]
    monkeypatch.delenv("LOCALPIPE_INJECT_FAULT")
    assert main(args + ["--resume", "auto", "--epochs", "1"]) == 0  # the last one still loads


def test_on_nan_skip_drops_the_update_and_counts_it(mnist_root, tmp_path, monkeypatch):
    args = ARGS + ["--data-root", mnist_root, "--save-dir", str(tmp_path), "--stages", "2",
                   "--balance", "2,2", "--on-nan", "skip", "--no-batch-norm"]
    monkeypatch.setenv("LOCALPIPE_INJECT_FAULT", "1:5:nan")
    assert main(args) == 0
    record = metrics(tmp_path)[0]
    skipped = [b["train_nonfinite"] for b in record["blocks"]]
    assert skipped == [0, 0, 1]  # stage 1 holds block 2 and the output layer
    assert record["nonfinite_batches"] == 2
    assert all(torch.isfinite(v).all() for v in load_model(tmp_path).values())
    assert not math.isnan(record["train_loss_local"])


def test_soak_per_stage_peak_memory_stops_growing_after_the_first_epoch(mnist_root, tmp_path):
    """A shortened soak: 5 epochs, 2 stage processes. The first epoch and its end (checkpoint
    buffers, the metrics gather) are the warm-up; from the second epoch on, each stage's peak
    RSS stays within 1% (a leak of one batch's tensors per step would not)."""
    result = run_cli("--model", "mlp", "--num-layers", "3", "--dataset", "MNIST", "--data-root",
                     mnist_root, "--limit-train", "3200", "--limit-test", "1000", "--epochs", "5",
                     "--stages", "2", "--dropout", "0.1", "--save-dir", str(tmp_path),
                     torchrun=2, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    peaks = [[s["peak_memory_bytes"] for s in r["stages"]] for r in metrics(tmp_path)]
    assert len(peaks) == 5
    for stage in range(2):
        warm = peaks[1][stage]
        assert all(p[stage] <= warm * 1.01 for p in peaks[2:]), peaks


def test_keep_checkpoints_bounds_disk_use(tmp_path):
    args = ["--model", "mlp", "--num-layers", "2", "--num-hidden", "32", "--dataset",
            "synthetic", "--epochs", "2", "--checkpoint-every", "5", "--keep-checkpoints", "2",
            "--save-dir", str(tmp_path), "--threads", "1"]
    assert main(args) == 0
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-000000030", "step-000000032"]  # 16 batches an epoch
    assert all((tmp_path / "checkpoints" / k / "manifest.json").exists() for k in kept)
