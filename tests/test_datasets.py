"""Tests for datasets.py: every dataset format is written in miniature under tmp_path and read back."""

import copy
import io
import math
import os
import pickle
import tarfile

import fake_datasets
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

import datasets

# ------------------------------------------------------------------------------------------------------------
# Helpers


def make_config(dataset, root="", image_size=32, batch_size=4, eval_batch_size=3, **data_fields):
    """A minimal score_sde-style config."""
    data = {
        "dataset": dataset,
        "image_size": image_size,
        "num_channels": 3,
        "centered": False,
        "random_flip": False,
        "uniform_dequantization": False,
        "root": str(root),
        "num_workers": 0,
    }
    data.update(data_fields)
    return ml_collections.ConfigDict(
        {
            "data": data,
            "training": {"batch_size": batch_size},
            "eval": {"batch_size": eval_batch_size},
            "seed": 0,
            "device": torch.device("cpu"),
        }
    )


def triangle_resize_reference(images, size):
    """Independent NumPy antialiased bilinear resize (rounded to integers).

    Output pixel i averages the inputs with a triangle filter of half-width max(scale, 1) input pixels centred
    at (i + 0.5) * scale, weights renormalised at the borders, applied to k / 255.
    """

    def weights(n_in, n_out):
        scale = n_in / n_out
        support = max(scale, 1.0)
        centres = (np.arange(n_out) + 0.5) * scale
        w = np.clip(1 - np.abs((np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / support), 0, None)
        return w / w.sum(axis=1, keepdims=True)

    h, w = images.shape[-2:]
    out = np.einsum("ij,...jk,lk->...il", weights(h, size), images / 255.0, weights(w, size))
    return np.clip(np.round(out * 255), 0, 255)


def all_batches(loader):
    """Concatenate a loader's images and labels."""
    images, labels = [], []
    for batch in loader:
        images.append(batch["image"])
        labels.append(batch["label"])
    return torch.cat(images), torch.cat(labels)


def write_cifar(folder, n_train_per_batch=3, n_test=4, seed=0):
    """CIFAR-10 python batches (dicts: b'data' N x 3072 uint8 CHW, b'labels'); returns what was written."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    written = {}
    for name, n in [(f"data_batch_{i}", n_train_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [b"x.png"] * n,
        }
        # the released files were written by Python 2 and name numpy.core.multiarray (numpy._core in numpy 2)
        raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        with open(os.path.join(folder, name), "wb") as f:
            f.write(raw)
        written[name] = (data, labels)
    return written


# ------------------------------------------------------------------------------------------------------------
# Scalers


def test_scaler_and_inverse():
    x = torch.tensor([0.0, 0.25, 1.0])
    centered = make_config("SHAPES", centered=True)
    assert torch.allclose(datasets.get_data_scaler(centered)(x), torch.tensor([-1.0, -0.5, 1.0]))
    assert torch.allclose(datasets.get_data_inverse_scaler(centered)(datasets.get_data_scaler(centered)(x)), x)
    plain = make_config("SHAPES", centered=False)
    assert torch.equal(datasets.get_data_scaler(plain)(x), x)
    assert torch.equal(datasets.get_data_inverse_scaler(plain)(x), x)


# ------------------------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_pickles_decode_chw_labels_and_splits(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    config = make_config("CIFAR10", tmp_path)
    train = datasets.get_train_dataset(config)
    evals = datasets.get_eval_dataset(config)
    assert len(train) == 15 and len(evals) == 4
    # image 4 of the training set is row 1 of data_batch_2: 3072 bytes = R plane, G plane, B plane (row-major)
    data, labels = written["data_batch_2"]
    image, label = train[4]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert torch.equal(image, torch.from_numpy(data[1].reshape(3, 32, 32)))
    assert image[1, 2, 5] == data[1][1024 + 2 * 32 + 5]
    assert label == labels[1]
    test_data, test_labels = written["test_batch"]
    batch = evals.get_batch([3], augment=False)
    assert torch.equal(batch[0], torch.from_numpy(test_data[3].reshape(3, 32, 32)).float() / 255)
    assert evals[3][1] == test_labels[3]

    train_ds, eval_ds, builder = datasets.get_dataset(config)
    assert builder is None
    images, labels = all_batches(train_ds)
    assert images.shape == (12, 3, 32, 32)  # 15 images, batch 4: the incomplete batch is dropped
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert 0.0 <= images.min() and images.max() <= 1.0
    eval_images, eval_labels = all_batches(eval_ds)
    assert eval_images.shape == (4, 3, 32, 32)  # evaluation keeps every image, in order
    expected = torch.from_numpy(test_data.reshape(-1, 3, 32, 32)).float() / 255
    assert torch.equal(eval_images, expected)
    assert eval_labels.tolist() == test_labels


def test_score_sde_batch_idiom(tmp_path):
    """score_sde's scripts read batch['image']._numpy() (TF, NHWC) and permute to NCHW: it gives our images."""
    write_cifar(tmp_path / "cifar-10-batches-py", n_train_per_batch=3, n_test=4)
    _, eval_ds, _ = datasets.get_dataset(make_config("CIFAR10", tmp_path), uniform_dequantization=True, evaluation=True)
    batch = next(iter(eval_ds))
    img = batch["image"]._numpy()
    n = batch["image"].shape[0]
    assert isinstance(img, np.ndarray) and img.shape == (n, 32, 32, 3) and img.dtype == np.float32
    assert torch.equal(torch.from_numpy(img).permute(0, 3, 1, 2), batch["image"])
    assert img[2, 5, 7, 1] == float(batch["image"][2, 1, 5, 7])
    clone = copy.copy(batch)  # what DataLoader's pin_memory does to a mapping
    assert torch.equal(torch.from_numpy(clone["image"]._numpy()).permute(0, 3, 1, 2), batch["image"])


def test_cifar10_tar_gz_equals_extracted(tmp_path):
    write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    archive_root = tmp_path / "archive"
    archive_root.mkdir()
    with tarfile.open(archive_root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_dir = datasets.get_train_dataset(make_config("CIFAR10", tmp_path / "src"))
    from_tar = datasets.get_train_dataset(make_config("CIFAR10", archive_root))
    idx = list(range(15))
    assert torch.equal(from_dir.get_batch(idx, augment=False), from_tar.get_batch(idx, augment=False))
    assert os.listdir(archive_root) == ["cifar-10-python.tar.gz"]  # nothing extracted


def test_cifar10_resize_to_other_image_size(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    train = datasets.get_train_dataset(make_config("CIFAR10", tmp_path, image_size=16))
    image = train[0][0].numpy()
    expected = triangle_resize_reference(written["data_batch_1"][0][0].reshape(3, 32, 32).astype(float), 16)
    assert image.shape == (3, 16, 16)
    assert np.abs(image - expected).max() <= 1  # rounding of the float result


def test_cifar10_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        datasets.get_dataset(make_config("CIFAR10", tmp_path / "nowhere"))
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg

    folder = tmp_path / "bad" / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="data_batch_3.*not a CIFAR-10 python batch"):
        datasets.get_train_dataset(make_config("CIFAR10", tmp_path / "bad"))

    # wrong shape
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="N x 3072 uint8"):
        datasets.get_train_dataset(make_config("CIFAR10", tmp_path / "bad"))

    # a pickle that would run code is refused, not executed
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": os.getcwd, b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing"):
        datasets.get_train_dataset(make_config("CIFAR10", tmp_path / "bad"))


# ------------------------------------------------------------------------------------------------------------
# Augmentation, dequantization, loaders


def test_flip_only_in_training_and_both_orientations(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", n_train_per_batch=8, n_test=16)
    config = make_config("CIFAR10", tmp_path, random_flip=True, batch_size=8, eval_batch_size=16)
    train_ds, eval_ds, _ = datasets.get_dataset(config)
    plain = train_ds.dataset.get_batch(list(range(40)), augment=False)
    torch.manual_seed(0)
    flipped = unflipped = 0
    for _ in range(3):
        for batch in train_ds:
            images = batch["image"].flatten(1)
            match = (images[:, None] == plain.flatten(1)[None]).all(-1).any(1)
            match_flip = (images[:, None] == plain.flip(-1).flatten(1)[None]).all(-1).any(1)
            assert torch.all(match | match_flip)  # every image is an original or its mirror
            flipped += int((match_flip & ~match).sum())
            unflipped += int((match & ~match_flip).sum())
    n = flipped + unflipped
    assert n == 3 * 40
    assert abs(flipped / n - 0.5) < 4 * 0.5 / np.sqrt(n)  # Bernoulli(1/2), 4 standard deviations

    eval_plain = eval_ds.dataset.get_batch(list(range(16)), augment=False)
    for _ in range(3):
        assert torch.equal(all_batches(eval_ds)[0], eval_plain)  # never flipped
    # evaluation=True: no flip in the training loader either, and the eval batch size
    train_eval_mode, _, _ = datasets.get_dataset(config, evaluation=True)
    batch = next(iter(train_eval_mode))["image"]
    assert batch.shape[0] == 16
    assert all((img == plain).flatten(1).all(1).any() for img in batch)


def test_uniform_dequantization_range_and_mean(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    for config, arg in [
        (make_config("CIFAR10", tmp_path), True),
        (make_config("CIFAR10", tmp_path, uniform_dequantization=True), False),
        (make_config("CIFAR10", tmp_path, dequantization="uniform"), False),
    ]:
        train_ds, eval_ds, _ = datasets.get_dataset(config, uniform_dequantization=arg)
        k = eval_ds.dataset.get_batch(list(range(4)), augment=False) * 255  # exact integers
        torch.manual_seed(1)
        x = next(iter(eval_ds))["image"]  # eval data are dequantized too (likelihood evaluation)
        u = x * 256 - k
        assert torch.all(u >= -1e-4) and torch.all(u < 1 + 1e-4)  # x in [k / 256, (k + 1) / 256)
        assert abs(u.mean().item() - 0.5) < 4 * (1 / np.sqrt(12)) / np.sqrt(u.numel())
        assert abs(u.var().item() - 1 / 12) < 0.005
        assert 0 <= x.min() and x.max() < 1
    with pytest.raises(ValueError, match="dequantization"):
        datasets.get_dataset(make_config("CIFAR10", tmp_path, dequantization="lossless"))


def test_get_batch_with_augmentation(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    train = datasets.get_train_dataset(make_config("CIFAR10", tmp_path, random_flip=True))
    plain = train.get_batch(torch.arange(15), augment=False)
    g = torch.Generator().manual_seed(0)
    aug = train.get_batch(torch.arange(15).repeat(4), augment=True, generator=g)
    is_plain = (aug == plain.repeat(4, 1, 1, 1)).flatten(1).all(1)
    is_flip = (aug == plain.flip(-1).repeat(4, 1, 1, 1)).flatten(1).all(1)
    assert torch.all(is_plain | is_flip) and is_flip.any() and (~is_flip).any()
    assert torch.equal(train.get_batch([-1], augment=False), plain[-1:])
    assert train.get_batch(torch.zeros(0, dtype=torch.int64)).shape == (0, 3, 32, 32)  # STF: no extras
    with pytest.raises(IndexError):
        train.get_batch([15])


def test_dataset_smaller_than_batch(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    with pytest.raises(ValueError, match="fewer than one batch"):
        datasets.get_dataset(make_config("CIFAR10", tmp_path, batch_size=32))


def test_worker_processes(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    config = make_config("CIFAR10", tmp_path, num_workers=1)
    _, eval_ds, _ = datasets.get_dataset(config)
    images, _ = all_batches(eval_ds)
    assert torch.equal(images, eval_ds.dataset.get_batch(list(range(4)), augment=False))


# ------------------------------------------------------------------------------------------------------------
# CelebA


def write_celeba(root, n=5, partition=(0, 0, 0, 1, 2), seed=0):
    """n smooth 218x178 RGB jpgs + list_eval_partition.txt; returns the decoded arrays (PIL)."""
    rng = np.random.default_rng(seed)
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:218, 0:178]
    decoded = []
    lines = []
    for i in range(n):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        img = np.stack([xx * a, yy * b, (xx + yy) * c / 2], axis=-1) % 256
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(img.astype(np.uint8)).save(folder / name, quality=95)
        decoded.append(np.asarray(Image.open(folder / name).convert("RGB")))
        lines.append(f"{name} {partition[i]}")
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return decoded


def test_celeba_split_crop_and_resize(tmp_path):
    decoded = write_celeba(tmp_path)
    config = make_config("CELEBA", tmp_path, image_size=140)
    train, evals = datasets.get_train_dataset(config), datasets.get_eval_dataset(config)
    assert len(train) == 3 and len(evals) == 1  # partition 0 / partition 1 (validation); test unused
    # 140x140 centre crop of a 218x178 image: rows 39..178, columns 19..158
    crop = decoded[1][39:179, 19:159].transpose(2, 0, 1)
    assert torch.equal(train[1][0], torch.from_numpy(crop.copy()))
    assert train[1][1] == -1
    assert torch.equal(evals[0][0], torch.from_numpy(decoded[3][39:179, 19:159].transpose(2, 0, 1).copy()))

    small = datasets.get_train_dataset(make_config("CELEBA", tmp_path, image_size=64))
    image = small[2][0].numpy()
    expected = triangle_resize_reference(decoded[2][39:179, 19:159].transpose(2, 0, 1).astype(float), 64)
    assert image.shape == (3, 64, 64) and np.abs(image - expected).max() <= 1

    loader, eval_loader, _ = datasets.get_dataset(make_config("CELEBA", tmp_path, image_size=64, batch_size=2))
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["label"].tolist() == [-1, -1]
    assert next(iter(eval_loader))["image"].shape == (1, 3, 64, 64)


def test_celeba_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="img_align_celeba.*mmlab.ie.cuhk.edu.hk"):
        datasets.get_dataset(make_config("CELEBA", tmp_path, image_size=64))
    decoded_root = tmp_path / "ok"
    write_celeba(decoded_root)
    (decoded_root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg seven\n")
    with pytest.raises(ValueError, match="line 2"):
        datasets.get_train_dataset(make_config("CELEBA", decoded_root, image_size=64))
    (decoded_root / "list_eval_partition.txt").write_text("000001.jpg 0\n000009.jpg 0\n000004.jpg 1\n")
    train = datasets.get_train_dataset(make_config("CELEBA", decoded_root, image_size=64))
    with pytest.raises(FileNotFoundError, match="000009.jpg"):
        train[1]
    (decoded_root / "img_align_celeba" / "000001.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="000001.jpg"):
        train[0]


# ------------------------------------------------------------------------------------------------------------
# CelebA-HQ


def test_celebahq_folder_split_and_crop(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "celeba_hq_256"
    folder.mkdir()
    arrays = {}
    for i in range(5):
        arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
        arrays[i] = arr
    # non-square: centre-cropped to 16x16 (columns 3..18)
    wide = rng.integers(0, 256, (16, 22, 3), dtype=np.uint8)
    Image.fromarray(wide).save(folder / "00005.png")
    config = make_config("CelebAHQ", tmp_path, image_size=16, num_eval=2)
    train, evals = datasets.get_train_dataset(config), datasets.get_eval_dataset(config)
    assert len(train) == 6 and len(evals) == 2
    assert torch.equal(train[2][0], torch.from_numpy(arrays[2].transpose(2, 0, 1).copy()))  # png: exact
    assert torch.equal(evals[0][0], torch.from_numpy(arrays[4].transpose(2, 0, 1).copy()))  # last 2 sorted
    assert torch.equal(evals[1][0], torch.from_numpy(wide[:, 3:19].transpose(2, 0, 1).copy()))
    down = datasets.get_train_dataset(make_config("CelebAHQ", tmp_path, image_size=8, num_eval=2))
    assert down[0][0].shape == (3, 8, 8)
    # bicubic antialiased downsampling preserves the mean of an image to within rounding / ringing
    assert abs(down[0][0].float().mean() - float(arrays[0].mean())) < 6
    with pytest.raises(ValueError, match="num_eval"):
        datasets.get_eval_dataset(make_config("CelebAHQ", tmp_path, image_size=16, num_eval=6))
    with pytest.raises(FileNotFoundError, match=r"\.png/\.jpg/\.webp images"):
        datasets.get_train_dataset(make_config("CelebAHQ", tmp_path / "empty", image_size=16))


# ------------------------------------------------------------------------------------------------------------
# ImageNet 32


def write_imagenet32(root, per_file=2, n_val=3, seed=0):
    """Ten training npz batches and the validation npz ('data' N x 3072 uint8 CHW, 'labels' 1-based)."""
    rng = np.random.default_rng(seed)
    (root / "Imagenet32_train_npz").mkdir(parents=True)
    (root / "Imagenet32_val_npz").mkdir()
    train = []
    for i in range(1, 11):
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(1, 1001, per_file)
        np.savez(root / "Imagenet32_train_npz" / f"train_data_batch_{i}.npz", data=data, labels=labels, mean=0)
        train.append((data, labels))
    val = (rng.integers(0, 256, (n_val, 3072), dtype=np.uint8), rng.integers(1, 1001, n_val))
    np.savez(root / "Imagenet32_val_npz" / "val_data.npz", data=val[0], labels=val[1])
    return train, val


def test_imagenet32_decode_labels_and_cache(tmp_path):
    train_files, val = write_imagenet32(tmp_path)
    config = make_config("IMAGENET32", tmp_path)
    train = datasets.get_train_dataset(config)
    assert len(train) == 20 and len(datasets.get_eval_dataset(config)) == 3
    data, labels = train_files[6]  # file 7, second image -> index 13
    image, label = train[13]
    assert torch.equal(image, torch.from_numpy(data[1].reshape(3, 32, 32)))
    assert image[2, 31, 0] == data[1][2048 + 31 * 32]
    assert label == labels[1] - 1  # 1-based -> 0-based
    ev = datasets.get_eval_dataset(config)
    assert torch.equal(ev[2][0], torch.from_numpy(val[0][2].reshape(3, 32, 32)))
    # the uint8 cache was written and is memory-mapped on the next load
    cache = tmp_path / "Imagenet32_train_npz" / ".train_cache_images.npy"
    assert cache.is_file() and np.load(cache).shape == (20, 3, 32, 32)
    again = datasets.get_train_dataset(config)
    assert isinstance(again.arrays[0], datasets._Memmap)
    assert torch.equal(again.get_batch(list(range(20)), augment=False), train.get_batch(list(range(20)), False))
    assert len(pickle.dumps(again)) < 10_000  # workers reopen the map instead of copying the images
    # a newer npz file invalidates the cache
    new = np.full((2, 3072), 7, dtype=np.uint8)
    np.savez(tmp_path / "Imagenet32_train_npz" / "train_data_batch_1.npz", data=new, labels=np.array([1, 2]))
    os.utime(cache, (1, 1))
    rebuilt = datasets.get_train_dataset(config)
    assert torch.all(rebuilt[0][0] == 7) and rebuilt[1][1] == 1


def test_imagenet32_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_data_batch_1.*train_32x32.*image-net.org"):
        datasets.get_train_dataset(make_config("IMAGENET32", tmp_path))
    write_imagenet32(tmp_path)
    np.savez(tmp_path / "Imagenet32_val_npz" / "val_data.npz", images=np.zeros(3))
    with pytest.raises(ValueError, match="val_data.npz.*not a downsampled-ImageNet npz"):
        datasets.get_eval_dataset(make_config("IMAGENET32", tmp_path))
    np.savez(tmp_path / "Imagenet32_val_npz" / "val_data.npz", data=np.zeros((2, 3072), np.uint8), labels=[0, 1])
    with pytest.raises(ValueError, match="1-based"):
        datasets.get_eval_dataset(make_config("IMAGENET32", tmp_path))


def test_imagenet32_png_folders(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in [("train_32x32", 4), ("valid_32x32", 2)]:
        (tmp_path / split).mkdir()
        for i in range(n):
            arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / split / f"{i:07d}.png")
            arrays[split, i] = arr
    config = make_config("IMAGENET32", tmp_path)
    train, evals = datasets.get_train_dataset(config), datasets.get_eval_dataset(config)
    assert len(train) == 4 and len(evals) == 2
    assert torch.equal(train[2][0], torch.from_numpy(arrays["train_32x32", 2].transpose(2, 0, 1).copy()))
    assert torch.equal(evals[1][0], torch.from_numpy(arrays["valid_32x32", 1].transpose(2, 0, 1).copy()))
    assert train[0][1] == -1
    assert (tmp_path / "train_32x32" / ".train_cache_images.npy").is_file()
    assert (tmp_path / "valid_32x32" / ".valid_cache_images.npy").is_file()
    assert isinstance(datasets.get_train_dataset(config).arrays[0], datasets._Memmap)
    Image.fromarray(arrays["train_32x32", 0][:16]).save(tmp_path / "train_32x32" / "0000009.png")
    with pytest.raises(ValueError, match="0000009.png.*expected a 32x32"):
        datasets.get_train_dataset(config)


# ------------------------------------------------------------------------------------------------------------
# STL-10


def write_stl10(root, n_train=2, n_unlabeled=3, n_test=2, seed=0):
    """stl10_binary/*.bin: uint8 images N x 3 x 96 x 96 with each channel written column-major."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    images = {}
    for name, n in [("train", n_train), ("unlabeled", n_unlabeled), ("test", n_test)]:
        imgs = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # [n, c, row, column]
        column_major = np.ascontiguousarray(imgs.transpose(0, 1, 3, 2))  # columns outermost within a channel
        (folder / f"{name}_X.bin").write_bytes(column_major.tobytes())
        images[name] = imgs
    (folder / "train_y.bin").write_bytes(np.array([3, 10], dtype=np.uint8).tobytes())
    return images


def test_stl10_column_major_split_and_resize(tmp_path):
    images = write_stl10(tmp_path)
    config = make_config("STL10", tmp_path, image_size=96)
    train, evals = datasets.get_train_dataset(config), datasets.get_eval_dataset(config)
    assert len(train) == 5 and len(evals) == 2  # train + unlabeled; test
    assert torch.equal(train[1][0], torch.from_numpy(images["train"][1]))
    assert torch.equal(train[3][0], torch.from_numpy(images["unlabeled"][1]))
    assert torch.equal(evals[1][0], torch.from_numpy(images["test"][1]))
    raw = (tmp_path / "stl10_binary" / "train_X.bin").read_bytes()
    # byte 1 of the file is channel 0, row 1, column 0 (column-major)
    assert train[0][0][0, 1, 0] == raw[1] and train[0][0][0, 0, 1] == raw[96]
    assert [train[i][1] for i in range(5)] == [2, 9, -1, -1, -1]
    assert [evals[i][1] for i in range(2)] == [-1, -1]  # no test_y.bin
    small = datasets.get_train_dataset(make_config("STL10", tmp_path, image_size=48))
    expected = triangle_resize_reference(images["unlabeled"][2].astype(float), 48)
    assert small[4][0].shape == (3, 48, 48) and np.abs(small[4][0].numpy() - expected).max() <= 1
    assert len(pickle.dumps(small)) < 10_000  # memory maps are reopened, not copied, in workers


def test_stl10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="unlabeled_X.bin.*cs.stanford.edu/~acoates/stl10"):
        datasets.get_train_dataset(make_config("STL10", tmp_path, image_size=48))
    write_stl10(tmp_path)
    with open(tmp_path / "stl10_binary" / "test_X.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(ValueError, match="test_X.bin.*multiple of 27648"):
        datasets.get_eval_dataset(make_config("STL10", tmp_path, image_size=48))


# ------------------------------------------------------------------------------------------------------------
# SHAPES


def test_shape_coverage_matches_exact_areas():
    size, n = 32, 60
    rng = np.random.default_rng(0)
    kind = np.repeat([0, 1, 2], n // 3)
    r = rng.uniform(4, 9, n)
    cx, cy = rng.uniform(10, 22, n), rng.uniform(10, 22, n)
    cover = datasets.shape_coverage(kind, cx, cy, r, size, supersample=8)
    assert cover.shape == (n, size, size) and cover.min() >= 0 and cover.max() <= 1
    area = cover.sum(axis=(1, 2))
    exact = np.array([datasets.shape_area(k, ri) for k, ri in zip(kind, r)])
    # a 1/8-pixel grid misjudges at most a boundary band of ~perimeter / 8 pixels (far less on average)
    assert np.all(np.abs(area - exact) / exact < 0.04)
    assert abs(np.mean(area / exact) - 1) < 0.005


def test_shapes_dataset_deterministic_and_well_formed():
    config = make_config("SHAPES", image_size=16, num_train=200, num_eval=50, shapes_seed=3)
    a, b = datasets.get_train_dataset(config), datasets.get_train_dataset(config)
    ev = datasets.get_eval_dataset(config)
    assert len(a) == 200 and len(ev) == 50
    xa, xb = a.get_batch(range(200), augment=False), b.get_batch(range(200), augment=False)
    assert torch.equal(xa, xb)  # deterministic
    assert not torch.equal(xa[:50], ev.get_batch(range(50), augment=False))  # separate eval set
    other = datasets.get_train_dataset(make_config("SHAPES", image_size=16, num_train=200, shapes_seed=4))
    assert not torch.equal(xa, other.get_batch(range(200), augment=False))
    images = (xa * 255).round().to(torch.uint8).permute(0, 2, 3, 1).reshape(200, -1, 3)
    background = torch.tensor([round(v * 255) for v in datasets.SHAPES_BACKGROUND], dtype=torch.uint8)
    palette = torch.tensor([[round(v * 255) for v in c] for c in datasets.SHAPES_PALETTE], dtype=torch.uint8)
    for img in images:
        is_bg = (img == background).all(-1)
        is_colour = (img[:, None, :] == palette[None]).all(-1).any(-1)
        assert is_bg.sum() > 0.2 * img.shape[0]  # background visible
        assert is_colour.sum() >= 2  # every shape has fully covered pixels of a palette colour
        assert (~is_bg & ~is_colour).sum() > 0  # anti-aliased edges
    full = (images[:, :, None, :] == palette[None, None]).all(-1).sum(1)  # [200, 6] fully covered pixels
    two_colours = ((full >= 2).sum(1) >= 2).float().mean()
    assert 0.2 < two_colours < 0.5  # second shape in half of the images, 5/6 of them in another colour
    labels = torch.tensor([a[i][1] for i in range(200)])
    assert set(labels.tolist()) == {0, 1, 2}
    loader, eval_loader, _ = datasets.get_dataset(make_config("SHAPES", image_size=16, num_train=64, num_eval=8))
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["label"].dtype == torch.int64
    with pytest.raises(ValueError, match="num_train"):
        datasets.get_train_dataset(make_config("SHAPES", num_train=0))


# ------------------------------------------------------------------------------------------------------------
# Configuration errors and the root rule


def test_unknown_dataset_and_channels():
    with pytest.raises(ValueError, match="CIFAR10, CELEBA, CelebAHQ, IMAGENET32, STL10, SHAPES"):
        datasets.get_dataset(make_config("MNIST"))
    bad = make_config("SHAPES")
    bad.data.num_channels = 1
    with pytest.raises(ValueError, match="num_channels"):
        datasets.get_dataset(bad)


def test_data_root_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("SCORE_SDE_DATA", raising=False)
    config = make_config("CIFAR10", root="")
    assert datasets.data_root(config) == os.path.join("data", "CIFAR10")
    monkeypatch.setenv("SCORE_SDE_DATA", str(tmp_path / "all"))
    assert datasets.data_root(config) == str(tmp_path / "all" / "CIFAR10")
    assert datasets.data_root(make_config("CIFAR10", root=tmp_path / "mine")) == str(tmp_path / "mine")
    del config.data["root"]  # configs without the field fall back to the same rule
    assert datasets.data_root(config) == str(tmp_path / "all" / "CIFAR10")
    write_cifar(tmp_path / "all" / "CIFAR10" / "cifar-10-batches-py")
    assert len(datasets.get_train_dataset(config)) == 15


# ------------------------------------------------------------------------------------------------------------
# Preprocessing: independent NumPy references (antialiased separable filters, the StyleGAN pyramid)


def keys_cubic(x, a=-0.5):
    """Keys' cubic convolution kernel (tf.image.resize's bicubic, a = -0.5)."""
    x = np.abs(x)
    return np.where(
        x <= 1,
        (a + 2) * x**3 - (a + 3) * x**2 + 1,
        np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0),
    )


def triangle(x):
    return np.clip(1 - np.abs(x), 0, None)


def aa_resize_reference(images, out_h, out_w, kernel):
    """Antialiased separable resize of [..., h, w] (values 0..255) to (out_h, out_w), rounded: output pixel i
    weighs input j by kernel((j + 0.5 - (i + 0.5) s) / max(s, 1)), s = n_in / n_out, renormalised."""

    def weights(n_in, n_out):
        scale = n_in / n_out
        stretch = max(scale, 1.0)
        centres = (np.arange(n_out) + 0.5) * scale
        w = kernel((np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / stretch)
        return w / w.sum(axis=1, keepdims=True)

    h, w = images.shape[-2:]
    out = weights(h, out_h) @ (images / 255.0) @ weights(w, out_w).T
    return np.clip(np.round(out * 255), 0, 255)


def stylegan_pyramid_reference(chw, levels):
    """progressive_growing_of_gans dataset_tool.py: halve by 2x2 float32 averaging `levels` times, then np.rint."""
    img = chw
    for _ in range(levels):
        img = img.astype(np.float32)
        img = (img[:, 0::2, 0::2] + img[:, 0::2, 1::2] + img[:, 1::2, 0::2] + img[:, 1::2, 1::2]) * 0.25
    return np.rint(img).clip(0, 255).astype(np.uint8)


def area_reference(chw, out_h, out_w):
    """Exact area averaging: repeat every pixel n_out / g times along each axis, then average blocks of n_in / g
    (g = gcd(n_in, n_out))."""
    c, h, w = chw.shape
    gh, gw = math.gcd(h, out_h), math.gcd(w, out_w)
    up = np.repeat(np.repeat(chw.astype(np.float64), out_h // gh, axis=1), out_w // gw, axis=2)
    return up.reshape(c, out_h, h // gh, out_w, w // gw).mean(axis=(2, 4))


def chw(array):
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def test_box_resize_is_exact_area_averaging():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 20, 30), dtype=np.uint8)
    w = datasets.box_weights(20, 8)
    assert torch.allclose(w.sum(1), torch.ones(8, dtype=torch.float64))
    out = datasets.box_resize_uint8(torch.from_numpy(img)[None], (8, 12))[0].numpy()
    exact = area_reference(img, 8, 12)
    assert np.abs(out - exact).max() <= 0.5 + 1e-9  # rounded exact area means (ties either way)
    assert np.mean(out == np.rint(exact)) > 0.99
    # integer ratio: the exact block mean, rounded half to even (the StyleGAN TFRecord pyramid)
    big = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    sums = big.astype(np.int64).reshape(3, 8, 4, 8, 4).sum(axis=(2, 4))
    assert (sums % 16 == 8).sum() > 5  # the data hold exact .5 ties, which must round to even
    box = datasets.box_resize_uint8(torch.from_numpy(big)[None], (8, 8))[0].numpy()
    np.testing.assert_array_equal(box, stylegan_pyramid_reference(big, 2))


def test_antialiased_filters_match_numpy_references():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (2, 3, 40, 60), dtype=np.uint8)
    for mode, kernel in (("bicubic", keys_cubic), ("bilinear", triangle)):
        out = datasets.resize_uint8(torch.from_numpy(img), (16, 21), mode).numpy()
        assert out.shape == (2, 3, 16, 21)
        assert np.abs(out - aa_resize_reference(img.astype(float), 16, 21, kernel)).max() <= 1


def test_crop_and_resize_modes():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (3, 23, 40), dtype=np.uint8)
    x = torch.from_numpy(img)[None]
    # 'center': the centre square (rows 0..22, columns 8..30), then the filter
    centre = img[:, :, 8:31]
    out = datasets.crop_and_resize(x, 10, "center", "bicubic")[0].numpy()
    assert np.abs(out - aa_resize_reference(centre.astype(float), 10, 10, keys_cubic)).max() <= 1
    np.testing.assert_array_equal(datasets.crop_and_resize(x, 23, "center", "box")[0].numpy(), centre)
    # 'short_side': resize to (10, round(40 * 10 / 23) = 17), then the centre 10 x 10 (columns 3..12)
    out = datasets.crop_and_resize(x, 10, "short_side", "bilinear")[0].numpy()
    ref = aa_resize_reference(img.astype(float), 10, 17, triangle)[:, :, 3:13]
    assert np.abs(out - ref).max() <= 1
    # 'none': the whole image squeezed to 10 x 10
    out = datasets.crop_and_resize(x, 10, "none", "box")[0].numpy()
    assert np.abs(out - area_reference(img, 10, 10)).max() <= 0.5 + 1e-9
    with pytest.raises(ValueError, match="crop"):
        datasets.crop_and_resize(x, 10, "middle")


# ------------------------------------------------------------------------------------------------------------
# LSUN (the official LMDB export) and image folders


def write_lsun_lmdb(root, category, split, arrays, fmt="JPEG", **options):
    """<category>_<split>_lmdb with LSUN-style keys; returns {key: decoded HWC image} in key order."""
    items = {
        fake_datasets.lsun_key(category, split, i): fake_datasets.encode_image(a, fmt, **options)
        for i, a in enumerate(arrays)
    }
    fake_datasets.write_lmdb(root / f"{category}_{split}_lmdb", items)
    return {k: np.asarray(Image.open(io.BytesIO(v)).convert("RGB")) for k, v in sorted(items.items())}


@pytest.mark.parametrize("category", ["bedroom", "church_outdoor"])
def test_lsun_lmdb_official_layout(tmp_path, category):
    rng = np.random.default_rng(3)
    train = write_lsun_lmdb(
        tmp_path, category, "train", [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(4)], quality=75
    )
    val = write_lsun_lmdb(
        tmp_path, category, "val", [rng.integers(0, 256, (20, 28, 3), dtype=np.uint8) for _ in range(2)], quality=75
    )
    config = make_config("LSUN", tmp_path, image_size=16, category=category)
    tr, ev = datasets.get_train_dataset(config), datasets.get_eval_dataset(config)
    assert isinstance(tr, datasets.LMDBImageDataset) and len(tr) == 4 and len(ev) == 2
    # key order; a 16 x 24 JPEG: the centre 16 x 16 (columns 4..19), exactly the decoded pixels
    for i, decoded in enumerate(train.values()):
        image, label = tr[i]
        assert torch.equal(image, chw(decoded[:, 4:20])) and label == -1
    # a 20 x 28 image: centre square (columns 4..23), antialiased bicubic to 16 (score_sde's crop_resize)
    for i, decoded in enumerate(val.values()):
        ref = aa_resize_reference(decoded[:, 4:24].transpose(2, 0, 1).astype(float), 16, 16, keys_cubic)
        assert np.abs(ev[i][0].numpy() - ref).max() <= 1
    # the key cache: written once, memory-mapped afterwards, pickled cheaply for workers
    cache = tmp_path / f"{category}_train_lmdb" / ".score_sde_keys.npy"
    assert cache.is_file() and [bytes(k) for k in np.load(cache)] == list(train)
    again = datasets.get_train_dataset(config)
    assert isinstance(again.keys, datasets._Memmap) and len(pickle.dumps(again)) < 10_000
    assert torch.equal(again.get_batch(range(4), augment=False), tr.get_batch(range(4), augment=False))
    # a worker process opens its own read-only handle: same batches as the main process
    loader, eval_loader, _ = datasets.get_dataset(
        make_config("LSUN", tmp_path, image_size=16, category=category, num_workers=1), evaluation=True
    )
    assert torch.equal(all_batches(eval_loader)[0], ev.get_batch(range(2), augment=False))


def test_lsun_128_resizes_the_short_side_then_crops_and_reads_webp(tmp_path):
    rng = np.random.default_rng(4)
    arrays = [rng.integers(0, 256, (160, 200, 3), dtype=np.uint8) for _ in range(2)]
    train = write_lsun_lmdb(tmp_path, "bedroom", "train", arrays, fmt="WEBP", lossless=True)
    write_lsun_lmdb(tmp_path, "bedroom", "val", arrays[:1], quality=75)
    by_key = {fake_datasets.lsun_key("bedroom", "train", i): a for i, a in enumerate(arrays)}
    for key, decoded in train.items():  # lossless WebP values: the original pixels
        np.testing.assert_array_equal(decoded, by_key[key])
    tr = datasets.get_train_dataset(make_config("LSUN", tmp_path, image_size=128, category="bedroom"))
    for i, decoded in enumerate(train.values()):
        # resize_small: 160 x 200 -> 128 x 160 (antialiased bilinear), central_crop: columns 16..143
        ref = aa_resize_reference(decoded.transpose(2, 0, 1).astype(float), 128, 160, triangle)[:, :, 16:144]
        out = tr[i][0].numpy()
        assert out.shape == (3, 128, 128) and np.abs(out - ref).max() <= 1
    # the config fields override the defaults
    box = datasets.get_train_dataset(
        make_config("LSUN", tmp_path, image_size=128, category="bedroom", crop="center", resize_filter="box")
    )
    first = next(iter(train.values())).transpose(2, 0, 1)[:, :, 20:180]
    assert np.abs(box[0][0].numpy() - area_reference(first, 128, 128)).max() <= 0.5 + 1e-9


def test_lsun_image_folders_equal_the_database(tmp_path):
    """`python data.py export` of the LSUN repository writes <key>.webp files (holding the JPEG bytes) in
    folders named by the key's first 6 characters: read as the same images, in the same order."""
    rng = np.random.default_rng(5)
    import lmdb

    write_lsun_lmdb(
        tmp_path / "db",
        "church_outdoor",
        "train",
        [rng.integers(0, 256, (20, 26, 3), dtype=np.uint8) for _ in range(5)],
        quality=75,
    )
    write_lsun_lmdb(
        tmp_path / "db",
        "church_outdoor",
        "val",
        [rng.integers(0, 256, (20, 26, 3), dtype=np.uint8) for _ in range(2)],
        quality=75,
    )
    for split in ("train", "val"):
        env = lmdb.open(str(tmp_path / "db" / f"church_outdoor_{split}_lmdb"), readonly=True, lock=False)
        with env.begin() as txn:
            for key, value in txn.cursor():
                folder = tmp_path / "export" / f"church_outdoor_{split}" / "/".join(key.decode()[:6])
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{key.decode()}.webp").write_bytes(value)
        env.close()
    db_config = make_config("LSUN", tmp_path / "db", image_size=16, category="church_outdoor")
    folder_config = make_config("LSUN", tmp_path / "export", image_size=16, category="church_outdoor")
    a, b = datasets.get_train_dataset(db_config), datasets.get_train_dataset(folder_config)
    assert isinstance(b, datasets.FileImageDataset) and len(b) == 5
    assert torch.equal(a.get_batch(range(5), augment=False), b.get_batch(range(5), augment=False))
    assert torch.equal(
        datasets.get_eval_dataset(db_config).get_batch(range(2), augment=False),
        datasets.get_eval_dataset(folder_config).get_batch(range(2), augment=False),
    )


def test_lsun_errors(tmp_path):
    with pytest.raises(ValueError, match="data.category"):
        datasets.get_train_dataset(make_config("LSUN", tmp_path, image_size=16))
    with pytest.raises(FileNotFoundError) as err:
        datasets.get_train_dataset(make_config("LSUN", tmp_path, image_size=16, category="bedroom"))
    msg = str(err.value)
    assert "bedroom_train_lmdb/data.mdb" in msg and "bedroom_val_lmdb" in msg and str(tmp_path) in msg
    assert "github.com/fyu/lsun" in msg and "not downloaded automatically" in msg
    rng = np.random.default_rng(6)
    write_lsun_lmdb(tmp_path, "bedroom", "train", [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)], quality=75)
    with pytest.raises(FileNotFoundError, match="bedroom_val_lmdb/data.mdb"):
        datasets.get_train_dataset(make_config("LSUN", tmp_path, image_size=16, category="bedroom"))
    fake_datasets.write_lmdb(tmp_path / "bedroom_val_lmdb", {b"0" * 40: b"not an image"})
    ev = datasets.get_eval_dataset(make_config("LSUN", tmp_path, image_size=16, category="bedroom"))
    with pytest.raises(ValueError, match="cannot decode image 0000000000.*bedroom_val_lmdb"):
        ev[0]
    with pytest.raises(ValueError, match="data.crop"):
        datasets.get_train_dataset(make_config("LSUN", tmp_path, image_size=16, category="bedroom", crop="middle"))
    with pytest.raises(ValueError, match="data.resize_filter"):
        datasets.get_train_dataset(
            make_config("LSUN", tmp_path, image_size=16, category="bedroom", resize_filter="lanczos")
        )
    # a database grown after the key cache was written is listed again
    fake_datasets.write_lmdb(
        tmp_path / "bedroom_train_lmdb", {b"f" * 40: fake_datasets.encode_image(np.zeros((16, 16, 3), np.uint8))}
    )
    assert len(datasets.get_train_dataset(make_config("LSUN", tmp_path, image_size=16, category="bedroom"))) == 2


def test_fake_lsun_writer_is_the_real_format(tmp_path):
    fake_datasets.write_dataset(tmp_path, "LSUN")
    for category in ("bedroom", "church_outdoor"):
        config = make_config("LSUN", tmp_path / "LSUN", image_size=256, category=category, batch_size=2)
        train, ev, _ = datasets.get_dataset(config)
        assert next(iter(train))["image"].shape == (2, 3, 256, 256) and len(ev.dataset) == 2
        assert (tmp_path / "LSUN" / f"{category}_train_lmdb" / "data.mdb").is_file()


# ------------------------------------------------------------------------------------------------------------
# FFHQ, CelebA-HQ and IMAGE_FOLDER


def test_ffhq_png_folder_box_pyramid_and_split(tmp_path):
    rng = np.random.default_rng(7)
    arrays = {}
    for i in (0, 1, 2, 999, 1000):  # images1024x1024/00000/00000.png ... /01000/01000.png
        folder = tmp_path / "images1024x1024" / f"{i // 1000 * 1000:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        arrays[i] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arrays[i]).save(folder / f"{i:05d}.png")
    config = make_config("FFHQ", tmp_path, image_size=8, num_eval=2)
    train, ev = datasets.get_train_dataset(config), datasets.get_eval_dataset(config)
    assert len(train) == 5 and len(ev) == 2
    order = sorted(arrays)
    for j, i in enumerate(order):  # 32 -> 8: two levels of the TFRecord pyramid, bit for bit
        np.testing.assert_array_equal(train[j][0].numpy(), stylegan_pyramid_reference(arrays[i].transpose(2, 0, 1), 2))
    np.testing.assert_array_equal(ev[1][0].numpy(), stylegan_pyramid_reference(arrays[1000].transpose(2, 0, 1), 2))
    full = datasets.get_train_dataset(make_config("FFHQ", tmp_path, image_size=32, num_eval=2))
    assert torch.equal(full[3][0], chw(arrays[999]))  # at the stored resolution: the pixels as they are
    # a separate evaluation folder
    (tmp_path / "held_out").mkdir()
    Image.fromarray(arrays[0]).save(tmp_path / "held_out" / "a.png")
    ev2 = datasets.get_eval_dataset(
        make_config("FFHQ", tmp_path / "images1024x1024", image_size=32, eval_root=str(tmp_path / "held_out"))
    )
    assert len(ev2) == 1 and torch.equal(ev2[0][0], chw(arrays[0]))
    with pytest.raises(FileNotFoundError, match="eval_root"):
        datasets.get_eval_dataset(make_config("FFHQ", tmp_path, image_size=32, eval_root=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="images1024x1024.*ffhq-dataset.*not downloaded automatically"):
        datasets.get_train_dataset(make_config("FFHQ", tmp_path / "missing", image_size=32))


def test_celebahq_uses_the_tfrecord_box_filter(tmp_path):
    rng = np.random.default_rng(8)
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i:05d}.png")
    train = datasets.get_train_dataset(make_config("CelebAHQ", tmp_path, image_size=16, num_eval=1))
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(train[i][0].numpy(), stylegan_pyramid_reference(a.transpose(2, 0, 1), 2))
    bicubic = datasets.get_train_dataset(
        make_config("CelebAHQ", tmp_path, image_size=16, num_eval=1, resize_filter="bicubic")
    )
    ref = aa_resize_reference(arrays[0].transpose(2, 0, 1).astype(float), 16, 16, keys_cubic)
    assert np.abs(bicubic[0][0].numpy() - ref).max() <= 1


def test_image_folder_formats_and_choices(tmp_path):
    rng = np.random.default_rng(9)
    folder = tmp_path / "mine" / "sub"
    folder.mkdir(parents=True)
    a = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    Image.fromarray(a).save(folder / "a.png")
    Image.fromarray(a).save(folder / "b.webp", lossless=True)
    Image.fromarray(a).save(folder / "c.jpg", quality=95)
    (folder / "notes.txt").write_text("ignored")
    root = tmp_path / "mine"
    config = make_config("IMAGE_FOLDER", root, image_size=12, num_eval=1)
    train, ev = datasets.get_train_dataset(config), datasets.get_eval_dataset(config)
    assert len(train) == 3 and len(ev) == 1 and train[0][1] == -1
    # default: score_sde's crop_resize (centre 30 x 30 = columns 7..36, antialiased bicubic)
    ref = aa_resize_reference(a[:, 7:37].transpose(2, 0, 1).astype(float), 12, 12, keys_cubic)
    assert np.abs(train[0][0].numpy() - ref).max() <= 1
    assert torch.equal(train[0][0], train[1][0])  # lossless WebP: the same pixels as the PNG
    jpeg = np.asarray(Image.open(folder / "c.jpg").convert("RGB"))  # decoded independently
    ref_jpeg = aa_resize_reference(jpeg[:, 7:37].transpose(2, 0, 1).astype(float), 12, 12, keys_cubic)
    assert np.abs(train[2][0].numpy() - ref_jpeg).max() <= 1
    short = datasets.get_train_dataset(
        make_config("IMAGE_FOLDER", root, image_size=12, num_eval=1, crop="short_side", resize_filter="bilinear")
    )
    # resize_small: 30 x 44 -> 12 x round(17.6) = 18, central_crop: columns 3..14
    ref = aa_resize_reference(a.transpose(2, 0, 1).astype(float), 12, 18, triangle)[:, :, 3:15]
    assert np.abs(short[0][0].numpy() - ref).max() <= 1
    squeezed = datasets.get_train_dataset(
        make_config("IMAGE_FOLDER", root, image_size=12, num_eval=1, crop="none", resize_filter="box")
    )
    assert np.abs(squeezed[0][0].numpy() - area_reference(a.transpose(2, 0, 1), 12, 12)).max() <= 0.5 + 1e-9
    loader, _, _ = datasets.get_dataset(make_config("IMAGE_FOLDER", root, image_size=12, batch_size=2, num_eval=1))
    assert next(iter(loader))["image"].shape == (2, 3, 12, 12)
    with pytest.raises(FileNotFoundError, match="config.data.root"):
        datasets.get_train_dataset(make_config("IMAGE_FOLDER", tmp_path / "empty", image_size=12))
    with pytest.raises(ValueError, match="num_eval"):
        datasets.get_eval_dataset(make_config("IMAGE_FOLDER", root, image_size=12, num_eval=3))
