"""FIR resampling (models/up_or_down_sampling.py) against an independent NumPy implementation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import up_or_down_sampling as uds


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1.3e-6, atol: float = 1e-5) -> None:
    """Elementwise |a - e| <= atol + rtol |e| (NumPy; avoids torch.testing's slow first import)."""
    np.testing.assert_allclose(actual.detach().cpu().numpy(), expected.detach().cpu().numpy(), rtol=rtol, atol=atol)


pytestmark = pytest.mark.usefixtures("single_thread")


def np_upfirdn2d(x: np.ndarray, k: np.ndarray, up: int, down: int, pad0: int, pad1: int) -> np.ndarray:
    """Reference: zero-insertion, pad/crop, explicit true 2-D convolution loop, subsampling."""
    n, c, h, w = x.shape
    u = np.zeros((n, c, h * up, w * up), dtype=np.float64)
    u[:, :, ::up, ::up] = x
    p0, p1 = max(pad0, 0), max(pad1, 0)
    u = np.pad(u, ((0, 0), (0, 0), (p0, p1), (p0, p1)))
    c0, c1 = max(-pad0, 0), max(-pad1, 0)
    u = u[:, :, c0 : u.shape[2] - c1, c0 : u.shape[3] - c1]
    kh, kw = k.shape
    kf = k[::-1, ::-1]
    out = np.zeros((n, c, u.shape[2] - kh + 1, u.shape[3] - kw + 1))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = np.sum(u[:, :, i : i + kh, j : j + kw] * kf, axis=(2, 3))
    return out[:, :, ::down, ::down]


def np_conv2d_same(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Reference cross-correlation (PyTorch conv2d semantics) with zero 'same' padding, odd kernel."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))
    out = np.zeros((n, o, h, wd))
    for i in range(h):
        for j in range(wd):
            out[:, :, i, j] = np.einsum("ncij,ocij->no", xp[:, :, i : i + kh, j : j + kw], w)
    return out


def np_fir_kernel(taps) -> np.ndarray:
    k = np.outer(np.asarray(taps, float), np.asarray(taps, float))
    return k / k.sum()


@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize(
    "up,down,pad",
    [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (0, 3)), (1, 1, (-1, 2)), (3, 1, (2, 2))],
)
def test_upfirdn2d_matches_numpy(channels, up, down, pad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, channels, 7, 7))
    k = rng.normal(size=(3, 2))  # asymmetric, non-square: catches a missing flip or swapped axes
    got = uds.upfirdn2d(torch.from_numpy(x), torch.from_numpy(k), up=up, down=down, pad=pad).numpy()
    want = np_upfirdn2d(x, k, up, down, *pad)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_upfirdn2d_float32_and_non_square():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 2, 6, 10)).astype(np.float32)
    k = np_fir_kernel([1, 3, 3, 1])
    got = uds.upfirdn2d(torch.from_numpy(x), k, up=2, down=1, pad=(2, 1))
    assert got.dtype == torch.float32
    want = np_upfirdn2d(x.astype(np.float64), k, 2, 1, 2, 1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("taps", [(1, 3, 3, 1), (1, 1), (1, 2, 1)])
def test_upsample_downsample_2d_match_numpy(taps):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 8, 8))
    k = np_fir_kernel(taps)
    p = k.shape[0] - 2
    up = uds.upsample_2d(torch.from_numpy(x), taps, factor=2).numpy()
    np.testing.assert_allclose(up, np_upfirdn2d(x, k * 4, 2, 1, (p + 1) // 2 + 1, p // 2), atol=1e-12)
    assert up.shape == (2, 3, 16, 16)
    down = uds.downsample_2d(torch.from_numpy(x), taps, factor=2).numpy()
    np.testing.assert_allclose(down, np_upfirdn2d(x, k, 1, 2, (p + 1) // 2, p // 2), atol=1e-12)
    assert down.shape == (2, 3, 4, 4)


def test_fir_resampling_preserves_constants_in_interior():
    x = torch.full((1, 2, 8, 8), 3.0, dtype=torch.float64)
    up = uds.upsample_2d(x, (1, 3, 3, 1))
    down = uds.downsample_2d(x, (1, 3, 3, 1))
    assert_close(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 3.0))
    assert_close(down[..., 1:-1, 1:-1], torch.full_like(down[..., 1:-1, 1:-1], 3.0))


def test_naive_resampling():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    up = uds.naive_upsample_2d(x)
    np.testing.assert_array_equal(up[0, 0].numpy(), np.kron(x[0, 0].numpy(), np.ones((2, 2))))
    down = uds.naive_downsample_2d(x)
    want = x[0, 0].numpy().reshape(2, 2, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(down[0, 0].numpy(), want)


def test_fused_conv_resampling_equals_composition_in_interior():
    """upsample_conv_2d = FIR-upsample then conv; conv_downsample_2d = conv then FIR-downsample (interior)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 3, 8, 8))
    w = rng.normal(size=(4, 3, 3, 3))
    k = np_fir_kernel([1, 3, 3, 1])
    got_up = uds.upsample_conv_2d(torch.from_numpy(x), torch.from_numpy(w), k=(1, 3, 3, 1)).numpy()
    want_up = np_conv2d_same(np_upfirdn2d(x, 4 * k, 2, 1, 2, 1), w)
    assert got_up.shape == (1, 4, 16, 16)
    np.testing.assert_allclose(got_up[..., 3:-3, 3:-3], want_up[..., 3:-3, 3:-3], atol=1e-10)
    got_down = uds.conv_downsample_2d(torch.from_numpy(x), torch.from_numpy(w), k=(1, 3, 3, 1)).numpy()
    want_down = np_upfirdn2d(np_conv2d_same(x, w), k, 1, 2, 1, 1)
    assert got_down.shape == (1, 4, 4, 4)
    np.testing.assert_allclose(got_down[..., 1:-1, 1:-1], want_down[..., 1:-1, 1:-1], atol=1e-10)


def test_conv2d_module_shapes_and_plain_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    conv = uds.Conv2d(3, 5, kernel=3)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert uds.Conv2d(3, 5, 3, up=True)(x).shape == (2, 5, 16, 16)
    assert uds.Conv2d(3, 5, 3, down=True)(x).shape == (2, 5, 4, 4)
    with pytest.raises(ValueError, match="odd"):
        uds.Conv2d(3, 5, kernel=2)
