"""The refs a flow passes to its tasks (tasks/refs.py): they refuse what is missing, naming the field,
and the directory a stage names after them (its key, tasks/common.py) depends on their content only,
the same in every process."""
from __future__ import annotations

import subprocess
import sys

import pytest

from fisao.config import EvalConfig, ModelConfig, config_hash
from tasks.evaluate import evaluate
from tasks.refs import DataRef, ModelRef, StageContext, StageRef
from tests.conftest import stage_dir


def key(policy: ModelRef, data: DataRef, ctx: StageContext) -> str:
    """The directory of `policy`'s evaluation on `data`: a stage's key over a ModelRef, a DataRef and
    the context."""
    return stage_dir(evaluate, model=policy, data=data, benchmarks=("chair", "pope"), cfg=EvalConfig(), ctx=ctx)


@pytest.mark.parametrize("make, field", [
    (lambda: DataRef("data/world", ""), "DataRef.md5"),
    (lambda: DataRef.of({"path": "data/world", "action": "verified"}), "DataRef.md5"),
    (lambda: ModelRef.of({"sha256": "ab" * 32, "figures": {}}), "ModelRef.path"),
    (lambda: ModelRef("models/llava", None), "ModelRef.sha256"),
    (lambda: ModelRef("models/llava", "ab" * 32, adapter=""), "ModelRef.adapter"),
    (lambda: StageRef.of({"path": "rollouts/x"}), "StageRef.sha256"),
    (lambda: StageContext(code="", outputs="outputs"), "StageContext.code"),
])
def test_a_missing_field_is_refused_by_name(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_of_keeps_what_a_later_stage_needs_and_drops_the_figures():
    result = {"path": "out/rounds/k/model", "sha256": "ab" * 32, "adapter": "out/rounds/k/adapter",
              "figures": {"kl": 0.1}}
    assert ModelRef.of(result) == ModelRef("out/rounds/k/model", "ab" * 32, "out/rounds/k/adapter")
    assert StageRef.of(result) == StageRef("out/rounds/k/model", "ab" * 32)
    assert ModelRef.of({"path": "m", "sha256": "s"}).adapter is None


def test_equal_refs_give_equal_keys_and_a_changed_hash_another():
    ctx = StageContext(code="c0de", outputs="outputs/campaigns/demo", runtime=ModelConfig(policy="p", verifier="v"))
    a = key(policy=ModelRef("m", "s1"), data=DataRef("data/world", "d1"), ctx=ctx)
    # Built anew, from a result carrying figures: the same content, the same key.
    b = key(policy=ModelRef.of({"path": "m", "sha256": "s1", "figures": {"seconds": 3.0}}),
            data=DataRef.of({"path": "data/world", "md5": "d1", "action": "verified"}),
            ctx=StageContext(code="c0de", outputs="outputs/campaigns/demo",
                             runtime=ModelConfig(policy="p", verifier="v")))
    assert a == b
    assert key(policy=ModelRef("m", "s2"), data=DataRef("data/world", "d1"), ctx=ctx) != a
    assert key(policy=ModelRef("m", "s1"), data=DataRef("data/world", "d2"), ctx=ctx) != a
    assert key(policy=ModelRef("m", "s1"), data=DataRef("data/world", "d1"),
               ctx=StageContext(code="c0de2", outputs="outputs/campaigns/demo")) != a
    assert key(policy=ModelRef("m", "s1"), data=DataRef("data/world", "d1"),
               ctx=StageContext(code="c0de", outputs="outputs/campaigns/demo",
                                runtime=ModelConfig(policy="p2", verifier="v"))) != a
    # Content, not paths: the same checkpoint and data read from elsewhere name the same directory.
    assert key(policy=ModelRef("elsewhere/m", "s1"), data=DataRef("copy/of/world", "d1"), ctx=ctx) == a


def test_the_key_of_refs_is_the_same_in_another_process():
    """The key hashes the refs' fields as JSON, never an object id: a resumed campaign (a new
    process) finds the directories of the run it resumes."""
    here = key(policy=ModelRef("m", "s1", "a"), data=DataRef("data/world", "d1"),
               ctx=StageContext(code="c0de", outputs="outputs"))
    script = ("from tests.test_refs import key; from tasks.refs import *; "
              "print(key(policy=ModelRef('m', 's1', 'a'), data=DataRef('data/world', 'd1'), "
              "ctx=StageContext(code='c0de', outputs='outputs')))")
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert here is not None and there == here


def test_context_key_parts_are_the_code_then_the_runtime_hash():
    # The shapes world's keys take the code version alone, as before the refs (same folder names);
    # a real-model runtime adds its config hash.
    assert StageContext(code="c0de", outputs="o").key_parts == ("c0de",)
    runtime = ModelConfig(policy="p", verifier="v")
    assert StageContext(code="c0de", outputs="o", runtime=runtime).key_parts == ("c0de", config_hash(runtime))
