"""Soft Truncation repository (legacy UNCSN file): NCSN++ with the reciprocal VE SDE ('rve-sde') on FFHQ 1024,
eta = s_min = 1e-4, s_max = 1348: score_sde's 1024 px network (nf 16, 8 resolutions), batch 16, loss averaged
over dimensions, checkpoints from 1 sampled in batches of 40 without the eval loss."""

from configs.presets import set_ncsnpp_1024, uncsn_legacy, ve_256_base


def get_config():
    config = uncsn_legacy(set_ncsnpp_1024(ve_256_base("FFHQ")), eta=1e-4, threshold="middle")
    config.data.tfrecords_path = "/downloaded_data/FFHQ_1024/ffhq-r10.tfrecords"  # never read here (README)
    config.model.sigma_max = 1348
    training = config.training
    training.batch_size = 16
    training.reduce_mean = True
    training.n_iters = 240000001
    training.log_freq = 50
    training.eval_freq = 100
    training.snapshot_freq = 50000
    training.snapshot_sampling = True
    config.eval.batch_size = 40
    config.eval.enable_loss = False
    return config
