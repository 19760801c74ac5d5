"""
Text-to-image sampling with STAR (arXiv 2406.10797): the bundled shapes model or the released weights.

A Pipeline joins the four pieces of the other files: the BPE tokenizer and CLIP text encoder of
clip_text.py turn prompts into text states, STAR (star.py) draws the token maps scale by scale with
classifier-free guidance (the empty prompt "" is the unconditional branch; sec. 3 of the paper), and the
multi-scale VQ-VAE of tokenizer.py decodes them. `load_pipeline` reads a checkpoint written by train.py;
`load_released` builds the same from the released files (STAR weights, VAR's VQ-VAE, SD-2.1's text
encoder and tokenizer). Images come back as uint8 arrays (N, H, W, 3); a seed fixes them. shapes.py
lends its grammar (a warning for prompts outside it), to_uint8 and the contact sheet of --grid.

  python sample.py --prompt "a red circle above a blue square"            # bundled model -> sample.png
  python sample.py --prompts-file prompts.txt --num-images 4 --out-dir out --grid --save-scales
      # written batch by batch; after Ctrl-C or a crash the same command skips the images already in out/
  python sample.py --prompt "a red circle to the left of a blue square" --image in.png --mask mask.png
  python sample.py --preset star-1024-sampler --star star-1024-sampler.pth --vae vae_ch160v4096z32.pth \\
      --text-encoder sd21/text_encoder --tokenizer sd21/tokenizer --prompt "a corgi on the moon"
Tests: python -m pytest -q tests/test_sample.py
"""
import argparse
import json
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import cli
from cli import UserError
from clip_text import TextConfig, TextEncoder, Tokenizer
from shapes import contact_sheet, parse_caption, to_uint8
from star import PRESETS, STAR, STARConfig, keep_masks
from tokenizer import VQVAE, VQVAEConfig
from weights import (RELEASED_SAMPLING, SHAPES_SAMPLING, read_weights, released_config, star_state_dict,
                     with_overrides)

DEFAULT_CKPT = Path(__file__).resolve().parent / "checkpoints" / "shapes.pt"
TRAIN_COMMAND = ("python train.py --out runs/shapes && "
                 "python train.py --export runs/shapes/head.pt checkpoints/shapes.pt")
PIPELINE_PARTS = ("vae_config", "vae", "tokenizer", "text_config", "text_encoder", "star_config", "star")

# -----------------------------------------------------------------------------
# the pipeline: prompts -> text states -> token maps, scale by scale -> images


class Pipeline:
    """Tokenizer + text encoder + STAR (with its VQ-VAE): prompts in, uint8 images out.

    sampling: default {cfg, top_k, top_p} for generate(); head_ready: whether STAR's sampler head is
    trained (stable sampling is on by default then); source: where the weights came from (messages);
    trained_on: train.py's --data for our checkpoints ('shapes' or a folder), None for released weights.
    """

    def __init__(self, tokenizer, text_encoder, vae, star, sampling, head_ready, source, trained_on=None):
        self.tokenizer, self.text_encoder, self.vae, self.star = tokenizer, text_encoder, vae, star
        self.sampling, self.head_ready, self.source = dict(sampling), head_ready, source
        self.trained_on = trained_on
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self._empty = None                                   # encoding of "" (guidance), made once

    @torch.no_grad()
    def encode(self, prompts):
        """Prompts -> text states (B, T, D), mask (B, T), pooled (B, D) on the pipeline's device."""
        # [SOT] + BPE ids + [EOT], right-padded to the encoder's context (77 for CLIP); mask 1 = a real token
        ids_BT, mask_BT = self.tokenizer(prompts, context_length=self.text_encoder.config.context_length)
        ids_BT, mask_BT = ids_BT.to(self.device), mask_BT.to(self.device)
        # every token's state (STAR's cross-attention reads them) and one pooled vector (its conditioning)
        hidden_BTD, pooled_BD = self.text_encoder(ids_BT, mask_BT)
        return hidden_BTD, mask_BT, pooled_BD

    def generate(self, prompts, seed=0, cfg=None, top_k=None, top_p=None, stable=None, images_per_prompt=1,
                 return_scales=False, batch_size=None, progress=False):
        """Images for `prompts`: uint8 (N, H, W, 3), N = len(prompts) * images_per_prompt, prompt-major.

        seed: seeds one CPU torch.Generator that draws every token, so a seed gives the same images on
            every device up to float noise (for the same prompts, options and batch_size).
        cfg, top_k, top_p: guidance scale and sampling filters; None takes self.sampling's value.
        stable: commit the large scales with the sampler head; None = on when the head is trained.
        return_scales: also return the image after every scale, uint8 (N, K, H, W, 3), coarse to fine.
        batch_size: images generated at once (None: all); progress: show a tqdm bar over the scales.
        """
        prompts, draw = self._options(prompts, seed, cfg, top_k, top_p, stable, images_per_prompt, batch_size)
        batches = list(self._batches(prompts, seed, images_per_prompt, batch_size, progress=progress,
                                     return_scales=return_scales, **draw))
        images_NHW3 = np.concatenate([images for _, images, _ in batches])
        if not return_scales:
            return images_NHW3
        return images_NHW3, np.concatenate([scales for _, _, scales in batches])     # (N, K, H, W, 3)

    def _batches(self, prompts, seed, images_per_prompt, batch_size, streamed=False, skip=None,
                 progress=False, **draw):
        """The loop that generate, generate_batches and edit share. Yields (start, images uint8 (B, H, W, 3),
        scales uint8 (B, K, H, W, 3) or None) for images start .. start+B-1 of N, prompt-major.

        streamed (generate_batches): a batch encodes only its own prompts and draws from its own generator,
        seeded batch_seed(seed, start), so it depends on nothing before it and skip(start, B) -> True can
        leave it out. Otherwise (generate, edit) one generator seeded `seed` draws every batch in turn: the
        images of a call with several batches stay what they have always been for that seed.
        draw: STAR.generate's keywords (cfg, top_k, top_p, stable, return_scales, known_idx, keep).
        """
        N = len(prompts) * images_per_prompt
        batch_size = batch_size or N
        if self._empty is None:
            self._empty = self.encode([""])                  # (1, T, D), (1, T), (1, D): the unguided branch
        # the generator lives on the CPU: the same draws on every device, and a seed means the same tokens
        generator = torch.Generator().manual_seed(seed)
        if not streamed:
            text = self._text(prompts, images_per_prompt, 0, N)         # all N rows, encoded once
        for b, start in enumerate(range(0, N, batch_size)):
            B = min(batch_size, N - start)
            if skip is not None and skip(start, B):
                continue
            if streamed:
                rows = self._text(prompts, images_per_prompt, start, B)
                generator = torch.Generator().manual_seed(batch_seed(seed, start))
            else:
                rows = [t[start:start + B] for t in text]    # (B, T, D), (B, T), (B, D)
            # STAR.generate draws the K token maps coarse to fine, each scale guided by the "" rows
            # ((1 + t) * cond - t * uncond, t ramping up to cfg) and decodes f_hat: (B, 3, H, W) in [0, 1]
            desc = f"batch {b + 1}/{math.ceil(N / batch_size)}"
            with scale_progress(self.star, desc, progress) as on_scale:
                out = self.star.generate(*rows, *self._empty, generator=generator, on_scale=on_scale, **draw)
            img_B3HW, per_scale = out if draw.get("return_scales") else (out, None)  # K x (B, 3, H, W)
            scales = None if per_scale is None else np.stack([to_uint8(s) for s in per_scale], axis=1)
            yield start, to_uint8(img_B3HW), scales

    def _text(self, prompts, images_per_prompt, start, B):
        """The text states of images start .. start+B-1: each prompt encoded once, then repeated for its
        images in the range (image i belongs to prompt i // images_per_prompt)."""
        first, last = start // images_per_prompt, (start + B - 1) // images_per_prompt
        counts = torch.tensor([min(start + B, (i + 1) * images_per_prompt) - max(start, i * images_per_prompt)
                               for i in range(first, last + 1)])      # images of each prompt in the range
        return [t.repeat_interleave(counts.to(t.device), dim=0) for t in self.encode(prompts[first:last + 1])]

    def generate_batches(self, prompts, seed=0, cfg=None, top_k=None, top_p=None, stable=None,
                         images_per_prompt=1, return_scales=False, batch_size=None, skip=None):
        """generate() one batch at a time, for runs too long to hold in memory or to finish in one go.

        Yields (start, images (B, H, W, 3), scales (B, K, H, W, 3) or None) for images start .. start+B-1
        (prompt-major, as generate). Each batch encodes only its own prompts and draws from its own
        generator, seeded batch_seed(seed, start): a batch depends on nothing before it, so skip(start, B)
        -> True leaves a batch out (already on disk) and the others come out the same. The first batch is
        seeded `seed`, so a run of one batch gives what generate() gives.
        """
        prompts, draw = self._options(prompts, seed, cfg, top_k, top_p, stable, images_per_prompt, batch_size)
        yield from self._batches(prompts, seed, images_per_prompt, batch_size, streamed=True, skip=skip,
                                 return_scales=return_scales, **draw)

    def edit(self, prompts, image, mask, seed=0, cfg=None, top_k=None, top_p=None, stable=None,
             images_per_prompt=1, batch_size=None, progress=False):
        """Inpaint / outpaint `image`: uint8 (N, H, W, 3), N = len(prompts) * images_per_prompt.

        image: RGB uint8 (H, W, 3) array or PIL image; mask: (H, W) array or PIL image, white (>= 128,
        or True) = regenerate, black = keep (outpainting: white outside the part to keep). Both are
        centre-cropped and resized to the model's resolution (fit_edit_inputs). The image is encoded
        into its token maps, and at every scale the tokens touching the kept region are the image's
        while the model draws the rest for the prompt (STAR.generate's known_idx / keep). The kept
        region is not pasted back: decoding the mixed token maps leaves no seam (README, Editing).
        Other arguments as in generate().
        """
        prompts, draw = self._options(prompts, seed, cfg, top_k, top_p, stable, images_per_prompt, batch_size)
        if self.vae.encoder is None:
            raise ValueError(f"{self.source} holds no VQ-VAE encoder weights, so it cannot turn an image "
                             "into tokens: edit with a checkpoint that has the whole VQ-VAE "
                             "(train.py writes one)")
        image, regenerate, _ = fit_edit_inputs(image, mask, self.image_size)   # (S, S, 3) uint8, (S, S) bool
        if not regenerate.any() or regenerate.all():
            raise ValueError("the mask " + (
                "regenerates nothing (it is all black): paint white what to regenerate"
                if not regenerate.any() else
                "keeps nothing (it is all white): paint black what to keep, "
                "or generate without --image/--mask"))
        # the image in the VQ-VAE's range [-1, 1], (1, 3, S, S), and its token maps at every scale
        x_13HW = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(self.device)
        known = self.vae.img_to_idx(x_13HW)                              # K maps (1, pn*pn)
        # which tokens of each scale stay the image's: K bool maps (1, pn*pn), True = keep
        keep = keep_masks(torch.from_numpy(~regenerate)[None], self.star.config.patch_nums)
        batches = self._batches(prompts, seed, images_per_prompt, batch_size, progress=progress,
                                known_idx=known, keep=keep, **draw)
        return np.concatenate([images for _, images, _ in batches])

    def _options(self, prompts, seed, cfg, top_k, top_p, stable, images_per_prompt, batch_size):
        """(prompts as a list, STAR.generate's sampling keywords), the pipeline's defaults filled in.

        The Python API is a boundary of its own (shapes.py and users call it directly), so its values are
        checked here, by the very argparse types that check the flags (cli.py): one range and one wording
        for both, e.g. ValueError "cfg=inf: expected a number in [0, 100]" for --cfg's "--cfg inf: ...".
        """
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts: expected a non-empty list of strings")
        cfg = self.sampling["cfg"] if cfg is None else cfg
        top_k = self.sampling["top_k"] if top_k is None else top_k
        top_p = self.sampling["top_p"] if top_p is None else top_p
        stable = self.head_ready if stable is None else stable
        for name, value, parse in [("seed", seed, cli.seed), ("cfg", cfg, cli.cfg_scale),
                                   ("top_k", top_k, cli.top_k), ("top_p", top_p, cli.top_p),
                                   ("images_per_prompt", images_per_prompt, cli.positive_int),
                                   ("batch_size", 1 if batch_size is None else batch_size, cli.positive_int)]:
            try:
                parse(str(value))          # str() of an int or float reads back as the same number
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"{name}={e}") from None
        # stable sampling commits tokens with the sampler head (sec. 3.4): it must exist and be trained
        if stable and not self.star.config.head:
            raise ValueError(f"stable sampling needs a model with a sampler head, and {self.source} has "
                             "none: leave it off (--no-stable)")
        if stable and not self.head_ready:
            raise ValueError(f"the sampler head of {self.source} is not trained yet (stage 'star'): leave "
                             "stable sampling off, or train the 'head' stage with train.py")
        return list(prompts), dict(cfg=cfg, top_k=int(top_k), top_p=top_p, stable=stable)

    @property
    def image_size(self):
        """The side of the images: the VQ-VAE's downsampling times the last (finest) token map's side."""
        return self.vae.config.downsample * self.star.config.patch_nums[-1]

    @property
    def num_parameters(self):
        return sum(p.numel() for m in (self.text_encoder, self.vae, self.star) for p in m.parameters())

    def to(self, device=None, dtype=None):
        """STAR runs in `dtype`; the text encoder and the VQ-VAE stay float32 (as in the reference)."""
        self.device = torch.device(device or self.device)
        self.dtype = dtype or self.dtype
        self.text_encoder.to(self.device)                    # once per prompt: float32 costs little
        self.vae.to(self.device)                             # once per image, float32 as in the reference
        self.star.to(self.device, self.dtype)                # most of the work and memory: --dtype is for it
        self._empty = None                                   # encoded again on the new device
        return self


def batch_seed(seed, start):
    """The seed of the batch that starts at image `start`: `seed` for the first, then steps of 2**64 / golden
    ratio (as SplitMix64 does), so the batches of nearby seeds do not share random streams."""
    return (seed + start * 0x9E3779B97F4A7C15) % 2**64


@contextmanager
def scale_progress(star, desc, enabled=True):
    """A tqdm bar over the scales of one STAR.generate call inside the block; yields the on_scale
    callback to pass to it, which advances the bar as each scale's tokens are drawn."""
    bar = tqdm(total=len(star.config.patch_nums), desc=desc, unit="scale", disable=not enabled)
    try:
        yield lambda si, pn: bar.update(1)
    except BaseException:
        bar.leave = False                                # an error message should not follow a dead bar
        raise
    finally:
        bar.close()


def fit_edit_inputs(image, mask, side):
    """An image and its mask at the model's resolution: (uint8 (side, side, 3), regenerate bool (side, side),
    a note saying what was cropped or resized, or None).

    The mask is first resized to the image (it must have the image's aspect ratio); then both are
    centre-cropped to a square and resized to side x side (image: Lanczos; mask: area average, then
    white where at least half of it was white, i.e. >= 128).
    """
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if not isinstance(mask, Image.Image):
        m = np.asarray(mask)
        mask = Image.fromarray(m.astype(np.uint8) * 255 if m.dtype == bool else m.astype(np.uint8))
    image, mask = image.convert("RGB"), mask.convert("L")
    (W, H), (w, h) = image.size, mask.size
    if abs(w / h - W / H) > 0.01 * W / H:
        raise ValueError(f"the mask is {w}x{h} and the image {W}x{H}: a mask of another shape cannot be "
                         "resized to the image sensibly; draw the mask on the image's canvas")
    if (w, h) != (W, H):
        mask = mask.resize((W, H), Image.BOX)
    S = min(W, H)
    box = ((W - S) // 2, (H - S) // 2, (W - S) // 2 + S, (H - S) // 2 + S)   # the centre square
    note = None
    if (W, H) != (side, side):
        cropped = f"centre-cropped to {S}x{S} and " if W != H else ""
        note = f"note: image {W}x{H} {cropped}resized to {side}x{side}, the model's resolution"
        image = image.crop(box).resize((side, side), Image.LANCZOS)
        mask = mask.crop(box).resize((side, side), Image.BOX)
    return np.array(image), np.array(mask) >= 128, note

# -----------------------------------------------------------------------------
# our own checkpoints (train.py)


def load_pipeline(path, device="cpu", dtype=None, patch_nums=None, rope_norm=None, rope_theta=None):
    """Build a Pipeline from a checkpoint written by train.py (any stage after 'vae', or its export).

    Weights stored in half precision are cast to float32. patch_nums / rope_norm / rope_theta override
    the saved STAR config (same number of scales; the last one is fixed by the VQ-VAE).
    """
    ck = read_weights(path, "checkpoint")
    if not isinstance(ck, dict) or ck.get("format") != "star-pipeline":
        raise ValueError(f"checkpoint {path} was not written by train.py; for released STAR weights use "
                         "--preset/--star/--vae/--text-encoder/--tokenizer")
    if ck.get("stage") == "vae":
        raise ValueError(f"checkpoint {path} holds only the VQ-VAE (stage 'vae'): sampling needs STAR, so "
                         "let train.py run its 'star' stage (python train.py --out DIR --resume)")
    absent = [k for k in PIPELINE_PARTS if k not in ck]
    if absent:
        raise ValueError(f"checkpoint {path} is incomplete: it lacks {absent}; write it again with train.py")
    try:
        vae_config, star_config = VQVAEConfig(**ck["vae_config"]), STARConfig(**ck["star_config"])
        star_config = with_overrides(star_config, patch_nums, rope_norm, rope_theta, f"checkpoint {path}")
        if star_config.patch_nums[-1] != vae_config.patch_nums[-1]:
            raise ValueError(f"--patch-nums {','.join(map(str, star_config.patch_nums))} ends at "
                             f"{star_config.patch_nums[-1]}, but the VQ-VAE of {path} decodes "
                             f"{vae_config.patch_nums[-1]}x{vae_config.patch_nums[-1]} latents "
                             f"({vae_config.image_size}px images): "
                             f"end the list at {vae_config.patch_nums[-1]}")
        # the VQ-VAE quantizes at STAR's scales: both must use the same token-map sides
        vae = VQVAE(replace(vae_config, patch_nums=star_config.patch_nums))
        if not any(k.startswith("encoder.") for k in ck["vae"]):
            vae.encoder = None                           # a decoder-only bundle generates but cannot edit
        vae.load_state_dict(ck["vae"])                   # load_state_dict copies: float16 -> float32
        tokenizer = Tokenizer.from_state_dict(ck["tokenizer"])
        text_encoder = TextEncoder(TextConfig(**ck["text_config"]))
        text_encoder.load_state_dict(ck["text_encoder"])
        star = STAR(star_config, vae)
        star.load_state_dict(ck["star"])
    except (TypeError, KeyError, RuntimeError) as e:
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"checkpoint {path} is inconsistent ({type(e).__name__}: {detail}); "
                         "write it again with train.py") from None
    # the checkpoint's own sampling settings (train.py stores its tuned ones) win over the defaults
    sampling = {**SHAPES_SAMPLING, **{k: v for k, v in (ck.get("sampling") or {}).items()
                                      if k in SHAPES_SAMPLING}}
    head_ready = star_config.head and ck.get("stage") == "head"      # the head is trained in the last stage
    trained_on = (ck.get("args") or {}).get("data")
    pipe = Pipeline(tokenizer, text_encoder.eval(), vae.eval(), star.eval(), sampling, head_ready, str(path),
                    trained_on)
    return pipe.to(device, dtype or torch.float32)

# -----------------------------------------------------------------------------
# released weights (STAR on Hugging Face, VAR's VQ-VAE, SD-2.1's text encoder and tokenizer)


def load_released(star, vae, text_encoder, tokenizer, preset=None, patch_nums=None, rope_norm=None,
                  rope_theta=None, device="cpu", dtype=None):
    """Build a Pipeline from released files: STAR weights, VAR's VQ-VAE (vae_ch160v4096z32.pth), SD-2.1's
    text_encoder folder and tokenizer folder (or OpenAI's bpe_simple_vocab_16e6.txt.gz)."""
    for what, p, folder in (("STAR weights", star, False), ("VQ-VAE weights", vae, False),
                            ("text encoder folder", text_encoder, True), ("tokenizer", tokenizer, None)):
        if not Path(p).exists():
            raise FileNotFoundError(f"{what} {p} not found")
        if folder is not None and Path(p).is_dir() != folder:
            raise ValueError(f"{what} {p} is a {'file' if folder else 'folder'}; expected a "
                             f"{'folder (with config.json and the weights)' if folder else 'file'}")
    ck = read_weights(star, "STAR weights")                   # read once: config and model both come from it
    if isinstance(ck, dict) and ck.get("format") == "star-pipeline":
        raise ValueError(f"{star} is a checkpoint written by train.py, not released STAR weights: pass it as "
                         "--ckpt")
    sd, _ = star_state_dict(ck, f"STAR weights {star}")
    config = released_config(sd, f"STAR weights {star}", preset, patch_nums, rope_norm, rope_theta)
    # the three parts must fit each other: STAR's codebook and text width are the VQ-VAE's and the encoder's
    vae_model = VQVAE.from_pretrained(vae, patch_nums=config.patch_nums)
    if (vae_model.config.vocab_size, vae_model.config.z_channels) != (config.vocab_size, config.vae_dim):
        raise ValueError(f"VQ-VAE weights {vae} have a "
                         f"{vae_model.config.vocab_size}x{vae_model.config.z_channels} codebook, but STAR "
                         f"weights {star} expect {config.vocab_size}x{config.vae_dim}: use the VQ-VAE the "
                         "model was trained with (VAR's vae_ch160v4096z32.pth for the released models)")
    text = TextEncoder.from_pretrained(text_encoder)
    if text.config.width != config.text_dim:
        raise ValueError(f"text encoder {text_encoder} is {text.config.width} wide, but STAR weights "
                         f"{star} expect {config.text_dim}-wide text states: use the text encoder the model "
                         "was trained with (SD-2.1's text_encoder for the released models)")
    tok = Tokenizer.from_file(tokenizer)
    if tok.vocab_size > text.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {tok.vocab_size} tokens, more than the text encoder's "
                         f"{text.config.vocab_size}: use the tokenizer that goes with {text_encoder}")
    model = STAR.from_pretrained(sd, vae_model, config=config)
    pipe = Pipeline(tok, text, vae_model, model, RELEASED_SAMPLING, config.head, str(star))
    return pipe.to(device, dtype or torch.float32)

# -----------------------------------------------------------------------------
# command line: the flags, checked before anything loads


def _patch_nums(text):
    try:
        sides = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of sides "
                                         "such as 1,2,3,4,6,8")
    if any(s < 1 for s in sides) or any(a >= b for a, b in zip(sides, sides[1:])):
        raise argparse.ArgumentTypeError(f"{text!r}: the sides must grow strictly from coarse to fine, "
                                         "e.g. 1,2,3,4,6,8")
    return sides


def parse_args(argv=None):
    """The flags. Each value is checked by its type (cli.py); Pipeline._options runs the same types again
    on the values it is given, so a flag and a keyword share their range and their wording."""
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeat the flag for several)")
    g.add_argument("--prompts-file", metavar="FILE",
                   help="a text file with one prompt per line (blank lines skipped)")
    g.add_argument("--num-images", type=cli.positive_int, default=1, metavar="N",
                   help="images per prompt (default 1)")
    g = p.add_argument_group("sampling")
    g.add_argument("--seed", type=cli.seed, default=0, metavar="N",
                   help="seed of every random draw, in [0, 2**64 - 1] (default 0)")
    g.add_argument("--cfg", type=cli.cfg_scale, metavar="S",
                   help=f"classifier-free guidance scale in [0, {cli.MAX_CFG:g}] (default: the model's, "
                   f"bundled {SHAPES_SAMPLING['cfg']}, released {RELEASED_SAMPLING['cfg']})")
    g.add_argument("--top-k", type=cli.top_k, metavar="K",
                   help="sample among the k likeliest tokens; 0 = all, 1 = greedy "
                   f"(default: bundled {SHAPES_SAMPLING['top_k']}, released {RELEASED_SAMPLING['top_k']})")
    g.add_argument("--top-p", type=cli.top_p, metavar="P",
                   help="nucleus sampling mass in [0, 1]; 0 or 1 = off (default: bundled "
                   f"{SHAPES_SAMPLING['top_p']}, released {RELEASED_SAMPLING['top_p']})")
    g.add_argument("--stable", action=argparse.BooleanOptionalAction, default=None,
                   help="commit the large scales with the sampler head "
                   "(default: on when the model has a trained one)")
    g.add_argument("--batch-size", type=cli.positive_int, metavar="N",
                   help="images generated at once (default: as many pixels as 16 images of 256px: "
                   "64 at 64px, 4 at 512px, 1 at 1024px; lower it if memory runs out)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: cuda, then mps, then cpu")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="STAR's precision; auto: bfloat16 on GPUs that support it, else float32")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile STAR's per-scale decoding steps: faster on GPUs after a first run "
                   "that compiles (minutes on a CPU); same tokens up to float noise")
    g.add_argument("--threads", type=cli.threads, metavar="N",
                   help="CPU threads (default: 1 for a small model like the bundled one, "
                   "else the cores not busy with other processes)")
    g = p.add_argument_group("editing (inpainting, outpainting)")
    g.add_argument("--image", metavar="FILE",
                   help="edit this image instead of drawing a new one (centre-cropped and resized "
                   "to the model's resolution); needs --mask")
    g.add_argument("--mask", metavar="FILE",
                   help="white (>= 128) = regenerate, black = keep; resized to the image "
                   "(outpainting: white around the part to keep)")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="FILE",
                   help="image file for a single image, or the --grid sheet (default sample.png)")
    g.add_argument("--out-dir", metavar="DIR",
                   help="folder for 000.png, 001.png, ... in prompt order and prompts.txt, written batch "
                   "by batch; running the same command again skips the images already there "
                   "(default samples/ when there are several images)")
    g.add_argument("--grid", action="store_true", help="also write a contact sheet (grid.png, or --out)")
    g.add_argument("--save-scales", action="store_true",
                   help="also write the image after every scale, coarse to fine "
                   "(NNN_scales.png / OUT_scales.png)")
    g = p.add_argument_group("model: a checkpoint of ours")
    g.add_argument("--ckpt", metavar="FILE",
                   help="checkpoint written by train.py (default: the bundled checkpoints/shapes.pt)")
    g = p.add_argument_group("model: released weights")
    g.add_argument("--preset", choices=sorted(PRESETS), help="which released model --star is")
    g.add_argument("--star", metavar="FILE", help="STAR checkpoint (.pth)")
    g.add_argument("--vae", metavar="FILE", help="VAR's VQ-VAE, vae_ch160v4096z32.pth")
    g.add_argument("--text-encoder", metavar="DIR", help="SD-2.1 text_encoder folder (config.json + weights)")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="SD-2.1 tokenizer folder or OpenAI's bpe_simple_vocab_16e6.txt.gz")
    g.add_argument("--patch-nums", type=_patch_nums, metavar="1,2,...",
                   help="token-map sides, coarse to fine, e.g. 1,2,3,4,5,6,8 "
                   "(overrides the preset / checkpoint)")
    g.add_argument("--rope-norm", type=cli.bounded_float(0, 1e6, lo_open=True), metavar="X",
                   help="RoPE positions span [0, rope_norm] at every scale (released: 64)")
    g.add_argument("--rope-theta", type=cli.bounded_float(0, 1e12, lo_open=True), metavar="X",
                   help="RoPE base frequency (released: 10000)")
    return p.parse_args(argv)


def check_args(args):
    """Flag combinations and the prompts file, before anything is loaded (flag values: their types). Returns
    the prompts."""
    released = [f for f in ("star", "vae", "text_encoder", "tokenizer") if getattr(args, f)]
    if args.ckpt and (released or args.preset):
        raise UserError("--ckpt is one of our checkpoints; --preset/--star/--vae/--text-encoder/--tokenizer "
                        "load released weights instead: give one or the other")
    if (released or args.preset) and len(released) < 4:
        missing = [f"--{f.replace('_', '-')}" for f in ("star", "vae", "text_encoder", "tokenizer")
                   if not getattr(args, f)]
        raise UserError("released weights need --star, --vae, --text-encoder and --tokenizer; "
                        f"missing {' '.join(missing)}")
    if args.out and args.out_dir:
        raise UserError("give --out FILE (one image or a --grid) or --out-dir DIR, not both")
    if bool(args.image) != bool(args.mask):
        raise UserError("--image and --mask go together: give the image to edit and a mask of what to "
                        "regenerate (white) and keep (black)")
    if args.image and args.out_dir:
        raise UserError("--out-dir streams long sampling runs; an edit writes one file: use --out FILE")
    if args.image and args.save_scales:
        raise UserError("--save-scales shows how a new image is drawn; it is not available with --image")
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompts-file {path} cannot be read ({type(e).__name__}): expected a UTF-8 "
                            "text file with one prompt per line")
        from_file = [ln.strip() for ln in lines if ln.strip()]
        if not from_file:
            raise UserError(f"--prompts-file {path} has no prompts: write one prompt per line")
        prompts += from_file
    if not prompts:
        raise UserError('no prompt: give --prompt "..." (repeatable) or --prompts-file FILE')
    n = len(prompts) * args.num_images
    if args.out:
        if n > 1 and not args.grid:
            raise UserError(f"--out {args.out} holds one image, but {len(prompts)} prompt(s) x "
                            f"{args.num_images} = {n} images were asked for: use --out-dir DIR, "
                            "or --grid for one sheet")
        if Path(args.out).suffix.lower() not in Image.registered_extensions():
            raise UserError(f"--out {args.out}: unknown image type {Path(args.out).suffix!r}; "
                            "use a .png file name")
    return prompts


def read_edit_files(args):
    """(image, mask) as PIL images for --image / --mask, or (None, None); read before the model loads."""
    if not args.image:
        return None, None
    files = []
    for flag, path in (("--image", Path(args.image)), ("--mask", Path(args.mask))):
        if not path.is_file():
            raise UserError(f"{flag} {path} not found" + (" (it is a folder)" if path.is_dir() else "") +
                            ": give an image file (PNG, JPEG, ...)")
        try:
            with Image.open(path) as img:
                img.load()
                files.append(img.copy())
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"{flag} {path} cannot be read as an image ({type(e).__name__}): "
                            "give a PNG or JPEG file") from None
    return files


def output_plan(args, n):
    """(single image file or None, folder or None), created and checked before the model loads."""
    out, out_dir = args.out, args.out_dir
    if not out and not out_dir:   # one image, or an edit (one file, a sheet if several): sample.png
        out, out_dir = ("sample.png", None) if n == 1 or args.image else (None, "samples")
    target = Path(out_dir) if out_dir else Path(out).resolve().parent
    try:                          # a folder we cannot write to fails now, not after minutes of sampling
        target.mkdir(parents=True, exist_ok=True)
        probe = target / ".sample_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        flag = "--out-dir" if out_dir else "--out"
        reason = e.strerror or type(e).__name__
        raise UserError(f"{flag} {out_dir or out}: cannot write to {target} ({reason}); "
                        "choose a folder you can write to")
    return (Path(out) if out else None), (Path(out_dir) if out_dir else None)

# -----------------------------------------------------------------------------
# command line: loading, memory, files


def build_pipeline(args, device, dtype):
    """The Pipeline the flags name: released weights (--star ...), --ckpt, or the bundled checkpoint."""
    overrides = dict(patch_nums=args.patch_nums, rope_norm=args.rope_norm, rope_theta=args.rope_theta)
    if args.star:
        return load_released(args.star, args.vae, args.text_encoder, args.tokenizer, preset=args.preset,
                             device=device, dtype=dtype, **overrides)
    ckpt = Path(args.ckpt) if args.ckpt else DEFAULT_CKPT
    if not args.ckpt and not ckpt.is_file():
        raise UserError(f"no checkpoint at {ckpt}: train the bundled model with `{TRAIN_COMMAND}`, "
                        "pass --ckpt PATH, or use released weights "
                        "(--preset, --star, --vae, --text-encoder, --tokenizer)")
    return load_pipeline(ckpt, device=device, dtype=dtype, **overrides)


def pick_dtype(name, device):
    """--dtype: auto is bfloat16 where the GPU computes in it natively, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def warn_outside_grammar(prompts):
    """A model of the shapes world knows its captions' small grammar (shapes.py) and nothing else: say so
    for a prompt outside it, which is drawn loosely (e.g. 'a red circle' often comes out as two objects)."""
    for prompt in dict.fromkeys(prompts):
        try:
            parse_caption(prompt)
        except ValueError:
            print(f"warning: {prompt!r} is outside the captions this model was trained on, such as "
                  "'a large red circle on the left on a white background' or 'a red circle above a "
                  "blue square' (size and position are part of a one-object caption); it may not be "
                  "followed", file=sys.stderr)


@contextmanager
def memory_advice(device, dtype, doing, at_once=1, out_dir=None):
    """Running out of memory inside the block becomes one line saying what was running and what can help.
    CUDA / MPS raise torch.OutOfMemoryError, the CPU allocator a RuntimeError, Python a MemoryError."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)
                or "out of memory" in str(e)):
            raise
        advice = [f"--batch-size {at_once // 2}"] if at_once > 1 else []
        if dtype == torch.float32 and device.type == "cuda":
            advice.append("--dtype bfloat16")                # half the activations; a CPU gains nothing
        advice.append("a device with more memory" if device.type != "cpu" else "a machine with more memory")
        kept = (f" (the images in {out_dir} are kept: the same command with the new flags continues)"
                if out_dir is not None else "")
        raise UserError(f"out of memory on {device} {doing} ({type(e).__name__}): use {', '.join(advice)}, "
                        f"or a smaller model{kept}") from None


def peak_memory(device):
    """The most memory this run held, for the summary line."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA, max allocated)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss        # KiB on Linux, bytes on macOS
    return f"{rss / (2**30 if sys.platform == 'darwin' else 2**20):.2f} GiB (process max RSS)"


def save(path, content):
    """Write an image (uint8 (H, W, 3), in the format of path's suffix) or text (an iterable of lines) to
    `path` through a temporary file and a rename: the file is either complete or absent, even after Ctrl-C
    or a crash, so a file that exists is a finished one (what --out-dir's continuation counts on)."""
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(content, np.ndarray):
        Image.fromarray(content).save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(content)
    os.replace(tmp, path)


def grid(images_NHW3, images_per_prompt):
    """The contact sheet of --grid (in --out or the folder's grid.png): a row per prompt when each has
    several images, else as near a square as the count allows."""
    return contact_sheet(images_NHW3, images_per_prompt if images_per_prompt > 1 else None)


def scale_strip(scales_KHW3, max_side=256):
    """The image after every scale, coarse to fine, in one row (panels shrunk to max_side pixels)."""
    panels = scales_KHW3
    if panels.shape[1] > max_side:
        panels = np.stack([np.asarray(Image.fromarray(p).resize((max_side, max_side), Image.LANCZOS))
                           for p in panels])
    return contact_sheet(panels, cols=len(panels))

# -----------------------------------------------------------------------------
# command line: --out-dir, written batch by batch and continued after a stop


def run_settings(args, prompts, device, dtype):
    """Everything that decides the images of an --out-dir run, to tell a continuation from another run,
    as JSON reads it back (lists, not tuples). --batch-size is not in it: a run stopped by a lack of memory
    continues with a smaller one."""
    files = [Path(f) for f in (args.ckpt or (None if args.star else DEFAULT_CKPT), args.star, args.vae,
                               args.text_encoder, args.tokenizer) if f]
    return json.loads(json.dumps(dict(
        prompts=prompts, images_per_prompt=args.num_images, seed=args.seed, cfg=args.cfg, top_k=args.top_k,
        top_p=args.top_p, stable=args.stable, preset=args.preset, patch_nums=args.patch_nums,
        rope_norm=args.rope_norm, rope_theta=args.rope_theta, device=device.type, dtype=str(dtype),
        model=[[str(f.resolve()), *((f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else ())]
               for f in files])))


def sample_to_folder(pipe, args, prompts, out_dir, batch_size, settings):
    """Generate into out_dir batch by batch: each image is written (atomically) as soon as its batch is done,
    so memory stays flat however many images are asked for. Images already there from the same settings
    (settings.json) are skipped; their batches' seeds do not depend on them, so the set comes out as one
    uninterrupted run would write it. Returns the number of images generated."""
    n = len(prompts) * args.num_images
    image, strip = (lambda i: out_dir / f"{i:03d}.png"), (lambda i: out_dir / f"{i:03d}_scales.png")
    done = lambda i: image(i).is_file() and (not args.save_scales or strip(i).is_file())   # noqa: E731
    # 1. what is there already: our own images (same settings) count as done, another run's are removed
    manifest = out_dir / "settings.json"
    try:
        previous = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else None
    except (OSError, ValueError):
        previous = None
    skipped = stale = 0
    if previous == settings:
        skipped = sum(done(i) for i in range(n))          # counted, not listed: memory stays flat in n
    elif any(out_dir.glob("[0-9][0-9][0-9]*.png")):      # another run's images: remove ours-to-be first,
        for p in (f(i) for i in range(n) for f in (image, strip)):    # so that none of them counts as done
            if p.is_file():
                p.unlink()
                stale += 1
    if stale:
        print(f"{out_dir} held {stale} image file(s) of other settings: replaced")
    # 2. the run's description, then its images, batch by batch (a batch whose images are all done is skipped)
    save(manifest, [json.dumps(settings, indent=1)])
    save(out_dir / "prompts.txt",                        # line i: the prompt of NNN.png i, on one line
         (" ".join(p.split()) + "\n" for p in prompts for _ in range(args.num_images)))
    if skipped:
        print(f"skipped {skipped} of {n} images already in {out_dir} (same prompts, seed and settings)")
    bar = tqdm(total=n, initial=skipped, unit="image", desc="images", smoothing=0.1)
    try:
        for start, images, scales in pipe.generate_batches(
                prompts, seed=args.seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, stable=args.stable,
                images_per_prompt=args.num_images, return_scales=args.save_scales, batch_size=batch_size,
                skip=lambda start, B: all(done(i) for i in range(start, start + B))):
            for i, img in enumerate(images, start):
                if not done(i):
                    if scales is not None:
                        save(strip(i), scale_strip(scales[i - start]))
                    save(image(i), img)                          # last: the image marks it done
                    bar.update(1)
    except BaseException:
        bar.leave = False                                        # an error line should not follow a bar
        raise
    finally:
        bar.close()
    # 3. the sheet, read back from disk once all images are there (none of them was kept in memory)
    if args.grid:
        save(out_dir / "grid.png", grid(np.stack([np.asarray(Image.open(image(i))) for i in range(n)]),
                                        args.num_images))
    return n - skipped

# -----------------------------------------------------------------------------
# main


def run(argv=None):
    """The command: check every flag and file, load the model, generate, write, and say how long it took."""
    # 1. everything the user gave, checked before the model loads (a typo should not cost a minute of loading)
    args = parse_args(argv)
    prompts = check_args(args)
    n = len(prompts) * args.num_images
    device = cli.pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    out, out_dir = output_plan(args, n)
    image, mask = read_edit_files(args)
    # 2. the model, and how to run it here
    with memory_advice(device, dtype, "loading the model"):
        pipe = build_pipeline(args, device, dtype)
    cli.set_threads(args.threads, pipe.num_parameters)
    if pipe.trained_on == "shapes":
        warn_outside_grammar(prompts)
    if args.compile:
        try:
            pipe.star.compile_decoding()
        except RuntimeError as e:                        # no compiler for this device: eager is the same math
            print(f"note: {e}; generating eagerly", file=sys.stderr)
    # as many pixels at once as 16 images of 256px: 64 at 64px, 1 at 1024px
    batch_size = args.batch_size or min(64, max(1, 16 * 256 ** 2 // pipe.image_size ** 2))
    if image is not None:   # fitted once here, for the note; edit() then finds them at the right size
        image, mask, note = fit_edit_inputs(image, mask, pipe.image_size)
        if note:
            print(note)
    options = dict(seed=args.seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, stable=args.stable,
                   images_per_prompt=args.num_images, batch_size=batch_size)
    # 3. generate and write: into a folder batch by batch, or into one file (--out, a --grid sheet)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)      # the summary's peak is the sampling's, not the load's
    t0 = time.perf_counter()
    at_once = min(batch_size, n)
    doing = f"generating {at_once} {pipe.image_size}px images at once"
    with memory_advice(device, dtype, doing, at_once, out_dir):
        try:
            if out_dir is not None:
                generated = sample_to_folder(pipe, args, prompts, out_dir, batch_size,
                                             run_settings(args, prompts, device, dtype))
                written = f"{out_dir}/000.png..{n - 1:03d}.png"
            else:
                if image is not None:
                    images, scales = pipe.edit(prompts, image, mask, progress=True, **options), None
                else:
                    result = pipe.generate(prompts, return_scales=args.save_scales, progress=True, **options)
                    images, scales = result if args.save_scales else (result, None)
                save(out, grid(images, args.num_images))                 # one image is a sheet of one
                if scales is not None:                                   # a strip per image, one per row
                    save(out.with_name(f"{out.stem}_scales.png"), contact_sheet(
                        np.stack([scale_strip(s) for s in scales]), cols=1))
                generated, written = len(images), str(out)
        except OSError as e:
            raise UserError(f"could not write the images ({cli.one_line(e)}); choose another --out / "
                            "--out-dir") from None
    # 4. what was written, and what it cost (bench.py reads the time and the threads off this line)
    seconds = time.perf_counter() - t0
    print(f"wrote {written}")
    if generated:                                        # 0 when an --out-dir run found everything done
        print(f"{generated} image(s) of {pipe.image_size}x{pipe.image_size} in {seconds:.2f}s: "
              f"{seconds / generated:.3f} s/image on {device} ({str(dtype).removeprefix('torch.')}, "
              f"{torch.get_num_threads()} CPU thread(s)), peak memory {peak_memory(device)}")


def main(argv=None):
    """The command line; returns the exit status (0; 2 after a one-line 'error:' message; 130 after
    Ctrl-C)."""
    return cli.run_command(run, argv, interrupted="interrupted; the images already written are kept, and the "
                           "same command skips them")


if __name__ == "__main__":
    sys.exit(main())
