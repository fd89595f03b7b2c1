"""The config boundary (configs/defaults.py): complete_config fills every optional field once, keeps what a config
sets, derives the fields that depend on others, and the library reads config sections without fallbacks."""

import ast
import glob
import os

import ml_collections
import pytest
from conftest import ROOT

from configs import defaults
from configs.defaults import DEFAULTS, TOP_LEVEL, Unset, add_default_fields, complete_config, default_blur_config


def score_sde_like_config() -> ml_collections.ConfigDict:
    """A config with only the sections and a few fields of score_sde's own files (none of this project's)."""
    config = ml_collections.ConfigDict()
    config.training = ml_collections.ConfigDict({"sde": "vesde", "continuous": True, "batch_size": 8})
    config.model = ml_collections.ConfigDict({"name": "ncsnpp", "num_scales": 1000, "sigma_max": 50.0})
    config.sampling = ml_collections.ConfigDict({"method": "pc"})
    config.eval = ml_collections.ConfigDict({"batch_size": 4})
    config.data = ml_collections.ConfigDict({"dataset": "CIFAR10", "image_size": 32})
    config.optim = ml_collections.ConfigDict({"lr": 2e-4})
    return config


def test_every_default_is_filled_and_present_fields_are_kept():
    raw = score_sde_like_config()
    raw.sampling.nfe = 12  # a field this project defines, set by the config: kept
    done = complete_config(raw)
    for section, fields in DEFAULTS.items():
        for name, value in fields.items():
            if (section, name) == ("sampling", "nfe"):
                continue
            got = done[section][name]
            assert got is None if isinstance(value, Unset) else got == value, (section, name, got)
    for name, value in TOP_LEVEL.items():
        assert done[name] == value
    assert done.sampling.nfe == 12 and done.training.sde == "vesde" and done.optim.lr == 2e-4
    assert "nfe" in raw.sampling and "precision" not in raw.training  # the input is not modified


def test_complete_config_is_idempotent():
    once = complete_config(score_sde_like_config())
    twice = complete_config(once)
    assert once.to_dict() == twice.to_dict()


@pytest.mark.parametrize(
    "corruption, sde, unbounded, eps, embedding",
    [
        ("gaussian", "vpsde", False, 1e-5, "log"),
        ("gaussian", "vesde", True, 1e-5, "uncsn"),
        ("gaussian", "rvesde", True, 1e-5, "uncsn"),
        ("gaussian", "vpsde", True, 1e-5, "log"),  # UDDPM++ changes the time label, not the sigma embedding
        ("blur", "vpsde", False, 1e-3, "log"),
    ],
)
def test_derived_fields(corruption, sde, unbounded, eps, embedding):
    raw = score_sde_like_config()
    raw.training.corruption = corruption
    raw.training.sde = sde
    raw.training.unbounded_parametrization = unbounded
    done = complete_config(raw)
    assert done.training.truncation_time == eps
    assert done.model.sigma_embedding == embedding
    assert done.model.num_classes == 1000  # NCSN's conditional normalisation: one class per noise level
    raw.training.truncation_time = 0.02  # a set value wins over the derived default
    assert complete_config(raw).training.truncation_time == 0.02


def test_blur_section_gets_the_missing_blur_fields():
    raw = score_sde_like_config()
    raw.blur = ml_collections.ConfigDict({"sigma_max": 7.0})
    blur = complete_config(raw).blur
    assert blur.sigma_max == 7.0
    for name, value in default_blur_config().items():
        if name != "sigma_max":
            assert blur[name] == value
    assert "blur" not in complete_config(score_sde_like_config())  # no blur section is invented


def test_unset_defaults_keep_their_type_for_command_line_overrides():
    """ml_collections refuses to override a plain None field from the command line; an Unset one has a type."""
    config = add_default_fields(score_sde_like_config())
    assert config.eval.nll_iter is None and config.eval.get_ref("nll_iter").get_type() is int
    assert config.eval.get_ref("probability_flow").get_type() is bool
    config.eval.nll_iter = 3
    assert config.eval.nll_iter == 3
    other = add_default_fields(score_sde_like_config())
    assert other.eval.nll_iter is None  # each config gets its own field, never a shared reference


def test_default_configs_carry_every_plain_default():
    """get_default_configs adds the plain defaults, so --config.sampling.num_steps=50 works on this project's
    config files; the derived ones are left to complete_config (they follow fields a config file sets later)."""
    from configs.default_cifar10_configs import get_default_configs

    config = get_default_configs()
    for section, fields in DEFAULTS.items():
        assert set(fields) <= set(config[section]), section
    assert "sigma_embedding" not in config.model and "num_classes" not in config.model


def test_the_defaults_module_imports_nothing_of_the_project():
    tree = ast.parse(open(defaults.__file__).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "copy", "ml_collections"}, imported


SECTIONS = ("training", "model", "data", "eval", "sampling", "optim", "blur")


def _fallback_reads(path: str) -> list[int]:
    """Lines with section.get(...) or getattr(section, ...) on a config section (a read with a fallback)."""
    lines = []
    for node in ast.walk(ast.parse(open(path).read())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "get":
            owner = func.value
            if isinstance(owner, ast.Attribute) and owner.attr in SECTIONS:
                lines.append(node.lineno)
        if isinstance(func, ast.Name) and func.id == "getattr" and node.args:
            owner = node.args[0]
            if isinstance(owner, ast.Attribute) and owner.attr in SECTIONS:
                lines.append(node.lineno)
    return lines


def test_fallback_read_detector(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("a = config.training.get('k', 1)\nb = getattr(config.eval, 'x', 0)\nc = state.get('k')\n")
    assert sorted(_fallback_reads(str(path))) == [1, 2]


def test_library_reads_config_fields_directly():
    """After the boundary no library module reads a config section with a fallback default (configs/defaults.py
    itself excepted)."""
    sources = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "models", "*.py"))
    sources += glob.glob(os.path.join(ROOT, "samplers", "*.py"))
    found = {os.path.relpath(p, ROOT): _fallback_reads(p) for p in sources}
    assert {k: v for k, v in found.items() if v} == {}
