"""DDPM++ deepest (VP, NLL) + ST on CIFAR-10: the deepest network, k = 2, mixed and balanced mode, PC."""

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
    config.training.k = 2.0
    config.training.mixed = True
    config.training.balanced = True
    config.sampling.method = 'pc'
    return config
