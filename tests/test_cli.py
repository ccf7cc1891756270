"""The command line: the paper's parameter counts, and bad input as one line with exit code 2."""
import pytest

from launch.pipeline import main

from conftest import run_cli

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
    assert lines[-1] == f"backprop parameters: {count}"


def test_describe_shows_the_stages_and_their_costs(capsys):
    assert main(["--model", "mlp", "--num-layers", "3", "--dataset", "MNIST", "--stages", "2",
                 "--describe", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "stage 0: units 0-" in out and "stage 1: units" in out and "measured step" in out


BAD = [
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--dataset", "ImageNet"], "unknown dataset 'ImageNet'"),
    (["--beta", "2"], "--beta must lie in [0, 1]"),
    (["--feat-mult", "0"], "--feat-mult must be positive"),
    (["--stages", "0"], "--stages must be positive"),
    (["--batch-size", "-1"], "--batch-size must be positive"),
    (["--dropout", "1"], "--dropout must lie in [0, 1)"),
    (["--model", "mlp", "--stages", "9", "--dataset", "synthetic"],
     "--stages 9 is more than the 2 units"),
    (["--model", "mlp", "--stages", "2", "--balance", "1,2", "--dataset", "synthetic"],
     "--balance 1,2 sums to 3 but the network has 2 units"),
    (["--stages", "2", "--balance", "1"], "--balance has 1 entries but --stages is 2"),
    (["--backprop", "--stages", "2"], "cannot be pipelined"),
    (["--no-detach", "--stages", "2"], "--no-detach sends gradients between blocks"),
    (["--optim", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--lr", "abc"], "invalid float value: 'abc'"),
    (["--lr", "0"], "--lr must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--queue-depth", "0"], "--queue-depth must be positive"),
    (["--num-layers", "-1"], "--num-layers must not be negative"),
    (["--limit-train", "-5"], "--limit-train must not be negative"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must not be negative"),
    (["--balance", "2,x"], "expected integers like 2,3,2"),
    (["--stages", "2", "--balance", "2,0"], "--balance entries must be positive"),
    (["--bio", "--backprop"], "--bio has no meaning with --backprop"),
    (["--model", "mlp", "--dataset", "synthetic", "--save-dir", "/proc/localpipe-run"],
     "cannot write to --save-dir /proc/localpipe-run"),
    (["--model", "mlp", "--dataset", "synthetic", "--resume", "/nonexistent/run"],
     "cannot resume: --resume /nonexistent/run: no complete checkpoint there"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_and_exit_code_2(capsys, args, message):
    save = [] if "--save-dir" in args else ["--save-dir", ""]
    with pytest.raises(SystemExit) as exit_info:
        code = main(args + save + ["--max-steps", "1"])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("localpipe: error:") and message in err[0], err


def test_missing_data_offline_names_the_folder_and_files(tmp_path):
    result = run_cli("--dataset", "MNIST", "--model", "mlp", "--data-root", str(tmp_path),
                     "--no-download", "--save-dir", "")
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1, result.stderr
    assert str(tmp_path) in err[0] and "train-images-idx3-ubyte.gz" in err[0]
    assert "Traceback" not in result.stderr


def test_world_size_must_match_stages(tmp_path):
    result = run_cli("--model", "mlp", "--dataset", "synthetic", "--stages", "3",
                     "--save-dir", str(tmp_path), torchrun=2, timeout=120)
    assert result.returncode != 0
    assert "localpipe: error: torchrun started 2 processes but --stages is 3" in result.stderr
    assert not (tmp_path / "args.json").exists(), "it should fail before touching anything"


def test_corrupt_checkpoint_is_refused(tmp_path, capsys):
    args = ["--model", "mlp", "--num-layers", "2", "--num-hidden", "32", "--dataset",
            "synthetic", "--epochs", "1", "--save-dir", str(tmp_path), "--threads", "1"]
    assert main(args) == 0
    stage_file = next((tmp_path / "checkpoints").glob("*/stage-0.pt"))
    stage_file.write_bytes(stage_file.read_bytes()[:-100])
    capsys.readouterr()
    assert main(args[:-6] + ["--epochs", "2", "--resume", "auto"] + args[-4:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage-0.pt is truncated or corrupt" in err[0]
