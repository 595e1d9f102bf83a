"""An independent, functional re-statement of QLIP's forward math over a RELEASED-layout state dict.

Written from the paper and the released checkpoint configs (encoder, BSQ, decoder, text tower) with plain loops
and torch ops, sharing no code with the library: tests compare the library (after key mapping) against it. Slow
and simple on purpose.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rope_table(head_dim: int, grid: int, pretrain_grid: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles per (patch, channel) written out position by position."""
    quarter = head_dim // 4
    ang = torch.zeros(grid * grid, head_dim, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            n = r * grid + c
            for i in range(quarter):
                f = 10000.0 ** (-2 * i / (head_dim // 2))
                tr = r / grid * pretrain_grid
                tc = c / grid * pretrain_grid
                ang[n, 2 * i] = ang[n, 2 * i + 1] = tr * f  # first half: row angles, interleaved pairs
                ang[n, head_dim // 2 + 2 * i] = ang[n, head_dim // 2 + 2 * i + 1] = tc * f
    return ang.cos().float(), ang.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return x * cos + out * sin


def linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def layer_norm(sd, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def eva_block(sd, p, x, heads, eps, rope, shift):
    h = layer_norm(sd, f"{p}.layer_norm1", x, eps)
    b, n, w = h.shape
    dh = w // heads
    q = linear(sd, f"{p}.self_attn.q_proj", h).view(b, n, heads, dh).transpose(1, 2)
    k = F.linear(h, sd[f"{p}.self_attn.k_proj.weight"]).view(b, n, heads, dh).transpose(1, 2)
    v = linear(sd, f"{p}.self_attn.v_proj", h).view(b, n, heads, dh).transpose(1, 2)
    if rope is not None:
        cos, sin = rope
        q = torch.cat([q[:, :, :shift], rotate(q[:, :, shift:], cos, sin)], dim=2)
        k = torch.cat([k[:, :, :shift], rotate(k[:, :, shift:], cos, sin)], dim=2)
    att = torch.softmax((q / math.sqrt(dh)) @ k.transpose(-1, -2), dim=-1)
    o = (att @ v).transpose(1, 2).reshape(b, n, w)
    o = layer_norm(sd, f"{p}.self_attn.inner_attn_ln", o, eps)
    x = x + linear(sd, f"{p}.self_attn.out_proj", o)
    h = layer_norm(sd, f"{p}.layer_norm2", x, eps)
    hid = F.silu(linear(sd, f"{p}.mlp.w1", h)) * linear(sd, f"{p}.mlp.w2", h)
    hid = layer_norm(sd, f"{p}.mlp.ffn_ln", hid, eps)
    return x + linear(sd, f"{p}.mlp.w3", hid)


def encode(sd, cfg, images):
    """-> (image embedding, pre-quant latents u (B, N, d))."""
    v = cfg["vision_config"]
    heads, layers, eps, p = v["num_attention_heads"], v["num_hidden_layers"], v["layer_norm_eps"], v["patch_size"]
    g = v["image_size"] // p
    x = F.conv2d(images, sd["vision_model.embeddings.patch_embedding.weight"],
                 sd["vision_model.embeddings.patch_embedding.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)
    cls = sd["vision_model.embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["vision_model.embeddings.position_embedding.weight"]
    rope = rope_table(v["hidden_size"] // heads, g)
    for i in range(layers):
        x = eva_block(sd, f"vision_model.encoder.layers.{i}", x, heads, eps, rope, shift=1)
    emb = linear(sd, "visual_projection", layer_norm(sd, "vision_model.post_layernorm", x[:, 0], eps))
    u = linear(sd, "vision_model.quant_embed.c_proj", F.gelu(linear(sd, "vision_model.quant_embed.c_fc", x[:, 1:])))
    return emb, u


def quantize(u):
    d = u.shape[-1]
    u = F.normalize(u, dim=-1)
    q = torch.where(u > 0, 1.0, -1.0)
    bits = (q > 0).long()
    index = torch.zeros(u.shape[:-1], dtype=torch.long)
    for k in range(d):
        index = index * 2 + bits[..., k]
    return q / math.sqrt(d), index


def decode(sd, cfg, codes):
    dc = cfg["decoder_config"]
    heads, layers, eps, p = dc["num_attention_heads"], dc["num_hidden_layers"], dc["layer_norm_eps"], dc["patch_size"]
    g = dc["image_size"] // p
    x = linear(sd, "vision_model.quant_embed_post.c_proj",
               F.gelu(linear(sd, "vision_model.quant_embed_post.c_fc", codes)))
    x = x + sd["vision_decoder.position_embeddings"]
    rope = rope_table(dc["hidden_size"] // heads, g)
    for i in range(layers):
        x = eva_block(sd, f"vision_decoder.encoder.layers.{i}", x, heads, eps, rope, shift=0)
    x = layer_norm(sd, "vision_decoder.norm", x, eps)
    x = linear(sd, "vision_decoder.conv_out", torch.tanh(linear(sd, "vision_decoder.ffn.0", x)))
    b = x.shape[0]
    img = torch.zeros(b, 3, g * p, g * p)
    for n in range(g * g):
        r, c = divmod(n, g)
        img[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = x[:, n].view(b, 3, p, p)
    return img


def encode_text(sd, cfg, ids):
    t = cfg["text_config"]
    heads, layers, eps = t["num_attention_heads"], t["num_hidden_layers"], t.get("layer_norm_eps", 1e-5)
    n = ids.shape[1]
    x = sd["text_model.embeddings.token_embedding.weight"][ids]
    x = x + sd["text_model.embeddings.position_embedding.weight"][:n]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        h = layer_norm(sd, f"{p}.layer_norm1", x, eps)
        b, _, w = h.shape
        dh = w // heads
        q, k, v = (linear(sd, f"{p}.self_attn.{s}_proj", h).view(b, n, heads, dh).transpose(1, 2) for s in "qkv")
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + mask, dim=-1)
        x = x + linear(sd, f"{p}.self_attn.out_proj", (att @ v).transpose(1, 2).reshape(b, n, w))
        h = layer_norm(sd, f"{p}.layer_norm2", x, eps)
        x = x + linear(sd, f"{p}.mlp.fc2", F.gelu(linear(sd, f"{p}.mlp.fc1", h)))
    x = layer_norm(sd, "text_model.final_layer_norm", x, eps)
    pooled = x[torch.arange(x.shape[0]), ids.argmax(-1)]
    return F.linear(pooled, sd["text_projection.weight"])
