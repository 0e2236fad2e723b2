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


def test_every_stage_task_is_keyed_on_the_data_version():
    """A new data version must never reuse old outputs: every stage task takes the data as a DataRef
    (whose md5 is the data version) and names its directory after it; Prefect's own result cache
    is off, so that directory is the only thing that says a stage is done."""
    import inspect

    from prefect.cache_policies import NO_CACHE

    from fisao.config import (ClipBuildConfig, EvalConfig, LlavaBuildConfig, LoraConfig, PPOConfig, RewardConfig,
                              RolloutConfig)
    from tasks import align, evaluate, models
    from tasks.refs import DataRef, ModelRef, StageContext, StageRef
    from tests.conftest import stage_dir

    model, stage, ctx = ModelRef("m", "s" * 64, "a"), StageRef("r", "r" * 64), StageContext(code="c0de", outputs="o")
    inputs = {
        align.calibrate: dict(policy=model, verifier=model, reward=RewardConfig(), rollout=RolloutConfig(), ctx=ctx),
        align.rollouts: dict(policy=model, cfg=RolloutConfig(), round_index=1, ctx=ctx),
        align.score: dict(rollouts=stage, policy=model, verifier=model, calibration=stage, reward=RewardConfig(),
                          ctx=ctx),
        align.update: dict(base=model, previous=None, rollouts=stage, scores=stage, lora=LoraConfig(), ppo=PPOConfig(),
                           round_index=1, ctx=ctx),
        evaluate.evaluate: dict(model=model, benchmarks=("chair", "pope"), cfg=EvalConfig(), ctx=ctx),
        models.build_clip: dict(cfg=ClipBuildConfig(), ctx=ctx),
        models.build_llava: dict(clip=model, cfg=LlavaBuildConfig(), ctx=ctx),
    }
    old, new = DataRef("data/world", "a" * 32 + ".dir"), DataRef("data/world", "b" * 32 + ".dir")
    for t, rest in inputs.items():
        assert inspect.signature(t.fn).parameters["data"].annotation in (DataRef, "DataRef"), t.name
        assert t.cache_policy == NO_CACHE and t.persist_result is False, t.name
        assert stage_dir(t, data=old, **rest) != stage_dir(t, data=new, **rest), t.name
