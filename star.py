"""
STAR: the scale-wise text-conditioned autoregressive transformer (arXiv 2406.10797).

An image is a pyramid of token maps (1x1, 2x2, ... 16x16 for 256px) produced by the multi-scale VQ-VAE
in tokenizer.py. STAR predicts each map from all coarser ones at once (section 3.1 of the paper), is
conditioned on a CLIP text encoding (clip_text.py) through a start token made from the pooled text and
through cross-attention in every block (3.2), places tokens with a 2D RoPE whose positions are
normalised to the same range at every scale (3.3), and can commit the tokens of its large scales over
several steps with a small "sampler head" (causal-driven stable sampling, 3.4).

Read top to bottom: config, normalized 2D RoPE, attention, block, sampler-head pieces, the model
(forward and loss, the sampler head), generation, loading of the released checkpoints.

    model = STAR.from_pretrained("star-256-d16.pth", vae, preset="star-256-d16")
    img = model.generate(hidden, mask, pooled, empty_hidden, empty_mask, empty_pooled, generator=g)

Tests: python -m pytest -q tests/test_star.py
"""
import math
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


@dataclass
class STARConfig:
    depth: int = 16                     # number of transformer blocks
    width: int = 1024                   # C; released models use depth * 64
    num_heads: int = 16                 # head dim = width / num_heads (64 in every released model)
    mlp_ratio: float = 4.0
    patch_nums: tuple = PATCH_NUMS_256  # side of the token map of every scale, coarse to fine
    vocab_size: int = 4096              # VQ-VAE codebook size V
    vae_dim: int = 32                   # VQ-VAE latent channels Cvae
    text_dim: int = 1024                # width of the text encoder's states (SD-2.1 CLIP: 1024)
    rope_theta: float = 10000.0
    rope_norm: float = 64.0             # every scale's positions span [0, rope_norm]
    logit_norm: bool = True             # non-affine LayerNorm before the output layer
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0         # stochastic depth for training (released: 0.1 * depth / 24)
    class_emb: bool = True              # keep the unused [1001, C] class table of the released files
    # 'batch_of_one': each prompt's cross-attention is computed on its conditional row and added to
    # both of its guidance rows (what the reference computes with one prompt; released weights).
    # 'per_row': plain per-row cross-attention, the unconditional rows attend to the empty prompt.
    cross_attn_mode: str = "per_row"
    # causal-driven stable sampling (sampler head)
    head: bool = False
    head_depth: int = 3
    sample_from_idx: int = 9            # first scale whose tokens are committed over several steps
    stable_steps: int = 8               # commit steps at the head's scales ...
    stable_steps_last: int = 15         # ... and at the last scale
    stable_trunk_steps: int = 5         # leading steps that sample from the trunk (not at the last scale)
    stable_random_steps: int = 5        # leading steps that commit in random order

    def __post_init__(self):
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if self.width % self.num_heads or (self.width // self.num_heads) % 4:
            raise ValueError(f"STARConfig: width {self.width} / num_heads {self.num_heads} must give a head "
                             "dim divisible by 4 (2D RoPE rotates half the pairs by columns, half by rows)")
        if self.cross_attn_mode not in ("batch_of_one", "per_row"):
            raise ValueError(f"STARConfig.cross_attn_mode is {self.cross_attn_mode!r}; "
                             "expected 'batch_of_one' or 'per_row'")
        if self.head and not 0 < self.sample_from_idx < len(self.patch_nums):
            raise ValueError(f"STARConfig.sample_from_idx {self.sample_from_idx} must name one of the "
                             f"scales 1..{len(self.patch_nums) - 1}")

    @property
    def seq_len(self):
        return sum(pn * pn for pn in self.patch_nums)

    @staticmethod
    def preset(name, **overrides):
        """The configuration of a released checkpoint, e.g. STARConfig.preset('star-256-d16')."""
        if name not in PRESETS:
            raise ValueError(f"unknown STAR preset {name!r}; expected one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


def _released(depth, patch_nums, head=False):
    return STARConfig(depth=depth, width=64 * depth, num_heads=depth, patch_nums=patch_nums,
                      drop_path_rate=0.1 * depth / 24, cross_attn_mode="batch_of_one", head=head)


PRESETS = {
    "star-256-d16": _released(16, PATCH_NUMS_256),
    "star-256-d30": _released(30, PATCH_NUMS_256),
    "star-512-d30": _released(30, PATCH_NUMS_512),
    "star-1024-d30": _released(30, PATCH_NUMS_1024),
    "star-1024-sampler": _released(30, PATCH_NUMS_1024, head=True),
}

# -----------------------------------------------------------------------------
# normalized 2D RoPE (paper section 3.3)


def rope_2d(pn, head_dim, theta, rope_norm):
    """Rotations of the pn*pn tokens of one scale: complex (pn*pn, head_dim // 2).

    A head vector is read as head_dim/2 complex numbers (adjacent channel pairs). The first half of
    these pairs is rotated by the token's column, the second half by its row, each pair at its own
    frequency theta^(-4k/head_dim). Plain RoPE would use the integer column 0..pn-1; here columns and
    rows are rescaled to [0, rope_norm] (pos / (pn - 1) * rope_norm), so the left edge is always 0,
    the right edge always rope_norm and the centre always rope_norm / 2, whatever pn is. A token of
    the 16x16 map and the token of the 4x4 map covering the same part of the image therefore get
    (nearly) the same angle, and attention between scales can match places by angle: "the same
    relative position means the same thing at every resolution", which lets one set of weights work
    on 1x1 up to 64x64 maps (and a model trained at 256px transfer to 1024px).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))  # (hd/4,)
    t = torch.arange(pn * pn, dtype=torch.float32)
    col, row = t % pn, torch.div(t, pn, rounding_mode="floor")             # row-major token order
    if pn > 1:
        col, row = col / col.max() * rope_norm, row / row.max() * rope_norm   # -> [0, rope_norm]
    angles = torch.cat([torch.outer(col, freqs), torch.outer(row, freqs)], dim=-1)  # (pn*pn, hd/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x_BHLc, rope_Lc2):
    """Rotate adjacent channel pairs of x (B, H, L, c) by rope (L, c/2, 2); computed in float32.

    rope holds the cosine and sine of every angle: torch.view_as_real of rope_2d's table (a complex
    table is taken as well). A pair (x0, x1) read as the complex number x0 + i x1, times cos + i sin, is
    (x0 cos - x1 sin, x0 sin + x1 cos): the same products and sums as the complex multiply, bit for bit,
    written with real tensors only, because torch.compile's code generators have no complex numbers.
    """
    if rope_Lc2.is_complex():
        rope_Lc2 = torch.view_as_real(rope_Lc2)
    cos, sin = rope_Lc2.unbind(-1)                                           # each (L, c/2)
    x0, x1 = x_BHLc.float().unflatten(-1, (-1, 2)).unbind(-1)                # each (B, H, L, c/2)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x_BHLc)

# -----------------------------------------------------------------------------
# attention, FFN, block


def layer_norm(x, eps):
    """Every LayerNorm of STAR is non-affine (no AdaLN in the released models).

    Mean and variance are taken in float32 whatever x's dtype (as the reference's fp32 LayerNorm under
    bf16 autocast); the result has x's dtype.
    """
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).type_as(x)


def drop_path(x, p, training):
    """Stochastic depth: drop a residual branch for whole samples with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class KVCache:
    """Preallocated keys/values of one self-attention for a whole generation: (N, H, L, c).

    Scale si writes its keys and values at its own positions begin:end and attends to positions 0:end
    (itself and every coarser scale). Both bounds are fixed per scale and the cache keeps no count of
    what it holds, so every scale's step has fixed shapes and no Python state changes inside it: what
    torch.compile needs to capture a scale as one graph (see STAR.compile_decoding).
    """

    def __init__(self, n, num_heads, seq_len, head_dim, device, dtype):
        self.k = torch.empty(n, num_heads, seq_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)

    def write(self, begin, k, v):
        end = begin + k.shape[2]
        self.k[:, :, begin:end] = k
        self.v[:, :, begin:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class QKNormAttention(nn.Module):
    """Shared parts of self- and cross-attention: L2-normalised q/k with a learned per-head scale.

    With q and k on the unit sphere, q.k is a cosine in [-1, 1]; a per-head temperature
    exp(scale_mul) (clamped at 100) replaces the usual 1/sqrt(c), so the softmax scale is 1.
    `zero_k_bias` is an all-zero buffer that only exists because the released checkpoints store it:
    the key projection has no bias, and the reference builds its bias vector as [q_bias, 0, v_bias].
    """

    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))

    def head_scale(self):
        return self.scale_mul_1H11.clamp(max=math.log(100.0)).exp()  # (1, H, 1, 1)

    def split_heads(self, x_BLC):
        B, L, _ = x_BLC.shape
        return x_BLC.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, c)


class SelfAttention(QKNormAttention):
    def __init__(self, width, num_heads):
        super().__init__(width, num_heads)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLC, rope_Lc2, mask=None, cache=None, begin=0):
        B, L, C = x_BLC.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # each (B, H, L, c)
        q, k = apply_rope(q, rope_Lc2), apply_rope(k, rope_Lc2)              # RoPE, then normalise
        q = F.normalize(q, dim=-1) * self.head_scale()
        k = F.normalize(k, dim=-1)
        if cache is not None:                                                # generation: the scale at
            k, v = cache.write(begin, k, v)                                  # begin sees all coarser ones
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # (B, H, L, c)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(QKNormAttention):
    """Image tokens (queries) attend to the text encoder's states (keys/values); no RoPE."""

    def __init__(self, width, num_heads, text_dim):
        super().__init__(width, num_heads)
        self.mat_kv = nn.Linear(text_dim, 2 * width, bias=False)
        self.mat_q = nn.Linear(width, width, bias=False)
        self.proj = nn.Linear(width, width)

    def text_kv(self, text_BTD, text_mask_BT):
        """Keys, values and padding mask of the text; computed once per generation."""
        B, T, _ = text_BTD.shape
        kv = F.linear(text_BTD, self.mat_kv.weight, torch.cat([self.zero_k_bias, self.v_bias]))
        k, v = kv.view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask_B11T = (text_mask_BT != 0)[:, None, None, :]                   # True = real token
        return F.normalize(k, dim=-1), v, mask_B11T

    def forward(self, x_BLC, text_kv):
        k, v, mask = text_kv                                                 # from text_kv() above
        B, L, C = x_BLC.shape
        q = F.normalize(self.split_heads(F.linear(x_BLC, self.mat_q.weight, self.q_bias)), dim=-1)
        out = F.scaled_dot_product_attention(q * self.head_scale(), k, v, attn_mask=mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the text (trunk only), FFN."""

    def __init__(self, config, drop_path_rate, cross=True):
        super().__init__()
        C, eps = config.width, config.norm_eps
        self.attn = SelfAttention(C, config.num_heads)
        self.cross_attn = CrossAttention(C, config.num_heads, config.text_dim) if cross else None
        self.ffn = FFN(C, round(C * config.mlp_ratio))
        self.eps, self.drop_path_rate = eps, drop_path_rate

    def ln(self, x):  # one non-affine LayerNorm, used before each of the three branches
        return layer_norm(x, self.eps)

    def forward(self, x_NLC, rope_Lc2, mask=None, text_kv=None, cache=None, begin=0):
        p = self.drop_path_rate
        x_NLC = x_NLC + drop_path(self.attn(self.ln(x_NLC), rope_Lc2, mask, cache, begin), p, self.training)
        if self.cross_attn is not None:
            # Cross-attention to the text (paper section 3.2). text_kv (CrossAttention.text_kv: keys,
            # values, mask) holds Bt rows. When Bt < N (guidance in 'batch_of_one' mode: N = 2 Bt rows
            # [cond; uncond]) only the first Bt rows are computed and row r's output is added to rows
            # r, r + Bt, ...: both guidance rows of a prompt get its conditional cross-attention.
            h_NLC = self.ln(x_NLC)
            Bt = text_kv[0].shape[0]
            x_NLC = x_NLC + self.cross_attn(h_NLC[:Bt], text_kv).repeat(x_NLC.shape[0] // Bt, 1, 1)
        return x_NLC + drop_path(self.ffn(self.ln(x_NLC)), p, self.training)

# -----------------------------------------------------------------------------
# causal-driven stable sampling: commit schedule (paper section 3.4)


def arccos_schedule(steps, pn):
    """How many of the pn*pn tokens to commit at each of `steps` steps (few first, more later).

    Step s gets a share proportional to arccos(1 - s/(steps-1)) (0 at the first step, growing
    fastest early on); the counts are rounded, every step commits at least one token and the last
    step takes the rounding remainder.
    """
    r = torch.linspace(1, 0, steps)                       # float32, as the reference
    v = torch.arccos(r) / (math.pi / 2)                   # 0 -> 1
    n = torch.round(v / v.sum() * pn * pn).int()
    n[n == 0] = 1
    n[-1] += pn * pn - n.sum()
    if n[-1] < 0:
        raise ValueError(f"arccos_schedule: {steps} steps are too many for a {pn}x{pn} map")
    return n.tolist()


def free_schedule(steps, pn, free_B):
    """Commit counts (B, steps) when each row has only free_B (B,) of its pn*pn positions left to commit.

    An edit commits its kept tokens before the first step; the rest follow the arccos schedule's
    cumulative share of the map: after step s, round(done_s / (pn*pn) * free) of a row's free positions
    are committed (done_s: what arccos_schedule has committed of the whole map by then). The counts may
    be 0 where few positions are free, they add up to `free` exactly, and with every position free they
    are arccos_schedule itself (integer arithmetic, so the ordinary path is unchanged).
    """
    done_S = torch.tensor(arccos_schedule(steps, pn)).cumsum(0)
    l, free_B1 = pn * pn, free_B.long().view(-1, 1)
    target_BS = (2 * done_S * free_B1 + l) // (2 * l)                  # rounded, half up
    return target_BS.diff(dim=1, prepend=torch.zeros_like(free_B1))

# -----------------------------------------------------------------------------
# sampling helpers


def guide(logits_NlV, t):
    """Classifier-free guidance on rows [cond; uncond]: (1 + t) * cond - t * uncond -> (N/2, l, V)."""
    B = logits_NlV.shape[0] // 2
    return (1 + t) * logits_NlV[:B] - t * logits_NlV[B:]


def sample_tokens(logits_BlV, top_k, top_p, generator=None):
    """Draw one token per position after top-k and top-p (nucleus) filtering.

    top_k <= 0 or >= V disables top-k; top_p <= 0 or >= 1 disables top-p, which keeps the smallest
    set of most likely tokens whose mass exceeds top_p. Filtering runs on the logits' device; the
    draw itself runs on the CPU with `generator` (a CPU torch.Generator, or None for torch's global
    RNG), so a seed gives the same tokens on every device up to float noise in the probabilities.
    Returns (idx_Bl, prob_Bl) on the CPU: the tokens and their probability after filtering.
    (Unlike the reference, tokens tied with the k-th largest logit are not kept as well.)
    """
    return draw_tokens(*filter_logits(logits_BlV, top_k, top_p), generator)


def filter_logits(logits_BlV, top_k, top_p):
    """The filtering half of sample_tokens: (probabilities (B, l, k), their token ids (B, l, k)).

    Runs on the logits' device without a host synchronisation (part of a compiled decoding step).
    """
    V = logits_BlV.shape[-1]
    k = top_k if 0 < top_k < V else V
    vals_Blk, cand_Blk = logits_BlV.float().topk(k, dim=-1)             # sorted, largest first
    if 0 < top_p < 1:
        probs = vals_Blk.softmax(-1)
        mass_before = probs.cumsum(-1) - probs                           # mass of the likelier ones
        vals_Blk = vals_Blk.masked_fill(mass_before >= top_p, -math.inf)  # never drops the first
    return vals_Blk.softmax(-1), cand_Blk


def draw_tokens(probs_Blk, cand_Blk, generator=None):
    """The drawing half of sample_tokens: one candidate per position, drawn on the CPU.

    This is where generation waits for the device: the probabilities come to the host for the draw.
    """
    B, l, k = probs_Blk.shape
    probs_Nk = probs_Blk.view(-1, k).cpu()
    pick_N1 = torch.multinomial(probs_Nk, 1, replacement=True, generator=generator)
    idx_Bl = cand_Blk.view(-1, k).gather(1, pick_N1.to(cand_Blk.device)).view(B, l).cpu()
    return idx_Bl, probs_Nk.gather(1, pick_N1).view(B, l)


def commit(idx_Bl, commit_step_Bl, new_idx_Bl, conf_Bl, n, step):
    """Commit the n positions of highest confidence (ties: lowest position first).

    n: one count for every row, or a count per row (B,) (edits, where rows keep different numbers
    of tokens). Positions committed before keep their token and step; only newly committed ones take
    new_idx. commit_step holds the step at which each position was committed (-1: not yet).
    """
    order_Bl = torch.sort(conf_Bl, dim=1, descending=True, stable=True).indices
    ranks_Bl = torch.arange(order_Bl.shape[1]).expand_as(order_Bl)
    rank_Bl = torch.empty_like(order_Bl).scatter_(1, order_Bl, ranks_Bl)
    chosen = rank_Bl < torch.as_tensor(n).view(-1, 1)          # the n most confident of each row
    new = chosen & (commit_step_Bl < 0)
    idx_Bl[new] = new_idx_Bl[new]
    commit_step_Bl[new] = step

# -----------------------------------------------------------------------------
# editing: which tokens of every scale an inpainting / outpainting edit keeps


def keep_masks(keep_BHW, patch_nums):
    """A pixel keep-mask (B, H, W) (True = keep) -> K bool maps (B, pn*pn), one per scale, row-major.

    Token (i, j) of a pn x pn map stands for the pixels F.interpolate(mode='area') averages into it:
    rows floor(i*H/pn) .. ceil((i+1)*H/pn) - 1, the same for columns. A token is kept when ANY pixel
    of its footprint is kept (area average > 0). So at the tiny scales, where one token covers both
    regions, the token is kept: the 1x1 token whenever anything is kept, the middle column of a 3x3
    map when the left half is kept. Why: the quantizer is residual. A kept 8x8 token does not stand
    for its pixels; it is the correction on top of the coarse tokens' reconstruction there, so the
    kept region comes out right only if every coarser token reaching it is the image's own too.
    Regenerating the straddling ones (keeping only tokens whose whole footprint is kept) put the
    kept half of a 64px shapes edit off by 87 grey levels on average (a new 1x1 token often means
    another background colour) against 0.3 this way. The price: the coarse straddling tokens carry
    the old content into the region to regenerate, and the free tokens of the finer scales must
    paint over it, which they do (see the README's editing numbers).
    """
    keep = keep_BHW.float()[:, None]                                       # (B, 1, H, W)
    return [F.interpolate(keep, size=(pn, pn), mode="area").flatten(1) > 0 for pn in patch_nums]

# -----------------------------------------------------------------------------
# the model


class STAR(nn.Module):

    def __init__(self, config, vae=None):
        super().__init__()
        self.config = config
        C, K = config.width, len(config.patch_nums)
        self._vae = (vae,)  # a tuple hides the VQ-VAE from state_dict(), .parameters() and .to()
        # Modules are registered in the order of the released checkpoints so that state_dict()
        # lists the keys exactly as they do.
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))               # start token position bias
        if config.head:
            self.pos_start_last = nn.Parameter(torch.zeros(1, 1, C))      # bias of the head's text token
        self.word_embed = nn.Linear(config.vae_dim, C)                    # latent -> token
        if config.class_emb:
            # Left over from class-conditional VAR: never used, but in every released checkpoint.
            self.class_emb = nn.Embedding(1001, C)
        self.lvl_embed = nn.Embedding(K, C)                               # which scale a token is on
        dpr = [config.drop_path_rate * i / max(config.depth - 1, 1)     # grows with depth
               for i in range(config.depth)]
        self.blocks = nn.ModuleList(Block(config, dpr[i]) for i in range(config.depth))
        # The trunk's output layer (C -> V), not part of the sampler head: the name is the released
        # checkpoints' key 'head_logits.weight' and must stay so that they load.
        self.head_logits = nn.Linear(C, config.vocab_size)
        self.encoder_proj = nn.Linear(config.text_dim, C)                 # pooled text -> start token
        if config.head:
            self.word_embed_head = nn.Linear(config.vae_dim, C)           # committed code vectors
            self.feat_extract_blocks = nn.ModuleList(
                Block(config, dpr[min(i, config.depth - 1)], cross=False) for i in range(config.head_depth))
            self.head_logits2 = nn.Linear(C, config.vocab_size)
            self.encoder_proj2 = nn.Linear(config.text_dim, C)            # pooled text -> head token
            self.head_proj = nn.Linear(2 * C, C)                          # [head input; trunk feature]
            self.lvl_embed_2 = nn.Embedding(K, C)

        self._make_tables()
        self.init_weights()

    def _make_tables(self):
        """Non-persistent tables (not in the checkpoints; they follow the model across devices)."""
        config, device = self.config, self.pos_start.device
        self.begin_ends = []                                               # token range of every scale
        for pn in config.patch_nums:
            start = self.begin_ends[-1][1] if self.begin_ends else 0
            self.begin_ends.append((start, start + pn * pn))
        lvl_L = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(config.patch_nums)])
        self.register_buffer("lvl_L", lvl_L.to(device), persistent=False)     # (L,) scale of each token
        rope = torch.cat([rope_2d(pn, config.width // config.num_heads, config.rope_theta, config.rope_norm)
                          for pn in config.patch_nums])
        self.rope_Lc2 = torch.view_as_real(rope).clone().to(device)            # (L, c/2, 2) cos, sin

    def _apply(self, fn, recurse=True):
        # .to(device, dtype), .half(), .cuda(), ... go through here. The RoPE table is a plain attribute,
        # not a buffer: .to(torch.bfloat16) would round the cosines and sines. It is rebuilt on the new
        # device instead and stays float32 whatever dtype the weights take.
        super()._apply(fn, recurse)
        self._make_tables()
        return self

    @property
    def rope_Lc(self):
        """The RoPE table as rotations, complex64 (L, c/2) (rope_2d's form); the model uses rope_Lc2."""
        return torch.view_as_complex(self.rope_Lc2)

    @property
    def vae(self):
        return self._vae[0]

    def init_weights(self):
        """Initialisation for training from scratch (the reference's init_weights)."""
        std = math.sqrt(1 / (3 * self.config.width))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
            elif isinstance(m, QKNormAttention):
                nn.init.constant_(m.scale_mul_1H11, math.log(4.0))
                nn.init.zeros_(m.q_bias)
                nn.init.zeros_(m.v_bias)
        for p in [self.pos_start] + ([self.pos_start_last] if self.config.head else []):
            nn.init.trunc_normal_(p, std=std)
        with torch.no_grad():
            self.head_logits.weight.mul_(0.02)
            for block in self.blocks:  # residual branches scaled down with depth (trunk only)
                block.attn.proj.weight.div_(math.sqrt(2 * self.config.depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * self.config.depth))

    def head_parameters(self):
        """The sampler head's parameters (what head training updates; the trunk stays frozen)."""
        names = ("pos_start_last", "word_embed_head.", "feat_extract_blocks.", "head_logits2.",
                 "encoder_proj2.", "head_proj.", "lvl_embed_2.")
        return [p for n, p in self.named_parameters() if n.startswith(names)]

    # ------------------------------------------------------------------ trunk

    def _check_text(self, name, hidden, pooled):
        D = self.config.text_dim
        if hidden.shape[-1] != D or pooled.shape[-1] != D:
            raise ValueError(f"{name}: text states of width {hidden.shape[-1]} / pooled {pooled.shape[-1]}, "
                             f"but this STAR model expects text_dim={D}; encode the prompts with the "
                             "text encoder the model was trained with")

    def start_tokens(self, text_pooled_ND):
        """Scale 0 has one token, made from the pooled text: (N, 1, C) (level embedding not added)."""
        return self.encoder_proj(text_pooled_ND)[:, None] + self.pos_start

    def hidden_states(self, x_BLCv, text_hidden, text_mask, text_pooled):
        """Teacher-forced trunk: the last block's output (B, L, C), before logit_norm.

        x_BLCv (B, L-1, Cvae) is the VQ-VAE's teacher-forcing input (tokenizer.idx_to_var_input):
        for every scale after the first, the running reconstruction of the coarser scales resized
        to that scale. Each row attends to its own text (the same in both cross-attention modes).
        """
        self._check_text("STAR.forward", text_hidden, text_pooled)
        x_BLC = torch.cat([self.start_tokens(text_pooled), self.word_embed(x_BLCv)], dim=1)
        x_BLC = x_BLC + self.lvl_embed(self.lvl_L)
        # block-causal mask (L, L): a token sees every token of its own scale and of coarser scales
        mask_LL = self.lvl_L[:, None] >= self.lvl_L[None, :]
        for block in self.blocks:
            text_kv = block.cross_attn.text_kv(text_hidden, text_mask)
            x_BLC = block(x_BLC, self.rope_Lc2, mask_LL, text_kv)
        return x_BLC

    def logits(self, h_NLC):
        """Output layer on trunk states: (N, L, V) float32 logits."""
        h = layer_norm(h_NLC, self.config.norm_eps) if self.config.logit_norm else h_NLC
        return self.head_logits(h).float()

    def forward(self, x_BLCv, text_hidden, text_mask, text_pooled, targets_BL=None, return_hidden=False):
        """Teacher-forced forward of all scales at once.

        x_BLCv (B, L-1, Cvae): teacher-forcing input; text_hidden (B, T, text_dim), text_mask (B, T)
        (1 = real token), text_pooled (B, text_dim); targets_BL (B, L) optional: the concatenated index
        maps (logit row j predicts token j). Returns (logits (B, L, V), loss) where loss is the mean
        cross-entropy over all tokens of all scales (None without targets); with return_hidden=True
        also the last block's output (B, L, C).
        """
        hidden_BLC = self.hidden_states(x_BLCv, text_hidden, text_mask, text_pooled)
        logits_BLV = self.logits(hidden_BLC)
        loss = None
        if targets_BL is not None:
            loss = F.cross_entropy(logits_BLV.flatten(0, 1), targets_BL.flatten())
        return (logits_BLV, loss, hidden_BLC) if return_hidden else (logits_BLV, loss)

    def loss(self, x_BLCv, text_hidden, text_mask, text_pooled, targets_BL):
        """Training loss of the trunk: mean cross-entropy over all tokens of all scales."""
        return self(x_BLCv, text_hidden, text_mask, text_pooled, targets_BL)[1]

    # ------------------------------------------------------------------ sampler head

    def head_forward(self, prev_NlC, e_NlCv, text_pooled_ND, si=None, return_hidden=False):
        """The sampler head (paper section 3.4): re-predict a scale's tokens knowing the committed ones.

        prev_NlC: trunk features (last block, before logit_norm) of the tokens; e_NlCv: codebook
        vectors of the committed tokens, zero elsewhere; text_pooled_ND: pooled text of each row.
        si given: inference form for the l = pn*pn tokens of scale si, bidirectional attention.
        si None: training form over all scales from sample_from_idx on at once; a token sees the
        tokens of its own scale only, the text token sees and is seen by everyone.
        Returns logits (N, l, V) (text token dropped); with return_hidden the last head block's
        output (N, 1 + l, C) too.
        """
        config = self.config
        txt_N1C = self.encoder_proj2(text_pooled_ND)[:, None] + self.pos_start_last  # no level embedding
        if si is not None:
            begin, end = self.begin_ends[si]
            mask = None
        else:
            begin, end = self.begin_ends[config.sample_from_idx][0], config.seq_len
            lvl = torch.cat([self.lvl_L.new_full((1,), -1), self.lvl_L[begin:end]])  # -1 = text token
            mask = (lvl[:, None] == lvl[None, :]) | (lvl[:, None] < 0) | (lvl[None, :] < 0)
        img_NlC = self.word_embed_head(e_NlCv) + self.lvl_embed_2(self.lvl_L[begin:end])
        feat = torch.cat([txt_N1C, img_NlC], dim=1)                          # (N, 1+l, C)
        prev = torch.cat([txt_N1C, prev_NlC], dim=1)                         # (N, 1+l, C)
        y = self.head_proj(torch.cat([feat, prev], dim=-1))                  # 2C -> C
        rope = torch.cat([self.rope_Lc2[:1], self.rope_Lc2[begin:end]])      # text token: angle 0
        for block in self.feat_extract_blocks:
            y = block(y, rope, mask)
        h = layer_norm(y, config.norm_eps) if config.logit_norm else y
        logits = self.head_logits2(h).float()[:, 1:]
        return (logits, y) if return_hidden else logits

    def head_loss(self, x_BLCv, text_hidden, text_mask, text_pooled, targets_BL, generator=None):
        """Masked-token loss of the sampler head on a frozen trunk; returns a scalar.

        A random subset of the tokens of the head's scales is visible (their ground-truth code
        vectors are given); the head predicts the hidden ones. Each sample draws r ~ U(0, 1) and
        shows each token with probability arccos(r) / (pi/2), so all stages of the commit schedule,
        from almost nothing committed to almost everything, are trained. Random numbers come from
        `generator` (CPU). The reference adds a dummy (V+1)-th class that visible tokens must
        predict (a constant, gradient-free term) and divides by the full sequence length; both only
        rescale the loss, so we take the plain mean cross-entropy over the hidden tokens.
        """
        if not self.config.head:
            raise ValueError("STAR.head_loss: this model has no sampler head (config.head=False)")
        with torch.no_grad():
            hidden_BLC = self.hidden_states(x_BLCv, text_hidden, text_mask, text_pooled)
        begin = self.begin_ends[self.config.sample_from_idx][0]
        gt_Bl = targets_BL[:, begin:]
        B, l = gt_Bl.shape
        r_B1 = torch.rand(B, 1, generator=generator)
        visible_Bl = (torch.rand(B, l, generator=generator) < torch.arccos(r_B1) / (math.pi / 2))
        visible_Bl = visible_Bl.to(gt_Bl.device)
        e_BlCv = self.vae.quantize.embedding(gt_Bl) * visible_Bl[..., None]
        logits = self.head_forward(hidden_BLC[:, begin:].detach(), e_BlCv.to(hidden_BLC.dtype), text_pooled)
        hidden_tok = ~visible_Bl
        if not hidden_tok.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits[hidden_tok], gt_Bl[hidden_tok])

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompt_hidden, prompt_mask, prompt_pooled, empty_hidden, empty_mask, empty_pooled,
                 cfg=4.0, top_k=600, top_p=0.8, generator=None, stable=None, images_per_prompt=1,
                 return_indices=False, return_scales=False, known_idx=None, keep=None, on_scale=None):
        """Generate images scale by scale with a KV cache and classifier-free guidance (paper section 3.1).

        prompt_hidden (B, T, text_dim), prompt_mask (B, T), prompt_pooled (B, text_dim): the text
            encoder's states, padding mask (1 = real token) and pooled feature of B prompts.
        empty_hidden, empty_mask, empty_pooled: the same for the empty prompt "" (batch 1 or B),
            the unconditional branch of guidance.
        cfg: guidance scale; scale si uses t = cfg * si / (K - 1) (the 1x1 scale is unguided).
        top_k, top_p: sampling filters (top_k=1 is greedy; 0 disables either one).
        generator: CPU torch.Generator for every random draw (None: torch's global RNG).
        stable: commit the tokens of scales >= sample_from_idx over several steps with the sampler
            head (section 3.4; default: on when the model has one). Buys tokens chosen knowing their
            already committed neighbours instead of all at once; costs, per such scale, one draw per
            step and a pass of the small head over 1 + pn*pn tokens at every step that is not a trunk
            step (star-1024-sampler: 3 head passes at scales 9..12 and 15 at the 64x64 scale,
            47 draws instead of 5).
        images_per_prompt: images drawn for every prompt (rows i*n .. i*n+n-1 belong to prompt i).
        return_indices: also return the index maps (see Returns).
        return_scales: also return the image after every scale (see Returns).
        known_idx, keep: edit an image instead (inpainting, outpainting): known_idx are its index maps
            (vae.img_to_idx: K LongTensors (1 or B, pn*pn)), keep says which of them to keep (K bool
            tensors of the same shapes, e.g. keep_masks(pixel_mask, patch_nums)). At every scale the
            kept positions take the image's tokens before they enter f_hat, so the next scale's input,
            the KV cache and both guidance rows see them as if the model had drawn them; the model
            draws the rest conditioned on them and on the prompt. With the sampler head the kept
            tokens count as committed before the first step. Keeping everything gives the VQ-VAE's
            reconstruction of the image; keeping nothing the ordinary image of the same seed.
        on_scale: called as on_scale(si, pn) once per scale, in order si = 0 .. K-1, right after scale
            si's tokens are drawn and added to f_hat (before the final decode); e.g. to advance a
            progress bar. It changes nothing that is drawn.

        Returns, with N = B * images_per_prompt rows (prompt-major) and K scales:
            return_indices=False, return_scales=False: images
            return_indices=True,  return_scales=False: (images, index_maps)
            return_indices=False, return_scales=True:  (images, scale_images)
            return_indices=True,  return_scales=True:  (images, index_maps, scale_images)
        images: (N, 3, H, W) float in [0, 1], decoded by the VQ-VAE given at construction (whose
        patch_nums must be the model's), on its device. index_maps: K LongTensors (N, pn*pn), row-major,
        coarse to fine. scale_images: K images (N, 3, H, W) in [0, 1], each decoded from f_hat after
        that scale (the last one equals images).
        """
        config, vae = self.config, self.vae
        if vae is None or tuple(vae.config.patch_nums) != config.patch_nums:
            raise ValueError("STAR.generate needs the VQ-VAE built with the model's patch_nums "
                             f"{config.patch_nums}: pass it as STAR(config, vae) / "
                             "from_pretrained(path, vae)")
        self._check_text("STAR.generate prompt", prompt_hidden, prompt_pooled)
        self._check_text("STAR.generate empty prompt", empty_hidden, empty_pooled)
        stable = config.head if stable is None else stable
        if stable and not config.head:
            raise ValueError("STAR.generate: stable=True needs a model with a sampler head "
                             "(e.g. the star-1024-sampler checkpoint)")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"STAR.generate: generator is on {generator.device}; pass a CPU "
                             "torch.Generator (draws run on the CPU so seeds agree across devices)")
        B = prompt_hidden.shape[0]
        if empty_hidden.shape[0] not in (1, B):
            raise ValueError(f"STAR.generate: the empty-prompt encoding has batch {empty_hidden.shape[0]}; "
                             f"expected 1 or the number of prompts ({B})")
        encodings = [prompt_hidden, prompt_mask, prompt_pooled] + [   # the six text inputs, B rows each
            t.expand(B, *t.shape[1:]) for t in (empty_hidden, empty_mask, empty_pooled)]
        if images_per_prompt > 1:
            encodings = [t.repeat_interleave(images_per_prompt, dim=0) for t in encodings]
        if (known_idx is None) != (keep is None):
            raise ValueError("STAR.generate: an edit needs both known_idx (the image's index maps) and keep "
                             "(which tokens to keep at every scale)")
        if known_idx is not None:
            known_idx, keep = self._edit_maps(known_idx, keep, B, images_per_prompt)
        was_training = self.training
        self.eval()
        try:
            img, idx_list, scale_imgs = self._generate(*encodings, cfg, top_k, top_p, generator, stable,
                                                       return_scales, known_idx, keep, on_scale)
        finally:
            self.train(was_training)
        out = (img,) + ((idx_list,) if return_indices else ()) + ((scale_imgs,) if return_scales else ())
        return out[0] if len(out) == 1 else out

    def _edit_maps(self, known_idx, keep, B, images_per_prompt):
        """Check an edit's index maps and keep-masks; -> both as K CPU tensors (B * images_per_prompt, l)."""
        K, V = len(self.config.patch_nums), self.config.vocab_size
        if len(known_idx) != K or len(keep) != K:
            raise ValueError(f"STAR.generate: known_idx and keep need one map per scale ({K}), got "
                             f"{len(known_idx)} and {len(keep)}")
        maps = []
        for si, (idx_Bl, keep_Bl, pn) in enumerate(zip(known_idx, keep, self.config.patch_nums)):
            for name, t in (("known_idx", idx_Bl), ("keep", keep_Bl)):
                if t.dim() != 2 or t.shape[0] not in (1, B) or t.shape[1] != pn * pn:
                    raise ValueError(f"STAR.generate: {name}[{si}] has shape {tuple(t.shape)}; expected "
                                     f"(1 or {B}, {pn * pn}) for the {pn}x{pn} map")
            if keep_Bl.dtype != torch.bool or not 0 <= int(idx_Bl.min()) <= int(idx_Bl.max()) < V:
                raise ValueError(f"STAR.generate: keep[{si}] must be bool and known_idx[{si}] token ids "
                                 f"in [0, {V})")
            maps.append([t.cpu().expand(B, -1).repeat_interleave(images_per_prompt, dim=0)
                         for t in (idx_Bl.long(), keep_Bl)])
        return [m[0] for m in maps], [m[1] for m in maps]

    def _generate(self, prompt_hidden, prompt_mask, prompt_pooled, empty_hidden, empty_mask, empty_pooled,
                  cfg, top_k, top_p, generator, stable, return_scales, known_idx=None, keep=None,
                  on_scale=None):
        config, vae = self.config, self.vae
        dev, dtype = self.pos_start.device, self.pos_start.dtype
        B, N, K = prompt_hidden.shape[0], 2 * prompt_hidden.shape[0], len(config.patch_nums)
        H, c = config.num_heads, config.width // config.num_heads
        # Both guidance rows of every prompt run in one batch: rows [cond_0..cond_B-1, uncond_0..].
        pooled_ND = torch.cat([prompt_pooled, empty_pooled]).to(dev, dtype)
        if config.cross_attn_mode == "batch_of_one":   # cross-attention of the cond rows only
            text_h, text_m = prompt_hidden, prompt_mask
        else:                                          # uncond rows attend to the empty prompt
            text_h, text_m = torch.cat([prompt_hidden, empty_hidden]), torch.cat([prompt_mask, empty_mask])
        # every block's text keys, values and mask, computed once for the whole generation
        text_kvs = [blk.cross_attn.text_kv(text_h.to(dev, dtype), text_m.to(dev)) for blk in self.blocks]
        caches = [KVCache(N, H, config.seq_len, c, dev, dtype) for _ in self.blocks]

        codebook_VCv = vae.quantize.embedding.weight
        pn_last = config.patch_nums[-1]
        f_hat = torch.zeros(B, config.vae_dim, pn_last, pn_last, device=codebook_VCv.device)
        tokens_NlC = self.start_tokens(pooled_ND) + self.lvl_embed.weight[0]   # (N, 1, C)
        idx_list, scale_imgs = [], []
        for si, pn in enumerate(config.patch_nums):
            t = cfg * si / (K - 1)                     # guidance ramps from 0 to cfg
            x_NlC = self.trunk_step(si, tokens_NlC, text_kvs, caches)
            edit = None if keep is None else (known_idx[si], keep[si])       # (B, l) image tokens, keep
            if stable and si >= config.sample_from_idx:
                idx_Bl, _ = self._stable_scale(si, x_NlC, pooled_ND, cfg, t, top_k, top_p, generator, edit)
            else:
                idx_Bl, _ = draw_tokens(*self.trunk_candidates(x_NlC, t, top_k, top_p), generator)
            if edit is not None:                       # teacher-force the kept tokens (all were drawn
                idx_Bl = torch.where(edit[1], edit[0], idx_Bl)   # as usual: same random stream)
            idx_Bl = idx_Bl.to(codebook_VCv.device)
            idx_list.append(idx_Bl)
            h_BChw = codebook_VCv[idx_Bl].transpose(1, 2).reshape(B, config.vae_dim, pn, pn)
            f_hat, next_BChw = vae.next_scale_input(si, f_hat, h_BChw)
            if return_scales:
                scale_imgs.append(vae.fhat_to_img(f_hat).add(1).mul(0.5))
            if on_scale is not None:
                on_scale(si, pn)
            if si < K - 1:                             # next scale's input: f_hat resized to it
                nb, ne = self.begin_ends[si + 1]
                next_BlCv = next_BChw.flatten(2).transpose(1, 2).to(dev, dtype)
                tokens_NlC = (self.word_embed(next_BlCv) + self.lvl_embed(self.lvl_L[nb:ne])).repeat(2, 1, 1)
        img = vae.fhat_to_img(f_hat).add(1).mul(0.5)   # [-1, 1] -> [0, 1]
        return img, idx_list, scale_imgs

    # The steps of one scale: what runs between two token draws. With compile_decoding() each becomes
    # one torch.compile graph per scale (a scale's shapes never change); eager runs the same methods.

    def trunk_step(self, si, tokens_NlC, text_kvs, caches):
        """The trunk on scale si's tokens (N, l, C) -> last block's output (N, l, C) (before logit_norm).

        Each block's keys and values go into its cache at the scale's positions; the scale attends to
        them and to every coarser scale's.
        """
        begin, end = self.begin_ends[si]
        x_NlC = tokens_NlC
        for block, text_kv, cache in zip(self.blocks, text_kvs, caches):
            x_NlC = block(x_NlC, self.rope_Lc2[begin:end], None, text_kv, cache, begin)
        return x_NlC

    def trunk_candidates(self, x_NlC, t, top_k, top_p):
        """Output layer, guidance t and filters on trunk states -> (probs, token ids) (B, l, k) to draw
        from."""
        return filter_logits(guide(self.logits(x_NlC), t), top_k, top_p)

    def head_candidates(self, si, x_NlC, e_NlCv, pooled_ND, cfg, top_k, top_p):
        """One sampler-head pass at scale si with guidance cfg and filters -> (probs, token ids) (B, l, k)."""
        return filter_logits(guide(self.head_forward(x_NlC, e_NlCv, pooled_ND, si), cfg), top_k, top_p)

    def _stable_scale(self, si, x_NlC, pooled_ND, cfg, t, top_k, top_p, generator, edit=None):
        """Causal-driven stable sampling of one scale (paper section 3.4; the reference's '1024' variant).

        The pn*pn tokens are committed over S steps following the arccos schedule. At the leading
        stable_trunk_steps steps (not at the last scale) tokens are drawn from the trunk's own
        logits with the ramped guidance t; the step first commits the most confident draws (possibly
        positions already committed, which keep their token), then commits as many again; at the
        other steps the sampler head re-predicts every token knowing the committed ones, with the
        full guidance cfg. The first stable_random_steps steps commit uncommitted positions in a
        random order, the later ones by the drawn token's probability. Every random number comes
        from `generator` (the reference also uses unseeded global RNGs, so its images vary).
        edit: (image tokens, keep) (B, l) each, or None. Kept positions hold the image's tokens and
        count as committed before the first step (commit step 0), so the head sees them from its first
        pass; the schedule then spreads each row's free positions over the same steps (free_schedule).
        Returns the index map (B, l) and the step at which each position was committed (B, l).
        """
        config = self.config
        pn, B = config.patch_nums[si], x_NlC.shape[0] // 2
        last = si == len(config.patch_nums) - 1
        steps = config.stable_steps_last if last else config.stable_steps
        trunk_steps = 0 if last else config.stable_trunk_steps
        codebook_VCv = self.vae.quantize.embedding.weight
        idx_Bl = torch.zeros(B, pn * pn, dtype=torch.long)
        commit_step_Bl = torch.full((B, pn * pn), -1)
        schedule = arccos_schedule(steps, pn)
        if edit is not None:
            idx_Bl = torch.where(edit[1], edit[0], idx_Bl)
            commit_step_Bl[edit[1]] = 0
            schedule = free_schedule(steps, pn, (~edit[1]).sum(1)).T    # (steps, B): a count per row
        trunk_cand = None
        for s, n in enumerate(schedule):
            if s < trunk_steps:
                if trunk_cand is None:                 # the trunk's logits do not change within a scale
                    trunk_cand = self.trunk_candidates(x_NlC, t, top_k, top_p)
                new_idx_Bl, conf_Bl = draw_tokens(*trunk_cand, generator)
                # A trunk step commits twice, exactly as the reference's sampler does: here its n most
                # confident draws over ALL positions (committed ones among them keep their token, so 0
                # to n are new), then below n more among the uncommitted ones. So such a step commits
                # n to 2n new tokens (fewer only when fewer are left), not the schedule's n, and a map
                # is usually complete before its last step (which then commits nothing). Why keep it:
                # the released sampler head was run this way; committing only n gives other images.
                commit(idx_Bl, commit_step_Bl, new_idx_Bl, conf_Bl, n, s)
            else:
                committed_Bl1 = (commit_step_Bl >= 0)[..., None]
                e_BlCv = codebook_VCv[idx_Bl.to(codebook_VCv.device)] * committed_Bl1.to(codebook_VCv.device)
                e_NlCv = e_BlCv.to(x_NlC.device, x_NlC.dtype).repeat(2, 1, 1)  # same for both guidance rows
                candidates = self.head_candidates(si, x_NlC, e_NlCv, pooled_ND, cfg, top_k, top_p)
                new_idx_Bl, conf_Bl = draw_tokens(*candidates, generator)
            if s < config.stable_random_steps:
                conf_Bl = torch.rand(B, pn * pn, generator=generator)
            commit(idx_Bl, commit_step_Bl, new_idx_Bl, conf_Bl * (commit_step_Bl < 0), n, s)
        assert (commit_step_Bl >= 0).all(), "the schedule commits every position"
        return idx_Bl, commit_step_Bl

    def compile_decoding(self):
        """Compile the steps of generation (trunk_step, trunk_candidates, head_candidates) in place.

        At batch 1 a scale's step is hundreds of small ops, each a kernel launch on a GPU; torch.compile
        fuses them into a few kernels per scale. A step has no Python state and no host synchronisation,
        so each (scale, batch size) compiles once into one graph; the draw between steps stays eager.
        Generation runs the same methods either way: only these three attributes change. Compilation
        happens during the first generation (minutes on a CPU). Raises RuntimeError, with the reason,
        where torch.compile cannot run on the model's device (no C++ compiler or Triton, an unsupported
        Python); the model is then left as it was.
        """
        try:                                           # a tiny graph first: fail here, not mid-generation
            torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(2, device=self.pos_start.device))
        except Exception as e:
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise RuntimeError(f"torch.compile is not available here ({type(e).__name__}: "
                               f"{reason})") from None
        # one graph per scale and batch size: raise dynamo's default limit of 8 graphs per function
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 8 * len(self.config.patch_nums))
        # partials of the class's functions, not bound methods: a copy.deepcopy of the model runs its own
        for name in ("trunk_step", "trunk_candidates", "head_candidates"):
            setattr(self, name, partial(torch.compile(getattr(type(self), name), dynamic=False), self))
        return self

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path, vae=None, preset=None, config=None):
        """Load STAR weights strictly.

        path: a file or an already read checkpoint in any layout of weights.star_state_dict (released
        {'trainer': {'var_wo_ddp': state_dict}}, a bare state dict, our own {'config', 'model'} or
        train.py's {'star_config', 'star', ...}).
        vae: the VQ-VAE used for generation (not part of the file). preset / config: which model
        the weights are; by default the checkpoint's own config, else the preset whose shapes (and,
        given a vae, patch_nums) fit the weights. Returns the model on the CPU in eval mode.
        """
        import weights                                  # file formats; it imports this file for PRESETS
        name = "STAR state dict" if isinstance(path, dict) else f"STAR weights {path}"
        ck = path if isinstance(path, dict) else weights.read_weights(path, "STAR weights")
        state_dict, saved_config = weights.star_state_dict(ck, name)
        if config is None and preset is not None:
            config = STARConfig.preset(preset)
        if config is None:
            config = saved_config or weights.released_config(
                state_dict, name, patch_nums=None if vae is None else vae.config.patch_nums)
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        if not config.class_emb:                        # the unused class table is not kept
            state_dict.pop("class_emb.weight", None)
        with torch.device("meta"):                      # no time spent initialising 1.7B weights
            model = cls(config, vae)
        for k, v in model.state_dict().items():         # zero_k_bias: always zero, so a file
            if k.endswith("zero_k_bias") and k.replace("zero_k_bias", "q_bias") in state_dict:
                state_dict.setdefault(k, torch.zeros(v.shape))  # without it loses nothing
                if state_dict[k].count_nonzero():
                    raise ValueError(f"{name}: buffer {k!r} must be all zeros (the key projection has no "
                                     "bias)")
        problem = _mismatch(model, state_dict)
        if problem:
            fits = ", ".join(weights.fitting_presets(state_dict)) or "none"
            raise ValueError(f"{name} does not fit this STAR config: {problem}; the weights have "
                             f"{weights.describe_star(state_dict)}; presets that fit: {fits} (pass "
                             "preset=... or a config=STARConfig(...) of these sizes)")
        model.load_state_dict(state_dict, strict=True, assign=True)
        model._make_tables()                            # the non-persistent tables, on the CPU
        return model.eval()


def _mismatch(model, state_dict):
    """What keeps the weights from fitting the model, in a few words: which key, or None when they fit."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in state_dict]
    unexpected = [k for k in state_dict if k not in want]
    misshapen = [k for k in want if k in state_dict and tuple(state_dict[k].shape) != want[k]]
    if misshapen:
        k = misshapen[0]
        return (f"{k!r} has shape {list(state_dict[k].shape)} but the config expects {list(want[k])}"
                + (f" ({len(misshapen) - 1} more misshapen)" if len(misshapen) > 1 else ""))
    if missing:
        return f"missing keys {missing[:3]}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
    if unexpected:
        more = f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        return f"unexpected keys {unexpected[:3]}{more}"
    return None
