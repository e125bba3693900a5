"""Text <-> token ids: tokenizer.json through `tokenizers`, chat templates through sandboxed jinja2,
and streaming detokenization that never splits a multi-byte character."""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from .errors import EngineError
from .jsonfile import read_json_object


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise EngineError(f"{path}: cannot load tokenizer ({e})") from None
        cfg = read_json_object(folder / "tokenizer_config.json")
        jinja = folder / "chat_template.jinja"   # where newer transformers save it
        self._setup(tok, cfg, jinja.read_text() if jinja.exists() else None)

    @classmethod
    def from_built(cls, tok, config: dict) -> Tokenizer:
        """From a `tokenizers` Tokenizer and the tokenizer_config.json it goes with (a GGUF's vocabulary,
        engine.gguf_vocab.build_tokenizer), without files."""
        self = cls.__new__(cls)
        self._setup(tok, config, None)
        return self

    def _setup(self, tok, cfg: dict, template: str | None) -> None:
        self._tok = tok
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.pad_token = _token_text(cfg.get("pad_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.chat_template = template or self._config_template(cfg)
        self._compiled = None

    @staticmethod
    def _config_template(cfg: dict) -> str | None:
        t = cfg.get("chat_template")
        if isinstance(t, list):                   # named templates: take "default"
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        return t if isinstance(t, str) else None

    # ----------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # tokenizer.json may not carry a BOS post-processor even when the config asks for one
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------- chat
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model was trained to see it."""
        if self.chat_template is None:
            raise EngineError("chat: this model's tokenizer_config.json has no chat_template")
        if self._compiled is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(self.chat_template)
            except TemplateError as e:
                raise EngineError(f"chat_template: does not compile ({e})") from None
        from jinja2.exceptions import TemplateError
        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise EngineError(f"chat_template: {e}") from None

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes any BOS itself, so the tokenizer must not add another.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def stream(self, stop: Iterable[str] = ()) -> TextStream:
        return TextStream(self, stop)


class TextStream:
    """Feed token ids one at a time; get back text that is safe to show.

    Decoding looks only at a short window of recent ids (so each token costs O(1), not O(length)),
    and text is held back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD) or could
    be the start of a stop string; a completed stop string and everything after it is dropped.
    """

    def __init__(self, tok: Tokenizer, stop: Iterable[str] = ()):
        self.tok = tok
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = 0     # ids[prefix:read] were decoded already; they give context to the next ones
        self.read = 0
        self.pending = ""   # decoded text not yet returned (a possible start of a stop string)
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if now.endswith("\ufffd"):
            return ""      # a multi-byte character is not complete yet
        self.pending += now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        text = self.pending
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                self.pending = ""
                return text[:at]
        keep = 0
        for s in self.stop:   # hold back a suffix that may grow into a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """Everything still held back, at the end of generation (an incomplete character included)."""
        if self.stopped:
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        self.pending += self.tok.decode(self.ids[self.prefix:])[len(before):]
        self.prefix = self.read = len(self.ids)
        out = self._release()
        out, self.pending = out + ("" if self.stopped else self.pending), ""
        return out
