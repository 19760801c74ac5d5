"""
The multi-scale residual VQ-VAE: VAR's image tokenizer (VAR, arXiv 2404.02905, Sec. 3.2 and Alg. 1-2),
used unchanged by STAR (arXiv 2406.10797, Sec. 3.1).

A conv encoder maps an image in [-1, 1] to a latent f (B, Cvae, h, w). The residual quantizer turns f
into a pyramid of token maps (1x1, 2x2, ..., h x w) that share one codebook: at every scale it
area-downsamples what is still unexplained, picks the nearest code vectors, bicubic-upsamples them back to
h x w, refines them with a small conv Phi and adds them to the running sum f_hat. The decoder turns f_hat
back into an image. star.py predicts the token maps scale by scale through `idx_to_var_input` (teacher
forcing) and `next_scale_input` (generation); sample.py decodes with `fhat_to_img`; train.py trains this
model with `forward`, `reconstruction_loss`, `init_codebook` and `reseed_dead_codes` (the recipe is
train.py's 'vae' stage). Loads VAR's released `vae_ch160v4096z32.pth`:

    vae = VQVAE.from_pretrained("vae_ch160v4096z32.pth")   # 256px images, patch_nums 1..16
    idx_list = vae.img_to_idx(img)                          # [(B, 1), (B, 4), ..., (B, 256)]
    img_rec = vae.idx_to_img(idx_list)                      # (B, 3, 256, 256) in [-1, 1]

Tests: python -m pytest -q tests/test_tokenizer.py
"""
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import weights


@dataclass
class VQVAEConfig:
    vocab_size: int = 4096  # V: codebook entries, one codebook shared by all scales
    z_channels: int = 32  # Cvae: channels of the latent f and of every code vector
    ch: int = 160  # width of the first encoder level (a multiple of norm_groups)
    ch_mult: tuple = (1, 1, 2, 2, 4)  # width multiplier per level; 2 ** (len - 1) downsampling
    num_res_blocks: int = 2  # res-blocks per encoder level (the decoder has one more)
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # token-map sides, coarse to fine
    share_quant_resi: int = 4  # number of Phi convs shared across the scales
    quant_resi: float = 0.5  # Phi mixing ratio r in h * (1 - r) + conv(h) * r
    beta: float = 0.25  # commitment weight of the vq loss (training only)
    # GroupNorm groups (32 in VAR). Small models want fewer: at width 32, 32 groups are one channel each,
    # i.e. instance norm, which removes every channel's per-image mean, so a flat background's colour can
    # only be carried by spatial patterns; the 64px shapes tokenizer learns colours far faster with 8.
    norm_groups: int = 32

    def __post_init__(self):
        # configs come back from json / checkpoints with lists; keep tuples so configs compare equal
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if not self.patch_nums or any(p < 1 for p in self.patch_nums) or \
                any(a >= b for a, b in zip(self.patch_nums, self.patch_nums[1:])):
            raise ValueError(f"patch_nums: expected strictly increasing positive sides such as "
                             f"(1, 2, 3, 4, 6, 8), got {self.patch_nums}")
        widths = [self.ch * m for m in self.ch_mult]
        if self.norm_groups < 1 or not self.ch_mult or any(w <= 0 or w % self.norm_groups for w in widths):
            raise ValueError(f"ch={self.ch}, ch_mult={self.ch_mult}: every level width ch * mult must be "
                             f"a positive multiple of norm_groups={self.norm_groups} (GroupNorm), "
                             f"got widths {widths}")
        if self.share_quant_resi < 1:
            raise ValueError(f"share_quant_resi: expected >= 1 shared Phi convs (the released models use 4), "
                             f"got {self.share_quant_resi}")
        if not 0 < self.quant_resi <= 1:
            raise ValueError("quant_resi: expected a Phi ratio in (0, 1] (released: 0.5), "
                             f"got {self.quant_resi}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        # the latent side must equal the last patch number, so the image side is fixed by the config
        return self.downsample * self.patch_nums[-1]


# ----------------------------------------------------------------------------------------------------
# Encoder / decoder building blocks (VQGAN-style, as in VAR's basic_vae.py; every conv has a bias)

def Normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = Normalize(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = Normalize(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # 1x1 projection only where the width changes (no key otherwise, as in the released weights)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0.0 in every released model: omitted
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with q, k, v fused in one 1x1 conv."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = Normalize(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W)  # channel blocks q | k | v
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, 1, HW, C): one head of width C
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, 1, HW, C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only, then stride-2 conv: H -> H/2


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, Cvae, H/d, W/d). Attention only at the lowest resolution and in the middle."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        g = cfg.norm_groups
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.ch
        for i, c_out in enumerate(widths):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(c, c_out, g))
                c = c_out
                if i == last:
                    level.attn.append(AttnBlock(c, g))
            if i != last:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(c, c, g), AttnBlock(c, g)
        self.mid.block_2 = ResnetBlock(c, c, g)
        self.norm_out = Normalize(c, g)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, Cvae, h, w) -> (B, 3, h*d, w*d), unclamped. Levels are stored as up.{level}, run from the last."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        g = cfg.norm_groups
        last = len(widths) - 1
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(c, c, g), AttnBlock(c, g)
        self.mid.block_2 = ResnetBlock(c, c, g)
        levels = []
        for i in reversed(range(len(widths))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(c, widths[i], g))
                c = widths[i]
                if i == last:
                    level.attn.append(AttnBlock(c, g))
            if i != 0:
                level.upsample = Upsample(c)
            levels.insert(0, level)  # ModuleList index = level, as in the released key names
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c, g)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------
# The residual quantizer

class Phi(nn.Conv2d):
    """Refines an upsampled code map: h * (1 - r) + conv3x3(h) * r (VAR eq. in Sec. 3.2, 'phi_k')."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, padding=1)
        self.ratio = ratio

    def forward(self, h_BChw):
        return h_BChw * (1 - self.ratio) + super().forward(h_BChw) * self.ratio


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Which of the num_phi shared Phi convs scale si uses: the one whose tick is nearest si / (SN - 1).

    The K ticks are evenly spaced in [0, 1], as VAR computes them: for K = 4 (the released models)
    linspace(1/12, 11/12, 4) = 1/12, 13/36, 23/36, 11/12; for any other K the bin centres
    linspace(1/(2K), 1 - 1/(2K), K), e.g. 1/6, 1/2, 5/6 for K = 3. Scales can sit exactly between
    two ticks (SN=10: si 2 and 7; SN=7: si 3); the released tables come from numpy in float64, where
    rounding makes one side win by an ulp and argmin takes the first minimum. We compute exactly the same
    way rather than hard-coding tables, so every patch_nums length gets the reference's choice.
    """
    K = num_phi
    if K == 4:
        ticks = np.linspace(1 / (3 * K), 1 - 1 / (3 * K), K)
    else:
        ticks = np.linspace(1 / (2 * K), 1 - 1 / (2 * K), K)
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(ticks - at)))


class PhiShared(nn.Module):
    """Holds the K shared Phi convs (keys quant_resi.qresi_ls.{k}); scale si uses qresi_ls[phi_index(si)]."""

    def __init__(self, num_phi: int, c: int, ratio: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(c, ratio) for _ in range(num_phi))


class MultiScaleQuantizer(nn.Module):
    """Residual quantization of f (B, Cvae, Hl, Hl) into token maps of sides patch_nums (Hl = last side).

    Encoding (VAR Alg. 1), per scale si with side pn:
        z      = area_resize(f - f_hat, pn)                    (no resize at the last scale)
        idx_si = argmin_v ||z - e_v||^2                          one shared codebook e (V, Cvae)
        f_hat += Phi_si(bicubic_resize(e[idx_si], Hl))           (no resize at the last scale)
    Decoding repeats the last line from given indices (VAR Alg. 2).
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.vocab_size, self.Cvae, self.beta = cfg.vocab_size, cfg.z_channels, cfg.beta
        self.patch_nums = cfg.patch_nums
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)  # the codebook (V, Cvae)
        self.quant_resi = PhiShared(cfg.share_quant_resi, cfg.z_channels, cfg.quant_resi)
        self.phi_idx = tuple(phi_index(si, len(cfg.patch_nums), cfg.share_quant_resi)
                             for si in range(len(cfg.patch_nums)))
        # VAR's usage statistic (per-scale EMA of code hits per batch); stored in the released weights
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))
        # hits per code since the last init / re-seed: decides which codes are dead. Not saved, to keep
        # VAR's key set; train.py stores it beside the state dict so that a resumed run re-seeds exactly
        self.register_buffer("code_hits_V", torch.zeros(cfg.vocab_size), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the usage buffer has one row per scale of the model that saved it (10 in the released 256px
        # weights); it is unused at inference, so keep our own when the row count differs
        key = prefix + "ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.ema_vocab_hit_SV.shape \
                and state_dict[key].shape[1:] == self.ema_vocab_hit_SV.shape[1:]:
            state_dict[key] = self.ema_vocab_hit_SV.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- small pieces shared by every path ------------------------------------------------------------
    def phi(self, si: int, h_BChw):
        return self.quant_resi.qresi_ls[self.phi_idx[si]](h_BChw)

    def nearest_code(self, z_NC, num_codes: int | None = None):
        """Index of the nearest code (among the first num_codes, default all) by squared L2, computed as
        ||z||^2 + ||e||^2 - 2 z.e in float32 like the reference (first index on exact ties)."""
        codebook_VC = self.embedding.weight.detach()[:num_codes]
        d_NV = z_NC.square().sum(1, keepdim=True) + codebook_VC.square().sum(1)
        d_NV.addmm_(z_NC, codebook_VC.T, alpha=-2)
        return d_NV.argmin(1)

    def idx_to_h(self, si: int, idx_Bl):
        """Code vectors of one scale's tokens, upsampled to the latent side and passed through its Phi."""
        B, pn = idx_Bl.shape[0], self.patch_nums[si]
        h_BChw = self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)  # row-major tokens
        return self.phi(si, self._up(si, h_BChw))

    def _up(self, si: int, h_BChw):
        if si == len(self.patch_nums) - 1:
            return h_BChw
        Hl = self.patch_nums[-1]
        return F.interpolate(h_BChw, size=(Hl, Hl), mode="bicubic", align_corners=False)

    def _down(self, si: int, f_BChw):
        if si == len(self.patch_nums) - 1:
            return f_BChw
        pn = self.patch_nums[si]
        return F.interpolate(f_BChw, size=(pn, pn), mode="area")

    # One scale of residual quantization is the same four steps wherever it runs (encoding, training,
    # codebook init and re-seeding): z = _down_rows(f_rest); idx, h = _lookup(z); f_rest -= h. The
    # subtraction stays with each caller (in place, or out of place for autograd in forward).
    def _down_rows(self, si: int, f_rest_BChw):
        """What scale si quantizes: the rest area-resized to pn x pn, as rows (B * pn*pn, Cvae), row-major."""
        return self._down(si, f_rest_BChw).permute(0, 2, 3, 1).reshape(-1, self.Cvae)

    def _lookup(self, si: int, z_NC, num_codes: int | None = None):
        """Nearest codes of scale si's rows -> (idx_N, h_BChw): the token ids (B * pn*pn,) and what they
        add to f_hat, the code vectors upsampled to (B, Cvae, Hl, Hl) through the scale's Phi."""
        idx_N = self.nearest_code(z_NC, num_codes)
        return idx_N, self.idx_to_h(si, idx_N.view(-1, self.patch_nums[si] ** 2))

    def _check_latent(self, f_BChw):
        Hl = self.patch_nums[-1]
        if f_BChw.dim() != 4 or f_BChw.shape[1] != self.Cvae or f_BChw.shape[-2:] != (Hl, Hl):
            raise ValueError(f"latent: expected (B, {self.Cvae}, {Hl}, {Hl}) because the last patch number "
                             f"is {Hl}, got {tuple(f_BChw.shape)}; patch_nums must end at the latent side")

    def _check_idx(self, idx_list):
        if len(idx_list) != len(self.patch_nums):
            raise ValueError(f"idx_list: expected {len(self.patch_nums)} index maps for patch_nums "
                             f"{self.patch_nums}, got {len(idx_list)}")
        for si, (idx_Bl, pn) in enumerate(zip(idx_list, self.patch_nums)):
            if idx_Bl.dim() != 2 or idx_Bl.shape[1] != pn * pn:
                raise ValueError(f"idx_list[{si}]: expected (B, {pn * pn}) token ids for a {pn}x{pn} map, "
                                 f"got {tuple(idx_Bl.shape)}")
            if idx_Bl.numel() and not 0 <= int(idx_Bl.min()) <= int(idx_Bl.max()) < self.vocab_size:
                raise ValueError(f"idx_list[{si}]: token ids must lie in [0, {self.vocab_size}), got "
                                 f"[{int(idx_Bl.min())}, {int(idx_Bl.max())}]")

    # -- inference ------------------------------------------------------------------------------------
    @torch.no_grad()
    def f_to_idx(self, f_BChw):
        """Latent (B, Cvae, Hl, Hl) -> (index maps [(B, pn*pn)], cumulative f_hat after every scale)."""
        self._check_latent(f_BChw)
        f_BChw = f_BChw.float()
        f_rest, f_hat = f_BChw.clone(), torch.zeros_like(f_BChw)
        idx_list, f_hat_list = [], []
        for si, pn in enumerate(self.patch_nums):
            idx_N, h_BChw = self._lookup(si, self._down_rows(si, f_rest))  # h: (B, Cvae, Hl, Hl)
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            idx_list.append(idx_N.view(-1, pn * pn))
            f_hat_list.append(f_hat.clone())
        return idx_list, f_hat_list

    @torch.no_grad()
    def idx_to_fhat(self, idx_list, per_scale: bool = False):
        """Index maps -> f_hat (B, Cvae, Hl, Hl), or the list of cumulative f_hat after every scale."""
        self._check_idx(idx_list)
        f_hat, f_hat_list = None, []
        for si, idx_Bl in enumerate(idx_list):
            h_BChw = self.idx_to_h(si, idx_Bl)
            f_hat = h_BChw if f_hat is None else f_hat + h_BChw
            f_hat_list.append(f_hat)
        return f_hat_list if per_scale else f_hat

    @torch.no_grad()
    def idx_to_var_input(self, idx_list):
        """Teacher-forcing input (B, L - 1, Cvae): for each scale si >= 1, the f_hat of scales < si
        area-resized to pn_si x pn_si and flattened row-major. The last scale's tokens are never input."""
        self._check_idx(idx_list)
        B, Hl = idx_list[0].shape[0], self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, Hl, Hl)
        next_list = []
        for si in range(len(self.patch_nums) - 1):
            f_hat = f_hat + self.idx_to_h(si, idx_list[si])
            next_BChw = self._down(si + 1, f_hat)  # (B, Cvae, pn_next, pn_next)
            next_list.append(next_BChw.flatten(2).transpose(1, 2))  # (B, pn_next^2, Cvae)
        if not next_list:
            return f_hat.new_zeros(B, 0, self.Cvae)
        return torch.cat(next_list, dim=1)

    @torch.no_grad()
    def next_scale_input(self, si: int, f_hat, h_BChw):
        """One generation step: add scale si's code vectors h (B, Cvae, pn, pn) to f_hat (in place).
        Returns (f_hat, next input = f_hat area-resized to the next side), or (f_hat, f_hat) at the last."""
        pn = self.patch_nums[si]
        if h_BChw.shape[-2:] != (pn, pn):
            raise ValueError(f"h_BChw: expected code vectors (B, {self.Cvae}, {pn}, {pn}) for scale {si}, "
                             f"got {tuple(h_BChw.shape)}")
        f_hat.add_(self.phi(si, self._up(si, h_BChw)))
        if si == len(self.patch_nums) - 1:
            return f_hat, f_hat
        pn_next = self.patch_nums[si + 1]  # always a new tensor, also when pn_next is the latent side
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")

    # -- training -------------------------------------------------------------------------------------
    def forward(self, f_BChw):
        """Training forward: (f_hat with straight-through gradient, vq_loss, usage per scale (SN,)).

        vq_loss = mean over scales of beta * ||sg(f_hat_si) - f||^2 + ||f_hat_si - sg(f)||^2, with f_hat_si
        the cumulative sum after scale si (VAR). The first term pulls the encoder towards its quantization
        (commitment), the second trains the codebook and the Phi convs. Averaging over scales (VAR does,
        STAR's copy does not) keeps the loss on the same scale whatever the number of scales, so beta and
        the balance with the reconstruction loss need no retuning when patch_nums changes.
        """
        self._check_latent(f_BChw)
        with torch.autocast(f_BChw.device.type, enabled=False):  # distances and residuals in float32
            f = f_BChw.float()
            f_rest = f.detach().clone()
            f_hat = torch.zeros_like(f)
            vq_loss, usage = f.new_zeros(()), f.new_zeros(len(self.patch_nums))
            for si in range(len(self.patch_nums)):
                idx_N, h_BChw = self._lookup(si, self._down_rows(si, f_rest))  # gradient: codebook and Phi
                f_hat = f_hat + h_BChw
                f_rest = f_rest - h_BChw.detach()
                vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
                hits_V = torch.bincount(idx_N, minlength=self.vocab_size).float()
                usage[si] = hits_V.count_nonzero() / self.vocab_size
                self.code_hits_V += hits_V
                self.ema_vocab_hit_SV[si].mul_(0.99).add_(hits_V, alpha=0.01)
            vq_loss = vq_loss / len(self.patch_nums)
            # straight-through estimator: the decoder sees f_hat, the encoder gets the decoder's gradient
            # as if quantization were the identity
            f_hat = f + (f_hat - f).detach()
        return f_hat, vq_loss, usage

    @torch.no_grad()
    def _residuals(self, f_BChw):
        """Per scale: the residual vectors the lookup sees (N_si, Cvae) and their quantization errors."""
        f_rest = f_BChw.float().clone()
        z_list, err_list = [], []
        for si in range(len(self.patch_nums)):
            z_NC = self._down_rows(si, f_rest)
            idx_N, h_BChw = self._lookup(si, z_NC)
            z_list.append(z_NC)
            err_list.append((z_NC - self.embedding.weight[idx_N]).square().sum(1))
            f_rest -= h_BChw
        return z_list, err_list

    @torch.no_grad()
    def init_codebook(self, f_BChw, generator=None, kmeans_iters: int = 5):
        """Set every code from the residual vectors of a batch of latents, at every scale.

        The V codes are split between the scales in proportion to their token counts pn^2 (at least one
        for the first scale). Scale by scale, its codes start as randomly drawn residual vectors of that
        scale, are refined by a few k-means steps on them, and the scale is then quantized with all codes
        set so far, so that the next scale sees realistic residuals. Where a scale has fewer vectors in the
        batch (B * pn^2) than codes, vectors are reused with a little jitter; the re-seeding fixes those
        later. 64 images are plenty for V=512 and patch_nums (1, 2, 3, 4, 6, 8).
        """
        self._check_latent(f_BChw)
        f_rest = f_BChw.float().clone()
        V, L = self.vocab_size, sum(pn * pn for pn in self.patch_nums)
        bounds = np.round(np.cumsum([0] + [pn * pn for pn in self.patch_nums]) / L * V).astype(int)
        bounds[1] = max(bounds[1], 1)
        codebook_VC = self.embedding.weight
        for si in range(len(self.patch_nums)):
            z_NC = self._down_rows(si, f_rest)
            lo, hi = int(bounds[si]), int(bounds[si + 1])
            if hi > lo:                      # this scale's codes first, then the lookup among all so far
                codebook_VC[lo:hi] = _kmeans(z_NC, hi - lo, kmeans_iters, generator)
            f_rest -= self._lookup(si, z_NC, num_codes=hi)[1]
        _sync_codebook(self)
        self.code_hits_V.zero_()

    @torch.no_grad()
    def reseed_dead_codes(self, f_BChw, min_hits: int = 1, generator=None) -> int:
        """Replace codes hit fewer than min_hits times since the last init / re-seed by current residual
        vectors (of all scales), drawn with probability proportional to their quantization error, so that
        dead codes go where the codebook fits worst. Resets the hit counters; returns how many were reset."""
        self._check_latent(f_BChw)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.code_hits_V)  # every rank decides on the same dead codes
        dead_D = (self.code_hits_V < min_hits).nonzero().squeeze(1)
        if len(dead_D):
            z_list, err_list = self._residuals(f_BChw)
            z_NC, err_N = torch.cat(z_list), torch.cat(err_list)
            weights_N = (err_N + 1e-12).cpu()
            rows = torch.multinomial(weights_N, len(dead_D), replacement=len(dead_D) > len(err_N),
                                     generator=generator).to(z_NC.device)
            self.embedding.weight[dead_D] = _jitter(z_NC[rows], generator)
            _sync_codebook(self)
        self.code_hits_V.zero_()
        return len(dead_D)

    def codebook_usage(self) -> float:
        """Fraction of the codebook hit by at least one token since the last init / re-seed."""
        return (self.code_hits_V > 0).float().mean().item()


def _jitter(x_NC, generator=None):
    # tiny noise so that codes drawn from the same vector do not stay identical (argmin would starve one)
    noise = torch.randn(x_NC.shape, generator=generator).to(x_NC)
    return x_NC + noise * 1e-3 * (x_NC.std() + 1e-8)


def _kmeans(z_NC, k: int, iters: int, generator=None):
    """k centroids of the rows of z_NC: random rows (with replacement if there are fewer than k), then
    Lloyd steps; a centroid that loses all its points keeps its position."""
    rows = torch.randperm(len(z_NC), generator=generator)[:k] if k <= len(z_NC) else \
        torch.randint(len(z_NC), (k,), generator=generator)
    c_KC = _jitter(z_NC[rows.to(z_NC.device)], generator)
    for _ in range(iters):
        d_NK = z_NC.square().sum(1, keepdim=True) + c_KC.square().sum(1) - 2 * z_NC @ c_KC.T
        assign_N = d_NK.argmin(1)
        sums_KC = torch.zeros_like(c_KC).index_add_(0, assign_N, z_NC)
        counts_K = torch.bincount(assign_N, minlength=k).unsqueeze(1)
        c_KC = torch.where(counts_K > 0, sums_KC / counts_K.clamp(min=1), c_KC)
    return c_KC


def _sync_codebook(quantizer: MultiScaleQuantizer):
    # codes are changed outside the optimizer: under torch.distributed make every rank use rank 0's
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(quantizer.embedding.weight.data, src=0)


# ----------------------------------------------------------------------------------------------------
# The VQ-VAE

class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = MultiScaleQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, padding=1)

    def _check_images(self, img):
        if not torch.is_tensor(img) or img.dim() != 4 or img.shape[1] != 3 or not img.is_floating_point():
            raise ValueError(f"img: expected a float tensor (B, 3, H, W) of RGB images in [-1, 1], got "
                             f"{tuple(img.shape) if torch.is_tensor(img) else type(img).__name__}")
        H, W = img.shape[-2:]
        d, pn, side = self.config.downsample, self.config.patch_nums[-1], self.config.image_size
        if H != W:
            raise ValueError(f"img: expected square {side}x{side} images, got {H}x{W}; "
                             "center-crop to a square "
                             f"and resize to {side}")
        if H != side:
            hint = f" or build the model with patch_nums ending in {H // d}" if H % d == 0 else ""
            raise ValueError(f"img: expected {side}x{side} images "
                             f"(downsampling {d} x last patch number {pn}), "
                             f"got {H}x{W}; resize to {side}{hint}")
        lo, hi = torch.aminmax(img.detach())
        if lo < -1 - 1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"img: expected values in [-1, 1], got [{lo.item():.4g}, {hi.item():.4g}]; map "
                             f"uint8 pixels with x / 127.5 - 1 (or [0, 1] images with 2x - 1) and clamp")

    def img_to_f(self, img_B3HW):
        """Images (B, 3, H, W) in [-1, 1] -> continuous latent f (B, Cvae, H/d, W/d)."""
        self._check_images(img_B3HW)
        return self.quant_conv(self.encoder(img_B3HW))

    @torch.no_grad()
    def img_to_idx(self, img_B3HW):
        """Images (B, 3, H, W) in [-1, 1] -> list of SN LongTensors (B, pn*pn), coarse to fine, row-major."""
        return self.quantize.f_to_idx(self.img_to_f(img_B3HW))[0]

    @torch.no_grad()
    def fhat_to_img(self, f_hat_BChw):
        """f_hat (B, Cvae, Hl, Hl) -> images (B, 3, H, W) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp_(-1, 1)

    @torch.no_grad()
    def idx_to_img(self, idx_list, per_scale: bool = False):
        """Index maps -> images (B, 3, H, W) in [-1, 1]; with per_scale=True the list of SN images decoded
        from f_hat after each scale (coarse to fine: how the image sharpens from 1x1 to full size)."""
        if per_scale:
            return [self.fhat_to_img(f_hat) for f_hat in self.quantize.idx_to_fhat(idx_list, per_scale=True)]
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list))

    def idx_to_var_input(self, idx_list):
        """Teacher-forcing input of the transformer (B, L - 1, Cvae), see MultiScaleQuantizer."""
        return self.quantize.idx_to_var_input(idx_list)

    def next_scale_input(self, si: int, f_hat, h_BChw):
        """Generation step for scale si: returns (f_hat updated in place, next scale's input
        (B, Cvae, pn', pn'))."""
        return self.quantize.next_scale_input(si, f_hat, h_BChw)

    # -- training -------------------------------------------------------------------------------------
    def forward(self, img_B3HW, quantize: bool = True):
        """Training forward: returns (recon (B, 3, H, W) unclamped, vq_loss (scalar), usage (SN,)).

        Encode, quantize with a straight-through gradient (MultiScaleQuantizer.forward), decode.
        usage[si] = fraction of the codebook used by scale si's tokens in this batch. With quantize=False
        the quantizer is bypassed (plain autoencoder, vq_loss 0, usage 0): the warm-up before
        init_codebook. The loss is reconstruction_loss(recon, img) + vq_loss; train.py's 'vae' stage
        holds the whole recipe (warm-up, codebook init, dead-code re-seeding).
        """
        f_BChw = self.img_to_f(img_B3HW)
        if quantize:
            f_hat, vq_loss, usage = self.quantize(f_BChw)
        else:
            f_hat = f_BChw
            vq_loss, usage = f_BChw.new_zeros(()), f_BChw.new_zeros(len(self.config.patch_nums))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, usage

    @torch.no_grad()
    def init_codebook(self, img_B3HW, generator=None, kmeans_iters: int = 5):
        """Initialise the codebook from the encoder features of a batch, at every scale (after warm-up).
        Under DistributedDataParallel call this and reseed_dead_codes on every rank (on ddp.module)."""
        self.quantize.init_codebook(self.img_to_f(img_B3HW), generator, kmeans_iters)

    @torch.no_grad()
    def reseed_dead_codes(self, img_B3HW, min_hits: int = 1, generator=None) -> int:
        """Re-seed codes used fewer than min_hits times since the last call from the batch's residuals."""
        return self.quantize.reseed_dead_codes(self.img_to_f(img_B3HW), min_hits, generator)

    # -- released weights -----------------------------------------------------------------------------
    @staticmethod
    def config_from_state_dict(state_dict, patch_nums=None, **overrides) -> VQVAEConfig:
        """Infer vocab_size, z_channels, ch, ch_mult, num_res_blocks and share_quant_resi from the shapes
        (patch_nums, quant_resi and beta are not stored in the weights; defaults unless given)."""
        sd = state_dict
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        ch = sd["encoder.conv_in.weight"].shape[0]
        inferred = dict(
            vocab_size=sd["quantize.embedding.weight"].shape[0],
            z_channels=sd["quant_conv.weight"].shape[0],
            ch=ch,
            ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels),
            num_res_blocks=len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")}),
            share_quant_resi=len({k.split(".")[3] for k in sd
                                  if k.startswith("quantize.quant_resi.qresi_ls.")}),
        )
        if patch_nums is not None:
            inferred["patch_nums"] = patch_nums
        return VQVAEConfig(**{**inferred, **overrides})

    @classmethod
    def from_pretrained(cls, path, patch_nums=None, **overrides) -> "VQVAE":
        """Load VAR-layout weights (e.g. vae_ch160v4096z32.pth, or torch.save(vae.state_dict())) strictly.

        path: file path, or an already loaded state dict. patch_nums: the token-map sides to use (default
        (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 256px for the released weights; (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
        for 512px, (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64) for 1024px). overrides: other
        VQVAEConfig fields. The usage buffer quantize.ema_vocab_hit_SV may have another row count.
        Returns the model on the CPU in eval mode.
        """
        name = "VQ-VAE state dict" if isinstance(path, Mapping) else f"VQ-VAE weights {path}"
        state = dict(path) if isinstance(path, Mapping) else weights.read_weights(path, "VQ-VAE weights")
        needed = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "quant_conv.weight",
                  "quantize.embedding.weight")
        if not isinstance(state, Mapping) or any(not torch.is_tensor(state.get(k)) for k in needed):
            found = sorted(state)[:6] if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"{name}: not a VQ-VAE state dict (expected keys such as {list(needed)}, found "
                             f"{found}); pass the VQ-VAE's own state dict, not a wrapper around it")
        try:
            config = cls.config_from_state_dict(state, patch_nums, **overrides)
        except (KeyError, IndexError) as e:
            raise ValueError(f"{name}: cannot infer the VQ-VAE's sizes from the weights (missing {e}); "
                             "expected VAR's key layout (see VQVAE(VQVAEConfig()).state_dict())") from e
        model = cls(config)
        expected = model.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        misshapen = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                     for k in expected
                     if k in state and state[k].shape != expected[k].shape
                     and k != "quantize.ema_vocab_hit_SV"]
        if missing or unexpected or misshapen:
            raise ValueError(f"{name}: weights do not fit the VQ-VAE inferred from them ({model.config}); "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}, "
                             f"wrong shape {misshapen[:5]}")
        model.load_state_dict(state, strict=True)
        return model.eval()


def reconstruction_loss(recon, img, edge_weight: float = 1.0):
    """L1 + L2 between images, plus edge_weight * L1 between their horizontal and vertical pixel differences.

    The edge term costs almost nothing and targets what a small tokenizer gets wrong first: the sharp
    outlines and corners of small objects, which L1/L2 barely weigh because they cover few pixels.
    """
    loss = (recon - img).abs().mean() + (recon - img).square().mean()
    if edge_weight:
        dx = (recon.diff(dim=-1) - img.diff(dim=-1)).abs().mean()
        dy = (recon.diff(dim=-2) - img.diff(dim=-2)).abs().mean()
        loss = loss + edge_weight * (dx + dy)
    return loss
