"""score_sde_pytorch's Colab notebook, cell by cell, as its users run it: imports, config and checkpoint loading,
PC and ODE sampling, likelihood over the evaluation loader (with the TensorFlow-era batch['image']._numpy()),
inpainting and colorization. The networks are shrunk so the cells run in seconds; every call, argument name and
return convention is the notebook's."""

import numpy as np
import pytest
import torch
from fake_datasets import write_cifar10

import controllable_generation
import datasets
import sampling
from likelihood import get_likelihood_fn
from losses import get_optimizer
from models import ddpm as ddpm_model  # noqa: F401
from models import layers, layerspp, ncsnpp, ncsnv2, normalization  # noqa: F401
from models import utils as mutils
from models.ema import ExponentialMovingAverage
from sampling import (
    AncestralSamplingPredictor,  # noqa: F401
    AnnealedLangevinDynamics,  # noqa: F401
    EulerMaruyamaPredictor,
    LangevinCorrector,
    NoneCorrector,
    ReverseDiffusionPredictor,
)
from sde_lib import VESDE, VPSDE, subVPSDE
from utils import restore_checkpoint, save_checkpoint


def shrink(config):
    config.model.nf = 8
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (16,)
    config.model.num_scales = 20
    # An untrained NCSN++ with the Fourier noise embedding at scale 16 gives a score that oscillates in t on a
    # 0.01 scale, on which the adaptive likelihood ODE crawls; scale 1 keeps the random network smooth in t.
    config.model.fourier_scale = 1
    config.device = torch.device("cpu")
    return config


def notebook_setup(sde_name: str, tmp_path, monkeypatch):
    """The notebook's first cells: choose a config and SDE, build the state, restore the checkpoint."""
    if sde_name == "VESDE":
        from configs.ve import cifar10_ncsnpp_continuous as configs

        config = shrink(configs.get_config())
        sde = VESDE(sigma_min=config.model.sigma_min, sigma_max=config.model.sigma_max, N=config.model.num_scales)
        sampling_eps = 1e-5
    elif sde_name == "VPSDE":
        from configs.vp import cifar10_ddpmpp_continuous as configs

        config = shrink(configs.get_config())
        sde = VPSDE(beta_min=config.model.beta_min, beta_max=config.model.beta_max, N=config.model.num_scales)
        sampling_eps = 1e-3
    else:
        from configs.subvp import cifar10_ddpmpp_continuous as configs

        config = shrink(configs.get_config())
        sde = subVPSDE(beta_min=config.model.beta_min, beta_max=config.model.beta_max, N=config.model.num_scales)
        sampling_eps = 1e-3
    batch_size = 4
    config.training.batch_size = batch_size
    config.eval.batch_size = batch_size
    write_cifar10(tmp_path / "CIFAR10", per_batch=2, n_test=4)
    monkeypatch.setenv("SCORE_SDE_DATA", str(tmp_path))

    torch.manual_seed(0)
    mutils.get_sigmas(config)
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    trained = mutils.create_model(config)
    with torch.no_grad():  # a "trained" checkpoint in score_sde's format
        for p in trained.parameters():
            p.mul_(1.0 + 0.01 * torch.randn_like(p))
    saved = [p.detach().clone() for p in trained.parameters()]
    ckpt_filename = str(tmp_path / "checkpoint_26.pth")
    save_checkpoint(
        ckpt_filename,
        dict(
            step=26,
            optimizer=get_optimizer(config, trained.parameters()),
            model=trained,
            ema=ExponentialMovingAverage(trained.parameters(), decay=config.model.ema_rate),
        ),
    )

    score_model = mutils.create_model(config)
    optimizer = get_optimizer(config, score_model.parameters())
    ema = ExponentialMovingAverage(score_model.parameters(), decay=config.model.ema_rate)
    state = dict(step=0, optimizer=optimizer, model=score_model, ema=ema)
    state = restore_checkpoint(ckpt_filename, state, config.device)
    ema.copy_to(score_model.parameters())
    assert state["step"] == 26
    assert all(torch.equal(p, q) for p, q in zip(score_model.parameters(), saved))
    return config, sde, sampling_eps, scaler, inverse_scaler, score_model


@pytest.mark.parametrize("sde_name", ["VESDE", "VPSDE", "subVPSDE"])
def test_notebook_cells(sde_name, tmp_path, monkeypatch):
    config, sde, sampling_eps, scaler, inverse_scaler, score_model = notebook_setup(sde_name, tmp_path, monkeypatch)
    batch_size = config.eval.batch_size

    # PC sampling
    img_size = config.data.image_size
    channels = config.data.num_channels
    shape = (batch_size, channels, img_size, img_size)
    predictor = ReverseDiffusionPredictor if sde_name == "VESDE" else EulerMaruyamaPredictor
    corrector = LangevinCorrector if sde_name == "VESDE" else NoneCorrector
    sampling_fn = sampling.get_pc_sampler(
        sde,
        shape,
        predictor,
        corrector,
        inverse_scaler,
        0.16,
        n_steps=1,
        probability_flow=False,
        continuous=config.training.continuous,
        eps=sampling_eps,
        device=config.device,
    )
    x, n = sampling_fn(score_model)
    assert x.shape == shape and torch.isfinite(x).all()
    assert n == sde.N * (2 if corrector is LangevinCorrector else 1)
    grid = x.permute(0, 2, 3, 1).detach().cpu().numpy()  # the notebook's show_samples
    assert grid.shape == (batch_size, img_size, img_size, channels)

    # Probability-flow ODE sampling
    sampling_fn = sampling.get_ode_sampler(
        sde, shape, inverse_scaler, denoise=True, eps=sampling_eps, device=config.device
    )
    x, nfe = sampling_fn(score_model)
    assert x.shape == shape and torch.isfinite(x).all() and nfe > 0

    # Likelihood over the evaluation set
    train_ds, eval_ds, _ = datasets.get_dataset(config, uniform_dequantization=True, evaluation=True)
    eval_iter = iter(eval_ds)
    bpds = []
    likelihood_fn = get_likelihood_fn(sde, inverse_scaler, eps=1e-5)
    for batch in eval_iter:
        img = batch["image"]._numpy()
        img = torch.tensor(img).permute(0, 3, 1, 2).to(config.device)
        img = scaler(img)
        bpd, z, nfe = likelihood_fn(score_model, img)
        bpds.extend(bpd)
    assert len(bpds) == 4 and np.isfinite(torch.tensor(bpds).mean().item())
    assert z.shape == img.shape

    # Inpainting (the notebook passes the same keywords to the inpainter and the colorizer)
    controllable = dict(
        snr=0.16, n_steps=1, probability_flow=False, continuous=config.training.continuous, denoise=True
    )
    train_ds, eval_ds, _ = datasets.get_dataset(config)
    eval_iter = iter(eval_ds)
    pc_inpainter = controllable_generation.get_pc_inpainter(sde, predictor, corrector, inverse_scaler, **controllable)
    batch = next(eval_iter)
    img = batch["image"]._numpy()
    img = torch.from_numpy(img).permute(0, 3, 1, 2).to(config.device)
    mask = torch.ones_like(img)
    mask[:, :, :, 16:] = 0.0
    x = pc_inpainter(score_model, scaler(img), mask)
    assert x.shape == img.shape and torch.isfinite(x).all()
    alpha = float(sde.marginal_prob(torch.ones(1, 1), torch.tensor([1e-5]))[0])  # the sampler stops at eps=1e-5
    known = inverse_scaler(alpha * scaler(img))[..., :16]
    torch.testing.assert_close(x[..., :16], known, atol=1e-5, rtol=1e-5)

    # Colorization
    pc_colorizer = controllable_generation.get_pc_colorizer(sde, predictor, corrector, inverse_scaler, **controllable)
    gray_scale_img = torch.mean(img, dim=1, keepdims=True).repeat(1, 3, 1, 1)
    x = pc_colorizer(score_model, scaler(gray_scale_img))
    assert x.shape == img.shape and torch.isfinite(x).all()
    # The grey channel is held to the observation (times alpha(eps)), up to float32 rounding of the colour
    # channels: Langevin steps of this untrained network make those huge (~1e7 for VE), hence the tolerance.
    grey_out = scaler(x).mean(1)
    tol = 1e-6 * (1.0 + float(scaler(x).abs().max()))
    torch.testing.assert_close(grey_out, alpha * scaler(gray_scale_img)[:, 0], atol=tol, rtol=1e-5)
