"""The unified model (UM3): one vocabulary with a split softmax, vocabulary extension from a text LM, the mixing
schedule, and the whole path `qlip train` (task: lm, then task: unified) -> complete / caption / generate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from qlip.ar.sampling import Chooser
from qlip.cli import main
from qlip.unified import ImageVocab, UnifiedLM, extend_vocabulary, split_nll, text_config
from qlip.unified.mixing import MixSchedule
from qlip_testing import make_tiny_lm_with_image_tokens, write_tiny_run_config

SENTENCES = (
    "the quick brown fox jumps over the lazy dog.", "a function returns a value to its caller.",
    "the module reads a file and writes the result.", "every object has a type and a value.",
    "a list holds items in order, and a dict maps keys to values.", "the parser splits the text into words.",
)  # fmt: skip


def _tiny_lm(vocab: int = 40, width: int = 32) -> UnifiedLM:
    torch.manual_seed(0)
    return UnifiedLM(text_config(vocab, vocab - 2, vocab - 1, width=width, depth=2, heads=2, max_seq_len=64))


def _unified(parts: int = 2, visual_bits: bool = False, visual_positions: bool = False) -> tuple[UnifiedLM, UnifiedLM]:
    lm = _tiny_lm()
    with torch.no_grad():  # a trained-looking LM: rows that differ
        lm.core.tok_embed.weight.normal_()
        lm.core.lm_head.weight.normal_()
    image = ImageVocab("tiny", grid=2, bits=6, parts=parts)
    return lm, extend_vocabulary(lm, image, visual_bits=visual_bits, visual_positions=visual_positions)


def _trained_extras(um: UnifiedLM) -> UnifiedLM:
    with torch.no_grad():  # bit features and slot embeddings as after some training
        for name in ("bits_in", "bits_out", "slot_embed"):
            if hasattr(um, name):
                getattr(um, name).normal_()
    return um


def test_split_softmax_loss_equals_two_separate_softmaxes():
    _, um = _unified()
    c = um.cfg
    torch.manual_seed(1)
    logits = torch.randn(2, 5, c.vocab_size)
    targets = torch.tensor([[0, 5, c.visual_start, c.visual_start + 7, 39], [c.vocab_size - 1, 1, 2, 3, 4]])
    got = split_nll(logits, targets, c.text_vocab, c.visual_start)
    want = torch.empty(2, 5)
    for b in range(2):
        for t in range(5):
            y = int(targets[b, t])
            if y >= c.visual_start:
                want[b, t] = F.cross_entropy(logits[b, t, c.visual_start :][None], torch.tensor([y - c.visual_start]))
            else:
                want[b, t] = F.cross_entropy(logits[b, t, : c.text_vocab][None], torch.tensor([y]))
    torch.testing.assert_close(got, want)
    # a plain softmax over the whole vocabulary is a different loss
    assert not torch.allclose(got, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
                              .view(2, 5))  # fmt: skip


def test_split_softmax_sampling_restricts_each_step_to_its_modality():
    _, um = _unified()
    c, image = um.cfg, um.cfg.image
    torch.manual_seed(2)
    logits = torch.randn(3, c.vocab_size)
    text = um._text_only(logits, 0).softmax(-1)
    torch.testing.assert_close(text[:, : c.text_vocab], logits[:, : c.text_vocab].softmax(-1))
    assert float(text[:, c.text_vocab :].sum()) == 0.0
    for step in range(image.parts):
        lo, hi = c.visual_start + step * image.part_vocab, c.visual_start + (step + 1) * image.part_vocab
        vis = um._visual_part(logits, step).softmax(-1)
        torch.testing.assert_close(vis[:, lo:hi], logits[:, lo:hi].softmax(-1))
        outside = torch.ones(c.vocab_size, dtype=torch.bool)
        outside[lo:hi] = False
        assert float(vis[:, outside].sum()) == 0.0
    # guidance over restricted logits stays finite (no -inf - -inf)
    chooser = Chooser(guided=True, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    ids = chooser(um._visual_part(torch.randn(4, c.vocab_size), 1))
    assert ((ids >= c.visual_start + image.part_vocab) & (ids < c.visual_start + 2 * image.part_vocab)).all()


@pytest.mark.parametrize("extras", [False, True])
def test_vocabulary_extension_keeps_the_text_model_unchanged(extras):
    lm, um = _unified(visual_bits=extras, visual_positions=extras)
    tokens = torch.randint(0, lm.cfg.text_vocab, (2, 9))
    old, new = lm(tokens), um(tokens)
    torch.testing.assert_close(new[..., : lm.cfg.text_vocab], old)
    torch.testing.assert_close(new[..., : lm.cfg.text_vocab].log_softmax(-1), old.log_softmax(-1))
    mask = torch.ones(2, 8, dtype=torch.bool)
    torch.testing.assert_close(um.nll(tokens, mask), lm.nll(tokens, mask))
    mean = lm.core.tok_embed.weight.mean(0)
    torch.testing.assert_close(um.core.tok_embed.weight[lm.cfg.text_vocab :], mean.expand(um.cfg.vocab_size - 40, -1))
    assert um.cfg.ar.qk_norm
    tokens = torch.randint(0, 64, (3, 2, 2))
    assert torch.equal(um.from_visual_ids(um.to_visual_ids(tokens)), tokens)


@pytest.mark.parametrize("extras", [False, True])
def test_training_nll_equals_the_split_softmax_over_full_logits(extras):
    _, um = _unified(visual_bits=extras, visual_positions=extras)
    _trained_extras(um)
    c = um.cfg
    torch.manual_seed(1)
    tokens = torch.cat([torch.randint(0, c.text_vocab, (3, 5)), torch.randint(c.visual_start, c.vocab_size, (3, 6)),
                        torch.full((3, 1), c.eoi_id)], dim=1)  # fmt: skip  # text, visual and a marker target
    mask = torch.rand(3, 11) < 0.7
    mask[:, -1] = True
    full = split_nll(um(tokens[:, :-1]), tokens[:, 1:], c.text_vocab, c.visual_start) * mask
    fast = um(tokens[:, :-1], tokens[:, 1:], mask)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    grads = []
    for loss in (full.sum(), um(tokens[:, :-1], tokens[:, 1:], mask).sum()):
        um.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in um.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # one precision for picked logit and norm
        full = split_nll(um(tokens[:, :-1]), tokens[:, 1:], c.text_vocab, c.visual_start) * mask
        fast = um(tokens[:, :-1], tokens[:, 1:], mask)
    torch.testing.assert_close(fast, full, rtol=2e-2, atol=2e-2)


def test_bit_features_add_a_linear_map_of_each_visual_ids_bits():
    _, plain = _unified()
    _, um = _unified(visual_bits=True)
    c, image = um.cfg, um.cfg.image  # 6-bit tokens in 2 parts: 3 bits a part
    ids = torch.arange(c.vocab_size)[None]
    torch.testing.assert_close(um.embed(ids), plain.embed(ids))  # the features start at zero
    torch.testing.assert_close(um(ids), plain(ids))
    _trained_extras(um)
    part, code = 1, 0b110
    vid = c.visual_start + part * image.part_vocab + code
    signs = torch.tensor([1.0, 1.0, -1.0])  # most significant bit first
    want_in = um.core.tok_embed.weight[vid] + signs @ um.bits_in[part]
    want_out = um.core.lm_head.weight[vid] + signs @ um.bits_out[part]
    torch.testing.assert_close(um.embed(torch.tensor([[vid]]))[0, 0], want_in)
    torch.testing.assert_close(um.output_table()[vid], want_out)
    text = torch.randint(0, c.text_vocab, (1, 5))  # text ids keep their own rows
    torch.testing.assert_close(um.embed(text), plain.embed(text))
    torch.testing.assert_close(um.output_table()[: c.visual_start], plain.output_table()[: c.visual_start])


def test_slot_positions_number_each_rows_visual_ids_in_order():
    _, plain = _unified()
    _, um = _unified(visual_positions=True)
    c = um.cfg
    v = c.visual_start
    rows = torch.tensor([[c.boi_id, v + 1, v + 9, v + 2, v + 12, c.eoi_id, 3],  # an image prompt: slots 0..3
                         [0, 5, 6, c.boi_id, v + 4, v + 8, 7]])  # a caption, then the first two slots  # fmt: skip
    torch.testing.assert_close(um.embed(rows), plain.embed(rows))  # the slot embeddings start at zero
    _trained_extras(um)
    got = um.embed(rows) - plain.embed(rows)
    want = torch.zeros_like(got)
    want[0, 1:5] = um.slot_embed[:4]
    want[1, 4:6] = um.slot_embed[:2]
    torch.testing.assert_close(got, want)
    cache = um.new_cache(2)  # fed in two pieces, the cache carries the count
    pieces = torch.cat([um.embed(rows[:, :3], cache), um.embed(rows[:, 3:], cache)], dim=1)
    torch.testing.assert_close(pieces, um.embed(rows))
    with pytest.raises(TypeError, match="new_cache"):
        um.embed(rows, um.core.new_cache(2))


@pytest.mark.parametrize("bits, positions", [(True, False), (False, True), (True, True)])
def test_image_sampling_with_the_cache_equals_recomputation_with_the_visual_extras(bits, positions):
    from qlip.ar.decode import decode

    _, um = _unified(visual_bits=bits, visual_positions=positions)
    _trained_extras(um).eval()
    prompt, mask = um._prompt([um.caption_prompt([3, 4, 5]), um.caption_prompt([])])
    outs = [decode(um, prompt, um.cfg.image.steps, Chooser(guided=False, temperature=0.0), prompt_mask=mask,
                   logits_processor=um._visual_part, use_cache=cache) for cache in (True, False)]  # fmt: skip
    assert torch.equal(outs[0], outs[1])
    tokens = um.from_visual_ids(outs[0])
    assert tokens.shape == (2, 2, 2) and int(tokens.max()) < 64
    prompt, mask = um._prompt(um.image_prompt(tokens))  # and a caption of them
    outs = [decode(um, prompt, 6, Chooser(guided=False, temperature=0.0), prompt_mask=mask,
                   logits_processor=um._text_only, use_cache=cache) for cache in (True, False)]  # fmt: skip
    assert torch.equal(outs[0], outs[1])


def test_loss_weighting_by_tokens_or_by_rows():
    from qlip.unified.model import reduce_nll

    nll = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 9.0, 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False], [False, False, False, False]])
    assert float(reduce_nll(nll, mask, "tokens")) == pytest.approx((4 * 1.0 + 5.0) / 5)  # the long row dominates
    assert float(reduce_nll(nll, mask, "rows")) == pytest.approx((1.0 + 5.0) / 2)  # a row without targets is left out
    with pytest.raises(ValueError, match="tokens, rows"):
        reduce_nll(nll, mask, "mean")


def test_mix_schedule_decays_the_text_share_linearly():
    s = MixSchedule((60, 1, 3), (12, 1, 3), horizon=100)
    assert s.ratios(0) == (60, 1, 3) and s.ratios(100) == (12, 1, 3) and s.ratios(500) == (12, 1, 3)
    assert s.ratios(50) == pytest.approx((36, 1, 3))
    assert s.shares(0) == pytest.approx((60 / 64, 1 / 64, 3 / 64))
    assert MixSchedule((60, 1, 3), (12, 1, 3), 100, enabled=False).ratios(0) == (12, 1, 3)
    with pytest.raises(ValueError, match="ratios"):
        MixSchedule((1, 1), (1, 1, 1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    """A 3-step language model and a 3-step unified model from it, both through `qlip train`."""

    root = tmp_path_factory.mktemp("um3")
    make_tiny_lm_with_image_tokens(root, tiny_tokenizer, SENTENCES)
    um = {"init": str(root / "lm" / "last"), "tokenizer": str(root / "tok"), "tokens": str(root / "tokens"),
          "start": [2, 1, 1], "end": [1, 1, 1], "horizon": 2, "eval_windows": 4, "eval_images": 2,
          "loss_weighting": "rows", "visual_bits": True, "visual_positions": True}  # fmt: skip
    write_tiny_run_config(root, root / "um", "unified", um)
    assert main(["train", str(root / "um.yaml")]) == 0
    return root


def test_lm_then_unified_training_through_the_cli(runs):
    import json

    from qlip.train.logger import read_metrics

    rows = read_metrics(runs / "um", kind=None)
    assert len([r for r in rows if "loss/tokens" in r]) == 3
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals and {"text_ppl", "text_ppl_init", "text_ppl_change", "cap/all"} <= set(evals[-1]), evals
    cfg = json.loads((runs / "um" / "last" / "config.json").read_text())
    assert cfg["format"] == "qlip-um3" and cfg["reference"]["text_ppl"] > 1
    assert json.loads((runs / "lm" / "last" / "config.json").read_text())["format"] == "qlip-lm"
    assert (runs / "um" / "last" / "qlip" / "config.json").is_file() and (runs / "um" / "grids" / "final.png").is_file()


def test_load_completes_captions_and_generates(runs):
    from PIL import Image

    from qlip.unified import UnifiedInputError, load

    um = load(runs / "um" / "last")
    assert isinstance(um.complete("the quick", max_new_tokens=5, seed=1), str)
    assert um.complete("the quick", max_new_tokens=5, seed=1) == um.complete("the quick", max_new_tokens=5, seed=1)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    assert isinstance(um.caption(image, max_new_tokens=4), str)
    images = um.generate(["a red circle", "a blue square"], cfg_scale=2.0, seed=0)
    assert len(images) == 2 and images[0].size == (32, 32)
    tokens = um.generate_tokens("a red circle", cfg_scale=1.0, seed=3)
    assert tokens.shape == (1, 4, 4) and int(tokens.max()) < 256
    for bad in (lambda: um.complete("  "), lambda: um.complete(image), lambda: um.generate([""]),
                lambda: um.caption(torch.zeros(3, 3, dtype=torch.long)),
                lambda: um.caption(torch.full((4, 4), 1 << 9)), lambda: um.generate(["a"], cfg_scale=-1)):
        with pytest.raises(UnifiedInputError):
            bad()
    lm = load(runs / "lm" / "last")
    assert isinstance(lm.complete("a function"), str)
    with pytest.raises(UnifiedInputError, match="text-only"):
        lm.caption(image)


def test_complete_cli_and_its_user_errors(runs, capsys):
    assert main(["complete", "--model", str(runs / "lm" / "last"), "the quick", "--max-new-tokens", "4"]) == 0
    assert main(["complete", "--model", str(runs / "um" / "last"), "the quick", "--seed", "2"]) == 0
    capsys.readouterr()
    assert main(["complete", "--model", str(runs / "lm" / "last"), "   "]) == 2
    assert main(["complete", "--model", str(runs / "tok"), "the quick"]) == 2  # a QLIP model, not an LM
    assert main(["complete", "--model", str(runs / "lm" / "last"), "the", "--image", "x.png"]) == 2
    assert main(["complete", "--model", str(runs / "lm" / "last"), "the", "--top-p", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 4


def test_generate_cli_takes_a_unified_model_and_refuses_a_text_only_one(runs, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "samples"
    assert main(["generate", "a red circle", "--model", str(runs / "um" / "last"), "--n", "2", "--cfg", "2",
                 "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    assert sorted(p.name for p in out.glob("*.png")) == ["000-00.png", "000-01.png"]
    assert Image.open(out / "000-00.png").size == (32, 32)
    capsys.readouterr()
    assert main(["generate", "a red circle", "--model", str(runs / "lm" / "last"), "--out", str(tmp_path / "t"),
                 "--device", "cpu"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "text-only" in err and "Traceback" not in err


def test_chat_cli_describes_an_image_with_a_unified_model(runs, tmp_path, capsys, caplog):
    from PIL import Image

    from qlip.unified import load

    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    um = runs / "um" / "last"
    assert main(["chat", "--model", str(um), "--image", str(image), "Describe the image.", "--max-new-tokens", "6",
                 "--temperature", "1", "--top-p", "0.95", "--seed", "4", "--device", "cpu"]) == 0  # fmt: skip
    answer = capsys.readouterr().out.strip()
    expected = load(um).caption(Image.open(image).convert("RGB"), max_new_tokens=6, temperature=1.0, top_p=0.95,
                                seed=4)  # fmt: skip
    assert answer == expected.strip()
    with caplog.at_level("WARNING"):
        assert main(["chat", "--model", str(um), "--image", str(image), "What color is it?", "--device", "cpu"]) == 0
    assert "not read" in caplog.text
    capsys.readouterr()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert main(["chat", "--model", str(um), "--image", str(tmp_path / "broken.png"), "Describe the image."]) == 2
    assert main(["chat", "--model", str(runs / "lm" / "last"), "--image", str(image), "Describe the image."]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 2 and "text-only" in err


def test_config_errors_name_what_to_change(runs, tmp_path, capsys):
    from qlip.train.config import ConfigError, load_config

    cfg = yaml.safe_load((runs / "um.yaml").read_text())
    cfg["unified"]["start"] = [1, 1]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="ratios"):
        load_config([str(tmp_path / "a.yaml")])
    with pytest.raises(ConfigError, match="unified.loss_weighting must be one of tokens, rows"):
        load_config([str(runs / "um.yaml")], ["unified.loss_weighting=mean"])
    cfg = yaml.safe_load((runs / "um.yaml").read_text())
    cfg["unified"]["init"] = str(runs / "tok")  # a QLIP model, not a language model
    cfg["run_dir"] = str(tmp_path / "r")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "b.yaml")]) == 2
    cfg = yaml.safe_load((runs / "um.yaml").read_text())
    cfg["unified"]["parts"] = 3  # 8-bit tokens do not split into 3 sub-tokens
    cfg["run_dir"] = str(tmp_path / "c")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "3 equal parts" in err and "qlip" in err


def test_eval_unified_writes_one_report(runs, tmp_path, capsys):
    import json

    from qlip.eval.judge import train_judge
    from qlip.unified.evaluate import caption_accuracy

    train_judge(tmp_path / "judge", steps=2, num_train=32, num_eval=16)
    spec = "shapes:easy?holdout_combinations=0.1&eval_combinations=held_out&image_size=32"
    out = tmp_path / "report"
    assert main(["eval", "unified", "--model", str(runs / "um" / "last"), "--judge", str(tmp_path / "judge"),
                 "--data", spec, "--limit", "3", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    for key in ("text_ppl", "text_ppl_init", "text_ppl_change", "cap/shape", "cap/color", "cap/position", "cap/all",
                "gen/shape", "gen/all"):
        assert key in metrics, key
    assert (out / "report.md").is_file() and (out / "samples.png").is_file()
    capsys.readouterr()
    assert main(["eval", "unified", "--model", str(runs / "lm" / "last"), "--judge", "none", "--out",
                 str(tmp_path / "r2")]) == 2  # a text-only LM
    assert main(["eval", "unified", "--model", str(runs / "tok"), "--out", str(tmp_path / "r3")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    # the scoring itself
    got = caption_accuracy(["a red circle at the top.", "a blue star", "a red star in the center."],
                           ["a large red circle at the top.", {"shape": "circle", "color": "blue", "position": "top"},
                            "a small red circle in the center."])  # fmt: skip
    assert got["cap/color"] == 100.0 and got["cap/shape"] == pytest.approx(100 / 3)
    assert got["cap/position"] == pytest.approx(200 / 3) and got["cap/all"] == pytest.approx(100 / 3)


@pytest.mark.slow
def test_fsdp_two_ranks_train_the_unified_model_through_its_loss_path(runs, tmp_path):
    """The training loss reads the output head's weight inside the model's forward (only at the targets): under FSDP2
    on 2 CPU ranks that weight is whole there, the run finishes, and the export loads and completes text."""
    from qlip.unified import load
    from train_helpers import join_ranks, start_ranks

    cfg = yaml.safe_load((runs / "um.yaml").read_text())
    cfg["run_dir"] = str(tmp_path / "fsdp")
    cfg["eval"] = {"at_end": False}  # in-training checks are rank 0's alone: refused under FSDP
    cfg["distributed"] = {"threads": 1, "strategy": "fsdp"}
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(cfg))
    results = join_ranks(start_ranks(tmp_path / "fsdp.yaml", tmp_path / "ranks"), tmp_path / "ranks")
    assert [r["step"] for r in results] == [3, 3]
    um = load(tmp_path / "fsdp" / "last")
    assert isinstance(um.complete("the quick", max_new_tokens=3, seed=0), str)


def test_train_starts_its_own_worker_processes(runs, tmp_path, capsys):
    """`distributed.processes: 2`: `qlip train` runs the config in two local data-parallel workers (torchrun's
    environment, per-process batch), and a config mistake is still one line and exit 2."""
    from train_helpers import list_steps, load_ckpt

    cfg = yaml.safe_load((runs / "um.yaml").read_text())
    cfg["run_dir"] = str(tmp_path / "two")
    cfg["eval"] = {"at_end": False}
    cfg["distributed"] = {"threads": 1, "processes": 2}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "two.yaml")]) == 0
    steps = list_steps(tmp_path / "two")
    assert steps[-1] == 3 and load_ckpt(tmp_path / "two", 3)["world_size"] == 2
    assert (tmp_path / "two" / "last" / "config.json").is_file()
    capsys.readouterr()
    assert main(["train", str(tmp_path / "two.yaml"), "distributed.processes=0"]) == 2
    assert "distributed.processes must be >= 1" in capsys.readouterr().err
    from qlip.train.config import ConfigError, load_config
    from qlip.train.loop import train

    cfg = load_config([str(tmp_path / "two.yaml")], [])
    with pytest.raises(ConfigError, match="the same global batch"):  # from Python: one process, never a silent half
        train(cfg)
    one = cfg.as_one_process()
    assert (one.distributed.processes, one.data.batch_size) == (1, 2 * cfg.data.batch_size)
