"""Time single configs of the FP8 GEMM's TMA kernels, each in its own process under a time limit.

    python bench/gemm_configs_gpu.py --out $OUT/gemm_configs.json              # the default probe list, qkv shape
    python bench/gemm_configs_gpu.py --layer fc2 --only "ws precise 128x128x128 s4" --timeout 60

Why a separate process per config: the warp-specialised variant's autotuning never returned within 120-140 s on
an H200 (GPU sessions 7 and 10), so a hang, a very slow compile and a slow kernel could not be told apart, and one
stuck config took the whole run with it. Here each config is compiled first (JITFunction.warmup: compile, no
launch; the time is printed at once), then launched once and checked against fp8_gemm_ref, then timed with the
autotuners' own timing (kernels/_common.tune_bench). A child that does not finish is killed and reported with the
last stage it reached ("compiled, launch did not return" is a hang on the device). torch._scaled_mm row-wise (slow
and fast accumulation) is timed in the parent for the ratio, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kernels_gpu import LARGE, M_TOKENS  # noqa: E402  (the SD3.5 Large layer shapes, (K, N); 2 x 4429 tokens)

# label: (warp specialised, fast accumulation, BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
PROBES = {
    "tma precise 128x128x128 s4 w8": (False, False, 128, 128, 128, 4, 8),
    "ws precise 128x128x128 s4": (True, False, 128, 128, 128, 4, 4),
    "ws fast 128x128x128 s4": (True, True, 128, 128, 128, 4, 4),
    "ws precise 128x128x128 s3": (True, False, 128, 128, 128, 3, 4),
    "ws precise 256x128x128 s3": (True, False, 256, 128, 128, 3, 4),
    "ws precise 128x128x256 s3": (True, False, 128, 128, 256, 3, 4),
    "ws fast 128x256x128 s3": (True, True, 128, 256, 128, 3, 4),
    "ws precise 128x256x128 s3": (True, False, 128, 256, 128, 3, 4),
}


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def child(label: str, layer: str) -> None:
    """One config: compile, launch once, check, time; one JSON line per stage on stdout."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    from kernels import fp8_gemm as G
    from kernels._common import rel_rms, tune_bench
    from kernels.fp8_quant import quant_fp8_ref

    ws, fast, bm, bn, bk, stages, warps = PROBES[label]
    K, N = LARGE[layer]
    M = M_TOKENS
    torch.manual_seed(7)
    a, sa = quant_fp8_ref(torch.randn(M, K, device="cuda"))
    w, sw = quant_fp8_ref(torch.randn(N, K, device="cuda") * 0.02)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.1
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [bm, bk])
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk])
    grid = (-(-M // bm) * -(-N // bn),)
    args = (a_desc, w_desc, out, sa, sw, bias, out, out, M, N, K, M, out.stride(0), 0, 0)
    kw = dict(A_PER_ROW=True, W_PER_COL=True, HAS_BIAS=True, ACT="none", HAS_GATE=False, HAS_RES=False,
              ACC_MODE=G.FAST if fast else G.PRECISE, WARP_SPEC=ws, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
              PROMOTE=min(bk, 128), num_warps=warps, num_stages=stages)
    t0 = time.perf_counter()
    k = G._fp8_gemm_tma_body.warmup(*args, grid=grid, **kw)
    say(stage="compiled", compile_s=round(time.perf_counter() - t0, 2), regs=getattr(k, "n_regs", None),
        spills=getattr(k, "n_spills", None), shared=getattr(getattr(k, "metadata", None), "shared", None))
    launch = lambda: G._fp8_gemm_tma_body[grid](*args, **kw)  # noqa: E731
    t0 = time.perf_counter()
    launch()
    torch.cuda.synchronize()
    err = rel_rms(out, G.fp8_gemm_ref(a, sa, w, sw, bias))
    say(stage="ran", first_launch_s=round(time.perf_counter() - t0, 3), rel_err_vs_ref=err)
    ms, p20, p80 = tune_bench(launch)
    say(stage="timed", ms=ms, p20=p20, p80=p80, TFLOPs=2 * M * N * K / ms * 1e-9)


def parent(args) -> int:
    import torch
    import triton

    from kernels._common import rel_rms, tune_bench
    from kernels.fp8_gemm import fp8_gemm_ref, scaled_mm
    from kernels.fp8_quant import quant_fp8_ref

    K, N = LARGE[args.layer]
    M = M_TOKENS
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "commit": os.environ.get("MINISD35_COMMIT", "unknown"), "layer": args.layer, "M": M, "K": K, "N": N,
            "timeout_s": args.timeout}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        info["driver"] = "unknown"
    print(info, flush=True)
    torch.manual_seed(7)
    a, sa = quant_fp8_ref(torch.randn(M, K, device="cuda"))
    w, sw = quant_fp8_ref(torch.randn(N, K, device="cuda") * 0.02)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.1
    ref = fp8_gemm_ref(a, sa, w, sw, bias)
    rows = []
    for fast in (False, True):
        f = lambda fast=fast: scaled_mm(a, sa, w, sw, bias, fast_accum=fast)  # noqa: E731
        ms, p20, p80 = tune_bench(f)
        rows.append({"impl": "_scaled_mm row-wise" + (" fast_accum" if fast else ""), "ms": ms, "p20": p20,
                     "p80": p80, "TFLOPs": 2 * M * N * K / ms * 1e-9, "rel_err_vs_ref": rel_rms(f(), ref)})
        print(rows[-1], flush=True)
    base = rows[0]["ms"]
    labels = args.only.split(",") if args.only else list(PROBES)
    t_end = time.monotonic() + args.budget
    for label in labels:
        left = t_end - time.monotonic()
        if left < 15:
            rows.append({"impl": f"triton {label}", "skipped": "time budget spent"})
            continue
        limit = min(args.timeout, left)
        rec = {"impl": f"triton {label}", "config": dict(zip(("warp_spec", "fast_accum", "BLOCK_M", "BLOCK_N",
                                                               "BLOCK_K", "stages", "warps"), PROBES[label]))}
        t0 = time.monotonic()
        try:
            p = subprocess.run([sys.executable, __file__, "--child", label, "--layer", args.layer],
                               capture_output=True, text=True, timeout=limit)
            out, code = p.stdout, p.returncode
            if code:
                rec["error"] = p.stderr.strip()[-1500:]
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rec["error"] = f"killed after {limit:.0f} s"
        for line in out.splitlines():
            if line.startswith("{"):
                rec.update(json.loads(line))
        rec["wall_s"] = round(time.monotonic() - t0, 1)
        if "ms" in rec:
            rec["speed_vs_scaled_mm"] = base / rec["ms"]
        elif "error" in rec and rec.get("stage") == "compiled":
            rec["error"] += ": compiled, the launch did not return"
        rows.append(rec)
        print(rec, flush=True)
    res = {"device": info, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", default="qkv", choices=list(LARGE))
    ap.add_argument("--only", default="", help="comma-separated labels of PROBES (default: all)")
    ap.add_argument("--timeout", type=float, default=45.0, help="seconds per config (compile + run + timing)")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for all configs together")
    ap.add_argument("--out", default="")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.layer)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
