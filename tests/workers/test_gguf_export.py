"""GGUF files end to end on tiny models: transformers' GGUF loader (an independent reader built on the `gguf`
package's dequantizers, which also undoes llama.cpp's q/k permutation) gives back exactly our dequantized
weights; the Q4_K_M recipe matches llama.cpp's rule; GPTQ on the grid beats RTN on the model's outputs;
architectures llama.cpp does not know are refused with what to change; and, where llama-cpp-python is
installed, llama.cpp itself loads the file and its perplexity matches ours within 1 %."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from workers.errors import InvalidSpecError
from workers.formats import gguf as gguf_format
from workers.gguf_export import export_gguf

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = (
    "to be or not to be that is the question whether tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune or to take arms against a sea of troubles and by opposing end them 0123456789 "
) * 20


def bpe_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer and decoder) trained on TEXT, with chat tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([TEXT], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(directory: Path, family: str = "llama", hidden: int = 256, tied: bool = True) -> Path:
    """A random 2-layer model whose rows are whole 256-blocks (K-quants apply) or not (hidden 96)."""
    tokenizer = bpe_tokenizer()
    config_class = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "phi3": "Phi3Config",
                    "gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig"}[family]
    head = {"head_dim": hidden // 4} if family in ("qwen3", "gemma") else {}
    if family in ("gemma2", "gemma3"):  # llama.cpp scales queries by 1/√head_dim
        head = {"head_dim": hidden // 4, "query_pre_attn_scalar": hidden // 4, "sliding_window": 16}
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **head,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def calibration(model_dir: Path, samples: int = 8, length: int = 64) -> torch.Tensor:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer(TEXT)["input_ids"])
    return torch.stack([ids[i * length : (i + 1) * length] for i in range(samples)])


def read_back(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"])
def test_transformers_gguf_loader_reads_exactly_our_weights(tmp_path: Path, family: str) -> None:
    # transformers' GGUF loader takes Qwen3's head_dim from its config default (128), not from the file
    model_dir = tiny_model(tmp_path / "model", family, hidden=512 if family == "qwen3" else 256, tied=family != "qwen2")
    path = tmp_path / "out" / "model-Q4_K_M.gguf"
    path.parent.mkdir()
    result = export_gguf(model_dir, path, "Q4_K_M", method="gptq", calibration=calibration(model_dir))
    state = read_back(path)
    for name, ours in result.dequantized.items():
        assert torch.equal(state[name].view(torch.int32), ours.view(torch.int32)), name
    # what the evaluation scores: the file read back by gguf's dequantizers under the Hugging Face names
    from_file = result.read_back().tensors("", torch.device("cpu"))
    assert from_file.keys() == result.dequantized.keys()  # 9 a layer, embedding, norm; + qwen2's q/k/v biases,
    # lm_head; qwen3's q/k norms; phi3: fused qkv_proj and gate_up_proj (6 a layer); gemma2: 4 norms a layer (stored
    # as 1 + w, read back as w: transformers subtracts the 1 as we do); gemma3: and q/k norms
    assert len(from_file) == {"llama": 20, "qwen2": 20 + 6 + 1, "qwen3": 20 + 4, "phi3": 14, "gemma2": 24,
                              "gemma3": 28}[family]
    for name, ours in result.dequantized.items():
        assert torch.equal(from_file[name].view(torch.int32), ours.view(torch.int32)), name
    # the recipe: Q6_K for attn_v (a fused attn_qkv) / ffn_down of the layers llama.cpp's use_more_bits picks (layer 1
    # of 2), the output matrix Q6_K (the token embedding when tied), everything else Q4_K, norms F32
    types = result.tensor_types
    if family == "phi3":
        assert types["blk.0.attn_qkv.weight"] == "Q4_K" and types["blk.1.attn_qkv.weight"] == "Q6_K"
        assert types["blk.0.ffn_up.weight"] == "Q4_K"
    else:
        assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"
        assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["output.weight" if family == "qwen2" else "token_embd.weight"] == "Q6_K"
    assert ("output.weight" in types) == (family == "qwen2")
    assert 4.5 < result.bits_per_weight < 6.0


def test_metadata_tokenizer_and_chat_template(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path / "model")
    path = tmp_path / "model-Q8_0.gguf"
    export_gguf(model_dir, path, "Q8_0")
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    assert fields[gguf.Keys.General.ARCHITECTURE] == "llama"
    assert fields[gguf.Keys.General.FILE_TYPE] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields[gguf.Keys.LLM.BLOCK_COUNT.format(arch="llama")] == 2
    assert fields[gguf.Keys.Attention.HEAD_COUNT_KV.format(arch="llama")] == config["num_key_value_heads"]
    assert fields[gguf.Keys.Tokenizer.MODEL] == "gpt2" and fields[gguf.Keys.Tokenizer.PRE] == "gpt-2"
    assert fields[gguf.Keys.Tokenizer.CHAT_TEMPLATE] == CHAT_TEMPLATE
    assert fields[gguf.Keys.Tokenizer.BOS_ID] == tokenizer.bos_token_id
    assert fields[gguf.Keys.Tokenizer.LIST][: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert fields[gguf.Keys.Tokenizer.TOKEN_TYPE][1] == gguf.TokenType.CONTROL
    # transformers rebuilds the same tokenizer from the file's metadata alone
    from_file = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert from_file(TEXT[:200])["input_ids"] == tokenizer(TEXT[:200])["input_ids"]


def _logits(state: dict[str, torch.Tensor], model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    with torch.no_grad():
        return model(ids).logits


def test_gptq_on_the_gguf_grid_beats_rtn_on_the_model_output(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path / "model")
    calib = calibration(model_dir, samples=12)
    rtn = export_gguf(model_dir, tmp_path / "rtn.gguf", "Q4_0")
    gptq = export_gguf(model_dir, tmp_path / "gptq.gguf", "Q4_0", method="gptq", calibration=calib[:8])
    original = {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}
    ids = calib[8:]
    reference = _logits(original, model_dir, ids)
    error = {name: float((_logits(r.dequantized, model_dir, ids) - reference).square().mean())
             for name, r in (("rtn", rtn), ("gptq", gptq))}
    assert error["gptq"] < 0.8 * error["rtn"]


def test_awq_on_the_gguf_grid_folds_into_the_file_and_beats_rtn(tmp_path: Path) -> None:
    """AWQ's scales searched on the GGUF block types and folded (the file's norms change, llama.cpp's rules round
    the scaled weights): on a model with outlier input channels its output error is below RTN's."""
    model_dir = tiny_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # four outlier channels in the residual stream, as trained models have
        model.get_input_embeddings().weight[:, [3, 50, 101, 200]] *= 8.0
    model.save_pretrained(model_dir)
    calib = calibration(model_dir, samples=12)
    original = {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}
    ids = calib[8:]
    reference = _logits(original, model_dir, ids)
    error = {}
    for method in ("rtn", "awq"):
        result = export_gguf(model_dir, tmp_path / f"{method}.gguf", "Q4_0", method=method,  # type: ignore[arg-type]
                             calibration=calib[:8])
        error[method] = float((_logits(result.dequantized, model_dir, ids) - reference).square().mean())
        state = read_back(tmp_path / f"{method}.gguf")
        for name, ours in result.dequantized.items():  # transformers' GGUF loader reads exactly what we scored
            assert torch.equal(state[name].view(torch.int32), ours.view(torch.int32)), name
        norm = result.dequantized["model.layers.0.input_layernorm.weight"]
        assert torch.equal(norm, original["model.layers.0.input_layernorm.weight"]) == (method == "rtn")
    assert error["awq"] < 0.9 * error["rtn"], error


def test_rows_that_are_not_whole_super_blocks_fall_back_like_llama_cpp(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path / "model", hidden=96)
    result = export_gguf(model_dir, tmp_path / "m.gguf", "Q4_K_M")
    types = result.tensor_types
    assert types["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K → Q5_0
    assert types["blk.1.attn_v.weight"] == "Q8_0"  # Q6_K → Q8_0
    assert types["token_embd.weight"] == "Q8_0"  # the (tied) output: rows of 96 are no 256-blocks


def test_the_k_quant_mixes_follow_llama_cpp() -> None:
    """llama_tensor_get_type for 16 layers: use_more_bits picks layers 0, 1, 4, 7, 10, 13, 14, 15; Q4_K_S raises
    attn_v of the first four layers and ffn_down of the first eighth to Q5_K; a fused attn_qkv follows attn_v; the
    untied output matrix Q6_K. (Small models: llama-quantize's own choices, in the llama.cpp tests below.)"""
    def types(file_type: str, model_type: str = "llama") -> dict[str, list[str]]:
        recipe = gguf_format.Recipe.for_config({"model_type": model_type, "num_hidden_layers": 16}, file_type)
        names = {"attn_v": "self_attn.v_proj", "ffn_down": "mlp.down_proj", "attn_q": "self_attn.q_proj",
                 "attn_qkv": "self_attn.qkv_proj"}
        found: dict[str, list[str]] = {}
        for short, hf in names.items():
            if model_type == "phi3" and short in ("attn_v", "attn_q") or model_type != "phi3" and short == "attn_qkv":
                continue
            for layer in range(16):
                target = recipe.target(f"model.layers.{layer}.{hf}.weight", (512, 512))
                assert target is not None and target.block is not None
                found.setdefault(short, []).append(target.block.name)
        output = recipe.target("lm_head.weight", (300, 512))
        assert output is not None and output.block is not None
        found["output"] = [output.block.name]
        return found

    more = {0, 1, 4, 7, 10, 13, 14, 15}
    m4 = types("Q4_K_M")
    assert m4["attn_v"] == m4["ffn_down"] == ["Q6_K" if i in more else "Q4_K" for i in range(16)]
    assert set(m4["attn_q"]) == {"Q4_K"} and m4["output"] == ["Q6_K"]
    m5 = types("Q5_K_M")
    assert m5["attn_v"] == m5["ffn_down"] == ["Q6_K" if i in more else "Q5_K" for i in range(16)]
    assert set(m5["attn_q"]) == {"Q5_K"}
    s4 = types("Q4_K_S")
    assert s4["attn_v"] == ["Q5_K"] * 4 + ["Q4_K"] * 12 and s4["ffn_down"] == ["Q5_K"] * 2 + ["Q4_K"] * 14
    assert set(types("Q5_K_S")["ffn_down"]) == {"Q5_K"}
    assert types("Q4_K_M", "phi3")["attn_qkv"] == m4["attn_v"] and types("Q4_K_S", "phi3")["attn_qkv"] == s4["attn_v"]


@pytest.mark.parametrize(
    ("model_type", "message"),
    [("opt", "llama.cpp does not know the architecture 'opt'"),
     ("made_up", "llama.cpp does not know"),
     ("olmo2", "not implemented yet")],
)
def test_architectures_llama_cpp_does_not_know_are_refused(model_type: str, message: str) -> None:
    config = {"model_type": model_type, "architectures": ["X"], "num_hidden_layers": 2, "hidden_size": 64}
    with pytest.raises(InvalidSpecError, match=message):
        gguf_format.check_model(config, "Q4_K_M")


def test_rope_scaling_and_bad_types_are_refused() -> None:
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(InvalidSpecError, match="RoPE scaling 'llama3'"):
        gguf_format.check_model(config, "Q4_0")
    with pytest.raises(InvalidSpecError, match="gguf:Q4_K_M"):
        gguf_format.parse_format("gguf:Q3_Z")
    assert gguf_format.parse_format("gguf:q4_k_m") == "Q4_K_M"


@pytest.mark.parametrize(("change", "message"), [
    ({"query_pre_attn_scalar": 144}, "1/√head_dim"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "every 6th layer global"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "RoPE scaling 'linear'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 5e4}}}, "RoPE base 10000"),
])
def test_gemma_settings_llama_cpp_hard_codes_are_checked(change: dict[str, object], message: str) -> None:
    """What llama.cpp's Gemma-3 graph fixes in code instead of reading it from the file: a model that differs is
    refused at submit, saying what, rather than written into a file llama.cpp would run differently."""
    config = transformers.Gemma3TextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                           query_pre_attn_scalar=64).to_dict()
    gguf_format.check_model(config, "Q4_K_M")  # as built: accepted
    with pytest.raises(InvalidSpecError, match=message):
        gguf_format.check_model(config | change, "Q4_K_M")
    gemma2 = transformers.Gemma2Config(num_hidden_layers=2, head_dim=64, query_pre_attn_scalar=64).to_dict()
    gguf_format.check_model(gemma2, "Q8_0")
    with pytest.raises(InvalidSpecError, match="soft-caps"):
        gguf_format.check_model(gemma2 | {"attn_logit_softcapping": None}, "Q8_0")


def tiny_moe_model(directory: Path, family: str, experts: int = 4) -> Path:
    """A random 2-layer Qwen-MoE (qwen2_moe: with a shared expert and its gate) or Mixtral whose rows are whole
    256-blocks."""
    tokenizer = bpe_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=256, num_experts_per_tok=2, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    qwen = dict(intermediate_size=512, moe_intermediate_size=256, num_experts=experts)
    if family == "mixtral":  # llama.cpp files it under "llama", with experts
        config: transformers.PretrainedConfig = transformers.MixtralConfig(
            intermediate_size=256, num_local_experts=experts, tie_word_embeddings=False, **common)
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(head_dim=64, norm_topk_prob=True, tie_word_embeddings=True, **qwen,
                                             **common)
    else:  # llama.cpp's qwen2moe reads its own output matrix, as the real models have
        config = transformers.Qwen2MoeConfig(shared_expert_intermediate_size=512, tie_word_embeddings=False, **qwen,
                                             **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name:
                param.normal_(0.0, 0.08)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _moe_logits(state: dict[str, torch.Tensor], model_dir: Path, ids: torch.Tensor, tmp: Path) -> torch.Tensor:
    """transformers' own MoE forward over per-expert weights: saved as the family's checkpoints store them, loaded
    by transformers (which fuses the experts into its [experts, …] parameters itself)."""
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_dir / "config.json", tmp / "config.json")
    save_file({name: tensor.float().contiguous() for name, tensor in state.items()}, str(tmp / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("family", "experts"), [("qwen3_moe", 4), ("qwen2_moe", 8), ("mixtral", 8)])
def test_moe_experts_are_stacked_as_llama_cpp_reads_them(tmp_path: Path, family: str, experts: int) -> None:
    """Each layer's experts become one [experts, out, in] tensor per projection (`ffn_{gate,up,down}_exps`), the
    routers and the shared-expert gate stay F32; what the file decodes to, split back per expert, is exactly what
    we quantized and scored."""
    model_dir = tiny_moe_model(tmp_path / "model", family, experts)
    calib = calibration(model_dir, samples=8)
    result = export_gguf(model_dir, tmp_path / "m.gguf", "Q4_K_M", method="gptq", calibration=calib)
    reader = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert list(reader["blk.0.ffn_gate_exps.weight"].shape) == [256, 256, experts]  # ggml's order: in, out, experts
    assert list(reader["blk.1.ffn_down_exps.weight"].shape) == [256, 256, experts]
    assert result.tensor_types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert result.tensor_types["blk.0.ffn_up_exps.weight"] == "Q4_K"
    assert result.tensor_types["blk.1.ffn_down_exps.weight"] == "Q6_K"  # use_more_bits, as for a dense ffn_down
    if family == "qwen2_moe":
        assert result.tensor_types["blk.0.ffn_gate_inp_shexp.weight"] == "F32"
    if experts == 8:
        assert result.tensor_types["blk.0.attn_v.weight"] == "Q8_0"  # llama.cpp's rule for 8-expert models
    from_file = result.read_back().tensors("", torch.device("cpu"))
    assert from_file.keys() == result.dequantized.keys()
    assert sum(".experts." in k for k in from_file) == 2 * 3 * experts
    for name, ours in result.dequantized.items():
        assert torch.equal(from_file[name].view(torch.int32), ours.view(torch.int32)), name


@pytest.mark.parametrize(("change", "message"), [
    ({"norm_topk_prob": False}, "renormalises the top-k routing weights"),
    ({"mlp_only_layers": [0]}, "makes every layer an MoE layer"),
    ({"decoder_sparse_step": 2}, "makes every layer an MoE layer"),
])
def test_qwen_moe_settings_llama_cpp_hard_codes_are_checked(change: dict[str, object], message: str) -> None:
    config = transformers.Qwen3MoeConfig(num_hidden_layers=2, norm_topk_prob=True).to_dict()
    gguf_format.check_model(config, "Q4_K_M")
    with pytest.raises(InvalidSpecError, match=message):
        gguf_format.check_model(config | change, "Q4_K_M")
    tied = transformers.Qwen2MoeConfig(num_hidden_layers=2, tie_word_embeddings=True).to_dict()
    with pytest.raises(InvalidSpecError, match="own output matrix"):
        gguf_format.check_model(tied, "Q4_K_M")


LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed (benchmarks/gguf_quality.py builds it)")
@pytest.mark.parametrize(("family", "file_type", "method"),
                         [("llama", "Q4_K_M", "gptq"), ("llama", "Q4_K_S", "gptq"), ("llama", "Q5_K_M", "gptq"),
                          ("phi3", "Q4_K_M", "gptq"), ("gemma", "Q4_0", "gptq"), ("gemma2", "Q4_K_M", "gptq"),
                          ("gemma3", "Q5_K_M", "gptq"), ("llama", "Q4_K_M", "awq"), ("gemma3", "Q4_0", "awq")])
def test_llama_cpp_loads_the_file_and_its_perplexity_matches_ours(
    tmp_path: Path, family: str, file_type: str, method: str
) -> None:
    from benchmarks.gguf_quality import llama_cpp_logits, llama_cpp_perplexity

    model_dir = tiny_model(tmp_path / "model", family)
    calib = calibration(model_dir, samples=12)
    path = tmp_path / "m.gguf"
    result = export_gguf(model_dir, path, file_type, method=method, calibration=calib[:8])  # type: ignore[arg-type]
    assert ("Q5_K" in result.tensor_types.values()) == (file_type in ("Q4_K_S", "Q5_K_M"))
    ids = calib[8:]
    logits = _logits(result.dequantized, model_dir, ids)
    nll = -torch.log_softmax(logits[:, :-1].double(), -1).gather(2, ids[:, 1:].unsqueeze(2)).mean()
    ours = math.exp(float(nll))
    theirs = llama_cpp_perplexity(path, ids, threads=2)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)
    assert np.isfinite(theirs)
    # a random tiny model's perplexity is near its vocabulary size whatever the weights: the logits themselves
    # agree too (llama.cpp quantizes activations to 8 bits for its dot products: ~1.5 % apart)
    cpp = next(llama_cpp_logits(path, ids[:1], threads=2))
    centred = [x - x.mean(-1, keepdim=True) for x in (cpp, logits[0])]
    assert float((centred[0] - centred[1]).norm() / centred[1].norm()) < 0.05
    assert float((cpp.argmax(-1) == logits[0].argmax(-1)).float().mean()) > 0.95


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed (benchmarks/gguf_quality.py builds it)")
@pytest.mark.parametrize(("family", "experts"), [("qwen3_moe", 4), ("qwen2_moe", 8), ("mixtral", 8)])
def test_llama_cpp_runs_our_moe_files_and_quantizes_them_to_our_recipe(tmp_path: Path, family: str, experts: int) -> None:
    """F16: llama.cpp's logits equal transformers' own MoE forward over the same weights (0.1 %: routing, shared
    experts and their gate read as written); Q4_K_M: llama-quantize of that F16 file picks our recipe's types."""
    from benchmarks.gguf_quality import llama_cpp_logits, llama_cpp_quantize, tensor_types

    model_dir = tiny_moe_model(tmp_path / "model", family, experts)
    ids = calibration(model_dir, samples=9)[8:]
    f16 = export_gguf(model_dir, tmp_path / "f16.gguf", "F16")
    ours = _moe_logits(f16.dequantized, model_dir, ids, tmp_path / "f16-read")[0]
    cpp = next(llama_cpp_logits(tmp_path / "f16.gguf", ids[:1], threads=2))
    centred = [x - x.mean(-1, keepdim=True) for x in (cpp, ours)]
    assert float((centred[0] - centred[1]).norm() / centred[1].norm()) < 0.005
    assert bool((cpp.argmax(-1) == ours.argmax(-1)).all())
    q4 = export_gguf(model_dir, tmp_path / "q4.gguf", "Q4_K_M")
    llama_cpp_quantize(tmp_path / "f16.gguf", tmp_path / "theirs.gguf", "Q4_K_M", threads=2)
    assert tensor_types(tmp_path / "theirs.gguf") == q4.tensor_types


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed (benchmarks/gguf_quality.py builds it)")
@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3", "qwen2_moe"])
def test_llama_quantize_picks_our_recipe_for_every_file_type(tmp_path: Path, family: str) -> None:
    """llama-quantize (no imatrix) of our F16 file chooses, tensor by tensor, the types our recipe chose: the
    K-quant mixes, a fused attn_qkv, the 8-expert rules, routers kept F32."""
    from benchmarks.gguf_quality import llama_cpp_quantize, tensor_types

    model_dir = tiny_moe_model(tmp_path / "m", family, 8) if family == "qwen2_moe" else tiny_model(tmp_path / "m", family)
    export_gguf(model_dir, tmp_path / "f16.gguf", "F16")
    for file_type in ("Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q4_0", "Q8_0"):
        ours = export_gguf(model_dir, tmp_path / f"{file_type}.gguf", file_type).tensor_types
        llama_cpp_quantize(tmp_path / "f16.gguf", tmp_path / f"theirs-{file_type}.gguf", file_type, threads=2)
        assert tensor_types(tmp_path / f"theirs-{file_type}.gguf") == ours, file_type
