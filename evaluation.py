"""Sample-quality evaluation: Inception features, FID / Inception Score / KID, reference statistics, and the
resumable sample and feature writers used by run_lib.evaluate (papers.md section 6).

Features come from the TF Inception-v3 graph of 2015-12-05 (used by score_sde and the FID/IS literature),
reproduced in PyTorch by torch-fidelity's FeatureExtractorInceptionV3: 'pool_3' = its '2048' output, 'logits'
= its 1008-way 'logits' output with the fc bias (as tfgan's classifier_score_from_logits in score_sde).
The weights file is config.eval.inception_path, else the environment variable SCORE_SDE_INCEPTION_WEIGHTS,
else torch-fidelity's own download cache ($TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth).
When none is given and the cache lacks the file, it is downloaded there on first use from torch-fidelity's URL
(INCEPTION_WEIGHTS_URL) with torch.hub's downloader (progress bar), which checks that its SHA-256 starts with
the 8 hex digits the file name carries (torch hub's naming rule: 6726825d) and removes it otherwise; a failure
raises datasets.DownloadError (a FileNotFoundError). Downloads are off with download=False (run_lib passes
config.data.download) or the environment variable SCORE_SDE_OFFLINE=1: the missing file then gives the
message saying where to get it. The file is read with torch.load(weights_only=True).
Images: uint8 in [0, 255] (NCHW or NHWC) or floats in [0, 1] (NCHW). Floats become uint8 like score_sde's
sample writer, floor(255 x) (with a 1e-3 guard so that exact k / 255 values map to k). One channel is
repeated to three.

Sample directory layout (score_sde's): samples_{r}.npz with key 'samples' (uint8 NHWC) per sampling round r,
and statistics_{r}.npz with keys 'pool_3' and 'logits' next to it. Both are written atomically (temporary
file, then os.replace) and skipped when already present, so a killed evaluation resumes where it stopped.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Callable, Iterable

import numpy as np
import torch

from configs.defaults import complete_config

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
# torch hub naming: <name>-<first 8 hex digits of the file's SHA-256>.pth (checked by download_inception_weights)
INCEPTION_WEIGHTS_SHA256_PREFIX = "6726825d"
INCEPTION_ENV_VAR = "SCORE_SDE_INCEPTION_WEIGHTS"
POOL_DIM, LOGITS_DIM = 2048, 1008

_SAMPLES_RE = re.compile(r"^samples_(\d+)\.npz$")


# ----------------------------------------------------------------------------------------------------------
# Inception network
# ----------------------------------------------------------------------------------------------------------


def _missing_weights_error(detail: str) -> FileNotFoundError:
    """The error raised when the Inception weights file cannot be found."""
    return FileNotFoundError(
        f"{detail} The Inception-v3 (TF 2015-12-05) weights file '{INCEPTION_WEIGHTS_FILENAME}' is "
        f"needed for FID/IS/KID. Download it from {INCEPTION_WEIGHTS_URL} and either set "
        f"config.eval.inception_path to its path or set the environment variable "
        f"{INCEPTION_ENV_VAR}=/path/to/{INCEPTION_WEIGHTS_FILENAME}."
    )


def download_inception_weights(path: str) -> str:
    """Fetch torch-fidelity's weights file from INCEPTION_WEIGHTS_URL to path with torch.hub's downloader
    (progress bar; written to a temporary file, moved into place only when its SHA-256 starts with
    INCEPTION_WEIGHTS_SHA256_PREFIX). Raises datasets.DownloadError, leaving nothing on disk, on failure."""
    from datasets import DownloadError

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    manual = f"Download {INCEPTION_WEIGHTS_URL} yourself to {path}, or retry."
    logging.info("Downloading the Inception weights %s to %s", INCEPTION_WEIGHTS_URL, path)
    try:
        torch.hub.download_url_to_file(
            INCEPTION_WEIGHTS_URL, path, hash_prefix=INCEPTION_WEIGHTS_SHA256_PREFIX, progress=True
        )
    except RuntimeError as err:  # torch.hub's hash check
        raise DownloadError(
            f"The file downloaded from {INCEPTION_WEIGHTS_URL} is corrupt ({err}; its SHA-256 must start with "
            f"{INCEPTION_WEIGHTS_SHA256_PREFIX}); it was removed. {manual}"
        ) from err
    except OSError as err:  # network errors (URLError, HTTPError, timeouts), a full disk
        raise DownloadError(
            f"Could not download {INCEPTION_WEIGHTS_URL} ({type(err).__name__}: {err}). {manual}"
        ) from err
    return path


def resolve_inception_path(path: str | None = None, download: bool | None = None) -> str:
    """Weights file: `path` (a file, or a folder holding it), else $SCORE_SDE_INCEPTION_WEIGHTS, else the
    torch hub cache where torch-fidelity keeps it, downloaded there when missing unless downloads are off
    (download=False or $SCORE_SDE_OFFLINE); a clear FileNotFoundError otherwise."""
    import datasets

    if path:
        source = "config.eval.inception_path"
    elif os.environ.get(INCEPTION_ENV_VAR):
        path, source = os.environ[INCEPTION_ENV_VAR], f"${INCEPTION_ENV_VAR}"
    else:
        hub = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILENAME)
        if os.path.isfile(hub):
            return hub
        if datasets.downloads_enabled(download):
            return download_inception_weights(hub)
        raise _missing_weights_error(
            f"No Inception weights given (config.eval.inception_path is empty, ${INCEPTION_ENV_VAR} is "
            f"unset and {hub} does not exist; automatic download is off: {datasets.offline_reason(download)})."
        )
    if os.path.isdir(path):
        path = os.path.join(path, INCEPTION_WEIGHTS_FILENAME)
    if not os.path.isfile(path):
        raise _missing_weights_error(f"Inception weights file {path!r} (from {source}) does not exist.")
    return path


class InceptionFeatures(torch.nn.Module):
    """Inception-v3 (TF 2015-12-05): forward(uint8 [B, 3, H, W]) -> (pool_3 [B, 2048], logits [B, 1008])."""

    def __init__(self, weights_path: str):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"Could not read the Inception weights file {weights_path!r} ({err}). It must be "
                f"torch-fidelity's '{INCEPTION_WEIGHTS_FILENAME}' ({INCEPTION_WEIGHTS_URL}); fetch it again."
            ) from err
        if not isinstance(state_dict, dict):
            raise ValueError(f"Inception weights file {weights_path!r} does not hold a state_dict.")
        # torch-fidelity reads its weights with torch.load(weights_only=False); hand it the tensors just read
        # safely (weights_only=True) through an in-memory buffer instead of the file itself.
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits"], feature_extractor_weights_path=buffer
            )
        except RuntimeError as err:
            raise ValueError(
                f"Inception weights file {weights_path!r} does not match torch-fidelity's InceptionV3 "
                f"({err}); use '{INCEPTION_WEIGHTS_FILENAME}' from {INCEPTION_WEIGHTS_URL}."
            ) from err
        self.weights_path = weights_path

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool, logits = self.net(images_uint8)
        return pool, logits


def get_inception_model(
    inceptionv3: bool = False,
    weights_path: str | None = None,
    device: torch.device | str | None = None,
    download: bool | None = None,
) -> InceptionFeatures:
    """The Inception feature network (score_sde name). score_sde used another TF-Hub network (inception_v3
    feature vectors) for images >= 256 px (inceptionv3=True); here every resolution uses the 2015-12-05 graph,
    as torch-fidelity and most FID tables do, so numbers at 256 px differ from score_sde's.
    download: see resolve_inception_path (None: download unless $SCORE_SDE_OFFLINE is set)."""
    if inceptionv3:
        logging.info("get_inception_model(inceptionv3=True): using the TF 2015-12-05 Inception graph.")
    model = InceptionFeatures(resolve_inception_path(weights_path, download=download))
    return model.to(device if device is not None else "cpu").eval()


def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 floor(255 x) of [0, 1] floats, clipped (score_sde's writer); +1e-3 so that k / 255 -> k."""
    return torch.floor(torch.clamp(x.float() * 255.0 + 1e-3, 0.0, 255.0)).to(torch.uint8)


def to_uint8_nchw(images) -> torch.Tensor:
    """uint8 [B, 3, H, W] from uint8 NCHW/NHWC or float [0, 1] NCHW images (1 channel repeated to 3)."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"Expected a batch of images [B, C, H, W] or [B, H, W, C]; got shape {tuple(x.shape)}.")
    if x.dtype == torch.uint8:
        if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
            x = x.permute(0, 3, 1, 2)
    elif torch.is_floating_point(x):
        if x.shape[1] not in (1, 3):
            raise ValueError(f"Float images must be NCHW with 1 or 3 channels in [0, 1]; got {tuple(x.shape)}.")
        x = float_to_uint8(x)
    else:
        raise ValueError(f"Images must be uint8 or floating point; got {x.dtype}.")
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[1] != 3:
        raise ValueError(f"Images must have 1 or 3 channels; got shape {tuple(x.shape)}.")
    return x.contiguous()


def run_inception(
    images,
    inception_model: torch.nn.Module,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool | str = False,
) -> dict:
    """{'pool_3': [N, 2048], 'logits': [N, 1008]} float32 NumPy features of images, computed in batches.

    progress: show a tqdm bar over the batches (a str is its description; True: 'Inception features').
    """
    from tqdm.auto import tqdm

    if device is None:
        device = next(iter(inception_model.parameters()), torch.empty(0)).device
    pools, logits = [], []
    n = len(images)
    starts = range(0, n, batch_size)
    description = progress if isinstance(progress, str) else "Inception features"
    for start in tqdm(starts, total=len(starts), desc=description, unit="batch", disable=not progress):
        batch = to_uint8_nchw(images[start : start + batch_size]).to(device)
        pool, logit = inception_model(batch)
        pools.append(pool.float().cpu().numpy())
        logits.append(logit.float().cpu().numpy())
    if not pools:
        return {
            "pool_3": np.zeros((0, POOL_DIM), np.float32),
            "logits": np.zeros((0, LOGITS_DIM), np.float32),
        }
    return {"pool_3": np.concatenate(pools), "logits": np.concatenate(logits)}


def run_inception_distributed(
    input_tensor,
    inception_model: torch.nn.Module,
    num_batches: int = 1,
    inceptionv3: bool = False,
    progress: bool | str = False,
) -> dict:
    """score_sde's name for run_inception: {'pool_3', 'logits'} NumPy features of a sample batch (uint8 NHWC as
    score_sde's run_lib passes, or [0, 1] floats NCHW). num_batches and inceptionv3 are accepted and unused
    (one device; the same Inception graph at every resolution, see get_inception_model). progress: as
    run_inception."""
    del num_batches, inceptionv3
    return run_inception(input_tensor, inception_model, progress=progress)


# ----------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, Sigma) of features [N, d]: mean and unbiased covariance, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"Need features [N >= 2, d] for statistics; got shape {f.shape}.")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix by eigendecomposition (round-off negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), by symmetric eigendecompositions."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}."
        )
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    eig = np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.sqrt(eig).sum())


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets [N, d], [M, d]."""
    return fid_from_stats(*feature_stats(features1), *feature_stats(features2))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split of consecutive samples; (mean, std) over the splits."""
    logits = np.asarray(logits, dtype=np.float64)
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} samples; got {n}.")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for k in range(splits):
        part = log_p[k * n // splits : (k + 1) * n // splits]
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0))
        kl = (p * (part - log_py)).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2, k(a, b) = (a.b / d + 1)^3: off-diagonal means of K_xx, K_yy minus 2 mean(K_xy)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and std of the unbiased cubic-polynomial MMD^2 over `num_subsets`
    random subsets of min(subset_size, N1, N2) per set (defaults 100 x 1000 as torch-fidelity)."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    size = min(subset_size, f1.shape[0], f2.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 features per set; got {f1.shape[0]} and {f2.shape[0]}.")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        a = f1[rng.choice(f1.shape[0], size, replace=False)]
        b = f2[rng.choice(f2.shape[0], size, replace=False)]
        values.append(polynomial_mmd2_unbiased(a, b))
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------------------------------------
# reference statistics
# ----------------------------------------------------------------------------------------------------------


def _atomic_savez(path: str, **arrays) -> None:
    """np.savez_compressed to path.tmp, then os.replace onto path (a reader never sees a partial file)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def compute_reference_stats(
    loader: Iterable,
    inception_model: torch.nn.Module,
    out_path: str | None = None,
    max_images: int | None = None,
    batch_size: int = 64,
) -> dict:
    """Features of a dataset (loader yields [0, 1] image tensors [B, C, H, W] or dicts with 'image').

    Returns and (if out_path) saves {'pool_3': [N, 2048], 'mu', 'sigma'} (score_sde's key plus FID moments).
    """
    pools = []
    count = 0
    for batch in loader:
        images = batch["image"] if isinstance(batch, dict) else batch
        if isinstance(images, (list, tuple)):
            images = images[0]
        if max_images is not None:
            images = images[: max_images - count]
        if len(images) == 0:
            break
        pools.append(run_inception(images, inception_model, batch_size)["pool_3"])
        count += len(images)
        if max_images is not None and count >= max_images:
            break
    if not pools:
        raise ValueError("The loader yielded no images; cannot compute reference statistics.")
    pool = np.concatenate(pools)
    mu, sigma = feature_stats(pool)
    stats = {"pool_3": pool, "mu": mu, "sigma": sigma}
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        _atomic_savez(out_path, **stats)
    return stats


def load_reference_stats(path: str) -> dict:
    """Reference statistics from an npz: score_sde's raw features (key 'pool_3') and/or moments ('mu',
    'sigma', as in pytorch-fid / torch-fidelity / TTUR files; legacy 'm'/'s' accepted).
    Returns {'mu', 'sigma'} plus 'pool_3' when present (needed for KID)."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"Reference statistics file {path!r} not found. Compute it with "
            "evaluation.compute_reference_stats(train loader, inception model, out_path) or point "
            "config.eval.stats_path to an npz with key 'pool_3' (score_sde's <dataset>_stats.npz) or keys "
            "'mu' and 'sigma'."
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except Exception as err:
        raise ValueError(
            f"Reference statistics file {path!r} is not a readable npz file ({err}); recreate it."
        ) from err
    out = {}
    if "pool_3" in arrays:
        out["pool_3"] = arrays["pool_3"].reshape(arrays["pool_3"].shape[0], -1)
        out["mu"], out["sigma"] = feature_stats(out["pool_3"])
    mu_key = "mu" if "mu" in arrays else ("m" if "m" in arrays else None)
    sigma_key = "sigma" if "sigma" in arrays else ("s" if "s" in arrays else None)
    if mu_key and sigma_key:
        out["mu"], out["sigma"] = arrays[mu_key].astype(np.float64), arrays[sigma_key].astype(np.float64)
    if "mu" not in out:
        raise ValueError(
            f"Reference statistics file {path!r} has keys {sorted(arrays)}; expected 'pool_3' (raw Inception "
            "features) or 'mu' and 'sigma'."
        )
    return out


def dataset_stats_candidates(config) -> list[str]:
    """Where the reference statistics of config.data are looked for: config.eval.stats_path when set, else
    assets/stats/<dataset>_<size>_stats.npz (what --mode eval writes) and score_sde's
    assets/stats/<dataset>_stats.npz."""
    explicit = complete_config(config).eval.stats_path
    if explicit:
        return [explicit]
    name = config.data.dataset.lower()
    return [
        os.path.join("assets", "stats", f"{name}_{config.data.image_size}_stats.npz"),
        os.path.join("assets", "stats", f"{name}_stats.npz"),
    ]


def find_dataset_stats(config) -> str | None:
    """The first existing file of dataset_stats_candidates(config), or None."""
    return next((path for path in dataset_stats_candidates(config) if os.path.isfile(path)), None)


def load_dataset_stats(config) -> dict:
    """score_sde's name: the reference statistics of the training set ({'pool_3', 'mu', 'sigma'}; 'pool_3'
    only when the file holds raw features), from the first existing file of dataset_stats_candidates."""
    path = find_dataset_stats(config)
    if path is not None:
        return load_reference_stats(path)
    candidates = dataset_stats_candidates(config)
    raise FileNotFoundError(
        f"No reference statistics for {config.data.dataset} at {' or '.join(candidates)}. Copy score_sde's "
        "assets/stats/<dataset>_stats.npz there, set config.eval.stats_path, or let --mode eval compute them "
        "from the training set."
    )


# ----------------------------------------------------------------------------------------------------------
# resumable sample and feature writers
# ----------------------------------------------------------------------------------------------------------


def samples_to_uint8_nhwc(samples) -> np.ndarray:
    """uint8 NHWC array of a sample batch: [0, 1] floats NCHW (floor(255 x)) or uint8 NCHW/NHWC."""
    x = torch.as_tensor(samples).detach()
    if x.ndim != 4:
        raise ValueError(f"Samples must be a batch [B, C, H, W]; got shape {tuple(x.shape)}.")
    if torch.is_floating_point(x):
        return float_to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.permute(0, 2, 3, 1)
    return x.cpu().numpy().astype(np.uint8)


def valid_npz(path: str, key: str) -> bool:
    """True if path is a readable npz holding `key` (a corrupt or partial file is treated as missing)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return key in data.files and data[key].shape[0] > 0
    except Exception:
        return False


def num_sampling_rounds(num_samples: int, batch_size: int) -> int:
    """ceil(num_samples / batch_size) (score_sde used num_samples // batch_size + 1, one round too many when
    the division is exact)."""
    return -(-num_samples // batch_size)


def write_samples_in_batches(
    sampling_fn: Callable,
    model: torch.nn.Module,
    sample_dir: str,
    num_samples: int,
    batch_size: int,
    seed: int | None = None,
    grid_path: str | None = None,
) -> list[str]:
    """Write samples_{r}.npz ('samples': uint8 NHWC) for r < ceil(num_samples / batch_size), skipping rounds
    already on disk; each file appears atomically once its batch is finished, so a killed run resumes.

    sampling_fn(model) returns samples in [0, 1] [B, C, H, W] (or (samples, nfe), as score_sde's samplers)
    with B = batch_size; the last round keeps the first num_samples - r * batch_size. With `seed`, round r
    runs under torch.manual_seed(seed + r): a resumed evaluation writes the same samples as an uninterrupted
    one.
    grid_path: also save the first finished batch as a PNG grid (if the file does not exist yet).
    """
    if num_samples <= 0 or batch_size <= 0:
        raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be positive.")
    os.makedirs(sample_dir, exist_ok=True)
    paths = []
    for r in range(num_sampling_rounds(num_samples, batch_size)):
        path = os.path.join(sample_dir, f"samples_{r}.npz")
        paths.append(path)
        if valid_npz(path, "samples"):
            continue
        if os.path.exists(path):
            logging.warning("Sample file %s is unreadable; sampling round %d again.", path, r)
        if seed is not None:
            torch.manual_seed(seed + r)
        out = sampling_fn(model)
        samples = out[0] if isinstance(out, (tuple, list)) else out
        keep = min(batch_size, num_samples - r * batch_size)
        if len(samples) < keep:
            raise ValueError(f"sampling_fn returned {len(samples)} samples; expected at least {keep}.")
        samples = samples[:keep]
        if grid_path and not os.path.exists(grid_path) and torch.is_floating_point(torch.as_tensor(samples)):
            save_image_grid(torch.as_tensor(samples), grid_path, nrow=int(math.sqrt(len(samples))) or 1)
        _atomic_savez(path, samples=samples_to_uint8_nhwc(samples))
        logging.info("Wrote %s (%d samples).", path, keep)
    return paths


def list_sample_files(sample_dir: str) -> list[str]:
    """samples_{r}.npz files of a directory, ordered by r."""
    if not os.path.isdir(sample_dir):
        raise FileNotFoundError(f"Sample directory {sample_dir!r} does not exist; write samples first.")
    found = [(int(m.group(1)), name) for name in os.listdir(sample_dir) if (m := _SAMPLES_RE.match(name))]
    return [os.path.join(sample_dir, name) for _, name in sorted(found)]


def compute_features_for_sample_dir(sample_dir: str, inception_model: torch.nn.Module, batch_size: int = 64) -> dict:
    """Inception features of every samples_{r}.npz, cached as statistics_{r}.npz ('pool_3', 'logits') next to
    it (computed only where missing); returns the concatenated {'pool_3', 'logits'}."""
    files = list_sample_files(sample_dir)
    if not files:
        raise FileNotFoundError(f"No samples_*.npz files in {sample_dir!r}; write samples first.")
    pools, logits = [], []
    for path in files:
        stats_path = path.replace("samples_", "statistics_")
        if not valid_npz(stats_path, "pool_3"):
            with np.load(path, allow_pickle=False) as data:
                samples = data["samples"]
            feats = run_inception(samples, inception_model, batch_size)
            _atomic_savez(stats_path, **feats)
        with np.load(stats_path, allow_pickle=False) as data:
            pools.append(data["pool_3"])
            logits.append(data["logits"])
    return {"pool_3": np.concatenate(pools), "logits": np.concatenate(logits)}


def metrics_from_sample_dir(
    sample_dir: str,
    reference,
    inception_model: torch.nn.Module | None = None,
    inception_path: str | None = None,
    batch_size: int = 64,
    is_splits: int = 10,
    kid_subset_size: int = 1000,
    kid_num_subsets: int = 100,
    device: torch.device | str | None = None,
) -> dict:
    """dict(fid, is, is_std, kid, kid_std, num_samples) of the samples in sample_dir against `reference` (a
    stats npz path or a load_reference_stats dict). KID is None when the reference lacks raw 'pool_3'."""
    ref = load_reference_stats(reference) if isinstance(reference, (str, os.PathLike)) else reference
    if inception_model is None:
        inception_model = get_inception_model(weights_path=inception_path, device=device)
    feats = compute_features_for_sample_dir(sample_dir, inception_model, batch_size)
    pool = feats["pool_3"]
    mu, sigma = feature_stats(pool)
    out = {"fid": fid_from_stats(mu, sigma, ref["mu"], ref["sigma"]), "num_samples": int(pool.shape[0])}
    splits = min(is_splits, pool.shape[0])
    out["is"], out["is_std"] = inception_score(feats["logits"], splits)
    out["kid"] = out["kid_std"] = None
    if "pool_3" in ref:
        out["kid"], out["kid_std"] = kernel_inception_distance(pool, ref["pool_3"], kid_subset_size, kid_num_subsets)
    return out


def save_image_grid(x: torch.Tensor, path: str, nrow: int = 8, padding: int = 2) -> None:
    """Save a [B, C, H, W] batch in [0, 1] as one PNG grid (torchvision.utils.save_image)."""
    from torchvision.utils import save_image

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    save_image(torch.as_tensor(x).detach().float().cpu().clamp(0.0, 1.0), path, nrow=nrow, padding=padding)
