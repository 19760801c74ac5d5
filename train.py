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
  python train.py --export runs/shapes/head.pt checkpoints/shapes.pt   # half-precision bundle for sample.py
  python train.py --data DIR --resolution 256 --patch-nums 1,2,3,4,5,6,8,10,13,16 --vae vae_ch160v4096z32.pth \
      --text-encoder sd21/text_encoder --tokenizer sd21/tokenizer --depth 16 --width 1024   # released parts, frozen
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
from cli import Parser, UserError, positive_int
from clip_text import TextConfig, TextEncoder, Tokenizer
from star import STAR, STARConfig
from tokenizer import VQVAE, VQVAEConfig, reconstruction_loss
from weights import SHAPES_SAMPLING, STAGES, load_checkpoint, read_weights, save_atomic


# ---------------------------------------------------------------------------------------------------
# Data: every batch is a pure function of (seed, step, rank), so a resumed run sees the same batches.

def batch_rng(seed, step, rank, stream=0):
    """The generator of one batch; `stream` separates other uses (codebook init, tokenizer captions)."""
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
                    raise UserError(f"{meta}:{n}: expected a JSON object with 'file_name' and 'text'") from None
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
                        warnings.warn(f"{cap}: caption not readable as UTF-8 text ({type(e).__name__}); skipped")
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
        """The captions to learn the BPE vocabulary from: all of the folder's (seed unused: nothing is drawn)."""
        return [t for _, t in self.items]

    def preview_captions(self, n=8):
        """Captions of the preview grids: the user's own, the first n of the folder."""
        return [t for _, t in self.items[:n]]

    def batch(self, batch_size, rng):
        pick = rng.integers(0, len(self.items), size=batch_size)
        imgs = torch.stack([self.load(self.items[i][0]) for i in pick])
        return imgs, [self.items[i][1] for i in pick]


class ShapesData:
    identity = "shapes"

    def __init__(self):
        import shapes
        self.shapes = shapes

    def preview_captions(self, n=8):
        return PREVIEW[:n]

    def batch(self, batch_size, rng):
        return self.shapes.sample_batch(batch_size, rng)

    def captions(self, seed, n=5000):
        """Captions to learn the BPE vocabulary from (their own stream, disjoint from training batches)."""
        rng = batch_rng(seed, 0, 0, stream=2)
        return [self.shapes.caption(self.shapes.random_scene(rng)) for _ in range(n)]


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
    return {"vae": weights_fingerprint(vae.state_dict()), "vae_config": json.loads(json.dumps(config_dict(vae.config))),
            "data": data.identity, "pool": n, "seed": seed}


def stale_pool(pool, source):
    """Why a pool read from disk cannot be used with `source`, or None when it can."""
    if not isinstance(pool, dict) or not {"idx", "captions"} <= pool.keys():
        return None                                  # not a pool at all: reported by the caller
    made = pool.get("made_from")
    if not isinstance(made, dict):
        return "it does not record what it was made from (written by an older train.py)"
    what = {"vae": "another VQ-VAE", "vae_config": "another VQ-VAE", "data": f"other data ({made.get('data')})",
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
    if rank == 0:
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
    return ShapesData() if args.data == "shapes" else ImageFolder(args.data, resolution)


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
    return STARConfig(depth=args.depth, width=args.width, num_heads=args.width // 64,
                      patch_nums=vae_config.patch_nums, vocab_size=vae_config.vocab_size,
                      vae_dim=vae_config.z_channels,
                      text_dim=text_dim, rope_theta=10000.0, rope_norm=64.0, logit_norm=True,
                      head=True, sample_from_idx=args.head_from, cross_attn_mode="per_row",
                      drop_path_rate=0.0, class_emb=False)


class TextToImage(nn.Module):
    """STAR with its text encoder, so one DistributedDataParallel wrapper covers both in training."""

    def __init__(self, star, text_encoder, head_only=False):
        super().__init__()
        self.star, self.text_encoder, self.head_only = star, text_encoder, head_only

    def forward(self, ids, mask, x_BLCv, target_BL, generator=None):
        hidden, pooled = self.text_encoder(ids, mask)
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
            caps = data.captions(args.seed)
            tok = Tokenizer.train(caps, args.text_vocab)
            text = TextEncoder(TextConfig(vocab_size=tok.vocab_size, context_length=args.text_context, width=args.text_width,
                                          layers=args.text_layers, heads=max(1, args.text_width // 64),
                                          causal=args.text_attention == "causal"))
        star = STAR(default_star_config(args, text.config.width, vae.config), vae)
    if stage == "head" or args.text_encoder:
        text.requires_grad_(False)
    # each stage trains either the trunk or the sampler head: a parameter without a gradient in a
    # stage must be frozen there, or DistributedDataParallel stops waiting for its gradient
    star.requires_grad_(stage == "star")
    for p in star.head_parameters():
        p.requires_grad_(stage == "head")
    return {"vae": vae, "tokenizer": tok, "text": text, "star": star}, TextToImage(star, text, stage == "head")


def pack(stage, parts, args, step, opt=None, seconds=0.0):
    ck = {"format": "star-pipeline", "stage": stage, "step": step, "seconds": seconds, "args": vars(args).copy(),
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
# The loop.

def lr_at(step, total, base, warmup):
    """Linear warm-up, then cosine decay to 10% of the base rate."""
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
    ids, mask = parts["tokenizer"](captions, context_length=parts["text"].config.context_length)
    ids, mask = ids.to(dev), mask.to(dev)
    hidden, pooled = parts["text"](ids, mask)
    return hidden, mask, pooled


@torch.no_grad()
def generate(parts, captions, seed, dev, **sampling):
    """Images (N, 3, H, W) in [0, 1] for the captions, with the current weights (previews, evaluation)."""
    star, text = parts["star"], parts["text"]
    was = star.training, text.training
    star.eval(), text.eval()
    hidden, mask, pooled = encode_text(parts, captions, dev)
    e_hidden, e_mask, e_pooled = encode_text(parts, [""], dev)
    img = star.generate(hidden, mask, pooled, e_hidden, e_mask, e_pooled,
                        generator=torch.Generator().manual_seed(seed), **sampling)
    star.train(was[0]), text.train(was[1])
    return img


def save_grid(img_N3HW, path, cols=8):
    """A contact sheet of images in [0, 1], written atomically as PNG."""
    from PIL import Image
    N, _, H, W = img_N3HW.shape
    rows = (N + cols - 1) // cols
    grid = torch.ones(3, rows * H, cols * W)
    for i, im in enumerate(img_N3HW.float().cpu().clamp(0, 1)):
        grid[:, (i // cols) * H:(i // cols + 1) * H, (i % cols) * W:(i % cols + 1) * W] = im
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    tmp = Path(path).with_suffix(".tmp.png")
    try:
        Image.fromarray(arr).save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def evaluate_shapes(parts, n, dev, stable, seed=0):
    """Judge-measured accuracy on n held-out captions: (one-object, two-object) fractions fully correct."""
    import shapes
    caps = shapes.heldout_captions(n, seed)
    ok = {True: [], False: []}
    for i in range(0, n, 50):
        img = generate(parts, caps[i:i + 50], seed + i, dev, stable=stable, **SHAPES_SAMPLING)
        arr = (img.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        for c, a in zip(caps[i:i + 50], arr):
            r = shapes.judge(c, a)
            ok["relation" in r].append(r["ok"])
    return float(np.mean(ok[False])), float(np.mean(ok[True]))


def run_stage(stage, args, dev, rank, world, prev):
    """Train one stage from its start (or from OUT/<stage>.pt with --resume); returns its final checkpoint."""
    out = Path(args.out)
    path = out / f"{stage}.pt"
    steps = {"vae": args.vae_steps, "star": args.star_steps, "head": args.head_steps}[stage]
    data = make_data(args, args.resolution)
    seed = args.seed + 1000 * STAGES.index(stage)

    resume = None
    if path.exists():
        if not args.resume:
            raise UserError(f"{path} exists; pass --resume to continue it, or choose another --out")
        resume = load_checkpoint(path, (stage,))
        if resume["step"] >= steps:
            if rank == 0:
                print(f"{stage}: already trained to step {resume['step']} (--{stage}-steps {steps}) in {path}; "
                      "nothing to do for this stage", flush=True)
            return resume
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
        parts["vae"].to(dev).eval()
    if stage == "head":
        parts["text"].eval()
    lr = {"vae": args.vae_lr, "star": args.lr, "head": args.head_lr}[stage]
    opt = make_optimizer(net, lr, args.weight_decay)
    start = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])
        if stage == "vae":
            parts["vae"].quantize.code_hits_V.copy_(resume["vae_code_hits"])
        start = resume["step"]
    model = net if world == 1 else nn.parallel.DistributedDataParallel(
        net, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=(stage == "vae"))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) \
        if dev.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext()

    if stage != "vae":
        pool_idx, pool_caps = token_pool(data, parts["vae"], args.pool, args.seed, out / "tokens.pt", dev,
                                         rank, world, args.quiet)
        splits = [pn * pn for pn in parts["vae"].config.patch_nums]
    log = open(out / "log.txt", "a") if rank == 0 else None
    warm = int(args.vae_ae_frac * steps) if stage == "vae" else 0
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage, dynamic_ncols=True,
               disable=rank != 0 or args.quiet)
    # training time of this stage so far, without previews and evaluations (for accuracy-vs-minutes)
    seconds = resume.get("seconds", 0.0) if resume is not None else 0.0
    t_last, seen, t0 = time.time(), 0, time.time()
    for step in bar:
        rng = batch_rng(seed, step, rank)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, args.warmup)
        if stage == "vae":
            img = data.batch(args.batch_size, rng)[0].to(dev)
            quantize = step >= warm
            if quantize and step == warm:          # codebook from encoder features, once, after warm-up
                big, _ = data.batch(4 * args.batch_size, batch_rng(seed, step, rank, stream=1))
                parts["vae"].init_codebook(big.to(dev), generator=torch.Generator().manual_seed(seed + step))
            with amp:
                recon, vq_loss, usage = model(img, quantize=quantize)
                loss = reconstruction_loss(recon.float(), img) + vq_loss.float()
            ntok = img.shape[0]
        else:
            pick = rng.integers(0, len(pool_caps), size=args.batch_size)
            drop = rng.random(args.batch_size) < args.cond_drop      # caption dropout for guidance
            caps = ["" if d else pool_caps[i] for i, d in zip(pick, drop)]
            ids, mask = parts["tokenizer"](caps, context_length=parts["text"].config.context_length)
            target_BL = pool_idx[torch.from_numpy(pick)].long().to(dev)              # (B, L)
            with torch.no_grad():
                x_BLCv = parts["vae"].idx_to_var_input(list(target_BL.split(splits, 1)))  # (B, L-1, Cvae)
            # the head's token masks come from the step's generator too (same on resume, per rank)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            with amp:
                loss = model(ids.to(dev), mask.to(dev), x_BLCv, target_BL, generator=gen).float()
            ntok = target_BL.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(gnorm)):   # before the update: nothing NaN is kept
            bad = ("loss", loss) if not torch.isfinite(loss) else ("gradient norm", gnorm)
            stop_nonfinite(f"{stage} step {step + 1}: the {bad[0]} is {bad[1].item()}", path)
        opt.step()
        if stage == "vae" and quantize and (step - warm) % args.reseed_every == args.reseed_every - 1:
            parts["vae"].reseed_dead_codes(img, generator=torch.Generator().manual_seed(seed + step))
        seen += ntok
        done = step + 1
        seconds += time.time() - t_last
        if rank == 0:
            rate = seen / max(1e-9, time.time() - t0)
            bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{rate:.0f}")
            if done % args.log_every == 0 or done == steps:
                extra = f" usage {float(usage.mean()):.3f}" if stage == "vae" else ""
                log.write(f"{stage} step {done} loss {loss.item():.5f} gnorm {float(gnorm):.3f} "
                          f"lr {opt.param_groups[0]['lr']:.2e} {'img' if stage == 'vae' else 'tok'}/s "
                          f"{rate:.0f}{extra}\n")
                log.flush()
            if args.sample_every and (done % args.sample_every == 0 or done == steps):
                if stage == "vae":
                    save_grid(torch.cat([img[:8], parts["vae"].fhat_to_img(
                        parts["vae"].quantize.idx_to_fhat(parts["vae"].img_to_idx(img[:8])))]).add(1).div(2),
                        out / f"{stage}_{done:06d}.png")
                else:
                    save_grid(generate(parts, data.preview_captions(), 0, dev, stable=stage == "head",
                                       **SHAPES_SAMPLING),
                              out / f"{stage}_{done:06d}.png")
            if args.eval_every and args.data == "shapes" and stage != "vae" and \
                    (done % args.eval_every == 0 or done == steps):
                one, two = evaluate_shapes(parts, args.eval_n, dev, stable=stage == "head")
                log.write(f"eval {stage} step {done} minutes {seconds / 60:.1f} "
                          f"one-object {one:.3f} two-object {two:.3f}\n")
                log.flush()
            if done % args.ckpt_every == 0 or done == steps:
                if not all(torch.isfinite(p).all() for p in net.parameters()):
                    stop_nonfinite(f"{stage} step {done}: the weights became non-finite", path)
                save_atomic(pack(stage, parts, args, done, opt, seconds), path)
        if world > 1 and (done % args.ckpt_every == 0 or done == steps):
            dist.barrier()
        t_last = time.time()
    if world > 1:
        check_replicas(net, stage, world, log)
    if log:
        log.close()
        print(f"{stage}: trained to step {steps}; wrote {path}", flush=True)
    if world > 1:
        dist.barrier()
    return load_checkpoint(path, (stage,))


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
           "a large green triangle in the center on a black background", "a small yellow circle at the bottom",
           "a red square to the left of a blue circle", "a purple triangle above a orange square",
           "a green circle below a yellow triangle on a gray background", "a blue square to the right of a red triangle"]


def check_export_destination(src, dst):
    """--export never writes over its source or over a checkpoint a run could continue from."""
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        raise UserError(f"--export {dst}: is a folder; give a file name such as {dst / 'model.pt'}")
    if dst.exists() and os.path.samefile(src, dst):
        raise UserError(f"--export {src} {dst}: the destination is the source; writing the bundle there would "
                        "destroy the resumable checkpoint; give another file name")
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
            raise UserError(f"--export {dst}: holds a resumable training checkpoint (step {old.get('step')}); "
                            "give another file name")


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
        raise UserError(f"--export {dst}: cannot write there ({e.strerror or e}); choose a writable file") from None
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
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3,4,6,8, got {text!r}")


# --resume continues a run with the settings it was started with (read from its furthest checkpoint).
# Only these flags may be given with other values; every other one shapes the data, the models or the
# optimisation, and giving it with another value is an error. --out, --resume and --export are not settings.
RESUME_MAY_CHANGE = ("stage", "vae_steps", "star_steps", "head_steps", "vae_lr", "lr", "head_lr", "grad_clip",
                     "ckpt_every", "sample_every", "eval_every", "eval_n", "log_every", "device", "quiet")
NOT_SETTINGS = ("out", "resume", "export")
PATH_SETTINGS = ("data", "vae", "text_encoder", "tokenizer")
STEPS_FLAG = {"vae": "vae_steps", "star": "star_steps", "head": "head_steps"}
# the sizes a later stage takes over from the checkpoint of the stage before it
VAE_SETTINGS = ("resolution", "patch_nums", "vocab_size", "vae_ch", "vae_res_blocks")
STAR_SETTINGS = VAE_SETTINGS + ("depth", "width", "head_from", "text_vocab", "text_width", "text_layers",
                                "text_context", "text_attention", "text_encoder", "tokenizer")


def build_parser():
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/shapes", help="folder for checkpoints, log.txt and sample grids")
    p.add_argument("--stage", default="all", choices=("all",) + STAGES, help="which stage(s) to run")
    p.add_argument("--data", default="shapes", help="'shapes' (synthetic world) or a folder of captioned images")
    may_change = ", ".join("--" + d.replace("_", "-") for d in RESUME_MAY_CHANGE)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the settings it was started with (its checkpoints "
                        f"record them); only {may_change} may be given with other values, any other flag that "
                        "differs is an error. With no checkpoint in --out yet, a new run starts (and says so)")
    p.add_argument("--export", nargs=2, metavar=("SRC", "DST"),
                   help="write a half-precision bundle of checkpoint SRC to the new file DST and exit")
    p.add_argument("--seed", type=cli.int_range(0, 2**32 - 1, what="a seed in [0, 2**32 - 1]"), default=0,
                   help="seed of the data order, initial weights and caption dropout")
    p.add_argument("--resolution", type=cli.int_range(8, 8192), default=64, help="image side in pixels")
    p.add_argument("--patch-nums", type=int_list, default=[1, 2, 3, 4, 6, 8],
                   help="token-map sides, coarse to fine; the last equals resolution / 8")
    # the token pool stores ids as int16
    p.add_argument("--vocab-size", type=cli.int_range(2, 32768), default=512, help="VQ codebook size")
    p.add_argument("--vae-ch", type=cli.int_range(8, 4096), default=32, help="VQ-VAE base width (multiple of 8)")
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
    p.add_argument("--text-layers", type=cli.int_range(1, 1024), default=2, help="text encoder blocks")
    p.add_argument("--text-attention", choices=("causal", "full"), default="causal",
                   help="text encoder trained from scratch: causal like CLIP, or full (each word sees the whole caption)")
    p.add_argument("--text-context", type=cli.int_range(8, 65536), default=32,
                   help="text tokens incl. start/end (CLIP: 77); at least 8, room for 6 caption tokens")
    p.add_argument("--pool", type=positive_int, default=24000, help="training samples tokenized once for STAR/head")
    p.add_argument("--text-encoder", default=None, help="released CLIP text encoder folder (frozen)")
    p.add_argument("--tokenizer", default=None, help="BPE file or tokenizer folder for --text-encoder")
    p.add_argument("--vae", default=None,
                   help="released VQ-VAE weights (VAR's vae_ch160v4096z32.pth) to use frozen instead of the vae stage")
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
    p.add_argument("--reseed-every", type=positive_int, default=25, help="re-seed dead codes every N VQ-VAE steps")
    p.add_argument("--ckpt-every", type=positive_int, default=250, help="checkpoint every N steps (and at the end)")
    p.add_argument("--sample-every", type=cli.non_negative_int, default=1000,
                   help="write a preview grid every N steps (0: never); --data DIR previews its first 8 captions")
    p.add_argument("--eval-every", type=cli.non_negative_int, default=0,
                   help="judge --eval-n held-out shapes captions every N steps and log the accuracy (0: never; "
                        "needs --data shapes)")
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
        clash = adopt_settings(p, args, given, found[0], [d for d in vars(args) if d not in NOT_SETTINGS and not
                                                           (d in given and d in RESUME_MAY_CHANGE)])
        if clash:
            raise UserError(f"--resume: {'; '.join(clash)}: a resumed run keeps the data and architecture it was "
                            f"started with ({found[0]}); drop the flag, or start a new run in another --out")
    elif args.stage in ("star", "head") and not args.vae:
        before = out / ("vae.pt" if args.stage == "star" else "star.pt")
        if before.is_file():
            clash = adopt_settings(p, args, given, before,
                                   VAE_SETTINGS if args.stage == "star" else STAR_SETTINGS)
            if clash:
                raise UserError(f"--stage {args.stage}: {'; '.join(clash)}: this stage continues from {before} "
                                "and keeps the sizes it was trained with; drop the flag")
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
        p.error(f"--text-width {args.text_width}: expected a multiple of 64 (the attention heads are 64 wide)")
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
            raise UserError("--vae gives a trained VQ-VAE, so there is no 'vae' stage to run; use --stage star")
        vae = VQVAE.from_pretrained(args.vae, patch_nums=tuple(args.patch_nums))
        prev, stages = {"vae_config": config_dict(vae.config), "vae": vae.state_dict()}, \
            tuple(s for s in stages if s != "vae")
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
    sys.exit(cli.run_command(main, interrupted="interrupted; continue from the last checkpoint with --resume"))
