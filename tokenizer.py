"""tokenizer.py: Llama 3's tokenizer on tiktoken, standalone, with the chat format.

Llama 3 replaced Llama 2's 32K SentencePiece vocabulary with a 128K byte-level
BPE vocabulary: OpenAI's 100K tiktoken tokens plus 28K more for other
languages. It compresses text better (about 15% fewer tokens for English), so
the same context holds more text. Tokens 0..127999 are BPE tokens; 256 special
tokens follow at 128000..128255, for 128256 ids in all (the model's vocab_size).

    tok = Tokenizer("tokenizer.model")
    ids = tok.encode("Hello world", bos=True, eos=False)  # [128000, 9906, 1917]
    tok.decode(ids)                                        # '<|begin_of_text|>Hello world'

Imports only tiktoken and the standard library.
"""

from __future__ import annotations

import base64
import codecs
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
        ranks = load_bpe_ranks(path)
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
