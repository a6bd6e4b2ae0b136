"""tunelab quick start: load the two small real models with the Python API and use them.

Run with `make demo`, or `.venv/bin/python examples/quickstart.py`.
"""

import time

import tunelab
from tunelab.generate import GenerationSettings, embed, encode_prompt, generate

# 1. Sentence embeddings with the MiniLM-L6 encoder: similar sentences get similar vectors.
encoder, encoder_tokenizer = tunelab.load("minilm-l6")
sentences = [
    "The movie was a delight from start to finish.",
    "I really enjoyed this film.",
    "The invoice is due at the end of the month.",
]
vectors = embed(encoder, encoder_tokenizer, sentences)
print("cosine similarity between sentence embeddings (MiniLM-L6):")
for i, a in enumerate(sentences):
    sims = "  ".join(f"{float(vectors[i] @ vectors[j]):.3f}" for j in range(len(sentences)))
    print(f"  {sims}   {a}")

# 2. Chat generation with SmolLM2-135M-Instruct, batched: three questions decoded together.
model, tokenizer = tunelab.load("smollm2-135m-instruct")
questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 3?"]
prompts = [encode_prompt(tokenizer, q, chat=True) for q in questions]
start = time.perf_counter()
completions = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=40))
seconds = time.perf_counter() - start
print("\nbatched greedy chat generation (SmolLM2-135M-Instruct):")
for q, c in zip(questions, completions):
    print(f"  Q: {q}\n  A: {c.text.strip()}  [{len(c.token_ids)} tokens, {c.finish_reason}]")
total = sum(len(c.token_ids) for c in completions)
print(f"  {total} tokens in {seconds:.1f} s ({total / seconds:.1f} tokens/s)")
