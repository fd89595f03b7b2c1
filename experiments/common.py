"""Shared pieces of the experiments: the demo configuration, training through run_lib.train, bits/dim, samples
and the sample-quality distance (Frechet distance on low-frequency DCT features, as benchmarks/blur_samplers.py).

Only public, score_sde-compatible entry points are used (configs.demo.get_config, run_lib.train,
sde_lib.get_sde, likelihood.get_likelihood_fn, sampling.get_sampling_fn, datasets.get_eval_dataset /
get_data_scaler / get_data_inverse_scaler, evaluation.fid_from_features, corruption.dct_2d), so the scripts
measure exactly what a user's `python main.py --config configs/demo.py --mode train` trains.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

import datasets
import evaluation
import likelihood
import run_lib
import sampling
import sde_lib
from configs import demo
from corruption import dct_2d

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DCT_BLOCK = 4  # the 4 x 4 lowest DCT coefficients per channel: 48 features for RGB (benchmarks/blur_samplers.py)


def demo_config(seed: int, n_iters: int, **training: object):
    """configs/demo.py (small DDPM++, VP SDE, SHAPES 16x16) with a seed, n_iters, per-step loss logging and
    no snapshots; `training` overrides fields of config.training (st, likelihood_weighting, stf, ...)."""
    config = demo.get_config()
    config.seed = int(seed)
    config.training.n_iters = int(n_iters)
    config.training.log_freq = 1  # every training loss goes to tensorboard (the loss-variance figures)
    config.training.eval_freq = 10**9
    config.training.snapshot_freq = int(n_iters)
    config.training.snapshot_freq_for_preemption = int(n_iters)
    config.training.snapshot_sampling = False
    for key, value in training.items():
        if key not in config.training:
            raise ValueError(f"config.training has no field {key!r}.")
        setattr(config.training, key, value)
    return config


def training_losses(workdir: str) -> np.ndarray:
    """Per-step training losses [n_iters] logged by run_lib.train (tensorboard scalar 'training_loss')."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(workdir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = sorted(acc.Scalars("training_loss"), key=lambda e: e.step)
    return np.array([e.value for e in events], dtype=np.float64)


def train(config, workdir: str) -> tuple[torch.nn.Module, np.ndarray, float]:
    """Train with run_lib.train; returns (network with the EMA weights, per-step losses, seconds)."""
    start = time.perf_counter()
    state = run_lib.train(config, workdir)
    seconds = time.perf_counter() - start
    model = state["model"]
    state["ema"].copy_to(model.parameters())
    model.eval()
    return model, training_losses(workdir), seconds


def eval_images(config, num: int, offset: int = 0, dequantize: bool = False, seed: int = 0) -> torch.Tensor:
    """`num` held-out SHAPES images [num, C, H, W] in [0, 1] (uniformly dequantized when asked, seeded)."""
    dataset = datasets.get_eval_dataset(config)
    if offset + num > len(dataset):
        raise ValueError(f"asked for images {offset}..{offset + num} of an evaluation set of {len(dataset)}.")
    images = dataset.get_batch(np.arange(offset, offset + num), augment=False)
    if dequantize:  # x = (k + u) / 256, u ~ U[0, 1): score_sde's uniform dequantization
        gen = torch.Generator().manual_seed(seed)
        images = (images * 255.0 + torch.rand(images.shape, generator=gen)) / 256.0
    return images


def bits_per_dim(
    config, model: torch.nn.Module, images: torch.Tensor, batch: int = 64, tol: float = 1e-4
) -> np.ndarray:
    """Per-image bits/dim through the probability-flow ODE (likelihood.get_likelihood_fn, score_sde's 'plain'
    treatment of eps = training.truncation_time, Rademacher probe, rtol = atol = tol) of dequantized images."""
    sde, _ = sde_lib.get_sde(config)
    device = next(model.parameters()).device
    fn = likelihood.get_likelihood_fn(
        sde,
        datasets.get_data_inverse_scaler(config),
        rtol=tol,
        atol=tol,
        eps=float(config.training.truncation_time),
    )
    scaler = datasets.get_data_scaler(config)
    out = [fn(model, scaler(chunk.to(device)))[0].cpu().numpy() for chunk in torch.split(images, batch)]
    return np.concatenate(out).astype(np.float64)


def draw_samples(config, model: torch.nn.Module, num: int, seed: int, batch: int = 128) -> tuple[torch.Tensor, int]:
    """`num` samples [num, C, H, W] in [0, 1] with the config's sampler (the demo: 200 reverse-diffusion steps)."""
    sde, sampling_eps = sde_lib.get_sde(config)
    torch.manual_seed(seed)
    out, nfe = [], 0
    for start in range(0, num, batch):
        n = min(batch, num - start)
        shape = (n, config.data.num_channels, config.data.image_size, config.data.image_size)
        fn = sampling.get_sampling_fn(config, sde, shape, datasets.get_data_inverse_scaler(config), sampling_eps)
        with torch.no_grad():
            x, nfe = fn(model)
        out.append(x.clamp(0.0, 1.0).cpu())
    return torch.cat(out), int(nfe)


def dct_features(images: torch.Tensor, block: int = DCT_BLOCK) -> np.ndarray:
    """DCT-II coefficients [:, :, :K, :K] of images [N, C, H, W] -> features [N, C K^2] (float64)."""
    coeffs = dct_2d(images.to(torch.float64))
    return coeffs[:, :, :block, :block].reshape(images.shape[0], -1).cpu().numpy()


def dct_fd(images_a: torch.Tensor, images_b: torch.Tensor, block: int = DCT_BLOCK) -> float:
    """DCT-FD: the Frechet (FID) formula between Gaussian fits of the two sets' low-frequency DCT features."""
    return float(evaluation.fid_from_features(dct_features(images_a, block), dct_features(images_b, block)))


def mean_std(values) -> dict:
    """{'mean', 'std' (sample std, ddof = 1), 'values'} of a list of per-seed figures."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "values": arr.tolist()}


def write_json(path: str, payload: dict) -> None:
    """Write `payload` as indented JSON (creating the folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")


def sample_grid(images: torch.Tensor, path: str, nrow: int = 8) -> None:
    """Save the first nrow^2 images as one PNG grid."""
    import torchvision

    torchvision.utils.save_image(images[: nrow * nrow], path, nrow=nrow, padding=1)
