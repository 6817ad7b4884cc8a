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

import ast
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
            got = line[:60].decode(errors="replace")
            raise TokenizerError(f"{path} line {lineno}: expected '<base64 token> <rank>', got {got!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except ValueError:
            got = parts[0][:60].decode(errors="replace")
            raise TokenizerError(f"{path} line {lineno}: invalid base64 {got!r}") from None
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
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
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
#
# Tool calls (Llama 3.1+): an assistant message may call tools and end with
# <|eom_id|> ("run it, then let me go on") instead of <|eot_id|>; the tool's
# output comes back as a message of the role ipython. Built-in tools are
# written as brave_search.call(query="..."), or, for code_interpreter, as the
# code after <|python_tag|>. Custom functions are written in one of three ways
# (TOOL_FORMATS). Messages are dicts:
#
#   {"role": "user" | "system" | "ipython" ("tool" too) | "assistant", "content": "..."}
#   {"role": "assistant", "content": "", "stop": "eom" (or "eot", the default),
#    "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
#
# Token ids equal Meta's llama-models ChatFormat (chat_format.py, tool_utils.py)
# except where its tool_utils is plainly wrong, marked "llama-models" below. One
# difference in layout: text content is stripped of surrounding whitespace, as
# Meta's llama3 repo and Hugging Face's chat template do; llama-models keeps it.
# -----------------------------------------------------------------------------

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
# json: {"type": "function", "name": ..., "parameters": {...}} (3.1, 3.3); function_tag:
# <function=name>{...}</function> (3.1's alternative); python_list: [f(a=1), g(b="x")] (3.2 1B/3B).
TOOL_FORMATS = ("json", "function_tag", "python_list")
# What decode_assistant_message reads as calls by default: every format, as llama-models does. A conversation
# reads only what it offered (its tool format, and "builtin": brave_search.call(query=...) and <|python_tag|> code).
ALL_CALL_FORMATS = (*TOOL_FORMATS, "builtin")


def python_literal(value) -> str:
    """value written as a Python literal, for the python_list format.

    llama-models writes strings as "{value}" unescaped (a quote inside breaks the
    call) and dicts as {k=v}, which is not Python; JSON's string escapes are valid
    Python, so strings and dicts are written as JSON writes them, the rest as Python.
    """
    if isinstance(value, (str, dict)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return f"[{', '.join(python_literal(v) for v in value)}]"
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    raise ValueError(f"tool call argument {value!r}: not a JSON value")


def encode_tool_calls(calls: list[dict], tool_format: str) -> str:
    """The text of an assistant message's tool calls (after <|python_tag|> for code_interpreter)."""
    if tool_format not in TOOL_FORMATS:
        raise ValueError(f"tool_format {tool_format!r}: expected one of {', '.join(TOOL_FORMATS)}")
    text, custom = "", []
    for call in calls:
        name, args = call["name"], call.get("arguments", {})
        if name == "code_interpreter":
            text += args["code"]
        elif name in BUILTIN_TOOLS:  # llama-models writes query="{query}" unescaped: a quote in it breaks the call
            text += f"{name}.call(query={json.dumps(args['query'], ensure_ascii=False)})"
        elif tool_format == "python_list":
            custom.append(f"{name}({', '.join(f'{k}={python_literal(v)}' for k, v in args.items())})")
        elif tool_format == "json":
            text += json.dumps({"type": "function", "name": name, "parameters": args})
        else:
            text += f"<function={name}>{json.dumps(args)}</function>"
    # llama-models writes each call as a list of its own ([f(a=1)][g(b=2)]); one list holds all.
    return text + (f"[{', '.join(custom)}]" if custom else "")


def parse_python_list(text: str) -> list[dict] | None:
    """[f(a=1), g(b="x")] -> calls, or None if text is not such a list of literal keyword calls.

    Read with ast, never run: a call's arguments must be literals (ast.literal_eval).
    llama-models returns only the first call; the 3.2 format has several natively.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
                return None
            calls.append({"name": node.func.id, "arguments": {k.arg: ast.literal_eval(k.value) for k in node.keywords}})
        if not all(k.arg is not None for n in tree.elts for k in n.keywords):
            return None
        return calls if all(is_json_object(c["arguments"]) for c in calls) else None  # not {"Paris"}, a set
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None


def is_json_object(value) -> bool:
    """Whether value is a dict that JSON carries as it is: string keys, and values JSON has (no set, tuple,
    bytes or complex number, which a Python literal can be)."""
    try:
        return isinstance(value, dict) and json.loads(json.dumps(value)) == value
    except (TypeError, ValueError, RecursionError):
        return False


def parse_tool_calls(text: str, python_tag: bool, formats: Collection[str] = ALL_CALL_FORMATS) -> list[dict]:
    """The tool calls in an assistant message's text, in llama-models' order of tries; [] for none.
    formats: the ways of calling to read (ALL_CALL_FORMATS' names); text in any other shape is an answer."""
    calls = []
    decoder = json.JSONDecoder()
    for m in re.finditer(r"<function=([^>]+)>", text) if "function_tag" in formats else ():
        # llama-models matches the arguments with {.*?}, which ends at the first "}" (nested
        # arguments fail), and swaps ' for " first (an apostrophe in a value breaks it);
        # reading one JSON value from the "{" has neither problem.
        try:
            args, _ = decoder.raw_decode(text, m.end())
        except (ValueError, RecursionError):
            continue
        if is_json_object(args):
            calls.append({"name": m.group(1), "arguments": args})
    if not calls and "json" in formats:
        try:
            body = json.loads(text)
        except (ValueError, RecursionError):
            body = None
        # llama-models also takes {"type": "function"} without a name, and fails on it.
        # The arguments must be an object: "parameters": "weather" or null is an answer, not a call.
        if (isinstance(body, dict) and isinstance(body.get("name"), str)
                and is_json_object(body.get("parameters", {}))):
            calls = [{"name": body["name"], "arguments": body.get("parameters", {})}]
    calls = calls or ("python_list" in formats and parse_python_list(text)) or []
    for call in calls:  # a built-in tool written as a custom call: its first value is the query (or code)
        if call["name"] in BUILTIN_TOOLS:
            key = "code" if call["name"] == "code_interpreter" else "query"
            value = next(iter(call["arguments"].values()), "")
            call["arguments"] = {key: value if isinstance(value, str) else json.dumps(value)}
    if calls or "builtin" not in formats:
        return calls
    m = re.search(r"\b(\w+)\.call\(query=", text)
    if m:  # the query as encode_tool_calls writes it (a JSON string), else as llama-models does ("..." unescaped)
        try:
            query, end = decoder.raw_decode(text, m.end())
        except ValueError:
            query = None
        if isinstance(query, str) and text.startswith(")", end):
            return [{"name": m.group(1), "arguments": {"query": query}}]
        m = re.search(r'\b(\w+)\.call\(query="([^"]*)"\)', text)
        if m:
            return [{"name": m.group(1), "arguments": {"query": m.group(2)}}]
    return [{"name": "code_interpreter", "arguments": {"code": text}}] if python_tag else []


# The prompts that offer tools, laid out as Meta's prompt-format documents show them
# (llama-models' llama3_1/prompt_format.md and llama3_2/text_prompt_format.md).
# A function is {"name", "description", "parameters": {name: {"param_type": "int",
# "description", "required", "default"}}}, llama-models' ToolParamDefinition.
JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array",
              "dict": "object"}
FUNCTION_TAG_RULES = """Think very carefully before calling functions.
If you choose to call a function ONLY reply in the following format with no prefix or suffix:

<function=example_function_name>{"example_name": "example_value"}</function>

Reminder:
- If looking for real time information use relevant functions before falling back to brave_search
- Function calls MUST follow the specified format, start with <function= and end with </function>
- Required parameters MUST be specified
- Only call one function at a time
- Put the entire function call reply on one line"""
PYTHON_LIST_RULES = """You are an expert in composing functions. You are given a question and a set of possible functions.
Based on the question, you will need to make one or more function/tool calls to achieve the purpose.
If none of the function can be used, point it out. If the given question lacks the parameters required by the function,
also point it out. You should only return the function call in tools call sections.

If you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]
You SHOULD NOT include any other text in the response.

Here is a list of functions in JSON format that you can invoke.

"""  # noqa: E501 (llama-models' text, verbatim)


def tool_prompt(functions: list[dict], tool_format: str, builtin_tools: bool = False, system: str | None = None,
                today: str = "") -> list[dict]:
    """The messages that open a conversation offering these functions (and the built-in tools).

    json and function_tag (3.1, 3.3): a system message "Environment: ipython", the
    dates and your system text, then a user message that lists the functions.
    python_list (3.2 1B/3B): one system message with the rules and the list. today:
    "21 September 2024" as the documents write it.
    """
    if tool_format not in TOOL_FORMATS:
        raise ValueError(f"tool_format {tool_format!r}: expected one of {', '.join(TOOL_FORMATS)}")
    env = "Environment: ipython\nTools: brave_search, wolfram_alpha" if builtin_tools else "Environment: ipython\n"
    head = f"{env}\nCutting Knowledge Date: December 2023\nToday Date: {today}"
    if tool_format == "python_list":
        defs = [{"name": f["name"], "description": f["description"], "parameters": {
            "type": "dict", "required": [n for n, p in f["parameters"].items() if p.get("required", True)],
            "properties": {n: {"type": JSON_TYPES.get(p["param_type"], p["param_type"]), "description":
                               p.get("description", ""), **({"default": p["default"]} if "default" in p else {})}
                           for n, p in f["parameters"].items()}}} for f in functions]
        parts = [head] * builtin_tools + [PYTHON_LIST_RULES + json.dumps(defs, indent=4)] * bool(functions)
        return [{"role": "system", "content": "\n\n".join(parts + [system] * bool(system))}]
    messages = [{"role": "system", "content": head + (f"\n\n{system}" if system else "")}]
    if not functions:
        return messages
    if tool_format == "function_tag":
        listed = "".join(f"Use the function '{f['name']}' to '{f['description']}':\n" + json.dumps(
            {"name": f["name"], "description": f["description"], "parameters": f["parameters"]}) + "\n\n"
            for f in functions)
        text = f"You have access to the following functions:\n\n{listed}{FUNCTION_TAG_RULES}"
    else:
        listed = "\n".join(json.dumps({"type": "function", "function": {
            "name": f["name"], "description": f["description"], "parameters": {
                "type": "object", "properties": [{n: {"type": JSON_TYPES.get(p["param_type"], p["param_type"]),
                                                      "description": p.get("description", "")}}
                                                 for n, p in f["parameters"].items()],
                "required": [n for n, p in f["parameters"].items() if p.get("required", True)]}}}, indent=4)
            for f in functions)
        text = ("Answer the user's question by making use of the following functions if needed.\n"
                "If none of the function can be used, please say so.\nHere is a list of functions in JSON "
                f"format:\n{listed}\n\nReturn function calls in JSON format.")
    return [*messages, {"role": "user", "content": text}]


class ChatFormat:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, message: dict) -> list[int]:
        tok, role = self.tokenizer, "ipython" if message["role"] == "tool" else message["role"]
        return ([tok.special_tokens["<|start_header_id|>"]] + tok.encode(role, bos=False, eos=False)
                + [tok.special_tokens["<|end_header_id|>"]] + tok.encode("\n\n", bos=False, eos=False))

    def encode_message(self, message: dict, tool_format: str = "json") -> list[int]:
        tok, calls = self.tokenizer, message.get("tool_calls") or []
        ids = self.encode_header(message)
        if calls and calls[0]["name"] == "code_interpreter":
            ids.append(tok.special_tokens["<|python_tag|>"])
        # OpenAI's shape for an assistant message that only calls tools has content None.
        ids += tok.encode((message.get("content") or "").strip(), bos=False, eos=False)
        if calls:
            ids += tok.encode(encode_tool_calls(calls, tool_format), bos=False, eos=False)
        return ids + [tok.eom_id if message.get("stop") == "eom" else tok.eot_id]

    def encode_dialog_prompt(self, dialog: list[dict], tool_format: str = "json") -> list[int]:
        """A whole conversation, ready for the assistant's next answer."""
        ids = [self.tokenizer.bos_id]
        for message in dialog:
            ids += self.encode_message(message, tool_format)
        return ids + self.encode_header({"role": "assistant", "content": ""})

    def decode_assistant_message(self, tokens: list[int], formats: Collection[str] = ALL_CALL_FORMATS) -> dict:
        """An answer's tokens -> {"role": "assistant", "content", "tool_calls", "stop"}.

        stop is "eom" or "eot" by the last token, None when generation ended without
        either. With tool calls, content is "" (as llama-models does: text around a call is
        the call's wrapping, not an answer). formats: the ways of calling that were offered
        (parse_tool_calls); () reads no calls, as in a conversation that offered no tools.
        """
        tok, stop = self.tokenizer, None
        if tokens and tokens[-1] in (tok.eom_id, tok.eot_id):
            stop, tokens = ("eom" if tokens[-1] == tok.eom_id else "eot"), tokens[:-1]
        python_tag = bool(tokens) and tokens[0] == tok.special_tokens["<|python_tag|>"]
        text = tok.decode(tokens[python_tag:]).strip(" ")
        calls = parse_tool_calls(text, python_tag, formats) if formats else []
        return {"role": "assistant", "content": "" if calls else text, "tool_calls": calls, "stop": stop}
