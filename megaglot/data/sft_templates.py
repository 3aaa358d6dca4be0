"""Prompt templates for instruction tuning: how a question and its answer become one text.

A template is a text with `{instruction}`, an optional `{input}` and `{output}`. Everything before
`{output}` is the prompt (no loss); `{output}`, any spaces right before it and any text after it are
the response (loss). The spaces go with the response so that the prompt ends exactly where
KoAlpaca's inference prompt ends (`### 답변:`): the model is trained on the prompt it will be given.

A record without an input drops the line holding `{input}` together with the newlines before it,
so one template serves records with and without input ({input} must sit on a line of its own).

Chat records render each user/assistant exchange with the same template (user = instruction,
assistant = output), joined by a blank line. A system message goes into the template's `system`
line when it has one, otherwise into the first exchange's `{input}`.

Placeholders are substituted in one pass, so braces inside the data are never re-interpreted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from megaglot.data.input_reader import PreprocessError

PLACEHOLDER = re.compile(r"\{(instruction|input|output|system)\}")
SEPARATOR = "\n\n"

KOALPACA = "### 질문: {instruction}\n\n### 맥락: {input}\n\n### 답변: {output}"
"""KoAlpaca's prompt; an input is given as `### 맥락:` (context), as KoAlpaca's own inference code does."""
CHAT = "### 질문: {instruction}\n\n{input}\n\n### 답변: {output}"
"""The same markers for dialogues: an input is appended to the question; a system message has its own line."""
CHAT_SYSTEM = "### 시스템: {system}\n\n"

BUILTIN = {"koalpaca": (KOALPACA, None), "chat": (CHAT, CHAT_SYSTEM)}


@dataclass(frozen=True)
class Template:
    """A parsed template: prompt and response patterns (see the module docstring)."""

    name: str
    """Built-in name or the file the template came from (recorded in the sidecar)."""
    prompt: str
    """Pattern before the response: `{instruction}` and optionally `{input}`."""
    response: str
    """Pattern of the response: leading spaces, `{output}`, then any fixed suffix."""
    system: Optional[str] = None
    """Pattern put before the first exchange for a system message (`{system}`); None: into `{input}`."""

    @property
    def has_input(self) -> bool:
        return "{input}" in self.prompt

    def render_prompt(self, instruction: str, input: str = "") -> str:
        """The prompt text; what a generator wraps a question in (it ends where the answer starts)."""
        pattern = self.prompt if input or not self.has_input else drop_input_line(self.prompt)
        return _substitute(pattern, {"instruction": instruction, "input": input})

    def render_response(self, output: str) -> str:
        return _substitute(self.response, {"output": output})

    def render_system(self, system: str) -> str:
        return _substitute(self.system or "", {"system": system})


def _substitute(pattern: str, values: dict) -> str:
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), pattern)


def drop_input_line(pattern: str) -> str:
    """The pattern without the line that holds `{input}` and the newlines before it."""
    start = pattern.index("{input}")
    line_start = pattern.rfind("\n", 0, start) + 1
    while line_start > 0 and pattern[line_start - 1] == "\n":
        line_start -= 1
    line_end = pattern.find("\n", start)
    line_end = len(pattern) if line_end < 0 else line_end
    rest = pattern[line_end:]
    return pattern[:line_start] + (rest.lstrip("\n") if line_start == 0 else rest)


def parse_template(text: str, name: str, system: Optional[str] = None) -> Template:
    """Split a template text at `{output}`, checking each placeholder appears where it may."""
    where = f"--template {name}"
    counts = {key: text.count("{" + key + "}") for key in ("instruction", "input", "output")}
    if counts["output"] == 0:
        raise PreprocessError(f"{where}: no {{output}} placeholder; mark where the response goes, "
                              f"e.g. '### 답변: {{output}}'")
    for key, count in counts.items():
        if count > 1:
            raise PreprocessError(f"{where}: {{{key}}} appears {count} times; give it once")
    if counts["instruction"] == 0:
        raise PreprocessError(f"{where}: no {{instruction}} placeholder; mark where the question goes, "
                              f"e.g. '### 질문: {{instruction}}'")
    cut = text.index("{output}")
    prompt, response = text[:cut], text[cut:]
    spaces = len(prompt) - len(prompt.rstrip(" \t"))
    prompt, response = prompt[:len(prompt) - spaces], prompt[len(prompt) - spaces:] + response
    if "{instruction}" in response or "{input}" in response:
        raise PreprocessError(f"{where}: {{instruction}} and {{input}} must come before {{output}}")
    if "{input}" in prompt:
        line_start = prompt.rfind("\n", 0, prompt.index("{input}")) + 1
        line_end = prompt.find("\n", prompt.index("{input}"))
        line = prompt[line_start:len(prompt) if line_end < 0 else line_end]
        if "{instruction}" in line or line_end < 0:
            raise PreprocessError(f"{where}: {{input}} must be on a line of its own, between {{instruction}} "
                                  f"and {{output}} (a record without input drops that line)")
    return Template(name=name, prompt=prompt, response=response, system=system)


def load_template(spec: str) -> Template:
    """A built-in template by name (koalpaca, chat) or a template file (UTF-8 text)."""
    if spec in BUILTIN:
        text, system = BUILTIN[spec]
        return parse_template(text, spec, system)
    if not os.path.isfile(spec):
        raise PreprocessError(f"--template {spec}: neither a built-in template ({', '.join(BUILTIN)}) nor a file")
    try:
        with open(spec, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as error:
        raise PreprocessError(f"--template {spec}: not UTF-8 ({error.reason} at byte {error.start})") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):  # the newline editors add is not part of the response
        text = text[:-1]
    return parse_template(text, spec)


__all__ = ["BUILTIN", "KOALPACA", "CHAT", "Template", "load_template", "parse_template", "drop_input_line"]
