"""Generated token ids -> text that never shows U+FFFD.

A byte-level BPE (GPT-2's, Polyglot-Ko's) splits a Korean syllable (3 UTF-8 bytes) across tokens
freely, so decoding token by token, or stopping after --max-new-tokens in the middle of a
syllable, gives the replacement character U+FFFD. Here the new tokens' bytes are joined first and
only then decoded: a syllable split across tokens prints whole, an incomplete one at the end is
left out (it is not text yet), and bytes that can never form UTF-8 (a small or untrained model
emits them) are dropped rather than shown as U+FFFD. The prompt ends on a character boundary (it
was encoded from text), so the new bytes decode on their own.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

REPLACEMENT = "\ufffd"


def byte_decoder() -> Dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(tokenizer) -> bool:
    try:
        from tokenizers import decoders
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        return False
    return isinstance(getattr(getattr(tokenizer, "backend", None), "decoder", None), decoders.ByteLevel)


def token_bytes(tokenizer, ids: Iterable[int], table: Optional[Dict[str, int]] = None) -> bytes:
    """The UTF-8 bytes that the byte-level tokens `ids` stand for. Tokens outside the byte alphabet
    (added tokens such as <|tel|>) contribute their decoded text."""
    table = table if table is not None else byte_decoder()
    out = bytearray()
    for token_id in ids:
        piece = tokenizer.backend.id_to_token(int(token_id))
        if piece is not None and all(ch in table for ch in piece):
            out.extend(table[ch] for ch in piece)
        else:
            out.extend(tokenizer.decode([int(token_id)]).encode("utf-8"))
    return bytes(out)


def decode_new_tokens(tokenizer, ids: Iterable[int]) -> str:
    """Text of generated tokens `ids`, whole characters only (see the module docstring)."""
    ids = [int(i) for i in ids]
    if _is_byte_level(tokenizer):
        return token_bytes(tokenizer, ids).decode("utf-8", errors="ignore")
    text = tokenizer.decode(ids)  # another decoder: whole sequence at once, an incomplete tail left out
    return text.rstrip(REPLACEMENT)


__all__ = ["REPLACEMENT", "byte_decoder", "token_bytes", "decode_new_tokens"]
