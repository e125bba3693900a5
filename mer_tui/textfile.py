"""A text file a user names on the command line (a prompt, a conversation), read with one line of
explanation when it cannot be."""
from __future__ import annotations

from pathlib import Path


class TextFileError(ValueError):
    """Why a named file cannot be read as text, in one line."""


def read_text(path: str | Path, kind: str = "text file") -> str:
    """The UTF-8 text of `path`; `kind` names what it should have been ("a folder, not a <kind>")."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TextFileError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise TextFileError(f"{path} is a folder, not a {kind}") from None
    except UnicodeDecodeError as e:
        raise TextFileError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise TextFileError(f"cannot read {path}: {e.strerror}") from None
