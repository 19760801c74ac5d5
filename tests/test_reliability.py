"""Checks that cut across files: torch.load is called in weights.py alone and refuses pickled code, and
every loader of the library refuses a hostile file without running it (the command lines' own catalogues
of bad inputs are in test_train.py and test_sample.py)."""
import ast
import pickle

import pytest
import torch

import clip_text
import train
import weights
from conftest import Payload, ROOT
from star import STAR
from tokenizer import VQVAE


def test_torch_load_is_called_in_weights_py_alone_with_weights_only_true():
    calls = []                                   # (the tests load hostile files unsafely on purpose)
    files = sorted(ROOT.glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                         and k.value.value is True
                         for k in node.keywords)
                calls.append((f"{path.name}:{node.lineno}", ok))
    assert 1 <= len(calls) <= 2 and all(where.startswith("weights.py:") for where, _ in calls), calls
    assert [where for where, ok in calls if not ok] == []


def hostile_files(tmp_path, marker):
    """The same payload as a torch.save zip file and as a bare (legacy-format) pickle."""
    zipped, bare = tmp_path / "evil.pt", tmp_path / "evil.pkl"
    torch.save({"state_dict": Payload(marker)}, zipped)
    bare.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    return zipped, bare


def text_encoder_folder(tmp_path, weights):
    folder = tmp_path / "encoder"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": 1, '
                                        '"num_attention_heads": 1, "intermediate_size": 128}')
    (folder / "pytorch_model.bin").write_bytes(weights.read_bytes())
    return folder


@pytest.mark.parametrize("loader", ["VQVAE.from_pretrained", "STAR.from_pretrained",
                                    "TextEncoder.from_pretrained", "weights.read_weights",
                                    "train.load_checkpoint"])
def test_library_loaders_refuse_hostile_files(loader, tmp_path):
    marker = tmp_path / "PWNED"
    load = {"VQVAE.from_pretrained": VQVAE.from_pretrained, "STAR.from_pretrained": STAR.from_pretrained,
            "TextEncoder.from_pretrained":
                lambda p: clip_text.TextEncoder.from_pretrained(text_encoder_folder(tmp_path, p)),
            "weights.read_weights": lambda p: weights.read_weights(p, "weights"),
            "train.load_checkpoint": train.load_checkpoint}[loader]
    for path in hostile_files(tmp_path, marker):
        with pytest.raises(Exception) as info:
            load(path)
        assert not marker.exists(), f"{loader} ran the pickled code of {path.name}"
        assert not isinstance(info.value, (AttributeError, NameError))   # refused, not crashed
    # the files are live: loading them the unsafe way runs their code
    torch.load(hostile_files(tmp_path, marker)[0], weights_only=False)
    assert marker.exists()
