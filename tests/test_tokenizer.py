"""Tests of tokenizer.py: parity with VAR's VQ-VAE on the reference fixtures, then loading, errors,
training."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import FIXTURES, SPEC, need_shared
from tokenizer import VQVAE, VQVAEConfig, phi_index, reconstruction_loss

FIXTURE_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8)


@pytest.fixture(scope="module")
def ref():
    folder = need_shared(FIXTURES / "vqvae")
    vae = VQVAE.from_pretrained(folder / "vae.pth", patch_nums=FIXTURE_PATCH_NUMS)
    images = torch.load(folder / "images.pt", map_location="cpu", weights_only=True)
    expected = torch.load(folder / "expected.pt", map_location="cpu", weights_only=True)
    return vae, images, expected


def tiny_config(**kw):
    # 8px images, 2x downsampling, latent 4x4: fast enough for behaviour tests
    base = dict(vocab_size=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
    return VQVAEConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------
# numbers against the reference fixtures

def test_fixture_encode_matches_reference(ref):
    vae, images, expected = ref
    with torch.no_grad():
        f = vae.img_to_f(images)
    torch.testing.assert_close(f, expected["f_BChw"], atol=1e-4, rtol=1e-4)
    idx_list, f_hat_list = vae.quantize.f_to_idx(f)
    assert len(idx_list) == len(expected["idx_Bl"])
    for si, (got, want) in enumerate(zip(idx_list, expected["idx_Bl"])):
        assert got.dtype == torch.long and torch.equal(got, want), f"index map of scale {si} differs"
    for got, want in zip(f_hat_list, expected["f_hat_per_scale"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for got, want in zip(vae.img_to_idx(images), expected["idx_Bl"]):
        assert torch.equal(got, want)


def test_fixture_decode_and_teacher_forcing_match_reference(ref):
    vae, _, expected = ref
    idx_list = expected["idx_Bl"]
    torch.testing.assert_close(vae.idx_to_var_input(idx_list), expected["idxBl_to_var_input"],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vae.quantize.idx_to_fhat(idx_list), expected["f_hat"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vae.idx_to_img(idx_list), expected["recon"], atol=1e-3, rtol=0)
    per_scale = vae.idx_to_img(idx_list, per_scale=True)
    assert len(per_scale) == len(FIXTURE_PATCH_NUMS)
    keep = expected["progressive_image_indices"]
    torch.testing.assert_close(torch.stack([p[keep] for p in per_scale]), expected["progressive"],
                               atol=1e-3, rtol=0)


def test_fixture_generation_steps_rebuild_f_hat_and_inputs(ref):
    # next_scale_input, fed the ground-truth code vectors, must retrace the encoder's f_hat and
    # produce exactly the teacher-forcing inputs (the transformer sees the same thing in both modes)
    vae, _, expected = ref
    idx_list, B = expected["idx_Bl"], expected["idx_Bl"][0].shape[0]
    f_hat = torch.zeros_like(expected["f_hat"])
    inputs = []
    for si, pn in enumerate(FIXTURE_PATCH_NUMS):
        h_BChw = vae.quantize.embedding(idx_list[si]).transpose(1, 2).reshape(B, -1, pn, pn)
        f_hat, next_BChw = vae.next_scale_input(si, f_hat, h_BChw)
        torch.testing.assert_close(f_hat, expected["f_hat_per_scale"][si], atol=1e-4, rtol=1e-4)
        if si < len(FIXTURE_PATCH_NUMS) - 1:
            assert next_BChw.shape[-1] == FIXTURE_PATCH_NUMS[si + 1]
            inputs.append(next_BChw.flatten(2).transpose(1, 2))
        else:
            assert next_BChw is f_hat
    torch.testing.assert_close(torch.cat(inputs, 1), expected["idxBl_to_var_input"], atol=1e-4, rtol=1e-4)


def test_phi_selection_rule_and_ties():
    manifest = json.loads(need_shared(SPEC / "vqvae_ch160.json").read_text())["config"]
    np.testing.assert_array_equal(np.linspace(1 / 12, 1 - 1 / 12, 4), manifest["phi_ticks_float64"])
    for name, table in manifest["phi_index_per_scale"].items():
        SN = len(table)
        assert [phi_index(si, SN, 4) for si in range(SN)] == table, name
    # the exact ties of the spec: equidistant in exact arithmetic, decided by float64 rounding
    assert phi_index(2, 10, 4) == 1 and phi_index(7, 10, 4) == 3 and phi_index(3, 7, 4) == 2
    assert [phi_index(si, 7, 4) for si in range(7)] == [0, 0, 1, 2, 2, 3, 3]
    assert VQVAE(tiny_config(patch_nums=FIXTURE_PATCH_NUMS)).quantize.phi_idx == (0, 0, 1, 2, 2, 3, 3)
    assert phi_index(0, 1, 4) == 0 and {phi_index(si, 5, 1) for si in range(5)} == {0}


def test_ch160_config_has_the_released_keys_and_shapes():
    manifest = json.loads(need_shared(SPEC / "vqvae_ch160.json").read_text())
    with torch.device("meta"):
        vae = VQVAE(VQVAEConfig())
    got = {k: list(v.shape) for k, v in vae.state_dict().items()}
    want = dict(manifest["params"])
    assert manifest["persistent_buffers"] == ["quantize.ema_vocab_hit_SV"]
    assert got.pop("quantize.ema_vocab_hit_SV") == [10, 4096]
    want.pop("quantize.ema_vocab_hit_SV", None)
    assert got == want
    assert sum(p.numel() for p in vae.parameters()) == manifest["total_params"]
    assert VQVAEConfig().downsample == 16 and VQVAEConfig().image_size == 256


def test_norm_groups_reach_every_groupnorm_and_default_to_vars_32():
    vae = VQVAE(tiny_config(norm_groups=8))
    groups = {m.num_groups for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8}
    # a config saved before the field existed (dict without it) is VAR's layout
    old = {k: v for k, v in dataclasses.asdict(tiny_config()).items() if k != "norm_groups"}
    norms = [m for m in VQVAE(VQVAEConfig(**old)).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert {m.num_groups for m in norms} == {32}
    # same keys and shapes either way: the groups change the arithmetic, not the weights
    ref = VQVAE(tiny_config()).state_dict()
    assert {k: v.shape for k, v in vae.state_dict().items()} == {k: v.shape for k, v in ref.items()}
    var = VQVAE(tiny_config())
    var.load_state_dict(ref)
    vae.load_state_dict(ref)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert (vae.img_to_f(x) - var.img_to_f(x)).abs().max() > 1e-3


def test_nearest_code_takes_first_index_on_ties():
    vae = VQVAE(tiny_config(vocab_size=4))
    with torch.no_grad():
        vae.quantize.embedding.weight.copy_(torch.tensor([[2.0] * 32, [1.0] * 32, [1.0] * 32, [0.0] * 32]))
    z = torch.stack([torch.full((32,), 1.0), torch.full((32,), 0.5), torch.full((32,), -3.0)])
    assert vae.quantize.nearest_code(z).tolist() == [1, 1, 3]  # 0.5 is as far from code 1 as from code 3


# ---------------------------------------------------------------------------------------------------
# loading

def test_from_pretrained_infers_config_and_accepts_other_usage_rows(tmp_path):
    cfg = VQVAEConfig(vocab_size=48, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                      patch_nums=(1, 2, 4), share_quant_resi=4)
    vae = VQVAE(cfg).eval()
    state = vae.state_dict()
    state["quantize.ema_vocab_hit_SV"] = torch.rand(10, 48)  # saved by a model with 10 scales
    torch.save(state, tmp_path / "vae.pth")
    loaded = VQVAE.from_pretrained(tmp_path / "vae.pth", patch_nums=(1, 2, 4))
    assert loaded.config == cfg
    assert loaded.quantize.ema_vocab_hit_SV.shape == (3, 48)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    for a, b in zip(vae.img_to_idx(img), loaded.img_to_idx(img)):
        assert torch.equal(a, b)
    assert VQVAE.from_pretrained(state, patch_nums=(1, 2, 4)).config == cfg  # a loaded state dict works too


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        VQVAE.from_pretrained(tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="torch.load"):
        VQVAE.from_pretrained(tmp_path / "garbage.pth")
    state = VQVAE(tiny_config()).state_dict()
    torch.save({"trainer": state}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="not a VQ-VAE state dict.*trainer"):
        VQVAE.from_pretrained(tmp_path / "wrapped.pth")
    bad = dict(state)
    bad["quantize.quant_resi.qresi_ls.1.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(ValueError, match=r"qresi_ls\.1\.weight: file \(32, 32, 1, 1\)"):
        VQVAE.from_pretrained(bad, patch_nums=(1, 2, 4))
    missing = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(ValueError, match="missing.*decoder.conv_out.bias"):
        VQVAE.from_pretrained(missing, patch_nums=(1, 2, 4))
    with pytest.raises(ValueError, match="unexpected.*extra"):
        VQVAE.from_pretrained({**state, "extra.weight": torch.zeros(1)}, patch_nums=(1, 2, 4))


# ---------------------------------------------------------------------------------------------------
# user mistakes get a clear error

def test_image_errors():
    vae = VQVAE(tiny_config())  # 8x8 images
    ok = torch.zeros(1, 3, 8, 8)
    vae.img_to_idx(ok)
    vae.img_to_idx(ok + 1.0005)  # a little rounding above 1 is tolerated
    with pytest.raises(ValueError, match="square"):
        vae.img_to_idx(torch.zeros(1, 3, 8, 16))
    with pytest.raises(ValueError, match="expected 8x8 images.*got 16x16.*patch_nums ending in 8"):
        vae.img_to_idx(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[-1, 1\], got \[0, 255\]"):
        vae.img_to_idx(torch.full((1, 3, 8, 8), 255.0).index_fill_(2, torch.tensor([0]), 0.0))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vae(ok - 1.5)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.img_to_idx(torch.zeros(3, 8, 8))


def test_patch_nums_errors():
    vae = VQVAE(tiny_config())  # latent 4x4, patch_nums (1, 2, 4)
    with pytest.raises(ValueError, match="last patch number is 4"):
        vae.quantize.f_to_idx(torch.zeros(1, 32, 5, 5))
    with pytest.raises(ValueError, match="strictly increasing"):
        tiny_config(patch_nums=(1, 4, 2))
    with pytest.raises(ValueError, match="multiple of norm_groups=32"):
        tiny_config(ch=48)
    with pytest.raises(ValueError, match="multiple of norm_groups=5"):
        tiny_config(norm_groups=5)
    idx = vae.img_to_idx(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="expected 3 index maps"):
        vae.idx_to_img(idx[:2])
    with pytest.raises(ValueError, match=r"idx_list\[1\]: expected \(B, 4\)"):
        vae.idx_to_var_input([idx[0], idx[2], idx[2]])
    with pytest.raises(ValueError, match=r"idx_list\[2\]: token ids must lie in \[0, 32\)"):
        vae.idx_to_img([idx[0], idx[1], idx[2] + 32])
    with pytest.raises(ValueError, match="scale 1"):
        vae.next_scale_input(1, torch.zeros(2, 32, 4, 4), torch.zeros(2, 32, 4, 4))


# ---------------------------------------------------------------------------------------------------
# training

PALETTE = torch.tensor([[220, 40, 40], [40, 180, 60], [40, 80, 220], [240, 220, 40], [150, 60, 200],
                        [245, 140, 30]]) / 127.5 - 1
BACKGROUNDS = torch.tensor([[255, 255, 255], [0, 0, 0], [128, 128, 128]]) / 127.5 - 1


def make_images(n, side, g):
    """n images (n, 3, side, side) in [-1, 1]: one coloured square or disc of random size and place."""
    img = BACKGROUNDS[torch.randint(3, (n,), generator=g)][:, :, None, None].repeat(1, 1, side, side)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    for i in range(n):
        s = int(torch.randint(4, side // 2 + 2, (), generator=g))
        y0, x0 = torch.randint(0, side - s + 1, (2,), generator=g).tolist()
        if torch.rand((), generator=g) < 0.5:
            inside = (ys >= y0) & (ys < y0 + s) & (xs >= x0) & (xs < x0 + s)
        else:
            c = (s - 1) / 2
            inside = (ys - y0 - c) ** 2 + (xs - x0 - c) ** 2 <= (s / 2) ** 2
        img[i][:, inside] = PALETTE[torch.randint(6, (), generator=g)][:, None]
    return img


def test_reconstruction_loss():
    img = make_images(2, 16, torch.Generator().manual_seed(0))
    assert reconstruction_loss(img, img).item() == 0
    shifted = img.roll(1, dims=-1)
    plain = reconstruction_loss(shifted, img, edge_weight=0)
    d = shifted - img
    torch.testing.assert_close(plain, d.abs().mean() + d.square().mean())
    assert reconstruction_loss(shifted, img).item() > plain.item()


def test_reseed_replaces_only_dead_codes():
    g = torch.Generator().manual_seed(0)
    vae = VQVAE(tiny_config(vocab_size=256))  # 8 images have only 8 * 21 tokens: some codes stay unused
    img = make_images(8, 8, g)
    vae.init_codebook(img, generator=g)
    assert vae.quantize.codebook_usage() == 0  # counters start afresh
    vae(img)
    used = vae.quantize.code_hits_V > 0
    before = vae.quantize.embedding.weight.detach().clone()
    n = vae.reseed_dead_codes(img, generator=g)
    after = vae.quantize.embedding.weight.detach()
    assert n == int((~used).sum()) > 0
    assert torch.equal(after[used], before[used])
    assert not torch.isclose(after[~used], before[~used]).all(1).any()
    assert vae.quantize.code_hits_V.sum() == 0


def test_training_lowers_error_and_uses_the_codebook():
    # 16px shapes, 4x downsampling, scales (1, 2, 4) = 21 tokens, 64 codes, batch 16: ~15 s on 2 idle cores
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = VQVAEConfig(vocab_size=64, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
    vae = VQVAE(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0)
    held_out = make_images(64, 16, torch.Generator().manual_seed(123))

    def quantized_mse():
        return (vae.idx_to_img(vae.img_to_idx(held_out)) - held_out).square().mean().item()

    steps, warmup = 300, 90
    mse_untrained = quantized_mse()
    for step in range(steps):
        img = make_images(16, 16, g)
        if step == warmup:
            vae.init_codebook(make_images(128, 16, g), generator=g)
            mse_after_init = quantized_mse()
        recon, vq_loss, usage = vae(img, quantize=step >= warmup)
        assert usage.shape == (3,) and (vq_loss == 0) == (step < warmup)
        loss = reconstruction_loss(recon, img) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= warmup and (step - warmup) % 25 == 24:
            vae.reseed_dead_codes(img, generator=g)
    mse_final = quantized_mse()
    used = torch.cat(vae.img_to_idx(held_out), 1).unique().numel() / cfg.vocab_size
    # quantized reconstruction error must fall well below both the untrained model's and the one right
    # after the codebook was initialised (so the quantized stage itself learns)
    assert mse_final < 0.5 * mse_after_init and mse_after_init < mse_untrained, \
        (mse_untrained, mse_after_init, mse_final)
    # 64 held-out images give 1344 token positions, so every code could be hit; a collapsed codebook (the
    # usual failure of VQ training without re-seeding) uses a handful. Half the codebook in use means the
    # shared codes really serve the scales.
    assert used >= 0.5, used
