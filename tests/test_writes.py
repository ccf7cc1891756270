"""A write that fails (here for real: the process's file size limit, RLIMIT_FSIZE, as a full
disk would) is one line naming the file and the OS's reason; the checkpoint before it stays
whole, and the run continues from it once the writes succeed again."""
import resource
import signal
import subprocess

import pytest

from conftest import assert_same_model, cli_command, cli_env, load_model, ROOT

RUN = ["--no-curves", "--model", "mlp", "--num-layers", "2", "--num-hidden", "256",
       "--dataset", "synthetic", "--threads", "1"]
LIMIT = 300_000  # bytes: the records fit, a stage's checkpoint (about 1.2 MB) does not


def _limited(limit: int):
    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return small_files


# Python's own .pyc writes do not check for short writes: under the limit they would leave
# truncated bytecode in the checkout
NO_BYTECODE = {"PYTHONDONTWRITEBYTECODE": "1"}


@pytest.mark.slow  # starts processes
def test_a_failed_checkpoint_write_is_one_line_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    first = subprocess.run(cli_command(*RUN, "--epochs", "1", "--save-dir", str(run)),
                           capture_output=True, text=True, timeout=300, cwd=ROOT, env=cli_env())
    assert first.returncode == 0, first.stderr[-2000:]
    (run / "model.pt").unlink()
    failed = subprocess.run(cli_command(*RUN, "--epochs", "2", "--save-dir", str(run),
                                        "--resume", "auto"),
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=cli_env(NO_BYTECODE), preexec_fn=_limited(LIMIT))
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr[-2000:]
    assert "cannot write" in lines[0] and "stage-0.pt: File too large" in lines[0], lines
    assert "Traceback" not in failed.stderr
    resumed = subprocess.run(cli_command(*RUN, "--epochs", "2", "--save-dir", str(run),
                                         "--resume", "auto"),
                             capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env=cli_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = tmp_path / "straight"
    done = subprocess.run(cli_command(*RUN, "--epochs", "2", "--save-dir", str(straight)),
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=cli_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_model(load_model(straight), load_model(run))


@pytest.mark.slow  # starts processes
def test_curves_that_cannot_be_written_are_one_line_and_training_goes_on(tmp_path):
    """The process that draws curves.png fails to write it: the run says so in one line (the
    sidecar's own traceback never reaches the terminal) and finishes."""
    run = tmp_path / "run"
    done = subprocess.run(cli_command("--model", "mlp", "--num-layers", "1", "--num-hidden", "2",
                                      "--dataset", "synthetic", "--epochs", "1", "--threads", "1",
                                      "--limit-train", "256", "--save-dir", str(run)),
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=cli_env(NO_BYTECODE), preexec_fn=_limited(40_000))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 0 and (run / "model.pt").exists(), done.stderr[-2000:]
    assert lines == [f"localpipe: the curves and TensorBoard files in {run} may be out of date: "
                     f"WriteError: cannot write {run / 'curves.png'}: File too large"], lines
