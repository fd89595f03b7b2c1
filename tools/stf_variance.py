"""Variance and bias of the DSM and STF training targets against the noise level (STF paper, sec. 3 and 5).

For a finite data set {x_1, ..., x_N} (its empirical distribution is the "truth" here), VE perturbation
x_t = x0 + sigma z, and reference batch size n, measure in noise-target units (eps_target, so that both the
DSM target z and the STF target (x_t - xbar_w) / sigma are O(1)), per data dimension D:

- DSM trace-of-covariance: E_{x_t} tr Cov[(x_t - x0) / sigma | x_t] / D, where x0 ~ p(x0 | x_t) is the exact
  posterior over the data set: closed form sum_i p_i ||x_i - mu||^2 / (sigma^2 D), mu = sum_i p_i x_i.
- STF trace-of-covariance: E_{x_t} tr Cov[(x_t - xbar_w) / sigma | x_t] / D with the reference batch
  (x^(1) ~ p(x0 | x_t), x^(2..n) i.i.d. uniform over the data set), by Monte Carlo (num_mc reference batches
  per x_t; unbiased sample covariance).
- STF squared bias: E_{x_t} ||E[STF target | x_t] - (x_t - mu) / sigma||^2 / D, where (x_t - mu) / sigma =
  -sigma * (exact score of the perturbed empirical distribution); unbiased U-statistic with a jackknife
  standard error.
- For contrast, the squared bias of the same self-normalised estimate over n i.i.d. references *without* the
  own source ("iid"): a plain self-normalised importance sampler, biased by O(1/n).

Finding (checked by tests/test_stf_variance.py, also by exact enumeration): because the own source is drawn
from the posterior and the other references from the data distribution, the STF target is *conditionally
unbiased for every n*: given x_t the reference multiset has density proportional to
(sum_k p(x_t | x^(k))) prod_k p(x^(k)) and the own-source position is distributed as the weights w_k, so
E[xbar_w | x_t] = E[sum_k p(x_t | x^(k)) x^(k)] / (n p(x_t)) = mu. The measured STF bias is zero within
Monte Carlo error; the bias that shrinks with n is that of the i.i.d. (no own source) estimate. The STF gain
is the variance reduction: close to 1/n far from the data, weaker in the intermediate regime.

x_t is drawn from the perturbed data (num_xt samples per sigma); the weights come from stf.py (the code used
in training). Both traces vanish for small sigma (one source dominates) and decay like
tr Cov(data) / (sigma^2 D) for large sigma; DSM peaks in the intermediate regime where several sources are
plausible.

Run from the repository root, e.g.
  python -m tools.stf_variance                                   # synthetic Gaussian mixture (fast)
  python -m tools.stf_variance --config configs/demo.py          # the SHAPES demo set
  python -m tools.stf_variance --config configs/ve/cifar10_ncsnpp_continuous.py --num_data 2048
It prints a table and writes a PNG plot (--out, default runs/stf_variance.png).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from collections.abc import Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import stf  # noqa: E402


def make_gaussian_mixture(
    num: int = 512, dim: int = 16, num_modes: int = 8, spread: float = 0.1, seed: int = 0
) -> torch.Tensor:
    """Synthetic data [num, dim] (float64): num_modes centres ~ N(0, I), point = centre + spread N(0, I)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_modes, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_modes, (num,), generator=gen)
    return centres[labels] + spread * torch.randn(num, dim, generator=gen, dtype=torch.float64)


def exact_posterior(x_t: torch.Tensor, data: torch.Tensor, sigma: float) -> torch.Tensor:
    """p(x0 = x_i | x_t) = softmax_i(-||x_t - x_i||^2 / (2 sigma^2)) over the data set, float64 [M, N]."""
    x, d = x_t.double(), data.double()
    dist2 = ((x * x).sum(1, keepdim=True) - 2 * x @ d.T + (d * d).sum(1)[None]).clamp_min(0)
    return torch.softmax(-dist2 / (2 * sigma**2), dim=1)


def conditional_trace(xbar: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per x_t, sample tr Cov of the noise target (x_t - xbar)/sigma over K draws: [K, M, D] -> [M]."""
    mean = xbar.mean(0)
    return ((xbar - mean) ** 2).sum((0, 2)) / (xbar.shape[0] - 1) / sigma**2


def squared_bias(xbar: torch.Tensor, mu: torch.Tensor, sigma: float) -> tuple[float, float]:
    """Unbiased E_x_t ||E[xbar | x_t] - mu||^2 / sigma^2 and its jackknife standard error over the K draws.

    U-statistic sum_{j != l} <e_j, e_l> / (K (K - 1)) with e_j = xbar_j - mu; the jackknife leaves out one
    draw j at a time (draws are independent; the x_t samples within a draw are not: they share the extras).
    """
    num_mc = xbar.shape[0]
    e = (xbar - mu[None]) / sigma  # [K, M, D]
    total = e.sum(0)  # [M, D]
    sq = (e * e).sum(2)  # [K, M]
    cross = (total * total).sum(1) - sq.sum(0)  # [M]
    estimate = float(cross.mean()) / (num_mc * (num_mc - 1))
    if num_mc < 3:
        return estimate, float("nan")
    # leave-one-out: ||S - e_j||^2 - (Q - |e_j|^2) = cross - 2 <S, e_j> + 2 |e_j|^2
    loo = (cross[None] - 2 * (e * total[None]).sum(2) + 2 * sq).mean(1) / ((num_mc - 1) * (num_mc - 2))  # [K]
    se = math.sqrt(float(((loo - loo.mean()) ** 2).sum()) * (num_mc - 1) / num_mc)
    return estimate, se


def target_statistics(
    data: torch.Tensor,
    sigmas: Sequence[float],
    ns: Sequence[int],
    num_xt: int = 64,
    num_mc: int = 32,
    seed: int = 0,
) -> dict:
    """DSM / STF trace-of-covariance and squared biases per dimension (noise-target units) for VE sigmas.

    Args:
      data: the data set [N, ...] (its empirical distribution is the target distribution).
      sigmas: noise levels.
      ns: reference batch sizes (own source included; n = 1 is DSM).
      num_xt: perturbed samples x_t per sigma.
      num_mc: reference batches drawn per x_t (>= 2).
      seed: seed of all draws.
    Returns:
      dict of float64 tensors: 'sigma' [S], 'ns' [K], 'dsm_trace' [S], 'stf_trace' [K, S], 'stf_bias2' [K, S]
      with its standard error 'stf_bias2_se' [K, S], and 'iid_bias2' / 'iid_bias2_se' [K, S]: the squared bias
      of the same estimate over n i.i.d. references *without* the own source (what STF would be if the own
      source were not forced into the reference batch). The squared-bias estimates are unbiased and can be
      slightly negative where the bias is below the Monte Carlo noise.
    """
    if num_mc < 2:
        raise ValueError(f"num_mc must be >= 2 to estimate a covariance, got {num_mc}")
    if any(int(n) < 1 for n in ns):
        raise ValueError(f"reference batch sizes must be >= 1, got {list(ns)}")
    flat = data.reshape(len(data), -1).double()
    num, dim = flat.shape
    gen = torch.Generator().manual_seed(seed)
    sq = (flat * flat).sum(1)
    keys = ("stf_trace", "stf_bias2", "stf_bias2_se", "iid_bias2", "iid_bias2_se")
    out = {key: [[] for _ in ns] for key in keys}
    dsm = []
    for sigma in sigmas:
        src = torch.randint(0, num, (num_xt,), generator=gen)
        x_t = flat[src] + sigma * torch.randn(num_xt, dim, generator=gen, dtype=torch.float64)
        post = exact_posterior(x_t, flat, sigma)
        mu = post @ flat
        dsm_tr = ((post * sq[None]).sum(1) - (mu * mu).sum(1)).clamp_min(0) / sigma**2  # [M]
        dsm.append(float(dsm_tr.mean()) / dim)
        cdf = post.cumsum(1)
        for k, n in enumerate(ns):
            n = int(n)
            # own sources x^(1) ~ p(x0 | x_t) for all draws at once (inverse CDF of the exact posterior)
            u = torch.rand(num_xt, num_mc, generator=gen, dtype=torch.float64) * cdf[:, -1:]
            own_idx = torch.searchsorted(cdf, u).clamp_max(num - 1)  # [M, num_mc]
            xbar = torch.empty(num_mc, num_xt, dim, dtype=torch.float64)
            xbar_iid = torch.empty(num_mc, num_xt, dim, dtype=torch.float64)
            for j in range(num_mc):
                iid = flat[torch.randint(0, num, (n,), generator=gen)]  # n i.i.d. references
                own = flat[own_idx[:, j]]
                xbar[j] = stf.stf_x0_target(x_t, 1.0, sigma, iid[1:], own_source=own).double()
                xbar_iid[j] = stf.stf_x0_target(x_t, 1.0, sigma, iid).double()
            out["stf_trace"][k].append(float(conditional_trace(xbar, sigma).mean()) / dim)
            for name, values in (("stf", xbar), ("iid", xbar_iid)):
                bias2, se = squared_bias(values, mu, sigma)
                out[f"{name}_bias2"][k].append(bias2 / dim)
                out[f"{name}_bias2_se"][k].append(se / dim)
    stats = {key: torch.tensor(value, dtype=torch.float64) for key, value in out.items()}
    stats.update(
        sigma=torch.tensor(list(sigmas), dtype=torch.float64),
        ns=torch.tensor([int(n) for n in ns]),
        dsm_trace=torch.tensor(dsm, dtype=torch.float64),
    )
    return stats


def format_table(stats: dict) -> str:
    """Text table: sigma, DSM trace, and per n the STF trace, STF/DSM ratio, STF and i.i.d. squared biases."""
    ns = [int(n) for n in stats["ns"]]
    head = f"{'sigma':>8} {'DSM tr/D':>9}" + "".join(
        f" | n={n:<5}{'tr/D':>8} {'STF/DSM':>7} {'STF b2/D':>9} {'(se)':>8} {'iid b2/D':>9}" for n in ns
    )
    lines = [head, "-" * len(head)]
    for s, sigma in enumerate(stats["sigma"].tolist()):
        dsm = float(stats["dsm_trace"][s])
        row = f"{sigma:8.3g} {dsm:9.3g}"
        for k in range(len(ns)):
            tr = float(stats["stf_trace"][k, s])
            ratio = tr / dsm if dsm > 0 else float("nan")
            b2, se = float(stats["stf_bias2"][k, s]), float(stats["stf_bias2_se"][k, s])
            iid = float(stats["iid_bias2"][k, s])
            row += f" | {'':7}{tr:8.3g} {ratio:7.3f} {b2:9.1e} {se:8.1e} {iid:9.2g}"
        lines.append(row)
    return "\n".join(lines)


def plot(stats: dict, path: str, title: str = "") -> None:
    """Write a PNG: trace-of-covariance (DSM, STF per n) and squared biases (STF, i.i.d.) against sigma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigma = stats["sigma"].numpy()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.loglog(sigma, stats["dsm_trace"].clamp_min(1e-12).numpy(), "k-o", ms=3, label="DSM")
    for k, n in enumerate(stats["ns"].tolist()):
        color = f"C{k}"
        ax1.loglog(sigma, stats["stf_trace"][k].clamp_min(1e-12).numpy(), "-o", color=color, ms=3,
                   label=f"STF n={n}")  # fmt: skip
        ax2.loglog(sigma, stats["iid_bias2"][k].clamp_min(1e-12).numpy(), "--", color=color,
                   label=f"i.i.d. refs, no own source, n={n}")  # fmt: skip
        ax2.loglog(sigma, stats["stf_bias2"][k].abs().clamp_min(1e-12).numpy(), "-o", color=color, ms=3,
                   label=f"|STF| n={n}")  # fmt: skip
    ax1.set(xlabel="sigma", ylabel="tr Cov[eps target | x_t] / D", title="trace of covariance")
    ax2.set(xlabel="sigma", ylabel="||bias||^2 / D", title="squared bias vs exact score (STF: MC noise level)")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_config(path: str):
    """get_config() of a config file (run from the repository root so that its `configs.` imports resolve)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found (give a path like configs/demo.py)")
    spec = importlib.util.spec_from_file_location("_stf_variance_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load_data_subset(config, num_data: int, seed: int = 0) -> torch.Tensor:
    """num_data random training images (no augmentation), scaled like training data (get_data_scaler)."""
    import datasets

    train_set = datasets.get_train_dataset(config)
    gen = torch.Generator().manual_seed(seed)
    count = min(int(num_data), len(train_set))
    indices = torch.randperm(len(train_set), generator=gen)[:count]
    return datasets.get_data_scaler(config)(train_set.get_batch(indices, augment=False)).double()


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="", help="config file whose training set to analyse ('' = GMM)")
    parser.add_argument("--data_root", default="", help="override config.data.root")
    parser.add_argument("--num_data", type=int, default=512, help="size of the data subset (the 'truth')")
    parser.add_argument("--gmm_dim", type=int, default=32, help="dimension of the synthetic mixture")
    parser.add_argument("--sigmas", type=float, nargs="+", default=None, help="default: 13 log-spaced levels")
    parser.add_argument("--sigma_min", type=float, default=0.01)
    parser.add_argument("--sigma_max", type=float, default=50.0)
    parser.add_argument("--ns", type=int, nargs="+", default=[2, 16, 128])
    parser.add_argument("--num_xt", type=int, default=64)
    parser.add_argument("--num_mc", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("runs", "stf_variance.png"))
    args = parser.parse_args(argv)

    if args.config:
        config = load_config(args.config)
        if args.data_root:
            config.data.root = args.data_root
        data = load_data_subset(config, args.num_data, args.seed)
        name = f"{config.data.dataset} ({len(data)} training images, centered={config.data.centered})"
    else:
        data = make_gaussian_mixture(args.num_data, args.gmm_dim, seed=args.seed)
        name = f"Gaussian mixture ({len(data)} points, 8 modes, dim {args.gmm_dim})"
    if args.sigmas:
        sigmas = args.sigmas
    else:
        ratio = math.log(args.sigma_max / args.sigma_min)
        sigmas = [args.sigma_min * math.exp(ratio * i / 12) for i in range(13)]
    stats = target_statistics(data, sigmas, args.ns, args.num_xt, args.num_mc, args.seed)
    print(f"STF vs DSM targets (VE, noise-target units per dimension): {name}")
    print(format_table(stats))
    plot(stats, args.out, title=name)
    print(f"plot written to {args.out}")
    return stats


if __name__ == "__main__":
    main()
