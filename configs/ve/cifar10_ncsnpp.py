"""score_sde: NCSN++ trained with SMLD (discrete VE, positional embedding of the noise level) on CIFAR-10."""

from configs.default_cifar10_configs import get_default_configs
from configs.model_presets import set_ncsnpp


def get_config():
    config = set_ncsnpp(get_default_configs())
    config.training.sde = "vesde"
    config.training.continuous = False
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    config.model.embedding_type = "positional"
    return config
