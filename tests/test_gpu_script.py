"""benchmarks/gpu.py, the checks a lent GPU runs in its few minutes, kept runnable without
one: every command it plans parses, and the checks that need no GPU run here whole, with the
coverage report the GPU run hands back."""
import json
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, cli_env
from localpipe.benchmarks import gpu
from localpipe.launch.options import parse_config


def test_every_command_the_gpu_checks_plan_is_one_the_scripts_take(capsys):
    """A renamed option would cost a GPU session its check: each planned pipeline command
    parses into a valid Config, and each benchmark command's options are in its --help."""
    assert gpu.main(["--plan", "--checks", "validate,measure,paper"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) >= 30
    helps = {}
    for argv in commands:
        script = next(a for a in argv if a.endswith(".py") or a == "pytest")
        args = argv[argv.index(script) + 1:]
        if script.endswith("pipeline.py"):
            assert parse_config(args) is not None, argv
        elif script.endswith("gpu.py"):
            assert args[0] == "--sanitized" and parse_config(args[1:]) is not None
        elif script != "pytest":
            if script not in helps:
                helps[script] = subprocess.run([sys.executable, script, "--help"], env=cli_env(),
                                               capture_output=True, text=True).stdout
            flags = [a for a in args if a.startswith("--")]
            assert all(f in helps[script] for f in flags), (script, flags)
    assert {"2", "4"} <= {a[a.index("--nproc-per-node") + 1] for a in commands
                          if "--nproc-per-node" in a}


def test_an_unknown_check_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        gpu.main(["--checks", "validate,nonsense"])
    assert stop.value.code == 2 and "no check nonsense" in capsys.readouterr().err


@pytest.mark.slow
def test_the_checks_that_need_no_gpu_run_and_report_with_coverage(mnist_root, tmp_path):
    """On the CPU the environment and the resume check run for real (a checkpoint carried
    across three launches), the sanitizer says it needs a GPU, and the coverage of the
    children comes back as a report and the list of CUDA lines that never ran."""
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device",
                           "cpu", "--checks", "env,sanitizer,resume", "--data", mnist_root,
                           "--out", str(out), "--work", str(work), "--budget", "240"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r["check"]: r for r in map(json.loads, open(out / "checks.jsonl"))}
    assert rows["env"]["ok"] and len(rows["env"]["mnist"]) == 4
    assert rows["env"]["gpus"] == torch.cuda.device_count()
    assert len(rows["env"]["commit"]) in (0, 40)
    assert rows["sanitizer"]["ok"] is None and "needs a GPU" in rows["sanitizer"]["why"]
    assert rows["resume"]["ok"] and len(rows["resume"]["test_errors"]) == 3
    assert sorted(p.name for p in out.iterdir()) == [
        "checks.jsonl", "coverage.txt", "cuda-lines.txt", "logs.tar.gz", "summary.md"]
    report = (out / "coverage.txt").read_text()
    assert "pipeline/worker.py" in report and "gpu.py" not in report
    header = (out / "cuda-lines.txt").read_text().splitlines()[0]
    ran, missed = map(int, re.findall(r"(\d+) ", header))
    assert ran > 0 and missed > 0  # the CPU runs pass CUDA's branches by
    assert "| resume | True |" in (out / "summary.md").read_text()
