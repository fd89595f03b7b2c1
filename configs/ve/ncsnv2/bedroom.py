"""score_sde: NCSNv2 on LSUN bedroom 128 (ncsnv2_128, sigma 190 -> 0.01 over 1086 levels, Adam 1e-4).

The original file writes `training.continuouse = False` (a typo), so its training.continuous stays True, the
value held here: the NCSN v2 network takes noise-level indices, so train or sample this config with
--config.training.continuous=False (the original cannot run it as written either).
"""

from configs.default_lsun_configs import get_default_configs
from configs.presets import set_ncsn


def get_config():
    config = set_ncsn(get_default_configs())
    config.training.continuous = True  # as the original (see above)
    config.training.continuouse = False  # the original's typo, kept (never read)
    config.training.batch_size = 128
    config.sampling.n_steps_each = 3
    config.sampling.snr = 0.095
    config.data.category = "bedroom"
    config.data.image_size = 128
    model = config.model
    model.name = "ncsnv2_128"
    model.scale_by_sigma = True
    model.num_scales = 1086
    model.sigma_max = 190
    model.ema_rate = 0.9999
    config.optim.lr = 1e-4
    return config
