"""A GGUF file's vocabulary as the tokenizer files a Hugging Face folder has (tokenizer.json,
tokenizer_config.json), built with the `tokenizers` library the engine already reads them with.

Two of llama.cpp's tokenizer models are rebuilt:
- "gpt2": byte-level BPE (OLMoE, Qwen-MoE): the vocabulary and merges as they are, split first by the
  regex llama.cpp uses for the file's pre-tokenizer name (`tokenizer.ggml.pre`, _PRE_REGEX: the same
  regexes as llama.cpp's llm_tokenizer_bpe), then mapped to GPT-2's byte alphabet;
- "llama": SentencePiece BPE (Mixtral): as transformers' own conversion of a tokenizer.model does it,
  merges ranked by the merged piece's score, "▁" for spaces and a leading one, bytes as <0xNN> pieces.
Control and user-defined tokens become added tokens, matched whole in text.  Another model or an unknown
pre-tokenizer name is refused by name: a tokenizer that splits differently would quietly feed the model
text it was not trained on.
"""
from __future__ import annotations

import json

from .errors import EngineError

# token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split regex, whether a word in the vocabulary skips the merges), after llama.cpp
_PRE_REGEX = {
    **dict.fromkeys(("gpt-2", "olmo", "mpt", "phi-2"), (_GPT2, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), (_QWEN2, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), (_LLAMA3, True)),
}


def tokenizer_files(meta: dict, where: str) -> dict[str, str]:
    """{file name: text} of the tokenizer files for GGUF metadata `meta` (of file `where`)."""
    tok, config = build_tokenizer(meta, where)
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=1) + "\n"}


def build_tokenizer(meta: dict, where: str):
    """(a `tokenizers` Tokenizer, the tokenizer_config.json it goes with) for GGUF metadata `meta`."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise EngineError(f"{where}: the file has no vocabulary (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if model not in ("gpt2", "llama"):
        raise EngineError(f"{where}: tokenizer model {model!r} is not supported (gpt2, llama)")
    try:
        vocab = {t: i for i, t in enumerate(tokens)}
        if model == "gpt2":
            tok = _byte_level_bpe(meta, vocab, where)
        else:
            tok = _sentencepiece_bpe(meta, tokens, vocab, types, where)
    except EngineError:
        raise
    except Exception as e:   # the tokenizers library raises plain Exceptions (a merge of unknown tokens ...)
        raise EngineError(f"{where}: its vocabulary does not make a tokenizer ({e})") from None
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=ty == CONTROL, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": False,
              "bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
              "unk_token": token("unknown"), "model_max_length": 1 << 30}
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return tok, config


def _byte_level_bpe(meta: dict, vocab: dict[str, int], where: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_REGEX:
        raise EngineError(f"{where}: pre-tokenizer {pre!r} is not supported "
                          f"({', '.join(sorted(_PRE_REGEX))})")
    regex, ignore_merges = _PRE_REGEX[pre]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict, tokens: list[str], vocab: dict[str, int], types: list[int], where: str):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise EngineError(f"{where}: a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token")
    # A piece is the merge of any two pieces it splits into; merges apply in the order of the merged
    # piece's score, best first (transformers' SentencePieceExtractor).
    merges: list[tuple[float, int, int, str, str]] = []
    for piece, score, ty in zip(tokens, scores, types):
        if ty != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
    tok = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=tokens[unk] if 0 <= unk < len(tokens)
                               else None, fuse_unk=True, byte_fallback=True))
    # A leading space is added to the text (and taken off the decoded text) unless the file says not to.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence([*([normalizers.Prepend("\u2581")] if prefix else []),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return tok
