"""Training, evaluation and sampling loops (score_sde's run_lib, on PyTorch only).

Work directory layout (score_sde's):
  WORKDIR/checkpoints/checkpoint_N.pth     snapshot N (every training.snapshot_freq steps and at the end)
  WORKDIR/checkpoints-meta/checkpoint.pth  latest state for automatic resume (every snapshot_freq_for_preemption)
  WORKDIR/samples/iter_STEP/sample.png     sample grids (training.snapshot_sampling)
  WORKDIR/tensorboard/                     scalars
  WORKDIR/train.log                        the log
"""

import copy
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torchvision
from tqdm import tqdm

import datasets
import distributed
import losses
import parametrization
import sde_lib
from configs.defaults import complete_config
from models import utils as mutils
from models.ema import ExponentialMovingAverage
from utils import get_rng_state, restore_checkpoint, save_checkpoint, set_rng_state

VALID_CORRUPTIONS = ("gaussian", "blur")


# ----------------------------------------------------------------------------------------------------------------
# Configuration checks


def validate_config(config) -> None:
    """Reject invalid values before anything is built or trained, naming the field and the fix."""
    config = complete_config(config)
    training, model, data = config.training, config.model, config.data
    corruption = training.corruption
    if corruption not in VALID_CORRUPTIONS:
        raise ValueError(f"training.corruption={corruption!r} is not one of {VALID_CORRUPTIONS}.")
    if corruption == "gaussian":
        sde_lib.get_sde(config)  # raises on an unknown training.sde
        if training.sde.lower() in ("vpsde", "subvpsde") and model.beta_max >= model.num_scales:
            raise ValueError(
                f"model.num_scales={model.num_scales} is too small for model.beta_max={model.beta_max}: the "
                "discrete betas beta_max / num_scales reach 1, so the reverse-diffusion, ancestral and DDPM "
                "steps take square roots of negative numbers. Use num_scales > beta_max (1000 is standard)."
            )
    if model.name not in mutils._MODELS:
        raise ValueError(f"model.name={model.name!r} is not a registered model; valid: {sorted(mutils._MODELS)}.")
    eps = float(training.truncation_time)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"training.truncation_time={eps} must lie in (0, T) = (0, 1).")
    k = float(training.k)
    if training.st and (math.isnan(k) or k < 0):
        raise ValueError(f"training.k={k} must be >= 0 (k = 0 is uniform, k -> inf is plain truncation at eps).")
    ch_mult = model.ch_mult
    if ch_mult is not None:
        factor = 2 ** (len(ch_mult) - 1)
        if data.image_size % factor:
            raise ValueError(
                f"data.image_size={data.image_size} is not divisible by 2^(len(model.ch_mult)-1) = {factor}: "
                "choose an image size that survives every down-sampling, or fewer resolution levels."
            )
    micro = int(config.optim.num_micro_batch)
    if micro < 1 or training.batch_size % micro:
        raise ValueError(
            f"optim.num_micro_batch={micro} must be >= 1 and divide training.batch_size={training.batch_size}."
        )
    if training.mixed and (training.batch_size // micro) % 2:
        raise ValueError("training.mixed=True needs an even micro-batch size (batch_size / num_micro_batch).")
    if corruption == "blur":
        for flag in ("stf", "importance_sampling", "likelihood_weighting", "mixed"):
            if training[flag]:
                raise ValueError(
                    f"training.{flag}=True is defined for Gaussian SDEs only; it cannot be used with "
                    "training.corruption='blur'."
                )
    if training.stf and int(training.stf_ref_batch_size) < 1:
        raise ValueError("training.stf_ref_batch_size must be >= 1.")
    if training.n_iters < 0 or training.snapshot_freq <= 0 or training.snapshot_freq_for_preemption <= 0:
        raise ValueError("training.n_iters must be >= 0 and the snapshot frequencies > 0.")
    dequantization_mode(config)  # raises on an unknown or contradictory data.dequantization
    if training.reconstruction_loss and not training.continuous:
        raise ValueError(
            "training.reconstruction_loss=True needs continuous-time training (training.continuous=True), as in "
            "the Soft Truncation repository (its discrete SMLD / DDPM losses have no reconstruction term)."
        )
    if model.name == "ncsnpp" and model.embedding_type == "fourier" and not training.continuous:
        raise ValueError(
            "model.embedding_type='fourier' needs config.training.continuous=True (a Fourier embedding of the "
            "noise level); use 'positional' for discrete training."
        )
    validate_speed_options(config)
    eval_plan(config)  # raises on contradictory eval fields


def validate_speed_options(config) -> None:
    """training.precision / eval.precision, compile_mode and compile_backend name things that exist."""
    training = config.training
    parametrization.autocast_dtype(training.precision)
    if config.eval.precision:
        parametrization.autocast_dtype(config.eval.precision)
    mutils.check_compile_options(training.compile_mode, training.compile_backend if training.compile else "")


# ----------------------------------------------------------------------------------------------------------------
# Fields of score_sde and of the Soft Truncation repository that select the same behaviour, read in one place

DEQUANTIZATIONS = ("none", "uniform", "lossless")


def dequantization_mode(config) -> str:
    """'none' | 'uniform' | 'lossless': the Soft Truncation field data.dequantization, with score_sde's
    data.uniform_dequantization = True meaning 'uniform'."""
    mode = str(complete_config(config).data.dequantization)
    if mode not in DEQUANTIZATIONS:
        raise ValueError(f"data.dequantization={mode!r} is not one of {DEQUANTIZATIONS}.")
    if bool(complete_config(config).data.uniform_dequantization):
        if mode == "lossless":
            raise ValueError(
                "data.uniform_dequantization=True contradicts data.dequantization='lossless' (the discrete "
                "decoder models the 8-bit data themselves): set one of them."
            )
        return "uniform"
    return mode


def _loader_config(config):
    """The config handed to datasets.py: with 'lossless' the 8-bit data are read as they are (no noise)."""
    if config.data.dequantization != "lossless":
        return config
    plain = copy.deepcopy(config)
    with plain.unlocked():
        plain.data.dequantization = "none"
    return plain


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """What --mode eval computes, resolved from the eval fields of score_sde and of the Soft Truncation
    repository (README, "Released checkpoints")."""

    enable_loss: bool  # eval.enable_loss
    nll_passes: int  # probability-flow NLL passes (_nll_passes: eval.nll_iter or eval.bpd_num_repeats); 0 = none
    nelbo_passes: int  # NELBO passes: eval.nelbo_iter (ST), else the NLL count with eval.enable_nelbo; 0 = none
    num_test_data: int  # images per bits/dim pass (eval.num_test_data; 0 = the whole split)
    max_bpd_batches: int  # eval.max_bpd_batches (0 = no limit)
    truncation: str  # 'exact' (eval.residual, Soft Truncation's treatment of eps) or 'plain' (score_sde)
    decoder: str  # 'lossless' with data.dequantization = 'lossless', else 'gaussian'
    lambda_: float  # eval.lambda_ (0: the probability-flow ODE; see likelihood.probability_flow_drift)
    enable_sampling: bool  # eval.enable_sampling
    sample_more: bool  # sampling.sample_more (False: evaluate only the samples already on disk)
    enable_fid: bool  # eval.enable_fid


SCORE_SDE_BPD_PASSES = 5  # score_sde's run_lib.evaluate: bpd_num_repeats = 5


def _nll_passes(ev) -> int:
    """Bits/dim passes: eval.nll_iter (Soft Truncation's name) or eval.bpd_num_repeats (this project's older
    name). When a config holds both and they differ, the one not at score_sde's 5 was set on purpose and wins;
    two different non-default values are a contradiction."""
    nll_iter, repeats = ev.nll_iter, ev.bpd_num_repeats
    if nll_iter is None or repeats is None or int(nll_iter) == int(repeats):
        return int(nll_iter if nll_iter is not None else (repeats if repeats is not None else SCORE_SDE_BPD_PASSES))
    if int(repeats) == SCORE_SDE_BPD_PASSES:
        return int(nll_iter)
    if int(nll_iter) == SCORE_SDE_BPD_PASSES:
        return int(repeats)
    raise ValueError(
        f"eval.nll_iter={nll_iter} and eval.bpd_num_repeats={repeats} both set the number of bits/dim passes and "
        "disagree: set eval.nll_iter (the Soft Truncation repository's name) only."
    )


def eval_plan(config) -> EvalPlan:
    """The EvalPlan of a config; contradictory fields raise ValueError."""
    config = complete_config(config)
    ev = config.eval
    enable_bpd = bool(ev.enable_bpd)
    nll_iter = _nll_passes(ev)
    nelbo_iter = int(ev.nelbo_iter)
    if nll_iter < 0 or nelbo_iter < 0:
        raise ValueError(f"eval.nll_iter={nll_iter} and eval.nelbo_iter={nelbo_iter} must be >= 0.")
    enable_nelbo = bool(ev.enable_nelbo)
    nelbo_passes = nelbo_iter if nelbo_iter > 0 else (nll_iter if enable_nelbo else 0)
    if not (enable_nelbo or enable_bpd):
        nelbo_passes = 0
    num_test_data = int(ev.num_test_data or 0)
    if num_test_data < 0:
        raise ValueError(f"eval.num_test_data={num_test_data} must be >= 0 (0: the whole split).")
    lambda_ = float(ev.lambda_)
    probability_flow = lambda_ == 0.0 if ev.probability_flow is None else bool(ev.probability_flow)
    if probability_flow != (lambda_ == 0.0):
        raise ValueError(
            f"eval.probability_flow={probability_flow} and eval.lambda_={lambda_} disagree: the likelihood's reverse "
            "process is the probability-flow ODE exactly when lambda_ = 0 (the Soft Truncation repository asserts "
            "probability_flow == (lambda_ == 0)). Set both."
        )
    truncation = "exact" if bool(ev.residual) else "plain"
    decoder = "lossless" if dequantization_mode(config) == "lossless" else "gaussian"
    if decoder == "lossless" and truncation == "plain" and (enable_bpd or enable_nelbo):
        raise ValueError(
            "data.dequantization='lossless' evaluates bits/dim with the discrete decoder at eps, which is the exact "
            "truncation treatment: set eval.residual=True (or another data.dequantization)."
        )
    return EvalPlan(
        enable_loss=bool(ev.enable_loss),
        nll_passes=nll_iter if enable_bpd else 0,
        nelbo_passes=nelbo_passes,
        num_test_data=num_test_data,
        max_bpd_batches=int(ev.max_bpd_batches),
        truncation=truncation,
        decoder=decoder,
        lambda_=lambda_,
        enable_sampling=bool(ev.enable_sampling),
        sample_more=bool(config.sampling.sample_more),
        enable_fid=bool(ev.enable_fid),
    )


def get_corruption(config):
    """The forward corruption: the SDE (with its sampling eps), or the blur of Soft Diffusion."""
    if config.training.corruption == "blur":
        import corruption

        obj = corruption.get_corruption(config)
        return obj, float(config.training.truncation_time)
    return sde_lib.get_sde(config)


def get_device(config) -> torch.device:
    return torch.device(config.device)


# ----------------------------------------------------------------------------------------------------------------
# A resumable stream of training batches


class PositionBatchSampler(torch.utils.data.Sampler):
    """Index batches from position `start` on; batch p depends only on (seed, p): epoch p // n_batches is a
    permutation seeded by (seed, epoch), so a resumed run draws exactly the batches of an uninterrupted one.

    With data parallelism (world_size > 1) batch_size is the global batch and rank r gets the r-th contiguous
    slice of it, so the ranks' slices concatenated in rank order are the single-process batch.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size=1):
        self.num_items, self.batch_size, self.seed, self.start = num_items, batch_size, int(seed), int(start)
        self.batches_per_epoch = num_items // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"The training set has {num_items} images, fewer than training.batch_size={batch_size}.")
        self.lo, self.hi = rank_slice(batch_size, rank, world_size)

    def indices(self, position: int) -> list:
        epoch, i = divmod(position, self.batches_per_epoch)
        gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        perm = torch.randperm(self.num_items, generator=gen)
        return perm[i * self.batch_size : (i + 1) * self.batch_size][self.lo : self.hi].tolist()

    def __iter__(self):
        position = self.start
        while True:
            yield self.indices(position)
            position += 1


def rank_slice(batch_size: int, rank: int, world_size: int) -> tuple:
    """[lo, hi): the part of a global batch that data-parallel rank `rank` of `world_size` trains on."""
    if batch_size % world_size:
        raise ValueError(
            f"training.batch_size={batch_size} (the global batch) is not divisible by the {world_size} "
            "data-parallel processes: choose a multiple of the process count."
        )
    local = batch_size // world_size
    return rank * local, (rank + 1) * local


class TrainStream:
    """The training data pipeline: deterministic, resumable batches, ready for the objective.

    Images are fetched as uint8 (by config.data.num_workers worker processes when > 0) in the order of
    PositionBatchSampler; the random flip of batch p is drawn from a generator seeded by (seed, p). With
    world_size > 1 the stream yields rank `rank`'s slice of each global batch (flips included). Each batch is
    moved to `device`, converted to float (with score_sde's uniform dequantization (k + u) / 256 when
    `dequantize`, u drawn on the device from the global generator) and passed through `scaler`; without a device
    the stream yields float32 [B, C, H, W] in [0, 1] on the CPU. channels_last: batches in that memory format.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int,
        random_flip: bool,
        position: int = 0,
        num_workers=0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
        dequantize: bool = False,
        scaler: Callable | None = None,
        channels_last: bool = False,
    ):
        self.seed, self.random_flip, self.position = int(seed), random_flip, int(position)
        self.channels_last = channels_last
        self.batch_size = int(batch_size)
        self.device, self.dequantize, self.scaler = device, dequantize, scaler
        sampler = PositionBatchSampler(len(dataset), batch_size, seed, start=position, rank=rank, world_size=world_size)
        self.lo, self.hi = sampler.lo, sampler.hi
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=_first_two,
            num_workers=num_workers,
            persistent_workers=False,
            prefetch_factor=4 if num_workers else None,
        )
        with torch.random.fork_rng(devices=[]):  # creating the iterator draws a seed: keep the stream intact
            self._batches = iter(loader)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        images = next(self._batches)[0]
        if self.random_flip:
            gen = torch.Generator().manual_seed(self.seed * 1000003 + self.position)
            # the flips of the whole global batch, this rank's slice of them
            images = datasets.flip_where(images, datasets.flip_mask(self.batch_size, gen)[self.lo : self.hi])
        self.position += 1
        if self.device is not None:
            images = images.to(self.device, non_blocking=True)
        batch = datasets.to_float(images, dequantize=self.dequantize)
        batch = batch if self.scaler is None else self.scaler(batch)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch


def _first_two(batch):
    """collate_fn for ImageDataset.__getitems__: keep (uint8 images, labels) as they are."""
    return batch[0], batch[1]


def _setup_logging(workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    logger = logging.getLogger()
    path = os.path.abspath(os.path.join(workdir, "train.log"))
    if not any(getattr(h, "baseFilename", None) == path for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def build_state(config, device: torch.device) -> dict:
    """Model, EMA and optimizer of score_sde's training state; the speed options of config.training (TF32,
    channels_last, activation checkpointing, torch.compile) applied to the network; with training.precision =
    'fp16' the dynamic gradient scaler in state['grad_scaler'] (saved with the checkpoint)."""
    config, device = complete_config(config), torch.device(device)
    mutils.set_tf32(bool(config.training.tf32), device)
    training = config.training
    score_model = mutils.apply_speed_options(
        mutils.create_model(config),
        channels_last=bool(training.channels_last),
        grad_checkpoint=bool(training.grad_checkpoint),
        compile=bool(training.compile),
        compile_mode=training.compile_mode,
        compile_backend=training.compile_backend,
    )
    ema = ExponentialMovingAverage(score_model.parameters(), decay=config.model.ema_rate)
    optimizer = losses.get_optimizer(config, score_model.parameters())
    state = dict(optimizer=optimizer, model=score_model, ema=ema, step=0)
    if training.precision == "fp16":  # the dynamic loss scale is part of the training state (saved, restored)
        state["grad_scaler"] = torch.amp.GradScaler(device.type)
    return state


def _save_grid(x: torch.Tensor, folder: str) -> None:
    """sample.png (grid) and sample.np (uint8 NHWC, score_sde's format) in `folder`."""
    os.makedirs(folder, exist_ok=True)
    nrow = int(math.ceil(math.sqrt(x.shape[0])))
    image = torch.clamp(x.detach().float().cpu(), 0.0, 1.0)
    torchvision.utils.save_image(image, os.path.join(folder, "sample.png"), nrow=nrow, padding=2)
    array = np.clip(image.permute(0, 2, 3, 1).numpy() * 255.0, 0, 255).astype(np.uint8)
    with open(os.path.join(folder, "sample.np"), "wb") as f:
        np.save(f, array)


def get_sampling_fn_from_config(config, sde, sampling_eps: float, batch_size: int):
    import sampling

    shape = (batch_size, config.data.num_channels, config.data.image_size, config.data.image_size)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    return sampling.get_sampling_fn(config, sde, shape, inverse_scaler, sampling_eps)


def snapshot_samples(config, state: dict, sde, sampling_eps: float, folder: str) -> None:
    """Draw a sample grid with the EMA weights, leaving the training RNG stream untouched."""
    model, ema = state["model"], state["ema"]
    sampling_fn = get_sampling_fn_from_config(config, sde, sampling_eps, config.sampling.batch_size)
    devices = [get_device(config)] if get_device(config).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed + int(state["step"]))
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        model.eval()
        sample, _ = sampling_fn(model)
        model.train()
        ema.restore(model.parameters())
    _save_grid(sample, folder)


def train(config, workdir: str) -> dict:
    """Train a score model; resumes automatically from WORKDIR/checkpoints-meta/checkpoint.pth.

    A generic loop: the objective (losses.Objective: time sampling x weighting x target, with the corruption)
    prepares itself from the data (setup) and gives the step function; the loop feeds it batches of the training
    stream, skips non-finite steps (NonFiniteGuard), and writes logs, checkpoints and samples. Under torchrun
    each rank trains on its slice of the global batch with DistributedDataParallel; rank 0 alone writes. Returns
    the final training state (model, ema, optimizer, step).
    """
    config = complete_config(config)
    validate_config(config)
    device = distributed.init_from_env(get_device(config))
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    is_main = rank == 0
    rank_slice(int(config.training.batch_size), rank, world_size)  # a global batch the ranks cannot share stops here
    if device != get_device(config):
        with config.unlocked():
            config.device = device
    if is_main:
        _setup_logging(workdir)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    np.random.seed(config.seed % 2**32)

    sample_dir = os.path.join(workdir, "samples")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    checkpoint_meta_dir = os.path.join(workdir, "checkpoints-meta", "checkpoint.pth")
    if is_main:
        os.makedirs(checkpoint_dir, exist_ok=True)

    state = build_state(config, device)
    state = restore_checkpoint(checkpoint_meta_dir, state, device)
    initial_step = int(state["step"])
    rng = state.pop("rng", None)
    _set_rank_rng(rng, config.seed, initial_step, rank, world_size)
    if rng is not None:
        logging.info("Resumed from %s at step %d.", checkpoint_meta_dir, initial_step)

    sde, sampling_eps = get_corruption(config)
    train_set = datasets.get_train_dataset(_loader_config(config))
    objective = losses.get_objective(config, sde)
    objective.setup(train_set, state)
    scaler = datasets.get_data_scaler(config)
    position = int(rng["data_position"]) if rng is not None and "data_position" in rng else initial_step
    stream = TrainStream(
        train_set,
        config.training.batch_size,
        config.seed,
        bool(config.data.random_flip),
        position=position,
        num_workers=int(config.data.num_workers),
        rank=rank,
        world_size=world_size,
        device=device,
        dequantize=dequantization_mode(config) == "uniform",
        scaler=scaler,
        channels_last=bool(config.training.channels_last),
    )
    dequantize = dequantization_mode(config) == "uniform"
    _, eval_ds, _ = datasets.get_dataset(_loader_config(config), uniform_dequantization=dequantize, evaluation=False)
    eval_iter = _repeat(eval_ds)

    optimize_fn = losses.optimization_manager(config)
    train_step_fn = objective.step_fn(train=True, optimize_fn=optimize_fn)
    eval_step_fn = objective.step_fn(train=False, optimize_fn=optimize_fn)

    network = state["model"]
    if world_size > 1:
        state["model"] = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if is_main else None
    training = config.training
    num_train_steps = int(training.n_iters)
    guard = NonFiniteGuard(int(training.max_nonfinite_steps), checkpoint_meta_dir)
    if is_main:
        logging.info("Config:\n%s", config)
        processes = f" ({world_size} data-parallel processes)" if world_size > 1 else ""
        logging.info("Starting training loop at step %d of %d.%s", initial_step, num_train_steps, processes)
    progress = tqdm(total=num_train_steps, initial=initial_step, desc="train", dynamic_ncols=True, disable=not is_main)
    start_time = time.time()
    while state["step"] < num_train_steps:
        batch = next(stream)
        loss = train_step_fn(state, batch, reference=objective.reference(batch, stream.position))
        if guard.skipped(state):
            continue
        step = int(state["step"])
        progress.update(1)
        if is_main and (step % training.log_freq == 0 or step == num_train_steps):
            loss_value = float(loss)
            logging.info("step: %d, training_loss: %.5e", step, loss_value)
            writer.add_scalar("training_loss", loss_value, step)
            progress.set_postfix(loss=f"{loss_value:.4g}")
        if step % training.snapshot_freq_for_preemption == 0 or step == num_train_steps:
            rank_states = distributed.gather_objects(get_rng_state())  # a collective: every rank takes part
            if is_main:
                state["rng"] = dict(rank_states[0], data_position=torch.tensor(stream.position))
                if world_size > 1:
                    state["rng"]["rank_states"] = rank_states
                save_checkpoint(checkpoint_meta_dir, state)
                state.pop("rng")
        if is_main and step % training.eval_freq == 0:
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                eval_batch = scaler(next(eval_iter)["image"].to(device))
                eval_reference = objective.reference(eval_batch, gather=False)
                eval_loss = float(eval_step_fn(_without_ddp(state, network), eval_batch, reference=eval_reference))
            logging.info("step: %d, eval_loss: %.5e", step, eval_loss)
            writer.add_scalar("eval_loss", eval_loss, step)
        snapshot = step % training.snapshot_freq == 0 or step == num_train_steps
        if is_main and snapshot:
            save_step = step // training.snapshot_freq  # score_sde's numbering
            save_checkpoint(os.path.join(checkpoint_dir, f"checkpoint_{save_step}.pth"), state)
        if is_main and training.snapshot_sampling and (snapshot or training.whatever_sampling):
            folder = os.path.join(sample_dir, f"iter_{step}")
            snapshot_samples(config, _without_ddp(state, network), sde, sampling_eps, folder)
    progress.close()
    if writer is not None:
        writer.close()
    state["model"] = network
    distributed.barrier()
    logging.info("Training finished at step %d (%.1f s).", state["step"], time.time() - start_time)
    return state


class NonFiniteGuard:
    """Counts consecutive skipped (NaN / Inf) optimisation steps and stops the run after too many of them."""

    def __init__(self, max_steps: int, checkpoint_path: str):
        self.max_steps, self.checkpoint_path, self.run = max_steps, checkpoint_path, 0

    def skipped(self, state: dict) -> bool:
        """True when the step function skipped this step (state['nonfinite']; or an fp16 gradient overflow,
        state['amp_skipped'], which is logged and counted but never stops the run); raises after max_steps
        non-finite steps in a row."""
        if state.get("amp_skipped"):
            logging.info(
                "fp16 gradient overflow at step %d: step skipped, loss scale lowered (%d skipped so far).",
                state["step"],
                state["amp_skipped_steps"],
            )
            return True
        if not state["nonfinite"]:
            self.run = 0
            return False
        self.run += 1
        logging.warning("Non-finite loss or gradient at step %d (%d in a row): step skipped.", state["step"], self.run)
        if self.run >= self.max_steps:
            raise RuntimeError(
                f"{self.run} consecutive optimisation steps gave a NaN/Inf loss or gradient (step "
                f"{state['step']}). Training stopped; the last good checkpoint is in {self.checkpoint_path}. "
                "Lower optim.lr, keep optim.grad_clip >= 0, check the data, or raise training.max_nonfinite_steps."
            )
        return True


def _without_ddp(state: dict, network: torch.nn.Module) -> dict:
    """The training state with the bare network: evaluation and sampling run on rank 0 alone, outside DDP."""
    return state if state["model"] is network else dict(state, model=network)


def _set_rank_rng(rng: dict | None, seed: int, step: int, rank: int, world_size: int) -> None:
    """Random-number state of this rank after (re)start.

    One process: the saved state (exact resume) or the seed already set. Several: the saved state of this rank
    when the run was saved with the same process count (exact resume), else a seed derived from (seed, step,
    rank), so that the ranks draw different noise.
    """
    saved = rng.get("rank_states") if rng is not None else None
    if world_size == 1:
        if rng is not None:
            set_rng_state(rng)
    elif saved is not None and len(saved) == world_size:
        set_rng_state(saved[rank])
    else:
        if rng is not None:
            logging.warning(
                "The checkpoint was written by a different number of processes: the random streams of the "
                "ranks are re-seeded (training continues correctly, but not bit-identically)."
            )
        torch.manual_seed(seed * 1000003 + step * 1009 + rank)
        np.random.seed((seed * 7919 + step * 31 + rank) % 2**32)
        random.seed(seed * 104729 + step * 13 + rank)


def _repeat(loader) -> Iterator:
    while True:
        yield from loader


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def _atomic_json(path: str, payload: dict) -> None:
    import json

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_json(path: str) -> dict:
    import json

    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        logging.warning("Unreadable results file %s: recomputing.", path)
        return {}


def _checkpoint_path(workdir: str, ckpt: int) -> str:
    return os.path.join(workdir, "checkpoints", f"checkpoint_{ckpt}.pth")


def _restore_for_eval(config, workdir: str, ckpt: int, state: dict, sde) -> str:
    """Load checkpoint_{ckpt}.pth (EMA weights copied into the model); returns its path."""
    ckpt_path = _checkpoint_path(workdir, ckpt)
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(
            f"{ckpt_path} does not exist. Train first, or set eval.begin_ckpt / eval.end_ckpt to the checkpoint "
            f"numbers present in {os.path.dirname(ckpt_path)} (checkpoint_N.pth is written every "
            "training.snapshot_freq steps)."
        )
    state = restore_checkpoint(ckpt_path, state, get_device(config))
    if "corruption" in state and hasattr(sde, "load_state_dict"):
        sde.load_state_dict(state["corruption"])
    state["ema"].copy_to(state["model"].parameters())
    state["model"].eval()
    return ckpt_path


def _progress(total: int | None, desc: str, initial: int = 0, unit: str = "batch", disable: bool = False) -> tqdm:
    """A tqdm bar on stderr (the evaluation's progress: batches, sampling rounds, Inception batches); under
    torchrun rank 0 alone shows its bars (disable=True on the other ranks)."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True, disable=disable)


def _join_processes(config) -> torch.device:
    """Join torchrun's process group (a no-op in one process); config.device becomes this rank's device."""
    device = distributed.init_from_env(get_device(config))
    if device != get_device(config):
        with config.unlocked():
            config.device = device
    return device


def _agreed(reason: str | None, what: str) -> None:
    """Raise unless every rank found `what` available (reason None) or every rank did not: the ranks must take the
    same path through the evaluation."""
    available = distributed.gather_objects(reason is None)
    if len(set(available)) > 1:
        ranks = [r for r, ok in enumerate(available) if ok]
        raise RuntimeError(
            f"{what} is available on ranks {ranks} only ({reason or 'here it is'}): every node of a multi-node "
            "evaluation needs the same files (data, Inception weights, statistics)."
        )


def _derived_seed(*parts: int) -> int:
    """A 32-bit seed depending on the integers `parts` only (NumPy SeedSequence(parts)): a piece of the evaluation
    seeded with it draws the same numbers on any rank, whatever ran before it on that process."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1)[0])


def _load_npy(path: str) -> np.ndarray | None:
    """The array saved at path, or None when it is missing or unreadable (then it is computed again)."""
    if not os.path.exists(path):
        return None
    try:
        return np.load(path)
    except (ValueError, OSError, EOFError):
        logging.warning("Unreadable %s: computing it again.", path)
        return None


def _distributed_metric(folder: str, name: str, jobs: list, compute: Callable, desc: str) -> np.ndarray | None:
    """Per-batch values of a metric, the batches (jobs) shared round-robin by the ranks: all values in job order
    on rank 0, None on the other ranks.

    Job k's values are saved atomically as FOLDER/NAME_k.npy by the rank that computed it; jobs whose file is on
    disk are not computed again, so a killed evaluation resumes with any number of processes. compute(job)
    returns the values, or (values, postfix dict) to show on the progress bar.
    """
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{name}_{k}.npy") for k in range(len(jobs))]
    is_main = distributed.is_main_process()
    done = {k: v for k, path in enumerate(paths) if (v := _load_npy(path)) is not None} if is_main else {}
    pending = distributed.broadcast_object([k for k in range(len(jobs)) if k not in done] if is_main else None)
    mine = {}
    initial = len(jobs) - len(pending) if distributed.get_world_size() == 1 else 0
    share = distributed.share(pending)
    with _progress(initial + len(share), desc, initial, disable=not is_main) as bar:
        for k in share:
            out = compute(jobs[k])
            postfix = {}
            if isinstance(out, tuple):
                out, postfix = out
            value = np.asarray(out, dtype=np.float64).reshape(-1)
            tmp = paths[k] + ".tmp.npy"
            np.save(tmp, value)
            os.replace(tmp, paths[k])
            mine[k] = value
            bar.update(1)
            bar.set_postfix({name: f"{np.concatenate([*done.values(), *mine.values()]).mean():.4g}", **postfix})
    gathered = distributed.gather_objects(mine)
    if not is_main:
        return None
    for part in gathered:
        done.update(part)
    return np.concatenate([done[k] for k in range(len(jobs))]) if jobs else np.zeros(0)


def _bpd_jobs(num_data: int, batch_size: int, passes: int, max_batches: int, num_images: int) -> list[tuple]:
    """(pass p, batch i, start, stop) of every bits/dim batch, pass after pass: per pass the images [0, n) of the
    split in batches of batch_size, n = min(len(split), num_images) (num_images 0: all), at most max_batches
    batches (0: no limit). The k-th job is saved as bpd_k.npy / nelbo_k.npy."""
    n = min(num_data, num_images) if num_images else num_data
    starts = list(range(0, n, batch_size))
    if max_batches:
        starts = starts[:max_batches]
    return [(p, i, s, min(s + batch_size, n)) for p in range(passes) for i, s in enumerate(starts)]


def _bpd_batch(dataset, job: tuple, seed: int, scaler: Callable, device: torch.device) -> torch.Tensor:
    """The scaled images of a bits/dim job (p, i, start, stop) on `device`: images [start, stop) of the split,
    dequantized (when the split is) with noise of the seed (seed, p, i, 0); the global torch generators are then
    seeded with (seed, p, i, 1) for the estimator's own draws (Hutchinson probes, times). So a batch gives the same
    values on any rank and in any order, and pass p of bits/dim and of the NELBO sees the same dequantized data."""
    p, i, start, stop = job
    generator = torch.Generator().manual_seed(_derived_seed(seed, p, i, 0))
    images = dataset.get_batch(np.arange(start, stop), augment=True, generator=generator)
    torch.manual_seed(_derived_seed(seed, p, i, 1))
    return scaler(images.to(device))


class _Data:
    """The evaluation's datasets, opened once on first use; a missing dataset is a reason to skip, not an error."""

    def __init__(self, config):
        self.config = config
        self._opened = {}

    def get(self, purpose: str):
        """(train_loader, eval_loader) for 'loss' (the training dequantization) or 'bpd' (uniform
        dequantization unless data.dequantization = 'lossless'), or a str: why the data are unavailable."""
        if purpose not in self._opened:
            mode = dequantization_mode(self.config)
            dequantize = mode == "uniform" if purpose == "loss" else mode != "lossless"
            try:
                train_ds, eval_ds, _ = datasets.get_dataset(
                    _loader_config(self.config), uniform_dequantization=dequantize, evaluation=True
                )
                self._opened[purpose] = (train_ds, eval_ds)
            except FileNotFoundError as err:
                self._opened[purpose] = f"no {self.config.data.dataset} data ({err})"
        return self._opened[purpose]

    def split(self, purpose: str, name: str):
        """The loader of split 'train' or 'test', or the reason it is unavailable."""
        opened = self.get(purpose)
        if isinstance(opened, str):
            return opened
        return opened[0] if name == "train" else opened[1]


class _CountingModule(torch.nn.Module):
    """Wraps a network and advances a progress bar by the batch size at every call (Inception features)."""

    def __init__(self, net: torch.nn.Module, bar: tqdm):
        super().__init__()
        self.net, self.bar = net, bar

    def forward(self, x):
        out = self.net(x)
        self.bar.update(len(x))
        return out


INCEPTION_BATCH_SIZE = 64  # the batch of evaluation.metrics_from_sample_dir: the features cached here are its own


def _atomic_npz(path: str, **arrays) -> None:
    """np.savez_compressed to a temporary file, then renamed onto path (a reader never sees a partial file)."""
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _await_files(paths: list, timeout_s: float = 120.0) -> None:
    """Wait until this process sees every file of `paths` (written by other ranks; a shared file system may show
    them late); raise when they stay invisible."""
    deadline = time.time() + timeout_s
    while missing := [p for p in paths if not os.path.exists(p)]:
        if time.time() > deadline:
            raise RuntimeError(
                f"{len(missing)} files written by other ranks are not visible on rank 0 (e.g. {missing[0]}): the "
                "work directory of a multi-node evaluation must be on a file system shared by all nodes."
            )
        time.sleep(1.0)


def _statistics_path(sample_path: str) -> str:
    """statistics_{r}.npz next to samples_{r}.npz (the name evaluation.compute_features_for_sample_dir reads)."""
    return sample_path.replace("samples_", "statistics_")


def _write_features(sample_dir: str, net: torch.nn.Module, desc: str) -> None:
    """Inception features statistics_{r}.npz ('pool_3', 'logits') of every samples_{r}.npz of sample_dir lacking
    them, the files shared round-robin by the ranks; on return all ranks are done and rank 0 sees every file (so
    evaluation.metrics_from_sample_dir only reads them)."""
    import evaluation

    is_main = distributed.is_main_process()
    if is_main:
        files = evaluation.list_sample_files(sample_dir)
        pending = [p for p in files if not evaluation.valid_npz(_statistics_path(p), "pool_3")]
    pending = distributed.broadcast_object(pending if is_main else None)
    share = distributed.share(pending)
    total = 0
    for path in share:
        with np.load(path, allow_pickle=False) as data:
            total += len(data["samples"])
    with _progress(total, desc, unit="img", disable=not is_main) as bar:
        counting = _CountingModule(net, bar)
        for path in share:
            with np.load(path, allow_pickle=False) as data:
                samples = data["samples"]
            _atomic_npz(_statistics_path(path), **evaluation.run_inception(samples, counting, INCEPTION_BATCH_SIZE))
    distributed.barrier()
    if is_main:
        _await_files([_statistics_path(p) for p in pending])


class _Inception:
    """The Inception network, loaded once on first use; missing weights are a reason to skip FID."""

    def __init__(self, config):
        self.config, self.net, self.reason = config, None, None

    def get(self):
        if self.net is None and self.reason is None:
            import evaluation

            try:
                self.net = evaluation.get_inception_model(
                    weights_path=self.config.eval.inception_path or None,
                    device=get_device(self.config),
                    download=self.config.data.download,
                )
            except FileNotFoundError as err:
                self.reason = f"no Inception weights ({err})"
        return self.net if self.net is not None else self.reason


def _reference_stats(config, evaluation, data: _Data, inception: _Inception):
    """Training-set Inception statistics: eval.stats_path, else assets/stats/<dataset>_<size>_stats.npz or
    score_sde's assets/stats/<dataset>_stats.npz; when none exists, computed from the training set and saved to
    the first of these paths. Returns the statistics, or a str saying why there are none."""
    path = evaluation.find_dataset_stats(config)
    if path is not None:
        return evaluation.load_reference_stats(path)
    candidates = evaluation.dataset_stats_candidates(config)
    train_ds = data.split("loss", "train")
    if isinstance(train_ds, str):
        return f"no reference statistics (none of {candidates} exists) and {train_ds}"
    net = inception.get()
    if isinstance(net, str):
        return net
    logging.info("Computing reference statistics of the training set into %s.", candidates[0])
    with _progress(len(train_ds.dataset), "reference statistics", unit="img") as bar:
        return evaluation.compute_reference_stats(train_ds, _CountingModule(net, bar), out_path=candidates[0])


def _sample_one_round(
    sampling_fn: Callable, model, sample_dir: str, r: int, keep: int, batch: int, seed: int, grid_path, after
) -> None:
    """Sampling round r: evaluation.write_samples_in_batches on one batch of `keep` images under
    torch.manual_seed(seed + r), written in a temporary folder whose files then move into sample_dir (a grid to
    grid_path when given; samples_{r}.npz last: it marks the round done). after(x, nfe, folder) sees the batch and
    may write files of the round into `folder` (they land next to samples_{r}.npz)."""
    import shutil

    import evaluation

    tmp = os.path.join(sample_dir, f".round_{r}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run

    def sampling(net):
        x, nfe = sampling_fn(net)
        after(x, nfe, tmp)
        return x, nfe

    try:
        tmp_grid = os.path.join(tmp, "grid.png") if grid_path else None
        evaluation.write_samples_in_batches(sampling, model, tmp, keep, batch, seed=seed + r, grid_path=tmp_grid)
        if tmp_grid and os.path.exists(tmp_grid):
            os.replace(tmp_grid, grid_path)
        for name in sorted(os.listdir(tmp)):
            if name != "samples_0.npz":
                os.replace(os.path.join(tmp, name), os.path.join(sample_dir, name))
        os.replace(os.path.join(tmp, "samples_0.npz"), os.path.join(sample_dir, f"samples_{r}.npz"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sample_rounds(
    sampling_fn: Callable,
    model,
    sample_dir: str,
    num_samples: int,
    batch: int,
    seed: int,
    desc: str,
    grid_path: str | None = None,
    on_round: Callable | None = None,
) -> list[int]:
    """Write samples_{r}.npz (uint8 NHWC) for every round r < ceil(num_samples / batch) not on disk yet, the
    rounds shared round-robin by the ranks; returns the rounds this rank computed.

    Round r runs under torch.manual_seed(seed + r) (evaluation.write_samples_in_batches' seeding), so the files are
    those of one uninterrupted process whatever the number of processes and the rounds already on disk.
    grid_path: a PNG grid of the first round computed (when the grid is missing). on_round(x, nfe, r, folder): called
    with the batch of round r; files it writes into `folder` land next to samples_{r}.npz. On return every rank has
    finished and rank 0 sees all the files.
    """
    import evaluation

    rounds = evaluation.num_sampling_rounds(num_samples, batch)
    os.makedirs(sample_dir, exist_ok=True)
    is_main = distributed.is_main_process()
    paths = [os.path.join(sample_dir, f"samples_{r}.npz") for r in range(rounds)]
    plan = None
    if is_main:
        pending = [r for r in range(rounds) if not evaluation.valid_npz(paths[r], "samples")]
        for r in pending:
            if os.path.exists(paths[r]):
                logging.warning("Sample file %s is unreadable; sampling round %d again.", paths[r], r)
        grid_round = pending[0] if pending and grid_path and not os.path.exists(grid_path) else None
        plan = (pending, grid_round)
    pending, grid_round = distributed.broadcast_object(plan)
    share = distributed.share(pending)
    initial = rounds - len(pending) if distributed.get_world_size() == 1 else 0
    with _progress(initial + len(share), desc, initial, disable=not is_main) as bar:
        for r in share:

            def after(x, nfe, folder, r=r):
                if on_round is not None:
                    on_round(x, nfe, r, folder)
                bar.update(1)
                bar.set_postfix(nfe=nfe)

            keep = min(batch, num_samples - r * batch)
            grid = grid_path if r == grid_round else None
            _sample_one_round(sampling_fn, model, sample_dir, r, keep, batch, seed, grid, after)
            logging.info("Wrote %s (%d samples).", paths[r], keep)
    distributed.barrier()
    if is_main:
        _await_files([paths[r] for r in pending])
    return share


def _summary(ckpt: int, results: dict, skipped: dict) -> str:
    """One line per checkpoint: the file, what was computed (figures), what was skipped and why."""
    figures = {k: v for k, v in results.items() if isinstance(v, (int, float)) and k != "step"}
    computed = ", ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(figures.items()))
    line = f"ckpt {ckpt} ({results.get('checkpoint')}, step {results.get('step')}): computed {computed or 'nothing'}"
    if skipped:
        line += "; skipped " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
    return line


def evaluate(config, workdir: str, eval_folder: str = "eval") -> dict:
    """Evaluate checkpoints eval.begin_ckpt .. eval.end_ckpt: loss, bits/dim, NELBO, samples, FID / IS / KID.

    What is computed follows EvalPlan (eval_plan). Pieces whose inputs are missing are skipped, not failed: no
    dataset -> no loss, bits/dim, NELBO (and no FID unless reference statistics exist); no Inception weights ->
    no FID / IS / KID; the reasons are logged and written to results.json under 'skipped'. Checkpoints of the
    range that are not on disk are skipped (at least one must exist). Results go to
    WORKDIR/EVAL_FOLDER/ckpt_N/results.json (and tensorboard); every finished piece (a bits/dim batch, a sample
    batch, its Inception features) is on disk before the next starts, so a killed evaluation resumes without
    redoing finished work. Each long piece shows a tqdm bar; one summary line per checkpoint is logged.

    Randomness: sampling round r of checkpoint c runs under torch.manual_seed(config.seed + 1000003 c + r); bits/dim
    and NELBO batch i of pass p draw from seeds derived from (config.seed, p, i) (_bpd_batch); the eval loss of every
    checkpoint starts from the generator state right after the model is built. No piece depends on what ran before
    it, so under torchrun (the sampling rounds, bits/dim batches and Inception features shared by the ranks; rank 0
    alone computes the eval loss and the metrics and writes results.json, logs and tensorboard) the files and
    results equal those of one process, and a killed run resumes with any number of processes. Every rank returns
    rank 0's results.
    """
    import evaluation
    import likelihood

    config = complete_config(config)
    validate_config(config)
    plan = eval_plan(config)
    device = _join_processes(config)
    is_main = distributed.is_main_process()
    eval_dir = os.path.join(workdir, eval_folder)
    if is_main:
        _setup_logging(eval_dir)
    ev = config.eval
    precision = parametrization.eval_precision(config)  # the network's autocast in every piece of the evaluation
    loss_config = copy.deepcopy(config)
    with loss_config.unlocked():
        loss_config.training.precision = precision
    torch.manual_seed(config.seed)
    sde, sampling_eps = get_corruption(config)
    state = build_state(config, device)
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    eps = float(config.training.truncation_time)
    begin, end = int(ev.begin_ckpt), int(ev.end_ckpt)
    present = [c for c in range(begin, end + 1) if os.path.exists(_checkpoint_path(workdir, c))]
    if not present:
        _restore_for_eval(config, workdir, begin, state, sde)  # raises FileNotFoundError naming the file
    missing = sorted(set(range(begin, end + 1)) - set(present))
    if missing and is_main:
        logging.info(
            "Checkpoints %s of eval.begin_ckpt..eval.end_ckpt = %d..%d are not in %s: evaluating %s.",
            missing,
            begin,
            end,
            os.path.join(workdir, "checkpoints"),
            present,
        )
    data, inception = _Data(config), _Inception(config)
    bpd_split = ev.bpd_dataset
    if bpd_split not in ("train", "test"):
        raise ValueError(f"eval.bpd_dataset={bpd_split!r} must be 'train' or 'test'.")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(eval_dir, "tensorboard")) if is_main else None
    loss_rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    all_results = {}
    for ckpt in present:
        ckpt_path = _restore_for_eval(config, workdir, ckpt, state, sde)
        model = state["model"]
        folder = os.path.join(eval_dir, f"ckpt_{ckpt}")
        os.makedirs(folder, exist_ok=True)
        results_path = os.path.join(folder, "results.json")
        results = distributed.broadcast_object(_load_json(results_path) if is_main else None)
        results.pop("skipped", None)
        results.update(checkpoint=ckpt_path, step=int(state["step"]))
        skipped = {}
        if is_main:
            logging.info("Evaluating %s (step %d).", ckpt_path, state["step"])

        if is_main and plan.enable_loss and "eval_loss" not in results:
            eval_ds = data.split("loss", "test")
            if isinstance(eval_ds, str):
                skipped["eval_loss"] = eval_ds
            else:
                eval_step = losses.get_step_fn_from_config(loss_config, sde, train=False)
                values = []
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.set_rng_state(loss_rng[0])
                    if loss_rng[1] is not None:
                        torch.cuda.set_rng_state(loss_rng[1], device)
                    with torch.no_grad(), _progress(len(eval_ds), f"eval loss ckpt {ckpt}") as bar:
                        for b in eval_ds:
                            values.append(float(eval_step(state, scaler(b["image"].to(device)))))
                            bar.update(1)
                            bar.set_postfix(loss=f"{np.mean(values):.4g}")
                results["eval_loss"] = float(np.mean(values))

        nll_needed = plan.nll_passes > 0 and "bpd" not in results
        nelbo_needed = plan.nelbo_passes > 0 and "nelbo_bpd" not in results
        if ev.enable_bpd and plan.nll_passes == 0:
            skipped["bpd"] = "eval.nll_iter = 0 (no probability-flow NLL passes requested)"
        loader = data.split("bpd", bpd_split) if (nll_needed or nelbo_needed) else None
        if nll_needed or nelbo_needed:
            _agreed(loader if isinstance(loader, str) else None, f"the {bpd_split} split of {config.data.dataset}")
        if isinstance(loader, str):
            for key, needed in (("bpd", nll_needed), ("nelbo_bpd", nelbo_needed)):
                if needed:
                    skipped[key] = loader
            loader = None
        dataset = loader.dataset if loader is not None else None

        def bpd_jobs(passes: int, dataset=dataset) -> list:
            return _bpd_jobs(len(dataset), int(ev.batch_size), passes, plan.max_bpd_batches, plan.num_test_data)

        def bpd_pass_means(values: np.ndarray, passes: int) -> list:
            return [float(m) for m in values.reshape(passes, -1).mean(axis=1)] if values.size % passes == 0 else []

        if nll_needed and dataset is not None:
            likelihood_fn = likelihood.get_likelihood_fn(
                sde,
                inverse_scaler,
                hutchinson_type=ev.hutchinson_type,
                rtol=float(ev.bpd_rtol),
                atol=float(ev.bpd_atol),
                eps=eps,
                truncation=plan.truncation,
                decoder=plan.decoder,
                lambda_=plan.lambda_,
                precision=precision,
            )

            def nll_batch(job, fn=likelihood_fn, net=model, dataset=dataset):
                bpd, _, nfe = fn(net, _bpd_batch(dataset, job, config.seed, scaler, device))
                return bpd.cpu(), {"nfe": nfe}

            bpd = _distributed_metric(folder, "bpd", bpd_jobs(plan.nll_passes), nll_batch, f"bits/dim ckpt {ckpt}")
            if bpd is not None:
                results["bpd"] = float(bpd.mean())
                results["bpd_num_images"] = int(bpd.size)
                results["bpd_pass_means"] = bpd_pass_means(bpd, plan.nll_passes)
        if nelbo_needed and dataset is not None:
            nelbo_fn = likelihood.get_nelbo_fn(
                sde,
                inverse_scaler,
                eps=eps,
                truncation=plan.truncation,
                data_std=0.5 if config.data.centered else 0.25,
                decoder=plan.decoder,
                precision=precision,
            )

            def nelbo_batch(job, fn=nelbo_fn, net=model, dataset=dataset):
                return fn(net, _bpd_batch(dataset, job, config.seed, scaler, device)).cpu()

            with torch.no_grad():
                nelbo = _distributed_metric(
                    folder, "nelbo", bpd_jobs(plan.nelbo_passes), nelbo_batch, f"NELBO ckpt {ckpt}"
                )
            if nelbo is not None:
                results["nelbo_bpd"] = float(nelbo.mean())
                results["nelbo_num_images"] = int(nelbo.size)
                results["nelbo_pass_means"] = bpd_pass_means(nelbo, plan.nelbo_passes)

        if plan.enable_sampling:
            sample_dir = os.path.join(folder, "samples")
            have_samples = _evaluate_samples(config, plan, model, sample_dir, folder, ckpt, sde, sampling_eps, skipped)
            if have_samples and plan.sample_more:
                results["num_samples"] = int(config.eval.num_samples)
            if have_samples and plan.enable_fid and "fid" not in results:
                reference = _reference_stats(config, evaluation, data, inception) if is_main else None
                reason = reference if isinstance(reference, str) else None
                if reason is None and is_main and isinstance(inception.get(), str):
                    reason = inception.get()
                reason = distributed.broadcast_object(reason)
                if reason is not None:
                    skipped["fid"] = reason
                else:
                    net = inception.get()
                    _agreed(net if isinstance(net, str) else None, "the Inception network")
                    _write_features(sample_dir, net, f"Inception features ckpt {ckpt}")
                    if is_main:
                        metrics = evaluation.metrics_from_sample_dir(
                            sample_dir, reference, inception_model=net, device=device
                        )
                        results.update({k: v for k, v in metrics.items() if v is not None})

        if is_main:
            if skipped:
                results["skipped"] = skipped
                for key, reason in skipped.items():
                    logging.warning("ckpt %d: %s skipped: %s", ckpt, key, reason)
            _atomic_json(results_path, results)
            for key, value in results.items():
                if isinstance(value, float):
                    writer.add_scalar(key, value, int(state["step"]))
            logging.info("%s", _summary(ckpt, results, skipped))
        all_results[ckpt] = distributed.broadcast_object(results)
    if writer is not None:
        writer.close()
    return all_results


def _evaluate_samples(config, plan: EvalPlan, model, sample_dir: str, folder: str, ckpt: int, sde, eps, skipped):
    """Write eval.num_samples samples (unless sampling.sample_more is False), the sampling rounds shared by the
    ranks; True (on every rank) if samples are on disk."""
    import evaluation

    ev = config.eval
    if not plan.sample_more:
        have = os.path.isdir(sample_dir) and bool(evaluation.list_sample_files(sample_dir))
        have = distributed.broadcast_object(have)
        if not have:
            skipped["samples"] = f"sampling.sample_more=False and no samples_*.npz in {sample_dir}"
        return have
    batch = int(ev.batch_size)
    sampling_fn = get_sampling_fn_from_config(config, sde, eps, batch)
    with torch.no_grad():
        _sample_rounds(
            sampling_fn,
            model,
            sample_dir,
            int(ev.num_samples),
            batch,
            seed=config.seed + 1000003 * ckpt,
            desc=f"sampling ckpt {ckpt}",
            grid_path=os.path.join(folder, "sample_grid.png"),
        )
    return True


def _latest_checkpoint(workdir: str) -> int:
    import re

    folder = os.path.join(workdir, "checkpoints")
    found = (
        [int(m.group(1)) for n in os.listdir(folder) if (m := re.match(r"checkpoint_(\d+)\.pth$", n))]
        if (os.path.isdir(folder))
        else []
    )
    if not found:
        raise FileNotFoundError(
            f"No checkpoint_N.pth in {folder}: train first (python main.py --mode train), or put a released "
            "checkpoint there under its file name (README, 'Released checkpoints')."
        )
    return max(found)


def sample(config, workdir: str, eval_folder: str = "eval") -> str:
    """Write eval.num_samples samples of checkpoint eval.sample_ckpt (0: the latest) with config.sampling.method.

    Needs no dataset. Output: WORKDIR/EVAL_FOLDER/samples_ckpt_N_METHOD/samples_{r}.npz (uint8 NHWC) and
    samples_{r}.png (grid) per batch of eval.batch_size; round r runs under torch.manual_seed(config.seed + r), so a
    killed run resumes at the missing batches with the same images. Under torchrun the rounds are shared by the
    ranks (each writes the files of its rounds; the same files as one process) and rank 0 alone logs. A tqdm bar
    counts the batches (network evaluations as postfix).
    """
    import evaluation

    config = complete_config(config)
    validate_config(config)
    device = _join_processes(config)
    is_main = distributed.is_main_process()
    sde, sampling_eps = get_corruption(config)
    state = build_state(config, device)
    ckpt = int(config.eval.sample_ckpt) or _latest_checkpoint(workdir)
    ckpt_path = _restore_for_eval(config, workdir, ckpt, state, sde)
    out_dir = os.path.join(workdir, eval_folder, f"samples_ckpt_{ckpt}_{config.sampling.method}")
    if is_main:
        _setup_logging(out_dir)
    batch = int(config.eval.batch_size)
    num_samples = int(config.eval.num_samples)
    sampling_fn = get_sampling_fn_from_config(config, sde, sampling_eps, batch)
    nfes = []

    def save_grid(x, nfe, round_index, folder):
        evaluation.save_image_grid(
            x, os.path.join(folder, f"samples_{round_index}.png"), nrow=int(math.sqrt(len(x))) or 1
        )
        logging.info("Sampling round %d: %d network evaluations.", round_index, nfe)
        nfes.append(nfe)

    if is_main:
        logging.info(
            "Sampling %d images from %s (step %d) with %s.",
            num_samples,
            ckpt_path,
            state["step"],
            config.sampling.method,
        )
    with torch.no_grad():
        _sample_rounds(
            sampling_fn,
            state["model"],
            out_dir,
            num_samples,
            batch,
            seed=config.seed,
            desc=f"sampling ckpt {ckpt}",
            on_round=save_grid,
        )
    nfes = [n for rank_nfes in distributed.gather_objects(nfes) for n in rank_nfes]
    if is_main:
        logging.info(
            "ckpt %d (%s, step %d): %d samples in %s (%d new batches, network evaluations per batch: %s).",
            ckpt,
            ckpt_path,
            state["step"],
            num_samples,
            out_dir,
            len(nfes),
            sorted(set(nfes)) or "-",
        )
    return out_dir
