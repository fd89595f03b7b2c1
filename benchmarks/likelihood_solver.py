"""Likelihood (bits/dim) evaluation time: torch ODE solver on the device vs SciPy RK45 + NumPy round trips.

Variants, same model, data, Hutchinson probe, eps and tolerances:
  scipy_score_sde : scipy.integrate.solve_ivp(RK45) on a flattened float64 NumPy state, the drift and the
                    divergence computed by separate network passes per evaluation (what score_sde does);
  scipy_fused     : the same SciPy solver, drift and divergence from one forward + one backward pass;
  torch_dopri5    : likelihood.get_likelihood_fn (torchdiffeq dopri5, state stays on the device, fused pass).
Model: a small DDPM++ (models/ncsnpp.py, VP continuous, nf 16, one level, one res block) with randomly
perturbed weights (so the score is not trivially zero) and its time-embedding input zeroed: with random
weights the sinusoidal embedding of 999 t oscillates with period ~2 pi / 999 in t, which an adaptive solver
must resolve with thousands of steps, while a trained network is smooth in t; the cost per evaluation is
unchanged. Falls back to a small conv net if the model zoo cannot be built.
Timing: the variants run round-robin `--repeats` times; the minimum is reported.

Run: python -m benchmarks.likelihood_solver [--device cuda] [--batch 4] [--size 8] [--tol 1e-5] [--repeats 1]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy import integrate

import likelihood
import sde_lib


class SmallConvNet(torch.nn.Module):
    """Fallback noise-prediction net: 3 convs with a time embedding added to the hidden features."""

    def __init__(self, channels: int = 3, hidden: int = 32):
        super().__init__()
        self.inp = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.mid = torch.nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = torch.nn.Conv2d(hidden, channels, 3, padding=1)
        self.temb = torch.nn.Linear(1, hidden)

    def forward(self, x, labels):
        h = torch.nn.functional.silu(self.inp(x) + self.temb(labels[:, None] / 1000.0)[:, :, None, None])
        return self.out(torch.nn.functional.silu(self.mid(h)))


def build_model(size: int, device: torch.device) -> tuple[torch.nn.Module, str]:
    """A small DDPM++ (nf 16, ch_mult (1,), 1 res block) or the fallback conv net, weights perturbed."""
    torch.manual_seed(0)
    try:
        import models.ncsnpp  # noqa: F401  (registers the model)
        from configs.vp import cifar10_ddpmpp_continuous
        from models import utils as mutils

        config = cifar10_ddpmpp_continuous.get_config()
        config.device = device
        config.data.image_size = size
        config.model.nf = 16
        config.model.ch_mult = (1,)
        config.model.num_res_blocks = 1
        config.model.attn_resolutions = ()
        model, name = mutils.create_model(config), "DDPM++ (nf 16, ch_mult (1,), time input zeroed)"
    except Exception as err:  # the model zoo is optional for this benchmark
        print(f"(DDPM++ unavailable: {err!r}; using a small conv net)")
        model, name = SmallConvNet().to(device), "small conv net"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if hasattr(model, "all_modules"):  # DDPM++: the first module is the time-embedding input layer
            model.all_modules[0].weight.zero_()
    return model.eval(), name


def scipy_likelihood(sde, score_fn, data, probe, eps, rtol, atol, fused):
    """score_sde's likelihood: solve_ivp(RK45) on [x, logp] as flat float64 NumPy, to torch at every call."""
    shape, device = data.shape, data.device
    drift_fn = likelihood.probability_flow_drift(sde, score_fn)
    div_fn = likelihood.get_div_fn(drift_fn)
    nfe = 0

    def ode_func(t, y):
        nonlocal nfe
        nfe += 1
        x = torch.from_numpy(y[: -shape[0]].reshape(shape)).to(device).float()
        vec_t = torch.full((shape[0],), t, device=device)
        if fused:
            drift, div = likelihood._drift_and_div(drift_fn, x, vec_t, probe)
        else:
            with torch.no_grad():
                drift = drift_fn(x, vec_t)
            div = div_fn(x, vec_t, probe)
        return np.concatenate([drift.detach().cpu().numpy().reshape(-1), div.detach().cpu().numpy()]).astype(np.float64)

    y0 = np.concatenate([data.cpu().numpy().reshape(-1), np.zeros(shape[0])]).astype(np.float64)
    sol = integrate.solve_ivp(ode_func, (eps, sde.T), y0, rtol=rtol, atol=atol, method="RK45")
    z = torch.from_numpy(sol.y[: -shape[0], -1].reshape(shape)).to(device).float()
    delta_logp = torch.from_numpy(sol.y[-shape[0] :, -1]).to(device)
    nll = -(sde.prior_logp(z).double() + delta_logp)
    bpd = nll / (data[0].numel() * math.log(2.0)) + 7.0
    return bpd.float().cpu(), nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-5, help="rtol = atol (score_sde: 1e-5)")
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    sde = sde_lib.VPSDE()
    model, model_name = build_model(args.size, device)
    from models import utils as mutils

    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
    g = torch.Generator().manual_seed(1)
    data = (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1).to(device)
    torch.manual_seed(2)
    probe = likelihood.draw_probe(data, "Rademacher")

    lik = likelihood.get_likelihood_fn(sde, lambda x: (x + 1) / 2, rtol=args.tol, atol=args.tol, eps=args.eps)

    def run_torch():
        torch.manual_seed(2)  # ode_likelihood draws the same Rademacher probe as above
        bpd, _, nfe = lik.from_score(score_fn, data)
        return bpd.cpu(), nfe

    variants = {
        "scipy_score_sde": lambda: scipy_likelihood(sde, score_fn, data, probe, args.eps, args.tol, args.tol, False),
        "scipy_fused": lambda: scipy_likelihood(sde, score_fn, data, probe, args.eps, args.tol, args.tol, True),
        "torch_dopri5": run_torch,
    }
    print(
        f"model: {model_name}, device {device}, batch {args.batch} x 3 x {args.size} x {args.size}, "
        f"rtol = atol = {args.tol}, eps = {args.eps}, Rademacher probe shared"
    )
    results = {}
    drift_fn = likelihood.probability_flow_drift(sde, score_fn)
    likelihood._drift_and_div(drift_fn, data, torch.full((args.batch,), 0.5, device=device), probe)  # warm-up
    for _ in range(args.repeats):
        for name, fn in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            bpd, nfe = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - start
            if name not in results or secs < results[name][0]:
                results[name] = (secs, nfe, bpd)
    base_time = results["scipy_score_sde"][0]
    base_bpd = results["scipy_score_sde"][2]
    print(f"{'variant':<18}{'time [s]':>10}{'NFE':>6}{'ms/NFE':>9}{'speed-up':>10}{'mean bpd':>11}{'max |dbpd|':>12}")
    for name, (secs, nfe, bpd) in results.items():
        print(
            f"{name:<18}{secs:>10.3f}{nfe:>6d}{1000 * secs / nfe:>9.2f}{base_time / secs:>10.2f}"
            f"{float(bpd.mean()):>11.5f}{float((bpd - base_bpd).abs().max()):>12.2e}"
        )


if __name__ == "__main__":
    main()
