"""Theorem 2 on synthetic clusters (tools/theorem2.py): the refinery recovers every corrupted
label below the bound ρ ≤ δ/8, and α = 0 leaves the corrupted labels wrong."""
import inspect
import json
import math

import pytest
import torch

from suite import theorem2 as t2

SEEDS = (0, 1, 2)  # the CLI's default seed set
RHO = 0.1  # below the bound δ/8 = 0.125 for the default K̄ = 3 class values {-1, 0, 1}
ALPHA = 0.9


@pytest.fixture(scope="module")
def records():
    """The default setting, restricted to one ρ and α ∈ {0, 0.9}: about 1 s a seed."""
    return [r for s in SEEDS for r in t2.run(s, [RHO], [0.0, ALPHA])]


def test_rho_is_below_the_theorem_bound():
    assert RHO <= t2.theorem_bound(3) == pytest.approx(0.125)


def test_refinery_recovers_every_label_below_the_bound(records):
    refined = [r for r in records if r["alpha"] == ALPHA]
    assert len(refined) == len(SEEDS)
    for r in refined:
        assert r["corrupted_fraction"] == pytest.approx(RHO)
        assert r["recovery"] == 1.0, r  # exact recovery of every true label
        assert r["test_error"] == 0.0, r  # and zero prediction error on fresh crops


def test_alpha_zero_keeps_the_corrupted_labels_wrong(records):
    for r in (r for r in records if r["alpha"] == 0.0):
        assert r["recovery"] == pytest.approx(1.0 - r["corrupted_fraction"])
        assert r["recovery"] == pytest.approx(1.0 - RHO, abs=0.01)


def test_cli_defaults_are_the_setting_the_tests_run():
    args = vars(t2.parse_args([]))
    args["num_classes"] = args.pop("classes")
    for name, param in inspect.signature(t2.run).parameters.items():
        if param.default is not inspect.Parameter.empty:
            assert args[name] == param.default, name
    assert list(SEEDS) == args["seed"] and RHO in args["rho"] and ALPHA in args["alpha"]


def test_make_clusters_geometry():
    g = torch.Generator().manual_seed(0)
    x, cluster, centres = t2.make_clusters(k=5, n_per_cluster=20, dim=8, eps=0.1, generator=g)
    assert x.shape == (100, 8) and cluster.bincount().tolist() == [20] * 5
    gram = centres @ centres.T
    assert torch.allclose(gram, torch.eye(5), atol=1e-5)  # unit norm, well separated (√2 apart)
    dist = (x - centres[cluster]).norm(dim=1)
    assert dist.max() <= 0.1 + 1e-6 and dist.min() > 0
    with pytest.raises(ValueError, match="--dim"):
        t2.make_clusters(k=5, n_per_cluster=2, dim=4, eps=0.1, generator=g)


def test_corrupt_labels_flips_exactly_rho_of_each_cluster():
    g = torch.Generator().manual_seed(0)
    cluster = torch.arange(4).repeat_interleave(30)
    label = cluster % 3
    noisy = t2.corrupt_labels(label, cluster, 0.2, 3, g)
    assert torch.equal(label, cluster % 3)  # the input is left untouched
    flipped = noisy != label
    assert [int(flipped[cluster == c].sum()) for c in range(4)] == [6] * 4
    assert noisy.min() >= 0 and noisy.max() <= 2
    with pytest.raises(ValueError, match="--rho"):
        t2.corrupt_labels(label, cluster, 1.0, 3, g)


def test_refined_labels_schedule_and_initial_network():
    y, f = torch.tensor([1.0, -1.0]), torch.tensor([0.2, 0.4])
    assert torch.allclose(t2.refined_labels(y, f, 0.75), torch.tensor([0.4, 0.05]))
    assert t2.alpha_schedule(0.9, 0, 100, 0.5) == 0.0
    assert t2.alpha_schedule(0.9, 25, 100, 0.5) == pytest.approx(0.45)
    assert t2.alpha_schedule(0.9, 80, 100, 0.5) == pytest.approx(0.9)
    W = t2.init_weights(16, 4, torch.Generator().manual_seed(0))[None]
    x = torch.randn(7, 4, dtype=t2.DTYPE)
    assert t2.network(W, x, t2.output_weights(16)).abs().max() < 1e-5  # paired init: f(W₀, ·) = 0
    v = t2.output_weights(16)
    assert v.norm() == pytest.approx(1.0) and (v > 0).sum() == 8


def test_recovery_rounds_to_the_nearest_class_value():
    table = t2.class_values(3)  # {-1, 0, 1}
    y_bar = torch.tensor([[0.9, 0.4, -0.6, 0.6]])
    assert t2.recovery(y_bar, torch.tensor([2, 1, 0, 1]), table).item() == pytest.approx(0.75)


def test_cli_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    t2.main(["--seed", "0", "--rho", "0.1", "--alpha", "0.9", "--k", "4", "--n-per-cluster", "10",
             "--dim", "8", "--width", "16", "--steps", "50", "--json", str(out_json), "--plot", str(out_png)])
    table = capsys.readouterr().out
    assert "| 0.1 ≤ δ/8 |" in table and "α=0 (corrupted y only)" in table
    data = json.loads(out_json.read_text())
    assert [r["alpha"] for r in data["records"]] == [0.0, 0.9]  # the α = 0 baseline is always run
    assert math.isclose(data["bound_rho"], 0.125)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]  # no temp files left


@pytest.mark.parametrize("argv", [["--rho", "1.5"], ["--alpha", "-0.1"], ["--dim", "4", "--k", "10"],
                                  ["--eps", "0.9"], ["--width", "7"]])
def test_cli_bad_input_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        t2.main(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err
