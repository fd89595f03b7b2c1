"""Stable Target Field (Xu, Tong and Jaakkola, ICLR 2023) for any Gaussian corruption x_t = alpha x0 + std z.

The denoising score matching (DSM) target -z / std is one draw from the posterior over the sources of x_t.
STF replaces it by a self-normalised importance estimate over a reference batch {x^(1), ..., x^(n)} that
contains the sample's own source:

    w_i = softmax_i( -||x_t - alpha x^(i)||^2 / (2 std^2) ),   xbar_w = sum_i w_i x^(i),
    score target = -(x_t - alpha xbar_w) / std^2,   noise target = (x_t - alpha xbar_w) / std,
    x0 target = xbar_w.

With n = 1 (reference = own source) the noise target is exactly z, i.e. plain DSM. The target plugs into the
project's loss convention (losses.py): per-sample loss = (lambda / std^2) ||std * score + eps_target||^2 / 2,
so STF composes with every SDE (VP, subVP, VE, RVE), every weighting and every time sampler (uniform,
importance sampling, Soft Truncation); only eps_target changes.

Numerics: the weights are computed under torch.no_grad() from one matrix product, ||x_t - alpha x_i||^2 =
||x_t||^2 - 2 alpha x_t.x_i + alpha^2 ||x_i||^2, in float32 (also for half / bfloat16 inputs, with TF32 /
reduced-precision matmul switched off for that product) and a log-sum-exp softmax, so extreme distances
neither overflow nor produce NaN. Peak extra memory is O(B n + B D + n D): no B x n x D tensor is formed.

Reference batches (ReferenceBatchSampler): each step the loss uses reference = cat(minibatch sources,
extras), where the n - B extras are drawn uniformly (i.i.d., with replacement by default) from the training
set with the same random horizontal flip as the training data; when B >= n the reference batch is the
minibatch itself. Under data parallelism, gather_reference_batch concatenates the per-rank reference batches
(rank order) with all_gather, so every rank computes targets against the same world_size * n references;
gathered tensors carry no gradient (they are only used inside no_grad target computations).

Config fields (config.training; defaults in configs/default_*_configs.py):
- stf (bool, default False): use the STF noise target instead of the DSM target.
- stf_ref_batch_size (int, default 4096): n, the reference batch size per rank (own minibatch included).
  4096 is the official code's default, and the paper reports that larger reference batches help. The cost is
  small at 32x32: the weight computation is a [B, D] x [D, n] product (128 x 3072 x 4096, about 3 GFLOP,
  well under 1% of a DDPM++ training step) and the batch is 4096 x 3072 floats (50 MB). The released STF
  checkpoints used 1024 per GPU; use 1024 or less where reading n extra images per step is the bottleneck
  (slow data pipelines, CPU runs).
- stf_gather (bool, default False): gather the reference batch across data-parallel ranks (n * world_size
  references in all).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = [
    "stf_log_weights",
    "stf_weights",
    "stf_x0_target",
    "stf_noise_target",
    "stf_score_target",
    "ReferenceBatchSampler",
    "gather_reference_batch",
]


@contextlib.contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """Temporarily force IEEE float32 matmuls (no TF32 / bf16): the distance expansion cancels digits."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _per_sample(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Return value as a float32 tensor [B] (from a Python number, a 0-d tensor, [B] or [B, 1, ...])."""
    if value is None:
        raise ValueError(
            "STF needs a Gaussian corruption x_t = alpha(t) x0 + std(t) z with a per-sample alpha "
            "(sde.alpha); this corruption has none (e.g. the Soft Diffusion blur): set training.stf=False"
        )
    value = torch.as_tensor(value, device=device, dtype=torch.float32)
    if value.dim() == 0:
        return value.expand(batch)
    value = value.reshape(value.shape[0], -1)
    if value.shape[0] != batch or value.shape[1] != 1:
        raise ValueError(
            f"alpha / std must have one value per sample (shape [{batch}]), got shape {tuple(value.shape)}"
        )
    return value[:, 0]


def _flatten_inputs(
    x_t: torch.Tensor,
    alpha: torch.Tensor | float,
    std: torch.Tensor | float,
    reference: torch.Tensor,
    own_source: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check shapes; return float32 x [B, D], alpha [B], std [B], reference [n, D], own [B, D] or None."""
    batch = x_t.shape[0]
    if reference.dim() < 1 or reference.shape[1:] != x_t.shape[1:]:
        raise ValueError(
            f"reference batch must have shape [n, {', '.join(map(str, x_t.shape[1:]))}] like x_t, "
            f"got {tuple(reference.shape)}"
        )
    if reference.shape[0] == 0 and own_source is None:
        raise ValueError("the STF reference batch is empty: it must contain at least each sample's own source")
    x = x_t.detach().reshape(batch, -1).float()
    ref = reference.detach().to(x.device).reshape(reference.shape[0], x.shape[1]).float()
    own = None
    if own_source is not None:
        if own_source.shape != x_t.shape:
            raise ValueError(f"own_source must have the shape of x_t {tuple(x_t.shape)}, got {tuple(own_source.shape)}")
        own = own_source.detach().to(x.device).reshape(batch, -1).float()
    a = _per_sample(alpha, batch, x.device)
    s = _per_sample(std, batch, x.device)
    if not bool(torch.all(s > 0)):
        raise ValueError("std must be positive for the STF target (the corruption must add Gaussian noise)")
    return x, a, s, ref, own


def _log_weights_flat(
    x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, ref: torch.Tensor, own: torch.Tensor | None
) -> torch.Tensor:
    """Unnormalised log w_i = -||x_t - a x_i||^2 / (2 std^2) with ||x_t||^2 - 2a x_t.x_i + a^2 ||x_i||^2."""
    with _full_precision_matmul():
        dots = x @ ref.T  # [B, n]: the only product that involves the reference batch
    sq_x = (x * x).sum(dim=1, keepdim=True)  # [B, 1]
    sq_ref = (ref * ref).sum(dim=1)[None, :]  # [1, n]
    a_col = a[:, None]
    dist2 = (sq_x - 2.0 * a_col * dots + a_col.square() * sq_ref).clamp_min(0.0)
    if own is not None:
        own_dist2 = (x - a_col * own).square().sum(dim=1, keepdim=True)  # [B, 1], exact (no cancellation)
        dist2 = torch.cat([own_dist2, dist2], dim=1)
    return -dist2 / (2.0 * s.square()[:, None])


@torch.no_grad()
def stf_log_weights(
    x_t: torch.Tensor,
    alpha: torch.Tensor | float,
    std: torch.Tensor | float,
    reference: torch.Tensor,
    own_source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised log-weights log w_i = log softmax_i(-||x_t - alpha x^(i)||^2 / (2 std^2)), float32 [B, n].

    With own_source [B, ...] given, sample b's reference is (own_source[b], reference[0], ..., reference[n-1])
    and the result has n + 1 columns, the own source first.
    """
    x, a, s, ref, own = _flatten_inputs(x_t, alpha, std, reference, own_source)
    return torch.log_softmax(_log_weights_flat(x, a, s, ref, own), dim=1)


@torch.no_grad()
def stf_weights(
    x_t: torch.Tensor,
    alpha: torch.Tensor | float,
    std: torch.Tensor | float,
    reference: torch.Tensor,
    own_source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-normalised weights w_i = softmax_i(-||x_t - alpha x^(i)||^2 / (2 std^2)), float32 [B, n]."""
    x, a, s, ref, own = _flatten_inputs(x_t, alpha, std, reference, own_source)
    return torch.softmax(_log_weights_flat(x, a, s, ref, own), dim=1)


@torch.no_grad()
def _x0_target_flat(
    x_t: torch.Tensor,
    alpha: torch.Tensor | float,
    std: torch.Tensor | float,
    reference: torch.Tensor,
    own_source: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return float32 (x [B, D], alpha [B], std [B], xbar_w [B, D]) with xbar_w = sum_i w_i x^(i)."""
    x, a, s, ref, own = _flatten_inputs(x_t, alpha, std, reference, own_source)
    w = torch.softmax(_log_weights_flat(x, a, s, ref, own), dim=1)
    if own is None:
        xbar = w @ ref
    else:
        xbar = w[:, :1] * own + w[:, 1:] @ ref
    return x, a, s, xbar


@torch.no_grad()
def stf_x0_target(
    x_t: torch.Tensor,
    alpha: torch.Tensor | float,
    std: torch.Tensor | float,
    reference: torch.Tensor,
    own_source: torch.Tensor | None = None,
) -> torch.Tensor:
    """STF clean-data target xbar_w = sum_i w_i x^(i) (paper sec. 4), same shape and dtype as x_t."""
    _, _, _, xbar = _x0_target_flat(x_t, alpha, std, reference, own_source)
    return xbar.reshape(x_t.shape).to(x_t.dtype)


@torch.no_grad()
def stf_noise_target(
    x_t: torch.Tensor,
    alpha: torch.Tensor | float,
    std: torch.Tensor | float,
    reference: torch.Tensor,
    own_source: torch.Tensor | None = None,
) -> torch.Tensor:
    """STF noise target eps_target = (x_t - alpha xbar_w) / std (DSM's z when reference = own source).

    Args:
      x_t: perturbed samples [B, ...] (any float dtype; the computation runs in float32).
      alpha: mean coefficients alpha(t) [B] (or a number); 1 for VE / RVE.
      std: marginal standard deviations sigma(t) [B] (or a number), positive.
      reference: reference batch [n, ...] in the same space as x0 (scaled data), containing every sample's own
        source (the minibatch first, then the extras of ReferenceBatchSampler).
      own_source: optional [B, ...]: prepend each sample's own source to the shared reference instead (used by
        the variance analysis, where the reference extras are shared and the own sources are not in them).
    Returns:
      eps_target [B, ...] with the dtype of x_t, no gradient.
    """
    x, a, s, xbar = _x0_target_flat(x_t, alpha, std, reference, own_source)
    eps = (x - a[:, None] * xbar) / s[:, None]
    return eps.reshape(x_t.shape).to(x_t.dtype)


@torch.no_grad()
def stf_score_target(
    x_t: torch.Tensor,
    alpha: torch.Tensor | float,
    std: torch.Tensor | float,
    reference: torch.Tensor,
    own_source: torch.Tensor | None = None,
) -> torch.Tensor:
    """STF score target -(x_t - alpha xbar_w) / std^2 = -eps_target / std, same shape and dtype as x_t."""
    x, a, s, xbar = _x0_target_flat(x_t, alpha, std, reference, own_source)
    score = -(x - a[:, None] * xbar) / s.square()[:, None]
    return score.reshape(x_t.shape).to(x_t.dtype)


class ReferenceBatchSampler:
    """Supplies, each training step, the n - B extra reference images drawn uniformly from the training set.

    Args:
      data: the training data: a Dataset with `__len__` and `get_batch(indices, augment=True)` returning
        [m, C, H, W] in [0, 1] (datasets.get_train_dataset(config)); it is called with augment=True, so the
        extras get exactly the training loader's augmentation (its random flip and uniform dequantization),
        drawn from this sampler's generator when get_batch accepts `generator=`. Or a tensor [N, C, H, W]
        (uint8 in 0..255 or float in [0, 1]), in which case the random horizontal flip is done here.
      n: reference batch size (training.stf_ref_batch_size), the step's own minibatch included.
      random_flip: for tensor data, flip each extra horizontally with probability 1/2
        (config.data.random_flip); a Dataset applies its own training augmentation instead.
      scaler: applied to the extras after augmentation; pass datasets.get_data_scaler(config) so that the
        extras live in the same space as the (scaled) minibatch they are concatenated to.
      replacement: draw the extras i.i.d. with replacement (default, as in the paper's analysis; O(n) per
        step) or without replacement within a step (needs n - B <= len(data)).
      seed: seed of the sampler's own generator (use a different seed per data-parallel rank: seed + rank).
    """

    def __init__(
        self,
        data,
        n: int,
        random_flip: bool = True,
        scaler=None,
        replacement: bool = True,
        seed: int = 0,
    ) -> None:
        if int(n) != n or n < 1:
            raise ValueError(f"training.stf_ref_batch_size must be a positive integer, got {n!r}")
        if isinstance(data, torch.Tensor):
            if data.dim() < 2:
                raise ValueError(f"reference data tensor must have shape [N, C, H, W], got {tuple(data.shape)}")
        elif not (hasattr(data, "get_batch") and hasattr(data, "__len__")):
            raise TypeError(
                "ReferenceBatchSampler needs a tensor [N, C, H, W] or a Dataset with get_batch(indices, "
                f"augment) and __len__ (datasets.get_train_dataset(config)), got {type(data).__name__}"
            )
        if len(data) == 0:
            raise ValueError("the training set used for STF reference batches is empty")
        self.data = data
        self.n = int(n)
        self.random_flip = bool(random_flip)
        self.scaler = scaler
        self.replacement = bool(replacement)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))
        self._batch_takes_generator = not isinstance(data, torch.Tensor) and (
            "generator" in inspect.signature(data.get_batch).parameters
        )

    def __len__(self) -> int:
        return self.n

    def num_extra(self, batch_size: int) -> int:
        """Number of extra references for a minibatch of batch_size: max(n - B, 0)."""
        return max(self.n - int(batch_size), 0)

    def _indices(self, m: int) -> torch.Tensor:
        """m training-set indices, uniform (i.i.d. or distinct)."""
        size = len(self.data)
        if self.replacement:
            return torch.randint(0, size, (m,), generator=self.generator)
        if m > size:
            raise ValueError(
                f"cannot draw {m} distinct reference images from a training set of {size}: lower "
                "training.stf_ref_batch_size or use replacement=True"
            )
        return torch.randperm(size, generator=self.generator)[:m]

    def sample(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The step's extra references [max(n - B, 0), C, H, W], float32: augmented like the training data,
        in [0, 1] unless a scaler was given (then scaled), on device (default: the data's device)."""
        m = self.num_extra(batch_size)
        indices = self._indices(m)
        if isinstance(self.data, torch.Tensor):
            images = self.data[indices.to(self.data.device)]
            images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
            if self.random_flip and m > 0:
                flip = (torch.rand(m, generator=self.generator) < 0.5).to(images.device)
                images = torch.where(flip.view(-1, *([1] * (images.dim() - 1))), images.flip(-1), images)
        else:
            kwargs = {"generator": self.generator} if self._batch_takes_generator else {}
            images = torch.as_tensor(self.data.get_batch(indices, augment=True, **kwargs)).float()
        if device is not None:
            images = images.to(device)
        if self.scaler is not None:
            images = self.scaler(images)
        return images

    def reference_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """Reference batch cat(batch, extras) [max(n, B), ...]; batch: the step's (scaled) sources."""
        extra = self.sample(batch.shape[0], device=batch.device).to(batch.dtype)
        return torch.cat([batch.detach(), extra], dim=0)

    def state_dict(self) -> dict:
        """Generator state, for resuming a run with the same reference draws."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the generator state saved by state_dict()."""
        self.generator.set_state(state["generator"])


def gather_reference_batch(local_reference: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' reference batches in rank order (all_gather); identity without distributed.

    Every rank receives the same [world_size * n, ...] tensor. The result carries no gradient (all_gather is
    not differentiable): use it only for target computations under no_grad. All ranks must pass one shape.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_reference
    local = local_reference.detach().contiguous()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return torch.cat(gathered, dim=0)
