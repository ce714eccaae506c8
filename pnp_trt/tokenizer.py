"""Prompt → token ids with the `tokenizers` library alone (no transformers), shared by every backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from .errors import PnPError


class PromptTokenizer:
    """Pads/truncates to the text encoder's length with the model's own pad token (DESIGN §1).

    SD 2.x pads with "!" (id 0), SD 1.x with the end token; truncation keeps the end token.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, max_length: int, pad_id: int, pad_token: str):
        self.max_length, self.pad_id, self.pad_token = max_length, pad_id, pad_token
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)

    @classmethod
    def from_file(cls, path: Path, settings: dict[str, Any]) -> PromptTokenizer:
        """Load `tokenizer.json` with the padding rule an export recorded (`settings()`)."""
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:
            raise PnPError(f"cannot read tokenizer {path}: {exc}; re-run `pnp-trt export`") from None
        if not 0 <= int(settings["pad_id"]) < tok.get_vocab_size():
            raise PnPError(f"tokenizer pad_id {settings['pad_id']} is outside its vocabulary of "
                           f"{tok.get_vocab_size()}; re-run `pnp-trt export`")
        pad_id, pad_token = int(settings["pad_id"]), str(settings["pad_token"])
        if tok.token_to_id(pad_token) != pad_id:
            raise PnPError(f"tokenizer pad_token {pad_token[:20]!r} is not token {pad_id} of {path}; re-run "
                           "`pnp-trt export`")
        tokenizer = cls(tok, int(settings["max_length"]), pad_id, pad_token)
        try:  # a vocabulary without its unknown or end token fails only when text is encoded
            tokenizer.encode(["a photo of a cat"])
        except Exception as exc:
            raise PnPError(f"tokenizer {path} cannot encode text ({str(exc)[:100]}); re-run `pnp-trt export`") \
                from None
        return tokenizer

    def settings(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "pad_id": self.pad_id, "pad_token": self.pad_token}

    def save(self, path: Path) -> None:
        self._tokenizer.save(str(path))

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """int64 ids of shape [len(prompts), max_length]."""
        return np.array([e.ids for e in self._tokenizer.encode_batch(list(prompts))], dtype=np.int64)
