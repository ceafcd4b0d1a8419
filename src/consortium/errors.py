"""Error types. Every user-facing failure is a ConsortiumError with a one-line message."""


class ConsortiumError(Exception):
    """An error the CLI reports as one readable line (no traceback)."""


class ModelFileError(ConsortiumError):
    """Missing, corrupt or unverifiable model file."""


class UnsupportedModelError(ConsortiumError):
    """Architecture or quantization type we cannot run."""


class CacheError(ConsortiumError):
    """KV cache out of sync with the requested positions, or over its memory bound."""


class InvalidRequestError(ConsortiumError):
    """Bad generation request: empty prompt, too long, bad sampling parameters."""
