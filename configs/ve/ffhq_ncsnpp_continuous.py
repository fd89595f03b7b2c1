"""score_sde: NCSN++ (VE, continuous) on FFHQ 1024 (nf 16, 8 resolutions, sigma_max 1348, loss averaged over
dimensions)."""

from configs.default_lsun_configs import get_default_configs
from configs.presets import set_continuous_ve_pc, set_ncsnpp_1024


def get_config():
    config = set_continuous_ve_pc(set_ncsnpp_1024(get_default_configs()))
    config.training.reduce_mean = True
    config.data.dataset = "FFHQ"
    config.data.tfrecords_path = "/raid/song/ffhq-dataset/ffhq/ffhq-r10.tfrecords"  # never read here (README)
    config.model.sigma_max = 1348
    return config
