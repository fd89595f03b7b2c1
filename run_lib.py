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
import sde_lib
from models import utils as mutils
from models.ema import ExponentialMovingAverage
from utils import get_rng_state, restore_checkpoint, save_checkpoint, set_rng_state

VALID_CORRUPTIONS = ("gaussian", "blur")


# ----------------------------------------------------------------------------------------------------------------
# Configuration checks


def validate_config(config) -> None:
    """Reject invalid values before anything is built or trained, naming the field and the fix."""
    training, model, data = config.training, config.model, config.data
    corruption = training.get("corruption", "gaussian")
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
    eps = float(training.get("truncation_time", 1e-5))
    if not 0.0 < eps < 1.0:
        raise ValueError(f"training.truncation_time={eps} must lie in (0, T) = (0, 1).")
    k = float(training.get("k", 1.0))
    if training.get("st", False) and (math.isnan(k) or k < 0):
        raise ValueError(f"training.k={k} must be >= 0 (k = 0 is uniform, k -> inf is plain truncation at eps).")
    ch_mult = model.get("ch_mult", None)
    if ch_mult is not None:
        factor = 2 ** (len(ch_mult) - 1)
        if data.image_size % factor:
            raise ValueError(
                f"data.image_size={data.image_size} is not divisible by 2^(len(model.ch_mult)-1) = {factor}: "
                "choose an image size that survives every down-sampling, or fewer resolution levels."
            )
    micro = int(config.optim.get("num_micro_batch", 1))
    if micro < 1 or training.batch_size % micro:
        raise ValueError(
            f"optim.num_micro_batch={micro} must be >= 1 and divide training.batch_size={training.batch_size}."
        )
    if training.get("mixed", False) and (training.batch_size // micro) % 2:
        raise ValueError("training.mixed=True needs an even micro-batch size (batch_size / num_micro_batch).")
    if corruption == "blur":
        for flag in ("stf", "importance_sampling", "likelihood_weighting", "mixed"):
            if training.get(flag, False):
                raise ValueError(
                    f"training.{flag}=True is defined for Gaussian SDEs only; it cannot be used with "
                    "training.corruption='blur'."
                )
    if training.get("stf", False) and int(training.get("stf_ref_batch_size", 0)) < 1:
        raise ValueError("training.stf_ref_batch_size must be >= 1.")
    if training.n_iters < 0 or training.snapshot_freq <= 0 or training.snapshot_freq_for_preemption <= 0:
        raise ValueError("training.n_iters must be >= 0 and the snapshot frequencies > 0.")
    dequantization_mode(config)  # raises on an unknown or contradictory data.dequantization
    if training.get("reconstruction_loss", False) and not training.continuous:
        raise ValueError(
            "training.reconstruction_loss=True needs continuous-time training (training.continuous=True), as in "
            "the Soft Truncation repository (its discrete SMLD / DDPM losses have no reconstruction term)."
        )
    eval_plan(config)  # raises on contradictory eval fields


# ----------------------------------------------------------------------------------------------------------------
# Fields of score_sde and of the Soft Truncation repository that select the same behaviour, read in one place

DEQUANTIZATIONS = ("none", "uniform", "lossless")


def dequantization_mode(config) -> str:
    """'none' | 'uniform' | 'lossless': the Soft Truncation field data.dequantization, with score_sde's
    data.uniform_dequantization = True meaning 'uniform'."""
    mode = str(config.data.get("dequantization", "none"))
    if mode not in DEQUANTIZATIONS:
        raise ValueError(f"data.dequantization={mode!r} is not one of {DEQUANTIZATIONS}.")
    if bool(config.data.get("uniform_dequantization", False)):
        if mode == "lossless":
            raise ValueError(
                "data.uniform_dequantization=True contradicts data.dequantization='lossless' (the discrete "
                "decoder models the 8-bit data themselves): set one of them."
            )
        return "uniform"
    return mode


def _loader_config(config):
    """The config handed to datasets.py: with 'lossless' the 8-bit data are read as they are (no noise)."""
    if config.data.get("dequantization", "none") != "lossless":
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
    nll_iter = ev.get("nll_iter", None)
    repeats = ev.get("bpd_num_repeats", None)
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
    ev = config.eval
    enable_bpd = bool(ev.get("enable_bpd", False))
    nll_iter = _nll_passes(ev)
    nelbo_iter = int(ev.get("nelbo_iter", 0))
    if nll_iter < 0 or nelbo_iter < 0:
        raise ValueError(f"eval.nll_iter={nll_iter} and eval.nelbo_iter={nelbo_iter} must be >= 0.")
    enable_nelbo = bool(ev.get("enable_nelbo", False))
    nelbo_passes = nelbo_iter if nelbo_iter > 0 else (nll_iter if enable_nelbo else 0)
    if not (enable_nelbo or enable_bpd):
        nelbo_passes = 0
    num_test_data = int(ev.get("num_test_data", 0) or 0)
    if num_test_data < 0:
        raise ValueError(f"eval.num_test_data={num_test_data} must be >= 0 (0: the whole split).")
    lambda_ = float(ev.get("lambda_", 0.0))
    probability_flow = bool(ev.get("probability_flow", lambda_ == 0.0))
    if probability_flow != (lambda_ == 0.0):
        raise ValueError(
            f"eval.probability_flow={probability_flow} and eval.lambda_={lambda_} disagree: the likelihood's reverse "
            "process is the probability-flow ODE exactly when lambda_ = 0 (the Soft Truncation repository asserts "
            "probability_flow == (lambda_ == 0)). Set both."
        )
    truncation = "exact" if bool(ev.get("residual", True)) else "plain"
    decoder = "lossless" if dequantization_mode(config) == "lossless" else "gaussian"
    if decoder == "lossless" and truncation == "plain" and (enable_bpd or enable_nelbo):
        raise ValueError(
            "data.dequantization='lossless' evaluates bits/dim with the discrete decoder at eps, which is the exact "
            "truncation treatment: set eval.residual=True (or another data.dequantization)."
        )
    return EvalPlan(
        enable_loss=bool(ev.get("enable_loss", True)),
        nll_passes=nll_iter if enable_bpd else 0,
        nelbo_passes=nelbo_passes,
        num_test_data=num_test_data,
        max_bpd_batches=int(ev.get("max_bpd_batches", 0)),
        truncation=truncation,
        decoder=decoder,
        lambda_=lambda_,
        enable_sampling=bool(ev.get("enable_sampling", False)),
        sample_more=bool(config.sampling.get("sample_more", True)),
        enable_fid=bool(ev.get("enable_fid", True)),
    )


def get_corruption(config):
    """The forward corruption: the SDE (with its sampling eps), or the blur of Soft Diffusion."""
    if config.training.get("corruption", "gaussian") == "blur":
        import corruption

        obj = corruption.get_corruption(config)
        return obj, float(config.training.get("truncation_time", 1e-3))
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
    """Deterministic, resumable training batches (float32 [B, C, H, W] in [0, 1]).

    Images are fetched as uint8 (by config.data.num_workers worker processes when > 0) in the order of
    PositionBatchSampler; the random flip of batch p is drawn from a generator seeded by (seed, p). With
    world_size > 1 the stream yields rank `rank`'s slice of each global batch (flips included).
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
    ):
        self.seed, self.random_flip, self.position = int(seed), random_flip, int(position)
        self.batch_size = int(batch_size)
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
        return datasets.to_float(images)


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
    """Model, EMA and optimizer of score_sde's training state."""
    score_model = mutils.create_model(config)
    ema = ExponentialMovingAverage(score_model.parameters(), decay=config.model.ema_rate)
    optimizer = losses.get_optimizer(config, score_model.parameters())
    return dict(optimizer=optimizer, model=score_model, ema=ema, step=0)


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


def _reference_batch(
    ref_sampler, batch: torch.Tensor, scaler, seed: int | None = None, gather: bool = True
) -> torch.Tensor | None:
    """STF reference batch: the step's own sources first, then extra training images (scaled like the batch).

    With `seed` (the training step's position and the rank) the extra draws depend only on it, so a resumed run
    draws the same references. With training.stf_gather (and gather=True) the references of all data-parallel
    ranks are concatenated in rank order.
    """
    if ref_sampler is None:
        return None
    if seed is not None:
        ref_sampler.generator.manual_seed(seed)
    extra = ref_sampler.sample(batch.shape[0])
    reference = batch if extra.shape[0] == 0 else torch.cat([batch, scaler(extra.to(batch.device))], dim=0)
    if gather and getattr(ref_sampler, "gather", False):
        import stf

        reference = stf.gather_reference_batch(reference)
    return reference


def train(config, workdir: str) -> dict:
    """Train a score model; resumes automatically from WORKDIR/checkpoints-meta/checkpoint.pth.

    Under torchrun (several processes) each rank trains on its slice of the global batch with
    DistributedDataParallel; rank 0 alone writes logs, checkpoints and samples. Returns the final training state
    (model, ema, optimizer, step).
    """
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
    if config.training.get("corruption", "gaussian") == "blur":
        if "corruption" in state:
            sde.load_state_dict(state["corruption"])
        else:
            sde.fit_prior(_prior_fit_images(config, train_set))
        state["corruption"] = sde.state_dict()
    scaler = datasets.get_data_scaler(config)
    position = int(rng["data_position"]) if rng is not None and "data_position" in rng else initial_step
    stream = TrainStream(
        train_set,
        config.training.batch_size,
        config.seed,
        bool(config.data.random_flip),
        position=position,
        num_workers=int(config.data.get("num_workers", 0)),
        rank=rank,
        world_size=world_size,
    )
    dequantize = dequantization_mode(config) == "uniform"
    _, eval_ds, _ = datasets.get_dataset(_loader_config(config), uniform_dequantization=dequantize, evaluation=False)
    eval_iter = _repeat(eval_ds)

    ref_sampler = None
    if config.training.get("stf", False):
        import stf

        ref_sampler = stf.ReferenceBatchSampler(
            train_set, int(config.training.stf_ref_batch_size), random_flip=bool(config.data.random_flip)
        )
        ref_sampler.gather = bool(config.training.get("stf_gather", False))

    optimize_fn = losses.optimization_manager(config)
    train_step_fn = losses.get_step_fn_from_config(config, sde, train=True, optimize_fn=optimize_fn)
    eval_step_fn = losses.get_step_fn_from_config(config, sde, train=False, optimize_fn=optimize_fn)

    network = state["model"]
    if world_size > 1:
        state["model"] = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if is_main else None
    training = config.training
    num_train_steps = int(training.n_iters)
    max_nonfinite = int(training.get("max_nonfinite_steps", 10))
    nonfinite_run = 0
    sample_every_step = bool(training.get("whatever_sampling", False))  # the ST repository's debug switch
    if is_main:
        logging.info("Config:\n%s", config)
        processes = f" ({world_size} data-parallel processes)" if world_size > 1 else ""
        logging.info("Starting training loop at step %d of %d.%s", initial_step, num_train_steps, processes)
    progress = tqdm(total=num_train_steps, initial=initial_step, desc="train", dynamic_ncols=True, disable=not is_main)
    start_time = time.time()
    while state["step"] < num_train_steps:
        batch = next(stream).to(device, non_blocking=True)
        if dequantize:
            batch = (batch * 255.0 + torch.rand_like(batch)) / 256.0
        batch = scaler(batch)
        ref_seed = (config.seed * 1000033 + stream.position) * world_size + rank
        reference = _reference_batch(ref_sampler, batch, scaler, seed=ref_seed)
        loss = train_step_fn(state, batch, reference=reference)
        if state["nonfinite"]:
            nonfinite_run += 1
            logging.warning(
                "Non-finite loss or gradient at step %d (%d in a row): step skipped.",
                state["step"],
                nonfinite_run,
            )
            if nonfinite_run >= max_nonfinite:
                raise RuntimeError(
                    f"{nonfinite_run} consecutive optimisation steps gave a NaN/Inf loss or gradient (step "
                    f"{state['step']}). Training stopped; the last good checkpoint is in {checkpoint_meta_dir}. "
                    "Lower optim.lr, keep optim.grad_clip >= 0, check the data, or raise "
                    "training.max_nonfinite_steps."
                )
            continue
        nonfinite_run = 0
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
                eval_reference = _reference_batch(ref_sampler, eval_batch, scaler, gather=False)
                eval_loss = float(eval_step_fn(_without_ddp(state, network), eval_batch, reference=eval_reference))
            logging.info("step: %d, eval_loss: %.5e", step, eval_loss)
            writer.add_scalar("eval_loss", eval_loss, step)
        snapshot = step % training.snapshot_freq == 0 or step == num_train_steps
        if is_main and snapshot:
            save_step = step // training.snapshot_freq  # score_sde's numbering
            save_checkpoint(os.path.join(checkpoint_dir, f"checkpoint_{save_step}.pth"), state)
        if is_main and training.snapshot_sampling and (snapshot or sample_every_step):
            folder = os.path.join(sample_dir, f"iter_{step}")
            snapshot_samples(config, _without_ddp(state, network), sde, sampling_eps, folder)
    progress.close()
    if writer is not None:
        writer.close()
    state["model"] = network
    distributed.barrier()
    logging.info("Training finished at step %d (%.1f s).", state["step"], time.time() - start_time)
    return state


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


def _prior_fit_images(config, train_set) -> torch.Tensor:
    """Scaled training images for fitting the blur corruption's distribution at t = 1."""
    n = min(len(train_set), int(config.blur.get("prior_fit_images", 2048)))
    gen = torch.Generator().manual_seed(config.seed)
    idx = torch.randperm(len(train_set), generator=gen)[:n]
    return datasets.get_data_scaler(config)(train_set.get_batch(idx, augment=False))


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


def _progress(total: int | None, desc: str, initial: int = 0, unit: str = "batch") -> tqdm:
    """A tqdm bar on stderr (the evaluation's progress: batches, sampling rounds, Inception batches)."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True)


def _chunked_metric(folder: str, name: str, batches, compute, bar: tqdm | None = None) -> np.ndarray:
    """Per-batch values of a metric, each batch's result saved atomically (a killed evaluation resumes).

    compute(batch) returns the values, or (values, postfix dict) to show on the progress bar.
    """
    os.makedirs(folder, exist_ok=True)
    values = []
    for i, batch in enumerate(batches):
        path = os.path.join(folder, f"{name}_{i}.npy")
        value = None
        if os.path.exists(path):
            try:
                value = np.load(path)
            except ValueError:
                logging.warning("Unreadable %s: computing it again.", path)
        postfix = {}
        if value is None:
            out = compute(batch)
            if isinstance(out, tuple):
                out, postfix = out
            value = np.asarray(out, dtype=np.float64).reshape(-1)
            tmp = path + ".tmp.npy"
            np.save(tmp, value)
            os.replace(tmp, path)
        values.append(value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({name: f"{np.concatenate(values).mean():.4g}", **postfix})
    return np.concatenate(values) if values else np.zeros(0)


def _bpd_batches(loader, config, repeats: int, max_batches: int, num_images: int):
    """(repeat, batch) image batches of the bits/dim split: per pass at most max_batches batches (0: all) and
    num_images images (0: all; the last batch trimmed), dequantized afresh by the loader each pass."""
    for repeat in range(repeats):
        torch.manual_seed(config.seed + 7 * repeat)
        seen = 0
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            images = batch["image"]
            if num_images:
                images = images[: num_images - seen]
                if len(images) == 0:
                    break
            seen += len(images)
            yield images


def _bpd_batch_count(loader, max_batches: int, num_images: int, batch_size: int) -> int:
    """Number of batches one bits/dim pass yields (for the progress bar)."""
    n = len(loader)
    if num_images:
        n = min(n, -(-num_images // batch_size))
    return min(n, max_batches) if max_batches else n


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


def _pending_feature_images(sample_dir: str, evaluation) -> int:
    """Samples whose Inception features (statistics_r.npz) are not on disk yet (the feature bar's total)."""
    total = 0
    for path in evaluation.list_sample_files(sample_dir):
        if not os.path.exists(path.replace("samples_", "statistics_")):
            with np.load(path, allow_pickle=False) as data:
                total += len(data["samples"])
    return total


class _Inception:
    """The Inception network, loaded once on first use; missing weights are a reason to skip FID."""

    def __init__(self, config):
        self.config, self.net, self.reason = config, None, None

    def get(self):
        if self.net is None and self.reason is None:
            import evaluation

            try:
                self.net = evaluation.get_inception_model(
                    weights_path=self.config.eval.get("inception_path", "") or None,
                    device=get_device(self.config),
                    download=self.config.data.get("download", None),
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


def _sampling_with_progress(sampling_fn: Callable, bar: tqdm, on_batch: Callable | None = None) -> Callable:
    """sampling_fn that advances the sampling-rounds bar (network evaluations of the batch as postfix)."""

    def sampling(model):
        x, nfe = sampling_fn(model)
        if on_batch is not None:
            on_batch(x, nfe)
        bar.update(1)
        bar.set_postfix(nfe=nfe)
        return x, nfe

    return sampling


def _done_rounds(sample_dir: str, rounds: int, evaluation) -> int:
    """Sampling rounds r < rounds whose samples_r.npz is already on disk (the bar's starting point)."""
    if not os.path.isdir(sample_dir):
        return 0
    names = {os.path.basename(p) for p in evaluation.list_sample_files(sample_dir)}
    return sum(f"samples_{r}.npz" in names for r in range(rounds))


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
    """
    import evaluation
    import likelihood

    validate_config(config)
    plan = eval_plan(config)
    eval_dir = os.path.join(workdir, eval_folder)
    _setup_logging(eval_dir)
    ev = config.eval
    device = get_device(config)
    torch.manual_seed(config.seed)
    sde, sampling_eps = get_corruption(config)
    state = build_state(config, device)
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    eps = float(config.training.get("truncation_time", 1e-5))
    begin, end = int(ev.begin_ckpt), int(ev.end_ckpt)
    present = [c for c in range(begin, end + 1) if os.path.exists(_checkpoint_path(workdir, c))]
    if not present:
        _restore_for_eval(config, workdir, begin, state, sde)  # raises FileNotFoundError naming the file
    missing = sorted(set(range(begin, end + 1)) - set(present))
    if missing:
        logging.info(
            "Checkpoints %s of eval.begin_ckpt..eval.end_ckpt = %d..%d are not in %s: evaluating %s.",
            missing,
            begin,
            end,
            os.path.join(workdir, "checkpoints"),
            present,
        )
    data, inception = _Data(config), _Inception(config)
    bpd_split = ev.get("bpd_dataset", "test")
    if bpd_split not in ("train", "test"):
        raise ValueError(f"eval.bpd_dataset={bpd_split!r} must be 'train' or 'test'.")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(eval_dir, "tensorboard"))
    all_results = {}
    for ckpt in present:
        ckpt_path = _restore_for_eval(config, workdir, ckpt, state, sde)
        model = state["model"]
        folder = os.path.join(eval_dir, f"ckpt_{ckpt}")
        os.makedirs(folder, exist_ok=True)
        results_path = os.path.join(folder, "results.json")
        results = _load_json(results_path)
        results.pop("skipped", None)
        results.update(checkpoint=ckpt_path, step=int(state["step"]))
        skipped = {}
        logging.info("Evaluating %s (step %d).", ckpt_path, state["step"])

        if plan.enable_loss and "eval_loss" not in results:
            eval_ds = data.split("loss", "test")
            if isinstance(eval_ds, str):
                skipped["eval_loss"] = eval_ds
            else:
                eval_step = losses.get_step_fn_from_config(config, sde, train=False)
                values = []
                with torch.no_grad(), _progress(len(eval_ds), f"eval loss ckpt {ckpt}") as bar:
                    for b in eval_ds:
                        values.append(float(eval_step(state, scaler(b["image"].to(device)))))
                        bar.update(1)
                        bar.set_postfix(loss=f"{np.mean(values):.4g}")
                results["eval_loss"] = float(np.mean(values))

        nll_needed = plan.nll_passes > 0 and "bpd" not in results
        nelbo_needed = plan.nelbo_passes > 0 and "nelbo_bpd" not in results
        if ev.get("enable_bpd", False) and plan.nll_passes == 0:
            skipped["bpd"] = "eval.nll_iter = 0 (no probability-flow NLL passes requested)"
        loader = data.split("bpd", bpd_split) if (nll_needed or nelbo_needed) else None
        if isinstance(loader, str):
            for key, needed in (("bpd", nll_needed), ("nelbo_bpd", nelbo_needed)):
                if needed:
                    skipped[key] = loader
            loader = None
        per_pass = (
            _bpd_batch_count(loader, plan.max_bpd_batches, plan.num_test_data, int(ev.batch_size)) if loader else 0
        )

        def bpd_pass_means(values: np.ndarray, passes: int) -> list:
            return [float(m) for m in values.reshape(passes, -1).mean(axis=1)] if values.size % passes == 0 else []

        if nll_needed and loader is not None:
            likelihood_fn = likelihood.get_likelihood_fn(
                sde,
                inverse_scaler,
                hutchinson_type=ev.get("hutchinson_type", "Rademacher"),
                rtol=float(ev.get("bpd_rtol", 1e-5)),
                atol=float(ev.get("bpd_atol", 1e-5)),
                eps=eps,
                truncation=plan.truncation,
                decoder=plan.decoder,
                lambda_=plan.lambda_,
            )

            def nll_batch(x, fn=likelihood_fn, net=model):
                bpd, _, nfe = fn(net, scaler(x.to(device)))
                return bpd.cpu(), {"nfe": nfe}

            batches = _bpd_batches(loader, config, plan.nll_passes, plan.max_bpd_batches, plan.num_test_data)
            with _progress(plan.nll_passes * per_pass, f"bits/dim ckpt {ckpt}") as bar:
                bpd = _chunked_metric(folder, "bpd", batches, nll_batch, bar)
            results["bpd"] = float(bpd.mean())
            results["bpd_num_images"] = int(bpd.size)
            results["bpd_pass_means"] = bpd_pass_means(bpd, plan.nll_passes)
        if nelbo_needed and loader is not None:
            nelbo_fn = likelihood.get_nelbo_fn(
                sde,
                inverse_scaler,
                eps=eps,
                truncation=plan.truncation,
                data_std=0.5 if config.data.centered else 0.25,
                decoder=plan.decoder,
            )
            batches = _bpd_batches(loader, config, plan.nelbo_passes, plan.max_bpd_batches, plan.num_test_data)
            with torch.no_grad(), _progress(plan.nelbo_passes * per_pass, f"NELBO ckpt {ckpt}") as bar:
                nelbo = _chunked_metric(
                    folder, "nelbo", batches, lambda x, fn=nelbo_fn, net=model: fn(net, scaler(x.to(device))).cpu(), bar
                )
            results["nelbo_bpd"] = float(nelbo.mean())
            results["nelbo_num_images"] = int(nelbo.size)
            results["nelbo_pass_means"] = bpd_pass_means(nelbo, plan.nelbo_passes)

        if plan.enable_sampling:
            sample_dir = os.path.join(folder, "samples")
            have_samples = _evaluate_samples(config, plan, model, sample_dir, folder, ckpt, sde, sampling_eps, skipped)
            if have_samples and plan.sample_more:
                results["num_samples"] = int(config.eval.num_samples)
            if have_samples and plan.enable_fid and "fid" not in results:
                reference = _reference_stats(config, evaluation, data, inception)
                net = inception.get() if not isinstance(reference, str) else reference
                if isinstance(reference, str) or isinstance(net, str):
                    skipped["fid"] = reference if isinstance(reference, str) else net
                else:
                    pending = _pending_feature_images(sample_dir, evaluation)
                    with _progress(pending, f"Inception features ckpt {ckpt}", unit="img") as bar:
                        metrics = evaluation.metrics_from_sample_dir(
                            sample_dir, reference, inception_model=_CountingModule(net, bar), device=device
                        )
                    results.update({k: v for k, v in metrics.items() if v is not None})

        if skipped:
            results["skipped"] = skipped
            for key, reason in skipped.items():
                logging.warning("ckpt %d: %s skipped: %s", ckpt, key, reason)
        _atomic_json(results_path, results)
        for key, value in results.items():
            if isinstance(value, float):
                writer.add_scalar(key, value, int(state["step"]))
        logging.info("%s", _summary(ckpt, results, skipped))
        all_results[ckpt] = results
    writer.close()
    return all_results


def _evaluate_samples(config, plan: EvalPlan, model, sample_dir: str, folder: str, ckpt: int, sde, eps, skipped):
    """Write eval.num_samples samples (unless sampling.sample_more is False); True if samples are on disk."""
    import evaluation

    ev = config.eval
    if not plan.sample_more:
        have = os.path.isdir(sample_dir) and bool(evaluation.list_sample_files(sample_dir))
        if not have:
            skipped["samples"] = f"sampling.sample_more=False and no samples_*.npz in {sample_dir}"
        return have
    batch = int(ev.batch_size)
    rounds = evaluation.num_sampling_rounds(int(ev.num_samples), batch)
    sampling_fn = get_sampling_fn_from_config(config, sde, eps, batch)
    with (
        torch.no_grad(),
        _progress(rounds, f"sampling ckpt {ckpt}", _done_rounds(sample_dir, rounds, evaluation)) as bar,
    ):
        evaluation.write_samples_in_batches(
            _sampling_with_progress(sampling_fn, bar),
            model,
            sample_dir,
            int(ev.num_samples),
            batch,
            seed=config.seed + 1000003 * ckpt,
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
    samples_{r}.png (grid) per batch of eval.batch_size; a killed run resumes at the first missing batch. A tqdm
    bar counts the batches (network evaluations as postfix).
    """
    import evaluation

    validate_config(config)
    device = get_device(config)
    sde, sampling_eps = get_corruption(config)
    state = build_state(config, device)
    ckpt = int(config.eval.get("sample_ckpt", 0)) or _latest_checkpoint(workdir)
    ckpt_path = _restore_for_eval(config, workdir, ckpt, state, sde)
    out_dir = os.path.join(workdir, eval_folder, f"samples_ckpt_{ckpt}_{config.sampling.method}")
    _setup_logging(out_dir)
    batch = int(config.eval.batch_size)
    num_samples = int(config.eval.num_samples)
    sampling_fn = get_sampling_fn_from_config(config, sde, sampling_eps, batch)
    nfes = []

    def save_grid(x, nfe):
        round_index = len(evaluation.list_sample_files(out_dir)) if os.path.isdir(out_dir) else 0
        evaluation.save_image_grid(
            x, os.path.join(out_dir, f"samples_{round_index}.png"), nrow=int(math.sqrt(len(x))) or 1
        )
        logging.info("Sampling round %d: %d network evaluations.", round_index, nfe)
        nfes.append(nfe)

    rounds = evaluation.num_sampling_rounds(num_samples, batch)
    logging.info(
        "Sampling %d images from %s (step %d) with %s.", num_samples, ckpt_path, state["step"], config.sampling.method
    )
    with torch.no_grad(), _progress(rounds, f"sampling ckpt {ckpt}", _done_rounds(out_dir, rounds, evaluation)) as bar:
        evaluation.write_samples_in_batches(
            _sampling_with_progress(sampling_fn, bar, save_grid),
            state["model"],
            out_dir,
            num_samples,
            batch,
            seed=config.seed,
        )
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
