"""Small helpers shared by the kernel files: the FP8 constants, argument checks that raise minisd35's errors, the
autotune config picker that keeps the Triton interpreter fast, and the timing / error helpers their `__main__`
blocks and bench/kernels_gpu.py use.

FP8 conventions used by every kernel (the lead's fp8.py relies on exactly these):
    E4M3 = torch.float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; largest finite value 448; no Inf;
    0x7F / 0xFF are NaN. A "scale" is always the DEQUANT multiplier, x ~= x_fp8.float() * scale, with
    scale = max(amax, 1e-12) / 448 in fp32 (the floor keeps an all-zero row from dividing by zero).
    Quantising multiplies by the inverse, x * (448 / max(amax, 1e-12)), both divisions IEEE and once per row.
    Every cast clamps to +-448 first: eager PyTorch casts 465 to NaN on older versions, the Triton interpreter
    wraps 1000 to 256, and only the GPU's `cvt.rn.satfinite` saturates on its own.

Where the Triton interpreter (TRITON_INTERPRET=1, used by the CPU tests) is not faithful to the GPU, and what the
kernels do about it (all of it is switched off in compiled code, except ROUND_FIRST on Ada, see below):
    fp32 -> e4m3 and fp32 -> bf16 casts are not round-to-nearest-even  -> ROUND_FIRST: round in fp32 first
    tl.dot on bf16 tiles multiplies the raw 16-bit patterns           -> dequant_gemm's DOT_F32
    range(K) over a kernel argument fails with NumPy >= 2.4            -> _fix_interpreter_loop_bounds below
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from minisd35.errors import HardwareError, InputError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_FLOOR = 1e-12  # scale = max(amax, SCALE_FLOOR) / FP8_MAX
MAX_ROW_TILE = 16384  # widest row that the row-wise kernels (quant, LayerNorm) hold in registers at once


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP_M consecutive row tiles share each column
    tile, so the weight tile a group reads is still hot in L2 when the next row tile needs it (the Triton matmul
    tutorial's "super-grouping")."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + ((pid % group) % group_m), (pid % group) // group_m


@triton.jit
def round_to_e4m3_grid(q):
    """Round fp32 q (|q| <= 448) to the nearest E4M3 value, ties to even, staying in fp32.

    Only needed where the fp32 -> fp8 conversion itself is not round-to-nearest-even: the Triton interpreter rounds
    ties up and loses the carry when the mantissa rounds over (124.3 -> 64 instead of 128). Normal range
    (|q| >= 2**-6): keep 3 of fp32's 23 mantissa bits with the usual add-half-minus-one-plus-lsb trick on the bits.
    Subnormal range: the grid is multiples of 2**-9, and adding then subtracting 1.5 * 2**14 rounds to exactly that
    (fp32 addition rounds to nearest even). The sign is carried over so that -0.0001 -> -0 as in torch."""
    bits = q.to(tl.uint32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    a = mag.to(tl.float32, bitcast=True)
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0xFFF00000
    subnormal = ((a + 24576.0) - 24576.0).to(tl.uint32, bitcast=True)
    return (tl.where(a < 0.015625, subnormal, normal) | (bits & 0x80000000)).to(tl.float32, bitcast=True)


@triton.jit
def round_to(x, DTYPE: tl.constexpr, ROUND_FIRST: tl.constexpr):
    """fp32 x rounded to DTYPE (bf16 / fp16 / fp32) and back to fp32: torch's rounding of an intermediate result.
    The interpreter converts fp32 -> bf16 by truncation, so with ROUND_FIRST the bf16 rounding to nearest-even is
    done on the bits first (add 0x7FFF plus the lowest kept bit, clear the low 16 bits)."""
    if ROUND_FIRST:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def to_e4m3(x, inv, ROUND_FIRST: tl.constexpr):
    """x * inv (inv = 448 / amax, or 1 / scale), clamped to +-448 with NaN passing through, cast to E4M3.
    inv broadcasts against x. ROUND_FIRST: round in fp32 first (set under the interpreter, see above). The clamp
    is tl.clamp with NaN propagation (min.NaN / max.NaN: two instructions); two compare-and-selects cost four."""
    q = tl.clamp(x * inv, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)  # min/max.NaN: 2 instructions
    if ROUND_FIRST:
        q = round_to_e4m3_grid(q)
    return q.to(tl.float8e4nv)


def prune_row_tiles(configs, named_args, **kwargs):
    """early_config_prune for the row-wise kernels: keep configs whose [BLOCK_M, BLOCK_K] tile stays within
    MAX_ROW_TILE elements (<= 64 fp32 registers per thread at 8 warps) and gives each thread >= 8 of them."""
    args = {**named_args, **kwargs}
    block_k = args["BLOCK_K"] + (args["BLOCK_K2"] if args.get("TAIL") else 0)  # ln_mod_quant: two column tiles
    kept = [c for c in configs if 8 * 32 * c.num_warps <= c.kwargs["BLOCK_M"] * block_k <= MAX_ROW_TILE]
    return kept or configs[:1]


TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1, read when a kernel is
    decorated, i.e. when the kernel module is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def round_first(dev: torch.device) -> bool:
    """Whether a kernel quantising to E4M3 on `dev` must round to the E4M3 grid in fp32 before the cast
    (ROUND_FIRST). The interpreter, whose casts do not round to nearest-even; and Ada (sm89), where Triton 3.6
    compiles fp32 -> e4m3 as cvt.rz.f16.f32 followed by cvt.rn.satfinite.e4m3x2.f16x2: the first step truncates,
    so a value just above the midpoint between two E4M3 codes can land exactly on it and then round to even,
    i.e. down (0.4% of the codes of N(0, 100^2) data, emulated on the CPU). Rounded to the grid first, the value is
    exact in fp16 and both conversions keep it. Hopper converts fp32 -> e4m3 directly (cvt.rn.satfinite.e4m3x2.f32)."""
    if interpreting():
        return True
    return dev.type == "cuda" and capability(dev) == (8, 9)


def _fix_interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter turns a scalar kernel argument used as a loop bound (`range(0, K, BLOCK_K)`) into a
    Python int with int() of a 1-element array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be
    converted", triton-lang/triton#9171, fixed upstream after 3.6). Re-register that one conversion so that it reads
    the single element. Interpreter only; the compiled GPU path never goes through this."""
    from triton.runtime import interpreter

    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "minisd35_fix", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.minisd35_fix = True
    interpreter._patch_lang_tensor = patched


if interpreting():
    _fix_interpreter_loop_bounds()


def pick_configs(gpu: list, cpu: list) -> list:
    """The config list a kernel autotunes over. On a GPU: the full list. Under the interpreter (or with no GPU)
    autotuning would time every config on the CPU, which takes minutes, so it gets one small config."""
    if interpreting() or not torch.cuda.is_available():
        return cpu
    return gpu


def _l2_flush():
    """The L2 flush of tune_bench and graph_bench: a buffer the size of the device's L2, zeroed until 256 MB are
    written (see tune_bench for why not Triton's single 256 MB buffer)."""
    dev = torch.cuda.current_device()
    flush = torch.empty(max(torch.cuda.get_device_properties(dev).L2_cache_size, 1 << 20) // 4, dtype=torch.int32,
                        device="cuda")
    passes = max(1, (256 << 20) // (flush.numel() * 4))

    def clear():
        for _ in range(passes):
            flush.zero_()

    return clear


def tune_bench(kernel_call, quantiles=(0.5, 0.2, 0.8)) -> list[float]:
    """How every autotuner in kernels/ times a config (triton.autotune(do_bench=tune_bench)): Triton's own method,
    the L2 flushed before each run and percentiles of ~25 ms of runs, but flushed with a buffer the size of the
    device's L2 instead of Triton's fixed 256 MB. Autotuning happens inside the model's first forward, with the
    activations live: on SD3.5 Large FP8 (H200) that 256 MB transient set the first call's peak memory (8.53 GiB
    against 8.36 with this). The buffer is zeroed repeatedly, up to 256 MB of writes, so that the GPU still stays
    ahead of the host as it does behind Triton's flush: one pass over an L2 (~15 us on an H200) is shorter than
    launching a Triton kernel from Python, and a kernel of a few microseconds would be timed waiting for it."""
    clear = _l2_flush()
    kernel_call()  # compile / first-run costs out of the way
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(5):
        clear()
        kernel_call()
    t1.record()
    torch.cuda.synchronize()
    n = max(1, min(1000, int(25.0 / max(t0.elapsed_time(t1) / 5, 1e-3))))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        clear()  # outside the timed interval
        a.record()
        kernel_call()
        b.record()
    torch.cuda.synchronize()
    times = torch.tensor([a.elapsed_time(b) for a, b in ev], dtype=torch.float64)
    return [float(torch.quantile(times, q)) for q in quantiles]


def graph_bench(kernel_call, reps: int = 20, replays: int = 15) -> list[float]:
    """Milliseconds per call with the host taken out: tune_bench times each call between two events, so where the
    host takes longer to launch a call than the GPU takes to flush L2 before it (a Python launcher building TMA
    descriptors, a busy CPU), the GPU idles inside the timed interval and the host's time is counted. Here `reps`
    calls, each after the same L2 flush as tune_bench's, are captured in one CUDA graph, and so are `reps` flushes
    alone; each graph is replayed `replays` times, interleaved, and a call's time is the difference of the two
    replays' times over `reps`. Returns [median, 20th, 80th percentile] over the replays. The call must be
    capturable (no host synchronisation, its autotuning done: it is called once first)."""
    clear = _l2_flush()
    kernel_call()
    torch.cuda.synchronize()
    graphs = []
    for with_call in (True, False):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                clear()
                if with_call:
                    kernel_call()
        g.replay()  # the first replay uploads the graph
        graphs.append(g)
    torch.cuda.synchronize()
    diffs = []
    for _ in range(replays):
        spans = []
        for g in graphs:
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            g.replay()
            t1.record()
            spans.append((t0, t1))
        torch.cuda.synchronize()
        diffs.append((spans[0][0].elapsed_time(spans[0][1]) - spans[1][0].elapsed_time(spans[1][1])) / reps)
    times = torch.tensor(diffs, dtype=torch.float64)
    return [float(torch.quantile(times, q)) for q in (0.5, 0.2, 0.8)]


def check_tensor(fn: str, name: str, t, dtypes: tuple, ndim: int | None = None, int64: bool = False) -> None:
    """Raise InputError naming the function, the argument and what was found, unless `t` is a tensor of one of
    `dtypes` with `ndim` dimensions whose last dimension is contiguous (rows may be strided)."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise InputError(f"{fn}: {name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {allowed}")
    if ndim is not None and t.dim() != ndim:
        raise InputError(f"{fn}: {name} has shape {tuple(t.shape)}; expected {ndim} dimensions "
                         f"(flatten leading dimensions first, e.g. x.reshape(-1, x.shape[-1]))")
    if ndim and t.numel() > 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InputError(f"{fn}: {name} (shape {tuple(t.shape)}, strides {t.stride()}) must have a contiguous last "
                         f"dimension; pass {name}.contiguous()")
    if t.numel() >= 2**31 and not int64:  # int64=True: the kernel computes this tensor's offsets in 64 bits
        raise InputError(f"{fn}: {name} has {t.numel()} elements; the kernels index with int32 (< 2**31), "
                         f"split the call into smaller chunks of rows")


def check_scale(fn: str, name: str, s, n: int, what: str) -> None:
    """A scale is fp32 with one entry per `what` (n of them) or a single entry that broadcasts."""
    check_tensor(fn, name, s, (torch.float32,))
    if s.numel() not in (1, n) or (s.numel() == n and s.dim() != 1 and n != 1):
        raise InputError(f"{fn}: {name} has shape {tuple(s.shape)}; expected [{n}] (one per {what}) or a "
                         f"1-element per-tensor scale")
    if s.numel() > 1 and s.stride(0) != 1:
        raise InputError(f"{fn}: {name} must be contiguous; pass {name}.contiguous()")


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def capability(dev: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, cached: the wrappers ask on every call, and eager calls of the small
    kernels are host-bound (H200, GPU session 1: quant_fp8 took 75 us per call at K = 2432 and at K = 9728 alike,
    i.e. launch cost, not the 4x larger memory traffic; CUDA graphs remove it)."""
    return _capability(dev.index if dev.index is not None else torch.cuda.current_device())


def check_device(fn: str, *tensors, fp8: bool = True) -> torch.device:
    """All tensors on one device, and that device can run the kernel: a CUDA GPU (sm89+ when `fp8`, i.e. when
    Triton must handle the float8 type), or the CPU under the Triton interpreter."""
    dev = tensors[0].device
    for t in tensors:
        if t is not None and t.device != dev:
            raise InputError(f"{fn}: tensors are on different devices ({dev} and {t.device}); move them to one")
    if dev.type == "cpu":
        if not interpreting():
            raise HardwareError(f"{fn}: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before "
                                f"triton is first imported); otherwise use {fn}_ref, the plain torch version")
    elif dev.type == "cuda":
        cap = capability(dev)
        if fp8 and cap < (8, 9):
            raise HardwareError(f"{fn}: needs FP8 support in Triton (compute capability 8.9+, Ada or Hopper); "
                                f"{torch.cuda.get_device_name(dev)} is sm{cap[0]}{cap[1]}. Use dequant_gemm(..., "
                                f"bitcast=True) for weight-only FP8, or the torch reference path")
    else:
        raise HardwareError(f"{fn}: device {dev} is not supported (Triton kernels run on CUDA GPUs)")
    return dev


def on_device(dev: torch.device):
    """Launch on `dev` even if it is not the current CUDA device (Triton launches on the current one)."""
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------------
# Measuring: relative RMS error (the one metric every check uses) and GPU timing.


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (b is the reference). NaN anywhere makes the result NaN."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def bench_ms(fn, quantiles=(0.5, 0.2, 0.8)) -> list[float]:
    """Median and spread of one call's GPU time in ms (triton.testing.do_bench: warm-up, L2 flush between calls)."""
    import triton.testing

    return list(triton.testing.do_bench(fn, quantiles=list(quantiles)))


def print_table(rows: list[dict], cols: list[str]) -> None:
    """A plain fixed-width table: one line per row dict, values formatted by type."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def check_line(name: str, err: float, tol: float) -> bool:
    """The `__main__` verdict line: a check mark and the relative RMS error against the reference."""
    ok = err == err and err <= tol  # err == err is False for NaN
    print(f"{'✅' if ok else '❌'} {name} {'matches' if ok else 'DOES NOT match'} ref (rel_err={err:.3e}, tol {tol:g})")
    return ok
