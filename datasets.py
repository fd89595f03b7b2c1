"""Training and evaluation data as torch DataLoaders, with score_sde's API (no TensorFlow).

    train_ds, eval_ds, _ = get_dataset(config, uniform_dequantization=False, evaluation=False)
    batch = next(iter(train_ds))  # {'image': float32 [B, C, H, W] in [0, 1], 'label': int64 [B]}

Both loaders yield dicts {'image', 'label'}; get_data_scaler(config) maps [0, 1] to the model's range.
Images are kept as uint8 (in memory, memory-mapped, or decoded from their files on demand) and converted
to float32 once per batch, which is also where the random horizontal flip (training loader only, when
config.data.random_flip) and the uniform dequantization x = (k + u) / 256, u ~ U[0, 1), happen; without
dequantization x = k / 255. Images without a class label (CELEBA, CelebAHQ, unlabeled STL10) get label -1.

Loaders. The training loader reshuffles every epoch (its torch.Generator is seeded with config.seed, so
the order is reproducible) and drops the last incomplete batch. get_dataset(..., rank=r, world_size=w)
with w > 1 shards the training set with a DistributedSampler; each rank's batch is then
config.training.batch_size // w (the config's batch size stays the global one and must be divisible by w).
The evaluation loader neither shuffles nor drops (every evaluation image once, in a fixed order) and is
not sharded. Batch size: config.training.batch_size, or config.eval.batch_size for both loaders when
evaluation=True (as score_sde). infinite_loader(loader) draws batches forever (calling set_epoch on a
DistributedSampler each epoch). config.data.num_workers (default 0) worker processes; pin_memory when
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
  CELEBA      img_align_celeba/*.jpg and list_eval_partition.txt (in the directory or in Eval/).
              Train: partition 0 (162770 images); eval: partition 1, the validation split (19867), as
              score_sde's tfds 'validation'. Each 178x218 jpg is centre-cropped to 140x140 (39 rows from
              the top, 19 columns from the left) and resized to image_size (64) with antialiased bilinear
              filtering, as score_sde; unlike score_sde (which kept floats) the result is rounded to uint8,
              so the data stay 8-bit. Decoded on demand (use config.data.num_workers > 0 for speed).
  CelebAHQ    a folder of png/jpg images of any size (e.g. celeba_hq_256/*.png), searched recursively and
              sorted by relative path. Non-square images are centre-cropped to a square; images of another
              size than image_size are resized with antialiased bicubic filtering (score_sde's
              crop_resize). Train: all images (score_sde used one record file for both training and
              evaluation); eval: the last config.data.num_eval (default 1000) images in sorted order
              (so they are also in the training set).
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
              bilinear filtering when drawn.
  SHAPES      no files: the embedded demo set, generated procedurally and deterministically (make_shapes):
              RGB images of one or two filled, anti-aliased, coloured disks / squares / triangles on a
              light grey background; config.data.num_train (default 4096) training and
              config.data.num_eval (default 1024) evaluation images from config.data.shapes_seed
              (default 0). Label: the kind of the first shape (0 disk, 1 square, 2 triangle).

Config fields read: data.dataset, data.image_size, data.num_channels (must be 3), data.centered,
data.random_flip, data.uniform_dequantization (optional, default False) and the Soft Truncation field
data.dequantization ('none' | 'uniform', optional), data.root (optional, default ''), data.num_workers
(optional, default 0), data.num_train / data.num_eval / data.shapes_seed (optional, see above),
training.batch_size, eval.batch_size, seed (optional, default 0), device (optional).
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
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

DATASETS = ("CIFAR10", "CELEBA", "CelebAHQ", "IMAGENET32", "STL10", "SHAPES")

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
}

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
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


def resize_uint8(images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Antialiased resize uint8 [n, C, h, w] -> [n, C, size, size] (filter applied to k / 255, rounded)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    x = images.float() / 255.0
    x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


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
    """Images decoded from files on fetch: RGB, centre crop (crop=None: to the short side), resize."""

    def __init__(
        self,
        paths: list,
        labels: np.ndarray,
        image_size: int,
        crop: int | None = None,
        resize_mode: str = "bilinear",
        random_flip: bool = False,
        uniform_dequantization: bool = False,
    ) -> None:
        super().__init__(image_size, random_flip, uniform_dequantization)
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.labels)} labels for {len(self.paths)} images")
        self.crop = crop
        self.resize_mode = resize_mode

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, path: str) -> torch.Tensor:
        """One image file -> uint8 [3, image_size, image_size] (decode, crop, resize)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(f"image file {path} is missing (listed in the dataset, not on disk)") from None
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot decode image file {path} ({err}); replace the corrupt file") from None
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)
        crop = self.crop if self.crop is not None else min(image.shape[-2:])
        image = center_crop(image, crop)
        return resize_uint8(image[None], self.image_size, self.resize_mode)[0]

    def fetch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([self.load(self.paths[i]) for i in indices])
        return images, torch.from_numpy(self.labels[indices])


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
    """The error for a missing dataset: expected path(s), format and download source."""
    return FileNotFoundError(
        f"{name} not found: expected {expected} under the dataset directory {os.path.abspath(root)}. "
        f"Download the {_SOURCES[name]}, or point config.data.root (or $SCORE_SDE_DATA/{name}) to it."
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


def _read_celebahq(root: str, num_eval: int):
    """CelebA-HQ image paths: all (train) and the last num_eval in sorted order (eval)."""
    if not os.path.isdir(root):
        raise _missing("CelebAHQ", root, "a folder of .png/.jpg images (e.g. celeba_hq_256/*.png)")
    paths = sorted(
        p
        for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
        if p.lower().endswith(_IMAGE_EXTENSIONS) and os.path.isfile(p)
    )
    if not paths:
        raise _missing("CelebAHQ", root, "a folder of .png/.jpg images (none found)")
    if not 0 < num_eval < len(paths):
        raise ValueError(
            f"config.data.num_eval = {num_eval} must be in [1, {len(paths) - 1}] for the {len(paths)} "
            f"CelebAHQ images found under {root}"
        )
    return paths, paths[-num_eval:]


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
# Public entry points


def data_root(config) -> str:
    """Dataset directory: config.data.root if set, else $SCORE_SDE_DATA/<dataset>, else ./data/<dataset>."""
    root = config.data.get("root", "") or ""
    if root:
        return os.path.expanduser(str(root))
    base = os.environ.get("SCORE_SDE_DATA", "")
    return os.path.join(os.path.expanduser(base) if base else "data", config.data.dataset)


def _dequantization(config, uniform_dequantization: bool) -> bool:
    """Dequantize if asked: argument, data.uniform_dequantization, or data.dequantization == 'uniform'."""
    mode = config.data.get("dequantization", "none")
    if mode not in ("none", "uniform"):
        raise ValueError(f"config.data.dequantization must be 'none' or 'uniform', got {mode!r}")
    return bool(uniform_dequantization or config.data.get("uniform_dequantization", False) or mode == "uniform")


def _check_config(config) -> str:
    """Validate the dataset name and num_channels; return the name."""
    name = config.data.dataset
    if name not in DATASETS:
        raise ValueError(f"unknown config.data.dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    channels = config.data.get("num_channels", 3)
    if channels != 3:
        raise ValueError(f"config.data.num_channels must be 3 for {name} (RGB images), got {channels}")
    if int(config.data.image_size) < 1:
        raise ValueError(f"config.data.image_size must be positive, got {config.data.image_size}")
    return name


def _build(config, splits: tuple, flip: tuple, dequantize: bool) -> list:
    """The requested splits ('train' / 'eval') of config.data.dataset as ImageDatasets."""
    name = _check_config(config)
    size = int(config.data.image_size)
    root = data_root(config)

    def arrays(source, which, **kw):
        images, labels = source
        arrays_ = images if isinstance(images, list) else [images]
        return ArrayImageDataset(arrays_, labels, size, random_flip=which, uniform_dequantization=dequantize, **kw)

    if name == "SHAPES":
        seed = int(config.data.get("shapes_seed", 0))
        counts = {
            "train": int(config.data.get("num_train", 4096)),
            "eval": int(config.data.get("num_eval", 1024)),
        }
        out = []
        for split, f in zip(splits, flip):
            if counts[split] < 1:
                raise ValueError(f"config.data.num_{split} must be positive for SHAPES, got {counts[split]}")
            images, labels = make_shapes(counts[split], size, seed=[seed, 0 if split == "train" else 1])
            out.append(arrays((images, labels), f))
        return out
    if name in ("CIFAR10", "IMAGENET32", "STL10"):
        reader = {"CIFAR10": _read_cifar10, "IMAGENET32": _read_imagenet32, "STL10": _read_stl10}[name]
        sources = dict(zip(("train", "eval"), reader(root)))
        decode = stl10_decode if name == "STL10" else None
        return [arrays(sources[s], f, decode=decode) for s, f in zip(splits, flip)]
    if name == "CELEBA":
        files = dict(zip(("train", "eval"), _read_celeba(root)))
        kw = {"crop": _CELEBA_CROP, "resize_mode": "bilinear"}
    else:  # CelebAHQ
        files = dict(zip(("train", "eval"), _read_celebahq(root, int(config.data.get("num_eval", 1000)))))
        kw = {"crop": None, "resize_mode": "bicubic"}
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
    device = config.get("device", None)
    return device is not None and torch.device(device).type == "cuda"


def get_dataset(
    config, uniform_dequantization: bool = False, evaluation: bool = False, rank: int = 0, world_size: int = 1
) -> tuple[DataLoader, DataLoader, None]:
    """Training and evaluation DataLoaders (train_ds, eval_ds, None) yielding {'image', 'label'} dicts.

    Args:
      config: the ml_collections config (data / training / eval sections).
      uniform_dequantization: add U[0, 1) / 256 noise to the 8-bit values (both loaders).
      evaluation: use config.eval.batch_size and no random flip (as score_sde).
      rank, world_size: data-parallel rank; world_size > 1 shards the training set (DistributedSampler).
    """
    batch_size = int(config.eval.batch_size if evaluation else config.training.batch_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"batch size {batch_size} must be a positive multiple of world_size={world_size}")
    local_batch = batch_size // world_size
    flip = bool(config.data.random_flip) and not evaluation
    train_set, eval_set = _build(
        config, ("train", "eval"), (flip, False), _dequantization(config, uniform_dequantization)
    )
    if len(train_set) // world_size < local_batch:
        raise ValueError(
            f"the {config.data.dataset} training set has {len(train_set)} images, fewer than one batch of "
            f"{local_batch} per rank: lower config.training.batch_size (config.eval.batch_size if evaluating)"
        )
    seed = int(config.get("seed", 0))
    if world_size > 1:
        sampler = DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(seed))
    num_workers = int(config.data.get("num_workers", 0))
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


def infinite_loader(loader: DataLoader) -> Iterator[dict]:
    """Yield the loader's batches forever, epoch after epoch (calling set_epoch on a DistributedSampler)."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data loader yields no batch (dataset smaller than one batch?)")
        epoch += 1
