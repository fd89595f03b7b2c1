"""Every config file of score_sde_pytorch and of the Soft Truncation repository exists here at its original path and
holds the original's value in every field the original defines.

The originals are tests/data/score_sde_configs.json and tests/data/soft_truncation_configs.json: every experiment
config file of both repositories, fully evaluated by the original code, keyed by its path (tuples as lists). Each
file loaded here must validate, hold those values exactly (device aside), and build the original's state_dict
layout where tests/data/state_dict_layouts.json has it. The improvements over the released runs live in variant
files with new names (VARIANTS), each differing from its original in the documented fields only. The original
fields this code accepts but does not use are INERT, the same list as the README's "Original config fields
accepted but not used".
"""

import ast
import glob
import importlib
import json
import math
import os
import pathlib
import re
import tokenize

import numpy as np
import pytest
import torch
from conftest import DATA_DIR, ROOT

import losses
import models  # noqa: F401  (registers the networks)
import run_lib
import sde_lib
from models import utils as mutils


def _load_json(name: str) -> dict:
    with open(os.path.join(DATA_DIR, name)) as f:
        return json.load(f)


SCORE_SDE_CONFIGS = _load_json("score_sde_configs.json")
ST_CONFIGS = _load_json("soft_truncation_configs.json")
ORIGINALS = {**SCORE_SDE_CONFIGS, **ST_CONFIGS}
LAYOUTS = _load_json("state_dict_layouts.json")

# Original fields accepted but not used here (README, "Original config fields accepted but not used"), with why.
INERT = {
    "model.conv_size": "never read by either original: their networks use fixed 3x3 convolutions",
    "model.sigma_begin": "never read by either original (NCSN's old name for sigma_max; model.sigma_max is used)",
    "training.continuouse": "a typo in score_sde's ve/ncsnv2/bedroom.py, never read",
    "training.loss": "a typo for training.sde in score_sde's ve/ncsn/celeba.py, never read",
    "training.model_mode": "read by the ST repository only behind training.sde == 'reciprocal_sde', a name its "
    "get_sde rejects",
    "uncsn.eta": "never read by the ST repository; equal to model.sigma_min, sigma(eps) of the reciprocal VE SDE here",
    "uncsn.threshold": "never read by the ST repository (a setting of its predecessor, the UNCSN code)",
    "training.eta": "the ST repository's sigma(eps) of the reciprocal VE SDE; equal to model.sigma_min in every "
    "original file, and model.sigma_min is what this code uses",
    "data.tfrecords_path": "the originals' TFRecord files; this code reads the dataset files under data.root",
}
# Fields that select behaviour in the originals and must work here (never inert).
MUST_WORK = {
    "training.reconstruction_loss",
    "data.dequantization",
    "training.ddpm_score",
    "eval.enable_bpd",
    "eval.nll_iter",
    "eval.nelbo_iter",
    "eval.num_test_data",
    "eval.begin_ckpt",
    "eval.end_ckpt",
    "eval.enable_sampling",
    "eval.probability_flow",
    "eval.residual",
    "eval.lambda_",
    "sampling.sample_more",
    "training.unbounded_parametrization",
    "training.sde",
    "training.st",
    "training.k",
}

# New files next to the originals: (original path, {field: value that differs from the original's}).
ST_FOR_VE = {"training.k": 2.0, "training.st_vp_only": False}
VARIANTS = {
    "configs/ve/CIFAR10/ncsnpp_st_k2.py": ("configs/ve/CIFAR10/ncsnpp_st.py", ST_FOR_VE),
    "configs/ve/CELEBA/ncsnpp_st_k2.py": ("configs/ve/CELEBA/ncsnpp_st.py", {"training.st_vp_only": False}),
    "configs/ve/CIFAR10/uncsnpp_st_rve.py": (
        "configs/ve/CIFAR10/uncsnpp_st.py",
        {**ST_FOR_VE, "training.unbounded_parametrization": True},
    ),
    "configs/ve/CELEBA/uncsnpp_st_rve.py": (
        "configs/ve/CELEBA/uncsnpp_st.py",
        {**ST_FOR_VE, "training.unbounded_parametrization": True},
    ),
    "configs/ve/celebahq/uncsnpp_st_rve.py": (
        "configs/ve/celebahq/uncsnpp_st.py",
        {"training.sde": "reciprocal_vesde", "training.unbounded_parametrization": True, "training.st_vp_only": False},
    ),
}
# The ST repository's VE / RVE "+ ST" files: its code never drew tau for VE / RVE (papers.md section 3).
ST_VE_RELEASED = [original for original, _ in VARIANTS.values()]


def load_config(path: str):
    """get_config() of the config file at `path` (relative to the repository root)."""
    module = importlib.import_module(path[: -len(".py")].replace("/", "."))
    return module.get_config()


def flatten(cfg: dict, prefix: str = "") -> dict:
    """{'section.field': value} of a nested dict. The reference JSON writes a top-level scalar that the original
    defines as a field of the root ConfigDict (score_sde's `seed`) as {'': value}: that is the field's value."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and set(value) == {""}:
            out[prefix + key] = value[""]
        elif isinstance(value, dict):
            out.update(flatten(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


def ours_flat(path: str) -> dict:
    """The flattened config at `path`, without the machine-dependent device."""
    flat = flatten(load_config(path).to_dict())
    flat.pop("device")
    return flat


def same(a, b) -> bool:
    """Exact equality, floats to 1e-12 relative; lists and tuples alike; True is not 1."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (
            isinstance(a, (list, tuple))
            and isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return type(a) is type(b) and a == b


def mismatch(ours: dict, field: str, value) -> str | None:
    """Why flattened config `ours` disagrees with the original's `field` = `value` (None when it agrees)."""
    if field not in ours:
        return f"{field}: missing (original {value!r})"
    if not same(ours[field], value):
        return f"{field}: ours {ours[field]!r} vs original {value!r}"
    return None


def build_on_meta(config) -> torch.nn.Module:
    """The network of `config` on the meta device: layout and shapes only, no memory."""
    with torch.device("meta"):
        return mutils.get_model(config.model.name)(config)


def layout(model: torch.nn.Module) -> list:
    return [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]


# ------------------------------------------------------------------------------------------------------------
# The comparison itself


def test_same_is_exact():
    assert same(0.1, 0.1 * (1 + 1e-13)) and not same(0.1, 0.1 * (1 + 1e-9))
    assert same((1, 2), [1, 2]) and not same((1, 2), [1, 2, 3]) and same(50, 50.0)
    assert not same(True, 1) and not same(False, 0.0) and not same("1", 1) and same(None, None)
    assert flatten({"seed": {"": 42}, "a": {"b": {"c": 1}}}) == {"seed": 42, "a.b.c": 1}
    assert mismatch({"x": 1}, "x", 2) and mismatch({}, "x", 2) and mismatch({"x": 1}, "x", 1) is None


def test_reference_files_are_complete():
    """39 score_sde files and 33 ST files at distinct paths; every one defines seed = 42 (score_sde's JSON holds
    the root-level scalar as {'': 42}, which flatten reads as the field seed)."""
    assert (len(SCORE_SDE_CONFIGS), len(ST_CONFIGS)) == (39, 33)
    assert not set(SCORE_SDE_CONFIGS) & set(ST_CONFIGS)
    for path, cfg in ORIGINALS.items():
        flat = flatten(cfg)
        assert flat["seed"] == 42 and not any(key.startswith("seed.") for key in flat), path


@pytest.mark.parametrize("path", sorted(ORIGINALS))
def test_original_config_holds_every_original_value(path):
    """The file exists at the original path, loads, validates and holds every field of the original exactly."""
    assert os.path.isfile(os.path.join(ROOT, path)), f"{path} is missing"
    config = load_config(path)
    run_lib.validate_config(config)
    ours = flatten(config.to_dict())
    problems = [mismatch(ours, field, value) for field, value in flatten(ORIGINALS[path]).items()]
    problems = [p for p in problems if p is not None]
    assert not problems, "\n".join(problems)


def _layout_cases() -> dict:
    """{name: (config path, keys, n_params)}: the 15 released configurations, and score_sde's NCSNv2 bedroom
    network from tests/data/ncsnv2_reference.pt (its parameter count is the sum of its float32 keys)."""
    cases = {name: (name.split(":")[1], entry["keys"], entry["n_params"]) for name, entry in LAYOUTS.items()}
    reference = torch.load(os.path.join(DATA_DIR, "ncsnv2_reference.pt"), weights_only=True)
    (key,) = [k for k in reference["layouts"] if k.startswith("ncsnv2_128")]
    cases["score_sde_pytorch:configs/ve/ncsnv2/bedroom.py"] = (
        "configs/ve/ncsnv2/bedroom.py",
        reference["layouts"][key],
        None,
    )
    return cases


LAYOUT_CASES = _layout_cases()


@pytest.mark.parametrize("name", sorted(LAYOUT_CASES))
def test_original_config_builds_the_released_layout(name):
    path, keys, n_params = LAYOUT_CASES[name]
    config = load_config(path)
    model = build_on_meta(config)
    assert layout(model) == keys
    if n_params is not None:
        assert sum(p.numel() for p in model.parameters()) == n_params
    if name in LAYOUTS:  # the layout file's copy of the config sections agrees too
        ours = flatten(config.to_dict())
        for section in ("data", "model", "training"):
            for field, value in flatten(LAYOUTS[name]["config"][section]).items():
                assert mismatch(ours, f"{section}.{field}", value) is None, (name, section, field)


# ------------------------------------------------------------------------------------------------------------
# Variants and what the released files mean


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_differs_from_its_original_in_the_documented_fields_only(variant):
    original, changes = VARIANTS[variant]
    config = load_config(variant)
    run_lib.validate_config(config)
    ours, theirs = ours_flat(variant), ours_flat(original)
    assert set(ours) == set(theirs)
    differing = {key for key in ours if not same(ours[key], theirs[key])}
    assert differing == set(changes)
    for key, value in changes.items():
        assert same(ours[key], value), key


@pytest.mark.parametrize("path", ST_VE_RELEASED)
def test_released_st_ve_runs_and_their_variants(path):
    """The released VE / RVE "+ ST" files say training.st = True as the original does, and train on the fixed
    [eps, 1] as its code did (training.st_vp_only); their networks embed log sigma as trained. The variant
    draws tau for the VE / RVE SDE (st_vp_only False) and, for UNCSN++, embeds u(sigma)."""
    released = load_config(path)
    assert released.training.st is True and released.training.st_vp_only is True
    assert not losses.soft_truncation_applies(released, sde_lib.get_sde(released)[0])
    assert build_on_meta(released).unbounded_sigma_embedding is False
    (variant,) = [v for v, (original, _) in VARIANTS.items() if original == path]
    config = load_config(variant)
    assert config.training.st is True and config.training.st_vp_only is False and config.training.k == 2.0
    assert losses.soft_truncation_applies(config, sde_lib.get_sde(config)[0])
    assert build_on_meta(config).unbounded_sigma_embedding is ("uncsnpp" in path)


def _st_reciprocal_std(t: np.ndarray, eta: float, sigma_min: float, sigma_max: float) -> np.ndarray:
    """sigma(t) of the ST repository's reciprocal VE SDE (float64), its eps fixed at 1e-5: with
    b = (eta / s_max)^(1 / (1/eps - 1)) and b2 = 1.01^(-1 / (2 (1/eps - 1))),
    sigma^2 = (s_max / b)^2 b^(2/t) - 1.01^((1/eps) / (1/eps - 1)) (eta^2 - s_min^2) b2^(2/t)."""
    n = 1.0 / 1e-5 - 1.0
    base = (eta / sigma_max) ** (1.0 / n)
    base2 = 1.01 ** (-1.0 / (2.0 * n))
    const2 = -(1.01 ** ((1.0 / 1e-5) / n)) * (eta**2 - sigma_min**2)
    return np.sqrt((sigma_max / base) ** 2 * base ** (2.0 / t) + const2 * base2 ** (2.0 / t))


RVE_ORIGINALS = sorted(p for p, c in ST_CONFIGS.items() if c["training"]["sde"] in ("reciprocal_vesde", "rve-sde"))


@pytest.mark.parametrize("path", RVE_ORIGINALS)
def test_reciprocal_ve_files_build_the_original_sde(path):
    """'reciprocal_vesde' and the legacy 'rve-sde' build this project's RVE SDE, whose sigma(t) is the ST
    repository's at every t in [eps, 1] (eta from training.eta or, in the legacy files, uncsn.eta)."""
    config = load_config(path)
    sde, _ = sde_lib.get_sde(config)
    assert type(sde) is sde_lib.RVESDE and sde.eps == 1e-5  # the ST repository's fixed eps
    eta = config.training.eta if "eta" in config.training else config.uncsn.eta
    t = np.array([1e-5, 3e-5, 1e-3, 0.02, 0.3, 1.0])
    expected = _st_reciprocal_std(t, eta, config.model.sigma_min, config.model.sigma_max)
    got = sde.marginal_std(torch.tensor(t, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert expected[0] == pytest.approx(eta, rel=1e-9) and expected[-1] == pytest.approx(config.model.sigma_max)


def test_legacy_files_keep_the_name_the_original_rejects():
    legacy = sorted(p for p, c in ST_CONFIGS.items() if c["training"]["sde"] == "rve-sde")
    assert len(legacy) == 9
    for path in legacy:
        config = load_config(path)
        assert config.training.sde == "rve-sde" and config.uncsn.eta == config.model.sigma_min


def test_typo_files_keep_the_typo_and_say_what_runs():
    """ve/ncsn/celeba.py keeps training.loss = 'vesde' and trains the VE SDE; ve/ncsnv2/bedroom.py keeps
    training.continuouse = False and, as the original, training.continuous = True."""
    celeba = load_config("configs/ve/ncsn/celeba.py")
    assert celeba.training.loss == "vesde" and celeba.training.sde == "vesde"
    bedroom = load_config("configs/ve/ncsnv2/bedroom.py")
    assert bedroom.training.continuouse is False and bedroom.training.continuous is True


# ------------------------------------------------------------------------------------------------------------
# Defaults, every config file, the README


DEFAULTS = sorted(glob.glob(os.path.join(ROOT, "configs", "default_*_configs.py")))
# The Soft Truncation repository's fields that score_sde's files lack, with the defaults that reproduce score_sde.
SCORE_SDE_BEHAVIOUR = {
    "training.ddpm_score": True,
    "training.reconstruction_loss": False,
    "training.num_train_data": 0,
    "training.whatever_sampling": False,
    "training.st_vp_only": False,
    "data.dequantization": "none",
    "data.download": True,
    "data.root": "",
    "model.fourier_feature": False,
    "optim.amsgrad": False,
    "sampling.sample_more": True,
    "eval.nll_iter": 5,
    "eval.nelbo_iter": 0,
    "eval.num_test_data": 0,
    "eval.lambda_": 0.0,
}


@pytest.mark.parametrize("path", [os.path.relpath(p, ROOT) for p in DEFAULTS])
def test_default_configs_reproduce_score_sde(path):
    flat = ours_flat_defaults(path)
    for field, value in SCORE_SDE_BEHAVIOUR.items():
        assert same(flat[field], value), field
    assert flat["eval.nll_iter"] == flat["eval.bpd_num_repeats"]  # score_sde's 5 bits/dim passes


def ours_flat_defaults(path: str) -> dict:
    module = importlib.import_module(path[: -len(".py")].replace("/", "."))
    return flatten(module.get_default_configs().to_dict())


ALL_CONFIG_FILES = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    if hasattr(importlib.import_module(os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".")), "get_config")
)


def test_every_original_and_variant_is_a_config_file():
    assert set(ORIGINALS) | set(VARIANTS) <= set(ALL_CONFIG_FILES)


@pytest.mark.parametrize("path", sorted(set(ALL_CONFIG_FILES) - set(ORIGINALS)))
def test_every_other_config_loads_validates_and_builds(path):
    """The variants and this project's own configs (demos, STF, blur ...) keep working."""
    config = load_config(path)
    run_lib.validate_config(config)
    build_on_meta(config)


def _readme_inert_fields() -> dict:
    """{field: reason} of the README subsection "Original config fields accepted but not used"."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    match = re.search(r"^#+ Original config fields accepted but not used\n(.*?)(?=^#)", text, re.M | re.S)
    assert match, "README: subsection 'Original config fields accepted but not used' not found"
    return dict(re.findall(r"^- `([\w.]+)`: (.+)$", match.group(1), re.M))


def test_inert_fields_are_the_readme_list():
    readme = _readme_inert_fields()
    assert set(readme) == set(INERT)
    assert not set(INERT) & MUST_WORK
    defined = set().union(*(flatten(cfg) for cfg in ORIGINALS.values()))
    assert set(INERT) <= defined, "an inert field that no original defines"


def _names_read_by_the_code() -> set:
    """Attribute names (x.NAME) and identifier-like string literals ('NAME') in the code outside configs/ and
    tests/: a config field the code reads appears among them (config.a.NAME, a.get('NAME'), _opt(a, 'NAME'))."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, ROOT)
        if rel.split(os.sep)[0] in ("configs", "tests") or rel.startswith("."):
            continue
        with open(path, "rb") as f:
            tokens = list(tokenize.tokenize(f.readline))
        for previous, token in zip(tokens, tokens[1:]):
            if token.type == tokenize.NAME and previous.string == ".":
                names.add(token.string)
            elif token.type == tokenize.STRING and not token.string.lower().startswith(("f", "rf", "fr", "b")):
                value = ast.literal_eval(token.string)
                if isinstance(value, str) and value.isidentifier():
                    names.add(value)
    return names


def test_inert_fields_are_not_read_by_the_code():
    """If the code starts reading one, it leaves INERT and the README list."""
    names = _names_read_by_the_code()
    # 'loss' is also a results key of run_lib: for training.loss only `training.loss` itself counts.
    sources = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "models", "*.py"))
    code = "\n".join(pathlib.Path(p).read_text() for p in sources)
    for field in INERT:
        name = field.split(".")[-1]
        if field == "training.loss":
            assert not re.search(r"training(\.get\(|\[|\.)\s*['\"]?loss\b", code), field
        else:
            assert name not in names, f"{field} is read by the code: remove it from INERT and the README list"


def test_readme_names_each_variant_next_to_its_original():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    for variant, (original, _) in VARIANTS.items():
        short_variant, short_original = variant[len("configs/") :], original[len("configs/") :]
        line = [ln for ln in text.splitlines() if short_variant in ln]
        assert line and any(short_original in ln for ln in line), variant


def test_readme_commands_configs_exist():
    for path in (
        "configs/vp/CIFAR10/ddpmpp_nll_st.py",
        "configs/vp/CIFAR10/ddpmpp_fid_st_deepest.py",
        "configs/ve/CIFAR10/uncsnpp_st.py",
        "configs/vp/CELEBA/ddpmpp_nll_st.py",
        "configs/vp/CELEBA/ddpmpp_fid_st.py",
        "configs/ve/CELEBA/uncsnpp_st.py",
        "configs/vp/IMAGENET32/ddpmpp_st.py",
        "configs/ve/celebahq/uncsnpp_st.py",
    ):
        config = load_config(path)
        assert isinstance(config.device, torch.device)
        assert config.training.st


# ------------------------------------------------------------------------------------------------------------
# A few original configs run: their network gives a finite score of the right shape


@pytest.mark.parametrize(
    "path",
    [
        "configs/vp/cifar10_ncsnpp.py",  # discrete VP, NCSN++ with the positional embedding
        "configs/vp/ddpm/cifar10_unconditional.py",  # DDPM without time conditioning
        "configs/ve/cifar10_ncsnpp.py",  # discrete VE (SMLD) NCSN++
        "configs/ve/cifar10_uncsn_1e-3.py",  # 'rve-sde': the reciprocal VE SDE with the Fourier embedding
    ],
)
def test_original_configs_give_a_finite_score(path):
    """Objective, SDE, network and score function of the file together (the network narrowed to nf 32, one block
    per level, to keep the test fast: the code path is the released one's)."""
    config = load_config(path)
    config.device = torch.device("cpu")
    config.model.nf = 32
    config.model.num_res_blocks = 1
    torch.manual_seed(0)
    model = mutils.create_model(config).eval()
    sde, _ = run_lib.get_corruption(config)
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=config.training.continuous)
    x = torch.rand(1, 3, config.data.image_size, config.data.image_size)
    with torch.no_grad():
        score = score_fn(x, torch.full((1,), 0.5))
    assert score.shape == x.shape and torch.isfinite(score).all() and score.abs().sum() > 0
