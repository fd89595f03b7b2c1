"""The embedded demo: a small DDPM++ (VP SDE) with Soft Truncation on the procedural SHAPES dataset (16x16 RGB).

Needs no download and trains on a laptop CPU in a few minutes; it writes sample grids and checkpoints like any
other run. Everything but the size is a real configuration: swap data.dataset and the model widths to scale up.
"""

from configs.default_cifar10_configs import get_default_configs
from configs.presets import set_ddpmpp


def get_config():
    config = set_ddpmpp(get_default_configs())
    data = config.data
    data.dataset = "SHAPES"
    data.image_size = 16
    data.num_channels = 3
    data.centered = True
    data.num_train = 4096
    data.num_eval = 1024
    data.shapes_seed = 0

    model = config.model
    model.nf = 32
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (8,)
    model.dropout = 0.0
    model.ema_rate = 0.999

    training = config.training
    training.sde = "vpsde"
    training.reduce_mean = True
    training.st = True  # Soft Truncation: a random truncation time tau ~ 1/tau on [eps, 1] per step
    training.k = 1.0
    training.batch_size = 32
    training.n_iters = 1500
    training.log_freq = 50
    training.eval_freq = 500
    training.snapshot_freq = 1500
    training.snapshot_freq_for_preemption = 250
    training.snapshot_sampling = True

    optim = config.optim
    optim.lr = 2e-3
    optim.warmup = 100

    sampling = config.sampling
    # Reverse-diffusion predictor over 200 steps: the stochastic sampler is robust to the score errors of a model
    # trained for a few CPU minutes (the deterministic ODE / DPM-Solver samplers need a better-trained score).
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "none"
    model.num_scales = 200
    sampling.batch_size = 64

    evaluate = config.eval
    evaluate.batch_size = 256
    evaluate.begin_ckpt = 1  # checkpoint_1.pth: the end of training
    evaluate.end_ckpt = 1
    evaluate.enable_loss = True
    evaluate.enable_bpd = True  # exact bits/dim through the probability-flow ODE
    evaluate.bpd_num_repeats = 1
    evaluate.nll_iter = 1  # one bits/dim pass (the same count as bpd_num_repeats)
    evaluate.max_bpd_batches = 1
    evaluate.bpd_rtol = 1e-4  # looser than score_sde's 1e-5: a CPU-friendly demo
    evaluate.bpd_atol = 1e-4
    evaluate.enable_sampling = True
    evaluate.num_samples = 256
    evaluate.enable_fid = False  # FID needs the Inception weights file (see README)
    return config
