"""Tokenizers behind one small interface: an offline hash tokenizer for random presets, and the real
transformers tokenizers loaded from a local diffusers-layout directory.

Both give `count(text)` (tokens with specials, no padding: what a prompt needs) and
`encode(texts, max_length)` -> (input_ids, attention_mask), LongTensors [B, max_length], padded and
truncated like the pipelines call their tokenizers (padding="max_length", truncation=True).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Sequence

import torch

__all__ = ["HashTokenizer", "HFTokenizer", "load_tokenizer"]

_WORD = re.compile(r"\w+|[^\w\s]")
kHashTokenizerFile = "gfdit_hash_tokenizer.json"


class HashTokenizer:
    """Deterministic offline tokenizer: each word (or punctuation mark) of the lower-cased text maps to
    `first_word_id + crc32(word) % num_word_ids`. Stable across processes and machines (no Python hash
    salting), so every rank encodes a prompt to the same ids.

    Styles (special tokens as the real tokenizers place them):
      "clip": [bos] words [eos], padded with pad (= eos); bos = vocab-2, eos = vocab-1, words in [0, vocab-2).
      "t5":   words [eos], padded with pad; pad = 0, eos = 1, unk = 2, words in [3, vocab).
      "plain": words only (no special tokens added, as Qwen2's tokenizer), padded with pad = vocab-1,
              words in [0, vocab-1).
    """

    def __init__(self, style: str, vocab_size: int, model_max_length: int):
        if style not in ("clip", "t5", "plain"):
            raise ValueError(f"style must be 'clip', 't5' or 'plain', got {style!r}")
        if vocab_size < 8:
            raise ValueError(f"vocab_size must be at least 8, got {vocab_size}")
        self.style = style
        self.vocab_size = vocab_size
        self.model_max_length = model_max_length
        if style == "clip":
            self.bos_id, self.eos_id, self.pad_id = vocab_size - 2, vocab_size - 1, vocab_size - 1
            self._first, self._num = 0, vocab_size - 2
        elif style == "plain":
            self.bos_id, self.eos_id, self.pad_id = None, None, vocab_size - 1
            self._first, self._num = 0, vocab_size - 1
        else:
            self.bos_id, self.eos_id, self.pad_id = None, 1, 0
            self._first, self._num = 3, vocab_size - 3

    def word_ids(self, text: str) -> list[int]:
        """Ids of the words of `text`, no special tokens."""
        return [self._first + zlib.crc32(w.encode("utf-8")) % self._num for w in _WORD.findall(text.lower())]

    def _with_specials(self, ids: list[int]) -> list[int]:
        bos = [self.bos_id] if self.bos_id is not None else []
        return bos + ids + ([self.eos_id] if self.eos_id is not None else [])

    def count(self, text: str) -> int:
        return len(self._with_specials(self.word_ids(text)))

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_special = (self.bos_id is not None) + (self.eos_id is not None)
        least = max(n_special, 1)
        if max_length < least:
            raise ValueError(f"max_length must be at least {least}, got {max_length}")
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for i, text in enumerate(texts):
            row = self._with_specials(self.word_ids(text)[: max_length - n_special])
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        cfg = {"style": self.style, "vocab_size": self.vocab_size, "model_max_length": self.model_max_length}
        with open(os.path.join(directory, kHashTokenizerFile), "w") as f:
            json.dump(cfg, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> HashTokenizer:
        with open(os.path.join(directory, kHashTokenizerFile)) as f:
            cfg = json.load(f)
        return cls(cfg["style"], int(cfg["vocab_size"]), int(cfg["model_max_length"]))

    @staticmethod
    def is_saved_in(directory: str | os.PathLike) -> bool:
        return os.path.isfile(os.path.join(directory, kHashTokenizerFile))


class HFTokenizer:
    """A transformers tokenizer behind the HashTokenizer interface."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True, truncation=False).input_ids)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out.input_ids.long(), out.attention_mask.long()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(directory)


def load_tokenizer(
    tokenizer_class: str,
    style: str,
    vocab_size: int,
    max_length: int,
    directory: str | os.PathLike | None = None,
) -> HashTokenizer | HFTokenizer:
    """The tokenizer of one text encoder. Without `directory`: the offline HashTokenizer of `style`.
    With one: the HashTokenizer saved there by `save_pretrained`, if any; else the transformers class
    `tokenizer_class` ("CLIPTokenizer", "T5TokenizerFast", "AutoTokenizer") loaded from it, offline."""
    if directory is None:
        return HashTokenizer(style, vocab_size, max_length)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory {os.fspath(directory)!r} does not exist")
    if HashTokenizer.is_saved_in(directory):
        return HashTokenizer.from_pretrained(directory)
    import transformers

    cls = getattr(transformers, tokenizer_class)
    return HFTokenizer(cls.from_pretrained(os.fspath(directory), local_files_only=True))
