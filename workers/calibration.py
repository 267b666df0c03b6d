"""Text files → token windows, for calibration (random, seeded) and evaluation (consecutive).

Files: `.jsonl` is one JSON object per line with a "text" string (records are joined by a blank line);
any other suffix is read as plain UTF-8 text. Both become one token stream.

Calibration takes `num_samples` windows at random *non-overlapping* offsets of that stream, chosen
deterministically from the seed, so the same job always sees the same tokens. A stream too short for
that many disjoint windows is an error (overlapping windows would silently weight some text twice).
Every window starts with the special tokens the tokenizer itself puts before a text
(`add_special_tokens=True`: BOS for Llama-2/3, Mistral, Gemma; nothing for GPT-2-style tokenizers such as
SmolLM2's, whose `bos_token` is a chat marker it never adds to plain text), then text tokens up to
`seq_len`. A token the model treats as an attention sink carries huge activations; putting one where the
model never sees it in use would let it dominate the calibration statistics.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from workers.errors import InputError
from workers.spec import CalibrationSpec

TOKENIZE_CHUNK_CHARS = 1 << 18
TOKENIZE_BATCH_PIECES = 16  # pieces per tokenizer call: its encoding threads' work, ~4 MB of text at a time


def read_text(path: str | Path, role: str = "text") -> str:
    """The file's text; JSONL records joined by blank lines. Errors name the file and the bad line."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{role} file {file} does not exist")
    try:
        raw = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{role} file {file} is not UTF-8 text: {exc}") from exc
    if file.suffix.lower() == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{role} file {file} line {number} is not valid JSON: {exc.msg}") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(f'{role} file {file} line {number} must be an object with a "text" string')
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise InputError(f"{role} file {file} has no text")
    return raw


SAFE_CUT = re.compile(r"(?<=\S)\n")  # a newline that starts its whitespace run


def _pieces(text: str, size: int) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut where a whitespace run with a newline starts.

    Byte-level BPE pre-tokenizers (GPT-2, SmolLM2) split a whitespace run depending on what follows it, but
    never join it with the text before it; so a piece that ends on a non-space character and a next piece
    that starts with the whole run give exactly the tokens of the whole text. Text with no such newline
    within `size` characters is cut at the next one after (or not at all).
    """
    pieces, start = [], 0
    while start < len(text):
        limit = start + size
        cut = len(text)
        if limit < len(text):
            cut = text.rfind("\n", start + 1, limit)
            while cut > start and text[cut - 1].isspace():
                cut = text.rfind("\n", start + 1, cut)
            if cut <= start:
                later = SAFE_CUT.search(text, limit)
                cut = later.start() if later else len(text)
        pieces.append(text[start:cut])
        start = cut
    return pieces


def tokenize(text: str, tokenizer: PreTrainedTokenizerBase, *, chunk_chars: int = TOKENIZE_CHUNK_CHARS) -> Tensor:
    """The whole text as one 1-D token stream, without special tokens.

    Tokenized in pieces (see `_pieces`): a tokenizer call keeps strings and offsets for every token, which for
    a corpus of megabytes costs hundreds of MB, while the ids alone take 8 bytes a token. The pieces go to the
    tokenizer TOKENIZE_BATCH_PIECES at a time: a fast (Rust) tokenizer encodes a batch on all cores.
    """
    pieces = _pieces(text, chunk_chars)
    streams: list[Tensor] = []
    for first in range(0, len(pieces), TOKENIZE_BATCH_PIECES):
        batch = pieces[first : first + TOKENIZE_BATCH_PIECES]
        ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        streams.extend(torch.tensor(piece_ids, dtype=torch.long) for piece_ids in ids)
    return torch.cat(streams) if streams else torch.zeros(0, dtype=torch.long)


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids the tokenizer puts before a text when asked to add special tokens (often [BOS], often [])."""
    probe = "Hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return [int(t) for t in full[:start]]
    return []


def _with_prefix(windows: Tensor, prefix: list[int]) -> Tensor:
    if not prefix:
        return windows
    head = torch.tensor(prefix, dtype=torch.long).expand(windows.shape[0], len(prefix))
    return torch.cat([head, windows], dim=1)


def _body_length(seq_len: int, prefix: list[int]) -> int:
    body = seq_len - len(prefix)
    if body < 1:
        raise InputError(f"seq_len {seq_len} leaves no room for text after the tokenizer's special tokens")
    return body


def sample_windows(stream: Tensor, num_samples: int, length: int, seed: int) -> Tensor:
    """`num_samples` disjoint slices of `length` tokens at seeded random offsets, in stream order.

    The slack (tokens not covered by any window) is split into num_samples + 1 random gaps, so every
    placement of disjoint windows is possible and windows are spread over the whole text.
    """
    needed = num_samples * length
    if stream.numel() < needed:
        raise InputError(
            f"calibration text has {stream.numel()} tokens but {num_samples} windows of {length} tokens need "
            f"{needed}; provide more text or lower num_samples / seq_len"
        )
    slack = stream.numel() - needed
    generator = torch.Generator().manual_seed(seed)
    gaps = torch.sort(torch.randint(0, slack + 1, (num_samples,), generator=generator)).values
    starts = gaps + torch.arange(num_samples) * length
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def calibration_windows(spec: CalibrationSpec, tokenizer: PreTrainedTokenizerBase) -> Tensor:
    """Token ids `[num_samples, seq_len]` for calibration, deterministic in (file, tokenizer, seed)."""
    if spec.path is None:
        raise InputError("no calibration file was given")
    stream = tokenize(read_text(spec.path, "calibration"), tokenizer)
    prefix = special_prefix(tokenizer)
    body = sample_windows(stream, spec.num_samples, _body_length(spec.seq_len, prefix), spec.seed)
    return _with_prefix(body, prefix)


def eval_windows(text: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, max_windows: int | None = None) -> Tensor:
    """Consecutive non-overlapping windows `[n, seq_len]` (paper protocol), the short tail dropped; each
    starts with the tokenizer's own special prefix, as calibration windows do."""
    stream = tokenize(text, tokenizer)
    prefix = special_prefix(tokenizer)
    body = _body_length(seq_len, prefix)
    count = stream.numel() // body
    if count == 0:
        raise InputError(f"evaluation text has {stream.numel()} tokens, fewer than one window of {body}")
    if max_windows is not None:
        count = min(count, max_windows)
    return _with_prefix(stream[: count * body].reshape(count, body), prefix)
