"""Resuming from an epoch checkpoint continues exactly, with any cut of the stages."""
import json

import pytest

from localpipe.launch.pipeline import main

from conftest import assert_same_model, load_model, metrics, run_cli

ARGS = ["--no-curves", "--model", "mlp", "--num-layers", "3", "--num-hidden", "64", "--dataset",
        "MNIST",
        "--limit-train", "200", "--limit-test", "100", "--batch-size", "64", "--dropout", "0.3",
        "--cutout", "--length", "10", "--lr-decay-milestones", "2", "--threads", "1"]


@pytest.mark.parametrize("first,second", [(1, 1), (1, 3), (4, 2)])
def test_resume_equals_an_uninterrupted_run(mnist_root, tmp_path, first, second):
    data = ["--data-root", mnist_root]
    assert main(ARGS + data + ["--epochs", "3", "--save-dir", str(tmp_path / "straight")]) == 0
    part = str(tmp_path / "parts")
    assert main(ARGS + data + ["--epochs", "1", "--stages", str(first), "--save-dir", part]) == 0
    assert main(ARGS + data + ["--epochs", "3", "--stages", str(second), "--save-dir", part,
                               "--resume", "auto"]) == 0
    assert_same_model(load_model(tmp_path / "straight"), load_model(part))
    assert [r["test_error"] for r in metrics(part)] == \
        [r["test_error"] for r in metrics(tmp_path / "straight")]


def test_resume_under_torchrun(mnist_root, tmp_path):
    data = ["--data-root", mnist_root]
    assert main(ARGS + data + ["--epochs", "2", "--save-dir", str(tmp_path / "straight")]) == 0
    part = str(tmp_path / "parts")
    assert main(ARGS + data + ["--epochs", "1", "--save-dir", part]) == 0
    result = run_cli(*ARGS, *data, "--epochs", "2", "--stages", "2", "--save-dir", part,
                     "--resume", part, torchrun=2, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_model(load_model(tmp_path / "straight"), load_model(part))


def test_resume_refuses_a_different_network(mnist_root, tmp_path, capsys):
    save = str(tmp_path)
    assert main(ARGS + ["--data-root", mnist_root, "--epochs", "1", "--save-dir", save]) == 0
    manifest = tmp_path / "checkpoints" / "step-000000004" / "manifest.json"
    assert json.loads(manifest.read_text())["epoch"] == 2  # where training goes on
    capsys.readouterr()
    wider = [("128" if a == "64" and ARGS[i - 1] == "--num-hidden" else a)
             for i, a in enumerate(ARGS)]
    code = main(wider + ["--data-root", mnist_root, "--epochs", "2", "--save-dir", save,
                         "--resume", "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--num-hidden 64, this run has 128" in err[0]


def test_a_run_cut_by_max_steps_resumes_its_epoch_meters_too(mnist_root, tmp_path):
    """--max-steps ends a run inside an epoch, with that part's record; the resumed run trains
    the rest of the epoch and its record counts the whole epoch, every meter as an
    uninterrupted run's (the cut-off part was once lost: 136 of 200 samples counted)."""
    data = ["--data-root", mnist_root, "--epochs", "1", "--stages", "2"]
    assert main(ARGS + data + ["--save-dir", str(tmp_path / "straight")]) == 0
    part = str(tmp_path / "parts")
    assert main(ARGS + data + ["--save-dir", part, "--max-steps", "1"]) == 0
    assert metrics(part)[0]["train_samples"] == 64
    assert main(ARGS + data + ["--save-dir", part, "--resume", "auto"]) == 0
    whole, resumed = metrics(tmp_path / "straight")[0], metrics(part)[0]
    assert_same_model(load_model(tmp_path / "straight"), load_model(part))
    learnt = [k for k in whole if k.startswith(("train_", "test_", "lr", "blocks", "nonfinite"))]
    assert len(learnt) >= 12 and resumed["train_samples"] == 200
    assert {k: resumed[k] for k in learnt} == {k: whole[k] for k in learnt}
