"""score_sde's VE configs and the Soft Truncation repository's VE / RVE configs."""

import ml_collections


def set_continuous_ve_pc(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Continuous VE SDE sampled with PC: reverse diffusion predictor + Langevin corrector (score_sde)."""
    config.training.sde = "vesde"
    config.training.continuous = True
    config.sampling.method = "pc"
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    return config
