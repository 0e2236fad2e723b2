"""A campaign's and a sweep's results as text people read at a glance: tables, the one-line headline,
the markdown Prefect's UI shows, and links into MLflow's UI (pure: no Prefect, no MLflow)."""
from __future__ import annotations

from fisao.world.causes import CAUSES


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


MLFLOW_UI = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves mlflow.db


def runs_link(experiment_id: str, view: str | None = None) -> str:
    """The experiment's runs table in MLflow's UI, in saved view `view` if given (a campaign's:
    tasks.mlflow_store.RUNS_VIEW). MLflow 3.17.2 chooses between its GenAI pages (an empty traces
    overview) and the runs table by the `workflowType` in the address, else by the reader's last
    choice, not by an experiment tag (docs/mlflow.md), so the link sets it."""
    link = f"{MLFLOW_UI}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return link if view is None else f"{link}&viewStateShareKey={view}"


def compare_link(experiment_ids: list[str]) -> str:
    """MLflow's UI comparing several experiments (campaigns) in one runs table and one set of charts."""
    if not experiment_ids:
        raise ValueError("compare_link needs at least one experiment id")
    ids = ",".join(f'"{i}"' for i in sorted(set(experiment_ids), key=int))
    return f"{MLFLOW_UI}/#/compare-experiments/s?experiments=[{ids}]&workflowType=machine_learning"


def registry_line(summary: dict) -> str | None:
    """Where the campaign's policies are in MLflow's model registry (None before its first round)."""
    reg = summary.get("registry") or {}
    if not reg.get("versions"):
        return None
    round_of = {v: k for k, v in reg["versions"].items()}
    name, latest = reg["name"], max(reg["versions"].values(), key=int)
    best = reg["aliases"].get("best")
    where = [f"models:/{name}@best (version {best}, round {round_of.get(best, '?')})"] if best else []
    where.append(f"models:/{name}/latest (version {latest}, round {round_of[latest]})")
    return f"registered model {name}: " + ", ".join(where) + f"; `fisao eval model --model models:/{name}@best`"


def headline(rounds: list[dict]) -> str:
    """A campaign's one-line result: CHAIR_i of the base model → the best round's (the lowest), with
    that round's recall; `rounds` as in summary.json (round 0 is the base model)."""
    base = rounds[0]
    if "chair_i" not in base:
        return f"{len(rounds) - 1} rounds, no CHAIR_i evaluated"
    scored = [k for k in range(1, len(rounds)) if "chair_i" in rounds[k]]
    if not scored:
        return f"CHAIR_i {base['chair_i']:.3f} (base model, no rounds yet)"
    best = min(scored, key=lambda k: rounds[k]["chair_i"])
    recall = (f", recall {base['recall']:.3f} → {rounds[best]['recall']:.3f}"
              if "recall" in base and "recall" in rounds[best] else "")
    return (f"CHAIR_i {base['chair_i']:.3f} base → {rounds[best]['chair_i']:.3f} best (round {best} of "
            f"{len(rounds) - 1}){recall}")


def sweep_headline(runs: list[dict], mean: dict) -> str:
    """A sweep's one-line result: the mean CHAIR_i base → final over its finished campaigns."""
    if mean.get("base_chair_i") is None or mean.get("final_chair_i") is None:
        return f"{len(runs)} campaigns finished, no CHAIR_i to average"
    return (f"mean CHAIR_i {mean['base_chair_i']:.3f} base → {mean['final_chair_i']:.3f} final over "
            f"{len(runs)} campaigns")


def print_summary(summary: dict) -> None:
    stages = summary["stages"]
    print()
    print(table(["stage", "seconds", "cached"], [[k, v["seconds"], "yes" if v["cached"] else "no"] for k, v in stages.items()]))
    print()
    print(f"world: {summary['world']['path']} ({summary['world']['action']}, data md5 {summary['world']['md5']})")
    clip = summary["clip"].get("figures")
    if clip is not None:  # the world's built CLIP (a real verifier comes as it is)
        print(f"CLIP object-name AUROC: val {clip.get('val_auroc', float('nan')):.3f}, test {clip.get('test_auroc', float('nan')):.3f}")
    print(f"base LLaVA: {summary['llava']['path']}")
    cal = summary.get("calibration")
    if cal:
        f = cal["figures"]
        print(f"verifier on the base model's own mentions: AUROC {f['auroc']:.3f} "
              f"({f['mentions']} mentions, {f['hallucinated_share']:.0%} hallucinated); histogram {cal['path']}/scores.png")
    print()
    print(rounds_table(summary["rounds"]))
    print()
    for k, path in enumerate(summary.get("checkpoints", [])):
        print(f"{'base' if k == 0 else f'round {k}'} checkpoint: {path}")
    if "summary_path" in summary:
        print(f"summary (machine-readable): {summary['summary_path']}   total {summary['seconds']:.0f}s")
    print(f"{summary['name']}: {headline(summary['rounds'])}")
    if registry_line(summary):
        print(registry_line(summary))
    print()
    mlflow = summary.get("mlflow")
    page = runs_link(mlflow["experiment_id"], mlflow.get("view")) if mlflow else MLFLOW_UI
    print(f"Compare runs: make mlflow-ui  (or: mlflow ui --backend-store-uri sqlite:///mlflow.db), then open {page}")


# The columns of the summary table printed after a campaign, one row per model (base, round 1, …).
SUMMARY_COLUMNS = ("chair_s", "chair_i", "recall", "len", "glued", "looped", "pope_random_f1", "pope_popular_f1", "pope_adversarial_f1",
                   "score/reward_mean", "update/kl", "seconds/round")
HEADERS = {"score/reward_mean": "reward", "update/kl": "kl", "seconds/round": "train_s"}


def rounds_table(rounds: list[dict]) -> str:
    rows = [["base" if k == 0 else f"round {k}", *[m.get(c, "-") for c in SUMMARY_COLUMNS]] for k, m in enumerate(rounds)]
    return table(["model", *[HEADERS.get(c, c) for c in SUMMARY_COLUMNS]], rows)


def round_rows(rounds: list[dict]) -> list[dict]:
    """The rounds table as rows for Prefect's table artifact: model, then SUMMARY_COLUMNS (3 decimals; None
    where a model has no such figure, e.g. the base model's reward)."""
    def cell(v):
        return round(v, 3) if isinstance(v, float) else v

    return [{"model": "base" if k == 0 else f"round {k}", **{HEADERS.get(c, c): cell(m.get(c)) for c in SUMMARY_COLUMNS}}
            for k, m in enumerate(rounds)]


def summary_markdown(summary: dict) -> str:
    """The campaign's summary for Prefect's UI: the one-line result, the rounds table, where things are."""
    rows = round_rows(summary["rounds"])
    headers = list(rows[0])
    lines = [f"# {summary['name']}", "", headline(summary["rounds"]), "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
             *("| " + " | ".join("-" if r[h] is None else _fmt(r[h]) for h in headers) + " |" for r in rows), ""]
    if summary.get("checkpoints"):
        lines.append(f"last checkpoint: `{summary['checkpoints'][-1]}`  ")
    if registry_line(summary):
        lines.append(registry_line(summary) + "  ")
    if "summary_path" in summary:
        lines.append(f"summary.json: `{summary['summary_path']}`  ")
    if summary.get("mlflow"):
        link = runs_link(summary["mlflow"]["experiment_id"], summary["mlflow"].get("view"))
        lines.append(f"MLflow (after `make mlflow-ui`): {link}")
    return "\n".join(lines)


SWEEP_COLUMNS = (("chair_s", "chair_s"), ("chair_i", "chair_i"), ("recall", "recall"),
                 ("pope_random_f1", "pope_rnd_f1"), ("pope_popular_f1", "pope_pop_f1"),
                 ("pope_adversarial_f1", "pope_adv_f1"))


def _cell(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _percent(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def sweep_table(runs: list[dict], mean: dict, std: dict) -> str:
    """One row per run and a mean and a std row: base→final figures, the relative CHAIR_i cut, the
    relative cut of the world's hallucinated categories per description by cause (look-alike, pair
    partner, other: fisao/world/causes.py; "-" off the world), the
    verifier's AUROC on the base policy's mentions, the POPE yes-ratios (random/popular/adversarial)
    after the last round and the last round's KL."""
    rows = []
    for r in [*runs, mean, std]:
        label = r["run"] if r["run"] in ("mean", "std") else f"w{r['world']} s{r['seed']}"
        pairs = [f"{_cell(r[f'base_{m}'])}→{_cell(r[f'final_{m}'])}" for m, _ in SWEEP_COLUMNS]
        cut = _percent(r["chair_i_cut"])
        causes = "/".join(_percent(r.get(f"halluc_{c}_cut")) for c in CAUSES)
        yes = "/".join(_cell(r[f"final_pope_{s}_yes_ratio"]) for s in ("random", "popular", "adversarial"))
        rows.append([label, *pairs, cut, causes, _cell(r["verifier_auroc"]), yes, _cell(r["final_kl"])])
    headers = ["run", *[h for _, h in SWEEP_COLUMNS], "chair_i_cut", "cut look/pair/other", "auroc", "yes_ratio r/p/a", "kl"]
    return table(headers, rows)


def print_sweep(result: dict) -> None:
    print()
    print(table(["campaign", "seconds", "rounds taken as done"],
                [[k, v["seconds"], ",".join(map(str, v["resume"]["verified_rounds"])) or "-"]
                 for k, v in result["campaigns"].items()]))
    print()
    print(f"sweep {result['name']}: config {result['config']}, worlds {result['worlds']}, training seeds "
          f"{result['seeds']} (base → final; mean and std over the runs)")
    print(sweep_table(result["runs"], result["mean"], result["std"]))
    print()
    for f in result.get("failed", []):
        print(f"FAILED {f['run']} (world {f['world']}, seed {f['seed']}): {f['error']}")
    if result.get("failed"):
        print(f"mean and std are over the {len(result['runs'])} finished runs; run the same command again to retry "
              "the failed ones")
    print(f"sweep.json: {result['path']}")
    print(f"sweep {result['name']}: {sweep_headline(result['runs'], result['mean'])}")
    print(f"MLflow: experiment {result['name']!r}; its campaigns are tagged fisao.sweep = '{result['name']}'")
    if result.get("mlflow"):
        print(f"Compare runs: make mlflow-ui, then open {runs_link(result['mlflow']['experiment_id'])}")
