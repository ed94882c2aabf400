"""Typed configs: YAML presets, `base:` inheritance, dotted overrides, unknown keys, resolved dumps."""
from pathlib import Path

import pytest
import yaml

from hybridflow_mg.config.load import ConfigError, dump_config, load_config
from hybridflow_mg.config.schema import Config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_preset_loads():
    from hybridflow_mg.trainer.config import TrainConfig

    assert isinstance(load_config(Config, CONFIGS / "base.yaml"), Config)
    presets = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "base.yaml")
    assert presets
    for path in presets:
        assert isinstance(load_config(TrainConfig, path), TrainConfig)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(Config, CONFIGS / "base.yaml",
                      ["parallel.train.tp=2", "parallel.gen.tp=1", "run.name=abc", "dist.timeout_minutes=5"])
    assert cfg.parallel.train.tp == 2 and cfg.parallel.gen.tp == 1 and cfg.run.name == "abc"
    assert cfg.dist.timeout_minutes == 5


def test_base_inheritance_and_dump_round_trip(tmp_path):
    (tmp_path / "child.yaml").write_text(f"base: {CONFIGS / 'base.yaml'}\nparallel:\n  train: {{pp: 2}}\n")
    cfg = load_config(Config, tmp_path / "child.yaml", ["parallel.train.vpp=2"])
    assert (cfg.parallel.train.tp, cfg.parallel.train.pp, cfg.parallel.train.vpp) == (1, 2, 2)
    out = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Config, out) == cfg
    assert yaml.safe_load(out.read_text())["parallel"]["train"]["pp"] == 2


@pytest.mark.parametrize("override,message", [
    ("parallel.train.tpp=2", "unknown config key 'parallel.train.tpp'; did you mean 'parallel.train.tp'?"),
    ("paralel.train.tp=2", "unknown config key 'paralel'; did you mean 'parallel'?"),
    ("run.seeed=3", "did you mean 'run.seed'?"),
    ("parallel.train.tp=two", "'parallel.train.tp' must be an integer"),
    ("parallel.train.tp=0", "tp must be a positive integer"),
    ("dist.backend=mpi", "must be one of 'auto', 'gloo', 'nccl'"),
    ("parallel.train.vpp=2", "vpp=2 needs pp > 1"),
    ("run.name", "must look like section.key=value"),
    ("run=3", "is a section"),
])
def test_bad_overrides_fail_with_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(Config, CONFIGS / "base.yaml", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_a_file_names_the_closest(tmp_path):
    (tmp_path / "bad.yaml").write_text("parallel:\n  train:\n    tensor_parallel: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'parallel.train.tensor_parallel'"):
        load_config(Config, tmp_path / "bad.yaml")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Config, tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("run: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(Config, tmp_path / "broken.yaml")
