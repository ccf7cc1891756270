"""The GPU paths that a CPU can check, with torch.cuda patched and made-up GPU identities: which
ranks share a GPU, that every process binds its own GPU, the head pooling's deterministic
form, and the global precision a run sets (and ``lp.fit`` puts back)."""
import hashlib
import sys
import threading
import types

import pytest
import torch
import torch.distributed as dist
import torch.utils.deterministic
from torch import nn

from localpipe.benchmarks import harness
from localpipe.launch.options import parse_config
from localpipe.pipeline import device as dev
from localpipe.pipeline import distributed, process, runs
from localpipe.pipeline.message import Kind
from localpipe.pipeline.topology import Topology
from localpipe.stages.config import Config, ConfigError, resumed_fields
from localpipe.stages.models import build_stage
from localpipe.stages.residual import HeadSpec, head_pool

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpus(monkeypatch):
    """Four visible GPUs, and a record of every ``set_device`` (nothing touches a real one)."""
    bound: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append(torch.device(d)))
    threads = torch.get_num_threads()
    yield bound
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------- ranks sharing a GPU
def test_ranks_share_a_gpu_only_when_two_hold_the_same_one(monkeypatch):
    """One GPU visible per process (CUDA_VISIBLE_DEVICES per rank) makes every rank GPU 0, yet
    no two share one: the UUIDs tell, not the count of GPUs a rank sees."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert {dev.rank_device(CUDA, r) for r in range(4)} == {CUDA}
    own = [["GPU-a", "DEFAULT"], ["GPU-b", "DEFAULT"], ["GPU-c", None], ["GPU-d", "MPS"]]
    assert distributed.sharing(own) is None
    assert distributed.sharing([[None, None], [None, None]]) is None  # CPU ranks
    assert dev.shared_gpus(["GPU-a", "GPU-b", "GPU-a", None, None]) == {"GPU-a"}
    assert distributed.sharing([["GPU-a", "EXCLUSIVE_PROCESS"], ["GPU-b", "DEFAULT"]]) is None


def test_a_shared_gpu_is_named_in_one_notice_or_refused_when_exclusive():
    notice = distributed.sharing([["GPU-a", "DEFAULT"], ["GPU-a", "DEFAULT"], ["GPU-b", None]])
    assert notice.startswith("2 ranks share 1 GPU(s)") and "time slicing" in notice
    assert "pinned host memory" in notice and "\n" not in notice
    assert "time slicing" in distributed.sharing([["GPU-a", None], ["GPU-a", None]])  # no NVML
    assert "under MPS" in distributed.sharing([["GPU-a", "MPS"], ["GPU-a", "MPS"]])
    with pytest.raises(ConfigError, match="EXCLUSIVE_PROCESS, which admits one process") as exc:
        distributed.sharing([["GPU-a", "EXCLUSIVE_PROCESS"], ["GPU-a", "EXCLUSIVE_PROCESS"],
                             ["GPU-b", "DEFAULT"]])
    assert "\n" not in str(exc.value)


def test_every_rank_learns_every_gpu_through_the_store(monkeypatch):
    """Before any process group: each rank writes its own and reads the same list."""
    monkeypatch.setattr(dev, "uuid", lambda d: f"GPU-{'abab'[d.index]}")
    monkeypatch.setattr(dev, "gpu_mode", lambda d: "DEFAULT")
    store = dist.HashStore()
    got = {}

    def rank(r: int) -> None:
        got[r] = distributed.rank_gpus(store, Topology(r, 2, 2), torch.device("cuda", r))

    others = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (1, 2, 3)]
    for t in others:
        t.start()
    rank(0)
    for t in others:
        t.join(10)
    assert got == {r: [["GPU-a", "DEFAULT"], ["GPU-b", "DEFAULT"]] * 2 for r in range(4)}
    assert distributed.sharing(got[0]).startswith("4 ranks share 2 GPU(s)")


def test_the_gpu_mode_comes_from_nvml_or_mps_and_is_none_when_unknown(monkeypatch, tmp_path):
    monkeypatch.setattr(dev, "uuid", lambda d: "GPU-a")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert dev.gpu_mode(torch.device("cpu")) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py missing
    assert dev.gpu_mode(CUDA) is None
    nvml = types.SimpleNamespace(
        NVML_COMPUTEMODE_DEFAULT=0, NVML_COMPUTEMODE_PROHIBITED=2,
        NVML_COMPUTEMODE_EXCLUSIVE_PROCESS=3, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: {"GPU-a": "handle"}[uuid],
        nvmlDeviceGetComputeMode=lambda handle: 3)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert dev.gpu_mode(CUDA) == "EXCLUSIVE_PROCESS"
    nvml.nvmlInit = lambda: (_ for _ in ()).throw(RuntimeError("NVML_ERROR_LIBRARY_NOT_FOUND"))
    assert dev.gpu_mode(CUDA) is None
    (tmp_path / "control").touch()  # an MPS control daemon's pipe
    assert dev.gpu_mode(CUDA) == "MPS"


@pytest.mark.parametrize("mode", ["DEFAULT", "EXCLUSIVE_PROCESS"])
def test_a_rank_binds_its_gpu_once_sharing_is_checked(gpus, monkeypatch, mode):
    """torchrun's rank 5 (local rank 5 of a node with 4 GPUs) makes GPU 1 current before the
    run is prepared, but only once the GPUs' identities passed: binding makes a CUDA context,
    which a GPU in EXCLUSIVE_PROCESS mode refuses a second process."""
    for k, v in {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "5", "MASTER_ADDR": "localhost",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed, "network_of", lambda cfg: None)
    monkeypatch.setattr(distributed, "static_plan", lambda cfg, network: None)
    monkeypatch.setattr(process, "configure", lambda cfg: None)
    monkeypatch.setattr(distributed, "rendezvous_store", lambda cfg: dist.HashStore())
    monkeypatch.setattr(distributed, "rank_gpus", lambda store, topo, device:
                        [[f"GPU-{r % 4}", mode] for r in range(topo.world)])

    def verdict(*args, **kwargs):
        raise LookupError(f"prepared, bound {gpus}")

    monkeypatch.setattr(distributed, "verdict", verdict)
    cfg = Config(stages=8, device="cuda")
    if mode == "EXCLUSIVE_PROCESS":
        with pytest.raises(ConfigError, match="8 ranks would share 4 GPU"):
            distributed.run_distributed(cfg, None)
        assert gpus == []
        return
    with pytest.raises(LookupError, match=r"bound \[device\(type='cuda', index=1\)\]"):
        distributed.run_distributed(cfg, None)


# ------------------------------------------------------------------------- the benchmark's ranks
def _setup() -> harness.Setup:
    cfg = Config(model="mlp", dataset="MNIST", batch_size=4, num_hidden=8).validate()
    return harness.Setup(cfg, threads=2, warmup=1, steps=1, repeats=1, device="cuda")


def test_every_spawned_rank_binds_its_own_gpu(gpus, monkeypatch, tmp_path):
    """Else ``dist.gather_object`` stages every rank's tensors on GPU 0."""
    monkeypatch.setattr(harness.dist, "TCPStore", lambda *args: "store")
    monkeypatch.setattr(harness.dist, "destroy_process_group", lambda: None)
    ran = []
    for rank in range(3):
        harness._process_main(rank, 3, 0, lambda *args: ran.append(list(gpus)), _setup(),
                              str(tmp_path / "result.pt"))
    assert ran == [[torch.device("cuda", r) for r in range(k + 1)] for k in range(3)]


def test_a_replicas_batches_are_made_on_the_gpu_of_the_stage_they_feed(gpus, monkeypatch):
    """Rank 2 is stage 0 of replica 1 (2 stages, 2 replicas): its batches go to GPU 2."""
    made, built = [], []

    def batch(self, rank=0):
        made.append(self.rank_device(rank))
        return torch.zeros(4, *self.shape), torch.zeros(4, dtype=torch.long)

    def serve(me, stage, messages, on_report):
        assert [m.x.shape[0] for m in messages if m.kind == Kind.TRAIN] == [2, 2]  # shards

    me = types.SimpleNamespace(links=types.SimpleNamespace(replicas=None),
                               control=types.SimpleNamespace(finish=lambda: None))
    monkeypatch.setattr(harness.Setup, "batch", batch)
    monkeypatch.setattr(harness, "fresh", lambda device: None)
    monkeypatch.setattr(harness, "join", lambda cfg, store, topo, device, *a: built.append(device)
                        or me)
    monkeypatch.setattr(harness, "build_stage", lambda cfg, shape, classes, part, device:
                        types.SimpleNamespace(replicate=lambda *a: built.append(device)))
    monkeypatch.setattr(harness, "serve", serve)
    harness._local_rank(2, 4, _setup(), None, [[0], [1]], 2)
    assert built == [torch.device("cuda", 2)] * 2 and made == [torch.device("cuda", 2)]


# ------------------------------------------------------------------------- head pooling
KEYS = {  # (count, sha256 prefix) of each model's state_dict keys before head_pool existed
    "resnet18": (173, "bc9f9efe1d78f54c"), "wresnet10-8a": (111, "2e75409e9ac4dabe"),
    "wresnet10-8": (113, "f646d87a1a4d0312")}


@pytest.mark.parametrize("model", KEYS)
def test_the_head_pooling_keeps_every_state_name(model):
    cfg = Config(model=model, dataset="CIFAR10", feat_mult=0.125).validate()
    keys = list(build_stage(cfg, (3, 32, 32), 10).state_dict())
    assert (len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]) == KEYS[model]


def test_the_wide_resnet_a_head_max_pools_with_fixed_windows():
    """AdaptiveMaxPool2d has no deterministic CUDA backward: where the map's side is a multiple
    of the output's, the same windows in MaxPool2d give the same values and gradients, bit for
    bit (on the CPU), ties between zeros after the ReLU included."""
    spec = HeadSpec(0, 16, 10, 8, "max", 4, 2, 256, True, False)
    pool = head_pool(spec)
    assert isinstance(pool, nn.MaxPool2d)
    x = torch.relu(torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0)))
    x = x.round(decimals=1)  # more ties
    grads = []
    for p in (pool, nn.AdaptiveMaxPool2d(4)):
        xi = x.clone().requires_grad_()
        out = p(xi)
        out.backward(torch.arange(out.numel(), dtype=x.dtype).view_as(out))
        grads.append((out.detach(), xi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    uneven = HeadSpec(0, 16, 10, 7, "max", 4, 2, 256, True, False)  # 7 → 4: windows overlap
    assert isinstance(head_pool(uneven), nn.AdaptiveMaxPool2d)


def test_average_pooling_to_one_by_one_is_already_a_mean():
    """Why the 1×1 average pools stay adaptive: ATen computes them as a mean over the map,
    whose backward is deterministic on a GPU (no adaptive-pooling kernel runs)."""
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    out = nn.AdaptiveAvgPool2d(1)(x)
    assert type(out.grad_fn).__name__.startswith("MeanBackward")
    assert torch.equal(out, x.mean((-2, -1), keepdim=True))
    assert isinstance(head_pool(HeadSpec(0, 16, 10, 8, "avg", 1, 8, 16, True, False)),
                      nn.AdaptiveAvgPool2d)


# ------------------------------------------------------------------------- global precision
def test_a_run_sets_one_precision_without_the_nan_fill_and_puts_both_back(tmp_path):
    """One precision for matmuls and cuDNN, read back by every torch API without a complaint
    (a mix of torch's old and new TF32 settings makes torch raise where it reads them)."""
    def flags() -> list:
        return [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision()]

    before = flags()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    with process.kept():
        process.configure(Config(deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory is False
        assert flags() == [False, False, "highest"]
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert runs.provenance([], [[0]])["matmul_precision"] == "fp32"
        process.configure(parse_config(["--tf32"]))
        assert flags() == [True, True, "high"]
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert runs.provenance([], [[0]])["matmul_precision"] == "tf32"
    assert flags() == before
    assert torch.utils.deterministic.fill_uninitialized_memory is fill
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("mine", ["medium", "per-op tf32"])
def test_a_users_own_precision_through_either_api_comes_back(mine):
    """lp.fit inside a program that set its precision through torch's older API, or the
    newer per-op one, neither raises nor leaves the program another precision."""
    before = torch.get_float32_matmul_precision()
    try:
        if mine == "medium":
            torch.set_float32_matmul_precision("medium")
        else:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        state = [b.fp32_precision for b in process.PER_OP]
        with process.kept():
            process.configure(Config())
            assert runs.provenance([], [[0]])["matmul_precision"] == "fp32"
        assert [b.fp32_precision for b in process.PER_OP] == state
        if mine == "medium":
            assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert "tf32" not in resumed_fields()  # a run option: a resume may change it
