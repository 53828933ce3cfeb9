"""minisd35: Stable Diffusion 3 / 3.5 inference in plain PyTorch, built around FP8 E4M3.

Reading order: config -> mmdit -> sampling -> pipeline -> fp8 -> kernels/ -> audit.
The public entry points are imported lazily so that `import minisd35` stays cheap and works without triton.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_mmdit": "weights", "load_text_encoders": "text", "load_vae": "vae", "load_pipeline": "pipeline",
    "quantize": "fp8", "MMDiT": "mmdit", "get_preset": "config", "PRESETS": "config",
    "MiniSD35Error": "errors", "CheckpointError": "errors", "ConfigError": "errors", "InputError": "errors",
    "HardwareError": "errors", "NumericsError": "errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'minisd35' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
