"""The GPU checks of issue 22 ("On the GPU") as one command, for a lent GPU's few minutes.

    mkdir -p .gpu/data/MNIST && cp -r ../shared/data/MNIST/raw .gpu/data/MNIST/   # here, once
    PYTHONPATH=. python3 benchmarks/gpu.py --out $OUT --commit SHA       # on the GPU: validate
    python benchmarks/gpu.py --out $OUT --data .gpu/data --checks measure
    python benchmarks/gpu.py --out $OUT --data .gpu/data --checks paper  # the MLP recipe, whole
    python benchmarks/gpu.py --plan                                      # the commands, run none

Why one script: a GPU is lent for about 15 minutes, its start included, one command may run
for at most 10, and 8 files come back. So every run is planned here and none is typed there.
Each check runs its commands as child processes under its own time limit (a hang costs that
check, not the others), in order of value, and skips itself when the budget left cannot hold
it; each leaves one JSON line in ``checks.jsonl`` (ok, seconds, its figures) and a row in
``summary.md``. Every Python child runs under coverage (a ``sitecustomize`` on PYTHONPATH
starts it, so torchrun's ranks and pytest's workers are measured too), and ``cuda-lines.txt``
names each line of the project that mentions CUDA and never ran: the coverage report of the
GPU runs. The logs of every command travel back in ``logs.tar.gz``.

The groups (``--checks``, or single checks by name):
- validate: the environment; 1, 2 and 4 stages on streams of one GPU, ``torch.equal`` under
  ``--deterministic`` (the largest difference without it) for the MLP, vgg8b and ViT; the
  stage threads under PyTorch's CUDA stream sanitizer, entered in every thread; torchrun ranks
  sharing the GPU against the same stages as threads; a CPU checkpoint resumed on the GPU and
  back; the test suite with the GPU visible (a skipped test is a failure here, but for the
  two that need a git checkout), without coverage.
- measure (without coverage, which slows the host): one step's kernels, device time and
  wall time (``step.py --device cuda``); one MNIST epoch of the MLP recipe on 1 and 4 stages;
  every family's benchmark at 4 stages against backprop (``run.py --device cuda``; GPipe/1F1B
  need a GPU per stage there).
- paper: the MNIST MLP predsim recipe at full length (100 epochs), with its curves.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from localpipe.pipeline.runs import git_state

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "pipeline.py"
SOURCES = ("stages", "pipeline", "launch", "benchmarks", "localpipe")
CUDA_WORDS = re.compile(r"cuda|nccl|Stream\b|pin_memory|pinned|non_blocking|synchronize|"
                        r"record_stream|wait_stream|wait_event")
SMALL = ["--epochs", "1", "--limit-train", "2048", "--limit-test", "512", "--no-curves",
         "--threads", "1"]  # one thread a stage: on the CPU too, K stages equal one
UNCOVERED = {"COVERAGE_PROCESS_START": ""}  # for children timed or long: coverage slows them
MODELS = {  # the three families a stage can hold, as the streams check trains them
    "mlp": ["--recipe", "mnist-mlp-predsim"],
    "vgg8b": ["--recipe", "mnist-vgg8b-predsim", "--feat-mult", "0.25"],
    "vit": ["--recipe", "mnist-vit-predsim"],
}


def exact(model: str, stages: int) -> list[str]:
    """The streams check's run of ``model`` on ``stages`` stages under --deterministic."""
    return [*MODELS[model], *SMALL, "--stages", str(stages), "--deterministic"]


class Failed(Exception):
    """A check's finding that fails it, with the figures gathered so far."""

    def __init__(self, why: str, figures: dict | None = None) -> None:
        super().__init__(why)
        self.figures = figures or {}


class Skipped(Exception):
    """A check that cannot run here (ok: null in its row)."""


@dataclass
class Lab:
    """Where a session's checks run: folders, the device, the time left and the children's
    environment (coverage, this checkout first)."""
    out: Path
    work: Path
    data: Path
    device: str
    deadline: float
    commit: str = ""
    env: dict = field(default_factory=dict)
    plan_only: bool = False
    planned: list[list[str]] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, argv: list[str], limit: float, env: dict | None = None
            ) -> subprocess.CompletedProcess:
        """One child, its output in ``logs/<name>.log``. At ``limit`` seconds or the budget's
        end, whichever is first, it gets a SIGINT (a training run checkpoints and stops,
        pytest prints what it ran) and, 30 s later, its process group is killed."""
        self.planned.append(argv)
        if self.plan_only:
            return subprocess.CompletedProcess(argv, 0, "", "")
        if self.left() < 1:
            raise Failed(f"the budget was spent before {name}")
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        limit = min(limit, self.left())
        with open(log, "w") as f:
            f.write("$ " + " ".join(argv) + "\n")
            f.flush()
            child = subprocess.Popen(argv, cwd=ROOT, env={**self.env, **(env or {})}, stdout=f,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            try:
                child.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
                f.write(f"\n[benchmarks/gpu.py: interrupted after {limit:.0f} s]\n")
        return subprocess.CompletedProcess(argv, child.returncode, log.read_text(), "")

    def launch(self, name: str, args: list[str], limit: float = 120, torchrun: int = 0,
               env: dict | None = None, ok: bool = True) -> Path:
        """launch/pipeline.py with ``args`` into ``runs/<name>``; its folder. A failure
        (unless ``ok`` is False) fails the check, naming the run's last line."""
        save = self.work / "runs" / name
        shutil.rmtree(save, ignore_errors=True)
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(torchrun)] if torchrun else [sys.executable]
        done = self.run(name, [*head, str(LAUNCH), *self.placed(args, save)], limit, env)
        if ok and done.returncode != 0:
            last = done.stdout.strip().splitlines()[-1:] or ["(no output)"]
            raise Failed(f"{name} exited with {done.returncode}: {last[0]}")
        return save

    def placed(self, args: list[str], save: Path, device: str = "") -> list[str]:
        """launch/pipeline.py's ``args`` with this lab's data, a device (this lab's unless
        named) and the run folder ``save``."""
        return [*args, "--data-root", str(self.data), "--device", device or self.device,
                "--save-dir", str(save)]

    def difference(self, a: Path, b: Path) -> float:
        """The largest absolute difference of two runs' tensors (0.0: every one equal)."""
        if self.plan_only:
            return 0.0
        import torch
        x, y = (torch.load(s / "model.pt", map_location="cpu") for s in (a, b))
        if x.keys() != y.keys():
            raise Failed(f"{a.name} and {b.name} hold different tensors")
        return max((0.0 if torch.equal(x[k], y[k]) else
                    (x[k].double() - y[k].double()).abs().max().item()) for k in x)

    def output(self, name: str) -> str:
        """What the command ``name`` printed (nothing when only planning)."""
        return "" if self.plan_only else (self.work / "logs" / f"{name}.log").read_text()

    def records(self, save: Path) -> list[dict]:
        """A run's metrics.jsonl, a record per epoch (none when only planning)."""
        if self.plan_only:
            return [{}]
        return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


# --- the checks: each takes the lab and returns its figures, or raises Failed ---------------

def check_env(lab: Lab) -> dict:
    """What the machine is: torch, the GPU (through torch and through NVML), the data."""
    import torch
    import torchvision
    figures = {"commit": lab.commit, "python": sys.version.split()[0], "torch": torch.__version__,
               "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
               "cpus": os.cpu_count(), "gpus": torch.cuda.device_count(),
               "mnist": sorted(p.name for p in (lab.data / "MNIST" / "raw").glob("*"))}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                       gpu_memory_gib=round(props.total_memory / 2**30, 1))
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            figures.update(nvml_name=pynvml.nvmlDeviceGetName(handle),
                           driver=pynvml.nvmlSystemGetDriverVersion(),
                           compute_mode=pynvml.nvmlDeviceGetComputeMode(handle))
        except Exception as e:  # NVML's own failure is a finding, not the end of the check
            figures["nvml"] = f"{type(e).__name__}: {e}"
    elif lab.device == "cuda":
        raise Failed("torch sees no GPU")
    if len(figures["mnist"]) < 4:
        raise Failed(f"MNIST's four files are not in {lab.data / 'MNIST' / 'raw'}")
    return figures


def check_streams(lab: Lab) -> dict:
    """K stages as threads on streams of one GPU give the sequential loop's model bit for bit
    under --deterministic; without it, the largest difference is reported."""
    figures, unequal = {}, []
    for model, args in MODELS.items():
        base = lab.launch(f"{model}-s1-det", exact(model, 1))
        for k in (2, 4):
            run = lab.launch(f"{model}-s{k}-det", exact(model, k))
            figures[f"{model}_s{k}_det_diff"] = diff = lab.difference(base, run)
            if diff:
                unequal.append(f"{model} --stages {k}")
        free = lab.launch(f"{model}-s4", [*args, *SMALL, "--stages", "4"])
        figures[f"{model}_s4_diff"] = lab.difference(base, free)
        figures[f"{model}_test_error"] = lab.records(base)[-1].get("test_error")
    tf32 = lab.launch("mlp-s4-tf32", [*MODELS["mlp"], *SMALL, "--stages", "4", "--tf32"])
    figures["mlp_s4_tf32_diff"] = lab.difference(lab.work / "runs" / "mlp-s1-det", tf32)
    if unequal:
        raise Failed("not equal to --stages 1 under --deterministic: " + ", ".join(unequal),
                     figures)
    return figures


def check_sanitizer(lab: Lab) -> dict:
    """The stage, link and feed threads under PyTorch's CUDA stream sanitizer. Its dispatch
    mode is per thread (TORCH_CUDA_SANITIZER=1 covers the main thread alone), so the child
    (this file with --sanitized) enters it in every thread it starts."""
    if lab.device != "cuda":
        raise Skipped("the sanitizer needs a GPU")
    args = lab.placed([*MODELS["mlp"], "--epochs", "1", "--limit-train", "1024", "--limit-test",
                       "256", "--no-curves", "--stages", "4"], lab.work / "runs" / "sanitized")
    done = lab.run("sanitizer", [sys.executable, str(Path(__file__)), "--sanitized", *args],
                   limit=150)
    races = done.stdout.count("CSAN detected a possible data race")
    if done.returncode != 0 or races:
        raise Failed(f"exit {done.returncode}, {races} race(s) reported (logs/sanitizer.log)")
    return {"races": 0}


def check_torchrun(lab: Lab) -> dict:
    """Ranks sharing the one GPU (tensors through pinned host memory over gloo) train the
    model the same stages as threads train."""
    figures = {}
    for k in (2, 4):
        threads = lab.work / "runs" / f"mlp-s{k}-det"
        if not (threads / "model.pt").exists():
            threads = lab.launch(f"mlp-s{k}-det", exact("mlp", k))
        ranks = lab.launch(f"mlp-ranks{k}", exact("mlp", k), torchrun=k, limit=150)
        figures[f"ranks{k}_diff"] = lab.difference(threads, ranks)
        figures[f"ranks{k}_shared_notice"] = "take turns" in lab.output(f"mlp-ranks{k}")
    if any(v for key, v in figures.items() if key.endswith("_diff")):
        raise Failed("ranks differ from threads", figures)
    return figures


def check_resume(lab: Lab) -> dict:
    """A checkpoint written on the CPU continues on the GPU, and the GPU's on the CPU."""
    args = [*MODELS["mlp"], "--limit-train", "1024", "--limit-test", "256", "--no-curves",
            "--stages", "2"]
    first = lab.work / "runs" / "resume"
    shutil.rmtree(first, ignore_errors=True)
    steps = [("cpu", 1), (lab.device, 2), ("cpu", 3)]
    for i, (device, epochs) in enumerate(steps):
        more = ["--resume", str(first)] if i else []
        argv = lab.placed([*args, "--epochs", str(epochs), *more], first, device)
        done = lab.run(f"resume-{i}-{device}", [sys.executable, str(LAUNCH), *argv], limit=90)
        if done.returncode != 0:
            raise Failed(f"resume step {i} on {device} exited with {done.returncode}")
    if lab.plan_only:
        return {}
    records = lab.records(first)
    errors = [r["test_error"] for r in records]
    if [r["epoch"] for r in records] != [1, 2, 3] or not all(map(math.isfinite, errors)):
        raise Failed(f"epochs {[r['epoch'] for r in records]}, test errors {errors}")
    return {"test_errors": errors}


def check_suite(lab: Lab) -> dict:
    """The whole suite with the GPU visible and the data present, its workers in parallel
    (a module's shared runs stay in one worker), without coverage, which doubles its time.
    A skip is a failure, but for the two tests that need a git checkout (the lent machine
    receives files, not the repository)."""
    workers = str(max(2, min(8, (os.cpu_count() or 2) // 2)))
    done = lab.run("suite", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-n", workers, "--dist", "loadscope", "--timeout", "300", "-rfEs",
                             "tests"], limit=max(60.0, lab.left() - 60),
                   env={**UNCOVERED, "CI": "true", "LOCALPIPE_TEST_MNIST": str(lab.data / "MNIST")})
    if lab.plan_only:
        return {}
    summary = [line for line in done.stdout.splitlines()
               if re.search(r"\d+ (passed|failed)", line)][-1:] or [""]
    counts = {word: int(n) for n, word in
              re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary[0])}
    failures = re.findall(r"^(?:FAILED|ERROR) .*$", done.stdout, re.M)
    skips = [line for line in re.findall(r"^SKIPPED .*$", done.stdout, re.M)
             if "not a git checkout" not in line]
    if done.returncode != 0 or skips:
        raise Failed("; ".join((failures + skips)[:12]) or f"pytest exited {done.returncode}",
                     counts)
    return counts


def check_step(lab: Lab) -> dict:
    """One training step's kernels, device time and wall time (benchmarks/step.py)."""
    figures = {}
    for name, args in {"mlp": [], "vgg8b": ["--model", "vgg8b", "--dim-in-decoder", "1024"]
                       }.items():
        out = lab.work / "results" / f"step-{name}-{lab.device}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        done = lab.run(f"step-{name}", [sys.executable, str(ROOT / "benchmarks" / "step.py"),
                                        *args, "--device", lab.device, "--json", str(out)],
                       limit=120, env=UNCOVERED)
        if done.returncode != 0:
            raise Failed(f"step.py {name} exited with {done.returncode}")
        if not lab.plan_only:
            result = json.loads(out.read_text())
            figures[name] = {k: result[k] for k in ("ops", "host_reads", "localpipe_ms",
                                                    "samples_per_s", "profile") if k in result}
    return figures


def check_bench(lab: Lab) -> dict:
    """Every family's benchmark at 4 stages (benchmarks/run.py): backprop and the local modes.
    GPipe/1F1B and the one-process-a-stage modes need a GPU per stage there, so one GPU does
    not run them."""
    runs = {"mlp": ["--model", "mlp", "--num-layers", "3", "--feat-mult", "1"],
            "vgg8b": ["--model", "vgg8b", "--feat-mult", "1"],
            "resnet18": ["--model", "resnet18", "--dataset", "CIFAR10", "--feat-mult", "1"],
            "vit-tiny": ["--model", "vit-tiny", "--dataset", "CIFAR10"]}
    figures = {}
    for name, args in runs.items():
        done = lab.run(f"bench-{name}", [
            sys.executable, str(ROOT / "benchmarks" / "run.py"), *args, "--stages", "4",
            "--device", lab.device, "--out", str(lab.work / "results")], limit=150,
            env=UNCOVERED)
        figures[name] = "ok" if done.returncode == 0 else done.returncode
    if any(v != "ok" for v in figures.values()):
        raise Failed("a benchmark failed", figures)
    return figures


def check_epoch(lab: Lab) -> dict:
    """One whole MNIST epoch of the MLP recipe, the paper's loop and 4 stages on streams."""
    figures = {}
    for k in (1, 4):
        start = time.monotonic()
        save = lab.launch(f"epoch-s{k}", [*MODELS["mlp"], "--epochs", "1", "--stages", str(k),
                                          "--no-curves"], limit=150, env=UNCOVERED)
        record = lab.records(save)[-1]
        figures[f"s{k}"] = {key: record.get(key) for key in
                            ("samples_per_s", "test_error", "peak_memory_bytes")}
        figures[f"s{k}"]["command_s"] = round(time.monotonic() - start, 1)
    return figures


def check_paper(lab: Lab) -> dict:
    """The MNIST MLP predsim recipe at full length (paper: 0.62 % test error), with curves.
    A run the budget cuts short still reports how far it got."""
    start = time.monotonic()
    save = lab.launch("paper-mlp", [*MODELS["mlp"], "--stages", "4"], ok=False,
                      limit=lab.left() - 20, env=UNCOVERED)
    if lab.plan_only:
        return {}
    records = lab.records(save)
    for png in save.glob("*.png"):
        shutil.copy(png, lab.out / f"paper-mlp-{png.name}")
    figures = {"epochs": len(records), "test_error": records[-1]["test_error"],
               "best_test_error": min(r["test_error"] for r in records),
               "command_s": round(time.monotonic() - start, 1),
               "samples_per_s": [r["samples_per_s"] for r in records[:3]]}
    if len(records) < 100:
        raise Failed(f"stopped at epoch {len(records)} of 100", figures)
    return figures


@dataclass
class Check:
    name: str
    seconds: float  # what it needs at least; skipped when less is left
    run: Callable[[Lab], dict]


CHECKS = [Check("env", 5, check_env), Check("streams", 90, check_streams),
          Check("sanitizer", 40, check_sanitizer), Check("torchrun", 60, check_torchrun),
          Check("resume", 45, check_resume), Check("suite", 150, check_suite),
          Check("step", 30, check_step), Check("epoch", 40, check_epoch),
          Check("bench", 120, check_bench), Check("paper", 120, check_paper)]
GROUPS = {"validate": ["env", "streams", "sanitizer", "torchrun", "resume", "suite"],
          "measure": ["env", "step", "epoch", "bench"], "paper": ["env", "paper"]}


# --- running them -------------------------------------------------------------------------

def coverage_env(work: Path) -> dict:
    """An environment whose Python processes all record coverage of the project's files."""
    site = work / "covsite"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "try:\n    import coverage\nexcept ImportError:\n    pass\n"
        "else:\n    coverage.process_startup()\n")
    rc = work / "coveragerc"
    rc.write_text("[run]\nparallel = True\nconcurrency = thread\nsigterm = True\n"
                  f"data_file = {work / 'cov' / 'data'}\nomit = {Path(__file__)}\n"
                  f"source =\n" + "".join(f"    {ROOT / s}\n" for s in SOURCES))
    (work / "cov").mkdir(exist_ok=True)
    path = os.pathsep.join([str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1",
            "COVERAGE_PROCESS_START": str(rc)}


def cuda_lines(work: Path, out: Path) -> dict:
    """Combine the children's coverage; write the report and the CUDA lines never run."""
    try:
        import coverage
    except ImportError:
        return {"why": "coverage is not installed: no report"}
    cov = coverage.Coverage(config_file=str(work / "coveragerc"))
    cov.combine(strict=False)
    cov.save()
    with open(out / "coverage.txt", "w") as f:
        total = cov.report(file=f, show_missing=False, ignore_errors=True)
    data, missed, ran = cov.get_data(), [], 0
    for name in sorted(data.measured_files()):
        _, statements, _, missing, _ = cov.analysis2(name)
        text = Path(name).read_text().splitlines()
        for n in statements:
            if CUDA_WORDS.search(text[n - 1]):
                if n in missing:
                    missed.append(f"{Path(name).relative_to(ROOT)}:{n}: {text[n - 1].strip()}")
                else:
                    ran += 1
    (out / "cuda-lines.txt").write_text(
        f"# lines that mention CUDA: {ran} ran, {len(missed)} never ran\n" + "\n".join(missed))
    return {"coverage_percent": round(total, 1), "cuda_lines_ran": ran,
            "cuda_lines_missed": len(missed)}


def sanitized(argv: list[str]) -> int:
    """launch/pipeline.py's main with CUDA's stream sanitizer on in every thread."""
    import threading

    import torch.cuda._sanitizer as csan
    csan.enable_cuda_sanitizer()
    inner = threading.Thread._bootstrap_inner  # every thread's run, subclasses' too

    def bootstrap(self) -> None:
        with csan.cuda_sanitizer.dispatch:
            inner(self)
    threading.Thread._bootstrap_inner = bootstrap
    from localpipe.launch.pipeline import main
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu.py", description=__doc__.split("\n")[0])
    p.add_argument("--checks", default="validate",
                   help=f"groups ({', '.join(GROUPS)}) or checks "
                        f"({', '.join(c.name for c in CHECKS)}), comma-separated")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"),
                   help="the files that come back (default: $OUT)")
    p.add_argument("--work", default="/tmp/localpipe-gpu", help="runs, logs and coverage data")
    p.add_argument("--data", default=str(ROOT / ".gpu" / "data"),
                   help="a folder holding MNIST/raw (the lent machine does not see ../shared)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: try the script itself on a machine without a GPU")
    p.add_argument("--budget", type=float, default=520,
                   help="seconds for all the checks (each may overrun by its 30 s to stop)")
    p.add_argument("--plan", action="store_true", help="print every command; run none")
    p.add_argument("--commit", default=git_state()[0] or "",
                   help="the commit checked, for the record (a lent machine gets no .git)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--sanitized"]:  # the sanitizer check's child
        return sanitized(argv[1:])
    args = p.parse_args(argv)
    names = [n for part in args.checks.split(",") for n in GROUPS.get(part, [part])]
    unknown = sorted(set(names) - {c.name for c in CHECKS})
    if unknown:
        p.error(f"no check {', '.join(unknown)}")
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    lab = Lab(out=out, work=work, data=Path(args.data).resolve(), device=args.device,
              deadline=time.monotonic() + args.budget, commit=args.commit, plan_only=args.plan)
    if args.plan:
        for check in CHECKS:
            if check.name in names and check.name != "env":
                check.run(lab)  # each command is recorded, none is run
        print("\n".join(" ".join(a) for a in lab.planned))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("cov", "logs", "results", "runs"):  # a warm machine keeps an earlier call's
        shutil.rmtree(work / folder, ignore_errors=True)
    lab.env = coverage_env(work)
    rows = []
    for check in (c for c in CHECKS if c.name in dict.fromkeys(names)):
        start = time.monotonic()
        if lab.left() < check.seconds:
            row = {"check": check.name, "ok": None, "why": "skipped: the budget is spent"}
        else:
            try:
                row = {"check": check.name, "ok": True, **check.run(lab)}
            except Failed as e:
                row = {"check": check.name, "ok": False, "why": str(e), **e.figures}
            except Skipped as e:
                row = {"check": check.name, "ok": None, "why": str(e)}
            except Exception as e:  # a bug of the check itself: say so, go on to the next
                row = {"check": check.name, "ok": False, "why": f"{type(e).__name__}: {e}"}
        row["seconds"] = round(time.monotonic() - start, 1)
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        with open(out / "checks.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for folder in ("logs", "results"):
            if (work / folder).exists():
                tar.add(work / folder, arcname=folder)
    try:
        rows.append({"check": "coverage", "ok": True, **cuda_lines(work, out)})
    except Exception as e:  # the checks' own results are written whatever happens here
        rows.append({"check": "coverage", "ok": False, "why": f"{type(e).__name__}: {e}"})
    table = ["| check | ok | seconds | figures |", "|---|---|---|---|"]
    for r in rows:
        figures = {k: v for k, v in r.items() if k not in ("check", "ok", "seconds")}
        table.append(f"| {r['check']} | {r['ok']} | {r.get('seconds', '')} | "
                     f"{json.dumps(figures, default=str)} |")
    (out / "summary.md").write_text("\n".join(table) + "\n")
    print(json.dumps(rows[-1]))
    return 0 if all(r["ok"] is not False for r in rows) else 1

if __name__ == "__main__":
    sys.exit(main())
