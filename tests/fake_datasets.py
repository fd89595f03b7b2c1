"""Tiny dataset files in the real on-disk formats (see datasets.py's module docstring), for end-to-end tests.

Each writer fills `root` (the dataset directory, i.e. $SCORE_SDE_DATA/<name>) with a few seeded random images and
returns the number of (train, eval) images it wrote.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar10(root: Path, per_batch: int = 2, n_test: int = 2, seed: int = 0) -> tuple[int, int]:
    """cifar-10-batches-py/{data_batch_1..5, test_batch}: pickled dicts (b'data' N x 3072 uint8 CHW, b'labels')."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]
    for name, n in names:
        batch = {
            b"batch_label": f"fake {name}".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        # the released batches were pickled by Python 2 / numpy 1 and name numpy.core.multiarray
        raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(raw)
    return 5 * per_batch, n_test


def write_celeba(root: Path, n_train: int = 2, n_valid: int = 2, n_test: int = 1, seed: int = 0) -> tuple[int, int]:
    """img_align_celeba/NNNNNN.jpg (178 wide x 218 high) and list_eval_partition.txt ('<file> <0|1|2>')."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "img_align_celeba"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    splits = [0] * n_train + [1] * n_valid + [2] * n_test
    for i, split in enumerate(splits, 1):
        name = f"{i:06d}.jpg"
        pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, quality=90)
        lines.append(f"{name} {split}\n")
    (Path(root) / "list_eval_partition.txt").write_text("".join(lines))
    return n_train, n_valid


def write_imagenet32(root: Path, per_batch: int = 1, n_valid: int = 2, seed: int = 0) -> tuple[int, int]:
    """Imagenet32_train_npz/train_data_batch_1..10.npz, Imagenet32_val_npz/val_data.npz ('data', 'labels' 1-based)."""
    rng = np.random.default_rng(seed)
    train_dir, val_dir = Path(root) / "Imagenet32_train_npz", Path(root) / "Imagenet32_val_npz"
    train_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)

    def arrays(n: int) -> dict:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        return dict(data=data, labels=rng.integers(1, 1001, n).tolist(), mean=np.zeros(3072))

    for i in range(1, 11):
        np.savez(train_dir / f"train_data_batch_{i}.npz", **arrays(per_batch))
    np.savez(val_dir / "val_data.npz", **arrays(n_valid))
    return 10 * per_batch, n_valid


def write_celebahq(root: Path, n_images: int = 1001, size: int = 256, seed: int = 0) -> tuple[int, int]:
    """celeba_hq_256/NNNNN.png, size x size RGB. CelebAHQ evaluates on the last data.num_eval (default 1000) images,
    which must leave at least one more, hence 1001 by default; only the first few carry random pixels (the rest are
    flat colours, which compress to almost nothing)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "celeba_hq_256"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        Image.fromarray(_face_pixels(rng, i, size)).save(folder / f"{i:05d}.png", compress_level=1)
    return n_images, min(n_images - 1, 1000)


def _face_pixels(rng: np.random.Generator, i: int, size: int) -> np.ndarray:
    """Image i of a fake face folder: random noise for the first four, a flat random colour after that."""
    if i < 4:
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return np.full((size, size, 3), rng.integers(0, 256, 3, dtype=np.uint8), dtype=np.uint8)


def write_lmdb(folder: Path, items: dict) -> None:
    """An LMDB database folder (data.mdb, lock.mdb) holding items {key bytes: value bytes}, written with `lmdb`."""
    import lmdb

    Path(folder).mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(folder), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key, value)
    env.close()


def encode_image(pixels: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    """HWC uint8 pixels encoded by Pillow (LSUN's databases hold JPEG of quality 75)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def lsun_key(category: str, split: str, i: int) -> bytes:
    """A key like LSUN's: 40 lowercase hex digits (the image id), ASCII."""
    return hashlib.sha1(f"{category}/{split}/{i}".encode()).hexdigest().encode("ascii")


def write_lsun(
    root: Path,
    categories: tuple = ("bedroom", "church_outdoor"),
    n_train: int = 3,
    n_val: int = 2,
    shape: tuple = (256, 320),
    seed: int = 0,
) -> tuple[int, int]:
    """The official LSUN export, unzipped: <category>_{train,val}_lmdb/ LMDB databases whose values are JPEG
    (quality 75) images with the short side 256 (the LSUN release) and keys their 40-hex-digit ids."""
    rng = np.random.default_rng(seed)
    for category in categories:
        for split, n in (("train", n_train), ("val", n_val)):
            items = {}
            for i in range(n):
                pixels = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
                items[lsun_key(category, split, i)] = encode_image(pixels, "JPEG", quality=75)
            write_lmdb(Path(root) / f"{category}_{split}_lmdb", items)
    return n_train, n_val


def write_ffhq(root: Path, n_images: int = 1001, size: int = 256, seed: int = 0) -> tuple[int, int]:
    """images1024x1024/NNNNN/MMMMM.png as the ffhq-dataset release (one subfolder per thousand), size x size
    (1024 in the release); like write_celebahq, 1001 images of which the first 4 carry random pixels."""
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        folder = Path(root) / "images1024x1024" / f"{i // 1000 * 1000:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_face_pixels(rng, i, size)).save(folder / f"{i:05d}.png", compress_level=1)
    return n_images, min(n_images - 1, 1000)


WRITERS = {
    "CIFAR10": write_cifar10,
    "CELEBA": write_celeba,
    "IMAGENET32": write_imagenet32,
    "CelebAHQ": write_celebahq,
    "LSUN": write_lsun,
    "FFHQ": write_ffhq,
}


def write_dataset(data_dir: Path, name: str) -> tuple[int, int]:
    """Write the fake `name` dataset into data_dir/name (the layout $SCORE_SDE_DATA=data_dir expects)."""
    root = Path(data_dir) / name
    os.makedirs(root, exist_ok=True)
    return WRITERS[name](root)
