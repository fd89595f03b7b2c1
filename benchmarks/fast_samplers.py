"""Quality of the fast deterministic samplers (EDM Heun, DPM-Solver++(2M), DPM-Solver++(3M)) against the
adaptive probability-flow ODE solution, for every SDE, on a 1-D Gaussian-mixture toy whose score is exact.

For each SDE and NFE budget in {5, 10, 20, 35, 50} the table gives, for every sampler and both time grids
('logsnr': uniform in lambda = log(alpha/sigma); 'edm': Karras et al.'s rho = 7 grid on sigma/alpha):
  rmse  the RMSE against the adaptive RK45 solution (rtol = atol = 1e-6) from the same latents, in units of
        the data std;
  W1    the 1-D Wasserstein-1 distance between the samples and the exact marginal p_eps (exact mixture CDF),
        also in units of the data std; the adaptive solution's own W1 (Monte Carlo floor) is printed per SDE.
Heun uses 2 (n - 1) evaluations for n grid times, so its NFE is the largest even number within the budget (it
is printed). No denoising step anywhere (all samples are x_eps).

Run: python benchmarks/fast_samplers.py [--n 4000] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sampling  # noqa: E402
import sde_lib  # noqa: E402

# Gaussian mixture (weights, means, stds): asymmetric, well separated modes with different widths.
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MEANS = torch.tensor([-0.6, 0.3, 0.8], dtype=torch.float64)
STDS = torch.tensor([0.08, 0.05, 0.15], dtype=torch.float64)
NFES = (5, 10, 20, 35, 50)


def make_sdes():
    """(name, sde, eps) with score_sde's sampling eps (RVE: its own eps, where sigma = sigma_min)."""
    return [
        ("VP", sde_lib.VPSDE(), 1e-3),
        ("subVP", sde_lib.subVPSDE(), 1e-3),
        ("VE", sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0), 1e-5),
        ("RVE", sde_lib.RVESDE(sigma_min=1e-3, sigma_max=50.0, eps=1e-5), 1e-5),
    ]


def mixture_params(sde, t: torch.Tensor):
    """Per-sample component means alpha m_k and variances alpha^2 s_k^2 + sigma^2 of p_t, shapes [B, K]."""
    a = sde.alpha(t).reshape(-1, 1)
    sd = sde.marginal_std(t).reshape(-1, 1)
    return a * MEANS, a**2 * STDS**2 + sd**2


def mixture_score_fn(sde):
    """Exact score of the diffused mixture: sum_k r_k(x) (-(x - alpha m_k) / v_k), r_k responsibilities."""

    def score_fn(x, t):
        flat = x.reshape(x.shape[0], 1).to(torch.float64)
        means, var = mixture_params(sde, t.to(torch.float64))
        log_r = torch.log(WEIGHTS) - 0.5 * torch.log(2 * math.pi * var) - 0.5 * (flat - means) ** 2 / var
        r = torch.softmax(log_r, dim=1)
        score = (r * (-(flat - means) / var)).sum(1, keepdim=True)
        return score.reshape(x.shape).to(x.dtype)

    return score_fn


def mixture_cdf(sde, t: float, grid: torch.Tensor) -> torch.Tensor:
    """Exact CDF of p_t on a grid."""
    means, var = mixture_params(sde, torch.tensor([t], dtype=torch.float64))
    z = (grid.reshape(-1, 1) - means) / torch.sqrt(var)
    return (WEIGHTS * 0.5 * (1 + torch.erf(z / math.sqrt(2)))).sum(1)


def wasserstein_to_exact(sde, t: float, samples: torch.Tensor) -> float:
    """W1 = int |F_n(x) - F(x)| dx between the empirical CDF of the samples and the exact CDF of p_t."""
    x = samples.flatten().to(torch.float64)
    lo = min(float(x.min()), -3.0) - 0.5
    hi = max(float(x.max()), 3.0) + 0.5
    grid = torch.linspace(lo, hi, 20001, dtype=torch.float64)
    emp = torch.searchsorted(torch.sort(x).values, grid, right=True).to(torch.float64) / x.numel()
    diff = (emp - mixture_cdf(sde, t, grid)).abs()
    return float(torch.trapezoid(diff, grid))


def run_fast(sde, score_fn, z, eps, method: str, nfe: int, schedule: str):
    """One fast sampler at an NFE budget; returns (samples, nfe used)."""
    if method == "heun":
        ts = sampling.fast_time_grid(sde, sampling.heun_num_points(nfe, False), eps, schedule)
        return sampling.heun_sample(sde, score_fn, z, ts, denoise=False)
    order = int(method[-1])
    ts = sampling.fast_time_grid(sde, nfe + 1, eps, schedule)
    return sampling.dpm_solver_sample(sde, score_fn, z, ts, order=order)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000, help="number of samples (latents)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data_std = math.sqrt(float((WEIGHTS * (STDS**2 + MEANS**2)).sum() - (WEIGHTS * MEANS).sum() ** 2))
    methods = [("heun", "Heun"), ("dpm2", "DPM++2M"), ("dpm3", "DPM++3M")]
    schedules = ("logsnr", "edm")
    summary = {}
    start = time.time()
    for name, sde, eps in make_sdes():
        score_fn = mixture_score_fn(sde)
        torch.manual_seed(args.seed)
        z = sde.prior_sampling((args.n, 1, 1, 1)).to(torch.float32)
        ref, ref_nfe = sampling.solve_probability_flow(sde, score_fn, z, sde.T, eps, rtol=1e-6, atol=1e-6)
        ref_w1 = wasserstein_to_exact(sde, eps, ref) / data_std
        print(f"\n{name} (eps = {eps:g}): adaptive RK45 reference: {ref_nfe} evaluations, W1 = {ref_w1:.4f}")
        header = f"{'sampler':>8} {'grid':>7} | " + " | ".join(f"NFE {n:>2}: rmse     W1  " for n in NFES)
        print(header)
        print("-" * len(header))
        for key, label in methods:
            for schedule in schedules:
                cells = []
                for nfe in NFES:
                    x, used = run_fast(sde, score_fn, z, eps, key, nfe, schedule)
                    rmse = float(((x - ref).to(torch.float64) ** 2).mean().sqrt()) / data_std
                    w1 = wasserstein_to_exact(sde, eps, x) / data_std
                    summary[(name, key, schedule, nfe)] = rmse
                    mark = f"({used})" if used != nfe else ""
                    cells.append(f"{mark:>4}{rmse:8.1e} {w1:7.4f}")
                print(f"{label:>8} {schedule:>7} | " + " | ".join(cells))
    print("\nRMSE ratio edm / logsnr grid (> 1: the uniform-lambda grid is better)")
    print(f"{'SDE':>6} {'sampler':>8} | " + " | ".join(f"NFE {n:>2}" for n in NFES))
    for name, _, _ in make_sdes():
        for key, label in methods:
            ratios = [summary[(name, key, "edm", n)] / max(summary[(name, key, "logsnr", n)], 1e-12) for n in NFES]
            print(f"{name:>6} {label:>8} | " + " | ".join(f"{r:6.2f}" for r in ratios))
    print("\nRMSE ratio Heun / DPM++3M at the same budget, best grid each")
    for name, _, _ in make_sdes():
        ratios = []
        for n in NFES:
            heun = min(summary[(name, "heun", s, n)] for s in schedules)
            dpm3 = min(summary[(name, "dpm3", s, n)] for s in schedules)
            ratios.append(heun / max(dpm3, 1e-12))
        print(f"{name:>6} | " + " | ".join(f"NFE {n:>2}: {r:7.1f}" for n, r in zip(NFES, ratios)))
    print(f"\ntotal time {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
