"""One small exception hierarchy. Every message names the file, key, shape or argument at fault and says what would
fix it; the command line prints that one message and exits non-zero (a traceback only with --debug).

    MiniSD35Error
    +-- CheckpointError   a file or folder that cannot be loaded as asked (format, header, keys, shapes, values)
    +-- ConfigError       a model configuration that is inconsistent, or does not match the checkpoint
    +-- InputError        a bad argument: size, steps, guidance, strength, prompt file, policy or recipe name
    |   +-- OutputExistsError   the output file exists and force (--force) was not given; also a FileExistsError
    +-- HardwareError     the device cannot do what was asked (out of memory, no CUDA, ...)
    +-- NumericsError     NaN or Inf appeared while running (stops the run instead of saving a black image)
"""


class MiniSD35Error(Exception):
    """Base class: catch this to catch everything minisd35 raises on purpose."""


class CheckpointError(MiniSD35Error, ValueError):
    pass


class ConfigError(MiniSD35Error, ValueError):
    pass


class InputError(MiniSD35Error, ValueError):
    pass


class OutputExistsError(InputError, FileExistsError):
    """Nothing is ever overwritten without force=True / --force. Also a FileExistsError, for callers that catch that."""


class HardwareError(MiniSD35Error, RuntimeError):
    pass


class NumericsError(MiniSD35Error, FloatingPointError):
    pass


def list_keys(keys, n: int = 5) -> str:
    """'a, b, c and 12 more' for error messages: the first few keys and a count."""
    keys = sorted(keys)
    head = ", ".join(keys[:n])
    return head + (f" and {len(keys) - n} more" if len(keys) > n else "")
