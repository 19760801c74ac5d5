"""Tests for bench.py: the analytic FLOP counts against torch's own count of the same run, then the
command end to end on a CPU (demo size, one timed call): text and JSON output, training, checkpoints."""
import json
import os
from pathlib import Path
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
from conftest import assert_user_error, run_in_process, run_script
from star import STAR
from tokenizer import VQVAE

FAST = ["--preset", "demo", "--device", "cpu", "--warmup", "0", "--iters", "1", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    vae = VQVAE(bench.DEMO_VAE).eval()
    return STAR(bench.DEMO_STAR, vae).eval(), vae


def counted_flops(fn):
    """torch's FLOP count of fn: every mm/addmm/bmm/conv. The math attention kernel runs the scores as
    bmm, so they are counted too (the fused CPU kernel is not known to FlopCounterMode)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()

# ---------------------------------------------------------------- FLOP counts


@pytest.mark.parametrize("mode", ["per_row", "batch_of_one"])
@pytest.mark.parametrize("stable", [False, True])
def test_generation_flops_match_torch_count(demo, mode, stable):
    """Both counts take 2 FLOPs per multiply-add of every matmul, attention score and conv and nothing
    else (norms, softmax, sampling, resizing are left out by both), so they agree exactly: every
    linear layer, the KV-cache attention, the cross-attention, the head passes and the VQ decode."""
    model, vae = demo
    model.config = config = replace(bench.DEMO_STAR, cross_attn_mode=mode)
    g = torch.Generator().manual_seed(0)
    prompts = bench.random_text(config, 2, "cpu", torch.float32, g)
    empty = bench.random_text(config, 1, "cpu", torch.float32, g)
    got = counted_flops(lambda: model.generate(*prompts, *empty, generator=g, stable=stable, top_k=10))
    parts = bench.generation_flops(config, bench.DEMO_VAE, stable)
    assert got == 2 * sum(parts.values())                                   # 2 images
    assert (parts["head"] > 0) == stable and all(v > 0 for k, v in parts.items() if k != "head")
    model.config = bench.DEMO_STAR
    assert counted_flops(lambda: vae.fhat_to_img(torch.randn(1, 32, 8, 8))) == \
        bench.vq_decode_flops(bench.DEMO_VAE) - 6 * bench.conv_flops(32, 32, 3, 8)  # less the Phi of 6 scales


def test_train_flops_close_to_torch_count(demo):
    """Training counts 3x the forward (the usual convention: backward = 2 matmuls per forward matmul).
    The real backward skips the input gradients of the first layer and of the text keys/values (their
    inputs need no gradient), about 2% of the total at this size: 5% tolerance."""
    model, _ = demo
    config, B = bench.DEMO_STAR, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, config.seq_len - 1, config.vae_dim, generator=g)
    text = bench.random_text(config, B, "cpu", torch.float32, g)
    targets = torch.randint(0, config.vocab_size, (B, config.seq_len), generator=g)
    model.train()
    got = counted_flops(lambda: model.loss(x, *text, targets).backward())
    model.eval().zero_grad(set_to_none=True)
    want = B * bench.train_flops(config)
    assert want > got and abs(want - got) / got < 0.05, (want, got)

# ---------------------------------------------------------------- the command


def test_demo_generation_prints_every_figure(capsys):
    bench.main(FAST)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("demo:") and "cpu" in lines[0] and "float32" in lines[0]
    assert [l.split(":")[0] for l in lines[1::2]] == ["generate without the sampler head",
                                                      "generate with the sampler head"]
    for line in lines[1::2]:
        for field in ("ms/image", "images/s", "peak memory", "GFLOP/image", "trunk_linear", "self_attention",
                      "cross_attention", "head", "vq_decode", "TFLOP/s"):
            assert field in line
        assert "% of" not in line                                            # no known peak on a CPU
    for line in lines[2::2]:                                                 # 6 scales and the decode
        assert line.startswith("  per scale (ms, operator calls; one batch): 1x1 ")
        assert line.count(" ms ") == 7 and ", decode " in line


def test_json_output_and_utilisation(capsys):
    bench.main(FAST + ["--no-stable", "--batch-size", "2", "--json", "--peak-tflops", "1.5"])
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "demo" and out["device"] == "cpu" and out["dtype"] == "float32"
    assert out["peak_tflops"] == 1.5
    (r,) = out["results"]
    assert r["mode"] == "generate" and r["stable"] is False and r["batch_size"] == 2
    assert r["latency_s"] > 0 and r["images_per_s"] == pytest.approx(2 / r["latency_s"])
    assert r["s_per_image"] == pytest.approx(r["latency_s"] / 2) and r["peak_memory_gib"] > 0
    assert r["flops_per_image"] == sum(bench.generation_flops(bench.DEMO_STAR, bench.DEMO_VAE).values())
    assert r["utilisation"] == pytest.approx(r["flops_per_image"] * 2 / r["latency_s"] / 1.5e12)
    assert r["sampling"] == bench.SHAPES_SAMPLING
    # per scale: every scale runs the same blocks, so the same number of ops (the last has no next input)
    assert [s["scale"] for s in r["scales"]] == ["1x1", "2x2", "3x3", "4x4", "6x6", "8x8", "decode"]
    assert all(s["ms"] > 0 for s in r["scales"])
    assert sum(s["ms"] for s in r["scales"]) < 3 * r["latency_s"] * 1e3
    ops = [s["ops"] for s in r["scales"]]
    assert len(set(ops[:-2])) == 1 and 0 < ops[-2] < ops[0] and ops[0] > 100 * bench.DEMO_STAR.depth // 4


def test_train_mode(capsys):
    bench.main(FAST + ["--train", "--batch-size", "2", "--json"])
    (r,) = json.loads(capsys.readouterr().out)["results"]
    assert r["mode"] == "train" and r["step_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(2 * bench.DEMO_STAR.seq_len / r["step_s"])
    assert r["flops_per_step"] == 2 * bench.train_flops(bench.DEMO_STAR)


def test_checkpoint_and_errors(demo, tmp_path, capsys):
    """A train.py checkpoint (fp16 weights as exported) is measured with its own sampling settings."""
    model, vae = demo
    half = lambda sd: {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    ck = {"format": "star-pipeline", "stage": "head",
          "vae_config": vars(vae.config), "vae": half(vae.state_dict()),
          "star_config": vars(model.config), "star": half(model.state_dict()),
          "sampling": dict(cfg=3.0, top_k=5, top_p=0.0)}
    torch.save(ck, tmp_path / "shapes.pt")
    bench.main(["--ckpt", str(tmp_path / "shapes.pt")] + FAST[2:] + ["--stable", "--top-k", "7", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "shapes.pt" and [r["stable"] for r in out["results"]] == [True]
    assert out["results"][0]["sampling"] == dict(cfg=3.0, top_k=7, top_p=0.0)
    assert "not found" in bench.bench_sample_command("a red circle", 1, tmp_path / "no-such.pt")["skipped"]

# ---------------------------------------------------------------- bad inputs: one line, exit code 2


def test_bad_inputs_catalogue(demo, tmp_path, capsys):
    """Every mistake is one 'error:' line and exit code 2 (in this process through cli.run_command, as the
    script runs main), and nothing runs that a file holds."""
    from test_sample import build_tiny_checkpoint, hostile_pickle
    good = build_tiny_checkpoint(tmp_path / "good.pt")
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:5000])
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (tmp_path / "notes.txt").write_text("not weights\n")
    marker = tmp_path / "PWNED"
    cases = [
        (["--ckpt", tmp_path / "image.png"], "image.png is not a plain weights file"),
        (["--ckpt", tmp_path / "notes.txt"], "notes.txt is not a plain weights file"),
        (["--ckpt", tmp_path / "trunc.pt"], "trunc.pt could not be read", "truncated"),
        (["--ckpt", hostile_pickle(tmp_path / "evil.pt", marker)], "evil.pt is not a plain weights file"),
        (["--ckpt", hostile_pickle(tmp_path / "evil.pkl", marker, zip_format=False)],
         "not a plain weights file"),
        (["--ckpt", build_tiny_checkpoint(tmp_path / "vae.pt", stage="vae")],
         "holds a 'vae' checkpoint", "star or head stage"),
        (["--ckpt", tmp_path / "missing.pt"], "--ckpt", "missing.pt: no such file"),
        (["--ckpt", tmp_path], "no such file"),
        (["--ckpt", good, "--preset", "star-256-d16"], "either --preset or --ckpt"),
        (["--threads", "0"], "--threads 0: expected a number of threads >= 1"),
        (["--threads", "-1"], "--threads -1: expected"),
        (["--threads", "two"], "--threads two: expected"),
        (["--batch-size", "0"], "--batch-size 0: expected a positive integer"),
        (["--iters", "0"], "--iters 0: expected a positive integer"),
        (["--warmup", "-1"], "--warmup -1: expected a whole number >= 0"),
        (["--cfg", "inf"], "--cfg inf: expected a number in [0, 100]"),
        (["--cfg", "1e30"], "--cfg 1e30: expected a number in [0, 100]"),
        (["--top-k", "1e3"], "--top-k 1e3: expected a whole number >= 0"),
        (["--top-p", "nan"], "--top-p nan: expected a number in [0, 1]"),
        (["--peak-tflops", "0"], "--peak-tflops 0: expected a number in (0, 1e+06]"),
        (["--preset", "star-2048"], "--preset: invalid choice: 'star-2048'"),
        (["--preset", "star-256-d16", "--stable"], "no sampler head"),
        (["--device", "tpu"], "--device: invalid choice"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ]
    for argv, *fragments in cases:
        code, out, err = run_in_process(bench.main, ["--device", "cpu", *argv], capsys)
        assert_user_error(code, err, *fragments)
        assert out == ""
    assert not marker.exists()


def test_bad_inputs_as_a_user_runs_them(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert_user_error(*run_script("bench.py", "--threads", "-1")[::2], "--threads -1: expected")
    assert_user_error(*run_script("bench.py", "--ckpt", tmp_path / "image.png", "--device", "cpu")[::2],
                      "not a plain weights file")


def test_threads_follow_the_model_size_and_busy_runs_a_competitor(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    bench.main(FAST[:-2] + ["--no-stable", "--json", "--busy"])
    out = json.loads(capsys.readouterr().out)
    assert out["threads"] == 1 and out["busy"] is True          # the demo model is small: one thread
    with bench.competing_process(True):
        assert len(spinners()) == 1                                  # one child spinning while timing ...
    assert spinners() == []                                          # ... and gone afterwards


def spinners():
    """This process's children that run the competing loop (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"while True" in cmd:
            found.append(stat.parent.name)
    return found

# ---------------------------------------------------------------- torch.compile


def test_compile_flag_falls_back_to_eager_with_a_note(monkeypatch, capsys):
    def unavailable(self):
        raise RuntimeError("torch.compile is not available here (RuntimeError: no C++ compiler)")
    monkeypatch.setattr(STAR, "compile_decoding", unavailable)
    bench.main(FAST + ["--no-stable", "--json", "--compile"])
    out = capsys.readouterr()
    assert out.err.splitlines()[0] == ("note: torch.compile is not available here "
                                       "(RuntimeError: no C++ compiler); measuring eager generation")
    assert json.loads(out.out)["compile"] is False


@pytest.mark.slow
def test_compiled_decoding_gives_the_bundled_models_tokens(request):
    """The bundled model with its own sampling settings (top-k 5), seeded, with and without the sampler
    head: inductor's kernels (what --compile runs) draw the same tokens as eager generation."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("compiles for minutes on a CPU; run with -m slow")
    from sample import DEFAULT_CKPT, load_pipeline
    if not DEFAULT_CKPT.is_file():
        pytest.skip(f"{DEFAULT_CKPT} not there")
    pipe = load_pipeline(DEFAULT_CKPT)
    text = pipe.encode(["a large red circle on the left", "a blue square above a green triangle"])
    empty = pipe.encode([""])

    def run(stable, seed):
        return pipe.star.generate(*text, *empty, generator=torch.Generator().manual_seed(seed), stable=stable,
                                  return_indices=True, **pipe.sampling)[1]
    eager = {(stable, seed): run(stable, seed) for stable in (False, True) for seed in (0, 1)}
    torch._dynamo.reset()
    pipe.star.compile_decoding()
    for (stable, seed), idx in eager.items():
        assert all(torch.equal(a, b) for a, b in zip(idx, run(stable, seed))), (stable, seed)
