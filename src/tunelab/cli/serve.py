"""tunelab serve: an OpenAI-compatible HTTP server over one model (chat, completions, embeddings) with task
endpoints (classify, tag, answer, fill-mask, translate / summarize), whichever the model's heads can do, and a
feedback page at / whose ratings, critiques and corrections go to a feedback store."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", description=__doc__)
    p.add_argument("model", metavar="MODEL",
                   help="registered name (see `tunelab models`), HF directory, GGUF file or a run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $TUNELAB_API_KEY, else no key)")
    p.add_argument("--name", default=None, help="the model's name in the API (default: the name or file name)")
    p.add_argument("--dtype", default="auto",
                   help="auto (default: bfloat16 when the checkpoint is stored in 16 bits or fewer and this CPU "
                        "computes bf16 natively, else float32), float32, bfloat16 or float16")
    p.add_argument("--max-tokens", type=int, default=1024, help="the most tokens one request may generate")
    p.add_argument("--max-input-tokens", type=int, default=None, help="the longest prompt or input, in tokens")
    p.add_argument("--max-concurrent", type=int, default=64,
                   help="requests in the server at once, being answered or waiting; more get 429 (default 64)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="the most inputs in one encoder forward pass and sequences decoded together (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="how long a batch waits for more requests, in ms (default 0: a batch takes the requests "
                        "that queued while the model was busy)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--feedback-store", metavar="PATH", default="feedback.db",
                   help="where the feedback page's records go: an SQLite file or sqlite:///path URL, the store of "
                        "`tunelab feedback` (default: feedback.db in the working directory, created at the first "
                        "record)")
    p.add_argument("--no-feedback", action="store_true",
                   help="keep no feedback: the page can ask the model, but POST /v1/feedback answers 404")
    p.add_argument("--model-version", default=None,
                   help="the model's version in feedback records (default: a hash of its weight files, as "
                        "`tunelab feedback collect` writes)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from tunelab.serve import Engine, ServerSettings, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, name=args.name, dtype=args.dtype)
    store = None if args.no_feedback else args.feedback_store
    settings = ServerSettings(api_key=args.api_key, max_tokens=args.max_tokens,
                              max_input_tokens=args.max_input_tokens, max_concurrent=args.max_concurrent,
                              max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                              feedback_store=store,
                              model_version=(args.model_version or _version(args.model)) if store else None)
    app = create_app(engine, settings)
    print(f"serving {engine.name} ({engine.model.family}; {', '.join(engine.capabilities) or 'no endpoints'}) "
          f"on http://{args.host}:{args.port}/v1" + (" (API key required)" if args.api_key else ""),
          file=sys.stderr, flush=True)
    print(f"feedback page: http://{args.host}:{args.port}/ "
          + (f"(records go to {app.state.feedback.path})" if store else "(not saved: --no-feedback)"),
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _version(source: str) -> str | None:
    """The model's version as `tunelab feedback collect` names it (a hash of the weight files; step and hash for
    a run directory), so the page's records and collected ones of one model agree; None if it has none."""
    from tunelab.errors import TunelabError
    from tunelab.feedback.collect import source_version

    try:
        return source_version(source)
    except (TunelabError, OSError):
        return None
