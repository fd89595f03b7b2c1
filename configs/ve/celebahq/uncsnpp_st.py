"""UNCSN++ (RVE) + ST on CelebA-HQ 256: k = 2, s_max = 348, ch_mult (1, 1, 2, 2, 2, 2, 2), 2 blocks, output_skip /
input_skip progressive paths, 2000 scales.

Deliberate difference: the original file trains the plain VE SDE under the "RVE" name (papers.md section 3); here
it is the reciprocal VE SDE it is named after (s_min kept at the file's 0.01).
"""

from configs.default_lsun_configs import get_default_configs
from configs.st_presets import unbounded_ve, ve_base


def get_config():
    config = ve_base(get_default_configs)
    unbounded_ve(config)
    config.model.sigma_min = 0.01
    model = config.model
    model.sigma_max = 348
    model.num_scales = 2000
    model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
    model.num_res_blocks = 2
    model.dropout = 0.0
    model.progressive = "output_skip"
    model.progressive_input = "input_skip"
    training = config.training
    training.batch_size = 64
    training.n_iters = 24000001
    training.log_freq = 1000
    training.eval_freq = 500
    training.snapshot_freq = 200000
    training.snapshot_freq_for_preemption = 5000
    config.sampling.snr = 0.075
    config.sampling.batch_size = 16
    config.sampling.truncation_time = 0.001
    config.eval.batch_size = 512
    config.eval.begin_ckpt = 50
    config.eval.end_ckpt = 96
    config.eval.enable_sampling = True
    return config
