"""ShapesEval: the judge (train, save, load, predict), the metric's arithmetic, the ceiling and the CLIP score."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qlip.data import ShapesConfig, generate_shapes_sample
from qlip.data.shapes import POSITION_PHRASE
from qlip.eval.generation import caption_attributes, clip_score, judge_ceiling, shapes_eval
from qlip.eval.judge import ATTRIBUTES, demo_shapes_config, load_judge, shapes_images, train_judge
from qlip.eval.schema import metric_unit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    out = tmp_path_factory.mktemp("judge")
    judge, report = train_judge(out, steps=3, num_train=32, num_eval=8, batch_size=8, command="test")
    return out, judge, report


def _caption(attrs):
    return f"a {attrs['color']} {attrs['shape']} {POSITION_PHRASE[attrs['position']]}"


def test_train_judge_writes_a_directory_that_loads_to_the_same_judge(tiny_judge):
    out, judge, report = tiny_judge
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "judge.json"}
    saved = json.loads((out / "judge.json").read_text())
    assert saved["accuracy"] == report["accuracy"] and set(saved["accuracy"]) == {*ATTRIBUTES, "all"}
    assert saved["command"] == "test" and saved["train_seconds"] >= 0 and saved["hardware"]["cpu"]
    loaded = load_judge(out)
    x, _ = shapes_images(demo_shapes_config(), 12, split="val")
    assert loaded.predict(x) == judge.predict(x)
    for a, v in loaded.predict_indices(x).items():
        assert torch.equal(v, judge.predict_indices(x)[a])
    # Seeded: the same call makes the same weights; another seed other weights.
    again, _ = train_judge(None, steps=3, num_train=32, num_eval=8, batch_size=8)
    other, _ = train_judge(None, steps=3, num_train=32, num_eval=8, batch_size=8, seed=1)
    w = judge.state_dict()
    assert all(torch.equal(w[k], v) for k, v in again.state_dict().items())
    assert not all(torch.equal(w[k], v) for k, v in other.state_dict().items())


def test_predict_reads_pil_images_and_uint8_tensors_at_any_size(tiny_judge):
    _, judge, _ = tiny_judge
    x, _ = shapes_images(demo_shapes_config(), 6, split="val")
    pil = [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).numpy()]
    assert judge.predict(pil) == judge.predict(x)
    small = torch.from_numpy(np.stack([np.asarray(p.resize((32, 32))) for p in pil])).permute(0, 3, 1, 2)
    predicted = judge.predict(small)
    assert len(predicted) == 6 and all(p[a] in judge.cfg.classes[a] for p in predicted for a in ATTRIBUTES)
    with pytest.raises(ValueError, match="uint8"):
        judge.predict(x.float())


def test_shapes_eval_counts_each_attribute_and_all_three(tiny_judge):
    _, judge, _ = tiny_judge
    x, _ = shapes_images(demo_shapes_config(), 4, split="val")
    read = judge.predict(x)
    other = {a: next(c for c in judge.cfg.classes[a] if c != read[1][a]) for a in ATTRIBUTES}
    targets = [dict(r) for r in read]
    targets[0]["color"] = next(c for c in judge.cfg.classes["color"] if c != read[0]["color"])
    targets[1] = {**targets[1], "shape": other["shape"], "position": other["position"]}
    result = shapes_eval(x, [_caption(targets[0]), targets[1], _caption(targets[2]), targets[3]], judge)
    assert result.metrics == {"gen/shape": 75.0, "gen/color": 75.0, "gen/position": 75.0, "gen/all": 50.0,
                              "num_eval": 4}  # fmt: skip
    assert result.targets == targets and result.predictions == read
    assert all(metric_unit(k) == "%" for k in result.metrics if k != "num_eval")
    with pytest.raises(ValueError, match="3 captions"):
        shapes_eval(x, targets[:3], judge)
    with pytest.raises(ValueError, match="knows no color 'brown'"):
        shapes_eval(x[:1], [{**targets[0], "color": "brown"}], judge)


def test_captions_of_the_data_parse_to_their_labels():
    cfg = ShapesConfig.preset("easy")
    classes = {"shape": cfg.shapes, "color": cfg.colors, "position": cfg.positions}
    for i in range(300):
        s = generate_shapes_sample(i, cfg, split="val")
        want = {"shape": cfg.shapes[s["labels"]["shape"]], "color": cfg.colors[s["labels"]["color"]],
                "position": cfg.positions[s["labels"]["position"]]}  # fmt: skip
        assert caption_attributes(s["caption"], classes) == want, s["caption"]
    assert caption_attributes("A Blue Circle at the top", classes) == {"shape": "circle", "color": "blue",
                                                                       "position": "top"}  # fmt: skip
    with pytest.raises(ValueError, match="names no position"):
        caption_attributes("a red star", classes)
    with pytest.raises(ValueError, match=r"several \(circle, square\) shape"):
        caption_attributes("a red circle and a red square in the center", classes)


class _Identity(torch.nn.Module):
    """A 'model' whose reconstructions are its inputs: the judge must read them exactly as the originals."""

    image_size = 64

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def reconstruct(self, x):
        return x


def test_judge_ceiling_on_real_images_and_reconstructions(tiny_judge, released_dir):
    _, judge, _ = tiny_judge
    cfg = demo_shapes_config()
    ceiling = judge_ceiling(judge, cfg, num_images=10, model=_Identity())
    assert set(ceiling) == {f"judge_{k}/{a}" for k in ("real", "recon") for a in (*ATTRIBUTES, "all")}
    for a in (*ATTRIBUTES, "all"):  # eval transform + to_uint8 round-trip the pixels exactly at the same size
        assert ceiling[f"judge_recon/{a}"] == ceiling[f"judge_real/{a}"]
        assert metric_unit(f"judge_real/{a}") == "%"
    assert set(judge_ceiling(judge, cfg, num_images=5)) == {f"judge_real/{a}" for a in (*ATTRIBUTES, "all")}
    from qlip.factory import create_model

    model = create_model(str(released_dir))  # a 32-px QLIP: the judge resizes its reconstructions
    recon = judge_ceiling(judge, cfg, num_images=4, model=model)
    assert all(0.0 <= recon[f"judge_recon/{a}"] <= 100.0 for a in ATTRIBUTES)


def test_clip_score_is_100_times_the_mean_cosine(released_dir):
    from qlip.factory import create_model, get_tokenizer
    from qlip.transforms import image_transform

    model, tok = create_model(str(released_dir)), get_tokenizer(str(released_dir))
    x, _ = shapes_images(demo_shapes_config(), 3, split="val")
    captions = ["a red star in the center", "a blue circle at the top", "a green square on the left"]
    pil = [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).numpy()]
    with torch.no_grad():
        img = model.encode_image(torch.stack([image_transform(model.image_size)(p) for p in pil]), normalize=True)
        txt = model.encode_text(tok(captions), normalize=True)
    expected = 100.0 * F.cosine_similarity(img, txt).mean().item()
    assert clip_score(model, tok, pil, captions, batch_size=2) == pytest.approx(expected, abs=1e-4)
    assert clip_score(model, tok, x, captions) == pytest.approx(expected, abs=1e-4)
    assert metric_unit("clip_score") == ""
    with pytest.raises(ValueError, match="one caption per image"):
        clip_score(model, tok, pil, captions[:2])


def test_load_judge_refuses_what_is_not_a_judge(tmp_path, released_dir):
    with pytest.raises(FileNotFoundError, match="train-judge"):
        load_judge(tmp_path / "nothing")
    with pytest.raises(ValueError, match="not a ShapesEval judge"):
        load_judge(released_dir)


@pytest.mark.slow
def test_the_default_judge_reads_real_held_out_images_at_98_percent_or_better():
    _, report = train_judge(None)
    assert min(report["accuracy"][a] for a in ATTRIBUTES) >= 98.0, report["accuracy"]


def test_cli_trains_a_judge_and_refuses_a_folder_it_would_clobber(tmp_path, released_dir, capsys):
    from qlip.cli import main

    out = tmp_path / "judge"
    argv = ["eval", "train-judge", "--out", str(out), "--steps", "2", "--num-train", "16", "--num-eval", "4"]
    assert main(argv) == 0
    assert "held-out accuracy shape" in capsys.readouterr().out
    report = json.loads((out / "judge.json").read_text())
    assert report["command"].startswith("qlip eval train-judge --out ") and report["settings"]["steps"] == 2
    load_judge(out)
    assert main(argv) == 0  # a judge folder is replaced in place
    # A QLIP model folder holds config.json + model.safetensors too: never overwritten.
    before = (released_dir / "config.json").read_bytes()
    assert main(["eval", "train-judge", "--out", str(released_dir), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "not a ShapesEval judge" in err and len(err.splitlines()) == 1
    assert (released_dir / "config.json").read_bytes() == before
    (tmp_path / "file").write_text("x")
    assert main(["eval", "train-judge", "--out", str(tmp_path / "file")]) == 2


def test_the_blur_augmentation_keeps_flat_images_and_spreads_a_point_without_losing_mass():
    from qlip.eval.judge import _blur

    flat = torch.full((2, 3, 16, 16), 100.0)
    assert torch.allclose(_blur(flat, 1.2), flat)
    point = torch.zeros(1, 3, 17, 17)
    point[..., 8, 8] = 1.0
    out = _blur(point, 1.0)
    assert out.sum().item() == pytest.approx(3.0, abs=1e-5) and out[0, 0, 8, 8] < 0.5 and out[0, 0, 8, 9] > 0.05
    assert torch.equal(_blur(point, 0.05), point)


def test_the_committed_judge_reads_real_held_out_demo_images_at_98_percent_or_better():
    from pathlib import Path

    judge = load_judge(Path(__file__).resolve().parents[1] / "docs" / "results" / "judge")
    ceiling = judge_ceiling(judge, demo_shapes_config(), num_images=300, seed=5)
    assert min(ceiling[f"judge_real/{a}"] for a in ATTRIBUTES) >= 98.0, ceiling
