"""`python -m minisd35 <command>`: generate, inspect, quantize (audit and bench live in their own modules).

Every error minisd35 raises on purpose is printed as one line and exits with status 1 (2 for bad usage, 130 for
Ctrl-C); --debug (before or after the subcommand) shows the traceback instead. Warnings are one line each,
"warning: ...". Files are written atomically and never overwrite an existing file without --force (an image gets a
counter instead: out.png, out-1.png, ...); input checkpoints are only read.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

from . import __version__
from .errors import HardwareError, InputError, MiniSD35Error
from .fast import ATTENTION

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def model_path(args) -> Path:
    """--weights PATH, or a built-in model: --model tiny (random, generated into the cache) or shapes (trained,
    shipped under weights/shapes)."""
    if args.weights:
        return Path(args.weights)
    from .tiny import WEIGHTS_DIR, tiny_root

    if args.model == "tiny":
        return tiny_root()
    if args.model == "shapes":
        p = WEIGHTS_DIR / "shapes"
        if not (p / "transformer").is_dir():
            raise InputError(f"the trained shapes model is not in {p}; see weights/README.md")
        return p
    raise InputError("give --weights PATH (a model folder or file) or --model tiny|shapes")


def free_name(path: Path, force: bool) -> Path:
    if force or not path.exists():
        return path
    for k in range(1, 10000):
        p = path.with_name(f"{path.stem}-{k}{path.suffix}")
        if not p.exists():
            return p
    raise InputError(f"{path}: too many numbered files already exist")


def save_png(image, path: Path, params: dict, force: bool) -> Path:
    """PNG with its generation parameters as text chunks: `parameters` in the form other SD front ends write (and
    image tools read), plus the same as JSON under `minisd35`."""
    from PIL.PngImagePlugin import PngInfo

    from .checkpoint import write_atomic

    p = params
    text = (f"{p['prompt']}\nNegative prompt: {p['negative_prompt']}\nSteps: {p['steps']}, Sampler: {p['sampler']}, "
            f"CFG scale: {p['guidance']}, Seed: {p['seed']}, Size: {p['width']}x{p['height']}, Model: {p['model']}, "
            f"Precision: {p['precision']}, "
            + "".join(f"{k.capitalize()}: {p[k]}, " for k in ("attention", "accumulation") if k in p)
            + f"Version: minisd35 {__version__}")
    info = PngInfo()
    info.add_text("parameters", text)
    info.add_text("minisd35", json.dumps(p))
    path = free_name(path, force)
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), force=True, suffix=".png")


def read_prompt_file(path: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 4]!r}); save the "
                         f"prompt file as UTF-8") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the prompt file ({e.strerror})") from None


class Progress:
    open_line = False  # a progress bar is drawn and its line not finished: messages start on a new line

    def __init__(self, total: int, stream=None):
        self.total, self.stream, self.t0 = total, stream or sys.stderr, time.perf_counter()

    def __call__(self, i: int) -> None:
        done = i + 1
        if i == 0:  # the first step also paid for text encoding and warm-up: time the rate from here
            self.t0 = time.perf_counter()
        dt = time.perf_counter() - self.t0
        rate = (done - 1) / dt if dt > 0 else 0.0
        eta = (self.total - done) / rate if rate else 0.0
        bar = "#" * int(20 * done / self.total)
        self.stream.write(f"\rstep {done}/{self.total} [{bar:<20}] {rate:5.2f} it/s ETA {eta:5.1f}s")
        Progress.open_line = done != self.total
        if done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def new_line() -> None:
    """End an unfinished progress line so that the next message has a line of its own."""
    if Progress.open_line:
        sys.stderr.write("\n")
        Progress.open_line = False


def cmd_generate(args) -> int:
    from .pipeline import check_args, load_pipeline

    prompt = read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt
    if prompt is None:
        raise InputError("give a prompt (or --prompt-file FILE); an empty prompt '' is allowed")
    # what can be checked without the model, before minutes of loading (the size limit needs the model)
    check_args(args.height, args.width, args.steps, args.guidance, args.batch, args.strength if args.image else None,
               args.seed)
    if Path(args.out).is_dir():
        raise InputError(f"-o {args.out} is a folder; give an image file name, e.g. {Path(args.out) / 'image.png'}")
    image = None
    if args.image:
        from PIL import Image

        try:
            image = Image.open(args.image).convert("RGB")
        except OSError as e:
            raise InputError(f"{args.image}: cannot read the image ({e})") from None
    t0 = time.perf_counter()
    pipe = load_pipeline(model_path(args), dtype=DTYPES[args.dtype], device=args.device, t5=not args.no_t5,
                         fp8=args.fp8, preset=args.preset, low_vram=args.low_vram, fp8_text=args.fp8_text,
                         text_encoders=args.text_encoders, vae=args.vae, streamed=args.streamed,
                         attention=args.attention, fast_accum=args.fast_accum)
    load_s = time.perf_counter() - t0
    kw = dict(height=args.height, width=args.width, steps=args.steps, guidance=args.guidance, seed=args.seed,
              batch_size=args.batch, sampler=args.sampler)
    if image is not None:
        kw.update(image=image, strength=args.strength)
    settings = pipe.describe(**kw)
    progress = Progress(step_total(pipe, kw))
    last = None
    for k, step in enumerate(pipe.steps(prompt, args.negative, **kw)):
        progress(k)
        last = step
    images = pipe.decode(last.latents)
    out = Path(args.out)
    written = []
    for k, img in enumerate(images):
        params = {"prompt": prompt, "negative_prompt": args.negative, "seed": args.seed + k, **settings,
                  "height": img.height, "width": img.width, "minisd35_version": __version__}
        dest = out if len(images) == 1 else out.with_name(f"{out.stem}-{k}{out.suffix}")
        written.append(save_png(img, dest, params, args.force))
    t = pipe.timings
    peak = f", peak GPU memory {t.peak_gib:.2f} GiB" if t.peak_gib else ""
    print(f"wrote {', '.join(map(str, written))} ({images[0].width}x{images[0].height}, {settings['steps']} steps, "
          f"{settings['precision']}) in {load_s + t.total_s:.1f} s: load {load_s:.1f} s, text {t.encode_s:.1f} s, "
          f"denoise {t.denoise_s:.1f} s, decode {t.decode_s:.1f} s{peak}")
    return 0


def step_total(pipe, kw) -> int:
    steps = kw.get("steps") or pipe.defaults.steps
    if kw.get("image") is not None:
        from .sampling import img2img_start

        return steps - img2img_start(steps, kw["strength"]) if kw["strength"] > 0 else 1
    return steps


def describe_path(path: Path) -> dict:
    """What a checkpoint file or folder is: format, components, variant, dtypes, parameters, FP8 layers."""
    from .checkpoint import Checkpoint, describe_component, detect_components, open_file, open_folder
    from .config import detect_variant, mmdit_config_from_shapes

    def summarize(ck: Checkpoint) -> dict:
        dtypes = Counter(str(ck.dtype(k)).removeprefix("torch.") for k in ck.keys())
        params = sum(int(torch.Size(ck.shape(k)).numel()) for k in ck.keys())
        fp8 = [k.rsplit(".", 1)[0] for k in ck.keys() if k.endswith(".weight") and "float8" in str(ck.dtype(k))]
        scales = [k for k in ck.keys() if k.endswith((".weight_scale", ".scale_weight"))]
        d = {"tensors": len(ck), "parameters": params, "bytes": ck.nbytes(), "dtypes": dict(dtypes)}
        if fp8:
            per = Counter("per-channel" if int(torch.Size(ck.shape(s)).numel()) > 1 else "per-tensor" for s in scales)
            d["fp8_layers"] = {"count": len(fp8), "scales": dict(per), "unscaled": len(fp8) - len(scales),
                               "first": fp8[:3]}
        return d

    info: dict = {"path": str(path)}
    if path.is_dir():
        info["format"] = "diffusers model root" if (path / "model_index.json").is_file() else "folder"
        comps = {}
        for sub, stem in (("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("text_encoder", "model"), ("text_encoder_2", "model"), ("text_encoder_3", "model")):
            if (path / sub).is_dir():
                comps[sub] = summarize(open_folder(path / sub, stem))
        if not comps and (path / "config.json").is_file():
            comps["transformer"] = summarize(open_folder(path, "diffusion_pytorch_model"))
        info["components"] = comps
        info["tokenizers"] = [t for t in ("tokenizer", "tokenizer_2", "tokenizer_3") if (path / t).is_dir()]
        if "transformer" in comps:
            from .weights import open_mmdit

            info["variant"] = detect_variant(open_mmdit(path)[2])
        return info
    ck = open_file(path)
    info["format"] = "safetensors file"
    if ck.metadata:
        info["metadata"] = {k: (v if len(v) < 200 else v[:200] + "...") for k, v in ck.metadata.items()}
    comps = detect_components(ck.keys())
    info["components"] = {}
    for comp, prefix in comps.items():
        sub = ck.sub(prefix)
        info["components"][comp] = {"what": describe_component(comp), "prefix": prefix, **summarize(sub)}
        if comp == "mmdit":
            from .weights import open_mmdit, plan_mmdit, split_fp8

            view, layout, _ = open_mmdit(path)
            plan, _ = plan_mmdit(view, layout)
            plan, _ = split_fp8(plan)
            try:
                cfg = mmdit_config_from_shapes({k: p.shape for k, p in plan.items()}, str(path))
                info["components"][comp]["config"] = cfg.to_diffusers()
                info["variant"] = detect_variant(cfg)
            except MiniSD35Error as e:
                info["components"][comp]["config"] = f"not derivable: {e}"
    if not comps:
        info["components"] = {"unknown": summarize(ck)}
    return info


def cmd_inspect(args) -> int:
    info = describe_path(Path(args.path))
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['path']}: {info['format']}" + (f", variant {info['variant']}" if info.get("variant") else ""))
    for name, c in info.get("components", {}).items():
        what = c.get("what", name)
        print(f"  {name}: {what}" + (f" (prefix {c['prefix']!r})" if c.get("prefix") else ""))
        print(f"    {c['tensors']} tensors, {c['parameters'] / 1e6:.2f} M parameters, {c['bytes'] / 2**30:.3f} GiB, "
              f"dtypes {c['dtypes']}")
        if "fp8_layers" in c:
            f = c["fp8_layers"]
            print(f"    FP8: {f['count']} layers, scales {f['scales']}, {f['unscaled']} without scale; "
                  f"e.g. {', '.join(f['first'])}")
    if info.get("tokenizers"):
        print(f"  tokenizers: {', '.join(info['tokenizers'])}")
    for k, v in info.get("metadata", {}).items():
        print(f"  metadata {k}: {v}")
    return 0


def cmd_quantize(args) -> int:
    from .fp8 import get_policy, save_quantized
    from .weights import CONFIG_META, load_mmdit

    policy = get_policy(args.policy)
    dest, src = Path(args.output), Path(args.input)
    if dest.is_dir():
        raise InputError(f"{dest} is a folder; give the output .safetensors file name")
    if dest.exists() and not args.force:
        raise InputError(f"{dest} exists; pass --force to overwrite it")
    if dest.exists() and src.exists() and (dest.samefile(src) or src.resolve() in dest.resolve().parents):
        raise InputError(f"{dest} is (part of) the input checkpoint {src}; minisd35 never writes over its input, even "
                         f"with --force: choose another output name")
    t0 = time.perf_counter()
    model = load_mmdit(args.input, dtype=DTYPES[args.dtype], device=args.device or "cpu", fp8=policy)
    meta = {CONFIG_META: json.dumps(model.cfg.to_diffusers())}
    save_quantized(model, dest, policy=policy, source=Path(args.input).name, prefix="model.diffusion_model.",
                   extra_metadata=meta, force=args.force)
    from .fp8 import weight_bytes

    print(f"{model.quant_report}\nwrote {dest} ({weight_bytes(model) / 2**30:.2f} GiB) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minisd35", description=f"minisd35 {__version__}: SD3/SD3.5 in plain "
                                                                        f"PyTorch, with FP8")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text (or image) to image")
    g.add_argument("prompt", nargs="?")
    g.add_argument("--prompt-file", help="read the prompt from a UTF-8 text file")
    g.add_argument("-n", "--negative", default="", help="negative prompt")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--weights", help="a diffusers model root, or a Stability .safetensors file")
    src.add_argument("--model", choices=["tiny", "shapes"], help="a built-in model")
    g.add_argument("-H", "--height", type=int)
    g.add_argument("-W", "--width", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", "--cfg", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--sampler", choices=["euler", "dpmpp_2m"])
    g.add_argument("--image", help="image-to-image: the starting image")
    g.add_argument("--strength", type=float, default=0.6)
    g.add_argument("-o", "--out", default="minisd35.png")
    g.add_argument("--force", action="store_true", help="overwrite an existing output file")
    g.add_argument("--fp8", help="FP8 policy for the MMDiT: default, row, tensor, weight-only, or a .json file")
    g.add_argument("--fp8-text", help="FP8 policy for T5 (t5-w8)")
    g.add_argument("--no-t5", action="store_true", help="leave T5 out (its tokens are zeros)")
    g.add_argument("--low-vram", action="store_true", help="one component on the GPU at a time")
    g.add_argument("--streamed", action="store_true", help="low-VRAM, and the MMDiT's blocks stream through the GPU "
                   "one at a time during each step (for GPUs smaller than the MMDiT)")
    g.add_argument("--attention", default="auto", choices=ATTENTION,
                   help="attention backend; fp8: E4M3 Q, K, P, V (faster, ~0.5-1%% error per layer; see the README)")
    g.add_argument("--fast-accum", action="store_true",
                   help="FP8 GEMMs accumulate without promotion (faster; less exact at large K)")
    g.add_argument("--device")
    g.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    g.add_argument("--preset", help="force a variant's defaults: sd3-medium, sd3.5-medium, sd3.5-large, ...")
    g.add_argument("--text-encoders", help="folder (or file) with the text encoders, if not beside the model")
    g.add_argument("--vae", help="VAE file or folder, if not in the model")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="what a checkpoint file or folder is")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    q = sub.add_parser("quantize", help="write a pre-quantized FP8 MMDiT checkpoint")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("--policy", default="default")
    q.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    q.add_argument("--device", help="where to quantise (cuda is much faster for large models)")
    q.add_argument("--force", action="store_true")
    q.set_defaults(func=cmd_quantize)

    for module in ("audit", "bench"):  # each adds its own subcommand, once it exists
        if importlib.util.find_spec(f"minisd35.{module}") is not None:
            importlib.import_module(f"minisd35.{module}").add_parser(sub)
    for command in sub.choices.values():  # --debug after the subcommand too; SUPPRESS keeps one given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, "warning: ...", instead of Python's two-line file:line format."""
    new_line()
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    Progress.open_line = False
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return args.func(args) or 0
        except KeyboardInterrupt:
            new_line()
            print("interrupted: nothing was left half-written", file=sys.stderr)
            return 130
        except (MiniSD35Error, FileExistsError, OSError, torch.cuda.OutOfMemoryError) as e:
            if args.debug:
                raise
            if isinstance(e, torch.cuda.OutOfMemoryError):  # outside the stages that name their component
                e = HardwareError("out of GPU memory; try --low-vram, an FP8 policy (--fp8 default) or a smaller size")
            elif isinstance(e, OSError) and not isinstance(e, MiniSD35Error):  # disk full, permission denied, ...
                e = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
            new_line()
            print(f"error: {e}", file=sys.stderr)
            return 1
