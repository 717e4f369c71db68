"""The trainer learns: a short run of the real trainer (`pretrain.engine.train`, deterministic,
one thread) on 64 tiny generated images raises the instance-discrimination top-1 (`inst_top1`:
the positive key's logit is the largest of the s + b candidates of the vanilla query) to
several times its random-init value, and brings the vanilla loss clearly below ln(s + b), the
loss of features that cannot tell the candidates apart.

The random-init value is measured by the same trainer with optim.lr=0 (the same network and
views, never updated). With the optimizer step disabled (torch.optim.SGD.step a no-op) the
assertions fail: inst_top1 5.4 -> 8.4 %, loss 3.384 -> 3.399 (README, "learning test").

Choices, for a run of ~30 s on one core:
- method mocov2_inbatch (queue, EMA key encoder, shuffle-BN, in-batch negatives: the trainer's
  whole contrastive path; SLR and MM have their own tests). SANE learns the same set too, but
  its MM term halves the vanilla query's share of the loss: ~28 % after 120 steps, too close to
  3x its random-init ~9 % for a test.
- queue b = batch s = 16: a longer queue holds keys of an older key encoder, and at m = 0.9 a
  run of this length learns nothing (b = 48: 3.8 -> 7.5 %).
- the set: at 16-32 px, MoCo v2's augmentation leaves a random network nearly nothing to match
  on natural-looking images, and a few hundred CPU steps stay at chance (docs/label_quality.md).
  Each image here is a mirror-symmetric 4x4 layout of two colours: its identity survives the
  crop (scale 0.8-1), flip, colour jitter and grayscale, so learning shows within ~100 steps.
"""
import json
import math
import statistics

import numpy as np
import pytest
from PIL import Image

from pretrain.config import load_config
from pretrain.engine import train

BATCH, QUEUE = 16, 16   # s, b: candidates of the vanilla query = s + b = 32 (in-batch keys + queue)
RECIPE = [  # ResNet-18 at 16 px (layer4 at 1x1): a step costs ~0.15 s on one core
    "method=mocov2_inbatch", "model.arch=resnet18", "model.dim=32", f"model.queue={QUEUE}",
    "model.m=0.9", "data.crop=16", "data.scale=[0.8,1.0]", f"data.batch_size={BATCH}",
    "optim.lr=0.8", "deterministic=true", "device=cpu", "cpu_threads=1", "data.num_workers=0",
    "knn.every_epochs=0", "log.every_iters=1", "log.progress=false", "log.tensorboard=false",
    "checkpoint.every_iters=0", "checkpoint.save_every_epochs=0",
]
EPOCHS = 30        # 4 steps an epoch: 120 steps
IMAGES = 64
WINDOW = 20        # steps averaged for the end value (16 queries a step)


@pytest.fixture(scope="module")
def patterns(module_tmp):
    """64 distinct mirror-symmetric 4x4 two-colour layouts at 16 px, one unlabelled folder."""
    root = module_tmp("patterns")
    folder = root / "train" / "all"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, code in enumerate(rng.choice(256, IMAGES, replace=False)):
        half = np.array([(code >> b) & 1 for b in range(8)]).reshape(4, 2)
        mask = np.concatenate([half, half[:, ::-1]], axis=1)[..., None]
        fg, bg = rng.integers(128, 256, 3), rng.integers(0, 100, 3)
        img = (mask * fg + (1 - mask) * bg).astype(np.uint8)
        Image.fromarray(img).resize((16, 16), Image.NEAREST).save(folder / f"{i:02d}.png")
    return root


def train_records(root, out, *extra):
    train(load_config(None, [*RECIPE, f"data.root={root}", f"output_dir={out}", *extra]))
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"]


def measure(root, tmp_path):
    """(random-init inst_top1 and vanilla loss, end inst_top1 and vanilla loss) of two runs."""
    # after step 1 the queue holds real keys (b = s): steps 2.. measure the untrained network
    control = train_records(root, tmp_path / "lr0", "optim.lr=0.0", "epochs=4")[1:]
    run = train_records(root, tmp_path / "run", f"epochs={EPOCHS}")[-WINDOW:]
    mean = lambda recs, key: statistics.fmean(r[key] for r in recs)  # noqa: E731
    return (mean(control, "inst_top1"), mean(control, "loss_vanilla"),
            mean(run, "inst_top1"), mean(run, "loss_vanilla"))


@pytest.mark.slow
def test_short_run_raises_instance_top1_and_lowers_the_loss(patterns, tmp_path):
    start_top1, start_loss, end_top1, end_loss = measure(patterns, tmp_path)
    chance = math.log(BATCH + QUEUE)
    numbers = (f"inst_top1 {start_top1:.1f} -> {end_top1:.1f} %, vanilla loss {start_loss:.3f} -> "
               f"{end_loss:.3f} (ln(s + b) = {chance:.3f})")
    print(numbers)  # pytest -s shows them
    assert abs(start_loss - chance) < 0.25, numbers       # the untrained network is at chance
    assert end_top1 >= 3 * start_top1, numbers
    assert end_loss < chance - 0.5, numbers
