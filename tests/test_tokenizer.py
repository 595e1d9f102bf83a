"""Tests for the CLIP text tokenizer and the small BPE trainer."""

import dataclasses
import itertools
import json
import random

import pytest
import torch

from qlip.tokenizer import (
    EOT_TOKEN,
    SOT_TOKEN,
    CLIPTokenizer,
    _emulated_pattern,
    bytes_to_unicode,
    clean_text,
    get_tokenizer_from_dir,
    pretokenize,
    train_bpe,
)

# A hand-built vocabulary in CLIP's layout. In the byte table, printable ASCII c maps to itself at id
# ord(c) - 33, and "c</w>" sits 256 further ('a</w>' = 320 and '.</w>' = 269, as in the real CLIP vocab).
HAND_MERGES = [
    ("h", "o"),  # 512 ho
    ("p", "ho"),  # 513 pho
    ("t", "o</w>"),  # 514 to</w>
    ("pho", "to</w>"),  # 515 photo</w>
    ("o", "f</w>"),  # 516 of</w>
    ("d", "o"),  # 517 do
    ("do", "g</w>"),  # 518 dog</w>
    ("o", "t</w>"),  # 519 ot</w>: ranks after "h o", so "hot" must become "ho" + "t</w>"
]
SOT, EOT = 520, 521


def _hand_vocab() -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in HAND_MERGES), SOT_TOKEN, EOT_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


@pytest.fixture
def hand_dir(tmp_path):
    with open(tmp_path / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(_hand_vocab(), f, ensure_ascii=False)
    with open(tmp_path / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in HAND_MERGES))
    return tmp_path


@pytest.fixture
def hand(hand_dir) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(hand_dir)


def _shapes_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sizes = ["small", "large", "tiny", "big", "medium"]
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    shapes = ["star", "circle", "square", "triangle", "hexagon", "ellipse"]
    places = ["top left corner", "top right corner", "bottom left corner", "bottom right corner", "center"]
    return [
        f"a {rng.choice(sizes)} {rng.choice(colors)} {rng.choice(shapes)} in the {rng.choice(places)}"
        for _ in range(n)
    ]


def test_byte_table_is_gpt2s():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord("~")] == "~" and table[0xFF] == "ÿ"
    assert table[0] == chr(256) and table[ord(" ")] == "Ġ" and table[0xAD] == chr(323)
    assert list(table.values())[0] == "!"  # CLIP's vocab starts with the printable bytes


def test_hand_vocab_ids_worked_out_by_hand(hand):
    assert (hand.sot_token_id, hand.eot_token_id, hand.vocab_size) == (SOT, EOT, 522)
    assert hand.encode("a photo of a dog.") == [320, 515, 516, 320, 518, 269]
    # merge order matters: "h o" (rank 0) fires before "o t</w>" (rank 7), leaving "ho" + "t</w>"
    assert hand.encode("hot") == [512, ord("t") - 33 + 256]
    # a word with no merge is its byte symbols, the last one with </w>
    assert hand.encode("cat") == [ord("c") - 33, ord("a") - 33, ord("t") - 33 + 256]
    # non-ASCII: UTF-8 bytes of 'é' (C3 A9) through the byte table
    table, vocab = bytes_to_unicode(), hand.get_vocab()
    assert hand.encode("é") == [vocab[table[0xC3]], vocab[table[0xA9] + "</w>"]]
    row = hand("a photo of a dog.")
    assert row.dtype == torch.long and row.shape == (1, 77)
    assert row[0, :8].tolist() == [SOT, 320, 515, 516, 320, 518, 269, EOT]
    assert row[0, 8:].eq(0).all()


def test_cleaning_whitespace_case_html(hand):
    assert clean_text("  A \t PHOTO\n\nof  a &amp;amp; DOG.  ") == "a photo of a & dog."
    assert hand.encode("  A \t PHOTO\n\nof  a  DOG.  ") == hand.encode("a photo of a dog.")
    assert hand.encode("a &amp;amp; dog") == [320, ord("&") - 33 + 256, 518]


def test_pretokenize_follows_clip_pattern():
    assert pretokenize("don't stop, it's 2024!!! ok") == ["don", "'t", "stop", ",", "it", "'s", "2", "0", "2", "4",
                                                         "!!!", "ok"]
    assert pretokenize("naïve café 日本語 x² ½") == ["naïve", "café", "日本語", "x", "²", "½"]
    assert pretokenize("a<|endoftext|>b <|startoftext|>") == ["a", EOT_TOKEN, "b", SOT_TOKEN]
    assert pretokenize("we'll they're i'm you'd") == ["we", "'ll", "they", "'re", "i", "'m", "you", "'d"]


CHECK_TEXTS = [
    "A photo of a dog.", "it's 2024, ½ done!!", "naïve café — 日本語 テスト", "x² + y² = z²", "Ⅻ o'clock",
    "emoji 🐶🐱 ok", "we'll SEE'S 'T 'tis", "tab\tand\u00a0nbsp", "<|endoftext|>tail", "ΑΒΓ αβγ ß", "a\u0345b",
    "١٢٣ arabic digits", "hello_world foo-bar", "कि हिन्दी", "'''", "",
]


def test_emulated_pattern_matches_regex_module():
    regex = pytest.importorskip("regex")
    reference = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )
    emulated = _emulated_pattern()
    for text in CHECK_TEXTS:
        for cleaned in (text, clean_text(text)):
            assert emulated.findall(cleaned) == reference.findall(cleaned), cleaned


def test_truncation_keeps_eot_and_padding(hand):
    long_text = " ".join(["a photo of a dog."] * 30)  # 180 tokens
    rows = hand([long_text, "a dog", ""])
    assert rows.shape == (3, 77)
    assert rows[0, 0] == SOT and rows[0, 76] == EOT
    assert rows[0, 1:76].tolist() == hand.encode(long_text)[:75]
    assert rows[1, :4].tolist() == [SOT, 320, 518, EOT] and rows[1, 4:].eq(0).all()
    assert rows[2, :2].tolist() == [SOT, EOT] and rows[2, 2:].eq(0).all()
    short = hand([long_text], context_length=8)
    assert short.shape == (1, 8) and short[0, -1] == EOT
    # eos pooling in the text model takes the argmax id of each row
    assert (rows.argmax(dim=1) == torch.tensor([76, 3, 1])).all()


def test_decode_round_trip(hand):
    tok = train_bpe(_shapes_captions(200), 600)
    for text in ["A Large red STAR in the top left corner", "a photo of a dog", "naïve café 日本語", "x 2 y"]:
        cleaned = clean_text(text)
        assert tok.decode(tok.encode(text)) == cleaned
        assert tok.decode(tok(text)[0]) == cleaned  # row with sot, eot and padding
        assert hand.decode(hand.encode(text)) == cleaned
    # punctuation is its own word, so it comes back space separated (as in CLIP)
    assert hand.decode(hand.encode("a dog.")) == "a dog ."
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(tok(["a", "b"]))


def test_save_then_load_gives_same_ids(tmp_path):
    texts = _shapes_captions(100, seed=1) + ["something never seen, with punctuation!", "naïve café"]
    tok = train_bpe(texts, 700)
    tok.context_length = 32
    tok.save_pretrained(tmp_path / "tok")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "tok" / name).is_file()
    assert (tmp_path / "tok" / "merges.txt").read_text(encoding="utf-8").startswith("#version")
    loaded = get_tokenizer_from_dir(tmp_path / "tok")
    assert loaded.context_length == 32
    assert loaded.get_vocab() == tok.get_vocab() and loaded.merges == tok.merges
    assert torch.equal(loaded(texts), tok(texts))


def test_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json, merges.txt"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing merges.txt"):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_rejects_eot_that_is_not_the_largest_id(hand_dir):
    vocab = _hand_vocab()
    vocab[SOT_TOKEN], vocab[EOT_TOKEN] = EOT, SOT
    with pytest.raises(ValueError, match="largest id"):
        CLIPTokenizer(vocab, HAND_MERGES)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CLIPTokenizer(_hand_vocab(), [*HAND_MERGES, ("c", "a")])


def test_train_bpe_on_shapes_captions():
    captions = _shapes_captions(300)
    tok = train_bpe(captions, 1000)
    vocab = tok.get_vocab()
    table = list(bytes_to_unicode().values())
    assert [vocab[s] for s in table] == list(range(256))
    assert [vocab[s + "</w>"] for s in table] == list(range(256, 512))
    assert tok.eot_token_id == tok.vocab_size - 1 == max(vocab.values())
    assert tok.sot_token_id == tok.vocab_size - 2
    assert tok.vocab_size == 512 + len(tok.merges) + 2
    # every training word fits in one token once the vocabulary is large enough
    words = {w for c in captions for w in c.split()}
    assert all(len(tok.encode(w)) == 1 for w in words)
    rows = tok(captions)
    assert (rows.argmax(dim=1) == (rows != 0).sum(dim=1) - 1).all()
    assert all(tok.decode(r) == c for r, c in zip(rows, captions))
    # deterministic, and a smaller budget still compresses
    assert train_bpe(captions, 1000).merges == tok.merges
    small = train_bpe(captions, 530)
    assert small.vocab_size == 530
    assert all(len(small.encode(c)) < len(c) for c in captions[:20])


def test_train_bpe_limits():
    with pytest.raises(ValueError, match="514"):
        train_bpe(["a b"], 513)
    tok = train_bpe(["ab ab cd"], 600, min_frequency=2)  # only "a b</w>" occurs twice
    assert tok.merges == [("a", "b</w>")] and tok.vocab_size == 515
    assert tok.encode("ab cd") == [512, tok.get_vocab()["c"], tok.get_vocab()["d</w>"]]


def test_matches_hf_tokenizers_bpe(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    captions = _shapes_captions(200, seed=3) + ["naïve café, it's 2024!", "日本語 テスト emoji 🐶"]
    tok = train_bpe(captions, 800)
    tok.save_pretrained(tmp_path)
    model = tokenizers.models.BPE.from_file(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), end_of_word_suffix="</w>"
    )
    hf = tokenizers.Tokenizer(model)
    clip_split = tokenizers.Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(clip_split, behavior="removed", invert=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    texts = [*captions[:50], "unseen words: zebra 42 quokka's", "naïve café 日本語 🐶🐱"]
    for text in texts:
        assert hf.encode(clean_text(text)).ids == tok.encode(text), text


def test_batch_of_many_captions():
    captions = list(itertools.islice(itertools.cycle(_shapes_captions(500)), 2000))
    tok = train_bpe(captions, 700)
    assert tok(captions).shape == (2000, 77)


def test_a_trained_vocabulary_pads_to_the_model_context(tmp_path, tiny_tokenizer):
    from qlip.factory import create_model, get_tokenizer

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    assert get_tokenizer(str(tmp_path / "tok"))(["a dog"]).shape == (1, 77)  # alone: its own length
    model = create_model("qlip-tiny")
    tok = get_tokenizer("qlip-tiny", vocabulary=tmp_path / "tok")
    ids = tok(["a small blue circle at the bottom", "a dog"])
    assert ids.shape == (2, model.cfg.text.context_length) == (2, 32)
    with torch.no_grad():
        assert model.encode_text(ids).shape == (2, model.cfg.embed_dim)
    with pytest.raises(ValueError, match="vocabulary=DIR"):
        get_tokenizer("qlip-tiny")
    from qlip.factory import get_model_config
    from qlip.models.qlip import QLIP

    cfg = get_model_config("qlip-tiny")
    small = QLIP(cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=520))).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match=r"has \d+ tokens but the text tower of qlip-tiny only 520"):
        get_tokenizer(str(small), vocabulary=tmp_path / "tok")
