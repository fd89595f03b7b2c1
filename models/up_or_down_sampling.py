"""FIR up/down-sampling of image batches (StyleGAN2's upfirdn2d), in plain PyTorch.

score_sde_pytorch calls a compiled CUDA op here; this module computes the same thing with pad + grouped
conv2d, so it runs on any device, dtype and channel count. Conventions (StyleGAN2 / score_sde):
- upfirdn2d(x, k, up, down, pad): insert up-1 zeros after every pixel, pad (negative pads crop) by pad[0]
  before and pad[1] after in both spatial axes, convolve (true convolution, i.e. flipped kernel) with k,
  keep every down-th pixel.
- FIR kernels given as 1-D taps are made separable (outer product) and normalised to sum 1 (`setup_kernel`).
"""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

KernelLike = Sequence[float] | np.ndarray | torch.Tensor


def setup_kernel(k: KernelLike) -> np.ndarray:
    """2-D FIR kernel k2 = outer(k, k) / sum (or k / sum(k) if already 2-D), float32."""
    k = np.asarray(k, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {k.shape}")
    return k / np.sum(k)


_setup_kernel = setup_kernel  # score_sde's private name


_KERNEL_CACHE: dict[tuple, torch.Tensor] = {}


def fir_kernel(k: KernelLike, scale: float, like: torch.Tensor) -> torch.Tensor:
    """setup_kernel(k) * scale as a tensor on the device and dtype of `like`, built with torch operations only, so
    that torch.compile traces it into the graph as a constant (a NumPy kernel broke the graph at every FIR layer);
    outside compilation the tensor is cached per (taps, scale, device, dtype)."""
    compiling = torch.compiler.is_compiling()
    if isinstance(k, torch.Tensor):
        taps = k.detach().to(device="cpu", dtype=torch.float64)
    elif compiling:
        taps = torch.tensor(k, dtype=torch.float64)
    else:
        arr = np.asarray(k, dtype=np.float64)
        key = (arr.tobytes(), arr.shape, float(scale), like.device, like.dtype)
        cached = _KERNEL_CACHE.get(key)
        if cached is None:
            cached = fir_kernel(torch.from_numpy(arr), scale, like)
            if len(_KERNEL_CACHE) < 256:
                _KERNEL_CACHE[key] = cached
        return cached
    if taps.ndim == 1:
        taps = torch.outer(taps, taps)
    if taps.ndim != 2 or taps.shape[0] != taps.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {tuple(taps.shape)}")
    return (taps / taps.sum() * scale).to(device=like.device, dtype=like.dtype)


def _kernel_tensor(k: KernelLike, like: torch.Tensor) -> torch.Tensor:
    """A 2-D kernel (used as given, not normalised) as a tensor on the device / dtype of `like`."""
    if isinstance(k, torch.Tensor):
        kt = k.to(device=like.device, dtype=like.dtype)
    else:
        arr = np.asarray(k)
        arr = arr if arr.dtype == np.float64 else arr.astype(np.float32)
        kt = torch.as_tensor(arr, device=like.device).to(like.dtype)
    if kt.ndim != 2:
        raise ValueError(f"upfirdn2d needs a 2-D kernel, got shape {tuple(kt.shape)}")
    return kt


def upfirdn2d(
    x: torch.Tensor, kernel: KernelLike, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """y = downsample_down(conv_true(pad(zero_upsample_up(x)), kernel)) per channel; x is [N, C, H, W]."""
    n, c, h, w = x.shape
    k = _kernel_tensor(kernel, x)
    kh, kw = k.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(n, c, h * up, w * up)
    p0, p1 = int(pad[0]), int(pad[1])
    x = F.pad(x, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
    c0, c1 = max(-p0, 0), max(-p1, 0)
    if c0 or c1:
        x = x[:, :, c0 : x.shape[2] - c1, c0 : x.shape[3] - c1]
    weight = torch.flip(k, [0, 1]).reshape(1, 1, kh, kw).expand(c, 1, kh, kw)
    return F.conv2d(x, weight, stride=down, groups=c)


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour upsampling: every pixel repeated factor x factor times."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h, 1, w, 1).expand(n, c, h, factor, w, factor)
    return x.reshape(n, c, h * factor, w * factor)


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average pooling over non-overlapping factor x factor blocks."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))


def upsample_2d(x: torch.Tensor, k: KernelLike | None = None, factor: int = 2, gain: float = 1) -> torch.Tensor:
    """FIR upsampling (StyleGAN2): upfirdn2d with kernel k * gain * factor^2, output [N, C, H*f, W*f]."""
    if k is None:
        k = [1] * factor
    k2 = fir_kernel(k, gain * factor**2, x)
    p = k2.shape[0] - factor
    return upfirdn2d(x, k2, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, k: KernelLike | None = None, factor: int = 2, gain: float = 1) -> torch.Tensor:
    """FIR downsampling (StyleGAN2): upfirdn2d with kernel k * gain, output [N, C, H/f, W/f]."""
    if k is None:
        k = [1] * factor
    k2 = fir_kernel(k, gain, x)
    p = k2.shape[0] - factor
    return upfirdn2d(x, k2, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(
    x: torch.Tensor, w: torch.Tensor, k: KernelLike | None = None, factor: int = 2, gain: float = 1
) -> torch.Tensor:
    """Fused FIR upsample + conv2d(w) (StyleGAN2): transposed conv of stride `factor`, then the FIR filter.

    w is [outC, inC, kh, kw] (odd, square). score_sde's port flips w with a negative-stride slice, which
    PyTorch rejects; the flip is done with torch.flip here (same intended result).
    """
    out_c, in_c, conv_h, conv_w = w.shape
    if conv_h != conv_w:
        raise ValueError(f"upsample_conv_2d needs a square kernel, got {conv_h}x{conv_w}")
    if x.shape[1] != in_c:
        raise ValueError(f"upsample_conv_2d: input has {x.shape[1]} channels, weight expects {in_c}")
    if k is None:
        k = [1] * factor
    k2 = fir_kernel(k, gain * factor**2, x)
    p = (k2.shape[0] - factor) - (conv_w - 1)
    w_t = torch.flip(w, [2, 3]).transpose(0, 1)  # [inC, outC, kh, kw]
    x = F.conv_transpose2d(x, w_t, stride=factor)
    return upfirdn2d(x, k2, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(
    x: torch.Tensor, w: torch.Tensor, k: KernelLike | None = None, factor: int = 2, gain: float = 1
) -> torch.Tensor:
    """Fused FIR filter + strided conv2d(w) (StyleGAN2): output [N, outC, H/f, W/f]."""
    conv_w = w.shape[-1]
    if k is None:
        k = [1] * factor
    k2 = fir_kernel(k, gain, x)
    p = (k2.shape[0] - factor) + (conv_w - 1)
    x = upfirdn2d(x, k2, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, w, stride=factor)


class Conv2d(nn.Module):
    """Conv2d with optional fused FIR upsampling or downsampling (StyleGAN2); parameters `weight`, `bias`."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        up: bool = False,
        down: bool = False,
        resample_kernel: KernelLike = (1, 3, 3, 1),
        use_bias: bool = True,
        kernel_init=None,
    ):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be set")
        if kernel < 1 or kernel % 2 != 1:
            raise ValueError(f"Conv2d: kernel size must be odd and >= 1, got {kernel}")
        self.weight = nn.Parameter(torch.zeros(out_ch, in_ch, kernel, kernel))
        if kernel_init is not None:
            with torch.no_grad():
                self.weight.copy_(kernel_init(self.weight.shape, dtype=self.weight.dtype, device=self.weight.device))
        if use_bias:
            self.bias = nn.Parameter(torch.zeros(out_ch))
        self.up = up
        self.down = down
        self.resample_kernel = tuple(resample_kernel)
        self.kernel = kernel
        self.use_bias = use_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = upsample_conv_2d(x, self.weight, k=self.resample_kernel)
        elif self.down:
            x = conv_downsample_2d(x, self.weight, k=self.resample_kernel)
        else:
            x = F.conv2d(x, self.weight, stride=1, padding=self.kernel // 2)
        if self.use_bias:
            x = x + self.bias.reshape(1, -1, 1, 1)
        return x
