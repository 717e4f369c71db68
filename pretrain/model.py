"""The SANE / MoCo v2 model: query encoder f_w, EMA key encoder g_ξ, FIFO key queue,
shuffle-BN; forward() reads like the paper (encode, keys, SLR labels, mixup, loss, enqueue)."""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from pretrain import losses as L
from pretrain.utils import get_world_size
from pretrain.weights import read_backbone


STEMS = ("imagenet", "cifar")


def set_stem(net, stem):
    """The ResNet's stem: `imagenet` keeps torchvision's 7x7 stride-2 conv1 + 3x3 max-pool;
    `cifar` is a 3x3 stride-1 conv1 and no max-pool (maxpool = Identity), as every CIFAR
    self-supervised codebase (MoCo's CIFAR demo, SimCLR, ...): 32-px images keep their
    resolution and layer4 works at 4x4 instead of 1x1. State-dict keys are the same."""
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's
        net.maxpool = nn.Identity()
    elif stem != "imagenet":
        raise ValueError(f"unknown stem '{stem}': use imagenet or cifar")
    return net


def _resnet(arch, stem):
    try:
        net = torchvision.models.__dict__[arch](weights=None)
    except KeyError:
        raise ValueError(f"unknown arch '{arch}': use a torchvision ResNet name such as resnet50") from None
    return set_stem(net, stem)


def build_backbone(arch, stem="imagenet"):
    """A torchvision ResNet (random init) whose fc is Identity: returns pooled features."""
    net = _resnet(arch, stem)
    net.fc = nn.Identity()
    return net


def build_encoder(arch, dim, head_depth, head_hidden, stem="imagenet"):
    """ResNet whose .fc is the MLP head (MoCo's layout: fc.0, fc.2, ... are the Linears)."""
    net = _resnet(arch, stem)
    width = net.fc.in_features
    hidden = head_hidden or width
    layers, d_in = [], width
    for _ in range(head_depth - 1):
        layers += [nn.Linear(d_in, hidden), nn.ReLU(inplace=True)]
        d_in = hidden
    layers.append(nn.Linear(d_in, dim))
    net.fc = nn.Sequential(*layers)
    return net


def load_backbone_state(ckpt_path):
    """Backbone weights (torchvision names, no fc) of a pretraining, MoCo or torchvision checkpoint,
    for build_backbone: pretrain.weights finds them, read safely (weights_only)."""
    return read_backbone(ckpt_path)[0].state


@torch.no_grad()
def concat_all_gather(tensor):
    """all_gather of a same-shaped tensor from every process (no gradient), MoCo's helper."""
    if get_world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


class MoCo(nn.Module):
    """MoCo v2 builder extended with SANE's SLR labels and momentum mixup.

    dim: feature dim; K: queue size b; m: EMA momentum; T: temperature τ;
    in_batch: in-batch keys in B̄ (SANE) vs MoCo v2's positive-against-queue logits;
    slr / mm: dicts of the config sections (None = off); shuffle_splits: sub-batches of the
    key-encoder BN shuffle when running as one process; stem: imagenet | cifar (set_stem).
    """

    def __init__(self, arch="resnet50", dim=128, K=65536, m=0.999, T=0.2, head_depth=2,
                 head_hidden=0, in_batch=True, slr=None, mm=None, shuffle_bn=True,
                 shuffle_splits=2, stem="imagenet"):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.in_batch, self.slr, self.mm = in_batch, slr, mm
        self.shuffle_bn, self.shuffle_splits = shuffle_bn, shuffle_splits
        self.encoder_q = build_encoder(arch, dim, head_depth, head_hidden, stem)
        self.encoder_k = build_encoder(arch, dim, head_depth, head_hidden, stem)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        # As MoCo: the queue starts as random unit vectors, which act as negatives until the
        # first K keys have replaced them; their class is unknown (-1) for the diagnostic.
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_labels", torch.full((K,), -1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        """ξ ← m·ξ + (1 − m)·w (buffers such as BN statistics are the key encoder's own)."""
        pk = list(self.encoder_k.parameters())
        pq = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_mul_(pk, self.m)
        torch._foreach_add_(pk, pq, alpha=1 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys, labels):
        """FIFO: write the (all-gathered) keys at queue_ptr, wrapping around the end.

        Index arithmetic stays on the device, so no host sync per step.
        """
        keys, labels = concat_all_gather(keys), concat_all_gather(labels)
        n = keys.shape[0]
        if n > self.K:
            raise ValueError(f"queue size {self.K} is smaller than the global batch {n}")
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.K
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self.queue_labels[idx] = labels
        self.queue_ptr.copy_((self.queue_ptr + n) % self.K)

    @torch.no_grad()
    def _encode_keys(self, im_k):
        """g_ξ(x̃) with shuffled BN: across processes (MoCo) or, alone, across sub-batches."""
        if not self.shuffle_bn:
            return self.encoder_k(im_k)
        if get_world_size() > 1:
            x_gather = concat_all_gather(im_k)
            b = im_k.shape[0]
            idx_shuffle = torch.randperm(x_gather.shape[0], device=im_k.device)
            dist.broadcast(idx_shuffle, src=0)
            idx_unshuffle = torch.argsort(idx_shuffle)
            rank = dist.get_rank()
            k = self.encoder_k(x_gather[idx_shuffle.view(-1, b)[rank]])
            k_gather = concat_all_gather(k)
            return k_gather[idx_unshuffle.view(-1, b)[rank]]
        idx = torch.randperm(im_k.shape[0], device=im_k.device)
        chunks = im_k[idx].tensor_split(min(self.shuffle_splits, im_k.shape[0]))
        k = torch.cat([self.encoder_k(c) for c in chunks])
        return k[torch.argsort(idx)]

    def forward(self, im_q, im_k, mm_crops=(), labels=None, mu=0.0):
        """One step's loss. im_q, im_k: [s,3,H,W] views x, x̃; mm_crops: query crops for MM;
        labels: dataset classes (-1 = unknown) for the queue and the diagnostic; mu: μ_t.

        Returns (loss, stats) where stats are detached 0-d tensors (no host sync).
        """
        s = im_q.shape[0]
        q = self.encoder_q(im_q)
        if self.mm:
            theta = L.sample_theta(s, self.mm["kappa"], im_q.device)  # Eq. (6)
            perm = torch.randperm(s, device=im_q.device)
            q_mix = [self.encoder_q(self._momentum_mixup_input(x, im_k, theta, perm))
                     for x in mm_crops]
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self._encode_keys(im_k)
        if labels is None:
            labels = torch.full((s,), -1, dtype=torch.long, device=im_q.device)
        stats = {}
        # the contrastive math in fp32, outside bf16 autocast
        with torch.autocast(device_type=im_q.device.type, enabled=False):
            q = F.normalize(q.float(), dim=1)
            k = F.normalize(k.float(), dim=1)
            queue = self.queue.clone().detach().float()
            if not self.in_batch:
                # MoCo v2's logits: the positive against the queue only, label 0 (its formulation;
                # its fp32 numerics with numerics=reference, else bf16 autocast / TF32 encoders)
                l_pos = (q * k).sum(dim=1, keepdim=True)
                logits = torch.cat([l_pos, q @ queue], dim=1) / self.T
                positive = torch.zeros(s, dtype=torch.long, device=q.device)
                loss = F.cross_entropy(logits, positive)
                stats["loss_vanilla"] = loss.detach()
                stats["inst_top1"] = L.instance_top1(logits, positive)
            else:
                keys = torch.cat([k, queue.T])  # B̄ = {g(x̃_1..s)} ∪ queue, [s + b, dim]
                y = L.one_hot_labels(s, keys.shape[0], q.device)
                y_bar = y
                if self.slr:
                    # Eq. (2)-(4): p_i uses the positive g(x̃_i) in place of the query: logits / (τ·τ′)
                    key_logits = k @ keys.T / (self.T * self.slr["tau_prime"])
                    y_bar = L.slr_labels(key_logits, mu, self.slr["p"], self.slr["q"])[0]
                    key_cls = torch.cat([labels, self.queue_labels])
                    stats.update(L.label_quality(y_bar, labels, key_cls))
                vanilla = self.slr["vanilla"] if self.slr else "onehot"
                if vanilla == "auto":
                    vanilla = "onehot" if self.mm else "refined"
                y_v = y_bar if vanilla == "refined" else y
                logits = q @ keys.T / self.T
                loss = L.soft_cross_entropy(logits, y_v)  # Eq. (1)
                stats["loss_vanilla"] = loss.detach()
                stats["inst_top1"] = L.instance_top1(logits, torch.arange(s, device=q.device))
                if self.mm:
                    y_mix = L.mix_labels(y_bar, theta, perm)  # y′, Eq. (8)
                    loss_mm = sum(L.soft_cross_entropy(F.normalize(f.float(), dim=1) @ keys.T / self.T,
                                                       y_mix) for f in q_mix) / len(q_mix)
                    stats["loss_mm"] = loss_mm.detach()
                    loss = L.total_loss(loss, loss_mm, self.mm["lam"])  # Eq. (9)
        self._dequeue_and_enqueue(k, labels)
        stats["loss"] = loss.detach()
        return loss, stats

    @staticmethod
    def _momentum_mixup_input(x, im_k, theta, perm):
        """x′ = θ·x + (1 − θ)·x̃_perm, Eq. (7). A crop smaller than x̃ mixes with x̃ resized to its size
        (decision: the momentum network's own view of image k, at the crop's resolution)."""
        x_tilde = im_k
        if x.shape[-2:] != im_k.shape[-2:]:
            x_tilde = F.interpolate(im_k, size=x.shape[-2:], mode="bilinear",
                                    align_corners=False, antialias=True)
        return L.mix_images(x, x_tilde.to(x.dtype), theta, perm)


def build_model(cfg):
    """MoCo from the config sections (plain values passed down)."""
    mc = cfg.model
    return MoCo(
        arch=mc.arch, dim=mc.dim, K=mc.queue, m=mc.m, T=mc.tau, head_depth=mc.head_depth,
        head_hidden=mc.head_hidden, in_batch=mc.in_batch_negatives,
        slr=dict(cfg.slr) if cfg.slr.enabled else None,
        mm=dict(cfg.mm) if cfg.mm.enabled else None,
        shuffle_bn=mc.shuffle_bn, shuffle_splits=mc.shuffle_bn_splits, stem=mc.stem,
    )
