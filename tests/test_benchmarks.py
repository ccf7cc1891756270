"""The benchmark's quick mode runs every mode, replicas and their model included, and writes a
complete JSON (never a speed test)."""
import json
import subprocess
import sys

from conftest import ROOT, cli_env


def test_quick_benchmark_writes_every_figure(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--replicas", "2",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                            cwd=ROOT, env=cli_env())
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(data["modes"]) == {
        "backprop", "local_sequential_1thread", "local_sequential_2threads",
        "local_pipelined_threads", "local_pipelined_processes", "gpipe_m2", "gpipe_m4",
        "1f1b_m2", "1f1b_m4", "local_pipelined_replicas"} or data["machine"]["cores"] != 2
    for name, mode in data["modes"].items():
        assert mode["samples_per_s"] > 0 and len(mode["repeats"]) == 2, name
        assert mode["min"] <= mode["samples_per_s"] <= mode["max"], name
        assert all(s["live_bytes"] > 0 for s in mode["stages"]), name
        assert mode["devices"] and all(d["peak_rss_bytes"] > 0 for d in mode["devices"]), name
        if name == "local_pipelined_replicas":  # 2 stages x 2 replicas, one report per stage
            assert len(mode["stages"]) == 2 and len(mode["devices"]) == 4, name
            assert mode["processes"] == 4 and mode["threads_per_process"] >= 1, name
            assert mode["oversubscribed"] == (4 > mode["cores"]) and "efficiency" not in mode
        elif "pipelined" in name or name.startswith(("gpipe", "1f1b")):
            assert len(mode["stages"]) == 2 and mode["efficiency"] > 0, name
    for name in ("local_pipelined_threads", "local_pipelined_processes",
                 "local_pipelined_replicas"):
        for s in data["modes"][name]["stages"]:
            assert abs(s["busy"] + s["recv_wait"] + s["send_wait"] - 1) < 1e-6
    comparison = data["comparison"]
    for schedule in ("gpipe", "1f1b"):
        c = comparison[schedule]
        assert abs(c["throughput_ratio"] - c["compute_factor"] * c["efficiency_factor"]) \
            < 1e-6 * c["throughput_ratio"]
    # the heads' extra compute, as measured (its size is the benchmark's finding, not a test's)
    assert data["local_head_compute_ratio"] == sum(data["unit_step_s"]) / sum(
        data["backprop_unit_step_s"]) > 0
    assert data["machine"]["cores"] and data["machine"]["torch"] and "thread_budget" in data
    assert "| local_pipelined_threads |" in result.stdout
    model = data["replica_model"]
    assert "not a measurement" in model["note"] and "ASSUMED" in model["links"]["assumed"]["link"]
    assert model["stages"] == 4 and model["global_batch"] == 64  # the quick MLP has 4 units
    assert len(model["unit_bucket_bytes"]) == 4 and all(b > 0 for b in model["unit_bucket_bytes"])
    assert model["links"]["measured"]["bytes_per_s"] > 0
    assert [p["replicas"] for p in model["points"]] == [1, 2, 4, 8]
    for p in model["points"]:
        assert p["replica_batch"] * p["replicas"] == 64 and len(p["stage_step_s"]) == 4
        for link in model["links"]:
            rate = p[link]["samples_per_s"]
            assert 0 < rate["not_overlapped"] <= rate["overlapped"], (p["replicas"], link)
            if p["replicas"] == 1:  # nothing to exchange
                assert p[link]["speedup_vs_r1"]["overlapped"] == 1
                assert p[link]["stage_exchange_s"] == [0.0] * 4
    assert "Model on paper, not measured" in result.stdout
    assert list(tmp_path.glob("*.png")), "the plot was not drawn"
