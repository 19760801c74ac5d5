"""
Benchmark of STAR (star.py): generation latency, throughput, peak memory, FLOPs and the achieved
fraction of the device's peak; with --train, training steps (tokens/s and utilisation).

The model is a named preset of star.py with random weights built on the device (no download; the
presets run with VAR's ch160 VQ-VAE of tokenizer.py, random too), the small model of the bundled demo
(--preset demo: the configs of train.py's default run, 64px), or a checkpoint of train.py (--ckpt).
Generation is STAR.generate from text states to decoded images with classifier-free guidance (both
guidance rows in one batch), timed after warm-up with the device synchronised. The text encoder
(clip_text.py) is not timed; random text states stand in for it. FLOPs are counted analytically
(`generation_flops`, `train_flops`: 2 per multiply-add of every matmul, attention score and conv).

    python bench.py --preset demo --device cpu                       # the bundled model's size, on a CPU
    python bench.py --preset star-1024-sampler                       # one GPU, bf16: with, without the head
    python bench.py --preset star-1024-d30 --batch-size 4 --compile  # compiled decoding steps
    python bench.py --preset star-256-d16 --train --batch-size 32    # training steps, bf16 autocast
    python bench.py --ckpt checkpoints/shapes.pt --sample-prompt "a red circle" --json
"""
import argparse
import bisect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

import cli
import train
from star import PRESETS, STAR, STARConfig
from tokenizer import VQVAE, VQVAEConfig
from weights import RELEASED_SAMPLING, SHAPES_SAMPLING, read_weights

TEXT_LEN = 77  # CLIP's context: cross-attention always runs over all 77 states (padding is masked)

# -----------------------------------------------------------------------------
# the models to measure

# The bundled demo: the models of train.py's default run (64px, 6 scales, STAR depth 4 width 128 with the
# sampler head from scale 4, a ch32 VQ-VAE with 512 codes, a text encoder of width 128), made by train.py's
# own config builders from its flags' defaults, so that the two cannot drift apart.
_TRAIN_DEFAULTS = train.build_parser().parse_args([])
DEMO_VAE = train.default_vae_config(_TRAIN_DEFAULTS)
DEMO_STAR = train.default_star_config(_TRAIN_DEFAULTS, _TRAIN_DEFAULTS.text_width, DEMO_VAE)

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, by a substring of the device name.
PEAK_TFLOPS_16BIT = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def configs(preset):
    """(STARConfig, VQVAEConfig) of a preset: the released models use VAR's ch160 VQ-VAE at their scales."""
    if preset == "demo":
        return DEMO_STAR, DEMO_VAE
    star_config = STARConfig.preset(preset)
    return star_config, VQVAEConfig(vocab_size=star_config.vocab_size, patch_nums=star_config.patch_nums)


def check_stable(args, config, name):
    if args.stable and not config.head:
        raise ValueError(f"--stable: {name} has no sampler head; "
                         "use --preset star-1024-sampler or a head checkpoint")


def build(args, device, dtype):
    """-> (model with its VQ-VAE, name, sampling settings). Weights in `dtype`, the VQ-VAE in float32."""
    if args.ckpt:
        path = Path(args.ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt {path}: no such file; pass a checkpoint written by train.py")
        ck = read_weights(path, "--ckpt")        # one line for text files, truncated files, pickled code
        if not (isinstance(ck, dict) and "vae_config" in ck and "star" in ck):
            stage = f" holds a '{ck['stage']}' checkpoint:" if isinstance(ck, dict) and "stage" in ck else ":"
            raise ValueError(f"--ckpt {path}{stage} expected a train.py checkpoint of the star or head stage "
                             "(with 'vae_config', 'vae' and 'star'); use --preset for random weights")
        vae = VQVAE(VQVAEConfig(**ck["vae_config"]))
        vae.load_state_dict({k: v.float() for k, v in ck["vae"].items()})
        model = STAR.from_pretrained(ck, vae)           # the checkpoint's own star_config
        name, sampling = path.name, dict(ck.get("sampling", RELEASED_SAMPLING))
        check_stable(args, model.config, name)
    else:
        star_config, vae_config = configs(args.preset)
        check_stable(args, star_config, args.preset)   # before spending time on building the model
        with torch.device(device):  # random weights initialised where they run: no copy of 2B floats
            vae = VQVAE(vae_config)
            model = STAR(star_config, vae)
        name, sampling = args.preset, dict(SHAPES_SAMPLING if args.preset == "demo" else RELEASED_SAMPLING)
    vae.to(device).eval()
    model.to(device, dtype).eval()
    overrides = (("cfg", args.cfg), ("top_k", args.top_k), ("top_p", args.top_p))
    sampling.update({k: v for k, v in overrides if v is not None})
    return model, name, sampling

# -----------------------------------------------------------------------------
# FLOPs, counted from the configs (2 FLOPs per multiply-add)


def block_flops(C, hidden, l, keys, rows):
    """One self-attention + FFN block on `rows` rows of l tokens that attend to `keys` keys."""
    linear = rows * 2 * l * C * (3 * C + C + 2 * hidden)  # qkv, proj, fc1 + fc2
    attention = rows * 2 * 2 * l * keys * C               # q k^T and att v over all heads
    return linear, attention


def generation_flops(config, vae_config, stable=False, text_len=TEXT_LEN):
    """FLOPs to generate one image with guidance (2 rows: conditional and unconditional), by part.

    trunk_linear: every linear layer of the trunk's blocks, the start token, the input embedding and the
      output layer at every scale (the output layer is skipped at the last scale under stable sampling);
    self_attention: scores and weighted sums of each scale against the KV cache (all coarser scales);
    cross_attention: the text keys/values (once per generation), queries, output projection and scores
      over the 77 text states; in 'batch_of_one' mode only the conditional row runs it;
    head: the sampler head's passes (1 + pn*pn tokens, bidirectional) at every non-trunk commit step;
    vq_decode: the Phi convs of every scale and the VQ-VAE decoder's convs and attention.
    """
    C, D, V, Cv = config.width, config.text_dim, config.vocab_size, config.vae_dim
    hidden, N = round(C * config.mlp_ratio), 2
    cross_rows = 1 if config.cross_attn_mode == "batch_of_one" else N
    K = len(config.patch_nums)
    f = dict(trunk_linear=0, self_attention=0, cross_attention=0, head=0, vq_decode=0)
    f["trunk_linear"] += N * 2 * D * C                                     # start token (pooled text)
    f["cross_attention"] += config.depth * cross_rows * 2 * text_len * D * 2 * C  # text keys and values
    end = 0
    for si, pn in enumerate(config.patch_nums):
        l = pn * pn
        end += l
        linear, attention = block_flops(C, hidden, l, end, N)
        f["trunk_linear"] += config.depth * linear
        f["self_attention"] += config.depth * attention
        f["cross_attention"] += config.depth * cross_rows * (2 * l * C * 2 * C + 2 * 2 * l * text_len * C)
        if si > 0:
            f["trunk_linear"] += 2 * l * Cv * C                             # word_embed, once per prompt
        last = si == K - 1
        if stable and si >= config.sample_from_idx:
            steps = config.stable_steps_last if last else config.stable_steps
            trunk_steps = 0 if last else config.stable_trunk_steps
            if trunk_steps:
                f["trunk_linear"] += N * 2 * l * C * V
            lh = 1 + l                                                      # text token + the scale
            per_pass = N * (2 * D * C + 2 * l * Cv * C + 2 * lh * 2 * C * C + 2 * lh * C * V)
            for _ in range(config.head_depth):
                linear, attention = block_flops(C, hidden, lh, lh, N)
                per_pass += linear + attention
            f["head"] += (steps - trunk_steps) * per_pass
        else:
            f["trunk_linear"] += N * 2 * l * C * V                          # output layer
    f["vq_decode"] = vq_decode_flops(vae_config)
    return f


def conv_flops(c_in, c_out, k, side):
    return 2 * c_in * c_out * k * k * side * side


def vq_decode_flops(vae_config):
    """Phi convs of every scale (at the latent side), post_quant_conv and the decoder, for one image."""
    cfg, s = vae_config, vae_config.patch_nums[-1]
    z, widths = cfg.z_channels, [cfg.ch * m for m in cfg.ch_mult]
    total = len(cfg.patch_nums) * conv_flops(z, z, 3, s) + conv_flops(z, z, 3, s)  # Phi, post_quant_conv

    def resnet(c_in, c_out, side):
        return (conv_flops(c_in, c_out, 3, side) + conv_flops(c_out, c_out, 3, side)
                + (conv_flops(c_in, c_out, 1, side) if c_in != c_out else 0))

    def attn(c, side):  # 1x1 qkv and proj convs, one head over side*side positions
        return conv_flops(c, 4 * c, 1, side) + 2 * 2 * (side * side) ** 2 * c

    c = widths[-1]
    total += conv_flops(z, c, 3, s) + 2 * resnet(c, c, s) + attn(c, s)       # conv_in, middle
    for i in reversed(range(len(widths))):                                 # lowest resolution first
        for _ in range(cfg.num_res_blocks + 1):
            total += resnet(c, widths[i], s) + (attn(widths[i], s) if i == len(widths) - 1 else 0)
            c = widths[i]
        if i != 0:
            s *= 2
            total += conv_flops(c, c, 3, s)                                # upsample conv
    return total + conv_flops(c, 3, 3, s)                                  # conv_out


def train_flops(config, text_len=TEXT_LEN):
    """FLOPs of one teacher-forced training sample of the trunk, forward and backward (3x forward).

    Attention is counted over the full L x L scores: the block-causal mask is applied by masking, so
    the attention kernels compute every score (the same convention as counting causal attention in full).
    """
    C, D, V, L = config.width, config.text_dim, config.vocab_size, config.seq_len
    linear, attention = block_flops(C, round(C * config.mlp_ratio), L, L, 1)
    cross = 2 * text_len * D * 2 * C + 2 * L * C * 2 * C + 2 * 2 * L * text_len * C
    forward = (config.depth * (linear + attention + cross)
               + 2 * D * C + 2 * (L - 1) * config.vae_dim * C + 2 * L * C * V)
    return 3 * forward

# -----------------------------------------------------------------------------
# timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    """Peak memory allocated by torch on a GPU; on the CPU the process's peak resident set (all of it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if platform.system() == "Darwin" else 2**20)


def peak_tflops(args, device, dtype):
    """--peak-tflops, else the dense 16-bit peak of a known GPU, else None (utilisation not reported)."""
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS_16BIT.items() if k in name), None)
    return None


def timed(fn, device, warmup, iters):
    """Seconds of each of `iters` calls of fn after `warmup` calls, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def random_text(config, rows, device, dtype, generator):
    """Stand-ins for the text encoder's outputs: states (rows, 77, D), mask (12 real tokens), pooled."""
    hidden = torch.randn(rows, TEXT_LEN, config.text_dim, generator=generator).to(device, dtype)
    mask = torch.zeros(rows, TEXT_LEN, dtype=torch.long)
    mask[:, :12] = 1
    pooled = torch.randn(rows, config.text_dim, generator=generator).to(device, dtype)
    return hidden, mask.to(device), pooled


# -----------------------------------------------------------------------------
# per scale: time and op counts (where a small model's time goes at batch 1)

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
            "cudaGraphLaunch")


@contextmanager
def scale_marks(model, on_mark):
    """Call on_mark(si) where scale si of STAR.generate begins (its trunk_step) and on_mark('decode') where
    the VQ-VAE decoder begins; compiled or not, the model's steps run as they are."""
    patched = [(model, "trunk_step"), (model.vae, "fhat_to_img")]
    saved = [(obj, name, obj.__dict__.get(name), getattr(obj, name)) for obj, name in patched]

    def marked(fn, label=None):
        def call(*a, **kw):
            on_mark(a[0] if label is None else label)
            return fn(*a, **kw)
        return call

    model.trunk_step = marked(saved[0][3])
    model.vae.fhat_to_img = marked(saved[1][3], "decode")
    try:
        yield
    finally:
        for obj, name, own, _ in saved:      # back to the method, or to the compiled step
            if own is None:
                delattr(obj, name)
            else:
                setattr(obj, name, own)


def is_op(e):
    """A CPU profiler event that is one operator call: an aten op, or a kernel of a compiled graph."""
    return e.name.startswith("aten::") or "cpp_fused" in e.name


def counted(e, device):
    """Kernel launches on CUDA; on a CPU the outermost operator calls (an op that calls others counts
    once)."""
    if device.type == "cuda":
        return e.name in LAUNCHES
    if not is_op(e):
        return False
    parent = e.cpu_parent
    while parent is not None:
        if is_op(parent):
            return False
        parent = parent.cpu_parent
    return True


def scale_breakdown(model, run, device):
    """Per scale of one generation: wall time (ms) and ops (CPU: operator calls; CUDA: kernel launches).

    A scale runs from its trunk step to the next scale's: trunk, output layer or sampler head, the draw and
    the next scale's input; 'decode' is the VQ-VAE decoder. Time comes from a plain run with the device
    synchronised at every mark, ops from a second, profiled run. At batch 1 a small scale costs about its
    op count times the cost of one op: that is the launch-bound part which compiling removes.
    """
    marks = []

    def timed_mark(label):
        sync(device)
        marks.append((label, time.perf_counter()))

    with scale_marks(model, timed_mark):
        run()
        sync(device)
    ends = [t for _, t in marks[1:]] + [time.perf_counter()]

    def profiler_mark(label):
        with torch.profiler.record_function("bench.mark"):
            pass

    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with scale_marks(model, profiler_mark), torch.profiler.profile(activities=activities) as prof:
        run()
    events = prof.events()
    starts = sorted(e.time_range.start for e in events if e.name == "bench.mark")
    ops = [0] * len(starts)
    for e in events:
        if counted(e, device):
            i = bisect.bisect_right(starts, e.time_range.start) - 1
            if i >= 0:
                ops[i] += 1
    sides = model.config.patch_nums
    return [dict(scale="decode" if label == "decode" else f"{sides[label]}x{sides[label]}",
                 ms=(end - t0) * 1e3, ops=n)
            for (label, t0), end, n in zip(marks, ends, ops)]


def bench_generation(model, args, device, dtype, sampling, stable):
    B = args.batch_size
    g = torch.Generator().manual_seed(0)
    prompt = random_text(model.config, B, device, dtype, g)
    empty = random_text(model.config, 1, device, dtype, g)

    def run():
        model.generate(*prompt, *empty, generator=g, stable=stable, **sampling)

    reset_peak_memory(device)
    times = timed(run, device, args.warmup, args.iters)
    latency = statistics.median(times)
    flops = generation_flops(model.config, model.vae.config, stable)
    scales = scale_breakdown(model, run, device)
    return dict(mode="generate", stable=stable, batch_size=B, sampling=sampling, latency_s=latency,
                scales=scales, scale_ops="kernel launches" if device.type == "cuda" else "operator calls",
                s_per_image=latency / B, images_per_s=B / latency, times_s=times,
                peak_memory_gib=peak_memory_gib(device), flops_per_image=sum(flops.values()),
                flops_by_part=flops, achieved_tflops=sum(flops.values()) * B / latency / 1e12)


def bench_training(model, args, device, dtype):
    """Steps of AdamW on the trunk's loss (random inputs); 16-bit dtypes run as autocast on float32
    weights."""
    config, B = model.config, args.batch_size
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, config.seq_len - 1, config.vae_dim, generator=g).to(device)
    text = random_text(config, B, device, torch.float32, g)
    targets = torch.randint(0, config.vocab_size, (B, config.seq_len), generator=g).to(device)
    head = {id(p) for p in model.head_parameters()} if config.head else set()
    trunk = [p for p in model.parameters() if id(p) not in head]   # the head trains later, on a frozen trunk
    opt = torch.optim.AdamW(trunk, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss = model.loss(x, *text, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    times = timed(step, device, args.warmup, args.iters)
    step_s = statistics.median(times)
    flops = train_flops(config) * B
    return dict(mode="train", batch_size=B, step_s=step_s, times_s=times,
                tokens_per_s=B * config.seq_len / step_s, peak_memory_gib=peak_memory_gib(device),
                flops_per_step=flops, achieved_tflops=flops / step_s / 1e12)


def bench_sample_command(prompt, iters, ckpt=None, threads=None):
    """Wall time of the whole `python sample.py --prompt ...` (start-up, loading, encoding, sampling, saving)
    and the generation time it reports, with --ckpt when given, else the bundled checkpoints/shapes.pt;
    threads: its --threads (None: sample.py's own choice)."""
    root = Path(__file__).resolve().parent
    ckpt = Path(ckpt) if ckpt else root / "checkpoints" / "shapes.pt"
    if not (root / "sample.py").is_file() or not ckpt.is_file():
        return dict(mode="sample_command", skipped=f"sample.py or {ckpt} not found")
    times, generation = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(iters):
            cmd = [sys.executable, str(root / "sample.py"), "--ckpt", str(ckpt), "--prompt", prompt,
                   "--out", str(Path(tmp) / f"{i}.png")] + (["--threads", str(threads)] if threads else [])
            t0 = time.perf_counter()
            done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if done.returncode:
                return dict(mode="sample_command", failed=done.stderr.strip().splitlines()[-1:])
            said = re.search(r" in ([0-9.]+)s: .*?(\d+) CPU thread", done.stdout)   # sample.py's summary line
            if said:
                generation.append(float(said.group(1)))
                used = int(said.group(2))
    return dict(mode="sample_command", prompt=prompt, ckpt=str(ckpt), threads=used if generation else threads,
                wall_s=statistics.median(times), times_s=times,
                generation_s=statistics.median(generation) if generation else None)


@contextmanager
def competing_process(enabled):
    """With `enabled`, one other process spinning on a CPU core for the duration of the block: what a machine
    shared with a training run or a compiler looks like to torch's threads."""
    if not enabled:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)                        # let it take its core before the clock starts
        yield
    finally:
        spinner.kill()
        spinner.wait()

# -----------------------------------------------------------------------------
# command line


def describe(r, peak):
    """One human-readable line of a result."""
    if r["mode"] == "sample_command":
        if "wall_s" not in r:
            return f"sample.py: {r.get('skipped') or r.get('failed')}"
        gen = f", {r['generation_s']:.2f} s generating" if r.get("generation_s") is not None else ""
        return (f"python sample.py --prompt ... ({r['ckpt']}, {r['threads']} threads): "
                f"{r['wall_s']:.2f} s wall{gen} "
                f"(median of {len(r['times_s'])})")
    util = f", {100 * r['achieved_tflops'] / peak:.1f}% of {peak:g} TFLOP/s peak" if peak else ""
    if r["mode"] == "train":
        return (f"train: {r['step_s'] * 1e3:.1f} ms/step at batch {r['batch_size']}, "
                f"{r['tokens_per_s']:,.0f} tokens/s, "
                f"peak memory {r['peak_memory_gib']:.2f} GiB, {r['flops_per_step'] / 1e12:.3g} TFLOP/step, "
                f"{r['achieved_tflops']:.3g} TFLOP/s{util}")
    parts = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in r["flops_by_part"].items())
    per_scale = ", ".join(f"{s['scale']} {s['ms']:.1f} ms {s['ops']}" for s in r["scales"])
    return (f"generate {'with' if r['stable'] else 'without'} the sampler head: "
            f"{r['latency_s'] * 1e3:.1f} ms/batch of "
            f"{r['batch_size']}, {r['s_per_image'] * 1e3:.1f} ms/image, {r['images_per_s']:.2f} images/s, "
            f"peak memory {r['peak_memory_gib']:.2f} GiB, {r['flops_per_image'] / 1e9:.4g} GFLOP/image "
            f"({parts}), {r['achieved_tflops']:.3g} TFLOP/s{util}\n"
            f"  per scale (ms, {r['scale_ops']}; one batch): {per_scale}")


def parse_args(argv=None):
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=["demo", *sorted(PRESETS)], metavar="NAME",
                   help="'demo' (the bundled 64px model's size) or a STARConfig preset (star-256-d16, "
                   "star-256-d30, star-512-d30, star-1024-d30, star-1024-sampler); random weights")
    p.add_argument("--ckpt", default=None, help="a train.py checkpoint to measure instead of a preset")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="auto: cuda, mps, cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and activations (the VQ-VAE stays float32); "
                   "auto: bfloat16 on cuda, else float32")
    p.add_argument("--batch-size", type=cli.positive_int, default=1,
                   help="prompts per generate call / samples per training step")
    stable = p.add_mutually_exclusive_group()
    stable.add_argument("--stable", action="store_true", help="only generation with the sampler head")
    stable.add_argument("--no-stable", action="store_true", help="only generation without the sampler head "
                        "(default: both where the model has a head)")
    p.add_argument("--cfg", type=cli.cfg_scale, default=None,
                   help="guidance scale (default: the model's sampling settings)")
    p.add_argument("--top-k", type=cli.top_k, default=None,
                   help="top-k filter (default: the model's sampling settings)")
    p.add_argument("--top-p", type=cli.top_p, default=None,
                   help="top-p filter (default: the model's sampling settings)")
    p.add_argument("--train", action="store_true", help="time training steps instead of generation")
    p.add_argument("--warmup", type=cli.non_negative_int, default=2,
                   help="untimed calls first (and torch.compile's compilation)")
    p.add_argument("--iters", type=cli.positive_int, default=5, help="timed calls; the median is reported")
    p.add_argument("--compile", action="store_true", help="torch.compile the per-scale decoding steps "
                   "(STAR.compile_decoding; with --train: every transformer block); compiles during --warmup")
    p.add_argument("--threads", type=cli.threads, default=None,
                   help="CPU threads for torch, and OMP_NUM_THREADS of the sample.py command "
                   "(default: 1 for a model under 20M parameters, else the cores not busy with other "
                   "processes)")
    p.add_argument("--busy", action="store_true",
                   help="time with one competing CPU-bound process running (a busy machine), "
                   "to compare with idle")
    p.add_argument("--peak-tflops", type=cli.bounded_float(0, 1e6, lo_open=True), default=None,
                   help="the device's peak TFLOP/s for the utilisation figure "
                   "(default: known GPUs in 16-bit)")
    p.add_argument("--sample-prompt", default=None,
                   help="also time the whole `python sample.py --prompt TEXT` command "
                   "(with --ckpt, else the bundled checkpoints/shapes.pt)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    if args.ckpt and args.preset != "demo":
        p.error("give either --preset or --ckpt, not both")
    return args


def main(argv=None):
    """The command line (raises on a user's mistake; run as a script, cli.run_command makes that one line)."""
    args = parse_args(argv)
    device = cli.pick_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else \
        torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (and the VQ decode) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    model, name, sampling = build(args, device, torch.float32 if args.train else dtype)
    threads = cli.set_threads(args.threads, sum(p.numel() for p in model.parameters()))
    if args.compile and args.train:
        for block in list(model.blocks) + list(getattr(model, "feat_extract_blocks", [])):
            block.compile()  # in place: the state_dict keys stay the same
    elif args.compile:
        try:
            model.compile_decoding()
            if device.type == "cpu":  # name the compiled kernels in the profiler, for the per-scale op counts
                torch._inductor.config.cpp.enable_kernel_profile = True
        except RuntimeError as e:
            print(f"note: {e}; measuring eager generation", file=sys.stderr)
            args.compile = False
    peak = peak_tflops(args, device, dtype)
    results = []
    with competing_process(args.busy):
        if args.train:
            results.append(bench_training(model, args, device, dtype))
        else:
            no_head = args.no_stable or not model.config.head
            for stable in [True] if args.stable else [False] if no_head else [False, True]:
                results.append(bench_generation(model, args, device, dtype, sampling, stable))
        if args.sample_prompt:
            results.append(bench_sample_command(args.sample_prompt, args.iters, args.ckpt, args.threads))
    for r in results:
        if peak and "achieved_tflops" in r:
            r["utilisation"] = r["achieved_tflops"] / peak
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    info = dict(model=name, config=asdict(model.config), device=str(device),
                dtype=str(dtype).replace("torch.", ""), device_name=device_name,
                threads=threads, busy=args.busy, torch=torch.__version__, compile=args.compile,
                date=time.strftime("%Y-%m-%d"), peak_tflops=peak,
                params=sum(p.numel() for p in model.parameters()))
    if args.json:
        print(json.dumps(dict(info, results=results)))
        return
    busy = ", one competing process" if args.busy else ""
    compiled = ", compiled" if args.compile else ""
    print(f"{name}: {info['params'] / 1e6:.1f}M parameters, {info['device']} ({info['device_name']}, "
          f"{info['threads']} threads{busy}), {info['dtype']}{compiled}, torch {torch.__version__}")
    for r in results:
        print(describe(r, peak))


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
