"""
The shapes world: a tiny synthetic text-to-image data set, and an analytic judge of generated images.

A scene is one or two coloured shapes (circle, square, triangle) on a white, black or gray 64x64
canvas, with a caption in a small fixed grammar:
  "a large red circle on the left on a white background"     (one object: size, colour, shape, position)
  "a blue square above a yellow triangle"                      (two objects: colours, shapes, relation)
Shapes are drawn with crisp pixels (no anti-aliasing): every pixel is exactly a palette colour, which
is easier for the VQ-VAE and STAR to learn and for the judge to read. train.py renders batches on the
fly with `sample_batch` (nothing on disk). The judge parses a caption and measures an image with plain
numpy (nearest-palette pixel labels, 4-connected blobs, shape moments, extent, centre), so a trained
model's prompt-following is a number: `eval` generates images for held-out captions via sample.py, and
train.py judges its current weights the same way (judge_heldout). `contact_sheet` lays out the image
grids of all three files.

  python shapes.py show --n 16 --out grid.png               # random scenes; captions on stdout
  python shapes.py check --n 600                            # the judge on clean/degraded/mismatched renders
  python shapes.py eval --ckpt checkpoints/shapes.pt --n 300  # accuracy of a trained model
  python shapes.py edit-eval --ckpt checkpoints/shapes.pt --n 60 --grid docs/edit.png  # in- and outpainting
"""
import argparse
import copy
import io
import math
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import cli

# ---------------------------------------------------------------------------------------------------
# The world's vocabulary and geometry (all in pixels of the 64x64 canvas, y pointing down).

RESOLUTION = 64
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
           "yellow": (240, 220, 40), "purple": (150, 60, 200), "orange": (245, 140, 30)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 14, "large": 26}         # side of the bounding box
SIZE_JITTER = 2                            # side is SIZES[word] + uniform integer in [-2, 2]
# one-object positions: the object's centre (x, y); None is the free coordinate, 32 +- POS_JITTER
POSITIONS = {"on the left": (16, None), "on the right": (48, None), "at the top": (None, 16),
             "at the bottom": (None, 48), "in the center": (32, 32)}
# two-object relations "A rel B": centres of A and of B, same convention as POSITIONS
RELATIONS = {"to the left of": ((16, None), (48, None)), "to the right of": ((48, None), (16, None)),
             "above": ((None, 16), (None, 48)), "below": ((None, 48), (None, 16))}
POS_JITTER = 6
NAMED_BACKGROUND_P = 0.7                   # how often a caption ends with " on a {bg} background"
HELDOUT_STREAM = 0x5EEDE7A1                # first SeedSequence word of the held-out captions' stream


@dataclass
class Obj:
    shape: str      # circle | square | triangle
    colour: str     # a key of COLOURS
    size: str       # small | large (named in one-object captions only)
    side: int       # bounding-box side in pixels
    cx: int         # centre of the bounding box
    cy: int


@dataclass
class Scene:
    objects: list           # one or two Obj
    background: str         # a key of BACKGROUNDS
    where: str              # a key of POSITIONS (one object) or of RELATIONS (two objects)
    named_background: bool  # whether the caption names the background


# ---------------------------------------------------------------------------------------------------
# Sampling scenes. Both random.Random and np.random.Generator work; a seed gives the same scene.

def _draws(rng):
    """(randint(lo, hi) inclusive, uniform in [0, 1)) backed by either kind of generator."""
    if isinstance(rng, random.Random):
        return rng.randint, rng.random
    if isinstance(rng, np.random.Generator):
        return (lambda lo, hi: int(rng.integers(lo, hi + 1))), (lambda: float(rng.random()))
    raise TypeError(f"rng: expected random.Random or np.random.Generator, got {type(rng).__name__}")


def random_scene(rng, n_objects=None, two_object=0.5):
    """A random Scene; n_objects 1 or 2 (None: two objects with probability `two_object`)."""
    randint, uniform = _draws(rng)
    pick = lambda seq: seq[randint(0, len(seq) - 1)]
    n = n_objects if n_objects is not None else 1 + (uniform() < two_object)
    if n not in (1, 2):
        raise ValueError(f"n_objects={n_objects}: expected 1, 2 or None")
    background = pick(list(BACKGROUNDS))
    named_background = uniform() < NAMED_BACKGROUND_P

    def place(anchor, colour, size):
        x, y = (a if a is not None else 32 + randint(-POS_JITTER, POS_JITTER) for a in anchor)
        side = SIZES[size] + randint(-SIZE_JITTER, SIZE_JITTER)
        return Obj(pick(SHAPES), colour, size, side, x, y)

    if n == 1:
        where = pick(list(POSITIONS))
        objects = [place(POSITIONS[where], pick(list(COLOURS)), pick(list(SIZES)))]
    else:
        where = pick(list(RELATIONS))
        first = pick(list(COLOURS))
        second = pick([c for c in COLOURS if c != first])
        objects = [place(anchor, colour, pick(list(SIZES)))
                   for anchor, colour in zip(RELATIONS[where], (first, second))]
    return Scene(objects, background, where, named_background)


def caption(scene):
    """The scene's caption in the world's grammar."""
    if len(scene.objects) == 1:
        o = scene.objects[0]
        text = f"a {o.size} {o.colour} {o.shape} {scene.where}"
    else:
        a, b = scene.objects
        text = f"a {a.colour} {a.shape} {scene.where} a {b.colour} {b.shape}"
    return text + (f" on a {scene.background} background" if scene.named_background else "")


# ---------------------------------------------------------------------------------------------------
# Rendering: each shape is a boolean mask over pixel centres (x + 0.5, y + 0.5), painted in order.

_Y, _X = np.mgrid[0:RESOLUTION, 0:RESOLUTION] + 0.5     # (64, 64) pixel-centre coordinates


def shape_mask(shape, cx, cy, side):
    """(64, 64) bool: the pixels of a shape whose bounding box has this centre and side."""
    h = side / 2
    # odd sides centre on a pixel centre, so the shape is symmetric
    if side % 2:
        cx, cy = cx + 0.5, cy + 0.5
    dx, dy = _X - cx, _Y - cy
    box = (dx >= -h) & (dx < h) & (dy >= -h) & (dy < h)     # half-open: exactly `side` pixels a side
    if shape == "square":
        return box
    if shape == "circle":
        return dx * dx + dy * dy < h * h
    if shape == "triangle":
        # apex at the top centre, base along the bottom row: the half-width grows linearly from 0.5
        # pixel at the top row to h at the bottom row, so the base fills the box's width
        return box & (np.abs(dx) <= (dy + h + 0.5) / 2)
    raise ValueError(f"shape {shape!r}: expected one of {SHAPES}")


def render(scene):
    """The scene as a (64, 64, 3) uint8 RGB image."""
    img = np.empty((RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        img[shape_mask(o.shape, o.cx, o.cy, o.side)] = COLOURS[o.colour]
    return img


def sample_batch(batch_size, seed_or_rng, two_object=0.5):
    """A training batch: images (B, 3, 64, 64) float32 in [-1, 1] and their B captions.

    seed_or_rng is an int seed or a generator (random.Random / np.random.Generator), advanced in place;
    each scene has two objects with probability two_object.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive number of images")
    rng = np.random.default_rng(seed_or_rng) if isinstance(seed_or_rng, (int, np.integer)) else seed_or_rng
    scenes = [random_scene(rng, two_object=two_object) for _ in range(batch_size)]
    imgs_BHWC = torch.from_numpy(np.stack([render(s) for s in scenes]))     # (B, 64, 64, 3) uint8
    x_BCHW = imgs_BHWC.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)      # (B, 3, 64, 64) in [-1, 1]
    return x_BCHW, [caption(s) for s in scenes]


def heldout_scenes(n, seed=0):
    """n evaluation scenes, alternating one-object and two-object (so half each, the first is one-object).

    They come from a seed stream of their own, np.random.default_rng([HELDOUT_STREAM, seed]), apart from
    train.py's [seed, step, rank] streams. The grammar has only a few thousand distinct captions, so their
    text will have been seen in training: these are new scenes that measure prompt-following, not
    generalisation to unseen phrases.
    """
    rng = np.random.default_rng([HELDOUT_STREAM, seed])
    return [random_scene(rng, n_objects=1 + i % 2) for i in range(n)]


def heldout_captions(n, seed=0):
    """The captions of heldout_scenes(n, seed): the prompts `eval` generates images for."""
    return [caption(s) for s in heldout_scenes(n, seed)]


# ---------------------------------------------------------------------------------------------------
# The judge. Every pixel is labelled with its nearest palette entry (6 colours + 3 backgrounds); the
# background is the most common background label; pixels labelled with an object colour form
# 4-connected blobs (specks under MIN_BLOB_AREA ignored), and a blob's colour is the majority label of
# its interior (blurred edges blend into other palette colours: red over white gets an orange rim).
# Each blob's object pixels are then re-cut half-way between the measured background and object
# colours; shape comes from their moments (see _measure), size from their extent, position and
# relation from their bounding-box centre (the world's definition of an object's centre). A first
# version judged shape by bounding-box fill ratio (circle pi/4, square 1, triangle 1/2) of the
# nearest-palette blob: 100% on clean renders but only ~85% after a 3x3 blur or JPEG, because small
# circles lose their single-pixel caps and triangles their apex; the moments hold up (`check` below).

_PALETTE_NAMES = list(COLOURS) + list(BACKGROUNDS)                  # labels 0-5 colours, 6-8 backgrounds
_PALETTE = np.array([*COLOURS.values(), *BACKGROUNDS.values()], dtype=np.float32)     # (9, 3)
_N_COLOURS = len(COLOURS)
MIN_BLOB_AREA = 20          # smaller blobs are specks, not objects (the smallest object has ~70 pixels)
SMALL_LARGE_SPLIT = 20      # extent below: small (12-16 px drawn), at or above: large (24-28 px)
POSITION_TOLERANCE = 12     # max distance from the named position's anchor (jitter is at most 6)
RELATION_GAP = 16           # "A left of B": B's centre at least this far right of A's (drawn: 32)

_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_BG = rf"(?: on a (?P<bg>{'|'.join(BACKGROUNDS)}) background)?"
_ONE = re.compile(rf"a (?P<size>{'|'.join(SIZES)}) (?P<colour>{_C}) (?P<shape>{_S}) "
                  rf"(?P<where>{'|'.join(POSITIONS)}){_BG}")
_TWO = re.compile(rf"a (?P<colour>{_C}) (?P<shape>{_S}) (?P<where>{'|'.join(RELATIONS)}) "
                  rf"a (?P<colour2>{_C}) (?P<shape2>{_S}){_BG}")


def parse_caption(text):
    """A caption's named attributes as a dict (keys of the _ONE or _TWO pattern's groups)."""
    t = " ".join(text.lower().strip().rstrip(".").split())
    m = _ONE.fullmatch(t) or _TWO.fullmatch(t)
    if m is None:
        raise ValueError(f"caption {text!r} is not in the shapes grammar; expected e.g. "
                         "'a large red circle on the left on a white background' "
                         "or 'a blue square above a red circle'")
    return m.groupdict()


def _blobs(fg):
    """4-connected components of a (64, 64) bool mask: a list of (ys, xs) index arrays."""
    seen = ~fg
    W = fg.shape[1]
    out = []
    for start in np.flatnonzero(fg):
        y, x = divmod(int(start), W)
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack, pix = [(y, x)], []
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for v, u in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= v < fg.shape[0] and 0 <= u < W and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
        ys, xs = np.array(pix).T
        out.append((ys, xs))
    return out


@dataclass
class Blob:
    colour: str         # nearest palette colour (majority of the interior's labels)
    shape: str          # circle | square | triangle | other
    area: int           # pixels of the object (see _measure)
    extent: int         # larger side of their bounding box
    cx: float           # centre of that bounding box
    cy: float
    cross: float        # E[x^2 y^2] / (E[x^2] E[y^2]) about the centroid: square 1, disc 2/3
    skew_y: float       # skewness of the rows: apex-up triangle -0.57, circle and square 0


def _grow(mask):
    """Dilate a (64, 64) bool mask by one pixel (8-neighbourhood)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    grown = out.copy()
    grown[:, 1:] |= out[:, :-1]
    grown[:, :-1] |= out[:, 1:]
    return grown


def _measure(ys, xs, image, labels, bg_rgb, others):
    """A Blob from the pixel indices of one 4-connected component of object-coloured pixels."""
    mask = np.zeros(labels.shape, dtype=bool)
    mask[ys, xs] = True
    # colour: majority label of the interior (pixels whose 4 neighbours are in the blob), rim excluded
    padded = np.pad(mask, 1)
    core = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    core = core if core.sum() >= 5 else mask
    colour = _PALETTE_NAMES[int(np.bincount(labels[core], minlength=_N_COLOURS).argmax())]
    # the object's pixels: those more than half-way from the background's colour to the object's (both
    # as measured in the image, so a uniform colour shift cancels), within two pixels of the blob. This
    # is where a blurred edge crosses 50%, so blur barely moves it, where nearest-palette labels eat a
    # small circle's caps or a triangle's apex (a red rim over white is labelled orange, not red).
    axis = image[core].mean(0) - bg_rgb                                     # (3,) background -> object
    if axis @ axis >= 1.0:
        alpha = (image.astype(np.float32) - bg_rgb) @ axis / (axis @ axis)  # (64, 64) 0 background, 1 object
        solid = (alpha > 0.5) & _grow(_grow(mask)) & ~others
    else:
        solid = mask
    if not solid.any():
        solid = mask
    # shape from moments of those pixels about their centroid: E[x^2 y^2] / (E[x^2] E[y^2]) is 1 for a
    # square (x, y independent) and 2/3 for a disc; the rows' skewness is -0.57 for an apex-up triangle
    # (mass low, thin apex above; y points down) and 0 for the others. Moments average over every pixel,
    # so a rounded corner or a ragged edge moves them less than it moves an outline or a bounding box.
    ys, xs = np.nonzero(solid)
    dx, dy = xs - xs.mean(), ys - ys.mean()
    vx, vy = (dx ** 2).mean(), (dy ** 2).mean()
    skew_y, cross = 0.0, 0.0
    if vx == 0 or vy == 0:
        shape = "other"                                 # a one-pixel-wide line: no drawn shape is
    else:
        skew_x, skew_y = (dx ** 3).mean() / vx ** 1.5, float((dy ** 3).mean() / vy ** 1.5)
        cross = float((dx ** 2 * dy ** 2).mean() / (vx * vy))
        if not 0.5 <= vx / vy <= 2.0 or abs(skew_x) > 0.3:
            shape = "other"                             # stretched or lopsided: no drawn shape is
        elif skew_y < -0.2:
            shape = "triangle"
        elif skew_y > 0.2:
            shape = "other"                             # upside down
        else:
            shape = "square" if cross > 0.8 else "circle" if cross > 0.5 else "other"
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return Blob(colour, shape, len(ys), int(max(y1 - y0, x1 - x0)), (x0 + x1) / 2, (y0 + y1) / 2,
                cross, skew_y)


def find_blobs(image):
    """(background name, objects as Blobs largest first) of a (64, 64, 3) uint8 image."""
    if not (isinstance(image, np.ndarray) and image.shape == (RESOLUTION, RESOLUTION, 3)
            and image.dtype == np.uint8):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image: expected a uint8 numpy array of shape (64, 64, 3), got {got}")
    d = ((image[:, :, None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)    # (64, 64, 9)
    labels = d.argmin(-1)                                                      # (64, 64) palette index
    bg_label = _N_COLOURS + int(np.bincount(labels.ravel(), minlength=9)[_N_COLOURS:].argmax())
    bg_rgb = image[labels == bg_label].mean(0)                                 # (3,) as measured
    comps = [(ys, xs) for ys, xs in _blobs(labels < _N_COLOURS) if len(ys) >= MIN_BLOB_AREA]
    taken = np.zeros(labels.shape, dtype=bool)
    for ys, xs in comps:
        taken[ys, xs] = True
    blobs = []
    for ys, xs in comps:
        mine = np.zeros_like(taken)
        mine[ys, xs] = True
        blobs.append(_measure(ys, xs, image, labels, bg_rgb, taken & ~mine))
    return _PALETTE_NAMES[bg_label], sorted(blobs, key=lambda b: -b.area)


def judge(caption_text, image):
    """Which of the caption's named attributes hold in the image: a dict of bools and `ok` (all hold).

    One object:  colour, shape, size, position, count (exactly one object), background (when named);
                 measured on the largest object.
    Two objects: colour (both named colours present), shape, relation, count (exactly two objects),
                 background (when named); measured on the largest object of each named colour.
    """
    want = parse_caption(caption_text)
    background, blobs = find_blobs(image)
    out = {}
    if "colour2" in want:
        a = next((b for b in blobs if b.colour == want["colour"]), None)
        b = next((b for b in blobs if b.colour == want["colour2"]), None)
        found = a is not None and b is not None
        out["colour"] = found
        out["shape"] = found and a.shape == want["shape"] and b.shape == want["shape2"]
        if found:
            dx, dy = b.cx - a.cx, b.cy - a.cy                   # from A to B; y points down
            along, across = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                             "above": (dy, dx), "below": (-dy, dx)}[want["where"]]
            out["relation"] = bool(along >= RELATION_GAP and abs(across) <= RELATION_GAP)
        else:
            out["relation"] = False
        out["count"] = len(blobs) == 2
    else:
        o = blobs[0] if blobs else None
        out["colour"] = o is not None and o.colour == want["colour"]
        out["shape"] = o is not None and o.shape == want["shape"]
        out["size"] = o is not None and (o.extent < SMALL_LARGE_SPLIT) == (want["size"] == "small")
        if o is not None:
            anchors = {p: (32 if x is None else x, 32 if y is None else y) for p, (x, y) in POSITIONS.items()}
            dist = {p: math.hypot(o.cx - ax, o.cy - ay) for p, (ax, ay) in anchors.items()}
            out["position"] = (min(dist, key=dist.get) == want["where"]
                               and dist[want["where"]] <= POSITION_TOLERANCE)
        else:
            out["position"] = False
        out["count"] = len(blobs) == 1
    if want["bg"]:
        out["background"] = background == want["bg"]
    out["ok"] = all(out.values())
    return out


# ---------------------------------------------------------------------------------------------------
# Checking the judge: mild degradations like a trained VQ-VAE's soft decodes.

def degrade(image, rng, blur=3, noise=4.0, shift=8.0, jpeg_quality=75, soften=None):
    """A (64, 64, 3) uint8 image softened (resized to soften x soften and back, bicubic), blurred (blur x blur
    box filter), noised (gaussian, std `noise`), colour shifted (a uniform per-channel offset in
    [-shift, shift]) and JPEG-compressed; 0/None turns a step off."""
    if soften:
        small = Image.fromarray(image).resize((soften, soften), Image.BOX)
        image = np.asarray(small.resize((RESOLUTION, RESOLUTION), Image.BICUBIC))
    x = image.astype(np.float32)
    if blur and blur > 1:
        p = blur // 2
        padded = np.pad(x, ((p, p), (p, p), (0, 0)), mode="edge")
        x = sum(padded[i:i + RESOLUTION, j:j + RESOLUTION]
                for i in range(blur) for j in range(blur)) / blur ** 2
    if noise:
        x = x + rng.normal(0.0, noise, x.shape)
    if shift:
        x = x + rng.uniform(-shift, shift, 3)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if jpeg_quality:
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, format="JPEG", quality=jpeg_quality)
        x = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return x


def vary(scene, attribute, rng):
    """A copy of the scene with one attribute its caption names changed: colour, shape, size, position,
    relation (the two objects swap places) or background. Its render must fail that check of the judge."""
    randint, _ = _draws(rng)
    s = copy.deepcopy(scene)
    o = s.objects[0]
    other = lambda options, *used: [x for x in options if x not in used][
        randint(0, len(options) - len(used) - 1)]
    if attribute == "colour":
        o.colour = other(list(COLOURS), *(b.colour for b in s.objects))
    elif attribute == "shape":
        o.shape = other(SHAPES, o.shape)
    elif attribute == "size" and len(s.objects) == 1:
        new = other(list(SIZES), o.size)
        o.side += SIZES[new] - SIZES[o.size]
        o.size = new
    elif attribute == "position" and len(s.objects) == 1:
        s.where = other(list(POSITIONS), s.where)
        x, y = POSITIONS[s.where]
        o.cx, o.cy = (x if x is not None else 32), (y if y is not None else 32)
    elif attribute == "relation" and len(s.objects) == 2:
        a, b = s.objects
        (a.cx, a.cy), (b.cx, b.cy) = (b.cx, b.cy), (a.cx, a.cy)
    elif attribute == "background":
        s.background = other(list(BACKGROUNDS), s.background)
    else:
        raise ValueError(f"attribute {attribute!r}: not one a {len(s.objects)}-object caption names")
    return s


def check_judge(n=600, seed=0):
    """The judge's `ok` rate on n random scenes: clean and degraded renders of their own caption (should be
    ~100%), and renders judged against another scene's caption or with one named attribute changed (~0%)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    imgs = [render(s) for s in scenes]
    caps = [caption(s) for s in scenes]
    settings = {"clean": None, "blur 3x3": dict(noise=0, shift=0, jpeg_quality=None),
                "noise std 8": dict(blur=0, noise=8.0, shift=0, jpeg_quality=None),
                "colour shift +-12": dict(blur=0, noise=0, shift=12.0, jpeg_quality=None),
                "jpeg q50": dict(blur=0, noise=0, shift=0, jpeg_quality=50),
                "soft (down to 24x24 and up, bicubic)": dict(blur=0, noise=0, shift=0, jpeg_quality=None,
                                                             soften=24),
                "all mild (blur 3, noise 4, shift 8, jpeg 75)": {}}
    acc = {}
    for name, kw in settings.items():
        seen = imgs if kw is None else [degrade(im, rng, **kw) for im in imgs]
        acc[name] = float(np.mean([judge(c, im)["ok"] for c, im in zip(caps, seen)]))
    acc["another scene's caption"] = float(np.mean([judge(caps[i - 1], imgs[i])["ok"] for i in range(n)]))
    changed = []
    for s, c in zip(scenes, caps):
        names = ["colour", "shape"] + (["size", "position"] if len(s.objects) == 1 else ["relation"])
        names += ["background"] if s.named_background else []
        changed.append(judge(c, render(vary(s, names[int(rng.integers(len(names)))], rng)))["ok"])
    acc["one named attribute changed"] = float(np.mean(changed))
    return acc


# ---------------------------------------------------------------------------------------------------
# Images as uint8 arrays, and the contact sheet that lays out every grid of sample.py, train.py and this file.

def to_uint8(img_B3HW):
    """[0, 1] images (B, 3, H, W) -> uint8 (B, H, W, 3), rounded to the nearest grey level."""
    return img_B3HW.float().mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def contact_sheet(images_NHW3, cols=None, gap=2, fill=255):
    """uint8 images (N, H, W, 3) side by side in rows of `cols` (None: as near a square as N allows), `gap`
    pixels apart, on grey level `fill` (also where the last row is short): uint8 (H', W', 3). The layout
    of every grid: sample.py's --grid and scale strips, train.py's previews (gap 0), show / eval --grid
    here (on dark grey, so that white and black scenes keep their edges)."""
    N, H, W, _ = images_NHW3.shape
    cols = cols or math.ceil(math.sqrt(N))
    rows = math.ceil(N / cols)
    sheet = np.full((rows * H + (rows - 1) * gap, cols * W + (cols - 1) * gap, 3), fill, np.uint8)
    for i, img in enumerate(images_NHW3):
        r, c = divmod(i, cols)
        sheet[r * (H + gap): r * (H + gap) + H, c * (W + gap): c * (W + gap) + W] = img
    return sheet


def save_grid(images, path, scale=4, cols=None):
    """Write uint8 (64, 64, 3) images as one PNG contact sheet, each upscaled `scale` times (nearest)."""
    big_NHW3 = np.stack(images).repeat(scale, axis=1).repeat(scale, axis=2)
    sheet = np.pad(contact_sheet(big_NHW3, cols, fill=90), ((2, 2), (2, 2), (0, 0)), constant_values=90)
    Image.fromarray(sheet).save(path)


# ---------------------------------------------------------------------------------------------------
# Evaluating a model with the judge, and the command line: show, check, eval, edit-eval.

def summarize(results):
    """{group: {"n", "ok", attribute: accuracy}} of judge() results, for one-object, two-object and all
    prompts."""
    groups = {"one-object": [], "two-object": [], "all": []}
    for r in results:
        groups["two-object" if "relation" in r else "one-object"].append(r)
        groups["all"].append(r)
    table = {}
    for g, rs in groups.items():
        if rs:
            keys = dict.fromkeys(k for r in rs for k in r)
            table[g] = {"n": len(rs), **{k: float(np.mean([r[k] for r in rs if k in r])) for k in keys}}
    return table


def reverse_relation(caption_text):
    """The two-object caption with its relation turned round: "A left of B" -> "A right of B"."""
    turn = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}
    return re.sub("|".join(turn), lambda m: turn[m.group(0)], caption_text, count=1)


def judge_heldout(generate, n, seed=0, batch_size=50):
    """Judge the images that generate(captions, seed) -> uint8 (B, 64, 64, 3) draws for n held-out captions,
    batch_size at a time (the batch from caption i with seed + i). Returns (summarize()'s table, the images);
    the table's two-object row has 'reversed', how often the relation holds for the caption with its
    relation turned round, and a row 'white/black bg' covers the captions naming one of those backgrounds.
    shapes.py's eval generates with a checkpoint (evaluate), train.py with the weights it is training."""
    captions = heldout_captions(n, seed)
    results, images = [], []
    for i in range(0, n, batch_size):
        prompts = captions[i:i + batch_size]
        batch = np.asarray(generate(prompts, seed + i))                 # each batch its own seed
        results += [judge(c, im) for c, im in zip(prompts, batch)]
        images += list(batch)
    table = summarize(results)
    # a relation that does not hold may be reversed (the objects drawn the other way round, i.e. the model
    # ignored which object the caption names first) or neither (an object missing or misplaced)
    two = [(c, im) for c, im, r in zip(captions, images, results) if "relation" in r]
    if two:
        table["two-object"]["reversed"] = float(np.mean([judge(reverse_relation(c), im)["relation"]
                                                         for c, im in two]))
    # white and black are the backgrounds a model can swap (gray sits between them): their own row
    named = [r["background"] for c, r in zip(captions, results)
             if c.endswith((" white background", " black background"))]
    if named:
        table["white/black bg"] = {"n": len(named), "background": float(np.mean(named))}
    return table, images


def evaluate(ckpt, n=300, seed=0, batch_size=50, cfg=None, top_k=None, top_p=None, stable=None, grid=None,
             threads=None):
    """Generate images for n held-out captions with a checkpoint and judge them: judge_heldout's table.
    grid: also write the first 64 images there. threads: CPU threads (None: cli.set_threads's choice for
    the model's size)."""
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"--ckpt {ckpt}: no such file; train one with train.py or pass "
                                "checkpoints/shapes.pt")
    # sample.py provides load_pipeline(path) -> object with .generate(prompts, seed, cfg, top_k, top_p,
    # stable) returning (B, 64, 64, 3) uint8; options left as None here keep generate's own defaults.
    from sample import load_pipeline
    pipe = load_pipeline(ckpt)
    cli.set_threads(threads, pipe.num_parameters)
    options = {k: v for k, v in dict(cfg=cfg, top_k=top_k, top_p=top_p, stable=stable).items()
               if v is not None}
    table, images = judge_heldout(lambda prompts, s: pipe.generate(prompts, seed=s, **options), n, seed,
                                  batch_size)
    if grid:
        save_grid(images[:64], grid, scale=2, cols=8)
    return table


def print_table(table, file=None):
    file = file or sys.stdout
    keys = ["ok", "colour", "shape", "size", "position", "relation", "reversed", "count", "background"]
    print(f"{'prompts':<12}{'n':>5}" + "".join(f"{k:>12}" for k in keys), file=file)
    for g, row in table.items():
        cells = "".join(f"{100 * row[k]:>11.1f}%" if k in row else f"{'-':>12}" for k in keys)
        print(f"{g:<12}{row['n']:>5}" + cells, file=file)


# ---------------------------------------------------------------------------------------------------
# Editing: inpainting and outpainting (sample.Pipeline.edit), judged like generation.
#   inpainting:  a held-out two-object caption with a left/right relation; only its left object is
#                rendered, the left half is kept and the right half regenerated with the whole caption.
#   outpainting: a held-out one-object scene moved to the centre ("... in the center ..."); the central
#                32x32 is kept, the border regenerated: the model must continue the background and add
#                nothing (count, background and position are judged with the rest).

EDIT_MARGIN = 8     # pixels: the kept region "away from the border" starts one finest token (8 px) inside


def edit_cases(kind, n, seed=0):
    """n (caption, input image (64, 64, 3) uint8, keep (64, 64) bool) for 'inpaint' or 'outpaint'."""
    cases = []
    for scene in heldout_scenes(40 * n, seed):
        keep = np.zeros((RESOLUTION, RESOLUTION), dtype=bool)
        if kind == "inpaint" and scene.where in ("to the left of", "to the right of"):
            shown = copy.deepcopy(scene)
            shown.objects = [min(scene.objects, key=lambda o: o.cx)]
            keep[:, :RESOLUTION // 2] = True
        elif kind == "outpaint" and len(scene.objects) == 1:
            scene = shown = copy.deepcopy(scene)
            scene.where, scene.objects[0].cx, scene.objects[0].cy = "in the center", 32, 32
            keep[16:48, 16:48] = True
        else:
            continue
        cases.append((caption(scene), render(shown), keep))
        if len(cases) == n:
            return cases
    raise AssertionError("not enough held-out scenes")


def _near(region, margin):
    """Pixels within `margin` pixels (Chebyshev) of a (64, 64) bool region."""
    out = region.copy()
    for _ in range(margin):
        out = _grow(out)
    return out


def evaluate_edits(ckpt, n=60, seed=0, grid=None):
    """Judge pass rate, kept-region error and time of n inpainting and n outpainting edits; prints them."""
    import time
    from sample import load_pipeline
    pipe = load_pipeline(ckpt)
    cli.set_threads(None, pipe.num_parameters)
    shown = []
    for kind in ("inpaint", "outpaint"):
        ok, away, near, recon, seconds = [], [], [], [], 0.0
        for i, (text, image, keep) in enumerate(edit_cases(kind, n, seed)):
            t0 = time.perf_counter()
            out = pipe.edit(text, image, ~keep, seed=seed + i)[0]
            seconds += time.perf_counter() - t0
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
            rec = to_uint8(pipe.vae.idx_to_img(pipe.vae.img_to_idx(x)).add(1).mul(0.5))[0]
            inner = keep & ~_near(~keep, EDIT_MARGIN)             # kept, at least 8 px from the border
            diff = lambda a: np.abs(a.astype(np.float64) - image)  # (64, 64, 3) grey levels
            ok.append(judge(text, out)["ok"])
            away.append(diff(out)[inner].mean())
            near.append(diff(out)[keep & ~inner].mean())
            recon.append(diff(rec)[inner].mean())
            if i < 4:
                shown += [image, np.repeat((~keep * 255).astype(np.uint8)[..., None], 3, axis=2), out]
        print(f"{kind:<9} n={n}: judge ok {100 * np.mean(ok):.1f}%; kept region |edit - input| "
              f"{np.mean(away):.2f} grey levels >= {EDIT_MARGIN} px from the border, "
              f"{np.mean(near):.2f} nearer; "
              f"VQ-VAE reconstruction alone {np.mean(recon):.2f}; {1000 * seconds / n:.0f} ms per edit")
    if grid:
        save_grid(shown, grid, scale=2, cols=6)


def check_image_path(path, flag):
    """An image file name to write: a known extension in an existing folder, checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise cli.UserError(f"{flag} {path} is a folder; expected an image file name such as grid.png")
    if path.suffix.lower() not in Image.registered_extensions():
        raise cli.UserError(f"{flag} {path}: unknown image type {path.suffix!r}; use a .png file name")
    if not path.resolve().parent.is_dir():
        raise cli.UserError(f"{flag} {path}: the folder {path.resolve().parent} does not exist; create it or "
                            "choose another file name")


def main(argv=None):
    """The command line (raises on a user's mistake; run as a script, cli.run_command makes that one line)."""
    p = cli.Parser(description="The shapes world: look at scenes, check the judge, evaluate a model.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{show,check,eval,edit-eval}")
    s = sub.add_parser("show", help="write a grid of random scenes and print their captions")
    s.add_argument("--n", type=cli.int_range(1, 1024), default=16, help="number of scenes (1-1024)")
    s.add_argument("--out", default="grid.png", help="PNG file to write")
    s.add_argument("--seed", type=cli.seed, default=0, help="seed of the scenes")
    s.add_argument("--scale", type=cli.int_range(1, 16), default=4,
                   help="upscaling factor of each 64x64 image in the grid (1-16)")
    c = sub.add_parser("check", help="the judge's accuracy on clean, degraded and mismatched renders")
    c.add_argument("--n", type=cli.positive_int, default=600, help="number of scenes")
    c.add_argument("--seed", type=cli.seed, default=0, help="seed of the scenes and degradations")
    e = sub.add_parser("eval", help="generate images for held-out captions with a checkpoint and judge them")
    e.add_argument("--ckpt", required=True, help="checkpoint readable by sample.load_pipeline")
    e.add_argument("--n", type=cli.positive_int, default=300,
                   help="number of held-out captions (alternating one/two objects)")
    e.add_argument("--seed", type=cli.int_range(0, 2**63 - 1), default=0,
                   help="seed of the held-out captions and of sampling")
    e.add_argument("--batch-size", type=cli.positive_int, default=50, help="prompts generated per call")
    e.add_argument("--cfg", type=cli.cfg_scale, default=None,
                   help="classifier-free guidance scale (default: sample.py's)")
    e.add_argument("--top-k", type=cli.top_k, default=None, help="top-k sampling (default: sample.py's)")
    e.add_argument("--top-p", type=cli.top_p, default=None, help="top-p sampling (default: sample.py's)")
    e.add_argument("--stable", action=argparse.BooleanOptionalAction, default=None,
                   help="use the stable-sampling head (default: sample.py's)")
    e.add_argument("--grid", default=None, help="also write the first 64 generated images to this PNG")
    e.add_argument("--threads", type=cli.threads, default=None,
                   help="CPU threads (default: 1 for a small model, else the free cores)")
    d = sub.add_parser("edit-eval",
                       help="inpainting and outpainting with a checkpoint, judged (see evaluate_edits)")
    d.add_argument("--ckpt", required=True, help="checkpoint readable by sample.load_pipeline")
    d.add_argument("--n", type=cli.positive_int, default=60, help="edits of each kind")
    d.add_argument("--seed", type=cli.int_range(0, 2**63 - 1), default=0,
                   help="seed of the held-out scenes and of sampling")
    d.add_argument("--grid", default=None,
                   help="also write input, mask, result of 4 edits of each kind to this PNG")
    args = p.parse_args(argv)

    if args.command == "show":
        check_image_path(args.out, "--out")
        rng = np.random.default_rng(args.seed)
        scenes = [random_scene(rng) for _ in range(args.n)]
        try:
            save_grid([render(sc) for sc in scenes], args.out, scale=args.scale)
        except OSError as e:
            raise cli.UserError(f"--out {args.out}: cannot write it ({e.strerror or type(e).__name__}); "
                                "choose a folder you can write to") from None
        for i, sc in enumerate(scenes):
            print(f"{i:3d}  {caption(sc)}")
    elif args.command == "check":
        for name, acc in check_judge(args.n, args.seed).items():
            print(f"{name:<46}{100 * acc:6.1f}% ok")
    elif args.command == "edit-eval":
        if args.grid:
            check_image_path(args.grid, "--grid")
        evaluate_edits(args.ckpt, args.n, args.seed, args.grid)
    else:
        if args.grid:
            check_image_path(args.grid, "--grid")
        table = evaluate(args.ckpt, args.n, args.seed, args.batch_size, args.cfg, args.top_k, args.top_p,
                         args.stable, args.grid, args.threads)
        print_table(table)


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
