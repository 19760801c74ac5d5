"""
Training for the whole STAR pipeline, in three stages that each start from the previous one.

  vae   the multi-scale VQ-VAE of tokenizer.py, on images alone (plain autoencoder warm-up, then the
        codebook is initialised from encoder features and dead codes are re-seeded as training goes)
  star  the transformer of star.py on a frozen VQ-VAE, teacher-forced over all scales (paper, sec. 3),
        with the text encoder of clip_text.py trained jointly from scratch (the demo), or a released
        CLIP text encoder loaded frozen (--text-encoder DIR --tokenizer PATH)
  head  the causal stable-sampling head of star.py on a frozen trunk (paper, sec. 3.4)

Data is the synthetic world of shapes.py, rendered on the fly (--data shapes), or a folder of images
with captions (--data DIR: `metadata.jsonl` lines {"file_name", "text"}, or `name.txt` beside each image).
Every stage writes one self-contained checkpoint OUT/<stage>.pt (configs, tokenizer merges, text encoder,
VQ-VAE, STAR, optimizer, step, RNG states), atomically, every --ckpt-every steps and at the end;
`--resume` continues exactly where a killed run stopped, with the flags the run recorded. The token pool
OUT/tokens.pt records what it was made from and is made again when that changes. sample.py reads these files.

  python train.py --out runs/shapes                      # all stages, shapes world, CPU or one GPU
  torchrun --nproc_per_node=2 train.py --out runs/shapes # several processes (gloo on CPU, nccl on GPU)
  python train.py --out runs/shapes --resume             # pick up after an interruption
  python train.py --export runs/shapes/head.pt checkpoints/shapes.pt   # half-precision bundle
  python train.py --data DIR --resolution 256 --patch-nums 1,2,3,4,5,6,8,10,13,16 \
      --vae vae_ch160v4096z32.pth --text-encoder sd21/text_encoder --tokenizer sd21/tokenizer \
      --depth 16 --width 1024                                    # the released parts, frozen
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import cli
import shapes
from cli import Parser, UserError, positive_int
from clip_text import TextConfig, TextEncoder, Tokenizer
from star import STAR, STARConfig
from tokenizer import VQVAE, VQVAEConfig, reconstruction_loss
from weights import SHAPES_SAMPLING, STAGES, load_checkpoint, read_weights, save_atomic


# ---------------------------------------------------------------------------------------------------
# Data: every batch is a pure function of (seed, step, rank), so a resumed run sees the same batches.

def batch_rng(seed, step, rank, stream=0):
    """The generator of one batch: numpy's, seeded with (seed, stream, step, rank).

    A generator per batch, rather than one that runs through the whole training, makes batch `step`
    the same whether the run got there in one go or was resumed on the way (so nothing about the data
    order needs saving), and gives each DDP rank batches of its own. `stream` keeps the other draws
    apart from the training batches and from one another: 1 the codebook's initial batch, 2 the
    captions the BPE vocabulary is learned from, 3 the token pool.
    """
    return np.random.default_rng([seed, stream, step, rank])


class ImageFolder:
    """Images with captions, resized like the reference's pipeline: centre crop, LANCZOS resize, [-1, 1].

    Captions come from `metadata.jsonl` ({"file_name": ..., "text": ...} per line) when present, else
    from a `.txt` file beside each image. Unreadable images are skipped with a warning naming them.
    """
    EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

    def __init__(self, root, resolution):
        from PIL import Image
        self.Image, self.resolution, root = Image, resolution, Path(root)
        if not root.is_dir():
            raise UserError(f"--data {root}: not a folder; give 'shapes' or a folder of images with captions")
        items = []
        meta = root / "metadata.jsonl"
        if meta.exists():
            # utf-8-sig: Windows editors start the file with a byte-order mark
            for n, line in enumerate(meta.read_text(encoding="utf-8-sig").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    name, text = rec["file_name"], rec["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{meta}:{n}: expected a JSON object with "
                                    "'file_name' and 'text'") from None
                if not isinstance(name, str) or not isinstance(text, str):
                    raise UserError(f"{meta}:{n}: 'file_name' and 'text' must be strings, got "
                                    f"{type(name).__name__} and {type(text).__name__}")
                # only files inside the data folder are read: no absolute paths, no way out through '..'
                rel = os.path.normpath(name)
                if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
                    raise UserError(f"{meta}:{n}: file_name {name!r} points outside {root}; give a path "
                                    "relative to the data folder")
                items.append((root / rel, text))
        else:
            for p in sorted(root.iterdir()):
                if p.suffix.lower() in self.EXTS:
                    cap = p.with_suffix(".txt")
                    if not cap.exists():
                        warnings.warn(f"{p.name}: no caption file {cap.name}; skipped")
                        continue
                    try:
                        items.append((p, cap.read_text(encoding="utf-8").strip()))
                    except (OSError, UnicodeDecodeError) as e:
                        warnings.warn(f"{cap}: caption not readable as UTF-8 text "
                                      f"({type(e).__name__}); skipped")
        # decode every image once (JPEGs at reduced size, which is quick): verify() alone misses
        # truncated JPEGs, which would otherwise stop training at the first batch that draws them
        good = []
        for path, text in items:
            try:
                with Image.open(path) as im:
                    im.draft("RGB", (resolution, resolution))
                    im.load()
                good.append((path, text))
            except Exception as e:
                warnings.warn(f"{path}: not a readable image ({type(e).__name__}); skipped")
        if not good:
            raise UserError(f"--data {root}: no usable images with captions found "
                            "(need metadata.jsonl or an image.txt caption beside each image)")
        self.items = good
        # what the data is, for the files made from it (the token pool): the folder, and every image's
        # name, size and caption
        h = hashlib.sha256()
        for path, text in good:
            h.update(f"{path.relative_to(root)}\0{path.stat().st_size}\0{text}\0".encode())
        self.identity = f"{root.resolve()} ({len(good)} images, {resolution}px, {h.hexdigest()[:16]})"

    def load(self, path):
        try:
            im = self.Image.open(path).convert("RGB")
        except Exception as e:
            raise UserError(f"{path}: became unreadable during training ({type(e).__name__}); "
                            "restore or remove it and continue with --resume")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((self.resolution, self.resolution), self.Image.LANCZOS)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
        return x.permute(2, 0, 1)                                   # (3, H, W) in [-1, 1]

    def captions(self, seed):
        """The captions to learn the BPE vocabulary from: all of the folder's, in order.

        `seed` is unused (nothing is drawn); build_stage calls ShapesData.captions, which draws, the same way.
        """
        return [t for _, t in self.items]

    def preview_captions(self, n=8):
        """Captions of the preview grids: the user's own, the first n of the folder."""
        return [t for _, t in self.items[:n]]

    def batch(self, batch_size, rng):
        """Images (B, 3, H, W) in [-1, 1] and their B captions, drawn with replacement: no epochs to track,
        and a batch is fixed by its generator alone (batch_rng)."""
        pick = rng.integers(0, len(self.items), size=batch_size)
        imgs = torch.stack([self.load(self.items[i][0]) for i in pick])
        return imgs, [self.items[i][1] for i in pick]


class ShapesData:
    """The synthetic world of shapes.py: one or two coloured shapes, captioned, drawn on the fly at 64x64.

    Every batch is drawn fresh, so there is no fixed training set to overfit, and shapes.judge can score
    what STAR draws for captions held out of training (evaluate). two_object (--two-object) is the share of
    scenes with two objects; it is part of the data's identity, so a token pool of another mix is not reused.
    """

    def __init__(self, two_object=0.5):
        self.two_object = two_object
        self.identity = f"shapes, two-object {two_object}"

    def preview_captions(self, n=8):
        return PREVIEW[:n]

    def batch(self, batch_size, rng):
        return shapes.sample_batch(batch_size, rng, self.two_object)   # (B, 3, 64, 64) in [-1, 1], B captions

    def captions(self, seed, n=5000):
        """Captions to learn the BPE vocabulary from (their own stream, disjoint from training batches)."""
        rng = batch_rng(seed, 0, 0, stream=2)
        return [shapes.caption(shapes.random_scene(rng)) for _ in range(n)]


def weights_fingerprint(state_dict):
    """A short hash of a state dict's names, shapes and values: which weights made a derived file."""
    h = hashlib.sha256()
    for name, t in sorted(state_dict.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def pool_source(data, vae, n, seed):
    """What a token pool is made from; a pool whose record differs is tokenized again."""
    return {"vae": weights_fingerprint(vae.state_dict()),
            "vae_config": json.loads(json.dumps(config_dict(vae.config))),
            "data": data.identity, "pool": n, "seed": seed}


def stale_pool(pool, source):
    """Why a pool read from disk cannot be used with `source`, or None when it can."""
    if not isinstance(pool, dict) or not {"idx", "captions"} <= pool.keys():
        return None                                  # not a pool at all: reported by the caller
    made = pool.get("made_from")
    if not isinstance(made, dict):
        return "it does not record what it was made from (written by an older train.py)"
    what = {"vae": "another VQ-VAE", "vae_config": "another VQ-VAE",
            "data": f"other data ({made.get('data')})",
            "pool": f"--pool {made.get('pool')}", "seed": f"--seed {made.get('seed')}"}
    diff = [what[k] for k in source if made.get(k) != source[k]]
    return f"it was made from {', '.join(dict.fromkeys(diff))}" if diff else None


def token_pool(data, vae, n, seed, path, dev, rank, world, quiet=False):
    """Tokenize n training samples once: (idx (n, L) int16, captions).

    The frozen VQ-VAE's encoder costs as much as a small STAR's whole training step on a CPU, and it
    gives the same tokens for the same image every time, so the STAR and head stages draw their
    batches from this pool instead of encoding every batch. Saved beside the checkpoints for --resume,
    with a record of what it was made from (VQ-VAE weights, data, size, seed): a pool made by another
    configuration is never used, it is tokenized again with a line saying why.
    """
    path = Path(path)
    source = pool_source(data, vae, n, seed)
    pool = None
    if rank == 0:          # rank 0 alone reads or makes the pool; the others wait for the file at the barrier
        if path.exists():
            pool = read_weights(path, "token pool", fix="delete it to tokenize again")
            why = stale_pool(pool, source)
            if why:
                print(f"{path}: {why}; tokenizing again for this run", flush=True)
                pool = None
        if pool is None:
            idx, caps = [], []
            for i in tqdm(range(0, n, 64), desc="tokenizing", dynamic_ncols=True, disable=quiet):
                img, c = data.batch(min(64, n - i), batch_rng(seed, i, 0, stream=3))
                with torch.no_grad():
                    # (b, L): every scale's ids side by side; int16 as ids are < 32768 (--vocab-size's limit)
                    idx.append(torch.cat(vae.img_to_idx(img.to(dev)), 1).to(torch.int16).cpu())
                caps += c
            pool = {"idx": torch.cat(idx), "captions": caps, "made_from": source}
            save_atomic(pool, path)
    if world > 1:
        dist.barrier()
        if rank != 0:
            pool = read_weights(path, "token pool", fix="delete it to tokenize again")
    if not isinstance(pool, dict) or not {"idx", "captions"} <= pool.keys():
        raise UserError(f"{path}: not a token pool written by train.py; delete it to tokenize again")
    return pool["idx"], pool["captions"]


def make_data(args, resolution):
    return ShapesData(args.two_object) if args.data == "shapes" else ImageFolder(args.data, resolution)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: their format, save_atomic and load_checkpoint are in weights.py.

def config_dict(cfg):
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------------
# Models of each stage.

def default_vae_config(args):
    # 8x downsampling with narrow high-resolution levels and GroupNorm(8) (see VQVAEConfig.norm_groups):
    # measured on 64px shapes, this trains ~2x faster per step and per wall-second than (1, 2, 2, 4) with 32
    return VQVAEConfig(vocab_size=args.vocab_size, z_channels=32, ch=args.vae_ch, ch_mult=(1, 1, 2, 2),
                       num_res_blocks=args.vae_res_blocks, patch_nums=tuple(args.patch_nums), norm_groups=8)


def default_star_config(args, text_dim, vae_config):
    """STAR's sizes from the flags and the VQ-VAE; the rest as STARConfig's defaults (the released models':
    64-wide heads, 2D RoPE over [0, 64] at every scale, normalized logits), plus the sampler head from
    scale --head-from, plain per-row cross-attention, no stochastic depth, and no class table."""
    return STARConfig(depth=args.depth, width=args.width, num_heads=args.width // 64,
                      patch_nums=vae_config.patch_nums, vocab_size=vae_config.vocab_size,
                      vae_dim=vae_config.z_channels,
                      text_dim=text_dim, rope_theta=10000.0, rope_norm=64.0, logit_norm=True,
                      head=True, sample_from_idx=args.head_from, cross_attn_mode="per_row",
                      drop_path_rate=0.0, class_emb=False)


class TextToImage(nn.Module):
    """STAR with its text encoder, so one DistributedDataParallel wrapper covers both in training.

    Star stage: the trunk's cross-entropy over all tokens, with the gradient reaching the text encoder
    (unless it is a released, frozen one). Head stage (head_only): the sampler head's masked-token loss;
    the text features are detached, since neither the trunk nor the text encoder trains there.
    """

    def __init__(self, star, text_encoder, head_only=False):
        super().__init__()
        self.star, self.text_encoder, self.head_only = star, text_encoder, head_only

    def forward(self, ids, mask, x_BLCv, target_BL, generator=None):
        hidden, pooled = self.text_encoder(ids, mask)           # (B, T, D) per text token, (B, D) pooled
        if self.head_only:
            hidden, pooled = hidden.detach(), pooled.detach()
            return self.star.head_loss(x_BLCv, hidden, mask, pooled, target_BL, generator)
        return self.star.loss(x_BLCv, hidden, mask, pooled, target_BL)


def build_stage(stage, args, ck, data):
    """The modules of a stage and the network that trains.

    `ck` is the previous stage's checkpoint, or this stage's own when resuming (None for a fresh
    VQ-VAE). The VQ-VAE is frozen after its stage; the text encoder trains with STAR unless a released
    one is given; the head stage trains only the sampler head on the frozen trunk.
    """
    vae = VQVAE(VQVAEConfig(**ck["vae_config"]) if ck else default_vae_config(args))
    if ck:
        vae.load_state_dict(ck["vae"])
    if stage == "vae":
        return {"vae": vae}, vae
    vae.requires_grad_(False).eval()
    if "star" in ck:
        tok = Tokenizer.from_state_dict(ck["tokenizer"])
        text = TextEncoder(TextConfig(**ck["text_config"]))
        text.load_state_dict(ck["text_encoder"])
        star = STAR(STARConfig(**ck["star_config"]), vae)
        star.load_state_dict(ck["star"])
    else:
        if args.text_encoder:
            tok = Tokenizer.from_file(args.tokenizer)
            text = TextEncoder.from_pretrained(args.text_encoder)
        else:
            # a BPE vocabulary learned from the training captions: a small world's words become single tokens
            caps = data.captions(args.seed)
            tok = Tokenizer.train(caps, args.text_vocab)
            text = TextEncoder(TextConfig(vocab_size=tok.vocab_size, context_length=args.text_context,
                                          width=args.text_width, layers=args.text_layers,
                                          heads=max(1, args.text_width // 64),
                                          causal=args.text_attention == "causal"))
        star = STAR(default_star_config(args, text.config.width, vae.config), vae)
    if stage == "head" or args.text_encoder:
        text.requires_grad_(False)
    # each stage trains either the trunk or the sampler head: a parameter without a gradient in a
    # stage must be frozen there, or DistributedDataParallel stops waiting for its gradient
    star.requires_grad_(stage == "star")
    for p in star.head_parameters():
        p.requires_grad_(stage == "head")
    parts = {"vae": vae, "tokenizer": tok, "text": text, "star": star}
    return parts, TextToImage(star, text, stage == "head")


def pack(stage, parts, args, step, opt=None, seconds=0.0):
    ck = {"format": "star-pipeline", "stage": stage, "step": step, "seconds": seconds,
          "args": vars(args).copy(),
          "vae_config": config_dict(parts["vae"].config), "vae": parts["vae"].state_dict()}
    if "star" in parts:
        ck.update(tokenizer=parts["tokenizer"].state_dict(), text_config=config_dict(parts["text"].config),
                  text_encoder=parts["text"].state_dict(), star_config=config_dict(parts["star"].config),
                  star=parts["star"].state_dict(), sampling=dict(SHAPES_SAMPLING))
    if opt is not None:
        ck.update(optimizer=opt.state_dict(), rng=torch.get_rng_state())
        if stage == "vae":    # dead-code counters: not weights, but --resume must re-seed the same codes
            ck["vae_code_hits"] = parts["vae"].quantize.code_hits_V.clone()
    return ck


# ---------------------------------------------------------------------------------------------------
# What the loops use: the learning-rate schedule, the optimizer, previews and evaluation.

def lr_at(step, total, base, warmup):
    """Linear warm-up, then cosine decay to 10% of the base rate.

    The warm-up keeps the first updates small while AdamW's moment estimates still rest on a few
    gradients (its early steps are otherwise near their full size whatever the gradient's scale).
    """
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(net, lr, weight_decay):
    """AdamW with weight decay on the weight matrices of Linear and Conv layers, and on nothing else.

    Decay pulls a parameter toward 0, which is a prior only for matrices. The rest keeps its value:
    biases and norm gains; embedding tables (text tokens and positions, scale embeddings, the VQ
    codebook); the start tokens (pos_start, pos_start_last); and the attention temperatures
    scale_mul_1H11, which are log-scales: decaying them toward 0 means a softmax temperature of 1 on
    cosine scores in [-1, 1], i.e. nearly uniform attention (the reference excludes them too).
    """
    decay, no_decay = [], []
    for module in net.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                is_matrix = name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d))
                (decay if is_matrix else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def encode_text(parts, captions, dev):
    """Captions -> the text encoder's (hidden (N, T, D), mask (N, T), pooled (N, D)), on `dev`."""
    ids, mask = parts["tokenizer"](captions, context_length=parts["text"].config.context_length)
    ids, mask = ids.to(dev), mask.to(dev)
    hidden, pooled = parts["text"](ids, mask)
    return hidden, mask, pooled


@torch.no_grad()
def generate(parts, captions, seed, dev, **sampling):
    """Images (N, 3, H, W) in [0, 1] for the captions, with the current weights (previews, evaluation)."""
    star, text = parts["star"], parts["text"]
    was = star.training, text.training          # restored at the end: generate runs inside training loops
    star.eval(), text.eval()
    hidden, mask, pooled = encode_text(parts, captions, dev)
    # the empty caption: the unconditional model that classifier-free guidance contrasts with
    e_hidden, e_mask, e_pooled = encode_text(parts, [""], dev)
    img = star.generate(hidden, mask, pooled, e_hidden, e_mask, e_pooled,
                        generator=torch.Generator().manual_seed(seed), **sampling)
    star.train(was[0]), text.train(was[1])
    return img


def save_png(image_HW3, path):
    """Write a uint8 image (H, W, 3) as PNG, atomically: a temporary name, then os.replace, so an image viewer
    watching OUT never opens half a file."""
    from PIL import Image
    tmp = Path(path).with_suffix(".tmp.png")
    try:
        Image.fromarray(image_HW3).save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------
# One stage = set-up, the loop of its kind (train_vae, or train_star for the star and head stages), end.
# The loops share the helpers below; run_stage at the end of this section ties the pieces together.

@dataclasses.dataclass
class Run:
    """What the loop of one stage and its helpers share, in one of `world` processes."""
    stage: str                      # "vae", "star" or "head"
    args: argparse.Namespace        # the settings in effect (after --resume filled them in)
    dev: torch.device
    rank: int                       # 0 .. world - 1; rank 0 alone writes files and prints
    world: int
    path: Path                      # the stage's checkpoint, OUT/<stage>.pt
    steps: int                      # the stage's step count (--vae-steps, --star-steps or --head-steps)
    seed: int                       # the stage's seed: --seed + 1000 * stage index
    data: object                    # ShapesData or ImageFolder
    parts: dict                     # "vae"; from the star stage on also "tokenizer", "text", "star"
    net: nn.Module                  # what trains: the VQVAE, or TextToImage (STAR + text encoder)
    model: nn.Module                # net, or its DistributedDataParallel wrapper: forward passes go here
    opt: torch.optim.Optimizer
    lr: float                       # the stage's peak learning rate (lr_at gives each step's)
    start: int                      # the first step to run: 0, or the step of the checkpoint resumed
    seconds: float                  # training time of the stage so far, without previews and evaluations
    amp: object                     # bfloat16 autocast on a CUDA GPU that supports it, else a no-op
    log: object                     # OUT/log.txt, open for appending, on rank 0 (None on the others)


def setup_stage(stage, args, dev, rank, world, data, prev, resume):
    """The Run of a stage: its modules built, on `dev`, with their optimizer and DDP wrapper.

    The modules come from `resume`, the stage's own checkpoint, when --resume continues it; else from
    `prev`, the previous stage's (None for a fresh VQ-VAE). Resuming restores everything the next steps
    depend on: the weights, AdamW's moments, the step, torch's RNG state and the VQ-VAE's dead-code
    counters. The batches need nothing restored (they are drawn from (seed, step, rank), see batch_rng),
    so a resumed run continues exactly as if it had never stopped.
    """
    out, seed = Path(args.out), args.seed + 1000 * STAGES.index(stage)
    # torch's generator draws the initial weights of what build_stage makes new (the vae stage's VQ-VAE,
    # the star stage's STAR and text encoder); DistributedDataParallel then gives every rank rank 0's copy
    torch.manual_seed(seed + rank)
    # a resumed stage rebuilds every module from its own checkpoint, the tokenizer included
    parts, net = build_stage(stage, args, resume or prev, data)
    side = parts["vae"].config.image_size
    if side != args.resolution:
        raise UserError(f"--resolution {args.resolution}: the VQ-VAE of {out} works on {side}x{side} images; "
                        f"pass the flags its stage was trained with (--resolution {side} --patch-nums "
                        f"{','.join(map(str, parts['vae'].config.patch_nums))})")
    net.to(dev).train()
    if stage != "vae":
        parts["vae"].to(dev).eval()     # frozen from here on: tokenizes the pool, makes STAR's input, decodes
    if stage == "head":
        parts["text"].eval()            # the head stage trains the sampler head alone
    lr = {"vae": args.vae_lr, "star": args.lr, "head": args.head_lr}[stage]
    opt = make_optimizer(net, lr, args.weight_decay)
    start, seconds = 0, 0.0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])
        if stage == "vae":
            parts["vae"].quantize.code_hits_V.copy_(resume["vae_code_hits"])
        start, seconds = resume["step"], resume.get("seconds", 0.0)
    # the VQ-VAE's quantizer sits out the plain-autoencoder steps (train_vae), so its parameters get no
    # gradient then; DDP must be told, or it fails at the next step, still expecting those gradients
    model = net if world == 1 else nn.parallel.DistributedDataParallel(
        net, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=(stage == "vae"))
    # bfloat16 keeps float32's exponent range, so unlike float16 it needs no loss scaling
    amp = torch.autocast("cuda", dtype=torch.bfloat16) \
        if dev.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext()
    log = open(out / "log.txt", "a") if rank == 0 else None
    return Run(stage, args, dev, rank, world, out / f"{stage}.pt", getattr(args, STEPS_FLAG[stage]), seed,
               data, parts, net, model, opt, lr, start, seconds, amp, log)


def progress_bar(run):
    """The steps still to run, start .. steps - 1, shown as a tqdm bar on rank 0 (none with --quiet)."""
    return tqdm(range(run.start, run.steps), initial=run.start, total=run.steps, desc=run.stage,
                dynamic_ncols=True, disable=run.rank != 0 or run.args.quiet)


def due(done, every, steps):
    """Whether a periodic action runs after `done` steps: every `every` steps and after the last; never
    when `every` is 0."""
    return every > 0 and (done % every == 0 or done == steps)


def optimizer_step(run, loss, step):
    """Set the step's learning rate, backpropagate, clip the gradient's global norm to --grad-clip and
    update the weights; returns the norm before clipping.

    A loss or gradient norm that is inf or NaN stops the run before the update, so that neither the
    weights nor any checkpoint ever hold one (a single such step would spoil every later one). Under
    DDP, backward() averages the gradients over the processes, so every rank takes the same step.
    """
    for g in run.opt.param_groups:
        g["lr"] = lr_at(step, run.steps, run.lr, run.args.warmup)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = nn.utils.clip_grad_norm_(run.net.parameters(), run.args.grad_clip)
    if not (torch.isfinite(loss) and torch.isfinite(gnorm)):
        bad = ("loss", loss) if not torch.isfinite(loss) else ("gradient norm", gnorm)
        stop_nonfinite(f"{run.stage} step {step + 1}: the {bad[0]} is {bad[1].item()}", run.path)
    run.opt.step()
    return gnorm


def log_step(run, bar, done, loss, gnorm, rate, usage=None):
    """Rank 0: the loss on the progress bar every step; a log.txt line every --log-every steps and at the
    end, with the throughput `rate` (images/s for the VQ-VAE, tokens/s after) and, for the VQ-VAE, the
    fraction of the codebook the batch used (mean of `usage`, one value per scale)."""
    bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{rate:.0f}")
    if due(done, run.args.log_every, run.steps):
        unit, extra = ("img", f" usage {float(usage.mean()):.3f}") if run.stage == "vae" else ("tok", "")
        run.log.write(f"{run.stage} step {done} loss {loss.item():.5f} gnorm {float(gnorm):.3f} "
                      f"lr {run.opt.param_groups[0]['lr']:.2e} {unit}/s {rate:.0f}{extra}\n")
        run.log.flush()


def save_preview(run, done, img_B3HW=None):
    """Rank 0, every --sample-every steps and at the end: OUT/<stage>_<step>.png, to watch training go.

    VQ-VAE stage: the batch's first 8 images `img_B3HW` (in [-1, 1]) above their reconstructions
    through the quantizer. Later stages: the images of the preview captions, drawn with seed 0 each
    time (so successive grids differ only by the weights), with the sampler head in the head stage.
    """
    if not due(done, run.args.sample_every, run.steps):
        return
    if run.stage == "vae":
        vae, x_B3HW = run.parts["vae"], img_B3HW[:8]
        recon_B3HW = vae.fhat_to_img(vae.quantize.idx_to_fhat(vae.img_to_idx(x_B3HW)))
        grid = torch.cat([x_B3HW, recon_B3HW]).add(1).div(2)                  # (2B, 3, H, W) in [0, 1]
    else:
        grid = generate(run.parts, run.data.preview_captions(), 0, run.dev, stable=run.stage == "head",
                        **SHAPES_SAMPLING)
    # rows of 8, edge to edge, white where the last row is short: (rows * H, 8 * W, 3)
    save_png(shapes.contact_sheet(shapes.to_uint8(grid), cols=8, gap=0),
             run.path.parent / f"{run.stage}_{done:06d}.png")


def evaluate(run, done):
    """Rank 0, every --eval-every steps and at the end (shapes world only): the judge's accuracy on
    held-out captions, logged with the training minutes so far (for accuracy-versus-time curves)."""
    if not (run.args.data == "shapes" and due(done, run.args.eval_every, run.steps)):
        return

    def draw(captions, seed):                   # uint8 (B, H, W, 3), with the weights of this step
        return shapes.to_uint8(generate(run.parts, captions, seed, run.dev, stable=run.stage == "head",
                                        **SHAPES_SAMPLING))
    table, _ = shapes.judge_heldout(draw, run.args.eval_n)
    # the fractions of captions drawn fully right (nan for a group --eval-n 1 leaves empty)
    one, two = (table[g]["ok"] if g in table else math.nan for g in ("one-object", "two-object"))
    run.log.write(f"eval {run.stage} step {done} minutes {run.seconds / 60:.1f} "
                  f"one-object {one:.3f} two-object {two:.3f}\n")
    run.log.flush()


def save_checkpoint(run, done):
    """Every --ckpt-every steps and at the end: rank 0 writes OUT/<stage>.pt; every rank waits for it.

    The checkpoint (pack) holds all that --resume restores (see setup_stage). save_atomic writes a
    temporary file and renames it, so a run killed while saving still has its previous checkpoint,
    whole. Weights that overflowed to inf or NaN are never saved: the run stops, the last good
    checkpoint stays. The barrier lets no rank go on (or read the file, in end_stage) before it exists.
    """
    if not due(done, run.args.ckpt_every, run.steps):
        return
    if run.rank == 0:
        if not all(torch.isfinite(p).all() for p in run.net.parameters()):
            stop_nonfinite(f"{run.stage} step {done}: the weights became non-finite", run.path)
        save_atomic(pack(run.stage, run.parts, run.args, done, run.opt, run.seconds), run.path)
    if run.world > 1:
        dist.barrier()


def end_stage(run):
    """After the last step: check that the processes agree, say where the checkpoint is, and return it."""
    if run.world > 1:
        check_replicas(run.net, run.stage, run.world, run.log)
    if run.log:
        run.log.close()
        print(f"{run.stage}: trained to step {run.steps}; wrote {run.path}", flush=True)
    if run.world > 1:
        dist.barrier()                  # the processes leave the stage together
    return load_checkpoint(run.path, (run.stage,))


def train_vae(run):
    """The vae stage: images -> multi-scale tokens -> images, on the reconstruction and VQ losses.

    The first --vae-ae-frac of the steps train a plain autoencoder, the quantizer bypassed: k-means on
    the features of an untrained encoder would place the codes on noise, and most of them would never
    be chosen again (dead codes). Once the features mean something, the codebook is initialised from
    them (k-means per scale on a batch 4x the training batch), and from then on, every --reseed-every
    steps, codes that no token used are moved to where the residuals are quantized worst.
    """
    args, vae = run.args, run.parts["vae"]
    warm = int(args.vae_ae_frac * run.steps)        # the first step with the quantizer
    bar = progress_bar(run)
    t_last, seen, t0 = time.time(), 0, time.time()
    for step in bar:
        rng = batch_rng(run.seed, step, run.rank)
        img = run.data.batch(args.batch_size, rng)[0].to(run.dev)          # (B, 3, H, W) in [-1, 1]
        quantize = step >= warm
        if step == warm:
            # stream 1: the big batch does not change the step's own batch; under DDP every rank computes
            # a codebook and rank 0's is broadcast (tokenizer.py), so all ranks quantize alike
            big, _ = run.data.batch(4 * args.batch_size, batch_rng(run.seed, step, run.rank, stream=1))
            vae.init_codebook(big.to(run.dev), generator=torch.Generator().manual_seed(run.seed + step))
        with run.amp:
            # recon (B, 3, H, W), vq_loss () (0 without quantizer), usage (number of scales,)
            recon, vq_loss, usage = run.model(img, quantize=quantize)
            loss = reconstruction_loss(recon.float(), img) + vq_loss.float()
        gnorm = optimizer_step(run, loss, step)
        if quantize and (step - warm) % args.reseed_every == args.reseed_every - 1:
            vae.reseed_dead_codes(img, generator=torch.Generator().manual_seed(run.seed + step))
        seen += len(img)
        done = step + 1
        run.seconds += time.time() - t_last
        if run.rank == 0:
            log_step(run, bar, done, loss, gnorm, seen / max(1e-9, time.time() - t0), usage)
            save_preview(run, done, img)
        save_checkpoint(run, done)
        t_last = time.time()            # previews and checkpoints do not count as training time


def train_star(run):
    """The star stage (STAR and the text encoder) and the head stage (the sampler head alone): one loop.

    Teacher forcing over all scales at once (paper, sec. 3): an image's token ids at every scale are
    the target (B, L), and, one scale behind, the input (B, L - 1, Cvae): scale si sees the codes of
    the scales before it summed and resized to its side. What differs between the stages was set up by
    build_stage: which parameters train, and which loss TextToImage returns (the trunk's cross-entropy,
    or the sampler head's masked-token loss on the frozen trunk, paper sec. 3.4).
    """
    args, parts = run.args, run.parts
    # the frozen VQ-VAE gives the same ids for the same image every time, and its encoder costs about
    # as much as a small STAR's whole training step: tokenize --pool samples once, draw batches from them
    pool_idx, pool_caps = token_pool(run.data, parts["vae"], args.pool, args.seed,  # (P, L) int16, P captions
                                     run.path.parent / "tokens.pt", run.dev, run.rank, run.world, args.quiet)
    splits = [pn * pn for pn in parts["vae"].config.patch_nums]    # tokens per scale, summing to L
    bar = progress_bar(run)
    t_last, seen, t0 = time.time(), 0, time.time()
    for step in bar:
        rng = batch_rng(run.seed, step, run.rank)
        pick = rng.integers(0, len(pool_caps), size=args.batch_size)          # (B,) rows of the pool
        # caption dropout: --cond-drop of the captions become "", so the same network also learns the
        # unconditional model that classifier-free guidance steers away from (sample.py --cfg)
        drop = rng.random(args.batch_size) < args.cond_drop
        caps = ["" if d else pool_caps[i] for i, d in zip(pick, drop)]
        ids, mask = parts["tokenizer"](caps, context_length=parts["text"].config.context_length)  # (B, T)
        target_BL = pool_idx[torch.from_numpy(pick)].long().to(run.dev)          # (B, L)
        with torch.no_grad():
            x_BLCv = parts["vae"].idx_to_var_input(list(target_BL.split(splits, 1)))  # (B, L - 1, Cvae)
        # the head's random token masks come from the step's generator too (the same on resume, per rank)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        with run.amp:
            loss = run.model(ids.to(run.dev), mask.to(run.dev), x_BLCv, target_BL, generator=gen).float()
        gnorm = optimizer_step(run, loss, step)
        seen += target_BL.numel()
        done = step + 1
        run.seconds += time.time() - t_last
        if run.rank == 0:
            log_step(run, bar, done, loss, gnorm, seen / max(1e-9, time.time() - t0))
            save_preview(run, done)
            evaluate(run, done)
        save_checkpoint(run, done)
        t_last = time.time()            # previews, evaluations and checkpoints do not count as training


def run_stage(stage, args, dev, rank, world, prev):
    """Train one stage from its start, or from OUT/<stage>.pt with --resume; returns its final checkpoint.

    `prev` is the previous stage's checkpoint (None before the vae stage).
    """
    path, steps = Path(args.out) / f"{stage}.pt", getattr(args, STEPS_FLAG[stage])
    data = make_data(args, args.resolution)
    resume = None
    if path.exists():
        if not args.resume:
            raise UserError(f"{path} exists; pass --resume to continue it, or choose another --out")
        resume = load_checkpoint(path, (stage,))
        if resume["step"] >= steps:            # a finished stage: --resume goes on to the next one
            if rank == 0:
                print(f"{stage}: already trained to step {resume['step']} (--{stage}-steps {steps}) in "
                      f"{path}; nothing to do for this stage", flush=True)
            return resume
    run = setup_stage(stage, args, dev, rank, world, data, prev, resume)
    # the head stage runs the star stage's loop: build_stage froze all but the sampler head
    if stage == "vae":
        train_vae(run)
    else:
        train_star(run)
    return end_stage(run)


def stop_nonfinite(what, path):
    """Stop on a NaN/inf before it reaches the weights or a checkpoint: the last checkpoint stays good."""
    last = f"{path} (step {load_checkpoint(path)['step']})" if path.exists() else "none"
    raise UserError(f"{what}; stopped before updating the weights (last checkpoint: {last}); "
                    "lower the learning rate or check the data, then continue with --resume")


def check_replicas(net, stage, world, log):
    """DDP keeps the processes' copies equal only if every change goes through it (all-reduced gradients,
    rank 0's codebook broadcast after re-seeding): compare each rank's parameters with rank 0's once."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in net.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    same = torch.tensor([float(torch.equal(flat, ref))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if same.item() != 1.0:
        raise RuntimeError(f"{stage}: the {world} processes ended with different weights")
    if log:
        log.write(f"{stage}: all {world} processes hold identical weights\n")


PREVIEW = ["a large red circle on the left on a white background", "a small blue square at the top",
           "a large green triangle in the center on a black background",
           "a small yellow circle at the bottom",
           "a red square to the left of a blue circle", "a purple triangle above a orange square",
           "a green circle below a yellow triangle on a gray background",
           "a blue square to the right of a red triangle"]


def check_export_destination(src, dst):
    """--export never writes over its source or over a checkpoint a run could continue from."""
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        raise UserError(f"--export {dst}: is a folder; give a file name such as {dst / 'model.pt'}")
    if dst.exists() and os.path.samefile(src, dst):
        raise UserError(f"--export {src} {dst}: the destination is the source; writing the bundle there "
                        "would destroy the resumable checkpoint; give another file name")
    run_files = [dst.parent / n for n in ("log.txt", "tokens.pt", *(f"{s}.pt" for s in STAGES))]
    if dst.name in {f"{s}.pt" for s in STAGES} and any(f.exists() for f in run_files):
        raise UserError(f"--export {dst}: that name is one of the checkpoints of the run in {dst.parent}; "
                        "give another file name")
    if dst.is_file():
        try:
            old = read_weights(dst, "--export destination")
        except ValueError:
            old = None       # not something train.py could continue from
        if isinstance(old, dict) and "optimizer" in old:
            raise UserError(f"--export {dst}: holds a resumable training checkpoint "
                            f"(step {old.get('step')}); give another file name")


def export(src, dst):
    """Strip optimizer and RNG state and store float weights in half precision (the bundled model)."""
    ck = load_checkpoint(src, ("star", "head"))
    check_export_destination(src, dst)
    for k in ("optimizer", "rng", "vae_code_hits"):
        ck.pop(k, None)
    for k in ("vae", "text_encoder", "star"):
        if k in ck:
            ck[k] = {n: t.half() if t.is_floating_point() else t for n, t in ck[k].items()}
    try:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        save_atomic(ck, dst)
    except OSError as e:
        raise UserError(f"--export {dst}: cannot write there ({e.strerror or e}); "
                        "choose a writable file") from None
    return Path(dst).stat().st_size


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring as written and shows every flag's default (if it has one)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def int_list(text):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers such as 1,2,3,4,6,8, "
                                         f"got {text!r}")


# --resume continues a run with the settings it was started with (read from its furthest checkpoint).
# Only these flags may be given with other values; every other one shapes the data, the models or the
# optimisation, and giving it with another value is an error. --out, --resume and --export are not settings.
RESUME_MAY_CHANGE = ("stage", "vae_steps", "star_steps", "head_steps", "vae_lr", "lr", "head_lr", "grad_clip",
                     "ckpt_every", "sample_every", "eval_every", "eval_n", "log_every", "device", "quiet")
NOT_SETTINGS = ("out", "resume", "export")
PATH_SETTINGS = ("data", "vae", "text_encoder", "tokenizer")
STEPS_FLAG = {"vae": "vae_steps", "star": "star_steps", "head": "head_steps"}
# the sizes (and the head stage: the data mix) a later stage takes over from the stage before it
VAE_SETTINGS = ("resolution", "patch_nums", "vocab_size", "vae_ch", "vae_res_blocks")
STAR_SETTINGS = VAE_SETTINGS + ("depth", "width", "head_from", "text_vocab", "text_width", "text_layers",
                                "text_context", "text_attention", "text_encoder", "tokenizer", "two_object")


def build_parser():
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/shapes", help="folder for checkpoints, log.txt and sample grids")
    p.add_argument("--stage", default="all", choices=("all",) + STAGES, help="which stage(s) to run")
    p.add_argument("--data", default="shapes",
                   help="'shapes' (synthetic world) or a folder of captioned images")
    p.add_argument("--two-object", type=cli.bounded_float(0, 1), default=0.75,
                   help="shapes data: the fraction of training scenes with two objects")
    may_change = ", ".join("--" + d.replace("_", "-") for d in RESUME_MAY_CHANGE)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the settings it was started with (its "
                        f"checkpoints record them); only {may_change} may be given with other values, "
                        "any other flag that differs is an error. With no checkpoint in --out yet, "
                        "a new run starts (and says so)")
    p.add_argument("--export", nargs=2, metavar=("SRC", "DST"),
                   help="write a half-precision bundle of checkpoint SRC to the new file DST and exit")
    p.add_argument("--seed", type=cli.int_range(0, 2**32 - 1, what="a seed in [0, 2**32 - 1]"), default=0,
                   help="seed of the data order, initial weights and caption dropout")
    p.add_argument("--resolution", type=cli.int_range(8, 8192), default=64, help="image side in pixels")
    p.add_argument("--patch-nums", type=int_list, default=[1, 2, 3, 4, 6, 8],
                   help="token-map sides, coarse to fine; the last equals resolution / 8")
    # the token pool stores ids as int16
    p.add_argument("--vocab-size", type=cli.int_range(2, 32768), default=512, help="VQ codebook size")
    p.add_argument("--vae-ch", type=cli.int_range(8, 4096), default=32,
                   help="VQ-VAE base width (multiple of 8)")
    p.add_argument("--vae-res-blocks", type=cli.int_range(1, 64), default=1,
                   help="res-blocks per VQ-VAE encoder level")
    p.add_argument("--depth", type=cli.int_range(1, 1024), default=4, help="STAR blocks")
    p.add_argument("--width", type=cli.int_range(64, 65536), default=128, help="STAR width (multiple of 64)")
    p.add_argument("--head-from", type=cli.int_range(1, 1024), default=4,
                   help="first scale (index into --patch-nums) sampled by the stable-sampling head")
    p.add_argument("--text-vocab", type=cli.int_range(1, 2**20), default=600,
                   help="BPE vocabulary learned from the captions")
    p.add_argument("--text-width", type=cli.int_range(64, 65536), default=128,
                   help="text encoder width (multiple of 64)")
    p.add_argument("--text-layers", type=cli.int_range(1, 1024), default=4, help="text encoder blocks")
    p.add_argument("--text-attention", choices=("causal", "full"), default="full",
                   help="text encoder trained from scratch: causal like CLIP, or full (each word sees the "
                        "whole caption, so the first object's words know the relation that follows)")
    p.add_argument("--text-context", type=cli.int_range(8, 65536), default=32,
                   help="text tokens incl. start/end (CLIP: 77); at least 8, room for 6 caption tokens")
    p.add_argument("--pool", type=positive_int, default=24000, help="samples tokenized once for STAR/head")
    p.add_argument("--text-encoder", default=None, help="released CLIP text encoder folder (frozen)")
    p.add_argument("--tokenizer", default=None, help="BPE file or tokenizer folder for --text-encoder")
    p.add_argument("--vae", default=None,
                   help="released VQ-VAE weights (VAR's vae_ch160v4096z32.pth) to use frozen "
                        "instead of the vae stage")
    p.add_argument("--batch-size", type=positive_int, default=32, help="per process")
    p.add_argument("--vae-steps", type=positive_int, default=4000, help="training steps of the vae stage")
    p.add_argument("--star-steps", type=positive_int, default=8000, help="training steps of the star stage")
    p.add_argument("--head-steps", type=positive_int, default=1200, help="training steps of the head stage")
    rate = cli.bounded_float(0, 1, lo_open=True)     # AdamW moves every weight by about this much per step
    p.add_argument("--vae-lr", type=rate, default=1e-3, help="peak learning rate, vae stage")
    p.add_argument("--lr", type=rate, default=1.5e-3, help="peak learning rate, star stage")
    p.add_argument("--head-lr", type=rate, default=5e-4, help="peak learning rate, head stage")
    p.add_argument("--weight-decay", type=cli.bounded_float(0, 1), default=0.05,
                   help="AdamW weight decay of the matrices")
    p.add_argument("--warmup", type=cli.non_negative_int, default=200,
                   help="linear warm-up steps of every stage (at most its step count), then cosine decay")
    p.add_argument("--grad-clip", type=cli.bounded_float(0, 10000, lo_open=True), default=2.0,
                   help="clip the gradient's global norm to this")
    p.add_argument("--cond-drop", type=cli.bounded_float(0, 0.99), default=0.1,
                   help="fraction of captions dropped to '' (teaches the unconditional model of guidance)")
    p.add_argument("--vae-ae-frac", type=cli.bounded_float(0, 0.99), default=0.3,
                   help="first fraction of VQ-VAE steps without the quantizer")
    p.add_argument("--reseed-every", type=positive_int, default=25,
                   help="re-seed dead codes every N VQ-VAE steps")
    p.add_argument("--ckpt-every", type=positive_int, default=250,
                   help="checkpoint every N steps (and at the end)")
    p.add_argument("--sample-every", type=cli.non_negative_int, default=1000,
                   help="write a preview grid every N steps (0: never; --data DIR: its first 8 captions)")
    p.add_argument("--eval-every", type=cli.non_negative_int, default=0,
                   help="judge --eval-n held-out shapes captions every N steps and log the accuracy "
                        "(0: never; needs --data shapes)")
    p.add_argument("--eval-n", type=positive_int, default=100, help="captions per evaluation")
    p.add_argument("--log-every", type=positive_int, default=50, help="write a log.txt line every N steps")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: cuda, then mps, then cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def flags_given(argv):
    """The settings named on the command line (parsed again with every default suppressed)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def same_setting(dest, a, b):
    if a == b:
        return True
    if dest in PATH_SETTINGS and a and b and os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)       # the same folder or file, spelled another way
    return False


def show_setting(value):
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def adopt_settings(p, args, given, path, dests):
    """Set `dests` to the values recorded in checkpoint `path`; returns the flags given with other values."""
    saved = load_checkpoint(path, (path.stem,)).get("args", {})
    flag = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}
    clash = []
    for dest in dests:
        if dest not in saved:                        # a flag newer than the checkpoint
            continue
        if dest in given and not same_setting(dest, getattr(args, dest), saved[dest]):
            was = (f"works on {saved[dest]}x{saved[dest]} images" if dest == "resolution" else
                   f"has {show_setting(saved[dest])}")
            clash.append(f"{flag[dest]} {show_setting(getattr(args, dest))} (the run {was})")
        setattr(args, dest, saved[dest])
    return clash


def run_settings(p, args, given):
    """The settings in effect, so that the checkpoints record what was used.

    --resume: the run's settings (from its furthest checkpoint) are the defaults; a flag given with
    another value is an error unless it is one of RESUME_MAY_CHANGE. --stage star or head without
    --resume starts from the previous stage's checkpoint, whose model sizes are kept the same way.
    """
    out = Path(args.out)
    if args.resume:
        found = [out / f"{s}.pt" for s in reversed(STAGES) if (out / f"{s}.pt").exists()]
        if not found:
            return args                              # nothing to resume: main() says so
        compared = [d for d in vars(args)
                    if d not in NOT_SETTINGS and not (d in given and d in RESUME_MAY_CHANGE)]
        clash = adopt_settings(p, args, given, found[0], compared)
        if clash:
            raise UserError(f"--resume: {'; '.join(clash)}: a resumed run keeps the data and architecture "
                            f"it was started with ({found[0]}); drop the flag, or start a new run in "
                            "another --out")
    elif args.stage in ("star", "head") and not args.vae:
        before = out / ("vae.pt" if args.stage == "star" else "star.pt")
        if before.is_file():
            clash = adopt_settings(p, args, given, before,
                                   VAE_SETTINGS if args.stage == "star" else STAR_SETTINGS)
            if clash:
                raise UserError(f"--stage {args.stage}: {'; '.join(clash)}: this stage continues from "
                                f"{before} and keeps the sizes it was trained with; drop the flag")
    return args


def check_settings(p, args):
    """Checks that involve several flags, on the settings in effect (after --resume filled them in)."""
    if args.text_encoder and not args.tokenizer:
        p.error("--text-encoder needs --tokenizer (the BPE file or tokenizer folder that goes with it)")
    if not args.vae and args.patch_nums[-1] * 8 != args.resolution:   # our VQ-VAE downsamples 8x
        p.error(f"--patch-nums {','.join(map(str, args.patch_nums))}: the last side must be "
                f"--resolution / 8 = {args.resolution / 8:g}")
    if args.data == "shapes" and args.resolution != 64:
        p.error(f"--resolution {args.resolution}: the shapes world is drawn at 64x64; use 64 or --data DIR")
    if args.width % 64:
        p.error(f"--width {args.width}: expected a multiple of 64 (the attention heads are 64 wide)")
    if args.text_width % 64:
        p.error(f"--text-width {args.text_width}: expected a multiple of 64 "
                "(the attention heads are 64 wide)")
    if args.vae_ch % 8:
        p.error(f"--vae-ch {args.vae_ch}: expected a multiple of 8 (GroupNorm with 8 groups)")
    if not args.head_from < len(args.patch_nums):
        p.error(f"--head-from {args.head_from}: expected a scale index from 1 to {len(args.patch_nums) - 1} "
                f"(--patch-nums has {len(args.patch_nums)} scales)")
    for stage in STAGES if args.stage == "all" else (args.stage,):
        steps = getattr(args, STEPS_FLAG[stage])
        if args.warmup > steps and not (stage == "vae" and args.vae):
            p.error(f"--warmup {args.warmup}: more warm-up steps than --{stage}-steps {steps}; "
                    f"use at most {steps}")
    if args.eval_every and args.data != "shapes":
        p.error(f"--eval-every {args.eval_every}: the evaluation judges shapes-world captions, so it needs "
                "--data shapes; leave it at 0 with --data DIR")


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.export:
        return args
    args = run_settings(p, args, flags_given(argv))
    check_settings(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.export:
        size = export(*args.export)
        print(f"wrote {args.export[1]} ({size / 2**20:.1f} MiB)")
        return
    # CPU threads: 1 for small models (the default run), whose ops are too short to share among threads and
    # wait for a core at every op when another process is busy; the free cores for large ones
    cli.set_threads(None, 12 * args.depth * args.width ** 2)      # the trunk's parameters, roughly
    # torchrun starts one process per GPU (or per CPU share) and tells each its place in these variables;
    # every process trains on its own batches and DistributedDataParallel averages their gradients
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = cli.pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
    out = Path(args.out)
    try:   # find out now, not at the first checkpoint
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror}); choose a writable folder") from None
    if args.resume and rank == 0 and not any((out / f"{s}.pt").exists() for s in STAGES):
        print(f"--resume: {out} holds no checkpoint (vae.pt, star.pt or head.pt) to continue; "
              "starting a new run there", flush=True)
    prev, stages = None, STAGES if args.stage == "all" else (args.stage,)
    if args.vae:    # a released VQ-VAE (e.g. VAR's vae_ch160v4096z32.pth) replaces the vae stage, frozen
        if "vae" in stages and args.stage == "vae":
            raise UserError("--vae gives a trained VQ-VAE, so there is no 'vae' stage to run; "
                            "use --stage star")
        vae = VQVAE.from_pretrained(args.vae, patch_nums=tuple(args.patch_nums))
        prev, stages = {"vae_config": config_dict(vae.config), "vae": vae.state_dict()}, \
            tuple(s for s in stages if s != "vae")
    # each stage starts from the checkpoint of the one before: in memory when this run trained it, else read
    for stage in stages:
        if prev is None and stage != "vae":
            before = STAGES[STAGES.index(stage) - 1]
            prev = load_checkpoint(out / f"{before}.pt", (before,))
        prev = run_stage(stage, args, dev, rank, world, prev)
    if rank == 0:
        if stages[-1] == "head":
            print(f"the run in {out} is complete; python train.py --export {out / 'head.pt'} model.pt "
                  "writes the bundle for sample.py", flush=True)
        else:
            print(f"stopped after the {stages[-1]} stage as asked (--stage {args.stage}); "
                  f"--stage {STAGES[STAGES.index(stages[-1]) + 1]} continues the run", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    # user mistakes, and the ValueError/OSError that the model files raise for bad inputs, become one line
    sys.exit(cli.run_command(main,
                             interrupted="interrupted; continue from the last checkpoint with --resume"))
