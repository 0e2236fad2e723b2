"""Campaign configs: typos and bad values stop with the file, the dotted key and what to do."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fisao.config import Config, config_hash, load_config
from fisao.world.config import WorldConfig

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_config_loads():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.name == "demo" and cfg.eval.split == "test"
    assert cfg.world == WorldConfig()  # the demo spells out the defaults


def test_defaults_and_dotted_overrides():
    assert load_config(None) == Config()
    cfg = load_config(None, {"world.seed": 7, "clip.steps": 5, "name": "x"})
    assert (cfg.world.seed, cfg.clip.steps, cfg.name) == (7, 5, "x")


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, {"world": {"seed": 1, "canvas": 96}})
    cfg = load_config(path, {"world.seed": 2})
    assert (cfg.world.seed, cfg.world.canvas) == (2, 96)


@pytest.mark.parametrize("data,key", [
    ({"world": {"colour": ["red"]}}, "world.colour"),
    ({"clip": {"stepz": 3}}, "clip.stepz"),
    ({"evaluation": {"split": "test"}}, "evaluation"),
])
def test_unknown_keys_are_named_with_the_file(tmp_path, data, key):
    path = write(tmp_path, data)
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert f"  {key}: unknown key (remove it or check the spelling)" in str(e.value)


@pytest.mark.parametrize("data,key", [
    ({"world": {"canvas": "big"}}, "world.canvas"),
    ({"clip": {"steps": "many"}}, "clip.steps"),
    ({"eval": {"split": "dev"}}, "eval.split"),
    ({"world": {"sizes": {"train": "lots", "val": 1, "test": 1}}}, "world.sizes.train"),
    ({"world": {"canvas": 8}}, "world.canvas"),  # below the bound
])
def test_wrong_types_and_values_are_named_with_the_file(tmp_path, data, key):
    path = write(tmp_path, data)
    with pytest.raises(ValueError, match=rf"invalid config file {path}:\n  {key}: "):
        load_config(path)


def test_every_error_is_listed_at_once(tmp_path):
    path = write(tmp_path, {"world": {"bogus": 1, "canvas": "big"}, "clip": {"stepz": 1}})
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert all(k in str(e.value) for k in ("world.bogus", "world.canvas", "clip.stepz"))


def test_missing_invalid_and_non_mapping_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("world: [unclosed\n")
    with pytest.raises(ValueError, match=f"config file {bad} is not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping at the top level"):
        load_config(bad)
    for empty in ("", "# only a comment\n\n"):  # an empty file is said so, not run as the full demo
        bad.write_text(empty)
        with pytest.raises(ValueError, match=f"config file {bad} is empty"):
            load_config(bad)


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("rollout:\n  prompt: D\xe9cris\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"config file {bad} is not UTF-8 text \(byte 20: b'\\xe9'\); save it as UTF-8"):
        load_config(bad)


@pytest.mark.parametrize("overrides,key", [
    ({"ppo.beta_kl": float("inf")}, "ppo.beta_kl"),
    ({"ppo.lr": float("-inf")}, "ppo.lr"),
    ({"model.policy": "p", "model.verifier": "v", "model.memory_gib": float("inf"), "data.root": "d",
      "rollout.split": "train"}, "model.memory_gib"),
    ({"world.cooccurrence": {"train": float("inf"), "val": 0.3, "test": 0.3}}, "world.cooccurrence.train"),
    ({"reward.span_words": 3, "clip.name_loss_weight": float("nan")}, "clip.name_loss_weight"),
])
def test_infinities_and_nan_are_refused_in_every_float(overrides, key):
    with pytest.raises(ValueError, match=rf"\n  {key}: Input should be a finite number"):
        load_config(None, overrides)


@pytest.mark.parametrize("name", ["", "/abs/path", "../../x", "..", ".hidden", "a/b", "a b", "x" * 101, "-x"])
def test_campaign_names_must_be_one_safe_path_component(name):
    with pytest.raises(ValueError, match=r"\n  name: campaign name .* is not allowed: use letters, digits, '\.', '_' and '-'"):
        load_config(None, {"name": name})


def test_safe_campaign_names_are_kept():
    for name in ("demo", "demo-2", "llava_1.5-7b", "A" * 100):
        assert load_config(None, {"name": name}).name == name


def test_zero_rounds_is_the_base_model_only_as_on_the_command_line():
    assert load_config(None, {"ppo.rounds": 0}).ppo.rounds == 0
    with pytest.raises(ValueError, match=r"ppo.rounds: Input should be greater than or equal to 0"):
        load_config(None, {"ppo.rounds": -1})


def test_settings_from_the_command_line_are_read_as_yaml_and_validated():
    from fisao.config import parse_settings

    settings = parse_settings(["ppo.rounds=1", "world.sizes={train: 48, val: 16, test: 12}",
                               "rollout.prompt='Describe it: all of it.'", "name=tiny-2"])
    assert settings == {"ppo.rounds": 1, "world.sizes": {"train": 48, "val": 16, "test": 12},
                        "rollout.prompt": "Describe it: all of it.", "name": "tiny-2"}
    cfg = load_config(None, settings)
    assert (cfg.ppo.rounds, cfg.world.sizes["train"], cfg.name) == (1, 48, "tiny-2")
    for bad, message in (("ppo.rounds", "expected KEY=VALUE"), ("=1", "expected KEY=VALUE"),
                         ("world.sizes={train: [", "the value is not valid YAML")):
        with pytest.raises(ValueError, match=message):
            parse_settings([bad])
    with pytest.raises(ValueError, match="ppo.rounds: Input should be greater than or equal to 0"):
        load_config(None, parse_settings(["ppo.rounds=-2"]))
    with pytest.raises(ValueError, match=r"ppo.roundz: unknown key"):
        load_config(None, parse_settings(["ppo.roundz=2"]))
    with pytest.raises(ValueError, match="cannot set ppo.rounds.x: ppo.rounds is a value, not a section"):
        load_config(None, {"ppo.rounds": 2, "ppo.rounds.x": 1})


@pytest.mark.parametrize("overrides,message", [
    ({"world.classes": ["circle", "square", "octagon"], "world.pairs": [], "world.synonyms": {}},
     r"world\.classes: no renderer for \['octagon'\]"),
    ({"world.pairs": [["circle", "unicorn"]]}, r"name classes not in world\.classes: \['unicorn'\]"),
    ({"world.pairs": [["circle", "square"], ["square", "star"]]}, "a class may belong to one pair only"),
    ({"world.cooccurrence": {"train": 1.5, "val": 0.5, "test": 0.5}}, r"must lie in \[0, 1\]"),
    ({"world.cooccurrence": {"train": -0.1, "val": 0.5, "test": 0.5}}, r"must lie in \[0, 1\]"),
    ({"world.sizes": {"train": 10, "val": 5}}, "need exactly the keys train, val, test"),
    ({"world.cooccurrence": {"train": 0.9, "test": 0.5}}, "need exactly the keys train, val, test"),
    ({"world.sizes": {"train": 10, "val": 0, "test": 5}}, "world.sizes must be positive"),
    ({"world.colours": ["red", "teal"]}, r"world\.colours: unknown \['teal'\]"),
    ({"world.classes": ["circle", "circle", "square"]}, "world.classes has duplicates"),
    ({"world.min_objects": 4, "world.max_objects": 2}, "min_objects must not exceed"),
    ({"world.object_size": [20, 40]}, r"object_size \(20, 40\) must satisfy"),
    ({"world.synonyms": {"circle": []}}, "world.synonyms.circle is empty"),
    ({"world.synonyms": {"circle": ["square"]}}, "world.synonyms.circle: 'square' is already a name of 'square'"),
    ({"world.synonyms": {"circle": ["disk"], "moon": ["Disk"]}}, "'Disk' is already a name of 'circle'"),
    ({"world.synonyms": {"cross": ["plus, sign"]}}, "not a usable name"),
])
def test_invalid_world_settings_are_explained(overrides, message):
    with pytest.raises(ValueError, match=message) as e:
        load_config(None, overrides)
    assert str(e.value).startswith("invalid config (built-in defaults and overrides):\n  world")
    assert "Value error" not in str(e.value)


def test_invalid_world_settings_in_a_file_name_the_file(tmp_path):
    path = write(tmp_path, {"world": {"pairs": [["circle", "square"], ["circle", "star"]]}})
    with pytest.raises(ValueError, match=f"invalid config file {path}:\n  world.pairs: a class may belong"):
        load_config(path)


def test_configs_are_frozen_and_hash_stably():
    a, b = WorldConfig(), WorldConfig()
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 16
    assert config_hash(a) != config_hash(a.model_copy(update={"seed": 1}))
    with pytest.raises(ValueError):
        a.seed = 3  # frozen: pydantic raises a ValidationError, a ValueError
    assert WorldConfig().partner() == {
        "circle": "square", "square": "circle", "star": "moon", "moon": "star", "heart": "cross", "cross": "heart",
    }


def test_demo_is_the_defaults_and_each_ablation_changes_one_thing():
    import glob

    from fisao.config import Config

    configs = Path(__file__).resolve().parents[1] / "configs"
    demo = load_config(configs / "demo.yaml").model_dump(exclude={"name"})
    assert demo == Config().model_dump(exclude={"name"})
    paths = sorted(glob.glob(str(configs / "ablation-*.yaml")))
    assert len(paths) == 4
    for path in paths:
        other = load_config(path).model_dump(exclude={"name"})
        changed = [(s, k) for s in demo if isinstance(demo[s], dict) for k in demo[s] if demo[s][k] != other[s][k]]
        changed += [s for s in demo if not isinstance(demo[s], dict) and demo[s] != other[s]]
        assert len(changed) == 1, (path, changed)


def test_rollout_shards_default_to_one_per_process_and_must_share_out_evenly():
    from fisao.config import ScaleConfig

    assert ScaleConfig().shards == 1 and ScaleConfig(processes=4).shards == 4
    assert ScaleConfig(processes=2, rollout_shards=6).shards == 6 and ScaleConfig(rollout_shards=3).shards == 3
    with pytest.raises(ValueError, match=r"scale.rollout_shards \(3\) must be a multiple of scale.processes \(2\)"):
        load_config(None, {"scale.processes": 2, "scale.rollout_shards": 3})


def test_the_tiny_config_is_the_test_suites_tiny_settings():
    from tests.conftest import TINY

    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert tiny == load_config(None, {**TINY, "name": "tiny", "data_dir": "data-tiny"})
