"""What a checkpoint needs besides its tensors so it loads as the same model: processor files and the
compressed-tensors `ignore` list of everything that stays dense.

Multimodal models (Gemma-3, Qwen2.5-VL, …): only the language model's decoder layers are quantized. Their
vision or audio towers and projectors are modules beside the language model (`ModelGraph.towers`); the engine
writes their tensors as they are stored (bit-identical in the model's dtype), calibrates with text through
the language model, and keeps the processor and preprocessor files next to the tokenizer, so the output loads
with the same processor and model class. Mixture-of-Experts layers keep their routers and gates dense.

The `ignore` list names them for the runtimes, which match it against their own module names (vLLM after its
own renaming of the checkpoint's, transformers against the model's). vLLM builds some routers as Linears that
take the checkpoint's quantization unless ignored (Qwen3-MoE's `mlp.gate`: `ReplicatedLinear(…,
quant_config=quant_config)` in vLLM 0.26), so every router and gate is listed. The entries are regular expressions
on the part of the name every naming shares — a tower's own name and what is in it (`re:(.*\\.)?vision_tower(\\..*)?$`), a dense Linear's
path inside its decoder layer (`re:.*\\.mlp\\.shared_expert_gate$`). GPTQ v1 checkpoints carry the same
expressions, and their output head, as `dynamic` negative rules (`-:<regex>`), which vLLM and GPTQModel read.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from workers.architectures import ArchitectureInfo
from workers.formats import gptq_v1

# Files of a processor (image / video / audio preprocessing, the chat template) a multimodal checkpoint ships.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "feature_extractor_config.json",
    "chat_template.json",
)


def dense_ignore(arch: ArchitectureInfo) -> list[str]:
    """`ignore` entries for the towers and the dense Linears inside decoder layers (see the module docstring)."""
    entries = [f"re:(.*\\.)?{re.escape(tower.rsplit('.', 1)[-1])}(\\..*)?$" for tower in arch.graph.towers]
    local = sorted({name.split(".", 1)[1] for name in arch.dense_in_layers} | {d for b in arch.experts for d in b.dense})
    entries += [f"re:.*\\.{re.escape(name)}$" for name in local]
    return list(dict.fromkeys(entries))


def copy_processor_files(model_dir: Path, dest: Path) -> list[str]:
    copied = []
    for name in PROCESSOR_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, dest / name)
            copied.append(name)
    return copied


def add_ignores(config_path: Path, entries: list[str], lm_head: str = "lm_head") -> None:
    """Append `entries` to a compressed-tensors checkpoint's `quantization_config.ignore`; a GPTQ v1 checkpoint
    gets them (and its output head) as `dynamic` negative rules (workers/formats/gptq_v1.py); others: as is."""
    config: dict[str, Any] = json.loads(config_path.read_text())
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return
    if entries and quantization.get("quant_method") == "gptq":
        gptq_v1.skip_dense(quantization, entries, lm_head)
    elif entries and quantization.get("quant_method") == "compressed-tensors":
        quantization["ignore"] = list(dict.fromkeys([*quantization.get("ignore", []), *entries]))
    else:
        return
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def complete_checkpoint(model_dir: Path, arch: ArchitectureInfo, dest: Path) -> None:
    """After the writer finalized `dest`: processor files copied, dense towers and routers in `ignore` (GPTQ:
    `dynamic`)."""
    copy_processor_files(model_dir, dest)
    add_ignores(dest / "config.json", dense_ignore(arch), arch.graph.lm_head.rsplit(".", 1)[-1])
