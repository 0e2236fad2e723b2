"""fisao/world/causes.py: why a description names a shape that is not there (look-alike, pair partner,
other), by hand, and on a built world whose scenes are drawn again from its config."""
from __future__ import annotations

import json

import pytest

from fisao.config import load_config
from fisao.world.build import build_world, sample_split
from fisao.world.causes import (
    SceneFacts, cause, hallucinations_by_cause, partners, rewards_by_cause, scene_facts, world_facts,
)
from fisao.world.scenes import LOOKALIKES

PARTNER = partners([["circle", "square"], ["star", "moon"]])


def test_partners_go_both_ways():
    assert PARTNER == {"circle": {"square"}, "square": {"circle"}, "star": {"moon"}, "moon": {"star"}}


def test_cause_takes_the_first_that_applies():
    facts = SceneFacts(classes=frozenset({"circle", "heart"}), lookalike_of=frozenset({"square", "star"}))
    assert cause("circle", facts, PARTNER) is None  # there
    assert cause("square", facts, PARTNER) == "lookalike"  # a look-alike is drawn, and its partner is there too
    assert cause("star", facts, PARTNER) == "lookalike"
    assert cause("moon", facts, PARTNER) == "other"  # its partner (star) is only a look-alike, not a class
    plain = SceneFacts(classes=frozenset({"circle"}), lookalike_of=frozenset())
    assert cause("square", plain, PARTNER) == "pair"
    assert cause("triangle", plain, PARTNER) == "other"  # no partner at all


def test_hallucinations_by_cause_count_each_category_once_per_description():
    facts = {1: SceneFacts(frozenset({"circle"}), frozenset({"star"})),
             2: SceneFacts(frozenset({"moon", "heart"}), frozenset())}
    described = [(1, ["circle", "square", "square", "star", "cross"]),  # pair (once), look-alike, other
                 (2, ["moon", "star", "heart"]),  # pair
                 (2, [])]  # a description naming nothing still counts as one
    assert hallucinations_by_cause(described, facts, PARTNER) == {
        "halluc_lookalike": pytest.approx(1 / 3), "halluc_pair": pytest.approx(2 / 3), "halluc_other": pytest.approx(1 / 3)}
    assert hallucinations_by_cause([], facts, PARTNER) == {"halluc_lookalike": 0.0, "halluc_pair": 0.0, "halluc_other": 0.0}


def test_rewards_by_cause_are_means_and_shares_of_the_mentions():
    facts = {1: SceneFacts(frozenset({"circle"}), frozenset({"star"}))}
    described = [(1, [("circle", 1.0), ("square", 0.25), ("circle", -1.0)]),  # the repeat's -1 is not the circle's
                 (1, [("circle", 0.5), ("square", -0.75), ("star", -1.0), ("square", 0.0)])]
    got = rewards_by_cause(described, facts, PARTNER)
    assert got == {"reward_correct": pytest.approx(0.75), "reward_lookalike": pytest.approx(-1.0),
                   "reward_pair": pytest.approx(-0.25), "share_lookalike": pytest.approx(0.2),
                   "share_pair": pytest.approx(0.4), "share_other": 0.0}
    assert "reward_other" not in got  # no such mention: no figure rather than a made-up one
    assert rewards_by_cause([], facts, PARTNER) == {}


@pytest.fixture(scope="module")
def hard_world(tmp_path_factory):
    cfg = load_config(None, {"world.sizes": {"train": 6, "val": 4, "test": 12}, "world.pretrain_size": 6,
                             "world.hardness.lookalike_prob": 1.0}).world
    return build_world(tmp_path_factory.mktemp("w") / "world", cfg, progress=False), cfg


def test_scene_facts_of_a_built_world_are_its_scenes(hard_world):
    world_dir, cfg = hard_world
    facts, partner = scene_facts(world_dir, "test")
    scenes = sample_split(cfg, "test")
    assert sorted(facts) == list(range(1, len(scenes) + 1))
    assert partner == partners(cfg.pairs)
    for image_id, scene in enumerate(scenes, start=1):
        assert facts[image_id].classes == set(scene.classes)
        assert facts[image_id].lookalike_of == {LOOKALIKES[o.shape] for o in scene.extras}
    assert any(f.lookalike_of for f in facts.values())  # lookalike_prob 1: the test exercises them


def test_scene_facts_refuse_a_world_its_config_did_not_draw(hard_world, tmp_path):
    import shutil

    world_dir, _ = hard_world
    copy = shutil.copytree(world_dir, tmp_path / "world")
    path = copy / "test" / "instances.json"
    inst = json.loads(path.read_text())
    on_first = [a for a in inst["annotations"] if a["image_id"] == 1]
    absent = next(c["id"] for c in inst["categories"] if c["id"] not in {a["category_id"] for a in on_first})
    on_first[0]["category_id"] = absent  # image 1 now claims a shape its scene does not hold
    path.write_text(json.dumps(inst))
    with pytest.raises(ValueError, match="do not match instances.json at image 1"):
        scene_facts(copy, "test")
    with pytest.warns(UserWarning, match="causes are left out"):  # the stages go on without the diagnostic
        assert world_facts(copy, "test") is None
    assert world_facts(world_dir, "test") == scene_facts(world_dir, "test")


def test_the_worlds_chair_evaluation_splits_its_hallucinations_by_cause(tiny_models, tmp_path, monkeypatch):
    """Descriptions naming every shape: the causes' sum is CHAIR's own count of hallucinated categories
    per description, and each image's split is the one its scene gives."""
    import fisao.evaluate as evaluate
    from fisao import io

    classes = tiny_models["config"].world.classes
    every = "This image contains " + ", ".join(f"a {c}" for c in classes) + "."
    monkeypatch.setattr(evaluate, "answer", lambda model, processor, images, questions, **kw: [every] * len(images))
    cfg = tiny_models["config"].eval
    metrics = evaluate.evaluate_model(tiny_models["llava"], tiny_models["world"], ("chair",), cfg, tmp_path, progress=False)
    details = list(io.read_jsonl(tmp_path / "chair_details.jsonl"))
    hallucinated = sum(len({h["category"] for h in d["hallucinated"]}) for d in details)
    assert hallucinated > 0
    assert sum(metrics[f"halluc_{c}"] for c in ("lookalike", "pair", "other")) * len(details) == pytest.approx(hallucinated)
    facts, partner = scene_facts(tiny_models["world"], cfg.split)
    by_hand = {c: 0 for c in ("lookalike", "pair", "other")}
    for d in details:
        for c in set(classes) - facts[d["image_id"]].classes:
            if c in facts[d["image_id"]].lookalike_of:
                by_hand["lookalike"] += 1
            elif partner.get(c, set()) & facts[d["image_id"]].classes:
                by_hand["pair"] += 1
            else:
                by_hand["other"] += 1
    assert {c: metrics[f"halluc_{c}"] for c in by_hand} == pytest.approx({c: v / len(details) for c, v in by_hand.items()})
    assert by_hand["pair"] > 0 and by_hand["other"] > 0
