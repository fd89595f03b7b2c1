"""The embedded demo (configs/demo.py: small DDPM++ on the procedural SHAPES set, 16x16) with Soft Diffusion.

Blur std geometric from 0.3 to 10 pixels (sigma_max / image size = 0.625 as in the full-size configs),
noise geometric from 0.01 to 0.1, Soft Score Matching with the DSM-equivalent weighting, Momentum Sampler
with 32 network evaluations. No download; trains on a CPU like configs/demo.py.
"""

from configs import demo
from configs.defaults import default_blur_config


def get_config():
    config = demo.get_config()
    training = config.training
    training.corruption = "blur"
    training.weighting = "variance"  # lambda = s_t^2: the 'ssm' weighting
    training.truncation_time = 1e-3
    training.st = False  # Soft Truncation applies to the Gaussian SDEs only

    config.blur = blur = default_blur_config()
    blur.sigma_min = 0.3
    blur.sigma_max = 10.0
    blur.schedule = "log"
    blur.noise_schedule = "geometric"
    blur.noise_min = 0.01
    blur.noise_max = 0.1
    blur.prior_fit_images = 2048
    blur.num_steps = 32
    blur.sampler_noise = True

    config.sampling.method = "momentum"
    return config
