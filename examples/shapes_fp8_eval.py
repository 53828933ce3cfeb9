"""What FP8 does to a trained model's pictures: the `shapes` model under each FP8 policy vs bf16, over the fixed
held-out prompt set, on any device (on a CPU every FP8 layer runs the plain-torch "ref" implementation, which is
the numerical definition the GPU kernels are tested against, so the pictures are what an FP8 GPU would draw up to
accumulation order).

    python examples/shapes_fp8_eval.py                          # all held-out test prompts, default policies
    python examples/shapes_fp8_eval.py --prompts 50 --out /tmp/fp8
    python examples/shapes_fp8_eval.py --policies default,default+fp8attn,bf16+fp8attn   # FP8 attention too

For each precision (fp32, and each FP8 policy; bf16 is the reference) the same prompts are drawn from the same seeds
and compared with the bf16 pictures:

    adherence   fraction of pictures whose shape, colour and position the judge (minisd35/shapes.py) reads as asked;
                our small-scale stand-in for the CLIP score FP8 claims are made with (the commonly quoted figure for
                FP8 SD3.5 is a 1.9% CLIP-score drop); "drop" is relative: (bf16 - policy) / bf16
    flips       fraction of prompts where the judge's reading (all five attributes) differs from bf16's
    PSNR        10 log10(255^2 / MSE) over all pixels of all pictures, against the bf16 pictures
    MAE         mean absolute pixel error in 0..255 levels, against the bf16 pictures

fp32 vs bf16 is the noise floor: how far two "exact" precisions already disagree.

Writes OUT/shapes_fp8.json (settings, per-policy metrics, per-prompt readings, a markdown table) and
OUT/shapes_fp8_grid.png (one row per prompt: the prompt, the bf16 picture, then per policy the FP8 picture and
|FP8 - bf16| amplified x8). The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minisd35 import shapes as S  # noqa: E402
from minisd35.pipeline import load_pipeline  # noqa: E402

POLICIES = ("default", "row", "tensor", "weight-only")
FP8_ATTENTION = "fp8attn"  # the suffix: POLICY+fp8attn (or bf16+fp8attn) runs attention in E4M3 too
AMPLIFY = 8


def run(model: Path, precision: str, prompts: list[str], seeds: list[int], device: str, steps: int | None,
        guidance: float | None) -> tuple[list[Image.Image], dict]:
    """Pictures for one precision: 'bf16', 'fp32' or an FP8 policy (bf16 activations around the FP8 layers), each
    optionally with '+fp8attn': attention in E4M3 as well (load_pipeline(attention="fp8"))."""
    base, _, extra = precision.partition("+")
    if extra not in ("", FP8_ATTENTION):
        raise SystemExit(f"error: {precision!r}: the only suffix is +{FP8_ATTENTION}")
    dtype = torch.float32 if base == "fp32" else torch.bfloat16
    fp8 = None if base in ("bf16", "fp32") else base
    pipe = load_pipeline(model, dtype=dtype, device=device, fp8=fp8, attention="fp8" if extra else "auto")
    t0 = time.perf_counter()
    images = S.generate(pipe, prompts, seeds, steps=steps, guidance=guidance)
    meta = {"seconds": round(time.perf_counter() - t0, 1), "steps": steps or pipe.defaults.steps,
            "guidance": pipe.defaults.guidance if guidance is None else guidance, "sampler": pipe.defaults.sampler}
    report = getattr(pipe.mmdit, "quant_report", None)
    if report is not None:
        meta["layers"] = str(report)
    return images, meta


def compare(images: list[Image.Image], ref: list[Image.Image]) -> dict:
    a = np.stack([np.asarray(im, dtype=np.float64) for im in images])
    b = np.stack([np.asarray(im, dtype=np.float64) for im in ref])
    mse = float(((a - b) ** 2).mean())
    return {"psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse > 0 else float("inf"),
            "mae_levels": round(float(np.abs(a - b).mean()), 3),
            "identical_images": int(sum(bool((x == y).all()) for x, y in zip(a, b)))}


def grid(prompts: list[str], columns: dict[str, list[Image.Image]], ref: str, rows: int, scale: int = 2) -> Image.Image:
    """Rows of [prompt | bf16 | policy, |diff| x8 | ...]."""
    cell, text_w, head = S.SIDE * scale, 190, 16
    names = [n for n in columns if n != ref]
    labels = [ref] + [x for n in names for x in (n, f"|diff| x{AMPLIFY}")]
    out = Image.new("RGB", (text_w + len(labels) * (cell + 4), head + rows * (cell + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for j, label in enumerate(labels):
        draw.text((text_w + j * (cell + 4) + 2, 2), label, fill=(0, 0, 0))
    for i in range(min(rows, len(prompts))):
        y = head + i * (cell + 4)
        words, line, lines = prompts[i].split(), "", []
        for w in words:  # wrap at ~30 characters
            if line and len(line) + len(w) >= 30:
                lines.append(line)
                line = ""
            line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines[: cell // 11]):
            draw.text((4, y + 4 + 11 * k), text, fill=(0, 0, 0))
        base = columns[ref][i]
        tiles = [base]
        for n in names:
            im = columns[n][i]
            diff = np.abs(np.asarray(im, dtype=np.int16) - np.asarray(base, dtype=np.int16)) * AMPLIFY
            tiles += [im, Image.fromarray(np.clip(diff, 0, 255).astype(np.uint8))]
        for j, t in enumerate(tiles):
            out.paste(t.resize((cell, cell), Image.NEAREST), (text_w + j * (cell + 4), y))
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| precision | adherence | drop vs bf16 | flips vs bf16 | PSNR vs bf16 (dB) | MAE vs bf16 (levels) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        drop = "-" if r["name"] == "bf16" or r["drop"] is None else f"{r['drop']:+.1%}"
        psnr = "-" if r["name"] == "bf16" else f"{r['psnr_db']:.1f}"
        mae = "-" if r["name"] == "bf16" else f"{r['mae_levels']:.2f}"
        flips = "-" if r["name"] == "bf16" else f"{r['flips']:.1%}"
        lines.append(f"| {r['name']} | {r['adherence']:.1%} | {drop} | {flips} | {psnr} | {mae} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "weights" / "shapes")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help=f"comma-separated FP8 policies (or .json files); NAME+{FP8_ATTENTION} adds FP8 attention")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 noise-floor run")
    ap.add_argument("--split", default="test", choices=["test", "val", "novel"])
    ap.add_argument("--prompts", type=int, help="use the first N prompts of the split (default: all)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=8, help="prompts shown in the grid")
    ap.add_argument("--out", type=Path, default=Path("shapes_fp8"))
    args = ap.parse_args(argv)
    if not (args.model / "transformer").is_dir():
        print(f"error: no trained shapes model in {args.model} (see weights/README.md)", file=sys.stderr)
        return 1

    items = S.heldout_prompts(args.split, args.prompts)
    prompts, scenes = [p for p, _ in items], [s for _, s in items]
    seeds = list(range(len(prompts)))
    names = ["bf16"] + ([] if args.no_fp32 else ["fp32"]) + [p for p in args.policies.split(",") if p]
    pictures: dict[str, list[Image.Image]] = {}
    rows, readings = [], {}
    for name in names:
        images, meta = run(args.model, name, prompts, seeds, args.device, args.steps, args.guidance)
        pictures[name] = images
        reads = [S.judge(im) for im in images]
        readings[name] = [[r.shape, r.colour, r.size, r.position, r.background] for r in reads]
        scores = [S.score(r, s) for r, s in zip(reads, scenes)]
        row = {"name": name, "adherence": sum(s["match"] for s in scores) / len(scores),
               **{k: sum(s[k] for s in scores) / len(scores) for k in S.ATTRIBUTES}, **meta}
        if name != "bf16":
            row.update(compare(images, pictures["bf16"]))
            row["flips"] = sum(a != b for a, b in zip(readings[name], readings["bf16"])) / len(scenes)
            base = rows[0]["adherence"]
            row["drop"] = (base - row["adherence"]) / base if base else None
        rows.append(row)
        extra = f", PSNR {row['psnr_db']} dB, MAE {row['mae_levels']}" if name != "bf16" else ""
        print(f"{name}: adherence {row['adherence']:.3f}{extra} ({meta['seconds']} s)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    result = {"model": str(args.model), "split": args.split, "prompts": len(prompts), "device": args.device,
              "torch": torch.__version__, "results": rows, "markdown": table,
              "per_prompt": [{"prompt": p, "seed": s, **{n: readings[n][i] for n in names}}
                             for i, (p, s) in enumerate(zip(prompts, seeds))]}
    (args.out / "shapes_fp8.json").write_text(json.dumps(result, indent=1))
    grid(prompts, pictures, "bf16", args.rows).save(args.out / "shapes_fp8_grid.png")
    print(table)
    print(f"wrote {args.out / 'shapes_fp8.json'} and {args.out / 'shapes_fp8_grid.png'}")
    print(json.dumps({r["name"]: {k: r.get(k) for k in ("adherence", "drop", "flips", "psnr_db", "mae_levels")}
                      for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
