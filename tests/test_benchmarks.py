"""The benchmark's quick mode runs every mode and writes a complete JSON (never a speed test)."""
import json
import subprocess
import sys

from conftest import ROOT, cli_env


def test_quick_benchmark_writes_every_figure(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=600,
                            cwd=ROOT, env=cli_env())
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(data["modes"]) == {
        "backprop", "local_sequential_1thread", "local_sequential_2threads",
        "local_pipelined_threads", "local_pipelined_processes", "gpipe_m2", "gpipe_m4",
        "1f1b_m2", "1f1b_m4"} or data["machine"]["cores"] != 2
    for name, mode in data["modes"].items():
        assert mode["samples_per_s"] > 0 and len(mode["repeats"]) == 2, name
        assert mode["min"] <= mode["samples_per_s"] <= mode["max"], name
        assert all(s["live_bytes"] > 0 for s in mode["stages"]), name
        assert mode["devices"] and all(d["peak_rss_bytes"] > 0 for d in mode["devices"]), name
        if "pipelined" in name or name.startswith(("gpipe", "1f1b")):
            assert len(mode["stages"]) == 2 and mode["efficiency"] > 0, name
    for name in ("local_pipelined_threads", "local_pipelined_processes"):
        for s in data["modes"][name]["stages"]:
            assert abs(s["busy"] + s["recv_wait"] + s["send_wait"] - 1) < 1e-6
    comparison = data["comparison"]
    for schedule in ("gpipe", "1f1b"):
        c = comparison[schedule]
        assert abs(c["throughput_ratio"] - c["compute_factor"] * c["efficiency_factor"]) \
            < 1e-6 * c["throughput_ratio"]
    assert data["local_head_compute_ratio"] > 1  # the heads cost extra compute
    assert data["machine"]["cores"] and data["machine"]["torch"] and "thread_budget" in data
    assert "| local_pipelined_threads |" in result.stdout
    assert list(tmp_path.glob("*.png")), "the plot was not drawn"
