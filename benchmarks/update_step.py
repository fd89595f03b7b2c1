"""The parameter update alone (optimizer step and EMA), side by side in one run, for the full-size networks.

The training step's update does not depend on the precision the network runs in: Adam and the EMA work on float32
parameters. This times, on the parameters of DDPM++ (vp/CIFAR10/ddpmpp_nll_st) and NCSN++
(ve/cifar10_ncsnpp_continuous) with fixed random gradients:
  - torch.optim.Adam as build_state makes it (PyTorch's default implementation for the device), with
    foreach=False (one tensor at a time), foreach=True, and fused=True (config.optim.fused);
  - the EMA update of models.ema (foreach, bit-identical to the loop) against the per-parameter loop of
    score_sde's ExponentialMovingAverage.
The variants alternate in rounds (so machine drift hits them alike); median over rounds, ratios to the first.

    python benchmarks/update_step.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.train_step import MODELS, cpu_name, load_config_file, time_call  # noqa: E402
from configs.defaults import complete_config  # noqa: E402
from models import utils as mutils  # noqa: E402
from models.ema import ExponentialMovingAverage  # noqa: E402


def loop_ema_update(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """score_sde's update: for each tensor, s -= (1 - d) * (s - p)."""
    with torch.no_grad():
        for s, p in zip(shadow, params):
            s.sub_((1 - decay) * (s - p))


def time_rounds(variants: dict, rounds: int, cuda: bool) -> dict:
    """Median seconds per call of each variant; variants alternate within each round, after one untimed round."""
    times = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, fn in variants.items():
            seconds = time_call(fn, cuda)
            if r > 0:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_model(model_name: str, device: torch.device, rounds: int) -> dict:
    config = complete_config(load_config_file(MODELS[model_name]))
    with config.unlocked():
        config.device = device
    torch.manual_seed(0)
    model = mutils.create_model(config).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    lr = config.optim.lr
    optimizers = {
        "Adam (default)": torch.optim.Adam(params, lr=lr),
        "Adam foreach=False": torch.optim.Adam(params, lr=lr, foreach=False),
        "Adam foreach=True": torch.optim.Adam(params, lr=lr, foreach=True),
        "Adam fused=True": torch.optim.Adam(params, lr=lr, fused=True),
    }
    ema = ExponentialMovingAverage(params, decay=config.model.ema_rate)
    loop_shadow = [p.detach().clone() for p in params]
    variants = {name: opt.step for name, opt in optimizers.items()}
    variants["EMA, per-parameter loop (score_sde)"] = lambda: loop_ema_update(loop_shadow, params, ema.decay)
    variants["EMA, foreach (this code)"] = lambda: ema.update(params)
    result = time_rounds(variants, rounds, device.type == "cuda")
    return {"parameters_m": sum(p.numel() for p in params) / 1e6, "seconds": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "update_step.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    machine = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(0)
    print(f"device: {args.device}, {machine}; median of {args.rounds} rounds")
    results = {"machine": machine, "device": args.device, "rounds": args.rounds, "models": {}}
    for model_name in args.models.split(","):
        row = bench_model(model_name, device, args.rounds)
        results["models"][model_name] = row
        seconds = row["seconds"]
        adam_base = seconds["Adam (default)"]
        ema_base = seconds["EMA, per-parameter loop (score_sde)"]
        print(f"{model_name} ({row['parameters_m']:.1f}M parameters)")
        for name, s in seconds.items():
            base = ema_base if name.startswith("EMA") else adam_base
            print(f"  {name:38s} {s * 1e3:8.1f} ms  {base / s:5.2f}x", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
