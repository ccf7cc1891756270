"""``lp.LocalNet`` and ``lp.fit``: a network written in a test (tests/fit_script.py), not one
of the built-ins, trained one epoch on an MNIST subset as one stage, two stage threads and two
torchrun processes, with the same weights at one thread count; its weights reproduce the test
error in plain PyTorch; a callable local loss trains; the README's example runs as written."""
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import fit_script
import localpipe as lp
from localpipe.stages.blocks import FALinear
from conftest import ROOT, cli_env


@pytest.fixture(scope="module")
def data(mnist_root):
    return mnist_root, *fit_script.mnist(mnist_root)  # unpacked once, before any torchrun


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The network trained with one stage (in a run folder) and with two stage threads (the
    cut chosen by measuring a throwaway copy), one thread each."""
    _, train, test = data
    threads = torch.get_num_threads()
    out = {}
    try:
        for stages in (1, 2):
            net = lp.LocalNet(fit_script.network(), num_classes=10, input_shape=(1, 28, 28))
            folder = tmp_path_factory.mktemp(f"k{stages}")
            result = lp.fit(net, train, test, epochs=1, batch_size=fit_script.BATCH,
                            stages=stages, threads=1, save_dir=str(folder), curves=False)
            out[stages] = net, result
    finally:
        torch.set_num_threads(threads)
    return out


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_wrapping_changes_nothing_of_the_users_network():
    """The heads are sized by a probe that moves no running statistic and no training flag;
    ``net.module`` is the user's very object, and the heads live beside it."""
    module = fit_script.network()
    module[1].eval()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flags = [m.training for m in module.modules()]
    net = lp.LocalNet(module, num_classes=10, input_shape=(1, 28, 28))
    assert net.module is module and _equal(before, module.state_dict())
    assert [m.training for m in module.modules()] == flags
    assert net.out_shapes == [(16, 14, 14), (32, 7, 7), (128,), (10,)]
    assert len(net.heads) == 3 and not set(net.heads.parameters()) & set(module.parameters())


def test_one_stage_two_threads_and_two_processes_give_the_same_weights(data, trained,
                                                                        tmp_path):
    root = data[0]
    (one, first), (two, second) = trained[1], trained[2]
    assert _equal(one.module.state_dict(), two.module.state_dict())
    assert _equal(one.heads.state_dict(), two.heads.state_dict())
    assert first.test_error == second.test_error and len(first.history) == 1
    assert not _equal(one.module.state_dict(), fit_script.network().state_dict())  # it trained
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                          "2", str(ROOT / "tests" / "fit_script.py"), root, str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=cli_env())
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):  # every process holds the whole trained network
        got = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=True)
        assert _equal(got["state"], one.module.state_dict()), rank
        assert got["test_error"] == first.test_error and got["epochs"] == 1


def test_the_weights_reproduce_the_test_error_in_plain_pytorch(data, trained):
    """A fresh copy of the ``nn.Sequential`` with plain ``load_state_dict``, evaluated with
    plain PyTorch, gives the run's test error exactly; ``lp.load(run_dir, into=...)`` loads the
    same weights from the run's ``model.pt``."""
    _, _, test = data
    net, result = trained[1]
    fresh = fit_script.network()
    fresh.load_state_dict(net.module.state_dict())
    fresh.eval()
    wrong = 0
    with torch.no_grad():
        for start in range(0, len(test), fit_script.BATCH):
            x, y = zip(*(test[i] for i in range(start, min(start + fit_script.BATCH,
                                                           len(test)))))
            wrong += int((fresh(torch.stack(x)).argmax(1) != torch.tensor(y)).sum())
    assert 100.0 * (wrong / len(test)) == result.test_error < 50  # chance: 90
    assert lp.evaluate(net.module, test, fit_script.BATCH) == result.test_error
    loaded = lp.load(result.run_dir, into=fit_script.network())
    assert _equal(loaded.state_dict(), net.module.state_dict()) and not loaded.training
    assert "conv1.0.weight" in loaded.state_dict()  # the user's own names
    wrapped = lp.load(result.run_dir, into=lp.LocalNet(fit_script.network(), num_classes=10,
                                                       input_shape=(1, 28, 28), seed=7))
    assert _equal(wrapped.state_dict(), net.state_dict())  # the heads too
    with pytest.raises(lp.ConfigError, match="into="):
        lp.load(result.run_dir)


def test_a_run_resumes_from_its_checkpoint_exactly_in_another_cut(data, trained, tmp_path):
    """The one-stage run's epoch-1 checkpoint, continued to epoch 2 as two stages into a
    folder of its own, ends where two epochs straight end."""
    _, train, test = data
    common = dict(epochs=2, batch_size=fit_script.BATCH, threads=1, curves=False)
    threads = torch.get_num_threads()
    try:
        straight = lp.LocalNet(fit_script.network(), num_classes=10, input_shape=(1, 28, 28))
        done = lp.fit(straight, train, test, save_dir="", **common)
        resumed = lp.LocalNet(fit_script.network(), num_classes=10, input_shape=(1, 28, 28))
        again = lp.fit(resumed, train, test, stages=2, balance=[2, 2],
                       resume=trained[1][1].run_dir, save_dir=str(tmp_path / "on"), **common)
    finally:
        torch.set_num_threads(threads)
    assert _equal(straight.module.state_dict(), resumed.module.state_dict())
    assert again.test_error == done.test_error and [r["epoch"] for r in again.history] == [2]
    # a run that trained every epoch asked for: nothing to do, and the weights it ended with
    run_dir = trained[1][1].run_dir
    finished = lp.LocalNet(fit_script.network(), num_classes=10, input_shape=(1, 28, 28))
    nothing = lp.fit(finished, train, test, epochs=1, batch_size=fit_script.BATCH,
                     resume="auto", save_dir=run_dir, curves=False)
    assert nothing.history == [] and nothing.run_dir == run_dir
    assert _equal(finished.module.state_dict(), trained[1][0].module.state_dict())


def test_a_callable_local_loss_trains(data):
    """``loss(h, y, head)``: here cross-entropy through the default head's pred part."""
    _, train, test = data
    seen = []

    def loss(h, y, head):
        seen.append(tuple(h.shape[1:]))
        return F.cross_entropy(head.predict(h), y)

    net = lp.LocalNet(fit_script.network(), num_classes=10, input_shape=(1, 28, 28),
                      loss=loss)
    result = lp.fit(net, train, test, epochs=1, batch_size=fit_script.BATCH, threads=1,
                    save_dir="", curves=False)
    assert {(16, 14, 14), (32, 7, 7), (128,)} == set(seen)
    assert result.test_error < 50 and result.run_dir is None  # chance: 90
    blocks = result.history[0]["blocks"]  # each block's own CE, below chance's ln 10 = 2.30
    assert all(b["test_error"] is None and b["train_loss"] < 2.0 for b in blocks), blocks


@pytest.mark.parametrize("loss,alpha", [("bio-predsim", 0.0), ("pred", 0.5), ("sim", 0.0)])
def test_the_other_variants_train(data, loss, alpha):
    """§5's feedback-alignment heads, the unsupervised similarity term mixed in (§3.4), and
    sim alone: each block's own error or loss falls below chance in one epoch."""
    _, train, test = data
    net = lp.LocalNet(fit_script.network(), num_classes=10, input_shape=(1, 28, 28),
                      loss=loss, alpha=alpha)
    if loss.startswith("bio"):
        assert all(isinstance(h.pred, FALinear) and h.sim is None for h in net.heads)
    result = lp.fit(net, train, test, epochs=1, batch_size=fit_script.BATCH, threads=1,
                    save_dir="", curves=False)
    assert result.test_error < 60, result.test_error  # chance: 90
    if loss == "pred":
        assert all(b["test_error"] < 60 for b in result.history[0]["blocks"])


def _toy(fail_at: int = 0) -> tuple[lp.LocalNet, TensorDataset]:
    class Failing(nn.Linear):
        calls = 0

        def forward(self, x):
            Failing.calls += 1
            if Failing.calls == fail_at:
                raise RuntimeError("the user's block broke")
            return super().forward(x)

    torch.manual_seed(0)
    module = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU()),
                           Failing(8, 8), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 4, 4, generator=g), torch.randint(3, (64,),
                                                                              generator=g))
    return lp.LocalNet(module, num_classes=3, input_shape=(1, 4, 4)), data


def test_without_a_test_set_it_trains_and_tests_nothing():
    net, data = _toy()
    before = net.module[1].weight.clone()
    result = lp.fit(net, data, epochs=2, batch_size=8, save_dir="", curves=False)
    assert result.test_error is None and [r["epoch"] for r in result.history] == [1, 2]
    assert result.history[-1]["test_samples"] == 0 and result.history[-1]["train_samples"] == 64
    assert not torch.equal(before, net.module[1].weight)


def test_bad_input_and_a_failing_block_are_named():
    net, data = _toy()
    with pytest.raises(lp.ConfigError, match="--stages 4 is more than the 3 units"):
        lp.fit(net, data, epochs=1, batch_size=8, stages=4, save_dir="")
    with pytest.raises(lp.ConfigError, match="--batch-size must be positive"):
        lp.fit(net, data, epochs=1, batch_size=0, save_dir="")
    with pytest.raises(ValueError, match="must give 3 logits"):
        lp.LocalNet(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), num_classes=3,
                    input_shape=(1, 4, 4))
    net, data = _toy(fail_at=5)
    with pytest.raises(lp.StageFailed, match="stage 1 failed.*the user's block broke"):
        lp.fit(net, data, epochs=1, batch_size=8, stages=2, balance=[1, 2], save_dir="")
    net, data = _toy()
    x, y = data.tensors
    for bad, message in (((x, y + 1), "has labels outside 0..2 \\(1..3\\)"),
                         (((x * 255).to(torch.uint8), y), "holds torch.uint8 samples"),
                         ((x, y.float()), "holds torch.float32 labels")):
        with pytest.raises(lp.StageFailed, match="the data feed: DataError: the training "
                                                 "set's batch 1 of epoch 1 " + message):
            lp.fit(net, TensorDataset(*bad), epochs=1, batch_size=8, save_dir="")
    with pytest.raises(TypeError, match="fit trains a LocalNet"):
        lp.fit(net.module, data, epochs=1, batch_size=8, save_dir="")
    with pytest.raises(ValueError, match="at least one sample"):
        lp.evaluate(net.module, [])
    module = net.module
    for kwargs, message in (
            ({"input_shape": (1, 5, 5)}, "cannot take a sample of input_shape \\(1, 5, 5\\)"),
            ({"input_shape": 16}, "input_shape is one sample's shape"),
            ({"num_classes": 0}, "num_classes must be an int of at least 2"),
            ({"heads": lambda i, shape: nn.Identity()}, "head 0 has no predict\\(h\\) or "
                                                        "similar\\(h\\)")):
        with pytest.raises(ValueError, match=message):
            lp.LocalNet(module, **{"num_classes": 3, "input_shape": (1, 4, 4), **kwargs})
    with pytest.raises(ValueError, match="the output layer, has no parameters"):
        lp.LocalNet(nn.Sequential(*module, nn.LogSoftmax(1)), num_classes=3,
                    input_shape=(1, 4, 4))


def test_fit_leaves_the_programs_global_state_alone(tmp_path):
    """Seeds, thread count and deterministic mode are the run's while it runs and the
    program's again after; a checkpoint resumes only into the network it was made for."""
    net, data = _toy()
    torch.manual_seed(777)
    expected = torch.rand(3)
    torch.manual_seed(777)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        lp.fit(net, data, epochs=1, batch_size=8, threads=1, deterministic=True,
               save_dir=str(tmp_path / "run"), curves=False)
        assert torch.equal(torch.rand(3), expected)
        assert torch.get_num_threads() == max(1, threads - 1)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)
    other = lp.LocalNet(net.module, num_classes=3, input_shape=(1, 4, 4), loss="pred")
    with pytest.raises(lp.ConfigError, match="was made for another network: LocalNet.* "
                                             "loss=predsim.*; this run trains .*loss=pred "):
        lp.fit(other, data, epochs=2, batch_size=8, save_dir=str(tmp_path / "run"),
               resume="auto")


def test_the_readmes_python_example_runs_as_written(mnist_root, tmp_path):
    """The README's "From Python" example, in a folder whose ``data`` is the MNIST copy."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "data").symlink_to(mnist_root)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=cli_env())
    assert run.returncode == 0, run.stderr[-3000:]
    errors = re.search(r"test error ([\d.]+) %, plain PyTorch ([\d.]+) %", run.stdout)
    assert errors and errors.group(1) == errors.group(2) and float(errors.group(1)) < 20, \
        run.stdout[-2000:]


def test_keyed_dropout_draws_torchs_masks_from_its_own_generator():
    """The same key, the same masks; torch's semantics at the edges (p = 1 zeroes; a 2-D input
    to Dropout1d is one unbatched (C, L) sample whose rows drop whole)."""
    from localpipe.stages.localnet import KeyedRandom
    x = torch.ones(6, 8)
    with KeyedRandom(3):
        first, rows, gone = F.dropout(x, 0.5), nn.Dropout1d(0.5)(x), F.dropout(x, 1.0)
        drawn = torch.rand(2)
    with KeyedRandom(3):
        again = F.dropout(x, 0.5)
    with KeyedRandom(4):
        other = F.dropout(x, 0.5)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert set(first.unique().tolist()) == {0.0, 2.0} and torch.equal(gone, torch.zeros_like(x))
    assert all(len(set(row.tolist())) == 1 for row in rows)
    with KeyedRandom(3):
        F.dropout(x, 0.5)
        nn.Dropout1d(0.5)(x)
        F.dropout(x, 1.0)
        assert torch.equal(torch.rand(2), drawn)  # the generator's own sequence, not torch's
