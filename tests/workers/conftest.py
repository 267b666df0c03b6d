"""Shared fixtures of the engine tests: a tiny random Llama with a tokenizer, and text files for it.

The session-scoped model directories are read-only for tests; a test that needs to break a model copies
it first (`copy_model`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_llama, write_text_corpus
from workers.spec import CalibrationSpec, EvalSpec, JobSpec, Method, OutputFormat, QuantScheme


@pytest.fixture(autouse=True)
def single_thread_for_tiny_tensors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny-model tests are thousands of microsecond-sized ops, where a second intra-op thread only adds
    synchronisation (several times slower on a busy 2-core machine). Real-model (slow) tests keep all threads."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-layer random Llama (hidden 64, GQA 4/2 heads), fp16, tied embeddings."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", num_layers=2, seed=0)


@pytest.fixture(scope="session")
def tiny_mha_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3-layer random Llama with as many KV heads as heads (AWQ's v_proj → o_proj mapping applies), bf16, untied."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("models") / "tiny-llama-mha",
        num_layers=3,
        seed=1,
        num_key_value_heads=4,
        dtype=torch.bfloat16,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("text") / "calibration.txt", n_words=6000, seed=0)


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("text") / "eval.txt", n_words=3000, seed=1)


@pytest.fixture
def copy_model(tmp_path: Path) -> Callable[[Path], Path]:
    """Copy a model directory into the test's tmp_path, so the test may damage it."""

    def copy(src: Path) -> Path:
        return Path(shutil.copytree(src, tmp_path / f"copy-of-{src.name}"))

    return copy


@pytest.fixture
def make_spec(tiny_model_dir: Path, calibration_file: Path, eval_file: Path) -> Callable[..., JobSpec]:
    """A small valid JobSpec for the tiny model; keyword arguments override fields."""

    def make(
        method: str = "gptq",
        *,
        bits: int = 4,
        group_size: int = 32,
        symmetric: bool = True,
        num_samples: int = 16,
        seq_len: int = 64,
        with_eval: bool = True,
        calibration: bool = True,
        formats: tuple[OutputFormat, ...] = (OutputFormat.COMPRESSED_TENSORS,),
        model_dir: Path | None = None,
        **overrides: object,
    ) -> JobSpec:
        return JobSpec(
            model_dir=str(model_dir or tiny_model_dir),
            method=Method(method),
            scheme=QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric),
            calibration=CalibrationSpec(
                path=str(calibration_file) if calibration else None, num_samples=num_samples, seq_len=seq_len
            ),
            eval=EvalSpec(path=str(eval_file), seq_len=64) if with_eval else None,
            formats=formats,
            **overrides,  # type: ignore[arg-type]
        )

    return make
