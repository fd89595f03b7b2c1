"""score_sde: NCSN (v1) as published on CelebA 64: 10 noise levels from sigma 1 to 0.01, 100 Langevin steps each.

The original file writes `training.loss = 'vesde'` (a typo: no such field is read, and training.sde stays unset,
so the original cannot run it); both are set here, and the VE SDE that the file's siblings and its name intend is
what trains (training.sde = 'vesde').
"""

from configs.default_celeba_configs import get_default_configs
from configs.presets import set_ncsn_v1_schedule


def get_config():
    config = set_ncsn_v1_schedule(get_default_configs(), ema_rate=0.0)
    config.training.loss = "vesde"  # the original's typo, kept (never read)
    return config
