"""The vision-language model's parts: the conversation format, the projector for every registered tower, the
language-model slot (ARTransformer or any object with its interface), the KV cache, the VLM directory, the data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from qlip.ar import ARConfig, ARTransformer
from qlip.factory import create_model, get_model_config, list_models
from qlip.understanding import (
    IMAGE_TOKEN,
    TowerConfig,
    UnderstandingError,
    VisionLanguageModel,
    VisionTower,
    VLMConfig,
    WordTokenizer,
    collate_conversations,
    load,
    make_projector,
    render_conversation,
    save_vlm,
)
from qlip.understanding.data import read_llava_json, shapes_corpus, shapes_question
from qlip.understanding.model import IGNORE, LMConfig
from qlip.understanding.protocols import LanguageModel, TextTokenizer

TEXTS = ["What color is the shape?", "Where is the shape?", "red", "blue", "in the top left corner", "yes", "no"]


def _tiny_vlm(feature: str = "layer", layer: int = -2, seed: int = 0, lm: nn.Module | None = None, merge: int = 1,
              feature_norm: bool = False):
    torch.manual_seed(seed)
    qlip_model = create_model("qlip-tiny", parts=("vision", "quantizer"))
    tower = VisionTower(qlip_model, TowerConfig(feature=feature, layer=layer))
    tok = WordTokenizer.from_corpus(TEXTS)
    ar = ARConfig(vocab_size=tok.vocab_size, width=32, depth=2, heads=2, max_seq_len=64)
    cfg = VLMConfig(tower=tower.cfg, projector="mlp2x_gelu", lm=LMConfig("qlip-ar", ar=ar.to_dict()), merge=merge,
                    feature_norm=feature_norm)
    return VisionLanguageModel(cfg, tower, lm if lm is not None else ARTransformer(ar), tok).eval()


def test_artransformer_exposes_the_language_model_sizes():
    core = ARTransformer(ARConfig(vocab_size=50, width=32, depth=1, heads=2, max_seq_len=40))
    assert (core.width, core.vocab_size, core.max_seq_len) == (32, 50, 40)
    assert isinstance(core, LanguageModel)
    assert isinstance(WordTokenizer.from_corpus(TEXTS), TextTokenizer)


def test_word_tokenizer_round_trip_and_chat_prompt():
    tok = WordTokenizer.from_corpus(TEXTS)
    ids = tok.encode("Where is the shape?")
    assert tok.pad_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == "where is the shape?"
    assert tok.encode("zebra") == [tok.unk_id]
    assert tok.chat_prompt("hi").endswith("ASSISTANT:")


def test_placeholder_expands_to_the_image_tokens_and_only_the_answer_has_labels():
    tok = WordTokenizer.from_corpus(TEXTS)
    ids, labels = render_conversation(tok, [(f"{IMAGE_TOKEN}\nWhere is the shape?", "in the top left corner")])
    assert ids.count(-1) == 1
    answer = tok.encode("in the top left corner") + [tok.eos_id]
    assert [x for x in labels if x != IGNORE] == answer and ids[-len(answer) :] == answer
    assert all(x == IGNORE for x in labels[: -len(answer)])
    # a question without the placeholder gets it in front; two placeholders are refused
    ids2, _ = render_conversation(tok, [("Where is the shape?", "red")])
    assert ids2.count(-1) == 1
    with pytest.raises(UnderstandingError, match="one <image>"):
        render_conversation(tok, [(f"{IMAGE_TOKEN}{IMAGE_TOKEN} x", "red")])
    short, _ = render_conversation(tok, [("red?", None)])
    batch = collate_conversations([(ids, labels), (short, [IGNORE] * len(short))], 5, tok.pad_id, left_pad=True)
    t = len(ids) - 1 + 5
    assert batch["ids"].shape == (2, t)
    assert batch["image"].sum(1).tolist() == [5, 5]
    assert batch["mask"][1].tolist() == [False] * (t - len(short) - 4) + [True] * (len(short) + 4)  # left padded
    k = ids.index(-1)
    assert batch["image"][0, k : k + 5].all() and (batch["labels"][0, k : k + 5] == IGNORE).all()


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_projector_maps_every_registered_tower_to_the_lm_width(name, projector):
    cfg = get_model_config(name)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    for width in (cfg.vision.width, cfg.quantizer.dim):  # layer features, quantized codes
        proj = make_projector(projector, width, 48)
        assert proj(torch.zeros(1, grid * grid, width)).shape == (1, grid * grid, 48)
        if grid % 2 == 0:  # merged 2 x 2 blocks
            tower = TowerConfig(tokens=grid * grid, width=width)
            vcfg = VLMConfig(tower=tower, projector=projector, merge=2)
            proj = make_projector(projector, vcfg.projector_in, 48)
            assert proj(torch.zeros(1, vcfg.image_tokens, vcfg.projector_in)).shape == (1, grid * grid // 4, 48)


def test_tower_modes_give_their_shapes():
    for feature, width in (("layer", 32), ("codes", 8)):
        vlm = _tiny_vlm(feature)
        feats = vlm.image_features(torch.randn(2, 3, 32, 32))
        assert feats.shape == (2, 16, width) and vlm.cfg.tower.width == width
    last = _tiny_vlm(layer=-1).image_features(torch.ones(1, 3, 32, 32))
    assert not torch.allclose(last, _tiny_vlm(layer=-2).image_features(torch.ones(1, 3, 32, 32)))
    with pytest.raises(UnderstandingError, match="does not exist"):
        _tiny_vlm(layer=5)


def test_loss_covers_the_answer_tokens_only():
    vlm = _tiny_vlm()
    tok = vlm.tokenizer
    convs = [render_conversation(tok, [("What color is the shape?", "red")]),
             render_conversation(tok, [("Where is the shape?", "in the top left corner")])]  # fmt: skip
    batch = collate_conversations(convs, vlm.image_tokens, tok.pad_id)
    feats = vlm.image_features(torch.randn(2, 3, 32, 32))
    out = vlm(batch, feats)
    assert int(out["answer_tokens"]) == 2 + 6
    out["loss"].backward()
    assert vlm.projector[0].weight.grad is not None
    assert all(p.grad is None for p in vlm.tower.parameters())  # frozen


class WrappedLM(nn.Module):
    """Not an ARTransformer: any object with the interface fills the slot (as a Hugging Face wrapper will)."""

    def __init__(self, core: ARTransformer):
        super().__init__()
        self.inner = core

    width = property(lambda self: self.inner.width)
    vocab_size = property(lambda self: self.inner.vocab_size)
    max_seq_len = property(lambda self: self.inner.max_seq_len)

    def embed(self, ids):
        return self.inner.embed(ids)

    def forward_embeds(self, x, cache=None, key_padding_mask=None):
        return self.inner.forward_embeds(x, cache=cache, key_padding_mask=key_padding_mask)

    def head(self, hidden):
        return self.inner.head(hidden)

    def new_cache(self, batch, max_len=None):
        return self.inner.new_cache(batch, max_len=max_len)


@pytest.mark.parametrize("wrapped", [False, True])
def test_cached_generation_equals_recomputing(wrapped):
    vlm = _tiny_vlm(seed=3)
    if wrapped:
        vlm = _tiny_vlm(seed=3, lm=WrappedLM(vlm.lm))
    torch.manual_seed(4)
    for p in vlm.parameters():
        if p.ndim == 2:
            nn.init.normal_(p, std=0.3)  # large weights: the answers depend on the inputs
    feats = torch.randn(3, 16, 32) * 3
    prompts = [[("What color is the shape?", None)], [("red?", None)], [("Where is the shape?", None)]]
    with torch.no_grad():
        vlm.lm.head = _no_eos(vlm.lm.head, vlm.tokenizer.eos_id)
        a = vlm.generate_ids(feats, prompts, max_new_tokens=8, use_cache=True)
        b = vlm.generate_ids(feats, prompts, max_new_tokens=8, use_cache=False)
    assert a == b and all(len(r) == 8 for r in a)
    assert len({tuple(r) for r in a}) > 1  # the rows differ: padding and image features matter


def _no_eos(head, eos):
    def run(hidden):
        logits = head(hidden)
        logits[..., eos] = -1e9
        return logits

    return run


def test_prompt_longer_than_the_context_is_one_error():
    vlm = _tiny_vlm()
    with pytest.raises(UnderstandingError, match="context is 64"):
        vlm.generate_ids(torch.zeros(1, 16, 32), [[("red " * 60, None)]])


def test_tower_that_does_not_fit_the_projector_is_refused():
    vlm = _tiny_vlm()
    other = VisionTower(create_model("qlip-shapes-s", parts=("vision",)), TowerConfig())
    with pytest.raises(UnderstandingError, match="tokens of width"):
        VisionLanguageModel(vlm.cfg, other, vlm.lm, vlm.tokenizer)
    with pytest.raises(UnderstandingError, match=r"shape \(B, 16, 32\)"):
        vlm.project(torch.zeros(1, 64, 128))


def test_merging_patch_blocks_keeps_every_feature_in_fewer_positions():
    vlm = _tiny_vlm(merge=2)
    assert vlm.image_tokens == 4 and vlm.projector[0].in_features == 4 * 32
    feats = torch.arange(16.0)[None, :, None].expand(1, 16, 32)  # feature value = patch index (row-major 4 x 4)
    seen = []
    vlm.projector = nn.Linear(128, 128, bias=False)
    nn.init.eye_(vlm.projector.weight)  # the projector passes the merged features through
    merged = vlm.project(feats)  # (1, 4, 128): position k holds its 2 x 2 block of patches
    for k in range(4):
        seen.append(sorted({int(v) for v in merged[0, k]}))
    assert seen == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    with pytest.raises(UnderstandingError, match="does not divide"):
        _tiny_vlm(merge=3)


def test_feature_norm_makes_the_projection_independent_of_the_feature_scale():
    feats = torch.randn(2, 16, 32)
    normed, plain = _tiny_vlm(feature_norm=True), _tiny_vlm(feature_norm=False)
    assert torch.allclose(normed.project(feats), normed.project(feats * 50 + 3), atol=1e-4)
    assert not torch.allclose(plain.project(feats), plain.project(feats * 50 + 3), atol=1e-4)


def test_save_and_load_give_the_same_answers(tmp_path):
    vlm = _tiny_vlm(seed=1, merge=2, feature_norm=True)
    save_vlm(tmp_path / "vlm", vlm)
    again = load(tmp_path / "vlm")
    images = torch.randn(2, 3, 32, 32)
    assert again.answer(images, ["What color is the shape?", "Where is the shape?"]) == \
        vlm.answer(images, ["What color is the shape?", "Where is the shape?"])  # fmt: skip
    cfg = json.loads((tmp_path / "vlm" / "config.json").read_text())
    assert cfg["format"] == "qlip-vlm" and cfg["lm"]["kind"] == "qlip-ar" and cfg["merge"] == 2
    assert cfg["feature_norm"] is True
    (tmp_path / "vlm" / "model.safetensors").unlink()
    with pytest.raises(UnderstandingError, match="model.safetensors is missing"):
        load(tmp_path / "vlm")
    with pytest.raises(UnderstandingError, match="not a directory"):
        load(tmp_path / "nothing")


def test_hf_language_model_with_a_missing_source_is_a_clear_error():
    from qlip.understanding import build_language_model

    with pytest.raises(UnderstandingError, match="'hf'"):
        build_language_model(LMConfig("hf", source="SmolLM2.gguf"))


def test_shapes_questions_cover_types_absent_attributes_and_held_out_phrasings():
    from qlip.data.loader import shapes_config_from_spec
    from qlip.understanding.data import QUESTIONS

    cfg = shapes_config_from_spec("shapes:easy?sizes=medium,large")
    shape = {"shape": "circle", "color": "red", "position": "top left", "size": "large"}
    rng = np.random.default_rng(0)
    qs = [shapes_question(shape, cfg, rng) for _ in range(400)]
    assert {q["type"] for q in qs} == {"color", "shape", "position", "size", "yesno"}
    absent = [q for q in qs if q["absent"]]
    assert absent and all(q["answer"] == "no" for q in absent)
    assert all(q["answer"] == "yes" for q in qs if q["absent"] is False)
    train = {q["question"] for q in qs if q["type"] == "color"}
    assert QUESTIONS["color"][-1] not in train  # held out of training
    held = shapes_question(shape, cfg, rng, qtype="color", phrasings="held_out")
    assert held["question"] == QUESTIONS["color"][-1] and held["answer"] == "red"
    assert shapes_question(shape, cfg, rng, qtype="position")["answer"] == "in the top left corner"
    single = shapes_config_from_spec("shapes:easy?sizes=large")
    assert "size" not in {shapes_question(shape, single, rng)["type"] for _ in range(200)}
    vocab = WordTokenizer.from_corpus(shapes_corpus(cfg, captions=50))
    assert vocab.encode(held["question"]).count(vocab.unk_id) == 0


def test_yesno_share_sets_the_share_of_yes_no_questions_and_zero_keeps_the_uniform_draw():
    from collections import Counter

    from qlip.data.loader import shapes_config_from_spec

    cfg = shapes_config_from_spec("shapes:easy?sizes=large")  # four types: color, shape, position, yesno
    shape = {"shape": "circle", "color": "red", "position": "top left", "size": "large"}
    rngs = [np.random.default_rng(i) for i in range(2000)]
    counts = Counter(shapes_question(shape, cfg, rng, yesno_share=0.5)["type"] for rng in rngs)
    assert 0.46 < counts["yesno"] / 2000 < 0.54 and set(counts) == {"color", "shape", "position", "yesno"}
    assert all(0.13 < counts[t] / 2000 < 0.2 for t in ("color", "shape", "position"))  # 1/6 each
    uniform = [shapes_question(shape, cfg, np.random.default_rng(i))["question"] for i in range(50)]
    assert uniform == [shapes_question(shape, cfg, np.random.default_rng(i), yesno_share=0.0)["question"]
                       for i in range(50)]  # fmt: skip


def test_reworded_training_questions_keep_their_answers_and_never_become_held_out_phrasings():
    from qlip.data.loader import shapes_config_from_spec
    from qlip.understanding.data import QUESTIONS, REWORD_LEADS, YESNO_QUESTIONS, reword

    cfg = shapes_config_from_spec("shapes:easy?sizes=large")
    shape = {"shape": "circle", "color": "red", "position": "top left", "size": "large"}
    plain = [shapes_question(shape, cfg, np.random.default_rng(i)) for i in range(300)]
    reworded = [shapes_question(shape, cfg, np.random.default_rng(i), reword_share=1.0) for i in range(300)]
    assert [(q["type"], q["answer"]) for q in plain] == [(q["type"], q["answer"]) for q in reworded]
    changed = sum(a["question"] != b["question"] for a, b in zip(plain, reworded))
    assert changed > 200  # most draws add a lead-in or a place phrase
    held_out = {o[-1] for o in QUESTIONS.values()} | {o[-1] for o in YESNO_QUESTIONS.values()}
    rng = np.random.default_rng(0)
    for template in [o for options in (*QUESTIONS.values(), *YESNO_QUESTIONS.values()) for o in options[:-1]]:
        for _ in range(40):
            out = reword(template, rng)
            lead = next(x for x in sorted(REWORD_LEADS, key=len, reverse=True) if out.startswith(x))
            assert out[len(lead):] not in held_out, out
    # a near neighbour of a held-out phrasing is kept as it was ("Which shape do you see" + " in the image" is
    # allowed; the held-out "What shape do you see in the image?" is never produced)
    assert reword("What shape do you see?", np.random.default_rng(1)) != "What shape do you see in the image?"
    evaluation = shapes_question(shape, cfg, rng, qtype="shape", phrasings="held_out", reword_share=1.0)
    assert evaluation["question"] == QUESTIONS["shape"][-1]  # evaluation questions are never reworded
    vocab = WordTokenizer.from_corpus(shapes_corpus(cfg, captions=50))
    assert all(vocab.encode(q["question"]).count(vocab.unk_id) == 0 for q in reworded)
    assert [q["question"] for q in plain] == [shapes_question(shape, cfg, np.random.default_rng(i), reword_share=0.0)
                                              ["question"] for i in range(300)]  # fmt: skip


def test_llava_json_bad_records_are_named_counted_and_skipped(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat color?"},
                                                {"from": "gpt", "value": "red"}]}  # fmt: skip
    records = [
        good,
        {"image": "missing.png", "conversations": good["conversations"]},
        {"image": "broken.png", "conversations": good["conversations"]},
        {"conversations": good["conversations"]},
        {"image": "a.png", "conversations": [good["conversations"][1], good["conversations"][0]]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
        "just text",
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    data = read_llava_json(tmp_path / "data.json")
    assert len(data.records) == 1 and data.records[0]["turns"] == [("<image>\nWhat color?", "red")]
    assert len(data.bad) == 6
    assert data.bad[0].startswith("record 1:") and "missing.png" in data.bad[0]
    assert "unreadable image" in data.bad[1]
    with pytest.raises(UnderstandingError, match="no usable record"):
        (tmp_path / "bad.json").write_text(json.dumps(records[1:]))
        read_llava_json(tmp_path / "bad.json")


def test_training_items_pass_the_reword_share_to_their_questions():
    from qlip.data.loader import shapes_config_from_spec
    from qlip.train.vlm_data import ConversationItems

    cfg = shapes_config_from_spec("shapes:easy?sizes=large")
    plain, reworded = (ConversationItems(50, shapes=cfg, image_size=32, reword=r) for r in (0.0, 1.0))
    a = [plain.conversation("qa", i, np.random.default_rng(i))[0] for i in range(50)]
    b = [reworded.conversation("qa", i, np.random.default_rng(i))[0] for i in range(50)]
    assert [t[1] for t in a] == [t[1] for t in b]  # same answers
    assert sum(x[0] != y[0] for x, y in zip(a, b)) > 30  # most questions reworded
