"""CLIP's text side, from scratch: the byte-level BPE tokenizer and the text transformer.

STAR (arXiv 2406.10797, section 3.2) conditions its image transformer on a frozen CLIP text encoder,
the Stable Diffusion 2.1 text tower (OpenCLIP ViT-H/14's text transformer minus its last layer: 1024
wide, 23 layers, 16 heads): its pooled feature makes the start token, its token states feed every
cross-attention. This file is the whole path from a caption to what star.py consumes:

    caption --Tokenizer--> ids (B, 77), mask (B, 77) --TextEncoder--> hidden (B, 77, C), pooled (B, C)

`Tokenizer` is OpenAI CLIP's BPE: it reads `bpe_simple_vocab_16e6.txt.gz` or a Hugging Face tokenizer
folder (vocab.json + merges.txt), and `Tokenizer.train` learns a small vocabulary from captions (the
bundled demo model stores it in its checkpoint, so it needs no vocabulary file). `TextEncoder` loads a
Hugging Face `CLIPTextModel` folder (config.json + model.safetensors or pytorch_model.bin), e.g. SD-2.1's
`text_encoder/`. train.py and sample.py build both halves and hand the outputs to star.py.

  python -c "import clip_text; print(clip_text.Tokenizer.from_file('bpe_simple_vocab_16e6.txt.gz')('a cat'))"
  python -m pytest -q tests/test_clip_text.py
"""
import gzip
import html
import json
import math
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

import weights

# -----------------------------------------------------------------------------
# The BPE tokenizer

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"  # glued to a word's last symbol: the "s" ending "cats" is not the "s" inside "cast"
# OpenAI's vocabulary file holds 262,144 merges, CLIP uses the first 48,894 of them:
# 256 byte symbols + 256 word-final byte symbols + 48,894 merges + SOT + EOT = 49,408 ids.
CLIP_NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """A printable character for each of the 256 byte values (byte -> str).

    BPE works on bytes, not characters: the UTF-8 bytes of any text (any script, emoji, control
    characters) are spelled with just 256 base symbols, so nothing is ever "unknown". But the merges
    and the vocabulary are stored and handled as text, where raw bytes are awkward: byte 0x20 (space)
    is the separator in the merges file, 0x0A ends its lines, 0x00-0x1F are invisible, and bytes
    0x80-0xFF alone are not valid UTF-8. So every byte gets a stand-in character: the 188 bytes that
    already look like a visible Latin-1 character ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves,
    and the other 68 (controls, space, DEL, no-break space, soft hyphen) are moved, in byte order, to
    the unused characters U+0100, U+0101, ... -- e.g. the space 0x20 becomes 'Ġ' (U+0120). The order
    of this table is also the order of the first 256 ids: '!' is id 0, which is why SD-2.1's padding
    id 0 decodes to '!'.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    hidden = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(hidden)})
    return table


def clean_text(text: str) -> str:
    """CLIP's normalisation: repair mojibake, unescape HTML, collapse whitespace, lowercase."""
    text = ftfy.fix_text(text)  # "cafÃ©" -> "café", curly quotes -> straight, control characters dropped
    # twice: scraped captions are often double-escaped ("&amp;amp;")
    text = html.unescape(html.unescape(text))
    text = re.sub(r"\s+", " ", text.strip()).strip()
    return text.lower()


# The pre-tokenizer: BPE never merges across these pieces. In order of priority: the special-token
# literals stay whole, English contractions split off ("it's" -> "it", "'s"), runs of letters,
# single digits (so "2024" is four pieces), runs of everything else; whitespace separates pieces
# and is dropped (the word-final marker remembers where a word ended).
PIECE_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every occurrence of `pair` in `symbols` (left to right, no overlaps) by the joined symbol."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class Tokenizer:
    """Byte-level BPE as in CLIP. `vocab` lists the token strings in id order; `merges` are ranked pairs.

    Every vocabulary built here is laid out like CLIP's: 256 byte symbols, their 256 word-final
    variants, one token per merge, then <|startoftext|> and <|endoftext|> as the last two ids.
    EOT being the largest id is what lets the text encoder pool at argmax(ids) for any vocabulary.
    This follows OpenAI's tokenizer, which the fixtures use as reference. (Hugging Face's CLIPTokenizer
    with SD-2.1's files differs on '!': it registers '!' as the padding token and splits every '!' of a
    prompt out as id 0, where OpenAI's BPE merges it like any other symbol.)
    """

    def __init__(self, vocab: list[str], merges: list[tuple[str, str]]):
        self.vocab = list(vocab)
        self.encoder = {token: i for i, token in enumerate(self.vocab)}
        if len(self.encoder) != len(self.vocab):
            raise ValueError("the vocabulary lists some token twice; every token needs exactly one id")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        word_final = (c + END_OF_WORD for c in self.byte_encoder.values())
        needed = [*self.byte_encoder.values(), *word_final, SOT, EOT]
        absent = [t for t in needed if t not in self.encoder]
        if absent:
            raise ValueError(f"the vocabulary lacks {len(absent)} required tokens, e.g. {absent[:3]} "
                             "(it needs the 256 byte symbols, their '</w>' variants, SOT and EOT)")
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        if self.eot_id != len(self.vocab) - 1:
            raise ValueError(f"{EOT} has id {self.eot_id}, expected the largest id {len(self.vocab) - 1}: "
                             "the text encoder pools at the largest id of each row")
        self.pad_id = 0  # what SD-2.1 pads with ('!'); harmless, since the mask hides padding
        self.merges = [tuple(m) for m in merges]
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        for a, b in self.merges:
            if a + b not in self.encoder:
                raise ValueError(f"merge {a!r} + {b!r} makes {a + b!r}, which is not in the vocabulary")
        self.cache: dict[str, list[str]] = {}  # piece -> its BPE tokens; captions repeat words a lot

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # --- building a tokenizer: from CLIP's files, from captions, from a checkpoint

    @staticmethod
    def vocab_from_merges(merges: list[tuple[str, str]]) -> list[str]:
        """CLIP's id layout: bytes, word-final bytes, one token per merge (first occurrence), SOT, EOT."""
        base = list(bytes_to_unicode().values())
        vocab = base + [c + END_OF_WORD for c in base]
        seen = set(vocab)
        for a, b in merges:
            if a + b not in seen:
                vocab.append(a + b)
                seen.add(a + b)
        return vocab + [SOT, EOT]

    @classmethod
    def from_file(cls, path, num_merges: int = CLIP_NUM_MERGES) -> "Tokenizer":
        """Read OpenAI's `bpe_simple_vocab_16e6.txt.gz` (its first `num_merges` merges, as CLIP does) or a
        Hugging Face tokenizer folder with vocab.json + merges.txt (e.g. SD-2.1's `tokenizer/`)."""
        path = Path(path)
        if path.is_dir():
            if not (path / "vocab.json").is_file() and (path / "tokenizer" / "vocab.json").is_file():
                path = path / "tokenizer"  # a whole Stable Diffusion folder
            return cls._from_hf_folder(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist: pass OpenAI's "
                                    "bpe_simple_vocab_16e6.txt.gz or a Hugging Face tokenizer folder with "
                                    "vocab.json and merges.txt")
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")[1:]  # line 0 is a version header
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"tokenizer file {path} could not be read ({type(e).__name__}): expected "
                             "OpenAI's bpe_simple_vocab_16e6.txt.gz or a text file of BPE merges") from None
        merges = cls._parse_merges(lines[:num_merges], path)
        return cls(cls.vocab_from_merges(merges), merges)

    @classmethod
    def _from_hf_folder(cls, folder: Path) -> "Tokenizer":
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"tokenizer folder {folder} has no {name}: a Hugging Face CLIP "
                                        "tokenizer folder holds vocab.json and merges.txt")
        token_to_id = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        if sorted(token_to_id.values()) != list(range(len(token_to_id))):
            raise ValueError(f"{folder / 'vocab.json'}: ids must be 0..{len(token_to_id) - 1} without gaps")
        vocab = sorted(token_to_id, key=token_to_id.get)
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = cls._parse_merges([ln for ln in lines if not ln.startswith("#version")],
                                   folder / "merges.txt")
        return cls(vocab, merges)

    @staticmethod
    def _parse_merges(lines: list[str], source: Path) -> list[tuple[str, str]]:
        merges = []
        for n, line in enumerate(lines):
            if not line:
                continue
            pair = line.split()
            if len(pair) != 2:
                raise ValueError(f"{source}: merge {n + 1} is {line!r}, "
                                 "expected two symbols separated by a space")
            merges.append(tuple(pair))
        return merges

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "Tokenizer":
        """Learn BPE merges from `texts` until the vocabulary has `vocab_size` ids (or nothing is left to
        merge).

        Same pipeline as encoding: clean, split into pieces, spell each piece in byte symbols with the
        word-final marker on its last symbol. Then repeatedly merge the most frequent adjacent pair
        (ties broken by the pair itself, so training is deterministic). Pair counts are updated only
        for the words that contain the merged pair, which keeps a few thousand captions to a second.
        """
        base = len(cls.vocab_from_merges([]))
        if vocab_size < base:
            raise ValueError(f"vocab_size={vocab_size} is too small: the base vocabulary alone has {base} "
                             "ids (256 bytes, 256 word-final bytes, SOT, EOT); ask for a few hundred more")
        byte_encoder = bytes_to_unicode()
        word_counts = Counter()
        for text in texts:
            for piece in PIECE_PATTERN.findall(clean_text(text)):
                if piece not in (SOT, EOT):
                    word_counts["".join(byte_encoder[b] for b in piece.encode("utf-8"))] += 1
        words = [list(w[:-1]) + [w[-1] + END_OF_WORD] for w in word_counts]  # each distinct piece, as symbols
        freqs = list(word_counts.values())
        pair_counts, where = Counter(), defaultdict(set)  # pair -> weighted count, pair -> words holding it
        for w, symbols in enumerate(words):
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += freqs[w]
                where[pair].add(w)
        merges, learned, tokens = [], set(), set(cls.vocab_from_merges([]))
        while len(tokens) < vocab_size and pair_counts:
            best = max(pair_counts, key=lambda p: (pair_counts[p], p))
            if best not in learned:  # a pair can reappear when another merge rebuilds one of its symbols
                merges.append(best)
                learned.add(best)
            tokens.add(best[0] + best[1])  # a new token, unless another merge already spelled the same string
            for w in where.pop(best):
                old, new = words[w], merge_pair(words[w], best)
                for pair in zip(old, old[1:]):
                    pair_counts[pair] -= freqs[w]
                for pair in zip(new, new[1:]):
                    pair_counts[pair] += freqs[w]
                    where[pair].add(w)
                for pair in zip(old, old[1:]):
                    if pair_counts[pair] <= 0:
                        del pair_counts[pair]
                words[w] = new
        return cls(cls.vocab_from_merges(merges), merges)

    def state_dict(self) -> dict:
        """Plain lists of strings (tokens never contain spaces), safe to torch.load with weights_only=True."""
        return {"vocab": list(self.vocab), "merges": [f"{a} {b}" for a, b in self.merges]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Tokenizer":
        if not isinstance(state, dict) or not {"vocab", "merges"} <= state.keys():
            raise ValueError("tokenizer state must be a dict with 'vocab' and 'merges' "
                             "(from Tokenizer.state_dict())")
        return cls(state["vocab"], [tuple(m.split(" ")) for m in state["merges"]])

    # --- using it

    def bpe(self, piece: str) -> list[str]:
        """Split one byte-spelled piece into vocabulary tokens: apply the lowest-ranked merge, repeat."""
        if piece in self.cache:
            return self.cache[piece]
        symbols = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda p: self.bpe_ranks.get(p, math.inf))
            if best not in self.bpe_ranks:
                break  # no adjacent pair has a merge: done
            symbols = merge_pair(symbols, best)
        self.cache[piece] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without SOT/EOT and without truncation."""
        ids = []
        for piece in PIECE_PATTERN.findall(clean_text(text)):
            if piece in (SOT, EOT):  # a literal "<|endoftext|>" in the text is the special token, as in CLIP
                ids.append(self.encoder[piece])
                continue
            spelled = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(spelled))
        return ids

    def decode(self, ids) -> str:
        """Text of `ids`: every word-final token ends in a space; invalid UTF-8 becomes U+FFFD."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= i < len(self.vocab)]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (ids 0..{len(self.vocab) - 1})")
        spelled = "".join(self.vocab[i] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in spelled)
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(self, texts: list[str] | str, context_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditioning input: ids and mask, both LongTensor (B, context_length).

        Each row is [SOT] + at most context_length - 2 text ids + [EOT], right-padded with id 0;
        the mask is 1 on SOT..EOT and 0 on the padding. Longer text is truncated (EOT kept) with a warning.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length={context_length} leaves no room for SOT and EOT; use 77")
        keep = context_length - 2
        ids_BT = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        mask_BT = torch.zeros((len(texts), context_length), dtype=torch.long)
        for b, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{b}] is a {type(text).__name__}, expected a string")
            ids = self.encode(text)
            if len(ids) > keep:
                shown = text if len(text) <= 40 else text[:37] + "..."
                warnings.warn(f"prompt {shown!r} has {len(ids)} tokens; the text encoder takes at most "
                              f"{keep} (context length {context_length} with SOT and EOT), so it was "
                              "truncated", stacklevel=2)
                ids = ids[:keep]
            row = [self.sot_id, *ids, self.eot_id]
            ids_BT[b, :len(row)] = torch.tensor(row)
            mask_BT[b, :len(row)] = 1
        return ids_BT, mask_BT


# -----------------------------------------------------------------------------
# The text transformer


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1024
    layers: int = 23
    heads: int = 16
    intermediate: int | None = None  # MLP hidden width; None means 4 * width
    act: str = "gelu"  # "gelu" (exact, erf; SD-2.1) or "quick_gelu" (x * sigmoid(1.702 x); OpenAI CLIP)
    eps: float = 1e-5  # LayerNorm epsilon
    # CLIP's encoder is causal: a word's state sees only the words before it. An encoder trained from
    # scratch may attend both ways, so that the first object of "a red circle to the left of a blue
    # square" knows it is on the left (see README, "The bundled model").
    causal: bool = True
    # the defaults are SD-2.1's text encoder (340,387,840 parameters)

    def __post_init__(self):
        if self.intermediate is None:
            self.intermediate = 4 * self.width
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act={self.act!r} is not supported: use 'gelu' or 'quick_gelu'")
        if self.layers < 1:
            raise ValueError(f"layers={self.layers}: the text encoder needs at least one layer")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")

    @classmethod
    def from_hf(cls, hf: dict, source="config.json") -> "TextConfig":
        """From a Hugging Face CLIPTextConfig dict (missing optional fields take Hugging Face's defaults)."""
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        absent = [k for k in required if k not in hf]
        if absent:
            raise ValueError(f"{source} lacks {absent}: "
                             "expected a CLIPTextConfig (config.json of a CLIPTextModel)")
        return cls(vocab_size=hf.get("vocab_size", 49408),
                   context_length=hf.get("max_position_embeddings", 77),
                   width=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                   intermediate=hf["intermediate_size"], act=hf.get("hidden_act", "quick_gelu"),
                   eps=hf.get("layer_norm_eps", 1e-5))


class SelfAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.heads = config.heads
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x_BTC: torch.Tensor, bias_B1TT: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        q = self.q_proj(x_BTC).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x_BTC).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x_BTC).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_B1TT)  # softmax(q k^T / sqrt(hs) + bias) v
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.intermediate)
        self.fc2 = nn.Linear(config.intermediate, config.width)
        self.act = config.act

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x_BTC)  # (B, T, intermediate)
        # QuickGELU is the sigmoid approximation OpenAI trained CLIP with; SD-2.1 (OpenCLIP) uses exact GELU
        h = F.gelu(h) if self.act == "gelu" else h * torch.sigmoid(1.702 * h)
        return self.fc2(h)


class Block(nn.Module):
    """Pre-LN transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.eps)
        self.self_attn = SelfAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = MLP(config)

    def forward(self, x_BTC: torch.Tensor, bias_B1TT: torch.Tensor) -> torch.Tensor:
        x_BTC = x_BTC + self.self_attn(self.layer_norm1(x_BTC), bias_B1TT)
        return x_BTC + self.mlp(self.layer_norm2(x_BTC))


class TextEncoder(nn.Module):
    """CLIP's text transformer. Module names follow the Hugging Face checkpoint layout (without its
    `text_model.` prefix), so released weights load by name and the state dict reads like SD-2.1's."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.ModuleDict(dict(
            token_embedding=nn.Embedding(config.vocab_size, config.width),
            position_embedding=nn.Embedding(config.context_length, config.width),  # learned, one per position
        ))
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(Block(config) for _ in range(config.layers))))
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.eps)
        self._init_weights()

    def _init_weights(self):
        """Initialisation for training from scratch (loading released weights overwrites it).

        The layers follow OpenAI CLIP. The token and position embeddings do not: CLIP draws them with
        std 0.02 and 0.01 (norm ~0.2 at width 128), while every block adds outputs of norm ~5 to the
        residual stream, so a word's identity and place are a few percent of the states the model
        reads. A small encoder trained with STAR from scratch then merged words that fill the same
        slot of a caption: the one of our first shapes model gave "white" and "black" the same states
        (cosine 0.9997), and that model drew a named white or black background half of the time. With
        unit-variance embeddings both stay as large as what the blocks add (cosine -0.08 after the same
        training; the background right 99.8% of the time).
        """
        C, L = self.config.width, self.config.layers
        attn_std, proj_std, fc_std = C ** -0.5, C ** -0.5 * (2 * L) ** -0.5, (2 * C) ** -0.5
        nn.init.normal_(self.embeddings.token_embedding.weight, std=1.0)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=1.0)
        for block in self.encoder.layers:
            attn, mlp = block.self_attn, block.mlp
            for linear, std in ((attn.q_proj, attn_std), (attn.k_proj, attn_std), (attn.v_proj, attn_std),
                                (attn.out_proj, proj_std), (mlp.fc1, fc_std), (mlp.fc2, proj_std)):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor | None = None,
                return_penultimate: bool = False):
        """Encode token ids (B, T), T <= context_length, with the optional attention mask (B, T) (1 = token).

        Returns (hidden (B, T, C) after the final LayerNorm, pooled (B, C)). pooled is the hidden state at
        the first occurrence of the largest id of each row, i.e. the first EOT: CLIP's and our trained
        vocabularies both give EOT the largest id. With return_penultimate=True a third tensor (B, T, C)
        holds the input of the last layer (the penultimate states) before the final LayerNorm; pass it
        through `self.final_layer_norm` for the normalised variant many text-to-image models use.
        Without a mask only the causal mask applies; outputs up to EOT are the same, padded positions differ.
        """
        B, T = ids_BT.shape
        if T > self.config.context_length:
            raise ValueError(f"ids have {T} positions but the text encoder has {self.config.context_length}")
        x_BTC = self.embeddings.token_embedding(ids_BT) + self.embeddings.position_embedding.weight[:T]
        # additive attention bias: query t sees the keys that are not padding, and with a causal encoder
        # only those <= t. finfo.min rather than -inf keeps a row that sees nothing (an all-zero mask)
        # finite instead of NaN
        allowed_B1TT = torch.ones(T, T, dtype=torch.bool, device=ids_BT.device)[None, None]
        if self.config.causal:
            allowed_B1TT = allowed_B1TT.tril()
        if mask_BT is not None:
            allowed_B1TT = allowed_B1TT & mask_BT.bool()[:, None, None, :]
        bias_B1TT = torch.zeros(allowed_B1TT.shape, dtype=x_BTC.dtype, device=x_BTC.device)
        bias_B1TT = bias_B1TT.masked_fill(~allowed_B1TT, torch.finfo(x_BTC.dtype).min)
        for block in self.encoder.layers[:-1]:
            x_BTC = block(x_BTC, bias_B1TT)
        penultimate_BTC = x_BTC  # (B, T, C), the input of the last layer
        x_BTC = self.encoder.layers[-1](x_BTC, bias_B1TT)
        hidden_BTC = self.final_layer_norm(x_BTC)
        pooled_BC = hidden_BTC[torch.arange(B, device=ids_BT.device), ids_BT.argmax(dim=-1)]
        if return_penultimate:
            return hidden_BTC, pooled_BC, penultimate_BTC
        return hidden_BTC, pooled_BC

    # --- loading released weights

    @classmethod
    def from_pretrained(cls, folder) -> "TextEncoder":
        """Load a Hugging Face CLIPTextModel folder: config.json + model.safetensors (or pytorch_model.bin).
        A Stable Diffusion folder works too (its text_encoder/ is used). Returns the model in eval mode."""
        folder = Path(folder)
        expected = ("a Hugging Face CLIPTextModel folder with config.json and model.safetensors or "
                    "pytorch_model.bin")
        if not folder.is_dir():
            raise FileNotFoundError(f"text encoder folder {folder} does not exist: expected {expected}")
        if not (folder / "config.json").is_file() and (folder / "text_encoder" / "config.json").is_file():
            folder = folder / "text_encoder"
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} has no config.json: expected {expected}")
        config = TextConfig.from_hf(json.loads(config_path.read_text()), source=config_path)
        names = ("model.safetensors", "pytorch_model.bin")
        file = next((folder / n for n in names if (folder / n).is_file()), None)
        if file is None:
            raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin: "
                                    f"expected {expected}")
        read = weights.read_safetensors if file.suffix == ".safetensors" else weights.read_weights
        state = read(file, "text encoder weights")
        if not isinstance(state, dict):
            raise ValueError(f"text encoder weights {file} hold a {type(state).__name__}, expected a dict of "
                             "tensors")
        # Hub files name keys "text_model.<name>"; older ones also store the constant position_ids buffer
        state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
        with torch.device("meta"):  # no memory and no random init for weights about to be replaced
            model = cls(config)
        own = model.state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(f"{file} does not match {config_path} (keys named without 'text_model.'): "
                             f"missing keys {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''} ({len(missing)}), unexpected keys "
                             f"{unexpected[:4]}{' ...' if len(unexpected) > 4 else ''} ({len(unexpected)})")
        for k, v in own.items():
            if state[k].shape != v.shape:
                raise ValueError(f"{file}: key {k!r} has shape {tuple(state[k].shape)} but {config_path} "
                                 f"implies {tuple(v.shape)}")
        model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
        return model.eval()
