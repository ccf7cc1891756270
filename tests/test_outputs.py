"""What a researcher gets from a run: the paper's recipes by name, a folder per run, the records
(per epoch and per logged batch), curves and TensorBoard files, a model to load and evaluate,
and a --help that explains every option. One run of the paper's MNIST MLP recipe serves most
of them."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from localpipe.launch.evaluate import evaluate, load
from localpipe.launch.options import build_parser, parse_config
from localpipe.launch.pipeline import main
from localpipe.launch.recipes import RECIPES
from localpipe.pipeline.data import load_split
from localpipe.stages.config import Config

from conftest import LAUNCH, ROOT, assert_same_model, cli_env, load_model, metrics

SPEC = ROOT.parent / "shared" / "method" / "local-loss-spec.md"


@pytest.fixture(scope="module")
def recipe_run(mnist_root, tmp_path_factory) -> Path:
    """The paper's MNIST MLP predsim recipe (§8.2 row 4) for two epochs, with its curves."""
    save = tmp_path_factory.mktemp("recipe") / "run"
    assert main(["--recipe", "mnist-mlp-predsim", "--epochs", "2", "--log-every", "100",
                 "--data-root", mnist_root, "--save-dir", str(save), "--threads", "2"]) == 0
    return save


def test_the_mlp_recipe_learns_in_two_epochs_and_records_them(recipe_run):
    """Two of the recipe's 100 epochs: under 4 % and 3 % test error (the paper's 0.62 % comes
    after all 100, beyond what a test can run)."""
    records = metrics(recipe_run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["test_error"] < 4.0 and records[1]["test_error"] < 3.0, records
    assert records[0]["train_samples"] == 60000 and records[0]["test_samples"] == 10000
    for key in ("lr", "train_loss_local", "train_loss_global", "train_error", "test_loss",
                "samples_per_s", "peak_memory_bytes"):
        assert records[0][key] is not None and records[0][key] > 0, key
    assert len(records[0]["blocks"]) == 3
    assert all(b["test_error"] < 10 for b in records[1]["blocks"])  # the local heads learn too
    args = json.loads((recipe_run / "args.json").read_text())
    assert (args["recipe"], args["dropout"], args["nonlin"], args["num_layers"]) == \
        ("mnist-mlp-predsim", 0.1, "leakyrelu", 3)
    provenance = json.loads((recipe_run / "provenance.json").read_text())
    assert provenance["torch"] == torch.__version__ and provenance["stages"] == [[0, 1, 2, 3]]
    assert (recipe_run / "model.pt").exists() and not (recipe_run / "run.lock").exists()


def test_a_step_record_every_log_every_batches(recipe_run):
    steps = [json.loads(line) for line in (recipe_run / "steps.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in steps] == list(range(100, 2 * 469 + 1, 100))
    assert all(set(r["loss"]) == {"0", "1", "2", "3"} for r in steps)
    assert steps[0]["epoch"] == 1 and steps[-1]["epoch"] == 2 and steps[0]["lr"] == 5e-4
    assert steps[-1]["loss"]["0"] < steps[0]["loss"]["0"]  # block 0 learns
    assert all(r["samples_per_s"] > 0 for r in steps[1:])


def test_curves_png_shows_every_panel(recipe_run):
    image = Image.open(recipe_run / "curves.png")
    assert image.format == "PNG" and image.size == (1600, 900)
    panels = image.info["Description"]
    for title in ("error of the output layer", "test error of each block's local head",
                  "local loss of each unit", "training samples per second",
                  "where each stage's time went (epoch 2)", "each stage's own memory"):
        assert title in panels, panels


def test_the_bar_panels_legends_hide_no_bar(recipe_run):
    """A stage whose bar fills the panel (busy 100 %, the largest memory) stays visible: the
    legend has a strip of its own above the bars, stage 0 on top."""
    from localpipe.pipeline.curves import run_figure

    fig = run_figure(str(recipe_run))
    fig.draw_without_rendering()
    panels = [ax for ax in fig.axes if ax.get_title().startswith(("where each", "each stage"))]
    assert len(panels) == 2
    for ax in panels:
        legend = ax.get_legend().get_window_extent()
        bars = [bar.get_window_extent() for bar in ax.patches if bar.get_width() > 0]
        assert len(bars) >= 2 and not any(legend.overlaps(bar) for bar in bars), ax.get_title()
        assert ax.get_yticklabels()[0].get_text() == "stage 0"


def test_tensorboard_holds_the_epoch_and_step_scalars(recipe_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(recipe_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"test/error", "train/error", "block_0/test_error", "local_loss/unit_3",
            "samples_per_s", "lr"} <= tags, tags
    test_error = [e.value for e in events.Scalars("test/error")]
    assert test_error == pytest.approx([r["test_error"] for r in metrics(recipe_run)])
    assert len(events.Scalars("local_loss/unit_0")) == 9


def test_evaluate_reproduces_the_last_test_error_block_errors_and_logits(recipe_run, tmp_path):
    torch.set_num_threads(2)  # the run's threads: float sums depend on them
    loaded = load(str(recipe_run))
    assert not loaded.model.training and loaded.cfg.nonlin == "leakyrelu"
    figures, logits = evaluate(loaded)
    last = metrics(recipe_run)[-1]
    assert figures["error"] == last["test_error"] and figures["samples"] == 10000
    assert [b["error"] for b in figures["blocks"]] == [b["test_error"] for b in last["blocks"]]
    images, _ = load_split(loaded.cfg, train=False)
    with torch.no_grad():
        direct = torch.cat([loaded.model(loaded.transform(batch)) for batch in images.split(128)])
    assert torch.equal(direct, logits)
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"),
                             str(recipe_run), "--threads", "2", "--json",
                             str(tmp_path / "e.json")], capture_output=True, text=True,
                            timeout=300, env=cli_env())
    assert result.returncode == 0, result.stderr
    assert f"test error {last['test_error']:.3f}%" in result.stdout
    assert json.loads((tmp_path / "e.json").read_text())["error"] == last["test_error"]


@pytest.mark.slow  # starts processes
def test_runs_started_together_without_save_dir_get_folders_of_their_own(tmp_path):
    args = ["--no-curves", "--model", "mlp", "--num-layers", "2", "--num-hidden", "32",
            "--dataset", "synthetic", "--epochs", "1", "--threads", "1"]
    runs = [subprocess.Popen([sys.executable, str(LAUNCH), *args], cwd=tmp_path, env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(3)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(folders) == 3 and all(f.startswith("synthetic-mlp-predsim-") for f in folders)
    assert os.readlink(tmp_path / "runs" / "latest") in folders
    for folder in folders:
        saved = json.loads((tmp_path / "runs" / folder / "args.json").read_text())
        assert saved["save_dir"] == os.path.join("runs", folder)  # each wrote its own
        assert len(metrics(tmp_path / "runs" / folder)) == 1


def test_a_validation_split_is_held_out_alike_by_every_runner(tmp_path, capsys):
    args = ["--no-curves", "--model", "mlp", "--num-layers", "2", "--num-hidden", "32",
            "--dataset", "synthetic", "--epochs", "2", "--threads", "1", "--val-split", "200"]
    for stages in ("1", "2"):
        assert main(args + ["--stages", stages, "--save-dir", str(tmp_path / stages)]) == 0
    one, two = metrics(tmp_path / "1"), metrics(tmp_path / "2")
    assert [(r["train_samples"], r["val_samples"]) for r in one] == [(1848, 200)] * 2
    assert [r["val_error"] for r in one] == [r["val_error"] for r in two]
    assert all(0 <= r["val_error"] < 90 and "val_error" in r["blocks"][0] for r in one)
    assert torch.equal(torch.load(tmp_path / "1" / "model.pt")["output.linear.weight"],
                       torch.load(tmp_path / "2" / "model.pt")["output.linear.weight"])
    figures, _ = evaluate(load(str(tmp_path / "1")), "val")
    assert figures["error"] == one[-1]["val_error"] and figures["samples"] == 200
    capsys.readouterr()
    assert main(args + ["--val-split", "100", "--save-dir", str(tmp_path / "1"),
                        "--resume", "auto", "--epochs", "3"]) == 2
    assert "was made with --val-split 200, this run has 100" in capsys.readouterr().err


def test_help_gives_every_option_a_help_text_and_a_default():
    text = build_parser().format_help()
    options = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    for action in options:
        flag = action.option_strings[0]
        entry = re.search(rf"\n  {re.escape(flag)}\b.*?(?=\n  -|\n\n|\Z)", text, re.S)
        assert entry, flag
        words = " ".join(entry.group(0).split())
        assert "(default: " in words and len(words.split("(default")[0]) > len(flag) + 8, words
    assert "examples:" in text and "--recipe list" in text
    examples = text.split("examples:")[1].splitlines()
    assert all(len(line) <= 100 for line in examples), examples  # the line breaks kept
    assert any(line.endswith("HOST:29400 \\") for line in examples), examples
    assert parse_config(["--n-holes", "3"]).n_holes == parse_config(["--n_holes", "3"]).n_holes
    assert "(default: off)" in text  # flags, --no-download among them, never "default: True"


# ---------------------------------------------------------------------------- recipes
def _spec_rows() -> list[dict]:
    """The 86 recipes as §8.2 of the method spec states them, read from its table."""
    text = SPEC.read_text()
    table = text[text.index("### 8.2"):text.index('"default" milestones')]
    rows = []
    for line in table.splitlines():
        cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
        if len(cells) != 12 or not cells[0][0].isdigit():
            continue
        _, dataset, model, fm, variants, dropout, lr, epochs, milestones, nonlin, dim, other = \
            cells
        variants = [v.strip() for v in variants.split("/")]
        nonlins = [n.strip() for n in nonlin.split(",")]
        for k, variant in enumerate(variants):
            cutout = variant.endswith("+ cutout")
            loss = variant.replace(" + cutout", "")
            want = {"dataset": dataset, "model": model, "feat_mult": float(fm),
                    "dropout": float(dropout), "lr": float(lr), "epochs": int(epochs),
                    "lr_decay_milestones": [200, 300, 350, 375] if milestones == "default"
                    else [int(m) for m in milestones.split()],
                    "nonlin": {"leaky": "leakyrelu", "relu": "relu"}[nonlins[k]],
                    "backprop": loss == "global", "bio": loss.endswith("-bio"),
                    "loss_sup": "predsim" if loss == "global" else loss.replace("-bio", ""),
                    "cutout": cutout}
            base = loss.replace("-bio", "")
            if m := re.fullmatch(r"pred & predsim: (\d+)", dim):
                if base in ("pred", "predsim"):
                    want["dim_in_decoder"] = int(m.group(1))
            elif dim not in ("–", "-"):
                want["dim_in_decoder"] = int(dim.split()[-1])
            for part in filter(None, (p.strip() for p in re.split(r"[,;]", other))):
                if m := re.fullmatch(r"(?:sim & predsim: )?classes-per-batch (\d+) until "
                                     r"(?:epoch )?(\d+)", part):
                    if base in ("sim", "predsim"):
                        want["classes_per_batch"] = int(m.group(1))
                        want["classes_per_batch_until_epoch"] = int(m.group(2))
                elif part == "bio":
                    want["bio"] = True
                else:
                    key, value = part.rsplit(" ", 1)
                    want[key.replace("-", "_")] = float(value) if "." in value else int(value)
            name = f"{dataset.lower()}-{model}{'' if fm == '1' else '-x' + fm}-" + \
                variant.replace(" + ", "-")
            rows.append({"name": name, "want": want})
    return rows


def _spec_errors() -> dict[str, float]:
    """The test error §8.1 gives for each recipe, keyed like the recipes."""
    text = SPEC.read_text()
    section = text[text.index("### 8.1"):text.index("### 8.2")]
    names = {"MNIST": "mnist", "Fashion-MNIST": "fashionmnist",
             "Kuzushiji-MNIST": "kuzushijimnist", "CIFAR-10": "cifar10", "CIFAR-100": "cifar100",
             "SVHN": "svhn", "STL-10": "stl10"}
    out, dataset = {}, None
    for line in section.splitlines():
        if m := re.match(r"\*\*([\w-]+)\*\* \(", line):
            dataset = names[m.group(1)]
            continue
        cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or cells[0] in ("net", "---") or dataset is None:
            continue
        net, _, *errors = cells
        m = re.fullmatch(r"(\w+)(?: \((\d)x\))?( \+ cutout)?", net)
        model, fm, cutout = m.group(1), m.group(2), bool(m.group(3))
        for variant, error in zip(("global", "pred", "sim", "predsim"), errors):
            if error not in ("–", "-"):
                scale = f"-x{fm}" if fm else ""
                out[f"{dataset}-{model}{scale}-{variant}{'-cutout' if cutout else ''}"] = \
                    float(error)
    return out


def test_every_recipe_of_the_spec_expands_to_its_options(capsys):
    rows = _spec_rows()
    paper = {n for n in RECIPES if "-vit-" not in n}  # localpipe's own ViT recipes apart
    assert len(rows) == 86 and {r["name"] for r in rows} == paper
    defaults = Config()
    for row in rows:
        cfg = parse_config(["--recipe", row["name"]])
        want = {k: getattr(defaults, k) for k in ("dim_in_decoder", "num_layers", "num_hidden",
                                                  "beta", "length", "classes_per_batch",
                                                  "classes_per_batch_until_epoch")}
        want.update(row["want"])
        got = {k: getattr(cfg, k) for k in want}
        assert got == want, row["name"]
    # options given beside a recipe win
    assert parse_config(["--recipe", "mnist-mlp-predsim", "--epochs", "3"]).epochs == 3
    # --recipe list gives each recipe the paper's test error (none for the bio rows)
    errors = _spec_errors()
    assert len(errors) == 82
    assert main(["--recipe", "list"]) == 0
    listed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()
              if line.split() and line.split()[0] in RECIPES}
    assert len(listed) == 98
    for name, error in errors.items():
        assert float(listed[name]) == error, name
    assert all(listed[n] == "-" for n in paper if n not in errors)
    assert all(listed[n] == "localpipe's" for n in RECIPES if n not in paper)


def test_an_unknown_recipe_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(["--recipe", "mnist-resnet-predsim"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == ("localpipe: error: unknown recipe "
                                               "'mnist-resnet-predsim'; --recipe list shows "
                                               "all 98")


@pytest.mark.slow  # starts processes
def test_a_torchrun_restart_writes_where_the_first_attempt_did(tmp_path):
    """No --save-dir: rank 0 names the folder, and after a worker is killed, torchrun's
    restart (--max-restarts with --resume auto) continues in that very folder."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--max-restarts", "1", str(LAUNCH), "--no-curves", "--model", "mlp", "--num-layers",
         "2", "--num-hidden", "32", "--dataset", "synthetic", "--epochs", "2", "--stages", "2",
         "--checkpoint-every", "3", "--resume", "auto"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=cli_env({"LOCALPIPE_INJECT_FAULT": "1:14:kill:2"}))
    assert result.returncode == 0, result.stderr[-3000:]
    folders = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]
    assert len(folders) == 1 and result.stdout.count("resuming from") == 2, result.stdout
    assert [r["epoch"] for r in metrics(folders[0])] == [1, 2]
    assert (folders[0] / "model.pt").exists()


SMALL = ["--no-curves", "--model", "mlp", "--num-layers", "2", "--num-hidden", "32", "--dataset",
         "synthetic", "--threads", "1"]


def test_paths_as_users_type_them(tmp_path, monkeypatch, capsys):
    """A trailing slash (tab completion adds one), ``..`` and ``~`` name the folder they name:
    the run, runs/latest, its args.json and the command that continues it all use one form; a
    real folder at runs/latest is left alone with a notice."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(SMALL + ["--epochs", "1", "--save-dir", "runs/x/"]) == 0
    assert os.readlink("runs/latest") == "x"
    assert json.loads(Path("runs/x/args.json").read_text())["save_dir"] == "runs/x"
    assert main(SMALL + ["--epochs", "2", "--save-dir", "runs/../runs/x//", "--resume",
                         "auto"]) == 0
    assert [r["epoch"] for r in metrics("runs/x")] == [1, 2]
    assert main(SMALL + ["--epochs", "1", "--save-dir", "~/r/"]) == 0
    assert (tmp_path / "home" / "r" / "model.pt").exists()
    os.remove("runs/latest")
    os.mkdir("runs/latest")
    capsys.readouterr()
    assert main(SMALL + ["--epochs", "1", "--save-dir", "runs/y/"]) == 0
    assert "runs/latest is not the link localpipe keeps there" in capsys.readouterr().err
    assert os.path.isdir("runs/latest") and not os.listdir("runs/latest")


def test_going_back_to_an_older_checkpoint_starts_a_branch_and_deletes_nothing(tmp_path,
                                                                               capsys):
    """Resuming an older checkpoint into its own folder: the later checkpoints, model.pt and
    the whole records are kept aside, the new branch's own checkpoints survive its rotation,
    --resume auto continues the new branch, and the branch ends where a straight run ends."""
    args = SMALL + ["--checkpoint-every", "5", "--keep-checkpoints", "2"]
    assert main(args + ["--epochs", "3", "--save-dir", str(tmp_path / "straight")]) == 0
    run = tmp_path / "run"
    args.remove("--no-curves")  # the curves and TensorBoard files of a branch
    assert main(args + ["--epochs", "2", "--save-dir", str(run)]) == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert before == ["step-000000030", "step-000000032"]  # 16 batches an epoch
    capsys.readouterr()
    assert main(args + ["--epochs", "3", "--save-dir", str(run), "--resume",
                        str(run / "checkpoints" / "step-000000030")]) == 0
    said = capsys.readouterr().err
    aside = next((run / "abandoned").iterdir())
    assert "a new branch of this run" in said and str(aside) in said
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-000000032"]
    assert (aside / "model.pt").exists() and len(metrics(aside)) == 2
    assert (aside / "curves.png").exists() and board_epochs(aside) == [1, 2]
    assert board_epochs(run) == [1, 2, 3]  # written afresh from the branch's records
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["step-000000045", "step-000000048"]  # the branch's own, kept by the rotation
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]
    assert_same_model(load_model(tmp_path / "straight"), load_model(run))
    assert main(args + ["--epochs", "4", "--save-dir", str(run), "--resume", "auto"]) == 0
    assert "resuming from " + str(run / "checkpoints" / "step-000000048") in \
        capsys.readouterr().out


def test_a_continued_finished_run_leaves_no_stale_model_pt(tmp_path, monkeypatch, capsys):
    """A finished run continued for more epochs and stopped by a failure: its old model.pt
    is kept under its epoch's name, so loading the folder gives the newest checkpoint, never
    the weights of the run's first finish."""
    run = tmp_path / "run"
    assert main(SMALL + ["--epochs", "1", "--save-dir", str(run)]) == 0
    first = load_model(run)
    monkeypatch.setenv("LOCALPIPE_INJECT_FAULT", "0:20")  # a failure in epoch 2 (16 a epoch)
    assert main(SMALL + ["--epochs", "3", "--checkpoint-every", "2", "--save-dir", str(run),
                         "--resume", "auto"]) == 1
    assert "its model.pt (after epoch 1) is now" in capsys.readouterr().err
    assert not (run / "model.pt").exists()
    assert_same_model(first, torch.load(run / "model-epoch1.pt", weights_only=True))
    loaded = load(str(run))
    newest = max((run / "checkpoints").iterdir(), key=lambda p: p.name)
    assert newest.name == "step-000000018" and loaded.cfg.epochs == 3
    assert not all(torch.equal(a, b) for a, b in zip(first.values(),
                                                      loaded.model.state_dict().values()))


def board_epochs(folder) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars("test/error")]


def test_the_sidecar_draws_a_resumed_runs_curves_at_once(recipe_run, tmp_path):
    """A resumed run (a new branch above all) shows its records' curves from its start, not
    the curves.png it had, or none, until its next epoch ends."""
    shutil.copy(recipe_run / "metrics.jsonl", tmp_path)
    sidecar = subprocess.Popen([sys.executable, "-m", "localpipe.pipeline.sidecar",
                                str(tmp_path)], stdin=subprocess.PIPE, env=cli_env())
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "curves.png").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "curves.png").exists()  # before any command
    finally:
        sidecar.stdin.close()
        assert sidecar.wait(timeout=60) == 0


def test_curves_of_one_epoch_and_of_many_decades_read_plainly(recipe_run, tmp_path):
    """One epoch: a tick at 1 (not 0.945-1.05) and every legend entry with a visible point;
    errors over two decades: only 1, 2 and 5 of each decade labelled, never a crowd."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from localpipe.pipeline.curves import run_figure

    first = metrics(recipe_run)[0]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(first) + "\n")
    fig = run_figure(str(tmp_path))
    FigureCanvasAgg(fig).draw()
    error, heads = fig.axes[:2]
    low, high = error.get_xlim()
    assert [t.get_text() for t, at in zip(error.get_xticklabels(), error.get_xticks())
            if low <= at <= high] == ["1"]
    for ax in (error, heads):
        assert all(line.get_marker() not in ("None", "", None) for line in ax.get_lines())
    assert "no batch logged yet" in " ".join(t.get_text() for t in fig.axes[2].texts)

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for epoch in range(1, 11):
            f.write(json.dumps({**first, "epoch": epoch, "train_error": 90 / epoch ** 2.3,
                                "test_error": 92 / epoch ** 2}) + "\n")
    fig = run_figure(str(tmp_path))
    FigureCanvasAgg(fig).draw()
    low, high = fig.axes[0].get_ylim()
    labels = [t.get_text() for minor in (False, True)
              for t, at in zip(fig.axes[0].get_yticklabels(minor=minor),
                               fig.axes[0].get_yticks(minor=minor))
              if t.get_text() and low <= at <= high]
    assert {"0.5", "1", "2", "5", "10", "20", "50"} <= set(labels), labels
    assert not {"3", "4", "6", "30", "40"} & set(labels), labels


def test_without_a_terminal_progress_is_a_plain_line_now_and_then(capsys, monkeypatch):
    """A batch job's log gets the bar's news as lines on stdout (every 30 s in a run), so a
    long first epoch is never silent; the feeds of other replicas say nothing."""
    from localpipe.pipeline import console

    progress = console.Progress(False, 3, 6, every=0.0)
    progress.epoch(2)
    for _ in range(2):
        progress.advance()
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("epoch 2/3: 2/6 batches of the run, ")
    assert lines[1].endswith(" left")
    quiet = console.Progress(False, 3, 6, lines=False, every=0.0)
    quiet.advance()
    shown = console.Progress(True, 3, 6, every=0.0)  # the bar says it, on stderr
    shown.advance()
    shown.close()
    assert capsys.readouterr().out == ""


def test_an_epochs_summary_says_what_on_nan_skip_left_out(recipe_run):
    """Skipped updates are named in the epoch's lines; a figure without a value is n/a, not
    'n/a%'."""
    from localpipe.pipeline.metrics import summary

    record = {**metrics(recipe_run)[0], "nonfinite_batches": 3, "test_error": None}
    lines = summary(record, backprop=False).splitlines()
    assert lines[1] == ("  skipped 3 update(s) of a unit on a NaN or infinite loss "
                        "(--on-nan skip); the averages leave them out")
    assert any(line.startswith("Test ") and line.endswith("error=n/a") for line in lines)
