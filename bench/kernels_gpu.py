"""Check and benchmark every Triton kernel in kernels/ on one GPU, against torch baselines, in one run.

    python bench/kernels_gpu.py                 # on an H100 / H200: real SD3.5 shapes, under 5 minutes cold
    python bench/kernels_gpu.py --smoke         # tiny shapes; also runs on a CPU (sets TRITON_INTERPRET=1)
    MINISD35_COMMIT=$(git rev-parse HEAD) python bench/kernels_gpu.py   # a copy of the tree without .git

What it measures (each section is independent: an exception is recorded and the run goes on):
  device    GPU name, driver, CUDA / torch / triton versions, git commit; device-to-device copy bandwidth
            (bytes read + written), the yardstick for the memory-bound kernels
  quant     quant_fp8 per token / per tensor at M=8858, K=2432 and 9728: agreement with quant_fp8_ref, GB/s,
            % of copy bandwidth (target >= 80%)
  gemm      fp8_gemm at M=8858 on the SD3.5 Large (and Medium) linears: relative RMS error vs fp8_gemm_ref, then
            TFLOP/s of the Triton kernel (precise accumulation = default, fast_accum, and the precise variant
            `acc += tl.dot` per K tile) against torch._scaled_mm row-wise / per-tensor (slow and fast accumulation)
            and bf16 F.linear; the fused epilogues (fc1 + GELU, fc2 + gated residual) against unfused torch;
            dynamic activation quantisation + GEMM against F.linear (target: Triton >= 1.0x _scaled_mm row-wise)
  accum     fast_accum on / off at K = 9728 (fc2): error of each path against an fp64 reference, on zero-mean
            and on all-positive data (the worst case for an accumulator that drops low bits)
  dequant   dequant_gemm (fp8 type and uint8 bit decoding): M = 2 adaLN GEMVs against bf16 F.linear (target
            >= 1.6x faster), eager and as a stream of calls on distinct weights in a CUDA graph (no launch cost, no
            L2 reuse); the one GEMV over all of SD3.5 Large's adaLN weights (what fast.py runs); M = 8858 (target
            <= 1.15x F.linear's time). --gemv-only: the M = 2 per-layer GEMVs alone
  ln        ln_mod_quant / ln_mod at M = 8858: agreement with the reference, GB/s, % of copy bandwidth, against
            the unfused torch sequence
  qk_norm   qk_norm_split (QK RMSNorm + head split into the attention buffers) for SD3.5 Large's image and text
            streams, Medium's, and MMDiT-X's attn2 (image tokens only): agreement with the reference (share of
            differing values, max ulps), GB/s (qkv read + q/k/v written), % of copy (target >= 70%), graph-timed
  gelu_quant  GELU(tanh) + per-token FP8 at Large's (N = 9728) and Medium's (N = 6144) MLP width: codes that differ
            from quant_fp8_ref(F.gelu(h)), scales equal, GB/s (h read + codes written), % of copy (target >= 80%)
  routes    the weight-only GEMM's two routes at M = 64 .. 8858 (fused kernel / dequant_weight + F.linear) against
            bf16 F.linear, and which one route="auto" takes: the data to confirm DEQUANT_ROUTE_MIN_M (target: auto
            <= 1.15x F.linear's time at M = 8858)
  gemv      the M = 2 adaLN GEMV per layer (Large, Medium) and over all of Large's adaLN at once:
            dequant_gemm (with and without PDL, pdl=True) and the FMA GEMV under other configs, against bf16
            F.linear, replayed in a CUDA graph
  variants  the FP8 GEMM's kernel variants (default, tma, persistent; add is in gemm; ws refused on a GPU unless
            MINISD35_GEMM_WS=1, see kernels/fp8_gemm.py) on the four Large layers
            (--layers, --gemm-variants pick fewer) vs _scaled_mm row-wise:
            agreement with fp8_gemm_ref first (a variant that disagrees is reported, not timed), then TFLOP/s
Timing: triton.testing.do_bench median (20th / 80th percentiles kept), after one warm-up call that also runs
the autotuner (its duration is recorded as first_call_s, unless a correctness check ran the kernel first). A
time budget (--budget, default 240 s; the whole run must stay under 5 minutes on an H200 with a cold Triton cache,
and a section that has started finishes its current measurement) skips the remaining measurements instead of
overrunning: memory-bound sections run first, the GEMMs after them, the accumulation study last. Output: tables on
stdout, one final JSON line, and $OUT/kernels.json (OUT defaults to /tmp).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, installed or not

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LARGE = {"qkv": (2432, 7296), "proj": (2432, 2432), "fc1": (2432, 9728), "fc2": (9728, 2432)}  # name: (K, N)
MEDIUM = {"m.qkv": (1536, 4608), "m.proj": (1536, 1536), "m.fc1": (1536, 6144), "m.fc2": (6144, 1536)}
ADALN = {"large adaLN": (2432, 6 * 2432), "medium adaLN (MMDiT-X)": (1536, 9 * 1536)}
M_TOKENS, BATCH = 8858, 2  # 2 x (4096 image + 333 text tokens): SD3.5 at 1024 px with CFG


class Bench:
    """Run-wide state: device, shapes, time budget, and the timing helper."""

    def __init__(self, smoke: bool, budget_s: float):
        from kernels._common import interpreting

        self.smoke = smoke
        self.dev = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
        self.t0 = time.time()
        self.deadline = self.t0 + budget_s
        self.skipped: list[str] = []
        if smoke:  # tiny, odd shapes; K and N multiples of 16 so that _scaled_mm can run too
            self.M, self.B = 70, 2
            self.large = {"qkv": (64, 96), "fc1": (64, 128), "fc2": (128, 48)}
            self.medium = {"m.fc1": (48, 64)}
            self.adaln = {"adaLN": (64, 96)}
            self.quant_k = [72, 300]
            self.ln_k = [72]
            self.copy_mb = 4
            self.qk_cases = {"image": (2, 5, 3, 64, 12, 0), "text": (2, 7, 3, 64, 12, 5)}
            self.gelu_shapes = [(70, 300)]
            self.route_cases = [("qkv", 64, 96, [3, 70])]
            self.variant_layers = {"qkv": (64, 96)}
        else:
            self.M, self.B = M_TOKENS, BATCH
            self.large, self.medium, self.adaln = LARGE, MEDIUM, ADALN
            self.quant_k = [2432, 9728]
            self.ln_k = [2432, 1536]
            self.copy_mb = 1024
            # (B, L, heads, hd, Ltot, offset): 1024 px = 4096 image tokens, 333 text tokens, CFG batch 2
            self.qk_cases = {"large image": (2, 4096, 38, 64, 4429, 0), "large text": (2, 333, 38, 64, 4429, 4096),
                             "medium image": (2, 4096, 24, 64, 4429, 0),
                             "medium attn2 (MMDiT-X)": (2, 4096, 24, 64, 4096, 0)}
            self.gelu_shapes = [(M_TOKENS, 4 * 2432), (M_TOKENS, 4 * 1536)]
            # (layer, K, N, Ms): 666 = the text stream's 2 x 333 tokens, 8858 = both streams at 1024 px
            self.route_cases = [("qkv", 2432, 7296, [64, 256, 666, 2048, 8858]), ("fc2", 9728, 2432, [8858])]
            self.variant_layers = LARGE

    def out_of_time(self, what: str) -> bool:
        if time.time() < self.deadline:
            return False
        self.skipped.append(what)
        print(f"  (time budget spent: skipping {what})")
        return True

    def sync(self):
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def bandwidth(self, moved: int, copy_gbps: float, fn, *args) -> dict:
        """Time a memory-bound fn(*args) that moves `moved` bytes: ms, GB/s and % of the copy bandwidth, eager and
        (on CUDA) replayed in a CUDA graph: GPU time alone, as eager calls of a ~20 us kernel are bound by the
        host-side launch."""
        rec = self.time(fn, *args)
        rec.update(GBps=moved / rec["ms"] * 1e-6, pct_copy=100 * moved / rec["ms"] * 1e-6 / copy_gbps)
        if self.dev == "cuda":
            rec["graph_ms"] = self.time(fn, *args, graph=True)["ms"]
            rec["graph_pct_copy"] = 100 * moved / rec["graph_ms"] * 1e-6 / copy_gbps
        return rec

    def time(self, fn, *args, graph: bool = False, **kwargs) -> dict:
        """Time fn(*args, **kwargs): one warm-up call (which runs the autotuner the first time), then the median
        and the 20th / 80th percentiles in ms; graph=True replays it inside a CUDA graph (no launch overhead)."""
        call = lambda: fn(*args, **kwargs)
        t = time.time()
        call()
        self.sync()
        rec = {"first_call_s": round(time.time() - t, 3)}
        if self.dev == "cuda":
            import triton.testing

            bench = triton.testing.do_bench_cudagraph if graph else triton.testing.do_bench
            ms = bench(call, quantiles=[0.5, 0.2, 0.8])
        else:  # smoke run on the CPU interpreter: a wall-clock stand-in, meaningless as a number
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                call()
                runs.append((time.perf_counter() - t) * 1e3)
            runs.sort()
            ms = [runs[1], runs[0], runs[2]]
        rec.update(ms=ms[0], p20=ms[1], p80=ms[2])
        return rec


def section(results: dict, name: str, fn, *args) -> None:
    """Run one section; on an exception record the traceback under results[name] and carry on."""
    print(f"\n=== {name} ===", flush=True)
    t = time.time()
    try:
        results[name] = fn(*args)
    except Exception:  # a failing kernel must not stop the others
        tb = traceback.format_exc()
        print(tb, flush=True)
        results[name] = {"error": tb.strip().splitlines()[-1], "traceback": tb}
    results[name]["section_s"] = round(time.time() - t, 1)


def measure(rows: list, row: dict, fn, *args, **kwargs) -> dict:
    """rows.append(row updated with fn(*args, **kwargs)); an exception becomes the row's 'error' field."""
    try:
        row.update(fn(*args, **kwargs))
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    print(f"  {row}", flush=True)  # as it lands: a run killed mid-section still shows what it measured
    rows.append(row)
    return row


# Unfused torch sequences the fused kernels replace (what the model would run with torch._scaled_mm or bf16).
def scaled_mm_gelu(a, sa, w, sw, bias):
    from kernels.fp8_gemm import scaled_mm

    return F.gelu(scaled_mm(a, sa, w, sw, bias), approximate="tanh")


def linear_gelu(x, w, bias):
    return F.gelu(F.linear(x, w, bias), approximate="tanh")


def gated_residual(y, gate, res):
    B, N = gate.shape
    return (res.view(B, -1, N) + gate[:, None] * y.view(B, -1, N)).view(-1, N)


def scaled_mm_gated(a, sa, w, sw, bias, gate, res):
    from kernels.fp8_gemm import scaled_mm

    return gated_residual(scaled_mm(a, sa, w, sw, bias), gate, res)


def linear_gated(x, w, bias, gate, res):
    return gated_residual(F.linear(x, w, bias), gate, res)


def quant_then_gemm(x, w, sw, bias):
    from kernels.fp8_gemm import fp8_gemm
    from kernels.fp8_quant import quant_fp8

    return fp8_gemm(*quant_fp8(x), w, sw, bias)


def tflops(flop: int, t: dict) -> dict:
    return {**t, "TFLOPs": flop / t["ms"] * 1e-9}


def tuned(kernel) -> str:
    """The config the autotuner chose for the last call (Triton's Autotuner.best_config), for the record."""
    return str(getattr(kernel, "best_config", "") or "")


def _git_commit() -> str:
    for var in ("MINISD35_COMMIT", "GIT_COMMIT"):  # the GPU machine's copy of the tree has no .git
        if os.environ.get(var):
            return os.environ[var]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else "unknown"
    except Exception:
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------


def device_info(b: Bench) -> dict:
    import triton

    info = {"device": b.dev, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "commit": _git_commit(), "smoke": b.smoke,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if b.dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), driver=_driver())
    else:
        info.update(gpu="none (CPU, Triton interpreter)", driver="n/a")
    for k, v in info.items():
        print(f"  {k}: {v}")
    # device-to-device copy: read + write, on a large buffer (the device figure) and at the quant input sizes
    rows = []
    sizes = [("large buffer", b.copy_mb * 2**20)] + [(f"bf16 [{b.M}, {k}]", b.M * k * 2) for k in b.quant_k]
    for label, nbytes in sizes:
        src = torch.empty(nbytes, dtype=torch.uint8, device=b.dev).random_()
        dst = torch.empty_like(src)
        t = b.time(dst.copy_, src)
        rows.append({"copy": label, "MB": nbytes / 1e6, "ms": t["ms"], "GB/s": 2 * nbytes / t["ms"] * 1e-6})
        del src, dst
    from kernels._common import print_table

    print_table(rows, ["copy", "MB", "ms", "GB/s"])
    info["copy"] = rows
    info["copy_GBps"] = rows[0]["GB/s"]
    return info


def bench_quant(b: Bench, copy_gbps: float) -> dict:
    from kernels import fp8_quant as Q
    from kernels._common import print_table, rel_rms
    from kernels.fp8_quant import quant_fp8, quant_fp8_ref

    def run(x, per_token):
        q, s = quant_fp8(x, per_token)
        qr, sr = quant_fp8_ref(x, per_token)
        deq = lambda q, s: q.float() * (s[:, None] if s.numel() > 1 else s)
        rec = {"codes_differ": (q.view(torch.uint8) != qr.view(torch.uint8)).float().mean().item(),
               "rel_err": rel_rms(deq(q, s), deq(qr, sr)), "scales_equal": bool(torch.equal(s, sr))}
        rec.update(b.bandwidth(x.numel() * (x.element_size() + 1), copy_gbps, quant_fp8, x, per_token))
        rec.update(config=tuned(Q._quant_kernel), torch_ref_ms=b.time(quant_fp8_ref, x, per_token)["ms"])
        return rec

    rows = []
    for K in b.quant_k:
        if b.out_of_time(f"quant K={K}"):
            break
        x = torch.randn(b.M, K, device=b.dev, dtype=torch.bfloat16) * 3
        for per_token in (True, False):
            measure(rows, {"M": b.M, "K": K, "mode": "per-token" if per_token else "per-tensor"}, run, x, per_token)
    print_table(rows, ["M", "K", "mode", "rel_err", "codes_differ", "ms", "GBps", "pct_copy", "graph_ms",
                       "graph_pct_copy", "torch_ref_ms", "error"])
    return {"rows": rows}


def bench_gemm(b: Bench) -> dict:
    from kernels import fp8_gemm as G
    from kernels._common import print_table, rel_rms
    from kernels.fp8_gemm import PRECISE_ADD, _fp8_gemm, fp8_gemm, fp8_gemm_ref, scaled_mm
    from kernels.fp8_quant import quant_fp8_ref

    def check(a, sa, w, sw, bias, **kw):
        return {"rel_err_vs_ref": rel_rms(fp8_gemm(a, sa, w, sw, bias, **kw), fp8_gemm_ref(a, sa, w, sw, bias, **kw))}

    checks, rows, fused = [], [], []
    M = b.M
    for name, (K, N) in list(b.large.items()) + list(b.medium.items()):
        if b.out_of_time(f"gemm {name}"):
            break
        torch.manual_seed(0)
        x = torch.randn(M, K, device=b.dev, dtype=torch.bfloat16)
        wt = torch.randn(N, K, device=b.dev, dtype=torch.bfloat16) * 0.02
        a, sa = quant_fp8_ref(x)
        w, sw = quant_fp8_ref(wt)
        sa1, sw1 = sa.amax().reshape(1), sw.amax().reshape(1)
        bias = torch.randn(N, device=b.dev, dtype=torch.bfloat16) * 0.1
        flop = 2 * M * N * K
        for fast in (False, True):
            measure(checks, {"layer": name, "K": K, "N": N, "fast_accum": fast}, check, a, sa, w, sw, bias,
                    fast_accum=fast)
        # (impl, fn, args, kwargs): every implementation computes the same [M, N] bf16 output
        impls = [("triton", fp8_gemm, (a, sa, w, sw, bias), {}),
                 ("triton fast_accum", fp8_gemm, (a, sa, w, sw, bias), {"fast_accum": True}),
                 ("_scaled_mm row-wise", scaled_mm, (a, sa, w, sw, bias), {}),
                 ("bf16 F.linear", F.linear, (x, wt, bias), {})]
        if name in b.large:
            impls += [
                ("triton precise via acc += dot per K tile", _fp8_gemm,
                 (a, sa, w, sw, bias, torch.bfloat16, "none", None, None, 0, PRECISE_ADD), {}),
                ("_scaled_mm row-wise fast_accum", scaled_mm, (a, sa, w, sw, bias), {"fast_accum": True}),
                ("_scaled_mm per-tensor", scaled_mm, (a, sa1, w, sw1, bias), {}),
                ("_scaled_mm per-tensor fast_accum", scaled_mm, (a, sa1, w, sw1, bias), {"fast_accum": True}),
                ("triton per-tensor", fp8_gemm, (a, sa1, w, sw1, bias), {}),
                ("quant_fp8 + triton (whole W8A8 linear)", quant_then_gemm, (x, w, sw, bias), {}),
            ]
        for impl, fn, args, kw in impls:
            if b.out_of_time(f"gemm {name} {impl}"):
                break
            r = measure(rows, {"layer": name, "M": M, "K": K, "N": N, "impl": impl},
                        lambda fn=fn, args=args, kw=kw: tflops(flop, b.time(fn, *args, **kw)))
            if impl.startswith("triton") and "error" not in r:
                r["config"] = tuned(G._fp8_gemm_kernel)
        # the fused epilogues against the unfused sequences the model would otherwise run
        if name not in ("fc1", "fc2", "proj"):
            continue
        if name == "fc1":
            kw = {"act": "gelu_tanh"}
            pairs = [("triton fused GELU", fp8_gemm, (a, sa, w, sw, bias), kw),
                     ("_scaled_mm, then F.gelu", scaled_mm_gelu, (a, sa, w, sw, bias), {}),
                     ("bf16 F.linear, then F.gelu", linear_gelu, (x, wt, bias), {})]
        else:
            res = torch.randn(M, N, device=b.dev, dtype=torch.bfloat16)
            gate = torch.randn(b.B, N, device=b.dev, dtype=torch.bfloat16)
            kw = {"gate": gate, "residual": res, "rows_per_batch": M // b.B}
            pairs = [("triton fused gate + residual", fp8_gemm, (a, sa, w, sw, bias), kw),
                     ("_scaled_mm, then res + gate * y", scaled_mm_gated, (a, sa, w, sw, bias, gate, res), {}),
                     ("bf16 F.linear, then res + gate * y", linear_gated, (x, wt, bias, gate, res), {})]
        measure(checks, {"layer": name, "K": K, "N": N, "epilogue": ",".join(sorted(kw))}, check, a, sa, w, sw,
                bias, **kw)
        for impl, fn, args, kw in pairs:
            if b.out_of_time(f"gemm epilogue {name} {impl}"):
                break
            measure(fused, {"layer": name, "M": M, "K": K, "N": N, "impl": impl},
                    lambda fn=fn, args=args, kw=kw: tflops(flop, b.time(fn, *args, **kw)))
    print_table(checks, ["layer", "K", "N", "fast_accum", "epilogue", "rel_err_vs_ref", "error"])
    print_table(rows, ["layer", "M", "K", "N", "impl", "ms", "p20", "p80", "TFLOPs", "first_call_s", "error"])
    print_table(fused, ["layer", "M", "K", "N", "impl", "ms", "TFLOPs", "first_call_s", "error"])
    return {"checks": checks, "rows": rows, "fused": fused}


def bench_accum(b: Bench) -> dict:
    """fast_accum on/off at fc2's K: error against fp64, for the Triton kernel and for _scaled_mm. fp32 output, so
    that bf16 rounding does not hide the accumulation error (costs one more autotune per accumulation mode)."""
    from kernels._common import print_table, rel_rms
    from kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref, scaled_mm
    from kernels.fp8_quant import quant_fp8_ref

    def err(exact, fn, *args, **kw):
        return {"rel_err_vs_fp64": rel_rms(fn(*args, **kw), exact)}

    K, N = b.large["fc2"]
    M = min(b.M, 2048)  # the error does not depend on M; a smaller M keeps the fp64 reference cheap
    f32 = torch.float32
    rows = []
    for data in ("zero-mean", "all-positive"):
        if b.out_of_time(f"accum {data}"):
            break
        torch.manual_seed(1)
        x, wt = torch.randn(M, K, device=b.dev), torch.randn(N, K, device=b.dev) * 0.02
        if data == "all-positive":  # every partial sum grows: the worst case for dropped low bits
            x, wt = x.abs(), wt.abs()
        a, sa = quant_fp8_ref(x)
        w, sw = quant_fp8_ref(wt)
        exact = fp8_gemm_ref(a, sa, w, sw, out_dtype=f32, compute_dtype=torch.float64)
        for impl, fn, args, kw in [
            ("triton precise (default)", fp8_gemm, (a, sa, w, sw), {"out_dtype": f32}),
            ("triton fast_accum", fp8_gemm, (a, sa, w, sw), {"out_dtype": f32, "fast_accum": True}),
            ("_scaled_mm row-wise", scaled_mm, (a, sa, w, sw), {"out_dtype": f32}),
            ("_scaled_mm row-wise fast_accum", scaled_mm, (a, sa, w, sw), {"out_dtype": f32, "fast_accum": True}),
            ("fp32 torch matmul of the dequantised operands", fp8_gemm_ref, (a, sa, w, sw), {"out_dtype": f32}),
        ]:
            if b.out_of_time(f"accum {data} {impl}"):
                break
            measure(rows, {"data": data, "M": M, "K": K, "N": N, "impl": impl}, err, exact, fn, *args, **kw)
    print_table(rows, ["data", "M", "K", "N", "impl", "rel_err_vs_fp64", "error"])
    return {"rows": rows}


def bench_dequant(b: Bench) -> dict:
    """Weight-only FP8 GEMV / GEMM against bf16 F.linear on the same (dequantised) weight.

    At M = 2 a call is ~10-30 us, so two timings are kept: do_bench (eager calls, L2 flushed before each), and
    `stream_ms`: R calls on R distinct weights replayed in one CUDA graph, per call. The graph removes the host's
    launch cost, and R distinct weights (R x fp8 bytes >= 4x the L2) keep the weight out of L2, as in the model,
    where every adaLN weight is read once per step. (do_bench_cudagraph alone replays one call on one weight: an
    fp8 adaLN weight of 35 MB stays in the H200's 60 MB L2 and the bf16 one of 71 MB does not, which flatters
    FP8.) The last case is what the fused forward actually runs: every adaLN of SD3.5 Large in one GEMV."""
    from kernels import fp8_dequant_gemm as D
    from kernels._common import print_table, rel_rms
    from kernels.fp8_dequant_gemm import dequant_gemm, dequant_gemm_ref
    from kernels.fp8_quant import quant_fp8_ref

    l2 = torch.cuda.get_device_properties(0).L2_cache_size if b.dev == "cuda" else 0

    def run(ref, fn, args_list, **kw):
        args = args_list[0]
        rec = {} if ref is None else {"rel_err_vs_ref": rel_rms(fn(*args, **kw), ref)}
        rec.update(b.time(fn, *args, **kw))
        if b.dev == "cuda" and len(args_list) > 1:
            many = lambda: [fn(*a, **kw) for a in args_list]
            rec["stream_ms"] = b.time(many, graph=True)["ms"] / len(args_list)
            rec["stream_calls"] = len(args_list)
        return rec

    rows = []
    cases = [(name, 2, K, N) for name, (K, N) in b.adaln.items()]
    if not b.smoke and not b.gemv_only:  # SD3.5 Large: 38 blocks x 2 streams x 6 * 2432 outputs, as fast.py has them
        cases.append(("all adaLN of SD3.5 Large, one GEMV", 2, 2432, 76 * 6 * 2432))
    if not b.gemv_only:
        cases += [(f"{name} weight-only", b.M, K, N) for name, (K, N) in list(b.large.items())[:2]]
    for name, M, K, N in cases:
        if b.out_of_time(f"dequant {name}"):
            break
        torch.manual_seed(2)
        x = torch.randn(M, K, device=b.dev, dtype=torch.bfloat16)
        bias = torch.randn(N, device=b.dev, dtype=torch.bfloat16)
        # R distinct weights: enough that the fp8 copies together are >= 4x the L2 (1 for the big one-GEMV case)
        R = 1 if M > 16 or N * K >= 4 * l2 else max(2, -(-4 * l2 // (N * K)))
        ws = [quant_fp8_ref(torch.randn(N, K, device=b.dev) * 0.02) for _ in range(R)]
        wbs = [(w.float() * sw[:, None]).to(torch.bfloat16) for w, sw in ws]  # the same weights in bf16
        w, sw = ws[0]
        ref = dequant_gemm_ref(x, w, sw, bias)
        base = measure(rows, {"case": name, "M": M, "K": K, "N": N, "impl": "bf16 F.linear"},
                       run, None, F.linear, [(x, wb, bias) for wb in wbs])
        impls = [("triton fp8", dequant_gemm, False), ("triton bitcast", dequant_gemm, True)]
        if M <= D.FMA_MAX_M:  # both GEMV kernels (the default is the FMA one)
            impls += [(f"triton fp8, {p} GEMV", lambda *a, p=p: D._dequant_gemm(*a, p), False) for p in ("fma", "mma")]
        for impl, fn, bitcast in impls:
            r = measure(rows, {"case": name, "M": M, "K": K, "N": N, "impl": impl}, run, ref, fn,
                        [(x, wq, s, bias, bitcast) for wq, s in ws])
            fma = M <= D.FMA_MAX_M and not impl.endswith("mma GEMV")
            r["config"] = (str(D.fma_gemv_config(K, bitcast)) if fma
                           else tuned(D._gemv if M <= D.GEMV_MAX_M else D._gemm))
            if "ms" in r and "ms" in base:
                r["speedup_vs_linear"] = base["ms"] / r["ms"]
                if "stream_ms" in r and "stream_ms" in base:
                    r["stream_speedup_vs_linear"] = base["stream_ms"] / r["stream_ms"]
        for r in rows[-len(impls) - 1:]:
            for t in ("ms", "stream_ms"):
                if t in r:
                    r[t.replace("ms", "weight_GBps")] = N * K * (2 if r["impl"].startswith("bf16") else 1) / r[t] * 1e-6
        del ws, wbs
        if b.dev == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, ["case", "M", "K", "N", "impl", "rel_err_vs_ref", "ms", "stream_ms", "stream_calls",
                       "speedup_vs_linear", "stream_speedup_vs_linear", "weight_GBps", "stream_weight_GBps",
                       "first_call_s", "error"])
    return {"rows": rows, "L2_bytes": l2}


# FMA GEMV configs the gemv section times one by one beside dequant_gemm: its two fixed configs, and the others
# GPU session 7 measured (bench/results/2026-12-02_h200_session7), kept as the yardstick for the choice
def _gemv_sweep():
    import triton

    from kernels.fp8_dequant_gemm import FMA_GEMV_CONFIG, FMA_GEMV_WIDE_CONFIG

    others = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=1, maxnreg=r)
              for bn, bk, w, r in [(32, 128, 4, None), (16, 256, 4, None), (16, 128, 4, None), (16, 128, 4, 96),
                                   (8, 128, 2, None), (32, 64, 4, 96), (4, 256, 2, None)]]
    return [FMA_GEMV_CONFIG, FMA_GEMV_WIDE_CONFIG] + others


def _gemv_bitcast_sweep():
    import triton

    from kernels.fp8_dequant_gemm import FMA_GEMV_BITCAST_CONFIG, FMA_GEMV_CONFIG

    others = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=1)
              for bn, bk, w in [(16, 128, 4), (16, 256, 4), (8, 256, 2), (16, 128, 2)]]
    return [FMA_GEMV_BITCAST_CONFIG, FMA_GEMV_CONFIG] + others


def fma_gemv_fixed(cfg, bitcast: bool = False, pdl: bool = False, pdl_tiles: int | None = None):
    """dequant_gemm's FMA GEMV launched with one config, bias and per-channel scale (bitcast: uint8 codes; pdl:
    programmatic dependent launch where supported, prefetching pdl_tiles tiles per row, default FMA_PDL_TILES)."""
    from kernels import fp8_dequant_gemm as D

    tiles = D.FMA_PDL_TILES if pdl_tiles is None else pdl_tiles

    def f(x, w, s, bias, out_dtype=torch.bfloat16):
        M, K = x.shape
        N = w.shape[0]
        out = torch.empty(M, N, dtype=out_dtype, device=x.device)
        args = (x, w, out, s, bias, M, N, K, x.stride(0), w.stride(0), out.stride(0))
        D.fma_gemv_launch(cfg, args, M, N, dict(W_PER_COL=True, HAS_BIAS=True, BITCAST=bitcast), pdl, tiles)
        return out

    return f


def bench_gemv(b: Bench) -> dict:
    """The M = 2 adaLN GEMV (weight-only FP8) against bf16 F.linear: dequant_gemm (the FMA GEMV with its fixed
    config) and each config of _gemv_sweep(). Per-layer cases are timed as bench_dequant's stream_ms (R calls on
    R distinct weights in one CUDA graph, no L2 reuse); the one GEMV over every adaLN of SD3.5 Large (2.7 GB of
    fp8) replayed alone. (GPU session 7 also fed x in fp32, to spare the kernel its bf16 -> fp32 conversions:
    slower in 40 of 54 shape x config pairs, e.g. 0.787 vs 0.709 ms for the best config on the one GEMV, likely
    from the x tile twice as wide: twice the L1 traffic, and registers (16 x 256: 138 instead of 128, so fewer
    programs per SM). bench/results/2026-12-02_h200_session7/gemv_run1.json.)

    "dequant_gemm pdl" is dequant_gemm(..., pdl=True), programmatic dependent launch (sm90+; its config column
    says whether it applied on this device), "fixed config pdl" the same kernel prefetching other numbers of tiles
    per row before its wait. Per layer the R calls in one graph are back-to-back GEMVs, which is what PDL overlaps;
    the one GEMV replayed alone has no predecessor in its graph, so there only the prefetch can change anything."""
    from kernels import fp8_dequant_gemm as D
    from kernels._common import print_table, rel_rms
    from kernels.fp8_dequant_gemm import dequant_gemm, dequant_gemm_ref
    from kernels.fp8_quant import quant_fp8_ref

    l2 = torch.cuda.get_device_properties(0).L2_cache_size if b.dev == "cuda" else 0
    cases = [(name, K, N) for name, (K, N) in b.adaln.items()]
    if not b.smoke:
        cases.append(("all adaLN of SD3.5 Large, one GEMV", 2432, 76 * 6 * 2432))
    rows = []
    for name, K, N in cases:
        torch.manual_seed(3)
        x = torch.randn(2, K, device=b.dev, dtype=torch.bfloat16)
        bias = torch.randn(N, device=b.dev, dtype=torch.bfloat16)
        R = 1 if N * K >= 4 * l2 else max(2, -(-4 * l2 // (N * K)))
        ws = [quant_fp8_ref(torch.randn(N, K, device=b.dev) * 0.02) for _ in range(R)]
        ref = dequant_gemm_ref(x, *ws[0], bias)

        def stream(weights, fn):
            """ms per call: one call per weight, all in one CUDA graph (one weight: that call replayed)"""
            many = lambda: [fn(x, w, s, bias) for w, s in weights]
            return b.time(many, graph=b.dev == "cuda")["ms"] / len(weights)

        wbs = [((w.float() * s[:, None]).to(torch.bfloat16), None) for w, s in ws]  # the same weights in bf16
        base = stream(wbs, lambda xx, wb, _s, bb: F.linear(xx, wb, bb))
        del wbs
        rows.append({"case": name, "N": N, "K": K, "impl": "bf16 F.linear", "calls": R, "ms": base,
                     "weight_GBps": 2 * N * K / base * 1e-6})
        print(f"  {rows[-1]}", flush=True)
        impls = [("dequant_gemm", str(D.fma_gemv_config(K)), dequant_gemm)]
        pdl = "on" if D.pdl_supported(x.device) else "off (not supported here)"
        impls += [("dequant_gemm pdl", f"{D.fma_gemv_config(K)} pdl={pdl} pdl_tiles={D.FMA_PDL_TILES}",
                   lambda *a: dequant_gemm(*a, pdl=True))]
        impls += [("fixed config pdl", f"{D.fma_gemv_config(K)} pdl={pdl} pdl_tiles={t}",
                   fma_gemv_fixed(D.fma_gemv_config(K), pdl=True, pdl_tiles=t)) for t in (2, 32)]
        impls += [("fixed config", str(c), fma_gemv_fixed(c)) for c in _gemv_sweep()]
        # the uint8 path of GPUs without an fp8 type (sm80/86), forced here: its own config, and the candidates
        codes = lambda f: lambda x, w, s, bias: f(x, w.view(torch.uint8), s, bias)  # noqa: E731
        impls += [("dequant_gemm bitcast", str(D.fma_gemv_config(K, True)), codes(dequant_gemm))]
        impls += [("fixed config bitcast", str(c), codes(fma_gemv_fixed(c, True))) for c in _gemv_bitcast_sweep()]
        for impl, cfg, fn in impls:
            if b.out_of_time(f"gemv {name} {impl} {cfg}"):
                break

            def run(fn=fn, ws=ws):
                err = rel_rms(fn(x, *ws[0], bias), ref)
                if not err < 1e-2:
                    return {"rel_err_vs_ref": err, "error": "disagrees with dequant_gemm_ref: not timed"}
                ms = stream(ws, fn)
                return {"rel_err_vs_ref": err, "ms": ms, "speedup_vs_linear": base / ms,
                        "weight_GBps": N * K / ms * 1e-6}

            measure(rows, {"case": name, "N": N, "K": K, "impl": impl, "config": cfg, "calls": R}, run)
        del ws
        if b.dev == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, ["case", "impl", "config", "calls", "rel_err_vs_ref", "ms", "speedup_vs_linear", "weight_GBps",
                       "error"])
    best = {}
    for r in rows:
        if "speedup_vs_linear" in r:
            best[r["case"]] = max(best.get(r["case"], 0.0), r["speedup_vs_linear"])
    return {"rows": rows, "best_speedup": best}

def bench_ln(b: Bench, copy_gbps: float) -> dict:
    import triton
    import triton.language as tl

    from kernels import ln_mod_quant as LN
    from kernels._common import print_table, rel_rms
    from kernels.ln_mod_quant import ln_mod, ln_mod_quant, ln_mod_quant_ref, ln_mod_ref

    def run(fn, moved, x, shift, scale, L, check=None):
        rec = {}
        if check == "quant":
            q, s = ln_mod_quant(x, shift, scale, L)
            qr, sr = ln_mod_quant_ref(x, shift, scale, L)
            rec = {"rel_err_vs_ref": rel_rms(q.float() * s[:, None], qr.float() * sr[:, None]),
                   "codes_differ": (q.view(torch.uint8) != qr.view(torch.uint8)).float().mean().item()}
        elif check == "bf16":
            rec = {"rel_err_vs_ref": rel_rms(ln_mod(x, shift, scale, L), ln_mod_ref(x, shift, scale, L))}
        rec.update(b.bandwidth(moved, copy_gbps, fn, x, shift, scale, L))
        if fn in (ln_mod_quant, ln_mod):
            rec["config"] = tuned(LN._ln_mod_kernel)
        return rec

    rows = []
    for K in b.ln_k:
        if b.out_of_time(f"ln K={K}"):
            break
        L = b.M // b.B
        M = L * b.B
        torch.manual_seed(3)
        x = torch.randn(M, K, device=b.dev, dtype=torch.bfloat16) * 2 + 0.5
        mod = torch.randn(b.B, 6 * K, device=b.dev, dtype=torch.bfloat16) * 0.5
        shift, scale = mod[:, :K], mod[:, K:2 * K]  # strided chunks, as the model passes them
        moved_q, moved_y = M * K * (2 + 1) + 4 * M, M * K * (2 + 2)
        for impl, fn, moved, check in [("triton ln_mod_quant", ln_mod_quant, moved_q, "quant"),
                                       ("torch: layer_norm, modulate, quant", ln_mod_quant_ref, moved_q, None),
                                       ("triton ln_mod (bf16 out)", ln_mod, moved_y, "bf16"),
                                       ("torch: layer_norm, modulate", ln_mod_ref, moved_y, None)]:
            measure(rows, {"M": M, "K": K, "impl": impl}, run, fn, moved, x, shift, scale, L, check=check)
        # ln_mod_quant with every config the autotuner would time, each alone (BLOCK_M rows per program x warps)
        y = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=b.dev)
        ys = torch.empty(M, dtype=torch.float32, device=b.dev)
        tiles = LN.row_tiles(K)
        for cfg in LN.prune_row_tiles(LN.LN_CONFIGS, tiles):
            launch = lambda c=cfg: LN._ln_mod_kernel.fn[(triton.cdiv(M, c.kwargs["BLOCK_M"]),)](
                x, shift, scale, y, ys, M, K, L, 1e-6, x.stride(0), shift.stride(0), scale.stride(0), y.stride(0),
                QUANT=True, ROUND_FIRST=False, LN_DT=tl.bfloat16, T_DT=tl.bfloat16, U_DT=tl.bfloat16,
                Y_DT=tl.bfloat16, num_warps=c.num_warps, enable_fp_fusion=False, **tiles, **c.kwargs)
            measure(rows, {"M": M, "K": K, "impl": "ln_mod_quant fixed config", "config": str(cfg)},
                    lambda: b.bandwidth(moved_q, copy_gbps, launch))
    print_table(rows, ["M", "K", "impl", "config", "rel_err_vs_ref", "codes_differ", "ms", "GBps", "pct_copy",
                       "graph_ms", "graph_pct_copy", "error"])
    return {"rows": rows}


def bench_qk_norm(b: Bench, copy_gbps: float) -> dict:
    from kernels import qk_norm as QK
    from kernels._common import print_table
    from kernels.qk_norm import qk_norm_split, qk_norm_split_ref

    rows = []
    for name, (B, L, H, hd, Ltot, off) in b.qk_cases.items():
        if b.out_of_time(f"qk_norm {name}"):
            break
        torch.manual_seed(4)
        qkv = torch.randn(B * L, 3 * H * hd, device=b.dev, dtype=torch.bfloat16) * 2
        w = (torch.rand(hd, device=b.dev) + 0.5).to(torch.bfloat16)
        bufs = [torch.zeros(B, H, Ltot, hd, device=b.dev, dtype=torch.bfloat16) for _ in range(6)]
        moved = 2 * qkv.numel() * qkv.element_size()  # qkv read once, q/k/v written once

        def run(fn, check: bool):
            rec = {}
            if check:
                qk_norm_split(qkv, B, L, H, hd, w, w, 1e-6, *bufs[:3], off)
                qk_norm_split_ref(qkv, B, L, H, hd, w, w, 1e-6, *bufs[3:], off)
                diff = [(a != r) for a, r in zip(bufs[:3], bufs[3:])]
                ulp = max(((a.double() - r.double()).abs() / (r.double().abs().clamp_min(1e-30) * 2**-7)).max().item()
                          for a, r in zip(bufs[:2], bufs[3:5]))
                rec = {"differ": sum(d.float().sum().item() for d in diff) / sum(d.numel() for d in diff),
                       "v_equal": bool(torch.equal(bufs[2], bufs[5])), "max_ulps": ulp}
            rec.update(b.bandwidth(moved, copy_gbps, fn))
            return rec

        for impl, fn, check in [
                ("triton qk_norm_split", lambda: qk_norm_split(qkv, B, L, H, hd, w, w, 1e-6, *bufs[:3], off), True),
                ("triton, no QK norm (SD3 Medium)", lambda: qk_norm_split(qkv, B, L, H, hd, None, None, 1e-6,
                                                                           *bufs[:3], off), False),
                ("torch: permute, RMSNorm, copy", lambda: qk_norm_split_ref(qkv, B, L, H, hd, w, w, 1e-6, *bufs[3:],
                                                                            off), False)]:
            if name != "large image" and "no QK" in impl:
                continue
            r = measure(rows, {"case": name, "B": B, "L": L, "heads": H, "impl": impl}, run, fn, check)
            if impl.startswith("triton"):
                r["config"] = tuned(QK._qk_norm_kernel)
    print_table(rows, ["case", "B", "L", "heads", "impl", "differ", "max_ulps", "v_equal", "ms", "GBps", "pct_copy",
                       "graph_ms", "graph_pct_copy", "error"])
    return {"rows": rows}


def bench_gelu_quant(b: Bench, copy_gbps: float) -> dict:
    import triton
    import triton.language as tl

    from kernels import gelu_quant as GQ
    from kernels._common import print_table, rel_rms
    from kernels.gelu_quant import gelu_quant, gelu_quant_ref

    def run(h, fn, check: bool):
        rec = {}
        if check:
            q, s = gelu_quant(h)
            qr, sr = gelu_quant_ref(h)
            rec = {"codes_differ": (q.view(torch.uint8) != qr.view(torch.uint8)).float().mean().item(),
                   "scales_equal": bool(torch.equal(s, sr)),
                   "rel_err": rel_rms(q.float() * s[:, None], qr.float() * sr[:, None])}
        rec.update(b.bandwidth(h.numel() * (h.element_size() + 1) + 4 * h.shape[0], copy_gbps, fn, h))
        return rec

    rows = []
    for M, N in b.gelu_shapes:
        if b.out_of_time(f"gelu_quant N={N}"):
            break
        torch.manual_seed(5)
        h = torch.randn(M, N, device=b.dev, dtype=torch.bfloat16) * 1.5  # fc1 outputs: zero-mean, O(1)
        for impl, fn, check in [("triton gelu_quant", gelu_quant, True),
                                ("torch: F.gelu, quant_fp8_ref", gelu_quant_ref, False)]:
            r = measure(rows, {"M": M, "N": N, "impl": impl}, run, h, fn, check)
            if check:
                r["config"] = tuned(GQ._gelu_quant_kernel)
        # every config alone (the autotuner picks among all of them by timing)
        q = torch.empty(M, N, dtype=torch.float8_e4m3fn, device=b.dev)
        sc = torch.empty(M, dtype=torch.float32, device=b.dev)
        for cfg in GQ.GELU_CONFIGS:
            launch = lambda c=cfg: GQ._gelu_quant_kernel.fn[(triton.cdiv(M, c.kwargs["BLOCK_M"]),)](
                h, q, sc, M, N, h.stride(0), G_DT=tl.bfloat16, ROUND_FIRST=False, num_warps=c.num_warps, **c.kwargs)
            measure(rows, {"M": M, "N": N, "impl": "fixed config", "config": str(cfg)},
                    lambda: b.bandwidth(h.numel() * 3 + 4 * M, copy_gbps, launch))
    print_table(rows, ["M", "N", "impl", "config", "rel_err", "codes_differ", "scales_equal", "ms", "GBps",
                       "pct_copy", "graph_ms", "graph_pct_copy", "error"])
    return {"rows": rows}


def bench_routes(b: Bench) -> dict:
    """Weight-only GEMM at growing M: the fused-dequant kernel against dequant_weight + F.linear (cuBLAS)."""
    from kernels import fp8_dequant_gemm as D
    from kernels._common import print_table, rel_rms
    from kernels.fp8_dequant_gemm import dequant_gemm, dequant_gemm_ref, dequant_weight
    from kernels.fp8_quant import quant_fp8_ref

    rows = []
    for layer, K, N, Ms in b.route_cases:
        torch.manual_seed(6)
        w, sw = quant_fp8_ref(torch.randn(N, K, device=b.dev) * 0.02)
        wb = (w.float() * sw[:, None]).to(torch.bfloat16)
        bias = torch.randn(N, device=b.dev, dtype=torch.bfloat16)
        if not b.out_of_time(f"routes {layer} dequant_weight"):  # the extra pass alone: 1 byte read + 2 written
            r = measure(rows, {"layer": layer, "M": 0, "K": K, "N": N, "impl": "dequant_weight alone"},
                        lambda: b.time(dequant_weight, w, sw))
            if "ms" in r:
                r["weight_GBps"] = 3 * N * K / r["ms"] * 1e-6
        for M in sorted(Ms, reverse=True):  # large M first: the fused kernel's configs are tuned per M bucket
            if b.out_of_time(f"routes {layer} M={M}"):
                break
            x = torch.randn(M, K, device=b.dev, dtype=torch.bfloat16)
            base = measure(rows, {"layer": layer, "M": M, "K": K, "N": N, "impl": "bf16 F.linear"},
                           lambda: b.time(F.linear, x, wb, bias))
            ref = dequant_gemm_ref(x, w, sw, bias)
            for route in ("fused", "dequant"):
                r = measure(rows, {"layer": layer, "M": M, "K": K, "N": N, "impl": f"route={route}"},
                            lambda route=route: {"rel_err_vs_ref": rel_rms(dequant_gemm(x, w, sw, bias, route=route),
                                                                           ref),
                                                 **b.time(dequant_gemm, x, w, sw, bias, route=route)})
                if "ms" in r and "ms" in base:
                    r["time_vs_linear"] = r["ms"] / base["ms"]
                    r["auto_takes_it"] = (route == "dequant") == (M >= D.DEQUANT_ROUTE_MIN_M)
                    r["TFLOPs"] = 2 * M * N * K / r["ms"] * 1e-9
    print_table(rows, ["layer", "M", "K", "N", "impl", "rel_err_vs_ref", "ms", "time_vs_linear", "auto_takes_it",
                       "TFLOPs", "weight_GBps", "error"])
    return {"rows": rows, "DEQUANT_ROUTE_MIN_M": D.DEQUANT_ROUTE_MIN_M}


def bench_variants(b: Bench) -> dict:
    """The FP8 GEMM's kernel variants (fp8_gemm(variant=...)) against _scaled_mm row-wise, checked first."""
    from kernels import fp8_gemm as G
    from kernels._common import print_table, rel_rms
    from kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref, scaled_mm
    from kernels.fp8_quant import quant_fp8_ref

    rows = []
    M = b.M
    for layer, (K, N) in b.variant_layers.items():
        if b.layers and layer not in b.layers:
            continue
        torch.manual_seed(7)
        a, sa = quant_fp8_ref(torch.randn(M, K, device=b.dev))
        w, sw = quant_fp8_ref(torch.randn(N, K, device=b.dev) * 0.02)
        bias = torch.randn(N, device=b.dev, dtype=torch.bfloat16) * 0.1
        ref = fp8_gemm_ref(a, sa, w, sw, bias)
        flop = 2 * M * N * K
        impls = [("_scaled_mm row-wise", scaled_mm, {}), ("_scaled_mm row-wise fast_accum", scaled_mm,
                                                          {"fast_accum": True})]
        # "add" is timed by the gemm section ("triton precise via acc += dot per K tile"); "default" reuses the
        # gemm section's autotuning
        impls += [(f"triton {v}", fp8_gemm, {"variant": v}) for v in b.gemm_variants]
        if layer == "qkv":
            impls += [(f"triton {v} fast_accum", fp8_gemm, {"variant": v, "fast_accum": True})
                      for v in b.gemm_variants if v != "tma"]
        for impl, fn, kw in impls:
            if b.out_of_time(f"variants {layer} {impl}"):
                break

            def run(fn=fn, kw=kw):
                err = rel_rms(fn(a, sa, w, sw, bias, **kw), ref)
                rec = {"rel_err_vs_ref": err}
                if not err < 1e-2:  # session 1: 7e-4 precise, 2e-3..3e-3 fast (bf16 output); a broken kernel: O(1)
                    rec["error"] = f"disagrees with fp8_gemm_ref (rel err {err:.2e}): not timed"
                    return rec
                return {**rec, **tflops(flop, b.time(fn, a, sa, w, sw, bias, **kw))}

            r = measure(rows, {"layer": layer, "M": M, "K": K, "N": N, "impl": impl}, run)
            if impl.startswith("triton") and "ms" in r:
                kernel = {"tma": G._fp8_gemm_tma, "ws": G._fp8_gemm_ws, "persistent": G._fp8_gemm_persistent}.get(
                    kw.get("variant"), G._fp8_gemm_kernel)
                r["config"] = tuned(kernel)
        base = next((r for r in rows if r["layer"] == layer and r["impl"] == "_scaled_mm row-wise" and "ms" in r), None)
        for r in rows:
            if r["layer"] == layer and base and "ms" in r:
                r["speed_vs_scaled_mm"] = base["ms"] / r["ms"]
    print_table(rows, ["layer", "M", "K", "N", "impl", "rel_err_vs_ref", "ms", "TFLOPs", "speed_vs_scaled_mm",
                       "first_call_s", "error"])
    return {"rows": rows}


def targets(res: dict) -> list[dict]:
    """The brief's GPU targets, each with its measured value and whether it is met."""
    out = []

    def rows(sec):
        return res.get(sec, {}).get("rows", []) if isinstance(res.get(sec), dict) else []

    memory_bound = [  # (section, which rows, what, target % of the copy bandwidth)
        ("quant", lambda r: r.get("mode") == "per-token", lambda r: f"quant_fp8 per-token K={r['K']}", 80),
        ("qk_norm", lambda r: r.get("impl") == "triton qk_norm_split", lambda r: f"qk_norm_split {r['case']}", 70),
        ("gelu_quant", lambda r: r.get("impl") == "triton gelu_quant", lambda r: f"gelu_quant N={r['N']}", 80)]
    for sec, pick, what, pct in memory_bound:
        for r in rows(sec):
            if pick(r) and "pct_copy" in r:
                best = max(r["pct_copy"], r.get("graph_pct_copy", 0))
                out.append({"target": f"{what(r)} >= {pct}% of copy GB/s (do_bench; graph)",
                            "value": r["pct_copy"], "graph_value": r.get("graph_pct_copy"), "met": best >= pct})
    for r in rows("routes"):
        if r.get("auto_takes_it") and r.get("M") == M_TOKENS and "time_vs_linear" in r:
            out.append({"target": f"weight-only {r['layer']} M={r['M']} auto route ({r['impl']}) <= 1.15x F.linear",
                        "value": r["time_vs_linear"], "met": r["time_vs_linear"] <= 1.15})
    for r in rows("variants"):
        if r.get("impl", "").startswith("triton") and "speed_vs_scaled_mm" in r and "fast" not in r["impl"]:
            out.append({"target": f"fp8_gemm {r['layer']} {r['impl']} >= 1.0x _scaled_mm row-wise",
                        "value": r["speed_vs_scaled_mm"], "met": r["speed_vs_scaled_mm"] >= 1.0})
    g = rows("gemm")
    for layer in LARGE:
        t = next((r for r in g if r["layer"] == layer and r["impl"] == "triton" and "ms" in r), None)
        s = next((r for r in g if r["layer"] == layer and r["impl"] == "_scaled_mm row-wise" and "ms" in r), None)
        if t and s:
            out.append({"target": f"fp8_gemm {layer} >= 1.0x _scaled_mm row-wise", "value": s["ms"] / t["ms"],
                        "met": s["ms"] / t["ms"] >= 1.0})
    for r in rows("dequant"):
        if r.get("impl") == "bf16 F.linear" or "ms" not in r or "speedup_vs_linear" not in r:
            continue
        if r["M"] <= 16:  # judged on the graph-replayed stream of distinct weights (see bench_dequant)
            stream = r.get("stream_speedup_vs_linear", r["speedup_vs_linear"])
            out.append({"target": f"dequant {r['case']} {r['impl']} M=2 >= 1.6x F.linear (do_bench; stream)",
                        "value": r["speedup_vs_linear"], "graph_value": r.get("stream_speedup_vs_linear"),
                        "met": stream >= 1.6})
        else:
            out.append({"target": f"dequant {r['case']} {r['impl']} M={r['M']} time <= 1.15x F.linear",
                        "value": 1 / r["speedup_vs_linear"], "met": 1 / r["speedup_vs_linear"] <= 1.15})
    for r in rows("gemv"):
        if r.get("impl") in ("dequant_gemm", "dequant_gemm pdl") and "speedup_vs_linear" in r:  # bitcast: none
            out.append({"target": f"GEMV M=2 {r['case']}: {r['impl']} >= 1.6x F.linear (graph)",
                        "value": r["speedup_vs_linear"], "met": r["speedup_vs_linear"] >= 1.6})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU under the Triton interpreter")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds after which remaining measurements skip")
    ap.add_argument("--sections", default="all", help="comma-separated sections to run (device always runs), e.g. "
                    "quant,dequant,variants")
    ap.add_argument("--gemm-variants", default="default,tma,persistent", help="fp8_gemm variants the variants "
                    "section times")
    ap.add_argument("--layers", default="", help="comma-separated SD3.5 Large layers for the variants section "
                    "(default: qkv, proj, fc1, fc2)")
    ap.add_argument("--gemv-only", action="store_true", help="dequant section: only the M = 2 adaLN GEMVs")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"), help="folder for kernels.json ($OUT)")
    args = ap.parse_args()
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of kernels.*
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU: use --smoke for the CPU interpreter run", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references must be fp32
    b = Bench(args.smoke, args.budget)
    b.gemm_variants = args.gemm_variants.split(",")
    b.layers = [x for x in args.layers.split(",") if x]
    b.gemv_only = args.gemv_only
    res: dict = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    wanted = None if args.sections == "all" else set(args.sections.split(",")) | {"device"}

    def run(name: str, fn, *fargs) -> None:
        """One section, then kernels.json rewritten with everything so far: a run that is killed (time limit, a
        hung kernel) still leaves the sections it finished."""
        if wanted is not None and name not in wanted:
            return
        section(res, name, fn, *fargs)
        res["wall_s"] = round(time.time() - b.t0, 1)
        (out / "kernels.json").write_text(json.dumps(res, default=str))

    run("device", device_info, b)
    copy_gbps = res["device"].get("copy_GBps", float("nan")) if isinstance(res["device"], dict) else float("nan")
    # cheap memory-bound kernels first, the GEMMs (most compiling and autotuning) after, the error study last, so
    # that a spent time budget costs the least important measurements. The GEMM variants come after the main GEMM
    # table ("ws", which deadlocked on an H200 with Triton 3.6, only where asked for: bench/gemm_configs_gpu.py
    # probes it config by config in processes it can kill).
    run("quant", bench_quant, b, copy_gbps)
    run("qk_norm", bench_qk_norm, b, copy_gbps)
    run("gelu_quant", bench_gelu_quant, b, copy_gbps)
    run("ln", bench_ln, b, copy_gbps)
    run("dequant", bench_dequant, b)
    run("gemv", bench_gemv, b)
    run("routes", bench_routes, b)
    run("gemm", bench_gemm, b)
    run("variants", bench_variants, b)
    run("accum", bench_accum, b)
    res["targets"] = targets(res)
    res["skipped_for_time"] = b.skipped
    res["wall_s"] = round(time.time() - b.t0, 1)
    print("\n=== targets ===")
    from kernels._common import print_table

    print_table(res["targets"], ["target", "value", "graph_value", "met"])
    failed = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    print(f"sections with errors: {failed or 'none'}; wall {res['wall_s']} s")
    text = json.dumps(res, default=str)
    (out / "kernels.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
