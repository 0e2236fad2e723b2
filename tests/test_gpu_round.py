"""bench/gpu_round.py, the GPU check: its tiny path on CPU runs the code the GPU run takes, under an
import guard that blocks every installed distribution the bare GPU machine lacks (bench/gpu/); and
its LLaVA-1.5-7B and CLIP ViT-L/14-336 configurations have the real checkpoints' sizes."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu_round.py"
GPU = ROOT / "bench" / "gpu"
# Never on the GPU machine, whatever the lists say: the orchestration layers and their tools.
ALWAYS_BLOCKED = {"prefect", "mlflow", "dvc", "tasks", "flows"}
TINY = ["--shape", "tiny", "--device", "cpu", "--images", "16", "--answers", "4", "--max-new-tokens", "12",
        "--eval-images", "2", "--eval-max-new-tokens", "12"]

# Runs a script with the named top-level modules missing, as a package that is not installed is:
# every import finder answers None for them, so `import x` raises ModuleNotFoundError and the
# availability probes of transformers and accelerate (importlib.util.find_spec) say "absent".
# argv: the blocked names, the script, its arguments.
GUARD = r"""
import runpy, sys
blocked = set(sys.argv[1].split(","))
class Guard:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [Guard(f) for f in sys.meta_path]
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _names(path: Path) -> set[str]:
    """Normalised distribution names of a list (one per line, `name` or `name==version`, # comments)."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {_normal(line.split("==")[0]) for line in lines if line}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_requirements(names: set[str]) -> set[str]:
    """`names` and, transitively, what their installed versions require (extras left out): the GPU
    machine's own versions of its packages bring what they need, which may differ from ours."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_normal(req.name))
    return seen


def blocked_modules() -> set[str]:
    """Top-level modules of every installed distribution that is neither on the GPU machine nor
    carried (nor needed by one that is), and the orchestration layers whatever the lists say."""
    allowed = _with_requirements(_names(GPU / "machine-packages.txt") | _names(GPU / "requirements.txt")) | {"fisao"}
    mine = {top for top, dists in packages_distributions().items() if not any(_normal(d) in allowed for d in dists)}
    return (mine | ALWAYS_BLOCKED) - {"fisao"}


def guarded(script: Path | str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", GUARD, ",".join(sorted(blocked_modules())), str(script), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def imported_modules(script: Path) -> dict[str, set[str]]:
    """Top-level modules imported anywhere (lazy imports in functions too) by `script` and by the
    fisao modules it reaches, fisao's own left out: {module: files importing it}."""
    seen, found, todo = set(), {}, [script]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] == "fisao":
                    module = ROOT.joinpath(*name.split("."))
                    todo.append(module / "__init__.py" if module.is_dir() else module.with_suffix(".py"))
                else:
                    found.setdefault(name.split(".")[0], set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_bench_imports_only_what_the_gpu_machine_has():
    """Statically, without the dependency closure the runtime guard allows: every module the bench
    and its fisao modules name is the standard library's or a listed distribution's."""
    allowed = _names(GPU / "machine-packages.txt") | _names(GPU / "requirements.txt")
    dists = packages_distributions()
    found = imported_modules(BENCH)
    assert {"torch", "transformers", "pydantic", "inflect"} <= set(found)
    outside = {m: sorted(files) for m, files in found.items()
               if m not in sys.stdlib_module_names and not any(_normal(d) in allowed for d in dists.get(m, []))}
    assert not outside, f"imported but neither on the GPU machine nor carried (bench/gpu/): {outside}"


@pytest.fixture(scope="module")
def tiny_run():
    """The tiny path on CPU under the import guard: (completed process, the JSON of its last line)."""
    done = guarded(BENCH, *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads(done.stdout.strip().splitlines()[-1])


def test_guard_blocks_what_the_gpu_machine_lacks(tmp_path):
    blocked = blocked_modules()
    assert ALWAYS_BLOCKED <= blocked
    assert not {"torch", "transformers", "peft", "accelerate", "pydantic", "pydantic_core", "inflect", "yaml"} & blocked
    probe = tmp_path / "probe.py"
    probe.write_text("import mlflow\n")
    done = guarded(probe, timeout=60)
    assert done.returncode != 0 and "No module named 'mlflow'" in done.stderr


def test_tiny_round_runs_under_the_guard(tiny_run):
    """Every stage ran with only the GPU machine's packages and the carried wheels importable."""
    done, out = tiny_run
    assert set(out["stages"]) == {"build_policy", "rollouts", "build_verifier", "score", "update", "eval"}
    for name, stage in out["stages"].items():
        assert stage["seconds"] > 0, name
        assert stage["peak_gib"] is None  # CPU: no GPU memory to read
        assert stage["estimate_gib"] > 0 and stage["estimate_of"], name
    assert out["device"] == "cpu" and out["dtype"] == "bfloat16"
    assert out["parameters"]["policy"] == out["parameters"]["estimate"]
    assert out["total_seconds"] >= out["round_seconds"] > 0


def test_tiny_round_did_real_work(tiny_run):
    _, out = tiny_run
    r = out["rollouts"]
    assert r["answers"] == 16 * 4
    # The steered policy never chooses EOS, so answers run to the last new token (or nearly all do).
    assert r["tokens"] >= 0.9 * r["answers"] * 12 and r["tokens_per_second"] > 0
    s = out["score"]
    assert s["mentions"] > 0 and s["rewarded_tokens"] > 0
    assert s["rewarded_tokens_outside_mentions"] == 0  # reward.span "mention": only the names' tokens
    bench = _bench()
    rewarded = s["example"]["rewarded_tokens"]
    assert rewarded and all(text.strip() in bench.OBJECT_WORDS and -1 <= value <= 1 and value != 0
                            for text, value in rewarded)
    u = out["update"]
    assert u["optimizer_steps"] == 1 and u["answers"] == 64  # 64 answers: one step of 8 x 8 (the config's)
    assert u["answers_per_second"] > 0 and u["tokens_per_second"] > 0
    # One step moves every B of LoRA's B·A (A's gradient is 0 while B is 0, as it starts).
    assert u["lora_tensors"] > 0 and u["lora_tensors_changed"] == u["lora_tensors"] // 2 and u["lora_max_change"] > 0
    e = out["eval"]
    assert e["images"] == 2 and e["mentions"] > 0 and e["words"] > 0 and 0 <= e["chair_i"] <= 1


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_round", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_7b_shapes_are_the_real_checkpoints():
    """On the meta device: the policy counts as LLaVA-1.5-7B (as `fisao estimate` counts it), the
    verifier as CLIP ViT-L/14-336 (fisao/models/known.py), and an image is 576 tokens."""
    from fisao.memory import campaign_estimate
    from fisao.config import load_config
    from fisao.models.known import VERIFIER_PARAMS
    from transformers import CLIPModel, LlavaForConditionalGeneration

    bench = _bench()
    vocab = bench.Vocabulary.coco()
    tok, clip_tok = bench.tokenizers(vocab)
    policy_cfg, verifier_cfg = bench.model_configs("7b", tok, clip_tok)
    est = campaign_estimate(load_config(ROOT / "configs" / "llava-1.5-7b.yaml"))
    assert bench.meta_parameters(LlavaForConditionalGeneration, policy_cfg) == est.params["total"]
    assert bench.meta_parameters(CLIPModel, verifier_cfg) == VERIFIER_PARAMS[bench.VERIFIER]
    processor, _ = bench.processors(policy_cfg, tok, clip_tok)
    from fisao.models.families import chat_prompt

    ids = processor(images=bench.random_images(1, 0), text=[chat_prompt(processor, "Describe.")], return_tensors="pt")
    assert int((ids["input_ids"] == policy_cfg.image_token_index).sum()) == 576


def test_materialise_initialises_weights_and_buffers():
    """Built on meta, materialised: no tensor left uninitialised, rotary and position buffers as a
    plain construction computes them, the same weights for the same seed."""
    from transformers import CLIPModel, LlavaForConditionalGeneration

    bench = _bench()
    tok, clip_tok = bench.tokenizers(bench.Vocabulary.coco())
    policy_cfg, verifier_cfg = bench.model_configs("tiny", tok, clip_tok)
    for cls, cfg in ((LlavaForConditionalGeneration, policy_cfg), (CLIPModel, verifier_cfg)):
        model = bench.materialise(cls, cfg, "cpu", torch.bfloat16, seed=0)
        plain = cls(cfg)
        for (name, p), (_, ref) in zip(model.named_parameters(), plain.named_parameters()):
            assert p.dtype == torch.bfloat16 and torch.isfinite(p).all(), name
            # Drawn as a plain construction draws it (normal(0, std), ones, zeros), not left as memory was.
            p, ref = p.detach().float(), ref.detach().float()
            if ref.numel() == 1:
                assert torch.allclose(p, ref, rtol=1e-2), name
                continue
            noise = 5 * ref.std() / ref.numel() ** 0.5  # sampling noise of a mean, and roughly of a std
            assert abs(p.mean() - ref.mean()) <= noise + 1e-2 * ref.abs().mean() + 1e-6, name
            assert abs(p.std() - ref.std()) <= noise + 0.05 * ref.std() + 1e-6, name
        for (name, b), (_, ref) in zip(model.named_buffers(), plain.named_buffers()):
            assert torch.equal(b.to(ref.dtype), ref), name
    first, again = (bench.materialise(LlavaForConditionalGeneration, policy_cfg, "cpu", torch.bfloat16, seed=0)
                    for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))  # seeded


def test_carried_wheels_are_the_lock_versions():
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            lock[_normal(name)] = version
    carried = [line.split("#")[0].strip() for line in (GPU / "requirements.txt").read_text().splitlines()]
    carried = [line for line in carried if line]
    assert carried
    for line in carried:
        name, version = line.split("==")
        assert lock.get(_normal(name)) == version, f"{line}: requirements.lock has {lock.get(_normal(name))}"
