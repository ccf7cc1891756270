"""The benchmark's quick mode runs every mode, replicas and their model included, and writes a
complete JSON whose figures hang together: every rank's time inside each timed group, serial
work within its serial limit, each process's own memory peak (never a speed test)."""
import json
import multiprocessing
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env
from localpipe.pipeline import memory

MiB = 2 ** 20
MODES = {"backprop", "local_sequential_1thread", "local_sequential_2threads",
         "local_pipelined_threads", "local_pipelined_processes", "gpipe_m2", "gpipe_m4",
         "1f1b_m2", "1f1b_m4", "local_pipelined_replicas"}


def _report_peak(results) -> None:
    results.put(memory.peak_rss())


def test_every_process_reports_its_own_peak_resident_set():
    """A spawned child that allocates little reports far less than its parent, which held
    1 GiB before spawning it (``ru_maxrss`` would hand the parent's peak on to the child), and
    a reset peak forgets what was freed before it."""
    ballast = bytearray(b"\x01") * (1024 * MiB)
    parent = memory.peak_rss()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_report_peak, args=(results,))
    child.start()
    child_peak = results.get(timeout=120)
    child.join()
    assert child_peak < parent - 512 * MiB, (child_peak, parent)
    del ballast
    assert memory.reset_peak_rss()
    assert memory.peak_rss() < parent - 512 * MiB


@pytest.mark.slow  # starts processes
def test_quick_benchmark_writes_every_figure(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--replicas", "2",
                             "--threads", "2", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=600, cwd=ROOT, env=cli_env())
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(data["modes"]) == MODES
    batch, groups = data["config"]["batch_size"], data["batches"]
    samples = groups["per_timed_group"] * batch
    for name, mode in data["modes"].items():
        ranks = (4 if name == "local_pipelined_replicas" else 2 if "pipelined" in name
                 or name.startswith(("gpipe", "1f1b")) else 1)
        assert len(mode["repeats"]) == len(mode["spans"]) == groups["timed_groups"], name
        assert mode["min"] <= mode["samples_per_s"] <= mode["max"], name
        for rate, spans in zip(mode["repeats"], mode["spans"]):
            # the group's time holds every rank's own span, from the first start to the last end
            assert len(spans) == ranks and all(start < end for start, end in spans), name
            seconds = samples / rate
            assert all(seconds >= end - start - 1e-6 for start, end in spans), (name, spans)
            assert abs(seconds - (max(e for _, e in spans) - min(s for s, _ in spans))) < 1e-6
        assert all(s["live_bytes"] > 0 for s in mode["stages"]), name
        assert mode["devices"] and all(d["peak_rss_bytes"] > 0 for d in mode["devices"]), name
        if name == "local_pipelined_replicas":  # 2 stages x 2 replicas, one report per stage
            assert len(mode["stages"]) == 2 and len(mode["devices"]) == 4, name
            assert mode["processes"] == 4 and mode["threads_per_process"] >= 1, name
            assert mode["oversubscribed"] == (4 > mode["cores"]) and "efficiency" not in mode
        elif ranks == 2:
            assert len(mode["stages"]) == 2 and mode["efficiency"] > 0, name
    # one thread, one unit after another: no faster than the units' solo steps at one thread
    # added up. The slack: the solo steps (pipeline.plan.measure_costs) have come out up to 20 %
    # slower than the loop's own, and the machine's load can change between the two; a clock
    # that missed most of a group's work would still exceed it
    assert data["threads_per_worker"] == 1
    serial_limit = batch / sum(data["unit_step_s"])
    assert data["modes"]["local_sequential_1thread"]["samples_per_s"] < 2 * serial_limit
    # each process's own peak: a mode's processes run different stages, so they do not all
    # report one figure (as they would if each had its parent's peak handed down at spawn)
    for name, mode in data["modes"].items():
        peaks = [d["peak_rss_bytes"] for d in mode["devices"]]
        assert len(peaks) == 1 or len(set(peaks)) > 1, (name, peaks)
    assert "reset at the start of each mode" in data["machine"]["peak_rss"]
    for name in ("local_pipelined_threads", "local_pipelined_processes",
                 "local_pipelined_replicas"):
        for s in data["modes"][name]["stages"]:
            assert abs(s["busy"] + s["recv_wait"] + s["send_wait"] - 1) < 1e-6
    comparison = data["comparison"]
    assert comparison["best_local_pipelined"] in MODES
    assert comparison["gpipe"]["best"] in MODES and comparison["1f1b"]["best"] in MODES
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
