"""Tests of the probes: the weighted kNN monitor, feature extraction, VOC07 AP and the
linear / VOC07 linear probes on the synthetic corpus."""
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pretrain.knn import extract_features, knn_top1


def _unit(angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float32) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_knn_hand_case_known_answer():
    # two clusters on the circle; each query sits inside one of them
    train = _unit([0, 10, 20, 180, 190, 200])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    test = _unit([5, 185, 15])
    assert knn_top1(train, labels, test, torch.tensor([0, 1, 0]), 2, k=3) == 100.0
    assert knn_top1(train, labels, test, torch.tensor([1, 1, 0]), 2, k=3) == pytest.approx(200 / 3)
    # k is capped at the 6 train samples; all votes tie on counts, the weights still decide
    assert knn_top1(train, labels, test, torch.tensor([0, 1, 0]), 2, k=50) == 100.0


def test_knn_exp_weighting_beats_majority_vote():
    # one class-0 neighbour at cos 0.99, two class-1 neighbours at cos 0.90:
    # exp(0.99/0.05) > 2 exp(0.90/0.05) (e^1.8 > 2), but the majority is class 1
    c0, c1 = math.degrees(math.acos(0.99)), math.degrees(math.acos(0.90))
    train = _unit([c0, c1, -c1])
    labels = torch.tensor([0, 1, 1])
    query, truth = _unit([0]), torch.tensor([0])
    assert knn_top1(train, labels, query, truth, 2, k=3, t=0.05) == 100.0
    assert knn_top1(train, labels, query, truth, 2, k=3, t=1e3) == 0.0   # ~ plain majority


def test_knn_chunking_matches_single_pass():
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    test = torch.nn.functional.normalize(torch.randn(37, 16, generator=g), dim=1)
    ltr, lte = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (37,), generator=g)
    full = knn_top1(train, ltr, test, lte, 5, k=10, chunk_size=1000)
    assert knn_top1(train, ltr, test, lte, 5, k=10, chunk_size=4) == full


def test_extract_features_unit_norm_and_ordered():
    torch.manual_seed(0)
    x = torch.randn(10, 6)
    y = torch.arange(10) % 3
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8))
    net.train()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    feats, labels = extract_features(net, loader, torch.device("cpu"))
    assert feats.shape == (10, 8) and labels.dtype == torch.long
    assert torch.allclose(feats.norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.equal(labels, y)
    net.eval()
    with torch.no_grad():   # eval-mode features, row i belongs to image i
        expected = torch.nn.functional.normalize(net(x), dim=1)
    assert torch.allclose(feats, expected, atol=1e-5)
    net.train()
    extract_features(net, loader, torch.device("cpu"))
    assert net.training   # the caller's mode is restored
