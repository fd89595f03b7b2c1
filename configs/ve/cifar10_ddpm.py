"""score_sde: the original DDPM network trained with SMLD (discrete VE) on CIFAR-10, output divided by sigma."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_ddpm


def get_config():
    config = set_ddpm(get_default_configs())
    config.training.sde = "vesde"
    config.training.continuous = False
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    config.model.scale_by_sigma = True
    config.model.ema_rate = 0.999
    config.data.centered = False
    config.model.conv_size = 3  # never read (score_sde's networks use 3x3 convolutions)
    return config
