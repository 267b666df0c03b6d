"""Tiny, deterministic stand-ins for a real model and real text, for fast CPU tests.

`make_tiny_llama` writes a Hugging Face model directory (config.json, safetensors, tokenizer files) of a
random Llama small enough that a whole quantization job takes about a second. Its weights are perturbed
away from the textbook initialisation (uneven norm gains, a few large embedding channels), because
activation outliers are exactly what GPTQ and AWQ exploit and what a perfectly isotropic random model lacks.
The tokenizer is a word-level one over a fixed vocabulary, and `write_text_corpus` writes text that uses it.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u"]
WORDS = tuple(
    onset + vowel + coda
    for onset, vowel, coda in itertools.product(_ONSETS, _VOWELS, ("", "n", "r", "s"))
)[:270] + (".", ",")


def make_tokenizer(*, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer; like Llama's it puts BOS before a text (`add_special_tokens=True`) unless
    `add_bos=False` (like GPT-2's, whose `bos_token` exists but is never added)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_tiny_llama(
    directory: Path,
    num_layers: int = 2,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    dtype: torch.dtype = torch.float16,
    tie_word_embeddings: bool = True,
) -> Path:
    """Save a random Llama with a word-level tokenizer into `directory` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        initializer_range=0.05,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        outliers = torch.ones(hidden_size)
        outliers[torch.randperm(hidden_size, generator=generator)[:4]] = 8.0
        model.model.embed_tokens.weight.mul_(outliers)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.exp(0.5 * torch.randn(param.shape, generator=generator)))
    model = model.to(dtype)  # type: ignore[arg-type]  # transformers wraps `to`; mypy misreads it
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_text_corpus(path: Path, n_words: int, seed: int = 0) -> Path:
    """Sentences of Zipf-distributed words from the tiny tokenizer's vocabulary (no unknown tokens)."""
    rng = random.Random(seed)
    words = WORDS[:-2]
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    out: list[str] = []
    while len(out) < n_words:
        sentence = rng.choices(words, weights=weights, k=rng.randint(4, 14))
        out.extend(sentence)
        out.append(rng.choice((".", ",")))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(out[:n_words]) + "\n", encoding="utf-8")
    return path


def wait_until_up(url: str, server: subprocess.Popen[bytes], timeout: float, what: str,
                  log: Callable[[], str] = lambda: "") -> None:
    """Until GET `url` answers 200; fails if `server` exits first or `timeout` seconds pass (with `log()`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up\n{log()}")
        time.sleep(0.2)
