"""Training, evaluation and sampling loops (score_sde's run_lib, on PyTorch only).

Work directory layout (score_sde's):
  WORKDIR/checkpoints/checkpoint_N.pth     snapshot N (every training.snapshot_freq steps and at the end)
  WORKDIR/checkpoints-meta/checkpoint.pth  latest state for automatic resume (every snapshot_freq_for_preemption)
  WORKDIR/samples/iter_STEP/sample.png     sample grids (training.snapshot_sampling)
  WORKDIR/tensorboard/                     scalars
  WORKDIR/train.log                        the log
"""

import logging
import math
import os
import random
import time
from collections.abc import Iterator

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
    train_set = datasets.get_train_dataset(config)
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
    _, eval_ds, _ = datasets.get_dataset(
        config, uniform_dequantization=config.data.get("uniform_dequantization", False), evaluation=False
    )
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
    dequantize = bool(config.data.get("uniform_dequantization", False))
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
        if is_main and (step % training.snapshot_freq == 0 or step == num_train_steps):
            save_step = step // training.snapshot_freq  # score_sde's numbering
            save_checkpoint(os.path.join(checkpoint_dir, f"checkpoint_{save_step}.pth"), state)
            if training.snapshot_sampling:
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


def _restore_for_eval(config, workdir: str, ckpt: int, state: dict, sde) -> str:
    """Load checkpoint_{ckpt}.pth (EMA weights copied into the model); returns its path."""
    ckpt_path = os.path.join(workdir, "checkpoints", f"checkpoint_{ckpt}.pth")
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


def _chunked_metric(folder: str, name: str, batches, compute) -> np.ndarray:
    """Per-batch values of a metric, each batch's result saved atomically (a killed evaluation resumes)."""
    os.makedirs(folder, exist_ok=True)
    values = []
    for i, batch in enumerate(batches):
        path = os.path.join(folder, f"{name}_{i}.npy")
        if os.path.exists(path):
            try:
                values.append(np.load(path))
                continue
            except ValueError:
                logging.warning("Unreadable %s: computing it again.", path)
        value = np.asarray(compute(batch), dtype=np.float64).reshape(-1)
        tmp = path + ".tmp.npy"
        np.save(tmp, value)
        os.replace(tmp, path)
        values.append(value)
    return np.concatenate(values) if values else np.zeros(0)


def _bpd_batches(config, repeats: int, max_batches: int):
    """(repeat, batch) pairs of the bits/dim dataset, uniformly dequantized afresh for each repeat."""
    split = config.eval.get("bpd_dataset", "test")
    if split not in ("train", "test"):
        raise ValueError(f"eval.bpd_dataset={split!r} must be 'train' or 'test'.")
    train_ds, eval_ds, _ = datasets.get_dataset(config, uniform_dequantization=True, evaluation=True)
    loader = train_ds if split == "train" else eval_ds
    for repeat in range(repeats):
        torch.manual_seed(config.seed + 7 * repeat)
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            yield batch["image"]


def evaluate(config, workdir: str, eval_folder: str = "eval") -> dict:
    """Evaluate checkpoints eval.begin_ckpt .. eval.end_ckpt: loss, bits/dim, NELBO, samples, FID / IS / KID.

    Results go to WORKDIR/EVAL_FOLDER/ckpt_N/results.json (and tensorboard); every finished piece (a bits/dim
    batch, a sample batch, its Inception features) is on disk before the next starts, so a killed evaluation
    resumes without redoing finished work.
    """
    import evaluation
    import likelihood

    validate_config(config)
    eval_dir = os.path.join(workdir, eval_folder)
    _setup_logging(eval_dir)
    device = get_device(config)
    torch.manual_seed(config.seed)
    sde, sampling_eps = get_corruption(config)
    state = build_state(config, device)
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    ev = config.eval
    eps = float(config.training.get("truncation_time", 1e-5))
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(eval_dir, "tensorboard"))
    all_results = {}
    for ckpt in range(int(ev.begin_ckpt), int(ev.end_ckpt) + 1):
        ckpt_path = _restore_for_eval(config, workdir, ckpt, state, sde)
        model = state["model"]
        folder = os.path.join(eval_dir, f"ckpt_{ckpt}")
        os.makedirs(folder, exist_ok=True)
        results_path = os.path.join(folder, "results.json")
        results = _load_json(results_path)
        results.update(checkpoint=ckpt_path, step=int(state["step"]))
        logging.info("Evaluating %s (step %d).", ckpt_path, state["step"])

        if ev.get("enable_loss", True) and "eval_loss" not in results:
            eval_step = losses.get_step_fn_from_config(config, sde, train=False)
            _, eval_ds, _ = datasets.get_dataset(
                config,
                uniform_dequantization=bool(config.data.get("uniform_dequantization", False)),
                evaluation=True,
            )
            with torch.no_grad():
                values = [float(eval_step(state, scaler(b["image"].to(device)))) for b in eval_ds]
            results["eval_loss"] = float(np.mean(values))

        max_batches = int(ev.get("max_bpd_batches", 0))
        repeats = int(ev.get("bpd_num_repeats", 5))
        if ev.get("enable_bpd", False) and "bpd" not in results:
            likelihood_fn = likelihood.get_likelihood_fn(
                sde,
                inverse_scaler,
                hutchinson_type=ev.get("hutchinson_type", "Rademacher"),
                rtol=float(ev.get("bpd_rtol", 1e-5)),
                atol=float(ev.get("bpd_atol", 1e-5)),
                eps=eps,
                truncation="exact" if ev.get("residual", True) else "plain",
            )
            bpd = _chunked_metric(
                folder,
                "bpd",
                _bpd_batches(config, repeats, max_batches),
                lambda x, fn=likelihood_fn, net=model: fn(net, scaler(x.to(device)))[0].cpu(),
            )
            results["bpd"] = float(bpd.mean())
            results["bpd_num_images"] = int(bpd.size)
        if ev.get("enable_nelbo", False) and "nelbo_bpd" not in results:
            nelbo_fn = likelihood.get_nelbo_fn(
                sde, inverse_scaler, eps=eps, data_std=0.5 if config.data.centered else 0.25
            )
            with torch.no_grad():
                nelbo = _chunked_metric(
                    folder,
                    "nelbo",
                    _bpd_batches(config, repeats, max_batches),
                    lambda x, fn=nelbo_fn, net=model: fn(net, scaler(x.to(device))).cpu(),
                )
            results["nelbo_bpd"] = float(nelbo.mean())

        if ev.get("enable_sampling", False):
            sample_dir = os.path.join(folder, "samples")
            batch = int(ev.batch_size)
            sampling_fn = get_sampling_fn_from_config(config, sde, sampling_eps, batch)
            with torch.no_grad():
                evaluation.write_samples_in_batches(
                    sampling_fn,
                    model,
                    sample_dir,
                    int(ev.num_samples),
                    batch,
                    seed=config.seed + 1000003 * ckpt,
                    grid_path=os.path.join(folder, "sample_grid.png"),
                )
            results["num_samples"] = int(ev.num_samples)
            if ev.get("enable_fid", True) and "fid" not in results:
                reference = _reference_stats(config, evaluation)
                metrics = evaluation.metrics_from_sample_dir(
                    sample_dir, reference, inception_path=ev.get("inception_path", "") or None, device=device
                )
                results.update({k: v for k, v in metrics.items() if v is not None})

        _atomic_json(results_path, results)
        for key, value in results.items():
            if isinstance(value, float):
                writer.add_scalar(key, value, int(state["step"]))
        logging.info("ckpt %d: %s", ckpt, {k: v for k, v in results.items() if isinstance(v, (int, float))})
        all_results[ckpt] = results
    writer.close()
    return all_results


def _reference_stats(config, evaluation):
    """Training-set Inception statistics: eval.stats_path, else assets/stats/<dataset>_<size>_stats.npz or
    score_sde's assets/stats/<dataset>_stats.npz; when none exists, computed from the training set and saved
    to the first of these paths."""
    path = evaluation.find_dataset_stats(config)
    if path is not None:
        return evaluation.load_reference_stats(path)
    path = evaluation.dataset_stats_candidates(config)[0]
    logging.info("Computing reference statistics of the training set into %s.", path)
    inception = evaluation.get_inception_model(
        weights_path=config.eval.get("inception_path", "") or None, device=get_device(config)
    )
    train_ds, _, _ = datasets.get_dataset(config, evaluation=True)
    return evaluation.compute_reference_stats(train_ds, inception, out_path=path)


def _latest_checkpoint(workdir: str) -> int:
    import re

    folder = os.path.join(workdir, "checkpoints")
    found = (
        [int(m.group(1)) for n in os.listdir(folder) if (m := re.match(r"checkpoint_(\d+)\.pth$", n))]
        if (os.path.isdir(folder))
        else []
    )
    if not found:
        raise FileNotFoundError(f"No checkpoint_N.pth in {folder}: train first (python main.py --mode train).")
    return max(found)


def sample(config, workdir: str, eval_folder: str = "eval") -> str:
    """Write eval.num_samples samples of checkpoint eval.end_ckpt (or the latest) with config.sampling.method.

    Output: WORKDIR/EVAL_FOLDER/samples_ckpt_N_METHOD/samples_{r}.npz (uint8 NHWC) and samples_{r}.png (grid)
    per batch of eval.batch_size; a killed run resumes at the first missing batch.
    """
    import evaluation

    validate_config(config)
    device = get_device(config)
    sde, sampling_eps = get_corruption(config)
    state = build_state(config, device)
    ckpt = int(config.eval.get("sample_ckpt", 0)) or _latest_checkpoint(workdir)
    _restore_for_eval(config, workdir, ckpt, state, sde)
    out_dir = os.path.join(workdir, eval_folder, f"samples_ckpt_{ckpt}_{config.sampling.method}")
    _setup_logging(out_dir)
    batch = int(config.eval.batch_size)
    sampling_fn = get_sampling_fn_from_config(config, sde, sampling_eps, batch)

    def sampling_with_grid(model):
        x, nfe = sampling_fn(model)
        round_index = len(evaluation.list_sample_files(out_dir)) if os.path.isdir(out_dir) else 0
        evaluation.save_image_grid(
            x, os.path.join(out_dir, f"samples_{round_index}.png"), nrow=int(math.sqrt(len(x))) or 1
        )
        logging.info("Sampling round %d: %d network evaluations.", round_index, nfe)
        return x, nfe

    with torch.no_grad():
        evaluation.write_samples_in_batches(
            sampling_with_grid, state["model"], out_dir, int(config.eval.num_samples), batch, seed=config.seed
        )
    logging.info("Samples written to %s.", out_dir)
    return out_dir
