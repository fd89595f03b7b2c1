"""score_sde: NCSN++ trained with SMLD (discrete VE, positional embedding) on CelebA 64."""

from configs.default_celeba_configs import get_default_configs
from configs.ve.cifar10_ncsnpp import set_smld_ncsnpp


def get_config():
    config = set_smld_ncsnpp(get_default_configs())
    config.model.sigma_begin = 90  # NCSN's name for sigma_max; never read
    return config
