"""Tokenizers: load a Hugging Face `tokenizer.json` (what Polyglot-Ko ships) or train a byte-level BPE.

Only the `tokenizers` library is used, never the hub: clusters often have no network and the
tokenizer must be the exact file whose hash the preprocessing sidecar records.

A trained tokenizer gets Polyglot-Ko's special tokens at Polyglot-Ko's places: `<pad>`=0,
`<unk>`=1, `<|endoftext|>`=2, `<|sep|>`=3, and `<|acc|>`, `<|tel|>`, `<|rrn|>` as the last three ids
(30000-30002 at Polyglot-Ko's vocabulary of 30003), so EOD handling and PII ids look the same to
the model whichever tokenizer prepared the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional, Sequence

from megaglot.data.pii import KINDS, TOKEN_CANDIDATES

LEADING_SPECIAL_TOKENS = ("<pad>", "<unk>", "<|endoftext|>", "<|sep|>")
PII_SPECIAL_TOKENS = ("<|acc|>", "<|tel|>", "<|rrn|>")
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or lacks a token the job needs; the message names the file."""


class TokenizerExistsError(TokenizerError):
    """A different tokenizer already has the path a new one would be saved as."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids the data pipeline needs (EOD, PII masks) and a file hash."""

    def __init__(self, backend, path: Optional[str] = None):
        self.backend = backend
        self.path = path
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eod = next((i for i in map(backend.token_to_id, EOD_CANDIDATES) if i is not None), None)
        self.sha256 = _sha256(path) if path else hashlib.sha256(backend.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def pii_token_ids(self) -> dict[str, int]:
        """{kind: id} of the mask tokens; the phone token is <|tel|> where present, else <|tell|>."""
        ids, missing = {}, []
        for kind in KINDS:
            found = [t for t in TOKEN_CANDIDATES[kind] if self.token_to_id(t) is not None]
            if found:
                ids[kind] = self.token_to_id(found[0])
            else:
                missing.append("/".join(TOKEN_CANDIDATES[kind]))
        if missing:
            raise TokenizerError(f"tokenizer {self.path or '(in memory)'} has no {', '.join(missing)} token; "
                                 f"PII masking needs them: use --no-mask-pii or a tokenizer with these tokens "
                                 f"(Polyglot-Ko's, or one made with --train-tokenizer)")
        return ids


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json file, or a directory that holds one."""
    from tokenizers import Tokenizer as Backend

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise TokenizerError(f"--tokenizer {path}: no tokenizer.json there (give the file or its directory, "
                             f"or use --train-tokenizer --vocab-size N)")
    try:
        backend = Backend.from_file(file)
    except Exception as error:  # the Rust error is one long line already; keep it, add the file
        raise TokenizerError(f"--tokenizer {file}: not a Hugging Face tokenizer.json ({error})") from None
    return Tokenizer(backend, file)


def train_tokenizer(texts: Iterable[str], vocab_size: int, save_path: Optional[str] = None,
                    min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with Polyglot-Ko's special tokens; saved atomically to save_path."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(LEADING_SPECIAL_TOKENS) + len(PII_SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise TokenizerError(f"--vocab-size {vocab_size} is too small for a byte-level BPE; use at least {minimum}")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(PII_SPECIAL_TOKENS), min_frequency=min_frequency,
                                  special_tokens=list(LEADING_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens(list(PII_SPECIAL_TOKENS))
    if save_path is None:
        return Tokenizer(backend)
    directory = os.path.dirname(os.path.abspath(save_path))
    os.makedirs(directory, exist_ok=True)
    temporary = save_path + ".tmp"
    backend.save(temporary)
    os.replace(temporary, save_path)
    return Tokenizer(backend, save_path)


def save_new_tokenizer(trained: Tokenizer, path: str) -> Tokenizer:
    """Save a trained tokenizer as `path`, never replacing a different one there (another dataset of
    the directory may have been tokenized with it); the same content (a rerun) is reused as it is."""
    if os.path.exists(path):
        _refuse_if_different(path, trained)
        return load_tokenizer(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    trained.backend.save(temporary)
    try:
        os.link(temporary, path)  # atomic and never replaces: a file a concurrent run just wrote stays
    except FileExistsError:
        _refuse_if_different(path, trained)
        return load_tokenizer(path)
    except OSError:  # a filesystem without hard links
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return Tokenizer(trained.backend, path)


def _refuse_if_different(path: str, trained: Tokenizer) -> None:
    new = trained.backend.to_str(pretty=True)
    with open(path, "rb") as f:
        old = f.read()
    if old == new.encode("utf-8"):
        return
    try:
        if json.loads(old) == json.loads(new):
            return
    except ValueError:
        pass
    raise TokenizerExistsError(f"{path} already exists and holds a different tokenizer (another dataset in that "
                               f"directory may use it); not overwriting it")


def tokenizer_summary(tokenizer: Tokenizer) -> dict:
    """What a sidecar records about the tokenizer."""
    special = {t: tokenizer.token_to_id(t) for t in LEADING_SPECIAL_TOKENS + PII_SPECIAL_TOKENS + ("<|tell|>",)}
    return {"path": tokenizer.path, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod, "special_tokens": {k: v for k, v in special.items() if v is not None}}


__all__ = ["Tokenizer", "TokenizerError", "TokenizerExistsError", "load_tokenizer", "train_tokenizer",
           "save_new_tokenizer", "tokenizer_summary"]
