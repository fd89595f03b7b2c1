"""score_sde: NCSN++ trained with SMLD (discrete VE, positional embedding of the noise level) on CIFAR-10."""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_ncsnpp


def set_smld_ncsnpp(config):
    """NCSN++ with the discrete SMLD objective (score_sde's ve/*_ncsnpp.py): positional noise embedding, PC
    sampling with reverse diffusion + Langevin."""
    config = set_ncsnpp(config)
    config.training.sde = "vesde"
    config.training.continuous = False
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    config.model.embedding_type = "positional"
    return config


def get_config():
    return set_smld_ncsnpp(get_default_configs())
