"""Korean PII masking: phone numbers, resident/foreigner registration numbers and bank accounts.

Polyglot-Ko replaced these with one special token each before tokenizing, so a model never learns
(or leaks) real numbers yet still learns where such numbers occur. The patterns favour precision
on the numbers ordinary text is full of (dates, times, prices, years, counts, postal codes, ISBNs,
version numbers): a false mask destroys information the model needs, a missed one is rare because
the three kinds have rigid layouts.

Matching is done per kind, then overlapping candidates are resolved leftmost-longest (ties by the
order RRN, phone, account), so a number is masked once as its most specific kind.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Iterator, Optional

import regex

KINDS = ("rrn", "tel", "acc")
# Special-token spellings: the phone token is <|tel|> in Polyglot-Ko's tokenizer.json, <|tell|> on the model cards.
TOKEN_CANDIDATES = {"acc": ("<|acc|>",), "tel": ("<|tel|>", "<|tell|>"), "rrn": ("<|rrn|>",)}

_SEP = r"[-. ]?"
_NOT_DIGIT_BEFORE = r"(?<![\d\-.+])"
_NOT_DIGIT_AFTER = r"(?![\d]|[-.]\d)"

# Mobile (010, 011, 016-019), Seoul 02, the other area codes, 070 (internet phone); optional (..).
_AREA = r"(?:01[016789]|02|03[1-3]|04[1-4]|05[1-5]|06[1-4]|070)"
_AREA_INTL = r"(?:1[016789]|2|3[1-3]|4[1-4]|5[1-5]|6[1-4]|70)"
_PHONE = regex.compile(
    _NOT_DIGIT_BEFORE + r"(?:"
    + r"\(?" + _AREA + r"\)?" + _SEP + r"\d{3,4}" + _SEP + r"\d{4}"
    + r"|\+82[-. ]?\(?0?\)?" + _AREA_INTL + _SEP + r"\d{3,4}" + _SEP + r"\d{4}"
    + r"|1[568]\d{2}[-.]\d{4}"  # service numbers need a separator: bare 8-digit runs are too often counts
    + r")" + _NOT_DIGIT_AFTER)

# YYMMDD, optional hyphen, gender/century digit 1-8 (5-8: foreigner registration), six digits.
_RRN = regex.compile(r"(?<![\d\-])(\d{2})(\d{2})(\d{2})(?: ?- ?)?([1-8])\d{6}(?!\d|-\d)")

# Account layouts of the major Korean banks (group widths joined by hyphens).
_ACCOUNT_LAYOUTS = (
    (6, 2, 6),  # KB국민, 우체국, NH(old)
    (3, 3, 6),  # 신한, 케이뱅크
    (4, 3, 6),  # 우리
    (3, 6, 5),  # 하나
    (3, 4, 4, 2),  # NH농협, 부산
    (3, 6, 2, 3),  # IBK기업
    (4, 2, 7),  # 카카오뱅크
    (4, 4, 4),  # 토스뱅크
    (3, 2, 6),  # SC제일, 신한(old)
    (3, 2, 4, 3),  # KB국민(old)
    (3, 6, 3),  # 씨티
)
_ACCOUNT_GROUPS = regex.compile(
    r"(?<![\d\-.])(?:" + "|".join("-".join(r"\d{%d}" % w for w in layout) for layout in _ACCOUNT_LAYOUTS)
    + r")(?![\d]|-\d)")

_BANK_WORDS = (
    "계좌번호", "계좌", "입금", "송금", "이체", "예금주", "무통장", "통장", "가상계좌", "환불",
    "국민은행", "신한은행", "우리은행", "하나은행", "농협", "기업은행", "카카오뱅크", "케이뱅크", "토스뱅크",
    "우체국", "새마을금고", "신협", "수협", "SC제일은행", "씨티은행", "부산은행", "대구은행", "광주은행",
    "전북은행", "경남은행", "제주은행", "산업은행", "은행", "KB", "NH", "IBK",
)
_BANK_WORD = "(?:" + "|".join(sorted(map(regex.escape, _BANK_WORDS), key=len, reverse=True)) + ")"
# 10-16 digits, optionally grouped by hyphens or single spaces; not an amount or a count.
_DIGIT_RUN = r"(?<![\d\-.,])\d(?:[- ]?\d){9,15}(?![\d,]|[-.]\d)(?!\s*(?:원|만|억|달러|명|개|건|회|%|년|일|번째))"
_ACCOUNT_NEAR_WORD = regex.compile(
    r"(?:" + _BANK_WORD + r"[^\d\n]{0,12}?)\K" + _DIGIT_RUN
    + r"|" + _DIGIT_RUN + r"(?=[^\d\n]{0,6}?" + _BANK_WORD + r")")


@dataclass(frozen=True)
class Span:
    """One masked number: [start, end) in the text and its kind ('rrn', 'tel' or 'acc')."""

    start: int
    end: int
    kind: str


def _valid_rrn(m) -> bool:
    yy, mm, dd, code = int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4))
    century = {1: 1900, 2: 1900, 5: 1900, 6: 1900, 3: 2000, 4: 2000, 7: 2000, 8: 2000}[code]
    try:
        datetime.date(century + yy, mm, dd)
    except ValueError:
        return False
    return True


def _looks_like_year_range(text: str) -> bool:
    """'1592-1598' is a span of years, not a 15xx service number."""
    digits = regex.split(r"[-.]", text)
    if len(digits) != 2 or not all(d.isdigit() and len(d) == 4 for d in digits):
        return False
    a, b = int(digits[0]), int(digits[1])
    return 1000 <= a < b <= 2100


def find_pii(text: str) -> list[Span]:
    """Non-overlapping PII spans of text, in order."""
    candidates: list[tuple[int, int, int, str]] = []  # (start, -length, priority, kind)
    for m in _RRN.finditer(text):
        if _valid_rrn(m):
            candidates.append((m.start(), -(m.end() - m.start()), 0, "rrn"))
    for m in _PHONE.finditer(text):
        if not _looks_like_year_range(m.group()):
            candidates.append((m.start(), -(m.end() - m.start()), 1, "tel"))
    for pattern in (_ACCOUNT_GROUPS, _ACCOUNT_NEAR_WORD):
        for m in pattern.finditer(text, overlapped=False):
            candidates.append((m.start(), -(m.end() - m.start()), 2, "acc"))
    candidates.sort()
    spans: list[Span] = []
    end = -1
    for start, neg_length, _, kind in candidates:
        if start >= end:
            spans.append(Span(start, start - neg_length, kind))
            end = start - neg_length
    return spans


def split_pii(text: str) -> Iterator[tuple[str, Optional[str]]]:
    """(piece, None) for plain text and (matched number, kind) for each PII span, in order."""
    position = 0
    for span in find_pii(text):
        if span.start > position:
            yield text[position:span.start], None
        yield text[span.start:span.end], span.kind
        position = span.end
    if position < len(text):
        yield text[position:], None


def mask_text(text: str, tokens: Optional[dict[str, str]] = None) -> tuple[str, dict[str, int]]:
    """Text with each PII span replaced by its token string, and the count per kind."""
    tokens = tokens or {"rrn": "<|rrn|>", "tel": "<|tel|>", "acc": "<|acc|>"}
    counts = dict.fromkeys(KINDS, 0)
    out = []
    for piece, kind in split_pii(text):
        if kind is None:
            out.append(piece)
        else:
            out.append(tokens[kind])
            counts[kind] += 1
    return "".join(out), counts
