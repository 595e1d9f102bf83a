"""The demo page's callbacks as plain functions (no browser), the page's layout, and ``qlip demo``'s wiring."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import qlip
from qlip.cli import main
from qlip.demo import DemoInputError, DemoSession, DemoSetupError, parse_labels, token_grid_picture
from qlip.demo.app import chat_outputs, guarded, tokenize_outputs
from qlip.demo.session import load_vlm


@pytest.fixture(scope="module")
def session(released_dir):
    model = qlip.create_model(str(released_dir))
    return DemoSession(model, qlip.get_tokenizer(str(released_dir)))


class FakeVLM:
    def __init__(self):
        self.asked = []

    def chat(self, image, question):
        self.asked.append((image.size, question))
        return f"a {image.size[0]} pixel wide picture"


class FakeGenerator:
    def generate(self, prompts, cfg_scale=3.0, seed=0, n=1, **kwargs):
        from qlip.generation import EmptyCaptionError

        if "forbidden" in prompts[0]:
            raise EmptyCaptionError("prompt 0 is empty; give every image a caption")
        return [Image.new("RGB", (8, 8), (seed % 256, 0, 0))] * n


def test_tokenize_a_real_photo_gives_the_grid_picture_the_reconstruction_and_psnr(session, image_files):
    from qlip.eval.metrics import psnr
    from qlip.transforms import to_uint8

    r = session.tokenize(str(image_files["rgb"]))
    model = session.model
    x = session.transform(qlip.load_image(image_files["rgb"])).unsqueeze(0)
    with torch.inference_mode():
        tokens = model.encode(x)
        recon = model.reconstruct(x)
    assert np.array_equal(r.tokens, tokens[0].numpy())
    assert r.reconstruction.size == (model.image_size, model.image_size)
    assert np.array_equal(np.asarray(r.reconstruction), np.asarray(qlip.to_pil_images(recon)[0]))
    assert r.psnr == pytest.approx(float(psnr(to_uint8(x), to_uint8(recon))[0]), abs=1e-4)
    assert r.bits_per_token == model.num_bits and r.compression_ratio == pytest.approx(model.cfg.compression_ratio)
    g = model.grid_size
    assert r.token_grid.mode == "RGB" and r.token_grid.size[0] >= 256 and r.token_grid.size[0] % g == 0
    summary = r.summary()
    assert f"{g} x {g} tokens of {model.num_bits} bits" in summary and "PSNR" in summary and "compression" in summary
    # the same photo as bytes or as a PIL image gives the same tokens
    assert np.array_equal(session.tokenize(image_files["rgb"].read_bytes()).tokens, r.tokens)
    assert np.array_equal(session.tokenize(Image.open(image_files["rgb"])).tokens, r.tokens)


def test_token_grid_picture_gives_equal_tokens_equal_colors_and_neighbours_similar_ones():
    tokens = np.array([[0, 255], [255, 1]])
    pic = np.asarray(token_grid_picture(tokens, bits=8, size=4))  # 2 x 2 cells of 2 x 2 pixels
    assert pic.shape == (4, 4, 3)
    assert (pic[0, 0] == 0).all() and (pic[0, 2] == 255).all()  # all bits off: black, all on: white
    assert (pic[0, 2] == pic[2, 0]).all()  # equal tokens
    assert (pic[2, 2] != pic[0, 0]).any()  # tokens one bit apart still differ
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        token_grid_picture(np.zeros(3, dtype=np.int64), bits=8)


def test_classify_returns_the_typed_labels_probabilities(session, image_files):
    probs = session.classify(str(image_files["jpeg"]), " a photo of a dog, a photo of a cat ,, a diagram of a cat")
    assert sorted(probs) == ["a diagram of a cat", "a photo of a cat", "a photo of a dog"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert list(probs.values()) == sorted(probs.values(), reverse=True)


@pytest.mark.parametrize("labels", ["", "   ", "a dog", "a dog, a dog", " , ,"])
def test_classify_needs_two_labels(session, image_files, labels):
    with pytest.raises(DemoInputError, match="at least two"):
        session.classify(str(image_files["jpeg"]), labels)


def test_parse_labels_keeps_order_and_drops_repeats():
    assert parse_labels("b, a ,b,, c") == ["b", "a", "c"]


def test_bad_uploads_are_messages(session, image_files, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for upload, message in [(None, "no image"), ("", "no image"), (str(text), "notes.txt"),
                            (str(image_files["corrupt"]), "corrupt.jpg"), (str(empty), "empty")]:  # fmt: skip
        with pytest.raises(DemoInputError, match=message):
            session.tokenize(upload)
    # the page's wrapper turns them into a status line and empty outputs; the session still works after
    assert tokenize_outputs.__name__
    run = guarded(lambda image: tokenize_outputs(session, image), 4)
    out = run(str(text))
    assert out[:4] == (None, None, None, None) and out[4].startswith("error: ") and "notes.txt" in out[4]
    out = run(str(image_files["rgb"]))
    assert out[4] == "ok" and isinstance(out[2], Image.Image)


def test_an_unexpected_failure_is_an_internal_error_line_not_a_crash():
    def broken(x):
        raise RuntimeError("boom")

    assert guarded(broken, 2)(1) == (None, None, "error: internal error (RuntimeError: boom); see the server log")


def test_generate_goes_through_the_generator_and_checks_its_inputs(session):
    with pytest.raises(DemoInputError, match="--generator"):
        session.generate("a red circle")
    s = DemoSession(session.model, session.tokenizer, generator=FakeGenerator())
    images = s.generate("a red circle", seed=7, cfg_scale=2.0, n=3)
    assert len(images) == 3 and images[0].getpixel((0, 0)) == (7, 0, 0)
    for prompt, n, message in [("  ", 1, "type a prompt"), ("ok", 0, "between 1"), ("ok", 99, "between 1"),
                               ("forbidden", 1, "empty")]:  # fmt: skip
        with pytest.raises(DemoInputError, match=message):
            s.generate(prompt, n=n)


def test_chat_goes_through_the_vlm(session, image_files):
    with pytest.raises(DemoInputError, match="--vlm"):
        session.chat(str(image_files["rgb"]), "what is this?")
    vlm = FakeVLM()
    s = DemoSession(session.model, session.tokenizer, vlm=vlm)
    assert chat_outputs(s, str(image_files["rgb"]), " what is this? ") == ("a 512 pixel wide picture",)
    assert vlm.asked == [((512, 512), "what is this?")]
    with pytest.raises(DemoInputError, match="type a question"):
        s.chat(str(image_files["rgb"]), "")
    with pytest.raises(DemoInputError, match="no image"):
        s.chat(None, "what?")


def test_the_vlm_is_loaded_through_qlip_understanding_only_when_asked(monkeypatch, tmp_path):
    loaded = []
    fake = types.ModuleType("qlip.understanding")
    fake.load = lambda directory: loaded.append(directory) or FakeVLM()
    monkeypatch.setitem(sys.modules, "qlip.understanding", fake)
    monkeypatch.setattr(qlip, "understanding", fake, raising=False)
    assert isinstance(load_vlm(tmp_path), FakeVLM) and loaded == [tmp_path]

    def refuse(directory):
        raise FileNotFoundError(f"{directory} has no config.json")

    fake.load = refuse
    with pytest.raises(DemoSetupError, match="cannot load the vision-language model"):
        load_vlm(tmp_path)


def test_a_model_without_a_decoder_cannot_run_the_demo():
    model = qlip.create_model("qlip-tiny", parts=("vision", "quantizer"))
    with pytest.raises(DemoSetupError, match="no decoder"):
        DemoSession(model)


def test_the_page_has_the_tabs_of_the_models_given(session):
    pytest.importorskip("gradio")
    from qlip.demo import build_app

    def tabs(app):
        return [b.label for b in app.blocks.values() if type(b).__name__ == "Tab"]

    assert tabs(build_app(session=session)) == ["Tokenize", "Classify"]
    full = DemoSession(session.model, session.tokenizer, generator=FakeGenerator(), vlm=FakeVLM())
    app = build_app(session=full)
    assert tabs(app) == ["Tokenize", "Classify", "Generate", "Chat"]
    ids = {b.elem_id for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert {"tok-upload", "tok-grid", "tok-recon", "tok-status", "cls-probs", "gen-images", "chat-answer"} <= ids


# ---------------------------------------------------------------------------------------------------------------------
# qlip demo
# ---------------------------------------------------------------------------------------------------------------------


def test_qlip_demo_without_gradio_says_how_to_install_it(monkeypatch, capsys, released_dir):
    import qlip.demo.app as app_module

    def missing():
        raise app_module.GradioMissingError(app_module.INSTALL_HINT)

    monkeypatch.setattr(app_module, "import_gradio", missing)
    assert main(["demo", "--model", str(released_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "qlip[demo]"' in err


def test_qlip_demo_launches_the_page_on_the_port_asked(monkeypatch, capsys, released_dir):
    gr = pytest.importorskip("gradio")
    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append(kw))
    assert main(["demo", "--model", str(released_dir), "--port", "7999", "--share", "no", "--device", "cpu"]) == 0
    assert calls and calls[0]["server_port"] == 7999 and calls[0]["share"] is False
    assert "http://127.0.0.1:7999" in capsys.readouterr().out


def test_qlip_demo_refuses_a_model_it_cannot_load(capsys):
    pytest.importorskip("gradio")
    assert main(["demo", "--model", "/no/such/model"]) == 2
    assert "cannot load the model" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--share", "maybe"], "yes or no"), (["--port", "70000"], "65535")])
def test_qlip_demo_option_mistakes(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--model", "M", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
