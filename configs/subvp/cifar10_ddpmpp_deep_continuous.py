"""score_sde: DDPM++ deep (continuous sub-VP) on CIFAR-10: 8 residual blocks per resolution."""

from configs.subvp.cifar10_ddpmpp_continuous import get_config as get_ddpmpp_config


def get_config():
    config = get_ddpmpp_config()
    config.model.num_res_blocks = 8
    config.training.n_iters = 950001
    return config
