"""LoRA adapters: a fresh adapter changes nothing, merging changes nothing, only adapters train and are saved."""

from __future__ import annotations

import pytest
import torch

from qlip.ar import ARConfig, ARTransformer
from qlip.nn.lora import LoRALinear, add_lora, load_lora_state_dict, lora_state_dict, merge_lora


def _core() -> ARTransformer:
    torch.manual_seed(0)
    return ARTransformer(ARConfig(vocab_size=32, width=32, depth=2, heads=2, max_seq_len=16)).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))


def test_a_fresh_adapter_gives_identical_outputs():
    core, ids = _core(), _ids()
    before = core(ids)
    names = add_lora(core, ["attn.qkv", "proj"], rank=4, alpha=8, dropout=0.1)
    assert names == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert torch.equal(core(ids), before)


def test_only_adapters_require_grad_and_are_saved():
    core = _core()
    add_lora(core, ["qkv"], rank=2, alpha=2)
    trainable = sorted(n for n, p in core.named_parameters() if p.requires_grad)
    assert trainable == [f"blocks.{i}.attn.qkv.lora_{ab}" for i in range(2) for ab in "ab"]
    core(_ids()).sum().backward()
    assert all(p.grad is None for n, p in core.named_parameters() if "lora_" not in n)
    assert core.blocks[0].attn.qkv.lora_a.grad is not None
    assert sorted(lora_state_dict(core)) == trainable


def test_merged_equals_unmerged_and_adapters_reload():
    core, ids = _core(), _ids()
    add_lora(core, ["qkv", "mlp.w3"], rank=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        for layer in core.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_b.normal_(std=0.1)  # a trained adapter
    adapted = core(ids)  # eval mode: dropout off
    saved = lora_state_dict(core)
    other = _core()
    add_lora(other, ["qkv", "mlp.w3"], rank=4, alpha=8)
    load_lora_state_dict(other, saved)
    torch.testing.assert_close(other(ids), adapted)
    merge_lora(core)
    assert not any(isinstance(m, LoRALinear) for m in core.modules())
    assert type(core.blocks[0].attn.qkv) is torch.nn.Linear
    torch.testing.assert_close(core(ids), adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_core()(ids), adapted)  # the adapter did change the model


def test_mistakes_are_named():
    with pytest.raises(ValueError, match=r"\['nope'\] match no nn.Linear"):
        add_lora(_core(), ["qkv", "nope"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(_core(), ["qkv"], rank=0)
    core = _core()
    add_lora(core, ["qkv"], rank=2)
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(core, {})
