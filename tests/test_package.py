"""One import name: the project imports itself only as ``localpipe``, exports a small API, and
its wheel holds nothing else at the top level and imports from wherever it is installed."""
import ast
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

PARTS = {"stages", "pipeline", "launch", "benchmarks"}


def _sources() -> list[str]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_nothing_imports_the_folders_by_their_bare_names():
    """From the checkout's root ``import pipeline`` would load a second copy of every module
    beside ``localpipe.pipeline`` (two ``Config`` classes, two sets of queues)."""
    bare = []
    for path in _sources():
        for node in ast.walk(ast.parse((ROOT / path).read_text(), path)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                     and node.module else [])
            bare += [f"{path}:{node.lineno} {n}" for n in names if n.split(".")[0] in PARTS]
    assert not bare, bare
    assert len(_sources()) > 30  # the walk saw the project


def test_the_public_api_is_small_and_import_is_cheap():
    """``import localpipe`` loads no torch; each name of ``__all__`` resolves, and no other."""
    code = ("import sys, localpipe; assert 'torch' not in sys.modules; "
            "print(sorted(localpipe.__all__)); "
            "print(all(callable(getattr(localpipe, n)) for n in localpipe.__all__)); "
            "print(hasattr(localpipe, 'build_stage'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    names, callables, extra = out.stdout.split("\n")[:3]
    assert names == str(sorted(["Config", "ConfigError", "DataError", "FitResult", "LocalHead",
                                "LocalNet", "StageFailed", "evaluate", "fit", "load", "main"]))
    assert callables == "True" and extra == "False"


@pytest.mark.slow  # builds a wheel
def test_the_wheel_holds_one_top_level_name_and_imports_from_elsewhere(tmp_path):
    """Built from a copy of the checkout's files: setuptools builds in the source folder, and
    a stale build/ there could carry deleted modules into the wheel."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    source = tmp_path / "source"
    for name in listed.stdout.split():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "--quiet", "-w", str(tmp_path / "wheel"),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "wheel").glob("localpipe-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"localpipe"}, tops
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                              "--target", str(target), str(wheel)], capture_output=True,
                             text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    assert not {"stages", "pipeline", "launch", "benchmarks"} & {p.name for p in target.iterdir()}
    code = ("import localpipe, localpipe.launch.pipeline as p, localpipe.stages.config as c; "
            "print(localpipe.__file__); print(p.__file__); print(c.__file__); "
            "print(localpipe.Config is c.Config)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(target), "PATH": "/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    *files, same = run.stdout.split("\n")[:4]
    assert all(f.startswith(str(target)) for f in files), files
    assert same == "True"
