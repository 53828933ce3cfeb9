"""Tokenizers for SD3's three text encoders: CLIP's byte-level BPE (CLIP-L and CLIP-G share it) and T5's
SentencePiece unigram model. Both produce fixed-length id tensors exactly as diffusers' StableDiffusion3Pipeline
asks transformers for them (padding="max_length", truncation=True).

CLIP (files `vocab.json` + `merges.txt`, as in the diffusers folders tokenizer/ and tokenizer_2/):
  text -> NFC, runs of whitespace -> one space, lower case
       -> split into words, single digits and punctuation runs (CLIP's regex; "'s", "'t", ... are their own words)
       -> bytes of each word mapped to printable stand-in characters (the GPT-2 byte table), '</w>' glued to the
          last character, then the BPE merges in priority order
       -> [BOS 49406] + at most 75 tokens + [EOS 49407], padded to 77.
  OpenAI's own tokenizer also runs ftfy and html.unescape ("&amp;" -> "&"); transformers, and hence diffusers, do
  not, and neither do we. The pad token is per encoder: CLIP-L pads with EOS (49407), CLIP-G with "!" (id 0). Like
  transformers we register the pad token as a special token, so for CLIP-G a "!" typed in the prompt becomes id 0
  ("!" as a special token) instead of 256 ("!</w>"): a quirk of the SD3 tokenizer_2 files that diffusers has too.

  vocab.json layout (openai/clip-vit-large-patch14, and our own tiny vocabulary): ids 0..255 are the 256 byte
  characters, 256..511 the same with '</w>', then one token per merge in merges.txt order, then <|startoftext|>
  and <|endoftext|> as the two last ids. merges.txt is "#version: 0.2" then one "left right" pair per line.

T5 (file `spiece.model`, a serialized SentencePiece ModelProto; or `tokenizer.json`): pieces are whole words or
  word parts, a leading "▁" marks a preceding space; <pad> = 0, </s> = 1, <unk> = 2, no BOS. Text is normalised
  (NFKC plus SentencePiece's own table), whitespace runs collapse, then the most likely segmentation under the
  unigram model is chosen. Output: tokens + [1], truncated to max_length - 1 tokens first, padded with 0 to
  max_length (256 by default in diffusers, up to 512).

Truncation is never silent: a warning says which prompt lost how many tokens, and what was cut off.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .errors import CheckpointError, InputError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512  # T5 v1.1 was trained on 512-token inputs; diffusers refuses more
# CLIP's word splitter (OpenAI simple_tokenizer): the special tokens, English contractions, runs of letters,
# single digits, and runs of anything that is neither a letter, a digit nor whitespace.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_chars() -> list[str]:
    """The GPT-2/CLIP byte table: entry b is the printable character that stands for byte b inside BPE tokens.
    Printable Latin-1 bytes stand for themselves ('!'..'~', '¡'..'¬', '®'..'ÿ'); the other 68 bytes (controls,
    space, soft hyphen, ...) get the characters chr(256), chr(257), ... in byte order. The vocabulary lists the
    256 characters in *this* order: printable ones first, so id 0 is '!' and id 32 is 'A'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: b for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = 256 + extra
    return [chr(table[b]) for b in printable] + [chr(table[b]) for b in range(256) if b not in printable]


def clip_vocab(merges: Sequence[str]) -> list[str]:
    """Token strings in id order for a CLIP-layout vocabulary built from merges ("left right" strings)."""
    base = byte_chars()
    return base + [c + "</w>" for c in base] + ["".join(m.split()) for m in merges] + [BOS, EOS]


def write_clip_files(dest: str | os.PathLike, merges: Sequence[str]) -> None:
    """Write vocab.json and merges.txt in the openai/clip-vit-large-patch14 layout (see the module docstring)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab(merges)
    if len(set(vocab)) != len(vocab):
        raise ValueError("merges produce a token twice; not a valid BPE merge list")
    (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), "utf-8")


def _warn_truncated(name: str, prompt: str, kept: int, total: int, dropped_text: str) -> None:
    head = prompt if len(prompt) <= 40 else prompt[:37] + "..."
    warnings.warn(f"{name}: the prompt {head!r} is {total} tokens long; {name} reads at most {kept}, so the last "
                  f"{total - kept} were dropped: {dropped_text[:200]!r}. Shorten the prompt to keep them.",
                  stacklevel=3)


class CLIPTokenizer:
    """CLIP byte-level BPE through the `tokenizers` library. Calling it on a list of prompts gives int64 ids
    [B, max_length]: BOS, up to max_length - 2 tokens, EOS, then pad_token."""

    def __init__(self, vocab_file: str | os.PathLike, merges_file: str | os.PathLike, pad_token: str = EOS,
                 max_length: int = CLIP_MAX_LENGTH, name: str = "CLIP"):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        self.name, self.max_length = name, max_length
        vocab_file, merges_file = Path(vocab_file), Path(merges_file)
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise CheckpointError(f"{f}: no such file; a CLIP tokenizer folder needs vocab.json and merges.txt "
                                      f"(copy them from the diffusers folder tokenizer/ of any SD3 model)")
        try:
            vocab = json.loads(vocab_file.read_text("utf-8"))
            if not (isinstance(vocab, dict) and all(isinstance(v, int) for v in vocab.values())):
                raise ValueError("not a JSON object of token -> id")
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{vocab_file}: not a CLIP vocab.json ({e})") from None
        for tok in (BOS, EOS, pad_token):
            if tok not in vocab:
                raise CheckpointError(f"{vocab_file}: has no token {tok!r}; this is not a CLIP vocabulary")
        try:
            lines = merges_file.read_text("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{merges_file}: not a text file ({e})") from None
        merges = [tuple(m.split(" ")) for m in lines if m and not m.startswith("#version")]
        bad = [" ".join(m) for m in merges if len(m) != 2 or "".join(m) not in vocab]
        if bad:
            raise CheckpointError(f"{merges_file}: {len(bad)} lines are not merges of {vocab_file.name} "
                                  f"(first: {bad[0][:60]!r}); vocab.json and merges.txt must come from the same folder")
        self.vocab_size = len(vocab)
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]

        tk = Tokenizer(BPE(vocab, merges, unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix="",
                           fuse_unk=False))
        tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                              normalizers.Lowercase()])
        # Keep what the regex matches and drop the rest (whitespace), then map bytes to their stand-in characters.
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tk.decoder = decoders.ByteLevel()
        # Special tokens are matched in the raw prompt before anything else (so "<|endoftext|>" typed in a prompt is
        # EOS, and for CLIP-G "!" is the pad token, id 0).
        specials = dict.fromkeys((BOS, EOS, pad_token))
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self._tk = tk

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, pad_token: str | None = None, name: str = "CLIP") -> CLIPTokenizer:
        """A diffusers tokenizer folder. The pad token comes from `pad_token`, else from the folder's
        tokenizer_config.json / special_tokens_map.json, else EOS (CLIP-L's choice)."""
        folder = Path(folder)
        pad = pad_token or _special_token(folder, "pad_token") or EOS
        return cls(folder / "vocab.json", folder / "merges.txt", pad_token=pad, name=name)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = _check_prompts(prompts)
        keep = self.max_length - 2
        out = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.int64)
        for i, enc in enumerate(self._tk.encode_batch(prompts, add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > keep:
                _warn_truncated(self.name, prompts[i], keep, len(ids), self.decode(ids[keep:]))
                ids = ids[:keep]
            row = [self.bos_id, *ids, self.eos_id]
            out[i, : len(row)] = torch.tensor(row)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._tk.decode(list(ids)).replace("</w>", " ").strip()


class T5Tokenizer:
    """T5's SentencePiece model, read with `sentencepiece` from spiece.model, or with `tokenizers` from a
    tokenizer.json. Calling it gives int64 ids [B, max_length]: tokens, EOS (1), pad (0)."""

    def __init__(self, path: str | os.PathLike, max_length: int = 256, name: str = "T5"):
        self.path, self.name = Path(path), name
        self.max_length = check_t5_length(max_length)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file; a T5 tokenizer folder needs spiece.model (or "
                                  f"tokenizer.json), as in the diffusers folder tokenizer_3/")
        if self.path.suffix == ".json":
            self._sp, self._tk = None, _load_tokenizer_json(self.path)
            vocab = self._tk.get_vocab(with_added_tokens=True)
            self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
            ids = {t: vocab.get(t) for t in ("<pad>", "</s>", "<unk>")}
        else:
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
            except (RuntimeError, OSError) as e:
                raise CheckpointError(f"{self.path}: not a SentencePiece model ({str(e).strip()[:120]}); "
                                      f"tokenizer_3/spiece.model of an SD3 model is one") from None
            self._tk = None
            self.vocab_size = self._sp.get_piece_size()
            ids = {t: self._sp.piece_to_id(t) for t in ("<pad>", "</s>", "<unk>")}
            # transformers splits special-token strings out of the text before the model sees it; do the same.
            specials = [self._sp.id_to_piece(i) for i in range(self.vocab_size)
                        if self._sp.is_control(i) or self._sp.is_unknown(i)]
            self._special = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
        if ids != {"<pad>": 0, "</s>": 1, "<unk>": 2}:
            raise CheckpointError(f"{self.path}: not a T5 tokenizer: expected <pad> = 0, </s> = 1, <unk> = 2, "
                                  f"found {ids}")
        self.eos_id, self.pad_id = 1, 0

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, max_length: int = 256, name: str = "T5") -> T5Tokenizer:
        folder = Path(folder)
        path = folder / "spiece.model"
        if not path.is_file() and (folder / "tokenizer.json").is_file():
            path = folder / "tokenizer.json"
        return cls(path, max_length=max_length, name=name)

    def _encode(self, text: str) -> list[int]:
        if self._tk is not None:
            return self._tk.encode(text, add_special_tokens=False).ids
        if self._special is None:
            return self._sp.encode(text)
        ids, pos = [], 0
        for m in self._special.finditer(text):
            ids += self._sp.encode(text[pos : m.start()]) + [self._sp.piece_to_id(m.group())]
            pos = m.end()
        return ids + self._sp.encode(text[pos:])

    def __call__(self, prompts: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        prompts = _check_prompts(prompts)
        length = check_t5_length(max_length or self.max_length)
        out = torch.full((len(prompts), length), self.pad_id, dtype=torch.int64)
        for i, p in enumerate(prompts):
            ids = self._encode(p)
            if len(ids) > length - 1:
                _warn_truncated(self.name, p, length - 1, len(ids), self.decode(ids[length - 1 :]))
                ids = ids[: length - 1]
            row = [*ids, self.eos_id]
            out[i, : len(row)] = torch.tensor(row)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._tk.decode(list(ids)) if self._tk is not None else self._sp.decode(list(ids))


def check_t5_length(n: int) -> int:
    if not isinstance(n, int) or not 1 <= n <= T5_MAX_LENGTH:
        raise InputError(f"T5 sequence length {n!r} must be an integer in 1..{T5_MAX_LENGTH} (diffusers: "
                         f"max_sequence_length, default 256)")
    return n


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad or not prompts:
        raise InputError(f"prompts must be a non-empty list of strings; item {bad[0] if bad else 0} is "
                         f"{type(prompts[bad[0]]).__name__ if bad else 'missing'}")
    return prompts


def _special_token(folder: Path, name: str) -> str | None:
    """A special token's text from a transformers tokenizer folder (tokenizer_config.json wins over
    special_tokens_map.json; a token is a string or {"content": ...})."""
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / fname
        if f.is_file():
            try:
                tok = json.loads(f.read_text("utf-8")).get(name)
            except (UnicodeDecodeError, ValueError, AttributeError) as e:
                raise CheckpointError(f"{f}: not a valid tokenizer config ({e})") from None
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                return tok
    return None


def _load_tokenizer_json(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises plain Exception on a malformed file
        raise CheckpointError(f"{path}: not a tokenizers tokenizer.json ({str(e)[:120]})") from None


# ---------------------------------------------------------------------------------------------------------------------
# spiece.model -> tokenizer.json. transformers turns spiece.model into its own format through protobuf; without
# protobuf installed it cannot read the file at all. We read the few fields we need with a 20-line protobuf reader
# and write a tokenizer.json that transformers (and diffusers) load directly.
#
# Protobuf wire format: a message is a run of (key, value) with key = varint(field << 3 | wire_type); wire type 0 is
# a varint, 1 a fixed 8 bytes, 2 a varint length then that many bytes (strings, bytes, sub-messages), 5 fixed 4
# bytes. SentencePiece's ModelProto: field 1 = repeated SentencePiece {1: piece (string), 2: score (float), 3: type
# (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte)}; field 3 = NormalizerSpec {1: name, 2:
# precompiled_charsmap (bytes), 3: add_dummy_prefix, 4: remove_extra_whitespaces, ...}.

def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    def varint(i: int) -> tuple[int, int]:
        x = shift = 0
        while True:
            b = buf[i]
            x |= (b & 0x7F) << shift
            shift, i = shift + 7, i + 1
            if b < 0x80:
                return x, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i : i + n], i + n
        elif wire == 2:
            n, i = varint(i)
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def read_spiece(path: str | os.PathLike) -> tuple[list[tuple[str, float, int]], bytes]:
    """(pieces as (text, score, type) in id order, precompiled normalisation charsmap) of a SentencePiece model."""
    pieces: list[tuple[str, float, int]] = []
    charsmap = b""
    try:
        for field, value in _proto_fields(Path(path).read_bytes()):
            if field == 1:
                p = {1: b"", 2: b"\0\0\0\0", 3: 1} | dict(_proto_fields(value))
                pieces.append((p[1].decode("utf-8"), struct.unpack("<f", p[2])[0], p[3]))
            elif field == 3:
                charsmap = dict(_proto_fields(value)).get(2, b"")
    except (IndexError, ValueError, UnicodeDecodeError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path}: not a SentencePiece model ({e})") from None
    if not pieces:
        raise CheckpointError(f"{path}: not a SentencePiece model (no pieces)")
    return pieces, charsmap


def t5_tokenizer_json(spiece: str | os.PathLike) -> str:
    """The tokenizer.json (as text) that reproduces a T5 spiece.model with the `tokenizers` library: unigram model,
    SentencePiece's normaliser table, split on whitespace, '▁' before every word, '</s>' appended."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    pieces, charsmap = read_spiece(spiece)
    unk = [i for i, p in enumerate(pieces) if p[2] == 2]
    tk = Tokenizer(Unigram([(p, s) for p, s, _ in pieces], unk_id=unk[0] if unk else None, byte_fallback=False))
    if charsmap:
        tk.normalizer = normalizers.Precompiled(charsmap)
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t in (2, 3)])
    tk.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                      special_tokens=[("</s>", 1)])
    return tk.to_str(pretty=True)
