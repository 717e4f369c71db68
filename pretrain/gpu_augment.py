"""GPU data path for pretraining: JPEG bytes -> nvJPEG decode -> batched MoCo v2 / RandAugment views.
Same batch dict and same parameter distributions as the CPU path (pretrain/data.py), per-sample randomness.

Why it is built this way (measurements and what is still to check on a GPU: docs/performance.md):
- Decoding first drains the current stream. torchvision's CUDA decode_jpeg allocates its outputs on
  the caller's stream, then lets nvJPEG (a hardware engine on A100/H100/H200) write them from a
  private stream that does not wait for the caller's (pytorch/vision#9606,
  meta-pytorch/torchcodec#1634): the caching allocator may hand it blocks that the trainer's queued
  kernels still read, and the step would read JPEG pixels (NaN, or wrong numbers in code that never
  saw the decoder). Under `gpu_batches` the drained stream is the side stream, so the step on the
  main stream keeps running.
- Views are computed in float32 with autocast off whatever the caller's context; a crop far larger
  than its output is area-reduced first (CUDA's antialiased resize refuses factors near ~90: "Too
  much shared memory required"); a non-JPEG file (a PNG behind .JPEG) skips the nvJPEG batch.
- cuDNN autotuning is off inside forward: with the engine's `cudnn.benchmark=True` it would re-tune
  the blur's grouped convolution (and RandAugment's sharpness conv) for every new random count of
  blurred samples.
- The engine augments batch n+1 on a side stream while step n runs (`gpu_batches`), and its loader
  does not pin the byte tensors (nvJPEG reads them on the host).
"""
import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torchvision.datasets import DatasetFolder
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_EXTENSIONS = (".jpg", ".jpeg", ".png")  # ImageNet hides a few PNG/CMYK files behind .JPEG


class RawJPEGFolder(DatasetFolder):
    """ImageFolder tree (root/<class>/*.jpg) yielding (encoded bytes as a uint8 1-D tensor, label).

    DataLoader workers only read files; GPUMultiCrop decodes on the device. Batch it with
    `collate` (the default collate cannot ship read_file's tensors between processes).
    """

    def __init__(self, root):
        super().__init__(str(root), loader=read_file, extensions=JPEG_EXTENSIONS)

    @staticmethod
    def collate(batch):
        """(list of byte tensors, labels). The bytes are views of one buffer: a worker then
        ships one shared-memory storage per batch (read_file's own tensors cannot be shared,
        and one file descriptor per image would exhaust `ulimit -n` at 16 workers x 256)."""
        data = [b[0] for b in batch]
        views = list(torch.cat(data).split([len(d) for d in data]))
        return views, torch.tensor([b[1] for b in batch], dtype=torch.long)


@dataclass
class ViewSpec:
    """One augmented view: MoCo v2 weak augmentation, optionally followed by RandAugment (strong).
    Ranges are torchvision's own (ColorJitter stores factor ranges; None = op off)."""
    size: int = 224
    scale: tuple = (0.2, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    brightness: tuple = (0.6, 1.4)
    contrast: tuple = (0.6, 1.4)
    saturation: tuple = (0.6, 1.4)
    hue: tuple = (-0.1, 0.1)
    p_jitter: float = 0.8
    p_gray: float = 0.2
    blur_sigma: tuple = (0.1, 2.0)
    blur_kernel: int = 23                  # odd; torchvision GaussianBlur's kernel_size
    p_blur: float = 0.5
    p_flip: float = 0.5
    randaugment: tuple = None              # (num_ops n, magnitude m, num_bins) when strong


def view_spec(transform):
    """Read a ViewSpec off a CPU-path Compose (pretrain.data.view_transform), so the two paths
    share one source of parameters; a transform the GPU path cannot mirror is an error."""
    spec, seen = {}, set()
    for t in transform.transforms:
        inner = t.transforms[0] if isinstance(t, T.RandomApply) and len(t.transforms) == 1 else None
        if isinstance(t, T.RandomResizedCrop):
            spec.update(size=int(t.size[0]), scale=tuple(t.scale), ratio=tuple(t.ratio))
        elif isinstance(inner, T.ColorJitter):
            spec.update(p_jitter=float(t.p), brightness=inner.brightness, contrast=inner.contrast,
                        saturation=inner.saturation, hue=inner.hue)
        elif isinstance(t, T.RandomGrayscale):
            spec.update(p_gray=float(t.p))
        elif isinstance(inner, T.GaussianBlur):
            spec.update(p_blur=float(t.p), blur_kernel=int(inner.kernel_size[0]),
                        blur_sigma=tuple(inner.sigma))
        elif isinstance(t, T.RandomHorizontalFlip):
            spec.update(p_flip=float(t.p))
        elif isinstance(t, T.RandAugment):
            spec.update(randaugment=(t.num_ops, t.magnitude, t.num_magnitude_bins))
        elif not isinstance(t, (T.ToTensor, T.Normalize)):
            raise ValueError(f"pretrain/gpu_augment.py cannot mirror the CPU transform {t!r}: "
                             "add it to GPUMultiCrop or use data.pipeline=cpu")
        seen.add(type(inner or t).__name__)
    missing = {"RandomResizedCrop", "ColorJitter", "RandomGrayscale", "GaussianBlur",
               "RandomHorizontalFlip"} - seen
    if missing:
        raise ValueError(f"CPU view transform lacks {sorted(missing)}: GPU path expects MoCo v2 views")
    return ViewSpec(**spec)


# ---------------------------------------------------------------- decode
def decode_jpegs(data, device, decoder="torchvision"):
    """List of encoded byte tensors -> list of uint8 [3, H, W] RGB images on `device`.

    On CUDA the whole list goes to nvJPEG in one batched call (torchvision >= 0.19); a batch
    that nvJPEG refuses (CMYK, PNG, old torchvision) falls back to one image at a time, and
    an image that still fails is decoded on the CPU.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return [_decode_cpu(d) for d in data]
    if decoder == "dali":
        return _dali_decode(data, device)
    # nvJPEG writes its outputs, allocated on the current stream, without waiting for that
    # stream: no queued kernel may still read a block the allocator can hand out (module docstring)
    torch.cuda.current_stream(device).synchronize()
    jpeg = [i for i, d in enumerate(data) if _is_jpeg(d)]   # a PNG would fail the whole batch
    images = [None] * len(data)
    try:
        decoded = decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB, device=device) if jpeg else []
        for i, im in zip(jpeg, decoded):
            images[i] = im
    except Exception:  # noqa: BLE001 - any nvJPEG refusal (CMYK, old torchvision): image by image
        for i in jpeg:
            images[i] = _decode_one(data[i], device)
    for i in set(range(len(data))) - set(jpeg):
        images[i] = _upload(_decode_cpu(data[i]), device)
    return images


def _is_jpeg(data):
    return len(data) > 2 and data[:2].tolist() == [0xFF, 0xD8]   # SOI marker


def _decode_one(data, device):
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except Exception:  # noqa: BLE001
        return _upload(_decode_cpu(data), device)


def _upload(im, device):
    """A CPU-decoded image onto the device (pageable memory: safe to drop right after)."""
    return None if im is None else im.to(device, non_blocking=True)


def _decode_cpu(data):
    """None for a file no decoder reads (the caller substitutes another image, as the CPU path)."""
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"skipping an undecodable image ({len(data)} bytes): {e}", RuntimeWarning)
        return None


_DALI_PIPES = {}


def _dali_decode(data, device):
    """NVIDIA DALI's mixed (CPU Huffman + GPU IDCT / A100-H100 hardware) decoder, when installed."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as e:
        raise RuntimeError("decoder='dali' needs NVIDIA DALI (pip install nvidia-dali-cuda120); "
                           "use decoder='torchvision'") from e
    key = (device.index or 0, len(data))
    if key not in _DALI_PIPES:
        @pipeline_def(batch_size=len(data), num_threads=4, device_id=key[0], prefetch_queue_depth=1)
        def pipe():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
        _DALI_PIPES[key] = pipe()
        _DALI_PIPES[key].build()
    p = _DALI_PIPES[key]
    p.feed_input("jpegs", [d.numpy() for d in data])
    (out,) = p.run()
    images = []
    for i in range(len(out)):
        t = torch.empty(out[i].shape(), dtype=torch.uint8, device=device)
        feed_ndarray(out[i], t, cuda_stream=torch.cuda.current_stream(device))
        images.append(t.permute(2, 0, 1))
    return images


# ---------------------------------------------------------------- parameter sampling (CPU, cheap)
def sample_crop_boxes(hw, scale, ratio, tries=10):
    """RandomResizedCrop.get_params for every image at once: [N, 4] long (top, left, h, w).

    The same rule as torchvision: area fraction ~ U(scale), log aspect ~ U(log ratio),
    the first of 10 tries that fits, else the central crop clamped to `ratio`.
    """
    hw = torch.as_tensor(hw, dtype=torch.float64).reshape(-1, 2)
    n = hw.shape[0]
    height, width = hw[:, :1], hw[:, 1:]
    area = height * width * torch.empty(n, tries, dtype=torch.float64).uniform_(*scale)
    log_r = torch.empty(n, tries, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * r))
    h = torch.round(torch.sqrt(area / r))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    h, w = h[rows, first.clamp(min=0)], w[rows, first.clamp(min=0)]
    height, width = height[:, 0], width[:, 0]
    top = torch.floor(torch.rand(n, dtype=torch.float64) * (height - h + 1))
    left = torch.floor(torch.rand(n, dtype=torch.float64) * (width - w + 1))
    # fallback: central crop with the aspect ratio clamped to [min(ratio), max(ratio)]
    in_ratio = width / height
    fw = torch.where(in_ratio < min(ratio), width,
                     torch.where(in_ratio > max(ratio), torch.round(height * max(ratio)), width))
    fh = torch.where(in_ratio < min(ratio), torch.round(width / min(ratio)),
                     torch.where(in_ratio > max(ratio), height, height))
    bad = first < 0
    h, w = torch.where(bad, fh, h), torch.where(bad, fw, w)
    top = torch.where(bad, torch.div(height - fh, 2, rounding_mode="floor"), top)
    left = torch.where(bad, torch.div(width - fw, 2, rounding_mode="floor"), left)
    return torch.stack([top, left, h, w], 1).long()


def _uniform(n, lo_hi):
    return torch.empty(n).uniform_(*lo_hi)


def sample_view_params(n, spec):
    """Per-sample colour/blur/flip parameters of one view, distributed as torchvision's transforms."""
    return {
        "jitter": torch.rand(n) < spec.p_jitter,                      # RandomApply(ColorJitter, p)
        "order": torch.rand(n, 4).argsort(1),                         # ColorJitter's randperm(4)
        "brightness": _uniform(n, spec.brightness or (1.0, 1.0)),   # None: op off (skipped)
        "contrast": _uniform(n, spec.contrast or (1.0, 1.0)),
        "saturation": _uniform(n, spec.saturation or (1.0, 1.0)),
        "hue": _uniform(n, spec.hue or (0.0, 0.0)),
        "gray": torch.rand(n) < spec.p_gray,                          # RandomGrayscale(p)
        "blur": torch.rand(n) < spec.p_blur,                          # RandomApply(GaussianBlur, p)
        "sigma": _uniform(n, spec.blur_sigma),
        "flip": torch.rand(n) < spec.p_flip,                          # RandomHorizontalFlip(p)
    }


# ---------------------------------------------------------------- batched ops, per-sample parameters
MAX_AA_FACTOR = 32   # CUDA's antialiased bilinear needs shared memory ~ factor: fails near 90


def resized_crops(image, boxes, size):
    """Crop each (top, left, h, w) box of one float [3, H, W] image and resize it to size x size:
    torchvision's resized_crop (bilinear, antialias = PIL's filter) for all boxes of one image.

    Boxes stay on the CPU (no device sync); one interpolate per box is cheaper on the GPU than
    padding a batch of differently sized images, and exact where roi_align is not. A box more than
    MAX_AA_FACTOR times the output is area-averaged down to that factor first (huge photos).
    """
    out = []
    for t, l, h, w in boxes.tolist():
        crop = image[None, :, t:t + h, l:l + w]
        cap = MAX_AA_FACTOR * size
        if h > cap or w > cap:
            crop = F.adaptive_avg_pool2d(crop, (min(h, cap), min(w, cap)))
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=True))
    return torch.cat(out)


def _blend(x, y, f):
    return (f.view(-1, 1, 1, 1) * x + (1 - f.view(-1, 1, 1, 1)) * y).clamp_(0, 1)


def adjust_brightness(x, f):
    return (x * f.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x, f):
    mean = TF.rgb_to_grayscale(x).mean((-3, -2, -1), keepdim=True)
    return _blend(x, mean, f)


def adjust_saturation(x, f):
    return _blend(x, TF.rgb_to_grayscale(x), f)


def adjust_hue(x, f):
    """torchvision's adjust_hue (RGB -> HSV, h += f mod 1, -> RGB) with one hue shift per sample."""
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(-3), x.amin(-3)
    cr = maxc - minc
    eqc = cr == 0
    s = cr / torch.where(eqc, torch.ones_like(maxc), maxc)
    crd = torch.where(eqc, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    # HSV -> RGB: sector i of the hue circle picks (v, t, p, q) per channel
    i = torch.floor(h * 6.0)
    fr = h * 6.0 - i
    i = i.long() % 6
    v = maxc
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * fr)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - fr))).clamp(0, 1)
    table = torch.stack([torch.stack(c, 1) for c in
                         ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], 1)
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


_JITTER_OPS = (("brightness", adjust_brightness), ("contrast", adjust_contrast),
               ("saturation", adjust_saturation), ("hue", adjust_hue))


def _to(t, x):
    """A CPU parameter tensor onto x's device without a stream sync (pageable memory is staged)."""
    return t.to(x.device, non_blocking=True)


def color_jitter(x, params, spec=None):
    """ColorJitter on the samples with params["jitter"], each in its own random op order.
    params live on the CPU: the index arithmetic never waits for the GPU."""
    idx = params["jitter"].nonzero().flatten()
    if len(idx) == 0:
        return x
    y, order = x[_to(idx, x)], params["order"][idx]
    for step in range(4):
        for op, (name, fn) in enumerate(_JITTER_OPS):
            if spec is not None and getattr(spec, name) is None:
                continue
            sel = (order[:, step] == op).nonzero().flatten()
            if len(sel):
                sel_d = _to(sel, x)
                y[sel_d] = fn(y[sel_d], _to(params[name][idx][sel], x))
    x = x.clone()
    x[_to(idx, x)] = y
    return x


def random_grayscale(x, mask):
    return torch.where(_to(mask, x).view(-1, 1, 1, 1), TF.rgb_to_grayscale(x, 3), x)


def gaussian_kernels(sigma, kernel_size):
    """[N, k] normalised 1-D kernels, torchvision's _get_gaussian_kernel1d with one sigma each."""
    half = (kernel_size - 1) * 0.5
    xs = torch.linspace(-half, half, kernel_size, device=sigma.device)
    pdf = torch.exp(-0.5 * (xs[None] / sigma[:, None]) ** 2)
    return pdf / pdf.sum(1, keepdim=True)


def gaussian_blur(x, sigma, kernel_size):
    """Separable Gaussian blur with one sigma per sample: reflect padding, grouped convolution."""
    n, c, h, w = x.shape
    k = gaussian_kernels(_to(sigma, x).to(x.dtype), kernel_size).repeat_interleave(c, 0)  # [N*C, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), [pad, pad, pad, pad], mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def random_blur(x, params, kernel_size):
    idx = params["blur"].nonzero().flatten()
    if len(idx) == 0:
        return x
    x, idx_d = x.clone(), _to(idx, x)
    x[idx_d] = gaussian_blur(x[idx_d], params["sigma"][idx], kernel_size)
    return x


def random_flip(x, mask):
    return torch.where(_to(mask, x).view(-1, 1, 1, 1), x.flip(-1), x)


def sample_randaugment(n, num_ops, num_ops_space):
    """RandAugment's choices per sample and round: op index ~ U{ops}, sign ~ Bernoulli(0.5)."""
    return torch.randint(num_ops_space, (n, num_ops)), torch.randint(2, (n, num_ops)).bool()


def randaugment_space(num_bins, hw):
    """torchvision RandAugment's ops {name: (magnitudes, signed)} for an image of size hw."""
    return T.RandAugment()._augmentation_space(num_bins, (int(hw[0]), int(hw[1])))


def rand_augment(x, ops, signs, magnitude, num_bins=31):
    """torchvision RandAugment(n, m) on uint8 [N, 3, S, S], per sample: each round applies every
    (op, sign) group as one batched call of torchvision's own op (nearest, fill 0).
    ops, signs: [N, n] CPU tensors from sample_randaugment."""
    # RandAugment's own per-op dispatch (private, stable since torchvision 0.11); imported here
    # so that a torchvision without it only breaks strong views, not the module
    from torchvision.transforms.autoaugment import _apply_op
    space = randaugment_space(num_bins, x.shape[-2:])
    names = list(space)
    x = x.clone()
    for rnd in range(ops.shape[1]):
        for op, name in enumerate(names):
            mags, signed = space[name]
            mag = float(mags[magnitude].item()) if mags.ndim > 0 else 0.0
            for sign in (False, True):
                sel = ((ops[:, rnd] == op) & (signs[:, rnd] == sign)).nonzero().flatten()
                if len(sel):
                    m = -mag if (signed and sign) else mag
                    sel = _to(sel, x)
                    x[sel] = _apply_op(x[sel], name, m, T.InterpolationMode.NEAREST, None)
    return x


# ---------------------------------------------------------------- the module
class GPUMultiCrop(nn.Module):
    """forward(list of JPEG byte tensors, device) -> {"q", "k": [B,3,S,S], "mm": [crops], "skipped"},
    the CPU path's batch dict (pretrain.data.collate_views), normalised with ImageNet mean/std.

    q and k are MoCo v2 weak views; each MM crop is weak (+ RandAugment when strong) at its size.
    """

    def __init__(self, view, mm_views=(), decoder="torchvision"):
        super().__init__()
        self.view, self.mm_views, self.decoder = view, list(mm_views), decoder
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg, decoder=None):
        """The views of the trainer config, read off the CPU path's own transforms
        (pretrain.data.MultiCropTransform), so both paths use the same parameters;
        the decoder is data.gpu_decoder unless given."""
        from pretrain.data import MultiCropTransform
        d, mm = cfg["data"], cfg["mm"]
        crops = list(mm["crops"]) if mm["enabled"] else []
        tf = MultiCropTransform(d["crop"], d["scale"], d["small_scale"], crops, d["strong_mm"])
        decoder = decoder or d.get("gpu_decoder", "torchvision")
        return cls(view_spec(tf.view), [view_spec(t) for t in tf.mm], decoder)

    @torch.no_grad()
    def forward(self, data, device):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.mean.device != device:   # the trainer may call a module it never moved
            self.to(device)
        # float32 whatever the caller's autocast (bf16 blur/resize would shift pixel values), and
        # no cuDNN autotuning: the blurred subset's size is random, each new shape would re-tune
        with torch.autocast(device.type, enabled=False), _cudnn_autotune(False):
            return self._views(data, device)

    def _views(self, data, device):
        images = decode_jpegs(data, device, self.decoder)
        skipped = sum(im is None for im in images)
        if skipped == len(images):
            raise RuntimeError("no image of the batch could be decoded: check the data.root files")
        if skipped:   # keep the batch size (DDP collectives need it): reuse a decoded image
            good = next(im for im in images if im is not None)
            images = [good if im is None else im for im in images]
        hw = [tuple(im.shape[-2:]) for im in images]
        specs = [self.view, self.view] + self.mm_views
        boxes = [sample_crop_boxes(hw, s.scale, s.ratio) for s in specs]
        crops = [[None] * len(images) for _ in specs]
        sizes = sorted({s.size for s in specs})
        for i, im in enumerate(images):
            im = im.float().div_(255)
            for size in sizes:   # boxes of one image and output size together (q, k share 224)
                vs = [v for v, s in enumerate(specs) if s.size == size]
                out = resized_crops(im, torch.stack([boxes[v][i] for v in vs]), size)
                for j, v in enumerate(vs):
                    crops[v][i] = out[j]
        views = [self.augment(torch.stack(c), s) for c, s in zip(crops, specs)]
        return {"q": views[0], "k": views[1], "mm": views[2:], "skipped": skipped}

    def augment(self, x, spec):
        """Weak (MoCo v2) augmentation, RandAugment for strong views, then normalisation."""
        p = sample_view_params(len(x), spec)   # on the CPU; ops move what they need
        x = color_jitter(x, p, spec)
        x = random_grayscale(x, p["gray"])
        x = random_blur(x, p, spec.blur_kernel)
        x = random_flip(x, p["flip"])
        if spec.randaugment:
            n, m, bins = spec.randaugment
            ops, signs = sample_randaugment(len(x), n, len(randaugment_space(bins, x.shape[-2:])))
            x8 = x.mul(255).round_().to(torch.uint8)     # RandAugment acts on uint8, as on PIL
            x = rand_augment(x8, ops, signs, m, bins).float().div_(255)
        return (x - self.mean) / self.std


@contextlib.contextmanager
def _cudnn_autotune(on):
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def gpu_batches(loader, augment, device):
    """Yield (batch, labels) from a RawJPEGFolder loader, decoding and augmenting batch n+1 on a
    side CUDA stream while the caller's step n still runs on the main stream."""
    device = torch.device(device)
    if device.type != "cuda":
        for data, labels in loader:
            yield augment(data, device), labels
        return
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    for data, labels in loader:
        with torch.cuda.stream(side):
            batch = augment(data, device)
            labels = labels.to(device, non_blocking=True)
        main.wait_stream(side)
        for t in [batch["q"], batch["k"], labels, *batch["mm"]]:
            t.record_stream(main)   # the caching allocator must not reuse them while main reads
        yield batch, labels
