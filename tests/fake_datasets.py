"""Tiny dataset files in the real on-disk formats (see datasets.py's module docstring), for end-to-end tests.

Each writer fills `root` (the dataset directory, i.e. $SCORE_SDE_DATA/<name>) with a few seeded random images and
returns the number of (train, eval) images it wrote.
"""

from __future__ import annotations

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
        if i < 4:
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        else:
            pixels = np.full((size, size, 3), rng.integers(0, 256, 3, dtype=np.uint8), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png", compress_level=1)
    return n_images, min(n_images - 1, 1000)


WRITERS = {
    "CIFAR10": write_cifar10,
    "CELEBA": write_celeba,
    "IMAGENET32": write_imagenet32,
    "CelebAHQ": write_celebahq,
}


def write_dataset(data_dir: Path, name: str) -> tuple[int, int]:
    """Write the fake `name` dataset into data_dir/name (the layout $SCORE_SDE_DATA=data_dir expects)."""
    root = Path(data_dir) / name
    os.makedirs(root, exist_ok=True)
    return WRITERS[name](root)
