"""Training configuration, optimizers, schedule and the CLIP-tower key mapping."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qlip import create_model
from qlip.train.config import ConfigError, TrainConfig, load_config, parse_override, split_cli_args
from qlip.train.optim import LAMB, lr_factor, param_groups
from qlip.weights import load_clip_towers, translate_clip_key

torch.set_num_threads(1)


def test_defaults_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 1.0e-3, steps: 50, warmup_steps: 5}\ndata: {batch_size: 8, shapes: {sizes: [large]}}\n")
    frag = tmp_path / "frag.yaml"
    frag.write_text("optim: {steps: 60}\n")
    cfg = load_config([f, frag], ["optim.lr=3e-4", "data.shapes.rotation_deg=5", "init=null", "stage=2"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # YAML reads 3e-4 as a float here
    assert cfg.optim.steps == 60  # the later file wins
    assert cfg.data.batch_size == 8 and cfg.data.shapes == {"sizes": ["large"], "rotation_deg": 5}
    assert cfg.stage == 2 and cfg.init is None
    assert cfg.optim.weight_decay == TrainConfig().optim.weight_decay  # untouched default
    # the resolved config round-trips
    out = tmp_path / "resolved.yaml"
    cfg.save(out)
    assert load_config(out).to_dict() == cfg.to_dict()


def test_unknown_keys_name_the_key_and_list_valid_ones():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*valid keys under optim: .*lr"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'nosuch'.*model, data"):
        load_config(None, ["nosuch=1"])


def test_shapes_only_options_live_under_data_shapes_training(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  shapes_training: {group_by: [color], group_size: 4, bpe_captions: 300}\n")
    cfg = load_config(f, ["data.shapes_training.grouped_fraction=0.75"])
    st = cfg.data.shapes_training
    assert (st.group_by, st.group_size, st.grouped_fraction, st.bpe_captions) == (["color"], 4, 0.75, 300)
    assert not any(k in cfg.to_dict()["data"] for k in ("group_by", "bpe_captions"))  # not in the general section
    for old in ("bpe_vocab_size", "bpe_captions", "group_by", "group_size", "grouped_fraction"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"data.{old}=1"])
        assert str(err.value) == f"config key 'data.{old}' is now 'data.shapes_training.{old}'; rename it"
    f.write_text("data: {group_by: [color]}\n")  # an old YAML file says the same
    with pytest.raises(ConfigError, match=r"'data\.group_by' is now 'data\.shapes_training\.group_by'"):
        load_config(f)


def test_type_and_value_errors():
    with pytest.raises(ConfigError, match="data.batch_size must be an integer"):
        load_config(None, ["data.batch_size=abc"])
    with pytest.raises(ConfigError, match="eval.every=50 .* cannot be used with distributed.strategy=fsdp"):
        load_config(None, ["distributed.strategy=fsdp", "eval.every=50"])
    fsdp = ["distributed.strategy=fsdp", "eval.every=0", "eval.at_end=false"]
    assert load_config(None, fsdp).distributed.strategy == "fsdp"
    with pytest.raises(ConfigError, match="grad-norm cannot be used with distributed.strategy=fsdp"):
        load_config(None, [*fsdp, "loss.balance.mode=grad-norm"])
    with pytest.raises(ConfigError, match="optim.name='sgd'"):
        load_config(None, ["optim.name=sgd"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(None, ["optim.steps=10", "optim.warmup_steps=20"])
    with pytest.raises(ConfigError, match="key.subkey=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="neither a .yaml"):
        split_cli_args(["configs/x.json"])


def test_param_groups_no_decay_and_module_rates():
    model = create_model("qlip-tiny")
    cfg = load_config(None, ["optim.lr=1e-3", "optim.lr_text=1e-5", "optim.lr_decoder=2e-3"]).optim
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[id(p)] for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]]
    assert "logit_scale" in no_decay and "visual.pos_embed" in no_decay and "visual.class_embedding" in no_decay
    assert "text.token_embed.weight" in no_decay and "visual.transformer.blocks.0.norm1.bias" in no_decay
    decayed = [names[id(p)] for g in groups.values() if g["weight_decay"] > 0 for p in g["params"]]
    assert "visual.transformer.blocks.0.mlp.w3.weight" in decayed and "decoder.head.out.weight" in decayed
    assert groups["text"]["lr"] == 1e-5 and groups["decoder"]["lr"] == 2e-3 and groups["visual"]["lr"] == 1e-3
    assert groups["bottleneck"]["lr"] == 1e-3
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))


def test_warmup_cosine_schedule():
    f = [lr_factor(s, steps=100, warmup_steps=10, min_lr_ratio=0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.1 + 0.9 * 0.5)
    assert f[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[10:], f[11:]))


def test_lamb_trust_ratio_matches_hand_computation():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    w0 = w.detach().clone()
    opt = LAMB([w], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    g = torch.randn(4, 3)
    w.grad = g.clone()
    opt.step()
    m_hat, v_hat = g, g * g  # bias-corrected first moments after one step
    update = m_hat / (v_hat.sqrt() + 1e-6) + 0.01 * w0
    expected = w0 - 0.1 * (w0.norm() / update.norm()) * update
    torch.testing.assert_close(w.detach(), expected)
    # the step size is proportional to ||w||: a layer twice as large moves twice as far
    assert (w.detach() - w0).norm() == pytest.approx(0.1 * w0.norm().item(), rel=1e-5)


def _openclip_state(model, width, text_width, embed_dim):
    """A synthetic OpenCLIP ViT state dict with the shapes of our tiny model (GELU vision MLP, ln_pre)."""
    g = model.cfg.vision.grid_size
    sd = {
        "visual.conv1.weight": torch.randn(width, 3, 8, 8),
        "visual.class_embedding": torch.randn(width),
        "visual.positional_embedding": torch.randn(g * g + 1, width),
        "visual.ln_pre.weight": torch.randn(width),
        "visual.ln_post.weight": torch.randn(width),
        "visual.ln_post.bias": torch.randn(width),
        "visual.proj": torch.randn(width, embed_dim),
        "token_embedding.weight": torch.randn(1024, text_width),
        "positional_embedding": torch.randn(32, text_width),
        "ln_final.weight": torch.randn(text_width),
        "ln_final.bias": torch.randn(text_width),
        "text_projection": torch.randn(text_width, embed_dim),
        "logit_scale": torch.tensor(4.0),
    }
    for i in range(2):
        for tower, w in (("visual.transformer", width), ("transformer", text_width)):
            p = f"{tower}.resblocks.{i}"
            sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"] = torch.randn(w), torch.randn(w)
            sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"] = torch.randn(w), torch.randn(w)
            sd[f"{p}.attn.in_proj_weight"], sd[f"{p}.attn.in_proj_bias"] = torch.randn(3 * w, w), torch.randn(3 * w)
            sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"] = torch.randn(w, w), torch.randn(w)
            sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"] = torch.randn(64, w), torch.randn(64)
            sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"] = torch.randn(w, 64), torch.randn(w)
    return sd


def test_openclip_layout_is_placed_and_unplaceable_keys_reported():
    torch.manual_seed(0)
    model = create_model("qlip-tiny")
    sd = _openclip_state(model, 32, 32, 32)
    report = load_clip_towers(model, sd)
    own = model.state_dict()
    torch.testing.assert_close(own["visual.proj.weight"], sd["visual.proj"].t())
    torch.testing.assert_close(own["text.proj.weight"], sd["text_projection"].t())
    qkv = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    torch.testing.assert_close(own["visual.transformer.blocks.1.attn.q.weight"], qkv[:32])
    torch.testing.assert_close(own["visual.transformer.blocks.1.attn.v.weight"], qkv[64:])
    text_qkv_bias = sd["transformer.resblocks.0.attn.in_proj_bias"]
    torch.testing.assert_close(own["text.transformer.blocks.0.attn.k.bias"], text_qkv_bias[32:64])
    fc2 = sd["transformer.resblocks.1.mlp.c_proj.weight"]
    torch.testing.assert_close(own["text.transformer.blocks.1.mlp.fc2.weight"], fc2)
    torch.testing.assert_close(own["logit_scale"], sd["logit_scale"])
    unplaced = " ".join(report.unplaced)
    assert "visual.ln_pre.weight" in unplaced and "visual.transformer.resblocks.0.mlp.c_fc.weight" in unplaced
    assert "attn.k.bias" in unplaced  # our EVA02 vision attention has no key bias
    assert "visual.transformer.blocks.0.mlp.w1.weight" in report.unfilled  # SwiGLU stays at its init
    assert "visual.patch_embed.bias" in report.unfilled  # OpenAI's conv1 has no bias
    assert not any(k.startswith("text.") for k in report.unfilled)  # the text tower is complete


def test_eva_and_hf_layouts_translate():
    assert translate_clip_key("visual.blocks.3.attn.q_bias")[0][0] == "visual.transformer.blocks.3.attn.q.bias"
    ffn = "visual.transformer.blocks.0.mlp.ffn_norm.weight"
    assert translate_clip_key("visual.blocks.0.mlp.ffn_ln.weight")[0][0] == ffn
    assert translate_clip_key("visual.head.weight")[0][0] == "visual.proj.weight"
    assert translate_clip_key("text.ln_final.bias")[0][0] == "text.final_norm.bias"
    assert translate_clip_key("vision_model.encoder.layers.2.self_attn.out_proj.bias")[0][0] == (
        "visual.transformer.blocks.2.attn.proj.bias")
    fc1 = "text.transformer.blocks.1.mlp.fc1.weight"
    assert translate_clip_key("text_model.encoder.layers.1.mlp.fc1.weight")[0][0] == fc1
    assert translate_clip_key("vision_model.pre_layrnorm.weight") == []
    # EVA-CLIP cls token / pos embed lose their leading singleton dims
    model = create_model("qlip-tiny")
    g = model.cfg.vision.grid_size
    sd = {"visual.cls_token": torch.randn(1, 1, 32), "visual.pos_embed": torch.randn(1, g * g + 1, 32),
          "visual.blocks.0.attn.q_proj.weight": torch.randn(32, 32)}
    report = load_clip_towers(model, sd, parts=("visual",))
    assert not report.unplaced
    torch.testing.assert_close(model.visual.class_embedding.detach(), sd["visual.cls_token"].reshape(32))
    assert math.isclose(float(model.visual.pos_embed[3, 5].detach()), float(sd["visual.pos_embed"][0, 3, 5]))


def test_qlip_train_cli_reports_config_errors(tmp_path, capsys):
    from qlip.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim: {steps: 5}\n")
    assert main(["train", str(cfg), "optim.nosuch=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.nosuch'" in err and "Traceback" not in err
    assert main(["balance", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_each_loss_weight_has_one_place_and_no_term_is_dropped_silently():
    from qlip.train.build import balance_config

    with pytest.raises(ConfigError, match="loss.balance.weights lacks commit: stage 2 weighs recon, quant, commit"):
        load_config(None, ["stage=2", "loss.balance.weights={recon: 2, quant: 1}"])
    with pytest.raises(ConfigError, match="lacks quant, commit"):
        load_config(None, ["loss.balance.weights={align: 1, recon: 1000}"])
    with pytest.raises(ConfigError, match="set loss.gan_weight instead"):
        load_config(None, ["stage=2", "loss.balance.weights={recon: 1, quant: 1, commit: 0, gan: 0.5}"])
    with pytest.raises(ConfigError, match="unknown term"):
        load_config(None, ["loss.balance.weights={align: 1, recon: 1, quant: 1, commit: 1, recno: 1}"])
    with pytest.raises(ConfigError, match="loss.gradient_weight must be >= 0"):
        load_config(None, ["loss.gradient_weight=-1"])
    # A complete stage-2 set changes those terms and keeps LPIPS and the GAN at their own keys' values.
    cfg = load_config(None, ["stage=2", "loss.balance.weights={recon: 2, quant: 1, commit: 0}", "loss.gan_weight=0.3"])
    assert balance_config(cfg).weights == {"recon": 2, "quant": 1, "commit": 0, "lpips": 0.1, "gan": 0.3}
    stage1 = balance_config(load_config(None, [])).weights
    assert stage1 == {"align": 1.0, "recon": 1000.0, "quant": 1.0, "commit": 1.0, "lpips": 0.0, "gan": 0.0}


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.to_dict()["run_dir"]


def test_the_llava15_recipes_have_llava15s_hyper_parameters():
    root = Path(__file__).resolve().parents[1] / "configs"
    s1, s2 = load_config(root / "vlm-llava15-stage1.yaml"), load_config(root / "vlm-llava15-stage2.yaml")
    for cfg in (s1, s2):
        opts = cfg.task_options
        assert (opts.lm, opts.layer, opts.projector, opts.feature) == ("hf", -2, "mlp2x_gelu", "layer")
        assert not opts.is_shapes and opts.image_root and cfg.distributed.precision == "bf16"
        assert cfg.optim.weight_decay == 0.0 and cfg.optim.warmup_steps == round(0.03 * cfg.optim.steps)
        assert opts.features == "stream" and cfg.data.num_workers >= 1  # no rank keeps 0.8 MB of features per image
    assert (s1.stage, s1.optim.lr, s1.data.batch_size * 8) == (1, 1e-3, 256)  # 8 GPUs
    assert (s2.stage, s2.optim.lr, s2.data.batch_size * 8) == (2, 2e-5, 128)
    assert (s1.task_options.lm_training(1), s2.task_options.lm_training(2)) == ("frozen", "full")
    assert s2.init == s1.run_dir + "/last"
    assert s1.optim.steps == math.ceil(558128 / 256) and s2.optim.steps == math.ceil(665298 / 128)  # one epoch
    lora_args = ["vlm.lm_train=lora", "vlm.lora.rank=128", "vlm.lora.alpha=256", "optim.lr=2e-4",
                 "vlm.projector_lr=2e-5", "distributed.strategy=ddp"]  # the LoRA variant its header gives
    lora = load_config(root / "vlm-llava15-stage2.yaml", lora_args)
    assert lora.task_options.lora.to_lm_config()["rank"] == 128 and lora.task_options.lm_training(2) == "lora"
    assert lora.task_options.projector_lr == 2e-5
