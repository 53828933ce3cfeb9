"""The `shapes` world: captioned pictures of one coloured shape on a coloured background, drawn with Pillow from a
seed, and a deterministic judge that reads a picture back into the same attributes.

It serves two purposes. weights/train_shapes.py trains the `shapes` model (SD3's architecture at toy size) on these
pictures, so that minisd35 has real weights that draw what they are asked. And the judge turns "does the image show
the prompt?" into a number (prompt-adherence accuracy over a fixed held-out prompt set): our small-scale stand-in for
the CLIP score that FP8 image-quality claims are usually made with. It lives in the package (not under weights/)
because the FP8 evaluation and the audit use it at run time; it needs nothing but Pillow and numpy.

A picture is 64 x 64 px and has five attributes:

    shape       circle, square, triangle, star, diamond, cross
    colour      red, orange, yellow, green, blue, purple, white, black   (the shape's fill)
    size        small (17 px across) or large (28 px across)
    position    3 x 3 grid: top left, top, top right, left, center, right, bottom left, bottom, bottom right
    background  one of the same 8 colours, never the shape's

Captions name them in a few word orders, e.g. "a small red circle on the left, blue background"; training captions
sometimes leave out the size, the position or the background (the picture then has a random one), so that a short
prompt like "a red circle on a blue background" works too. Small jitter (a few pixels of position, 8% of size, +-12
levels of colour) keeps the pictures from being copies of 6048 templates.

Held out: a fixed 5% of all full attribute combinations are never drawn for training (`is_heldout`); the test and
validation prompts are made of those combinations only (`heldout_prompts`), so the model has seen every attribute
value and most pairs, never the combination. Four (shape, colour) pairs are held out entirely (NOVEL_PAIRS): a
harder set that asks for a colour on a shape the model never saw in that colour.

The judge (`judge(image)` -> Reading): background = the palette colour nearest the median of the 2-pixel border;
the shape = the largest 4-connected region of pixels farther than 45 RGB levels from that median; its colour = the
palette colour nearest the median of its interior pixels; its position = the grid cell of its bounding-box centre;
its size = small when the longer bounding-box side is under 22.5 px; its shape = the template (each shape drawn once,
cropped to its bounding box, 24 x 24) with the highest IoU against the region cropped and resized the same way.
No learned weights: it is exact on the pictures this module draws (tests: >= 99% on the held-out set) and fails
visibly, not randomly, on bad ones.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SIDE = 64  # picture side in pixels
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {  # pairwise at least ~100 RGB levels apart
    "red": (210, 35, 35), "orange": (250, 135, 25), "yellow": (250, 225, 45), "green": (35, 160, 65),
    "blue": (40, 75, 220), "purple": (135, 55, 185), "white": (245, 245, 245), "black": (20, 20, 20),
}
SIZES = {"small": 0.135, "large": 0.22}  # half extent as a fraction of SIDE: 17 px and 28 px across
POSITIONS: dict[str, tuple[float, float]] = {  # bounding-box centre (x, y) as a fraction of SIDE
    "top left": (0.25, 0.25), "top": (0.5, 0.25), "top right": (0.75, 0.25),
    "left": (0.25, 0.5), "center": (0.5, 0.5), "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75), "bottom": (0.5, 0.75), "bottom right": (0.75, 0.75),
}
PHRASES = {  # how a caption says the position
    "top left": "at the top left", "top": "at the top", "top right": "at the top right", "left": "on the left",
    "center": "in the center", "right": "on the right", "bottom left": "at the bottom left", "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
ATTRIBUTES = ("shape", "colour", "size", "position", "background")
JITTER_POS, JITTER_SIZE, JITTER_RGB = 0.03, 0.08, 12
NOVEL_PAIRS = (("star", "green"), ("triangle", "purple"), ("cross", "yellow"), ("circle", "white"))
HELDOUT_FRACTION = 0.05
HELDOUT_SEED = 2024


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    def caption(self, template: int = 0) -> str:
        """The full caption in one of three word orders (template 0 is the one the evaluation prompts use)."""
        return caption(self, template=template)


# ---------------------------------------------------------------------------------------------------------------------
# Captions and the held-out split

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(s: Scene, *, template: int = 0, size: bool = True, position: bool = True, background: bool = True) -> str:
    """E.g. 'a small red circle on the left, blue background'. Templates: 0 '..., X background', 1 '... on a X
    background', 2 the same as 0 without the leading article. Attributes switched off are left out."""
    words = " ".join(w for w in (s.size if size else "", s.colour, s.shape) if w)
    text = words if template == 2 else f"{_article(words)} {words}"
    if position:
        text += " " + PHRASES[s.position]
    if background:
        bg = s.background
        text += f" on {_article(bg)} {bg} background" if template == 1 else f", {bg} background"
    return text


def all_scenes() -> list[Scene]:
    """Every full combination, in a fixed order (6 * 8 * 2 * 9 * 7 = 6048)."""
    return [Scene(sh, c, sz, p, bg) for sh, c, sz, p, bg in
            itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, COLOURS) if bg != c]


def _heldout_set() -> frozenset[Scene]:
    scenes = [s for s in all_scenes() if (s.shape, s.colour) not in NOVEL_PAIRS]
    rng = random.Random(HELDOUT_SEED)
    return frozenset(rng.sample(scenes, round(HELDOUT_FRACTION * len(scenes))))


HELDOUT = _heldout_set()


def is_heldout(s: Scene) -> bool:
    """True for scenes training must never draw: the held-out combinations and every novel (shape, colour) pair."""
    return s in HELDOUT or (s.shape, s.colour) in NOVEL_PAIRS


def heldout_prompts(split: str = "test", n: int | None = None) -> list[tuple[str, Scene]]:
    """The fixed evaluation prompts: (caption, scene) with template-0 captions. 'test' (200 prompts) and 'val' (the
    rest of the held-out combinations, 81) never overlap; 'novel' asks for the held-out (shape, colour) pairs (72)."""
    if split == "novel":
        scenes = [s for s in all_scenes() if (s.shape, s.colour) in NOVEL_PAIRS]
        scenes = random.Random(HELDOUT_SEED + 1).sample(scenes, 72)
    elif split in ("test", "val"):
        scenes = sorted(HELDOUT, key=lambda s: tuple(asdict(s).values()))
        random.Random(HELDOUT_SEED + 2).shuffle(scenes)
        scenes = scenes[:200] if split == "test" else scenes[200:]
    else:
        raise ValueError(f"unknown prompt split {split!r}; choose 'test', 'val' or 'novel'")
    out = [(s.caption(), s) for s in scenes]
    return out[:n] if n is not None else out


def tuning_prompts(n: int = 400) -> list[tuple[str, Scene]]:
    """n fixed prompts of combinations training does draw, for choosing sampler settings without touching the test
    prompts (the 77 val prompts alone are too few: one picture is 1.3%). Draw them from seeds 10000 + k."""
    scenes = [s for s in all_scenes() if not is_heldout(s)]
    return [(s.caption(), s) for s in random.Random(HELDOUT_SEED + 3).sample(scenes, n)]


def random_scene(rng: random.Random) -> Scene:
    """A uniformly drawn training scene (held-out combinations are redrawn)."""
    while True:
        bg = rng.choice(list(COLOURS))
        s = Scene(rng.choice(SHAPES), rng.choice([c for c in COLOURS if c != bg]), rng.choice(list(SIZES)),
                  rng.choice(list(POSITIONS)), bg)
        if not is_heldout(s):
            return s


def random_caption(s: Scene, rng: random.Random) -> str:
    """A training caption: a random word order, size left out 25% of the time, position 15%, background 15%."""
    return caption(s, template=rng.randrange(3), size=rng.random() >= 0.25, position=rng.random() >= 0.15,
                   background=rng.random() >= 0.15)


# ---------------------------------------------------------------------------------------------------------------------
# Drawing

def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of `shape` centred at (cx, cy) with half extent r (None for the circle, drawn as an ellipse). Every
    shape is upright and fills its 2r x 2r box, except the star (its lower points reach 0.81r below the centre)."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":  # five points, inner radius 0.45 r, first point straight up
        return [(cx + rr * math.sin(k * math.pi / 5), cy - rr * math.cos(k * math.pi / 5))
                for k in range(10) for rr in [r if k % 2 == 0 else 0.45 * r]]
    if shape == "cross":  # a plus sign with arms 0.7 r wide
        w = 0.35 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    pts = outline(shape, cx, cy, r)
    if pts is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(pts, fill=fill)


def render(s: Scene, rng: random.Random | int | None = None) -> Image.Image:
    """The picture of scene `s`, 64 x 64 RGB. With rng (a Random or a seed) the position, size and both colours are
    jittered; rng=None draws the exact template (no jitter)."""
    if isinstance(rng, int):
        rng = random.Random(rng)
    u = (lambda a: rng.uniform(-a, a)) if rng is not None else (lambda a: 0.0)

    def rgb(name: str) -> tuple[int, int, int]:
        return tuple(int(min(255, max(0, v + round(u(JITTER_RGB))))) for v in COLOURS[name])

    big = SIDE * SUPERSAMPLE
    px, py = POSITIONS[s.position]
    cx, cy = (px + u(JITTER_POS)) * big, (py + u(JITTER_POS)) * big
    r = SIZES[s.size] * (1 + u(JITTER_SIZE)) * big
    img = Image.new("RGB", (big, big), rgb(s.background))
    _draw_shape(ImageDraw.Draw(img), s.shape, cx, cy, r, rgb(s.colour))
    return img.resize((SIDE, SIDE), Image.BOX)


def render_batch(scenes: list[Scene], seed: int) -> np.ndarray:
    """uint8 [N, 64, 64, 3]; picture k is render(scenes[k], seed * 1_000_003 + k), so any slice can be redrawn alone."""
    return np.stack([np.asarray(render(s, seed * 1_000_003 + k)) for k, s in enumerate(scenes)])


# ---------------------------------------------------------------------------------------------------------------------
# The judge

TEMPLATE_SIDE = 24
MASK_THRESHOLD = 45.0  # RGB distance from the background that counts as "shape"
SMALL_MAX = 22.5  # px: longer bounding-box side below this is "small"
MIN_AREA = 12  # px: a smaller region is no shape at all


@dataclass(frozen=True)
class Reading:
    """What the judge sees in one picture; shape/colour/size/position are None when it finds no shape."""

    shape: str | None
    colour: str | None
    size: str | None
    position: str | None
    background: str
    area: int = 0
    iou: float = 0.0  # IoU of the best shape template (how clean the shape is)


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    d = ((np.array([COLOURS[n] for n in names], dtype=np.float64) - rgb[None]) ** 2).sum(1)
    return names[int(d.argmin())]


def _resize_mask(mask: np.ndarray) -> np.ndarray:
    im = Image.fromarray((mask * 255).astype(np.uint8)).resize((TEMPLATE_SIDE, TEMPLATE_SIDE), Image.BILINEAR)
    return np.asarray(im) >= 128


def _crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _templates() -> dict[str, np.ndarray]:
    out = {}
    for shape in SHAPES:
        img = Image.new("L", (256, 256), 0)
        _draw_shape(ImageDraw.Draw(img), shape, 128, 128, 100, 255)
        out[shape] = _resize_mask(_crop(np.asarray(img) >= 128))
    return out


TEMPLATES = _templates()


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (breadth-first search; a 64 x 64 picture is 4096 pixels)."""
    h, w = mask.shape
    label = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        current += 1
        label[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return label == best if best else np.zeros_like(mask)


def judge(image: Image.Image | np.ndarray) -> Reading:
    """Read one picture (PIL image or uint8 [H, W, 3]; resized to 64 x 64 if needed) into its attributes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (SIDE, SIDE):
        image = image.resize((SIDE, SIDE), Image.BOX)
    a = np.asarray(image).astype(np.float64)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                             a[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _nearest_colour(bg_rgb)
    region = _largest_component(np.sqrt(((a - bg_rgb) ** 2).sum(-1)) > MASK_THRESHOLD)
    area = int(region.sum())
    if area < MIN_AREA:
        return Reading(None, None, None, None, background, area)
    # Colour from the interior (pixels whose 4 neighbours are in the region too), away from anti-aliased edges.
    inner = region.copy()
    inner[1:] &= region[:-1]
    inner[:-1] &= region[1:]
    inner[:, 1:] &= region[:, :-1]
    inner[:, :-1] &= region[:, 1:]
    pixels = a[inner] if inner.sum() >= 4 else a[region]
    colour = _nearest_colour(np.median(pixels, axis=0))
    ys, xs = np.nonzero(region)
    cx, cy = (xs.min() + xs.max() + 1) / 2 / SIDE, (ys.min() + ys.max() + 1) / 2 / SIDE
    col = "left" if cx < 0.375 else ("right" if cx > 0.625 else "")
    row = "top" if cy < 0.375 else ("bottom" if cy > 0.625 else "")
    position = f"{row} {col}".strip() or "center"
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    size = "small" if extent < SMALL_MAX else "large"
    m = _resize_mask(_crop(region))
    ious = {k: float((m & t).sum() / max(1, (m | t).sum())) for k, t in TEMPLATES.items()}
    shape = max(ious, key=ious.get)
    return Reading(shape, colour, size, position, background, area, ious[shape])


def score(reading: Reading, asked: Scene) -> dict[str, bool]:
    """Per-attribute agreement, plus 'match': shape, colour and position all as asked (the headline criterion;
    size and background are reported beside it)."""
    got = {k: getattr(reading, k) == getattr(asked, k) for k in ATTRIBUTES}
    got["match"] = got["shape"] and got["colour"] and got["position"]
    return got


def accuracy(images: list[Image.Image], scenes: list[Scene]) -> dict[str, float]:
    """Fraction of pictures that match, overall ('match') and per attribute."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    rows = [score(judge(im), s) for im, s in zip(images, scenes)]
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("match", *ATTRIBUTES)}


# ---------------------------------------------------------------------------------------------------------------------
# Generating an evaluation set with a loaded pipeline

def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int | None = None, guidance: float | None = None,
             sampler: str | None = None, negative: str = "", batch: int = 64) -> list[Image.Image]:
    """Image k for prompts[k] from noise seed seeds[k], in batches: the same noise, conditioning, CFG order and
    sampler as `pipe(prompts[k], seed=seeds[k])` (equal up to the rounding of a bigger batch), several times faster
    than one call per prompt. `pipe` is a minisd35.pipeline.Pipeline (bf16, FP8, on any device)."""
    import torch

    from . import sampling

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    d = pipe.defaults
    steps = d.steps if steps is None else steps
    guidance = d.guidance if guidance is None else guidance
    sampler = sampler or d.sampler
    f = pipe.preset.vae.downscale
    out: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i : i + batch], seeds[i : i + batch]
        B, cfg = len(ps), guidance > 1
        ctx, pooled = pipe.encode_prompts([negative] * B + ps if cfg else ps)
        neg = (ctx[:B], pooled[:B]) if cfg else (None, None)
        ctx, pooled = (ctx[B:], pooled[B:]) if cfg else (ctx, pooled)
        shape = (B, pipe.mmdit.cfg.in_channels, d.height // f, d.width // f)
        x = sampling.noise(shape, [torch.Generator("cpu").manual_seed(s) for s in ss], pipe.device, pipe.dtype)
        with pipe.denoising() as model:  # the pipeline's own forward (fused, FP8 attention, ...), not the bare MMDiT
            x = sampling.sample(model, x, ctx, pooled, *neg, sigmas=sampling.sigmas(steps, d.shift),
                                guidance=guidance, sampler=sampler)
        out += pipe.decode(x)
    return out
