"""The loss maths of spec §3 and §5 against values worked out by hand."""
import copy
import math

import pytest
import torch

from localpipe.stages import losses
from localpipe.stages.blocks import FALinear, LocalBlock, Meter, pred_pooling
from localpipe.stages.config import Config


def test_label_similarity_is_one_and_minus_one_over_c_minus_one():
    for classes in (10, 100):
        s = losses.label_similarity(torch.tensor([0, 1, 0, 7]), classes)
        off = -1.0 / (classes - 1)
        expected = torch.tensor([[1, off, 1, off], [off, 1, off, off],
                                 [1, off, 1, off], [off, off, off, 1]])
        assert torch.allclose(s, expected, atol=1e-6)


def test_std_reduction_by_hand():
    # Per-channel spatial std of sample 0 is (0, s, 0, s) and of sample 1 (s, 0, s, 0): after
    # row centring they point in opposite directions. Sample 2 is sample 0 times 3.
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    x0 = torch.stack([a, b, a + 5, b - 1])
    x1 = torch.stack([b, a, b, a])
    x = torch.stack([x0, x1, 3 * x0])
    s = losses.similarity_matrix(x)
    expected = torch.tensor([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]])
    assert torch.allclose(s, expected, atol=1e-6)
    # the channel-wise std is the unbiased one: std of (0, 2, 0, 2) is 2/sqrt(3)
    assert math.isclose(b.flatten().std().item(), 2 / math.sqrt(3), rel_tol=1e-6)


def test_images_and_single_rows_are_flattened():
    x = torch.randn(5, 3, 4, 4)  # C <= 3: flattened even with the std reduction on
    flat = x.flatten(1)
    centred = flat - flat.mean(1, keepdim=True)
    norm = centred / (1e-8 + centred.norm(dim=1, keepdim=True))
    assert torch.allclose(losses.similarity_matrix(x), (norm @ norm.t()).clamp(-1, 1))
    y = torch.randn(5, 8, 1, 4)  # H == 1: flattened too
    assert torch.allclose(losses.similarity_matrix(y), losses.similarity_matrix(y.flatten(1)))


def test_norm_epsilon_is_added_outside_the_root_and_result_clamped():
    x = torch.zeros(2, 4)  # centred rows are zero: 0 / (1e-8 + 0) stays 0, no NaN
    assert torch.equal(losses.similarity_matrix(x), torch.zeros(2, 2))
    s = losses.similarity_matrix(torch.randn(16, 32))
    assert s.max() <= 1 and s.min() >= -1


def test_sim_loss_is_mean_over_all_pairs():
    hs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # S(hs) = [[1, -1], [-1, 1]]
    target = torch.zeros(2, 2)
    assert math.isclose(losses.sim_loss(hs, target).item(), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("channels,size,dim,kernel,padding,out,total", [
    (128, 28, 1024, (16, 8), (8, 4), (2, 4), 1024),   # vgg8b 28x28, D*=1024
    (256, 28, 1024, (16, 16), (8, 8), (2, 2), 1024),
    (512, 7, 1024, (8, 4), (4, 2), (1, 2), 1024),
    (512, 3, 1024, (4, 2), (2, 1), (1, 2), 1024),
    (128, 32, 2048, (8, 8), (0, 0), (4, 4), 2048),    # vgg8b 32x32, D*=2048
    (128, 32, 4096, (8, 4), (0, 0), (4, 8), 4096),    # D*=4096
    (384, 32, 4096, (16, 8), (0, 0), (2, 4), 3072),   # vgg11b x3: D below D*
    (1536, 4, 4096, (4, 2), (0, 0), (1, 2), 3072),
    (128, 48, 2048, (16, 16), (0, 0), (3, 3), 1152),  # STL-10
    (256, 48, 2048, (32, 16), (16, 0), (2, 3), 1536),
    (1024, 3, 4096, (2, 2), (1, 1), (2, 2), 4096),    # vgg8b x2 28x28
])
def test_pred_pooling_rule_matches_the_tables(channels, size, dim, kernel, padding, out, total):
    p = pred_pooling(channels, size, dim)
    assert (p.kernel, p.padding, p.out, p.dim) == (kernel, padding, out, total)
    pool = torch.nn.AvgPool2d(p.kernel, p.kernel, p.padding)
    assert pool(torch.zeros(1, channels, size, size)).shape[2:] == out


def test_feedback_alignment_backward_uses_b_not_w():
    torch.manual_seed(0)
    fa = FALinear(6, 4)
    fa.weight.data.normal_()
    x = torch.randn(3, 6, requires_grad=True)
    g = torch.randn(3, 4)
    fa(x).backward(g)
    assert torch.allclose(x.grad, g @ fa.feedback)
    assert not torch.allclose(x.grad, g @ fa.weight)
    assert torch.allclose(fa.weight.grad, g.t() @ x.detach())
    assert torch.allclose(fa.bias.grad, g.sum(0))
    assert fa.feedback.grad is None and not fa.feedback.requires_grad


def test_fa_head_starts_at_zero_and_bio_target_is_the_sign_of_the_label_code():
    fa = FALinear(5, 3)
    assert torch.equal(fa.weight, torch.zeros(3, 5)) and torch.equal(fa.bias, torch.zeros(3))
    proj = torch.tensor([[1.0, -2.0], [-0.5, 0.3], [0.2, 0.1]])
    code = losses.bio_target(proj, torch.tensor([1, 0]))
    assert torch.equal(code, torch.tensor([[-2.0, 0.3, 0.1], [1.0, -0.5, 0.2]]))


@pytest.mark.parametrize("conv", [None, (3, 1, 1)])
def test_handed_on_output_is_the_pre_update_forward(conv):
    cfg = Config(dropout=0.0)
    torch.manual_seed(0)
    shape = (16, 8, 6, 6) if conv else (16, 8)
    block = LocalBlock(1, cfg, 10, 8, 12, conv, size=6, max_pool=conv is not None)
    block.make_optimizer()
    before = copy.deepcopy(block)
    x, y = torch.randn(*shape), torch.randint(10, (16,))
    out, update = block.train_step(x, y)
    update()
    with torch.no_grad():
        expected = before.handoff(before.features(x))
        after = block.handoff(block.features(x))
    assert torch.equal(out, expected)
    assert not torch.equal(out, after), "the update should have changed the block"
    assert not out.requires_grad


def test_predsim_weights_and_output_scale():
    assert losses.sup_weights("predsim", 0.99) == (pytest.approx(0.01), 0.99)
    assert losses.sup_weights("pred", 0.99) == (1.0, 0.0)
    assert losses.output_loss_scale("predsim", 0.99, backprop=False) == pytest.approx(0.01)
    assert losses.output_loss_scale("predsim", 0.99, backprop=True) == 1.0


def test_meter_averages_per_example_and_counts_errors_in_percent():
    m = Meter()
    m.add(4, loss=torch.tensor(1.0), errors=torch.tensor(1))
    m.add(2, loss=torch.tensor(4.0), errors=torch.tensor(2))
    got = m.take()
    assert got["n"] == 6 and got["loss"] == pytest.approx(2.0) and got["error"] == pytest.approx(50)
    assert got["loss_sim"] is None and m.take()["n"] == 0


def test_meter_takes_a_quantity_some_batches_lack_and_keeps_its_checkpoint_format():
    """A user's loss may record a part in some batches only; a non-finite batch is counted
    apart; the state is what checkpoints have always held, and loads back to the same."""
    m = Meter()
    m.add(4, loss=torch.tensor(1.0))
    m.add(2, loss=torch.tensor(4.0), loss_sim=torch.tensor(3.0), other=torch.tensor(9.0))
    m.add(2, loss=torch.tensor(2.0))
    m.add(2, loss=torch.tensor(float("nan")), loss_sim=torch.tensor(1.0))
    state = m.state()
    assert set(state) == {"loss", "loss_sim", "n", "nonfinite"}
    assert state["n"].item() == 8 and state["nonfinite"].item() == 1
    again = Meter()
    again.load(state, torch.device("cpu"))
    assert again.take() == m.take() == {"n": 8, "nonfinite": 1, "loss": 2.0, "loss_sim": 0.75,
                                        "loss_pred": None, "error": None}


@pytest.mark.parametrize("n,classes", [(128, 10), (7, 100), (33, 200), (1, 3)])
def test_pred_loss_has_cross_entropys_gradients_bit_for_bit(n, classes):
    """The one-hot cross-entropy (deterministic on a GPU) trains exactly as ``F.cross_entropy``
    would: its gradients are equal bit for bit on the CPU; the loss values agree to rounding."""
    torch.manual_seed(n)
    for scale in (1.0, 30.0):
        logits = (torch.randn(n, classes) * scale).requires_grad_()
        y = torch.randint(0, classes, (n,))
        ours, theirs = losses.pred_loss(logits, y), torch.nn.functional.cross_entropy(logits, y)
        grad_ours, = torch.autograd.grad(ours, logits)
        grad_theirs, = torch.autograd.grad(theirs, logits)
        assert torch.equal(grad_ours, grad_theirs)
        torch.testing.assert_close(ours, theirs)
