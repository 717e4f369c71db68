"""Weighted kNN monitor (InstDisc / MoCo CIFAR protocol) on frozen, L2-normalised features.
Used by the trainer every few epochs and by the probes; no training, one matmul per chunk."""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def _gather_rows(x):
    """Concatenate a [n_r, ...] tensor from every rank (n_r may differ) in rank order."""
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    # all_gather needs equal shapes: pad to the largest shard, then trim each piece
    pad = x.new_zeros((max(sizes) - x.shape[0],) + tuple(x.shape[1:]))
    padded = torch.cat([x, pad])
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


@torch.no_grad()
def extract_features(backbone, loader, device, normalize=True):
    """Pooled features of every (image, label) in `loader`: (feats [N, D] float, labels [N] long).

    The backbone runs in eval mode (frozen BN statistics) and is put back in its
    previous mode afterwards. Features are L2-normalised unless normalize=False (the
    linear probe trains on raw features, as MoCo's main_lincls). Under DDP each rank
    extracts its shard and the result is gathered, so every rank gets all rows.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for images, target in loader:
        f = backbone(images.to(device, non_blocking=True)).float().flatten(1)
        feats.append(F.normalize(f, dim=1) if normalize else f)
        labels.append(torch.as_tensor(target).to(device, non_blocking=True).long())
    backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no images")
    feats, labels = torch.cat(feats), torch.cat(labels)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        feats, labels = _gather_rows(feats), _gather_rows(labels)
    return feats, labels


@torch.no_grad()
def knn_predict(train_feats, train_labels, queries, num_classes, k=50, t=0.05):
    """Class scores [B, C] of each query: sum over its k nearest train features of exp(cos / t)."""
    k = min(k, train_feats.shape[0])
    cos = queries @ train_feats.T                                   # [B, N], features unit-norm
    top_cos, top_idx = cos.topk(k, dim=1)
    # exp(cos / t) overflows float32 for t < ~0.01; a per-query shift leaves the vote unchanged
    weights = ((top_cos - top_cos[:, :1]) / t).exp()                # [B, k]
    scores = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    return scores.scatter_add_(1, train_labels[top_idx], weights)


@torch.no_grad()
def knn_top1(train_feats, train_labels, test_feats, test_labels, num_classes, k=50, t=0.05,
             chunk_size=256):
    """Top-1 accuracy in percent of the weighted kNN classifier (k capped at the train size).

    Test queries go through in chunks of `chunk_size` so the [chunk, N] similarity
    matrix stays bounded for ImageNet-sized banks.
    """
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("knn_top1: empty train or test feature set")
    train_labels = train_labels.to(train_feats.device).long()
    correct = 0
    for start in range(0, test_feats.shape[0], chunk_size):
        q = test_feats[start:start + chunk_size].to(train_feats.device)
        pred = knn_predict(train_feats, train_labels, q, num_classes, k, t).argmax(dim=1)
        correct += (pred.cpu() == test_labels[start:start + chunk_size].cpu()).sum().item()
    return 100.0 * correct / test_feats.shape[0]
