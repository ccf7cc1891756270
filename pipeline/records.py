"""Where rank 0's records go: the terminal, and in the run folder ``metrics.jsonl`` (one per
epoch) and ``steps.jsonl`` (one every --log-every training batches). A sidecar process turns
them into TensorBoard event files and ``curves.png`` (``pipeline/sidecar.py``), so that the
training processes spend no time drawing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import localpipe
from localpipe.pipeline import console
from localpipe.pipeline.files import WriteError
from localpipe.pipeline.metrics import summary

# where ``import localpipe`` is found, for the sidecar (a checkout run with PYTHONPATH=.)
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(localpipe.__file__)))


class Records:
    def __init__(self, folder: str | None, backprop: bool, curves: bool = True) -> None:
        """``curves``: run the sidecar that draws curves.png and writes TensorBoard files."""
        self.folder, self.backprop = folder or None, backprop
        self.sidecar: subprocess.Popen | None = None
        self.history: list[dict] = []  # every epoch's record, for lp.fit's result
        if self.folder and curves:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [IMPORT_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
            # a session of its own: a Ctrl-C or a scheduler's signal to the run's process group
            # must not cut the last drawing short; it ends when the run closes its stdin
            self.errors = tempfile.TemporaryFile()  # what it says, for the run to report
            self.sidecar = subprocess.Popen([sys.executable, "-m", "localpipe.pipeline.sidecar",
                                             self.folder], stdin=subprocess.PIPE, env=env,
                                            stdout=subprocess.DEVNULL, stderr=self.errors,
                                            text=True, start_new_session=True)

    def epoch(self, record: dict) -> None:
        self.history.append(record)
        console.show(summary(record, self.backprop))
        if self.folder:
            self._append("metrics.jsonl", record)
            self._tell("epoch")

    def step(self, record: dict) -> None:
        if self.folder:
            self._append("steps.jsonl", record)
            self._tell("step")

    def close(self, timeout: float = 120) -> None:
        """Let the sidecar draw the final curves and close the event files."""
        if self.sidecar is None:
            return
        self._tell("close")
        try:
            self.sidecar.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.sidecar.kill()
        if self.sidecar.returncode:
            self.errors.seek(0)
            said = [line for line in self.errors.read().decode(errors="replace").splitlines()
                    if line.strip()]
            why = said[-1] if said else f"their process ended with {self.sidecar.returncode}"
            console.say(f"the curves and TensorBoard files in {self.folder} may be out of "
                        f"date: {why}")
        self.errors.close()
        self.sidecar = None

    def _tell(self, command: str) -> None:
        if self.sidecar is None:
            return
        try:
            self.sidecar.stdin.write(command + "\n")
            self.sidecar.stdin.flush()
        except (OSError, ValueError):  # it has gone: training goes on without curves
            pass

    def _append(self, name: str, record: dict) -> None:
        path = os.path.join(self.folder, name)
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
