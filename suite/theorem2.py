"""Theorem 2 of SANE (arXiv 2106.14749) on synthetic clusters: GD on refined labels
ȳᵗ = (1 − αₜ)·y + αₜ·f(Wₜ, x̃) (docs/method.md Eq. (10)) recovers corrupted labels exactly
(setting: docs/theorem2.md). Command: tools/theorem2.py."""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from suite import contract

DTYPE = torch.float32  # float32: 4x faster than float64 on CPU; runs stay deterministic per seed


def class_values(num_classes):
    """The K̄ class values in [-1, 1], evenly spaced so their separation is δ = 2 / (K̄ − 1)."""
    return torch.linspace(-1.0, 1.0, num_classes, dtype=DTYPE)


def theorem_bound(num_classes):
    """The corruption level the theorem allows: ρ ≤ δ / 8."""
    return (2.0 / (num_classes - 1)) / 8.0


def crops_near(centres, cluster, eps, generator):
    """One crop per entry of `cluster`: a point uniform in the ε-ball around its centre."""
    dim = centres.shape[1]
    u = torch.randn(len(cluster), dim, generator=generator, dtype=DTYPE)
    u = u / u.norm(dim=1, keepdim=True)
    radius = eps * torch.rand(len(cluster), 1, generator=generator, dtype=DTYPE) ** (1.0 / dim)
    return centres[cluster] + radius * u


def make_clusters(k, n_per_cluster, dim, eps, generator):
    """K orthonormal centres (unit norm, pairwise distance √2 ≫ 2ε) and n crops of each.

    Returns (x, cluster, centres); cluster[i] is the cluster index of crop x[i].
    """
    if dim < k:
        raise ValueError(f"--dim {dim} < --k {k}: orthonormal centres need dim >= k")
    if not 0 <= eps < math.sqrt(2) / 2:
        raise ValueError(f"--eps {eps}: crops must stay nearer their own centre (0 <= eps < 0.707)")
    gauss = torch.randn(dim, k, generator=generator, dtype=DTYPE)
    centres = torch.linalg.qr(gauss)[0].T.contiguous()  # (K, dim), rows orthonormal
    cluster = torch.arange(k).repeat_interleave(n_per_cluster)
    return crops_near(centres, cluster, eps, generator), cluster, centres


def corrupt_labels(label, cluster, rho, num_classes, generator):
    """Replace exactly ⌊ρ·n_l⌋ class indices in each cluster l by a different class, uniformly.

    `label` holds class indices; the corrupted copy is returned, `label` is left untouched.
    """
    if not 0 <= rho < 1:
        raise ValueError(f"--rho {rho}: a corrupted fraction must lie in [0, 1)")
    noisy = label.clone()
    for c in cluster.unique():
        members = (cluster == c).nonzero().flatten()
        n_bad = int(math.floor(rho * len(members) + 1e-9))
        bad = members[torch.randperm(len(members), generator=generator)[:n_bad]]
        # adding a shift in 1..K̄−1 modulo K̄ draws uniformly among the *other* classes
        shift = torch.randint(1, num_classes, (n_bad,), generator=generator)
        noisy[bad] = (label[bad] + shift) % num_classes
    return noisy


def refined_labels(y, f_tilde, alpha):
    """Theorem 2's refinery, Eq. (10): ȳ = (1 − α)·y + α·f(W, x̃), the positive x̃ standing in for x."""
    return (1.0 - alpha) * y + alpha * f_tilde


def alpha_schedule(alpha, t, steps, ramp):
    """αₜ: a cosine ramp from 0 to α over the first `ramp` fraction of the steps (decision).

    The network must first fit the clusters before its outputs are worth mixing in.
    """
    if ramp <= 0:
        return alpha
    progress = min(t / (ramp * steps), 1.0)
    return alpha * (1.0 - math.cos(math.pi * progress)) / 2.0


def output_weights(width):
    """The fixed v: half +1/√k, half −1/√k (‖v‖ = 1)."""
    half = width // 2
    return torch.cat([torch.ones(half), -torch.ones(width - half)]).to(DTYPE) / math.sqrt(width)


def network(W, x, v):
    """f(W, x) = vᵀφ(Wx) with φ = softplus (|φ′|, |φ″| bounded, as the theorem assumes).

    W has a leading axis over independent models (one per α): (A, k, d) -> outputs (A, n).
    """
    return F.softplus(torch.einsum("akd,nd->akn", W, x)).mul(v[:, None]).sum(1)


def init_weights(width, dim, generator):
    """W₀ ~ N(0, 1), rows paired so that f(W₀, ·) = 0 (the ±v halves cancel at start)."""
    half = torch.randn(width - width // 2, dim, generator=generator, dtype=DTYPE)
    return torch.cat([half[: width // 2], half])


def train(x, x_tilde, y, alphas, width, steps, lr, ramp, generator):
    """Full-batch GD on ½·mean_i (f(W, x_i) − ȳᵗ_i)², one model per α, all from the same W₀.

    y: the (corrupted) label values; alphas: 1-D tensor. Returns (W_T, ȳᵀ) with ȳᵀ of shape (A, n).
    """
    v = output_weights(width)
    W = init_weights(width, x.shape[1], generator).expand(len(alphas), -1, -1).clone()
    W.requires_grad_(True)
    opt = torch.optim.SGD([W], lr=lr)

    def refine(t):
        with torch.no_grad():  # the refined label is a target, not a path for gradients
            a_t = torch.tensor([alpha_schedule(float(a), t, steps, ramp) for a in alphas], dtype=DTYPE)
            return refined_labels(y, network(W, x_tilde, v), a_t[:, None])

    for t in range(steps):
        y_bar = refine(t)
        # sum over models keeps their gradients independent; mean over samples as in the theorem
        loss = 0.5 * (network(W, x, v) - y_bar).pow(2).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return W.detach(), refine(steps)


def nearest_class(values, table):
    """Index of the nearest class value (the rounding the theorem's 'exact recovery' uses)."""
    return (values[..., None] - table).abs().argmin(-1)


def recovery(y_bar, true_label, table):
    """Fraction of samples whose refined label rounds to the true class value, per model."""
    return (nearest_class(y_bar, table) == true_label).to(DTYPE).mean(-1)


def prediction_error(W, x, true_label, table):
    """Fraction of (test) crops whose network output rounds to a wrong class value, per model."""
    with torch.no_grad():
        return (nearest_class(network(W, x, output_weights(W.shape[1])), table) != true_label).to(DTYPE).mean(-1)


def run(seed, rhos, alphas, k=10, n_per_cluster=40, dim=32, width=128, eps=0.1, num_classes=3,
        steps=600, lr=10.0, ramp=0.5):
    """One seed over the (ρ, α) grid; returns one record per cell.

    The clusters, positives x̃ and test crops are shared by all ρ; each ρ draws its own corruption.
    """
    g = torch.Generator().manual_seed(seed)
    x, cluster, centres = make_clusters(k, n_per_cluster, dim, eps, g)
    x_tilde = crops_near(centres, cluster, eps, g)  # the positive: another crop of the same point
    test_cluster = torch.arange(k).repeat_interleave(n_per_cluster)
    x_test = crops_near(centres, test_cluster, eps, g)
    table = class_values(num_classes)
    true = cluster % num_classes  # cluster l carries class value number l mod K̄: balanced classes
    alpha_t = torch.tensor(alphas, dtype=DTYPE)
    records = []
    for rho in rhos:
        g_rho = torch.Generator().manual_seed(seed * 1000 + int(round(rho * 1000)))
        noisy = corrupt_labels(true, cluster, rho, num_classes, g_rho)
        W, y_bar = train(x, x_tilde, table[noisy], alpha_t, width, steps, lr, ramp, g_rho)
        rec = recovery(y_bar, true, table)
        err = prediction_error(W, x_test, test_cluster % num_classes, table)
        fit_true = 1.0 - prediction_error(W, x, true, table)  # the net's own reading of x_i
        fit_noisy = 1.0 - prediction_error(W, x, noisy, table)  # how much of y it memorised
        for j, a in enumerate(alphas):
            fractions = {"recovery": rec[j], "test_error": err[j], "train_fit_true": fit_true[j],
                         "train_fit_corrupted": fit_noisy[j], "corrupted_fraction": (noisy != true).double().mean()}
            records.append({"seed": seed, "rho": rho, "alpha": a,
                            **{name: round(float(v), 6) for name, v in fractions.items()}})
    return records


def summarise(records, rhos, alphas):
    """Mean over seeds of each (ρ, α) cell: {(ρ, α): (recovery, test_error)}."""
    cells = {}
    for rho in rhos:
        for a in alphas:
            rs = [r for r in records if r["rho"] == rho and r["alpha"] == a]
            cells[(rho, a)] = (sum(r["recovery"] for r in rs) / len(rs),
                               sum(r["test_error"] for r in rs) / len(rs))
    return cells


def format_table(cells, rhos, alphas, bound):
    """Markdown table: ρ rows, α columns, 'recovery % / test error %'; α = 0 is the baseline."""
    head = ["ρ"] + [("α=0 (corrupted y only)" if a == 0 else f"α={a:g}") for a in alphas]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rho in rhos:
        mark = " ≤ δ/8" if rho <= bound + 1e-12 else ""
        row = [f"{rho:g}{mark}"] + [f"{100 * cells[(rho, a)][0]:.1f} / {100 * cells[(rho, a)][1]:.1f}"
                                    for a in alphas]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(cells, rhos, alphas, bound, path):
    """Recovery and test error against α, one line per ρ."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for rho in rhos:
        style = "-" if rho <= bound + 1e-12 else "--"
        axes[0].plot(alphas, [100 * cells[(rho, a)][0] for a in alphas], style, marker="o", label=f"ρ={rho:g}")
        axes[1].plot(alphas, [100 * cells[(rho, a)][1] for a in alphas], style, marker="o", label=f"ρ={rho:g}")
    axes[0].set(xlabel="α", ylabel="labels recovered (%)", title="refined labels ȳᵀ")
    axes[1].set(xlabel="α", ylabel="test error (%)", title="f(W_T, ·) on fresh crops")
    axes[0].legend(title=f"dashed: ρ > δ/8 = {bound:g}", fontsize=8)
    fig.tight_layout()
    contract.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), mkdir=True)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2], help="seeds; the table averages them")
    p.add_argument("--rho", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3], help="corrupted fraction ρ")
    p.add_argument("--alpha", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9, 0.95],
                   help="final refinement weight α (0 = train on the corrupted labels alone, always added)")
    p.add_argument("--k", type=int, default=10, help="number of clusters K")
    p.add_argument("--classes", type=int, default=3, help="number of class values K̄ in [-1, 1]")
    p.add_argument("--n-per-cluster", type=int, default=40)
    p.add_argument("--dim", type=int, default=32, help="input dimension d (>= K)")
    p.add_argument("--width", type=int, default=128, help="hidden width k")
    p.add_argument("--eps", type=float, default=0.1, help="crop radius ε around the centre")
    p.add_argument("--steps", type=int, default=600, help="full-batch GD steps T")
    p.add_argument("--lr", type=float, default=10.0, help="GD step size η")
    p.add_argument("--ramp", type=float, default=0.5, help="fraction of T over which αₜ ramps 0 → α")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of recovery and test error against α")
    p.add_argument("--json", metavar="PATH", help="write every (seed, ρ, α) record as JSON")
    args = p.parse_args(argv)
    args.alpha = sorted(set([0.0] + args.alpha))
    bad = ([f"--alpha {a} (must lie in [0, 1])" for a in args.alpha if not 0 <= a <= 1]
           + [f"--rho {r} (must lie in [0, 1))" for r in args.rho if not 0 <= r < 1]
           + [f"--{n} {getattr(args, n.replace('-', '_'))} (must be >= {lo})"
              for n, lo in [("k", 1), ("classes", 2), ("n-per-cluster", 1), ("width", 2), ("steps", 1)]
              if getattr(args, n.replace("-", "_")) < lo])
    if args.width % 2:
        bad.append(f"--width {args.width} (must be even: the ±1/√k halves of v pair up)")
    if args.dim < args.k:
        bad.append(f"--dim {args.dim} (must be >= --k {args.k} for orthonormal centres)")
    if not 0 <= args.eps < math.sqrt(2) / 2:
        bad.append(f"--eps {args.eps} (must lie in [0, 0.707) so clusters stay apart)")
    if bad:
        p.error("; ".join(bad))  # argparse exits with code 2
    return args


def main(argv=None):
    args = parse_args(argv)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        try:  # before the runs, not after
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"theorem2: error: {flag} {path} cannot be written ({e.strerror or e}); pass a "
                  "path in a writable folder", file=sys.stderr)
            return 2
    cfg = dict(k=args.k, n_per_cluster=args.n_per_cluster, dim=args.dim, width=args.width, eps=args.eps,
               num_classes=args.classes, steps=args.steps, lr=args.lr, ramp=args.ramp)
    start = time.perf_counter()
    records = [r for s in args.seed for r in run(s, args.rho, args.alpha, **cfg)]
    seconds = time.perf_counter() - start
    bound = theorem_bound(args.classes)
    cells = summarise(records, args.rho, args.alpha)
    print(f"Theorem 2 on synthetic clusters: K={args.k}, K̄={args.classes} class values (δ={2 / (args.classes - 1):g}, "
          f"bound ρ ≤ δ/8 = {bound:g}), n={args.k * args.n_per_cluster}, seeds {args.seed}, {seconds:.1f} s")
    print("cells: labels recovered % / test error %, mean over seeds")
    print(format_table(cells, args.rho, args.alpha, bound))
    if args.json:
        payload = {"config": {**cfg, "seeds": args.seed, "rho": args.rho, "alpha": args.alpha},
                   "bound_rho": bound, "seconds": seconds, "records": records}
        contract.write_json(args.json, payload, mkdir=True)
    if args.plot:
        plot(cells, args.rho, args.alpha, bound, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
