"""tunelab eval: the task's metrics of a run or model, on the run's validation split or on --data."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a run or model", description=__doc__)
    p.add_argument("source", metavar="RUN_OR_MODEL", help="a run directory, HF directory, GGUF file or registered name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data options, e.g. data.text_field=sentence")
    p.add_argument("--data", action="append", metavar="FILE",
                   help="data file to evaluate on (default: the run's validation split); parallel text: "
                   "--data SOURCE --data TARGET")
    p.add_argument("--task", choices=["classification", "tagging", "qa", "causal_lm", "chat", "recurrent_lm", "seq2seq",
                                      "preference", "kto", "reward_model", "grpo"],
                   help="task of a bare model (default: from its head); preference: DPO's implicit rewards "
                   "against task.reference=MODEL; grpo: greedy success rate and reward with "
                   "task.rewards=[{verifier: module:function}]")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tunelab.evaluate.runner import evaluate_source

    metrics = evaluate_source(args.source, data=args.data, task=args.task, overrides=args.overrides,
                              batch_size=args.batch_size)
    if args.json:
        print(json.dumps(metrics))
        return 0
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"{key:>16}  {value:.4f}")
        elif isinstance(value, int):
            print(f"{key:>16}  {value}")
    if "per_class" in metrics or "per_type" in metrics:
        table = metrics.get("per_class") or metrics.get("per_type")
        print()
        print(f"{'':>16}  precision  recall      f1  support")
        for name, row in table.items():
            print(f"{name:>16}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  {row.get('support', '')}")
    return 0
