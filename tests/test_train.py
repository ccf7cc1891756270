"""Training on the real MNIST: the paper's MLP recipe reaches its accuracy, every variant learns,
and a run is reproducible from its seed."""
import pytest

from launch.pipeline import main

from conftest import assert_same_model, load_model, metrics

# §8.2 row 4 (MNIST, mlp, predsim), with fewer epochs.
MLP_PREDSIM = ["--model", "mlp", "--dataset", "MNIST", "--num-layers", "3", "--dropout", "0.1",
               "--lr", "5e-4", "--lr-decay-milestones", "50", "75", "89", "94", "--nonlin",
               "leakyrelu", "--loss-sup", "predsim"]


def test_mlp_predsim_recipe_reaches_the_papers_accuracy(mnist_root, tmp_path):
    assert main(MLP_PREDSIM + ["--epochs", "3", "--data-root", mnist_root,
                               "--save-dir", str(tmp_path)]) == 0
    records = metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[0]["test_error"] < 4.0, records[0]["test_error"]
    assert records[2]["test_error"] < 2.5, records[2]["test_error"]
    assert records[0]["train_samples"] == 60000 and records[0]["test_samples"] == 10000
    for key in ("lr", "train_loss_local", "train_loss_global", "train_error", "test_loss",
                "samples_per_s", "peak_memory_bytes"):
        assert records[0][key] is not None and records[0][key] > 0, key
    assert len(records[0]["blocks"]) == 3
    assert all(b["test_error"] < 10 for b in records[2]["blocks"])  # the local heads learn too
    assert (tmp_path / "args.json").exists() and (tmp_path / "model.pt").exists()


SMALL = ["--dataset", "MNIST", "--limit-train", "6400", "--limit-test", "1000", "--batch-size",
         "64", "--epochs", "1", "--threads", "2"]


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
    args = ["--model", "mlp", "--num-layers", "2", "--num-hidden", "64", "--dataset", "MNIST",
            "--data-root", mnist_root, "--limit-train", "640", "--limit-test", "100",
            "--epochs", "2", "--dropout", "0.3", "--cutout", "--length", "14",
            "--threads", "1"]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert main(args + ["--seed", seed, "--save-dir", str(tmp_path / name)]) == 0
    assert_same_model(load_model(tmp_path / "a"), load_model(tmp_path / "b"))
    with pytest.raises(AssertionError):
        assert_same_model(load_model(tmp_path / "a"), load_model(tmp_path / "c"))
