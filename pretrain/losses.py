"""The SANE loss as pure functions: soft-label contrastive CE, SLR labels, momentum mixup.

Symbols and equation numbers are docs/method.md's (s queries, B̄ = in-batch keys ∪ queue, τ, τ′,
μ_t, θ, κ, λ): Eq. (1) soft_cross_entropy, (2)-(4) slr_labels, (5) mu_schedule, (6) sample_theta,
(7) mix_images, (8) mix_labels, (9) total_loss.
"""
import math

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits, y):
    """Eq. (1): L_c = −(1/s) Σ_i Σ_k y_ik · log softmax_k(logits_ik); logits = ⟨f(x_i), b̄_k⟩ / τ."""
    return -(y * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@torch.no_grad()
def instance_top1(logits, positive):
    """Instance-discrimination top-1 in percent: how often the positive key's logit (column
    positive[i] of row i) is the largest of all candidates. A 0-d tensor: no host sync."""
    return (logits.argmax(dim=1) == positive).float().mean() * 100


def one_hot_labels(s, num_keys, device=None):
    """y_i: 1 on key i (the positive of query i sits at column i of B̄), 0 elsewhere."""
    return torch.eye(s, num_keys, device=device)


def mu_schedule(t, T, m1, m2):
    """Eq. (5): μ_t = m2 − (m2 − m1)·(cos(π t / T) + 1) / 2, a cosine ramp from m1 (t = 0) to m2 (t = T)."""
    return m2 - (m2 - m1) * (math.cos(math.pi * t / T) + 1) / 2


@torch.no_grad()
def slr_labels(key_logits, mu, use_p=True, use_q=True):
    """Self-labeling refinery, Eq. (4): ȳ_i = (1 − α_i − β_i)·y_i + α_i·p_i + β_i·q_i.

    key_logits[i, k] = ⟨g(x̃_i), b̄_k⟩ / (τ·τ′), shape [s, s + b]; column i is key i itself.
    Eq. (2): p_i = softmax over B̄; Eq. (3): q_i = the same with k = i removed (q_ii = 0),
    renormalised; z_i = 1 + μ·max_k p_ik + μ·max_k q_ik, α_i = μ·max p_i / z_i, β_i = μ·max q_i / z_i.
    A switched-off term (use_p / use_q False) contributes 0 to z_i. No gradient.
    Returns (ȳ, p, q, α, β, z).
    """
    s, n = key_logits.shape
    y = one_hot_labels(s, n, key_logits.device)
    p = F.softmax(key_logits, dim=1)
    q = F.softmax(key_logits.masked_fill(y.bool(), float("-inf")), dim=1)
    zero = torch.zeros(s, device=key_logits.device)
    p_max = p.max(dim=1).values if use_p else zero
    q_max = q.max(dim=1).values if use_q else zero
    z = 1 + mu * p_max + mu * q_max
    alpha, beta = mu * p_max / z, mu * q_max / z
    y_bar = (1 - alpha - beta)[:, None] * y + alpha[:, None] * p + beta[:, None] * q
    return y_bar, p, q, alpha, beta, z


def sample_theta(s, kappa, device=None):
    """Eq. (6): θ_i ~ Beta(κ, κ), one per sample (decision: per-sample, not per-batch)."""
    conc = torch.full((s,), float(kappa), device=device)
    return torch.distributions.Beta(conc, conc).sample()


def mix_images(x, x_tilde, theta, perm):
    """Momentum mixup in image space, Eq. (7): x′_i = θ_i·x_i + (1 − θ_i)·x̃_perm(i).

    x̃ are the crops the momentum network encoded as keys, so x′_i mixes query i with key perm(i).
    """
    th = theta.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return th * x + (1 - th) * x_tilde[perm]


def mix_labels(y_bar, theta, perm):
    """Eq. (8): y′_i = θ_i·ȳ_i + (1 − θ_i)·ȳ_perm(i) (ȳ = SLR label, or one-hot when SLR is off)."""
    th = theta.view(-1, 1).to(y_bar.dtype)
    return th * y_bar + (1 - th) * y_bar[perm]


def total_loss(loss_vanilla, loss_mm, lam):
    """Eq. (9): L = (1 − λ)·L_c({x_i, y_i}) + λ·L_c({x′_i, y′_i})."""
    return (1 - lam) * loss_vanilla + lam * loss_mm


@torch.no_grad()
def label_quality(y_bar, query_cls, key_cls):
    """SLR diagnostic: mass a label puts on keys of the query's true class, and its L1 error.

    query_cls [s], key_cls [s + b] (−1 = unknown, e.g. a random initial queue entry).
    y* = uniform over same-class keys of B̄ (the true label of Theorem 1, docs/method.md "Theory").
    *_same_class_mass counts the query's own positive (column i), so one-hot scores 1;
    *_other_same_class_mass leaves it out: what SLR adds (one-hot: 0, so not logged).
    slr_moved_mass = 1 − ȳ_ii, the mass SLR moves off the own positive; slr_on_class_share, the
    share of it that lands on the right class (Σ_i other-same-class mass / Σ_i moved mass), is to
    be read against other_same_class_key_share, the fraction of the other keys that have the
    query's class (what features blind to the class would give).
    Returns dict of 0-d tensors: {slr,onehot}_same_class_mass, slr_other_same_class_mass,
    slr_moved_mass, slr_on_class_share, other_same_class_key_share, {slr,onehot}_label_error.
    """
    s, n = y_bar.shape
    same = (key_cls[None, :] == query_cls[:, None]) & (key_cls[None, :] >= 0)
    same = same.to(y_bar.dtype)
    y_star = same / same.sum(dim=1, keepdim=True).clamp(min=1)
    y = one_hot_labels(s, n, y_bar.device)
    moved, on_class = (y_bar * (1 - y)).sum(dim=1), (y_bar * same * (1 - y)).sum(dim=1)
    return {
        "slr_same_class_mass": (y_bar * same).sum(dim=1).mean(),
        "onehot_same_class_mass": (y * same).sum(dim=1).mean(),
        "slr_other_same_class_mass": on_class.mean(),
        "slr_moved_mass": moved.mean(),
        "slr_on_class_share": on_class.sum() / moved.sum().clamp(min=1e-12),
        "other_same_class_key_share": (same * (1 - y)).sum(dim=1).mean() / max(n - 1, 1),
        "slr_label_error": (y_bar - y_star).abs().sum(dim=1).mean(),
        "onehot_label_error": (y - y_star).abs().sum(dim=1).mean(),
    }
