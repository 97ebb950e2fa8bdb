import pytest
import yaml

from newstune.config import load_config
from newstune.errors import NewstuneError


def write(tmp_path, raw):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


BASE = {"data": {"name": "ag_news"}, "model": {"name": "minilm"}}


def test_overrides_are_parsed_as_yaml(tmp_path):
    config = load_config(write(tmp_path, BASE), ["train.epochs=2", "lora.target_modules=qkv", "train.lr=1e-3"])
    assert config.train.epochs == 2
    assert config.lora.target_modules == ["qkv"]
    assert config.train.lr == pytest.approx(1e-3)
    assert config.name == f"{tmp_path.name}_recipe"


def test_unknown_key_names_the_key(tmp_path):
    with pytest.raises(NewstuneError, match="unknown config key 'train.epoch'"):
        load_config(write(tmp_path, BASE), ["train.epoch=2"])


def test_bad_value_names_the_key_and_value(tmp_path):
    with pytest.raises(NewstuneError, match="bad value for 'train.precision'.*'fp8'"):
        load_config(write(tmp_path, BASE), ["train.precision=fp8"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(NewstuneError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(NewstuneError, match="not valid YAML"):
        load_config(bad)


def test_files_dataset_needs_train_file(tmp_path):
    with pytest.raises(NewstuneError, match="needs data.train_file"):
        load_config(write(tmp_path, {**BASE, "data": {"name": "files"}}))


def test_recipes_all_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))
    assert len(recipes) >= 10
    for recipe in recipes:
        load_config(recipe)


def test_dependency_bounds_admit_the_tested_versions_and_no_newer_minor():
    """pyproject's upper bounds follow constraints.txt (the versions CI tests): fails when a pin moves past a bound,
    or a bound admits a newer minor release than the one tested (the code relies on their internals)."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    root = Path(__file__).parents[1]
    pins = dict(line.split("==") for line in (root / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    deps = [Requirement(d) for d in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]]
    bounded = {d.name: d.specifier for d in deps if any(s.operator == "<" for s in d.specifier)}
    assert {"torch", "transformers", "peft", "accelerate"} <= set(bounded)
    for name, specifier in bounded.items():
        tested = Version(pins[name])
        assert tested in specifier, f"{name} {tested} (constraints.txt) is outside {specifier}"
        upper = next(Version(s.version) for s in specifier if s.operator == "<")
        assert upper <= Version(f"{tested.major}.{tested.minor + 1}"), f"{name} {specifier} admits untested minors"
