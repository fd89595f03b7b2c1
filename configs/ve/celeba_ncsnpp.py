"""score_sde: NCSN++ trained with SMLD (discrete VE, positional embedding) on CelebA 64."""

from configs.default_celeba_configs import get_default_configs
from configs.ve.cifar10_ncsnpp import set_smld_ncsnpp


def get_config():
    return set_smld_ncsnpp(get_default_configs())
