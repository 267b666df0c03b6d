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
