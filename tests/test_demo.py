"""`make demo`'s plan: every backbone is pretrained, converted and fine-tuned over the seeds,
random init included, and each stage reads only what an earlier stage writes."""
from pathlib import Path

from slurm.pipeline import RANDOM_INIT
from suite.demo import BACKBONES, PRETRAIN_CONFIG, build_demo_stages


def test_demo_plan_covers_every_backbone_and_seed(tmp_path):
    stages = build_demo_stages(tmp_path, tmp_path / "shapes", seeds=2)
    names = [s.name for s in stages]
    for b in BACKBONES:
        assert f"pretrain/{b}" in names and f"convert/{b}" in names
    transfers = [s for s in stages if s.name.startswith("transfer/")]
    assert len(transfers) == 2 * (len(BACKBONES) + 1)
    assert {s.name.split("/")[1] for s in transfers} == {*BACKBONES, RANDOM_INIT}
    assert len({s.done_file for s in stages}) == len(stages)  # no two stages share an output
    # random init fine-tunes from nothing; the others from their own converted weights
    for s in transfers:
        weights = s.opts[s.opts.index("MODEL.WEIGHTS") + 1]
        backbone = s.name.split("/")[1]
        if backbone == RANDOM_INIT:
            assert weights == ""
        else:
            assert weights == str(tmp_path / "weights" / f"{backbone}.pkl")
            assert names.index(f"convert/{backbone}") < names.index(s.name)


def test_demo_backbones_are_one_config_two_methods_probed_beside_random_init(tmp_path):
    stages = {s.name: s for s in build_demo_stages(tmp_path, tmp_path / "shapes", seeds=1)}
    mocov2, sane = stages["pretrain/demo_mocov2"], stages["pretrain/demo_sane"]
    assert mocov2.argv == sane.argv and str(PRETRAIN_CONFIG) in sane.argv  # one config, two runs
    opts = lambda s: [o for o in s.opts if not o.startswith(("output_dir=", "data.root="))]  # noqa: E731
    assert opts(mocov2) == ["method=mocov2"] and opts(sane) == ["method=sane"]
    assert sane.opts[1] == f"data.root={tmp_path / 'shapes' / 'imagefolder'}"
    # kNN and linear probe rows for both backbones and for the untrained network
    assert {n for n in stages if n.startswith("probe/")} == {"probe/demo_mocov2/cifar", "probe/demo_sane/cifar",
                                                              f"probe/{RANDOM_INIT}/cifar"}


def test_complete_stages_are_skipped_on_a_second_run(tmp_path):
    from slurm.pipeline import run_sequential

    stages = build_demo_stages(tmp_path, tmp_path / "shapes", seeds=1)
    for s in stages:
        Path(s.done_file).parent.mkdir(parents=True, exist_ok=True)
        Path(s.done_file).write_text("{}")
    lines = []
    assert run_sequential(stages, log=lines.append) == []
    assert all("complete" in line for line in lines) and len(lines) == len(stages)
