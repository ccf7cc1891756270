"""Pipelined training computes exactly what sequential training computes (the method spec's
equivalence note), under every runner, and a failing stage brings the whole run down."""
import subprocess
import time

import pytest
import torch

from localpipe.launch.pipeline import main
from localpipe.pipeline.channel import Abort, Channel, StageFailed
from localpipe.pipeline.message import Kind, Message
from localpipe.stages import partition
from localpipe.stages.config import ConfigError

from conftest import Timed, assert_same_model, load_model, metrics, run_cli

# Dropout and batch norm on, a last partial batch (100 = 3·32 + 4), an epoch boundary with an
# lr milestone, and --max-steps ending training inside the second epoch.
COMMON = ["--no-curves", "--dataset", "MNIST", "--limit-train", "100", "--limit-test", "50",
          "--batch-size", "32", "--epochs", "2", "--max-steps", "6", "--dropout", "0.2", "--nonlin",
          "leakyrelu", "--lr-decay-milestones", "1", "--threads", "1", "--seed", "7"]
MODELS = {
    "mlp": ["--model", "mlp", "--num-layers", "3", "--num-hidden", "64"],
    "vgg8b": ["--model", "vgg8b", "--feat-mult", "0.25", "--num-hidden", "64",
              "--dim-in-decoder", "1024"],
}
_reference: dict[str, str] = {}


def _args(model: str, mnist_root: str, save_dir) -> list[str]:
    return MODELS[model] + COMMON + ["--data-root", mnist_root, "--save-dir", str(save_dir)]


def _reference_run(model: str, mnist_root: str, tmp_path_factory) -> str:
    if model not in _reference:
        save = tmp_path_factory.mktemp(f"ref-{model}")
        assert main(_args(model, mnist_root, save) + ["--stages", "1"]) == 0
        _reference[model] = str(save)
    return _reference[model]


def _errors(save_dir) -> list[tuple]:
    return [(r["epoch"], r["train_error"], r["test_error"],
             [(b["train_error"], b["test_error"]) for b in r["blocks"]]) for r in metrics(save_dir)]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("runner,stages", [("threads", 2), ("threads", 3), ("threads", 4),
                                           ("torchrun", 2), ("torchrun", 3), ("torchrun", 4)])
def test_pipelined_equals_sequential(model, runner, stages, mnist_root, tmp_path,
                                     tmp_path_factory):
    reference = _reference_run(model, mnist_root, tmp_path_factory)
    args = _args(model, mnist_root, tmp_path) + ["--stages", str(stages)]
    if runner == "threads":
        assert main(args) == 0
    else:
        result = run_cli(*args, torchrun=stages, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_model(load_model(reference), load_model(tmp_path))
    assert _errors(reference) == _errors(tmp_path)
    assert len(metrics(tmp_path)) == 2 and metrics(tmp_path)[-1]["lr"] == pytest.approx(1.25e-4)
    manifest = tmp_path / "checkpoints" / "step-000000006" / "manifest.json"
    assert manifest.exists() and len(list(manifest.parent.glob("stage-*.pt"))) == stages


def test_pipelined_model_loads_as_an_ordinary_model(mnist_root, tmp_path_factory):
    from localpipe.pipeline.data import INFO
    from localpipe.stages.config import Config
    from localpipe.stages.models import build_model

    reference = _reference_run("mlp", mnist_root, tmp_path_factory)
    cfg = Config(model="mlp", num_layers=3, num_hidden=64, dropout=0.2)
    model = build_model(cfg, INFO["MNIST"].shape, 10)
    model.load_state_dict(load_model(reference))
    model.eval()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def _still_running(marker: str) -> str:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout


@pytest.mark.slow  # starts processes
def test_failing_stage_brings_down_every_process(tmp_path):
    save = tmp_path / "fault-run"
    run = Timed("--no-curves", "--model", "mlp", "--num-layers", "2", "--num-hidden", "64",
                "--dataset", "synthetic", "--stages", "3", "--save-dir", str(save),
                "--epochs", "5", torchrun=3, env={"LOCALPIPE_INJECT_FAULT": "1:3"}, timeout=120)
    ours = run.ours()
    assert run.returncode != 0 and ours, run.text[-3000:]
    assert run.ended - ours[0][0] < 30, "the job outlived its first failure by 30 s"
    cause = "stage 1 failed: RuntimeError: injected fault at training step 3"
    assert sorted(text for _, text in ours) == sorted(
        [f"localpipe: stage {k} stopped: {cause}" for k in (0, 2)] + [f"localpipe: {cause}"])
    assert not _still_running(str(save)), "a stage process outlived the run"


def test_failing_stage_stops_the_in_process_runner(tmp_path, capsys):
    import os

    os.environ["LOCALPIPE_INJECT_FAULT"] = "2:2"
    try:
        start = time.monotonic()
        code = main(["--no-curves", "--model", "mlp", "--num-layers", "3", "--num-hidden", "32",
                     "--dataset", "synthetic", "--stages", "4", "--save-dir", str(tmp_path),
                     "--threads", "1"])
    finally:
        del os.environ["LOCALPIPE_INJECT_FAULT"]
    # the failure stops the run, not --comm-timeout (300 s): a bound with room for a busy machine
    assert code == 1 and time.monotonic() - start < 120
    assert "stage 2 failed: RuntimeError: injected fault" in capsys.readouterr().err


def test_channel_backpressure_and_abort():
    """A full channel holds its producer back until the consumer takes a message, and a
    failure anywhere in the process wakes every wait."""
    import threading

    abort = Abort()
    channel = Channel(1, abort, "test queue")
    channel.put(Message(Kind.STOP, 0, 0))
    blocked = threading.Thread(target=channel.put, args=(Message(Kind.END_EPOCH, 1, 0),))
    blocked.start()
    time.sleep(0.2)
    assert blocked.is_alive() and channel.qsize() == 1
    assert channel.get()[0].kind == Kind.STOP
    blocked.join(timeout=5)
    assert channel.get()[0].kind == Kind.END_EPOCH
    abort.fail(StageFailed(3, "boom"))
    with pytest.raises(StageFailed, match="stage 3 failed: boom"):
        channel.get()


def test_a_stage_stuck_inside_a_batch_is_named_not_its_neighbours(tmp_path, capsys,
                                                                  monkeypatch):
    """Stage 1 never returns from its 3rd batch (a device wait that hangs, say): after
    --comm-timeout seconds the run stops naming it, not the stages that wait for it."""
    monkeypatch.setenv("LOCALPIPE_INJECT_FAULT", "1:3:stall")
    start = time.monotonic()
    code = main(["--no-curves", "--model", "mlp", "--num-layers", "3", "--num-hidden", "32",
                 "--dataset", "synthetic", "--stages", "4", "--save-dir", "", "--threads", "1",
                 "--comm-timeout", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and time.monotonic() - start < 60  # --comm-timeout 2, with room
    assert err == ["localpipe: stage 1 failed: stuck for 2 s on one message (--comm-timeout 2)"]


def test_best_balance_minimises_the_slowest_stage():
    assert partition.best_balance([1, 1, 1, 1], 2) == [2, 2]
    assert partition.best_balance([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert partition.best_balance([1, 2, 3, 4, 5], 3) == [3, 1, 1]  # 6 | 4 | 5
    assert max(partition.stage_costs([1, 2, 3, 4, 5], [3, 1, 1])) == 6
    assert partition.split([2, 1], 3) == [[0, 1], [2]]
    with pytest.raises(ConfigError):
        partition.best_balance([1, 2], 3)


def test_auto_cut_falls_back_to_parameter_counts_when_measuring_runs_out_of_memory(
        monkeypatch):
    from localpipe.pipeline import plan as plan_module
    from localpipe.pipeline.plan import make_plan
    from localpipe.stages.config import Config

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("no room for a throwaway copy")

    monkeypatch.setattr(plan_module, "measure_costs", out_of_memory)
    cfg = Config(model="mlp", num_layers=3, num_hidden=64, dataset="synthetic", stages=2)
    run_plan = make_plan(cfg, torch.device("cpu"))
    assert run_plan.cost_kind == "parameters"
    assert run_plan.costs[0] == 784 * 64 + 64 + 2 * 64 + 64 * 64 + 64 * 10 + 10  # with heads
    assert [len(p) for p in run_plan.parts] == partition.best_balance(run_plan.costs, 2)


def _kinds(messages) -> list[tuple]:
    return [(m.kind.name, m.epoch, m.step) for m in messages]


@pytest.mark.parametrize("stop_after,tail", [
    (3, [("TRAIN", 1, 2), ("CHECKPOINT", 1, 3), ("STOP", 0, 0)]),
    # on a periodic checkpoint: no second marker for the same position
    (("CHECKPOINT", 1, 5), [("CHECKPOINT", 1, 5), ("STOP", 0, 0)]),
    # after the last training batch: "epoch 1 trained, evaluation to do"
    (16, [("TRAIN", 1, 15), ("CHECKPOINT", 1, 16), ("STOP", 0, 0)]),
    # between epochs: the epoch's own checkpoint is the newest, nothing to add
    (("END_EPOCH", 1, 16), [("END_EPOCH", 1, 16), ("STOP", 0, 0)]),
    (0, [("STOP", 0, 0)]),  # before any training: nothing new to save
])
def test_a_stop_ends_the_feed_with_one_checkpoint_where_training_goes_on(stop_after, tail):
    from localpipe.pipeline.checkpoint import Start
    from localpipe.pipeline.data import load_batches
    from localpipe.pipeline.feed import feed
    from localpipe.pipeline.signals import StopRequest
    from localpipe.stages.config import Config

    cfg = Config(dataset="synthetic", epochs=2, checkpoint_every=5)
    train, test, _ = load_batches(cfg)  # 16 training batches, 4 test batches
    stop = StopRequest()
    if stop_after == 0:
        stop.signum = 15
    got = []
    for msg in feed(cfg, train, test, None, torch.device("cpu"), Start(), stop):
        got.append(msg)
        if stop_after in (sum(m.kind == Kind.TRAIN for m in got), _kinds([msg])[0]):
            stop.signum = 15
    assert _kinds(got)[-len(tail):] == tail and (stop_after or len(got) == 1)


def test_a_new_thread_computes_with_the_process_thread_count():
    """torch gives a new thread its thread count lazily, at the thread's first parallel op; a
    GEMM before that runs at the BLAS library's default (every core), and a weight gradient's
    sums depend on the count. pipeline.process.pin_thread, called first by every thread the
    runners start, makes a thread's first GEMM the one --threads asks for."""
    import threading

    from localpipe.pipeline import process

    torch.manual_seed(0)
    grad, x = torch.randn(64, 10), torch.randn(64, 1024)  # a 10-class head's weight gradient
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = grad.t() @ x
        torch.set_num_threads(1)
        one = grad.t() @ x
        if torch.equal(one, two):
            pytest.skip("this machine's GEMM sums do not depend on the thread count")
        got: dict[bool, torch.Tensor] = {}

        def body(pin: bool) -> None:
            if pin:
                process.pin_thread()
            got[pin] = grad.t() @ x

        for pin in (False, True):
            thread = threading.Thread(target=body, args=(pin,))
            thread.start()
            thread.join()
    finally:
        torch.set_num_threads(before)
    if torch.equal(got[False], one):
        pytest.skip("a new thread's BLAS default is one thread here (OMP_NUM_THREADS=1?)")
    assert torch.equal(got[True], one)


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_a_non_finite_loss_at_evaluation_obeys_on_nan(on_nan):
    """A NaN test batch stops the run under --on-nan stop, naming the unit and the epoch,
    before the epoch's record; under skip it is counted apart and the run goes on."""
    from localpipe.pipeline.channel import StageFailed
    from localpipe.pipeline.inprocess import run_threads
    from localpipe.pipeline.message import Message
    from localpipe.stages.config import Config
    from localpipe.stages.models import build_stage

    cfg = Config(model="mlp", num_layers=1, num_hidden=16, dataset="synthetic", save_dir="",
                 on_nan=on_nan).validate()
    stage = build_stage(cfg, (1, 28, 28), 10)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(10, (8,))
    messages = [Message(Kind.EVAL, 1, 0, tensors={"x": x, "y": y}),
                Message(Kind.EVAL, 1, 1, tensors={"x": x * float("nan"), "y": y}),
                Message(Kind.END_EPOCH, 1, 0), Message(Kind.STOP, 0, 0)]
    reports = []
    if on_nan == "stop":
        with pytest.raises(StageFailed, match="unit 0: 1 test batch\\(es\\) gave a non-finite "
                                              "loss in the evaluation of epoch 1"):
            run_threads(cfg, [stage], [torch.device("cpu")], iter(messages), reports.append)
        assert not [r for r in reports if r["kind"] == "end_epoch"]
        return
    run_threads(cfg, [stage], [torch.device("cpu")], iter(messages), reports.append)
    meters = next(r for r in reports if r["kind"] == "end_epoch")["meters"]
    assert meters[1]["test"]["nonfinite"] == 1 and meters[1]["test"]["n"] == 8
