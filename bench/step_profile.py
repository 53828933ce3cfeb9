"""Where one FP8 step spends its GPU time: SD3.5 Large (random weights), 1024x1024, CFG batch 2, the fused forward
(minisd35.fast, not graphed, so that the profiler sees each kernel) under torch.profiler, with every kernel put in a
family (FP8 GEMM, attention, each fused memory-bound kernel, elementwise). Then the same step graphed (what
`minisd35 bench` times): median of 10 CUDA-event timings. Both for each attention buffer layout given
(fast.attention_buffers), in one process on the same weights, so the layouts compare fairly.

    python bench/step_profile.py --out $OUT/profile.json [--policy default] [--fast-accum] [--layouts bhld,blhd]
                                 [--attention auto,fp8]   # fast.py attention modes, each profiled and graphed
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from minisd35 import fp8  # noqa: E402
from minisd35.bench import cuda_times, env_info, random_mmdit, rel_rms, step_inputs  # noqa: E402
from minisd35.config import get_preset  # noqa: E402
from minisd35.fast import Graphed, accelerate  # noqa: E402

# kernel name substring -> family; first match wins (cuBLAS / CUTLASS GEMM names vary by version, so "gemm" last)
FAMILIES = [
    ("_attn_", "attention (triton)"), ("_v_fp8_t", "v -> E4M3 transposed"), ("MinMax", "v amax (aminmax)"),
    ("_ln_mod", "ln_mod(_quant)"), ("_qk_norm", "qk_norm_split"),
    ("_gelu_quant", "gelu_quant"), ("_quant", "quant (per token)"), ("dequant", "fp8 GEMV (adaLN)"),
    ("fmha", "attention"), ("sdpa", "attention"), ("flash", "attention"), ("attention", "attention"),
    ("cudnn", "attention"), ("addcmul", "gated residual (addcmul)"), ("elementwise", "other elementwise"),
    ("vectorized", "other elementwise"), ("_gated_residual", "gated residual"),
    ("gemm", "GEMM"), ("xmma", "GEMM"), ("cutlass", "GEMM"),
    ("sm90", "GEMM"), ("copy", "copies"),
]


def family(name: str) -> str:
    low = name.lower()
    for sub, fam in FAMILIES:
        if sub in low:
            return fam
    return "other"


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="sd3.5-large")
    ap.add_argument("--px", type=int, default=1024)
    ap.add_argument("--policy", default="default")
    ap.add_argument("--fast-accum", action="store_true")
    ap.add_argument("--layouts", default="bhld")
    ap.add_argument("--attention", default="auto", help="comma list of fast.py attention modes")
    ap.add_argument("--out", default="profile.json")
    args = ap.parse_args()
    res = {"env": env_info(), "variant": args.variant, "px": args.px, "batch": 2, "policy": args.policy,
           "fast_accum": args.fast_accum, "layouts": {}}  # keyed "layout" or "layout attention=mode"
    cfg = get_preset(args.variant).mmdit
    model = random_mmdit(cfg)
    if args.policy != "bf16":
        fp8.quantize(model, args.policy)
    inputs = step_inputs(cfg, args.px, 2)
    print(f"{args.variant} {args.px}px, policy {args.policy}, fast_accum {args.fast_accum}")
    outs = {}
    runs = [(lay, att) for att in args.attention.split(",") for lay in args.layouts.split(",")]
    for layout, att in runs:
        fast = accelerate(model, graphs=False, fast_accum=args.fast_accum, attention=att)
        fast.attention_layout = layout
        if att != "auto":
            layout = f"{layout} attention={att}"
        rec = profile_step(lambda: fast(*inputs))
        graphed = Graphed(fast)
        ms = sorted(cuda_times(lambda g=graphed: g(*inputs), iters=10))
        rec["graphed_step_ms"] = {"median": ms[5], "min": ms[0], "max": ms[-1]}
        outs[layout] = graphed(*inputs).float()
        rec["rel_rms_vs_first_layout"] = rel_rms(outs[layout], next(iter(outs.values())))
        res["layouts"][layout] = rec
        print(f"layout {layout}: graphed step {ms[5]:.2f} ms [{ms[0]:.2f}, {ms[-1]:.2f}], {rec['total_kernel_ms']:.1f} "
              f"ms of kernel time (ungraphed), output vs the first layout {rec['rel_rms_vs_first_layout']:.1e}")
        for f, r in rec["families"].items():
            print(f"  {f:28s} {r['ms']:7.2f} ms  {100 * r['share']:5.1f}%  {r['calls']:5d} calls")
        for k in rec["kernels"][:12]:
            print(f"    {k['ms']:7.2f} ms {k['count']:5d}x  {k['family']:20s} {k['name'][:90]}")
        del graphed
    Path(args.out).write_text(json.dumps(res) + "\n")


def profile_step(fn) -> dict:
    """One call of fn under torch.profiler: GPU time per kernel family and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    fams, kernels = defaultdict(lambda: [0.0, 0]), []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        us = ev.cuda_time_total if us is None else us
        if us <= 0:
            continue
        f = family(ev.key)
        fams[f][0] += us / 1e3
        fams[f][1] += ev.count
        kernels.append({"name": ev.key[:160], "family": f, "ms": us / 1e3, "count": ev.count})
    total = sum(v[0] for v in fams.values())
    return {"total_kernel_ms": total,
            "families": {f: {"ms": ms, "calls": n, "share": ms / total} for f, (ms, n) in
                         sorted(fams.items(), key=lambda kv: -kv[1][0])},
            "kernels": sorted(kernels, key=lambda k: -k["ms"])[:40]}


if __name__ == "__main__":
    main()
