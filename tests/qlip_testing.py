"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

CAPTIONS = [
    "a photo of a dog", "a photo of a cat", "an astronaut in a white suit", "a diagram of a cat",
    "a large red star in the top left corner", "a small blue circle at the bottom", "a green square in the center",
] * 5

# config.json fields of a released repo, with the sizes shrunk (absent fields take the documented defaults)
TINY_RELEASED_CONFIG = {
    "architectures": ["QLIPModel"], "model_type": "clip", "projection_dim": 16,
    "logit_scale_init_value": 2.6592, "text_projection_bias": False, "vision_projection_bias": True,
    "text_config": {"bos_token_id": 0, "eos_token_id": 2, "vocab_size": 600, "hidden_size": 32,
                    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "intermediate_size": 64, "k_bias": False, "layer_norm_eps": 1e-6,
                      "rope": True, "subln": True, "swiglu": True, "use_rms_norm": False, "quantizer": "bsq",
                      "quantizer_embed_type": "mlp", "quantizer_l2_norm": True,
                      "quantizer_cfg": {"embed_dim": 8, "group_size": 1, "input_format": "blc",
                                        "inv_temperature": 1.0, "l2_norm": True}},
    "decoder_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "intermediate_size": 64, "k_bias": False, "layer_norm_eps": 1e-6,
                       "rope": True, "subln": True, "swiglu": True},
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), so that a misplaced tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return model


def save_tiny_hf_text_encoder(path, kind: str = "bert", *, wordpiece: bool = False):
    """A random Hugging Face text encoder folder ("bert", "t5" or "clip") with a word-level tokenizer, built here
    (needs transformers; nothing is downloaded). Returns the folder.

    ``wordpiece``: a BERT-style WordPiece tokenizer.json instead (lower-cased, whole caption words plus single
    letters and their "##" continuations, so any lower-case word has tokens), like MiniLM's."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = sorted({w for c in CAPTIONS for w in c.split()} | {"red", "blue", "green", "circle", "square"})
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    if wordpiece:
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
        words = sorted(set(words) | set(letters)) + [f"##{c}" for c in letters]
    vocab = {w: i for i, w in enumerate(specials + words)}
    if wordpiece:
        core = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
        core.normalizer = normalizers.BertNormalizer(lowercase=True)
        core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    else:
        core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers.processors import TemplateProcessing

    if kind == "t5":  # T5 ends a text with </s>
        core.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 3)])
    else:  # BERT's [CLS] ... [SEP], CLIP's start ... end
        core.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    pad = "</s>" if kind == "clip" else "<pad>"  # CLIP pads with its end token
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, unk_token="<unk>",
                                               bos_token="<s>", eos_token="</s>")  # fmt: skip
    torch.manual_seed(0)
    small = {"num_attention_heads": 2, "vocab_size": len(vocab)}
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1,
                                                               intermediate_size=32, **small))  # fmt: skip
    elif kind == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=len(vocab)))  # fmt: skip
    elif kind == "clip":
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=16, num_hidden_layers=1,
                                                                       intermediate_size=32, eos_token_id=3,
                                                                       max_position_embeddings=24, **small))
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def save_tiny_hf_causal_lm(path, texts: list[str], *, max_positions: int = 128):
    """A random 2-layer Llama folder with a lowercased word-level tokenizer covering ``texts`` and a chat template,
    built here (needs transformers; nothing is downloaded). Returns the folder."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t.lower())} | {"user", "assistant", ":"})
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                               eos_token="</s>", unk_token="<unk>")  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_tiny_run_config(root, run, task: str, options: dict, **top) -> str:
    """A 3-step training config of ``task`` (its section ``options``; ``top``: other top-level keys such as
    ``stage``, or a whole section that replaces the shared one, e.g. ``optim=``) with the loop settings the tests
    share, written to ``root/<run name>.yaml``; returns its path."""
    import yaml

    cfg = {
        "task": task,
        task: options,
        "data": {"batch_size": 4},
        "optim": {"steps": 3, "warmup_steps": 1, "lr": 1e-3},
        "eval": {"at_end": True},
        "logging": {"every": 1, "progress": False, "tensorboard": False},
        "checkpoint": {"every": 0, "export": True},
        "distributed": {"threads": 1},
        "run_dir": str(run),
        **top,
    }
    path = root / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def make_tiny_lm_with_image_tokens(root, tokenizer, sentences) -> None:
    """What the unified model's tests start from, under ``root``: a 3-step text LM (``lm/last``) on a corpus of
    every pair of ``sentences``, a random tiny QLIP model (``tok``) and a 16-image `qlip tokenize` folder
    (``tokens``) made with it."""
    from qlip.cli import main
    from qlip.factory import create_model

    (root / "corpus.txt").write_text("\n\n".join(f"{a} {b}" for a in sentences for b in sentences) + "\n")
    torch.manual_seed(0)
    create_model("qlip-tiny").save_pretrained(root / "tok", tokenizer=tokenizer)
    assert main(["tokenize", "--model", str(root / "tok"), "--data", "shapes:easy", "--count", "16", "--out",
                 str(root / "tokens"), "--batch-size", "8", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    lm = {"corpus": str(root / "corpus.txt"), "held_out": 0.2, "vocab_size": 600, "seq_len": 16, "context": 96,
          "width": 32, "depth": 2, "heads": 2, "eval_windows": 4}  # fmt: skip
    assert main(["train", write_tiny_run_config(root, root / "lm", "lm", lm)]) == 0
