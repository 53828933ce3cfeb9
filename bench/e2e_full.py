"""End to end at full size on a GPU: SD3.5 Large with random weights, written as a real diffusers model root (MMDiT
sharded bf16, CLIP-L, CLIP-G, T5-XXL sharded, VAE, tokenizers), then loaded and run through minisd35.load_pipeline
exactly as a user would, at 1024x1024, 28 steps, CFG 3.5. Per configuration: load time, first image (CUDA-graph
capture, autotuning), then a second image with per-stage times and the peak GPU memory of the whole call.

    python bench/e2e_full.py --root /tmp/sd35_random --out $OUT/e2e.json

Random weights draw noise; what this measures is time and memory, not pictures. The tokenizers are the project's
own 1000-token vocabularies (the real CLIP/T5 vocabularies are not on the GPU machine), so the CLIP configs carry
that vocabulary's EOS id; the embedding tables keep their real 49408 / 32128 rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from minisd35.bench import env_info, random_mmdit  # noqa: E402
from minisd35.config import CLIPG, CLIPConfig, VAEConfig, get_preset  # noqa: E402


def write_root(root: Path, log, variant: str = "sd3.5-large", device: str = "cuda") -> None:
    from minisd35.text import write_random_text_encoders, write_tokenizer_folders
    from minisd35.tiny import MODEL_INDEX, tokenizer_dirs
    from minisd35.vae import write_random_vae
    from minisd35.weights import save_mmdit

    pre = get_preset(variant)
    if variant != "tiny":  # real-size encoders, the project's 1000-token vocabulary (EOS 999)
        pre = dataclasses.replace(pre, clip_l=dataclasses.replace(CLIPConfig(), eos_token_id=999, pad_token_id=999),
                                  clip_g=dataclasses.replace(CLIPG, eos_token_id=999, pad_token_id=0))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    m = random_mmdit(pre.mmdit, seed=0, dtype=torch.bfloat16, device=device)
    state = {k: v.cpu() for k, v in m.state_dict().items()}
    del m
    save_mmdit(state, pre.mmdit, root / "transformer", layout="diffusers", shards=2)
    del state
    log(f"MMDiT written ({time.perf_counter() - t0:.0f} s)")
    write_random_text_encoders(root, pre, seed=1, dtype=torch.bfloat16, shard=True)
    log(f"text encoders written ({time.perf_counter() - t0:.0f} s)")
    write_random_vae(root / "vae", pre.vae if variant == "tiny" else VAEConfig(), seed=2, dtype=torch.bfloat16)
    clip_dir, t5_dir = tokenizer_dirs()
    write_tokenizer_folders(root, clip_dir, t5_dir)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    log(f"model root written in {time.perf_counter() - t0:.0f} s")


def run(root: Path, name: str, log, device: str = "cuda", px: int = 1024, **kw) -> dict:
    from minisd35.pipeline import load_pipeline

    cuda = device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe = load_pipeline(root, device=device, **kw)
    load_s = time.perf_counter() - t0
    args = dict(prompt="a red fox in the snow", height=px, width=px, steps=28, guidance=3.5, seed=0)
    t0 = time.perf_counter()
    pipe(**args)
    first_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    pipe(**args)
    sync()
    second_s = time.perf_counter() - t0
    t = pipe.timings
    rec = {"config": name, "kwargs": {k: str(v) for k, v in kw.items()}, "load_s": load_s, "first_image_s": first_s,
           "image_s": second_s, "encode_s": t.encode_s, "denoise_s": t.denoise_s, "decode_s": t.decode_s,
           "ms_per_step": 1000 * t.denoise_s / 28, "peak_gib_call": t.peak_gib,
           "peak_gib_process": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}
    log(f"{name:28s} load {load_s:5.1f}s  first {first_s:5.1f}s  image {second_s:5.2f}s (text {t.encode_s:.2f}, "
        f"denoise {t.denoise_s:.2f} = {rec['ms_per_step']:.1f} ms/step, decode {t.decode_s:.2f})  peak "
        f"{t.peak_gib:.2f} GiB (call), {rec['peak_gib_process']:.2f} GiB (process)")
    del pipe
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/sd35_random")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "e2e.json"))
    ap.add_argument("--configs", default="fp8-lowvram,fp8,bf16")
    ap.add_argument("--variant", default="sd3.5-large")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--px", type=int, default=1024)
    args = ap.parse_args()
    log = lambda *a: print(*a, flush=True)
    res = {"env": env_info(), "runs": []}
    root = Path(args.root)
    if not (root / "model_index.json").is_file():
        write_root(root, log, args.variant, args.device)
    configs = {
        "fp8-lowvram": dict(fp8="default", fp8_text="t5-w8", low_vram=True),
        "fp8": dict(fp8="default", fp8_text="t5-w8"),
        "bf16": dict(),
    }
    for name in args.configs.split(","):
        try:
            res["runs"].append(run(root, name, log, args.device, args.px, **configs[name]))
        except Exception as e:  # record and go on: one failing configuration must not lose the others
            log(f"{name}: FAILED {type(e).__name__}: {e}")
            res["runs"].append({"config": name, "error": f"{type(e).__name__}: {e}"})
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
