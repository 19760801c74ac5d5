"""Behaviour of train.py on a tiny configuration (16x16 images, two scales, one block, a few steps).

The whole pipeline runs end to end and writes self-contained checkpoints; --export makes a smaller
half-precision bundle; --resume after a SIGKILL continues exactly (same losses, same bits), also when
the kill lands in the middle of a checkpoint write; torchrun with two processes keeps them in step;
a non-finite loss stops training before anything NaN is saved; bad inputs get one line and exit
code 2; and nothing trains on the wrong data or destroys a run (a token pool made by another
configuration is made again, a bare --resume keeps the run's own flags, --export never writes over a
checkpoint and leaves no temporary file). Every run uses one thread (OMP_NUM_THREADS=1 or
torch.set_num_threads(1): the same bits). Runs that get killed are forked from a server that has
imported torch already, which makes each start cheap.
"""
import codecs
import json
import multiprocessing
import os
import random
import re
import runpy
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import shapes
import train
from clip_text import TextConfig, TextEncoder, Tokenizer
from conftest import Payload, ROOT
from star import STAR, STARConfig
from tokenizer import VQVAE, VQVAEConfig

STEPS = {"vae": 8, "star": 6, "head": 4}
# VQ-VAE: 2 plain-autoencoder steps, then the quantizer, with dead codes re-seeded after steps 5 and 8;
# with checkpoints at even steps, a kill after step 7 resumes at step 6 with non-zero hit counters
TINY = ["--resolution", "16", "--patch-nums", "1,2", "--vae-ch", "32", "--vocab-size", "16", "--depth", "1",
        "--width", "64", "--text-width", "64", "--text-layers", "1", "--head-from", "1", "--pool", "64",
        "--batch-size", "4", "--warmup", "2", "--vae-ae-frac", "0.25", "--reseed-every", "3",
        "--log-every", "1", "--sample-every", "0", "--quiet", "--device", "cpu",
        "--vae-steps", str(STEPS["vae"]), "--star-steps", str(STEPS["star"]),
        "--head-steps", str(STEPS["head"])]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CKPTS = ("vae.pt", "star.pt", "head.pt")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40)}


# ---------------------------------------------------------------------------------------------------
# helpers

def write_folder(root, n=8):
    """n captioned 16x16 PNGs (a coloured square on white, `name.txt` beside each) in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        a = np.full((16, 16, 3), 255, np.uint8)
        lo = 2 + i % 5
        a[lo:lo + 8, 3:11] = COLOURS[name]
        Image.fromarray(a).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a {name} square")
    return root


def train_in_process(argv):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(argv)
    finally:
        torch.set_num_threads(n)


def cli(argv, timeout=120):
    """train.py as a user runs it: (exit code, stderr)."""
    r = subprocess.run([sys.executable, "train.py", *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=timeout)
    return r.returncode, r.stderr


def cli_in_process(argv, monkeypatch, capsys):
    """train.py's `__main__` block run in this process (no new interpreter): (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, argv)])
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # the block replaces it
    capsys.readouterr()
    code = 0
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, fragment):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], err


def logged_losses(out):
    """[(stage, step, loss text)] of every step line in OUT/log.txt, in order (re-done steps repeat)."""
    text = (Path(out) / "log.txt").read_text()
    logged = re.finditer(r"^(vae|star|head) step (\d+) loss (\S+)", text, re.M)
    return [(m[1], int(m[2]), m[3]) for m in logged]


def assert_same_weights(out_a, out_b):
    for name in CKPTS:
        a = torch.load(Path(out_a) / name, weights_only=True)
        b = torch.load(Path(out_b) / name, weights_only=True)
        assert a["step"] == b["step"]
        for part in ("vae", "text_encoder", "star"):
            if part in a:
                assert a[part].keys() == b[part].keys()
                for k in a[part]:
                    assert torch.equal(a[part][k], b[part][k]), f"{name} {part}.{k} differs"
        assert a.get("tokenizer") == b.get("tokenizer")


def hostile_checkpoint(path, marker):
    torch.save({"format": "star-pipeline", "stage": "vae", "step": 1, "vae": Payload(marker)}, path)
    return path


def _train_child(argv):
    torch.set_num_threads(1)
    train.main(argv)


@pytest.fixture(scope="module")
def launch():
    """launch(argv) starts train.main(argv) in a child process forked from a server that has imported
    train.py (and torch) already; the child is a multiprocessing.Process (kill() sends SIGKILL)."""
    ctx = multiprocessing.get_context("forkserver")
    # this module holds the children's entry point; torch.optim imports torch._dynamo when the first
    # optimizer is made (1.5 s per process)
    ctx.set_forkserver_preload([__name__, "train", "torch._dynamo"])

    def start(argv):
        proc = ctx.Process(target=_train_child, args=([str(a) for a in argv],), daemon=True)
        proc.start()
        return proc
    return start


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted run of all three stages (the yardstick of the resume and kill tests)."""
    out = tmp_path_factory.mktemp("reference")
    train_in_process(["--out", str(out), "--data", str(data), "--ckpt-every", "2", *TINY])
    return out


# ---------------------------------------------------------------------------------------------------
# 1. the pipeline and its checkpoints

def test_help():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "--resume" in r.stdout and "torchrun" in r.stdout and not r.stderr


def test_pipeline_writes_self_contained_checkpoints(reference):
    cks = {name: torch.load(reference / f"{name}.pt", weights_only=True) for name in STEPS}
    for name, ck in cks.items():
        assert ck["format"] == "star-pipeline" and ck["stage"] == name and ck["step"] == STEPS[name]
        assert "optimizer" in ck and "rng" in ck
        vae = VQVAE(VQVAEConfig(**ck["vae_config"]))
        vae.load_state_dict(ck["vae"])
    assert cks["vae"]["vae_code_hits"].shape == (16,)
    for name in ("star", "head"):
        ck = cks[name]
        tok = Tokenizer.from_state_dict(ck["tokenizer"])
        text = TextEncoder(TextConfig(**ck["text_config"]))
        text.load_state_dict(ck["text_encoder"])
        star = STAR(STARConfig(**ck["star_config"]), vae)
        star.load_state_dict(ck["star"])
        assert star.config.patch_nums == (1, 2) and star.config.head and tok.encode("a red square")
    # each stage trains only its own part: the VQ-VAE is frozen after its stage, the trunk and the
    # text encoder after theirs; the head stage changes the sampler head
    for name in ("star", "head"):
        assert all(torch.equal(cks["vae"]["vae"][k], v) for k, v in cks[name]["vae"].items())
    head_names = {n for n, p in star.named_parameters() if any(p is q for q in star.head_parameters())}
    changed = {k for k, v in cks["head"]["star"].items() if not torch.equal(cks["star"]["star"][k], v)}
    assert changed and changed <= head_names
    assert all(torch.equal(cks["star"]["text_encoder"][k], v) for k, v in cks["head"]["text_encoder"].items())
    # one log line per step, and the losses go down
    losses = logged_losses(reference)
    assert [(s, n) for s, n, _ in losses] == [(s, n) for s in STEPS for n in range(1, STEPS[s] + 1)]
    by_stage = {s: [float(v) for t, _, v in losses if t == s] for s in STEPS}
    assert all(np.isfinite(v).all() for v in by_stage.values())
    assert by_stage["vae"][-1] < by_stage["vae"][0] and by_stage["star"][-1] < by_stage["star"][0]


def test_export_writes_a_smaller_half_precision_bundle_that_generates(reference, tmp_path, capsys):
    dst = tmp_path / "bundle" / "tiny.pt"
    train.main(["--export", str(reference / "head.pt"), str(dst)])
    assert "wrote" in capsys.readouterr().out
    assert dst.stat().st_size < 0.6 * (reference / "head.pt").stat().st_size
    ck = torch.load(dst, weights_only=True)
    assert not {"optimizer", "rng", "vae_code_hits"} & ck.keys()
    for part in ("vae", "text_encoder", "star"):
        assert all(t.dtype == torch.float16 for t in ck[part].values() if t.is_floating_point())
        ck[part] = {k: t.float() if t.is_floating_point() else t for k, t in ck[part].items()}
    vae = VQVAE(VQVAEConfig(**ck["vae_config"]))
    vae.load_state_dict(ck["vae"])
    text = TextEncoder(TextConfig(**ck["text_config"]))
    text.load_state_dict(ck["text_encoder"])
    star = STAR(STARConfig(**ck["star_config"]), vae)
    star.load_state_dict(ck["star"])
    parts = {"vae": vae, "text": text, "star": star, "tokenizer": Tokenizer.from_state_dict(ck["tokenizer"])}
    # (stable sampling needs more tokens per scale than a 2x2 map has)
    img = train.generate(parts, ["a red square", "a blue square"], 0, torch.device("cpu"), stable=False,
                         **ck["sampling"])
    assert img.shape == (2, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    sample.load_pipeline(dst)                     # and sample.py reads it


# ---------------------------------------------------------------------------------------------------
# 2. and 3. resuming after SIGKILL

def wait_for(cond, proc, timeout=90):
    """Poll cond() every millisecond until it holds (True) or the process ends (False)."""
    deadline = time.time() + timeout
    while not cond():
        if not proc.is_alive():
            return False
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.001)
    return True


def log_has(out, line):
    log = Path(out) / "log.txt"
    return lambda: log.exists() and f"\n{line} loss" in "\n" + log.read_text()


def finish(proc, timeout=120):
    proc.join(timeout)
    return proc.exitcode


def test_resume_after_kill_continues_exactly(reference, data, tmp_path, launch):
    out = tmp_path / "run"
    argv = ["--out", out, "--data", data, "--ckpt-every", "2", *TINY]
    # killed after VQ-VAE step 7 (checkpoint 6 holds re-seeding hit counters), then after STAR step 5
    for line in ("vae step 7", "star step 5"):
        proc = launch(argv + ["--resume"])
        assert wait_for(log_has(out, line), proc), "the run ended before it could be killed"
        proc.kill()
        assert finish(proc) == -9
    assert torch.load(out / "vae.pt", weights_only=True)["step"] == STEPS["vae"]
    assert torch.load(out / "star.pt", weights_only=True)["step"] in (4, 6)
    assert finish(launch(argv + ["--resume"])) == 0
    # the re-done steps (7 of the VQ-VAE, 5 and maybe 6 of STAR) appear twice, with the same losses
    got, want = logged_losses(out), dict(((s, n), v) for s, n, v in logged_losses(reference))
    assert len(got) > sum(STEPS.values())
    assert all(v == want[s, n] for s, n, v in got), [(s, n, v, want[s, n]) for s, n, v in got
                                                     if v != want[s, n]]
    assert_same_weights(out, reference)


def next_step(out):
    """(stage, step) the next --resume must start at, from the complete checkpoints on disk; each must
    load."""
    nxt = ("vae", 1)
    for i, name in enumerate(STEPS):
        path = Path(out) / f"{name}.pt"
        if not path.exists():
            break
        ck = torch.load(path, weights_only=True)        # always a complete, loadable file
        assert ck["format"] == "star-pipeline" and ck["stage"] == name and 1 <= ck["step"] <= STEPS[name]
        assert all(torch.isfinite(t).all() for t in ck["vae"].values() if t.is_floating_point())
        done = ck["step"] == STEPS[name]
        if not done:
            nxt = (name, ck["step"] + 1)
        else:
            nxt = (list(STEPS)[i + 1], 1) if i + 1 < len(STEPS) else None
    return nxt


def test_sigkill_at_random_moments_loses_nothing(reference, data, tmp_path, launch):
    """Kill at >= 10 moments, half of them while a checkpoint is being written; every time the checkpoints
    on disk load and the next --resume starts right after the last of them; the end equals an
    uninterrupted run."""
    out = tmp_path / "run"
    argv = ["--out", out, "--data", data, "--ckpt-every", "1", "--resume", *TINY]
    rng = random.Random(7)
    kills = mid_write = 0
    log = out / "log.txt"
    expect = ("vae", 1)

    def complete():
        return {n: (out / n).stat().st_mtime_ns for n in CKPTS if (out / n).exists()}

    def writing(since):
        """A checkpoint's temporary file written by this trial exists (a stale one may lie there)."""
        tmps = [out / f"{n}.tmp" for n in CKPTS]
        return any(t.exists() and t.stat().st_mtime_ns > since for t in tmps)

    while expect is not None:
        offset = log.stat().st_size if log.exists() else 0
        started = time.time_ns()
        proc = launch(argv)
        before = complete()
        # each trial is killed after at least one new checkpoint, so that the run moves on; after 12
        # kills the last trial runs to the end
        if kills < 12 and wait_for(lambda: complete() != before, proc):
            if kills % 2:
                wait_for(lambda: writing(started), proc)    # inside torch.save, or before os.replace
            else:
                time.sleep(rng.uniform(0.0, 0.05))
            proc.kill()
            kills += 1
        assert finish(proc) in (0, -9)
        mid_write += writing(started)
        first = re.search(r"^(vae|star|head) step (\d+) ", log.read_text()[offset:], re.M)
        assert (first[1], int(first[2])) == expect, "--resume did not start after the last checkpoint"
        expect = next_step(out)
    assert kills >= 10 and mid_write >= 3, (kills, mid_write)
    got, want = logged_losses(out), dict(((s, n), v) for s, n, v in logged_losses(reference))
    assert all(v == want[s, n] for s, n, v in got)
    assert_same_weights(out, reference)


# ---------------------------------------------------------------------------------------------------
# 4. torchrun

def test_torchrun_two_processes_stay_in_step(reference, data, tmp_path):
    """Two CPU processes (gloo), all three stages.

    Every stage ends with train.py comparing each process's parameters with rank 0's (a broadcast and
    an all-reduce) and logging the verdict; a mismatch stops the run. That both processes' batches
    count is checked against the one-process reference with the same flags: step 1's loss (rank 0's
    batch, same initial weights) is the same, step 2's differs because step 1's update averaged rank
    1's gradient in, and so do the final weights.
    """
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", "--out", str(out), "--data", str(data), "--ckpt-every", "2", *TINY],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (out / "log.txt").read_text()
    for stage in STEPS:
        assert f"{stage}: all 2 processes hold identical weights" in log
    got, want = logged_losses(out), logged_losses(reference)
    assert [(s, n) for s, n, _ in got] == [(s, n) for s, n, _ in want]
    assert got[0] == want[0] and got[1] != want[1]
    ddp = torch.load(out / "head.pt", weights_only=True)["star"]
    one = torch.load(reference / "head.pt", weights_only=True)["star"]
    assert not all(torch.equal(ddp[k], one[k]) for k in one)


# ---------------------------------------------------------------------------------------------------
# 5. numerical faults

def all_finite(path):
    ck = torch.load(path, weights_only=True)
    return all(torch.isfinite(t).all() for part in ("vae", "star", "text_encoder") if part in ck
               for t in ck[part].values() if t.is_floating_point())


def test_a_diverging_loss_stops_with_one_line_and_keeps_checkpoints_finite(data, tmp_path, monkeypatch,
                                                                           capsys):
    """Through the command's boundary: the loss overflows from step 4 on (as with a learning rate far too
    high; --vae-lr itself is capped at 1, see the bad-flag catalogue)."""
    import tokenizer
    calls = []

    def diverging(recon, img):
        calls.append(1)
        return train_loss(recon, img) * (float("inf") if len(calls) >= 4 else 1.0)
    train_loss = tokenizer.reconstruction_loss
    monkeypatch.setattr(tokenizer, "reconstruction_loss", diverging)   # train.py imports it from there
    out = tmp_path / "run"
    code, err = cli_in_process(["--out", out, "--data", data, "--stage", "vae", "--ckpt-every", "1", *TINY],
                               monkeypatch, capsys)
    assert_one_line_error(code, err, "stopped before updating the weights")
    assert re.search(r"vae step 4: the (loss|gradient norm) is (nan|inf|-inf);", err) and "--resume" in err
    assert torch.load(out / "vae.pt", weights_only=True)["step"] == 3 and all_finite(out / "vae.pt")


def test_nan_in_the_data_stops_before_the_update(data, tmp_path, monkeypatch):
    calls = []

    def poisoned(recon, img):   # the 4th batch holds a NaN pixel
        calls.append(1)
        return train_loss(recon, img) * (float("nan") if len(calls) == 4 else 1.0)
    train_loss = train.reconstruction_loss
    monkeypatch.setattr(train, "reconstruction_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(train.UserError,
                       match=r"vae step 4: the loss is nan; stopped before updating.*step 3"):
        train_in_process(["--out", str(out), "--data", str(data), "--stage", "vae", "--ckpt-every", "1",
                          *TINY])
    assert torch.load(out / "vae.pt", weights_only=True)["step"] == 3 and all_finite(out / "vae.pt")


def test_weights_that_overflow_are_never_saved(data, tmp_path, monkeypatch):
    """A finite loss and gradient can still leave inf in the weights (an update too large for float32)."""
    step = torch.optim.AdamW.step

    def overflowing(self, *a, **k):
        step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].mul_(float("inf"))
    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    out = tmp_path / "run"
    with pytest.raises(train.UserError,
                       match="vae step 1: the weights became non-finite.*last checkpoint: none"):
        train_in_process(["--out", str(out), "--data", str(data), "--stage", "vae", "--ckpt-every", "1",
                          *TINY])
    assert not (out / "vae.pt").exists()


# ---------------------------------------------------------------------------------------------------
# 6. and 7. bad inputs

def test_corrupt_images_and_missing_captions_are_skipped_with_a_warning(tmp_path):
    root = write_folder(tmp_path / "data", n=6)
    (root / "noise.png").write_bytes(os.urandom(300))
    (root / "empty.png").write_bytes(b"")
    (root / "half.png").write_bytes((root / "img0.png").read_bytes()[:60])
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / "cut.jpg", quality=95)
    (root / "cut.jpg").write_bytes((root / "cut.jpg").read_bytes()[:400])
    for name in ("noise", "empty", "half", "cut"):
        (root / f"{name}.txt").write_text("a broken picture")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "nocaption.png")
    with pytest.warns(UserWarning) as record:
        data = train.ImageFolder(root, 16)
    warned = " ".join(str(w.message) for w in record)
    for name in ("noise.png", "empty.png", "half.png", "cut.jpg", "nocaption.png"):
        assert name in warned
    assert sorted(p.name for p, _ in data.items) == [f"img{i}.png" for i in range(6)]
    out = tmp_path / "run"
    with pytest.warns(UserWarning):
        train_in_process(["--out", str(out), "--data", str(root), "--stage", "vae", *TINY,
                          "--vae-steps", "2"])
    assert torch.load(out / "vae.pt", weights_only=True)["step"] == 2


def bad_input_cases(tmp_path, reference):
    """(argv, fragment of the message) for each bad input; files are made on the way."""
    data = write_folder(tmp_path / "data", n=4)
    tiny = ["--data", data, *TINY]
    (tmp_path / "empty").mkdir()
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(nocap / "a.png")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    (broken / "a.txt").write_text("a caption")
    meta = write_folder(tmp_path / "meta", n=2)
    (meta / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": "a red square"}\n'
                                         '{"file_name": 3}\n')
    (tmp_path / "file").write_text("")
    outside = write_folder(tmp_path / "outside", n=1) / "img0.png"         # a readable image, beside the data
    escape = write_folder(tmp_path / "escape", n=2)
    (escape / "metadata.jsonl").write_text('{"file_name": "../outside/img0.png", "text": "a red square"}\n')
    absolute = write_folder(tmp_path / "absolute", n=2)
    (absolute / "metadata.jsonl").write_text(f'{{"file_name": "{outside}", "text": "a red square"}}\n')
    number = write_folder(tmp_path / "number", n=2)
    (number / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": "a red square"}\n'
                                           '{"file_name": "img1.png", "text": 3}\n')

    def out_with(name, content):
        """An --out folder holding `name` = content (a path to copy, bytes, or a callable writing it)."""
        out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
        out.mkdir()
        if callable(content):
            content(out / name)
        else:
            (out / name).write_bytes(content.read_bytes() if isinstance(content, Path) else content)
        return out

    vae_bytes = (reference / "vae.pt").read_bytes()
    marker = tmp_path / "PWNED"
    hostile = lambda p: hostile_checkpoint(p, marker)  # noqa: E731
    plain_vqvae = lambda p: torch.save(  # noqa: E731
        VQVAE(VQVAEConfig(ch=32, patch_nums=(1, 2))).state_dict(), p)
    hostile_pool = out_with("vae.pt", reference / "vae.pt")
    hostile_checkpoint(hostile_pool / "tokens.pt", marker)
    return marker, [
        (["--out", tmp_path / "o", "--data", tmp_path / "missing", *TINY], "not a folder"),
        (["--out", tmp_path / "o", "--data", tmp_path / "empty", *TINY], "no usable images"),
        (["--out", tmp_path / "o", "--data", nocap, *TINY], "no usable images"),
        (["--out", tmp_path / "o", "--data", broken, *TINY], "no usable images"),
        (["--out", tmp_path / "o", "--data", meta, *TINY], "metadata.jsonl:2: expected a JSON object"),
        (["--out", tmp_path / "file" / "out", *tiny], "cannot write there"),
        (["--out", out_with("vae.pt", vae_bytes), *tiny], "pass --resume to continue it"),
        (["--out", out_with("vae.pt", vae_bytes[:len(vae_bytes) // 2]), "--resume", *tiny], 
         "could not be read"),
        (["--out", out_with("vae.pt", b""), "--resume", *tiny], "is empty (0 bytes)"),
        (["--out", out_with("vae.pt", hostile), "--resume", *tiny], "not a plain weights file"),
        (["--out", out_with("vae.pt", hostile), "--stage", "star", *tiny], "not a plain weights file"),
        (["--export", hostile(tmp_path / "evil.pt"), tmp_path / "x.pt"], "not a plain weights file"),
        (["--out", hostile_pool, "--stage", "star", *tiny], "not a plain weights file"),
        (["--out", out_with("vae.pt", plain_vqvae), "--stage", "star", *tiny],
         "not a checkpoint written by train.py"),
        (["--out", out_with("vae.pt", reference / "star.pt"), "--resume", *tiny],
         "'star' checkpoint, expected 'vae'"),
        (["--out", out_with("star.pt", reference / "vae.pt"), "--stage", "head", *tiny],
         "'vae' checkpoint, expected 'star'"),
        (["--export", reference / "vae.pt", tmp_path / "x.pt"], "expected 'star' or 'head'"),
        (["--export", tmp_path / "nothing.pt", tmp_path / "x.pt"],
         "no such file, expected a checkpoint file"),
        (["--export", tmp_path, tmp_path / "x.pt"], "a folder, expected a checkpoint file"),
        (["--out", tmp_path / "o2", "--stage", "star", *tiny], "no such file, expected a checkpoint file"),
        (["--out", out_with("vae.pt", reference / "vae.pt"), "--stage", "star", *tiny, "--resolution", "32",
          "--patch-nums", "1,4"], "works on 16x16 images"),
        (["--out", out_with("vae.pt", reference / "vae.pt"), "--stage", "star", *tiny, "--vae-ch", "64"],
         "--stage star: --vae-ch 64 (the run has 32): this stage continues from"),
        (["--out", tmp_path / "o", *tiny, "--patch-nums", "1,3"],
         "the last side must be --resolution / 8 = 2"),
        (["--out", tmp_path / "o", "--data", "shapes", "--resolution", "16", "--patch-nums", "1,2"],
         "drawn at 64x64"),
        (["--out", tmp_path / "o", *tiny, "--width", "96"], "multiple of 64"),
        (["--out", tmp_path / "o", *tiny, "--ckpt-every", "0"], "expected a positive integer"),
        (["--out", tmp_path / "o", *tiny, "--patch-nums", "1,x"], "comma-separated integers"),
        (["--out", tmp_path / "o", *tiny, "--stage", "star", "--text-encoder", tmp_path],
         "needs --tokenizer"),
        (["--out", tmp_path / "o", *tiny, "--bogus"], "unrecognized arguments: --bogus"),
        (["--out", tmp_path / "o", "--data", escape, *TINY],
         "metadata.jsonl:1: file_name '../outside/img0.png' points outside"),
        (["--out", tmp_path / "o", "--data", absolute, *TINY], "metadata.jsonl:1: file_name"),
        (["--out", tmp_path / "o", "--data", number, *TINY],
         "metadata.jsonl:2: 'file_name' and 'text' must be strings, got str and int"),
    ] + [([*argv, "--out", tmp_path / "never", *tiny, *flag], fragment) for argv, flag, fragment in BAD_FLAGS]


# flags that cannot be right: refused before anything is read or written (argv before TINY, flag after it)
BAD_FLAGS = [
    ([], ["--grad-clip", "-1"], "--grad-clip -1: expected a number in (0,"),
    ([], ["--grad-clip", "0"], "--grad-clip 0: expected a number in (0,"),
    ([], ["--lr", "inf"], "--lr inf: expected a number in (0, 1]"),
    ([], ["--lr", "nan"], "--lr nan: expected a number in (0, 1]"),
    ([], ["--vae-lr", "1e30"], "--vae-lr 1e30: expected a number in (0, 1]"),
    ([], ["--head-lr", "0"], "--head-lr 0: expected a number in (0, 1]"),
    ([], ["--weight-decay", "-0.1"], "--weight-decay -0.1: expected a number in [0, 1]"),
    ([], ["--text-context", "2"], "--text-context 2: expected a whole number in [8,"),
    ([], ["--cond-drop", "5"], "--cond-drop 5: expected a number in [0, 0.99]"),
    ([], ["--cond-drop", "1"], "--cond-drop 1: expected a number in [0, 0.99]"),
    ([], ["--vae-ae-frac", "1"], "--vae-ae-frac 1: expected a number in [0, 0.99]"),
    ([], ["--warmup", "5"], "--warmup 5: more warm-up steps than --head-steps 4"),
    ([], ["--warmup", "-1"], "--warmup -1: expected a whole number >= 0"),
    ([], ["--depth", "0"], "--depth 0: expected a whole number in [1,"),
    ([], ["--head-from", "2"], "--head-from 2: expected a scale index from 1 to 1"),
    ([], ["--head-from", "0"], "--head-from 0: expected a whole number in [1,"),
    ([], ["--seed", "-1"], "--seed -1: expected a seed in [0, 2**32 - 1]"),
    ([], ["--seed", "1180591620717411303424"], "expected a seed in [0, 2**32 - 1]"),
    ([], ["--vocab-size", "40000"], "--vocab-size 40000: expected a whole number in [2, 32768]"),
    ([], ["--vae-ch", "12"], "--vae-ch 12: expected a multiple of 8"),
    ([], ["--text-width", "96"], "--text-width 96: expected a multiple of 64"),
    ([], ["--eval-every", "1"], "--eval-every 1: the evaluation judges shapes-world captions"),
    ([], ["--sample-every", "-1"], "--sample-every -1: expected a whole number >= 0"),
    ([], ["--batch-size", "0"], "--batch-size 0: expected a positive integer"),
    ([], ["--pool", "-5"], "--pool -5: expected a positive integer"),
    ([], ["--resolution", "0"], "--resolution 0: expected a whole number in [8,"),
    (["--stage", "vae"], ["--warmup", "9"], "--warmup 9: more warm-up steps than --vae-steps 8"),
]


def test_bad_inputs_get_one_line_and_exit_code_2(reference, tmp_path, monkeypatch, capsys):
    marker, cases = bad_input_cases(tmp_path, reference)
    for argv, fragment in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code, err = cli_in_process(argv, monkeypatch, capsys)
        assert_one_line_error(code, err, fragment)
    assert len(cases) >= 25
    assert not marker.exists()
    assert not (tmp_path / "never").exists()      # a bad flag creates nothing
    # the hostile file is live: loading it the unsafe way would have run its code
    torch.load(hostile_checkpoint(tmp_path / "live.pt", tmp_path / "LIVE"), weights_only=False)
    assert (tmp_path / "LIVE").exists()


def test_errors_from_the_model_files_reach_the_user_as_one_line(reference, tmp_path, monkeypatch, capsys):
    """ValueError/FileNotFoundError raised in tokenizer.py and clip_text.py are caught at the CLI boundary."""
    data = write_folder(tmp_path / "data", n=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vae.pt").write_bytes((reference / "vae.pt").read_bytes())
    marker = tmp_path / "PWNED"
    enc = tmp_path / "encoder"
    enc.mkdir()
    (enc / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1, '
                                     '"intermediate_size": 128}')
    hostile_checkpoint(enc / "pytorch_model.bin", marker)
    bpe = tmp_path / "bpe.txt"
    bpe.write_text("#version: 0.2\nt h\n")
    for argv, fragment in [
        (["--out", tmp_path / "o", "--data", data, *TINY, "--patch-nums", "2,2"], "strictly increasing"),
        (["--out", out, "--stage", "star", "--data", data, *TINY, "--text-vocab", "300"],
         "vocab_size=300 is too small"),
        (["--out", out, "--stage", "star", "--data", data, *TINY, "--text-encoder", tmp_path / "nope",
          "--tokenizer", bpe], "does not exist"),
        (["--out", out, "--stage", "star", "--data", data, *TINY, "--text-encoder", tmp_path,
          "--tokenizer", bpe], "has no config.json"),
    ]:
        assert_one_line_error(*cli_in_process(argv, monkeypatch, capsys), fragment)
    # a hostile text encoder through a real interpreter: refused, one line, nothing run
    assert_one_line_error(*cli(["--out", out, "--stage", "star", "--data", data, *TINY, "--text-encoder", enc,
                                "--tokenizer", bpe]), "pytorch_model.bin")
    assert not marker.exists()


def test_released_vae_replaces_the_vae_stage(tmp_path):
    """--vae: a VQ-VAE in VAR's plain state-dict layout (here 16x downsampling, as the released one) is
    loaded frozen; the star and head stages train on its tokens and store it unchanged."""
    vae = VQVAE(VQVAEConfig(vocab_size=16, ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=1,
                            patch_nums=(1, 2)))
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    argv = list(TINY)
    argv[argv.index("--resolution") + 1] = "32"
    out = tmp_path / "run"
    train_in_process(["--data", str(write_folder(tmp_path / "data", n=4)), "--vae", str(tmp_path / "vae.pth"),
                      "--out", str(out), *argv])
    assert sorted(p.name for p in out.glob("*.pt")) == ["head.pt", "star.pt", "tokens.pt"]
    ck = torch.load(out / "head.pt", weights_only=True)
    assert all(torch.equal(ck["vae"][k], v) for k, v in vae.state_dict().items())
    assert VQVAEConfig(**ck["vae_config"]).downsample == 16


def test_text_attention_reaches_the_text_encoder(reference, tmp_path):
    # full attention by default (the bundled model's recipe); --text-attention causal builds CLIP's kind
    star = torch.load(Path(reference) / "star.pt", weights_only=True)
    assert star["text_config"]["causal"] is False
    vae = torch.load(Path(reference) / "vae.pt", weights_only=True)
    args = train.parse_args(["--out", str(tmp_path), "--data", star["args"]["data"], "--stage", "star",
                             "--text-attention", "causal", *TINY])
    parts, _ = train.build_stage("star", args, vae, train.make_data(args, args.resolution))
    assert parts["text"].config.causal is True


def test_two_object_sets_the_data_mix_and_the_head_stage_keeps_it(reference, tmp_path):
    # the mix is part of the data's identity (a token pool made with another mix is tokenized again),
    # and --stage head draws from the star stage's pool, so it takes the star stage's value
    args = train.parse_args(["--out", str(tmp_path), "--two-object", "0.75"])
    data = train.make_data(args, args.resolution)
    assert data.two_object == 0.75 and data.identity != train.ShapesData().identity
    _, caps = data.batch(200, np.random.default_rng(0))
    assert sum("colour2" in shapes.parse_caption(c) for c in caps) > 120
    star = torch.load(Path(reference) / "star.pt", weights_only=True)
    star["args"]["two_object"] = 0.75
    torch.save(star, tmp_path / "star.pt")
    head = train.parse_args(["--out", str(tmp_path), "--stage", "head", "--data", star["args"]["data"]])
    assert head.two_object == 0.75


def test_weight_decay_reaches_linear_and_conv_matrices_only():
    args = train.parse_args(["--out", "unused", "--depth", "1", "--width", "64", "--text-width", "64"])
    vae = VQVAE(train.default_vae_config(args))
    prev = {"vae_config": train.config_dict(vae.config), "vae": vae.state_dict()}
    parts, net = train.build_stage("star", args, prev, train.ShapesData())
    decay, no_decay = train.make_optimizer(net, 1e-3, 0.05).param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    name = {id(p): n for n, p in net.named_parameters()}
    decayed = {name[id(p)] for p in decay["params"]}
    kept = {name[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(kept)
    assert decayed | kept == {n for n, p in net.named_parameters() if p.requires_grad}
    # attention temperatures (log-scales), start token, scale and text embeddings, biases, norms: no decay
    for n in ("star.blocks.0.attn.scale_mul_1H11", "star.blocks.0.cross_attn.scale_mul_1H11",
              "star.pos_start", "star.lvl_embed.weight", "star.blocks.0.attn.q_bias",
              "star.head_logits.bias", "text_encoder.embeddings.token_embedding.weight",
              "text_encoder.embeddings.position_embedding.weight", "text_encoder.final_layer_norm.weight"):
        assert n in kept, n
    for n in ("star.blocks.0.attn.mat_qkv.weight", "star.blocks.0.cross_attn.mat_kv.weight",
              "star.word_embed.weight", "star.head_logits.weight",
              "text_encoder.encoder.layers.0.mlp.fc1.weight"):
        assert n in decayed, n
    # the VQ-VAE stage: convolutions decayed (the Phi refiners too), the codebook and norms not
    decay, no_decay = train.make_optimizer(vae, 1e-3, 0.05).param_groups
    name = {id(p): n for n, p in vae.named_parameters()}
    decayed = {name[id(p)] for p in decay["params"]}
    assert "quantize.quant_resi.qresi_ls.0.weight" in decayed and "quantize.embedding.weight" not in decayed
    assert all(vae.get_parameter(n).ndim == 4 for n in decayed)


# ---------------------------------------------------------------------------------------------------
# 8. nothing trains on the wrong data, nothing destroys a run

def run_copy(reference, out, *names):
    """A run folder holding copies of some of the reference run's files."""
    out.mkdir(parents=True)
    for name in names:
        (out / name).write_bytes((reference / name).read_bytes())
    return out


def test_a_token_pool_made_by_another_configuration_is_never_used(reference, data, tmp_path, capsys):
    def star_stage(out, *extra):
        capsys.readouterr()
        train_in_process(["--out", str(out), "--data", str(data), "--stage", "star", *TINY,
                          "--star-steps", "1", "--warmup", "1", *map(str, extra)])
        return capsys.readouterr().out
    ref_pool = torch.load(reference / "tokens.pt", weights_only=True)
    # the pool of the same VQ-VAE, data, size and seed is used as it is
    out = run_copy(reference, tmp_path / "same", "vae.pt", "tokens.pt")
    assert "tokenizing again" not in star_stage(out)
    assert (out / "tokens.pt").read_bytes() == (reference / "tokens.pt").read_bytes()
    # the VQ-VAE trained again with another seed (after deleting vae.pt and star.pt, as the errors advise):
    # the old pool would pair the new VQ-VAE with tokens of the old one
    out = run_copy(reference, tmp_path / "retrained", "tokens.pt")
    train_in_process(["--out", str(out), "--data", str(data), "--stage", "vae", "--seed", "1", *TINY])
    said = star_stage(out)
    assert f"{out / 'tokens.pt'}: it was made from another VQ-VAE; tokenizing again" in said
    ck = torch.load(out / "vae.pt", weights_only=True)
    vae = VQVAE(VQVAEConfig(**ck["vae_config"]))
    vae.load_state_dict(ck["vae"])
    img, _ = train.ImageFolder(data, 16).batch(64, train.batch_rng(0, 0, 0, stream=3))
    pool = torch.load(out / "tokens.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(pool["idx"].long(), torch.cat(vae.img_to_idx(img), 1))
    assert not torch.equal(pool["idx"], ref_pool["idx"])
    # other data and another --pool size with the same VQ-VAE
    other = write_folder(tmp_path / "other", n=4)
    for txt in other.glob("*.txt"):
        txt.write_text(txt.read_text().replace("square", "block"))
    out = run_copy(reference, tmp_path / "moved", "vae.pt", "tokens.pt")
    said = star_stage(out, "--data", other, "--pool", 32)
    assert f"it was made from other data ({data.resolve()} (8 images, 16px, " in said and "--pool 64" in said
    pool = torch.load(out / "tokens.pt", weights_only=True)
    assert len(pool["idx"]) == len(pool["captions"]) == 32 and all("block" in c for c in pool["captions"])
    # a pool written before pools recorded their origin is made again (same VQ-VAE, data: same tokens)
    out = run_copy(reference, tmp_path / "older", "vae.pt")
    torch.save({"idx": ref_pool["idx"], "captions": ref_pool["captions"]}, out / "tokens.pt")
    assert "it does not record what it was made from" in star_stage(out)
    assert torch.equal(torch.load(out / "tokens.pt", weights_only=True)["idx"], ref_pool["idx"])


def test_a_bare_resume_continues_the_run_with_its_own_settings(reference, data, tmp_path, monkeypatch,
                                                               capsys):
    out = tmp_path / "run"
    lr_at = train.lr_at

    def interrupted(step, total, base, warmup):     # Ctrl-C in STAR step 4 (the only stage of 6 steps)
        if total == STEPS["star"] and step == 3:
            raise KeyboardInterrupt
        return lr_at(step, total, base, warmup)
    monkeypatch.setattr(train, "lr_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(["--out", str(out), "--data", str(data), "--ckpt-every", "2", *TINY])
    monkeypatch.setattr(train, "lr_at", lr_at)
    assert torch.load(out / "star.pt", weights_only=True)["step"] == 2
    # README's command after an interruption, without the run's flags: the run's own data and sizes are used
    capsys.readouterr()
    train_in_process(["--out", str(out), "--resume"])
    said = capsys.readouterr().out
    assert f"vae: already trained to step 8 (--vae-steps 8) in {out / 'vae.pt'}" in said
    assert f"the run in {out} is complete" in said
    want = dict(((s, n), v) for s, n, v in logged_losses(reference))
    assert all(v == want[s, n] for s, n, v in logged_losses(out))
    assert_same_weights(out, reference)
    recorded, used = (torch.load(d / "head.pt", weights_only=True)["args"] for d in (out, reference))
    for args in (recorded, used):
        del args["out"], args["resume"]
    assert recorded == used
    # flags that change the data or the architecture are refused, naming both values; nothing is written
    before = {name: (out / name).read_bytes() for name in CKPTS}
    for flags, fragment in [
        (["--vae-ch", "64", "--vocab-size", "64"],
         "--vocab-size 64 (the run has 16); --vae-ch 64 (the run has 32)"),
        (["--data", "shapes"], f"--data shapes (the run has {data})"),
        (["--patch-nums", "1,2,4", "--resolution", "32"],
         "--resolution 32 (the run works on 16x16 images); --patch-nums 1,2,4 (the run has 1,2)"),
    ]:
        code, err = cli_in_process(["--out", out, "--resume", *flags], monkeypatch, capsys)
        assert_one_line_error(code, err, fragment)
    assert {name: (out / name).read_bytes() for name in CKPTS} == before
    # the same values spelled out, and flags listed as changeable, are fine: two more head steps
    train_in_process(["--out", str(out), "--resume", "--data", str(data), "--head-steps", "6"])
    said = capsys.readouterr().out
    assert "star: already trained to step 6" in said
    assert f"head: trained to step 6; wrote {out / 'head.pt'}" in said
    ck = torch.load(out / "head.pt", weights_only=True)
    assert ck["step"] == 6 and ck["args"]["head_steps"] == 6 and ck["args"]["depth"] == 1
    # the end of the run: resuming once more trains nothing and says so
    head = (out / "head.pt").read_bytes()
    train_in_process(["--out", str(out), "--resume"])
    said = capsys.readouterr().out
    assert "head: already trained to step 6 (--head-steps 6)" in said and "is complete" in said
    assert (out / "head.pt").read_bytes() == head


def test_resume_in_a_folder_without_a_checkpoint_says_that_a_new_run_starts(data, tmp_path, capsys):
    out = tmp_path / "typo"
    train_in_process(["--out", str(out), "--resume", "--data", str(data), "--stage", "vae", *TINY,
                      "--vae-steps", "1", "--warmup", "1"])
    said = capsys.readouterr().out.splitlines()
    assert said[0] == (f"--resume: {out} holds no checkpoint (vae.pt, star.pt or head.pt) to continue; "
                       "starting a new run there")
    assert said[-1] == "stopped after the vae stage as asked (--stage vae); --stage star continues the run"
    assert torch.load(out / "vae.pt", weights_only=True)["step"] == 1


def test_export_never_overwrites_a_checkpoint_nor_leaves_a_temporary_file(reference, tmp_path, monkeypatch,
                                                                          capsys):
    run = run_copy(reference, tmp_path / "run", *CKPTS, "tokens.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    (tmp_path / "link.pt").symlink_to(run / "head.pt")
    elsewhere = run_copy(reference, tmp_path / "elsewhere", "star.pt")
    (elsewhere / "star.pt").rename(elsewhere / "mine.pt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    for dst, fragment in [
        (run / "head.pt", "the destination is the source"),
        (tmp_path / "link.pt", "the destination is the source"),
        (run / "star.pt", "that name is one of the checkpoints of the run"),
        (run / "vae.pt", "that name is one of the checkpoints of the run"),
        (elsewhere / "mine.pt", "holds a resumable training checkpoint (step 6)"),
        (tmp_path / "folder", "is a folder"),
        (tmp_path / "file" / "x.pt", "cannot write there"),
    ]:
        code, err = cli_in_process(["--export", run / "head.pt", dst], monkeypatch, capsys)
        assert_one_line_error(code, err, fragment)
    # a failure in the middle of writing (here a full disk) leaves no temporary file either
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    code, err = cli_in_process(["--export", run / "head.pt", tmp_path / "bundle.pt"], monkeypatch, capsys)
    assert_one_line_error(code, err, "cannot write there (No space left on device)")
    monkeypatch.setattr(torch, "save", save)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "bundle.pt").exists()
    # writing a bundle again over an older bundle is what --export is for
    for _ in range(2):
        train.main(["--export", str(run / "head.pt"), str(tmp_path / "bundle.pt")])
    assert "optimizer" not in torch.load(tmp_path / "bundle.pt", weights_only=True)


def test_help_describes_every_flag_with_its_default():
    p = train.build_parser()
    text = " ".join(p.format_help().split())
    for action in p._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        if action.default is not None and action.default is not False:
            assert f"(default: {action.default})" in text, action.option_strings
    assert "only --stage, --vae-steps, --star-steps, --head-steps, --vae-lr, --lr, --head-lr" in text


def test_a_data_folder_previews_its_own_captions(reference, tmp_path, monkeypatch):
    """metadata.jsonl saved with a byte-order mark (as Windows editors do) is read; previews show its
    captions."""
    root = write_folder(tmp_path / "data", n=4)
    lines = [json.dumps({"file_name": f"img{i}.png", "text": f"my caption {i}"}) for i in range(4)]
    (root / "metadata.jsonl").write_bytes(codecs.BOM_UTF8 + "\n".join(lines).encode())
    out = run_copy(reference, tmp_path / "run", "vae.pt")
    shown, generate = [], train.generate
    monkeypatch.setattr(train, "generate",
                        lambda parts, caps, *a, **k: shown.append(caps) or generate(parts, caps, *a, **k))
    # without the VQ-VAE's size flags: the star stage takes them from vae.pt, and records them
    tiny = [a for i, a in enumerate(TINY) if not {a, TINY[i - 1]} & {"--vocab-size", "--vae-ch"}]
    train_in_process(["--out", str(out), "--data", str(root), "--stage", "star", *tiny, "--star-steps", "1",
                      "--warmup", "1", "--sample-every", "1"])
    assert shown == [[f"my caption {i}" for i in range(4)]]
    assert (out / "star_000001.png").exists()
    args = torch.load(out / "star.pt", weights_only=True)["args"]
    assert (args["vocab_size"], args["vae_ch"]) == (16, 32) and len(tiny) == len(TINY) - 4
