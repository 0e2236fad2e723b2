"""Bad input on the command line: one line naming the value and the fix, exit 2, nothing written."""
from __future__ import annotations

import time

import pytest

from cli.main import main
from fisao import io
from fisao.benchmarks.pope import check_unclear
from fisao.localstate import local_state_env


@pytest.fixture(autouse=True)
def project_env(tmp_path, monkeypatch):
    for key, value in local_state_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)


def pope_files(tmp_path, answers: list[str]):
    labels = ["yes", "no"] * (len(answers) // 2) + ["yes"] * (len(answers) % 2)
    io.write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": "x.png", "text": "Is there a dog?", "label": label}
                                         for i, label in enumerate(labels)])
    io.write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": text} for i, text in enumerate(answers)])
    return ["eval", "pope", "--questions", str(tmp_path / "q.jsonl"), "--answers", str(tmp_path / "a.jsonl")]


def test_pope_with_empty_answers_fails_unless_allowed(tmp_path, capsys):
    argv = pope_files(tmp_path, [""] * 10)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert '"n_unclear": 10' in out  # the figures are still shown
    assert "unclear answers (neither yes nor no, scored as yes): 10 of 10" in err
    assert "fisao: error: 10 of 10 answers (100%) are unclear" in err and "--allow-unclear" in err
    assert main([*argv, "--allow-unclear"]) == 0


def test_pope_tolerates_a_few_unclear_answers():
    check_unclear({"n_unclear": 1, "n": 10})  # 10%: at the limit
    with pytest.raises(ValueError, match="2 of 10 answers"):
        check_unclear({"n_unclear": 2, "n": 10})


def test_pope_with_clear_answers_passes(tmp_path, capsys):
    assert main(pope_files(tmp_path, ["Yes, there is.", "No."] * 5)) == 0
    assert "0 of 10" in capsys.readouterr().err


def test_chair_warns_with_the_count_of_unknown_image_ids(tmp_path, capsys):
    io.write_json(tmp_path / "instances.json", {
        "images": [{"id": 1, "file_name": "1.png"}], "categories": [{"id": 1, "name": "dog"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1}]})
    io.write_jsonl(tmp_path / "caps.jsonl", [{"image_id": i, "caption": "a dog"} for i in (1, 7, 8)])
    assert main(["eval", "chair", "--captions", str(tmp_path / "caps.jsonl"),
                 "--annotations", str(tmp_path / "instances.json")]) == 0
    out, err = capsys.readouterr()
    assert '"n_captions": 1' in out
    assert err == (f"fisao: warning: 2 of 3 captions name image ids that {tmp_path / 'instances.json'} does not have; "
                   "they are left out of every figure\n")


def test_chair_captions_given_as_a_directory(tmp_path, capsys):
    assert main(["eval", "chair", "--captions", str(tmp_path), "--annotations", str(tmp_path / "i.json")]) == 2
    assert capsys.readouterr().err == f"fisao: error: {tmp_path} is a directory, not a file: give the file inside it\n"


@pytest.mark.parametrize("model", ["/no/such/dir", "./nope", "a/b/c"])
def test_eval_model_on_a_missing_path_says_so_at_once(tmp_path, capsys, model):
    t = time.time()
    assert main(["eval", "model", "--model", model, "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"fisao: error: no model at {model} (expected a directory with config.json)\n"
    assert time.time() - t < 5


def test_eval_model_on_a_directory_without_config_or_an_uncached_hub_id(tmp_path, capsys):
    assert main(["eval", "model", "--model", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert f"no model at {tmp_path} (expected a directory with config.json)" in capsys.readouterr().err
    assert main(["eval", "model", "--model", "someone/not-cached-model", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the hub id someone/not-cached-model is not in the Hugging Face cache" in err
    assert "`huggingface-cli download someone/not-cached-model`" in err


@pytest.mark.parametrize("argv", [["run", "--rounds", "-1"], ["run", "--more-rounds", "-2"], ["run", "--rounds", "x"],
                                  ["resume", "demo", "--rounds", "-1"]])
def test_negative_rounds_are_refused_by_the_parser(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "is not a whole number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["/abs/path", "../../x", ""])
def test_unsafe_campaign_names_are_refused_before_anything_is_written(tmp_path, capsys, name):
    (tmp_path / "c.yaml").write_text("name: demo\n")
    assert main(["run", "--config", str(tmp_path / "c.yaml"), "--run-name", name]) == 2
    assert f"name: campaign name {name!r} is not allowed: use letters, digits" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text(f"name: {name!r}\n")
    assert main(["run", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "is not allowed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no lock, no outputs/, no mlflow.db


def test_run_set_is_validated_like_the_file(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("name: demo\n")
    for setting, message in (("ppo.roundz=1", "ppo.roundz: unknown key"), ("ppo.beta_kl=.inf", "finite number"),
                             ("ppo.rounds", "expected KEY=VALUE")):
        assert main(["run", "--config", str(tmp_path / "c.yaml"), "--set", setting]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_chair_details_to_an_unwritable_path_is_one_line_and_no_figures(tmp_path, capsys):
    io.write_json(tmp_path / "instances.json", {
        "images": [{"id": 1, "file_name": "1.png"}], "categories": [{"id": 1, "name": "dog"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1}]})
    io.write_jsonl(tmp_path / "caps.jsonl", [{"image_id": 1, "caption": "a dog"}])
    (tmp_path / "ro").write_text("a file where a folder should be")
    details = tmp_path / "ro" / "details.jsonl"
    assert main(["eval", "chair", "--captions", str(tmp_path / "caps.jsonl"), "--annotations",
                 str(tmp_path / "instances.json"), "--details", str(details)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"fisao: error: {details}: cannot write there: {tmp_path / 'ro'} is a file, not a folder\n"


def test_a_deployments_negative_round_count_is_refused_too():
    from fisao.config import load_config
    from tasks.resume import target_rounds

    cfg = load_config(None, {"ppo.rounds": 0})
    assert target_rounds(cfg, 0, None, None) == 0  # ppo.rounds: 0 is the base model only, as --rounds 0
    assert target_rounds(cfg, 2, None, 1) == 3 and target_rounds(cfg, 2, 0, None) == 0
    for rounds, add in ((-1, None), (None, -1)):
        with pytest.raises(ValueError, match="must be a whole number >= 0, got -1"):
            target_rounds(cfg, 0, rounds, add)
