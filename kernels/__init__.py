"""Triton kernels for minisd35's FP8 paths. One kernel per file; each file carries its own torch reference and a
`__main__` that checks against it first and benchmarks second. Nothing here is imported unless triton is installed;
`HAS_TRITON` says whether it is."""

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs: minisd35 runs its plain-torch reference paths
    HAS_TRITON = False
