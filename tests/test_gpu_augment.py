"""GPU data path on CPU tensors: fixed parameters reproduce torchvision's functional ops, sampled
parameters follow the CPU path's distributions, and the module returns the CPU path's batch dict."""
import contextlib
import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms.autoaugment import _apply_op

from pretrain import gpu_augment as ga
from pretrain.config import load_config
from pretrain.data import view_transform



def smooth_image(h, w, seed=0):
    """A natural-ish image: upsampled coarse noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8 + 1, w // 8 + 1, generator=g)
    return torch.nn.functional.interpolate(coarse, (h, w), mode="bicubic").clamp(0, 1)[0]


def jpeg_bytes(array, quality=95):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 20, 24, generator=g)


def test_resized_crop_matches_torchvision():
    img = smooth_image(120, 160)
    boxes = torch.tensor([[10, 30, 40, 50], [5, 7, 100, 140], [0, 0, 120, 160]])  # up, down, full
    ours = ga.resized_crops(img, boxes, 48)
    for out, (t, l, h, w) in zip(ours, boxes.tolist()):
        ref = TF.resized_crop(img, t, l, h, w, [48, 48], antialias=True)
        assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("name, lo, hi", [("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4),
                                          ("saturation", 0.6, 1.4), ("hue", -0.1, 0.1)])
def test_colour_ops_per_sample_match_torchvision(batch, name, lo, hi):
    f = torch.linspace(lo, hi, len(batch))
    ours = getattr(ga, f"adjust_{name}")(batch, f)
    ref = torch.stack([getattr(TF, f"adjust_{name}")(x, float(v)) for x, v in zip(batch, f)])
    assert torch.allclose(ours, ref, atol=1e-5)


def test_color_jitter_uses_each_samples_order(batch):
    n = len(batch)
    p = {"jitter": torch.tensor([True, True, False, True, True, True]),
         "order": torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i))
                               for i in range(n)]),
         "brightness": torch.linspace(0.6, 1.4, n), "contrast": torch.linspace(1.4, 0.6, n),
         "saturation": torch.full((n,), 0.7), "hue": torch.linspace(-0.1, 0.1, n)}
    ours = ga.color_jitter(batch, p)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    for i in range(n):
        ref = batch[i]
        if p["jitter"][i]:
            for op in p["order"][i].tolist():
                ref = fns[op](ref, float(p[names[op]][i]))
        assert torch.allclose(ours[i], ref, atol=1e-5), i


def test_grayscale_flip_blur_match_torchvision(batch):
    mask = torch.tensor([True, False, True, False, False, True])
    gray = ga.random_grayscale(batch, mask)
    flip = ga.random_flip(batch, mask)
    for i in range(len(batch)):
        assert torch.allclose(gray[i], TF.rgb_to_grayscale(batch[i], 3) if mask[i] else batch[i])
        assert torch.equal(flip[i], TF.hflip(batch[i]) if mask[i] else batch[i])
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.8])
    blur = ga.gaussian_blur(batch, sigma, 9)
    for i in range(len(batch)):
        ref = TF.gaussian_blur(batch[i], [9, 9], [float(sigma[i])] * 2)
        assert torch.allclose(blur[i], ref, atol=1e-5), i


def test_rand_augment_groups_equal_per_sample_ops():
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(16, 3, 24, 24, generator=g) * 255).to(torch.uint8)
    torch.manual_seed(0)
    ops, signs = ga.sample_randaugment(16, 5, 14)
    ours = ga.rand_augment(x, ops, signs, magnitude=10)
    space = ga.randaugment_space(31, (24, 24))
    names = list(space)
    for i in range(16):
        ref = x[i]
        for r in range(5):
            mags, signed = space[names[ops[i, r]]]
            m = float(mags[10]) if mags.ndim > 0 else 0.0
            m = -m if signed and signs[i, r] else m
            ref = _apply_op(ref, names[ops[i, r]], m, T.InterpolationMode.NEAREST, None)
        assert torch.equal(ours[i], ref), i
    counts = torch.bincount(ga.sample_randaugment(20000, 1, 14)[0].flatten(), minlength=14)
    assert counts.min() > 20000 / 14 * 0.85 and counts.max() < 20000 / 14 * 1.15


def test_crop_boxes_distributed_as_random_resized_crop():
    torch.manual_seed(0)
    n, (h, w) = 4000, (375, 500)
    ours = ga.sample_crop_boxes([(h, w)] * n, (0.2, 1.0), (3 / 4, 4 / 3)).double()
    dummy = torch.zeros(1, 1, 1).expand(1, h, w)
    ref = torch.tensor([T.RandomResizedCrop.get_params(dummy, [0.2, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)]).double()
    for boxes in (ours, ref):   # every box inside the image
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= h).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= w).all()
    area = lambda b: b[:, 2] * b[:, 3] / (h * w)  # noqa: E731
    logr = lambda b: torch.log(b[:, 3] / b[:, 2])  # noqa: E731
    centre = lambda b: (b[:, 0] + b[:, 2] / 2) / h  # noqa: E731
    for stat, tol in ((area, 0.015), (logr, 0.02), (centre, 0.01)):
        assert abs(stat(ours).mean() - stat(ref).mean()) < tol
        assert abs(stat(ours).std() - stat(ref).std()) < tol
    # KS-style bound on the area fraction's empirical CDFs
    grid = torch.linspace(0.2, 1.0, 50)
    cdf = lambda a: (a[:, None] <= grid).double().mean(0)  # noqa: E731
    assert (cdf(area(ours)) - cdf(area(ref))).abs().max() < 0.05
    # no try fits an extreme panorama: both fall back to the same central crop
    pano = torch.zeros(1, 1, 1).expand(1, 10, 1000)
    expect = T.RandomResizedCrop.get_params(pano, [0.9, 1.0], [3 / 4, 4 / 3])
    got = ga.sample_crop_boxes([(10, 1000)] * 3, (0.9, 1.0), (3 / 4, 4 / 3))
    assert all(tuple(b) == tuple(expect) for b in got.tolist())


def test_view_params_distributed_as_torchvision():
    torch.manual_seed(0)
    n = 8000
    p = ga.sample_view_params(n, ga.ViewSpec())
    for key, rate in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("flip", 0.5)):
        assert abs(p[key].float().mean() - rate) < 0.02, key
    first = torch.bincount(p["order"][:, 0], minlength=4) / n      # randperm(4): uniform
    assert (first - 0.25).abs().max() < 0.02
    assert (p["order"].sort(1).values == torch.arange(4)).all()     # each row a permutation
    # ColorJitter(0.4, 0.4, 0.4, 0.1) draws each factor uniformly from these ranges
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    for key in ("brightness", "contrast", "saturation", "hue"):
        lo, hi = getattr(jitter, key)
        x = p[key].double()
        assert lo <= x.min() and x.max() <= hi
        assert abs(x.mean() - (lo + hi) / 2) < 4 * (hi - lo) / math.sqrt(12 * n)
        assert abs(x.std() - (hi - lo) / math.sqrt(12)) < 0.02 * (hi - lo)
    assert 0.1 <= p["sigma"].min() and p["sigma"].max() <= 2.0
    assert abs(p["sigma"].mean() - 1.05) < 0.02


def test_from_config_mirrors_cpu_transforms():
    single = ga.GPUMultiCrop.from_config(load_config())
    assert single.view.size == 224 and single.view.scale == (0.2, 1.0)
    assert single.view.blur_kernel == 23 and single.view.randaugment is None
    assert [v.size for v in single.mm_views] == [96]
    assert single.mm_views[0].scale == (0.086, 0.429) and single.mm_views[0].blur_kernel == 9
    multi = ga.GPUMultiCrop.from_config(load_config(None, ["mm.crops=[224,192,160,128,96]",
                                                           "data.strong_mm=true"]))
    assert [v.size for v in multi.mm_views] == [224, 192, 160, 128, 96]
    assert multi.mm_views[0].scale == (0.2, 1.0) and multi.mm_views[1].scale == (0.086, 0.429)
    assert all(v.randaugment == (5, 10, 31) for v in multi.mm_views)
    moco = ga.GPUMultiCrop.from_config(load_config(None, ["method=mocov2"]))
    assert moco.mm_views == []
    with pytest.raises(ValueError, match="cannot mirror"):
        ga.view_spec(T.Compose([T.RandomResizedCrop(32), T.RandomVerticalFlip()]))


def test_outputs_distributed_as_cpu_path():
    """Same image through both paths many times: grayscale rate and pixel statistics agree."""
    rng = np.random.default_rng(0)
    array = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    data = jpeg_bytes(array)
    n, size = 400, 32
    torch.manual_seed(0)
    cpu_tf = view_transform(size, (0.2, 1.0))
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    cpu = torch.stack([cpu_tf(pil) for _ in range(n)])
    gpu = ga.GPUMultiCrop(ga.view_spec(cpu_tf))([torch.frombuffer(bytearray(data), dtype=torch.uint8)] * n,
                                                "cpu")["q"]
    std = torch.tensor(ga.IMAGENET_STD).view(1, 3, 1, 1)
    mean = torch.tensor(ga.IMAGENET_MEAN).view(1, 3, 1, 1)

    def gray_rate(x):
        x = x * std + mean
        return ((x[:, 0] - x[:, 1]).abs().amax((-2, -1)) < 2e-2).float().mean()

    assert abs(gray_rate(cpu) - 0.2) < 0.06 and abs(gray_rate(gpu) - 0.2) < 0.06  # 3 sd
    for stat in (lambda x: x.mean((-2, -1)), lambda x: x.std((-2, -1))):
        a, b = stat(cpu), stat(gpu)          # per-image statistics, [n, 3]
        assert (a.mean(0) - b.mean(0)).abs().max() < 0.15
        assert (a.std(0) - b.std(0)).abs().max() < 0.1


def test_module_reads_jpeg_folder_and_skips_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            (tmp_path / c / f"{i}.jpg").write_bytes(jpeg_bytes(rng.integers(0, 256, (40 + i, 50, 3),
                                                                            dtype=np.uint8)))
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = ga.RawJPEGFolder(tmp_path)
    assert len(ds) == 7 and ds.classes == ["a", "b"]
    # through worker processes: one shared storage per batch, bytes intact
    loader = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=1, collate_fn=ds.collate,
                                         timeout=60)
    data, labels = next(iter(loader))
    assert len({d.untyped_storage().data_ptr() for d in data}) == 1
    assert bytes(data[0].numpy()) == (tmp_path / "a" / "0.jpg").read_bytes()
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1] and data[0].dtype == torch.uint8
    cfg = load_config(None, ["data.crop=32", "mm.crops=[32,16]", "data.strong_mm=true"])
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="undecodable"):
        out = ga.GPUMultiCrop.from_config(cfg)(data, "cpu")
    assert out["skipped"] == 1
    assert out["q"].shape == out["k"].shape == (7, 3, 32, 32) and out["q"].dtype == torch.float32
    assert [m.shape[-1] for m in out["mm"]] == [32, 16]
    assert not torch.equal(out["q"], out["k"])                  # independent views
    lo = (0 - max(ga.IMAGENET_MEAN)) / min(ga.IMAGENET_STD)
    hi = (1 - min(ga.IMAGENET_MEAN)) / min(ga.IMAGENET_STD)
    assert out["q"].min() >= lo - 1e-4 and out["q"].max() <= hi + 1e-4
    with pytest.raises(RuntimeError, match="no image"):
        ga.GPUMultiCrop.from_config(cfg)([data[-1]], "cpu")


@pytest.mark.gpu
def test_cuda_decode_and_views_match_cpu():
    rng = np.random.default_rng(0)
    blocks = [np.kron(rng.integers(0, 256, (8 + i, 10, 3)), np.ones((8, 8, 1))).astype(np.uint8)
              for i in range(4)]   # smooth: nvJPEG and libjpeg differ only by IDCT/upsampling
    data = [torch.frombuffer(bytearray(jpeg_bytes(b)), dtype=torch.uint8) for b in blocks]
    cpu = ga.decode_jpegs(data, "cpu")
    gpu = ga.decode_jpegs(data, "cuda")
    for a, b in zip(cpu, gpu):
        assert b.is_cuda and a.shape == b.shape
        assert (a.float() - b.cpu().float()).abs().mean() < 3
    out = ga.GPUMultiCrop.from_config(load_config())(data, "cuda")
    assert out["q"].is_cuda and out["mm"][0].shape == (4, 3, 96, 96)
    assert math.isfinite(float(out["q"].sum()))


# ---------------------------------------------------------------- issue 7 follow-up: NaN on CUDA
class FakeStream:
    def __init__(self, log):
        self.log = log

    def synchronize(self):
        self.log.append("sync")


def test_cuda_decode_drains_the_current_stream_first(monkeypatch):
    """nvJPEG writes blocks that queued kernels of the caller's stream may still read: the
    stream must be drained before the decode call. A PNG skips nvJPEG (it would fail the batch)."""
    log = []
    monkeypatch.setattr(ga.torch.cuda, "current_stream", lambda device=None: FakeStream(log))

    def fake_decode(data, mode, device):
        log.append(("decode", len(data)))
        return [ga._decode_cpu(d) for d in data]

    monkeypatch.setattr(ga, "decode_jpeg", fake_decode)
    monkeypatch.setattr(ga, "_upload", lambda im, device: im)
    rng = np.random.default_rng(0)
    jpegs = [jpeg_bytes(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)) for _ in range(3)]
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, "PNG")
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (jpegs[0], buf.getvalue(), *jpegs[1:])]
    out = ga.decode_jpegs(data, torch.device("cuda", 0))
    assert log == ["sync", ("decode", 3)]
    assert [tuple(im.shape) for im in out] == [(3, 16, 20), (3, 12, 10), (3, 16, 20), (3, 16, 20)]


def test_forward_is_float32_under_bf16_autocast_and_does_not_autotune(monkeypatch):
    """The engine's step runs under bf16 autocast and cudnn.benchmark: the augmenter must give
    the same float32 views inside autocast, and convolve (blur) with autotuning off."""
    rng = np.random.default_rng(1)
    data = [torch.frombuffer(bytearray(jpeg_bytes(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))),
                             dtype=torch.uint8) for _ in range(8)]
    cfg = load_config(None, ["data.crop=24", "mm.crops=[24,16]"])
    aug = ga.GPUMultiCrop.from_config(cfg)
    torch.manual_seed(0)
    ref = aug(data, "cpu")
    seen, conv2d = [], ga.F.conv2d
    monkeypatch.setattr(ga.F, "conv2d", lambda *a, **k: seen.append(torch.backends.cudnn.benchmark)
                        or conv2d(*a, **k))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug(data, "cpu")
    assert torch.backends.cudnn.benchmark is True       # restored after the call
    assert seen and not any(seen)                       # the blur ran, untuned
    for a, b in zip([ref["q"], ref["k"], *ref["mm"]], [out["q"], out["k"], *out["mm"]]):
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        assert torch.equal(a, b)


def test_hue_of_grey_and_black_pixels_is_finite_and_unchanged():
    grey = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1).expand(3, 3, 4).permute(1, 0, 2)[None]
    x = torch.cat([grey, torch.zeros(1, 3, 3, 4)])   # r = g = b: max - min = 0, and max = 0
    out = ga.adjust_hue(x, torch.tensor([0.1, -0.1]))
    assert torch.isfinite(out).all() and torch.allclose(out, x, atol=1e-6)


def test_grey_and_cmyk_jpegs_decode_to_rgb():
    rng = np.random.default_rng(2)
    for mode, shape in (("L", (20, 30)), ("CMYK", (20, 30, 4))):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "JPEG")
        (im,) = ga.decode_jpegs([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], "cpu")
        ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        assert im.shape == (3, 20, 30)
        assert np.abs(im.permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1, mode


def test_huge_crop_is_area_reduced_then_resized_like_torchvision():
    """CUDA's antialiased resize refuses factors near 90; a pre-reduction keeps the result."""
    img = smooth_image(1200, 900)
    box = torch.tensor([[0, 0, 1200, 900]])
    size = 1200 // (ga.MAX_AA_FACTOR * 3)   # factor 96 > MAX_AA_FACTOR: the reduced path
    ours = ga.resized_crops(img, box, size)[0]
    ref = TF.resized_crop(img, 0, 0, 1200, 900, [size, size], antialias=True)
    assert ours.shape == ref.shape and (ours - ref).abs().max() < 0.02


@pytest.mark.gpu
def test_cuda_decode_does_not_overwrite_memory_queued_kernels_read():
    """The NaN of issue 7: free tensors that queued reductions still read, then decode; the
    decoder must not be handed (and overwrite) those blocks before the reductions run."""
    rng = np.random.default_rng(0)
    data = [torch.frombuffer(bytearray(jpeg_bytes(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8))),
                             dtype=torch.uint8) for _ in range(8)]
    bad = 0
    for _ in range(30):
        xs = [torch.full((3, 256, 320), 7, dtype=torch.uint8, device="cuda") for _ in range(8)]
        torch.cuda.synchronize()
        a = torch.randn(4096, 4096, device="cuda")
        for _ in range(50):
            a = a @ a / 64    # 25-150 ms (TF32 or not) queued ahead of the reductions
        sums = [x.sum() for x in xs]
        del xs
        ga.decode_jpegs(data, "cuda")
        torch.cuda.synchronize()
        bad += sum(int(s.item()) != 7 * 3 * 256 * 320 for s in sums)
    assert bad == 0


def test_gpu_batches_orders_the_side_stream_before_the_step(monkeypatch):
    """CUDA branch with stand-in streams: batch n+1 is augmented with the side stream current,
    the main stream waits for it before the batch is yielded, and every yielded tensor is
    recorded on the main stream (the allocator must not recycle it while the step reads it)."""
    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(f"{self.name} waits {other.name}")

    class Tensor:
        def __init__(self, name):
            self.name = name

        def record_stream(self, stream):
            log.append(f"{self.name} on {stream.name}")

        def to(self, device, non_blocking=False):
            return self

    main, side = Stream("main"), Stream("side")
    current = [main]

    @contextlib.contextmanager
    def use(stream):
        current[0] = stream
        yield
        current[0] = main

    monkeypatch.setattr(ga.torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(ga.torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(ga.torch.cuda, "stream", use)

    def augment(data, device):
        log.append(f"augment {data} on {current[0].name}")
        return {"q": Tensor("q"), "k": Tensor("k"), "mm": [Tensor("mm0")], "skipped": 0}

    batches = ga.gpu_batches([("b0", Tensor("labels"))], augment, torch.device("cuda", 0))
    batch, labels = next(batches)
    assert log == ["augment b0 on side", "main waits side", "q on main", "k on main",
                   "labels on main", "mm0 on main"]
    assert current[0] is main and batch["skipped"] == 0
