"""score_sde: NCSN++ (VE, continuous) on CelebA-HQ 256."""

from configs.default_lsun_configs import get_default_configs
from configs.model_presets import set_ncsnpp


def get_config():
    config = set_ncsnpp(get_default_configs())
    config.training.sde = "vesde"
    config.training.continuous = True
    config.sampling.method = "pc"
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    model = config.model
    model.dropout = 0.0
    model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
    model.num_res_blocks = 2
    model.progressive = "output_skip"
    model.progressive_input = "input_skip"
    return config
