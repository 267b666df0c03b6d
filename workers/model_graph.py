"""The structure of a causal LM, read from its module graph instead of a table of names.

`build_skeleton` instantiates the model transformers names for a config with every parameter on `meta`
(no storage) but real buffers (rotary frequencies, embedding scales: they are computed from the config and
no checkpoint holds them). `ModelGraph.of` then finds, by identity and not by name:

- the base model (`base_model`), the decoder layer list (the ModuleList of repeated blocks under it, one per
  `num_hidden_layers`), the input embeddings (`get_input_embeddings()`) and the output projection
  (`get_output_embeddings()`);
- every other child of the base model (final norm, rotary embeddings, position tables…), which the model's own
  forward runs around the layers (see loading.py: the forward runs with the layers replaced by stand-ins).

`discover_plan` finds, at run time on one small forward of a decoder layer, which Linears read the same
input tensor (one Hessian per shared input), in execution order; it also checks AWQ's norm → Linears
mappings against the data flow (the norm's output *is* the Linears' input).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from workers.awq_mappings import AwqMapping
from workers.errors import InputError, InvalidSpecError
from workers.moe import dense_linears, unfuse_experts

_META = threading.local()
_original_register_parameter = nn.Module.register_parameter


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    """nn.Module.register_parameter that moves the parameter to `meta` inside `parameters_on_meta` (this thread only)."""
    _original_register_parameter(module, name, param)
    if param is not None and getattr(_META, "active", False) and not param.is_meta:
        module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign, assignment]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built in this block (by this thread) get `meta` parameters and real buffers."""
    _META.active = True
    try:
        yield
    finally:
        _META.active = False


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers class of a decoder-only causal LM for `config`, or InvalidSpecError saying why not."""
    model_type = getattr(config, "model_type", None)
    named = list(getattr(config, "architectures", None) or [])
    # multimodal models (e.g. Qwen2.5-VL) generate text through their image-text-to-text class
    expected = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type or "") or MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(
        model_type or ""
    )
    if getattr(config, "is_encoder_decoder", False) or expected is None:
        what = ", ".join(named) or f"model type {model_type}"
        raise InvalidSpecError(
            f"architecture {what} is not supported: QuantFleet quantizes decoder-only causal language models "
            f"(…ForCausalLM, e.g. LlamaForCausalLM), and {model_type!r} is not one"
        )
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) | set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    if named and not causal & set(named):
        raise InvalidSpecError(
            f"architecture {', '.join(named)} is not supported: QuantFleet quantizes decoder-only causal language "
            f"models (…ForCausalLM, e.g. LlamaForCausalLM), and {', '.join(named)} is not one"
        )
    if named and expected not in named:
        raise InvalidSpecError(
            f"architecture {', '.join(named)} is not supported for model type {model_type!r}: its causal LM "
            f"is {expected} (e.g. LlamaForCausalLM for Llama checkpoints); is config.json consistent?"
        )
    cls = getattr(transformers, expected, None)
    if cls is None:
        raise InvalidSpecError(f"architecture {expected} is not available in transformers {transformers.__version__}")
    return cls  # type: ignore[no-any-return]


_SKELETON_LOCK = threading.Lock()


def build_skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM of `config` with meta parameters and real buffers (see module docstring).

    from_config switches torch's process-wide default dtype while it builds; threads running jobs side by
    side could otherwise leave it at fp16 for the whole process. Building in float32 under one lock keeps the
    default intact; the dtype of meta parameters is moot (weights are assigned).
    """
    cls = causal_lm_class(config)
    with _SKELETON_LOCK, parameters_on_meta():
        try:
            try:
                model = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=torch.float32)
            except ValueError:  # no sdpa for this family (e.g. Gemma-2's soft-capped attention scores)
                model = cls._from_config(copy.deepcopy(config), attn_implementation="eager", dtype=torch.float32)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise InvalidSpecError(f"cannot build {cls.__name__} from config.json: {exc}") from exc
        unfuse_experts(model, conversions(model))
    graph = ModelGraph.of(model)
    _adopt_checkpoint_names(model.get_submodule(graph.layers), graph.layers, checkpoint_renamer(model))
    return model.eval()


def conversions(model: PreTrainedModel, *, legacy: bool = True) -> list[Any]:
    """transformers' weight conversions of `model` (checkpoint → module names), as `from_pretrained` applies them."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return list(get_model_conversion_mapping(model, add_legacy=legacy) or [])


def checkpoint_renamer(model: PreTrainedModel) -> Callable[[str], str]:
    """Module name → the name transformers' `save_pretrained` writes it under (its renamings reversed); built
    once per model."""
    cached = model.__dict__.get("_qf_checkpoint_renamer")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    forward = [c for c in conversions(model, legacy=False) if not isinstance(c, PrefixChange)]
    reverse = [r for r in (c.reverse_transform() for c in forward[::-1]) if isinstance(r, WeightRenaming)]

    def rename(name: str) -> str:
        for renaming in reverse:  # as transformers' `apply_renamings` (5.2x) does; 5.17 has no such helper
            name = renaming.rename_source_key(name)[0]
        return name

    model.__dict__["_qf_checkpoint_renamer"] = rename
    return rename


def _adopt_checkpoint_names(layers: nn.Module, path: str, to_stored: Callable[[str], str]) -> None:
    """Register each decoder layer's children under the names its checkpoint uses inside the layer (Mixtral:
    `block_sparse_moe`, which transformers 5 renames `mlp` on load). The layer's forward still finds the child
    under the old attribute name (kept in the instance's __dict__); its state dict and module paths now carry
    the checkpoint's names, so layer tensors are read and written under them."""
    for index, layer in enumerate(layers.children()):
        prefix = f"{path}.{index}."
        for sub, module in list(layer.named_modules()):
            for child in list(module._modules):
                full = f"{prefix}{sub}.{child}." if sub else f"{prefix}{child}."
                stored = to_stored(full).rstrip(".").rsplit(".", 1)[-1]
                if stored != child and stored.isidentifier():
                    module._modules = {stored if k == child else k: v for k, v in module._modules.items()}
                    module.__dict__[child] = module._modules[stored]


@dataclass(frozen=True)
class ModelGraph:
    """Where the pieces of a causal LM are, as module paths of the skeleton (e.g. "model.layers")."""

    architecture: str  # the transformers class, e.g. "LlamaForCausalLM"
    model_type: str
    base: str  # the base model, e.g. "model" (GPT-NeoX: "gpt_neox")
    layers: str  # the decoder layer list, e.g. "model.layers"
    embed_tokens: str  # e.g. "model.embed_tokens"
    lm_head: str  # e.g. "lm_head" (GPT-NeoX: "embed_out")
    others: tuple[str, ...]  # the base model's other children (final norm, rotary embeddings, …)
    stored_layers: str = ""  # the checkpoint's name of the layer list (Gemma-3 multimodal: "language_model.model.layers")
    towers: tuple[str, ...] = ()  # multimodal: the modules beside the language model (vision tower, projector), dense
    stored_towers: tuple[str, ...] = ()  # … under their checkpoint names (e.g. "vision_tower")

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelGraph:
        config = model.config
        outer = model.base_model
        base = _language_model(model)
        paths = {id(m): name for name, m in model.named_modules()}
        num_layers = getattr(config.get_text_config(), "num_hidden_layers", None)
        lists = [
            (name, child)
            for name, child in base.named_children()
            if isinstance(child, nn.ModuleList) and len(child) == num_layers and len({type(m) for m in child}) == 1
        ]
        what = type(model).__name__
        if outer is model or len(lists) != 1:
            raise InvalidSpecError(
                f"architecture {what} is not supported: no single list of {num_layers} decoder layers under its base "
                "model (QuantFleet quantizes decoder-only causal language models)"
            )
        layers_name = lists[0][0]
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        if id(embed) not in paths or head is None or id(head) not in paths or not isinstance(head, nn.Linear):
            raise InvalidSpecError(f"architecture {what} is not supported: no input embeddings and Linear output head")
        base_path = paths[id(base)]
        others = tuple(f"{base_path}.{name}" for name, child in base.named_children()
                       if name != layers_name and child is not embed)
        towers = tuple(paths[id(child)] for child in outer.children() if child is not base) if base is not outer else ()
        layers = f"{base_path}.{layers_name}"
        rename = checkpoint_renamer(model)
        return cls(
            architecture=what, model_type=str(config.model_type), base=base_path, layers=layers,
            embed_tokens=paths[id(embed)], lm_head=paths[id(head)], others=others,
            stored_layers=rename(f"{layers}.").rstrip("."), towers=towers,
            stored_towers=tuple(rename(f"{tower}.").rstrip(".") for tower in towers),
        )

    def layer_prefix(self, index: int) -> str:
        """Checkpoint name prefix of decoder layer `index`, e.g. "model.layers.3." (what save_pretrained writes)."""
        return f"{self.stored_layers or self.layers}.{index}."

    def module_layer_prefix(self, index: int) -> str:
        """Module path prefix of decoder layer `index` in the model, e.g. "model.language_model.layers.3."."""
        return f"{self.layers}.{index}."


def linear_names(layer: nn.Module) -> list[str]:
    """Every quantized Linear of a decoder layer, in registration order: all of them but MoE routers and gates
    (workers.moe.dense_linears)."""
    dense = dense_linears(layer)
    return [name for name, m in layer.named_modules() if isinstance(m, nn.Linear) and name not in dense]


def _language_model(model: PreTrainedModel) -> nn.Module:
    """The module holding the decoder layers: the base model, or a multimodal model's language model."""
    base = model.base_model
    inner = getattr(base, "language_model", None) or getattr(base, "text_model", None)
    return inner if isinstance(inner, nn.Module) else base


Group = tuple[str, ...]


@dataclass(frozen=True)
class LayerPlan:
    """How one decoder layer is solved: its Linears grouped by shared input, in execution order, and the
    AWQ mappings that hold in it (each scales exactly one group)."""

    groups: tuple[Group, ...]
    awq_mappings: tuple[AwqMapping, ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantized Linear of the layer, in execution order."""
        return tuple(name for group in self.groups for name in group)

    def group_of(self, linear: str) -> Group:
        for group in self.groups:
            if linear in group:
                return group
        raise KeyError(f"{linear} is not a quantized Linear of this layer")


def discover_plan(layer: nn.Module, run: Callable[[], Any], candidates: tuple[AwqMapping, ...] = ()) -> LayerPlan:
    """Group the layer's Linears by the identity of their input tensor on one forward (`run()`), and resolve
    AWQ's `candidates`: a Linear's mapping scales the anchor's whole group; a norm's mapping scales every quantized
    Linear that reads the norm's output (the tensor or a view of it: MoE blocks reshape it) and lists the dense
    modules reading it (routers), and the anchor must be among those Linears."""
    names = linear_names(layer)
    inputs: dict[str, int] = {}
    storage: dict[str, tuple[int, ...]] = {}  # what each quantized Linear and dense weight module reads
    outputs: dict[str, tuple[int, ...]] = {}
    alive: list[Tensor] = []  # keeps every seen tensor alive, so no id or storage is reused during the forward
    handles = []
    dense = [n for n, m in layer.named_modules() if n not in names and _own_matrix(m)]
    for name in [*names, *dense]:
        def pre_hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if name not in storage and args and isinstance(args[0], Tensor):
                inputs[name], storage[name] = id(args[0]), _storage(args[0])
                alive.append(args[0])
        handles.append(layer.get_submodule(name).register_forward_pre_hook(pre_hook))
    for mapping in candidates:
        prev = _find(layer, mapping.prev)
        if prev is not None and not isinstance(prev, nn.Linear):
            def hook(_m: nn.Module, _a: Any, out: Any, name: str = mapping.prev) -> None:
                tensor = out[0] if isinstance(out, tuple) else out
                outputs.setdefault(name, _storage(tensor))
                alive.append(tensor)
            handles.append(prev.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name in names if name not in inputs]
    if unused:
        raise InputError(f"Linears {unused} of the decoder layer are never called by its forward; cannot calibrate them")
    order: dict[int, list[str]] = {}
    for name in sorted(names, key=lambda n: list(inputs).index(n)):
        order.setdefault(inputs[name], []).append(name)
    groups = tuple(tuple(group) for group in order.values())
    plan = LayerPlan(groups)
    mappings = []
    for mapping in candidates:
        if _find(layer, mapping.prev) is None or _find(layer, mapping.anchor) is None:
            continue
        linears, readers = plan.group_of(mapping.anchor), ()
        if mapping.prev in outputs:
            linears = tuple(n for n in plan.linears if storage[n] == outputs[mapping.prev])
            readers = tuple(n for n in dense if storage.get(n) == outputs[mapping.prev])
            if mapping.anchor not in linears:
                raise InputError(
                    f"AWQ mapping {mapping.prev} → {mapping.anchor} does not hold in {type(layer).__name__}: the output "
                    f"of {mapping.prev} is not the input of {mapping.anchor}; use method gptq or rtn"
                )
        mappings.append(AwqMapping(mapping.prev, mapping.anchor, mapping.parts, linears, readers))
    return LayerPlan(groups, tuple(mappings))


def _storage(tensor: Tensor) -> tuple[int, ...]:
    """What a tensor holds: the same for the tensor and any reshaped view of it."""
    return tensor.data_ptr(), tensor.numel(), tensor.element_size(), tensor.device.index or 0


def _own_matrix(module: nn.Module) -> bool:
    """A module that multiplies its input by its own `weight` matrix (a dense Linear, an MoE router)."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() == 2 and not isinstance(module, nn.Embedding)


def _find(layer: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def stored_prefixes(model: PreTrainedModel, path: str) -> list[str]:
    """Checkpoint name prefixes a module path may be saved under: the path itself, then the older names
    transformers renames on load (plain renamings only, e.g. GPT-NeoX's `embed_out.` for `lm_head.`)."""
    from transformers.conversion_mapping import extract_weight_conversions_for_model

    prefix = f"{path}."
    found = list(dict.fromkeys([checkpoint_renamer(model)(prefix), prefix]))
    for rule in extract_weight_conversions_for_model(model) or []:
        sources, targets = getattr(rule, "source_patterns", []), getattr(rule, "target_patterns", [])
        if len(sources) != 1 or len(targets) != 1:
            continue
        source, target = (p.lstrip("^").replace("\\.", ".") for p in (sources[0], targets[0]))
        if any(c in source + target for c in "()[]*+?\\|$") or not prefix.startswith(target):
            continue
        found.append(source + prefix[len(target):])
    return list(dict.fromkeys(found))
