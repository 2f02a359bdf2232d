"""Perceiver-style resampler: `query_num` learnable queries cross-attend to the vision patches.

The 2D sin-cos position table is a non-persistent buffer: it is not in the weights file, so the
model's `_init_weights` must refill it after `from_pretrained` (transformers 5 loads on the meta
device and re-creates such buffers empty).
"""

import math

import torch
from torch import nn


def sincos_pos_embed_1d(embed_dim, positions):
    """[len(positions), embed_dim]: sin of position * frequency, then cos, frequencies 1/10000^(2i/d)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device="cpu") / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(embed_dim, grid_size):
    """[height, width, embed_dim] float32 table: half the channels encode the row, half the column."""
    height, width = grid_size
    rows = torch.arange(height, device="cpu").repeat_interleave(width)
    cols = torch.arange(width, device="cpu").repeat(height)
    table = torch.cat([sincos_pos_embed_1d(embed_dim // 2, rows), sincos_pos_embed_1d(embed_dim // 2, cols)], dim=1)
    return table.reshape(height, width, embed_dim).to(torch.float32)


class Resampler(nn.Module):
    def __init__(self, num_queries, embed_dim, num_heads, kv_dim, max_size=(70, 70)):
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.max_size = tuple(max_size)

        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter((embed_dim**-0.5) * torch.randn(embed_dim, embed_dim))
        self.register_buffer("pos_embed", self.compute_pos_embed(), persistent=False)

    def compute_pos_embed(self):
        return sincos_pos_embed_2d(self.embed_dim, self.max_size)

    def forward(self, x, tgt_sizes):
        """x: [n_images, max_patches, kv_dim]; tgt_sizes: [n_images, 2] patch rows and columns."""
        n_images, max_patches, _ = x.shape
        tgt_sizes = tgt_sizes.to(torch.long)
        if int(tgt_sizes[:, 0].max()) > self.max_size[0] or int(tgt_sizes[:, 1].max()) > self.max_size[1]:
            raise ValueError(f"image of {tgt_sizes.tolist()} patches exceeds the resampler's {self.max_size}")
        patch_counts = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        key_padding_mask = torch.arange(max_patches, device=x.device)[None, :] >= patch_counts.to(x.device)[:, None]

        pos_embed = torch.zeros(n_images, max_patches, self.embed_dim, dtype=x.dtype, device=x.device)
        for i, (h, w) in enumerate(tgt_sizes.tolist()):
            pos_embed[i, : h * w] = self.pos_embed[:h, :w].reshape(h * w, -1).to(x.dtype)

        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [patches, images, dim]
        q = self.ln_q(self.query)
        out = self.attn(
            q.unsqueeze(1).expand(-1, n_images, -1),
            x + pos_embed.permute(1, 0, 2),
            x,
            key_padding_mask=key_padding_mask,
        )[0]
        out = self.ln_post(out.permute(1, 0, 2))
        return out @ self.proj


def default_num_heads(embed_dim):
    """The real models use one head per 128 channels; tiny widths still get one head."""
    return max(1, math.floor(embed_dim / 128))
