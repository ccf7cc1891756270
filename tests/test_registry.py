"""A new network, dataset or LocalNet loss is one registration: the command line's
validation, --help and the runners find it with nothing else changed."""
import json
import math

import torch

import localpipe as lp
from localpipe.launch.options import build_parser
from localpipe.launch.pipeline import main
from localpipe.pipeline.data import Dataset, DatasetInfo
from localpipe.stages.models import UnitSpec
from localpipe.stages.registry import register_dataset, register_loss, register_model


@register_model("test-two-layer")
def two_layer(cfg, in_shape, num_classes):
    width = in_shape[0] * in_shape[1] * in_shape[2]
    return [UnitSpec(0, "linear", width, 32), UnitSpec(1, "output", 32, num_classes,
                                                       zero_init=True)]


def four_by_four(name, root, train, download):
    g = torch.Generator().manual_seed(int(train))
    labels = torch.randint(3, (96 if train else 32,), generator=g)
    images = (labels.view(-1, 1, 1, 1) * 80 + torch.randint(0, 40, (len(labels), 1, 4, 4),
                                                            generator=g)).to(torch.uint8)
    return images, labels


register_dataset("test-4x4", entry=Dataset(DatasetInfo((1, 4, 4), 3, (0.5,), (0.25,)),
                                           four_by_four))


@register_loss("test-half-pred")
def half_pred(h, y, head, beta):
    return 0.5 * torch.nn.functional.cross_entropy(head.predict(h), y), {}


def test_a_registered_network_and_dataset_train_from_the_command_line(tmp_path):
    help_text = build_parser().format_help()
    assert "test-two-layer" in help_text and "test-4x4" in help_text
    assert main(["--model", "test-two-layer", "--dataset", "test-4x4", "--epochs", "2",
                 "--batch-size", "16", "--stages", "2", "--no-curves", "--threads", "1",
                 "--save-dir", str(tmp_path)]) == 0
    records = [json.loads(line) for line in
               (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["test_samples"] == 32
    assert records[-1]["blocks"][0]["name"] == "linear 16->32"
    # one process runs both stages: its memory record names both, and no single one
    assert [(p["stages"], p["stage"]) for p in records[-1]["processes"]] == [([0, 1], None)]


def test_a_registered_loss_trains_a_localnet():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Flatten(),
                                                     torch.nn.Linear(16, 8)),
                                 torch.nn.Linear(8, 3))
    images, labels = four_by_four("", "", True, False)
    data = torch.utils.data.TensorDataset(images.float() / 255, labels)
    net = lp.LocalNet(module, num_classes=3, input_shape=(1, 4, 4), loss="test-half-pred")
    result = lp.fit(net, data, data, epochs=5, batch_size=16, lr=1e-2, save_dir="",
                    curves=False)
    # half a cross-entropy, below half of chance's (ln 3) by the last epoch
    assert result.history[-1]["blocks"][0]["train_loss"] < 0.5 * math.log(3)
    assert result.test_error < 50  # chance: 67


def test_the_papers_network_is_an_ordinary_module():
    """``model(x)`` records the graph as any module does (and under no_grad does not): the
    whole network is one differentiable function of its input."""
    from localpipe.stages.config import Config
    from localpipe.stages.models import build_model
    model = build_model(Config(model="test-two-layer", dataset="test-4x4").validate(),
                        (1, 4, 4), 3).eval()
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None  # the output layer starts at zero: no value flows back yet
    assert model.output.linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert not model(x).requires_grad
