"""score_sde: NCSN++ (VE, continuous) on CIFAR-10, PC sampler (reverse diffusion + Langevin)."""

from configs.default_cifar10_configs import get_default_configs
from configs.model_presets import set_ncsnpp


def get_config():
    config = set_ncsnpp(get_default_configs())
    config.training.sde = "vesde"
    config.training.continuous = True
    config.sampling.method = "pc"
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    return config
