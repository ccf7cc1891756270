"""The companion commands held to the trainer's standard: every bad input to
``localpipe-evaluate`` and ``localpipe-plot`` is one line and exit code 2 (a file that cannot
be written, 1), never a traceback, and leaves the run's folder as it was."""
import json
import shutil

import pytest
import torch

from localpipe.launch import evaluate, plot
from localpipe.launch.pipeline import main

from test_cli import _tree

BASE = ["--no-curves", "--model", "mlp", "--num-layers", "2", "--num-hidden", "32", "--dataset",
        "synthetic", "--epochs", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("companions") / "run"
    assert main(BASE + ["--save-dir", str(folder)]) == 0
    return folder


def _tampered(run, tmp_path, how: str):
    copy = tmp_path / how
    shutil.copytree(run, copy)
    model = copy / "model.pt"
    if how == "missing":
        shutil.rmtree(copy)
    elif how == "truncated":
        model.write_bytes(model.read_bytes()[:1000])
    elif how == "foreign":
        torch.save({"weight": torch.zeros(3)}, model)
    elif how == "wider":
        args = json.loads((copy / "args.json").read_text())
        (copy / "args.json").write_text(json.dumps({**args, "num_hidden": 64}))
    elif how == "cut-line":
        with open(copy / "metrics.jsonl", "a") as f:
            f.write('{"epoch": 3, "tes')
    elif how == "no-keys":
        (copy / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return copy


EVALUATE = [
    ("missing", [], "cannot evaluate {run}: no such folder (a run folder or a checkpoint "
                    "folder)"),
    ("truncated", [], "cannot evaluate {run}: {run}/model.pt is truncated or not a model "
                      "file of localpipe's"),
    ("foreign", [], "cannot evaluate {run}: the weights in {run} do not fit the mlp its "
                    "options describe: Missing key(s)"),
    ("wider", [], "cannot evaluate {run}: the weights in {run} do not fit the mlp its options "
                  "describe: size mismatch for blocks.0.layer.weight"),
    (None, ["--device", "foo"], "argument --device: invalid choice: 'foo'"),
    (None, ["--threads", "-1"], "--threads must not be negative, got -1"),
    *([(None, ["--device", "cuda"], "--device cuda was asked for but no CUDA device")]
      if not torch.cuda.is_available() else []),
]


@pytest.mark.parametrize("how,args,message", EVALUATE,
                         ids=[f"{h}-{' '.join(a)}" for h, a, _ in EVALUATE])
def test_evaluate_refuses_bad_input_in_one_line(run, tmp_path, capsys, how, args, message):
    folder = _tampered(run, tmp_path, how) if how else run
    before = _tree(folder)
    capsys.readouterr()
    try:
        code = evaluate.main([str(folder), *args])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("localpipe: error: "), err
    assert message.replace("{run}", str(folder)) in err[0] and "Traceback" not in err[0], err
    assert _tree(folder) == before


def test_evaluate_names_a_file_it_cannot_write(run, capsys):
    capsys.readouterr()
    assert evaluate.main([str(run), "--json", "/proc/localpipe-evaluation.json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"localpipe: error: cannot write /proc/localpipe-evaluation.json: "
                   f"{err[0].rsplit(': ', 1)[-1]}"] and len(err) == 1


PLOT = [
    ("cut-line", [], None),  # a line a killed writer cut short is skipped, as the trainer does
    ("no-keys", [], "lack a figure the plot needs"),
    (None, ["-o", "{tmp}"], "a plot is a PNG file; name one ending in .png"),
    (None, ["-o", "{tmp}/x.pdf"], "a plot is a PNG file; name one ending in .png"),
]


@pytest.mark.parametrize("how,args,message", PLOT, ids=[f"{h}-{' '.join(a)}"
                                                        for h, a, _ in PLOT])
def test_plot_takes_cut_records_and_refuses_bad_input(run, tmp_path, capsys, how, args,
                                                       message):
    folder = _tampered(run, tmp_path, how) if how else run
    out = tmp_path / "out"
    out.mkdir()
    args = [a.replace("{tmp}", str(out)) for a in args]
    capsys.readouterr()
    code = plot.main([str(folder), *args] if args else [str(folder), "-o", str(out / "c.png")])
    err = capsys.readouterr().err.strip().splitlines()
    if message is None:
        assert code == 0 and (out / "c.png").read_bytes()[:4] == b"\x89PNG" and not err
        return
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert list(out.iterdir()) == []


BENCHMARK = [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--stages", "0"], "--stages must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--model", "foo"], "unknown model 'foo'"),
    (["--model", "vgg8"], "--model vgg8 shrinks MNIST's 28×28 inputs to nothing"),
    (["--batch-size", "1"], "--batch-size 1 leaves batch norm 1 sample a batch"),
    (["--microbatches", "0"], "--microbatches 0: each must lie in 1..128"),
    (["--microbatches", "256"], "--microbatches 256: each must lie in 1..128"),
    *([(["--device", "cuda"], "--device cuda was asked for but no CUDA device")]
      if not torch.cuda.is_available() else []),
]


@pytest.mark.parametrize("args,message", BENCHMARK, ids=[" ".join(a) for a, _ in BENCHMARK])
def test_the_benchmark_refuses_bad_input_in_one_line(tmp_path, capsys, args, message):
    from localpipe.benchmarks.run import main as benchmark
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        benchmark(args + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
