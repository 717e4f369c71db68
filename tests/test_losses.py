"""SLR and momentum-mixup math on small hand-computed cases (docs/method.md symbols)."""
import math

import pytest
import torch

from pretrain import losses as L

# Row 0: p_0 = [.5, .25, .25], q_0 = [0, .5, .5]; row 1: p_1 = uniform, q_1 = [.5, 0, .5].
KEY_LOGITS = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_slr_hand_computed():
    y_bar, p, q, alpha, beta, z = L.slr_labels(KEY_LOGITS, mu=1.0)
    torch.testing.assert_close(p[0], torch.tensor([0.5, 0.25, 0.25]))
    torch.testing.assert_close(q[1], torch.tensor([0.5, 0.0, 0.5]))
    # z_0 = 1 + .5 + .5, α_0 = β_0 = .25; z_1 = 1 + 1/3 + 1/2, α_1 = 2/11, β_1 = 3/11
    torch.testing.assert_close(z, torch.tensor([2.0, 11 / 6]))
    torch.testing.assert_close(alpha, torch.tensor([0.25, 2 / 11]))
    torch.testing.assert_close(beta, torch.tensor([0.25, 3 / 11]))
    torch.testing.assert_close(y_bar[0], torch.tensor([0.625, 0.1875, 0.1875]))
    side = 2 / 33 + 1.5 / 11
    torch.testing.assert_close(y_bar[1], torch.tensor([side, 6 / 11 + 2 / 33, side]))
    # the one-hot weight is 1 / z
    torch.testing.assert_close(1 - alpha - beta, 1 / z)


def test_slr_rows_sum_to_one_and_q_diag_zero():
    torch.manual_seed(0)
    logits = torch.randn(5, 13) * 3
    y_bar, p, q, *_ = L.slr_labels(logits, mu=4.0)
    torch.testing.assert_close(y_bar.sum(1), torch.ones(5))
    assert torch.all(q.diagonal() == 0)
    assert torch.all(y_bar >= 0)


def test_slr_mu_zero_is_one_hot():
    y_bar, *_ = L.slr_labels(torch.randn(4, 9), mu=0.0)
    assert torch.equal(y_bar, L.one_hot_labels(4, 9))


def test_slr_switches():
    y_p, _, _, alpha, beta, z = L.slr_labels(KEY_LOGITS, mu=1.0, use_q=False)
    torch.testing.assert_close(beta, torch.zeros(2))
    torch.testing.assert_close(z, torch.tensor([1.5, 4 / 3]))
    torch.testing.assert_close(y_p[0], torch.tensor([2 / 3 + 0.5 / 3, 0.25 / 3, 0.25 / 3]))
    y_q, _, _, alpha, _, z = L.slr_labels(KEY_LOGITS, mu=1.0, use_p=False)
    torch.testing.assert_close(alpha, torch.zeros(2))
    torch.testing.assert_close(y_q[0], torch.tensor([2 / 3, 1 / 6, 1 / 6]))
    y_none, *_ = L.slr_labels(KEY_LOGITS, mu=5.0, use_p=False, use_q=False)
    assert torch.equal(y_none, L.one_hot_labels(2, 3))


def test_slr_no_gradient():
    logits = torch.randn(3, 7, requires_grad=True)
    y_bar, *_ = L.slr_labels(logits, mu=1.0)
    assert not y_bar.requires_grad


def test_mu_schedule_cosine_ramp():
    assert L.mu_schedule(0, 100, 0.5, 10.0) == pytest.approx(0.5)
    assert L.mu_schedule(50, 100, 0.5, 10.0) == pytest.approx(5.25)
    assert L.mu_schedule(100, 100, 0.5, 10.0) == pytest.approx(10.0)


def test_soft_cross_entropy_matches_hard_ce_on_one_hot():
    logits = torch.randn(4, 10)
    ce = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    torch.testing.assert_close(L.soft_cross_entropy(logits, L.one_hot_labels(4, 10)), ce)
    y = torch.tensor([[0.5, 0.5, 0.0]])
    lg = torch.tensor([[0.0, 0.0, 0.0]])
    torch.testing.assert_close(L.soft_cross_entropy(lg, y), torch.tensor(math.log(3)))


def test_mixup_theta_one_is_identity():
    x, xt = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    perm = torch.tensor([2, 0, 3, 1])
    ones = torch.ones(4)
    assert torch.equal(L.mix_images(x, xt, ones, perm), x)
    y = torch.rand(4, 9)
    assert torch.equal(L.mix_labels(y, ones, perm), y)


def test_mixup_mixes_query_with_permuted_key_and_labels():
    x, xt = torch.zeros(2, 1, 2, 2), torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    theta, perm = torch.tensor([0.25, 0.5]), torch.tensor([1, 0])
    mixed = L.mix_images(x, xt, theta, perm)
    assert torch.allclose(mixed[0], torch.full((1, 2, 2), 0.75 * 2.0))
    assert torch.allclose(mixed[1], torch.full((1, 2, 2), 0.5 * 1.0))
    y = L.one_hot_labels(2, 4)
    y_mix = L.mix_labels(y, theta, perm)
    torch.testing.assert_close(y_mix, torch.tensor([[0.25, 0.75, 0, 0], [0.5, 0.5, 0, 0]]))
    torch.testing.assert_close(y_mix.sum(1), torch.ones(2))


def test_theta_beta_distribution():
    torch.manual_seed(0)
    th = L.sample_theta(20000, 2.0)
    assert th.min() >= 0 and th.max() <= 1
    assert th.mean().item() == pytest.approx(0.5, abs=0.01)
    assert th.var().item() == pytest.approx(1 / 20, abs=0.005)  # Beta(2,2): 1/(4·5)


def test_total_loss_lambda():
    assert L.total_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(2.5)
    assert L.total_loss(torch.tensor(2.0), torch.tensor(4.0), 0.0).item() == pytest.approx(2.0)


def test_label_quality():
    y_bar = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    q_cls, k_cls = torch.tensor([0, 1]), torch.tensor([0, 1, 0])
    out = L.label_quality(y_bar, q_cls, k_cls)
    assert out["slr_same_class_mass"].item() == pytest.approx((0.7 + 0.6) / 2)
    assert out["onehot_same_class_mass"].item() == pytest.approx(1.0)
    # y*_0 = [.5, 0, .5]: |0|+.3+.3 ; y*_1 = [0,1,0]: .1+.4+.3; one-hot: 1, 0
    assert out["slr_label_error"].item() == pytest.approx((0.6 + 0.8) / 2)
    assert out["onehot_label_error"].item() == pytest.approx((1.0 + 0.0) / 2)
    # mass on same-class keys other than the own positive: row 0 key 2 (.2), row 1 none
    assert out["slr_other_same_class_mass"].item() == pytest.approx((0.2 + 0.0) / 2)


def test_label_quality_other_mass_skips_positive_and_unknown_keys():
    # keys: 2 in-batch (classes 0, 1), queue of 3: class 0, unknown (-1, random init), class 1
    y_bar = torch.tensor([[0.4, 0.1, 0.2, 0.3, 0.0], [0.0, 0.5, 0.1, 0.25, 0.15]])
    out = L.label_quality(y_bar, torch.tensor([0, 1]), torch.tensor([0, 1, 0, -1, 1]))
    assert out["slr_other_same_class_mass"].item() == pytest.approx((0.2 + 0.15) / 2)
    assert out["slr_same_class_mass"].item() == pytest.approx((0.6 + 0.65) / 2)
    # y*_0 = [.5, 0, .5, 0, 0] (the unknown key is not in y*): .1+.1+.3+.3; y*_1: 0+.1+.25+.35
    assert out["slr_label_error"].item() == pytest.approx((0.8 + 0.7) / 2)
    # a one-hot ȳ (SLR at μ = 0) adds no other-same-class mass and scores as one-hot
    onehot = L.label_quality(L.one_hot_labels(2, 5), torch.tensor([0, 1]), torch.tensor([0, 1, 0, -1, 1]))
    assert onehot["slr_other_same_class_mass"].item() == 0.0
    assert onehot["slr_label_error"].item() == pytest.approx(onehot["onehot_label_error"].item())


def test_label_quality_moved_mass_and_chance_share():
    # same keys as above: ȳ moves .6 (row 0) and .5 (row 1) off the own positive
    y_bar = torch.tensor([[0.4, 0.1, 0.2, 0.3, 0.0], [0.0, 0.5, 0.1, 0.25, 0.15]])
    out = L.label_quality(y_bar, torch.tensor([0, 1]), torch.tensor([0, 1, 0, -1, 1]))
    assert out["slr_moved_mass"].item() == pytest.approx((0.6 + 0.5) / 2)
    # of the 4 other keys, row 0 has 1 of class 0 (key 2), row 1 has 1 of class 1 (key 4)
    assert out["other_same_class_key_share"].item() == pytest.approx((1 / 4 + 1 / 4) / 2)
    # a label spread uniformly over the other keys lands on the class at exactly that share
    uniform = torch.tensor([[0.0, 0.25, 0.25, 0.25, 0.25], [0.25, 0.0, 0.25, 0.25, 0.25]])
    u = L.label_quality(uniform, torch.tensor([0, 1]), torch.tensor([0, 1, 0, -1, 1]))
    assert u["slr_on_class_share"].item() == pytest.approx(u["other_same_class_key_share"].item())
    assert out["slr_on_class_share"].item() == pytest.approx((0.2 + 0.15) / (0.6 + 0.5))


def test_instance_top1_counts_rows_whose_positive_logit_is_largest():
    logits = torch.tensor([[3.0, 1.0, 2.0],    # positive (column 0) largest
                           [1.0, 2.0, 0.0],    # positive (column 1) largest
                           [5.0, 1.0, 4.0],    # positive (column 2) loses to column 0
                           [0.0, 1.0, 2.0]])   # positive (column 0) smallest
    top1 = L.instance_top1(logits, torch.tensor([0, 1, 2, 0]))
    assert top1.dim() == 0 and top1.item() == 50.0
