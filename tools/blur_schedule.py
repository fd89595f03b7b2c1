"""Pick the blur levels of Soft Diffusion from data by Wasserstein-2 distances (papers.md section 5).

1. Fit a Gaussian to the training data in the orthonormal DCT basis: per-coefficient mean m_k and
   variance v_k, with the covariance taken diagonal in that basis. Approximation: the diagonal is exact
   when the image statistics are stationary (with reflective boundary); for real images the off-diagonal
   DCT covariances are small but not 0.
2. The blur is diagonal in the same basis (response c_k(sigma) = exp(-lambda_k sigma^2 / 2)), so the
   Gaussian fit of the data blurred at level sigma (plus noise of std s) is N(c_k m_k, c_k^2 v_k + s^2):
   fitting blurred copies of the data and transforming the one fit give the same numbers; we use the
   latter for the 256 candidate levels.
3. W2 between two Gaussians with commuting (here: both diagonal) covariances has the closed form
   W2^2 = ||m1 - m2||^2 + ||sqrt(v1) - sqrt(v2)||^2.
4. Keep either the levels with equal W2 increments along the candidate path (default: num_levels of
   them, interpolated in log sigma), or, with --budget, a shortest path (fewest levels) from the smallest
   to the largest candidate whose consecutive levels are all within the W2 budget. Levels get equally
   spaced t in [0, 1].
5. Write a json file {'t': [...], 'sigma': [...], ...} that config.blur.schedule = 'file' with
   config.blur.schedule_file reads (corruption.load_schedule_file).

Run from the repository root:
  python -m tools.blur_schedule --config configs/demo_blur.py --out runs/blur_schedule.json
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import deque
from collections.abc import Iterable, Mapping

import torch

from corruption import dct_2d, heat_eigenvalues


def gaussian_fit_dct(data: torch.Tensor | Iterable, scaler=None, max_batches: int | None = None):
    """Per-coefficient mean m_k and unbiased variance v_k of DCT(x0) over the data -> (m, v) [C, H, W]."""
    batches = [data] if isinstance(data, torch.Tensor) else data
    total, sum1, sum2 = 0, None, None
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        images = batch["image"] if isinstance(batch, Mapping) else batch
        if scaler is not None:
            images = scaler(images)
        coeffs = dct_2d(images.to(torch.float64))
        if sum1 is None:
            sum1, sum2 = torch.zeros_like(coeffs[0]), torch.zeros_like(coeffs[0])
        sum1 += coeffs.sum(0)
        sum2 += (coeffs**2).sum(0)
        total += coeffs.shape[0]
    if total < 2:
        raise ValueError("gaussian_fit_dct needs at least 2 images")
    mean = sum1 / total
    var = (sum2 / total - mean**2).clamp_min(0) * total / (total - 1)
    return mean, var


def blurred_fit(
    mean: torch.Tensor, var: torch.Tensor, sigma: torch.Tensor, noise_std: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit of C_sigma x0 + s eta: (c m, c^2 v + s^2), c = exp(-lambda sigma^2 / 2) -> [L, C, H, W]"""
    lam = heat_eigenvalues(mean.shape[-2], mean.shape[-1], mean.device, mean.dtype)
    c = torch.exp(-lam * sigma.to(mean.dtype).reshape(-1, 1, 1, 1) ** 2 / 2)
    return c * mean, c**2 * var + noise_std**2


def w2_diag(mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """W2 = sqrt(||m1 - m2||^2 + ||sqrt(v1) - sqrt(v2)||^2) of diagonal Gaussians (sum over last 3 dims)."""
    d2 = (mean1 - mean2) ** 2 + (var1.sqrt() - var2.sqrt()) ** 2
    return d2.flatten(-3).sum(-1).sqrt()


def candidate_levels(sigma_min: float, sigma_max: float, num: int = 256) -> torch.Tensor:
    """num levels geometric between sigma_min and sigma_max (float64)."""
    if not 0 < sigma_min < sigma_max or num < 2:
        raise ValueError(f"need 0 < sigma_min < sigma_max and num >= 2 (got {sigma_min}, {sigma_max}, {num})")
    return torch.logspace(math.log10(sigma_min), math.log10(sigma_max), num, dtype=torch.float64)


def pairwise_w2(means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """W2 matrix [L, L] between the diagonal Gaussian fits [L, C, H, W]."""
    num = means.shape[0]
    out = torch.zeros(num, num, dtype=means.dtype)
    for i in range(num):
        out[i] = w2_diag(means[i : i + 1], variances[i : i + 1], means, variances)
    return out


def equal_increment_levels(levels: torch.Tensor, step_w2: torch.Tensor, num_levels: int) -> torch.Tensor:
    """num_levels levels with equal cumulative-W2 increments along the candidates (log sigma interpolated)."""
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2 (got {num_levels})")
    cumulative = torch.cat([torch.zeros(1, dtype=step_w2.dtype), torch.cumsum(step_w2, 0)])
    targets = torch.linspace(0, 1, num_levels, dtype=cumulative.dtype) * cumulative[-1]
    log_levels = torch.log(levels)
    out = []
    for target in targets:
        j = int(torch.searchsorted(cumulative, target, right=True).clamp(1, levels.numel() - 1))
        span = cumulative[j] - cumulative[j - 1]
        w = (target - cumulative[j - 1]) / span if span > 0 else torch.zeros((), dtype=span.dtype)
        out.append(torch.exp(log_levels[j - 1] + w.clamp(0, 1) * (log_levels[j] - log_levels[j - 1])))
    return torch.stack(out)


def shortest_path_under_budget(w2: torch.Tensor, budget: float) -> list[int]:
    """Fewest-hop path 0 -> L-1 through candidates (increasing index), every hop with W2 <= budget (BFS)."""
    num = w2.shape[0]
    parent = [-1] * num
    seen = [False] * num
    seen[0] = True
    queue = deque([0])
    while queue:
        i = queue.popleft()
        if i == num - 1:
            break
        for j in range(i + 1, num):
            if not seen[j] and w2[i, j] <= budget:
                seen[j], parent[j] = True, i
                queue.append(j)
    if not seen[num - 1]:
        raise ValueError(
            f"no path within W2 budget {budget}: some consecutive candidates are farther apart "
            f"(max step {float(torch.diagonal(w2, 1).max()):.4g}); raise --budget or --num_candidates"
        )
    path = [num - 1]
    while path[-1] != 0:
        path.append(parent[path[-1]])
    return path[::-1]


def make_schedule(
    mean: torch.Tensor,
    var: torch.Tensor,
    sigma_min: float,
    sigma_max: float,
    num_candidates: int = 256,
    num_levels: int = 32,
    budget: float | None = None,
    noise_std: float = 0.0,
) -> dict:
    """Schedule {'t', 'sigma', 'w2_steps', ...} from a DCT Gaussian fit (equal W2 increments or budget)."""
    levels = candidate_levels(sigma_min, sigma_max, num_candidates)
    means, variances = blurred_fit(mean, var, levels, noise_std)
    if budget is None:
        step_w2 = w2_diag(means[:-1], variances[:-1], means[1:], variances[1:])
        chosen = equal_increment_levels(levels, step_w2, num_levels)
        mode = "equal_w2"
    else:
        path = shortest_path_under_budget(pairwise_w2(means, variances), budget)
        chosen = levels[path]
        mode = "budget"
    chosen_means, chosen_vars = blurred_fit(mean, var, chosen, noise_std)
    steps = w2_diag(chosen_means[:-1], chosen_vars[:-1], chosen_means[1:], chosen_vars[1:])
    t = torch.linspace(0, 1, chosen.numel(), dtype=torch.float64)
    return {
        "t": t.tolist(),
        "sigma": chosen.tolist(),
        "w2_steps": steps.tolist(),
        "mode": mode,
        "budget": budget,
        "num_candidates": num_candidates,
        "noise_std": noise_std,
    }


def write_schedule(schedule: Mapping, path: str) -> None:
    """Write the schedule as json (keys 't' and 'sigma' are what corruption.load_schedule_file reads)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(schedule), f, indent=1)


def main(argv=None) -> None:
    """CLI: fit the training data of --config, choose levels, write --out."""
    from absl import app, flags
    from ml_collections import config_flags

    flags_obj = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file with a config.blur section", flag_values=flags_obj)
    flags.DEFINE_string("out", "blur_schedule.json", "output schedule file (json)", flag_values=flags_obj)
    flags.DEFINE_integer("num_candidates", 256, "candidate blur levels (geometric in sigma)", flag_values=flags_obj)
    flags.DEFINE_integer("num_levels", 32, "levels kept with equal W2 increments", flag_values=flags_obj)
    flags.DEFINE_float("budget", None, "W2 budget per step: keep a shortest path instead", flag_values=flags_obj)
    flags.DEFINE_integer("num_batches", 50, "training batches used for the Gaussian fit", flag_values=flags_obj)
    flags.DEFINE_boolean("with_noise", False, "add noise_min^2 to the fitted variances", flag_values=flags_obj)
    flags_obj(sys.argv if argv is None else argv)
    config = flags_obj.config
    if config is None:
        raise app.UsageError("--config is required (a config file with a config.blur section)")
    if "blur" not in config:
        raise ValueError("the config has no config.blur section: use a *_blur config")

    import datasets

    train_ds, _, _ = datasets.get_dataset(config, uniform_dequantization=config.data.uniform_dequantization)
    scaler = datasets.get_data_scaler(config)
    mean, var = gaussian_fit_dct(train_ds, scaler=scaler, max_batches=flags_obj.num_batches)
    schedule = make_schedule(
        mean,
        var,
        config.blur.sigma_min,
        config.blur.sigma_max,
        num_candidates=flags_obj.num_candidates,
        num_levels=flags_obj.num_levels,
        budget=flags_obj.budget,
        noise_std=config.blur.noise_min if flags_obj.with_noise else 0.0,
    )
    write_schedule(schedule, flags_obj.out)
    steps = schedule["w2_steps"]
    print(
        f"wrote {flags_obj.out}: {len(schedule['sigma'])} levels from {schedule['sigma'][0]:.4g} to "
        f"{schedule['sigma'][-1]:.4g} px ({schedule['mode']}), "
        f"W2 per step min {min(steps):.4g} max {max(steps):.4g}"
    )


if __name__ == "__main__":
    main()
