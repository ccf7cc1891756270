"""Training on the real MNIST: every variant learns, and a run is reproducible from its seed.
(Two epochs of the paper's MLP recipe, and their records, are in test_outputs.py.)"""
import pytest

from localpipe.launch.pipeline import main

from conftest import assert_same_model, load_model, metrics

SMALL = ["--no-curves", "--dataset", "MNIST", "--limit-train", "6400", "--limit-test", "1000",
         "--batch-size", "64", "--epochs", "1", "--threads", "2"]


@pytest.mark.parametrize("variant,limit", [
    (["--model", "mlp", "--num-layers", "2", "--num-hidden", "256", "--backprop"], 30),
    (["--model", "mlp", "--num-layers", "2", "--num-hidden", "256", "--loss-sup", "pred"], 30),
    (["--model", "mlp", "--num-layers", "2", "--num-hidden", "256", "--loss-sup", "sim",
      "--nonlin", "leakyrelu"], 30),
    (["--model", "mlp", "--num-layers", "2", "--num-hidden", "256", "--bio", "--nonlin",
      "leakyrelu", "--beta", "0.01"], 30),
    (["--model", "mlp", "--num-layers", "2", "--num-hidden", "256", "--no-detach"], 30),
    (["--model", "vgg8b", "--feat-mult", "0.25", "--num-hidden", "128", "--dim-in-decoder",
      "1024", "--nonlin", "leakyrelu", "--limit-train", "3200"], 60),
])
def test_every_variant_learns(mnist_root, tmp_path, variant, limit):
    assert main(SMALL + variant + ["--data-root", mnist_root, "--save-dir", str(tmp_path)]) == 0
    record = metrics(tmp_path)[0]
    assert record["test_error"] < limit, record["test_error"]  # chance is 90%


def test_same_seed_gives_the_same_model(mnist_root, tmp_path):
    args = ["--no-curves", "--model", "mlp", "--num-layers", "2", "--num-hidden", "64",
            "--dataset", "MNIST", "--data-root", mnist_root, "--limit-train", "640",
            "--limit-test", "100",
            "--epochs", "2", "--dropout", "0.3", "--cutout", "--length", "14",
            "--threads", "1"]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert main(args + ["--seed", seed, "--save-dir", str(tmp_path / name)]) == 0
    assert_same_model(load_model(tmp_path / "a"), load_model(tmp_path / "b"))
    with pytest.raises(AssertionError):
        assert_same_model(load_model(tmp_path / "a"), load_model(tmp_path / "c"))
