"""Plain text out of source texts that hold HTML (product pages scraped into item titles and descriptions).

clean_markup(text) -> text without markup, one line per block:
  1. an unterminated tag at the very end (`<span class="a-size-medium"`, no `>`) is removed;
  2. html.parser.HTMLParser reads the rest: tags are dropped, entities and character references are decoded
     (`&amp;` -> `&`, `&#233;` -> `é`), comments and the content of <script>, <style>, <noscript>, <template>
     and <head> are dropped, and block tags (<br>, <p>, <div>, <li>, <tr>, <h1>..<h6>, ...) become line breaks;
  3. steps 1-2 repeat while the text changes, at most MAX_PASSES times (double-escaped `&amp;amp;` and escaped
     tags `&lt;b&gt;` are read too);
  4. runs of whitespace collapse to one space within each line; empty lines are dropped.
Text without "<" and "&" skips the parser (step 4 only).

looks_like_markup(text) is True when a cleaned text still holds markup or code, i.e. any of
  a tag: "<" followed by a letter, "/", "!" or "?";
  an entity: `&name;`, `&#123;` or `&#x1f;`;
  code: a `{...}` block holding ":" or ";" (a CSS rule, a script body), `function(`, `var name =`, `=>`,
  `document.` / `window.` followed by a name.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

MAX_PASSES = 3
DROPPED = frozenset({"script", "style", "noscript", "template", "head"})
BLOCKS = frozenset({"br", "p", "div", "li", "ul", "ol", "dl", "dt", "dd", "tr", "td", "th", "table", "hr",
                    "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "header", "footer", "blockquote"})
_UNCLOSED = re.compile(r"<[A-Za-z/!?][^<>]*\Z")
_TAG = re.compile(r"<[A-Za-z/!?]")
_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-f]+|[a-z][a-z0-9]*);", re.IGNORECASE)
_CODE = re.compile(r"\{[^{}]*[:;][^{}]*\}|\bfunction\s*\(|\bvar\s+[A-Za-z_$][\w$]*\s*=|=>"
                   r"|\b(?:document|window)\.[A-Za-z_]", re.IGNORECASE)


class _TextParser(HTMLParser):
    """Collects the text outside DROPPED elements; block tags add a line break."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0  # depth inside DROPPED elements

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in DROPPED:
            self.hidden += 1
        elif tag in BLOCKS:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs) -> None:
        if tag in BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in DROPPED:
            self.hidden = max(0, self.hidden - 1)
        elif tag in BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def _strip_once(text: str) -> str:
    parser = _TextParser()
    parser.feed(_UNCLOSED.sub("", text))
    parser.close()
    return "".join(parser.parts)


def clean_markup(text: str) -> str:
    """`text` without tags, entities, comments and script/style content; lines joined with "\\n" (rules above)."""
    for _ in range(MAX_PASSES):
        if "<" not in text and "&" not in text:
            break
        stripped = _strip_once(text)
        if stripped == text:
            break
        text = stripped
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def looks_like_markup(text: str) -> bool:
    """Whether a (cleaned) text still holds a tag, an entity or code (rules above)."""
    return bool(_TAG.search(text) or _ENTITY.search(text) or _CODE.search(text))
