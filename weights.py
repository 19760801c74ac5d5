"""
File formats: reading and writing the weight files of star (skip it on a first read).

Every weights file goes through one of two readers: `read_weights` (torch.load with weights_only=True on
the CPU, so a file holding pickled code is refused without running it) and `read_safetensors` (Hugging
Face's format, read without the safetensors package). A file that cannot be read becomes one line naming
the file, what was expected and what to do. Then the layouts: the released STAR checkpoints (which
dict holds the state dict, and which preset of star.py the weights' shapes fit), and train.py's own
checkpoints (one dict of tensors and plain values per stage, written atomically). The model files keep a
short `from_pretrained` each (map names, check shapes, build the module) and call into this file;
sample.py, train.py and bench.py read and write through it.

    sd, saved_config = star_state_dict(read_weights("star-256-d16.pth", "STAR weights"), "star-256-d16.pth")
    fitting_presets(sd)                                   # ['star-256-d16']

Tests: python -m pytest -q tests/test_weights.py
"""
import json
import os
import pickle
import warnings
from dataclasses import fields, replace
from pathlib import Path

import torch

import star  # PRESETS and STARConfig; star.py imports this file inside STAR.from_pretrained

# Sampling settings when the caller gives none. A checkpoint's own 'sampling' entry wins over these.
# the shapes world (train.py stores these in its checkpoints): the best of cfg 0-2.5 x top-k 2-20 on
# 200 validation captions (shapes.heldout_captions seed 9, not the evaluation seeds) for the bundled model
SHAPES_SAMPLING = dict(cfg=1.0, top_k=5, top_p=0.0)
RELEASED_SAMPLING = dict(cfg=4.0, top_k=600, top_p=0.8)  # the reference's demo for the released models

# -----------------------------------------------------------------------------
# the readers: every failure is one line naming the file


def check_file(path, what):
    """A missing file, a folder or an empty file gets its own line before any reader tries it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes): download or copy it again")
    return path


def read_weights(path, what, fix="download or copy it again"):
    """torch.load with weights_only=True on the CPU, memory-mapped when the file allows it (then nothing
    is read until a tensor is used). `what` names the file in errors ("STAR weights"), `fix` says what to
    do about a truncated or corrupt one."""
    path = check_file(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # old pickle protocols warn; the content is checked below
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):           # e.g. a truncated zip archive
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except Exception as e:
        chain = [e]                                # the refusal may sit under the legacy-format retry
        while chain[-1].__context__ is not None and chain[-1].__context__ not in chain:
            chain.append(chain[-1].__context__)
        if any(isinstance(c, pickle.UnpicklingError) and "Weights only load failed" in str(c) for c in chain):
            raise ValueError(f"{what} {path} is not a plain weights file: torch.load refused it with "
                             "weights_only=True (it holds pickled Python objects, or is no PyTorch file at "
                             "all) and nothing in it was run; use a file of tensors (if you trust its "
                             "source, re-save its state dict once with torch.save)") from None
        detail = (str(chain[-1]).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"{what} {path} could not be read ({type(chain[-1]).__name__}"
                         f"{': ' + detail if detail else ''}); the file is truncated, corrupt or of another "
                         f"kind: {fix}") from None


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path, what) -> dict[str, torch.Tensor]:
    """Read a .safetensors file without the safetensors package. The format: 8 bytes (little-endian
    uint64) = N, then N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, optional
    "__metadata__"}, then the raw little-endian tensor bytes, offsets counted from the end of the header."""
    path = check_file(path, what)
    data = bytearray(path.read_bytes())  # writable, so the tensors can share it without a copy
    n = int.from_bytes(data[:8], "little")
    try:
        if len(data) < 8 or 8 + n > len(data):
            raise ValueError(f"header length {n}, file size {len(data)} bytes")
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not a safetensors file ({e}): download or copy it "
                         "again") from None
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"{what} {path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}; "
                             f"expected one of {', '.join(SAFETENSORS_DTYPES)}")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count, offset = (end - begin) // dtype.itemsize, 8 + n + begin
        # frombuffer shares `data` (no copy) and reads native byte order: little-endian, like every common CPU
        flat = (torch.frombuffer(data, dtype=dtype, count=count, offset=offset) if count else
                torch.empty(0, dtype=dtype))
        tensors[name] = flat.reshape(info["shape"])
    return tensors

# -----------------------------------------------------------------------------
# STAR weights: the released layouts, and the preset their shapes fit

STAR_KEYS = {"pos_start", "lvl_embed.weight", "head_logits.weight", "word_embed.weight"}  # in every STAR file


def star_state_dict(ck, source):
    """(state dict, saved STARConfig or None) from any layout of STAR weights: the released / reference
    trainer's {'trainer': {'var_wo_ddp': sd}}, our own {'config': ..., 'model': sd}, train.py's
    {'star_config': ..., 'star': sd, ...}, or a bare state dict. `source` names the file in errors."""
    sd, saved = ck, None
    if isinstance(ck, dict) and isinstance(ck.get("trainer"), dict) and "var_wo_ddp" in ck["trainer"]:
        sd = ck["trainer"]["var_wo_ddp"]
    elif isinstance(ck, dict) and isinstance(ck.get("model"), dict):
        sd, saved = ck["model"], ck.get("config")
    elif isinstance(ck, dict) and isinstance(ck.get("star"), dict):
        sd, saved = ck["star"], ck.get("star_config")
    keys = set(sd) if isinstance(sd, dict) else set()
    if "quantize.embedding.weight" in keys or any(k.startswith("decoder.") for k in keys):
        raise ValueError(f"{source} is a VQ-VAE checkpoint, not STAR weights: pass it as --vae "
                         "(VQVAE.from_pretrained), and the STAR file as --star")
    clip = ("text_model.", "encoder.layers.", "embeddings.token_embedding", "transformer.resblocks.",
            "token_embedding.")
    if any(k.startswith(clip) for k in keys):
        raise ValueError(f"{source} holds a CLIP text encoder's weights, not STAR's: pass the folder holding "
                         "it (with config.json) as --text-encoder (TextEncoder.from_pretrained), and the "
                         "STAR file as --star")
    if not STAR_KEYS <= keys:
        found = sorted(keys)[:5] if keys else type(sd).__name__
        raise ValueError(f"{source}: not STAR weights (expected {{'trainer': {{'var_wo_ddp': ...}}}} or a "
                         f"state dict with pos_start, lvl_embed.weight, blocks.0...; found {found})")
    if isinstance(saved, dict):
        known = {f.name for f in fields(star.STARConfig)}
        if set(saved) - known:
            raise ValueError(f"{source}: its saved config has unknown fields {sorted(set(saved) - known)}; "
                             "was it written by a newer star.py?")
        saved = star.STARConfig(**saved)
    return sd, saved


def star_shape(sd):
    """Everything about a STAR model that its weights' shapes tell: STARConfig fields + the scale count K.
    Raises KeyError for weights without the released key layout."""
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    width = sd["pos_start"].shape[-1]
    shape = dict(depth=len(blocks), width=width, num_heads=sd["blocks.0.attn.scale_mul_1H11"].shape[1],
                 mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / width,
                 vocab_size=sd["head_logits.weight"].shape[0], vae_dim=sd["word_embed.weight"].shape[1],
                 text_dim=sd["encoder_proj.weight"].shape[1], class_emb="class_emb.weight" in sd,
                 head="head_proj.weight" in sd)
    if shape["head"]:
        shape["head_depth"] = len({int(k.split(".")[1]) for k in sd if k.startswith("feat_extract_blocks.")})
    return shape, sd["lvl_embed.weight"].shape[0]


def describe_star(sd):
    """What STAR weights look like, for error messages (a '?' where a key is missing)."""
    def size(key, dim):
        return sd[key].shape[dim] if key in sd else "?"
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    head = "with" if "head_proj.weight" in sd else "without"
    return (f"depth {depth}, width {size('pos_start', -1)}, {size('lvl_embed.weight', 0)} scales, text width "
            f"{size('encoder_proj.weight', 1)}, {head} sampler head")


def fitting_presets(sd):
    """Names of star.py's presets whose weights have the shapes of `sd` (none for a broken layout)."""
    try:
        shape, K = star_shape(sd)
    except (KeyError, IndexError):
        return []

    def key(c):                                    # the sampler head's depth counts only with a head
        sizes = {f: getattr(c, f) for f in shape if f != "head_depth"}
        return sizes, (c.head_depth if c.head else None), len(c.patch_nums)
    want = ({f: v for f, v in shape.items() if f != "head_depth"}, shape.get("head_depth"), K)
    return [name for name, c in star.PRESETS.items() if key(c) == want]


def released_config(sd, source, preset=None, patch_nums=None, rope_norm=None, rope_theta=None):
    """STARConfig for released weights: the preset (checked against the shapes), the one preset that fits,
    or, for weights that fit none, a config read off the shapes with the scales from --patch-nums."""
    try:
        shape, K = star_shape(sd)
    except (KeyError, IndexError) as e:
        raise ValueError(f"{source}: cannot read the model's sizes (missing {e}); expected the layout of the "
                         "released checkpoints") from None
    fits = fitting_presets(sd)
    if patch_nums is not None and len(patch_nums) != K:
        raise ValueError(f"--patch-nums gives {len(patch_nums)} scales, but {source} has {K} (one level "
                         f"embedding per scale): give {K} sides, coarse to fine")
    if preset is not None:
        if preset not in fits:
            raise ValueError(f"--preset {preset} does not fit {source} ({describe_star(sd)}); presets that "
                             f"fit: {', '.join(fits) or 'none (leave out --preset and give --patch-nums)'}")
        config = star.PRESETS[preset]
    elif fits and (patch_nums is not None or len({star.PRESETS[n].patch_nums for n in fits}) == 1):
        config = star.PRESETS[fits[0]]
    elif fits:
        raise ValueError(f"{source} fit several presets ({', '.join(fits)}), which differ in resolution: "
                         "pass --preset (preset=...)")
    else:
        if patch_nums is None:
            raise ValueError(f"{source} fit no preset ({describe_star(sd)}): pass --patch-nums with {K} "
                             "sides, coarse to fine (and --rope-norm / --rope-theta if not 64 / 10000)")
        # sample_from_idx is not stored in the weights: the released sampler starts at scale 9
        config = star.STARConfig(**shape, patch_nums=patch_nums, cross_attn_mode="batch_of_one",
                                 sample_from_idx=9 if K > 9 else max(1, K - 3))
    return with_overrides(config, patch_nums, rope_norm, rope_theta, source)


def with_overrides(config, patch_nums, rope_norm, rope_theta, source):
    """STARConfig with the user's --patch-nums / --rope-norm / --rope-theta; the scale count is fixed."""
    if patch_nums is not None and len(patch_nums) != len(config.patch_nums):
        raise ValueError(f"--patch-nums gives {len(patch_nums)} scales, but {source} has "
                         f"{len(config.patch_nums)} (one level embedding per scale): give "
                         f"{len(config.patch_nums)} sides, e.g. {','.join(map(str, config.patch_nums))}")
    changes = dict(patch_nums=patch_nums, rope_norm=rope_norm, rope_theta=rope_theta)
    return replace(config, **{k: v for k, v in changes.items() if v is not None})

# -----------------------------------------------------------------------------
# train.py's checkpoints: one torch.save dict of tensors and plain Python values per stage
# {'format': 'star-pipeline', 'stage', 'step', 'args', 'vae_config', 'vae', and from the star stage on
#  'tokenizer', 'text_config', 'text_encoder', 'star_config', 'star', 'sampling'; while training also
#  'optimizer', 'rng' and 'vae_code_hits'}. The bundle of `python train.py --export` keeps the weights
# (in half precision) without the training state.

STAGES = ("vae", "star", "head")


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, then os.replace: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:   # a full disk, a folder in the way, Ctrl-C: no half-written .tmp stays behind
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path, stages=STAGES):
    """Our checkpoint at `path`, checked to come from train.py and from one of `stages`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}, expected a "
                                "checkpoint file written by train.py")
    ck = read_weights(path, "checkpoint", fix="delete it to run that stage again")
    if not isinstance(ck, dict) or ck.get("format") != "star-pipeline":
        raise ValueError(f"{path}: not a checkpoint written by train.py (expected OUT/vae.pt, star.pt or "
                         "head.pt)")
    if ck.get("stage") not in stages:
        raise ValueError(f"{path}: holds a '{ck.get('stage')}' checkpoint, expected "
                         f"{' or '.join(map(repr, stages))}")
    return ck
