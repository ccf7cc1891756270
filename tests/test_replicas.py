"""Data-parallel replicas (--replicas R): a run on K·R processes computes exactly what a
single process computes when it averages the replicas' gradients, and fails, restarts and
resumes like any other run, also as two torchrun agents ("nodes") on one machine."""
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from localpipe.launch.options import parse_config
from localpipe.launch.pipeline import main
from localpipe.pipeline import process
from localpipe.pipeline.data import INFO, load_batches
from localpipe.pipeline.replicas import shard
from localpipe.stages.blocks import LocalBlock, moving_buffers
from localpipe.stages.config import Config, ConfigError
from localpipe.stages.models import build_stage

from conftest import (LAUNCH, ROOT, _free_port, assert_same_model, cli_env, load_model, metrics,
                      run_cli)

# Batch norm and dropout on, an lr milestone, 10 batches an epoch whose last one (12 samples)
# is cut in two shards of 6, a checkpoint every 3 batches, 2 stages of 2 replicas.
ARGS = ["--no-curves", "--model", "mlp", "--num-layers", "3", "--num-hidden", "64", "--dataset",
        "MNIST", "--limit-train", "300", "--limit-test", "100", "--batch-size", "32",
        "--epochs", "2", "--dropout", "0.2", "--nonlin", "leakyrelu", "--lr-decay-milestones",
        "1", "--checkpoint-every", "3", "--threads", "1", "--seed", "7"]
MESH = ["--stages", "2", "--replicas", "2"]
NUM_UNITS = 4  # three blocks and the output layer


@pytest.fixture(scope="module")
def mesh(mnist_root, tmp_path_factory) -> Path:
    """One uninterrupted run of 2 stages × 2 replicas (4 processes): the run the other tests
    compare with."""
    save = tmp_path_factory.mktemp("mesh")
    result = run_cli(*ARGS, *MESH, "--data-root", mnist_root, "--save-dir", str(save),
                     torchrun=4, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return save


def averaged_reference(args: list[str], replicas: int) -> dict[str, torch.Tensor]:
    """What R replicas must compute, in one process, from the stage code: R copies of the
    network, each trained on its shard of every batch; each unit forwards on every replica,
    then the R gradients and batch-norm statistics are averaged, then each copy steps."""
    cfg = parse_config(args)
    process.configure(cfg)  # the run's threads: float sums depend on them
    info = INFO[cfg.dataset]
    train, _, _ = load_batches(cfg)
    copies = [build_stage(cfg, info.shape, info.num_classes) for _ in range(replicas)]
    for r, copy in enumerate(copies):
        copy.replicate(r, None)  # its own dropout masks; no exchange of its own
    steps = 0
    for epoch in range(1, cfg.epochs + 1):
        for step, (x, y) in enumerate(train.epoch(epoch)):
            xs = [shard(x, r, replicas) for r in range(replicas)]
            ys = [shard(y, r, replicas) for r in range(replicas)]
            skips: list[dict] = [{} for _ in range(replicas)]
            for copy in copies:
                copy.train()
                copy.set_position(epoch, step)
            for i in range(len(copies[0].units)):
                units = [copy.units[i] for copy in copies]
                updates = []
                for r, unit in enumerate(units):
                    xs[r], update = unit.train_step(xs[r], ys[r], skips[r])
                    updates.append(update)
                for update in updates:
                    update.loss.backward()
                for params in zip(*(u.parameters() for u in units)):
                    if params[0].grad is not None:
                        mean = sum(p.grad for p in params) / replicas
                        for p in params:
                            p.grad = mean.clone()
                for buffers in zip(*(moving_buffers(u) for u in units)):
                    mean = sum(buffers) / replicas
                    for b in buffers:
                        b.copy_(mean)
                for unit in units:
                    for optimizer in unit.optimizers:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
            steps += 1
    states = [copy.state_dict() for copy in copies]
    for other in states[1:]:
        assert_same_model(states[0], other)
    return states[0]


def test_replicas_equal_the_averaged_single_process_reference(mesh, mnist_root):
    reference = averaged_reference(ARGS + MESH + ["--data-root", mnist_root], 2)
    assert_same_model(reference, load_model(mesh))


def test_replica_0_writes_the_files_and_the_meters_cover_every_shard(mesh):
    records = metrics(mesh)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["train_samples"] == 300 and r["test_samples"] == 100 for r in records)
    assert all(r["train_dropped_samples"] == 0 for r in records)
    for manifest in (mesh / "checkpoints").glob("*/manifest.json"):
        assert sorted(p.name for p in manifest.parent.glob("stage-*.pt")) == \
            ["stage-0.pt", "stage-1.pt"]
    assert {p["host"] for p in records[-1]["processes"]} and len(records[-1]["processes"]) == 4


def test_one_replica_resumes_a_two_replica_checkpoint_exactly(mesh, mnist_root, tmp_path):
    """R = 2 → R = 1 and K = 2 → 1: stopping at once after the restore shows the weights are
    the checkpoint's; going on finishes, with the epoch's meters carried over from both
    replicas."""
    checkpoint = mesh / "checkpoints" / "step-000000015"
    saved = {}  # under model.pt's names: a unit's own names behind its place in the network
    for path in checkpoint.glob("stage-*.pt"):
        units = torch.load(path)["units"]
        for index, unit in units.items():
            prefix = "output." if index == NUM_UNITS - 1 else f"blocks.{index}."
            saved.update({prefix + k: v for k, v in unit["state"].items()})
    args = ARGS + ["--data-root", mnist_root, "--resume", str(checkpoint)]
    assert main(args + ["--save-dir", str(tmp_path / "same"), "--max-steps", "15"]) == 0
    restored = load_model(tmp_path / "same")
    assert len(saved) > NUM_UNITS and saved.keys() == restored.keys()
    assert_same_model(saved, restored)
    assert main(args + ["--save-dir", str(tmp_path / "on"), "--stages", "1"]) == 0
    assert [r["epoch"] for r in metrics(tmp_path / "on")] == [2]
    assert metrics(tmp_path / "on")[0]["train_samples"] == 300


def test_pred_without_batch_norm_or_dropout_matches_one_replica(mnist_root, tmp_path):
    """Independent of the stage code: with a mean CE loss, no batch statistics and no dropout,
    averaging the gradients of two halves is the gradient of the whole batch."""
    args = ARGS + ["--loss-sup", "pred", "--no-batch-norm", "--dropout", "0", "--data-root",
                   mnist_root]
    assert main(args + ["--save-dir", str(tmp_path / "one")]) == 0
    result = run_cli(*args, "--replicas", "2", "--save-dir", str(tmp_path / "two"),
                     torchrun=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_model(tmp_path / "one"), load_model(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    assert not all(torch.equal(one[k], two[k]) for k in one)  # two processes did compute it


def two_agents(args: list[str], tmp_path: Path, env: dict | None = None,
               restarts: int = 0, timeout: float = 300) -> list[tuple[int, list]]:
    """Two torchrun agents with --nnodes 2 and a c10d rendezvous on localhost, 2 processes
    each; for each agent its exit code and its stderr lines with their arrival times."""
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               f"127.0.0.1:{port}", "--rdzv-id", tmp_path.name, "--max-restarts",
               str(restarts), "--monitor-interval", "0.5", str(LAUNCH), *args]
    agents = [subprocess.Popen(command, cwd=ROOT, text=True, env=cli_env(env),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
              for _ in range(2)]
    lines: list[list] = [[], []]
    readers = [threading.Thread(target=lambda a=a, out=out: out.extend(
        (time.monotonic(), line.rstrip()) for line in a.stderr), daemon=True)
        for a, out in zip(agents, lines)]
    for reader in readers:
        reader.start()
    try:
        codes = [a.wait(timeout=timeout) for a in agents]
    finally:
        for a in agents:
            a.kill()
    for reader in readers:
        reader.join(timeout=10)
    return list(zip(codes, lines))


def test_two_nodes_name_a_killed_process_everywhere(mnist_root, tmp_path):
    args = ARGS + MESH + ["--data-root", mnist_root, "--save-dir", str(tmp_path)]
    agents = two_agents(args, tmp_path, {"LOCALPIPE_INJECT_FAULT": "1/1:5:kill"})
    assert all(code != 0 for code, _ in agents)
    lines = [line for _, agent in agents for line in agent]
    named = [t for t, text in lines if "stopped: stage 1 (replica 1) died" in text]
    assert len(named) == 3, "\n".join(text for _, text in lines)[-3000:]  # every other rank
    ended = max(t for _, agent in agents for t, _ in agent)
    assert ended - min(named) < 30
    assert not subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout


def test_two_nodes_restart_after_a_kill_and_finish_exactly(mesh, mnist_root, tmp_path):
    args = ARGS + MESH + ["--data-root", mnist_root, "--save-dir", str(tmp_path), "--resume",
                          "auto"]
    agents = two_agents(args, tmp_path, {"LOCALPIPE_INJECT_FAULT": "1/1:14:kill:2"},
                        restarts=1)
    text = "\n".join(line for _, agent in agents for _, line in agent)
    assert all(code == 0 for code, _ in agents), text[-3000:]
    assert "stage 1 (replica 1) died" in text
    assert_same_model(load_model(mesh), load_model(tmp_path))
    assert [r["epoch"] for r in metrics(tmp_path)] == [1, 2]


@pytest.mark.parametrize("args,message", [
    (["--replicas", "3"], "--batch-size 32 does not split evenly into 3 replicas"),
    (["--replicas", "32", "--batch-size", "32"], "leaves 1 sample(s) per replica"),
    (["--replicas", "0"], "--replicas must be positive"),
])
def test_replica_options_are_checked(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(["--batch-size", "32", *args])


def test_per_replica_batch_makes_the_global_batch_r_times_larger():
    cfg = Config(batch_size=32, replicas=3, per_replica_batch=True).validate()
    assert (cfg.global_batch, cfg.replica_batch) == (96, 32)
    assert Config(batch_size=32, replicas=2).validate().replica_batch == 16


def test_one_process_refuses_replicas(mnist_root, tmp_path, capsys):
    assert main(ARGS + MESH + ["--data-root", mnist_root, "--save-dir", str(tmp_path)]) == 2
    assert "--replicas 2 needs a process per stage and replica: torchrun --nproc-per-node 4" \
        in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_torchrun_with_the_wrong_process_count_is_one_line(mnist_root, tmp_path):
    result = run_cli(*ARGS, *MESH, "--data-root", mnist_root, "--save-dir", str(tmp_path),
                     torchrun=2, timeout=120)
    assert result.returncode != 0
    assert "torchrun started 2 processes but --stages 2 × --replicas 2 needs 4" in result.stderr


def _masks(replica: int, epoch: int, step: int, seed: int = 7) -> list[torch.Tensor]:
    """Each block's dropout mask for one batch, drawn by a freshly built stage."""
    cfg = Config(model="mlp", dataset="synthetic", num_layers=3, num_hidden=32, dropout=0.5,
                 seed=seed).validate()
    stage = build_stage(cfg, (1, 28, 28), 10)
    stage.replicate(replica, None)
    stage.train()
    stage.set_position(epoch, step)
    return [u.drop(torch.ones(64, 32), 0.5) for u in stage.units if isinstance(u, LocalBlock)]


def test_dropout_masks_are_keyed_by_seed_unit_position_and_replica():
    """The masks themselves, not two runs of the same code: the same key draws the same mask
    in any stage object, and each part of the key (replica, epoch, step, seed, unit) changes
    it."""
    base = _masks(0, 1, 3)
    assert all(m.unique().tolist() == [0.0, 2.0] for m in base)
    assert all(torch.equal(a, b) for a, b in zip(base, _masks(0, 1, 3)))
    for other in (_masks(1, 1, 3), _masks(0, 1, 4), _masks(0, 2, 3), _masks(0, 1, 3, seed=8)):
        assert not any(torch.equal(a, b) for a, b in zip(base, other))
    assert not torch.equal(base[0], base[1]) and not torch.equal(base[1], base[2])


class OtherReplica:
    """A stand-in for one more replica, whose bucket is this one's with its flag set to
    ``finite``: the sum any real group would return."""

    count = 2

    def __init__(self, finite: bool) -> None:
        self.finite = finite

    def sum(self, pieces: list[torch.Tensor]):
        flat = torch.cat(pieces)
        other = flat.clone()
        other[0] = float(self.finite)
        return lambda: flat + other


@pytest.mark.parametrize("finite", [True, False])
def test_one_replicas_nonfinite_loss_skips_the_update_on_every_replica(finite):
    cfg = Config(model="mlp", dataset="synthetic", num_hidden=16, on_nan="skip").validate()
    stage = build_stage(cfg, (1, 28, 28), 10)
    stage.replicate(0, OtherReplica(finite))
    twin = build_stage(cfg, (1, 28, 28), 10)  # the same unit trained alone
    before = {k: v.clone() for k, v in stage.state_dict().items()}
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    for s in (stage, twin):
        s.train()
        _, update = s.units[0].train_step(x, y)
        update()
    after = stage.state_dict()
    if finite:  # the mean of two equal gradients and statistics: the lone unit's step
        assert_same_model(twin.state_dict(), after)
    else:  # skipped: weights, moments and batch-norm statistics as they were
        assert_same_model(before, after)
        for state in stage.units[0].optimizers[0].state.values():  # as a first step finds it
            assert state["step"] == 0 and not state["exp_avg"].any() \
                and not state["exp_avg_sq"].any()


def test_a_checkpoint_is_refused_with_another_global_batch(mesh, mnist_root):
    from localpipe.pipeline.checkpoint import start_point

    cfg = parse_config(ARGS + MESH + ["--per-replica-batch", "--data-root", mnist_root,
                                      "--resume", str(mesh)])
    with pytest.raises(ConfigError, match="a global batch of 32 .*, this run has 64"):
        start_point(cfg, 4)


class Recording:
    """Replicas that record what each sum is sent (and give it back unchanged)."""

    count = 2

    def __init__(self) -> None:
        self.sent: list[torch.Tensor] = []

    def sum(self, pieces: list[torch.Tensor]):
        flat = torch.cat(pieces)
        self.sent.append(flat.clone())
        return lambda: flat


def test_every_replica_sends_its_meters_in_one_schema():
    """After a resume only replica 0 holds the restored meters: the replicas' sums at the
    next checkpoint must still be the same collective, whatever each has recorded."""
    cfg = Config(model="mlp", dataset="synthetic", num_hidden=16).validate()
    fresh, trained = (build_stage(cfg, (1, 28, 28), 10) for _ in range(2))
    trained.train()
    trained.train_step(torch.randn(8, 1, 28, 28), torch.arange(8))[1]()
    sums = []
    for stage in (fresh, trained):
        stage.replicate(0, Recording())
        state = stage.checkpoint_state()
        sums.append(stage.replicas.sent[-1])
        assert all(state["units"][u.index]["meters"].keys()
                   == u.meters["train"].state().keys() for u in stage.units)
    assert sums[0].shape == sums[1].shape and sums[0].abs().sum() == 0
    saved = trained.checkpoint_state()["units"][0]["meters"]
    assert {k: float(v) for k, v in saved.items()} == \
        {k: float(v) for k, v in trained.units[0].meters["train"].state().items()}
