"""Reliability: crashes, kills and signals never lose more than the work since the last
checkpoint, resumed runs are bit-identical to uninterrupted ones, and NaNs are caught."""
import errno
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from localpipe.launch.options import parse_config
from localpipe.launch.pipeline import main
from localpipe.pipeline.data import INFO, load_batches
from localpipe.stages.models import build_stage

from conftest import (ROOT, Timed, assert_same_model, cli_command, cli_env, load_model,
                      metrics, run_cli)

# 10 batches an epoch, 2 epochs, a checkpoint every 3 batches; dropout masks are keyed by
# the batch's position, so a resume that continued at another position would not match.
ARGS = ["--no-curves", "--model", "mlp", "--num-layers", "3", "--num-hidden", "64", "--dataset",
        "MNIST",
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
    # the kill comes 2 s after batch 9 reaches stage 1: the checkpoints at batches 3 and 6,
    # written in the background, are complete by then
    killed = run_cli(*args, torchrun=3, env={"LOCALPIPE_INJECT_FAULT": "1:9:kill:2"},
                     timeout=120)
    assert killed.returncode != 0
    assert "stopped: stage 1 died" in killed.stderr, killed.stderr[-3000:]
    assert _gone(str(tmp_path)), "a stage process outlived the run"
    assert not (tmp_path / "model.pt").exists()
    resumed = run_cli(*args, "--resume", "auto", torchrun=3, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(r"resuming from .*step-000000006", resumed.stdout), resumed.stdout
    assert_same_model(load_model(straight), load_model(tmp_path))


def test_max_restarts_continues_with_no_manual_step(straight, mnist_root, tmp_path):
    result = run_cli(*ARGS, "--data-root", mnist_root, "--save-dir", str(tmp_path), "--stages",
                     "3", "--resume", "auto", torchrun=3, torchrun_args=("--max-restarts", "1"),
                     env={"LOCALPIPE_INJECT_FAULT": "1:9:kill:2"}, timeout=300)
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
    assert metrics(tmp_path)[0]["train_samples"] == 640  # the meters were checkpointed too
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
    monkeypatch.setenv("LOCALPIPE_INJECT_FAULT", "1:9:nan:1")  # 1 s: earlier files are done
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stage 1 failed: NonFiniteLoss: unit 2: loss is nan at epoch 1, batch 9" in err, err
    good = sorted(p.parent.name for p in (tmp_path / "checkpoints").glob("*/manifest.json"))
    assert good and set(good) <= {"step-000000003", "step-000000006"}, good
    monkeypatch.delenv("LOCALPIPE_INJECT_FAULT")
    assert main(args + ["--resume", "auto", "--epochs", "1"]) == 0  # the last one still loads


def test_on_nan_skip_with_batch_norm_leaves_the_unit_as_a_skipped_batch_would(mnist_root,
                                                                              tmp_path,
                                                                              monkeypatch):
    """NaN in stage 1's input at batch 5 (batch norm on, the default): block 2 and the output
    layer skip it. model.pt is finite and equals, tensor for tensor, a sequential loop built
    here from the stage code in which those two units skip batch 5: no update, and batch norm's
    running statistics and counter as they were before it."""
    args = ARGS + ["--data-root", mnist_root, "--stages", "2", "--balance", "2,2", "--on-nan",
                   "skip", "--epochs", "1"]
    monkeypatch.setenv("LOCALPIPE_INJECT_FAULT", "1:5:nan")
    assert main(args + ["--save-dir", str(tmp_path)]) == 0
    record = metrics(tmp_path)[0]
    assert [b["train_nonfinite"] for b in record["blocks"]] == [0, 0, 1]
    assert record["nonfinite_batches"] == 2 and not math.isnan(record["train_loss_local"])
    model = load_model(tmp_path)
    assert all(torch.isfinite(v).all() for v in model.values())

    torch.set_num_threads(1)
    cfg = parse_config(args)
    train, _, _ = load_batches(cfg)
    reference = build_stage(cfg, INFO["MNIST"].shape, 10)
    reference.train()
    for step, (x, y) in enumerate(train.epoch(1)):
        reference.set_position(1, step)
        for unit in reference.units:
            if step == 4 and unit.index >= 2:  # the 5th batch, in stage 1's units
                kept = [(b, b.clone()) for b in unit.buffers()]
                x, _ = unit.train_step(x, y)
                for buffer, saved in kept:
                    buffer.copy_(saved)
                continue
            x, update = unit.train_step(x, y)
            update()
    assert_same_model(model, {k: v for k, v in reference.state_dict().items()})


def test_a_stop_on_the_last_training_batch_of_an_epoch_resumes(mnist_root, tmp_path,
                                                               monkeypatch):
    """One batch an epoch: SIGTERM lands while it trains. The checkpoint says "epoch 1
    trained, its evaluation still to do", and resuming from it evaluates epoch 1, records it
    once, and ends bit-identical to an uninterrupted run."""
    args = ARGS + ["--data-root", mnist_root, "--limit-train", "128", "--batch-size", "128",
                   "--epochs", "3"]
    assert main(args + ["--save-dir", str(tmp_path / "straight")]) == 0
    save = tmp_path / "stopped"
    monkeypatch.setenv("LOCALPIPE_INJECT_FAULT", "feed:1:sigterm")
    assert main(args + ["--save-dir", str(save)]) == 128 + signal.SIGTERM
    monkeypatch.delenv("LOCALPIPE_INJECT_FAULT")
    manifest = json.loads(next((save / "checkpoints").glob("*/manifest.json")).read_text())
    assert (manifest["epoch"], manifest["step"], manifest["steps"]) == (1, 1, 1)
    assert not (save / "model.pt").exists() and metrics(save) == []
    assert main(args + ["--save-dir", str(save), "--resume", "auto"]) == 0
    assert [r["epoch"] for r in metrics(save)] == [1, 2, 3]
    assert [r["test_error"] for r in metrics(save)] == \
        [r["test_error"] for r in metrics(tmp_path / "straight")]
    assert_same_model(load_model(tmp_path / "straight"), load_model(save))


def test_a_last_batch_of_one_sample_is_dropped_and_counted(mnist_root, tmp_path):
    args = ARGS + ["--data-root", mnist_root, "--limit-train", "641", "--epochs", "1",
                   "--save-dir", str(tmp_path)]
    assert main(args) == 0  # batch norm would fail on the 11th batch, of one sample
    record = metrics(tmp_path)[0]
    assert (record["train_samples"], record["train_dropped_samples"]) == (640, 1)


@pytest.mark.parametrize("target", ["manifest.json", "stage-1.pt", "model.pt"])
def test_a_failed_write_is_one_line_naming_the_file(mnist_root, tmp_path, monkeypatch, capsys,
                                                    target):
    """The disk fills up under the run (the rename of ``target`` fails): one line that names
    the file, exit code 1, no traceback."""
    replace = os.replace

    def full(src, dst):
        if str(dst).endswith(target):
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", full)
    assert main(ARGS + ["--data-root", mnist_root, "--stages", "2", "--epochs", "1",
                        "--save-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"cannot write {tmp_path}" in err[0] and target in err[0], err
    assert "No space left on device" in err[0], err


def _timed(proc: subprocess.Popen) -> tuple[list, threading.Thread]:
    lines: list = []
    reader = threading.Thread(target=_timed_lines, args=(proc, lines), daemon=True)
    reader.start()
    return lines, reader


def test_sigint_during_evaluation_stops_within_seconds_and_resumes_exactly(mnist_root, tmp_path):
    """A long evaluation (157 test batches): SIGINT at its third batch. The run stops within
    seconds, and its checkpoint (epoch 1 trained, evaluation to do) resumes bit-identically."""
    args = ARGS + ["--data-root", mnist_root, "--limit-test", "10000", "--stages", "2"]
    assert main(args + ["--save-dir", str(tmp_path / "straight")]) == 0
    save = tmp_path / "stopped"
    proc = subprocess.Popen(cli_command(*args, "--save-dir", str(save)), cwd=ROOT, text=True,
                            env=cli_env({"LOCALPIPE_INJECT_FAULT": "eval:3:sigint"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines, reader = _timed(proc)
    proc.wait(timeout=120)
    ended = time.monotonic()
    reader.join(timeout=5)
    said = [t for t, text in lines if "SIGINT received, saving a checkpoint" in text]
    assert proc.returncode == 128 + signal.SIGINT and said, lines
    assert ended - said[0] < 15, ended - said[0]  # not after the 157 batches
    told = [text for _, text in lines if "continues with:" in text]
    assert told and f"--save-dir {save} --resume auto" in told[0], lines  # how to go on
    newest = max((json.loads(p.read_text()) for p in (save / "checkpoints").glob(
        "*/manifest.json")), key=lambda m: m["steps"])
    assert (newest["epoch"], newest["step"]) == (1, 10)  # trained, evaluation to do
    elsewhere = tmp_path / "elsewhere"  # the command it printed runs from any folder
    elsewhere.mkdir()
    command = shlex.split(told[0].split("continues with: ", 1)[1])
    assert subprocess.run(command, cwd=elsewhere, env=cli_env(), capture_output=True,
                          timeout=300).returncode == 0
    assert [r["test_error"] for r in metrics(save)] == \
        [r["test_error"] for r in metrics(tmp_path / "straight")]
    assert_same_model(load_model(tmp_path / "straight"), load_model(save))


def test_a_second_signal_stops_at_once(mnist_root, tmp_path):
    """The first SIGINT's checkpoint is slow to write (a test hook stalls it 60 s); a second
    SIGINT more than two seconds later ends the process at once with 130, cleanly."""
    proc = subprocess.Popen(cli_command(*ARGS, "--data-root", mnist_root, "--save-dir",
                                        str(tmp_path)), cwd=ROOT, text=True,
                            env=cli_env({"LOCALPIPE_INJECT_FAULT": "feed:5:sigint",
                                         "LOCALPIPE_TEST_SAVE_PAUSE": "60"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines, reader = _timed(proc)
    deadline = time.monotonic() + 60
    while not any("SIGINT received" in text for _, text in lines):
        assert time.monotonic() < deadline and proc.poll() is None, lines
        time.sleep(0.05)
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    proc.wait(timeout=30)
    reader.join(timeout=5)
    # at once: not after the stalled checkpoint's 60 s
    assert proc.returncode == 128 + signal.SIGINT and time.monotonic() - sent < 30
    text = "\n".join(t for _, t in lines)
    assert "second SIGINT, stopping at once" in text and "terminate" not in text, text


@pytest.mark.slow  # starts processes
def test_a_failing_data_feed_under_torchrun_stops_every_rank_within_seconds(tmp_path):
    result_lines: list = []
    proc = subprocess.Popen(cli_command("--no-curves", "--model", "mlp", "--num-layers", "2",
                                        "--num-hidden", "64", "--dataset", "synthetic",
                                        "--stages", "3", "--save-dir", str(tmp_path),
                                        torchrun=3), cwd=ROOT,
                            text=True, env=cli_env({"LOCALPIPE_INJECT_FAULT": "feed:3"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    result_lines, reader = _timed(proc)
    proc.wait(timeout=120)
    ended = time.monotonic()
    reader.join(timeout=5)
    ours = [(t, text) for t, text in result_lines if text.startswith("localpipe:")]
    cause = "stage 0 failed: the data feed: RuntimeError: injected fault in the data feed"
    assert len(ours) == 3 and all(cause in text for _, text in ours), result_lines
    assert ended - ours[0][0] < 30 and proc.returncode != 0
    assert "Traceback" not in "\n".join(t for _, t in result_lines if "localpipe" in t)


def test_a_failure_found_by_two_threads_of_a_rank_is_named_once(monkeypatch):
    """The feed fails in the main thread while the control plane's monitor finds the failure it
    published: each calls ``Rank.exit``; the rank names it once (CI saw it twice)."""
    from localpipe.pipeline import distributed, topology
    from localpipe.pipeline.control import Failure
    said: list[str] = []

    def slow_say(text: str) -> None:  # widens the window between the line and the exit
        said.append(text)
        time.sleep(0.3)

    exits: list[int] = []
    monkeypatch.setattr(distributed, "say", slow_say)
    monkeypatch.setattr(distributed.os, "_exit", exits.append)  # the thread ends, not the test
    me = distributed.Rank(None, topology.Topology(0, 3, 1), torch.device("cpu"), None,
                          topology.Wiring())
    failure = Failure(me.name, "failed", "the data feed: RuntimeError: injected")
    threads = [threading.Thread(target=me.exit, args=(failure,), daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    assert said == [str(failure)] and exits == [1]


@pytest.mark.slow  # starts processes
def test_bad_data_under_torchrun_is_one_line_on_every_rank_at_once(tmp_path):
    run = Timed("--no-curves", "--model", "mlp", "--num-layers", "2", "--dataset", "MNIST",
                "--data-root", str(tmp_path), "--no-download", "--stages", "3",
                "--save-dir", str(tmp_path / "run"), torchrun=3, timeout=120)
    ours = run.ours()
    assert len(ours) == 3 and all(text.startswith("localpipe: error: MNIST is not in")
                                  for _, text in ours), run.text[-3000:]
    assert ours[-1][0] - ours[0][0] < 10 and run.ended - ours[0][0] < 30  # together, at once
    assert run.returncode != 0 and not (tmp_path / "run").exists()


# 90 batches an epoch, eight epochs, a checkpoint every 10: a signal sent once the first is
# complete lands before the end, whichever process gets it.
SIGNALLED = ARGS + ["--num-hidden", "256", "--limit-train", "5760", "--epochs", "8",
                    "--checkpoint-every", "10", "--stages", "3"]


@pytest.fixture(scope="module")
def signalled_straight(mnist_root, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("signalled-straight")
    assert main(SIGNALLED + ["--data-root", mnist_root, "--save-dir", str(save)]) == 0
    return save


def _worker(agent: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the agent ``agent``)."""
    for task in Path(f"/proc/{agent}/task").iterdir():
        for child in (task / "children").read_text().split():
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return int(child)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.parametrize("target", ["rank 1", "the agent", "every process"])
def test_a_signal_to_any_process_of_a_torchrun_job_stops_it_with_one_checkpoint(
        signalled_straight, mnist_root, tmp_path, target, capsys):
    """SIGTERM to rank 1 alone, to torchrun's agent (which forwards it), or to the job's whole
    process group (as a scheduler does): the job takes one checkpoint where it is and stops;
    nobody is named as failed, and the checkpoint resumes bit-identically."""
    args = SIGNALLED + ["--data-root", mnist_root, "--save-dir", str(tmp_path)]
    proc = subprocess.Popen(cli_command(*args, torchrun=3), cwd=ROOT, text=True, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    lines, reader = _timed(proc)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "checkpoints").glob("*/manifest.json")):
        assert time.monotonic() < deadline and proc.poll() is None, lines
        time.sleep(0.05)
    if target == "rank 1":
        os.kill(_worker(proc.pid, 1), signal.SIGTERM)
    elif target == "the agent":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    reader.join(timeout=5)
    ours = [t for _, t in lines if t.startswith("localpipe:")]
    assert "localpipe: SIGTERM received, saving a checkpoint and stopping" in ours, lines
    assert not any(word in t for t in ours for word in (" died", " froze", " failed")), ours
    assert not (tmp_path / "model.pt").exists() and _gone(str(tmp_path))
    newest = max((json.loads(p.read_text()) for p in (tmp_path / "checkpoints").glob(
        "*/manifest.json")), key=lambda m: m["steps"])
    assert newest["steps"] > 10, newest  # taken at the stop, after the one awaited
    capsys.readouterr()
    assert main(args + ["--resume", "auto"]) == 0, capsys.readouterr().err
    assert_same_model(load_model(signalled_straight), load_model(tmp_path))


def test_soak_per_stage_peak_memory_stops_growing_after_the_first_epoch(mnist_root, tmp_path):
    """A shortened soak: 6 epochs, 2 stage processes. The first three epochs are the warm-up
    (each thread's malloc arena, the checkpoint writer's among them, reaches its high-water
    mark; it settles within 1% by then); over the next three each stage's peak RSS stays
    within 2%. Leaking one input batch per step would add 3%, its activations far more."""
    result = run_cli("--no-curves", "--model", "mlp", "--num-layers", "3", "--dataset", "MNIST",
                     "--data-root", mnist_root, "--limit-train", "3200", "--limit-test", "1000",
                     "--epochs", "6",
                     "--stages", "2", "--dropout", "0.1", "--save-dir", str(tmp_path),
                     torchrun=2, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    peaks = [[p["peak_rss_bytes"] for p in sorted(r["processes"], key=lambda p: p["pid"])]
             for r in metrics(tmp_path)]
    assert len(peaks) == 6
    for stage in range(2):
        warm = peaks[2][stage]
        assert all(p[stage] <= warm * 1.02 for p in peaks[3:]), peaks


def test_keep_checkpoints_bounds_disk_use(tmp_path):
    args = ["--no-curves", "--model", "mlp", "--num-layers", "2", "--num-hidden", "32", "--dataset",
            "synthetic", "--epochs", "2", "--checkpoint-every", "5", "--keep-checkpoints", "2",
            "--save-dir", str(tmp_path), "--threads", "1"]
    assert main(args) == 0
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-000000030", "step-000000032"]  # 16 batches an epoch
    assert all((tmp_path / "checkpoints" / k / "manifest.json").exists() for k in kept)


def _stopped(marker: str) -> bool:
    """Whether a process of the run (its command line names ``marker``) is stopped (SIGSTOP)."""
    for proc in Path("/proc").iterdir():
        try:
            if marker in (proc / "cmdline").read_text() and \
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
                return True
        except (OSError, IndexError):
            continue
    return False


def _timed_lines(proc: subprocess.Popen, lines: list) -> None:
    for line in proc.stderr:
        lines.append((time.monotonic(), line.rstrip()))


def test_a_frozen_rank_is_named_by_every_other_rank_and_the_job_comes_down(mnist_root, tmp_path):
    """SIGSTOP of stage 1 mid-epoch under torchrun, with --comm-timeout 600: the others name
    it from its missing heartbeats (default --heartbeat-timeout 10, never sooner) and exit; the
    job comes down once torchrun has SIGKILLed the frozen process."""
    args = ARGS + ["--data-root", mnist_root, "--save-dir", str(tmp_path), "--stages", "3",
                   "--comm-timeout", "600"]
    proc = subprocess.Popen(cli_command(*args, torchrun=3), cwd=ROOT, text=True,
                            env=cli_env({"LOCALPIPE_INJECT_FAULT": "1:5:freeze"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list = []
    reader = threading.Thread(target=_timed_lines, args=(proc, lines), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not _stopped(str(tmp_path)):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            time.sleep(0.05)
        frozen_at = time.monotonic()
        proc.wait(timeout=90)  # the whole job down, not one rank
    finally:
        proc.kill()
    reader.join(timeout=5)
    named = [(t - frozen_at, text) for t, text in lines if "stopped: stage 1 froze" in text]
    assert sorted(text.split(":")[1] for _, text in named) == [" stage 0 stopped",
                                                               " stage 2 stopped"], lines
    assert all(t < 45 for t, _ in named), named  # the comm timeout (600 s) played no part
    silent = [float(re.search(r"no heartbeat for ([\d.]+) s", text).group(1)) for _, text in named]
    assert all(10 <= s < 45 for s in silent), named  # never before --heartbeat-timeout
    assert proc.returncode != 0 and _gone(str(tmp_path))


@pytest.mark.slow  # starts processes
def test_sigkill_of_rank_0_is_named_by_every_other_rank(tmp_path):
    """Every other rank names rank 0 and the whole job is down within 30 s of the first
    rank noticing (its stage 0, the data feed and the coordinator gone at once)."""
    run = Timed("--no-curves", "--model", "mlp", "--num-layers", "2", "--num-hidden", "64",
                "--dataset", "synthetic", "--stages", "3", "--save-dir", str(tmp_path),
                "--epochs", "5", torchrun=3, env={"LOCALPIPE_INJECT_FAULT": "0:3:kill"},
                timeout=120)
    ours = run.ours()
    assert run.returncode != 0 and sorted(text for _, text in ours) == [
        f"localpipe: stage {k} stopped: stage 0 died: its process is gone" for k in (1, 2)], \
        run.text[-3000:]
    assert run.ended - ours[0][0] < 30 and _gone(str(tmp_path))


def test_checkpoints_do_not_drain_the_pipeline(straight, mnist_root, tmp_path):
    """Under torchrun, stage 2 takes 3 s to write each checkpoint file (a test hook). No stage
    waits for it: stage 0 trains all of epoch 2 before the checkpoint taken at the end of
    epoch 1 is complete, by its own records. That checkpoint then resumes bit-identically.
    The same run's metrics show per-stage memory that adds up."""
    args = ARGS + ["--data-root", mnist_root, "--stages", "3", "--checkpoint-every", "0"]
    save = tmp_path / "run"
    result = run_cli(*args, "--save-dir", str(save), torchrun=3,
                     env={"LOCALPIPE_TEST_SAVE_PAUSE": "3@2"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((save / "checkpoints" / "step-000000010" / "manifest.json").read_text())
    records = metrics(save)
    stage0 = records[1]["stages"][0]
    assert stage0["train_start"] > records[0]["stages"][0]["train_end"]  # epoch 2's own batches
    assert stage0["train_end"] < first["written_at"], (stage0, first["written_at"])
    saved = {f["stage"]: f["saved_at"] for f in first["files"]}
    assert saved[2] - saved[0] > 2.5  # the slow writer really was slow

    cfg = parse_config(args)
    for r in records:
        assert len(r["processes"]) == 3 and len({p["pid"] for p in r["processes"]}) == 3
        for s in r["stages"]:
            m = s["memory"]
            assert m["peak_bytes"] == (m["params_bytes"] + m["grads_bytes"]
                                       + m["optimizer_bytes"] + m["activations_bytes"]
                                       + m["queue_bytes"])
            units = build_stage(cfg, (1, 28, 28), 10, s["units"])
            assert m["params_bytes"] == sum(t.numel() * t.element_size() for t in
                                            [*units.parameters(), *units.buffers()])
            assert m["activations_bytes"] > 0 and m["optimizer_bytes"] > 2 * m["grads_bytes"]
        for p in r["processes"]:  # one stage a process, sampled when it took its figures
            assert p["stage_bytes"] == r["stages"][p["stage"]]["memory"]["current_bytes"]

    resumed = tmp_path / "resumed"
    shutil.copytree(save / "checkpoints" / "step-000000010", resumed / "checkpoints" / "step-1")
    assert main(args + ["--save-dir", str(resumed), "--resume", "auto"]) == 0
    assert_same_model(load_model(straight), load_model(resumed))
