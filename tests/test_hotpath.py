"""The training step's cost beyond its arithmetic, held where it is: dispatcher ops and host
reads per step (counted as benchmarks/step.py counts them), a skipped batch decided on the
device for every optimizer, --on-nan stop noticed late but named right, and the replicas' sum
issued under the NCCL lock into buffers kept from the first batch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from localpipe.benchmarks.step import count, localpipe_step, mlp_config
from localpipe.pipeline import replicas as replicas_module
from localpipe.pipeline.message import Kind, Message
from localpipe.pipeline.transport import NCCL_LOCK
from localpipe.pipeline.worker import LossWatch, StepLog
from localpipe.stages.blocks import NonFiniteLoss
from localpipe.stages.config import Config
from localpipe.stages.models import build_stage

SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(n)), \
        torch.arange(n) % 10


@pytest.mark.parametrize("overrides,budget", [
    ({}, 300),  # the MNIST MLP recipe's step; a plain loop of the same math needs about 220
    ({"on_nan": "skip"}, 340),  # + every buffer kept and put back with torch.where
    ({"model": "vgg8b", "feat_mult": 0.125, "batch_size": 32, "num_layers": 1}, 700),
    # a ViT of 4 blocks with AdamW (two groups a unit), the cosine after a warm-up and label
    # smoothing (510 ops when written): the learning rate is set, never read back
    ({"model": "vit", "num_layers": 4, "num_hidden": 64, "num_heads": 4, "dropout": 0.0,
      "nonlin": "relu", "batch_size": 32, "optim": "adamw", "weight_decay": 0.05,
      "lr_schedule": "cosine", "warmup_steps": 10, "label_smoothing": 0.1}, 560),
])
def test_a_training_step_stays_within_its_op_budget_with_no_host_read(overrides, budget):
    """Fused optimizers, meters in a few device ops, the label targets once per batch and
    stage, finiteness decided on the device: a GPU never waits for the host in a step, and
    launches about as many kernels as the step's math needs (683 ops and 27 host reads for
    the MLP before)."""
    cfg = mlp_config(**overrides)
    _, step = localpipe_step(cfg, SHAPE)
    counted = count(step, *batch(cfg.batch_size))
    assert counted.host_reads == 0, counted.ops
    assert counted.total <= budget, counted.ops.most_common(15)


class Agreeing:
    """Replicas that all saw the same: the sum of ``count`` equal buckets."""

    count = 2

    def sum(self, pieces: list[torch.Tensor]):
        flat = torch.cat(pieces)
        return lambda: flat * 2


def test_replicas_agree_on_a_skip_without_a_host_read():
    cfg = mlp_config(num_hidden=64)
    stage, step = localpipe_step(cfg, SHAPE)
    stage.replicate(0, Agreeing())
    counted = count(step, *batch(32))
    assert counted.host_reads == 0 and counted.total > 0


@pytest.mark.parametrize("optim", ["sgd", "adam", "amsgrad"])
def test_a_skipped_first_step_leaves_every_optimizer_as_new(optim):
    """A non-finite first batch (--on-nan skip) changes nothing: the next batch trains as a
    fresh unit's first would, bit for bit (fused SGD with momentum would otherwise read
    momentum buffers it never initialised; Adam's step count is taken back)."""
    cfg = Config(model="mlp", dataset="synthetic", num_layers=1, num_hidden=32, optim=optim,
                 momentum=0.9, weight_decay=1e-3, dropout=0, on_nan="skip").validate()
    skipped, fresh = build_stage(cfg, SHAPE, 10), build_stage(cfg, SHAPE, 10)
    assert all(g["fused"] for u in skipped.units for o in u.optimizers for g in o.param_groups)
    x, y = batch(16)
    bad = x.clone()
    bad[3] = float("nan")
    for stage, inputs in ((skipped, [bad, x]), (fresh, [x])):
        stage.train()
        for i, xs in enumerate(inputs):
            stage.set_position(1, i)
            _, update = stage.train_step(xs, y)
            update()
    for a, b in zip(skipped.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    for unit, twin in zip(skipped.units, fresh.units):
        ours, theirs = unit.optimizers[0].state_dict(), twin.optimizers[0].state_dict()
        for key, state in ours["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(
                    theirs["state"][key][name])), (unit.index, name)
    assert skipped.take_meters()[0]["train"]["nonfinite"] == 1


def _trained(stage, i: int, loss: float) -> Message:
    for unit in stage.units:
        unit.last_loss = torch.tensor(loss if unit.index == 1 else 0.5)
    return Message(Kind.TRAIN, 2, i)


def test_on_nan_stop_looks_late_and_names_the_first_bad_batch():
    """Losses are looked at every few batches without a device wait; the first non-finite
    one is named with its unit, epoch and batch; a marker looks at once; no steps.jsonl
    record of a batch is reported before its look cleared it."""
    cfg = Config(model="mlp", dataset="synthetic", num_layers=2, num_hidden=16).validate()
    stage = build_stage(cfg, SHAPE, 10)
    watch, logged = LossWatch(every=4), []
    log = StepLog(1, 0, logged.append)
    for i, loss in enumerate([0.3, 0.2, 0.1, 0.3, math.inf, math.nan]):  # one look, at 3
        msg = _trained(stage, i, loss)
        watch.after(stage, msg, i + 1)
        log.after(stage, msg, i + 1, watch.cleared)
        if i == 2:
            watch.check(wait=True)  # a marker: all finite so far
            log.flush(wait=True, cleared=watch.cleared)
    assert watch.cleared == 3 and [r["steps"] for r in logged] == [1, 2, 3]
    with pytest.raises(NonFiniteLoss, match=r"^unit 1: loss is inf at epoch 2, batch 5$"):
        watch.check(wait=True)


def test_the_replicas_sum_runs_under_the_nccl_lock_into_kept_buffers(monkeypatch):
    """NCCL work is issued by one thread at a time in a process (the links' rule), and a
    step allocates no bucket of its own after the first."""
    seen = []

    class Work:
        def wait(self):
            return True

    def all_reduce(tensor, group=None, async_op=False):
        seen.append((NCCL_LOCK.locked(), tensor.data_ptr()))
        tensor.mul_(2)
        return Work()

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    for host in (False, True):
        seen.clear()
        group = replicas_module.ReplicaGroup(None, 2, host=host, lost=None)
        pieces = [torch.ones(3), torch.full((2,), 2.0)]
        sums = [group.sum(pieces)() for _ in range(3)]
        assert all(torch.equal(s, torch.tensor([2.0, 2, 2, 4, 4])) for s in sums)
        assert [locked for locked, _ in seen] == [not host] * 3
        assert len({ptr for _, ptr in seen}) == 1 and len({s.data_ptr() for s in sums}) == 1


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_a_checkpoint_of_the_for_loop_optimizers_resumes_fused(optim):
    """Checkpoints written before the fused optimizers hold their groups' form (fused None):
    a resume keeps the fused form, with its step counts where the kernels read them, and
    steps as a run that was fused all along would."""
    cfg = Config(model="mlp", dataset="synthetic", num_layers=1, num_hidden=32, optim=optim,
                 momentum=0.9, dropout=0).validate()
    old, new = build_stage(cfg, SHAPE, 10), build_stage(cfg, SHAPE, 10)
    x, y = batch(16)
    for unit in old.units:  # the optimizers as localpipe made them before
        unit.optimizers = [torch.optim.SGD(unit.parameters(), lr=cfg.lr, momentum=0.9)
                           if optim == "sgd" else torch.optim.Adam(unit.parameters(), lr=cfg.lr)]
    old.train()
    _, update = old.train_step(x, y)
    update()
    new.load_checkpoint_state(old.checkpoint_state())
    for unit in new.units:
        group = unit.optimizers[0].param_groups[0]
        assert group["fused"] and not group["foreach"]
    new.train()

    def step(x, y, i):
        new.set_position(1, i)
        _, update = new.train_step(x, y)
        update()
    assert count(step, x, y).host_reads == 0  # the for-loop form reads each step count
    assert all(torch.isfinite(t).all() for t in new.state_dict().values())
