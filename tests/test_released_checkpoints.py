"""A released checkpoint runs with one command and no dataset.

The checkpoint file is built the way score_sde_pytorch's training loop wrote it (tests/data/README.md): the network
wrapped in torch.nn.DataParallel ('module.' keys), the original ExponentialMovingAverage state dict
{'decay', 'num_updates', 'shadow_params'}, the Adam state after a step, and 'step'. The config is a 256 px one at its
full architecture (NCSN++, 65.6M parameters); sampling runs on the CPU through main.py with one network evaluation
(DPM-Solver, order 1), and the samples must be those of the EMA weights, not of the raw ones.
"""

import os
import subprocess
import sys

import numpy as np
import torch
from conftest import ROOT

import evaluation
import run_lib
from models import utils as mutils

CONFIG = os.path.join("configs", "ve", "ffhq_256_ncsnpp_continuous.py")
if not os.path.exists(os.path.join(ROOT, CONFIG)):  # pragma: no cover - older trees
    CONFIG = os.path.join("configs", "ve", "celebahq_256_ncsnpp_continuous.py")
CKPT = 7  # any N: the file keeps the number it was released with
OVERRIDES = {
    "eval.batch_size": 1,
    "eval.num_samples": 1,
    "sampling.method": "dpm_solver",
    "sampling.nfe": 1,
    "sampling.dpm_solver_order": 1,
    "sampling.noise_removal": False,
}


def load_config():
    """The config file as main.py sees it, with the command line's overrides."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("released_config", os.path.join(ROOT, CONFIG))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.device = torch.device("cpu")
    for key, value in OVERRIDES.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def write_original_checkpoint(config, path: str) -> tuple[list, list]:
    """score_sde's training-loop checkpoint of a perturbed network: returns (raw params, EMA shadow params)."""
    torch.manual_seed(0)
    network = torch.nn.DataParallel(mutils.create_model(config))  # the original wraps every model
    gen = torch.Generator().manual_seed(1)
    noise = [torch.randn(p.shape, generator=gen) for p in network.parameters()]  # one draw per tensor (CPU time)
    with torch.no_grad():  # weights with an output of order one (the initial last layer is zero)
        for p, n in zip(network.parameters(), noise):
            p.add_(0.02 * n)
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    trainable = [(p, n) for p, n in zip(network.parameters(), noise) if p.requires_grad]  # not: Fourier features
    for p, n in trainable:
        p.grad = 1e-3 * n.flip(-1)
    optimizer.step()
    optimizer.param_groups[0]["foreach"] = None  # the default, as a training run saves it
    raw = [p.detach().clone() for p in network.parameters()]
    shadow = [p.detach() + 0.02 * n.flatten().roll(1).reshape(n.shape) for p, n in trainable]  # EMA != raw
    ema = {"decay": 0.9999, "num_updates": 1, "shadow_params": shadow}
    saved = {"optimizer": optimizer.state_dict(), "model": network.state_dict(), "ema": ema, "step": 1}
    assert all(key.startswith("module.") for key in saved["model"])
    assert all("exp_avg" in s for s in saved["optimizer"]["state"].values())
    torch.save(saved, path)
    return raw, shadow


def reference_samples(config, raw: list, shadow: list | None = None) -> torch.Tensor:
    """What run_lib.sample draws with the raw weights (or with the EMA shadow copied into the trainable ones):
    the same sampler and seed (round 0), float in [0, 1]."""
    model = mutils.create_model(config).eval()
    with torch.no_grad():
        for p, value in zip(model.parameters(), raw):
            p.copy_(value)
        if shadow is not None:
            for p, value in zip([p for p in model.parameters() if p.requires_grad], shadow, strict=True):
                p.copy_(value)
    sde, eps = run_lib.get_corruption(config)
    sampling_fn = run_lib.get_sampling_fn_from_config(config, sde, eps, 1)
    torch.manual_seed(config.seed)
    with torch.no_grad():
        x, nfe = sampling_fn(model)
    assert nfe == 1
    return x


def test_released_256px_checkpoint_samples_with_one_command(tmp_path):
    config = load_config()
    workdir = tmp_path / "ffhq_256"
    (workdir / "checkpoints").mkdir(parents=True)
    raw, shadow = write_original_checkpoint(config, str(workdir / "checkpoints" / f"checkpoint_{CKPT}.pth"))

    # one command, no dataset anywhere (the data root points at an empty folder, downloads off)
    flags = [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
    flags += [f"--config.data.root={tmp_path / 'no-data'}", "--config.data.download=False"]
    command = [sys.executable, "main.py", "--config", CONFIG, "--workdir", str(workdir), "--mode", "sample"]
    command += ["--device", "cpu", *flags]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sampling ckpt 7" in run.stderr  # the progress bar

    out_dir = workdir / "eval" / f"samples_ckpt_{CKPT}_dpm_solver"
    with np.load(out_dir / "samples_0.npz") as data:
        samples = data["samples"]
    assert samples.shape == (1, 256, 256, 3) and samples.dtype == np.uint8
    assert (out_dir / "samples_0.png").exists()
    assert "1 network evaluations" in (out_dir / "train.log").read_text()

    # the EMA weights were sampled from, not the raw ones
    ema_x = reference_samples(config, raw, shadow)
    assert torch.isfinite(ema_x).all()
    ema_u8 = evaluation.samples_to_uint8_nhwc(ema_x)
    raw_u8 = evaluation.samples_to_uint8_nhwc(reference_samples(config, raw))
    agree_ema = float(np.mean(samples == ema_u8))
    agree_raw = float(np.mean(samples == raw_u8))
    assert agree_ema > 0.99, agree_ema
    assert agree_raw < 0.95, agree_raw
