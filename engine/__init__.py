"""mer-tui's inference engine: Mixture-of-Experts models with experts fetched through a cache.

Never imports textual or mer_tui (a test enforces it).
"""
from .context import Context
from .errors import EngineError, ExpertReadError
from .loader import load
from .model import Model
from .sizes import format_size, parse_size
from .spec import ModelSpec, load_spec
from .tokenizer import TextStream, Tokenizer

__all__ = ["Context", "EngineError", "ExpertReadError", "Model", "ModelSpec", "TextStream", "Tokenizer",
           "format_size", "load", "load_spec", "parse_size"]
