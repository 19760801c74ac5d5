"""Tests for weights.py: the readers against the fixture files and hand-written ones (every bad file is
refused with one line naming it, nothing pickled is run), the STAR layouts and preset fitting on the
fixtures' weights, then train.py's checkpoint writing."""
import json
import pickle
from dataclasses import asdict

import pytest
import torch

import weights
from conftest import FIXTURES, Payload, need_shared
from star import PRESETS, STAR
from test_star import fixture_config

# ---------------------------------------------------------------- the readers


def test_read_weights_refuses_bad_files_with_one_line_naming_them(tmp_path):
    good = need_shared(FIXTURES / "star" / "star.pth").read_bytes()
    marker = tmp_path / "PWNED"
    torch.save({"star": Payload(marker)}, tmp_path / "evil.pt")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"star": Payload(marker)}, protocol=2))
    (tmp_path / "trunc.pt").write_bytes(good[:len(good) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not weights at all\n")
    (tmp_path / "folder.pt").mkdir()
    cases = [("evil.pt", ValueError, "is not a plain weights file", "nothing in it was run"),
             ("evil.pkl", ValueError, "is not a plain weights file", "nothing in it was run"),
             ("trunc.pt", ValueError, "could not be read", "truncated"),
             ("empty.pt", ValueError, "is empty (0 bytes)", "download or copy it again"),
             ("notes.txt", ValueError, "is not a plain weights file", "use a file of tensors"),
             ("folder.pt", FileNotFoundError, "not found (it is a folder)", ""),
             ("missing.pt", FileNotFoundError, "not found", "")]
    for name, kind, *fragments in cases:
        with pytest.raises(kind) as info:
            weights.read_weights(tmp_path / name, "STAR weights")
        message = str(info.value)
        assert message.startswith(f"STAR weights {tmp_path / name} ") and "\n" not in message, message
        assert all(f in message for f in fragments), message
    assert not marker.exists()
    with pytest.raises(ValueError, match="could not be read .*delete it to run that stage again"):
        weights.read_weights(tmp_path / "trunc.pt", "checkpoint", fix="delete it to run that stage again")


def test_read_weights_reads_both_torch_formats(tmp_path):
    sd = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int16)}
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)   # no mmap for this one
    for name in ("zip.pt", "legacy.pt"):
        got = weights.read_weights(tmp_path / name, "weights")
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype
                                               for k in sd)


def write_safetensors(path, tensors, pad=b""):
    """The format by hand: an 8-byte little-endian header length, the JSON header, the raw bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, t) in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode() + pad
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return path


def test_safetensors_round_trip_against_a_hand_written_file(tmp_path):
    tensors = {"w": ("F32", torch.randn(3, 4, generator=torch.Generator().manual_seed(0))),
               "h": ("F16", torch.tensor([0.5, -2.0], dtype=torch.float16)),
               "b": ("BF16", torch.tensor([[1.5]], dtype=torch.bfloat16)),
               "i": ("I64", torch.tensor([-1, 2**40])), "m": ("BOOL", torch.tensor([True, False, True])),
               "e": ("F32", torch.zeros(0, 5))}
    path = write_safetensors(tmp_path / "m.safetensors", tensors, pad=b"  ")    # padded header: allowed
    got = weights.read_safetensors(path, "weights")
    assert got.keys() == tensors.keys()
    for name, (_, t) in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    # the fixture text encoder is stored both ways: the two readers agree
    st = weights.read_safetensors(need_shared(FIXTURES / "clip_text" / "model.safetensors"), "weights")
    pt = weights.read_weights(FIXTURES / "clip_text" / "pytorch_model.bin", "weights")
    assert st.keys() == pt.keys() and all(torch.equal(st[k], pt[k]) for k in st)


def test_safetensors_errors_name_the_file(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    (tmp_path / "text.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    write_safetensors(tmp_path / "odd.safetensors", {"x": ("F32", torch.zeros(2))})
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes(odd.read_bytes().replace(b"F32", b"F99"))
    for name, fragment in (("short", "is not a safetensors file (header length"),
                           ("text", "is not a safetensors file"), ("empty", "is empty (0 bytes)"),
                           ("odd", "tensor 'x' has unsupported dtype 'F99'")):
        with pytest.raises(ValueError) as info:
            weights.read_safetensors(tmp_path / f"{name}.safetensors", "text encoder weights")
        assert str(info.value).startswith(f"text encoder weights {tmp_path / name}.safetensors")
        assert fragment in str(info.value) and "\n" not in str(info.value)

# ---------------------------------------------------------------- STAR layouts and presets


def test_star_layouts_are_recognised_and_other_models_refused(tmp_path):
    ck = weights.read_weights(need_shared(FIXTURES / "star" / "star.pth"), "STAR weights")
    sd = ck["trainer"]["var_wo_ddp"]
    config = fixture_config("star")
    assert weights.star_state_dict(ck, "x") == (sd, None)
    assert weights.star_state_dict(sd, "x") == (sd, None)
    assert weights.star_state_dict({"config": asdict(config), "model": sd}, "x") == (sd, config)
    pipeline = {"format": "star-pipeline", "star_config": asdict(config), "star": sd, "step": 3}
    assert weights.star_state_dict(pipeline, "x") == (sd, config)
    with pytest.raises(ValueError, match="unknown fields \\['wings'\\]"):
        weights.star_state_dict({"config": {**asdict(config), "wings": 2}, "model": sd}, "x")
    vae = weights.read_weights(need_shared(FIXTURES / "vqvae" / "vae.pth"), "VQ-VAE weights")
    with pytest.raises(ValueError, match="^vae.pth is a VQ-VAE checkpoint, not STAR weights: pass it as "):
        weights.star_state_dict(vae, "vae.pth")
    clip = weights.read_weights(FIXTURES / "clip_text" / "pytorch_model.bin", "weights")
    with pytest.raises(ValueError, match="CLIP text encoder's weights.*--text-encoder"):
        weights.star_state_dict(clip, "clip.bin")
    with pytest.raises(ValueError, match="not STAR weights .*found \\['a'\\]"):
        weights.star_state_dict({"a": torch.zeros(1)}, "other.pt")


def test_presets_are_fitted_on_the_fixtures_weights(monkeypatch):
    for folder, described in (("star", "depth 2, width 128, 7 scales, text width 16, without sampler head"),
                              ("star_head", "depth 3, width 64, 7 scales, text width 16, with sampler head")):
        ck = weights.read_weights(need_shared(FIXTURES / folder / "star.pth"), "STAR weights")
        sd, _ = weights.star_state_dict(ck, folder)
        assert weights.describe_star(sd) == described
        assert weights.fitting_presets(sd) == []                      # no released model is this small
        with pytest.raises(ValueError, match=f"fit no preset \\({described}\\): pass --patch-nums with 7"):
            weights.released_config(sd, folder)
        config = fixture_config(folder)
        monkeypatch.setitem(PRESETS, f"tiny-{folder}", config)
        assert weights.fitting_presets(sd) == [f"tiny-{folder}"]
        assert weights.released_config(sd, folder) == config
        wrong = f"--preset star-256-d16 does not fit {folder} .*presets that fit: tiny-{folder}$"
        with pytest.raises(ValueError, match=wrong):
            weights.released_config(sd, folder, preset="star-256-d16")
        monkeypatch.delitem(PRESETS, f"tiny-{folder}")
    # the same shapes in a file without a preset: a config read off the shapes, scales from --patch-nums
    built = weights.released_config(sd, "star_head", patch_nums=config.patch_nums)
    assert (built.depth, built.width, built.head, built.patch_nums) == (3, 64, True, config.patch_nums)
    with pytest.raises(ValueError, match="--patch-nums gives 6 scales, but star_head has 7"):
        weights.released_config(sd, "star_head", patch_nums=(1, 2, 3, 4, 5, 8))
    sd.pop("pos_start")
    assert weights.fitting_presets(sd) == [] and "width ?" in weights.describe_star(sd)


def test_presets_are_fitted_on_released_shapes():
    # weights of a released shape (on the meta device: no memory) are matched to their preset
    with torch.device("meta"):
        sd = STAR(PRESETS["star-256-d16"]).state_dict()
    with pytest.raises(ValueError, match="presets that fit: star-256-d16"):
        weights.released_config(sd, "d16.pth", preset="star-1024-sampler")
    assert weights.released_config(sd, "d16.pth") == PRESETS["star-256-d16"]
    with torch.device("meta"):
        sd30 = STAR(PRESETS["star-256-d30"]).state_dict()
    assert weights.fitting_presets(sd30) == ["star-256-d30", "star-512-d30"]
    with pytest.raises(ValueError, match="several presets .*star-256-d30, star-512-d30"):
        weights.released_config(sd30, "d30.pth")
    assert weights.released_config(sd30, "d30.pth", patch_nums=PRESETS["star-512-d30"].patch_nums) == \
        PRESETS["star-512-d30"]
    with torch.device("meta"):
        sampler = STAR(PRESETS["star-1024-sampler"]).state_dict()
    assert weights.fitting_presets(sampler) == ["star-1024-sampler"]

# ---------------------------------------------------------------- train.py's checkpoints


def test_save_atomic_replaces_whole_files_and_leaves_no_tmp_on_failure(tmp_path):
    path = tmp_path / "vae.pt"
    weights.save_atomic({"step": 1}, path)
    weights.save_atomic({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    with pytest.raises(Exception):
        weights.save_atomic({"step": 3, "fn": lambda: 0}, path)     # a lambda cannot be pickled
    assert torch.load(path, weights_only=True) == {"step": 2}      # the old file is untouched
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(OSError):
        weights.save_atomic({"step": 1}, tmp_path / "folder.pt")    # a folder in the way of os.replace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.pt", "vae.pt"]


def test_load_checkpoint_checks_format_and_stage(tmp_path):
    weights.save_atomic({"format": "star-pipeline", "stage": "star", "step": 4}, tmp_path / "star.pt")
    assert weights.load_checkpoint(tmp_path / "star.pt", ("star",))["step"] == 4
    with pytest.raises(ValueError, match="holds a 'star' checkpoint, expected 'vae' or 'head'"):
        weights.load_checkpoint(tmp_path / "star.pt", ("vae", "head"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by train.py"):
        weights.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no such file, expected a checkpoint file"):
        weights.load_checkpoint(tmp_path / "missing.pt")
