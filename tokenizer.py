"""tokenizer.py: Llama 3's tokenizer on tiktoken, standalone, with the chat format.

Llama 3 replaced Llama 2's 32K SentencePiece vocabulary with a 128K byte-level
BPE vocabulary: OpenAI's 100K tiktoken tokens plus 28K more for other
languages. It compresses text better (about 15% fewer tokens for English), so
the same context holds more text. Tokens 0..127999 are BPE tokens; 256 special
tokens follow at 128000..128255, for 128256 ids in all (the model's vocab_size).

    tok = Tokenizer("tokenizer.model")      # Meta's file; or Hugging Face's "tokenizer.json"
    ids = tok.encode("Hello world", bos=True, eos=False)  # [128000, 9906, 1917]
    tok.decode(ids)                                        # '<|begin_of_text|>Hello world'

Imports only tiktoken and the standard library.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

import tiktoken

# -----------------------------------------------------------------------------
# The BPE rank file
#
# Meta's tokenizer.model is tiktoken's plain-text format: one line per token,
# "<base64 of the token's bytes> <rank>", ranks 0..127999 in order. The rank is
# both the token id and the merge priority: BPE starts from single bytes and
# repeatedly merges the adjacent pair whose merged bytes have the lowest rank.
# We parse it ourselves: tiktoken's load_tiktoken_bpe needs blobfile for some
# paths and writes a copy into a cache folder.
# -----------------------------------------------------------------------------

N_BPE_TOKENS = 128000
N_SPECIAL_TOKENS = 256


class TokenizerError(ValueError):
    """tokenizer.model is missing or malformed: the message names the file and line."""


def load_bpe_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken rank file into {token bytes: rank}, checking every line."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file not found") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise TokenizerError(f"{path} line {lineno}: expected '<base64 token> <rank>', got {line[:60].decode(errors='replace')!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except ValueError:
            raise TokenizerError(f"{path} line {lineno}: invalid base64 {parts[0][:60].decode(errors='replace')!r}") from None
        if int(parts[1]) != lineno - 1 or token in ranks:
            raise TokenizerError(f"{path} line {lineno}: rank {int(parts[1])} out of order or token repeated")
        ranks[token] = lineno - 1
    if len(ranks) != N_BPE_TOKENS:
        raise TokenizerError(f"{path}: {len(ranks)} tokens, Llama 3's tokenizer.model has {N_BPE_TOKENS}")
    return ranks


# -----------------------------------------------------------------------------
# Hugging Face's tokenizer.json
#
# The hub's Llama 3 repos carry tokenizer.json (what transformers reads), made
# from tokenizer.model by transformers' tiktoken converter; a download through
# transformers has only that file. Its BPE vocabulary maps token strings to ids,
# the strings written in GPT-2's byte-level alphabet: each of the 256 byte
# values is one printable character (bytes 33-126, 161-172 and 174-255 stand
# for themselves, the other 68 for chr(256), chr(257), ...). Mapping each
# string back to its bytes gives tokenizer.model's ranks, the id being the
# rank. A file is accepted only if it is Llama 3's: the same split pattern,
# the same 128,000 (bytes, rank) pairs (their SHA-256 in tokenizer.model's
# text format equals that of Meta's file) and the special tokens at their ids.
# -----------------------------------------------------------------------------

LLAMA3_RANKS_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"  # Meta's tokenizer.model


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable character -> the byte it stands for."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    char_of = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in char_of):
        char_of[b] = chr(256 + n)
    return {c: b for b, c in char_of.items()}


def ranks_sha256(ranks: dict[bytes, int]) -> str:
    """SHA-256 of ranks written in tokenizer.model's format ("<base64> <rank>" lines)."""
    h = hashlib.sha256()
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(base64.b64encode(token) + b" %d\n" % rank)
    return h.hexdigest()


def load_tokenizer_json(path: str | Path) -> dict[bytes, int]:
    """Read Hugging Face's tokenizer.json for Llama 3 into {token bytes: rank}, checking it is Llama 3's."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file not found") from None
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read JSON ({e})") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{path}: not a BPE tokenizer.json")
    pre = spec.get("pre_tokenizer") or {}
    splits = [p for p in pre.get("pretokenizers", [pre]) if isinstance(p, dict) and p.get("type") == "Split"]
    if [p.get("pattern", {}).get("Regex") for p in splits] != [PAT_STR]:
        raise TokenizerError(f"{path}: its split pattern is not Llama 3's, so this is another model's tokenizer")
    alphabet, ranks = byte_level_alphabet(), {}
    for text, rank in model["vocab"].items():
        if any(c not in alphabet for c in text):
            raise TokenizerError(f"{path}: token {text!r} is not in the byte-level alphabet")
        ranks[bytes(alphabet[c] for c in text)] = rank
    if len(ranks) != N_BPE_TOKENS or ranks_sha256(ranks) != LLAMA3_RANKS_SHA256:
        raise TokenizerError(f"{path}: its {len(ranks)}-token vocabulary is not Llama 3's")
    check_special_tokens(path, {t.get("id"): t.get("content") for t in spec.get("added_tokens", [])})
    return ranks


def check_special_tokens(path: Path, added: dict[int, str]) -> None:
    """tokenizer.json's added tokens must be Llama 3's 256, at Meta's ids.

    Releases name the unused ones differently (3.0's reserved_special_token_4 is
    3.1's <|eom_id|>), so a reserved name may stand anywhere; the rest must match.
    """
    for i, name in enumerate(SPECIAL_TOKENS):
        theirs = added.get(N_BPE_TOKENS + i)
        if theirs != name and not (isinstance(theirs, str) and re.fullmatch(r"<\|reserved_special_token_\d+\|>", theirs)
                                   and name not in CORE_SPECIAL_TOKENS):
            raise TokenizerError(f"{path}: special token {N_BPE_TOKENS + i} is {theirs!r}, Llama 3's is {name!r}")
    if len(added) != N_SPECIAL_TOKENS:
        raise TokenizerError(f"{path}: {len(added)} added tokens, Llama 3 has {N_SPECIAL_TOKENS}")


# -----------------------------------------------------------------------------
# Pre-tokenizer and special tokens
#
# Before BPE, a regex splits text into pieces and merges never cross a piece
# boundary, so "dog" is the same token(s) wherever it appears. Llama 3 uses
# GPT-4's cl100k pattern, alternative by alternative:
#   (?i:'s|'t|'re|'ve|'m|'ll|'d)   English contractions, in any case
#   [^\r\n\p{L}\p{N}]?\p{L}+       a word with at most one leading non-letter (" dog", "$x")
#   \p{N}{1,3}                     numbers in groups of at most 3 digits ("2024" -> "202", "4")
#    ?[^\s\p{L}\p{N}]+[\r\n]*      punctuation runs with an optional leading space
#   \s*[\r\n]+                     line breaks with the spaces before them
#   \s+(?!\S)|\s+                  spaces, leaving the last one to prefix the next word
#
# The 256 special tokens (128000..128255) are never produced from plain text
# unless the caller allows them. Llama 3.1 named the ones it uses; the rest are
# <|reserved_special_token_N|>, numbered as Meta's llama-models numbers them.
# Llama 3.0 (Meta's llama3 repo) named only begin_of_text, end_of_text,
# start_header_id, end_header_id and eot_id at the same ids; it called 128002..
# 128005 reserved_special_token_0..3, 128008 reserved_special_token_4 and
# numbered the rest from 5, so 3.1's <|eom_id|> is 3.0's reserved token 4.
# -----------------------------------------------------------------------------

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",  # 128000: starts every sequence (BOS)
    "<|end_of_text|>",  # 128001: ends a document; base models stop here (EOS)
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",  # 128004: padding for fine-tuning
    "<|step_id|>",  # 128005
    "<|start_header_id|>",  # 128006: a chat message header: <|start_header_id|>role<|end_header_id|>
    "<|end_header_id|>",  # 128007
    "<|eom_id|>",  # 128008: end of message; the model expects a tool result next
    "<|eot_id|>",  # 128009: end of turn; instruct models stop here
    "<|python_tag|>",  # 128010: starts a code-interpreter call
    "<|image|>",  # 128011: an image position (vision models)
]
SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + N_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
]
# Named alike by every Llama 3 release: the document and chat-turn markers.
CORE_SPECIAL_TOKENS = {"<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>"}

# tiktoken's BPE slows down (and can recurse deeply) on very long pieces, and it
# takes at most ~400K characters well at a time. Meta's encode therefore cuts
# the input into 400,000-character chunks and cuts any run of more than 25,000
# whitespace or non-whitespace characters every 25,000 characters. The cut
# positions change the tokens at the cuts, so we cut exactly where Meta does.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def split_long_runs(s: str, max_run: int = MAX_NO_WHITESPACES_CHARS) -> Iterator[str]:
    """Cut s inside every run of more than max_run whitespace or non-whitespace
    characters, every max_run characters from the run's start (Meta's rule)."""
    # A run start (no same-kind character before it) followed by a too-long run.
    # The lookbehinds make the search linear in len(s) rather than quadratic.
    long_run = re.compile(rf"(?<!\s)\s{{{max_run + 1},}}|(?<!\S)\S{{{max_run + 1},}}")
    start = 0
    for run in long_run.finditer(s):
        for cut in range(run.start() + max_run, run.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


# -----------------------------------------------------------------------------
# The tokenizer
# -----------------------------------------------------------------------------


class Tokenizer:
    """Llama 3's tokenizer: encode text to ids and back, exactly as Meta's does."""

    def __init__(self, path: str | Path):
        # Meta's tokenizer.model, or Hugging Face's tokenizer.json: the same ranks either way.
        ranks = load_tokenizer_json(path) if str(path).endswith(".json") else load_bpe_ranks(path)
        self.special_tokens = {name: N_BPE_TOKENS + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=Path(path).name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = self.model.n_vocab  # 128256
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        # A base model ends with <|end_of_text|>, an instruct model with <|eot_id|>,
        # or <|eom_id|> when it hands over to a tool.
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]

    def encode(self, s: str, *, bos: bool, eos: bool,
               allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = ()) -> list[int]:
        """Text -> token ids, with <|begin_of_text|> / <|end_of_text|> if bos / eos.

        By default special-token text in s ("<|eot_id|>" typed by a user) is
        encoded as plain text, so a prompt cannot forge a chat turn. Pass
        allowed_special="all" (or a set of names) to turn such text into the
        special ids, or disallowed_special="all" to raise on it.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode() takes a str, not {type(s).__name__}")
        ids = [self.bos_id] if bos else []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(s[i : i + TIKTOKEN_MAX_ENCODE_CHARS]):
                ids.extend(self.model.encode(piece, allowed_special=allowed_special,
                                             disallowed_special=disallowed_special))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, exactly: no whitespace clean-up. Bytes that don't form
        valid UTF-8 (a sequence cut inside a character) become U+FFFD."""
        return self.model.decode(list(ids))

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Decode ids as they arrive, yielding text pieces that never split a character."""
        decoder = StreamDecoder(self)
        for i in ids:
            piece = decoder.push(i)
            if piece:
                yield piece
        tail = decoder.finish()
        if tail:
            yield tail


class StreamDecoder:
    """Turns token ids, one at a time, into printable text.

    One character can span several tokens (an emoji is 4 UTF-8 bytes and is
    often 2 or 3 tokens), so decoding token by token would print broken
    characters. This keeps the bytes of an unfinished character until the
    token that completes it arrives. "".join of everything push and finish
    return equals Tokenizer.decode of all the ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.model.decode_single_token_bytes(token_id))

    def finish(self) -> str:
        """Flush what is left; an unfinished character at the very end becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


# -----------------------------------------------------------------------------
# Chat format (Llama 3 instruct models)
#
# Each message is a header with its role, a blank line, the content, and
# <|eot_id|>; a prompt ends with an open assistant header, which is where the
# model writes its answer (ended by its own <|eot_id|>):
#
#   <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n
#   You are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n
#   Hi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n
# -----------------------------------------------------------------------------


class ChatFormat:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, message: dict) -> list[int]:
        tok = self.tokenizer
        return ([tok.special_tokens["<|start_header_id|>"]] + tok.encode(message["role"], bos=False, eos=False)
                + [tok.special_tokens["<|end_header_id|>"]] + tok.encode("\n\n", bos=False, eos=False))

    def encode_message(self, message: dict) -> list[int]:
        content = self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
        return self.encode_header(message) + content + [self.tokenizer.eot_id]

    def encode_dialog_prompt(self, dialog: list[dict]) -> list[int]:
        """A whole conversation, ready for the assistant's next answer."""
        ids = [self.tokenizer.bos_id]
        for message in dialog:
            ids += self.encode_message(message)
        return ids + self.encode_header({"role": "assistant", "content": ""})
