"""Building a tokenizer from a GGUF file's metadata.

A GGUF file carries no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), its
token types, the BPE merges or SentencePiece scores, the special token ids and the chat template as
metadata. We rebuild the `tokenizers` pipeline from those so that encoding equals what transformers
builds for the same file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`):

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE. Tokens written outside GPT-2's byte alphabet are
  re-spelled byte by byte; text is split by the regex named by `tokenizer.ggml.pre` when we know it,
  otherwise by GPT-2's own byte-level regex.
- `tokenizer.ggml.model == "llama"`: SentencePiece-style BPE over "▁"-joined pieces with byte
  fallback (`<0x0A>` tokens); merges come from the file or, when it has none, from the scores
  (a pair whose merged piece scores higher merges first).

In both, control tokens (type 3) become added special tokens and user-defined ones (type 4) added
normal tokens, so that they are matched whole in text. BOS/EOS are added per tokenizer.ggml.add_bos_token
/ add_eos_token (transformers' defaults: BOS for "llama" vocabularies, nothing for "gpt2" ones).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from tunelab.errors import TokenizerError

if TYPE_CHECKING:
    from tunelab.tokenizer.base import Tokenizer

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns for the `tokenizer.ggml.pre` names whose vocabularies were learned on them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")

# transformers' names of the special tokens and the GGUF keys of their ids.
_SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68 bytes
    are shifted to U+0100 onwards in byte order, so every byte string has a printable spelling."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(table.items()))


def tokenizer_from_gguf_metadata(metadata: dict, *, source: str = "") -> Tokenizer:
    """The Tokenizer that a GGUF file's metadata describes (TokenizerError naming `source` if it cannot)."""
    from tunelab.tokenizer.base import Tokenizer

    backend, special_tokens, extra = build_gguf_backend(metadata, source=source)
    return Tokenizer(
        backend,
        special_tokens=special_tokens,
        chat_template=metadata.get("tokenizer.chat_template"),
        extra_config=extra,
    )


def build_gguf_backend(metadata: dict, *, source: str = "") -> tuple[tokenizers.Tokenizer, dict[str, str | None], dict]:
    """(tokenizers pipeline, named special tokens, tokenizer_config extras) from GGUF metadata."""
    where = f"{source}: " if source else ""
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        raise TokenizerError(f"{where}GGUF metadata has no 'tokenizer.ggml.model': the file carries no tokenizer")
    if kind not in SUPPORTED_TOKENIZER_MODELS:
        raise TokenizerError(
            f"{where}GGUF tokenizer model {kind!r} is not supported; supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)}"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{where}GGUF metadata 'tokenizer.ggml.tokens' is missing or not a list of strings")
    token_types = metadata.get("tokenizer.ggml.token_type") or []
    if token_types and len(token_types) != len(tokens):
        raise TokenizerError(
            f"{where}'tokenizer.ggml.token_type' has {len(token_types)} entries for {len(tokens)} tokens"
        )

    if kind == "gpt2":
        backend, vocab = _byte_level_bpe(metadata, tokens, where)
        spelling = set(byte_level_alphabet().values())
        add_bos_default = False
    else:
        backend, vocab = _sentencepiece_bpe(metadata, tokens, where)
        spelling = None
        add_bos_default = True

    # Control tokens -> special added tokens; a byte-level token spelled outside the byte alphabet is a
    # mislabelled one and skipped (adding it would grow the vocabulary). User-defined -> normal added tokens.
    control = [t for t, kind_ in zip(tokens, token_types)
               if kind_ == CONTROL and (spelling is None or set(t) <= spelling)]
    if control:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, kind_ in zip(tokens, token_types) if kind_ == USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    special: dict[str, str | None] = {}
    for name, key in _SPECIAL_TOKEN_KEYS.items():
        index = metadata.get(key)
        if index is not None and not (isinstance(index, int) and 0 <= index < len(tokens)):
            raise TokenizerError(f"{where}GGUF metadata {key!r} = {index!r} is not a token id below {len(tokens)}")
        special[name] = tokens[index] if index is not None else None
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(special.values()) if t and t not in present]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)) and special["bos_token"] is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and special["eos_token"] is not None
    backend.post_processor = _template_processor(backend, special, add_bos, add_eos)
    extra = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "gguf_tokenizer_model": kind,
        "gguf_pre_tokenizer": metadata.get("tokenizer.ggml.pre"),
    }
    return backend, special, extra


def _template_processor(backend: tokenizers.Tokenizer, special: dict, add_bos: bool, add_eos: bool) -> Any:
    """BOS / EOS around each segment, as transformers' update_post_processor writes it."""
    bos, eos = special["bos_token"], special["eos_token"]
    first = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    second = ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    pairs = []
    if add_bos:
        pairs.append((bos, backend.token_to_id(bos)))
    if add_eos:
        pairs.append((eos, backend.token_to_id(eos)))
    return processors.TemplateProcessing(single=" ".join(first), pair=" ".join(first + second), special_tokens=pairs)


def _merges(metadata: dict, tokens: list[str], vocab: dict[str, int], where: str) -> list[tuple[str, str]]:
    """The file's merges, or for a vocabulary without them the ones its scores imply."""
    raw = metadata.get("tokenizer.ggml.merges")
    if raw is not None:
        merges = []
        for i, merge in enumerate(raw):
            parts = merge.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{where}'tokenizer.ggml.merges'[{i}] = {merge!r} is not two tokens and a space")
            merges.append((parts[0], parts[1]))
        return merges
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise TokenizerError(f"{where}GGUF metadata has neither 'tokenizer.ggml.merges' nor a score per token")
    return merges_from_scores(tokens, scores, vocab)


def merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece vocabulary: every split of a piece into two known pieces, best score first.

    Ties keep a fixed order, the one transformers uses: the longer left piece first, then the longer
    right piece, then the order of the pieces in the file and the ids of the two halves.
    """
    candidates = []
    for token, score in dict(zip(tokens, scores)).items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((left, right, score) for left, right in splits)
    order = sorted(range(len(candidates)),
                   key=lambda i: (-candidates[i][2], -len(candidates[i][0]), -len(candidates[i][1]), i))
    return [(candidates[i][0], candidates[i][1]) for i in order]


def _byte_level_bpe(metadata: dict, tokens: list[str], where: str) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    alphabet = byte_level_alphabet()
    spelling = set(alphabet.values())

    def respell(token: str) -> str:
        return token if set(token) <= spelling else "".join(alphabet[b] for b in token.encode("utf-8"))

    vocab = {respell(token): index for index, token in enumerate(tokens)}
    merges = _merges(metadata, tokens, vocab, where)
    try:
        model = BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                    fuse_unk=False)
    except Exception as err:  # the Rust side raises a plain Exception for a merge of unknown tokens
        raise TokenizerError(f"{where}GGUF merges do not match its tokens: {err}") from None
    backend = tokenizers.Tokenizer(model)
    split = PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend, vocab


def _sentencepiece_bpe(metadata: dict, tokens: list[str], where: str) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _merges(metadata, tokens, vocab, where)
    try:
        model = BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None)
    except Exception as err:
        raise TokenizerError(f"{where}GGUF merges do not match its tokens: {err}") from None
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = None
    # "▁" marks a word start; "first" puts one before the text (not after each special token).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1),
    ])
    return backend, vocab


__all__ = [
    "PRE_TOKENIZER_SPLITS", "SUPPORTED_TOKENIZER_MODELS", "build_gguf_backend", "byte_level_alphabet",
    "merges_from_scores", "tokenizer_from_gguf_metadata",
]
