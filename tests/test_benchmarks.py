"""The benchmark's quick mode runs every mode, replicas and their model included, and writes a
complete JSON whose figures hang together: every rank's time inside each timed group, serial
work within its serial limit, each process's own memory peak (never a speed test). Every model
family runs, the backprop pipelines cut only between whole residual blocks."""
import json
import multiprocessing
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, cli_env
from localpipe.benchmarks import harness, run
from localpipe.pipeline import memory
from localpipe.stages.config import Config
from localpipe.stages.models import build_stage

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


def _setup(model: str, **options) -> harness.Setup:
    cfg = Config(model=model, dataset="CIFAR10", batch_size=4, save_dir="", **options).validate()
    return harness.Setup(cfg, threads=2, warmup=1, steps=1, repeats=1)


def test_backprop_groups_are_whole_residual_blocks():
    """Found by running the network, not per family: a ResNet's stem, each block (2 units
    Basic, 3 Bottleneck; a Wide ResNet's 2) and the head; every unit alone elsewhere."""
    assert harness.block_groups(_setup("resnet18", feat_mult=0.125)) == [
        [0], [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [15, 16], [17]]
    resnet50 = harness.block_groups(_setup("resnet50", feat_mult=0.125))
    assert resnet50 == [[0], *([u, u + 1, u + 2] for u in range(1, 49, 3)), [49]]
    assert harness.block_groups(_setup("wresnet16-4")) == [
        [0], [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13]]
    assert harness.block_groups(_setup("vgg8b", feat_mult=0.125)) == [[u] for u in range(8)]
    assert harness.block_groups(_setup("mlp", num_layers=2, num_hidden=16)) == [[0], [1], [2]]
    vit = _setup("vit", num_layers=3, num_hidden=32, num_heads=2)
    assert harness.block_groups(vit) == [[0], [1], [2], [3]]


def test_a_backprop_pipeline_cut_between_blocks_is_the_whole_network():
    """Backprop parts cut between blocks, chained, give the unpipelined network's loss and
    gradients exactly; a part that starts inside a block has no skip to pop."""
    setup = _setup("resnet18", feat_mult=0.125)
    cfg, x, y = setup.backprop_cfg, *setup.batch()
    groups = harness.block_groups(setup)
    cuts = [[u for g in groups[:4] for u in g], [u for g in groups[4:] for u in g]]

    def gradients(parts: list[list[int] | None]) -> tuple[torch.Tensor, dict]:
        modules = [harness.BackpropPart(build_stage(cfg, setup.shape, setup.classes, p))
                   for p in parts]
        h = x
        for module in modules:
            h = module(h)
        loss = torch.nn.functional.cross_entropy(h, y)
        loss.backward()
        return loss, {(u.index, name): p.grad for m in modules for u in m.stage.units
                      for name, p in u.named_parameters()}

    whole_loss, whole = gradients([None])
    cut_loss, cut = gradients(cuts)
    assert cuts[0] == list(range(7)) and torch.equal(whole_loss, cut_loss)
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    inside = harness.BackpropPart(build_stage(cfg, setup.shape, setup.classes, list(range(2, 18))))
    with pytest.raises(KeyError):  # unit 2 pops the skip that unit 1 stashed
        inside(torch.zeros((4, 8, 32, 32)))  # unit 1's output: 64 x 0.125 channels


def test_local_threads_carry_a_skip_to_the_next_stage():
    """A local cut may fall inside a block: unit 1's stashed input reaches unit 2 on the next
    stage with the batch (a lost skip fails the stage with a KeyError)."""
    result = harness.local_threads(_setup("resnet18", feat_mult=0.125),
                                   [[0, 1], list(range(2, 18))])
    assert len(result["stages"]) == 2 and result["samples_per_s"] > 0


def test_more_stages_than_whole_blocks_are_refused(capsys):
    with pytest.raises(SystemExit) as exit:
        run.main(["--model", "resnet18", "--feat-mult", "0.125", "--stages", "11"])
    assert exit.value.code == 2
    assert "between whole residual blocks, into at most 10 stages" in capsys.readouterr().err


def test_networks_are_named_by_what_sizes_them():
    vit = Config(model="vit", dataset="MNIST", num_layers=8, num_hidden=128, num_heads=4,
                 patch_size=7)
    assert run.network(vit) == "vit depth 8 width 128 heads 4 patch 7"
    assert run.network(Config(model="vit-tiny", dataset="CIFAR10")) == "vit-tiny patch 4"
    assert run.network(Config(model="resnet18", feat_mult=0.25)) == "resnet18 x0.25"
    assert run.network(Config(model="wresnet16-4", feat_mult=0.25)) == "wresnet16-4"


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("model", [
    ["--model", "resnet18", "--feat-mult", "0.125"],
    ["--model", "vit", "--num-layers", "2", "--num-hidden", "32", "--num-heads", "2"]],
    ids=["resnet18", "vit"])
def test_every_family_runs_every_mode(tmp_path, model):
    result = subprocess.run([sys.executable, "benchmarks/run.py", *model, "--batch-size", "8",
                             "--stages", "2", "--microbatches", "2", "--warmup", "1", "--steps",
                             "1", "--repeats", "1", "--threads", "2", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=cli_env())
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(data["modes"]) == {
        "backprop", "local_sequential_1thread", "local_sequential_2threads",
        "local_pipelined_threads", "local_pipelined_processes", "gpipe_m2", "1f1b_m2"}
    groups = data["backprop_groups"]
    assert len(data["backprop_group_step_s"]) == len(groups)
    # each backprop stage is whole groups; the local cut is any split of the units
    starts = {g[0] for g in groups}
    assert all(part[0] in starts for part in data["backprop_partition"])
    assert sum(data["backprop_partition"], []) == sum(data["partition"], []) == sum(groups, [])


def test_the_pooling_comparison_prints_every_head_and_mode(mnist_root, capsys):
    from localpipe.benchmarks import pooling

    assert pooling.main(["--data-root", mnist_root, "--batches", "50", "--num-layers", "1",
                         "--num-hidden", "16", "--num-heads", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:]]
    assert [(r[1], r[2]) for r in rows] == [("class", "backprop"), ("class", "local"),
                                          ("map", "backprop"), ("map", "local")]
    assert all(0.0 <= float(r[-2]) <= 100.0 for r in rows)
