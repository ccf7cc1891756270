"""Vision Transformers (stages/vit.py) and the training options they brought: DeiT's parameter
counts, every mode trains, bad sizes are one line, pipelined == sequential in-process and under
torchrun with AdamW, warm-up, cosine decay and label smoothing on, and what those options
compute."""
import math

import pytest
import torch
import torch.nn.functional as F

from localpipe.launch.options import parse_config
from localpipe.launch.pipeline import main
from localpipe.pipeline.data import INFO
from localpipe.pipeline.plan import footprints, stage_memory
from localpipe.stages import losses
from localpipe.stages.config import Config
from localpipe.stages.models import backprop_parameters, build_stage, build_unit, plan

from conftest import assert_same_model, load_model, metrics, run_cli


@pytest.mark.parametrize("model,count", [("vit-tiny", 5_717_416), ("vit-small", 22_050_664),
                                         ("vit-base", 86_567_656)])
def test_deit_sizes_have_deits_parameter_counts(model, count):
    """timm's deit_{tiny,small,base}_patch16_224: 224×224, patch 16, class token, 1000 classes."""
    cfg = Config(model=model, patch_size=16, token_pool="class")
    assert backprop_parameters(cfg, (3, 224, 224), 1000) == count


SMALL = dict(model="vit", num_layers=3, num_hidden=32, num_heads=2, dataset="MNIST")


@pytest.mark.parametrize("mode", [{}, {"loss_sup": "pred"}, {"loss_sup": "sim"},
                                  {"backprop": True}, {"no_detach": True},
                                  {"loss_unsup": "sim", "alpha": 0.5}])
def test_every_mode_trains_a_step_and_changes_every_weight_it_should(mode):
    cfg = Config(**SMALL, **mode).validate()
    stage = build_stage(cfg, (1, 28, 28), 10)
    before = {k: v.clone() for k, v in stage.state_dict().items()}
    stage.train()
    for step in range(2):  # the zero-initialised heads pass gradients on from the second
        stage.set_position(1, step)
        out, update = stage.train_step(torch.randn(16, 1, 28, 28), torch.arange(16) % 10)
        update()
    assert out.shape == (16, 10)
    moved = {k for k, v in stage.state_dict().items() if not torch.equal(v, before[k])}
    unused = {"pred"} if mode.get("loss_sup") == "sim" else set()
    assert all(k in moved for k in before if not any(f".{u}." in k for u in unused)), \
        sorted(set(before) - moved)


@pytest.mark.parametrize("options,message", [
    (["--patch-size", "5"], "--patch-size 5 does not tile 28x28 inputs"),
    (["--num-hidden", "30", "--num-heads", "4"], "width 30 does not split into 4 heads"),
    (["--dropout", "0.1"], "ViT blocks have no dropout"),
    (["--bio"], "--bio is not defined for ViTs"),
    (["--feat-mult", "2"], "--feat-mult 2 would be ignored: a ViT is sized by --num-hidden"),
    (["--nonlin", "leakyrelu"], "--nonlin leakyrelu would be ignored: ViT blocks use GELU"),
    (["--model", "vit-tiny", "--num-heads", "6"],
     "--num-heads 6 would be ignored: --model vit-tiny is 12 blocks of width 192 with 3 heads"),
])
def test_a_vit_that_cannot_be_built_is_one_line(options, message, tmp_path, capsys):
    code = main(["--model", "vit", "--dataset", "synthetic", "--save-dir",
                 str(tmp_path / "run"), *options])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("localpipe: error:") and message in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_the_memory_estimate_counts_a_blocks_attention_and_adamws_moments():
    cfg = Config(**SMALL, optim="adamw", batch_size=64).validate()
    units = footprints(cfg, INFO["MNIST"])
    weights = sum(p.numel() * 4 for p in build_stage(cfg, (1, 28, 28), 10).units[1].parameters())
    assert units[1].weights == weights and units[1].state == 2 * weights
    # a block keeps at least its input, q, k, v and the MLP's hidden layer: 17 tokens, batch 64
    assert units[1].saved >= 64 * 17 * 32 * 4 * (1 + 3 + 4)
    assert units[0].inbound == 64 * 28 * 28 * 4 + 64 * 8  # the images and their labels
    assert stage_memory(cfg, units[1:])["total"] > 0


def test_label_smoothing_is_torchs_and_is_off_in_evaluation():
    logits = torch.randn(32, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randint(10, (32,))
    ours = losses.pred_loss(logits, y, 0.1)
    torch.testing.assert_close(ours, F.cross_entropy(logits, y, label_smoothing=0.1))
    assert torch.equal(losses.pred_loss(logits, y.clone(), 0.0), losses.pred_loss(logits, y))
    stage = build_stage(Config(**SMALL, label_smoothing=0.2).validate(), (1, 28, 28), 10)
    stage.eval()
    assert stage.units[-1].smoothing == 0.0 and stage.train().units[-1].smoothing == 0.2


def test_the_learning_rate_warms_up_then_follows_a_cosine_per_batch():
    cfg = Config(lr=1.0, epochs=2, warmup_steps=4, lr_schedule="cosine")
    lrs = [cfg.lr_at(epoch, step, 10) for epoch in (1, 2) for step in range(10)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    step = Config(lr=1.0, lr_decay_milestones=[1], lr_decay_fact=0.5, warmup_steps=2)
    assert [step.lr_at(1, 0, 5), step.lr_at(1, 1, 5), step.lr_at(1, 4, 5), step.lr_at(2, 0, 5)] \
        == [0.5, 1.0, 1.0, 0.5]


# Three blocks of 17 tokens, AdamW with weight decay, a warm-up into the cosine, label
# smoothing, two epochs of 4 batches with a last partial one (100 = 3·32 + 4).
VIT = ["--no-curves", "--model", "vit", "--num-layers", "3", "--num-hidden", "32",
       "--num-heads", "2", "--dataset", "MNIST", "--limit-train", "100", "--limit-test", "50",
       "--batch-size", "32", "--epochs", "2", "--optim", "adamw", "--weight-decay", "0.05",
       "--lr", "1e-3", "--lr-schedule", "cosine", "--warmup-steps", "3",
       "--label-smoothing", "0.1", "--log-every", "1", "--threads", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def vit_reference(mnist_root, tmp_path_factory):
    save = tmp_path_factory.mktemp("vit-reference")
    assert main(VIT + ["--data-root", mnist_root, "--save-dir", str(save)]) == 0
    return save


@pytest.mark.parametrize("runner", ["threads", "torchrun"])
def test_a_pipelined_vit_trains_exactly_as_the_sequential_one(runner, vit_reference,
                                                              mnist_root, tmp_path):
    args = VIT + ["--data-root", mnist_root, "--save-dir", str(tmp_path), "--stages", "3"]
    if runner == "threads":
        assert main(args) == 0
    else:
        result = run_cli(*args, torchrun=3, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_model(load_model(vit_reference), load_model(tmp_path))
    records = metrics(tmp_path)
    assert [(r["test_error"], r["lr"], r["lr_last"]) for r in records] == \
        [(r["test_error"], r["lr"], r["lr_last"]) for r in metrics(vit_reference)]
    cfg = parse_config(args)
    want = [cfg.lr_at(e, s, 4) for e in (1, 2) for s in range(4)]
    got = [r["lr"] for r in map(__import__("json").loads, open(tmp_path / "steps.jsonl"))]
    assert got == want and want[:3] == [1e-3 / 3, 2e-3 / 3, 1e-3]
    assert records[0]["lr"] == want[0] and records[1]["lr_last"] == want[-1]


def test_a_map_head_keeps_the_patch_grid_pooled_to_dim_in_decoder():
    """vit-tiny on CIFAR (8×8 patches of 4): 192 + 192·4·4 features under the default 4096, the
    class token's 192 with --token-pool class."""
    for pool, features in (("map", 192 + 192 * 16), ("class", 192)):
        cfg = Config(model="vit-tiny", dataset="CIFAR10", token_pool=pool).validate()
        with torch.device("meta"):
            first, last = (build_unit(s, cfg, 10) for s in plan(cfg, (3, 32, 32), 10)[::12])
        assert first.head.pred.in_features == features and last.linear.in_features == features
    small = Config(**SMALL).validate()  # 16 patches of 32 fit whole: 32 + 16·32
    assert build_stage(small, (1, 28, 28), 10, [0]).units[0].head.pred.in_features == 544


def test_a_run_stopped_inside_the_cosine_resumes_exactly(vit_reference, mnist_root, tmp_path):
    """--max-steps 5 stops inside epoch 2 (4 batches an epoch); continued as two stages, every
    batch after it gets the learning rate of its position, as in the straight run."""
    args = VIT + ["--data-root", mnist_root, "--save-dir", str(tmp_path)]
    assert main(args + ["--max-steps", "5"]) == 0
    assert main(args + ["--resume", "auto", "--stages", "2"]) == 0
    assert_same_model(load_model(vit_reference), load_model(tmp_path))
    # the model.pt --max-steps left is kept under the position it was written at
    assert (tmp_path / "model-epoch2-step1.pt").exists()
    assert [r["test_error"] for r in metrics(tmp_path)][-1] == \
        [r["test_error"] for r in metrics(vit_reference)][-1]


def test_adamw_decays_the_weights_alone_and_a_per_batch_schedule_needs_the_epochs_length():
    """As DeiT: no decay of biases, norms, the position embeddings and the class token, in a
    unit's own optimizer and in the one --backprop gives the whole network."""
    for mode in ({}, {"backprop": True}):
        cfg = Config(**SMALL, optim="adamw", weight_decay=0.05, **mode).validate()
        stage = build_stage(cfg, (1, 28, 28), 10)
        optimizer = stage.optimizer if mode else stage.units[0].optimizers[0]
        unit = stage.units[0]
        exempt = {id(unit.embed.pos_embed), id(unit.embed.cls_token)} | {
            id(p) for p in unit.parameters() if p.ndim == 1}
        decay, none = optimizer.param_groups
        assert decay["weight_decay"] == 0.05 and none["weight_decay"] == 0.0
        assert exempt <= {id(p) for p in none["params"]}
        assert all(p.ndim > 1 and id(p) not in exempt for p in decay["params"])
        assert id(unit.block.attn.qkv.weight) in {id(p) for p in decay["params"]}
    with pytest.raises(ValueError, match="needs the batches an epoch"):
        Config(warmup_steps=2).lr_at(1, 0)


def test_a_cosine_run_continues_with_its_own_epochs_only(vit_reference, mnist_root, tmp_path,
                                                         capsys):
    args = VIT + ["--data-root", mnist_root, "--save-dir", str(tmp_path)]
    assert main(args + ["--max-steps", "2"]) == 0
    capsys.readouterr()
    assert main([("3" if a == "2" and VIT[i - 1] == "--epochs" else a)
                 for i, a in enumerate(args)] + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--epochs 2, this run has 3: the cosine schedule spans" in err and "\n" not in err
    # a finished cosine run says it cannot go on, not that a larger --epochs would
    finished = VIT + ["--data-root", mnist_root, "--save-dir", str(vit_reference)]
    assert main(finished + ["--resume", "auto"]) == 0
    assert "cosine schedule spans the epochs it started with" in capsys.readouterr().out


def test_a_warm_up_longer_than_the_run_is_said(mnist_root, capsys):
    assert main(VIT + ["--data-root", mnist_root, "--save-dir", "", "--warmup-steps", "9",
                       "--max-steps", "2", "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert "the warm-up of 9 batches (--warmup-steps) spans the whole run of 2" in err


@pytest.mark.parametrize("recipe,dataset,classes", [
    ("cifar10-vit-tiny-predsim", "CIFAR10", 10), ("cifar100-vit-small-global", "CIFAR100", 100)])
def test_the_cifar_recipes_train_on_generated_cifar_files(recipe, dataset, classes, tmp_path,
                                                         monkeypatch):
    """No CIFAR here: torchvision's class gives generated images in CIFAR's own layout (40
    training and 20 test images), and the recipe runs whole but for its length."""
    import torchvision
    from test_data import _Fake

    fake = type(dataset, (_Fake,), {"base_folder": "fake",
                                    "__init__": lambda self, root, download=False, **kw:
                                    _Fake.__init__(self, root, download, layout=(3, 32),
                                                   classes=classes, **kw)})
    monkeypatch.setattr(torchvision.datasets, dataset, fake)
    save = tmp_path / "run"
    assert main(["--recipe", recipe, "--epochs", "1", "--batch-size", "16", "--warmup-steps",
                 "2", "--no-curves", "--save-dir", str(save), "--threads", "1"]) == 0
    record = metrics(save)[0]
    cfg = parse_config(["--recipe", recipe])
    assert (cfg.optim, cfg.lr_schedule, cfg.label_smoothing, cfg.patch_size) == \
        ("adamw", "cosine", 0.1, 4)
    assert record["train_samples"] == 40 and record["test_samples"] == 20
    assert record["lr"] == 5e-4 / 2 and len(record["blocks"]) == 12  # the warm-up's first
