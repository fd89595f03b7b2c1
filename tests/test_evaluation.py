"""Tests of evaluation.py: metrics against closed forms / independent NumPy code, the Inception path end to
end with random weights written by the test (no download), reference statistics files, resumable writers."""

import math
import os

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

import evaluation

# ----------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------


def random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_fid_of_a_feature_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20))
    assert abs(evaluation.fid_from_features(f, f)) < 1e-8
    assert evaluation.fid_from_features(f, f + 0.5) == pytest.approx(20 * 0.25, rel=1e-8)  # mean shift only


def test_fid_between_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 2.0)
    root1 = linalg.sqrtm(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(root1 @ s2 @ root1)).real
    assert evaluation.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # commuting (diagonal) case: sum (sqrt(a) - sqrt(b))^2 on the diagonal
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    diag = evaluation.fid_from_stats(mu1, np.diag(a), mu1, np.diag(b))
    assert diag == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-9)
    # from samples: converges to the closed form (Monte Carlo, 20000 draws each)
    x = rng.multivariate_normal(mu1, s1, size=20000)
    y = rng.multivariate_normal(mu2, s2, size=20000)
    assert evaluation.fid_from_features(x, y) == pytest.approx(expected, rel=0.05)
    with pytest.raises(ValueError, match="do not match"):
        evaluation.fid_from_stats(mu1, s1, mu2[:3], s2[:3, :3])


def inception_score_numpy(logits, splits):
    """Independent IS: softmax with scipy-free loops, KL per sample, exp of the mean, per split."""
    n = logits.shape[0]
    scores = []
    for k in range(splits):
        chunk = logits[k * n // splits : (k + 1) * n // splits]
        p = np.exp(chunk - chunk.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        py = p.mean(0)
        kls = [sum(pi[j] * math.log(pi[j] / py[j]) for j in range(len(py)) if pi[j] > 0) for pi in p]
        scores.append(math.exp(np.mean(kls)))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_numpy():
    rng = np.random.default_rng(2)
    logits = 3.0 * rng.normal(size=(200, 12))
    mean, std = evaluation.inception_score(logits, splits=10)
    ref_mean, ref_std = inception_score_numpy(logits, 10)
    assert mean == pytest.approx(ref_mean, rel=1e-9)
    assert std == pytest.approx(ref_std, rel=1e-6)
    # one-hot confident, uniform over K classes: IS = K exactly
    onehot = np.tile(50.0 * np.eye(10), (3, 1))
    assert evaluation.inception_score(onehot, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    with pytest.raises(ValueError, match="splits"):
        evaluation.inception_score(logits[:5], splits=10)


def mmd2_numpy_loops(x, y):
    d = x.shape[1]

    def k(a, b):
        return (np.dot(a, b) / d + 1.0) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_kid_matches_numpy_and_is_unbiased():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 5))
    y = rng.normal(size=(30, 5)) + 0.3
    expected = mmd2_numpy_loops(x, y)
    assert evaluation.polynomial_mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-10)
    # a subset of the full size is a permutation: the same value, zero spread
    mean, std = evaluation.kernel_inception_distance(x, y, subset_size=30, num_subsets=3)
    assert mean == pytest.approx(expected, rel=1e-10) and std < 1e-10
    # same distribution: the unbiased estimate averages to 0 (Monte Carlo over many independent pairs)
    vals = [evaluation.polynomial_mmd2_unbiased(rng.normal(size=(20, 4)), rng.normal(size=(20, 4))) for _ in range(400)]
    assert abs(np.mean(vals)) < 4 * np.std(vals) / math.sqrt(len(vals))


# ----------------------------------------------------------------------------------------------------------
# Inception extractor (torch-fidelity's InceptionV3, random weights written here)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity InceptionV3 state_dict, random variance-preserving weights, saved as the real file."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("random", ["2048", "logits"])
    mp.undo()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.bias)
    path = tmp_path_factory.mktemp("inception") / evaluation.INCEPTION_WEIGHTS_FILENAME
    torch.save(net.state_dict(), path)
    return str(path)


def test_inception_features_end_to_end(inception_weights, monkeypatch):
    monkeypatch.setenv(evaluation.INCEPTION_ENV_VAR, inception_weights)
    model = evaluation.get_inception_model()  # found through the environment variable
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=g)
    feats = evaluation.run_inception(images.permute(0, 2, 3, 1).numpy(), model, batch_size=2)  # uint8 NHWC
    assert feats["pool_3"].shape == (2, 2048) and feats["logits"].shape == (2, 1008)
    assert np.isfinite(feats["pool_3"]).all()
    assert np.abs(feats["pool_3"][0] - feats["pool_3"][1]).max() > 1e-3  # features depend on the image
    # logits are the biased fc output of pool_3 (tfgan 'logits'), from the weights file itself
    sd = torch.load(inception_weights, weights_only=True)
    logits = feats["pool_3"].astype(np.float64) @ sd["fc.weight"].double().numpy().T + sd["fc.bias"].double().numpy()
    assert np.abs(logits - feats["logits"]).max() < 1e-3 * (1 + np.abs(logits).max())
    # float [0, 1] NCHW input of the same image gives the same features as uint8 NHWC
    scale = 1 + np.abs(feats["pool_3"]).max()
    as_float = evaluation.run_inception(images[1:].float() / 255.0, model)["pool_3"]
    assert np.abs(as_float - feats["pool_3"][1:]).max() < 1e-4 * scale


def test_uint8_conversion():
    x = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16) / 255.0
    u = evaluation.to_uint8_nchw(x)
    assert u.shape == (1, 3, 16, 16) and u.dtype == torch.uint8
    assert torch.equal(u[0, 1].reshape(-1), torch.arange(256, dtype=torch.uint8))  # k / 255 -> k
    assert int(evaluation.to_uint8_nchw(torch.full((1, 3, 2, 2), 0.999))[0, 0, 0, 0]) == 254  # floor, score_sde
    assert int(evaluation.to_uint8_nchw(torch.full((1, 3, 2, 2), 1.7))[0, 0, 0, 0]) == 255
    with pytest.raises(ValueError, match="channels"):
        evaluation.to_uint8_nchw(torch.rand(1, 4, 8, 8))


def test_missing_and_corrupt_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(evaluation.INCEPTION_ENV_VAR, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        evaluation.get_inception_model()
    msg = str(err.value)
    assert evaluation.INCEPTION_WEIGHTS_FILENAME in msg and "https://github.com/toshas/torch-fidelity" in msg
    assert evaluation.INCEPTION_ENV_VAR in msg and "inception_path" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluation.get_inception_model(weights_path=str(tmp_path / "nope.pth"))
    bad = tmp_path / evaluation.INCEPTION_WEIGHTS_FILENAME
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Could not read"):
        evaluation.get_inception_model(weights_path=str(tmp_path))  # a folder holding the file is accepted
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="does not match"):
        evaluation.get_inception_model(weights_path=str(bad))


# ----------------------------------------------------------------------------------------------------------
# fake extractor for the writers (counts its calls; 16 features from simple image moments, 10 logits)
# ----------------------------------------------------------------------------------------------------------


class FakeInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 3 * 16).reshape(3, 16), requires_grad=False)

    def forward(self, x):
        self.calls += 1
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        m = x.float().mean(dim=(2, 3)) / 255.0
        sq = (x.float() / 255.0).pow(2).mean(dim=(2, 3))
        pool = torch.sin(3.0 * m @ self.w) + sq @ self.w
        return pool, pool[:, :10] * 5.0


def images_in_memory(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, 4, generator=g)


def test_reference_stats_roundtrip_and_formats(tmp_path):
    fake = FakeInception()
    imgs = images_in_memory(24, 0)
    loader = [{"image": imgs[i : i + 8], "label": torch.zeros(8)} for i in range(0, 24, 8)]
    out = tmp_path / "stats" / "ref.npz"
    stats = evaluation.compute_reference_stats(loader, fake, out_path=str(out), max_images=20)
    assert stats["pool_3"].shape == (20, 16)
    direct = evaluation.run_inception(imgs[:20], fake)["pool_3"].astype(np.float64)
    loaded = evaluation.load_reference_stats(str(out))
    assert np.allclose(loaded["mu"], direct.mean(0)) and np.allclose(loaded["sigma"], np.cov(direct.T))
    assert np.allclose(loaded["pool_3"], direct)
    # score_sde's file: raw features under 'pool_3' only
    np.savez(tmp_path / "score_sde.npz", pool_3=direct.astype(np.float32))
    s = evaluation.load_reference_stats(str(tmp_path / "score_sde.npz"))
    assert np.allclose(s["mu"], direct.mean(0), atol=1e-6) and "pool_3" in s
    # moments only (pytorch-fid / torch-fidelity / TTUR naming)
    np.savez(tmp_path / "moments.npz", mu=direct.mean(0), sigma=np.cov(direct.T))
    m = evaluation.load_reference_stats(str(tmp_path / "moments.npz"))
    assert "pool_3" not in m and np.allclose(m["sigma"], np.cov(direct.T))
    with pytest.raises(FileNotFoundError, match="compute_reference_stats"):
        evaluation.load_reference_stats(str(tmp_path / "missing.npz"))
    (tmp_path / "corrupt.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable npz"):
        evaluation.load_reference_stats(str(tmp_path / "corrupt.npz"))
    np.savez(tmp_path / "wrong.npz", feats=direct)
    with pytest.raises(ValueError, match="expected 'pool_3'"):
        evaluation.load_reference_stats(str(tmp_path / "wrong.npz"))


class CountingSampler:
    """sampling_fn(model) -> ([B, 3, 4, 4] in [0, 1], nfe); raises in call `fail_at` (simulated kill)."""

    def __init__(self, batch_size, fail_at=None):
        self.batch_size, self.fail_at, self.calls = batch_size, fail_at, 0

    def __call__(self, model):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("simulated kill")
        return torch.rand(self.batch_size, 3, 4, 4), 10


def test_resumable_sample_writer(tmp_path):
    num_samples, bs = 10, 3  # 4 rounds, the last one keeps 1 sample
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = CountingSampler(bs)
    evaluation.write_samples_in_batches(ref, None, str(ref_dir), num_samples, bs, seed=7)
    assert ref.calls == 4
    killed = CountingSampler(bs, fail_at=3)
    with pytest.raises(RuntimeError, match="simulated kill"):
        evaluation.write_samples_in_batches(killed, None, str(run_dir), num_samples, bs, seed=7)
    assert sorted(os.listdir(run_dir)) == ["samples_0.npz", "samples_1.npz"]
    (run_dir / "samples_2.npz.tmp").write_bytes(b"partial")  # left over by a kill during a write
    resumed = CountingSampler(bs)
    paths = evaluation.write_samples_in_batches(resumed, None, str(run_dir), num_samples, bs, seed=7)
    assert resumed.calls == 2  # only rounds 2 and 3 were sampled again
    sizes = []
    for p in paths:
        with np.load(p) as a, np.load(ref_dir / os.path.basename(p)) as b:
            assert a["samples"].dtype == np.uint8 and a["samples"].shape[1:] == (4, 4, 3)
            assert np.array_equal(a["samples"], b["samples"])  # identical to the uninterrupted run
            sizes.append(len(a["samples"]))
    assert sizes == [3, 3, 3, 1]
    again = CountingSampler(bs)
    evaluation.write_samples_in_batches(again, None, str(run_dir), num_samples, bs, seed=7)
    assert again.calls == 0


def test_features_cache_and_metrics(tmp_path):
    fake = FakeInception()
    sample_dir = tmp_path / "samples"
    evaluation.write_samples_in_batches(CountingSampler(8), None, str(sample_dir), 24, 8, seed=0)
    feats = evaluation.compute_features_for_sample_dir(str(sample_dir), fake, batch_size=8)
    assert fake.calls == 3 and feats["pool_3"].shape == (24, 16) and feats["logits"].shape == (24, 10)
    assert sorted(f for f in os.listdir(sample_dir) if f.startswith("statistics_")) == [
        f"statistics_{r}.npz" for r in range(3)
    ]
    os.remove(sample_dir / "statistics_1.npz")
    feats2 = evaluation.compute_features_for_sample_dir(str(sample_dir), fake, batch_size=8)
    assert fake.calls == 4  # only the missing batch was recomputed
    assert np.array_equal(feats["pool_3"], feats2["pool_3"])
    # metrics against a reference built from other images
    ref = evaluation.compute_reference_stats([images_in_memory(30, 1)], fake)
    res = evaluation.metrics_from_sample_dir(str(sample_dir), ref, inception_model=fake, kid_subset_size=20)
    samples = np.concatenate([np.load(sample_dir / f"samples_{r}.npz")["samples"] for r in range(3)])
    direct = evaluation.run_inception(samples, fake)
    assert res["num_samples"] == 24
    assert res["fid"] == pytest.approx(evaluation.fid_from_features(direct["pool_3"], ref["pool_3"]), rel=1e-6)
    assert res["is"] == pytest.approx(evaluation.inception_score(direct["logits"], 10)[0], rel=1e-6)
    assert res["kid"] is not None and np.isfinite(res["kid"])
    moments = {"mu": ref["mu"], "sigma": ref["sigma"]}
    assert evaluation.metrics_from_sample_dir(str(sample_dir), moments, inception_model=fake)["kid"] is None


def test_save_image_grid(tmp_path):
    x = torch.zeros(4, 3, 8, 8)
    x[1] = 1.0  # second image white
    path = tmp_path / "grid" / "g.png"
    evaluation.save_image_grid(x, str(path), nrow=2)
    img = np.asarray(Image.open(path))
    assert img.shape == (2 * (8 + 2) + 2, 2 * (8 + 2) + 2, 3)
    assert (img[2:10, 12:20] == 255).all() and (img[2:10, 2:10] == 0).all()


def test_score_sde_names_for_stats_and_features(inception_weights, tmp_path, monkeypatch):
    """load_dataset_stats finds score_sde's assets/stats/<dataset>_stats.npz (raw pool_3 features) or ours;
    run_inception_distributed takes score_sde's uint8 NHWC sample batches."""
    config = ml_collections.ConfigDict({"data": {"dataset": "CIFAR10", "image_size": 32}, "eval": {"stats_path": ""}})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar10_stats.npz"):
        evaluation.load_dataset_stats(config)
    os.makedirs("assets/stats")
    pool = np.random.default_rng(0).normal(size=(50, 4))
    np.savez("assets/stats/cifar10_stats.npz", pool_3=pool)
    stats = evaluation.load_dataset_stats(config)
    np.testing.assert_allclose(stats["mu"], pool.mean(0))
    np.testing.assert_allclose(stats["sigma"], np.cov(pool, rowvar=False))
    np.testing.assert_array_equal(stats["pool_3"], pool)
    np.savez("assets/stats/cifar10_32_stats.npz", mu=np.zeros(4), sigma=np.eye(4))  # ours comes first
    assert not np.any(evaluation.load_dataset_stats(config)["mu"])
    config.eval.stats_path = "assets/stats/cifar10_stats.npz"
    np.testing.assert_allclose(evaluation.load_dataset_stats(config)["mu"], pool.mean(0))

    model = evaluation.get_inception_model(weights_path=inception_weights)
    images = np.random.default_rng(1).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    latents = evaluation.run_inception_distributed(images, model, inceptionv3=False)
    np.testing.assert_array_equal(latents["pool_3"], evaluation.run_inception(images, model)["pool_3"])
    assert latents["logits"].shape == (3, 1008)


def test_inception_progress_bar_over_batches(capsys):
    fake = FakeInception()
    imgs = (images_in_memory(5, 3) * 255).to(torch.uint8)
    quiet = evaluation.run_inception(imgs, fake, batch_size=2)
    assert capsys.readouterr().err == ""  # no bar by default
    shown = evaluation.run_inception(imgs, fake, batch_size=2, progress="features of the samples")
    err = capsys.readouterr().err
    assert "features of the samples" in err and "3/3" in err and "batch" in err  # ceil(5 / 2) batches
    np.testing.assert_array_equal(shown["pool_3"], quiet["pool_3"])
    evaluation.run_inception_distributed(imgs.permute(0, 2, 3, 1).numpy(), fake, progress=True)
    err = capsys.readouterr().err
    assert "Inception features" in err and "1/1" in err
