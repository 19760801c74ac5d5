"""Tests for star.py: layouts of the released models, parity with the reference fixtures
(teacher forcing, greedy generation, sampler head), then behaviour (batch invariance, KV cache vs
teacher forcing, stable sampling, head training, loading errors)."""
import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import FIXTURES, SPEC, need_shared
from star import PRESETS, STAR, STARConfig, arccos_schedule, free_schedule, keep_masks, rope_2d, sample_tokens

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def fixture_config(folder):
    """STARConfig of a fixture model, from the reference constructor arguments it was built with."""
    kw = json.loads(need_shared(FIXTURES / folder / "config.json").read_text())["VAR_constructor_kwargs"]
    return STARConfig(depth=kw["depth"], width=kw["embed_dim"], num_heads=kw["num_heads"],
                      patch_nums=kw["patch_nums"], text_dim=kw["in_dim_cross"], rope_theta=kw["rope_theta"],
                      rope_norm=kw["rope_norm"], logit_norm=kw["enable_logit_norm"],
                      head=kw["enable_adaptive_norm"], sample_from_idx=kw["sample_from_idx"],
                      cross_attn_mode="batch_of_one")


def load_fixture(folder, vae=None):
    model = STAR.from_pretrained(FIXTURES / folder / "star.pth", vae, config=fixture_config(folder))
    inputs = torch.load(FIXTURES / folder / "inputs.pt", weights_only=True)
    return model, inputs


def logit_summaries(logits, target, vocab_idx):
    return dict(cols=logits[..., vocab_idx], top2=logits.topk(2, -1).values, lse=logits.logsumexp(-1),
                target=logits.gather(-1, target[..., None])[..., 0])


def assert_close(actual, expected, atol=ATOL):
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max |diff| {diff:.3g} > {atol}"

# ---------------------------------------------------------------- layouts of the released models


@pytest.mark.parametrize("preset, manifest", [("star-256-d16", "star_d16_256.json"),
                                              ("star-1024-d30", "star_d30_1024.json"),
                                              ("star-1024-sampler", "star_d30_1024_sampler.json")])
def test_preset_state_dict_matches_manifest(preset, manifest):
    spec = json.loads(need_shared(SPEC / manifest).read_text())
    with torch.device("meta"):
        model = STAR(STARConfig.preset(preset))
    sd = model.state_dict()
    assert list(sd) == list(spec["params"])                              # same keys, same order
    assert {k: list(v.shape) for k, v in sd.items()} == spec["params"]
    assert sum(p.numel() for p in model.parameters()) == spec["total_params"]  # excludes zero_k_bias
    assert sum(v.numel() for v in sd.values()) == spec["total_state_dict_numel"]
    assert sorted(k for k in sd if k.endswith("zero_k_bias")) == sorted(spec["persistent_buffers"])


def test_presets():
    expect = {"star-256-d16": (16, 1024, 680), "star-256-d30": (30, 1920, 680),
              "star-512-d30": (30, 1920, 2240), "star-1024-d30": (30, 1920, 9451),
              "star-1024-sampler": (30, 1920, 9451)}
    for name, (depth, width, L) in expect.items():
        c = STARConfig.preset(name)
        assert (c.depth, c.width, c.num_heads, c.seq_len) == (depth, width, depth, L)
        assert ((c.rope_theta, c.rope_norm, c.logit_norm, c.cross_attn_mode)
                == (10000.0, 64.0, True, "batch_of_one"))
        assert c.head == (name == "star-1024-sampler") and c.sample_from_idx == 9
    with pytest.raises(ValueError, match="unknown STAR preset"):
        STARConfig.preset("star-2048")

# ---------------------------------------------------------------- normalized 2D RoPE


def test_rope_same_relative_place_same_angle_at_every_scale():
    # Token (r, c) of a 5x5 map and token (2r, 2c) of a 9x9 map (and (4r, 4c) of 17x17) sit at the
    # same relative place of the image: they must be rotated identically.
    tables = {pn: rope_2d(pn, 64, 10000.0, 64.0).view(pn, pn, 32) for pn in (5, 9, 17)}
    for r in range(5):
        for c in range(5):
            assert torch.allclose(tables[5][r, c], tables[9][2 * r, 2 * c], atol=1e-5)
            assert torch.allclose(tables[5][r, c], tables[17][4 * r, 4 * c], atol=1e-5)
    freqs = 1.0 / 10000.0 ** (torch.arange(16) * 4 / 64)
    for pn in (2, 3, 8, 13, 64):  # every map spans [0, rope_norm]: the far corner turns by rope_norm * f
        corner = rope_2d(pn, 64, 10000.0, 64.0)[-1]
        assert torch.allclose(corner.angle()[:16], torch.polar(torch.ones(16), 64.0 * freqs).angle(),
                              atol=1e-4)
        assert torch.allclose(corner, torch.cat([corner[:16], corner[:16]]))  # row pairs = column pairs there
    assert torch.equal(rope_2d(1, 64, 10000.0, 64.0), torch.ones(1, 32, dtype=torch.complex64))
    plain = rope_2d(9, 64, 10000.0, 8.0)  # rope_norm = pn - 1 gives plain integer positions
    assert torch.allclose(plain[3].angle()[:16], torch.polar(torch.ones(16), 3 * freqs).angle(), atol=1e-5)


def test_rope_scores_depend_on_relative_offset_only():
    from star import apply_rope
    table = rope_2d(8, 64, 10000.0, 64.0)
    q, k = torch.randn(1, 1, 1, 64).expand(1, 1, 64, 64), torch.randn(1, 1, 1, 64).expand(1, 1, 64, 64)
    s = (apply_rope(q, table) @ apply_rope(k, table).transpose(-1, -2))[0, 0]  # (64, 64) scores
    # tokens (0,0)->(1,2) and (3,3)->(4,5): same offset, same score
    assert torch.allclose(s[0 * 8 + 0, 1 * 8 + 2], s[3 * 8 + 3, 4 * 8 + 5], atol=1e-4)

# ---------------------------------------------------------------- teacher forcing vs the reference


def test_teacher_forcing_matches_batch_of_one_fixture():
    model, inp = load_fixture("star")
    exp = torch.load(FIXTURES / "star" / "expected_b1.pt", weights_only=True)
    target = torch.cat(inp["gt_idx_Bl"], 1)
    with torch.no_grad():
        logits, loss, hidden = model(inp["x_BLCv_wo_first_l"], inp["encoder_hidden_states"][:2],
                                     inp["encoder_attention_mask"][:2], inp["encoder_pool_feat"][:2],
                                     target, return_hidden=True)
    assert_close(hidden, exp["tf_b1_hidden_BLC"])
    got = logit_summaries(logits, target, exp["vocab_idx"])
    assert_close(got["cols"], exp["tf_b1_logits_BLv"])
    assert_close(got["top2"], exp["tf_b1_logits_top2"])
    assert_close(got["lse"], exp["tf_b1_logsumexp_BL"])
    assert_close(got["target"], exp["tf_b1_target_logit_BL"])
    assert abs(loss.item() - (exp["tf_b1_logsumexp_BL"] - exp["tf_b1_target_logit_BL"]).mean().item()) < ATOL
    with torch.no_grad():
        again = model.loss(inp["x_BLCv_wo_first_l"], inp["encoder_hidden_states"][:2],
                           inp["encoder_attention_mask"][:2], inp["encoder_pool_feat"][:2], target)
        assert torch.equal(again, loss)


def test_teacher_forcing_is_per_sample():
    model, inp = load_fixture("star")
    args = [inp["x_BLCv_wo_first_l"], inp["encoder_hidden_states"][:2], inp["encoder_attention_mask"][:2],
            inp["encoder_pool_feat"][:2]]
    with torch.no_grad():
        both, _ = model(*args)
        alone = torch.cat([model(*[a[i:i + 1] for a in args])[0] for i in range(2)])
        changed = args[1].clone()
        changed[1] += 1.0  # another sample's text must not leak into sample 0 (reference quirk Q1)
        other, _ = model(args[0], changed, *args[2:])
    assert_close(both, alone)
    assert torch.equal(other[0], both[0]) and not torch.allclose(other[1], both[1])


def test_wrong_text_width_is_a_clear_error():
    model, inp = load_fixture("star")
    with pytest.raises(ValueError, match="text_dim=16"):
        model(inp["x_BLCv_wo_first_l"], torch.zeros(2, 77, 1024), inp["encoder_attention_mask"][:2],
              torch.zeros(2, 1024))

# ---------------------------------------------------------------- loading


def test_loading_layouts_and_errors(tmp_path, monkeypatch):
    path = need_shared(FIXTURES / "star" / "star.pth")
    config = fixture_config("star")
    sd = torch.load(path, weights_only=True)["trainer"]["var_wo_ddp"]
    ref = STAR.from_pretrained(path, config=config).state_dict()
    # a bare state dict, without the all-zero buffers
    torch.save({k: v for k, v in sd.items() if not k.endswith("zero_k_bias")}, tmp_path / "bare.pth")
    bare = STAR.from_pretrained(tmp_path / "bare.pth", config=config).state_dict()
    assert all(torch.equal(bare[k], ref[k]) for k in ref)
    # our own layout carries its config
    from dataclasses import asdict
    torch.save({"config": asdict(config), "model": sd}, tmp_path / "own.pth")
    own = STAR.from_pretrained(tmp_path / "own.pth")
    assert own.config == config and all(torch.equal(own.state_dict()[k], ref[k]) for k in ref)
    torch.save({"star_config": asdict(config), "star": sd, "step": 3}, tmp_path / "pipeline.pth")
    assert STAR.from_pretrained(tmp_path / "pipeline.pth").config == config
    # a wrong preset names the first misshapen key and the preset that would fit
    monkeypatch.setitem(PRESETS, "tiny-fixture", config)
    fits = r"'pos_start' has shape \[1, 1, 128\].*presets that fit: tiny-fixture "
    with pytest.raises(ValueError, match=fits):
        STAR.from_pretrained(path, preset="star-256-d16")
    assert STAR.from_pretrained(path).config == config  # the one fitting preset is found
    # a missing key is named
    torch.save({k: v for k, v in sd.items() if k != "word_embed.bias"}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing keys \\['word_embed.bias'\\]"):
        STAR.from_pretrained(tmp_path / "missing.pth", config=config)
    # other models' files
    with pytest.raises(ValueError, match="VQ-VAE checkpoint"):
        STAR.from_pretrained(need_shared(FIXTURES / "vqvae" / "vae.pth"))
    with pytest.raises(ValueError, match="CLIP text encoder"):
        STAR.from_pretrained(need_shared(FIXTURES / "clip_text" / "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError):
        STAR.from_pretrained(tmp_path / "nope.pth")

# ---------------------------------------------------------------- sampling helper


def test_sample_tokens_filters():
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0, -1.0]]]).expand(1, 2000, 5)
    g = torch.Generator().manual_seed(0)
    idx, _ = sample_tokens(logits, top_k=2, top_p=0.0, generator=g)
    assert set(idx.unique().tolist()) == {0, 1}
    probs = logits[0, 0].softmax(-1)  # 0.636, 0.234, 0.086, ... : top_p 0.8 keeps the first two
    idx, conf = sample_tokens(logits, top_k=0, top_p=0.8, generator=g)
    assert set(idx.unique().tolist()) == {0, 1}
    assert torch.allclose(conf[idx == 0], probs[0] / probs[:2].sum())
    idx, _ = sample_tokens(logits, top_k=1, top_p=0.0, generator=g)
    assert (idx == 0).all()
    a = sample_tokens(logits, 0, 0.0, torch.Generator().manual_seed(3))[0]
    b = sample_tokens(logits, 0, 0.0, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b) and len(a.unique()) == 5

# ---------------------------------------------------------------- sampler head vs the reference


SPEC_COUNTS = {  # spec c.2
    (8, 21): [1, 31, 44, 55, 65, 74, 82, 89], (8, 27): [1, 51, 74, 91, 107, 122, 135, 148],
    (8, 36): [1, 91, 131, 162, 190, 216, 241, 264], (8, 48): [1, 162, 232, 289, 338, 384, 428, 470],
    (8, 64): [1, 288, 413, 513, 601, 683, 761, 836], (8, 16): [1, 18, 26, 32, 38, 43, 48, 50],
    (15, 64): [1, 106, 151, 186, 216, 243, 268, 292, 314, 336, 357, 377, 397, 417, 435]}


def test_arccos_schedule_counts():
    counts = json.loads(need_shared(FIXTURES / "star_head" / "schedule.json").read_text())["counts"]
    for steps, per_pn in counts.items():
        for pn, n in per_pn.items():
            assert arccos_schedule(int(steps), int(pn)) == n, (steps, pn)
    for (steps, pn), n in SPEC_COUNTS.items():
        assert arccos_schedule(steps, pn) == n and sum(n) == pn * pn


def test_head_training_form_matches_fixture():
    model, inp = load_fixture("star_head")
    exp = torch.load(FIXTURES / "star_head" / "expected.pt", weights_only=True)
    begin = model.begin_ends[model.config.sample_from_idx][0]
    with torch.no_grad():
        trunk = model.hidden_states(inp["x_BLCv_wo_first_l"], inp["encoder_hidden_states"][:2],
                                    inp["encoder_attention_mask"][:2], inp["encoder_pool_feat"][:2])
        e = inp["train_embed_Cvae"] * inp["train_visible_mask"][..., None]
        logits, head_hidden = model.head_forward(trunk[:, begin:], e, inp["encoder_pool_feat"][:2],
                                                 return_hidden=True)
    assert_close(trunk, exp["train_trunk_hidden_BLC"])
    assert_close(head_hidden, exp["train_head_hidden_BLC"])
    got = logit_summaries(logits, torch.cat(inp["gt_idx_Bl"], 1)[:, begin:], exp["vocab_idx"])
    assert_close(got["cols"], exp["train_logits_BLv"])
    assert_close(got["top2"], exp["train_logits_top2"])
    assert_close(got["lse"], exp["train_logsumexp_BL"])
    assert_close(got["target"], exp["train_target_logit_BL"])


def test_head_inference_form_matches_fixture_and_is_batch_invariant():
    model, inp = load_fixture("star_head")
    exp = torch.load(FIXTURES / "star_head" / "expected.pt", weights_only=True)
    cfg = json.loads((FIXTURES / "star_head" / "config.json").read_text())["fixtures"]["cfg"]
    pooled = inp["encoder_pool_feat"]  # rows [cond_0, cond_1, uncond_0, uncond_1]
    for j, si in enumerate(exp["head_scales"].tolist()):
        x = inp["infer_x_BlC"][j]                                   # (prompt, [cond, uncond], l, C)
        e = inp["infer_h_acc_BlCv"][j] * inp["infer_committed_Bl"][j][..., None]
        with torch.no_grad():
            logits, hidden = model.head_forward(torch.cat([x[:, 0], x[:, 1]]), e.repeat(2, 1, 1), pooled,
                                                si=si, return_hidden=True)
            alone = [model.head_forward(x[i], e[i:i + 1].repeat(2, 1, 1), pooled[[i, 2 + i]], si=si)
                     for i in range(2)]
        guided = (1 + cfg) * logits[:2] - cfg * logits[2:]
        got = logit_summaries(guided, exp["trunk_cfg_idx_Bl"][si], exp["vocab_idx"])
        assert_close(got["cols"], exp["infer_logits_Blv"][j])
        assert_close(got["top2"], exp["infer_logits_top2"][j])
        assert_close(got["lse"], exp["infer_logsumexp_Bl"][j])
        assert_close(got["target"], exp["infer_target_logit_Bl"][j])
        assert torch.equal(guided.argmax(-1), exp["infer_argmax_Bl"][j])
        assert_close(torch.stack([hidden[:2], hidden[2:]], 1), exp["infer_head_hidden"][j])
        raw = torch.stack([logits[:2], logits[2:]], 1)
        assert_close(raw.topk(2, -1).values, exp["infer_raw_logits_top2"][j])
        assert_close(raw.logsumexp(-1), exp["infer_raw_logsumexp"][j])
        for i in range(2):  # the head works row by row
            assert_close(alone[i], logits[[i, 2 + i]], atol=1e-5)

# ---------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def vae():
    from tokenizer import VQVAE
    kw = json.loads(need_shared(FIXTURES / "star" / "config.json").read_text())["VAR_constructor_kwargs"]
    return VQVAE.from_pretrained(FIXTURES / "vqvae" / "vae.pth", patch_nums=kw["patch_nums"]).eval()


def text_args(inp, rows=(0, 1)):
    """(prompt hidden, mask, pooled) of the given prompts, then the empty prompt's (row 2)."""
    h, m, p = inp["encoder_hidden_states"], inp["encoder_attention_mask"], inp["encoder_pool_feat"]
    rows = list(rows)
    return h[rows], m[rows], p[rows], h[2:3], m[2:3], p[2:3]


def record_guided(monkeypatch):
    """Record the guided logits every sampling step sees (star.guide's outputs)."""
    import star
    seen, guide_fn = [], star.guide
    monkeypatch.setattr(star, "guide", lambda logits, t: seen.append(guide_fn(logits, t)) or seen[-1])
    return seen


@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_greedy_generation_matches_batch_of_one_fixture(vae, cfg, monkeypatch):
    model, inp = load_fixture("star", vae)
    exp = torch.load(FIXTURES / "star" / "expected_b1.pt", weights_only=True)
    tag = f"ar_b1_cfg{int(cfg)}"
    guided = record_guided(monkeypatch)
    img, idx = model.generate(*text_args(inp), cfg=cfg, top_k=1, top_p=0.0, return_indices=True)
    monkeypatch.undo()
    for si, (got, want) in enumerate(zip(idx, exp[f"{tag}_idx_Bl"])):
        assert torch.equal(got, want), f"scale {si}"
        assert_close(guided[si].topk(2, -1).values, exp[f"{tag}_cfg_logits_top2"][si])
    assert_close(img, exp[f"{tag}_img"], atol=1e-3)  # the reference returns (x + 1) / 2 in [0, 1]
    # batch invariance: each prompt alone gives the same tokens and images as the batch of two
    for i in range(2):
        img_i, idx_i = model.generate(*text_args(inp, rows=[i]), cfg=cfg, top_k=1, top_p=0.0,
                                      return_indices=True)
        assert all(torch.equal(a, b[i:i + 1]) for a, b in zip(idx_i, idx))
        assert_close(img_i, img[i:i + 1], atol=1e-5)


def test_kv_cached_generation_agrees_with_teacher_forcing(vae, monkeypatch):
    model, inp = load_fixture("star", vae)
    seen = []
    logits_fn = model.logits
    monkeypatch.setattr(model, "logits", lambda h: seen.append(logits_fn(h)) or seen[-1])
    _, idx = model.generate(*text_args(inp), cfg=3.0, top_k=20, top_p=0.9,
                            generator=torch.Generator().manual_seed(5), return_indices=True)
    monkeypatch.undo()
    with torch.no_grad():  # the same tokens, all scales at once, conditional rows
        tf, _ = model(vae.idx_to_var_input(idx), *text_args(inp)[:3])
    for si, (begin, end) in enumerate(model.begin_ends):
        assert_close(seen[si][:2], tf[:, begin:end])


def test_sampling_is_seeded_and_returns_scales(vae):
    model, inp = load_fixture("star", vae)
    kw = dict(cfg=4.0, top_k=50, top_p=0.95, return_indices=True)
    _, a = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(1), **kw)
    _, b = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(1), **kw)
    _, c = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(2), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    img, idx, scales = model.generate(*text_args(inp, rows=[0]), top_k=1, images_per_prompt=2,
                                      return_indices=True, return_scales=True)
    assert img.shape == (2, 3, 128, 128) and 0 <= img.min() and img.max() <= 1
    assert len(scales) == len(idx) == 7 and torch.equal(scales[-1], img)
    assert torch.equal(idx[-1][0], idx[-1][1])  # greedy: both images of the prompt agree
    with pytest.raises(ValueError, match="text_dim=16"):
        model.generate(torch.zeros(1, 77, 8), torch.ones(1, 77), torch.zeros(1, 8), *text_args(inp)[3:])
    with pytest.raises(ValueError, match="sampler head"):
        model.generate(*text_args(inp), stable=True)


def test_on_scale_is_called_once_per_scale_in_order_and_changes_nothing(vae):
    model, inp = load_fixture("star", vae)
    kw = dict(cfg=4.0, top_k=50, top_p=0.95, return_indices=True)
    calls = []
    _, with_cb = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(3),
                                on_scale=lambda si, pn: calls.append((si, pn)), **kw)
    assert calls == list(enumerate(model.config.patch_nums))
    _, without = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(3), on_scale=None,
                                **kw)
    assert all(torch.equal(x, y) for x, y in zip(with_cb, without))


def test_per_row_cross_attention_uses_the_empty_prompt(vae):
    model, inp = load_fixture("star", vae)
    h, m, p, eh, em, ep = text_args(inp)
    other = eh + 1.0  # change only the empty prompt's states (its pooled feature is kept)
    kw = dict(cfg=4.0, top_k=1, return_indices=True)
    same = [model.generate(h, m, p, e, em, ep, **kw)[1] for e in (eh, other)]
    assert all(torch.equal(x, y) for x, y in zip(*same))  # batch_of_one: empty prompt enters via pooled only
    model.config.cross_attn_mode = "per_row"
    diff = [model.generate(h, m, p, e, em, ep, **kw)[1] for e in (eh, other)]
    assert not all(torch.equal(x, y) for x, y in zip(*diff))
    alone = model.generate(h[1:], m[1:], p[1:], eh, em, ep, **kw)[1]
    assert all(torch.equal(x[1:], y) for x, y in zip(diff[0], alone))

# ---------------------------------------------------------------- editing (inpainting, outpainting)


def test_keep_masks_keep_every_token_that_touches_the_kept_region():
    left = torch.zeros(1, 64, 64, dtype=torch.bool)
    left[:, :, :32] = True
    maps = [m.view(pn, pn) for m, pn in zip(keep_masks(left, (1, 2, 3, 4, 6, 8)), (1, 2, 3, 4, 6, 8))]
    assert maps[0].all()                                          # the 1x1 token covers both halves
    assert maps[2].tolist() == [[True, True, False]] * 3          # 3x3: the middle column straddles
    for m, pn in zip(maps, (1, 2, 3, 4, 6, 8)):
        if pn % 2 == 0:                                            # even maps split at the border
            assert m[:, : pn // 2].all() and not m[:, pn // 2:].any()
    centre = torch.zeros(1, 64, 64, dtype=torch.bool)
    centre[:, 16:48, 16:48] = True
    assert [int(m.sum()) for m in keep_masks(centre, (1, 2, 3, 4, 6, 8))] == [1, 4, 9, 4, 16, 16]
    assert not any(m.any() for m in keep_masks(torch.zeros(2, 64, 64, dtype=torch.bool), (1, 3, 8)))
    assert all(m.all() for m in keep_masks(torch.ones(2, 64, 64, dtype=torch.bool), (1, 3, 8)))


def test_free_schedule_spreads_the_free_positions():
    for steps, pn in ((8, 5), (8, 6), (15, 8), (8, 16)):
        free = torch.tensor([pn * pn, pn * pn - 1, pn * pn // 2, 3, 1, 0])
        n = free_schedule(steps, pn, free)
        assert n.shape == (6, steps) and (n >= 0).all() and torch.equal(n.sum(1), free)
        assert n[0].tolist() == arccos_schedule(steps, pn)      # nothing kept: the ordinary schedule


def edit_setup(vae, folder):
    """The fixture model, two fixture images (B=2) with their index maps, and a keep-the-left-half mask."""
    model, inp = load_fixture(folder, vae)
    image = torch.load(FIXTURES / "vqvae" / "images.pt", weights_only=True)[:2]   # (2, 3, 128, 128)
    known = vae.img_to_idx(image)
    left = torch.zeros(2, 128, 128, dtype=torch.bool)
    left[:, :, :64] = True
    return model, inp, known, left


@pytest.mark.parametrize("folder", ["star", "star_head"])
def test_edit_keeps_the_image_tokens_at_every_scale(vae, folder):
    model, inp, known, left = edit_setup(vae, folder)
    keep = keep_masks(left, model.config.patch_nums)
    kw = dict(cfg=4.0, top_k=1, top_p=0.0, return_indices=True)
    _, plain = model.generate(*text_args(inp), **kw)
    img, idx = model.generate(*text_args(inp), known_idx=known, keep=keep, **kw)
    assert img.shape == (2, 3, 128, 128)
    for si, (got, want, k) in enumerate(zip(idx, known, keep)):
        assert torch.equal(got[k], want[k]), f"scale {si}"
    assert keep[-1].float().mean() == 0.5 and keep[0].all()
    # the free tokens are the model's: they follow the kept ones, not the image, and not the plain image
    assert not torch.equal(idx[-1][~keep[-1]], known[-1][~keep[-1]])
    assert not torch.equal(idx[-1], plain[-1])
    # one image for several images of a prompt: known and keep of batch 1 are broadcast; greedy without
    # the head's random commit order, so both images are the first row of the batch of two
    _, two = model.generate(*text_args(inp), known_idx=known, keep=keep, stable=False, **kw)
    _, one = model.generate(*text_args(inp, rows=[0]), known_idx=[k[:1] for k in known],
                            keep=[k[:1] for k in keep], images_per_prompt=2, stable=False, **kw)
    assert all(a.shape[0] == 2 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[0])
               for a, b in zip(one, two))


@pytest.mark.parametrize("folder", ["star", "star_head"])
def test_edit_keep_all_is_the_reconstruction_keep_none_the_plain_image(vae, folder):
    model, inp, known, left = edit_setup(vae, folder)
    K = len(model.config.patch_nums)
    kw = dict(cfg=3.0, top_k=20, top_p=0.9, return_indices=True)
    g = lambda: torch.Generator().manual_seed(3)
    everything = [torch.ones(2, pn * pn, dtype=torch.bool) for pn in model.config.patch_nums]
    img, idx = model.generate(*text_args(inp), generator=g(), known_idx=known, keep=everything, **kw)
    assert all(torch.equal(a, b) for a, b in zip(idx, known))
    assert_close(img, vae.idx_to_img(known).add(1).mul(0.5), atol=1e-5)
    nothing = [~m for m in everything]
    img_n, idx_n = model.generate(*text_args(inp), generator=g(), known_idx=known, keep=nothing, **kw)
    img_p, idx_p = model.generate(*text_args(inp), generator=g(), **kw)
    assert all(torch.equal(a, b) for a, b in zip(idx_n, idx_p)) and torch.equal(img_n, img_p)
    # seeded: the same seed gives the same edit, another seed another one
    keep = keep_masks(left, model.config.patch_nums)
    a = model.generate(*text_args(inp), generator=g(), known_idx=known, keep=keep, **kw)[1]
    b = model.generate(*text_args(inp), generator=g(), known_idx=known, keep=keep, **kw)[1]
    c = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(4), known_idx=known,
                       keep=keep, **kw)[1]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))
    assert len(idx) == K
    with pytest.raises(ValueError, match="needs both"):
        model.generate(*text_args(inp), known_idx=known)
    with pytest.raises(ValueError, match=r"keep\[2\] has shape"):
        model.generate(*text_args(inp), known_idx=known, keep=keep[:2] + [keep[2][:, :3]] + keep[3:])


def test_stable_edit_commits_each_free_position_once(vae, monkeypatch):
    import star
    model, inp, known, left = edit_setup(vae, "star_head")
    keep = keep_masks(left, model.config.patch_nums)
    passes, commit_fn = {}, star.commit

    def checked_commit(idx_Bl, step_Bl, new_idx, conf, n, s):
        before_idx, before_step = idx_Bl.clone(), step_Bl.clone()
        commit_fn(idx_Bl, step_Bl, new_idx, conf, n, s)
        done = before_step >= 0
        assert torch.equal(idx_Bl[done], before_idx[done]) and torch.equal(step_Bl[done], before_step[done])
        passes.setdefault(step_Bl.shape[1], []).append(step_Bl.clone())

    monkeypatch.setattr(star, "commit", checked_commit)
    _, idx = model.generate(*text_args(inp), cfg=4.0, top_k=50, top_p=0.9, return_indices=True,
                            generator=torch.Generator().manual_seed(7), known_idx=known, keep=keep)
    monkeypatch.undo()
    si_last, pn = len(model.config.patch_nums) - 1, model.config.patch_nums[-1]
    first, last = passes[pn * pn][0], passes[pn * pn][-1]
    k = keep[si_last]
    assert (first[k] == 0).all() and (last >= 0).all()            # kept: committed before step 0
    free_steps = [torch.bincount(last[b][~k[b]], minlength=15) for b in range(2)]   # the last scale: 15 steps
    assert [f.tolist() for f in free_steps] == free_schedule(15, pn, (~k).sum(1)).tolist()
    assert torch.equal(idx[-1][k], known[-1][k])

# ---------------------------------------------------------------- stable sampling and head training


def test_head_model_trunk_generation_matches_fixture(vae, monkeypatch):
    model, inp = load_fixture("star_head", vae)
    exp = torch.load(FIXTURES / "star_head" / "expected.pt", weights_only=True)
    guided = record_guided(monkeypatch)
    _, idx = model.generate(*text_args(inp), cfg=4.0, top_k=1, top_p=0.0, stable=False, return_indices=True)
    for si, (got, want) in enumerate(zip(idx, exp["trunk_cfg_idx_Bl"])):
        assert torch.equal(got, want), f"scale {si}"
        assert_close(guided[si].topk(2, -1).values, exp["trunk_cfg_logits_top2"][si])


def test_stable_generation_is_seeded_and_commits_every_position_once(vae, monkeypatch):
    import star
    model, inp = load_fixture("star_head", vae)
    steps = {}  # map size l -> commit_step (B, l) after every commit pass, for one generation
    commit_fn = star.commit

    def checked_commit(idx_Bl, step_Bl, new_idx, conf, n, s):
        before_idx, before_step = idx_Bl.clone(), step_Bl.clone()
        commit_fn(idx_Bl, step_Bl, new_idx, conf, n, s)
        done = before_step >= 0  # positions committed earlier keep their token and their step
        assert torch.equal(idx_Bl[done], before_idx[done]) and torch.equal(step_Bl[done], before_step[done])
        steps.setdefault(step_Bl.shape[1], []).append(step_Bl.clone())

    kw = dict(cfg=4.0, top_k=50, top_p=0.9, return_indices=True)
    monkeypatch.setattr(star, "commit", checked_commit)
    _, a = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(7), **kw)
    monkeypatch.undo()
    assert sorted(steps) == [25, 36, 64]  # the head's scales 4, 5, 6 (pn 5, 6, 8)
    for l, passes in steps.items():
        assert (passes[-1] >= 0).all()    # every position committed by the end of its scale
    # scales before the last: 8 steps, the 5 trunk steps commit in two passes; the last: 15 single passes
    assert len(steps[25]) == len(steps[36]) == 5 * 2 + 3 and len(steps[64]) == 15
    assert torch.bincount(steps[64][-1][0], minlength=15).tolist() == arccos_schedule(15, 8)
    _, b = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(7), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed, same tokens
    _, plain = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(7), stable=False, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a[:4], plain[:4]))  # before sample_from_idx: one path
    assert not all(torch.equal(x, y) for x, y in zip(a[4:], plain[4:]))


def test_head_loss_falls_with_a_frozen_trunk():
    from types import SimpleNamespace
    torch.manual_seed(0)
    config = STARConfig(depth=2, width=64, num_heads=1, patch_nums=(1, 2, 3, 4), vocab_size=64, vae_dim=8,
                        text_dim=16, head=True, sample_from_idx=2, class_emb=False)
    codebook = torch.nn.Embedding(64, 8)
    model = STAR(config, SimpleNamespace(quantize=SimpleNamespace(embedding=codebook)))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head_parameters():
        p.requires_grad_(True)
    B, L = 4, config.seq_len
    x, targets = torch.randn(B, L - 1, 8), torch.randint(0, 64, (B, L))
    text = (torch.randn(B, 5, 16), torch.ones(B, 5), torch.randn(B, 16))
    opt = torch.optim.AdamW(model.head_parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = model.head_loss(x, *text, targets, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert all(p.grad is None for n, p in model.named_parameters()
               if n.startswith(("blocks.", "head_logits.")))


def test_trunk_loss_falls_and_drop_path_only_in_training():
    torch.manual_seed(0)
    config = STARConfig(depth=2, width=64, num_heads=1, patch_nums=(1, 2, 3, 4), vocab_size=64, vae_dim=8,
                        text_dim=16, class_emb=False, drop_path_rate=0.5)
    model = STAR(config)
    B, L = 4, config.seq_len
    x, targets = torch.randn(B, L - 1, 8), torch.randint(0, 64, (B, L))
    text = (torch.randn(B, 5, 16), torch.ones(B, 5), torch.randn(B, 16))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.loss(x, *text, targets), model.loss(x, *text, targets))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x, *text)[0], model(x, *text)[0])  # stochastic depth
    model = STAR(replace(config, drop_path_rate=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.loss(x, *text, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(64)) < 0.5 and losses[-1] < 0.5 * losses[0], losses

# ---------------------------------------------------------------- precision (bf16 weights on GPU)


def test_dtype_casts_keep_rope_and_agree_with_float32(vae):
    """model.to(dtype) keeps the RoPE table complex64 (a complex buffer would lose its imaginary part
    to a real dtype), LayerNorm statistics and logits stay float32: float64 weights give exactly the
    float32 greedy tokens, bfloat16 weights the float32 logits up to bf16 rounding (8-bit mantissa:
    0.4% per rounding, a few percent of a logit after two blocks)."""
    model, inp = load_fixture("star", vae)
    kw = dict(cfg=4.0, top_k=1, top_p=0.0, return_indices=True)
    img32, idx32 = model.generate(*text_args(inp), **kw)
    with torch.no_grad():
        x = vae.idx_to_var_input(idx32)
        tf32, _ = model(x, *text_args(inp)[:3])
    for dtype in (torch.float64, torch.bfloat16):
        low = copy.deepcopy(model).to(dtype)
        assert low.rope_Lc.dtype == torch.complex64 and torch.equal(low.rope_Lc, model.rope_Lc)
        text = [t.to(dtype) if t.is_floating_point() else t for t in text_args(inp)]
        img, idx = low.generate(*text, **kw)
        assert img.dtype == torch.float32 and img.shape == img32.shape
        with torch.no_grad():
            tf, _ = low(x.to(dtype), *text[:3])
        assert tf.dtype == torch.float32
        if dtype == torch.float64:
            assert all(torch.equal(a, b) for a, b in zip(idx, idx32))
            assert_close(tf, tf32, atol=1e-5)
        else:
            assert_close(tf, tf32, atol=0.05 * tf32.abs().max().item())
    assert model.half().rope_Lc.dtype == torch.complex64

# ---------------------------------------------------------------- the compiled decoding step


def test_real_rope_equals_the_complex_rotation():
    """apply_rope rotates with real cos/sin tables (torch.compile has no complex numbers): the complex
    product it replaces, within 1e-6 in float32; the model's table stays float32 in any dtype."""
    from star import apply_rope
    table = torch.cat([rope_2d(pn, 64, 10000.0, 64.0) for pn in (1, 2, 3, 5, 8, 13)])     # complex (L, 32)
    x = torch.randn(2, 3, table.shape[0], 64)
    complex_rotation = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * table).flatten(-2)
    real_rotation = apply_rope(x, torch.view_as_real(table))
    assert (real_rotation - complex_rotation).abs().max() <= 1e-6
    assert torch.equal(apply_rope(x, table), real_rotation)
    config = STARConfig(depth=1, width=64, num_heads=1, patch_nums=(1, 2, 3), text_dim=16)
    model = STAR(config).to(torch.bfloat16)
    assert model.rope_Lc2.dtype == torch.float32 and not model.rope_Lc2.is_complex()


def eager_backend(monkeypatch):
    """torch.compile through dynamo only (no inductor): captures the same graphs in seconds."""
    import functools
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def test_decoding_steps_compile_whole_without_graph_breaks(vae, monkeypatch):
    """compile_decoding captures every step of every scale as one graph, with no graph break and no
    recompilation on the next call; the loop runs the same methods, so the tokens are the eager ones.
    Dynamo with its eager backend makes the graphs here; the slow tests below run them with inductor."""
    from torch._dynamo.utils import counters
    model, inp = load_fixture("star_head", vae)
    kw = dict(cfg=4.0, top_k=1, top_p=0.0, stable=True, return_indices=True)  # greedy; random commit order:
    _, eager = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(0), **kw)
    eager_backend(monkeypatch)
    assert model.compile_decoding() is model
    _, compiled = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(0), **kw)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    K, first_head = len(model.config.patch_nums), model.config.sample_from_idx
    # a graph per scale for the trunk, per trunk-sampled scale for the output layer (scales before the
    # head's and the head's non-last scales), per head scale for the head; the probe is one more
    graphs = K + (first_head + K - 1 - first_head) + (K - first_head) + 1
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    _, again = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(0), **kw)
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(torch.equal(a, b) for a, b in zip(eager, again))
    twin = copy.deepcopy(model)                              # a copy runs its own weights
    with torch.no_grad():
        twin.head_logits.bias.add_(100.0 * torch.arange(twin.config.vocab_size))
    _, other = twin.generate(*text_args(inp), generator=torch.Generator().manual_seed(0), stable=False,
                             **{k: v for k, v in kw.items() if k != "stable"})
    assert all((i == twin.config.vocab_size - 1).all() for i in other)  # its last token wins everywhere


@pytest.mark.parametrize("folder", ["star", "star_head"])
def test_compiled_edit_gives_the_eager_edit(vae, folder, monkeypatch):
    """An edit goes through the same compiled steps (kept tokens are forced and committed on the host,
    between the steps): the same sampled tokens as eager, kept ones included, with no graph break."""
    from torch._dynamo.utils import counters
    model, inp, known, left = edit_setup(vae, folder)
    keep = keep_masks(left, model.config.patch_nums)
    kw = dict(cfg=3.0, top_k=20, top_p=0.9, return_indices=True, known_idx=known, keep=keep)
    img, eager = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(3), **kw)
    eager_backend(monkeypatch)
    model.compile_decoding()
    img_c, compiled = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(3), **kw)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled)) and torch.equal(img, img_c)
    assert all(torch.equal(a[k], b[k]) for a, b, k in zip(compiled, known, keep))
    # the probe and a trunk per scale
    assert counters["stats"]["unique_graphs"] > len(model.config.patch_nums)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_decoding_where_compile_cannot_run(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore details")
    model = STAR(STARConfig(depth=1, width=64, num_heads=1, patch_nums=(1, 2), text_dim=16))
    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.raises(RuntimeError, match=r"^torch.compile is not available here "
                                           r"\(RuntimeError: no C\+\+ compiler found\)$"):
        model.compile_decoding()
    assert "trunk_step" not in vars(model)                   # left eager


@pytest.mark.slow
@pytest.mark.parametrize("folder, stable", [("star", False), ("star_head", True)])
def test_inductor_compiled_generation_gives_the_eager_tokens(vae, folder, stable, request):
    """Inductor's fused kernels round differently from eager ops, yet greedy generation on the parity
    fixtures picks the same tokens at every scale (and the reference's, for the trunk)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("compiles for minutes on a CPU; run with -m slow")
    model, inp = load_fixture(folder, vae)
    kw = dict(cfg=4.0, top_k=1, top_p=0.0, stable=stable, return_indices=True)
    img, eager = model.generate(*text_args(inp), generator=torch.Generator().manual_seed(0), **kw)
    torch._dynamo.reset()
    img_c, compiled = model.compile_decoding().generate(*text_args(inp),
                                                        generator=torch.Generator().manual_seed(0), **kw)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert torch.equal(img, img_c)                            # the same tokens decode to the same image
    if folder == "star":
        exp = torch.load(FIXTURES / "star" / "expected_b1.pt", weights_only=True)
        assert all(torch.equal(a, b) for a, b in zip(compiled, exp["ar_b1_cfg4_idx_Bl"]))
