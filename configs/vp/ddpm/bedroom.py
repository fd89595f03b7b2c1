"""score_sde: DDPM (discrete VP, the original network) on LSUN bedroom 256."""

from configs.default_lsun_configs import get_default_configs
from configs.vp.ddpm.celebahq import set_ddpm_256


def get_config():
    config = set_ddpm_256(get_default_configs())
    config.data.category = "bedroom"
    return config
