"""Campaign inputs: the name and round count may change between runs of a campaign, nothing else."""
from __future__ import annotations

from fisao.config import load_config
from fisao.inputs import changes, config_identity_hash, identity


def record(cfg, md5="a" * 32 + ".dir"):
    return {"data_md5": md5, "config": identity(cfg)}


def test_name_and_round_count_are_not_part_of_the_identity():
    a = load_config(None, {"name": "a", "ppo.rounds": 3})
    b = load_config(None, {"name": "b", "ppo.rounds": 7})
    assert config_identity_hash(a) == config_identity_hash(b)
    assert changes(record(a), record(b)) == []
    assert "ppo.lr" in identity(a) and "world.sizes.train" in identity(a)


def test_changes_name_the_data_version_and_each_config_key():
    a = load_config(None, {})
    b = load_config(None, {"ppo.lr": 0.002, "rollout.n_per_image": 8})
    assert config_identity_hash(a) != config_identity_hash(b)
    lines = changes(record(a), record(b, "b" * 32 + ".dir"))
    assert lines == [f"data: md5 {'a' * 32}.dir -> {'b' * 32}.dir (data.dvc)",
                     "config: ppo.lr 0.001 -> 0.002", "config: rollout.n_per_image 4 -> 8"]


def test_every_cached_task_is_keyed_on_the_data_version():
    """A new data version must never hit an old cache: every cached task takes the data as a DataRef
    (whose md5 is the data version), and the cache policy hashes all inputs."""
    import inspect

    from tasks import align, evaluate, models
    from prefect.cache_policies import Inputs

    from tasks.common import CACHE
    from tasks.refs import DataRef

    tasks = [align.calibrate, align.rollouts, align.score, align.update, evaluate.evaluate, models.build_clip,
             models.build_llava]
    for t in tasks:
        assert inspect.signature(t.fn).parameters["data"].annotation in (DataRef, "DataRef"), t.name
        assert t.cache_policy == CACHE, t.name
    inputs = next(p for p in CACHE.policies if isinstance(p, Inputs))
    old, new = DataRef("data/world", "a" * 32 + ".dir"), DataRef("data/world", "b" * 32 + ".dir")
    assert inputs.compute_key(None, {"data": old}, {}) != inputs.compute_key(None, {"data": new}, {})
