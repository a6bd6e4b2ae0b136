"""The Tokenizer: a Hugging Face `tokenizers.Tokenizer` plus what a model directory says around it.

A model directory holds the tokenization pipeline (tokenizer.json: normalizer, pre-tokenizer, model,
post-processor, decoder) and, beside it, tokenizer_config.json / special_tokens_map.json with the special
tokens, the maximum length, the padding side and the chat template. `Tokenizer` joins the two, encodes and
decodes with the Rust pipeline (so ids equal transformers' ids), and writes the same files back so that
transformers.AutoTokenizer loads what we save. Older directories without tokenizer.json are rebuilt from
vocab.txt (BERT WordPiece) or vocab.json + merges.txt (GPT-2 byte-level BPE) the way transformers does.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from tunelab.errors import TokenizerError
from tunelab.tokenizer.chat import render_chat_template

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "cls_token", "sep_token")

# tokenizer_config.json keys that Tokenizer holds itself; everything else is kept in `extra_config` and written back.
_OWN_CONFIG_KEYS = {*SPECIAL_TOKEN_KEYS, "chat_template", "model_max_length", "padding_side", "added_tokens_decoder"}

# transformers writes 1e30 for "no limit"; anything this large means the same.
_NO_LIMIT = 10**18

# BERT's defaults (transformers' BertTokenizer) when a vocab.txt directory does not name its special tokens.
_BERT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}
# GPT-2's defaults when a vocab.json + merges.txt directory does not name its special tokens.
_GPT2_SPECIALS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


class Tokenizer:
    """Text <-> token ids with a model's special tokens, batching (padding, truncation) and chat template.

    The backend is owned by this object: its own padding and truncation settings are switched off (some
    tokenizer.json files carry them) and applied per call instead. Calls are serialised with a lock, because
    the Rust backend must not be read while a call reconfigures it.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: dict[str, str | None] | None = None,
                 chat_template: str | None = None, model_max_length: int | None = None,
                 padding_side: str = "right", extra_config: dict | None = None) -> None:
        special_tokens = dict(special_tokens or {})
        unknown = set(special_tokens) - set(SPECIAL_TOKEN_KEYS)
        if unknown:
            raise ValueError(f"unknown special token keys {sorted(unknown)}; expected some of {SPECIAL_TOKEN_KEYS}")
        if padding_side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self._backend = backend
        self._lock = threading.Lock()
        self._special = {key: special_tokens.get(key) or None for key in SPECIAL_TOKEN_KEYS}
        self._chat_template = chat_template
        self._model_max_length = model_max_length if model_max_length and model_max_length < _NO_LIMIT else None
        self.padding_side = padding_side
        self.extra_config = dict(extra_config or {})
        self.truncation_side = self.extra_config.get("truncation_side", "right")
        if self.truncation_side not in ("left", "right"):
            raise TokenizerError(f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}")

        backend.no_padding()
        backend.no_truncation()
        # As transformers does: every named special token is an added special token (matched whole in text,
        # dropped by skip_special_tokens), added to the vocabulary if the model lacks it.
        present = {token.content for token in backend.get_added_tokens_decoder().values()}
        missing = [token for token in dict.fromkeys(self._special.values()) if token and token not in present]
        if missing:
            backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
        if backend.post_processor is None:
            # transformers installs this no-op template so that pairs get token_type_ids 0 / 1.
            backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer from a model directory (or the path of its tokenizer.json).

        Files read: tokenizer.json, or else vocab.txt (BERT WordPiece), or else vocab.json + merges.txt
        (GPT-2 byte-level BPE); then tokenizer_config.json, special_tokens_map.json and chat_template.jinja
        when present. Every missing or malformed file is reported as a TokenizerError naming it.
        """
        path = Path(path)
        if path.is_file():
            directory, tokenizer_file = path.parent, path
        elif path.is_dir():
            directory, tokenizer_file = path, path / "tokenizer.json"
        else:
            raise TokenizerError(f"{path}: no such tokenizer directory or file")

        config = _read_json_object(directory / "tokenizer_config.json")
        special_map = _read_json_object(directory / "special_tokens_map.json")
        special = _special_tokens(config, special_map, directory)

        if tokenizer_file.is_file():
            backend = _load_tokenizer_json(tokenizer_file)
        elif (directory / "vocab.txt").is_file():
            special = {**_BERT_SPECIALS, **{k: v for k, v in special.items() if v}}
            backend = _build_wordpiece(directory / "vocab.txt", config, special, directory / "tokenizer_config.json")
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            special = {**_GPT2_SPECIALS, **{k: v for k, v in special.items() if v}}
            backend = _build_byte_level_bpe(directory / "vocab.json", directory / "merges.txt", config)
        else:
            found = sorted(p.name for p in directory.iterdir())[:20]
            hint = " (a SentencePiece tokenizer.model alone is not supported: save it with tokenizer.json)" \
                if "tokenizer.model" in found else ""
            raise TokenizerError(
                f"{directory}: no tokenizer files (expected tokenizer.json, vocab.txt, or vocab.json + merges.txt;"
                f" found {found or 'nothing'}){hint}"
            )
        _add_configured_tokens(backend, config, directory / "tokenizer_config.json")

        padding_side = config.get("padding_side", "right")
        if padding_side not in ("left", "right"):
            raise TokenizerError(
                f"{directory / 'tokenizer_config.json'}: padding_side must be 'left' or 'right', got {padding_side!r}"
            )
        return cls(
            backend,
            special_tokens=special,
            chat_template=_read_chat_template(directory, config),
            model_max_length=_model_max_length(config, directory / "tokenizer_config.json"),
            padding_side=padding_side,
            extra_config={k: v for k, v in config.items() if k not in _OWN_CONFIG_KEYS},
        )

    # ------------------------------------------------------------------------------------------ saving

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into directory `path`.

        transformers.AutoTokenizer.from_pretrained(path) then tokenizes identically and renders the same chat
        template. Each file is written under a temporary name and renamed, so a crash never leaves half a file.
        """
        directory = Path(path)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TokenizerError(f"{directory}: cannot create the tokenizer directory: {err}") from err
        with self._lock:
            tokenizer_json = self._backend.to_str(pretty=True)
            added = self._backend.get_added_tokens_decoder()
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.extra_config}
        config["added_tokens_decoder"] = {
            str(index): {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                         "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
            for index, token in sorted(added.items())
        }
        named = {key: value for key, value in self._special.items() if value is not None}
        config.update(named)
        config["model_max_length"] = self._model_max_length if self._model_max_length is not None else int(1e30)
        config["padding_side"] = self.padding_side
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template

        _write_atomic(directory / "tokenizer.json", tokenizer_json)
        _write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        _write_atomic(directory / "special_tokens_map.json", json.dumps(named, indent=2, ensure_ascii=False) + "\n")
        # transformers prefers chat_template.jinja over the config entry: never leave a stale one behind.
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.exists():
            if self._chat_template is None:
                jinja_file.unlink()
            else:
                _write_atomic(jinja_file, self._chat_template)

    # -------------------------------------------------------------------------------------- vocabulary

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for vocabulary export; do not reconfigure it)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (what an embedding matrix must cover)."""
        with self._lock:
            return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        """token -> id for the whole vocabulary, added tokens included."""
        with self._lock:
            return self._backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        with self._lock:
            return self._backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        if id < 0:
            return None
        with self._lock:
            return self._backend.id_to_token(id)

    @property
    def model_max_length(self) -> int | None:
        """Longest input the model accepts, or None when the config sets no limit."""
        return self._model_max_length

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens that are set, e.g. {"eos_token": "<|im_end|>"}."""
        return {key: value for key, value in self._special.items() if value is not None}

    def _special_id(self, key: str) -> int | None:
        token = self._special[key]
        return None if token is None else self.token_to_id(token)

    bos_token = property(lambda self: self._special["bos_token"])
    eos_token = property(lambda self: self._special["eos_token"])
    unk_token = property(lambda self: self._special["unk_token"])
    pad_token = property(lambda self: self._special["pad_token"])
    mask_token = property(lambda self: self._special["mask_token"])
    cls_token = property(lambda self: self._special["cls_token"])
    sep_token = property(lambda self: self._special["sep_token"])
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))
    mask_token_id = property(lambda self: self._special_id("mask_token"))
    cls_token_id = property(lambda self: self._special_id("cls_token"))
    sep_token_id = property(lambda self: self._special_id("sep_token"))

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens and of every added token marked special, sorted."""
        with self._lock:
            ids = {index for index, token in self._backend.get_added_tokens_decoder().items() if token.special}
        ids.update(i for i in (self._special_id(key) for key in SPECIAL_TOKEN_KEYS) if i is not None)
        return sorted(ids)

    # -------------------------------------------------------------------------------------- encoding

    def encode(self, text: str, pair: str | None = None, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (and of a second segment `pair`), with the model's special tokens by default."""
        _check_text(text, "text")
        if pair is not None:
            _check_text(pair, "pair")
        with self._lock:
            return self._backend.encode(text, pair, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], pairs: list[str] | None = None, *, add_special_tokens: bool = True,
                     max_length: int | None = None, truncation: bool = False, padding: bool = False,
                     return_offsets: bool = False, return_tensors: str | None = None) -> dict:
        """Encode many texts (or text pairs) at once, as transformers' `tokenizer(texts, pairs, ...)` does.

        Returns {"input_ids", "attention_mask", "token_type_ids"} and "offsets" (character spans, (0, 0) for
        special and pad tokens) when asked. `truncation` cuts to `max_length` (default model_max_length),
        special tokens included; for pairs it shortens the longer segment first ("longest_first").
        `padding` pads every row to the longest one on `padding_side`. return_tensors="pt" gives LongTensors.
        """
        if isinstance(texts, str):
            raise TokenizerError("encode_batch expects a list of texts; use encode() for a single text")
        texts = list(texts)
        for i, text in enumerate(texts):
            _check_text(text, f"texts[{i}]")
        if pairs is not None:
            pairs = list(pairs)
            if len(pairs) != len(texts):
                raise TokenizerError(f"encode_batch got {len(texts)} texts but {len(pairs)} pairs")
            for i, text in enumerate(pairs):
                _check_text(text, f"pairs[{i}]")
        if return_tensors not in (None, "pt"):
            raise TokenizerError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        inputs: list = texts if pairs is None else list(zip(texts, pairs))
        limit = (max_length if max_length is not None else self._model_max_length) if truncation else None

        with self._lock:
            if limit is not None:
                reserved = self._backend.num_special_tokens_to_add(pairs is not None) if add_special_tokens else 0
                if limit < reserved:
                    raise TokenizerError(f"max_length {limit} leaves no room for the {reserved} special tokens")
                self._backend.enable_truncation(limit, strategy="longest_first", direction=self.truncation_side)
            try:
                encodings = self._backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
            finally:
                if limit is not None:
                    self._backend.no_truncation()

        batch: dict[str, list] = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        if return_offsets:
            batch["offsets"] = [e.offsets for e in encodings]
        if padding:
            self._pad(batch)
        if return_tensors == "pt":
            return _to_tensors(batch)
        return batch

    def _padding_id(self) -> int:
        """pad_token_id, or eos_token_id for models without a pad token (GPT-2, Llama), or 0."""
        for key in ("pad_token", "eos_token"):
            index = self._special_id(key)
            if index is not None:
                return index
        return 0

    def _pad(self, batch: dict[str, list]) -> None:
        """Pad every row in place to the longest row, on `padding_side`."""
        longest = max((len(row) for row in batch["input_ids"]), default=0)
        fill = {"input_ids": self._padding_id(), "attention_mask": 0, "token_type_ids": 0, "offsets": (0, 0)}
        for key, rows in batch.items():
            for i, row in enumerate(rows):
                pad = [fill[key]] * (longest - len(row))
                rows[i] = row + pad if self.padding_side == "right" else pad + row

    # -------------------------------------------------------------------------------------- decoding

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text of token ids (a list, an int, or a 1-D tensor / array); special tokens dropped by default."""
        ids = _as_id_list(ids)
        with self._lock:
            text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.extra_config.get("clean_up_tokenization_spaces") and not isinstance(self._backend.model, BPE):
            text = _clean_up_tokenization(text)
        return text

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder for streaming generation (see StreamDecoder)."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                            tokenize: bool = False, tools=None, **kwargs) -> str | list[int]:
        """The prompt for a conversation, rendered with this tokenizer's chat template.

        The template sees `messages`, `add_generation_prompt`, `tools`, every special token (bos_token, ...)
        and `kwargs`. As in transformers, message keys whose value is None are dropped first, and tokenize=True
        encodes the prompt without adding special tokens (the template writes them itself).
        """
        if self._chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                                 "chat_template.jinja); format the prompt yourself or add a template")
        if tools is not None and not all(isinstance(tool, dict) for tool in tools):
            raise TokenizerError("tools must be a list of JSON-schema dicts")
        cleaned = [
            {k: v for k, v in message.items() if v is not None} if isinstance(message, dict) else message
            for message in messages
        ]
        text = render_chat_template(self._chat_template, cleaned, add_generation_prompt=add_generation_prompt,
                                    tools=tools, **{**self.special_tokens, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ------------------------------------------------------------------------------------------ misc

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]  # locks do not pickle (DataLoader workers pickle the tokenizer)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        model = type(self._backend.model).__name__
        return f"Tokenizer({model}, vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"


class StreamDecoder:
    """Incremental detokenizer for streaming generation: feed token ids one at a time, get back only the new text
    that is final (holds back incomplete UTF-8 / byte-level pieces until they complete, so the concatenation of all
    pieces equals tokenizer.decode(all_ids)).

    Decoding one token alone is wrong for byte-level vocabularies (an emoji spans several tokens) and for
    decoders that treat the first token specially (SentencePiece drops its leading space). So each step decodes
    a short window that starts at an already printed token, and returns the text past that token's text,
    unless it ends in U+FFFD, the mark of an incomplete character. Cost per token is O(window), not O(length).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._window_start = 0  # first id of the decoding window (its text was printed already)
        self._printed_end = 0  # ids before this index have had their text returned

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever is held back (call once generation stops)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        decode = self._tokenizer.decode
        skip = self._skip_special_tokens
        printed = decode(self._ids[self._window_start:self._printed_end], skip_special_tokens=skip)
        text = decode(self._ids[self._window_start:], skip_special_tokens=skip)
        complete = len(text) > len(printed) and not text.endswith("\ufffd")
        if not (complete or final):
            return ""
        self._window_start, self._printed_end = self._printed_end, len(self._ids)
        return text[len(printed):]


# ------------------------------------------------------------------------------------------- helpers


def _check_text(text: Any, what: str) -> None:
    if not isinstance(text, str):
        raise TokenizerError(f"{what} must be a string, got {type(text).__name__}")


def _as_id_list(ids: Any) -> list[int]:
    """Token ids as a list of Python ints, from an int, a list, a 1-D tensor or a numpy array."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    try:
        ids = [int(i) for i in ids]
    except (TypeError, ValueError) as err:
        raise TokenizerError(f"decode expects a flat sequence of token ids: {err}") from err
    if any(i < 0 for i in ids):
        raise TokenizerError(f"decode got a negative token id: {min(ids)}")
    return ids


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization_spaces: join spaces that WordPiece decoding put before punctuation."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _to_tensors(batch: dict[str, list]) -> dict:
    """The batch as torch LongTensors ([B, T], offsets [B, T, 2]); the rows must have equal lengths."""
    import torch

    lengths = {len(row) for row in batch["input_ids"]}
    if len(lengths) > 1:
        raise TokenizerError("return_tensors='pt' needs rows of equal length: pass padding=True")
    out = {}
    for key, rows in batch.items():
        tensor = torch.tensor(rows, dtype=torch.long)
        if key == "offsets" and tensor.numel() == 0:
            tensor = tensor.reshape(len(rows), 0, 2)
        out[key] = tensor
    return out


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise TokenizerError(f"{path}: cannot write: {err}") from err


def _read_json_object(path: Path) -> dict:
    """A JSON object from `path`, {} if the file does not exist; TokenizerError naming the file otherwise."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: cannot read: {err}") from err
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any, path: Path, key: str) -> str | None:
    """A special token from a config value: a string, or a serialized AddedToken {"content": ...}."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: {key} must be a string or {{\"content\": ...}}, got {value!r}")


def _special_tokens(config: dict, special_map: dict, directory: Path) -> dict[str, str | None]:
    """Named special tokens: tokenizer_config.json wins, special_tokens_map.json fills the gaps."""
    special: dict[str, str | None] = {}
    for key in SPECIAL_TOKEN_KEYS:
        token = _token_content(config.get(key), directory / "tokenizer_config.json", key)
        if token is None:
            token = _token_content(special_map.get(key), directory / "special_tokens_map.json", key)
        special[key] = token
    return special


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: cannot read: {err}") from err
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as err:  # the Rust parser raises a plain Exception
        try:
            json.loads(text)
        except json.JSONDecodeError as json_err:
            raise TokenizerError(
                f"{path}: malformed JSON at line {json_err.lineno}, column {json_err.colno}: {json_err.msg}"
            ) from err
        raise TokenizerError(f"{path}: not a valid tokenizer.json: {err}") from err


def _config_bool(config: dict, key: str, default: bool | None, path: Path) -> bool | None:
    value = config.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise TokenizerError(f"{path}: {key} must be true, false or null, got {value!r}")
    return value


def _build_wordpiece(vocab_file: Path, config: dict, special: dict[str, str | None],
                     config_path: Path) -> tokenizers.Tokenizer:
    """BERT's WordPiece pipeline from vocab.txt, built as transformers' BertTokenizer(Fast) builds it."""
    try:
        lines = vocab_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{vocab_file}: cannot read: {err}") from err
    vocab = {token: index for index, token in enumerate(lines)}  # one token per line; id = line number
    if not vocab:
        raise TokenizerError(f"{vocab_file}: the vocabulary is empty")
    unk = special["unk_token"]
    if unk not in vocab:
        raise TokenizerError(f"{vocab_file}: the unknown token {unk!r} is not in the vocabulary")
    backend = tokenizers.Tokenizer(WordPiece(vocab, unk_token=unk))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=_config_bool(config, "tokenize_chinese_chars", True, config_path),
        strip_accents=_config_bool(config, "strip_accents", None, config_path),  # None: strip when lowercasing
        lowercase=_config_bool(config, "do_lower_case", True, config_path),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    named = [token for token in dict.fromkeys(special.values()) if token]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in named])
    cls, sep = special["cls_token"], special["sep_token"]
    if cls and sep:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0",
            pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))],
        )
    return backend


def _build_byte_level_bpe(vocab_file: Path, merges_file: Path, config: dict) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE pipeline from vocab.json + merges.txt, as transformers' GPT2Tokenizer builds it."""
    vocab = _read_json_object(vocab_file)
    if not vocab or not all(isinstance(i, int) for i in vocab.values()):
        raise TokenizerError(f"{vocab_file}: expected a non-empty object mapping tokens to integer ids")
    try:
        lines = merges_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{merges_file}: cannot read: {err}") from err
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{merges_file}: line {number}: expected two space-separated tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    try:
        model = BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                    fuse_unk=False)
    except Exception as err:
        raise TokenizerError(f"{merges_file}: merges do not match {vocab_file.name}: {err}") from err
    backend = tokenizers.Tokenizer(model)
    add_prefix_space = _config_bool(config, "add_prefix_space", False, vocab_file.parent / "tokenizer_config.json")
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(add_prefix_space))
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_configured_tokens(backend: tokenizers.Tokenizer, config: dict, path: Path) -> None:
    """Add the tokens listed in tokenizer_config.json "added_tokens_decoder" that the backend lacks."""
    entries = config.get("added_tokens_decoder") or {}
    if not isinstance(entries, dict):
        raise TokenizerError(f"{path}: added_tokens_decoder must be an object of id -> token")
    try:
        ordered = sorted(entries.items(), key=lambda item: int(item[0]))
    except ValueError as err:
        raise TokenizerError(f"{path}: added_tokens_decoder keys must be token ids: {err}") from err
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    for index, entry in ordered:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise TokenizerError(f"{path}: added_tokens_decoder[{index}] must be an object with a 'content' string")
        if entry["content"] in present:
            continue
        token = AddedToken(entry["content"], single_word=bool(entry.get("single_word", False)),
                           lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                           normalized=bool(entry.get("normalized", not entry.get("special", False))),
                           special=bool(entry.get("special", False)))
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])


def _read_chat_template(directory: Path, config: dict) -> str | None:
    """The chat template: chat_template.jinja, else tokenizer_config.json, else chat_template.json.

    The order is transformers': a separate .jinja file wins over the config entry. A config may hold several
    named templates ([{"name": ..., "template": ...}]); the one named "default" (else the first) is used.
    """
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{jinja_file}: cannot read: {err}") from err
    source = directory / "tokenizer_config.json"
    template = config.get("chat_template")
    if template is None:
        source = directory / "chat_template.json"
        template = _read_json_object(source).get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
        if not template:
            return None
        named = {t.get("name"): t["template"] for t in template}
        return named.get("default", template[0]["template"])
    raise TokenizerError(f"{source}: chat_template must be a string or a list of {{name, template}} objects")


def _model_max_length(config: dict, path: Path) -> int | None:
    value = config.get("model_max_length")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise TokenizerError(f"{path}: model_max_length must be a positive integer, got {value!r}")
    return int(value) if value < _NO_LIMIT else None
