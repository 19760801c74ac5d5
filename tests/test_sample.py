"""Tests for sample.py: the fixture STAR through the released-weights path reproduces the reference image,
then the command line on a tiny random checkpoint in train.py's format (files, seeds, outputs), then every
error a user can make (one 'error:' line on stderr, exit code 2, no traceback)."""
import dataclasses
import json
import re
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from clip_text import TextConfig, TextEncoder, Tokenizer
from conftest import (BPE_PATH, FIXTURES, Payload, ROOT, assert_user_error, need_shared, run_script,
                      terminal_lines)
from star import STAR, STARConfig
from tokenizer import VQVAE, VQVAEConfig

CAPTIONS = ["a red circle on the left", "a blue square above a green triangle", "a small yellow triangle",
            "a purple circle on a black background", "a large gray square on the right"]


pytestmark = pytest.mark.usefixtures("one_thread")


def build_tiny_checkpoint(path, stage="head", half=True, sampling=None):
    """A random 64px pipeline saved as train.py does: VQ-VAE (8x downsampling), trained BPE, text encoder,
    STAR with a sampler head; weights in float16 like the exported bundle."""
    torch.manual_seed(0)
    patch_nums = (1, 2, 3, 4, 6, 8)
    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1,
                            patch_nums=patch_nums))
    tok = Tokenizer.train(CAPTIONS, vocab_size=560)
    text = TextEncoder(TextConfig(vocab_size=tok.vocab_size, width=32, layers=1, heads=1))
    star = STAR(STARConfig(depth=1, width=64, num_heads=1, patch_nums=patch_nums, vocab_size=64, vae_dim=8,
                           text_dim=32, head=True, head_depth=1, sample_from_idx=4, class_emb=False), vae)
    # init_weights makes the logits almost uniform; larger output weights let the text matter
    with torch.no_grad():
        star.head_logits.weight.mul_(50)
    cast = (lambda sd: {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}) if half else dict
    ck = {"format": "star-pipeline", "stage": stage, "step": 1, "args": {"seed": 0},
          "vae_config": dataclasses.asdict(vae.config), "vae": cast(vae.state_dict())}
    if stage != "vae":
        ck.update(tokenizer=tok.state_dict(), text_config=dataclasses.asdict(text.config),
                  text_encoder=cast(text.state_dict()), star_config=dataclasses.asdict(star.config),
                  star=cast(star.state_dict()))
    if sampling is not None:
        ck["sampling"] = sampling
    torch.save(ck, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def cli(argv, capsys):
    """Run the command line in-process: (exit status, stdout, stderr)."""
    code = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def png(path):
    img = Image.open(path)
    img.load()
    return np.asarray(img)

# ---------------------------------------------------------------- numbers: the fixture STAR


def fixture_args():
    return ["--star", need_shared(FIXTURES / "star" / "star.pth"), "--vae", FIXTURES / "vqvae" / "vae.pth",
            "--text-encoder", FIXTURES / "clip_text", "--tokenizer", BPE_PATH,
            "--patch-nums", "1,2,3,4,5,6,8", "--rope-norm", "64"]


def test_fixture_star_reproduces_the_reference_image(tmp_path, capsys):
    prompt = json.loads(need_shared(FIXTURES / "star" / "prompts.json").read_text())[0]
    code, out, err = cli([*fixture_args(), "--top-k", 1, "--cfg", 4, "--prompt", prompt,
                          "--out", tmp_path / "a.png"], capsys)
    assert code == 0, err
    want = torch.load(FIXTURES / "star" / "expected_b1.pt", weights_only=True)["ar_b1_cfg4_img"][0]
    want = want.permute(1, 2, 0).numpy() * 255                       # (H, W, 3) in [0, 255]
    got = png(tmp_path / "a.png").astype(np.float64)
    assert got.shape == want.shape == (128, 128, 3)
    assert np.abs(got - want).max() <= 1.0
    assert "s/image" in out.splitlines()[-1] and "peak memory" in out.splitlines()[-1]


def test_preset_mismatch_names_the_preset_that_fits(tmp_path, capsys):
    code, _, err = cli([*fixture_args(), "--preset", "star-1024-d30", "--prompt", "x", "--out",
                        tmp_path / "a.png"], capsys)
    assert code == 2 and err.startswith("error: --preset star-1024-d30 does not fit")
    assert "depth 2, width 128, 7 scales" in err and "presets that fit: none" in err

# ---------------------------------------------------------------- behaviour: the command line


def test_default_command_writes_a_png(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sample, "DEFAULT_CKPT", ckpt)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["--prompt", "a red circle on the left"], capsys)
    assert code == 0, err
    img = png(tmp_path / "sample.png")
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 0
    last = out.strip().splitlines()[-1]
    assert "s/image" in last and "peak memory" in last
    assert "6/6" in err and "scale" in err                          # the bar counted all six scales


def test_same_seed_same_bytes_other_seed_or_prompt_other_image(ckpt, tmp_path, capsys):
    def run(name, prompt="a red circle on the left", seed=3):
        argv = ["--ckpt", ckpt, "--prompt", prompt, "--seed", seed, "--out", tmp_path / name]
        code, _, err = cli(argv, capsys)
        assert code == 0, err
        return tmp_path / name
    a = run("a.png")
    assert run("b.png").read_bytes() == a.read_bytes()
    assert not np.array_equal(png(run("c.png", seed=4)), png(a))
    assert not np.array_equal(png(run("d.png", prompt="a blue square above a green triangle")), png(a))


def test_prompts_file_writes_images_in_order(ckpt, tmp_path, capsys):
    prompts = ["a red circle on the left", "a small yellow triangle", "a large gray square on the right"]
    (tmp_path / "p.txt").write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    out_dir = tmp_path / "out"
    code, _, err = cli(["--ckpt", ckpt, "--prompts-file", tmp_path / "p.txt", "--out-dir", out_dir, "--grid",
                        "--batch-size", 2], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.glob("[0-9]*.png")) == ["000.png", "001.png", "002.png"]
    assert (out_dir / "prompts.txt").read_text().splitlines() == prompts
    assert png(out_dir / "grid.png").shape == (2 * 64 + 2, 2 * 64 + 2, 3)
    # file i is prompt i; each batch draws from its own seed, the first from --seed itself (as generate())
    pipe = sample.load_pipeline(ckpt)
    batches = pipe.generate_batches(prompts, seed=0, batch_size=2)
    streamed = np.concatenate([images for _, images, _ in batches])
    assert np.array_equal(streamed[:2], pipe.generate(prompts, seed=0, batch_size=2)[:2])
    for i in range(3):
        assert np.array_equal(png(out_dir / f"{i:03d}.png"), streamed[i])


def test_save_scales_writes_the_coarse_to_fine_strip(ckpt, tmp_path, capsys):
    code, _, err = cli(["--ckpt", ckpt, "--prompt", "a purple circle on a black background",
                        "--out", tmp_path / "x.png", "--save-scales"], capsys)
    assert code == 0, err
    strip, final = png(tmp_path / "x_scales.png"), png(tmp_path / "x.png")
    K = 6
    assert strip.shape == (64, K * 64 + (K - 1) * 2, 3)
    assert np.array_equal(strip[:, -64:], final)                     # the last panel is the image
    assert not np.array_equal(strip[:, :64], final)                  # the first is the 1x1 scale's blur


def test_pipeline_api_for_shapes_eval(tmp_path):
    """What shapes.evaluate relies on: uint8 (B, 64, 64, 3), options by keyword, stored sampling defaults."""
    path = build_tiny_checkpoint(tmp_path / "s.pt", half=False,
                                 sampling={"cfg": 1.5, "top_k": 3, "top_p": 0.9})
    pipe = sample.load_pipeline(path)
    assert pipe.sampling == {"cfg": 1.5, "top_k": 3, "top_p": 0.9} and pipe.head_ready
    imgs = pipe.generate(["a red circle on the left", "a small yellow triangle"], seed=1, cfg=2.0, top_k=5,
                         top_p=0.0, stable=None)
    assert imgs.shape == (2, 64, 64, 3) and imgs.dtype == np.uint8
    imgs2, scales = pipe.generate(["a red circle on the left"], seed=2, images_per_prompt=2,
                                  return_scales=True, stable=False)
    assert imgs2.shape == (2, 64, 64, 3) and scales.shape == (2, 6, 64, 64, 3)
    assert np.array_equal(scales[:, -1], imgs2)
    assert pipe.generate([""], seed=0).shape == (1, 64, 64, 3)       # unconditional: the empty prompt
    star_stage = sample.load_pipeline(build_tiny_checkpoint(tmp_path / "t.pt", stage="star"))
    assert star_stage.sampling == sample.SHAPES_SAMPLING and not star_stage.head_ready
    # bfloat16: STAR's weights only; the text encoder and the VQ-VAE stay float32
    bf16 = sample.load_pipeline(path, dtype=torch.bfloat16)
    assert bf16.star.pos_start.dtype == torch.bfloat16
    assert (bf16.vae.quantize.embedding.weight.dtype == bf16.text_encoder.final_layer_norm.weight.dtype
            == torch.float32)
    assert bf16.generate(["a small yellow triangle"], seed=0, stable=True).shape == (1, 64, 64, 3)


def test_bundled_checkpoint_default_command(tmp_path, capsys, monkeypatch):
    """The real default, once the bundled model is in checkpoints/."""
    if not sample.DEFAULT_CKPT.is_file():
        pytest.skip(f"{sample.DEFAULT_CKPT} not there yet (train.py writes it)")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["--prompt", "a red circle on the left on a white background"], capsys)
    assert code == 0, err
    assert png(tmp_path / "sample.png").shape == (64, 64, 3)


def test_end_to_end_subprocess(ckpt, tmp_path):
    """The real entry point: exit status 0 with an image, 2 with one error line and no traceback."""
    cmd = [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(ckpt),
           "--prompt", "a red circle on the left", "--num-images", "2", "--out-dir", str(tmp_path / "o")]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "o" / "001.png").is_file()
    bad = subprocess.run(cmd + ["--top-p", "1.5"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("error: --top-p 1.5") and "Traceback" not in bad.stderr

# ---------------------------------------------------------------- errors a user can act on


def assert_error(capsys, argv, *fragments):
    code, _, err = cli(argv, capsys)
    assert code == 2, err
    lines = [ln.split("\r")[-1] for ln in err.split("\n")]       # what a terminal shows (bars redraw with \r)
    lines = [ln for ln in lines if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("flag, value, fragment", [
    ("--top-p", "1.5", "--top-p 1.5: expected a number in [0, 1]"),
    ("--top-p", "-0.1", "in [0, 1]"),
    ("--top-k", "-1", "--top-k -1: expected a whole number >= 0"),
    ("--cfg", "-2", "--cfg -2: expected a number in [0, 100]"),
    ("--num-images", "0", "--num-images 0: expected a positive integer"),
    ("--batch-size", "0", "--batch-size 0"),
    ("--top-k", "many", "--top-k many: expected a whole number >= 0"),
    ("--patch-nums", "1,3,2", "must grow strictly"),
])
def test_bad_flag_values(ckpt, flag, value, fragment, capsys):
    assert_error(capsys, ["--ckpt", ckpt, "--prompt", "x", flag, value], fragment)


def test_missing_default_checkpoint_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sample, "DEFAULT_CKPT", tmp_path / "checkpoints" / "shapes.pt")
    monkeypatch.chdir(tmp_path)
    assert_error(capsys, ["--prompt", "x"], "no checkpoint at", "python train.py --out runs/shapes",
                 "--export runs/shapes/head.pt checkpoints/shapes.pt")


def hostile_pickle(path, marker, zip_format=True):
    """A weights-looking file whose unpickling would run code: torch.save's zip or a plain pickle."""
    if zip_format:
        torch.save({"star": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"star": Payload(marker)}, protocol=2))
    return path


def test_bad_checkpoint_files(ckpt, tmp_path, capsys):
    good = ckpt.read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "trunc.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.pt").write_text("not weights at all\n")
    (tmp_path / "folder.pt").mkdir()
    base = ["--prompt", "x", "--out", tmp_path / "o.png", "--ckpt"]
    assert_error(capsys, base + [tmp_path / "missing.pt"], "missing.pt not found")
    assert_error(capsys, base + [tmp_path / "folder.pt"], "not found (it is a folder)")
    assert_error(capsys, base + [tmp_path / "empty.pt"], "is empty (0 bytes)")
    assert_error(capsys, base + [tmp_path / "trunc.pt"], "could not be read", "truncated")
    assert_error(capsys, base + [tmp_path / "text.pt"], "is not a plain weights file")
    marker = tmp_path / "PWNED"
    assert_error(capsys, base + [hostile_pickle(tmp_path / "evil.pt", marker)], "is not a plain weights file")
    assert_error(capsys, base + [hostile_pickle(tmp_path / "evil.pkl", marker, zip_format=False)],
                 "is not a plain weights file")
    assert not marker.exists()
    vae_only = build_tiny_checkpoint(tmp_path / "vae.pt", stage="vae")
    assert_error(capsys, base + [vae_only], "holds only the VQ-VAE (stage 'vae')", "--resume")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    assert_error(capsys, base + [tmp_path / "other.pt"], "was not written by train.py", "--star")


def test_hostile_files_as_released_weights_are_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = hostile_pickle(tmp_path / "evil.pth", marker)
    args = dict(zip(fixture_args()[0::2], fixture_args()[1::2]))
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "config.json").write_bytes((FIXTURES / "clip_text" / "config.json").read_bytes())
    hostile_pickle(enc / "pytorch_model.bin", marker)
    for flag, value, what in (("--star", evil, "STAR weights"), ("--vae", evil, "VQ-VAE weights"),
                              ("--text-encoder", enc, "text encoder weights"),
                              ("--star", hostile_pickle(tmp_path / "evil.pkl", marker, zip_format=False),
                               "STAR weights")):
        argv = [a for k, v in {**args, flag: value}.items() for a in (k, v)]
        assert_error(capsys, argv + ["--prompt", "x", "--out", tmp_path / "o.png"], what,
                     "not a plain weights file")
    assert not marker.exists()


def test_files_of_another_kind(tmp_path, capsys):
    args = dict(zip(fixture_args()[0::2], fixture_args()[1::2]))

    def run(flag, value, *fragments):
        argv = [a for k, v in {**args, flag: value}.items() for a in (k, v)]
        return assert_error(capsys, argv + ["--prompt", "x", "--out", tmp_path / "o.png"], *fragments)
    run("--star", FIXTURES / "vqvae" / "vae.pth",
        "is a VQ-VAE checkpoint, not STAR weights: pass it as --vae")
    run("--star", FIXTURES / "clip_text" / "pytorch_model.bin", "CLIP text encoder", "--text-encoder")
    run("--vae", FIXTURES / "star" / "star.pth", "not a VQ-VAE state dict")
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_bytes(
        (FIXTURES / "clip_text" / "model.safetensors").read_bytes())
    run("--text-encoder", tmp_path / "noconfig", "has no config.json")
    run("--text-encoder", FIXTURES / "clip_text" / "config.json", "is a file; expected a folder")
    run("--tokenizer", tmp_path / "nope.txt.gz", "tokenizer", "not found")
    run("--patch-nums", "1,2,3,4,6,8", "--patch-nums gives 6 scales", "has 7")
    del args["--patch-nums"]
    run("--rope-norm", "64", "fit no preset", "pass --patch-nums with 7 sides")
    assert_error(capsys, ["--star", FIXTURES / "star" / "star.pth", "--prompt", "x"],
                 "missing --vae --text-encoder --tokenizer")


def test_patch_nums_must_end_at_the_vqvae_latent(ckpt, tmp_path, capsys):
    assert_error(capsys, ["--ckpt", ckpt, "--prompt", "x", "--patch-nums", "1,2,3,4,6,10"],
                 "ends at 10", "8x8 latents (64px images)", "end the list at 8")
    code, _, err = cli(["--ckpt", ckpt, "--prompt", "x", "--patch-nums", "1,2,3,4,5,8", "--out",
                        tmp_path / "o.png"], capsys)
    assert code == 0, err                                            # same count and last side: allowed


def test_prompt_and_output_errors(ckpt, tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert_error(capsys, ["--ckpt", ckpt, "--prompts-file", tmp_path / "blank.txt"], "has no prompts")
    assert_error(capsys, ["--ckpt", ckpt, "--prompts-file", tmp_path / "absent.txt"], "cannot be read")
    assert_error(capsys, ["--ckpt", ckpt], "no prompt")
    (tmp_path / "afile").write_text("")
    assert_error(capsys, ["--ckpt", ckpt, "--prompt", "x", "--out-dir", tmp_path / "afile" / "sub"],
                 "--out-dir", "cannot write")
    assert_error(capsys, ["--ckpt", ckpt, "--prompt", "x", "--prompt", "y", "--out", tmp_path / "o.png"],
                 "use --out-dir DIR, or --grid")
    assert_error(capsys, ["--ckpt", ckpt, "--prompt", "x", "--out", tmp_path / "o.xyz"], "unknown image type")
    assert_error(capsys, ["--ckpt", ckpt, "--prompt", "x", "--no-such-flag"], "unrecognized arguments")


def test_device_and_memory_errors(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_error(capsys, ["--ckpt", ckpt, "--prompt", "x", "--device", "cuda"], "no CUDA GPU", "--device cpu")

    for exc in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: "
                             "can't allocate memory")):
        def oom(*args, **kwargs):
            raise exc
        monkeypatch.setattr(STAR, "generate", oom)
        assert_error(capsys, ["--ckpt", ckpt, "--prompt", "x", "--out", tmp_path / "o.png"],
                     "out of memory on cpu generating 1 64px images at once",
                     "more memory, or a smaller model")


def test_stable_sampling_needs_a_trained_head(tmp_path, capsys):
    star_stage = build_tiny_checkpoint(tmp_path / "star.pt", stage="star")
    assert_error(capsys, ["--ckpt", star_stage, "--prompt", "x", "--stable"], "not trained yet",
                 "stable sampling off")
    assert_error(capsys, [*fixture_args(), "--prompt", "x", "--stable"], "has none", "--no-stable")

# ---------------------------------------------------------------- editing: --image / --mask, Pipeline.edit


def edit_files(tmp_path, size=(64, 64), mask_size=None, regenerate="right"):
    """A shapes-like image with a left object and a mask (white = regenerate); returns their paths."""
    W, H = size
    img = np.full((H, W, 3), 255, np.uint8)
    img[H // 3: 2 * H // 3, W // 8: W // 3] = (220, 40, 40)
    mw, mh = mask_size or size
    mask = np.zeros((mh, mw), np.uint8)
    if regenerate == "right":
        mask[:, mw // 2:] = 255
    elif regenerate == "all":
        mask[:] = 255
    Image.fromarray(img).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "in.png", tmp_path / "mask.png"


def test_pipeline_edit_is_seeded_and_keeps_the_kept_tokens(ckpt, tmp_path, monkeypatch):
    pipe = sample.load_pipeline(ckpt)
    image, mask = (np.array(Image.open(p)) for p in edit_files(tmp_path))
    prompts = ["a red circle on the left", "a small yellow triangle"]
    a = pipe.edit(prompts, image, mask, seed=3, images_per_prompt=2)
    assert a.shape == (4, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, pipe.edit(prompts, image, mask, seed=3, images_per_prompt=2))
    assert not np.array_equal(a, pipe.edit(prompts, image, mask, seed=4, images_per_prompt=2))
    seen = {}                                                          # what reaches STAR.generate
    generate = STAR.generate
    monkeypatch.setattr(STAR, "generate", lambda self, *a, **kw: seen.update(kw) or generate(self, *a, **kw))
    pipe.edit("x", image, mask > 0, seed=0)                           # a bool mask: True = regenerate
    known = pipe.vae.img_to_idx(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)
    assert all(torch.equal(k, s) for k, s in zip(known, seen["known_idx"]))
    # keep the left half, 1x1 included
    assert seen["keep"][0].all() and seen["keep"][-1].float().mean() == 0.5


def test_fit_edit_inputs_crops_resizes_and_says_so():
    img = np.zeros((80, 100, 3), np.uint8)
    img[:, 10:90] = 200                                               # the centre square of 100x80
    mask = np.zeros((40, 50), bool)
    mask[:, 25:] = True                                               # half size, same shape: resized
    image, regenerate, note = sample.fit_edit_inputs(img, mask, 64)
    assert image.shape == (64, 64, 3) and regenerate.shape == (64, 64) and (image == 200).all()
    assert note == "note: image 100x80 centre-cropped to 80x80 and resized to 64x64, the model's resolution"
    assert regenerate[:, 36:].all() and not regenerate[:, :28].any()
    assert sample.fit_edit_inputs(img[:64, :64], mask[:32, :32] * 255, 64)[2] is None   # nothing to do
    with pytest.raises(ValueError, match="mask is 40x50 and the image 100x80"):
        sample.fit_edit_inputs(img, np.zeros((50, 40), np.uint8), 64)


def test_edit_command_line(ckpt, tmp_path, capsys):
    image, mask = edit_files(tmp_path, size=(96, 96))
    code, out, err = cli(["--ckpt", ckpt, "--prompt", "a red circle on the left",
                          "--image", image, "--mask", mask, "--out", tmp_path / "o.png"], capsys)
    assert code == 0, err
    assert "note: image 96x96 resized to 64x64" in out and png(tmp_path / "o.png").shape == (64, 64, 3)


def test_edit_errors(ckpt, tmp_path, capsys):
    base = ["--ckpt", ckpt, "--prompt", "x", "--out", tmp_path / "o.png"]
    image, mask = edit_files(tmp_path)
    assert_error(capsys, [*base, "--image", image], "--image and --mask go together")
    assert_error(capsys, [*base, "--image", tmp_path / "absent.png", "--mask", mask], "--image", "not found")
    (tmp_path / "text.png").write_text("not an image")
    assert_error(capsys, [*base, "--image", image, "--mask", tmp_path / "text.png"], "--mask",
                 "cannot be read")
    assert_error(capsys, [*base, "--image", image, "--mask", image, "--save-scales"],
                 "not available with --image")
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(black)
    assert_error(capsys, [*base, "--image", image, "--mask", black], "regenerates nothing")
    _, white = edit_files(tmp_path, regenerate="all")
    assert_error(capsys, [*base, "--image", image, "--mask", white], "keeps nothing")
    _, tall = edit_files(tmp_path, mask_size=(32, 64))
    assert_error(capsys, [*base, "--image", image, "--mask", tall], "cannot be resized")
    _, mask = edit_files(tmp_path)
    ck = torch.load(ckpt, weights_only=True)                          # a bundle without the VQ-VAE's encoder
    ck["vae"] = {k: v for k, v in ck["vae"].items() if not k.startswith("encoder.")}
    torch.save(ck, tmp_path / "decoder_only.pt")
    assert_error(capsys, ["--ckpt", tmp_path / "decoder_only.pt", *base[2:], "--image", image,
                          "--mask", mask],
                 "no VQ-VAE encoder weights")
    code, _, err = cli(["--ckpt", tmp_path / "decoder_only.pt", *base[2:]], capsys)   # it still generates
    assert code == 0, err


def test_bad_inputs_catalogue(ckpt, tmp_path, capsys):
    """Values that used to crash deep inside (inf guidance, a seed over 64 bits) or pass silently (1e30) are
    refused at the flag with the valid range; an existing output file is left as it was."""
    out = tmp_path / "o.png"
    out.write_bytes(b"an earlier image")
    base = ["--ckpt", ckpt, "--prompt", "x", "--out", out]
    for flag, value, fragment in [
            ("--cfg", "inf", "--cfg inf: expected a number in [0, 100]"),
            ("--cfg", "nan", "--cfg nan: expected a number in [0, 100]"),
            ("--cfg", "1e30", "--cfg 1e30: expected a number in [0, 100]"),
            ("--cfg", "-1", "--cfg -1: expected"),
            ("--seed", "1180591620717411303424",
             "--seed 1180591620717411303424: expected a seed in [0, 2**64 - 1]"),
            ("--seed", "-1", "--seed -1: expected a seed"),
            ("--seed", "1.5", "--seed 1.5: expected a seed"),
            ("--top-k", "inf", "--top-k inf: expected a whole number >= 0"),
            ("--top-k", "1e30", "--top-k 1e30: expected a whole number >= 0"),
            ("--top-p", "nan", "--top-p nan: expected a number in [0, 1]"),
            ("--top-p=-inf", None, "--top-p -inf: expected"),
            ("--num-images", "-5", "--num-images -5: expected a positive integer"),
            ("--num-images", str(2**70), "expected a positive integer"),
            ("--batch-size", "0", "--batch-size 0: expected a positive integer"),
            ("--threads", "0", "--threads 0: expected a number of threads >= 1"),
            ("--threads", "-1", "--threads -1: expected"),
            ("--rope-norm", "0", "--rope-norm 0: expected a number in (0, 1e+06]"),
            ("--rope-norm", "inf", "--rope-norm inf: expected"),
            ("--rope-theta", "nan", "--rope-theta nan: expected"),
            ("--device", "tpu", "--device: invalid choice: 'tpu'"),
            ("--cfg", None, "--cfg: expected one argument")]:
        assert_error(capsys, base + [flag] + ([value] if value is not None else []), fragment)
    assert out.read_bytes() == b"an earlier image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]


def test_pipeline_refuses_values_that_would_fail_inside(ckpt):
    pipe = sample.load_pipeline(ckpt)
    for options, fragment in [(dict(cfg=float("inf")), "cfg=inf"), (dict(cfg=float("nan")), "cfg=nan"),
                              (dict(cfg=1e30), "cfg=1e+30"), (dict(top_k=float("inf")), "top_k=inf"),
                              (dict(top_k=2.5), "top_k=2.5"), (dict(seed=2**64), "seed="),
                              (dict(seed=0.5), "seed=")]:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            pipe.generate(["x"], **options)
        with pytest.raises(ValueError, match=re.escape(fragment)):
            next(pipe.generate_batches(["x"], **options))


def test_cfg_inf_as_a_user_runs_it(ckpt, tmp_path):
    code, _, err = run_script("sample.py", "--ckpt", ckpt, "--prompt", "a red circle", "--cfg", "inf",
                              cwd=tmp_path)
    assert_user_error(code, err, "--cfg inf: expected a number in [0, 100]")
    assert list(tmp_path.iterdir()) == []

# ---------------------------------------------------------------- --out-dir: streamed, continued


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_out_dir_continues_where_it_stopped(ckpt, tmp_path, capsys):
    """Images already written with the same settings are skipped (and the set is the same as one run writes);
    other settings replace them; a missing scales strip is made again."""
    argv = ["--ckpt", ckpt, "--prompt", CAPTIONS[0], "--prompt", CAPTIONS[1], "--num-images", 3,
            "--batch-size", 2, "--save-scales", "--grid"]
    code, out, err = cli(argv + ["--out-dir", tmp_path / "ref"], capsys)
    assert code == 0, err
    ref = folder_bytes(tmp_path / "ref")
    assert sorted(ref) == ["000.png", "000_scales.png", "001.png", "001_scales.png",
                           "002.png", "002_scales.png", "003.png", "003_scales.png",
                           "004.png", "004_scales.png", "005.png", "005_scales.png",
                           "grid.png", "prompts.txt", "settings.json"]
    prompts = (tmp_path / "ref" / "prompts.txt").read_text().splitlines()
    assert prompts == [CAPTIONS[0]] * 3 + [CAPTIONS[1]] * 3
    # a run stopped after image 2 (of batch 1 = images 2, 3) and without one strip
    run = tmp_path / "run"
    run.mkdir()
    for name in ("000.png", "001.png", "002.png", "000_scales.png", "002_scales.png", "settings.json"):
        (run / name).write_bytes(ref[name])
    code, out, err = cli(argv + ["--out-dir", run], capsys)
    assert code == 0, err
    # 002 lacks nothing but 001's strip is gone
    assert f"skipped 2 of 6 images already in {run}" in out
    assert folder_bytes(run) == ref
    # the same command again: nothing to do
    code, out, err = cli(argv + ["--out-dir", run], capsys)
    assert code == 0 and "skipped 6 of 6" in out and "image(s) of" not in out
    # another seed: the old images are replaced, not counted as done
    code, out, err = cli(argv + ["--out-dir", run, "--seed", 1], capsys)
    assert code == 0 and "held 12 image file(s) of other settings: replaced" in out
    assert (run / "000.png").read_bytes() != ref["000.png"]
    # a smaller --batch-size continues the same run (after running out of memory, say)
    code, out, err = cli(argv + ["--out-dir", run, "--seed", 1, "--batch-size", 1], capsys)
    assert code == 0 and "skipped 6 of 6" in out


def test_one_image_and_one_batch_unchanged_by_streaming(ckpt, tmp_path, capsys):
    """--out (and an --out-dir run of one batch) draw from one generator seeded --seed, as generate() does."""
    pipe = sample.load_pipeline(ckpt)
    code, _, err = cli(["--ckpt", ckpt, "--prompt", CAPTIONS[2], "--seed", 7, "--out", tmp_path / "one.png"],
                       capsys)
    assert code == 0, err
    assert np.array_equal(png(tmp_path / "one.png"), pipe.generate([CAPTIONS[2]], seed=7)[0])
    code, _, err = cli(["--ckpt", ckpt, "--prompt", CAPTIONS[0], "--prompt", CAPTIONS[1], "--num-images", 2,
                        "--seed", 7, "--out-dir", tmp_path / "d"], capsys)
    assert code == 0, err
    together = pipe.generate(CAPTIONS[:2], seed=7, images_per_prompt=2)
    for i in range(4):
        assert np.array_equal(png(tmp_path / "d" / f"{i:03d}.png"), together[i])


def test_out_of_memory_advice_fits_the_run(ckpt, tmp_path, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(STAR, "generate", oom)
    line = assert_error(capsys, ["--ckpt", ckpt, "--prompt", "x", "--num-images", 8, "--batch-size", 8,
                                 "--out-dir", tmp_path / "d"],
                        "generating 8 64px images at once", "--batch-size 4",
                        f"the images in {tmp_path / 'd'} are kept")
    assert "bfloat16" not in line                                   # float32 on a CPU: nothing to gain there
    line = assert_error(capsys, ["--ckpt", ckpt, "--prompt", "x", "--out", tmp_path / "o.png"],
                        "generating 1 64px images at once", "a machine with more memory, or a smaller model")
    assert "--batch-size" not in line and not (tmp_path / "o.png").exists()


def test_interrupted_run_continues_to_the_same_images(ckpt, tmp_path, capsys):
    """Ctrl-C in the middle of a multi-batch --out-dir run: exit code 130 and one line; the same command then
    skips what was written and the folder ends up byte for byte as an uninterrupted run leaves it."""
    argv = ["--ckpt", ckpt, "--prompt", CAPTIONS[0], "--prompt", CAPTIONS[3], "--num-images", 15,
            "--batch-size", 2, "--threads", 1, "--out-dir"]
    code, _, err = cli(argv + [tmp_path / "ref"], capsys)                    # uninterrupted, in this process
    assert code == 0, err
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *map(str, argv), str(run)], env=dict(
        os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run / "003.png").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    # bytes: text mode would turn the bar's \r into \n
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and terminal_lines(err) == [
        "interrupted; the images already written are kept, and the same command skips them"]
    written = len(list(run.glob("[0-9][0-9][0-9].png")))
    assert 4 <= written < 30
    code, out, err = cli(argv + [run], capsys)                               # the same command again
    assert code == 0, err
    assert f"skipped {written} of 30 images already in {run}" in out
    assert folder_bytes(run) == folder_bytes(tmp_path / "ref")


def test_every_flag_value_survives_the_settings_file(ckpt, tmp_path, capsys):
    """settings.json is read back as JSON (lists, not tuples): a run with --patch-nums still continues."""
    argv = ["--ckpt", ckpt, "--prompt", "x", "--patch-nums", "1,2,3,4,5,8", "--rope-theta", "100",
            "--out-dir", tmp_path]
    assert cli(argv, capsys)[0] == 0
    code, out, err = cli(argv, capsys)
    assert code == 0 and "skipped 1 of 1" in out, err



def test_prompts_outside_the_shapes_grammar_are_named(tmp_path, capsys):
    # the bundled model knows its captions' grammar only: "a red circle" (no size, no position) is drawn
    # loosely, and the command says so; a caption of the grammar passes without a word, as does any
    # prompt for a model trained on a folder of images
    code, _, err = cli(["--ckpt", sample.DEFAULT_CKPT, "--prompt", "a red circle",
                        "--prompt", "a large red circle on the left on a white background",
                        "--grid", "--out", tmp_path / "a.png"], capsys)
    assert code == 0 and err.count("warning:") == 1 and "'a red circle' is outside" in err
    code, _, err = cli(["--ckpt", sample.DEFAULT_CKPT, "--prompt", "a red circle above a blue square",
                        "--out", tmp_path / "b.png"], capsys)
    assert code == 0 and "warning:" not in err
    folder_model = build_tiny_checkpoint(tmp_path / "folder.pt")
    code, _, err = cli(["--ckpt", folder_model, "--prompt", "a red circle", "--out", tmp_path / "c.png"],
                       capsys)
    assert code == 0 and "warning:" not in err
