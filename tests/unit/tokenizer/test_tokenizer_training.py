"""Tokenizer training: every type trains on real data, saves a directory that our Tokenizer and transformers load
with identical ids, round-trips text, honours the vocabulary size, and reports bad input clearly."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from tunelab.cli.main import main
from tunelab.errors import ConfigError, DataError
from tunelab.tokenizer import Tokenizer, train_tokenizer

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
SST2_DEV = DATA / "sst2" / "dev.tsv"
DIALOGSUM = DATA / "dialogsum" / "dialogsum.dev.jsonl"
MULTI30K_DE = DATA / "multi30k_en_de" / "val.de"

# varied text: newlines, runs of spaces, tabs, punctuation, digits, accents, CJK, emoji, a special token inside
VARIED = [
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "  two leading spaces,   three inside, a tab\there and a trailing newline\n",
    "Numbers 3.14159 and 2024-11-23; prices: $5, 7% off!",
    "Über café naïve façade résumé — «quoted» “curly” ‘single’",
    "日本語のテキスト and 中文 mixed with English",
    "emoji 🙂👍🏽 and symbols ∑ ∫ ≠ ≤",
    "first part<|endoftext|>second part",
    "",
    "x",
]

SIZES = {"bpe": 1000, "byte-bpe": 1000, "wordpiece": 2000, "char": None}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Each type trained once on real data and saved: the GPT-style ones on tinyshakespeare, wordpiece on the
    SST-2 dev sentences (a tsv read through --text-field)."""
    out = {}
    for kind, size in SIZES.items():
        path = tmp_path_factory.mktemp(kind)
        if kind == "wordpiece":
            train_tokenizer(SST2_DEV, type=kind, vocab_size=size, text_field="sentence", out=path)
        else:
            train_tokenizer(SHAKESPEARE, type=kind, vocab_size=size, out=path)
        out[kind] = path
    return out


def shakespeare_tail(n: int = 3000) -> str:
    """Held-out-looking text: the last characters of the corpus."""
    return SHAKESPEARE.read_text(encoding="utf-8")[-n:]


@pytest.mark.parametrize("kind", list(SIZES))
def test_the_saved_directory_loads_in_tunelab_and_transformers_with_identical_ids(trained, kind):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = trained[kind]
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in path.iterdir()}
    ours = Tokenizer.from_dir(path)
    auto = AutoTokenizer.from_pretrained(path)
    fast = PreTrainedTokenizerFast.from_pretrained(path)
    assert len(auto) == len(fast) == ours.vocab_size
    texts = [*VARIED, shakespeare_tail(400)]
    for text in texts:
        ids = ours.encode(text)
        assert auto(text)["input_ids"] == ids, text
        assert fast(text)["input_ids"] == ids, text
        assert auto.decode(ids, skip_special_tokens=True) == ours.decode(ids), text
    assert auto.convert_ids_to_tokens(ours.encode(VARIED[0])) == [ours.id_to_token(i) for i in ours.encode(VARIED[0])]
    for key, token in ours.special_tokens.items():
        assert getattr(auto, key) == token
        assert getattr(auto, key + "_id") == getattr(ours, key + "_id")


def test_the_special_tokens_of_each_type(trained):
    gpt = [Tokenizer.from_dir(trained[k]) for k in ("char", "bpe", "byte-bpe")]
    for tokenizer in gpt:
        assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
        assert tokenizer.eos_token_id == 0  # special tokens take the first ids
        # a special token written in the text is matched whole
        ids = tokenizer.encode("a<|endoftext|>b", add_special_tokens=False)
        assert ids.count(0) == 1
    assert gpt[0].unk_token == gpt[1].unk_token == "<unk>" and gpt[2].unk_token is None  # bytes need no unknown
    bert = Tokenizer.from_dir(trained["wordpiece"])
    assert [bert.pad_token_id, bert.unk_token_id, bert.cls_token_id, bert.sep_token_id, bert.mask_token_id] == [0, 1, 2, 3, 4]


def test_byte_level_bpe_round_trips_any_text(trained):
    tokenizer = Tokenizer.from_dir(trained["byte-bpe"])
    for text in [*VARIED, shakespeare_tail()]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.unk_token_id is None
    assert len(tokenizer.encode(shakespeare_tail())) < 0.5 * len(shakespeare_tail())  # merges do compress (0.47 at 1000 ids)


def test_char_round_trips_text_of_its_alphabet_one_id_per_character(trained):
    tokenizer = Tokenizer.from_dir(trained["char"])
    text = shakespeare_tail()
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    alphabet = set(SHAKESPEARE.read_text(encoding="utf-8"))
    assert tokenizer.vocab_size == len(alphabet) + 2  # every character seen, plus <|endoftext|> and <unk>
    assert {tokenizer.id_to_token(i) for i in range(2, tokenizer.vocab_size)} == alphabet
    # a character never seen is unknown, one id still
    assert tokenizer.encode("é") == [tokenizer.unk_token_id]


def test_bpe_round_trips_text_of_seen_characters_spaces_and_newlines_included(trained):
    tokenizer = Tokenizer.from_dir(trained["bpe"])
    for text in [shakespeare_tail(), "ROMEO:\nWhat,  two spaces\n\nand a blank line", "a<|endoftext|>b"]:
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text
    # words start with the '▁' marker; a character never seen is <unk>
    tokens = [tokenizer.id_to_token(i) for i in tokenizer.encode("ROMEO: thou art")]
    assert tokens[-1] == "▁art" and tokens[-2] == "▁thou"
    assert tokenizer.unk_token_id in tokenizer.encode("日本")


def _bert_normal(text: str) -> str:
    """Lower case, accents stripped, no spaces (what WordPiece keeps of a text, up to spacing)."""
    decomposed = unicodedata.normalize("NFD", text.lower())
    return "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn" and not ch.isspace())


def test_wordpiece_encodes_cls_sep_and_pairs_and_round_trips_up_to_case_and_spacing(trained):
    tokenizer = Tokenizer.from_dir(trained["wordpiece"])
    ids = tokenizer.encode("A gripping, beautifully shot film.")
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    batch = tokenizer.encode_batch(["the film"], ["was great"])
    types = batch["token_type_ids"][0]
    first_sep = batch["input_ids"][0].index(tokenizer.sep_token_id)
    assert types == [0] * (first_sep + 1) + [1] * (len(types) - first_sep - 1)
    assert batch["input_ids"][0].count(tokenizer.sep_token_id) == 2

    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(trained["wordpiece"])("the film", "was great")
    assert theirs["input_ids"] == batch["input_ids"][0] and theirs["token_type_ids"] == types
    for text in ["A Gripping, Beautifully-Shot FILM!", "Über naïve café", "it 's a 10/10 , isn't it?"]:
        decoded = tokenizer.decode(tokenizer.encode(text))
        assert _bert_normal(decoded) == _bert_normal(text), (text, decoded)
    assert tokenizer.extra_config["do_lower_case"] is True


def test_wordpiece_cased_keeps_the_case(tmp_path):
    tokenizer = train_tokenizer(MULTI30K_DE, type="wordpiece", vocab_size=1500, lowercase=False, format="txt")
    tokens = [tokenizer.id_to_token(i) for i in tokenizer.encode("Ein Mann")]
    assert "Ein" in tokens and "ein" not in tokens


def test_wordpiece_numbers_its_pieces_in_a_fixed_order(trained):
    vocab = Tokenizer.from_dir(trained["wordpiece"]).get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    assert pieces[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

    def group(piece: str) -> tuple:
        stem = piece[2:] if piece.startswith("##") and len(piece) > 2 else piece
        return (1 if stem == piece else 2, 0, piece) if len(stem) == 1 else (3, len(stem), piece)

    rest = pieces[5:]
    assert rest == sorted(rest, key=group)  # characters, "##" characters, then longer pieces by length
    assert group(rest[0])[0] == 1 and group(rest[-1])[0] == 3


@pytest.mark.parametrize("kind,size", [("bpe", 700), ("byte-bpe", 600), ("wordpiece", 900)])
def test_the_vocabulary_size_is_honoured(kind, size):
    tokenizer = train_tokenizer(SHAKESPEARE, type=kind, vocab_size=size)
    assert tokenizer.vocab_size == size
    assert len(tokenizer.get_vocab()) == size
    assert max(tokenizer.get_vocab().values()) == size - 1


def test_char_vocab_size_is_an_upper_bound_and_extra_special_tokens_get_ids():
    tokenizer = train_tokenizer(SHAKESPEARE, type="char", vocab_size=1000, special_tokens=["<|user|>"])
    assert tokenizer.vocab_size == 65 + 3
    ids = tokenizer.encode("hi<|user|>")
    assert tokenizer.id_to_token(ids[-1]) == "<|user|>" and len(ids) == 3
    assert tokenizer.id_to_token(ids[-1]) in [tokenizer.id_to_token(i) for i in tokenizer.all_special_ids]


def test_min_frequency_drops_rare_characters_for_char():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    rare = {ch for ch in set(text) if text.count(ch) < 100}
    assert rare  # e.g. '$', '&', 'Z'
    tokenizer = train_tokenizer(SHAKESPEARE, type="char", min_frequency=100)
    assert tokenizer.vocab_size == len(set(text)) - len(rare) + 2
    assert tokenizer.encode(sorted(rare)[0]) == [tokenizer.unk_token_id]


def test_jsonl_records_are_read_through_the_text_field():
    tokenizer = train_tokenizer(DIALOGSUM, type="byte-bpe", vocab_size=800, text_field="summary")
    assert tokenizer.vocab_size == 800
    assert "#Person1#" in tokenizer.decode(tokenizer.encode("#Person1# asks #Person2#"))


def test_lowercase_for_gpt_style_types():
    tokenizer = train_tokenizer(SHAKESPEARE, type="char", lowercase=True)
    assert tokenizer.decode(tokenizer.encode("ROMEO")) == "romeo"
    assert tokenizer.vocab_size == len(set(SHAKESPEARE.read_text(encoding="utf-8").lower())) + 2


# ------------------------------------------------------------------------------------------------ errors


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="no data files given"):
        train_tokenizer([], type="char")
    with pytest.raises(DataError, match="missing.txt: no such file"):
        train_tokenizer(tmp_path / "missing.txt", type="char")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="blank.txt: the file is empty"):
        train_tokenizer(blank, type="bpe", vocab_size=100)
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"text": " "}) + "\n" + json.dumps({"text": "\n"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="records.jsonl: no text to train a tokenizer on"):
        train_tokenizer(records, type="wordpiece", vocab_size=100)
    with pytest.raises(DataError, match=r"records.jsonl:1: missing field 'content' \(fields: 'text'\)"):
        train_tokenizer(records, type="char", text_field="content")
    with pytest.raises(ConfigError, match="unknown tokenizer type 'sentencepiece'; known: bpe, byte-bpe, wordpiece, char"):
        train_tokenizer(SHAKESPEARE, type="sentencepiece", vocab_size=100)
    with pytest.raises(ConfigError, match="a bpe tokenizer needs a vocabulary size"):
        train_tokenizer(SHAKESPEARE, type="bpe")


def test_a_vocabulary_too_small_for_the_alphabet_is_an_error_that_says_how_many_ids_are_needed():
    with pytest.raises(ConfigError, match=r"vocabulary size 40 is too small .*input.txt: 65 characters plus 2 "
                                          r"special tokens need 67 ids"):
        train_tokenizer(SHAKESPEARE, type="char", vocab_size=40)
    with pytest.raises(ConfigError, match=r"too small for byte-level BPE: .* use at least 257"):
        train_tokenizer(SHAKESPEARE, type="byte-bpe", vocab_size=200)
    with pytest.raises(ConfigError, match=r"vocabulary size 50 is too small for the alphabet .* need \d+ ids.*limit_alphabet"):
        train_tokenizer(SHAKESPEARE, type="bpe", vocab_size=50)
    # limit_alphabet keeps the most frequent characters, and then it fits
    assert train_tokenizer(SHAKESPEARE, type="bpe", vocab_size=50, limit_alphabet=40).vocab_size == 50
    with pytest.raises(ConfigError, match="leaves no room beside the 5 special tokens"):
        train_tokenizer(SST2_DEV, type="wordpiece", vocab_size=5, text_field="sentence")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_trains_writes_and_prints_the_size_and_an_example(tmp_path, capsys):
    out = tmp_path / "char"
    assert main(["tokenizer", "train", "--data", str(SHAKESPEARE), "--type", "char", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: char tokenizer, vocabulary size 67" in printed
    assert "example: 'First Citizen:'" in printed and "14 tokens" in printed
    assert Tokenizer.from_dir(out).vocab_size == 67

    assert main(["tokenizer", "train", "--data", str(SHAKESPEARE), "--type", "char", "--out", str(out)]) == 1
    assert "output directory exists and is not empty" in capsys.readouterr().err

    out2 = tmp_path / "wp"
    assert main(["tokenizer", "train", "--data", str(SST2_DEV), "--text-field", "sentence", "--type", "wordpiece",
                 "--vocab-size", "1200", "--no-lowercase", "--max-length", "128", "--out", str(out2)]) == 0
    saved = json.loads((out2 / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 128 and saved["do_lower_case"] is False
    assert "vocabulary size 1200" in capsys.readouterr().out

    assert main(["tokenizer", "train", "--data", str(SHAKESPEARE), "--type", "bpe", "--out", str(tmp_path / "b")]) == 1
    assert "needs a vocabulary size (--vocab-size N)" in capsys.readouterr().err


def test_word_type_is_the_wikitext_word_vocabulary_and_transformers_reads_it(tmp_path, capsys):
    from transformers import AutoTokenizer

    from tunelab.tokenizer.word_level import train_word_level

    wikitext = Path(__file__).resolve().parents[4] / "shared" / "data" / "wikitext2" / "valid.txt"
    out = tmp_path / "words"
    assert main(["tokenizer", "train", "--type", "word", "--data", str(wikitext), "--vocab-size", "3000",
                 "--out", str(out), "--no-progress"]) == 0
    assert "word tokenizer, vocabulary size 3000 (special tokens: <pad> <unk> <eos>)" in capsys.readouterr().out
    ours = Tokenizer.from_dir(out)
    reference = train_word_level([wikitext], max_vocab=3000)  # the most frequent words, specials first
    assert ours.get_vocab() == reference.get_vocab()
    assert [ours.pad_token_id, ours.unk_token_id, ours.eos_token_id] == [0, 1, 2]
    text = "The album was released in 2003 .\nIt sold zzqx copies .\n"
    ids = ours.encode(text)
    assert ids[-1] == ours.eos_token_id and ours.unk_token_id in ids  # line end -> <eos>, an unseen word -> <unk>
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ids
