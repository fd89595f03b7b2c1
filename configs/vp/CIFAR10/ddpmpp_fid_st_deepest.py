"""DDPM++ deepest (VP, FID) + ST on CIFAR-10: nf 512, ch_mult (1, 1, 1), 8 blocks, FIR, dropout 0.2, a 128-wide
time embedding (lsgm), k = 0.9, mixed mode (half importance-sampled likelihood, half uniform, weight 100), PC."""

from configs.default_cifar10_configs import get_default_configs
from configs.st_presets import vp_base


def get_config():
    config = vp_base(get_default_configs)
    model = config.model
    model.nf = 512
    model.ch_mult = (1, 1, 1)
    model.num_res_blocks = 8
    model.fir = True
    model.dropout = 0.2
    model.embedding_dim = 128
    model.lsgm = True
    config.training.k = 0.9
    config.training.mixed = True
    config.training.ddpm_weight = 100.0
    config.training.importance_sampling = False
    config.sampling.method = 'pc'
    return config
