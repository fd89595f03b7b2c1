"""score_sde: NCSN++ with the discrete VP objective (DDPM's) on CIFAR-10, reverse-diffusion sampling."""

from configs.vp import cifar10_ncsnpp_continuous


def get_config():
    config = cifar10_ncsnpp_continuous.get_config()
    config.training.continuous = False
    config.sampling.predictor = "reverse_diffusion"
    return config
