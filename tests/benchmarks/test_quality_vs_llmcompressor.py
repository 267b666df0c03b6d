"""The quality benchmark's own pieces, on the CPU and without llm-compressor: the token windows (the prefix rule,
the file round trip, seeds), the group-size substitution, the QuantFleet option split, the locked results file
and the shared evaluation (a model against itself scores KL 0; a perturbed one does not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import quality_vs_llmcompressor as qb

VOCAB = 300


def word_tokenizer(directory: Path, *, bos: bool) -> None:
    """A word-level tokenizer ("w0".."w299"); with `bos`, it adds <s> before plain text like Llama-2's does."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(VOCAB - 1)} | {"<s>": VOCAB - 1}
    backend = Tokenizer(WordLevel(words, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    if bos:
        backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", VOCAB - 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", bos_token="<s>")
    tok.save_pretrained(directory)


def tiny_llama(directory: Path, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(directory)


def texts(tmp: Path) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(1)
    cal, ev = tmp / "cal.txt", tmp / "ev.txt"
    cal.write_text("\n\n".join(" ".join(f"w{i}" for i in torch.randint(0, VOCAB - 1, (50,), generator=gen).tolist())
                               for _ in range(60)))
    ev.write_text(" ".join(f"w{i}" for i in torch.randint(0, VOCAB - 1, (800,), generator=gen).tolist()))
    return cal, ev


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("qbench")
    plain, with_bos = tmp / "plain", tmp / "bos"
    for d, bos in ((plain, False), (with_bos, True)):
        word_tokenizer(d, bos=bos)
        tiny_llama(d)
    cal, ev = texts(tmp)
    return {"plain": plain, "bos": with_bos, "cal": cal, "ev": ev, "work": tmp / "work"}


def test_windows_start_with_what_the_tokenizer_adds_and_nothing_else(assets: dict[str, Path]) -> None:
    plain = qb.make_windows(assets["plain"], assets["cal"], assets["ev"], 8, 32, 4, 0, assets["work"])
    bos = qb.make_windows(assets["bos"], assets["cal"], assets["ev"], 8, 32, 4, 0, assets["work"])
    assert plain.meta["prefix"] == [] and plain.meta["bos_token"] == "<s>"  # a bos_token it never adds: no prefix
    assert bos.meta["prefix"] == [VOCAB - 1]
    assert (bos.calibration[:, 0] == VOCAB - 1).all() and (bos.eval[:, 0] == VOCAB - 1).all()
    assert not (plain.calibration == VOCAB - 1).any()
    for w in (plain, bos):
        assert w.calibration.shape == (8, 32) and w.eval.shape == (4, 32)
    # eval windows: consecutive text from the start of the held-out file
    first = [int(t[1:]) for t in assets["ev"].read_text().split()[:64]]
    assert plain.eval[:2].reshape(-1).tolist() == first
    assert bos.eval[0, 1:].tolist() == first[:31]


def test_windows_file_round_trip_and_seeds(assets: dict[str, Path]) -> None:
    a = qb.make_windows(assets["plain"], assets["cal"], assets["ev"], 8, 32, 4, 0, assets["work"])
    b = qb.make_windows(assets["plain"], assets["cal"], assets["ev"], 8, 32, 4, 0, assets["work"])  # from the file
    assert a.path == b.path and a.path.exists()
    assert torch.equal(a.calibration, b.calibration) and torch.equal(a.eval, b.eval)
    assert (a.calib_hash, a.eval_hash) == (b.calib_hash, b.eval_hash) == (qb.tensor_hash(b.calibration), qb.tensor_hash(b.eval))
    c = qb.make_windows(assets["plain"], assets["cal"], assets["ev"], 8, 32, 4, 1, assets["work"])
    assert c.calib_hash != a.calib_hash and c.eval_hash == a.eval_hash  # another seed: other calibration, same eval
    # calibration windows are disjoint slices of the calibration stream
    from transformers import AutoTokenizer

    stream = qb.tokenize_stream(assets["cal"].read_text(), AutoTokenizer.from_pretrained(str(assets["plain"]))).tolist()
    text = " ".join(map(str, stream))
    for row in a.calibration.tolist():
        assert " ".join(map(str, row)) in text


def test_group_substitution_for_dims_that_128_does_not_divide() -> None:
    smollm2 = {"q/k/v_proj, gate/up_proj": 576, "o_proj": 576, "down_proj": 1536}
    scheme, note = qb.effective_scheme(qb.CONFIGS["w4g128sym"], smollm2, 32)
    assert scheme == qb.Scheme(4, 32, True) and "576" in note
    assert qb.config_label(qb.CONFIGS["w4g128sym"], scheme) == "w4 g32 sym (for g128)"
    assert qb.effective_scheme(qb.CONFIGS["w4g64sym"], smollm2, 32) == (qb.Scheme(4, 64, True), "")
    assert qb.effective_scheme(qb.CONFIGS["w8chsym"], smollm2, 32) == (qb.Scheme(8, -1, True), "")
    assert qb.effective_scheme(qb.CONFIGS["w3g128asym"], smollm2, 0)[0] == qb.Scheme(3, 128, False)  # as asked
    llama8b = {"q/k/v_proj, gate/up_proj": 4096, "o_proj": 4096, "down_proj": 14336}
    assert qb.effective_scheme(qb.CONFIGS["w4g128asym"], llama8b, 32)[0] == qb.Scheme(4, 128, False)


def test_quantfleet_options_split_and_unknown_names_refused() -> None:
    spec_kw, pipe_kw = qb.split_qf_options({"act_order": True, "dampening": 0.02, "batch_tokens": 4096})
    assert spec_kw == {"act_order": True, "dampening": 0.02} and pipe_kw == {"batch_tokens": 4096}
    with pytest.raises(SystemExit):
        qb.split_qf_options({"no_such_option": 1})
    assert [qb.parse_value(v) for v in ("on", "off", "0.5", "3", "abc")] == [True, False, 0.5, 3, "abc"]


def test_results_file_is_merged_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.json"
    with qb.locked_results(path) as data:
        data["rows"]["a"] = {"status": "ok"}
    with qb.locked_results(path) as data:
        data["rows"]["b"] = {"status": "failed"}
    assert set(json.loads(path.read_text())["rows"]) == {"a", "b"}
    s = qb.Scheme(4, 64, True)
    assert qb.row_key("quantfleet", "gptq", s, "h", {"qf": {}}) != qb.row_key("quantfleet", "gptq", s, "h", {"qf": {"act_order": True}})


def test_evaluation_of_a_model_against_itself_and_a_perturbed_copy(assets: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    windows = qb.make_windows(assets["plain"], assets["cal"], assets["ev"], 8, 32, 4, 0, assets["work"])
    ref = qb.Reference(assets["plain"], windows, tmp_path)
    same = qb.score(ref, qb.load_dense(assets["plain"]))
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0
    assert same["dppl_pct"] == pytest.approx(0.0, abs=1e-6) and same["tokens"] == 4 * 31
    # independent check of the original's perplexity from full-model logits
    model = AutoModelForCausalLM.from_pretrained(str(assets["plain"]), dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=windows.eval).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), windows.eval[:, 1:].reshape(-1))
    assert same["ppl_original"] == pytest.approx(float(nll.exp()), rel=1e-4)
    noisy_dir = tmp_path / "noisy"
    noisy = AutoModelForCausalLM.from_pretrained(str(assets["plain"]), dtype=torch.float16)
    with torch.no_grad():
        for p in noisy.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    noisy.save_pretrained(noisy_dir)
    moved = qb.score(ref, qb.load_dense(noisy_dir))
    assert moved["kl_mean"] > 1e-3 and moved["top1"] < 1.0
    assert moved["ppl_original"] == pytest.approx(same["ppl_original"], rel=1e-6)  # the cached reference


# --- weight+activation schemes (issue 12): the scorer's own checkpoint reader and the runtime's activations ---


def fp8_checkpoint(model_dir: Path, out: Path, input_scales: dict[str, float], *, static: bool = True) -> dict[str, torch.Tensor]:
    """A compressed-tensors float-quantized checkpoint of `model_dir` written by hand (per-channel E4M3 weights as
    llm-compressor's FP8 preset writes them; static per-tensor input scales from `input_scales` by Linear leaf name)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    tensors = load_file(str(model_dir / "model.safetensors"))
    stored: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        leaf = name.rsplit(".", 2)[-2]
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            module = name[: -len(".weight")]
            w = t.float()
            scale = (w.abs().amax(dim=1, keepdim=True) / 448).clamp(min=1e-8)
            stored[f"{module}.weight"] = (w / scale).to(torch.float8_e4m3fn)
            stored[f"{module}.weight_scale"] = scale.half()
            if static:
                stored[f"{module}.input_scale"] = torch.tensor([input_scales[leaf]], dtype=torch.float16)
        else:
            stored[name] = t
    save_file(stored, str(out / "model.safetensors"))
    args = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None}
    inputs = args | ({"strategy": "tensor", "dynamic": False} if static else {"strategy": "token", "dynamic": True})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args | {"strategy": "channel", "dynamic": False},
                                      "input_activations": inputs}},
    }
    (out / "config.json").write_text(json.dumps(cfg))
    return stored


def capture_inputs(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Record what each named Linear computes with (hooks added after the scorer's: they see its quantized input)."""
    seen: dict[str, torch.Tensor] = {}
    for name in names:
        def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            seen[name] = args[0].detach().clone()

        model.get_submodule(name).register_forward_pre_hook(hook)
    return seen


def test_static_fp8_input_scale_from_the_file_quantizes_the_input(assets: dict[str, Path], tmp_path: Path) -> None:
    scales = {"q_proj": 0.011, "k_proj": 0.023, "v_proj": 0.017, "o_proj": 0.0007, "gate_proj": 0.019,
              "up_proj": 0.013, "down_proj": 0.0009}
    ckpt = tmp_path / "fp8static"
    stored = fp8_checkpoint(assets["plain"], ckpt, scales)
    model, info = qb.load_runtime(assets["plain"], ckpt)
    assert info["linears_by_activation"] == {"fp8-tensor-static": 14}
    # weights: the stored codes × scales, not the original's
    q = "model.layers.1.self_attn.o_proj"
    expected = stored[f"{q}.weight"].float() * stored[f"{q}.weight_scale"].float()
    assert torch.equal(model.get_submodule(q).weight.detach(), expected)
    names = [f"model.layers.1.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        f"model.layers.1.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    seen = capture_inputs(model, names)
    ids = torch.randint(0, VOCAB - 1, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids)
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        # the scale the file holds (fp16), the max over the shards vLLM fuses (q/k/v, gate/up)
        group = next((g for g in qb.FUSED_SHARDS if leaf in g), (leaf,))
        s = max(float(torch.tensor(scales[g], dtype=torch.float16)) for g in group)
        x = seen[name]
        codes = x / s
        assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float()), name  # every value on the E4M3 grid × s
        assert codes.abs().max() <= 448
    # a tiny scale saturates: o_proj's inputs clip at ±448 × 0.0007 (in fp16)
    s_o = float(torch.tensor(scales["o_proj"], dtype=torch.float16))
    assert seen[names[3]].abs().max() == pytest.approx(448 * s_o, rel=1e-6)
    # the same checkpoint with other input scales in the file scores differently (the file is what is read)
    other = tmp_path / "fp8static-x8"
    fp8_checkpoint(assets["plain"], other, {k: v * 8 for k, v in scales.items()})
    model8, _ = qb.load_runtime(assets["plain"], other)
    seen8 = capture_inputs(model8, names[3:4])
    with torch.no_grad():
        model8(input_ids=ids)
    assert seen8[names[3]].abs().max() > seen[names[3]].abs().max()


def test_static_fp8_reader_agrees_with_quantfleets_reader(assets: dict[str, Path], tmp_path: Path) -> None:
    """An independent reading: where vLLM fuses nothing (o_proj, down_proj), QuantFleet's own reader
    (workers/formats/reader.py input_quantizers) quantizes the input exactly as this script does."""
    from workers.formats.reader import QuantizedCheckpoint

    scales = {"q_proj": 0.02, "k_proj": 0.02, "v_proj": 0.02, "o_proj": 0.003, "gate_proj": 0.02, "up_proj": 0.02,
              "down_proj": 0.001}
    ckpt = tmp_path / "fp8"
    fp8_checkpoint(assets["plain"], ckpt, scales)
    theirs = QuantizedCheckpoint(ckpt).input_quantizers("model.layers.0.")
    model, _ = qb.load_runtime(assets["plain"], ckpt)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    for leaf, width in (("self_attn.o_proj", 64), ("mlp.down_proj", 128)):
        layer = model.get_submodule(f"model.layers.0.{leaf}")
        mine = layer._forward_pre_hooks[next(iter(layer._forward_pre_hooks))](layer, (x[..., :width],))[0]
        assert torch.equal(mine, theirs[leaf](x[..., :width]))


def test_dynamic_activations_per_token(assets: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "fp8dyn"
    fp8_checkpoint(assets["plain"], ckpt, {}, static=False)
    model, info = qb.load_runtime(assets["plain"], ckpt)
    assert info["linears_by_activation"] == {"fp8-token-dynamic": 14}
    name = "model.layers.0.mlp.down_proj"
    seen = capture_inputs(model, [name])
    with torch.no_grad():
        model(input_ids=torch.arange(20).reshape(1, 20))
    x = seen[name].reshape(-1, 128)
    scale = x.abs().amax(-1, keepdim=True) / 448
    assert torch.allclose(x.abs().amax(-1), 448 * scale.squeeze(-1))  # each token's max lands on ±448 × its scale
    codes = x / scale
    assert torch.allclose(codes, codes.to(torch.float8_e4m3fn).float(), rtol=1e-5, atol=1e-5)
    # int8 per token: codes are integers in [-128, 127] with the token's max at 127
    t = torch.randn(4, 7, 33, generator=torch.Generator().manual_seed(2))
    y = qb.int8_per_token_dynamic(t)
    step = t.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(y / step, torch.round(y / step), atol=1e-4) and (y - t).abs().le(step / 2 + 1e-6).all()
    assert qb.activation_kind({"type": "int", "num_bits": 8, "strategy": "token", "dynamic": True,
                               "symmetric": True}) == "int8-token-dynamic"
    assert qb.activation_kind(None) is None


def test_bits_per_weight_from_the_files(assets: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "fp8bpw"
    stored = fp8_checkpoint(assets["plain"], ckpt, dict.fromkeys(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 0.01))
    weights = sum(t.numel() for k, t in stored.items() if k.endswith(".weight") and t.dtype == torch.float8_e4m3fn)
    outs = sum(t.numel() for k, t in stored.items() if k.endswith(".weight_scale"))
    expected = 8 * (weights + 2 * outs + 2 * 14) / weights  # E4M3 codes, fp16 channel scales, fp16 input scales
    assert qb.bits_per_weight_of(ckpt) == pytest.approx(expected)


def test_scheme_configs_carry_their_method_and_labels() -> None:
    assert qb.CONFIGS["w8a8sq"].label() == "W8A8 int8 + SmoothQuant 0.8"
    assert {k: qb.PRESETS[c.preset].methods for k, c in qb.SCHEME_CONFIGS.items()} == {
        "fp8dyn": ("rtn", "gptq"), "fp8static": ("rtn", "gptq"), "w8a8": ("gptq",), "w8a8sq": ("gptq",)}
    assert qb.CONFIGS["w8chsym"].label() == "w8 per-channel sym"  # weight-only labels (cached keys) unchanged
    ns = qb.build_parser().parse_args(["--child", "llmcompressor", "--method", "rtn", "--preset", "fp8-dynamic"])
    assert not qb.llmc_needs_calibration(ns)
    ns.preset = "fp8-static"
    assert qb.llmc_needs_calibration(ns)
