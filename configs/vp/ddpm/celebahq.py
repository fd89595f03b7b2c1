"""score_sde: DDPM (discrete VP, the original network) on CelebA-HQ 256: ch_mult (1, 1, 2, 2, 4, 4), 1000 scales,
lr 2e-5."""

from configs.default_lsun_configs import get_default_configs
from configs.presets import set_ddpm
from configs.vp.ddpm.cifar10 import set_discrete_vp


def set_ddpm_256(config):
    """DDPM's 256 px network and optimiser (score_sde's ddpm/{celebahq,bedroom,church}.py)."""
    set_discrete_vp(set_ddpm(config))
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0
    config.model.num_scales = 1000
    config.optim.lr = 2e-5
    return config


def get_config():
    config = set_ddpm_256(get_default_configs())
    config.data.dataset = "CelebAHQ"
    config.data.tfrecords_path = "/atlas/u/yangsong/celeba_hq/-r10.tfrecords"  # never read here (README)
    return config
