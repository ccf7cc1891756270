"""Residual networks (residual-spec.md): the paper code's parameter counts, the three forward
orders of a unit, the shortcut's owner and its private optimizer, the skip travelling across
stage cuts (pipelined == sequential, in-process and under torchrun, and across a resume with
another cut), --describe, the memory-aware cut, and learning."""
import ctypes
import gc
import multiprocessing

import pytest
import torch
import torch.nn.functional as F

from localpipe.launch.options import parse_config
from localpipe.launch.pipeline import main
from localpipe.pipeline import memory
from localpipe.pipeline.data import INFO
from localpipe.pipeline.plan import footprints, stage_memory
from localpipe.stages import partition
from localpipe.stages.config import Config, ConfigError
from localpipe.stages.models import (backprop_parameters, build_stage, build_unit,
                                     count_parameters, plan)

from conftest import assert_same_model, load_model, metrics, run_cli

CIFAR10, CIFAR100, MNIST = ((3, 32, 32), 10), ((3, 32, 32), 100), ((1, 28, 28), 10)
# residual-spec.md §6.1: the paper code's "parameters influenced by global loss" (--backprop)
BACKPROP_COUNTS = {
    "resnet18": (11_173_962, 11_220_132, 11_172_810),
    "resnet34": (21_282_122, 21_328_292, 21_280_970),
    "resnet50": (23_520_842, 23_705_252, 23_519_690),
    "resnet101": (42_512_970, 42_697_380, 42_511_818),
    "resnet152": (58_156_618, 58_341_028, 58_155_466),
    "wresnet10-8": (4_767_370, 4_813_540, 4_767_082),
    "wresnet10-8a": (4_974_602, 5_711_972, 4_972_298),
    "wresnet16-4": (2_751_178, 2_774_308, 2_750_890),
    "wresnet16-4a": (2_817_674, 3_186_404, 2_816_522),
    "wresnet16-8": (10_965_898, 11_012_068, 10_965_610),
    "wresnet16-8a": (11_173_130, 11_910_500, 11_170_826),
    "wresnet28-10": (36_489_322, 36_547_012, 36_489_034),
    "wresnet28-10a": (36_794_570, 37_716_260, 36_791_690),
    "wresnet40-10": (55_856_362, 55_914_052, 55_856_074),
    "wresnet40-10a": (56_161_610, 57_083_300, 56_158_730),
}
# §6.3: predsim, --dim-in-decoder 4096, CIFAR-10, heads included
LOCAL_TOTALS = {
    "resnet18": 24_441_076, "resnet34": 45_305_492, "resnet50": 229_275_700,
    "resnet101": 430_843_442, "resnet152": 597_212_208, "wresnet10-8": 11_253_200,
    "wresnet10-8a": 11_605_584, "wresnet16-4": 6_386_252, "wresnet16-4a": 6_487_308,
    "wresnet16-8": 23_894_284, "wresnet16-8a": 24_246_668, "wresnet28-10": 75_872_356,
    "wresnet28-10a": 76_390_340, "wresnet40-10": 114_909_276, "wresnet40-10a": 115_427_260,
}


def _total(cfg: Config, shape=CIFAR10) -> int:
    with torch.device("meta"):
        return count_parameters([build_unit(s, cfg, shape[1]) for s in plan(cfg, *shape)])


@pytest.mark.parametrize("model", list(BACKPROP_COUNTS))
def test_backprop_counts_are_the_paper_codes(model):
    counted = tuple(backprop_parameters(Config(model=model), *data)
                    for data in (CIFAR10, CIFAR100, MNIST))
    assert counted == BACKPROP_COUNTS[model]


def test_backprop_counts_with_pre_act_and_feat_mult():
    assert backprop_parameters(Config(model="resnet18", pre_act=True), *CIFAR10) == 11_173_066
    assert backprop_parameters(Config(model="resnet34", pre_act=True), *CIFAR10) == 21_281_226
    assert backprop_parameters(Config(model="resnet18", feat_mult=2), *CIFAR10) == 44_662_922
    assert backprop_parameters(Config(model="resnet50", feat_mult=2), *CIFAR10) == 93_932_682
    assert backprop_parameters(Config(model="wresnet16-8", feat_mult=2), *CIFAR10) == 10_965_898


@pytest.mark.parametrize("model", list(LOCAL_TOTALS))
def test_local_totals_with_heads(model):
    assert _total(Config(model=model)) == LOCAL_TOTALS[model]


def test_local_totals_per_loss():
    assert _total(Config(model="resnet18", loss_sup="sim")) == 23_744_586
    assert _total(Config(model="resnet18", loss_sup="pred")) == 11_870_452
    assert _total(Config(model="wresnet16-4", loss_sup="sim")) == 5_853_642
    assert _total(Config(model="wresnet16-4", loss_sup="pred")) == 3_287_372


def _units(cfg: Config, shape=MNIST):
    stage = build_stage(cfg, *shape)
    stage.train()
    return stage, {u.spec.name if hasattr(u, "spec") else "head": u for u in stage.units}


def _bn(x, bn):
    return F.batch_norm(x, None, None, bn.weight, bn.bias, training=True)


def test_post_activation_block_forward_order():
    """Mode A (§2.2): drop(φ(BN(conv x) + shortcut(x))), the loss on h before dropout."""
    cfg = Config(model="resnet18", feat_mult=0.125, nonlin="leakyrelu")
    _, units = _units(cfg)
    x = torch.randn(6, 8, 14, 14)
    one, two = units["layer2.0.conv1"], units["layer2.0.conv2"]  # a projection block
    skips: dict = {}
    mid, _, _ = one.run(x, skips, losses=True)
    assert torch.equal(skips["skip/5"], x)
    out, h, seen = two.run(mid, skips, losses=True)
    assert not skips and seen is mid
    conv, bn = two.shortcut[0], two.shortcut[1]
    expected = F.leaky_relu(_bn(two.layer(mid), two.bn) + _bn(conv(x), bn), 0.01)
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(h, expected, atol=1e-6)
    assert conv.stride == (2, 2) and two.layer.bias is None and two.pre_bn is None


def test_pre_activation_block_forward_order():
    """Mode B: conv(drop(φ(preBN x))) + x, handed on raw; the loss sees φ(lossBN(sum)); the
    unsupervised terms see the pre-activated input u; the stem is bare (mode C)."""
    cfg = Config(model="resnet18", feat_mult=0.125, pre_act=True)
    _, units = _units(cfg)
    stem = units["conv1"]
    x = torch.randn(6, 1, 28, 28)
    out, h, seen = stem.run(x, {}, losses=True)
    assert torch.allclose(out, stem.layer(x)) and seen is x
    assert torch.allclose(h, F.relu(_bn(stem.layer(x), stem.bn)), atol=1e-6)
    block_in = torch.randn(6, 8, 28, 28)
    one, two = units["layer1.0.conv1"], units["layer1.0.conv2"]
    skips: dict = {}
    mid, _, _ = one.run(block_in, skips, losses=True)
    assert torch.allclose(mid, one.layer(F.relu(_bn(block_in, one.pre_bn))), atol=1e-6)
    out, h, seen = two.run(mid, skips, losses=True)
    u = F.relu(_bn(mid, two.pre_bn))
    assert torch.allclose(seen, u, atol=1e-6)
    assert torch.allclose(out, two.layer(u) + block_in, atol=1e-6)  # identity shortcut
    assert torch.allclose(h, F.relu(_bn(out, two.bn)), atol=1e-5)


def test_dropout_placement():
    """Mode A drops whole channels of the handed-on output only (the loss sees h before the
    mask); the plain WRN drops element-wise on its second unit's input (quirk 16)."""
    cfg = Config(model="resnet18", feat_mult=0.125, dropout=0.5)
    _, units = _units(cfg)
    stem = units["conv1"]
    x = torch.randn(6, 1, 28, 28)
    out, h, _ = stem.run(x, {}, losses=True)
    mask = stem.drop(torch.ones_like(h), 0.5)  # this batch's mask: keyed by its position
    assert torch.allclose(h, F.relu(_bn(stem.layer(x), stem.bn)), atol=1e-6)
    assert torch.equal(out, h * mask) and 0 < (mask == 0).float().mean() < 1
    assert (mask == mask[:, :, :1, :1]).all()  # whole channels

    cfg = Config(model="wresnet16-4", dropout=0.5)
    _, units = _units(cfg)
    one, two = units["layer1.0.conv1"], units["layer1.0.conv2"]
    assert one.spec.dropout == 0 and two.spec.dropout == 0
    block_in, skips = torch.randn(4, 16, 28, 28), {}
    mid, _, _ = one.run(block_in, skips, losses=True)
    assert torch.allclose(mid, one.layer(F.relu(_bn(block_in, one.pre_bn))), atol=1e-6)
    out, h, seen = two.run(mid, skips, losses=True)
    mask = two.drop(torch.ones_like(mid), 0.5, channels=False)
    assert (mask != mask[:, :, :1, :1]).any()  # element-wise
    u = F.relu(_bn(mid * mask, two.pre_bn))
    assert torch.allclose(seen, u, atol=1e-6)
    shortcut = two.shortcut[0]  # 16 -> 64: a 1x1 conv with bias and no BN
    assert shortcut.bias is not None and len(two.shortcut) == 1
    assert torch.allclose(out, two.layer(u) + shortcut(block_in), atol=1e-5)
    adapted = _units(Config(model="wresnet16-4a", dropout=0.5))[1]
    assert adapted["layer1.0.conv1"].spec.dropout == 0.5
    assert adapted["layer1.0.conv2"].spec.input_dropout == 0


def test_wide_resnet_head():
    """Final BN (momentum 0.9, affine frozen outside --backprop), plain ReLU whatever
    --nonlin says, pooling, Linear; a skipped NaN batch leaves the BN's statistics as they
    were (quirks 7, 8, 22)."""
    cfg = Config(model="wresnet16-4", nonlin="leakyrelu", on_nan="skip")
    _, units = _units(cfg, CIFAR10)
    head = units["head"]
    bn = head.head[0]
    assert bn.momentum == 0.9 and not bn.weight.requires_grad
    assert [p.shape for g in head.optimizers[0].param_groups for p in g["params"]] == \
        [head.linear.weight.shape, head.linear.bias.shape]
    x = torch.randn(4, 256, 8, 8)
    with torch.no_grad():
        head.linear.weight.normal_()
    expected = head.linear(F.relu(_bn(x, bn)).mean((2, 3)))
    assert torch.allclose(head(x), expected, atol=1e-5)
    before = bn.running_mean.clone()
    _, update = head.train_step(x * float("nan"), torch.arange(4))
    update()
    assert torch.equal(bn.running_mean, before)
    trained = build_stage(Config(model="wresnet16-4", backprop=True), *CIFAR10)
    assert trained.output.head[0].weight.requires_grad


def test_no_batch_norm_reproduces_the_in_place_nonlinearity():
    """Quirk 14: without BN, a pre-activation unit's φ reaches the block input, so the
    shortcut adds φ(x), and the loss path's φ reaches what the next unit gets."""
    cfg = Config(model="wresnet16-4", no_batch_norm=True)
    _, units = _units(cfg)
    one, two = units["layer1.1.conv1"], units["layer1.1.conv2"]  # an identity block
    block_in, skips = torch.randn(4, 64, 28, 28), {}
    mid, _, _ = one.run(block_in, skips, losses=True)
    assert torch.equal(skips["skip/3"], F.relu(block_in))
    assert torch.allclose(mid, F.relu(one.layer(F.relu(block_in))), atol=1e-6)
    out, _, _ = two.run(mid, skips, losses=True)
    assert torch.allclose(out, F.relu(two.layer(F.relu(mid)) + F.relu(block_in)), atol=1e-5)
    raw, _, _ = one.run(block_in, {}, losses=False)  # no loss formed: the raw conv output
    assert torch.allclose(raw, one.layer(F.relu(block_in)), atol=1e-6)


def test_pre_act_leaves_bottlenecks_post_activation_and_bio_sim_pools_as_declared():
    """Quirk 11: --pre-act makes the stem bare and nothing else in resnet50. §5.5: bio sim
    pools with the paper's declared size (it runs there in the paper's code too)."""
    modes = {s.mode for s in plan(Config(model="resnet50", pre_act=True), *CIFAR10)[1:-1]}
    assert plan(Config(model="resnet50", pre_act=True), *CIFAR10)[0].mode == "bare"
    assert modes == {"post"}
    bio = dict(_units(Config(model="resnet18", bio=True, loss_sup="sim"), CIFAR10)[1])
    assert bio["layer2.0.conv1"].pred_pool.kernel_size == (8, 4)  # 128@32 declared, 16 real
    pred = dict(_units(Config(model="resnet18"), CIFAR10)[1])
    assert pred["layer2.0.conv1"].pred_pool.kernel_size == (4, 2)  # 128@16, its real map


def test_the_recon_target_is_detached():
    cfg = Config(model="wresnet16-4", loss_unsup="recon", alpha=1.0)
    _, units = _units(cfg)
    unit = units["layer2.0.conv2"]  # strided: 28 -> 14, decoded back to 28
    x = torch.randn(4, 128, 28, 28, requires_grad=True)
    _, h, seen = unit.run(x, {"skip/5": torch.randn(4, 64, 28, 28)}, losses=True)
    assert unit.recon_head(h).shape[-1] == 28
    target = seen.detach().requires_grad_()
    unit.local_loss(h, target, torch.arange(4)).backward()
    assert target.grad is None


def test_the_shortcut_steps_once_per_training_batch_with_its_own_optimizer():
    """The block's last unit owns the shortcut: a private optimizer over the shortcut alone,
    stepped right after the unit's own, in training only (quirks 5, 6 not reproduced)."""
    cfg = Config(model="resnet18", feat_mult=0.125, dim_in_decoder=256)
    stage, units = _units(cfg)
    owner = units["layer2.0.conv2"]
    mine, shortcut = owner.optimizers
    shortcut_params = set(owner.shortcut.parameters())
    assert shortcut_params  # a conv and a BN: the checks below run over something
    assert set(p for g in shortcut.param_groups for p in g["params"]) == shortcut_params
    assert not shortcut_params & set(p for g in mine.param_groups for p in g["params"])
    x, y = torch.randn(8, 1, 28, 28), torch.randint(10, (8,))
    for step in range(2):
        out, update = stage.train_step(x, y)
        update()
    assert all(shortcut.state[p]["step"] == 2 for p in shortcut_params)
    before = {k: v.clone() for k, v in owner.shortcut.state_dict().items()}
    stage.eval()
    stage.eval_step(x, y)
    assert all(torch.equal(before[k], v) for k, v in owner.shortcut.state_dict().items())
    assert all(shortcut.state[p]["step"] == 2 for p in shortcut_params)


@pytest.mark.parametrize("options", [
    ["--bio"], ["--loss-unsup", "recon", "--alpha", "0.5"], ["--loss-unsup", "sim"],
    ["--no-batch-norm"], ["--backprop"], ["--no-detach"], ["--loss-sup", "pred"],
])
@pytest.mark.parametrize("model", ["resnet18", "resnet50", "wresnet16-4a"])
def test_every_mode_trains_a_step(model, options):
    """Where the paper's code crashes (MNIST-sized maps, recon, pred heads of strided Basic
    blocks), every mode runs here: a step changes the weights and gives finite losses."""
    cfg = parse_config(["--model", model, "--feat-mult", "0.125", "--dim-in-decoder", "256",
                        "--dropout", "0.1", *options])
    stage = build_stage(cfg, *MNIST)
    stage.train()
    before = [[p.detach().clone() for p in u.parameters()] for u in stage.units]
    out, update = stage.train_step(torch.randn(4, 1, 28, 28), torch.arange(4))
    update()
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    for unit, old in zip(stage.units, before):  # every unit learns, not just the head
        assert any(not torch.equal(a, b) for a, b in zip(old, unit.parameters())), unit.index
    assert all(torch.isfinite(u.last_loss) for u in stage.units if u.last_loss is not None)


# --------------------------------------------------------------- pipelined == sequential
COMMON = ["--no-curves", "--dataset", "MNIST", "--limit-train", "64", "--limit-test", "24",
          "--batch-size", "16", "--epochs", "2", "--max-steps", "6", "--dropout", "0.2",
          "--lr-decay-milestones", "1", "--threads", "1", "--seed", "3",
          "--dim-in-decoder", "512"]
# each cut falls inside a residual block: between a Basic or WRN block's two convs, and
# between a Bottleneck's second conv and its shortcut-owning third
NETS = {
    "resnet18": (["--model", "resnet18", "--feat-mult", "0.25"], "2,4,12"),
    "wresnet16-4": (["--model", "wresnet16-4"], "2,4,8"),
    "resnet50": (["--model", "resnet50", "--feat-mult", "0.25"], "3,9,38"),
}
_reference: dict[str, str] = {}


def _reference_run(name: str, mnist_root: str, tmp_path_factory) -> str:
    if name not in _reference:
        save = tmp_path_factory.mktemp(f"ref-{name}")
        assert main(NETS[name][0] + COMMON + ["--data-root", mnist_root, "--save-dir",
                                              str(save)]) == 0
        _reference[name] = str(save)
    return _reference[name]


@pytest.mark.parametrize("name", list(NETS))
def test_a_cut_inside_a_block_trains_exactly_as_the_sequential_network(
        name, mnist_root, tmp_path, tmp_path_factory):
    reference = _reference_run(name, mnist_root, tmp_path_factory)
    model, balance = NETS[name]
    assert main(model + COMMON + ["--data-root", mnist_root, "--save-dir", str(tmp_path),
                                  "--stages", "3", "--balance", balance]) == 0
    assert_same_model(load_model(reference), load_model(tmp_path))
    assert [r["test_error"] for r in metrics(reference)] == \
        [r["test_error"] for r in metrics(tmp_path)]


def test_a_bottleneck_cut_under_torchrun_and_a_resume_with_another_cut(
        mnist_root, tmp_path, tmp_path_factory, capfd):
    """The skip crosses processes (gloo) as a named tensor of the message; a checkpoint of
    three stages resumes as two stages cut elsewhere inside a block, and ends equal."""
    reference = _reference_run("resnet50", mnist_root, tmp_path_factory)
    model, balance = NETS["resnet50"]
    data = ["--data-root", mnist_root]
    result = run_cli(*model, *COMMON, *data, "--save-dir", str(tmp_path / "torchrun"),
                     "--stages", "3", "--balance", balance, torchrun=3, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_model(load_model(reference), load_model(tmp_path / "torchrun"))
    part = str(tmp_path / "parts")
    first = [a if a != "6" else "5" for a in COMMON]  # stop at step 5 of 6: inside epoch 2
    assert main(model + first + data + ["--save-dir", part, "--stages", "3",
                                        "--balance", balance]) == 0
    capfd.readouterr()
    assert main(model + COMMON + data + ["--save-dir", part, "--stages", "2", "--balance",
                                         "11,39", "--resume", "auto"]) == 0
    assert "checkpoints/step-000000005: epoch 2, batch 1" in capfd.readouterr().out
    assert_same_model(load_model(reference), load_model(part))


# ------------------------------------------------------------------ describe and the cut
def test_describe_shows_blocks_boundaries_memory_and_deviations(capsys):
    assert main(["--model", "resnet18", "--dataset", "MNIST", "--stages", "3",
                 "--balance", "2,4,12", "--describe"]) == 0
    out = capsys.readouterr().out
    assert "unit 2: layer1.0.conv2 post 3x3/1 64->64 @28->28 +identity" in out
    assert "unit 6: layer2.0.conv2 post 3x3/1 128->128 @14->14 +conv-bn" in out
    assert "-> stage 1 gets x 64x28x28, y labels, skip/1 64x28x28: 49 MiB a batch" in out
    assert "-> stage 2 gets x 128x14x14, y labels, skip/5 64x28x28" in out
    assert out.count("stage 0: units 0-1, memory about") == 1
    assert ("deviation from the paper's code: unit 13 (layer4.0.conv1): pred head sized for its "
            "4x4 map; the paper's code sizes it for 7x7 and crashes") in out
    assert "backprop parameters: 11,172,810" in out
    main(["--model", "wresnet40-10", "--dataset", "CIFAR10", "--describe", "--balance", "38"])
    out = capsys.readouterr().out
    assert "backprop parameters: 55,856,362" in out and "deviation" not in out
    assert "total parameters (with local heads): 114,909,276" in out


def test_the_memory_estimate_follows_the_network():
    """Shapes only, on the meta device: activations scale with the batch, weights do not,
    and a local stage keeps one unit's activations where backprop keeps all of them."""
    info = INFO["CIFAR10"]
    small = footprints(Config(model="resnet18", batch_size=32), info)
    large = footprints(Config(model="resnet18", batch_size=64), info)
    assert [a.weights for a in small] == [b.weights for b in large]
    assert all(b.saved == pytest.approx(2 * a.saved, rel=0.01) for a, b in zip(small, large))
    assert small[2].carries == (("x", (32, 64, 32, 32)), ("y", (32,)),
                                ("skip/1", (32, 64, 32, 32)))
    local = stage_memory(Config(model="resnet18"), footprints(Config(model="resnet18"), info))
    bp_cfg = Config(model="resnet18", backprop=True)
    backprop = stage_memory(bp_cfg, footprints(bp_cfg, info))
    assert backprop["activations"] > 4 * local["activations"]


def test_the_automatic_cut_fits_every_stage_in_its_device(monkeypatch):
    """With a GPU per stage, a cut whose stage would overflow its device is never chosen,
    even where it is the fastest; if none fits, one clear error."""
    from localpipe.pipeline import plan as plan_module

    cfg = Config(model="resnet18", dataset="CIFAR10", stages=2, batch_size=16).validate()
    prints = footprints(cfg, INFO["CIFAR10"])
    costs = [1.0] * 17 + [0.0]  # by time alone: 9 | 9
    free = partition.best_balance(costs, 2)
    worst = max(stage_memory(cfg, prints[a[0]:a[-1] + 1])["total"]
                for a in partition.split(free, 18))
    budget = int(worst * 0.9)
    monkeypatch.setattr(plan_module, "measure_costs", lambda *a, **k: costs)
    monkeypatch.setattr(plan_module.dev, "memory", lambda device: (budget, "a GPU"))
    run_plan = plan_module.make_plan(cfg, torch.device("cpu"), own_devices=True)
    assert [len(p) for p in run_plan.parts] != free
    assert all(stage_memory(cfg, prints[p[0]:p[-1] + 1])["total"] <= budget
               for p in run_plan.parts)
    tightest = min(max(stage_memory(cfg, prints[:i])["total"],
                       stage_memory(cfg, prints[i:])["total"]) for i in range(1, 18))
    monkeypatch.setattr(plan_module.dev, "memory", lambda device: (tightest - 1, "a GPU"))
    with pytest.raises(ConfigError, match="no cut of the 18 units into 2 stages fits"):
        plan_module.make_plan(cfg, torch.device("cpu"), own_devices=True)


# ------------------------------------------------------------------------------ learning
@pytest.mark.parametrize("model", [
    ["--model", "resnet18", "--feat-mult", "0.25", "--limit-train", "1280"],
    ["--model", "wresnet16-4", "--limit-train", "320", "--lr", "2e-3"],  # 4x the cost a batch
])
def test_residual_networks_learn_mnist(model, mnist_root, tmp_path):
    """Every unit's local loss comes down, the best local head ends well below chance (90 %)
    and the output below it too: its Linear sees the globally averaged last map, which a
    local loss never shaped, so it learns the slowest (see the README)."""
    assert main(model + ["--no-curves", "--dataset", "MNIST", "--data-root", mnist_root,
                         "--limit-test", "200", "--batch-size", "16", "--epochs", "2",
                         "--dim-in-decoder", "512", "--stages", "2",
                         "--save-dir", str(tmp_path)]) == 0
    first, second = metrics(tmp_path)
    assert all(b["train_loss"] < a["train_loss"]
               for a, b in zip(first["blocks"][:-1], second["blocks"][:-1]))
    assert min(b["test_error"] for b in second["blocks"]) < 50
    assert second["test_error"] < 80
    # --describe's estimate of each stage's memory against the peak the run counted from the
    # stage's own tensors, and against the real peak of the stage's first step on the CPU, which
    # also holds what the estimate leaves out (the backward's temporaries, the allocator's slack)
    options = model + ["--dataset", "MNIST", "--batch-size", "16", "--dim-in-decoder", "512"]
    cfg = parse_config(options)
    prints = footprints(cfg, INFO["MNIST"])
    parts = [stage["units"] for stage in second["stages"]]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_first_step_peaks, args=(options, parts, results))
    child.start()
    measured = results.get(timeout=300)
    child.join()
    for stage, real in zip(second["stages"], measured):
        units = stage["units"]
        estimate = stage_memory(cfg, prints[units[0]:units[-1] + 1])["total"]
        assert 0.75 < estimate / stage["memory"]["peak_bytes"] < 1.33, stage
        assert 0.35 < estimate / real < 1.6, (units, estimate, real)


def _first_step_peaks(options: list[str], parts: list[list[int]], results) -> None:
    """In a fresh process, one thread, each stage of ``parts`` in turn: how far its first
    training step on the CPU lifts the resident set's peak (VmHWM, reset just before) above
    where it stood before the stage and its inbound batch were built. A throwaway step of the
    same stage goes first, and the heap it frees goes back to the kernel (glibc's
    ``malloc_trim``), so that setting up kernels and thread pools does not count."""
    torch.set_num_threads(1)
    cfg = parse_config(options)
    info = INFO["MNIST"]
    prints = footprints(cfg, info)

    def step(units: list[int]) -> None:
        stage = build_stage(cfg, info.shape, info.num_classes, units)
        stage.train()
        batch = {name: torch.randint(info.num_classes, shape) if name == "y"
                 else torch.randn(shape) for name, shape in prints[units[0]].carries}
        x, y = batch.pop("x"), batch.pop("y")
        stage.train_step(x, y, batch)[1]()

    peaks = []
    for units in parts:
        step(units)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        memory.reset_peak_rss()
        before = memory.peak_rss()
        step(units)
        peaks.append(memory.peak_rss() - before)
    results.put(peaks)
