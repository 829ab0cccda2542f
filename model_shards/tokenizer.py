"""Tokenizers behind the engine: a byte-level one for small models and tests, and Kimi's tiktoken BPE.

Both implement model_shards.engine_api.Tokenizer. Special tokens follow Kimi K2's chat format; `eos_id`
is the token that ends an assistant turn (<|im_end|>, as in Kimi's generation_config.json).
"""

from __future__ import annotations

import base64
import codecs
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Kimi K2's chat/control tokens, in the order ByteTokenizer assigns them ids 256, 257, ...
KIMI_SPECIAL_TOKENS: tuple[str, ...] = (
    "[BOS]",
    "[EOS]",
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<think>",
    "</think>",
    "[PAD]",
    "[UNK]",
)

# Kimi K2's pre-tokenisation regex (tokenization_kimi.py), for tiktoken's fancy-regex engine.
KIMI_PAT_STR: str = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Kimi reserves 256 ids after the BPE ranks for special tokens.
NUM_RESERVED_SPECIAL = 256
# tokenizer_config.json key (this project's, ignored by other loaders): BPE ids the encoder never produces.
NEVER_ENCODE_KEY = "never_encode"


def _special_splitter(specials: dict[str, int]) -> re.Pattern[str]:
    # Longest first so that a token that is a prefix of another never wins.
    alts = sorted(specials, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(s) for s in alts) + ")")


def _pick_eos(special: dict[str, int], preferred: int | None = None) -> int:
    if preferred is not None:
        return preferred
    for name in ("<|im_end|>", "[EOS]"):
        if name in special:
            return special[name]
    raise ValueError("tokenizer has neither <|im_end|> nor [EOS] among its special tokens")


class ByteTokenizer:
    """ids 0..255 are raw bytes; then KIMI_SPECIAL_TOKENS; then reserved ids up to vocab_size."""

    def __init__(self, vocab_size: int = 512) -> None:
        base = 256 + len(KIMI_SPECIAL_TOKENS)
        if vocab_size < base:
            raise ValueError(f"ByteTokenizer needs vocab_size >= {base} (256 bytes + {len(KIMI_SPECIAL_TOKENS)} specials), got {vocab_size}")
        self.vocab_size: int = vocab_size
        self.special: dict[str, int] = {s: 256 + i for i, s in enumerate(KIMI_SPECIAL_TOKENS)}
        for i in range(base, vocab_size):
            self.special[f"<|reserved_token_{i}|>"] = i
        self._id_to_special: dict[int, str] = {v: k for k, v in self.special.items()}
        self._splitter = _special_splitter(self.special)
        self.eos_id: int = self.special["<|im_end|>"]
        self.bos_id: int = self.special["[BOS]"]
        self.pad_id: int = self.special["[PAD]"]
        self.stop_ids: list[int] = [self.eos_id, self.special["[EOS]"]]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return list(text.encode("utf-8"))
        out: list[int] = []
        for i, part in enumerate(self._splitter.split(text)):
            # re.split with one group alternates plain text (even) and matched special (odd).
            if i % 2:
                out.append(self.special[part])
            elif part:
                out.extend(part.encode("utf-8"))
        return out

    def token_bytes(self, id: int) -> bytes:
        if 0 <= id < 256:
            return bytes([id])
        name = self._id_to_special.get(id)
        if name is None:
            raise ValueError(f"token id {id} is outside the vocabulary [0, {self.vocab_size})")
        return name.encode("utf-8")

    def is_special(self, id: int) -> bool:
        return id in self._id_to_special

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """Kimi's tokenizer: a tiktoken BPE rank file plus special tokens from tokenizer_config.json."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special: dict[str, int],
        pat_str: str = KIMI_PAT_STR,
        eos_id: int | None = None,
        name: str = "kimi",
        never_encode: Iterable[int] = (),
    ) -> None:
        """`never_encode`: BPE ids the encoder must not produce (text they cover is encoded with the
        smaller pieces they were merged from); they still decode. For a small model whose training
        data stopped containing some tokens: their embeddings are untrained, their pieces' are not."""
        import tiktoken

        self._enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special)
        self.mergeable_ranks: dict[bytes, int] = dict(mergeable_ranks)
        self.never_encode: frozenset[int] = frozenset(never_encode)
        self._encoder = self._enc
        if self.never_encode:
            single_bytes = [t for t in mergeable_ranks if len(t) == 1 and mergeable_ranks[t] in self.never_encode]
            if single_bytes:
                raise ValueError(f"never_encode holds single-byte tokens {single_bytes[:5]}: every byte must stay encodable")
            kept = {t: r for t, r in mergeable_ranks.items() if r not in self.never_encode}
            self._encoder = tiktoken.Encoding(name=name + "-encode", pat_str=pat_str, mergeable_ranks=kept,
                                              special_tokens=special)
        self.special: dict[str, int] = dict(special)
        self._id_to_special: dict[int, str] = {v: k for k, v in special.items()}
        self.vocab_size: int = max([len(mergeable_ranks) - 1, *special.values()]) + 1
        self.eos_id: int = _pick_eos(self.special, eos_id)
        self.bos_id: int | None = self.special.get("[BOS]")
        self.pad_id: int | None = self.special.get("[PAD]")
        self.stop_ids: list[int] = sorted({self.eos_id, *(self.special[s] for s in ("[EOS]", "<|im_end|>") if s in self.special)})

    @classmethod
    def from_dir(cls, path: str | Path) -> "TiktokenTokenizer":
        """Load `tiktoken.model` ("<base64 token> <rank>" lines) and `tokenizer_config.json` from a model dir."""
        d = Path(path)
        model_file = d / "tiktoken.model"
        if not model_file.is_file():
            raise FileNotFoundError(f"no tiktoken.model in {d}")
        ranks: dict[bytes, int] = {}
        for lineno, line in enumerate(model_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{model_file}:{lineno}: expected '<base64 token> <rank>', got {line!r}")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
        num_base = len(ranks)
        cfg: dict[str, Any] = {}
        cfg_file = d / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
        special: dict[str, int] = {}
        for sid, entry in (cfg.get("added_tokens_decoder") or {}).items():
            content = entry["content"] if isinstance(entry, dict) else str(entry)
            special[content] = int(sid)
        # Kimi fills the unnamed ids of its reserved range with placeholders so every id decodes.
        taken = set(special.values())
        for i in range(num_base, num_base + NUM_RESERVED_SPECIAL):
            if i not in taken:
                special[f"<|reserved_token_{i}|>"] = i
        eos: int | None = None
        gen_file = d / "generation_config.json"
        if gen_file.is_file():
            e = json.loads(gen_file.read_text()).get("eos_token_id")
            eos = e[0] if isinstance(e, list) and e else (e if isinstance(e, int) else None)
        never = cfg.get(NEVER_ENCODE_KEY) or []
        if not isinstance(never, list) or not all(isinstance(i, int) and 0 <= i < num_base for i in never):
            raise ValueError(f"{cfg_file}: {NEVER_ENCODE_KEY!r} must be a list of BPE token ids in [0, {num_base})")
        return cls(ranks, special, eos_id=eos, never_encode=never)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self._encoder.encode(text, allowed_special="all", disallowed_special=())
        # Special strings in user text are plain text, never control tokens.
        return self._encoder.encode(text, allowed_special=set(), disallowed_special=())

    def token_bytes(self, id: int) -> bytes:
        if not 0 <= id < self.vocab_size:
            raise ValueError(f"token id {id} is outside the vocabulary [0, {self.vocab_size})")
        name = self._id_to_special.get(id)
        if name is not None:
            return name.encode("utf-8")
        return self._enc.decode_single_token_bytes(id)

    def is_special(self, id: int) -> bool:
        return id in self._id_to_special

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def write_tiktoken_model(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write a rank file in Kimi's tiktoken.model format (used to build small test vocabularies)."""
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("\n".join(lines) + "\n")


def load_tokenizer(spec: str | Path) -> ByteTokenizer | TiktokenTokenizer:
    """"byte" or "byte:VOCAB" -> ByteTokenizer; a directory with tiktoken.model -> TiktokenTokenizer."""
    s = str(spec)
    if s == "byte" or s.startswith("byte:"):
        return ByteTokenizer(int(s.split(":", 1)[1]) if ":" in s else 512)
    return TiktokenTokenizer.from_dir(s)


class StreamDecoder:
    """Turns token ids into text deltas, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
