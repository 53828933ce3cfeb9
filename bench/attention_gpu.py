"""Check and time kernels/fp8_attention.py against PyTorch's SDPA backends on one GPU, at the SD3.5 shapes.

    MINISD35_COMMIT=$(git rev-parse HEAD) python bench/attention_gpu.py --out $OUT/attention.json

Per shape (B, H, L, hd) and logit temperature (q and k drawn as N(0, t^2), i.e. logits of standard deviation t^2):
the fp32 reference (softmax in fp32, per batch row to bound memory), then torch SDPA (default backend, cuDNN,
flash) and our kernel in three modes (bf16; Q K^T in FP8 with bf16 V; Q K^T and P V in FP8) and three variants
(ptr, tma, ws): relative RMS error vs the fp32 reference, median ms (do_bench, L2 flushed), TFLOP/s (4 B H L^2 hd
FLOP per call), the autotuner's pick, and the speed ratio to the default SDPA backend in the same run. Every
measurement is in try/except: a variant that fails to compile is recorded with its error, and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import fp8_attention as A  # noqa: E402
from kernels._common import bench_ms, print_table, rel_rms  # noqa: E402
from minisd35.bench import env_info  # noqa: E402

SHAPES = {"large_1024": (2, 38, 4429, 64), "medium_1024": (2, 24, 4429, 64), "medium_attn2_1024": (2, 24, 4096, 64),
          "large_512": (2, 38, 1357, 64)}


def ref_fp32(q, k, v):
    """fp32 softmax attention, one batch row at a time ([H, L, L] fp32 scores: 3 GB at Large 1024)."""
    return torch.cat([A.attention_ref(q[b : b + 1], k[b : b + 1], v[b : b + 1]) for b in range(q.shape[0])])


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def f(q, k, v):
        with sdpa_kernel(b):
            return F.scaled_dot_product_attention(q, k, v)

    return f


def measure(name: str, temp: float, variants: list[str], errors: list) -> list[dict]:
    """Every implementation at one shape and temperature: error vs the fp32 reference, then time."""
    B, H, L, hd = SHAPES[name]
    flop = 4 * B * H * L * L * hd
    rows = []
    torch.manual_seed(0)
    q = (torch.randn(B, H, L, hd, device="cuda") * temp).to(torch.bfloat16)
    k = (torch.randn(B, H, L, hd, device="cuda") * temp).to(torch.bfloat16)
    v = torch.randn(B, H, L, hd, device="cuda").to(torch.bfloat16)
    ref = ref_fp32(q, k, v)
    base_ms = None
    cands = [("sdpa default", lambda: F.scaled_dot_product_attention(q, k, v)),
             ("sdpa cudnn", lambda: sdpa("cudnn")(q, k, v)), ("sdpa flash", lambda: sdpa("flash")(q, k, v))]
    modes = {"bf16": (q, k, v, None, None, None, False)}
    try:
        modes["fp8 qk"] = A.prepare_fp8(q, k, v, pv=False)
        modes["fp8 pv"] = A.prepare_fp8(q, k, v, qk=False)
        modes["fp8 qk+pv"] = A.prepare_fp8(q, k, v)
        prep_ms = bench_ms(lambda: A.prepare_fp8(q, k, v))[0]
    except Exception as e:
        errors.append({"shape": name, "what": "prepare_fp8", "error": repr(e)})
        prep_ms = None
    for mode, a in modes.items():
        for var in variants:
            if var.endswith("-acc") and mode not in ("fp8 pv", "fp8 qk+pv"):
                continue  # pv_promote only changes the FP8 P @ V product
            cands.append((f"{mode} {var}", (lambda a=a, var=var: A.attention(
                *a[:6], v_transposed=a[6], variant=var.removesuffix("-acc"), pv_promote=not var.endswith("-acc")))))
    for label, fn in cands:
        row = {"shape": name, "temp": temp, "impl": label}
        try:
            t0 = time.time()
            o = fn()
            torch.cuda.synchronize()
            row["first_call_s"] = time.time() - t0
            row["rel_err"] = rel_rms(o, ref)
            row["nan"] = bool(torch.isnan(o).any())
            ms = bench_ms(fn)
            row.update(ms=ms[0], ms_p20=ms[1], ms_p80=ms[2], tflops=flop / ms[0] * 1e-9)
            if base_ms is None:
                base_ms = ms[0]
            row["x_sdpa"] = ms[0] / base_ms
            kernels = {"ptr": A._attn_ptr, "tma": A._attn_tma, "ws": A._attn_ws, "tma-acc": A._attn_tma}
            kern = kernels.get(label.split()[-1])
            if kern is not None and getattr(kern, "best_config", None) is not None:
                row["config"] = str(kern.best_config)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            errors.append({"shape": name, "impl": label, "trace": traceback.format_exc()[-1500:]})
        rows.append(row)
        print(json.dumps(row), flush=True)
    if prep_ms is not None:
        rows.append({"shape": name, "temp": temp, "impl": "prepare_fp8 (torch, unfused)", "ms": prep_ms})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/attention.json")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--temps", default="1.0,1.5")
    ap.add_argument("--variants", default="ptr,tma,ws,tma-acc")
    args = ap.parse_args()
    info = env_info()
    print(json.dumps(info))
    rows, errors = [], []
    t_start = time.time()
    for name in args.shapes.split(","):
        for temp in (float(t) for t in args.temps.split(",")):
            rows += measure(name, temp, args.variants.split(","), errors)
            torch.cuda.empty_cache()
    print_table(rows, ["shape", "temp", "impl", "ms", "tflops", "x_sdpa", "rel_err", "first_call_s", "config"])
    result = {"env": info, "rows": rows, "errors": errors, "wall_s": time.time() - t_start}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"rows": len(rows), "errors": len(errors)}))


if __name__ == "__main__":
    main()
