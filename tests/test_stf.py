"""Tests for stf.py: STF targets against closed forms / an independent NumPy float64 implementation,
numerics, memory (no B x n x D intermediate), the reference batch sampler, the distributed gather and the
STF configs."""

import importlib
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.special import logsumexp
from torch.utils._python_dispatch import TorchDispatchMode

import stf

# --- closed-form marginals of papers.md section 1 (independent of sde_lib) --------------------------------
B_MIN, B_MAX, S_MIN, S_MAX, RVE_S_MIN, RVE_EPS = 0.1, 20.0, 0.01, 50.0, 1e-3, 1e-5


def _big_b(t):
    return B_MIN * t + 0.5 * (B_MAX - B_MIN) * t**2


MARGINALS = {
    "vp": lambda t: (math.exp(-_big_b(t) / 2), math.sqrt(1 - math.exp(-_big_b(t)))),
    "subvp": lambda t: (math.exp(-_big_b(t) / 2), 1 - math.exp(-_big_b(t))),
    "ve": lambda t: (1.0, S_MIN * (S_MAX / S_MIN) ** t),
    "rve": lambda t: (1.0, S_MAX * (RVE_S_MIN / S_MAX) ** ((1 / t - 1) / (1 / RVE_EPS - 1))),
}


def numpy_empirical_score(x_t, alpha, std, data):
    """Exact score of (1/N) sum_i N(alpha x_i, std^2 I) at x_t, float64 NumPy (independent implementation)."""
    x_t = np.asarray(x_t, np.float64).reshape(len(x_t), -1)
    data = np.asarray(data, np.float64).reshape(len(data), -1)
    scores = []
    for b in range(len(x_t)):
        diff = x_t[b][None, :] - alpha[b] * data  # [N, D]
        log_w = -np.sum(diff**2, axis=1) / (2 * std[b] ** 2)
        w = np.exp(log_w - logsumexp(log_w))
        scores.append(-(w[:, None] * diff).sum(0) / std[b] ** 2)
    return np.stack(scores)


# --- targets ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", sorted(MARGINALS))
def test_single_reference_is_dsm(sde):
    """n = 1: reference = own source only, the STF noise target is exactly z."""
    gen = torch.Generator().manual_seed(0)
    ts = [1e-5, 1e-3, 0.1, 0.5, 1.0]
    for t in ts:
        alpha, std = MARGINALS[sde](t)
        x0 = torch.rand(1, 3, 8, 8, generator=gen) * 2 - 1
        z = torch.randn(1, 3, 8, 8, generator=gen)
        x_t = alpha * x0 + std * z
        eps = stf.stf_noise_target(x_t, torch.tensor([alpha]), torch.tensor([std]), x0)
        # a few float32 roundings (relative 6e-8 each) of |x_t| <= |alpha x0| + |std z|, divided by std
        tol = 3e-7 * (abs(alpha) * x0.abs().max() + std * z.abs().max()) / std + 1e-7
        torch.testing.assert_close(eps, z, rtol=0, atol=float(tol))
        assert torch.equal(stf.stf_weights(x_t, alpha, std, x0), torch.ones(1, 1))


@pytest.mark.parametrize("sde", sorted(MARGINALS))
def test_own_source_only_batch_is_dsm(sde):
    """Reference = the own sources, each far from the others: every sample's target is its own z (DSM)."""
    gen = torch.Generator().manual_seed(1)
    alpha, std = MARGINALS[sde](0.3)
    x0 = torch.rand(4, 2, 4, 4, generator=gen)
    x0 = x0 + 1e4 * torch.arange(4.0)[:, None, None, None] * alpha**-1  # sources far apart relative to std
    z = torch.randn(4, 2, 4, 4, generator=gen)
    x_t = alpha * x0 + std * z
    eps = stf.stf_noise_target(x_t, torch.full((4,), alpha), torch.full((4,), std), x0)
    torch.testing.assert_close(eps, z, rtol=0, atol=1e-2)


@pytest.mark.parametrize("sde", sorted(MARGINALS))
def test_whole_dataset_reference_gives_empirical_score(sde):
    """Reference = whole dataset: STF score target = exact score of the perturbed empirical distribution."""
    rng = np.random.default_rng(2)
    data = rng.uniform(-1, 1, size=(24, 3, 4, 4))
    t = np.array([1e-3, 0.05, 0.2, 0.4, 0.6, 1.0])
    alpha = np.array([MARGINALS[sde](ti)[0] for ti in t])
    std = np.array([MARGINALS[sde](ti)[1] for ti in t])
    src = rng.integers(0, len(data), size=len(t))
    x_t = alpha[:, None, None, None] * data[src] + std[:, None, None, None] * rng.standard_normal((len(t), 3, 4, 4))
    expected = numpy_empirical_score(x_t, alpha, std, data)
    got = stf.stf_score_target(
        torch.tensor(x_t, dtype=torch.float32),
        torch.tensor(alpha, dtype=torch.float32),
        torch.tensor(std, dtype=torch.float32),
        torch.tensor(data, dtype=torch.float32),
    )
    got = got.double().reshape(len(t), -1).numpy()
    scale = np.abs(expected).max(axis=1, keepdims=True)
    np.testing.assert_allclose(got / scale, expected / scale, atol=2e-3)
    # the noise and x0 targets are the same quantity in other units
    eps = stf.stf_noise_target(
        torch.tensor(x_t, dtype=torch.float32), torch.tensor(alpha), torch.tensor(std), torch.tensor(data)
    )
    np.testing.assert_allclose(
        eps.double().reshape(len(t), -1).numpy() / (scale * std[:, None]),
        -expected * std[:, None] / (scale * std[:, None]),
        atol=2e-3,
    )


def test_weights_and_x0_target_against_numpy():
    """Weights = posterior over the reference, xbar_w = posterior mean; own_source= prepends the source."""
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(10, 5))
    own = rng.normal(size=(3, 5))
    alpha, std = np.array([0.9, 0.5, 1.0]), np.array([0.3, 1.0, 3.0])
    x_t = alpha[:, None] * own + std[:, None] * rng.normal(size=(3, 5))
    full = np.concatenate([own[:, None, :], np.broadcast_to(ref, (3, 10, 5))], axis=1)  # per-sample refs [3, 11, 5]
    log_w = -((x_t[:, None, :] - alpha[:, None, None] * full) ** 2).sum(-1) / (2 * std[:, None] ** 2)
    w = np.exp(log_w - logsumexp(log_w, axis=1, keepdims=True))
    xbar = (w[:, :, None] * full).sum(1)
    f32 = {"dtype": torch.float32}
    args = (
        torch.tensor(x_t, **f32),
        torch.tensor(alpha, **f32),
        torch.tensor(std, **f32),
        torch.tensor(ref, **f32),
    )
    own_t = torch.tensor(own, **f32)
    np.testing.assert_allclose(stf.stf_weights(*args, own_source=own_t).numpy(), w, atol=1e-5)
    np.testing.assert_allclose(stf.stf_log_weights(*args, own_source=own_t).exp().numpy(), w, atol=1e-5)
    np.testing.assert_allclose(stf.stf_x0_target(*args, own_source=own_t).numpy(), xbar, atol=1e-5)
    # shared reference (no own_source): weights over the 10 references only
    log_w2 = log_w[:, 1:]
    w2 = np.exp(log_w2 - logsumexp(log_w2, axis=1, keepdims=True))
    np.testing.assert_allclose(stf.stf_weights(*args).numpy(), w2, atol=1e-5)
    np.testing.assert_allclose(stf.stf_x0_target(*args).numpy(), w2 @ ref, atol=1e-5)


def test_extreme_distances_do_not_overflow():
    """Huge distances / tiny std: log-sum-exp keeps weights finite, normalised and equal to closed forms."""
    x_t = torch.zeros(3, 4)
    # two references at squared distances d1 < d2: w1 = sigmoid((d2 - d1) / (2 std^2))
    ref = torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0]])
    std = torch.tensor([1e-3, 0.7, 1e3])
    w = stf.stf_weights(x_t, 1.0, std, ref)
    expected_w1 = 1 / (1 + np.exp(-(4.0 - 1.0) / (2 * std.double().numpy() ** 2)))
    np.testing.assert_allclose(w[:, 0].double().numpy(), expected_w1, rtol=1e-6)
    assert torch.isfinite(w).all()
    # far from everything (distance 1e6) with tiny std: the target points to the nearest reference, no NaN/Inf
    far = torch.full((2, 4), 1e6)
    ref2 = torch.stack([torch.full((4,), 9.9e5), torch.full((4,), 0.0)])
    eps = stf.stf_noise_target(far, 1.0, torch.tensor([1e-4, 1.0]), ref2)
    assert torch.isfinite(eps).all()
    torch.testing.assert_close(stf.stf_x0_target(far, 1.0, 1e-4, ref2), ref2[:1].expand(2, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    """Half / bfloat16 inputs: weights are float32-accurate (a half-precision computation is far off)."""
    gen = torch.Generator().manual_seed(4)
    # close-by sources on a common offset: ||x||^2 ~ 500 while the distances differ by a few units, so the
    # weights are spread out and a half-precision distance expansion is wrong by ~0.06 (fp16) / ~0.4 (bf16).
    base = torch.rand(1, 3, 16, 16, generator=gen) * 0.5 + 0.5
    data = (base + 0.05 * torch.randn(32, 3, 16, 16, generator=gen)).to(dtype)
    x_t = (data[:4] + torch.randn(4, 3, 16, 16, generator=gen)).to(dtype)
    alpha, std = torch.ones(4, dtype=dtype), torch.ones(4, dtype=dtype)
    xn, rn = x_t.double().reshape(4, -1).numpy(), data.double().reshape(32, -1).numpy()
    log_w = -((xn[:, None] - rn[None]) ** 2).sum(-1) / 2
    w_expected = np.exp(log_w - logsumexp(log_w, axis=1, keepdims=True))
    assert w_expected.max() < 0.5  # the regime where the weights matter
    w = stf.stf_weights(x_t, alpha, std, data)
    assert w.dtype == torch.float32
    np.testing.assert_allclose(w.double().numpy(), w_expected, atol=1e-4)
    eps = stf.stf_noise_target(x_t, alpha, std, data)
    assert eps.dtype == dtype
    eps_expected = xn - w_expected @ rn
    out_eps = 1e-3 if dtype == torch.float16 else 8e-3  # output rounding of the dtype
    np.testing.assert_allclose(eps.double().reshape(4, -1).numpy(), eps_expected, atol=2 * out_eps * 4)


def test_target_carries_no_gradient():
    """Targets are computed under no_grad even when the inputs require grad."""
    x_t = torch.randn(2, 3, requires_grad=True)
    ref = torch.randn(5, 3, requires_grad=True)
    for fn in (stf.stf_noise_target, stf.stf_score_target, stf.stf_x0_target, stf.stf_weights):
        assert not fn(x_t, torch.ones(2), torch.ones(2), ref).requires_grad


def test_bad_inputs_raise_clear_errors():
    x_t = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="reference batch must have shape"):
        stf.stf_noise_target(x_t, 1.0, 1.0, torch.randn(5, 3, 4, 5))
    with pytest.raises(ValueError, match="empty"):
        stf.stf_noise_target(x_t, 1.0, 1.0, torch.randn(0, 3, 4, 4))
    with pytest.raises(ValueError, match="one value per sample"):
        stf.stf_noise_target(x_t, torch.ones(3), 1.0, torch.randn(5, 3, 4, 4))
    with pytest.raises(ValueError, match="Gaussian corruption"):
        stf.stf_noise_target(x_t, None, 1.0, torch.randn(5, 3, 4, 4))
    with pytest.raises(ValueError, match="std must be positive"):
        stf.stf_noise_target(x_t, 1.0, torch.tensor([1.0, 0.0]), torch.randn(5, 3, 4, 4))


# --- memory: no B x n x D tensor --------------------------------------------------------------------------
class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any ATen op run inside the mode."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
        return out


def test_memory_no_batch_by_reference_by_dim_tensor():
    """B = 16, n = 4096, 3x32x32: every intermediate is at most n x D (the reference), never B x n x D."""
    gen = torch.Generator().manual_seed(5)
    batch, n, shape = 16, 4096, (3, 32, 32)
    dim = math.prod(shape)
    ref = torch.rand(n, *shape, generator=gen)
    x_t = ref[:batch] + 0.3 * torch.randn(batch, *shape, generator=gen)
    guard = _MaxNumel()
    with guard:
        eps = stf.stf_noise_target(x_t, torch.ones(batch), torch.full((batch,), 0.3), ref)
    assert eps.shape == (batch, *shape)
    assert guard.max_numel <= n * dim  # views of the reference count as n x D
    assert guard.max_numel < batch * n * dim // 8
    # the guard does see a naive broadcast (so the assertion above can fail)
    naive = _MaxNumel()
    with naive:
        (x_t[:2].reshape(2, 1, -1) - ref[:64].reshape(1, 64, -1)).square().sum(-1)
    assert naive.max_numel == 2 * 64 * dim


# --- reference batch sampler ------------------------------------------------------------------------------
def _asymmetric_images(num, size=4):
    """Images whose flip differs from the image and from every other image: value = 10 * i + column."""
    cols = torch.arange(size, dtype=torch.float32)
    base = 10.0 * torch.arange(num, dtype=torch.float32)[:, None, None, None] + cols
    return (base.expand(num, 2, size, size) / (10.0 * num)).contiguous()


def _decode(images, num, size=4):
    """Return (dataset index, flipped) of each image built by _asymmetric_images."""
    v = images[:, 0, 0, :] * 10.0 * num
    idx = torch.round(v.min(dim=1).values / 10.0).long()
    flipped = v[:, 0] > v[:, -1]
    return idx, flipped


def test_sampler_draws_uniform_indices_and_flips_half():
    """Extras are dataset images, indices uniform (chi-square), flip rate 1/2 (binomial, 5 sigma)."""
    num = 8
    data = _asymmetric_images(num)
    sampler = stf.ReferenceBatchSampler(data, n=1000, random_flip=True, seed=0)
    counts, flips, total = torch.zeros(num), 0, 0
    for _ in range(20):
        extra = sampler.sample(batch_size=200)
        assert extra.shape == (800, 2, 4, 4)
        idx, flipped = _decode(extra, num)
        recon = data[idx]
        recon = torch.where(flipped[:, None, None, None], recon.flip(-1), recon)
        torch.testing.assert_close(extra, recon)
        counts += torch.bincount(idx, minlength=num).float()
        flips += int(flipped.sum())
        total += len(idx)
    expected = total / num
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3  # chi-square, 7 dof, p = 0.001
    assert abs(flips - total / 2) < 5 * math.sqrt(total / 4)


def test_sampler_no_flip_uint8_scaler_and_batch_layout():
    num = 5
    data = (_asymmetric_images(num) * 255).round().to(torch.uint8)
    sampler = stf.ReferenceBatchSampler(data, n=12, random_flip=False, scaler=lambda x: 2 * x - 1, seed=1)
    batch = torch.full((4, 2, 4, 4), 7.0)
    ref = sampler.reference_batch(batch)
    assert ref.shape == (12, 2, 4, 4)
    assert torch.equal(ref[:4], batch)  # own sources first
    extra01 = (ref[4:] + 1) / 2
    v = extra01[:, 0, 0, :] * 255
    assert torch.all(v[:, 0] < v[:, -1])  # never flipped
    assert extra01.min() >= 0 and extra01.max() <= 1
    # B >= n: the reference batch is the minibatch
    big = torch.randn(16, 2, 4, 4)
    assert torch.equal(sampler.reference_batch(big), big)
    assert sampler.num_extra(16) == 0 and sampler.num_extra(4) == 8


def test_sampler_without_replacement_and_state():
    data = _asymmetric_images(6)
    sampler = stf.ReferenceBatchSampler(data, n=7, random_flip=False, replacement=False, seed=3)
    idx, _ = _decode(sampler.sample(1), 6)
    assert sorted(idx.tolist()) == list(range(6))
    with pytest.raises(ValueError, match="distinct"):
        sampler.sample(0)
    state = sampler.state_dict()
    a = sampler.sample(3)
    sampler.load_state_dict(state)
    assert torch.equal(sampler.sample(3), a)


EXACT = "donot_use_mm_for_euclid_dist"


class _FakeTrainSet:
    """A random-access training set with datasets.py's get_batch(indices, augment) interface."""

    def __init__(self):
        self.calls = []

    def __len__(self):
        return 50

    def get_batch(self, indices, augment=True, generator=None):
        self.calls.append((indices.clone(), augment, generator))
        return indices.float()[:, None, None, None].expand(len(indices), 1, 2, 2) / 50


def test_sampler_uses_dataset_get_batch():
    ds = _FakeTrainSet()
    sampler = stf.ReferenceBatchSampler(ds, n=10, random_flip=True, seed=0)
    extra = sampler.sample(3)
    ((indices, augment, generator),) = ds.calls
    assert augment is True and len(indices) == 7
    assert generator is sampler.generator  # flips drawn from the sampler's (seeded, resumable) generator
    assert indices.min() >= 0 and indices.max() < 50
    torch.testing.assert_close(extra[:, 0, 0, 0], indices.float() / 50)


def test_sampler_with_datasets_train_set():
    """With datasets.py's SHAPES training set: each extra is a training image, maybe flipped; flips ~ 1/2."""
    import datasets
    from configs import demo

    config = demo.get_config()
    config.data.num_train, config.data.num_eval = 128, 16
    train_set = datasets.get_train_dataset(config)
    images = train_set.get_batch(torch.arange(len(train_set)), augment=False).reshape(len(train_set), -1)
    flipped = train_set.get_batch(torch.arange(len(train_set)), augment=False).flip(-1).reshape(len(train_set), -1)
    sampler = stf.ReferenceBatchSampler(train_set, n=264, seed=0, scaler=datasets.get_data_scaler(config))
    extra = sampler.sample(64)
    assert extra.shape == (200, 3, 16, 16) and extra.min() >= -1 and extra.max() <= 1  # centered scaler
    extra01 = ((extra + 1) / 2).reshape(200, -1)
    d_plain = torch.cdist(extra01, images, compute_mode=EXACT).min(dim=1).values
    d_flip = torch.cdist(extra01, flipped, compute_mode=EXACT).min(dim=1).values
    assert torch.all(torch.minimum(d_plain, d_flip) < 1e-4)
    is_flipped = (d_flip < 1e-4) & (d_plain > 1e-4)  # asymmetric images seen only flipped
    is_plain = (d_plain < 1e-4) & (d_flip > 1e-4)
    num = int(is_flipped.sum() + is_plain.sum())
    assert num > 100 and abs(int(is_flipped.sum()) - num / 2) < 5 * math.sqrt(num / 4)


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="stf_ref_batch_size"):
        stf.ReferenceBatchSampler(torch.rand(4, 1, 2, 2), n=0)
    with pytest.raises(TypeError, match="get_batch"):
        stf.ReferenceBatchSampler([1, 2, 3], n=4)
    with pytest.raises(ValueError, match="empty"):
        stf.ReferenceBatchSampler(torch.rand(0, 1, 2, 2), n=4)


# --- data-parallel gather ---------------------------------------------------------------------------------
def test_gather_without_distributed_is_identity():
    x = torch.randn(3, 2)
    assert stf.gather_reference_batch(x) is x


def _gather_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        local = torch.full((3, 2), float(rank)) + torch.arange(3.0)[:, None] / 10
        local.requires_grad_(True)
        gathered = stf.gather_reference_batch(local)
        torch.save(
            {"gathered": gathered, "requires_grad": gathered.requires_grad},
            os.path.join(out_dir, f"{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_gather_two_process_gloo(tmp_path):
    """2 gloo ranks: both receive the same rank-ordered concatenation, without gradient."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    expected = torch.cat([torch.full((3, 2), float(r)) + torch.arange(3.0)[:, None] / 10 for r in range(2)])
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert torch.equal(result["gathered"], expected)
        assert result["requires_grad"] is False


# --- configs ----------------------------------------------------------------------------------------------
STF_CONFIGS = {
    "configs.ve.CIFAR10.ncsnpp_stf": "configs.ve.cifar10_ncsnpp_continuous",
    "configs.vp.CIFAR10.ddpmpp_stf": "configs.vp.cifar10_ddpmpp_continuous",
    "configs.vp.CIFAR10.ddpmpp_nll_st_stf": "configs.vp.CIFAR10.ddpmpp_nll_st",
    "configs.ve.CIFAR10.uncsnpp_st_stf": "configs.ve.CIFAR10.uncsnpp_st_rve",
    "configs.demo_stf": "configs.demo",
}


@pytest.mark.parametrize("name", sorted(STF_CONFIGS))
def test_stf_configs_only_switch_on_stf(name):
    """Each STF config is its base config with training.stf on (and the documented reference batch size)."""
    config = importlib.import_module(name).get_config()
    base = importlib.import_module(STF_CONFIGS[name]).get_config()
    assert config.training.stf is True and base.training.stf is False
    assert config.training.stf_gather is False
    n = config.training.stf_ref_batch_size
    assert isinstance(n, int) and n >= config.training.batch_size
    for section in ("training", "sampling", "eval", "data", "model", "optim"):
        got, want = config[section].to_dict(), base[section].to_dict()
        if section == "training":
            for key in ("stf", "stf_ref_batch_size"):
                got.pop(key), want.pop(key)
        assert got == want, section
