"""Train minisd35's own small tokenizers, deterministically, on a built-in corpus:

    weights/tokenizers/clip/vocab.json, merges.txt   CLIP-format byte-level BPE, exactly 1000 tokens
    weights/tokenizers/t5/spiece.model               T5-format SentencePiece unigram model, exactly 1000 pieces

They serve the `tiny` preset (CLIP vocab 1000 with <|startoftext|> = 998 and <|endoftext|> = 999; T5 vocab 1000 with
<pad> = 0, </s> = 1, <unk> = 2) and a later toy model trained on pictures of coloured shapes. The corpus is captions
of such pictures ("a small red circle on the left, blue background") plus a few hundred common English words in short
sentences, so that an ordinary prompt ("a red cube on a table") still splits into sensible pieces.

CLIP layout (as openai/clip-vit-large-patch14): ids 0..255 byte characters, 256..511 the same with '</w>', then one
token per merge, then <|startoftext|>, <|endoftext|>. 1000 = 512 + 486 merges + 2, so we train a BPE with the
`tokenizers` trainer (same normalisation and word splitting as minisd35.tokenizers.CLIPTokenizer) and keep its first
486 merges: any prefix of a BPE merge list is itself a valid merge list.

Run:  python weights/train_tokenizers.py [--out weights/tokenizers]
Running it again reproduces the committed files byte for byte (tests/test_text.py checks this).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minisd35.tokenizers import CLIP_SPLIT, EOS, CLIPTokenizer, byte_chars, write_clip_files  # noqa: E402

VOCAB_SIZE = 1000
SEED = 1234

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring", "heart", "pentagon",
          "octagon", "rectangle", "oval", "ellipse", "arrow", "crescent", "moon", "cube", "sphere", "cylinder", "cone",
          "pyramid", "line", "dot", "spiral", "wave", "stripe", "disk", "blob", "shape"]
COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "magenta", "white", "black", "gray",
           "grey", "brown", "teal", "navy", "gold", "silver", "beige", "olive", "maroon", "lime", "violet", "indigo",
           "turquoise", "dark red", "light blue", "dark green", "light gray", "pale yellow", "bright orange"]
SIZES = ["tiny", "small", "medium", "large", "big", "huge", "little", "medium-sized"]
POSITIONS = ["left", "right", "top", "bottom", "center", "middle", "top left", "top right", "bottom left",
             "bottom right", "upper left", "upper right", "lower left", "lower right", "left side", "right side",
             "top edge", "bottom edge"]
TEXTURES = ["plain", "striped", "dotted", "checkered", "gradient", "solid", "noisy", "textured"]
RELATIONS = ["above", "below", "next to", "inside", "beside", "to the left of", "to the right of", "on top of",
             "under", "near", "far from", "behind", "in front of"]
COUNTS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "several", "many", "a few"]

# A few hundred common English words (function words, everyday nouns, verbs, adjectives), for ordinary prompts.
COMMON = """the of and to in is you that it he was for on are as with his they i at be this have from or one had by
word but not what all were we when your can said there use an each which she do how their if will up other about out
many then them these so some her would make like him into time has look more write go see number no way could people
my than first water been call who its now find long down day did get come made may part over new sound take only
place year live me back give most very after thing our just name good sentence man think say great where help through
much before move right boy old too same tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page should country found
answer school grow study still learn plant cover food sun four between state keep eye never last let thought city
tree cross farm hard start might story saw far sea draw left late run while press close night real life few north
open seem together next white children begin got walk example ease paper group always music those both mark often
letter until mile river car feet care second book carry took science eat room friend began idea fish mountain stop
once base hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red list
though feel talk bird soon body dog family direct pose leave song measure door product black short numeral class
wind question happen complete ship area half rock order fire south problem piece told knew pass since top whole king
space heard best hour better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against pattern slow center love
person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead
cry dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood contain
front teach week final gave green oh quick develop ocean warm free minute strong special mind behind clear tail
produce fact street inch multiply nothing course stay wheel full force blue object decide surface deep moon island
foot system busy test record boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape
equate hot miss brought heat snow tire bring yes distant fill east paint language among photo photograph painting
drawing portrait landscape sky cloud flower grass garden beach forest lake bridge castle window chair bed cup glass
bottle ball toy robot cat kitten puppy bear lion tiger elephant monkey rabbit mouse cake apple banana orange bread
pizza coffee shirt hat shoe dress bag phone computer camera lamp clock sofa kitchen bathroom office train bus bicycle
airplane rocket planet galaxy night sunset sunrise winter summer spring autumn rainy sunny snowy foggy beautiful
cute happy sad angry old new shiny wooden metal plastic glass soft smooth rough bright dim colorful realistic cartoon
detailed simple minimal abstract""".split()

TEMPLATES = [
    "a {size} {colour} {shape} on the {pos}, {colour2} background",
    "a {colour} {shape} in the {pos} of a {colour2} background",
    "{count} {colour} {shape}s on a {texture} {colour2} background",
    "a {size} {colour} {shape} {rel} a {size2} {colour2} {shape2}",
    "{size} {shape}, {colour}, {pos}",
    "a {texture} {colour} {shape} at the {pos}",
    "the {shape} is {colour} and {size}, the background is {colour2}",
    "{colour} {shape} and {colour2} {shape2} on {texture} {colour3}",
    "a picture of a {size} {colour} {shape}",
    "a {colour} {shape} {rel} a {colour2} {shape2}, {colour3} background",
]


def corpus() -> list[str]:
    """The training text: 12000 shape captions and the common words in short sentences, in a fixed order."""
    r = random.Random(SEED)
    lines = []
    for _ in range(12000):
        t = r.choice(TEMPLATES)
        lines.append(t.format(size=r.choice(SIZES), size2=r.choice(SIZES), colour=r.choice(COLOURS),
                              colour2=r.choice(COLOURS), colour3=r.choice(COLOURS), shape=r.choice(SHAPES),
                              shape2=r.choice(SHAPES), pos=r.choice(POSITIONS), texture=r.choice(TEXTURES),
                              rel=r.choice(RELATIONS), count=r.choice(COUNTS)))
    words = list(dict.fromkeys(COMMON))
    for w in words:
        lines += [f"a photo of a {w}", f"the {w} is here", w]
    for a, b in itertools.islice(itertools.permutations(words[:120], 2), 0, None, 7):
        lines.append(f"{a} {b}")
    lines += [f"{n} {s}s" for n in range(10) for s in SHAPES]
    # Capitalised sentences, inflected words and numbers, as real prompts have them.
    lines += [ln[0].upper() + ln[1:] + "." for ln in lines[:3000]]
    lines += [f"{w}s {w}ing {w}ed {w.capitalize()}" for w in words]
    lines += [f"{n} {r.choice(SHAPES)}s in {1900 + n} at {n % 24}:{n % 60:02d}" for n in range(0, 500, 3)]
    return lines


def train_clip(lines: list[str], out: Path) -> None:
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tk = Tokenizer(BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                          normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    n_merges = VOCAB_SIZE - 512 - 2
    trainer = trainers.BpeTrainer(vocab_size=4000, min_frequency=2, show_progress=False, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(lines, trainer=trainer)
    merges = json.loads(tk.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges][:n_merges]
    if len(merges) != n_merges:
        raise SystemExit(f"the corpus yields only {len(merges)} merges, {n_merges} are needed")
    write_clip_files(out, merges)
    tok = CLIPTokenizer(out / "vocab.json", out / "merges.txt")
    assert tok.vocab_size == VOCAB_SIZE and (tok.bos_id, tok.eos_id) == (998, 999), (tok.vocab_size, tok.bos_id)
    assert json.loads((out / "vocab.json").read_text("utf-8"))["!"] == 0 and byte_chars()[0] == "!"
    assert json.loads((out / "vocab.json").read_text("utf-8"))[EOS] == VOCAB_SIZE - 1


def train_t5(lines: list[str], out: Path) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    # One thread and no sampling or shuffling of the input: the same corpus gives the same model, byte for byte.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=VOCAB_SIZE, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, normalization_rule_name="nmt_nfkc", num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiece.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(out / "spiece.model"))
    assert sp.get_piece_size() == VOCAB_SIZE
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "weights" / "tokenizers")
    args = ap.parse_args(argv)
    lines = corpus()
    train_clip(lines, args.out / "clip")
    train_t5(lines, args.out / "t5")
    print(f"wrote {args.out}/clip/vocab.json, merges.txt and {args.out}/t5/spiece.model ({len(lines)} lines of corpus)")


if __name__ == "__main__":
    main()
