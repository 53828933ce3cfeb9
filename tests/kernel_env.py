"""What the kernel tests (test_kernels.py, test_kernels_fused.py) share: the Triton interpreter set-up, input
helpers, and the ahead-of-time compile of kernels for GPU targets.

TRITON_INTERPRET=1 must be set before the kernels are decorated (when kernels.* is first imported); if some
earlier import already compiled them for a GPU, `kernel_device` re-imports them under the interpreter. On a machine
with a GPU nothing is set (the flag is process-wide) and the same tests run on CUDA tensors against the compiled
kernels.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # on a GPU machine leave the env alone: other tests there want compiled kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kernels import _common  # noqa: E402

E4M3 = torch.float8_e4m3fn
DEV = "cpu"  # set by kernel_device()


def _interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    while kernel is not None:
        if isinstance(kernel, InterpretedFunction):
            return True
        kernel = getattr(kernel, "fn", None)
    return False


def kernel_device(modules, probe) -> str:
    """The device the kernel tests run on ("cpu" under the interpreter, else "cuda"); re-imports `modules` under the
    interpreter when `probe` (one of their kernels) was compiled for a GPU by an earlier import. Call it before
    importing names from those modules."""
    global DEV
    if _common.interpreting() and not _interpreted(probe):
        for m in (_common, *modules):
            importlib.reload(m)
    if _common.interpreting():
        DEV = "cpu"
    elif torch.cuda.is_available():
        DEV = "cuda"
    else:
        pytest.skip("TRITON_INTERPRET=0 and no CUDA GPU: nothing can run the kernels", allow_module_level=True)
    return DEV


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def codes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8).cpu()


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compiles for GPU targets, without a GPU: `build(...)` in a script that run_aot() runs in a fresh
# process with the interpreter off. Each record says whether it compiled, its shared memory, its register spills
# (`stack`, from the cuobjdump Triton bundles; None without it), counts of PTX instructions the tests look for,
# and on request (keep=) the PTX and SASS themselves.

AOT_PRELUDE = r'''
import json, os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import (fp8_attention, fp8_dequant_gemm, fp8_gemm, fp8_quant, gated_residual, gelu_quant, ln_mod_quant,
                     qk_norm)
try:  # Gluon (triton.experimental.gluon, Triton 3.4+): kernels/fp8_gemm_gluon.py
    from triton.experimental.gluon._runtime import GluonASTSource
    from kernels import fp8_gemm_gluon
except ImportError:
    GluonASTSource = fp8_gemm_gluon = None

def jit_fn(k):
    while not isinstance(k, triton.runtime.jit.JITFunction):
        k = k.fn
    return k

def cuobjdump(cubin, flag):  # the bundled cuobjdump's output for one flag, None if unavailable
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout

def stack_bytes(cubin):  # per-thread stack (register spills), None if unavailable
    m = re.search(r"STACK:(\d+)", cuobjdump(cubin, "--dump-resource-usage") or "")
    return int(m.group(1)) if m else None

def sass_lines(cubin):  # the SASS instructions, one a line without addresses or encodings, None if unavailable
    out = cuobjdump(cubin, "-sass")
    return None if out is None else [m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", out)]

out = []
def build(name, kernel, sig, consts, arch=90, cfg=None, warps=4, stages=3, keep=(), **options):
    # keep: "ptx" and / or "sass" (a list of instruction lines) to return in the record as well
    fn = jit_fn(kernel)
    if cfg is not None:
        consts, warps, stages = {**consts, **cfg.kwargs}, cfg.num_warps, cfg.num_stages
        if cfg.maxnreg:
            options = {"maxnreg": cfg.maxnreg, **options}
    signature = {n: sig.get(n, "constexpr") for n in fn.arg_names}
    source = GluonASTSource if getattr(fn, "is_gluon", lambda: False)() else ASTSource  # Gluon kernels: own frontend
    # what the launcher attaches at run time: 16-byte aligned pointers, strides / N / K divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if signature[n].startswith("*")
             or (signature[n] == "i32" and (n.startswith("stride") or n in ("N", "K")))}
    rec = {"name": name, "arch": arch}
    try:
        k = triton.compile(source(fn, signature, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages, **options})
        ptx = k.asm["ptx"]
        rec.update(ok=True, shared=k.metadata.shared, stack=stack_bytes(k.asm["cubin"]),
                   fma=len(re.findall(r"\bfma\.rn\.f32", ptx)), v4_loads=len(re.findall(r"ld\.global[\.\w]*\.v4", ptx)),
                   satfinite=ptx.count("cvt.rn.satfinite.e4m3x2"), setmaxnreg=ptx.count("setmaxnreg"),
                   fadd=ptx.count("add.f32"), bf16_fma=ptx.count("fma.rn.bf16"),
                   wgmma_waits=[int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)],
                   launch_pdl=getattr(k.metadata, "launch_pdl", None))
        rec.update({kind: ptx if kind == "ptx" else sass_lines(k.asm["cubin"]) for kind in keep})
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[-1500:])
    out.append(rec)
'''


def run_aot(script: str) -> list[dict]:
    """Run AOT_PRELUDE + `script` (a series of build(...) calls) in a fresh process with the interpreter off and
    return the records; skips where this Triton has no AOT API or no usable ptxas, fails on any build error."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time compile API: {e}")
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the compiled path, in a fresh process
    proc = subprocess.run([sys.executable, "-c", AOT_PRELUDE + script + "\njson.dump(out, sys.stdout)\n"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0 and "ptxas" in proc.stderr:
        pytest.skip(f"no usable ptxas: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(proc.stdout)
    failed = [f"{r['name']} sm{r['arch']}: {r['error']}" for r in records if not r["ok"]]
    assert not failed, "\n".join(failed)
    return records
