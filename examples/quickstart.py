"""tunelab quick start, through the Python API (`make demo` runs it after `tunelab plan`).

1. Fine-tune MiniLM-L6 to route help-desk messages to six intents (examples/quickstart.yaml) and show
   the validation scores before and after training.
2. Classify messages it has never seen with the trained model.
3. Chat with SmolLM2-135M-Instruct.
"""

import json
import time
from pathlib import Path

import tunelab
from tunelab.generate import GenerationSettings, classify, encode_prompt, generate
from tunelab.train.run import load_train_config, train

# 1. Train. The config evaluates the untrained model first (eval_at_start), so the run has a "before".
config = load_train_config("examples/quickstart.yaml")
start = time.perf_counter()
final = train(config, show_progress=False)
minutes = (time.perf_counter() - start) / 60
history = [json.loads(line) for line in open(Path(config.output_dir) / "metrics.jsonl")]
before = next(r for r in history if r["split"] == "validation" and r["step"] == 0)
print(f"\nhelp-desk intents, 72 validation messages (trained in {minutes:.1f} min):")
print(f"  {'':<9}{'accuracy':>10}{'macro F1':>10}{'loss':>8}")
print(f"  {'before':<9}{before['accuracy']:>10.3f}{before['f1']:>10.3f}{before['loss']:>8.3f}")
print(f"  {'after':<9}{final['accuracy']:>10.3f}{final['f1']:>10.3f}{final['loss']:>8.3f}   (best step {final['step']})")
print(f"  report: {config.output_dir}/report.md")

# 2. The trained model on new messages.
model, tokenizer = tunelab.load(Path(config.output_dir) / "model")
messages = [
    "I was charged twice for the same jumper, can you refund one of them?",
    "Does the Ember kettle come with a UK plug?",
    "My parcel says delivered but it is not here.",
    "How do I turn off the weekly emails?",
]
print("\nnew messages:")
for text, result in zip(messages, classify(model, tokenizer, messages)):
    print(f"  {result.label:<10} {result.score:.2f}  {text}")

# 3. Chat generation with SmolLM2-135M-Instruct.
chat_model, chat_tokenizer = tunelab.load("smollm2-135m-instruct")
prompt = encode_prompt(chat_tokenizer, "Give me two tips for writing a clear support reply.", chat=True)
reply = generate(chat_model, chat_tokenizer, [prompt], GenerationSettings(max_new_tokens=80))[0]
print("\nSmolLM2-135M-Instruct:", reply.text.strip())
