"""A small SigLIP-style vision transformer taking NaViT-packed inputs.

Images of any patch grid come packed as `[n, 3, patch, L * patch]` (each image's patches laid
side by side, row-major, zero padded to the longest) with `tgt_sizes[i] = (rows, cols)` and a
patch attention mask `[n, 1, L]`. A plain `[n, 3, H, W]` batch (MiniCPM-V 2.0) works too. Patch
positions are bucketed onto the fixed `image_size / patch_size` position grid, as in NaViT.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput


class VisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)

    def position_ids(self, tgt_sizes, max_patches, device):
        side = self.num_patches_per_side
        ids = torch.zeros(len(tgt_sizes), max_patches, dtype=torch.long, device=device)
        for i, (h, w) in enumerate(tgt_sizes.tolist()):
            rows = torch.arange(h, device=device) * side // h
            cols = torch.arange(w, device=device) * side // w
            ids[i, : h * w] = (rows[:, None] * side + cols[None, :]).reshape(-1)
        return ids

    def forward(self, pixel_values, tgt_sizes):
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [n, L, dim], row-major patch order
        return patches + self.position_embedding(self.position_ids(tgt_sizes, patches.shape[1], patches.device))


class VisionAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, attention_bias):
        n, length, _ = hidden_states.shape

        def heads(x):
            return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
        weights = (q @ k.transpose(2, 3)) * self.scale + attention_bias
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = nn.functional.dropout(weights, p=self.dropout, training=self.training)
        out = (weights @ v).transpose(1, 2).reshape(n, length, -1)
        return self.out_proj(out)


class VisionMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, hidden_states, attention_bias):
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), attention_bias)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class VisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states, attention_bias):
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_bias)
        return hidden_states


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def embed(self, pixel_values, patch_attention_mask=None, tgt_sizes=None):
        """Patch embeddings, with the patch mask and grid sizes filled in for a plain batch."""
        n = pixel_values.shape[0]
        patch = self.config.patch_size
        grid = (pixel_values.shape[2] // patch, pixel_values.shape[3] // patch)
        if tgt_sizes is None:
            tgt_sizes = torch.tensor([grid] * n, dtype=torch.int32)
        if patch_attention_mask is None:
            patch_attention_mask = torch.ones(n, 1, grid[0] * grid[1], dtype=torch.bool, device=pixel_values.device)
        return self.embeddings(pixel_values, tgt_sizes), patch_attention_mask, tgt_sizes

    def forward(self, pixel_values, patch_attention_mask=None, tgt_sizes=None):
        n = pixel_values.shape[0]
        hidden_states, patch_attention_mask, tgt_sizes = self.embed(pixel_values, patch_attention_mask, tgt_sizes)
        keep = patch_attention_mask.reshape(n, 1, 1, -1).to(hidden_states.device)
        attention_bias = torch.zeros(keep.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        attention_bias = attention_bias.masked_fill(~keep, torch.finfo(hidden_states.dtype).min)
        hidden_states = self.encoder(hidden_states, attention_bias)
        return BaseModelOutput(last_hidden_state=self.post_layernorm(hidden_states))
