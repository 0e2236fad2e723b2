"""`fisao eval chair|pope|model`: score answer files (library only), or run a model on the benchmarks."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli.runs import registered_checkpoint


def _eval_chair(args: argparse.Namespace) -> int:
    from fisao.benchmarks.chair import chair_from_files

    metrics = chair_from_files(args.captions, args.annotations, args.references, args.vocab, args.details)
    print(json.dumps(metrics))
    if metrics["n_unknown_image"]:
        total = metrics["n_captions"] + metrics["n_unknown_image"] + metrics["n_empty"]
        print(f"fisao: warning: {metrics['n_unknown_image']} of {total} captions name image ids that "
              f"{args.annotations} does not have; they are left out of every figure", file=sys.stderr)
    return 0


def _eval_pope(args: argparse.Namespace) -> int:
    from fisao.benchmarks.pope import check_unclear, pope_from_files

    metrics = pope_from_files(args.questions, args.answers)
    print(json.dumps(metrics))
    print(f"unclear answers (neither yes nor no, scored as yes): {metrics['n_unclear']} of {metrics['n']}",
          file=sys.stderr)
    if not args.allow_unclear:
        check_unclear(metrics)
    return 0


def _eval_model(args: argparse.Namespace) -> int:
    from fisao.models.source import check_model_source

    out_name = Path(args.model).name
    if args.model.startswith("models:/"):
        args.model = str(registered_checkpoint(args.model))
    check_model_source(args.model)  # before torch and transformers load: a wrong path is said at once
    from fisao.config import load_config
    from fisao.evaluate import evaluate_model
    from fisao.summary import table

    overrides = {f"eval.{k}": v for k, v in (("limit", args.limit), ("split", args.split)) if v is not None}
    cfg = load_config(args.config, overrides).eval
    benchmarks = tuple(b.strip() for b in args.benchmarks.split(",") if b.strip())
    out = Path(args.out or Path("outputs") / "eval-cli" / out_name)
    metrics = evaluate_model(args.model, args.data, benchmarks, cfg, out, trust_remote_code=args.trust_remote_code)
    print(table(["metric", "value"], [[k, v] for k, v in metrics.items()]))
    print(f"\nanswers, details and metrics.json in {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="benchmarks: score files, or run a model").add_subparsers(dest="eval_command", required=True)
    ch = ev.add_parser("chair", help="CHAIR of captions against COCO-format instances")
    ch.add_argument("--captions", required=True, help='JSONL of {"image_id": ..., "caption": ...}')
    ch.add_argument("--annotations", required=True, help="COCO instances JSON")
    ch.add_argument("--references", default=None, help="reference captions (JSONL or COCO captions JSON)")
    ch.add_argument("--vocab", default=None, help="synonyms file (default: COCO-80 of the CHAIR authors)")
    ch.add_argument("--details", default=None, help="write each caption's mentioned/hallucinated/missed objects here")
    ch.set_defaults(func=_eval_chair)
    po = ev.add_parser("pope", help="POPE figures of answers, paired to questions by question_id")
    po.add_argument("--questions", required=True)
    po.add_argument("--answers", required=True, help='JSONL of {"question_id": ..., "text": ...}')
    po.add_argument("--allow-unclear", action="store_true",
                    help="accept more than 10%% unclear answers (neither yes nor no; POPE scores them as yes)")
    po.set_defaults(func=_eval_pope)
    mo = ev.add_parser("model", help="run a model on CHAIR/POPE/MME and print a table")
    mo.add_argument("--model", required=True, help="model directory (save_pretrained layout), hub id, or registered "
                                                   "model: models:/NAME@ALIAS (models:/demo@best), models:/NAME/VERSION")
    mo.add_argument("--data", default="data/world", help="a world directory or COCO-layout directory")
    mo.add_argument("--benchmarks", default="chair,pope")
    mo.add_argument("--limit", type=int, default=None, help="evaluate on N images")
    mo.add_argument("--split", default=None, help="world split (default: the config's, test)")
    mo.add_argument("--config", default=None, help="campaign YAML whose `eval` section to use")
    mo.add_argument("--out", default=None, help="where answers and details go")
    mo.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    mo.set_defaults(func=_eval_model)
