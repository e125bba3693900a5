"""The one error type the engine raises for bad input (files, options, requests)."""


class EngineError(Exception):
    """Bad input or a failed read; the message names the file, tensor or option at fault."""


class ExpertReadError(EngineError):
    """Reading an expert bundle from storage failed after retries (I/O error, checksum)."""
