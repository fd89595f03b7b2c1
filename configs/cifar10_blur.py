"""Soft Diffusion (Daras et al. 2023; papers.md section 5) on CIFAR-10: blur + low noise, DDPM++.

Corruption x_t = C_t x0 + s_t eta: blur std sigma_B(t) geometric from 0.3 to 20 pixels (at 20 px on
32x32 only the DC and the first DCT harmonic (response 0.15) survive, so the fitted Gaussian prior at
t = 1 is accurate), noise s_t geometric from 0.01 to 0.1 (data centered to [-1, 1]). For the paper's
Wasserstein-2 schedule run
  python -m tools.blur_schedule --config configs/cifar10_blur.py --out runs/cifar10_blur_schedule.json
and set blur.schedule = 'file', blur.schedule_file to that path. Network: DDPM++ with positional time
embedding, input x_t and label 999 t, predicting the residual h(x_t, t) - x_t. Loss: Soft Score Matching
with the DSM-equivalent weighting ||C_t(h - x0)||^2 / s_t^2 (training.weighting = 'variance').
Sampler: the Momentum Sampler.
"""

from configs.default_cifar10_configs import get_default_configs
from configs.defaults import default_blur_config
from configs.presets import set_ddpmpp


def get_config():
    config = set_ddpmpp(get_default_configs())
    training = config.training
    training.corruption = "blur"
    training.continuous = True
    training.reduce_mean = True
    training.weighting = "variance"  # lambda = s_t^2: the 'ssm' weighting; 'x0' is the plain ||C_t(h - x0)||^2
    training.truncation_time = 1e-3  # t ~ U[1e-3, 1] in training; also the last time of the sampling grid
    training.st = False  # Soft Truncation is defined for the Gaussian SDEs' likelihood weighting only

    config.blur = blur = default_blur_config()
    blur.sigma_min = 0.3
    blur.sigma_max = 20.0
    blur.schedule = "log"
    blur.noise_schedule = "geometric"
    blur.noise_min = 0.01
    blur.noise_max = 0.1
    blur.prior_fit_images = 10000
    blur.num_steps = 100
    blur.sampler_noise = True

    config.sampling.method = "momentum"
    return config
