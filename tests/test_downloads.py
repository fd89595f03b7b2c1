"""Downloads (datasets.ensure_downloaded, evaluation.resolve_inception_path) against an HTTP server started on
127.0.0.1 by the test: the files are fetched once, checked (MD5 / SHA-256 prefix), extracted into the layout the
readers expect; a corrupt file is rejected and removed; the offline switches keep everything local."""

import hashlib
import http.server
import io
import os
import tarfile
import threading
from pathlib import Path

import fake_datasets
import ml_collections
import numpy as np
import pytest
import torch

import datasets
import evaluation


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the test's folder; records the path of every GET request (torchvision's downloader sends two per
    file: its redirect probe, a GET with a 'Method: HEAD' header whose body it does not read, then the transfer)."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.gets.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, served folder, list of GET paths) of an HTTP server on 127.0.0.1, stopped after the test."""
    served = tmp_path / "served"
    served.mkdir()

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(served), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.gets = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, httpd.gets
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed (conftest.py switches them off for every other test)."""
    monkeypatch.delenv(datasets.OFFLINE_ENV_VAR, raising=False)


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def make_config(dataset, root, download=True, image_size=32):
    return ml_collections.ConfigDict(
        {
            "data": {
                "dataset": dataset,
                "image_size": image_size,
                "num_channels": 3,
                "centered": False,
                "random_flip": False,
                "root": str(root),
                "download": download,
            },
            "training": {"batch_size": 2},
            "eval": {"batch_size": 2},
        }
    )


def tar_gz(source: Path, arcname: str, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return out


@pytest.fixture
def cifar_archive(tmp_path, server):
    """A CIFAR-10 python archive in the real format (fake images) on the server; returns (url, md5, source)."""
    base, served, _ = server
    source = tmp_path / "source"
    fake_datasets.write_cifar10(source, per_batch=2, n_test=3)
    archive = tar_gz(source / "cifar-10-batches-py", "cifar-10-batches-py", served / "cifar-10-python.tar.gz")
    return f"{base}/cifar-10-python.tar.gz", md5(archive), source


def test_sources_are_torchvisions_and_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    from torchvision.datasets import CIFAR10, STL10

    cifar, stl = datasets.DOWNLOADS["CIFAR10"], datasets.DOWNLOADS["STL10"]
    assert (cifar.url, cifar.filename, cifar.md5) == (CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5)
    assert (stl.url, stl.filename, stl.md5) == (STL10.url, STL10.filename, STL10.tgz_md5)
    assert {f.split("/")[1] for f in cifar.files} == {n for n, _ in CIFAR10.train_list + CIFAR10.test_list}
    assert all(f.startswith(CIFAR10.base_folder + "/") for f in cifar.files)
    assert all(f.startswith(STL10.base_folder + "/") for f in stl.files)
    assert evaluation.INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3
    # torch hub's naming rule: the part after the last '-' is the start of the file's SHA-256
    assert (
        evaluation.INCEPTION_WEIGHTS_FILENAME.rsplit("-", 1)[1] == evaluation.INCEPTION_WEIGHTS_SHA256_PREFIX + ".pth"
    )


def test_cifar10_is_fetched_checked_extracted_and_read(tmp_path, server, cifar_archive, online, monkeypatch):
    url, digest, source = cifar_archive
    _, _, gets = server
    monkeypatch.setitem(datasets.DOWNLOADS, "CIFAR10", datasets.DOWNLOADS["CIFAR10"]._replace(url=url, md5=digest))
    root = tmp_path / "data" / "CIFAR10"
    train = datasets.get_train_dataset(make_config("CIFAR10", root))
    assert set(gets) == {"/cifar-10-python.tar.gz"}
    requests = len(gets)
    # torchvision's layout: the verified archive and the extracted folder, nothing else
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert md5(root / "cifar-10-python.tar.gz") == digest
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        assert (root / "cifar-10-batches-py" / name).read_bytes() == (
            source / "cifar-10-batches-py" / name
        ).read_bytes()
    local = datasets.get_train_dataset(make_config("CIFAR10", source, download=False))
    assert len(train) == 10 and torch.equal(train.get_batch(range(10), False), local.get_batch(range(10), False))
    assert len(datasets.get_eval_dataset(make_config("CIFAR10", root))) == 3
    assert len(gets) == requests  # second use: nothing fetched


def test_corrupt_download_is_rejected_and_removed(tmp_path, server, cifar_archive, online, monkeypatch):
    url, digest, _ = cifar_archive
    _, served, gets = server
    archive = served / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-100])  # truncated in transit
    monkeypatch.setitem(datasets.DOWNLOADS, "CIFAR10", datasets.DOWNLOADS["CIFAR10"]._replace(url=url, md5=digest))
    root = tmp_path / "data"
    with pytest.raises(datasets.DownloadError) as err:
        datasets.get_train_dataset(make_config("CIFAR10", root))
    msg = str(err.value)
    assert f"expected {digest}" in msg and md5(archive) in msg and "removed" in msg and url in msg
    assert isinstance(err.value, FileNotFoundError)  # run_lib skips what needs the data, as for missing files
    assert set(gets) == {"/cifar-10-python.tar.gz"} and os.listdir(root) == []  # no partial file left


def test_corrupt_local_archive_is_fetched_again(tmp_path, server, cifar_archive, online, monkeypatch):
    url, digest, _ = cifar_archive
    monkeypatch.setitem(datasets.DOWNLOADS, "CIFAR10", datasets.DOWNLOADS["CIFAR10"]._replace(url=url, md5=digest))
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"an interrupted download")
    assert len(datasets.get_train_dataset(make_config("CIFAR10", root))) == 10
    assert md5(root / "cifar-10-python.tar.gz") == digest and set(server[2]) == {"/cifar-10-python.tar.gz"}


def test_intact_local_archive_is_read_without_network(tmp_path, server, cifar_archive, online, monkeypatch):
    url, digest, _ = cifar_archive
    _, served, gets = server
    monkeypatch.setitem(datasets.DOWNLOADS, "CIFAR10", datasets.DOWNLOADS["CIFAR10"]._replace(url=url, md5=digest))
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes((served / "cifar-10-python.tar.gz").read_bytes())
    assert len(datasets.get_train_dataset(make_config("CIFAR10", root))) == 10
    assert gets == [] and os.listdir(root) == ["cifar-10-python.tar.gz"]  # read as it is, nothing written


@pytest.mark.parametrize("switch", ["environment", "config"])
def test_offline_switches_give_the_local_message(tmp_path, server, cifar_archive, online, monkeypatch, switch):
    url, digest, _ = cifar_archive
    monkeypatch.setitem(datasets.DOWNLOADS, "CIFAR10", datasets.DOWNLOADS["CIFAR10"]._replace(url=url, md5=digest))
    if switch == "environment":
        monkeypatch.setenv(datasets.OFFLINE_ENV_VAR, "1")
    config = make_config("CIFAR10", tmp_path / "data", download=switch != "config")
    with pytest.raises(FileNotFoundError) as err:
        datasets.get_train_dataset(config)
    msg = str(err.value)
    assert not isinstance(err.value, datasets.DownloadError)
    assert "cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg and "www.cs.toronto.edu" in msg
    assert "SCORE_SDE_OFFLINE" in msg and "data.download" in msg
    assert server[2] == [] and not (tmp_path / "data").exists()


def test_unreachable_server_is_a_clear_error(tmp_path, online, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = datasets.DOWNLOADS["CIFAR10"]._replace(url=f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    monkeypatch.setitem(datasets.DOWNLOADS, "CIFAR10", spec)
    with pytest.raises(datasets.DownloadError, match=f"Could not download {spec.url}.*yourself to"):
        datasets.get_train_dataset(make_config("CIFAR10", tmp_path / "data"))
    assert os.listdir(tmp_path / "data") == []


def test_stl10_is_fetched_and_extracted(tmp_path, server, online, monkeypatch):
    base, served, gets = server
    rng = np.random.default_rng(0)
    folder = tmp_path / "source" / "stl10_binary"
    folder.mkdir(parents=True)
    images = {}
    for name, n in (("train", 2), ("unlabeled", 3), ("test", 2)):
        images[name] = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        (folder / f"{name}_X.bin").write_bytes(np.ascontiguousarray(images[name].transpose(0, 1, 3, 2)).tobytes())
    archive = tar_gz(folder, "stl10_binary", served / "stl10_binary.tar.gz")
    spec = datasets.DOWNLOADS["STL10"]._replace(url=f"{base}/stl10_binary.tar.gz", md5=md5(archive))
    monkeypatch.setitem(datasets.DOWNLOADS, "STL10", spec)
    root = tmp_path / "data"
    train = datasets.get_train_dataset(make_config("STL10", root, image_size=96))
    assert sorted(os.listdir(root)) == ["stl10_binary", "stl10_binary.tar.gz"]
    assert sorted(os.listdir(root / "stl10_binary")) == ["test_X.bin", "train_X.bin", "unlabeled_X.bin"]
    assert len(train) == 5 and torch.equal(train[3][0], torch.from_numpy(images["unlabeled"][1]))
    requests = len(gets)
    assert set(gets) == {"/stl10_binary.tar.gz"}
    datasets.get_eval_dataset(make_config("STL10", root, image_size=96))
    assert len(gets) == requests


def test_licensed_datasets_are_never_fetched(tmp_path, online):
    for name, expected in (
        ("LSUN", "bedroom_train_lmdb/data.mdb"),
        ("FFHQ", "images1024x1024"),
        ("CelebAHQ", "celeba_hq_256"),
        ("CELEBA", "img_align_celeba"),
        ("IMAGENET32", "Imagenet32_train_npz"),
    ):
        config = make_config(name, tmp_path / name, image_size=64)
        config.data.category = "bedroom"
        with pytest.raises(FileNotFoundError) as err:
            datasets.get_train_dataset(config)
        assert expected in str(err.value) and "not downloaded automatically" in str(err.value), name
        assert not isinstance(err.value, datasets.DownloadError)


# ------------------------------------------------------------------------------------------------------------
# Inception weights (torch hub cache)


@pytest.fixture
def weights(server, tmp_path, monkeypatch):
    """A weights file on the server, the hub cache in tmp_path; returns (bytes, expected cache path)."""
    base, served, _ = server
    buffer = io.BytesIO()
    torch.save({"fc.bias": torch.arange(4.0)}, buffer)
    content = buffer.getvalue()
    (served / evaluation.INCEPTION_WEIGHTS_FILENAME).write_bytes(content)
    monkeypatch.setattr(evaluation, "INCEPTION_WEIGHTS_URL", f"{base}/{evaluation.INCEPTION_WEIGHTS_FILENAME}")
    monkeypatch.setattr(evaluation, "INCEPTION_WEIGHTS_SHA256_PREFIX", hashlib.sha256(content).hexdigest()[:8])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(evaluation.INCEPTION_ENV_VAR, raising=False)
    return content, tmp_path / "hub" / "checkpoints" / evaluation.INCEPTION_WEIGHTS_FILENAME


def test_inception_weights_are_fetched_into_the_hub_cache(server, weights, online):
    content, cached = weights
    assert evaluation.resolve_inception_path() == str(cached)
    assert cached.read_bytes() == content and os.listdir(cached.parent) == [cached.name]
    assert evaluation.resolve_inception_path() == str(cached)
    assert server[2] == [f"/{evaluation.INCEPTION_WEIGHTS_FILENAME}"]  # once


def test_inception_weights_with_a_wrong_hash_are_removed(server, weights, online, monkeypatch):
    _, cached = weights
    monkeypatch.setattr(evaluation, "INCEPTION_WEIGHTS_SHA256_PREFIX", "00000000")
    with pytest.raises(datasets.DownloadError, match="corrupt.*00000000.*removed"):
        evaluation.get_inception_model()
    assert server[2] == [f"/{evaluation.INCEPTION_WEIGHTS_FILENAME}"]
    assert not cached.parent.exists() or os.listdir(cached.parent) == []


def test_inception_offline_switches_and_explicit_paths(server, weights, online, monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        evaluation.get_inception_model(download=False)
    msg = str(err.value)
    assert "config.data.download = False" in msg and evaluation.INCEPTION_WEIGHTS_FILENAME in msg
    assert "inception_path" in msg and evaluation.INCEPTION_ENV_VAR in msg
    monkeypatch.setenv(datasets.OFFLINE_ENV_VAR, "1")
    with pytest.raises(FileNotFoundError, match=r"\$SCORE_SDE_OFFLINE is set"):
        evaluation.resolve_inception_path()
    monkeypatch.delenv(datasets.OFFLINE_ENV_VAR)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # an explicit path is never downloaded to
        evaluation.resolve_inception_path(str(tmp_path / "mine.pth"))
    assert server[2] == []
