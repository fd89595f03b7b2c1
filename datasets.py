"""Training and evaluation data as torch DataLoaders, with score_sde's API (no TensorFlow).

    train_ds, eval_ds, _ = get_dataset(config, uniform_dequantization=False, evaluation=False)
    batch = next(iter(train_ds))  # {'image': float32 [B, C, H, W] in [0, 1], 'label': int64 [B]}

Both loaders yield dicts {'image', 'label'}; get_data_scaler(config) maps [0, 1] to the model's range.
Images are kept as uint8 (in memory, memory-mapped, or decoded from their files on demand) and converted
to float32 once per batch, which is also where the random horizontal flip (training loader only, when
config.data.random_flip) and the uniform dequantization x = (k + u) / 256, u ~ U[0, 1), happen; without
dequantization x = k / 255. Images without a class label (CELEBA, CelebAHQ, FFHQ, LSUN, IMAGE_FOLDER,
unlabeled STL10) get label -1.

Loaders (score_sde's get_dataset; training itself reads get_train_dataset through run_lib.TrainStream,
which shards it across ranks). The training loader reshuffles every epoch (its torch.Generator is seeded
with config.seed, so the order is reproducible) and drops the last incomplete batch. The evaluation loader
neither shuffles nor drops (every evaluation image once, in a fixed order). Batch size:
config.training.batch_size, or config.eval.batch_size for both loaders when evaluation=True (as score_sde).
config.data.num_workers (default 0) worker processes; pin_memory when
config.device is a CUDA device. get_train_dataset(config) returns the random-access training set (an
ImageDataset: len(), get_batch(indices, augment=True) -> float32 [n, C, H, W] in [0, 1]), the same kind
of object as `train_ds.dataset`.

Where the files are. The dataset directory is config.data.root when it is set and non-empty; otherwise
$SCORE_SDE_DATA/<config.data.dataset> when the environment variable SCORE_SDE_DATA is set; otherwise
./data/<config.data.dataset> relative to the working directory. E.g. with SCORE_SDE_DATA=/datasets,
'CIFAR10' is read from /datasets/CIFAR10/cifar-10-batches-py/. Contents of the dataset directory:

  CIFAR10     cifar-10-batches-py/{data_batch_1..5, test_batch} (the python version), or the unextracted
              cifar-10-python.tar.gz (read directly, nothing is written). Train: the 50000 training
              images; eval: the 10000 test images. Resized (antialiased bilinear) if image_size != 32.
              Downloaded on first use when the batches are missing and no intact archive is there.
  CELEBA      img_align_celeba/*.jpg and list_eval_partition.txt (in the directory or in Eval/).
              Train: partition 0 (162770 images); eval: partition 1, the validation split (19867), as
              score_sde's tfds 'validation'. Each 178x218 jpg is centre-cropped to 140x140 (39 rows from
              the top, 19 columns from the left) and resized to image_size (64) with antialiased bilinear
              filtering, as score_sde; unlike score_sde (which kept floats) the result is rounded to uint8,
              so the data stay 8-bit. Decoded on demand (use config.data.num_workers > 0 for speed).
  CelebAHQ    a folder of png/jpg/webp images of any size (e.g. celeba_hq_256/*.png or the 1024x1024
              images of progressive_growing_of_gans' dataset_tool.py create_celebahq), searched
              recursively and sorted by relative path. Preprocessing (data.crop / data.resize_filter,
              below): centre square, then the box filter, i.e. what the TFRecords score_sde read were
              made with (dataset_tool.py halves the 1024x1024 image by 2x2 averaging in float, level
              after level, and rounds each level with np.rint: for a power-of-2 ratio that is the exact
              k x k mean, rounded half to even, which the box filter here reproduces bit for bit).
              Train: all images (score_sde used one record file for both training and evaluation);
              eval: the last config.data.num_eval (default 1000) images in sorted order (so they are
              also in the training set), or every image under config.data.eval_root when it is set.
  FFHQ        a folder of png images of any resolution, e.g. images1024x1024/00000/00000.png .. 69999.png
              of https://github.com/NVlabs/ffhq-dataset (searched recursively, sorted by relative path).
              Preprocessing, splits and data.eval_root as CelebAHQ (score_sde's ffhq-r08 / ffhq-r10
              TFRecords were made by the same dataset_tool.py pyramid from the 1024x1024 PNGs).
  LSUN        config.data.category (e.g. 'bedroom', 'church_outdoor'): the official LMDB export, unzipped:
              <category>_train_lmdb/data.mdb and <category>_val_lmdb/data.mdb (keys: the image ids as
              ASCII; values: the encoded image, JPEG of quality 75 with the short side 256 as the LSUN
              release notes say; any format Pillow decodes, WebP included, is accepted). Read with the
              `lmdb` package, read-only and lazily in each process; the keys, in the database's (sorted)
              order, are listed once and cached next to data.mdb (.score_sde_keys.npy, memory-mapped).
              Or image folders <category>_train/ and <category>_val/ (e.g. written by the LSUN repository's
              `python data.py export`, whose files are named <id>.webp), searched recursively. Train: the
              train database (tfds 'train'); eval: the val database (300 images, tfds 'validation').
              Preprocessing as score_sde: for image_size 128 the short side is resized to 128 with
              antialiased bilinear filtering and the centre 128 x 128 is cropped (resize_small +
              central_crop); otherwise the centre square is cropped and resized with antialiased bicubic
              filtering (crop_resize).
  IMAGE_FOLDER  any folder of png/jpg/jpeg/webp images (config.data.root), searched recursively and sorted
              by relative path; preprocessing by default as score_sde's crop_resize (centre square,
              antialiased bicubic); splits as CelebAHQ (the last data.num_eval, or data.eval_root).
  IMAGENET32  Imagenet32_train_npz/train_data_batch_1..10.npz and Imagenet32_val_npz/val_data.npz
              (Chrabaszcz et al. 2017; 'data' N x 3072 uint8 in CHW order, 'labels' 1-based, made
              0-based; 1,281,167 train / 50,000 validation images), or else the png folders train_32x32/
              and valid_32x32/ (van den Oord et al. 2016, the version of tfds 'downsampled_imagenet/32x32'
              used by score_sde and Soft Truncation; 1,281,149 / 49,999 images, no labels). Train: the
              training images (3.9 GB as uint8); eval: the validation images. Strategy: on first use the
              npz files (one at a time) or pngs are converted into a single uint8 .npy file next to them
              (.train_cache_images.npy + .train_cache_labels.npy; .valid_cache_* for the png validation
              folder), which is then memory-mapped: all DataLoader workers and data-parallel ranks share
              it through the page cache. The cache is rebuilt when it is older than its sources or does
              not match their size; when the folder is not writable the images are held in memory. The
              npz validation file (150 MB) is simply loaded. With several data-parallel ranks, build the
              cache once beforehand (call get_train_dataset(config) in a single process).
  STL10       stl10_binary/{train_X.bin, unlabeled_X.bin, test_X.bin} (+ optional train_y.bin,
              test_y.bin): uint8 N x 3 x 96 x 96, each channel stored column-major. Train: train +
              unlabeled (5000 + 100000 = 105000 images, the Soft Truncation setting); eval: test (8000).
              The bin files are memory-mapped; batches are resized to image_size (48) with antialiased
              bilinear filtering when drawn. Downloaded on first use (see Downloads).
  SHAPES      no files: the embedded demo set, generated procedurally and deterministically (make_shapes):
              RGB images of one or two filled, anti-aliased, coloured disks / squares / triangles on a
              light grey background; config.data.num_train (default 4096) training and
              config.data.num_eval (default 1024) evaluation images from config.data.shapes_seed
              (default 0). Label: the kind of the first shape (0 disk, 1 square, 2 triangle).

Preprocessing of the folder / LMDB datasets (LSUN, FFHQ, CelebAHQ, IMAGE_FOLDER; the others ignore it):
config.data.crop ('' = the dataset's default above):
  'center'      the centre square of side min(h, w) (top (h - s) // 2, left (w - s) // 2), then resize to
                image_size (score_sde's crop_resize);
  'short_side'  resize to (round(h r), round(w r)), r = image_size / min(h, w), then the centre
                image_size x image_size crop (score_sde's resize_small + central_crop);
  'none'        resize the whole image to image_size x image_size (the aspect ratio is not kept);
config.data.resize_filter ('' = the dataset's default): 'bicubic' or 'bilinear' (antialiased when
shrinking, as tf.image.resize(antialias=True): the Keys cubic with a = -0.5 / the triangle, widened by
the scale), or 'box' (exact area averaging of the 8-bit values in float64, rounded half to even). Every
result is rounded to uint8 (score_sde kept floats for its 'short_side' path and truncated with tf.cast in
crop_resize; a square image whose side equals image_size is passed through unchanged by every choice).

Downloads. CIFAR10 and STL10 have public sources: when their files are missing they are fetched on first
use with torchvision's downloader (progress bar) into the dataset directory, the archive's MD5 checked with
torchvision's check_integrity against torchvision's own checksum (DOWNLOADS), and extracted there, giving
torchvision's layout (cifar-10-python.tar.gz + cifar-10-batches-py/, stl10_binary.tar.gz +
stl10_binary/). A failed download or a checksum mismatch raises DownloadError (a FileNotFoundError) and
leaves nothing behind. config.data.download = False (optional, default True) or the environment variable
SCORE_SDE_OFFLINE=1 keeps everything offline: a missing dataset then stops with the message naming the
expected files. Data that need a login or a licence (CELEBA, CelebAHQ, FFHQ, LSUN, IMAGENET32) are never
downloaded; their error message says where to get them and where to put them.

Config fields read: data.dataset, data.image_size, data.num_channels (must be 3), data.centered,
data.random_flip, data.uniform_dequantization (optional, default False) and the Soft Truncation field
data.dequantization ('none' | 'uniform', optional), data.root (optional, default ''), data.num_workers
(optional, default 0), data.num_train / data.num_eval / data.shapes_seed (optional, see above),
data.category (LSUN), data.eval_root, data.crop, data.resize_filter (optional, default ''), data.download
(optional, default True), training.batch_size, eval.batch_size, seed (optional, default 0), device (optional).
"""

from __future__ import annotations

import abc
import glob
import io
import logging
import os
import pickle
import tarfile
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

from configs.defaults import complete_config

DATASETS = ("CIFAR10", "CELEBA", "CelebAHQ", "IMAGENET32", "STL10", "SHAPES", "LSUN", "FFHQ", "IMAGE_FOLDER")
# Evaluation images when config.data.num_eval is 0: SHAPES draws 1024, image folders hold out 1000.
SHAPES_NUM_EVAL = 1024
FOLDER_NUM_EVAL = 1000

_SOURCES = {
    "CIFAR10": "CIFAR-10 python version (cifar-10-python.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html",
    "CELEBA": "CelebA 'Align&Cropped Images' (img_align_celeba.zip) and Eval/list_eval_partition.txt from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html",
    "CelebAHQ": "CelebA-HQ (Karras et al. 2018, https://github.com/tkarras/progressive_growing_of_gans), "
    "e.g. resized to 256x256 png files",
    "IMAGENET32": "Downsampled ImageNet 32x32 npz files (Imagenet32_train_npz.zip, Imagenet32_val_npz.zip) "
    "from https://image-net.org/download-images (Chrabaszcz et al. 2017), or the png version of van den Oord "
    "et al. 2016 (train_32x32.tar, valid_32x32.tar; the one tensorflow_datasets 'downsampled_imagenet/32x32' "
    "uses)",
    "STL10": "STL-10 binary version (stl10_binary.tar.gz) from https://cs.stanford.edu/~acoates/stl10/",
    "LSUN": "LSUN scene LMDB databases <category>_train_lmdb.zip and <category>_val_lmdb.zip (e.g. with "
    "`python download.py -c bedroom` of https://github.com/fyu/lsun; terms of use at https://www.yf.io/p/lsun) "
    "and unzip them there",
    "FFHQ": "FFHQ images1024x1024 png files (`python download_ffhq.py --images` of "
    "https://github.com/NVlabs/ffhq-dataset; licence CC BY-NC-SA 4.0)",
    "IMAGE_FOLDER": "images of your own",
}
_SOURCES["CelebAHQ"] = (
    "CelebA-HQ (Karras et al. 2018): the 1024x1024 images made by dataset_tool.py create_celebahq of "
    "https://github.com/tkarras/progressive_growing_of_gans from CelebA and its deltas, or a released resized "
    "copy (e.g. celeba_hq_256/*.png)"
)
_DOWNLOADABLE_HINT = (
    " It is downloaded automatically on first use unless downloads are off (config.data.download = False or "
    "the environment variable SCORE_SDE_OFFLINE=1)."
)
_LICENSED_HINT = " It is not downloaded automatically (it needs a login or the acceptance of its licence)."

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CROP_MODES = ("center", "short_side", "none")
RESIZE_FILTERS = ("bicubic", "bilinear", "box")
_CELEBA_CROP = 140
_STL_SIZE = 96


# ----------------------------------------------------------------------------------------------------
# Scalers


def get_data_scaler(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """Data normalizer: x -> 2x - 1 ([0, 1] -> [-1, 1]) when config.data.centered, identity otherwise."""
    if config.data.centered:
        return lambda x: x * 2.0 - 1.0
    return lambda x: x


def get_data_inverse_scaler(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inverse normalizer: x -> (x + 1) / 2 ([-1, 1] -> [0, 1]) if config.data.centered, else identity."""
    if config.data.centered:
        return lambda x: (x + 1.0) / 2.0
    return lambda x: x


# ----------------------------------------------------------------------------------------------------
# Pure image operations


def to_float(images: torch.Tensor, dequantize: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 k -> float32 k / 255, or (k + u) / 256 with u ~ U[0, 1) when dequantize (score_sde's formula)."""
    x = images.float()
    if dequantize:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return (x + u) / 256.0
    return x / 255.0


def flip_mask(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """[n] booleans, each True with probability 1/2: which images a random horizontal flip mirrors."""
    return torch.rand(n, generator=generator, device=device) < 0.5


def flip_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images [n, C, H, W] where mask [n] is True."""
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image [n, C, H, W] left-right independently with probability 1/2."""
    return flip_where(images, flip_mask(images.shape[0], generator, images.device))


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop [..., H, W] -> [..., size, size] at top = (H - size) // 2, left = (W - size) // 2."""
    h, w = images.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"cannot centre-crop an image of {h}x{w} to {size}x{size}")
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def resize_uint8(images: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize uint8 [n, C, h, w] -> [n, C, H, W] (size = H = W, or (H, W)), rounded back to uint8.

    mode 'bilinear' / 'bicubic': antialiased (the kernel widened by the scale when shrinking) as
    tf.image.resize(antialias=True), applied to k / 255; 'box': box_resize_uint8 (exact area averaging).
    """
    out_hw = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    if tuple(images.shape[-2:]) == out_hw:
        return images
    if mode == "box":
        return box_resize_uint8(images, out_hw)
    x = images.float() / 255.0
    x = F.interpolate(x, size=out_hw, mode=mode, align_corners=False, antialias=True)
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def box_weights(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] float64 box filter: output i averages the input span [i s, (i + 1) s), s = n_in / n_out,
    each input pixel j weighted by its overlap with that span (rows sum to 1)."""
    s = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64)[:, None] * s
    j = torch.arange(n_in, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(lo + s, j + 1) - torch.maximum(lo, j)).clamp_(min=0)
    return overlap / s


def box_resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Box-filter resize of uint8 [n, C, h, w] to size (H, W) on the 8-bit values, in float64, rounded half to even.

    For integer ratios this is the exact k x k block mean: for powers of 2 it equals, bit for bit, the
    TFRecord pyramid of progressive_growing_of_gans' dataset_tool.py (repeated 2x2 float averages, np.rint)
    that made score_sde's CelebA-HQ and FFHQ data.
    """
    n, c, h, w = images.shape
    out_h, out_w = size
    x = images.to(torch.float64)
    if h % out_h == 0 and w % out_w == 0:
        out = x.reshape(n, c, out_h, h // out_h, out_w, w // out_w).mean(dim=(3, 5))
    else:
        out = box_weights(h, out_h) @ x @ box_weights(w, out_w).T
    return out.round_().clamp_(0, 255).to(torch.uint8)


def crop_and_resize(
    images: torch.Tensor, size: int, crop: int | str = "center", resize_filter: str = "bicubic"
) -> torch.Tensor:
    """uint8 [n, C, h, w] -> [n, C, size, size]: crop, then resize with resize_filter (see resize_uint8).

    crop: an int k: the centre k x k crop, then resize (CelebA's 140); 'center': the centre square of side
    min(h, w), then resize (score_sde's crop_resize); 'short_side': resize to (round(h r), round(w r)) with
    r = size / min(h, w), then the centre size x size crop (score_sde's resize_small + central_crop);
    'none': resize the whole image to size x size.
    """
    h, w = images.shape[-2:]
    if isinstance(crop, (int, np.integer)) and not isinstance(crop, bool):
        return resize_uint8(center_crop(images, int(crop)), size, resize_filter)
    if crop == "center":
        return resize_uint8(center_crop(images, min(h, w)), size, resize_filter)
    if crop == "short_side":
        ratio = size / min(h, w)
        resized = resize_uint8(images, (max(size, round(h * ratio)), max(size, round(w * ratio))), resize_filter)
        return center_crop(resized, size)
    if crop == "none":
        return resize_uint8(images, size, resize_filter)
    raise ValueError(f"crop must be an int or one of {', '.join(CROP_MODES)}; got {crop!r}")


def decode_image(source: str | bytes, name: str | None = None) -> torch.Tensor:
    """An encoded image (a file path, or the bytes of any format Pillow reads: PNG, JPEG, WebP, ...) -> uint8
    RGB [3, h, w]. name: how the image is called in error messages (default: the path)."""
    from PIL import Image, UnidentifiedImageError

    name = name or str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source) as img:
            array = np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {name} is missing (listed in the dataset, not on disk)") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot decode image {name} ({err}); replace the corrupt file") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def stl10_decode(raw: np.ndarray) -> np.ndarray:
    """STL-10 bin rows [n, 27648] (channels stored column-major) -> row-major images [n, 3, 96, 96]."""
    return np.asarray(raw).reshape(-1, 3, _STL_SIZE, _STL_SIZE).transpose(0, 1, 3, 2)


# ----------------------------------------------------------------------------------------------------
# Datasets


class _Batch(NamedTuple):
    """A batch fetched by ImageDataset.__getitems__: uint8 images [n, C, H, W], int64 labels [n]."""

    images: torch.Tensor
    labels: torch.Tensor


class Batch(dict):
    """A loader batch {'image': float32 [B, C, H, W], 'label': int64 [B]}.

    batch['image']._numpy() also gives the images the way score_sde's TensorFlow pipeline did (a NumPy array
    [B, H, W, C]), so its scripts and notebooks, which do
    torch.from_numpy(batch['image']._numpy()).permute(0, 3, 1, 2), run unchanged.
    """

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if key == "image" and isinstance(value, torch.Tensor) and "_numpy" not in value.__dict__:
            value._numpy = _channels_last_numpy(weakref.ref(value))
        return value


def _channels_last_numpy(image_ref: weakref.ref) -> Callable[[], np.ndarray]:
    """The TF-style accessor of Batch: images [B, C, H, W] -> NumPy [B, H, W, C] (a weak reference: no cycle)."""

    def _numpy() -> np.ndarray:
        return np.ascontiguousarray(image_ref().detach().cpu().permute(0, 2, 3, 1).numpy())

    return _numpy


class ImageDataset(Dataset, abc.ABC):
    """Random-access image dataset holding uint8 images; subclasses implement fetch(indices).

    dataset[i] -> (uint8 tensor [C, H, W], int label). The DataLoaders built by get_dataset fetch whole
    batches (__getitems__) and convert them with collate(); get_batch(indices, augment) does the same for
    arbitrary indices.
    random_flip / uniform_dequantization are the augmentation of this split (set by get_dataset).
    """

    def __init__(self, image_size: int, random_flip: bool = False, uniform_dequantization: bool = False) -> None:
        self.image_size = int(image_size)
        self.random_flip = bool(random_flip)
        self.uniform_dequantization = bool(uniform_dequantization)

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    @abc.abstractmethod
    def fetch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [n, C, image_size, image_size] and int64 labels [n] for the given indices."""

    def _indices(self, indices) -> np.ndarray:
        """Validate and normalise indices (list, array or tensor; negative ones count from the end)."""
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for a dataset of {n} images")
        return np.where(idx < 0, idx + n, idx)

    def _fetch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """fetch() for any indices, an empty batch [0, 3, size, size] included."""
        idx = self._indices(indices)
        if idx.size == 0:
            size = self.image_size
            return torch.empty((0, 3, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        return self.fetch(idx)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self._fetch([index])
        return images[0], int(labels[0])

    def __getitems__(self, indices) -> _Batch:
        return _Batch(*self._fetch(indices))

    def convert(
        self, images: torch.Tensor, augment: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """uint8 [n, C, H, W] -> float32 in [0, 1], with this split's flip / dequantization when augment."""
        if augment and self.random_flip:
            images = random_flip(images, generator)
        return to_float(images, dequantize=augment and self.uniform_dequantization, generator=generator)

    def collate(self, data) -> dict:
        """collate_fn: a _Batch (or a list of (image, label)) -> {'image': float32, 'label': int64}."""
        if isinstance(data, _Batch):
            images, labels = data
        else:
            images = torch.stack([item[0] for item in data])
            labels = torch.as_tensor([int(item[1]) for item in data], dtype=torch.int64)
        return Batch(image=self.convert(images), label=labels)

    def get_batch(self, indices, augment: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """float32 images [n, C, H, W] in [0, 1], augmented like this split's loader when augment."""
        images, _ = self._fetch(indices)
        return self.convert(images, augment=augment, generator=generator)


class ArrayImageDataset(ImageDataset):
    """Images in uint8 arrays [N, C, h, w] (in memory or memory-mapped, in chunks), resized on fetch.

    decode: optional function applied to each fetched raw batch (e.g. stl10_decode for column-major storage).
    """

    def __init__(
        self,
        arrays: list,
        labels: np.ndarray,
        image_size: int,
        decode=None,
        resize_mode: str = "bilinear",
        random_flip: bool = False,
        uniform_dequantization: bool = False,
    ) -> None:
        super().__init__(image_size, random_flip, uniform_dequantization)
        self.arrays = list(arrays)
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != self.offsets[-1]:
            raise ValueError(f"{len(self.labels)} labels for {self.offsets[-1]} images")
        self.decode = decode
        self.resize_mode = resize_mode

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def fetch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = np.searchsorted(self.offsets, indices, side="right") - 1
        raw = None
        for c in np.unique(chunk):
            where = np.nonzero(chunk == c)[0]
            part = np.asarray(self.arrays[c][indices[where] - self.offsets[c]])
            if self.decode is not None:
                part = self.decode(part)
            if raw is None:
                raw = np.empty((len(indices),) + part.shape[1:], dtype=np.uint8)
            raw[where] = part
        images = resize_uint8(torch.from_numpy(raw), self.image_size, self.resize_mode)
        return images, torch.from_numpy(self.labels[indices])


class FileImageDataset(ImageDataset):
    """Images decoded from files on fetch: RGB, then crop_and_resize(crop, resize_mode).

    crop: an int (fixed centre crop), 'center' (None: the same), 'short_side' or 'none' (see crop_and_resize).
    """

    def __init__(
        self,
        paths: list,
        labels: np.ndarray,
        image_size: int,
        crop: int | str | None = None,
        resize_mode: str = "bilinear",
        random_flip: bool = False,
        uniform_dequantization: bool = False,
    ) -> None:
        super().__init__(image_size, random_flip, uniform_dequantization)
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.labels)} labels for {len(self.paths)} images")
        self.crop = "center" if crop is None else crop
        self.resize_mode = resize_mode

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, path: str) -> torch.Tensor:
        """One image file -> uint8 [3, image_size, image_size] (decode, crop, resize)."""
        image = decode_image(path)
        return crop_and_resize(image[None], self.image_size, self.crop, self.resize_mode)[0]

    def fetch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([self.load(self.paths[i]) for i in indices])
        return images, torch.from_numpy(self.labels[indices])


class LMDBImageDataset(ImageDataset):
    """Encoded images in an LMDB database (LSUN's export: key = image id, value = JPEG / WebP bytes), in the
    order of `keys`; decoded, then crop_and_resize(crop, resize_mode), on fetch.

    The database is opened read-only (no lock file needed) on the first fetch in each process and the handle
    is shared by every dataset of that process (_lmdb_environment), so DataLoader workers and data-parallel
    ranks each use their own; the dataset itself pickles as a path and the keys. Labels are -1.
    """

    def __init__(
        self,
        path: str,
        keys,
        image_size: int,
        crop: int | str = "center",
        resize_mode: str = "bicubic",
        random_flip: bool = False,
        uniform_dequantization: bool = False,
    ) -> None:
        super().__init__(image_size, random_flip, uniform_dequantization)
        self.path = path
        self.keys = keys
        self.crop = crop
        self.resize_mode = resize_mode

    def __len__(self) -> int:
        return len(self.keys)

    def fetch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = []
        with _lmdb_environment(self.path).begin(write=False) as txn:
            for i in indices:
                key = bytes(self.keys[i])
                value = txn.get(key)
                if value is None:
                    raise ValueError(
                        f"{self.path}: key {key!r} listed in the key cache is not in the database; delete "
                        f"{os.path.join(self.path, _LMDB_KEYS_CACHE)} to rebuild it"
                    )
                image = decode_image(value, f"{key.decode('ascii', 'replace')} of {self.path}")
                images.append(crop_and_resize(image[None], self.image_size, self.crop, self.resize_mode)[0])
        return torch.stack(images), torch.full((len(indices),), -1, dtype=torch.int64)


class _Memmap:
    """Read-only memory map of a uint8 .npy or raw file, opened lazily in each process (pickles cheaply)."""

    def __init__(self, path: str, shape: tuple | None = None) -> None:
        self.path = path
        self.raw_shape = shape  # None: a .npy file (shape from its header)
        self._array = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            if self.raw_shape is None:
                self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            else:
                self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.raw_shape)
        return self._array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        return self.array[index]

    def __getstate__(self) -> dict:
        return {"path": self.path, "raw_shape": self.raw_shape, "_array": None}


# ----------------------------------------------------------------------------------------------------
# File readers (each returns the train and eval uint8 sources of one dataset)


def _missing(name: str, root: str, expected: str) -> FileNotFoundError:
    """The error for a missing dataset: expected path(s), format, download source and whether it downloads."""
    if name == "IMAGE_FOLDER":
        return FileNotFoundError(
            f"IMAGE_FOLDER: expected {expected} under {os.path.abspath(root)}. Set config.data.root to a folder of "
            f"{'/'.join(e[1:] for e in _IMAGE_EXTENSIONS)} images (searched recursively)."
        )
    hint = _DOWNLOADABLE_HINT if name in DOWNLOADS else _LICENSED_HINT
    return FileNotFoundError(
        f"{name} not found: expected {expected} under the dataset directory {os.path.abspath(root)}. "
        f"Download the {_SOURCES[name]}, or point config.data.root (or $SCORE_SDE_DATA/{name}) to it.{hint}"
    )


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 batches: only plain containers and numpy arrays, never arbitrary objects."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core", 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _cifar_batch(data: bytes, label: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch (pickled dict: b'data' N x 3072 uint8 CHW, b'labels') -> arrays."""
    try:
        batch = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
        images = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:  # any decoding failure means the file is not a CIFAR-10 batch
        raise ValueError(
            f"{label} is not a CIFAR-10 python batch (a pickled dict with b'data' N x 3072 uint8 and "
            f"b'labels'): {err}. Re-download the {_SOURCES['CIFAR10']}."
        ) from None
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072 or len(labels) != len(images):
        raise ValueError(
            f"{label}: expected b'data' N x 3072 uint8 and N labels, got data {images.dtype} "
            f"{images.shape} and {len(labels)} labels. Re-download the {_SOURCES['CIFAR10']}."
        )
    return images.reshape(-1, 3, 32, 32), labels


def _read_cifar10(root: str):
    """CIFAR-10 train (data_batch_1..5) and test (test_batch) uint8 arrays with labels."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = os.path.join(root, "cifar-10-batches-py")
    archive = os.path.join(root, "cifar-10-python.tar.gz")
    if all(os.path.isfile(os.path.join(folder, n)) for n in names):
        raw = {}
        for n in names:
            with open(os.path.join(folder, n), "rb") as f:
                raw[n] = (f.read(), os.path.join(folder, n))
    elif os.path.isfile(archive):
        raw = {}
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    base = os.path.basename(member.name)
                    if member.isfile() and base in names:
                        raw[base] = (tar.extractfile(member).read(), f"{archive}:{member.name}")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ValueError(f"{archive} is not a readable tar.gz archive ({err}); re-download it.") from None
        if len(raw) != len(names):
            missing = sorted(set(names) - set(raw))
            raise ValueError(f"{archive} lacks the CIFAR-10 batches {missing}; re-download the {_SOURCES['CIFAR10']}.")
    else:
        present = [n for n in names if os.path.isfile(os.path.join(folder, n))]
        detail = f" (found only {present})" if present else ""
        raise _missing(
            "CIFAR10",
            root,
            f"cifar-10-batches-py/{{data_batch_1..5, test_batch}}{detail} or cifar-10-python.tar.gz",
        )
    batches = [_cifar_batch(*raw[n]) for n in names]
    train = (np.concatenate([b[0] for b in batches[:5]]), np.concatenate([b[1] for b in batches[:5]]))
    return train, batches[5]


def _celeba_partition(root: str) -> str:
    """Path of list_eval_partition.txt (dataset directory or its Eval/ subfolder)."""
    for path in (
        os.path.join(root, "list_eval_partition.txt"),
        os.path.join(root, "Eval", "list_eval_partition.txt"),
    ):
        if os.path.isfile(path):
            return path
    raise _missing(
        "CELEBA", root, "img_align_celeba/*.jpg and list_eval_partition.txt (or Eval/list_eval_partition.txt)"
    )


def _read_celeba(root: str):
    """CelebA file lists of partition 0 (train) and 1 (validation)."""
    folder = os.path.join(root, "img_align_celeba")
    if not os.path.isdir(folder):
        raise _missing("CELEBA", root, "img_align_celeba/*.jpg and list_eval_partition.txt")
    path = _celeba_partition(root)
    splits = {0: [], 1: [], 2: []}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise ValueError(
                    f"{path}, line {line_no}: expected '<image>.jpg <0|1|2>', got {line.strip()!r}. "
                    f"Re-download list_eval_partition.txt ({_SOURCES['CELEBA']})."
                )
            splits[int(fields[1])].append(os.path.join(folder, fields[0]))
    if not splits[0] or not splits[1]:
        raise ValueError(f"{path} lists no training (0) or no validation (1) images; re-download it.")
    if not os.path.isfile(splits[0][0]):
        raise _missing("CELEBA", root, f"img_align_celeba/{os.path.basename(splits[0][0])} (listed in {path})")
    return splits[0], splits[1]


def _list_images(folder: str) -> list[str]:
    """The image files (png/jpg/jpeg/webp) under folder, searched recursively, sorted by path."""
    return sorted(
        p
        for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
        if p.lower().endswith(_IMAGE_EXTENSIONS) and os.path.isfile(p)
    )


def _read_image_folder(name: str, root: str, num_eval: int, eval_root: str = ""):
    """Image paths of a folder dataset (CelebAHQ, FFHQ, IMAGE_FOLDER): train = all of them; eval = the last
    num_eval in sorted order, or all images under eval_root when it is set."""
    example = {"CelebAHQ": " (e.g. celeba_hq_256/*.png)", "FFHQ": " (e.g. images1024x1024/00000/00000.png)"}
    expected = f"a folder of .png/.jpg/.webp images{example.get(name, '')}"
    if not os.path.isdir(root):
        raise _missing(name, root, expected)
    paths = _list_images(root)
    if not paths:
        raise _missing(name, root, f"{expected}; none found")
    if eval_root:
        eval_root = os.path.expanduser(str(eval_root))
        eval_paths = _list_images(eval_root) if os.path.isdir(eval_root) else []
        if not eval_paths:
            raise FileNotFoundError(
                f"config.data.eval_root = {eval_root!r} holds no .png/.jpg/.webp images (searched recursively); "
                "point it to the evaluation images, or leave it empty to evaluate on the last data.num_eval images."
            )
        return paths, eval_paths
    if not 0 < num_eval < len(paths):
        raise ValueError(
            f"config.data.num_eval = {num_eval} must be in [1, {len(paths) - 1}] for the {len(paths)} "
            f"{name} images found under {root} (or set config.data.eval_root to a separate evaluation folder)"
        )
    return paths, paths[-num_eval:]


_LMDB_KEYS_CACHE = ".score_sde_keys.npy"


def _open_lmdb(path: str):
    """Open an LMDB database folder (data.mdb inside) read-only, without a lock file (works on read-only media)."""
    import lmdb

    try:
        return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as err:
        raise ValueError(
            f"cannot open the LMDB database {path} ({err}); unzip the downloaded archive again (it must hold data.mdb)"
        ) from None


# (process id, real path) -> open lmdb.Environment: py-lmdb allows one handle per database and process.
_LMDB_ENVIRONMENTS: dict = {}


def _lmdb_environment(path: str):
    """This process's read-only handle of an LMDB database (opened on first use, then kept). A handle inherited
    from the parent through fork (a DataLoader worker) is closed in this process and the database reopened, as
    LMDB requires."""
    pid, real = os.getpid(), os.path.realpath(path)
    if (pid, real) not in _LMDB_ENVIRONMENTS:
        for inherited in [k for k in _LMDB_ENVIRONMENTS if k[1] == real]:
            _LMDB_ENVIRONMENTS.pop(inherited).close()
        _LMDB_ENVIRONMENTS[pid, real] = _open_lmdb(path)
    return _LMDB_ENVIRONMENTS[pid, real]


def _lmdb_keys(path: str):
    """All keys of an LMDB database in its (sorted) order, as a fixed-width bytes array.

    Cached as path/.score_sde_keys.npy (memory-mapped, so workers share it) and rebuilt when older than
    data.mdb or of another length than the database; kept in memory when the folder is not writable.
    """
    import lmdb

    data_file = os.path.join(path, "data.mdb")
    cache = os.path.join(path, _LMDB_KEYS_CACHE)
    shared = _LMDB_ENVIRONMENTS.get((os.getpid(), os.path.realpath(path)))
    env = shared if shared is not None else _open_lmdb(path)
    try:
        with env.begin(write=False) as txn:
            count = txn.stat()["entries"]
            if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(data_file):
                try:
                    keys = _Memmap(cache)
                    if len(keys) == count and keys.array.dtype.kind == "S":
                        return keys
                except (ValueError, OSError):
                    pass  # unreadable cache: rebuild it
            listed = list(txn.cursor().iternext(keys=True, values=False))
    except lmdb.Error as err:
        raise ValueError(f"cannot read the LMDB database {path} ({err}); unzip the archive again") from None
    finally:
        if shared is None:
            env.close()
    if not listed:
        raise ValueError(f"the LMDB database {path} holds no images; unzip the archive again")
    if any(k.endswith(b"\0") for k in listed):
        raise ValueError(f"{path}: keys ending in a NUL byte are not supported")
    keys = np.array(listed, dtype=f"S{max(len(k) for k in listed)}")
    tmp = f"{cache}.tmp{os.getpid()}.npy"
    try:
        np.save(tmp, keys)
        os.replace(tmp, cache)
    except OSError as err:
        logging.warning("LSUN: cannot write the key cache %s (%s); keeping the keys in memory", cache, err)
        return keys
    return _Memmap(cache)


def _read_lsun(root: str, category: str):
    """LSUN <category>: for 'train' and 'val', ('lmdb', folder, keys) of <category>_<split>_lmdb/, or
    ('files', paths) of the image folder <category>_<split>/."""
    out = []
    for split in ("train", "val"):
        database = os.path.join(root, f"{category}_{split}_lmdb")
        folder = os.path.join(root, f"{category}_{split}")
        if os.path.isfile(os.path.join(database, "data.mdb")):
            out.append(("lmdb", database, _lmdb_keys(database)))
        elif os.path.isdir(folder) and _list_images(folder):
            out.append(("files", _list_images(folder)))
        else:
            raise _missing(
                "LSUN",
                root,
                f"{category}_{split}_lmdb/data.mdb (the unzipped {category}_{split}_lmdb.zip; the other split "
                f"too: {category}_train_lmdb/ and {category}_val_lmdb/), or an image folder {category}_{split}/",
            )
    return out


def _bad_npz(path: str, err: Exception) -> ValueError:
    """The error for an unreadable downsampled-ImageNet npz file."""
    return ValueError(
        f"{path} is not a downsampled-ImageNet npz file (keys 'data' N x 3072 uint8, 'labels' 1..1000): "
        f"{err}. Re-download the {_SOURCES['IMAGENET32']}."
    )


def _npz_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One downsampled-ImageNet npz file -> (uint8 [N, 3, 32, 32] CHW, 0-based int64 labels [N])."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data, labels = z["data"], np.asarray(z["labels"], dtype=np.int64).reshape(-1)
    except (KeyError, ValueError, OSError, EOFError) as err:
        raise _bad_npz(path, err) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected 'data' N x 3072 uint8 (32x32, CHW) and N labels, got {data.dtype} "
            f"{data.shape} and {len(labels)} labels"
        )
    if labels.size and (labels.min() < 1 or labels.max() > 1000):
        raise ValueError(f"{path}: labels must be 1-based in 1..1000, got range [{labels.min()}, {labels.max()}]")
    return data.reshape(-1, 3, 32, 32), labels - 1


def _npz_labels(path: str) -> np.ndarray:
    """The 'labels' array of a downsampled-ImageNet npz file (read without the images)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z["labels"]).reshape(-1)
    except (KeyError, ValueError, OSError, EOFError) as err:
        raise _bad_npz(path, err) from None


def _uint8_cache(folder: str, name: str, stamps: list, total: int, chunks):
    """Images [total, 3, 32, 32] and labels from the memory-mapped cache folder/.{name}_cache_*.npy.

    The cache is (re)built from chunks() -> iterator of (uint8 [n, 3, 32, 32], int64 [n]) when it is missing,
    older than any path in stamps, or of another size; if the folder is not writable, images stay in memory.
    """
    images_path = os.path.join(folder, f".{name}_cache_images.npy")
    labels_path = os.path.join(folder, f".{name}_cache_labels.npy")
    newest = max(os.path.getmtime(p) for p in stamps)
    if os.path.isfile(images_path) and os.path.isfile(labels_path) and os.path.getmtime(images_path) >= newest:
        try:
            labels = np.load(labels_path, allow_pickle=False)
            images = _Memmap(images_path)
            if images.array.shape == (total, 3, 32, 32) and images.array.dtype == np.uint8 and len(labels) == total:
                return images, labels
        except (ValueError, OSError):
            pass  # unreadable cache: rebuild it
    tmp_images = f"{images_path}.tmp{os.getpid()}.npy"
    tmp_labels = f"{labels_path}.tmp{os.getpid()}.npy"
    try:
        images = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(total, 3, 32, 32))
    except OSError as err:
        logging.warning("IMAGENET32: cannot write the uint8 cache in %s (%s); keeping the data in memory", folder, err)
        tmp_images = None
        images = np.empty((total, 3, 32, 32), dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    start = 0
    for data, lab in chunks():  # one chunk in memory at a time
        images[start : start + len(lab)] = data
        labels[start : start + len(lab)] = lab
        start += len(lab)
    if start != total:
        raise ValueError(f"IMAGENET32: read {start} images from {folder}, expected {total}")
    if tmp_images is None:
        return images, labels
    images.flush()
    del images
    np.save(tmp_labels, labels)
    os.replace(tmp_labels, labels_path)
    os.replace(tmp_images, images_path)
    return _Memmap(images_path), labels


def _png_folder(folder: str, chunk: int = 10000):
    """Sorted png files of a folder, and chunks() decoding them to (uint8 [n, 3, 32, 32], labels -1)."""
    from PIL import Image, UnidentifiedImageError

    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(".png"))

    def chunks():
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            data = np.empty((len(part), 3, 32, 32), dtype=np.uint8)
            for i, path in enumerate(part):
                try:
                    with Image.open(path) as img:
                        array = np.asarray(img.convert("RGB"))
                except (UnidentifiedImageError, OSError) as err:
                    raise ValueError(f"cannot decode {path} ({err}); replace the corrupt file") from None
                if array.shape != (32, 32, 3):
                    raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]}, expected a 32x32 image")
                data[i] = array.transpose(2, 0, 1)
            yield data, np.full(len(part), -1, dtype=np.int64)

    return paths, chunks


def _read_imagenet32(root: str):
    """Downsampled ImageNet 32x32: npz batches (Chrabaszcz et al.) or png folders (van den Oord et al.)."""
    npz_dir = os.path.join(root, "Imagenet32_train_npz")
    files = [os.path.join(npz_dir, f"train_data_batch_{i}.npz") for i in range(1, 11)]
    val_path = os.path.join(root, "Imagenet32_val_npz", "val_data.npz")
    png_dirs = [os.path.join(root, "train_32x32"), os.path.join(root, "valid_32x32")]
    if not os.path.isdir(npz_dir) and all(os.path.isdir(d) for d in png_dirs):
        out = []
        for folder, name in zip(png_dirs, ("train", "valid")):
            paths, chunks = _png_folder(folder)
            if not paths:
                raise _missing("IMAGENET32", root, f"32x32 png images in {os.path.relpath(folder, root)}/ (none found)")
            out.append(_uint8_cache(folder, name, [folder], len(paths), chunks))
        return tuple(out)
    missing = [f for f in files + [val_path] if not os.path.isfile(f)]
    if missing:
        raise _missing(
            "IMAGENET32",
            root,
            "Imagenet32_train_npz/train_data_batch_1..10.npz and Imagenet32_val_npz/val_data.npz "
            f"(missing: {', '.join(os.path.relpath(m, root) for m in missing)}), or the png folders "
            "train_32x32/ and valid_32x32/",
        )
    total = sum(len(_npz_labels(f)) for f in files)
    train = _uint8_cache(npz_dir, "train", files, total, lambda: (_npz_arrays(f) for f in files))
    return train, _npz_arrays(val_path)


def _stl10_images(path: str) -> _Memmap:
    """Memory map of an STL-10 image bin file (N x 27648 bytes)."""
    size = os.path.getsize(path)
    row = 3 * _STL_SIZE * _STL_SIZE
    if size == 0 or size % row:
        raise ValueError(
            f"{path} has {size} bytes, not a multiple of {row} (3 x 96 x 96 uint8 per image); "
            f"re-download the {_SOURCES['STL10']}."
        )
    return _Memmap(path, (size // row, row))


def _stl10_labels(path: str, n: int) -> np.ndarray:
    """STL-10 labels (uint8 1..10 -> 0-based), or -1 when the label file is absent."""
    if not os.path.isfile(path):
        return np.full(n, -1, dtype=np.int64)
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(labels) != n or (n and (labels.min() < 1 or labels.max() > 10)):
        raise ValueError(f"{path}: expected {n} labels in 1..10, got {len(labels)}; re-download it.")
    return labels - 1


def _read_stl10(root: str):
    """STL-10: train = train_X + unlabeled_X, eval = test_X (memory-mapped, column-major)."""
    folder = os.path.join(root, "stl10_binary")
    names = ["train_X.bin", "unlabeled_X.bin", "test_X.bin"]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise _missing("STL10", root, f"stl10_binary/{{{', '.join(names)}}} (missing: {', '.join(missing)})")
    train_x, unlabeled_x, test_x = (_stl10_images(os.path.join(folder, n)) for n in names)
    train_y = _stl10_labels(os.path.join(folder, "train_y.bin"), len(train_x))
    test_y = _stl10_labels(os.path.join(folder, "test_y.bin"), len(test_x))
    train = ([train_x, unlabeled_x], np.concatenate([train_y, np.full(len(unlabeled_x), -1, dtype=np.int64)]))
    return train, ([test_x], test_y)


# ----------------------------------------------------------------------------------------------------
# SHAPES: the embedded demo dataset

SHAPES_BACKGROUND = (0.92, 0.92, 0.92)
SHAPES_PALETTE = (
    (0.85, 0.15, 0.15),  # red
    (0.15, 0.65, 0.25),  # green
    (0.15, 0.30, 0.85),  # blue
    (0.95, 0.75, 0.10),  # yellow
    (0.55, 0.20, 0.75),  # purple
    (0.95, 0.50, 0.05),  # orange
)
SHAPE_KINDS = ("disk", "square", "triangle")
_SQUARE_HALF = 0.85  # square half side / r
_TRIANGLE_HALF_BASE = 1.1  # triangle half base / r (height 2r, apex up)


def shape_area(kind: int, r: float) -> float:
    """Exact area of a SHAPES shape of size r: disk pi r^2, square (2 * 0.85 r)^2, triangle 1.1 r * 2r."""
    if kind == 0:
        return float(np.pi * r * r)
    if kind == 1:
        return float((2 * _SQUARE_HALF * r) ** 2)
    return float(_TRIANGLE_HALF_BASE * r * 2 * r)


def shape_coverage(
    kind: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, size: int, supersample: int = 4
) -> np.ndarray:
    """Fraction of each pixel of size x size images covered by the shapes [n] (supersample^2 points a pixel).

    Pixel (i, j) spans [j, j + 1) x [i, i + 1) in (x, y) coordinates. Disk: |p - c| <= r; square:
    |x - cx|, |y - cy| <= 0.85 r; triangle: apex (cx, cy - r), base at y = cy + r with half width 1.1 r.
    """
    s = supersample
    grid = (np.arange(size * s, dtype=np.float32) + 0.5) / s
    x = grid[None, None, :]
    y = grid[None, :, None]
    kind, cx, cy, r = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (kind, cx, cy, r))
    dx, dy = x - cx, y - cy
    disk = dx * dx + dy * dy <= r * r
    square = (np.abs(dx) <= _SQUARE_HALF * r) & (np.abs(dy) <= _SQUARE_HALF * r)
    depth = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
    triangle = (depth >= 0) & (depth <= 1) & (np.abs(dx) <= _TRIANGLE_HALF_BASE * r * depth)
    inside = np.where(kind == 0, disk, np.where(kind == 1, square, triangle))
    n = inside.shape[0]
    return inside.reshape(n, size, s, size, s).mean(axis=(2, 4), dtype=np.float32)


def make_shapes(
    n: int, size: int = 16, seed: int | Sequence[int] = 0, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """The SHAPES demo images (uint8 [n, 3, size, size], int64 labels [n]), a deterministic function of seed.

    Each image has one shape, or two with probability 1/2 (the second drawn on top); a shape has a kind
    (disk, square, triangle), a colour from SHAPES_PALETTE, a size r ~ U[0.18, 0.32] * size and a centre
    uniform among the positions that keep it inside the image; edges are anti-aliased by 4x4 supersampling.
    Label: the kind of the first shape.
    """
    rng = np.random.default_rng(seed)
    palette = np.asarray(SHAPES_PALETTE, dtype=np.float32)
    layers = []
    for slot in range(2):
        present = np.ones(n, dtype=bool) if slot == 0 else rng.random(n) < 0.5
        kind = rng.integers(0, 3, n)
        r = rng.uniform(0.18, 0.32, n) * size
        margin = r * np.maximum(1.0, _TRIANGLE_HALF_BASE)
        cx = rng.uniform(margin, size - margin)
        cy = rng.uniform(r, size - r)
        color = palette[rng.integers(0, len(palette), n)]
        layers.append((present, kind, cx, cy, r, color))
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    background = np.asarray(SHAPES_BACKGROUND, dtype=np.float32)[None, :, None, None]
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        img = np.broadcast_to(background, (sl.stop - sl.start, 3, size, size)).copy()
        for present, kind, cx, cy, r, color in layers:
            cover = shape_coverage(kind[sl], cx[sl], cy[sl], r[sl], size)[:, None] * present[sl, None, None, None]
            img = img * (1 - cover) + color[sl, :, None, None] * cover
        images[sl] = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return images, layers[0][1].astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Downloads (public datasets only)

OFFLINE_ENV_VAR = "SCORE_SDE_OFFLINE"


class DownloadError(FileNotFoundError):
    """A file could not be fetched (network error, or a checksum mismatch); nothing partial is left on disk.

    A FileNotFoundError, so that callers which treat missing data as a reason to skip (run_lib's evaluation)
    do the same for a failed download.
    """


class _Download(NamedTuple):
    """A public archive: where it comes from, its MD5, and the files the reader needs once it is extracted."""

    url: str
    filename: str
    md5: str
    files: tuple
    readable_archive: bool  # the reader reads the archive itself (no extraction needed)


# URLs and MD5 checksums of torchvision.datasets.CIFAR10 / STL10 (tests/test_downloads.py checks they agree).
DOWNLOADS = {
    "CIFAR10": _Download(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        tuple(f"cifar-10-batches-py/{n}" for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
        True,
    ),
    "STL10": _Download(
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
        "stl10_binary.tar.gz",
        "91f7769df0f17e558f3565bffb0c7dfb",
        tuple(f"stl10_binary/{n}" for n in ("train_X.bin", "unlabeled_X.bin", "test_X.bin")),
        False,
    ),
}


def downloads_enabled(download: bool | None = None) -> bool:
    """Whether files may be fetched: not when $SCORE_SDE_OFFLINE is 1/true/yes/on, else `download` (None: yes)."""
    if os.environ.get(OFFLINE_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return True if download is None else bool(download)


def offline_reason(download: bool | None = None) -> str:
    """Why downloads are off (for error messages), '' when they are on."""
    if os.environ.get(OFFLINE_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
        return f"${OFFLINE_ENV_VAR} is set"
    return "" if download is None or download else "config.data.download = False"


def _remove(path: str) -> None:
    """Delete a file if it exists."""
    if os.path.lexists(path):
        os.remove(path)


def download_file(url: str, path: str, md5: str) -> str:
    """Fetch url to path with torchvision's downloader (progress bar) and check its MD5 (torchvision's
    calculate_md5). The file is written under a temporary name and renamed once verified; on any failure it
    is removed and DownloadError says what happened and how to fetch the file by hand."""
    from torchvision.datasets.utils import calculate_md5, download_url

    folder, name = os.path.split(os.path.abspath(path))
    partial = f"{name}.{os.getpid()}.partial"
    tmp = os.path.join(folder, partial)
    manual = f"Download {url} yourself to {path}, or retry."
    logging.info("Downloading %s to %s", url, path)
    try:
        download_url(url, folder, partial)
    except Exception as err:  # network errors (URLError, HTTPError, timeouts), redirect loops, a full disk
        _remove(tmp)
        raise DownloadError(f"Could not download {url} ({type(err).__name__}: {err}). {manual}") from err
    except BaseException:  # an interrupted download leaves nothing behind
        _remove(tmp)
        raise
    actual = calculate_md5(tmp)
    if actual != md5:
        _remove(tmp)
        raise DownloadError(
            f"The file downloaded from {url} is corrupt: its MD5 is {actual}, expected {md5}; it was removed. {manual}"
        )
    os.replace(tmp, path)
    return path


def _extract(archive: str, root: str, files: tuple) -> None:
    """Extract archive (torchvision's extract_archive) into a private folder under root, then move its
    top-level entries into root (an entry another process already put there is kept)."""
    import shutil

    from torchvision.datasets.utils import extract_archive

    staging = os.path.join(root, f".extract.{os.getpid()}")
    try:
        extract_archive(archive, staging)
        for entry in os.listdir(staging):
            target = os.path.join(root, entry)
            if os.path.isdir(target) and all(os.path.isfile(os.path.join(root, f)) for f in files):
                continue
            if os.path.isdir(target):
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.replace(os.path.join(staging, entry), target)
            except OSError:  # another process (a data-parallel rank) moved its copy in first
                if not all(os.path.isfile(os.path.join(root, f)) for f in files):
                    raise
    except (OSError, EOFError, tarfile.TarError) as err:
        raise DownloadError(f"Could not extract {archive} into {root} ({err}); delete it and retry.") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise DownloadError(f"{archive} did not hold {', '.join(missing)}; delete it and retry.")


def ensure_downloaded(name: str, root: str, download: bool | None = None) -> bool:
    """Fetch and extract a public dataset (DOWNLOADS: CIFAR10, STL10) into root when its files are missing
    and downloads are enabled; True if something was fetched or extracted.

    An archive already in root is kept when its MD5 is right (CIFAR-10's is then read as it is) and fetched
    again when it is not.
    """
    spec = DOWNLOADS.get(name)
    if spec is None or all(os.path.isfile(os.path.join(root, f)) for f in spec.files):
        return False
    if not downloads_enabled(download):
        return False
    from torchvision.datasets.utils import check_integrity

    archive = os.path.join(root, spec.filename)
    intact = check_integrity(archive, spec.md5)
    if intact and spec.readable_archive:
        return False
    os.makedirs(root, exist_ok=True)
    if not intact:
        if os.path.exists(archive):
            logging.warning("%s: %s fails its MD5 check; downloading it again.", name, archive)
        download_file(spec.url, archive, spec.md5)
    logging.info("%s: extracting %s into %s", name, archive, root)
    _extract(archive, root, spec.files)
    return True


# ----------------------------------------------------------------------------------------------------
# Public entry points


def data_root(config) -> str:
    """Dataset directory: config.data.root if set, else $SCORE_SDE_DATA/<dataset>, else ./data/<dataset>."""
    config = complete_config(config)
    root = config.data.root
    if root:
        return os.path.expanduser(str(root))
    base = os.environ.get("SCORE_SDE_DATA", "")
    return os.path.join(os.path.expanduser(base) if base else "data", config.data.dataset)


def _dequantization(config, uniform_dequantization: bool) -> bool:
    """Dequantize if asked: argument, data.uniform_dequantization, or data.dequantization == 'uniform'."""
    config = complete_config(config)
    mode = config.data.dequantization
    if mode not in ("none", "uniform"):
        raise ValueError(f"config.data.dequantization must be 'none' or 'uniform', got {mode!r}")
    return bool(uniform_dequantization or config.data.uniform_dequantization or mode == "uniform")


def _check_config(config) -> str:
    """Validate the dataset name and num_channels; return the name."""
    name = config.data.dataset
    if name not in DATASETS:
        raise ValueError(f"unknown config.data.dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    channels = config.data.num_channels
    if channels != 3:
        raise ValueError(f"config.data.num_channels must be 3 for {name} (RGB images), got {channels}")
    if int(config.data.image_size) < 1:
        raise ValueError(f"config.data.image_size must be positive, got {config.data.image_size}")
    return name


# score_sde's preprocessing of each folder / LMDB dataset (crop, resize filter); LSUN at 128 px differs.
_DEFAULT_PREPROCESSING = {
    "CelebAHQ": ("center", "box"),
    "FFHQ": ("center", "box"),
    "LSUN": ("center", "bicubic"),
    "IMAGE_FOLDER": ("center", "bicubic"),
}


def _preprocessing(config, name: str) -> tuple[str, str]:
    """(crop, resize filter) of a folder / LMDB dataset: config.data.crop / resize_filter, else its default."""
    default = _DEFAULT_PREPROCESSING[name]
    if name == "LSUN" and int(config.data.image_size) == 128:
        default = ("short_side", "bilinear")  # score_sde: resize_small then central_crop at 128 px
    crop = config.data.crop or default[0]
    resize_filter = config.data.resize_filter or default[1]
    if crop not in CROP_MODES:
        raise ValueError(f"config.data.crop must be '' (the dataset's default) or one of {CROP_MODES}; got {crop!r}")
    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(
            f"config.data.resize_filter must be '' (the dataset's default) or one of {RESIZE_FILTERS}; "
            f"got {resize_filter!r}"
        )
    return crop, resize_filter


def _lsun_category(config) -> str:
    """config.data.category, required for LSUN."""
    category = config.data.category
    if not isinstance(category, str) or not category:
        raise ValueError(
            "config.data.category must name the LSUN category for data.dataset = 'LSUN' (e.g. 'bedroom' or "
            f"'church_outdoor', as score_sde's configs); got {category!r}"
        )
    return category


def _lsun_dataset(source: tuple, size: int, flip: bool, dequantize: bool, kw: dict) -> ImageDataset:
    """The ImageDataset of one LSUN split from _read_lsun: an LMDB database or an image folder."""
    common = {"random_flip": flip, "uniform_dequantization": dequantize, **kw}
    if source[0] == "lmdb":
        return LMDBImageDataset(source[1], source[2], size, **common)
    return FileImageDataset(source[1], np.full(len(source[1]), -1), size, **common)


def _build(config, splits: tuple, flip: tuple, dequantize: bool) -> list:
    """The requested splits ('train' / 'eval') of config.data.dataset as ImageDatasets (the data factory:
    the one reader of config.data, completed with configs.defaults)."""
    config = complete_config(config)
    name = _check_config(config)
    size = int(config.data.image_size)
    root = data_root(config)

    def arrays(source, which, **kw):
        images, labels = source
        arrays_ = images if isinstance(images, list) else [images]
        return ArrayImageDataset(arrays_, labels, size, random_flip=which, uniform_dequantization=dequantize, **kw)

    if name == "SHAPES":
        seed = int(config.data.shapes_seed)
        counts = {
            "train": int(config.data.num_train),
            "eval": int(config.data.num_eval or SHAPES_NUM_EVAL),
        }
        out = []
        for split, f in zip(splits, flip):
            if counts[split] < 1:
                raise ValueError(f"config.data.num_{split} must be positive for SHAPES, got {counts[split]}")
            images, labels = make_shapes(counts[split], size, seed=[seed, 0 if split == "train" else 1])
            out.append(arrays((images, labels), f))
        return out
    if name in ("CIFAR10", "IMAGENET32", "STL10"):
        ensure_downloaded(name, root, config.data.download)
        reader = {"CIFAR10": _read_cifar10, "IMAGENET32": _read_imagenet32, "STL10": _read_stl10}[name]
        sources = dict(zip(("train", "eval"), reader(root)))
        decode = stl10_decode if name == "STL10" else None
        return [arrays(sources[s], f, decode=decode) for s, f in zip(splits, flip)]
    if name == "CELEBA":
        files = dict(zip(("train", "eval"), _read_celeba(root)))
        kw = {"crop": _CELEBA_CROP, "resize_mode": "bilinear"}
    else:
        crop, resize_filter = _preprocessing(config, name)
        kw = {"crop": crop, "resize_mode": resize_filter}
        if name == "LSUN":
            sources = dict(zip(("train", "eval"), _read_lsun(root, _lsun_category(config))))
            return [_lsun_dataset(sources[s], size, f, dequantize, kw) for s, f in zip(splits, flip)]
        num_eval = int(config.data.num_eval or FOLDER_NUM_EVAL)
        files = dict(zip(("train", "eval"), _read_image_folder(name, root, num_eval, config.data.eval_root)))
    return [
        FileImageDataset(
            files[s], np.full(len(files[s]), -1), size, random_flip=f, uniform_dequantization=dequantize, **kw
        )
        for s, f in zip(splits, flip)
    ]


def get_train_dataset(config, uniform_dequantization: bool = False) -> ImageDataset:
    """Random-access training set with the training augmentation (config.data.random_flip, dequantization).

    Use dataset.get_batch(indices, augment=True) -> float32 [n, C, H, W] in [0, 1] to draw training images.
    """
    flip = bool(config.data.random_flip)
    return _build(config, ("train",), (flip,), _dequantization(config, uniform_dequantization))[0]


def get_eval_dataset(config, uniform_dequantization: bool = False) -> ImageDataset:
    """Random-access evaluation set (never flipped; dequantized when asked)."""
    return _build(config, ("eval",), (False,), _dequantization(config, uniform_dequantization))[0]


def _pin_memory(config) -> bool:
    """pin_memory when config.device is a CUDA device."""
    device = config.device
    return device is not None and torch.device(device).type == "cuda"


def get_dataset(
    config, uniform_dequantization: bool = False, evaluation: bool = False
) -> tuple[DataLoader, DataLoader, None]:
    """Training and evaluation DataLoaders (train_ds, eval_ds, None) yielding {'image', 'label'} dicts.

    Args:
      config: the ml_collections config (data / training / eval sections).
      uniform_dequantization: add U[0, 1) / 256 noise to the 8-bit values (both loaders).
      evaluation: use config.eval.batch_size and no random flip (as score_sde).

    Training (run_lib.train) draws its batches from get_train_dataset through run_lib.TrainStream; this
    training loader is score_sde's API for notebooks and scripts.
    """
    config = complete_config(config)
    batch_size = int(config.eval.batch_size if evaluation else config.training.batch_size)
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be positive")
    local_batch = batch_size
    flip = bool(config.data.random_flip) and not evaluation
    train_set, eval_set = _build(
        config, ("train", "eval"), (flip, False), _dequantization(config, uniform_dequantization)
    )
    if len(train_set) < local_batch:
        raise ValueError(
            f"the {config.data.dataset} training set has {len(train_set)} images, fewer than one batch of "
            f"{local_batch}: lower config.training.batch_size (config.eval.batch_size if evaluating)"
        )
    seed = int(config.seed)
    sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(seed))
    num_workers = int(config.data.num_workers)
    common = {
        "num_workers": num_workers,
        "pin_memory": _pin_memory(config),
        "persistent_workers": num_workers > 0,
    }
    train_ds = DataLoader(
        train_set,
        batch_size=local_batch,
        sampler=sampler,
        drop_last=True,
        collate_fn=train_set.collate,
        **common,
    )
    eval_ds = DataLoader(
        eval_set, batch_size=batch_size, shuffle=False, drop_last=False, collate_fn=eval_set.collate, **common
    )
    return train_ds, eval_ds, None
