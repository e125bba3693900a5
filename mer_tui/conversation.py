"""A saved conversation to go on with (`launch --resume FILE`): the JSON that ctrl+s exports, or a plain
list of {"role", "content"} messages as chat APIs write them."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .textfile import TextFileError, read_text


class ConversationError(ValueError):
    """What is wrong with a conversation file, in one line."""


@dataclass
class Conversation:
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)   # user, assistant, user, ... assistant
    unanswered: str | None = None   # a last user message with no reply (exported mid-reply): to send again


def read_conversation(path: str | Path) -> Conversation:
    path = Path(path)
    try:
        doc = json.loads(read_text(path, "conversation file"))
    except TextFileError as e:
        raise ConversationError(str(e)) from None
    except json.JSONDecodeError as e:
        raise ConversationError(f"{path} is not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    items = doc.get("conversation") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ConversationError(f"{path}: expected a list of messages, or an export's \"conversation\"")
    conv = Conversation()
    for i, m in enumerate(items):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant")):
            raise ConversationError(f"{path}: message {i} is not a {{\"role\": system|user|assistant, "
                                    f"\"content\": text}} object")
        role = m["role"]
        if role == "system":
            if i:
                raise ConversationError(f"{path}: message {i} is a system message; only the first may be")
            conv.system = m["content"]
            continue
        want = "user" if len(conv.messages) % 2 == 0 else "assistant"
        if role != want:
            raise ConversationError(f"{path}: message {i} is from the {role}, where the {want} speaks "
                                    "(a conversation alternates, the user first)")
        conv.messages.append({"role": role, "content": m["content"]})
    if conv.messages and conv.messages[-1]["role"] == "user":
        conv.unanswered = conv.messages.pop()["content"]
    return conv
