"""Tests for clip_text.py: ids and encoder outputs against the reference fixtures, then behaviour."""
import io
import json
import random
import shutil
import warnings

import pytest
import torch

from clip_text import EOT, PIECE_PATTERN, SOT, TextConfig, TextEncoder, Tokenizer, clean_text
from conftest import BPE_PATH, FIXTURES, SPEC, need_shared
from weights import read_weights

TOK_DIR = FIXTURES / "tokenizer"
CLIP_DIR = FIXTURES / "clip_text"


def read_json(path):
    return json.loads(need_shared(path).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def clip_tok():
    return Tokenizer.from_file(need_shared(BPE_PATH))


@pytest.fixture(scope="module")
def corpus():
    return read_json(TOK_DIR / "corpus.json")


def shapes_captions(n, seed=0):
    """Captions in the style of the demo's shapes world (plus a few non-ASCII ones)."""
    rng = random.Random(seed)
    sizes, colours = ["small", "large", "tiny", "big"], ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star"]
    places = ["on the left", "on the right", "at the top", "in the middle"]
    caps = []
    for i in range(n):
        cap = f"a {rng.choice(sizes)} {rng.choice(colours)} {rng.choice(shapes)} {rng.choice(places)}"
        if rng.random() < 0.5:
            cap += f" and a {rng.choice(colours)} {rng.choice(shapes)} below it"
        if rng.random() < 0.7:
            cap += f" on a {rng.choice(['white', 'black', 'gray'])} background"
        caps.append(cap.capitalize() + ("." if i % 3 == 0 else ""))
    return caps + ["un cercle rouge à gauche", "赤い丸 🔴"]


def expected_decode(text):
    """What decode(encode(text)) must give: every non-space character of the cleaned text, in order,
    each pre-tokenizer piece followed by one space (special-token literals come back without one)."""
    return "".join(p if p in (SOT, EOT) else p + " " for p in PIECE_PATTERN.findall(clean_text(text)))


# -----------------------------------------------------------------------------
# numbers: the OpenAI tokenizer fixtures


def test_corpus_ids_match_openai(clip_tok, corpus):
    expected = read_json(TOK_DIR / "ids_openai.json")
    assert len(corpus) == len(expected) == 170
    for text, ids in zip(corpus, expected):
        assert clip_tok.encode(text) == ids, text


def test_corpus_conditioning_input_matches(clip_tok, corpus):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids_BT, mask_BT = clip_tok(corpus)
    assert ids_BT.dtype == mask_BT.dtype == torch.long and ids_BT.shape == (170, 77)
    assert torch.equal(ids_BT, torch.tensor(read_json(TOK_DIR / "ids_77.json")))
    assert torch.equal(mask_BT, torch.tensor(read_json(TOK_DIR / "attention_mask_77.json")))
    assert len(caught) == sum(len(clip_tok.encode(t)) > 75 for t in corpus) == 6


def test_corpus_decoded_matches(clip_tok):
    ids = read_json(TOK_DIR / "ids_openai.json")
    assert [clip_tok.decode(i) for i in ids] == read_json(TOK_DIR / "decoded.json")


def test_hf_folder_gives_the_same_ids(clip_tok, corpus, tmp_path):
    folder = tmp_path / "tokenizer"  # a Stable Diffusion layout: the root holds tokenizer/
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(clip_tok.encoder), encoding="utf-8")
    merges = "\n".join(f"{a} {b}" for a, b in clip_tok.merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    for path in (folder, tmp_path):
        hf = Tokenizer.from_file(path)
        assert hf.vocab == clip_tok.vocab and (hf.sot_id, hf.eot_id) == (49406, 49407)
        assert [hf.encode(t) for t in corpus] == read_json(TOK_DIR / "ids_openai.json")


def test_state_dict_of_clip_vocabulary_round_trips(clip_tok, corpus):
    buf = io.BytesIO()
    torch.save(clip_tok.state_dict(), buf)
    buf.seek(0)
    tok = Tokenizer.from_state_dict(torch.load(buf, weights_only=True))
    assert tok.vocab_size == 49408
    assert [tok.encode(t) for t in corpus] == [clip_tok.encode(t) for t in corpus]


# -----------------------------------------------------------------------------
# numbers: the text encoder fixtures


@pytest.fixture(scope="module")
def clip_io():
    inputs = torch.load(need_shared(CLIP_DIR / "inputs.pt"), weights_only=True)
    expected = torch.load(CLIP_DIR / "expected.pt", weights_only=True)
    return inputs, expected


def check_against_expected(model, inputs, expected):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for suffix, m in (("", mask), ("_nomask", None)):
            hidden, pooled, penultimate = model(ids, m, return_penultimate=True)
            got = {"last_hidden_state": hidden, "pooler_output": pooled,
                   "penultimate_hidden_state": penultimate,
                   "penultimate_hidden_state_final_ln": model.final_layer_norm(penultimate)}
            for name, tensor in got.items():
                torch.testing.assert_close(tensor, expected[name + suffix], atol=1e-4, rtol=1e-4,
                                           msg=name + suffix)
    assert torch.equal(ids.argmax(-1), expected["pooled_index"])


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_encoder_matches_expected(weights, clip_io, tmp_path):
    for name in ("config.json", weights):
        shutil.copy(need_shared(CLIP_DIR / name), tmp_path / name)
    model = TextEncoder.from_pretrained(tmp_path)
    assert not model.training and model.config == TextConfig(vocab_size=49408, width=16, layers=3, heads=2,
                                                              intermediate=64, act="gelu")
    check_against_expected(model, *clip_io)


def test_keys_without_prefix_and_stray_position_ids_load(clip_io, tmp_path):
    state = read_weights(need_shared(CLIP_DIR / "pytorch_model.bin"), "weights")
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    folder = tmp_path / "text_encoder"  # a Stable Diffusion layout: the root holds text_encoder/
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    shutil.copy(CLIP_DIR / "config.json", folder / "config.json")
    check_against_expected(TextEncoder.from_pretrained(tmp_path), *clip_io)


def test_tokenizer_builds_the_encoder_inputs(clip_tok, clip_io):
    prompts = read_json(CLIP_DIR / "prompts.json")
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = clip_tok(prompts)
    assert torch.equal(ids, clip_io[0]["input_ids"]) and torch.equal(mask, clip_io[0]["attention_mask"])


def test_sd21_layout_matches_manifest():
    manifest = read_json(SPEC / "clip_text_sd21.json")
    config = TextConfig.from_hf(manifest["config"])
    assert config == TextConfig()  # the defaults are SD-2.1's text encoder
    with torch.device("meta"):
        model = TextEncoder(config)
    shapes = {f"text_model.{k}": list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest["params"]
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"]


# -----------------------------------------------------------------------------
# behaviour: tokenizer


def test_truncation_warns_with_prompt_and_limit(clip_tok):
    long = "a photo of a red circle " * 30
    with pytest.warns(UserWarning,
                      match=r"'a photo of a red circle a photo of a \.\.\.' has 180 tokens.*at most 75"):
        ids, mask = clip_tok([long, "a cat"])
    assert ids[0, 76] == clip_tok.eot_id and mask[0].sum() == 77
    assert ids[0, 1:76].tolist() == clip_tok.encode(long)[:75]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 75 tokens fit without a warning
        ids, mask = clip_tok("red " * 75)
    assert ids[0, 76] == clip_tok.eot_id and mask.sum() == 77
    ids, mask = clip_tok("a cat", context_length=8)
    assert ids.tolist() == [[49406, 320, 2368, 49407, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]


def test_awkward_inputs_tokenize(clip_tok):
    rng = random.Random(1)
    texts = ["", "   \n\t  \r\n ", "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\x9b",
             "🐱👍🏽🇯🇵 👨‍👩‍👧 ❤️",
             "Zürich 東京 Москва القاهرة मुंबई Αθήνα 서울",
             "<|endoftext|> <|STARTOFTEXT|>",
             "\ufeff\u200b\u00a0\u3000x",
             " ".join(rng.choice(["red", "circle", "東京", "🐱", "left,", "it's"])
                      for _ in range(3000))[:10000],
             "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(10000))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the two 10,000-character texts are truncated
        ids, mask = clip_tok(texts)
    assert ids.shape == mask.shape == (len(texts), 77)
    for b, text in enumerate(texts):
        n = min(len(clip_tok.encode(text)), 75)
        assert ids[b, 0] == clip_tok.sot_id and ids[b, n + 1] == clip_tok.eot_id and mask[b].sum() == n + 2
        assert clip_tok.decode(clip_tok.encode(text)) == expected_decode(text)
    assert ids[0, :2].tolist() == [49406, 49407] and ids[1, :2].tolist() == [49406, 49407]  # nothing left
    assert clip_tok.encode(texts[5]) == [49407, 49406]


def random_unicode(rng):
    pools = [lambda: chr(rng.randint(32, 126)), lambda: chr(rng.randint(0, 31)),
             lambda: chr(rng.randint(127, 0x24F)),
             lambda: chr(rng.randint(0, 0xFFFF)),  # any BMP code point, lone surrogates included
             lambda: chr(rng.randint(0x1F300, 0x1FAFF)), lambda: chr(rng.randint(0x10000, 0x10FFFF)),
             lambda: rng.choice([" ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\x85", "\u2028",
                                 "\x1c"]),
             lambda: rng.choice(["&amp;", "&lt;b&gt;", "&#39;", "&amp;quot;", "Ã©", "â€™", "ﬁ",
                                 "！", "'s", SOT, EOT])]
    weights = [8, 1, 2, 2, 1, 1, 3, 1]
    return "".join(rng.choices(pools, weights)[0]() for _ in range(rng.randint(0, 30)))


def test_fuzz_random_unicode_round_trips(clip_tok):
    """decode(encode(s)) gives back what cleaning keeps: clean_text(s) with every whitespace run turned
    into the word boundaries of the pieces (see expected_decode); nothing else is lost or invented."""
    rng = random.Random(1234)
    texts = [random_unicode(rng) for _ in range(2000)]
    for text in texts:
        decoded = clip_tok.decode(clip_tok.encode(text))
        assert decoded == expected_decode(text), repr(text)
        assert decoded.replace(" ", "") == clean_text(text).replace(" ", ""), repr(text)
    ids, mask = clip_tok(texts)
    assert ids.shape == (2000, 77) and bool((ids[mask == 0] == 0).all())


def test_clean_text():
    # HTML unescaped twice
    assert clean_text("  A  Red\tCAR\n\n&amp;amp; <b>SHEEP</b>  ") == "a red car & <b>sheep</b>"
    # ftfy repairs mojibake and quotes
    assert clean_text("cafÃ© \u201cquoted\u201d\x00") == 'café "quoted"'
    assert clean_text("\u3000\xa0 \r\n") == ""


def test_decode_rejects_unknown_ids(clip_tok):
    with pytest.raises(ValueError, match="token id 49408 is outside the vocabulary"):
        clip_tok.decode([320, 49408])
    assert clip_tok.decode(torch.tensor([320, 2368])) == "a cat "


# -----------------------------------------------------------------------------
# behaviour: the BPE trainer


@pytest.fixture(scope="module")
def trained():
    return Tokenizer.train(shapes_captions(3000), vocab_size=600)


def test_trainer_learns_a_vocabulary(trained):
    caps = shapes_captions(200, seed=1)
    assert trained.vocab_size == 600 and (trained.sot_id, trained.eot_id) == (598, 599)
    assert trained.vocab[:512] == Tokenizer.vocab_from_merges([])[:512]  # CLIP's byte layout
    for word in ("circle", "triangle", "background", "the", "a"):
        assert trained.encode(word) == [trained.encoder[word + "</w>"]], word
    bytes_only = Tokenizer.train([], vocab_size=600)  # nothing to learn from: just bytes + specials
    assert bytes_only.vocab_size == 514 and bytes_only.eot_id == 513
    n_trained = sum(len(trained.encode(c)) for c in caps)
    assert n_trained * 3 < sum(len(bytes_only.encode(c)) for c in caps)
    for text in caps + ["Zürich 東京 🐱 never seen", "x" * 50, "a <|endoftext|> tail"]:
        assert trained.decode(trained.encode(text)) == expected_decode(text)
    assert trained.encode("<|endoftext|>") == [599]


def test_trainer_special_tokens_and_pooling(trained):
    with pytest.warns(UserWarning, match="140 tokens"):
        ids, mask = trained(["a red circle", "", "a big blue star on the right " * 20], context_length=77)
    assert ids.shape == (3, 77) and ids[:, 0].tolist() == [598] * 3
    assert ids[1, :2].tolist() == [598, 599] and mask[1].sum() == 2 and ids[2, 76] == 599
    assert all(ids[b, mask[b].sum() - 1] == 599 == ids[b].max() for b in range(3))  # EOT = the largest id
    encoder = TextEncoder(TextConfig(vocab_size=trained.vocab_size, width=32, layers=2, heads=2)).eval()
    with torch.no_grad():
        hidden, pooled = encoder(ids, mask)
    eot_pos = mask.sum(1) - 1
    assert torch.equal(pooled, hidden[torch.arange(3), eot_pos])


def test_trainer_is_deterministic_and_state_dict_round_trips(trained):
    caps = shapes_captions(3000)
    assert Tokenizer.train(caps, vocab_size=600).state_dict() == trained.state_dict()
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert all(isinstance(s, str) for s in state["vocab"] + state["merges"])
    tok = Tokenizer.from_state_dict(state)
    assert tok.vocab == trained.vocab
    assert [tok.encode(c) for c in caps[:300]] == [trained.encode(c) for c in caps[:300]]


# -----------------------------------------------------------------------------
# behaviour: the text encoder


def encode_changed_and_padded(causal):
    """An 11-token caption encoded as it is, with token 5 changed, and with other padding after it:
    (hidden, pooled), hidden with token 5 changed, (hidden, pooled) with other padding."""
    encoder = TextEncoder(TextConfig(vocab_size=100, width=32, layers=2, heads=4, causal=causal)).eval()
    ids = torch.randint(0, 98, (2, 77))
    ids[:, 10], ids[:, 11:] = 99, 0
    mask = (torch.arange(77) <= 10).long().expand(2, 77)
    changed, padded = ids.clone(), ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 98
    padded[:, 11:] = 7
    with torch.no_grad():
        return encoder(ids, mask), encoder(changed, mask)[0], encoder(padded, mask)


def test_encoder_is_causal_and_ignores_padding():
    (hidden, pooled), hidden2, (hidden3, pooled3) = encode_changed_and_padded(causal=True)
    torch.testing.assert_close(hidden2[:, :5], hidden[:, :5])  # earlier positions never see later tokens
    assert not torch.allclose(hidden2[:, 5:], hidden[:, 5:])
    torch.testing.assert_close(hidden3[:, :11], hidden[:, :11])  # padded keys are masked
    torch.testing.assert_close(pooled3, pooled)
    assert torch.equal(pooled, hidden[:, 10])


def test_a_full_attention_encoder_lets_every_word_see_the_whole_caption():
    # causal=False (train.py --text-attention full): the first object's words of "a red circle to the
    # left of a blue square" can see the relation that comes after them
    (hidden, pooled), hidden2, (hidden3, pooled3) = encode_changed_and_padded(causal=False)
    assert not torch.allclose(hidden2[:, :5], hidden[:, :5])  # earlier positions see the later word
    torch.testing.assert_close(hidden3[:, :11], hidden[:, :11])  # padding stays masked
    torch.testing.assert_close(pooled3, pooled)


def test_quick_gelu_is_a_different_activation():
    ids = torch.randint(0, 100, (1, 77))
    outs = []
    for act in ("gelu", "quick_gelu"):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(TextEncoder(TextConfig(vocab_size=100, width=32, layers=1, heads=2, act=act))(ids)[0])
    assert not torch.allclose(outs[0], outs[1], atol=1e-6)


# -----------------------------------------------------------------------------
# error messages


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt.gz does not exist"):
        Tokenizer.from_file(tmp_path / "nope.txt.gz")
    with pytest.raises(FileNotFoundError, match="has no vocab.json"):
        Tokenizer.from_file(tmp_path)
    # e.g. a weights file by mistake
    (tmp_path / "weights.txt.gz").write_bytes(b"PK\x03\x04 not gzip")
    with pytest.raises(ValueError,
                       match="tokenizer file .*weights.txt.gz could not be read \\(BadGzipFile\\)"):
        Tokenizer.from_file(tmp_path / "weights.txt.gz")
    with pytest.raises(ValueError, match="vocab_size=300 is too small.*514"):
        Tokenizer.train(["a red circle"], 300)
    with pytest.raises(ValueError, match="'vocab' and 'merges'"):
        Tokenizer.from_state_dict({"vocab": []})


def encoder_folder(tmp_path, state=None, config=None):
    folder = tmp_path / "enc"
    folder.mkdir(exist_ok=True)
    cfg = read_json(CLIP_DIR / "config.json")
    (folder / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    torch.save(state if state is not None else read_weights(CLIP_DIR / "pytorch_model.bin", "weights"),
               folder / "pytorch_model.bin")
    return folder


def test_encoder_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        TextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        TextEncoder.from_pretrained(tmp_path)
    folder = encoder_folder(tmp_path)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors or pytorch_model.bin"):
        TextEncoder.from_pretrained(folder)
    state = read_weights(CLIP_DIR / "pytorch_model.bin", "weights")
    del state["text_model.final_layer_norm.bias"]
    with pytest.raises(ValueError, match=r"pytorch_model.bin does not match .*config.json "
                                         r"\(keys named without 'text_model.'\): missing keys "
                                         r"\['final_layer_norm.bias'\]"):
        TextEncoder.from_pretrained(encoder_folder(tmp_path, state))
    state = {**read_weights(CLIP_DIR / "pytorch_model.bin", "weights"),
             "text_model.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        TextEncoder.from_pretrained(encoder_folder(tmp_path, state))
    with pytest.raises(ValueError, match=r"key 'encoder.layers.0.mlp.fc1.weight' has shape \(64, 16\) "
                                         r"but .*config.json implies \(32, 16\)"):
        TextEncoder.from_pretrained(encoder_folder(tmp_path, config={"intermediate_size": 32}))
    with pytest.raises(ValueError, match="lacks \\['hidden_size'\\]"):
        TextEncoder.from_pretrained(drop_config_key(encoder_folder(tmp_path), "hidden_size"))
    with pytest.raises(ValueError, match="act='relu' is not supported"):
        TextEncoder.from_pretrained(encoder_folder(tmp_path, config={"hidden_act": "relu"}))
    encoder_folder(tmp_path)
    (tmp_path / "enc" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="model.safetensors is not a safetensors file"):
        TextEncoder.from_pretrained(tmp_path / "enc")
    with pytest.raises(ValueError, match="ids have 78 positions but the text encoder has 77"):
        encoder = TextEncoder(TextConfig(vocab_size=10, width=8, layers=1, heads=2))
        encoder(torch.zeros(1, 78, dtype=torch.long))


def drop_config_key(folder, key):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg[key]
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder
