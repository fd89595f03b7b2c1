"""The Soft Truncation repository's "UNCSN++ (RVE) + ST" on CelebA-HQ 256 as released: k = 2, s_max = 348,
ch_mult (1, 1, 2, 2, 2, 2, 2), 2 blocks, output_skip / input_skip progressive paths, 2000 scales.

As trained (papers.md section 3): the plain VE SDE with s_min = 0.01 despite the name, log sigma embedded, and tau
never drawn for VE (training.st_vp_only = True). Use it to evaluate the released checkpoint;
ve/celebahq/uncsnpp_st_rve.py is the reciprocal VE SDE the name promises.
"""

from configs.presets import ve_256_base


def get_config():
    config = ve_256_base("CelebAHQ")
    config.data.tfrecords_path = "/data/CelebAHQ_256/celeba_r08.tfrecords"  # never read here (README)
    config.training.k = 2.0
    config.model.sigma_min = 0.01
    config.model.sigma_max = 348
    return config
