"""Serving side by side: `tunelab serve` vs the same model served the plain Hugging Face way, in one run.

    python benchmarks/serve_vs_hf.py                 # both sides, default models and load
    python benchmarks/serve_vs_hf.py --quick         # a smoke test: a few requests, 8 new tokens
    python benchmarks/serve_vs_hf.py --classifier runs/sst2-minilm --threads 2

The plain way is a minimal FastAPI app around transformers (this file, `--hf-server`): a `pipeline(
"text-classification")` behind POST /v1/classify, and `model.generate` (greedy, with a TextIteratorStreamer for
streams) behind POST /v1/chat/completions, sync endpoints in FastAPI's thread pool: requests run concurrently,
each on its own, unbatched. Both sides answer the same OpenAI-style requests and get the same weights: the
classifier is an HF directory (default: MiniLM-L6 from its package with a new 2-label head drawn with seed 0,
untrained, which is all a speed test needs; `--classifier RUN_OR_DIR` takes a run directory, exported with
`tunelab export --format hf`, or an HF directory), and the chat model is SmolLM2-135M-Instruct exported from its
GGUF to an HF directory once (`tunelab export --format hf`, kept in .bench/serve/), which both sides then load.

Each server is its own process on a free port, started one after the other (never two at once) with the same
torch threads, and driven by an asyncio httpx load generator in this process:
- classification: SST-2 dev sentences, one per request, at concurrency 1, 8 and 32 (a fixed number of requests
  per level after a warm-up): requests/s and p50 / p99 latency;
- chat: fixed prompts, max_tokens 64, temperature 0, streamed, with 1 and 8 streams at once: generated tokens/s
  (all streams together), and the p50 time to the first token.
It prints a side-by-side table (ratio > 1: tunelab is faster) and appends a JSON record to
benchmarks/results/serve.jsonl. As sanity checks it reports how many classification labels and greedy chat
answers agree between the sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".bench" / "serve"

CHAT_PROMPTS = [
    "What is the capital of France?", "Give me three tips for staying healthy.", "Explain photosynthesis briefly.",
    "Write a haiku about the sea.", "What is 12 times 7?", "Name three primary colours.",
    "How do I boil an egg?", "What does a compiler do?", "Describe a cat in one sentence.",
    "Why is the sky blue?", "Suggest a name for a bakery.", "What is the boiling point of water?",
    "Translate 'good morning' into French.", "List four planets.", "What is machine learning?",
    "Tell me a fun fact about octopuses.",
]


# ------------------------------------------------------------------------------------------------ models


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(None))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def classifier_dir(source: str | None) -> Path:
    """An HF directory of the classifier both sides serve."""
    if source is None:
        out = CACHE / "minilm-l6-2-labels"
        if not (out / "config.json").exists():
            import torch
            import transformers as tf

            from tunelab.checkpoint.registry import REGISTRY

            base = REGISTRY["minilm-l6"].path()
            torch.manual_seed(0)
            model = tf.AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tf.AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
            tmp.rename(out)
        return out
    path = Path(source)
    if (path / "config.json").exists() and not (path / "config.yaml").exists():
        return path  # an HF directory
    out = CACHE / f"{path.resolve().name}-hf"
    if not out.exists():
        _run([sys.executable, "-m", "tunelab", "export", str(path), "--format", "hf", "--out", str(out)])
    return out


def chat_dir(source: str) -> Path:
    path = Path(source)
    if path.is_dir() and (path / "config.json").exists():
        return path
    out = CACHE / f"{Path(source).name.removesuffix('.gguf')}-hf"
    if not out.exists():
        _run([sys.executable, "-m", "tunelab", "export", source, "--format", "hf", "--out", str(out)])
    return out


# ------------------------------------------------------------------------------------------------ servers


def _env(threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free port: started, waited for (/health), stopped."""

    def __init__(self, side: str, task: str, model: Path, threads: int, max_batch: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if side == "tunelab":
            cmd = [sys.executable, "-m", "tunelab", "serve", str(model), "--port", str(self.port),
                   "--threads", str(threads), "--max-concurrent", "256", "--max-batch", str(max_batch),
                   "--max-tokens", "1024"]
        else:
            cmd = [sys.executable, __file__, "--hf-server", task, "--model", str(model), "--port", str(self.port),
                   "--threads", str(threads)]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(cmd, cwd=ROOT, env=_env(threads), stdout=self.log, stderr=self.log, text=True)

    def __enter__(self) -> "Server":
        import httpx

        deadline = time.monotonic() + 900
        while True:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"the server exited:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not answer /health within 900 s")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# ------------------------------------------------------------------------------------------------ load


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


async def _pool(concurrency: int, jobs: list, work) -> tuple[list, float]:
    """Run `work(job)` over jobs with `concurrency` workers; (results in job order, wall seconds)."""
    results: list = [None] * len(jobs)
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(jobs):
        queue.put_nowait(item)

    async def worker():
        while not queue.empty():
            i, job = queue.get_nowait()
            results[i] = await work(job)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start


async def classify_load(url: str, sentences: list[str], concurrency: int, requests: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(text: str):
            start = time.perf_counter()
            r = await client.post("/v1/classify", json={"input": text})
            r.raise_for_status()
            return time.perf_counter() - start, r.json()["data"][0]["label"]

        warm = [sentences[i % len(sentences)] for i in range(max(2 * concurrency, 4))]
        await _pool(concurrency, warm, one)
        texts = [sentences[i % len(sentences)] for i in range(requests)]
        results, wall = await _pool(concurrency, texts, one)
    latencies = [r[0] for r in results]
    return {"requests": requests, "seconds": wall, "requests_per_s": requests / wall,
            "p50_ms": 1000 * _percentile(latencies, 0.5), "p99_ms": 1000 * _percentile(latencies, 0.99),
            "labels": [r[1] for r in results]}


async def chat_load(url: str, streams: int, total: int, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        async def one(prompt: str):
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            start, first, text, tokens = time.perf_counter(), None, "", 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    for choice in event.get("choices", []):
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            first = first or time.perf_counter()
                            text += piece
            return {"seconds": time.perf_counter() - start, "ttft": (first or time.perf_counter()) - start,
                    "tokens": tokens, "text": text}

        await _pool(streams, CHAT_PROMPTS[:streams], one)  # warm-up
        prompts = [CHAT_PROMPTS[i % len(CHAT_PROMPTS)] for i in range(total)]
        results, wall = await _pool(streams, prompts, one)
    tokens = sum(r["tokens"] for r in results)
    return {"streams": streams, "requests": total, "seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1000 * _percentile([r["ttft"] for r in results], 0.5),
            "texts": [r["text"] for r in results]}


def run_side(side: str, args, cls_model: Path, chat_model: Path, sentences: list[str]) -> dict:
    result: dict = {"classify": {}, "chat": {}}
    if not args.skip_classify:
        with Server(side, "classify", cls_model, args.threads, args.max_batch) as server:
            for c in args.concurrency:
                result["classify"][str(c)] = asyncio.run(classify_load(server.url, sentences, c, args.requests))
                print(f"  {side} classify c={c}: {result['classify'][str(c)]['requests_per_s']:.1f} req/s",
                      file=sys.stderr, flush=True)
    if not args.skip_chat:
        with Server(side, "chat", chat_model, args.threads, args.max_batch) as server:
            for s in args.streams:
                total = max(s, args.chat_requests) if s > 1 else max(1, args.chat_requests // 2)
                result["chat"][str(s)] = asyncio.run(chat_load(server.url, s, total, args.max_tokens))
                print(f"  {side} chat streams={s}: {result['chat'][str(s)]['tokens_per_s']:.1f} tokens/s",
                      file=sys.stderr, flush=True)
    return result


# ------------------------------------------------------------------------------------------------ report


def table(results: dict, args) -> str:
    t, h = results["tunelab"], results["hf"]
    rows = [f"{'':34} {'tunelab':>10} {'HF plain':>10} {'ratio':>7}"]

    def line(name: str, a: float, b: float, higher_is_better: bool) -> None:
        ratio = (a / b if higher_is_better else b / a) if a and b else float("nan")
        rows.append(f"{name:34} {a:10.1f} {b:10.1f} {ratio:6.2f}x")

    if t["classify"]:
        rows.append(f"classification, {args.requests} requests per level")
        for c in t["classify"]:
            a, b = t["classify"][c], h["classify"][c]
            line(f"  concurrency {c:>2}  requests/s", a["requests_per_s"], b["requests_per_s"], True)
            line(f"  concurrency {c:>2}  p50 latency ms", a["p50_ms"], b["p50_ms"], False)
            line(f"  concurrency {c:>2}  p99 latency ms", a["p99_ms"], b["p99_ms"], False)
    if t["chat"]:
        rows.append(f"chat, max_tokens {args.max_tokens}, temperature 0, streamed")
        for s in t["chat"]:
            a, b = t["chat"][s], h["chat"][s]
            line(f"  {s} stream{'s' if s != '1' else ''}  tokens/s", a["tokens_per_s"], b["tokens_per_s"], True)
            line(f"  {s} stream{'s' if s != '1' else ''}  first token p50 ms", a["ttft_p50_ms"], b["ttft_p50_ms"],
                 False)
    rows.append("ratio: how many times better tunelab is (throughput: tunelab / HF; latency: HF / tunelab)")
    return "\n".join(rows)


def agreement(results: dict) -> dict:
    t, h = results["tunelab"], results["hf"]
    out = {}
    if t["classify"]:
        pairs = [(a, b) for c in t["classify"] for a, b in zip(t["classify"][c]["labels"], h["classify"][c]["labels"])]
        out["classify_labels_equal"] = sum(a == b for a, b in pairs) / max(1, len(pairs))
    if t["chat"]:
        pairs = [(a, b) for s in t["chat"] for a, b in zip(t["chat"][s]["texts"], h["chat"][s]["texts"])]
        out["chat_texts_equal"] = sum(a.strip() == b.strip() for a, b in pairs) / max(1, len(pairs))
    return out


def _git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", default=None, help="run directory or HF directory (default: MiniLM-L6 "
                        "with a new 2-label head)")
    parser.add_argument("--chat", default="smollm2-135m-instruct", help="registered name, GGUF or HF directory")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each server")
    parser.add_argument("--requests", type=int, default=256, help="classification requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--chat-requests", type=int, default=16, help="chat streams per level (at least `streams`)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32, help="tunelab serve --max-batch")
    parser.add_argument("--skip-classify", action="store_true")
    parser.add_argument("--skip-chat", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke test: 16 requests per level, 2 chat streams "
                        "per level, 8 new tokens; no record written")
    parser.add_argument("--hf-server", choices=["classify", "chat"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_server:
        hf_server(args.hf_server, args.model, args.port, args.threads)
        return
    if args.quick:
        args.requests, args.chat_requests, args.max_tokens = 16, 2, 8

    sys.path.insert(0, str(ROOT / "src"))
    CACHE.mkdir(parents=True, exist_ok=True)
    rows = [line.rstrip("\n").split("\t") for line in open(DATA / "sst2" / "dev.tsv", encoding="utf-8")][1:]
    sentences = [r[0].strip() for r in rows]
    cls_model = None if args.skip_classify else classifier_dir(args.classifier)
    chat_model = None if args.skip_chat else chat_dir(args.chat)
    print(f"classifier: {cls_model}\nchat model: {chat_model}\nthreads: {args.threads}", file=sys.stderr, flush=True)
    results = {}
    for side in ("tunelab", "hf"):
        results[side] = run_side(side, args, cls_model, chat_model, sentences)
    report = table(results, args)
    agree = agreement(results)
    print(report)
    print("agreement between the sides: " + ", ".join(f"{k} {v:.0%}" for k, v in agree.items()))
    if args.quick:
        return
    import torch
    import transformers

    for side in results.values():  # keep the record small: no per-request labels or texts
        for level in list(side["classify"].values()) + list(side["chat"].values()):
            level.pop("labels", None)
            level.pop("texts", None)
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _git_commit(),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "transformers": transformers.__version__},
              "threads": args.threads, "classifier": str(cls_model), "chat_model": str(chat_model),
              "requests": args.requests, "chat_requests": args.chat_requests, "max_tokens": args.max_tokens,
              "max_batch": args.max_batch, "results": results, "agreement": agree}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "serve.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {RESULTS / 'serve.jsonl'}")


# ------------------------------------------------------------------------------------------------ HF side


def hf_server(task: str, model_dir: str, port: int, threads: int) -> None:
    """The plain way: transformers behind a minimal FastAPI app (sync endpoints, no batching, no lock)."""
    import threading

    import torch
    import transformers as tf
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    torch.set_num_threads(threads)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    if task == "classify":
        classifier = tf.pipeline("text-classification", model=model_dir, device=-1)

        @app.post("/v1/classify")
        def classify(body: dict) -> dict:
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            out = classifier(texts, truncation=True)
            return {"data": [{"index": i, "label": o["label"], "score": o["score"]} for i, o in enumerate(out)]}
    else:
        tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
        model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])

        def chunk(choices: list, **extra) -> str:
            return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

        @app.post("/v1/chat/completions")
        def chat(body: dict):
            inputs = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
            prompt_len = inputs["input_ids"].shape[1]
            kwargs = dict(**inputs, max_new_tokens=body.get("max_tokens", 64), do_sample=False,
                          pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            if not body.get("stream"):
                with torch.inference_mode():
                    out = model.generate(**kwargs)
                new = out[0, prompt_len:]
                return {"object": "chat.completion", "choices": [{"index": 0, "message": {
                    "role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)}}],
                    "usage": {"prompt_tokens": prompt_len, "completion_tokens": len(new)}}
            streamer = tf.TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            done: dict = {}

            def run() -> None:
                with torch.inference_mode():
                    done["ids"] = model.generate(**kwargs, streamer=streamer)

            worker = threading.Thread(target=run)
            worker.start()

            def events():
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
                for text in streamer:
                    if text:
                        yield chunk([{"index": 0, "delta": {"content": text}}])
                worker.join()
                new = done["ids"][0, prompt_len:].tolist()
                generated = len(new) - (1 if new and new[-1] in eos else 0)  # as tunelab counts: EOS excluded
                yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
                yield chunk([], usage={"prompt_tokens": prompt_len, "completion_tokens": generated})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
