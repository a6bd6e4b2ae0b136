"""tunelab feedback collect: run a model over a data file, judge every output automatically, store the verdicts."""

from __future__ import annotations

import argparse

from tunelab.errors import ConfigError

DESCRIPTION = """Run a model over a data file and judge every output: against the gold labels or references
(--gold), with Python verifiers (--verifier module:function), a reward model (--reward-model RUN) or a judge
model prompted with a rubric (--judge MODEL --rubric TEXT_OR_FILE). Each output gets one feedback record per
judge in the store. With --config CONFIG, the judges are the config's feedback.collect list, the model its run
(output_dir) or model.source, the data its validation (else training) data; flags add to or replace these.
Examples already judged for the same model version are skipped (--again judges them again)."""


def add_collect_parser(commands) -> None:
    """The `collect` subcommand of `tunelab feedback`."""
    c = commands.add_parser("collect", help="judge a model's outputs automatically into the store",
                            description=DESCRIPTION)
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data options, e.g. data.text_field=sentence")
    c.add_argument("--model", metavar="RUN_OR_MODEL", help="the model whose outputs are judged: a run directory, "
                   "registered name, HF directory or GGUF file")
    c.add_argument("--data", action="append", metavar="FILE", help="the inputs (with their gold answers for --gold); "
                   "parallel text: --data SOURCE --data TARGET")
    c.add_argument("--task", choices=["classification", "tagging", "chat", "seq2seq"],
                   help="the task of a bare model (default: the run's task, or from the model's head)")
    j = c.add_argument_group("judges")
    j.add_argument("--gold", action="store_true", help="judge against the gold label, tags or reference text")
    j.add_argument("--gold-metric", choices=["bleu", "chrf", "rouge"], help="generated text: sentence BLEU or chrF "
                   "(0-100) or ROUGE-L (0-1); default bleu for seq2seq, rouge for chat")
    j.add_argument("--gold-threshold", type=float, metavar="X", help="generated text: bad below X (default: bleu 20, "
                   "chrf 40, rouge 0.3)")
    j.add_argument("--verifier", action="append", metavar="MODULE:FUNCTION", help="a verifier function, e.g. "
                   "tunelab.evaluate.verifiers:final_number or checks.py:short (repeatable)")
    j.add_argument("--reward-model", metavar="RUN", help="a run trained with task reward_model: its reward is the score")
    j.add_argument("--reward-threshold", type=float, metavar="X", help="reward model: bad below X, good at or above "
                   "(default: the score alone)")
    j.add_argument("--judge", metavar="MODEL", help="a chat model that judges each output by --rubric")
    j.add_argument("--rubric", metavar="TEXT_OR_FILE", help="judge: the criterion (a text or a file); with {input}, "
                   "{output}, {reference} in it, the whole prompt")
    j.add_argument("--judge-max-new-tokens", type=int, metavar="N", help="judge: tokens of its reply (default 64)")
    o = c.add_argument_group("options")
    o.add_argument("--limit", type=int, metavar="N", help="the first N examples of the data")
    o.add_argument("--batch-size", type=int, default=None, metavar="N", help="examples per forward pass (default 8)")
    o.add_argument("--max-new-tokens", type=int, metavar="N", help="generated outputs: at most N tokens (default: "
                   "the run's task.generation, else 128)")
    o.add_argument("--beam-size", type=int, metavar="N", help="generated outputs: beam search with N beams (default: "
                   "the run's task.generation, else 1: greedy)")
    o.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default="auto",
                   help="autocast of the models (default auto: bf16 where the CPU or GPU computes it natively, as "
                   "tunelab predict)")
    o.add_argument("--threads", type=int, metavar="N", help="CPU threads of torch (default: all cores; on a busy "
                   "machine 1 is much faster for small models)")
    o.add_argument("--again", action="store_true", help="judge again the examples judged before for this model version")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--store", metavar="PATH", help="the feedback store (default: feedback.store of --config, else "
                   "feedback.db here)")
    o.add_argument("--config", metavar="CONFIG", help="a training config: its feedback section (store, collect), "
                   "model and data")
    c.set_defaults(run=run_collect)


def judges_from_flags(args: argparse.Namespace) -> list[dict]:
    """The judge config items the flags ask for."""
    judges: list[dict] = []
    if args.gold or args.gold_metric or args.gold_threshold is not None:
        judges.append({"type": "gold", "metric": args.gold_metric, "threshold": args.gold_threshold})
    for spec in args.verifier or []:
        judges.append({"type": "verifier", "function": spec})
    if args.reward_model:
        judges.append({"type": "reward_model", "model": args.reward_model, "threshold": args.reward_threshold})
    elif args.reward_threshold is not None:
        raise ConfigError("--reward-threshold applies to --reward-model RUN")
    if args.judge:
        judges.append({"type": "judge", "model": args.judge, "rubric": args.rubric,
                       "max_new_tokens": args.judge_max_new_tokens})
    elif args.rubric is not None or args.judge_max_new_tokens is not None:
        raise ConfigError("--rubric and --judge-max-new-tokens apply to --judge MODEL")
    return [{k: v for k, v in judge.items() if v is not None} for judge in judges]


def run_collect(args: argparse.Namespace) -> int:
    from tunelab.cli.feedback import _store_location
    from tunelab.config.loading import apply_overrides, load_config, validate
    from tunelab.config.schema import DataSection, TrainConfig
    from tunelab.feedback.collect import collect_feedback
    from tunelab.train.run import is_run_dir

    judges: list = judges_from_flags(args)
    model, data_files, task, data_options = args.model, args.data, args.task, None
    generation: dict = {}  # over the run's task.generation (collect_feedback), or greedy for a bare model
    if args.config:
        config = load_config(TrainConfig, args.config)
        if config.feedback is not None:
            judges = [*config.feedback.collect, *judges]
        if model is None:
            model = config.output_dir if is_run_dir(config.output_dir) else config.model.source
            if model is None:
                raise ConfigError(f"{args.config}: no model to collect from: the run {config.output_dir} has no final "
                                  f"model yet and model.source is not set; give --model")
        if data_files is None:
            data_files = config.data.validation_paths() or config.data.train_paths()
        task = task or ("chat" if config.task.type == "causal_lm" else config.task.type)
        data_options = config.data.model_dump(mode="json")
        g = config.task.generation
        generation = {"max_new_tokens": g.max_new_tokens, "beam_size": g.beam_size, "length_penalty": g.length_penalty}
    if model is None or not data_files:
        raise ConfigError("give the model and the data: --model RUN_OR_MODEL --data FILE (or --config CONFIG)")
    if not judges:
        raise ConfigError("no judges: give --gold, --verifier MODULE:FUNCTION, --reward-model RUN or --judge MODEL "
                          "(or a config whose feedback.collect lists them)")
    if args.overrides:
        raw = apply_overrides({"data": dict(data_options or {})}, args.overrides)
        unknown = [key for key in raw if key != "data"]
        if unknown:
            raise ConfigError(f"overrides set data options (data.text_field=sentence), not {unknown[0]}")
        data_options = raw["data"]
    data = None  # without a config: the overridden options over the run's own (collect_feedback merges them)
    if data_options is not None and args.config:
        data_options.update(train=list(data_files), validation=None)
        data = validate(DataSection, data_options, f"{args.config}: data")
    elif data_options is not None:
        data = data_options
    if args.max_new_tokens is not None:
        generation["max_new_tokens"] = args.max_new_tokens
    if args.beam_size is not None:
        generation["beam_size"] = args.beam_size
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    files = data_files[0] if len(data_files) == 1 else list(data_files)
    result = collect_feedback(model, files, judges, _store_location(args), task=task, data=data, limit=args.limit,
                              batch_size=args.batch_size or 8, generation=generation,
                              precision=args.precision, skip_judged=not args.again,
                              progress=not args.no_progress)
    print(result.summary())
    return 0
