"""Per-time contribution of the likelihood-weighted score-matching loss (Soft Truncation, papers.md sec. 3).

With likelihood weighting lambda = g^2 the denoising loss is an integral over t of

    integrand(t) = (g^2(t) / 2) E_{x0, z} || s_theta(x_t, t) + z / sigma(t) ||^2 / D
                 = (g^2 / (2 sigma^2)) E || sigma s_theta + z ||^2 / D,      x_t = alpha x0 + sigma z,

per data dimension D. Even for the exact score it varies by orders of magnitude over t (for data
N(mu, s^2 I): (g^2/2)(1/sigma^2 - 1/(alpha^2 s^2 + sigma^2)), which behaves like g^2 / (2 sigma^2) as t -> 0),
so small t dominates the loss. The tool estimates the integrand on a log-spaced grid of t in [eps, T], prints
a table with the cumulative share of the loss integral int_eps^t (the loss mass below t), and the same share
under Soft Truncation with P_k (in expectation ST trains with lambda = g^2 F_k(t), F_k the CDF of P_k), and
writes a log-log PNG plot. Use it to choose eps (where the integrand explodes) and k (how much of the small-t
mass ST should down-weight).

Run from the repository root, e.g.
  python -m tools.plot_loss_integrand --config configs/demo.py --workdir runs/demo --out runs/integrand.png
  python -m tools.plot_loss_integrand --config configs/vp/CIFAR10/ddpmpp_nll_st.py \\
      --checkpoint runs/cifar/checkpoints/checkpoint_8.pth --num_t 40 --batch 128 --ks 1 2
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import sde_lib  # noqa: E402

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Pure functions


def log_time_grid(eps: float, T: float, num_t: int) -> torch.Tensor:
    """num_t times log-spaced in [eps, T] (float64)."""
    if not 0.0 < eps < T:
        raise ValueError(f"need 0 < eps < T for the time grid; got eps={eps}, T={T} (set --eps)")
    if num_t < 2:
        raise ValueError(f"--num_t must be at least 2, got {num_t}")
    return torch.logspace(math.log10(eps), math.log10(T), num_t, dtype=torch.float64)


@torch.no_grad()
def loss_integrand(
    score_fn: ScoreFn,
    sde,
    x0: torch.Tensor,
    ts: torch.Tensor | Sequence[float],
    n_noise: int,
    generator: torch.Generator | None = None,
    return_sem: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """integrand(t) = (g^2 / (2 sigma^2)) E_{x0, z} ||sigma s(x_t, t) + z||^2 / D, for each t in ts.

    The expectation is a Monte Carlo average over the batch x0 [B, ...] and n_noise draws of z per sample.
    With return_sem, also returns the Monte Carlo standard error of each estimate.
    """
    ts = torch.as_tensor(ts, dtype=torch.float64).reshape(-1)
    b = x0.shape[0]
    d = x0[0].numel()
    values, sems = [], []
    for t_value in ts.tolist():
        t = torch.full((b,), t_value, device=x0.device, dtype=x0.dtype)
        mean, std = sde.marginal_prob(x0, t)
        std_b = std.reshape(b, *([1] * (x0.ndim - 1)))
        per_sample = []
        for _ in range(n_noise):
            z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = mean + std_b * z
            residual = std_b * score_fn(x_t, t) + z
            per_sample.append(residual.reshape(b, -1).double().pow(2).sum(1) / d)
        sq = torch.cat(per_sample)
        weight = 0.5 * float(sde.likelihood_weight_ratio(torch.tensor([t_value], dtype=torch.float64)))
        values.append(weight * sq.mean())
        sems.append(weight * sq.std() / math.sqrt(sq.numel()) if sq.numel() > 1 else torch.tensor(float("nan")))
    values_t = torch.stack(values).cpu()
    if return_sem:
        return values_t, torch.stack([torch.as_tensor(s) for s in sems]).cpu()
    return values_t


def cumulative_share(ts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Share of int_{t_0}^{t_i} integrand dt in the total (trapezoid rule in log t: dt = t dlog t)."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    f = torch.as_tensor(values, dtype=torch.float64) * ts
    steps = 0.5 * (f[1:] + f[:-1]) * torch.diff(torch.log(ts))
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(steps, 0)])
    return cum / cum[-1]


def st_weighted(ts: torch.Tensor, values: torch.Tensor, k: float, eps: float, T: float = 1.0) -> torch.Tensor:
    """Integrand under Soft Truncation with P_k: E_tau weighting lambda = g^2 F_k(t) (papers.md section 3)."""
    return torch.as_tensor(values, dtype=torch.float64) * sde_lib.truncation_cdf(
        torch.as_tensor(ts, dtype=torch.float64), k, eps, T
    )


def share_quantile(ts: torch.Tensor, share: torch.Tensor, q: float) -> float:
    """Smallest grid time where the cumulative share reaches q."""
    idx = int(torch.nonzero(share >= q)[0])
    return float(ts[idx])


def format_table(ts, sigmas, values, sems, shares: dict[str, torch.Tensor]) -> str:
    """Text table: t, sigma(t), integrand, its standard error and the cumulative shares."""
    names = list(shares)
    head = f"{'t':>10} {'sigma(t)':>10} {'integrand':>11} {'+-sem':>9} " + " ".join(f"{n:>9}" for n in names)
    rows = [head, "-" * len(head)]
    for i in range(len(ts)):
        cells = " ".join(f"{float(shares[n][i]):9.4f}" for n in names)
        first = f"{float(ts[i]):10.3e} {float(sigmas[i]):10.3e} {float(values[i]):11.4e} {float(sems[i]):9.2e}"
        rows.append(f"{first} {cells}")
    return "\n".join(rows)


def plot(ts, values, curves: dict[str, torch.Tensor], shares: dict[str, torch.Tensor], out: str, title: str):
    """Log-log plot of the integrand (and its ST-weighted versions) and the cumulative shares; writes out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax0.loglog(ts.numpy(), values.numpy(), "o-", ms=3, label="likelihood weighting")
    for name, c in curves.items():
        keep = c > values.min() * 1e-3  # F_k(eps) = 0: leave the vanishing start off the log axis
        ax0.loglog(ts[keep].numpy(), c[keep].numpy(), "--", label=name)
    ax0.set_ylim(bottom=float(values.min()) * 0.3)
    ax0.set_xlabel("t")
    ax0.set_ylabel("(g^2/2) E||s + z/sigma||^2 per dim")
    ax0.set_title("loss integrand")
    ax0.legend(fontsize=8)
    ax0.grid(True, which="both", alpha=0.3)
    for name, s in shares.items():
        ax1.semilogx(ts.numpy(), s.numpy(), label=name)
    ax1.set_xlabel("t")
    ax1.set_ylabel("cumulative share of the loss")
    ax1.set_title("share of int_eps^t")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def analyse(score_fn, sde, x0, eps, num_t, n_noise, ks, generator=None) -> dict:
    """Integrand on the log grid, standard errors, cumulative shares (plain and ST for each k)."""
    T = float(sde.T)
    ts = log_time_grid(eps, T, num_t)
    values, sems = loss_integrand(score_fn, sde, x0, ts, n_noise, generator=generator, return_sem=True)
    curves = {f"ST k={k:g}": st_weighted(ts, values, k, eps, T) for k in ks}
    shares = {"share": cumulative_share(ts, values)}
    shares.update({f"k={k:g}": cumulative_share(ts, c) for k, c in zip(ks, curves.values())})
    sigmas = sde.marginal_std(ts)
    return dict(ts=ts, sigmas=sigmas, values=values, sems=sems, curves=curves, shares=shares)


def summary(result: dict) -> str:
    """One-paragraph summary: dynamic range and where half / 90% of the loss mass lies."""
    ts, values, share = result["ts"], result["values"], result["shares"]["share"]
    lines = [
        f"integrand range: max/min = {float(values.max() / values.min()):.3g} "
        f"(t={float(ts[0]):.2e}: {float(values[0]):.3e}, t={float(ts[-1]):.2e}: {float(values[-1]):.3e})",
        f"likelihood weighting: 50% of the loss below t = {share_quantile(ts, share, 0.5):.3e}, "
        f"90% below t = {share_quantile(ts, share, 0.9):.3e}",
    ]
    for name, s in result["shares"].items():
        if name != "share":
            lines.append(f"ST {name}: 50% of the loss below t = {share_quantile(ts, s, 0.5):.3e}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Loading a trained model (project APIs, score_sde signatures)


def load_config(path: str):
    """get_config() of a config file (run from the repository root so that its `configs.` imports resolve)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found (give a path like configs/demo.py)")
    spec = importlib.util.spec_from_file_location("_plot_loss_integrand_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def find_checkpoint(workdir: str) -> str:
    """Latest WORKDIR/checkpoints/checkpoint_N.pth, else WORKDIR/checkpoints-meta/checkpoint.pth."""
    folder = os.path.join(workdir, "checkpoints")
    numbers = []
    if os.path.isdir(folder):
        numbers = [int(m.group(1)) for n in os.listdir(folder) if (m := re.match(r"checkpoint_(\d+)\.pth$", n))]
    if numbers:
        return os.path.join(folder, f"checkpoint_{max(numbers)}.pth")
    meta = os.path.join(workdir, "checkpoints-meta", "checkpoint.pth")
    if os.path.isfile(meta):
        return meta
    raise FileNotFoundError(
        f"no checkpoint in {workdir!r}: expected checkpoints/checkpoint_N.pth or "
        "checkpoints-meta/checkpoint.pth (train first, or pass --checkpoint PATH)"
    )


def load_score_fn(config, ckpt_path: str, device: torch.device, use_ema: bool = True):
    """Build the model of config, restore ckpt_path (EMA weights if use_ema) and return (score_fn, sde)."""
    import utils
    from models import utils as mutils
    from models.ema import ExponentialMovingAverage

    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} not found (check --checkpoint / --workdir)")
    model = mutils.create_model(config)
    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    state = dict(optimizer=None, model=model, ema=ema, step=0)
    state = utils.restore_checkpoint(ckpt_path, state, device)
    if use_ema:
        ema.copy_to(model.parameters())
    model.eval()
    sde, _ = sde_lib.get_sde(config)
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=config.training.continuous)
    return score_fn, sde, int(state["step"])


def load_batch(config, batch: int, device: torch.device, seed: int) -> torch.Tensor:
    """First evaluation batch of config's dataset, scaled as in training (dequantized if configured)."""
    import datasets

    config.eval.batch_size = batch
    dequant = bool(getattr(config.data, "uniform_dequantization", False))
    torch.manual_seed(seed)
    _, eval_ds, _ = datasets.get_dataset(config, uniform_dequantization=dequant, evaluation=True)
    images = next(iter(eval_ds))["image"][:batch].to(device)
    return datasets.get_data_scaler(config)(images)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config file of the run, e.g. configs/demo.py")
    parser.add_argument("--workdir", default="", help="run folder: its latest checkpoint is used")
    parser.add_argument("--checkpoint", default="", help="checkpoint file (overrides --workdir)")
    parser.add_argument("--out", default=os.path.join("runs", "loss_integrand.png"), help="PNG plot path")
    parser.add_argument("--num_t", type=int, default=30, help="number of log-spaced times in [eps, T]")
    parser.add_argument("--batch", type=int, default=64, help="data samples x0 per time")
    parser.add_argument("--n_noise", type=int, default=2, help="noise draws z per sample and time")
    parser.add_argument("--eps", type=float, default=None, help="smallest t (default training.truncation_time)")
    parser.add_argument("--ks", type=float, nargs="*", default=[1.0, 2.0], help="Soft Truncation k to compare")
    parser.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--device", default="", help="override config.device (e.g. cpu)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = load_config(args.config)
    device = torch.device(args.device or str(getattr(config, "device", "cpu")))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: using the CPU (pass --device to choose)")
        device = torch.device("cpu")
    config.device = device
    if args.checkpoint:
        ckpt = args.checkpoint
    elif args.workdir:
        ckpt = find_checkpoint(args.workdir)
    else:
        raise ValueError("give --checkpoint PATH or --workdir RUN_FOLDER")
    eps = args.eps
    if eps is None:
        eps = float(getattr(config.training, "truncation_time", None) or 1e-5)

    score_fn, sde, step = load_score_fn(config, ckpt, device, use_ema=not args.no_ema)
    x0 = load_batch(config, args.batch, device, args.seed)
    generator = torch.Generator(device).manual_seed(args.seed)
    result = analyse(score_fn, sde, x0, eps, args.num_t, args.n_noise, args.ks, generator=generator)

    title = (
        f"{os.path.basename(args.config)} | {config.training.sde} | {os.path.basename(ckpt)} (step {step}) | "
        f"{x0.shape[0]} images x {args.n_noise} noise draws"
    )
    print(title)
    print(format_table(result["ts"], result["sigmas"], result["values"], result["sems"], result["shares"]))
    print(summary(result))
    plot(result["ts"], result["values"], result["curves"], result["shares"], args.out, title)
    print(f"plot written to {args.out}")
    return result


if __name__ == "__main__":
    main()
