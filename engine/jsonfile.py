"""Reading the small JSON files of a model folder, with errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import EngineError


def read_json_object(path: Path, missing: str | None = None) -> dict:
    """The JSON object in `path`.  A missing file raises EngineError(missing) when `missing` is
    given and returns {} otherwise; a file that is not a JSON object always raises."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        if missing is None:
            return {}
        raise EngineError(missing) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise EngineError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(value, dict):
        raise EngineError(f"{path}: not valid JSON (top level is not an object)")
    return value
