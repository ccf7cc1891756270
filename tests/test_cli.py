"""The command line: the paper's parameter counts, and bad input as one line with exit code 2
that writes nothing."""
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from localpipe.launch.pipeline import main
from localpipe.pipeline.control import host_id

from conftest import ROOT, run_cli

PAPER_COUNTS = [
    (["--model", "mlp", "--dataset", "MNIST", "--num-layers", "3"], 2919434),
    (["--model", "vgg8b", "--dataset", "MNIST"], 7328266),
    (["--model", "vgg8b", "--dataset", "CIFAR10"], 8903434),
    (["--model", "vgg8b", "--dataset", "CIFAR100"], 8995684),
    (["--model", "vgg11b", "--dataset", "CIFAR10"], 11559946),
    (["--model", "vgg11b", "--dataset", "CIFAR10", "--feat-mult", "3"], 91276298),
    (["--model", "vgg8b", "--dataset", "STL10"], 11540234),
]


@pytest.mark.parametrize("args,count", PAPER_COUNTS)
def test_describe_gives_the_papers_parameter_counts(capsys, args, count):
    assert main(args + ["--describe"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"backprop parameters: {count:,}"


def test_describe_under_torchrun_prints_once(capsys, monkeypatch):
    """Every rank would measure its own cut; the run uses rank 0's, so rank 0 alone says it."""
    args = ["--model", "mlp", "--dataset", "synthetic", "--stages", "2", "--describe"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0 and capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0 and "stage 1: units" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["--backprop", "--no-detach"])
@pytest.mark.parametrize("model", ["mlp", "resnet18"])
def test_the_global_modes_pass_the_networks_own_checks(capsys, model, mode):
    """The input-size and batch-size check runs the network as each mode does: the global
    modes have no local heads to run (a check that ran them refused every --backprop run)."""
    assert main(["--model", model, mode, "--dataset", "synthetic", "--feat-mult", "0.125",
                 "--describe", "--threads", "1"]) == 0
    assert "backprop parameters" in capsys.readouterr().out


def test_describe_shows_the_stages_and_their_costs(capsys):
    assert main(["--model", "mlp", "--num-layers", "3", "--dataset", "MNIST", "--stages", "2",
                 "--describe", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "stage 0: units 0-" in out and "stage 1: units" in out and "measured step" in out


# ---------------------------------------------------------------------------- bad input
# Each row is refused with exit code 2 and one line on stderr naming the problem, before
# anything is written: run against a folder that holds a finished run, which must stay exactly
# as it was. "{data:NAME}" is a generated data root, "{ckpt:NAME}" a tampered checkpoint of the
# finished run, "{run}" the finished run's folder.
BAD = [
    # options
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--dataset", "ImageNet"], "unknown dataset 'ImageNet'"),
    (["--beta", "2"], "--beta must lie in [0, 1]"),
    (["--beta", "nan"], "--beta must be a finite number, got nan"),
    (["--feat-mult", "0"], "--feat-mult must be positive"),
    (["--model", "vgg8b", "--feat-mult", "0.001"], "leaves a conv layer with no channels"),
    (["--stages", "0"], "--stages must be positive"),
    (["--batch-size", "-1"], "--batch-size must be positive"),
    (["--batch-size", "99999999999999999999"], "--batch-size must be at most 2,147,483,647"),
    (["--epochs", "2147483648"], "--epochs must be at most 2,147,483,647"),
    (["--dropout", "1"], "--dropout must lie in [0, 1)"),
    (["--dropout=-inf"], "--dropout must be a finite number, got -inf"),
    (["--stages", "9"], "--stages 9 is more than the 3 units"),
    (["--stages", "2", "--balance", "1,3"], "--balance 1,3 sums to 4 but the network has 3 units"),
    (["--stages", "2", "--balance", "1"], "--balance has 1 entries but --stages is 2"),
    (["--stages", "2", "--balance", "2,x"], "expected integers like 2,3,2"),
    (["--stages", "2", "--balance", "3,0"], "--balance entries must be positive"),
    (["--backprop", "--stages", "2"], "cannot be pipelined"),
    (["--no-detach", "--stages", "2"], "--no-detach sends gradients between blocks"),
    (["--bio", "--backprop"], "--bio has no meaning with --backprop"),
    (["--optim", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--lr", "abc"], "invalid float value: 'abc'"),
    (["--lr", "0"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr-decay-fact", "0"], "--lr-decay-fact must be positive"),
    (["--lr-decay-milestones=-3"], "--lr-decay-milestones must be epochs"),
    (["--momentum", "nan"], "--momentum must be a finite number"),
    (["--weight-decay", "-0.1"], "--weight-decay must not be negative"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--queue-depth", "0"], "--queue-depth must be positive"),
    (["--num-layers", "-1"], "--num-layers must not be negative"),
    (["--limit-train", "-5"], "--limit-train must not be negative"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must not be negative"),
    (["--keep-checkpoints", "-2"], "--keep-checkpoints must not be negative"),
    (["--max-steps", "-1"], "--max-steps must not be negative"),
    (["--seed", "-1"], "--seed must not be negative"),
    (["--seed", str(2**64)], "--seed must be below 2**63"),
    (["--comm-timeout", "inf"], "--comm-timeout must be a finite number"),
    (["--comm-timeout", "1e12"], "--comm-timeout must lie in (0, 1e+09] seconds"),
    (["--heartbeat-timeout", "0"], "--heartbeat-timeout must lie in (0, 1e+09] seconds"),
    (["--threads", "100000000"], "--threads 100000000 is more than the"),
    (["--num-hidden", "1000000"], "needs 44,715.7 GiB for its weights, gradients and "
                                  "optimizer state, more than the"),
    (["--cutout", "--n_holes", "100000000"], "--n-holes 100000000 is more than the 784 pixels"),
    (["--classes-per-batch", "20"], "--classes-per-batch 20 is more than the 10 classes"),
    # what the network cannot train on, found before any stage is built
    (["--batch-size", "1"], "--batch-size 1 leaves batch norm 1 sample a batch; it needs at "
                            "least 2 (or --no-batch-norm)"),
    (["--model", "vgg8"], "--model vgg8 shrinks synthetic's 28×28 inputs to nothing; it takes "
                          "inputs of at least 32×32"),
    (["--model", "vgg16", "--describe"], "--model vgg16 shrinks synthetic's 28×28 inputs to "
                                         "nothing; it takes inputs of at least 32×32"),
    *([(["--device", "cuda"], "--device cuda was asked for but no CUDA device is available")]
      if not torch.cuda.is_available() else []),
    # data
    (["--dataset", "MNIST", "--data-root", "{data:missing}", "--no-download"],
     "MNIST is not in"),
    (["--dataset", "MNIST", "--data-root", "{data:counts}"],
     "MNIST's training split in {data:counts} has 60 images but 10 labels"),
    (["--dataset", "MNIST", "--data-root", "{data:garbage}"],
     "train-images-idx3-ubyte.gz is not a readable IDX file"),
    (["--dataset", "MNIST", "--data-root", "{data:empty}"],
     "train-labels-idx1-ubyte is not a readable IDX file: no IDX header"),
    (["--dataset", "MNIST", "--data-root", "{data:truncated}"],
     "train-images-idx3-ubyte is not a readable IDX file: 20,000 bytes where its header "
     "announces 47,056"),
    (["--dataset", "MNIST", "--data-root", "{data:labels}"],
     "MNIST's training split has labels outside 0..9"),
    (["--limit-train", "1"], "synthetic's training split has 1 sample(s); training needs at "
                             "least 2"),
    # the save folder and resuming
    ([], "--save-dir {run} already holds a run (args.json, metrics.jsonl, checkpoints, "
         "model.pt); add --resume auto to continue it"),
    (["--resume", "auto", "{lock}"], "--save-dir {run} is in use by process"),
    (["--save-dir", "/proc/localpipe-run"], "cannot write to --save-dir /proc/localpipe-run"),
    (["--resume", "/nonexistent/run"], "cannot resume: --resume /nonexistent/run: no complete "
                                       "checkpoint there"),
    (["--resume", "{run}", "--num-hidden", "64"], "was made with --num-hidden 32, this run has "
                                                  "64"),
    (["--resume", "{ckpt:not-a-manifest}"], "manifest.json has format 1; this localpipe "
                                            "reads format 3 only"),
    (["--resume", "{ckpt:old-format}"], "manifest.json has format 1; this localpipe reads "
                                        "format 3 only"),
    (["--resume", "{ckpt:no-files}"], "manifest.json is not a localpipe manifest: files must be "
                                      "a non-empty list"),
    (["--resume", "{ckpt:escape}"], "manifest.json is not a localpipe manifest: a files entry "
                                    "is malformed"),
    (["--resume", "{ckpt:truncated}"], "stage-0.pt is truncated or corrupt"),
    (["--resume", "{ckpt:bit-flip}"], "stage-0.pt is truncated or corrupt"),
    (["--resume", "{ckpt:pickled}"], "stage-0.pt holds objects other than tensors and plain "
                                     "containers; refused"),
    (["--resume", "{ckpt:foreign}"], "stage-0.pt does not hold the state of units [0, 1, 2]"),
    (["--resume", "{ckpt:another-run}"], "--save-dir {run} holds a run of its own and --resume "
                                         "{ckpt:another-run} is another run's checkpoint"),
    (["--resume", "{ckpt:wider}"], "checkpoint {ckpt:wider} does not fit this network: unit 0: "
                                   "layer.weight is 32x785 there, 32x784 here"),
    (["--resume", "{ckpt:missing-key}"], "does not fit this network: unit 0: it lacks "
                                         "layer.bias"),
    (["--resume", "{ckpt:extra-key}"], "does not fit this network: unit 0: it has zz.extra "
                                       "too"),
]
BASE = ["--no-curves", "--model", "mlp", "--num-layers", "2", "--num-hidden", "32", "--dataset",
        "synthetic",
        "--epochs", "1", "--threads", "1"]


def _write_idx(path, array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(data)
    return data


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A folder holding a finished run, and tampered copies of its checkpoint."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(BASE + ["--save-dir", str(run)]) == 0
    good = next((run / "checkpoints").glob("*/manifest.json")).parent
    ckpts = tmp_path_factory.mktemp("tampered")

    def tamper(name: str, edit) -> None:
        """A copy of the checkpoint with ``edit(folder, manifest)`` applied to it."""
        folder = ckpts / name
        shutil.copytree(good, folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        edit(folder, manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))

    def rehash(folder, manifest, data: bytes) -> None:
        (folder / "stage-0.pt").write_bytes(data)
        manifest["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    def pickled(folder, manifest) -> None:
        state = torch.load(folder / "stage-0.pt")
        state["units"][0]["when"] = datetime.date(2026, 1, 1)  # any object beyond plain data
        buffer = io.BytesIO()
        torch.save(state, buffer)
        rehash(folder, manifest, buffer.getvalue())

    def bit_flip(folder, manifest) -> None:
        """One bit of a weight flipped: the same size, and a file torch still loads."""
        path = folder / "stage-0.pt"
        data = bytearray(path.read_bytes())
        weight = next(iter(torch.load(path)["units"][0]["state"].values()))
        at = bytes(data).find(weight.numpy().tobytes()[:64])
        assert at > 0
        data[at] ^= 1
        path.write_bytes(bytes(data))
        torch.load(path, weights_only=True)  # still loads: only the hash can tell

    def foreign(folder, manifest) -> None:
        buffer = io.BytesIO()
        torch.save({"units": {7: {}}, "optimizer": None}, buffer)
        rehash(folder, manifest, buffer.getvalue())

    def reshaped(key: str, tensor):
        """The unit 0's ``key`` replaced (or, with None, removed), the hashes made right: a
        checkpoint whose files are whole but whose tensors do not fit the network."""
        def edit(folder, manifest) -> None:
            state = torch.load(folder / "stage-0.pt")
            if tensor is None:
                del state["units"][0]["state"][key]
            else:
                state["units"][0]["state"][key] = tensor
            buffer = io.BytesIO()
            torch.save(state, buffer)
            rehash(folder, manifest, buffer.getvalue())
        return edit

    tamper("another-run", lambda f, m: None)  # a whole checkpoint, of a run elsewhere
    tamper("wider", reshaped("layer.weight", torch.zeros(32, 785)))
    tamper("missing-key", reshaped("layer.bias", None))
    tamper("extra-key", reshaped("zz.extra", torch.zeros(1)))
    tamper("not-a-manifest", lambda f, m: m.clear())
    tamper("old-format", lambda f, m: m.pop("format"))
    tamper("no-files", lambda f, m: m.update(files=[]))
    tamper("escape", lambda f, m: m["files"][0].update(file="../../stage-0.pt"))
    tamper("truncated", lambda f, m: (f / "stage-0.pt").write_bytes(
        (f / "stage-0.pt").read_bytes()[:-100]))
    tamper("bit-flip", bit_flip)
    tamper("pickled", pickled)
    tamper("foreign", foreign)
    return run, ckpts


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """MNIST folders that are wrong in one way each."""
    root = tmp_path_factory.mktemp("bad-data")
    rng = np.random.default_rng(0)

    def mnist(name: str, images: int = 60, labels: int = 60, label_max: int = 10) -> Path:
        raw = root / name / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for split in ("train", "t10k"):
            _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (images, 28, 28)))
            _write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, label_max, (labels,)))
        return raw

    (root / "missing").mkdir()
    mnist("counts", labels=10)
    mnist("labels", label_max=13)
    raw = mnist("garbage")
    (raw / "train-images-idx3-ubyte").unlink()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip at all")
    raw = mnist("empty")
    (raw / "train-labels-idx1-ubyte").write_bytes(b"")
    raw = mnist("truncated")
    data = (raw / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").write_bytes(data[:20000])
    return root


def _tree(folder: Path) -> dict:
    """Every file below ``folder`` (links too) with its size and SHA-256."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(folder))] = ("link", os.readlink(path))
        elif path.is_file():
            data = path.read_bytes()
            out[str(path.relative_to(folder))] = (len(data), hashlib.sha256(data).hexdigest())
        else:
            out[str(path.relative_to(folder))] = "dir"
    return out


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a)[:40] or "existing-run"
                                                   for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, finished, bad_data, args,
                                                         message):
    run, ckpts = finished
    lock = "{lock}" in args
    args = [a for a in args if a != "{lock}"]

    def fill(text: str) -> str:
        for key, root in (("data", bad_data), ("ckpt", ckpts)):
            text = re.sub(r"\{%s:([\w-]+)\}" % key, lambda m: str(root / m.group(1)), text)
        return text.replace("{run}", str(run))

    args = [fill(a) for a in args]
    if lock:  # a live process (this one) holds the run's lock
        (run / "run.lock").write_text(json.dumps({"host": host_id(), "pid": os.getpid(),
                                                  "since": "now"}))
    try:
        before, around = _tree(run.parent), sorted(os.listdir(run.parent.parent))
        ours = _listing(ROOT / "runs")  # the user's own runs may be there already
        save = [] if "--save-dir" in args else ["--save-dir", str(run)]
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            raise SystemExit(main(BASE + args + save))
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2, err
        assert len(err) == 1 and err[0].startswith("localpipe: error:"), err
        assert fill(message) in err[0] and "Traceback" not in err[0], err
        assert _tree(run.parent) == before, "the finished run's folder changed"
        assert sorted(os.listdir(run.parent.parent)) == around, "a new folder appeared"
        assert _listing(ROOT / "runs") == ours, "a run folder appeared under runs/"
    finally:
        if lock:
            (run / "run.lock").unlink()


def _listing(folder: Path) -> list[str] | None:
    return sorted(os.listdir(folder)) if folder.exists() else None


def test_resuming_a_finished_run_says_so_and_writes_nothing(capsys, finished, tmp_path):
    """The same --epochs: nothing to do, exit 0, the folder as it was; --resume auto where
    there is no checkpoint says it starts afresh."""
    run, _ = finished
    before = _tree(run)
    capsys.readouterr()
    assert main(BASE + ["--save-dir", str(run), "--resume", "auto"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("nothing to do: ") and \
        "has trained 1 epoch(s) and --epochs is 1 (a larger --epochs goes on)" in out[0], out
    assert _tree(run) == before
    fresh = tmp_path / "fresh"
    assert main(BASE + ["--save-dir", str(fresh), "--resume", "auto"]) == 0
    assert f"--resume auto: no checkpoint in {fresh}; starting afresh" in \
        capsys.readouterr().out


def test_a_lock_is_taken_over_only_where_its_holder_is_proven_gone(capsys, tmp_path):
    """Another boot of this machine, or a pid since taken by another process: gone, taken
    over with a notice. Another host or container: refused, saying how to take it over."""
    from localpipe.pipeline.control import boot_id, start_time
    here = {"host": host_id(), "boot": boot_id(), "since": "earlier"}
    cases = [
        ({**here, "boot": "an-earlier-boot", "pid": os.getpid()}, [], 0, "which no longer runs"),
        ({**here, "pid": os.getpid(), "start": start_time(os.getpid()) - 1}, [], 0,
         "which no longer runs"),
        ({**here, "pid": os.getpid(), "start": start_time(os.getpid())}, [], 2,
         "is in use by process"),
        ({**here, "host": "another-host/4026531836", "pid": 1}, [], 2,
         "which this machine cannot see (another host, or another container); if that run is "
         "over, take the lock over with --force-unlock"),
        ({**here, "host": "another-host/4026531836", "pid": 1}, ["--force-unlock"], 0,
         "taking over the lock of process 1 on another-host, as --force-unlock says"),
    ]
    for i, (lock, extra, code, said) in enumerate(cases):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        (folder / "run.lock").write_text(json.dumps(lock))
        capsys.readouterr()
        assert main(BASE + ["--save-dir", str(folder), *extra]) == code, lock
        err = capsys.readouterr().err
        assert said in err, (lock, err)
        if code == 2:
            assert os.listdir(folder) == ["run.lock"]
            assert json.loads((folder / "run.lock").read_text()) == lock


def test_a_leftover_world_size_is_one_line(monkeypatch, capsys, tmp_path):
    """WORLD_SIZE left in the environment, without torchrun's other variables."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(BASE + ["--save-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["localpipe: error: WORLD_SIZE=4 is set but RANK, MASTER_ADDR, MASTER_PORT "
                   "are not: start the run with torchrun, or unset WORLD_SIZE for one process"]
    assert not (tmp_path / "run").exists()


def test_an_empty_recipe_name_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(BASE + ["--recipe", ""])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("localpipe: error: --recipe needs a name; "
                                               "--recipe list shows all 98")


@pytest.mark.slow  # starts processes
def test_missing_data_offline_names_the_folder_and_files(tmp_path):
    result = run_cli("--dataset", "MNIST", "--model", "mlp", "--data-root", str(tmp_path),
                     "--no-download", "--save-dir", "")
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1, result.stderr
    assert str(tmp_path) in err[0] and "train-images-idx3-ubyte.gz" in err[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # starts processes
def test_world_size_must_match_stages(tmp_path):
    result = run_cli("--model", "mlp", "--dataset", "synthetic", "--stages", "3",
                     "--save-dir", str(tmp_path), torchrun=2, timeout=120)
    assert result.returncode != 0
    assert "localpipe: error: torchrun started 2 processes but --stages is 3" in result.stderr
    assert not (tmp_path / "args.json").exists(), "it should fail before touching anything"


def test_corrupt_checkpoint_is_refused(tmp_path, capsys):
    args = ["--no-curves", "--model", "mlp", "--num-layers", "2", "--num-hidden", "32", "--dataset",
            "synthetic", "--epochs", "1", "--save-dir", str(tmp_path), "--threads", "1"]
    assert main(args) == 0
    stage_file = next((tmp_path / "checkpoints").glob("*/stage-0.pt"))
    stage_file.write_bytes(stage_file.read_bytes()[:-100])
    capsys.readouterr()
    assert main(args[:-6] + ["--epochs", "2", "--resume", "auto"] + args[-4:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage-0.pt is truncated or corrupt" in err[0]
