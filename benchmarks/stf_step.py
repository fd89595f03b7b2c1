"""One training step (forward + backward) with the STF target against the plain DSM target.

Same network, batch, time draws and optimiser-free step; only the target differs. The network is the demo's
small DDPM++ (configs/demo.py: nf 32, ch_mult (1, 2, 2), one res block, attention at 8x8) built by
models.utils.create_model at --image_size (default 16 to keep the CPU run short; 32 is CIFAR-10's shape); if
the models package cannot build it, a small conv net is used instead and the output says so. Also timed
separately: the STF target alone (stf.stf_noise_target over the reference batch) and the reference-batch
sampling (ReferenceBatchSampler over an in-memory uint8 tensor of --num_train images with random flips).

The variants run round-robin (one repetition of each in turn, in a new random order each round) so that load
changes on a shared machine hit all of them alike; the table gives median wall and process-CPU times per
step and their ratios to the DSM step (on a shared CPU the CPU time is the meaningful figure; on a GPU the
wall time).

Run from the repository root: python -m benchmarks.stf_step [--batch 16 --image_size 16 --ns 1024 4096]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import losses  # noqa: E402
import sde_lib  # noqa: E402
import stf  # noqa: E402


class SmallConvNet(torch.nn.Module):
    """Fallback noise-prediction network: 3 conv layers with a time embedding added to the hidden features."""

    def __init__(self, channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.mid = torch.nn.Conv2d(width, width, 3, padding=1)
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)
        self.emb = torch.nn.Linear(1, width)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.inp(x) + self.emb(labels.float()[:, None] / 1000)[:, :, None, None])
        return self.out(torch.nn.functional.silu(self.mid(h)))


def build_model(image_size: int, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The demo DDPM++ at image_size (or the fallback conv net) and its description."""
    try:
        from configs import demo
        from models import utils as mutils

        config = demo.get_config()
        config.data.image_size = image_size
        config.device = device
        model = mutils.create_model(config)
        name = f"DDPM++ ({config.model.name}, nf {config.model.nf}, ch_mult {tuple(config.model.ch_mult)})"
    except Exception as err:  # the models package is optional for this benchmark
        print(f"models package unavailable ({type(err).__name__}: {err}); using the fallback conv net")
        model, name = SmallConvNet().to(device), "fallback 3-layer conv net (width 64)"
    n_params = sum(p.numel() for p in model.parameters())
    return model, f"{name}, {n_params / 1e6:.2f}M parameters"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="STF vs DSM training-step time")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--ns", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--num_train", type=int, default=8192, help="in-memory training set for the sampler")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, model_name = build_model(args.image_size, device)
    sde = sde_lib.VPSDE()
    shape = (3, args.image_size, args.image_size)
    train_set = torch.randint(0, 256, (args.num_train, *shape), dtype=torch.uint8)
    batch = train_set[: args.batch].to(device).float() / 127.5 - 1
    scaler = lambda x: 2 * x - 1  # noqa: E731  (centered data, like the VP configs)

    dsm_loss = losses.get_per_sample_loss_fn(sde, train=True, reduce_mean=True, continuous=True)
    stf_loss = losses.get_per_sample_loss_fn(sde, train=True, reduce_mean=True, continuous=True, stf=True)
    samplers = {n: stf.ReferenceBatchSampler(train_set, n, random_flip=True, scaler=scaler) for n in args.ns}
    references = {n: samplers[n].reference_batch(batch) for n in args.ns}
    t = torch.rand(args.batch, device=device) * (1 - 1e-5) + 1e-5
    x_t = sde.alpha(t)[:, None, None, None] * batch + sde.marginal_std(t)[:, None, None, None] * torch.randn_like(batch)

    def step(loss_fn, reference=None):
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch, reference=reference).mean().backward()

    variants = {"DSM step": lambda: step(dsm_loss)}
    for n in args.ns:
        variants[f"STF step, n={n}"] = lambda n=n: step(stf_loss, references[n])
        variants[f"STF step + sampling, n={n}"] = lambda n=n: step(stf_loss, samplers[n].reference_batch(batch))
        variants[f"  STF target only, n={n}"] = lambda n=n: stf.stf_noise_target(
            x_t, sde.alpha(t), sde.marginal_std(t), references[n]
        )
        variants[f"  reference sampling only, n={n}"] = lambda n=n: samplers[n].reference_batch(batch)

    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.reps + 1):  # the first round is a warm-up
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(rep)).tolist()
        for name in (names[i] for i in order):  # a new order each round: no variant always runs first
            fn = variants[name]
            torch.manual_seed(rep)  # same time / noise draws for every variant
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            if rep > 0:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)

    wall_med = {name: statistics.median(v) for name, v in wall.items()}
    cpu_med = {name: statistics.median(v) for name, v in cpu.items()}
    print(f"model: {model_name}; batch {args.batch} x {shape}; device {device}; {args.reps} reps (median)")
    print("CPU time (all threads of this process) is the robust figure on a shared CPU; wall time on a GPU.")
    print(f"{'variant':<36} {'wall ms':>10} {'/ DSM':>7} {'CPU ms':>10} {'/ DSM':>7}")
    for name in variants:
        w, c = wall_med[name], cpu_med[name]
        w_ratio, c_ratio = w / wall_med["DSM step"], c / max(cpu_med["DSM step"], 1e-12)
        print(f"{name:<36} {1e3 * w:10.2f} {w_ratio:7.3f} {1e3 * c:10.2f} {c_ratio:7.3f}")
    return {"wall": wall_med, "cpu": cpu_med}


if __name__ == "__main__":
    main()
