"""Defaults shared by every CIFAR-10 config (score_sde_pytorch fields plus the Soft Truncation, STF and Soft
Diffusion switches; each new field defaults to the behaviour of plain score_sde)."""

import ml_collections
import torch

from configs.defaults import add_default_fields, default_blur_config


def get_default_configs() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # training
    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128
    training.n_iters = 1300001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    training.snapshot_freq_for_preemption = 10000  # meta checkpoint used for automatic resume
    training.snapshot_sampling = True
    training.likelihood_weighting = False
    training.continuous = True
    training.reduce_mean = False
    training.sde = "vpsde"
    # Soft Truncation (Kim et al. 2022): tau ~ P_k(tau) ~ tau^-k on [truncation_time, T], one tau per step.
    training.st = False
    training.k = 1.0
    training.truncation_time = 1e-5  # eps: the smallest diffusion time trained on
    training.importance_sampling = False  # t ~ g^2/sigma^2 on [tau, T] (likelihood weighting by importance sampling)
    # weighting: '' derives it from likelihood_weighting / importance_sampling (score_sde); or 'variance',
    # 'likelihood', 'importance', 'x0' (lambda = sigma^4: Soft Diffusion's unweighted ||C_t (h - x0)||^2)
    training.weighting = ""
    # 'score_sde': per-sample loss w(t) reduce(...); 'soft_truncation': half of it, as the ST repository computes
    training.loss_convention = "score_sde"
    training.mixed = False  # half of each batch IS-likelihood, half uniform-time DSM (ST repo 'mixed')
    training.balanced = False  # rescale the uniform half by the detached ratio of the two means
    training.ddpm_weight = 0.01  # weight of the uniform half in mixed mode
    training.unbounded_parametrization = False  # UDDPM++ time label / UNCSN++ noise embedding
    training.stabilizing_constant = 1e-3  # c in A_c(t) of the UDDPM++ label
    # Stable Target Field (Xu et al. 2023)
    training.stf = False
    training.stf_ref_batch_size = 4096
    training.stf_gather = False
    # corruption: 'gaussian' (the SDE) or 'blur' (Soft Diffusion, see config.blur)
    training.corruption = "gaussian"
    # reliability
    training.max_nonfinite_steps = 10  # consecutive NaN/Inf losses tolerated (step skipped) before stopping
    # Soft Truncation repository fields (defaults: score_sde's behaviour)
    training.ddpm_score = True  # VP / sub-VP networks predict the noise: score = -output / sigma(t)
    training.reconstruction_loss = False  # add the decoder term at tau (see data.dequantization)
    training.num_train_data = 0  # expected number of training images (0: not checked)
    training.whatever_sampling = False  # the ST repository's debug switch: sample at every training step
    # True: Soft Truncation draws tau for VP / sub-VP only and VE / RVE train on the fixed [eps, 1], as the ST
    # repository's code did (its VE / RVE "+ ST" runs); False: tau ~ P_k for every SDE
    training.st_vp_only = False
    # '' : t ~ U[tau, T], or t ~ g^2/sigma^2 under importance sampling (score_sde); 'importance': t ~ g^2/sigma^2
    # whatever the weighting, without the Z factor (the ST repository's reciprocal VE SDE: t = 1 / U(1, 1/tau))
    training.time_sampling = ""

    # sampling
    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "pc"
    sampling.predictor = "euler_maruyama"
    sampling.corrector = "none"
    sampling.n_steps_each = 1
    sampling.noise_removal = True
    sampling.probability_flow = False
    sampling.snr = 0.16
    sampling.truncation_time = 0.0  # 0: score_sde's default (1e-3 for VP/subVP, 1e-5 for VE, eps for RVE)
    sampling.batch_size = 64  # snapshot sample grid size during training
    sampling.nfe = 35  # budget of the fast samplers ('heun', 'dpm_solver')
    sampling.dpm_solver_order = 3
    sampling.sample_more = True  # --mode eval draws new samples (False: only evaluates the samples on disk)

    # evaluation
    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.begin_ckpt = 9
    evaluate.end_ckpt = 26
    evaluate.batch_size = 1024
    evaluate.enable_sampling = False
    evaluate.num_samples = 50000
    evaluate.enable_loss = True
    evaluate.enable_bpd = False
    evaluate.enable_nelbo = False
    evaluate.enable_fid = True  # FID / IS / KID of the samples (needs the Inception weights file)
    evaluate.max_bpd_batches = 0  # 0: the whole bits/dim dataset
    evaluate.sample_ckpt = 0  # --mode sample: checkpoint number (0: the latest)
    evaluate.bpd_dataset = "test"
    evaluate.bpd_num_repeats = 5
    evaluate.residual = True  # ST paper's exact treatment of the truncation in bits/dim
    evaluate.probability_flow = True
    evaluate.hutchinson_type = "Rademacher"
    evaluate.bpd_rtol = 1e-5  # tolerances of the probability-flow ODE solver for bits/dim (score_sde: 1e-5)
    evaluate.bpd_atol = 1e-5
    evaluate.inception_path = ""  # torch-fidelity Inception weights; '' -> $SCORE_SDE_INCEPTION_WEIGHTS
    evaluate.stats_path = ""  # reference statistics npz; '' -> assets/stats/<dataset>_stats.npz
    # Soft Truncation repository's bits/dim fields (defaults: score_sde's evaluation)
    evaluate.nll_iter = 5  # passes of the probability-flow NLL over the bits/dim data (score_sde: 5)
    evaluate.nelbo_iter = 0  # passes of the continuous NELBO (score_sde: none)
    evaluate.num_test_data = 0  # images of the bits/dim split to use (0: all)
    evaluate.lambda_ = 0.0  # reverse process of the likelihood: 0 = probability-flow ODE

    # data
    config.data = data = ml_collections.ConfigDict()
    data.dataset = "CIFAR10"
    data.image_size = 32
    data.random_flip = True
    data.centered = False
    data.uniform_dequantization = False
    data.dequantization = "none"  # Soft Truncation field: 'none', 'uniform' or 'lossless' (discrete decoder)
    data.num_channels = 3
    data.root = ""  # '' -> $SCORE_SDE_DATA/<dataset> or ./data/<dataset> (see datasets.py)
    data.num_workers = 0
    data.download = True  # fetch public data (CIFAR-10, STL-10) and the Inception weights on first use
    # image folders and LMDB (LSUN, FFHQ, CelebAHQ, IMAGE_FOLDER): '' keeps the dataset's own preprocessing
    data.crop = ""  # '' | 'center' (square, then resize) | 'short_side' (resize short side, then crop) | 'none'
    data.resize_filter = ""  # '' | 'bicubic' | 'bilinear' (antialiased, as tf.image.resize) | 'box' (area mean)
    data.eval_root = ""  # a separate folder of evaluation images ('' -> the last data.num_eval images)

    # model
    config.model = model = ml_collections.ConfigDict()
    model.sigma_min = 0.01
    model.sigma_max = 50
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.dropout = 0.1
    model.embedding_type = "fourier"
    model.fourier_feature = False  # Soft Truncation option: sin / cos input features before the first conv

    # optimization
    config.optim = optim = ml_collections.ConfigDict()
    optim.weight_decay = 0
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.amsgrad = False
    optim.fused = False  # fused Adam kernel (CUDA, CPU): the same update up to float rounding; checkpoints unchanged
    optim.warmup = 5000
    optim.grad_clip = 1.0
    optim.num_micro_batch = 1  # gradient accumulation: micro-batches per step (they share one tau)

    # Soft Diffusion blur corruption (used when training.corruption == 'blur'; fields in corruption.py)
    config.blur = default_blur_config()

    config.seed = 42
    config.device = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")

    return add_default_fields(config)  # every optional field present, so that the command line can set it
