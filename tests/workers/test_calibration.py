from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tokenizer
from workers.calibration import (
    calibration_windows,
    eval_windows,
    read_text,
    sample_windows,
    special_prefix,
    tokenize,
)
from workers.errors import InputError
from workers.spec import CalibrationSpec

TOKENIZER = make_tokenizer()
BOS = TOKENIZER.bos_token_id


def _find(stream: torch.Tensor, window: torch.Tensor) -> int:
    """Offset of `window` as a contiguous slice of `stream` (-1 if absent)."""
    n = window.numel()
    for start in range(stream.numel() - n + 1):
        if torch.equal(stream[start : start + n], window):
            return start
    return -1


def test_jsonl_and_txt_give_the_same_text(tmp_path: Path) -> None:
    docs = ["ba be bi .", "bo bu , da"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n\n")
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    assert read_text(tmp_path / "a.jsonl") == read_text(tmp_path / "a.txt") == "ba be bi .\n\nbo bu , da"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ba"}\n{"text": "be"}\n{not json}\n', "line 3 is not valid JSON"),
        ('{"text": "ba"}\n{"body": "be"}\n', 'line 2 must be an object with a "text" string'),
        ("", "has no text"),
        ("   \n\n", "has no text"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_text(path, "calibration")


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_text(tmp_path / "none.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match="not UTF-8"):
        read_text(tmp_path / "bin.txt")


def test_calibration_windows_are_seeded_disjoint_slices_with_bos(calibration_file: Path) -> None:
    spec = CalibrationSpec(path=str(calibration_file), num_samples=12, seq_len=32, seed=3)
    windows = calibration_windows(spec, TOKENIZER)
    assert windows.shape == (12, 32) and windows.dtype == torch.long
    assert (windows[:, 0] == BOS).all()
    assert torch.equal(windows, calibration_windows(spec, TOKENIZER))  # deterministic
    other = calibration_windows(CalibrationSpec(str(calibration_file), 12, 32, seed=4), TOKENIZER)
    assert not torch.equal(windows, other)

    stream = tokenize(read_text(calibration_file), TOKENIZER)
    starts = [_find(stream, w[1:]) for w in windows]
    assert all(s >= 0 for s in starts)  # each body is a contiguous slice of the text
    assert starts == sorted(starts)
    assert all(b - a >= 31 for a, b in zip(starts, starts[1:], strict=False))  # no overlap
    assert starts[-1] > stream.numel() // 2  # spread over the text, not packed at its start


def test_sample_windows_spread_and_exact_fit() -> None:
    stream = torch.arange(100)
    exact = sample_windows(stream, 4, 25, seed=0)  # no slack: the only placement is the tiling
    assert torch.equal(exact, stream.reshape(4, 25))
    with pytest.raises(InputError, match="has 100 tokens but 5 windows of 25 tokens need 125"):
        sample_windows(stream, 5, 25, seed=0)


def test_too_little_calibration_text(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("ba be bi bo bu " * 10)
    with pytest.raises(InputError, match="calibration text has 50 tokens but 4 windows of 31 tokens need 124"):
        calibration_windows(CalibrationSpec(str(path), num_samples=4, seq_len=32), TOKENIZER)


def test_eval_windows_are_consecutive_and_drop_the_tail() -> None:
    text = " ".join(["ba", "be", "bi", "bo", "bu"] * 9)  # 45 tokens
    stream = tokenize(text, TOKENIZER)
    windows = eval_windows(text, TOKENIZER, seq_len=16)
    assert windows.shape == (3, 16)  # 45 // 15 bodies, tail of 0 dropped
    assert (windows[:, 0] == BOS).all()
    assert torch.equal(windows[:, 1:].reshape(-1), stream[:45])
    assert eval_windows(text, TOKENIZER, seq_len=16, max_windows=2).shape == (2, 16)
    with pytest.raises(InputError, match="fewer than one window"):
        eval_windows("ba be", TOKENIZER, seq_len=16)


def test_a_bos_the_tokenizer_never_adds_is_not_added() -> None:
    """GPT-2-style tokenizers (SmolLM2's) define a bos_token but never put it before plain text: windows
    follow what `add_special_tokens=True` does, not the attribute."""
    tokenizer = make_tokenizer(add_bos=False)
    assert tokenizer.bos_token_id is not None and special_prefix(tokenizer) == []
    assert special_prefix(make_tokenizer()) == [BOS]
    text = " ".join(["ba", "be", "bi", "bo"] * 10)  # 40 tokens
    windows = eval_windows(text, tokenizer, seq_len=16)
    assert windows.shape == (2, 16)
    assert torch.equal(windows.reshape(-1), tokenize(text, tokenizer)[:32])


def test_piecewise_tokenization_equals_whole_text_tokenization() -> None:
    """Long texts are tokenized in pieces to save memory; with a byte-level BPE (GPT-2 / SmolLM2 style),
    whose pre-tokenizer looks ahead across whitespace runs, the ids must still be those of the whole text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "".join(
        f"Line {i}:  the quick  brown fox,\n\n\tjumps {i * 7} times.\n   \n" + ("word " * (i % 5)) for i in range(60)
    )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    whole = tokenize(text, tokenizer, chunk_chars=10**9)
    assert whole.numel() > 200
    for size in (23, 64, 257):
        assert torch.equal(tokenize(text, tokenizer, chunk_chars=size), whole), size
