"""`fisao estimate`: the parameters and memory a real-model campaign needs; refuses what cannot fit."""
from __future__ import annotations

import argparse


def _estimate(args: argparse.Namespace) -> int:
    from fisao.config import load_config
    from fisao.memory import available_memory, campaign_estimate, check_fits, report
    from fisao.runtime import runtime_device

    cfg = load_config(args.config)
    if cfg.model is None:
        raise ValueError(f"{args.config} has no model section: the estimate is for real checkpoints")
    est = campaign_estimate(cfg)
    if args.memory_gib or cfg.model.memory_gib:
        gib = args.memory_gib or cfg.model.memory_gib
        available, where = int(gib * 1024 ** 3), f"the given budget ({gib} GiB)"
    else:
        available, where = available_memory(runtime_device(cfg.model))
    print(report(est, where, available))
    check_fits(est, available, where)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    es = sub.add_parser("estimate", help="parameters and memory a real-model campaign needs; refuses what cannot fit")
    es.add_argument("--config", required=True)
    es.add_argument("--memory-gib", type=float, default=None, help="check against this budget instead of the device")
    es.set_defaults(func=_estimate)
