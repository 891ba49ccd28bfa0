"""Text helpers for ingest: normalisation, document ids, byte decoding, HTML to text, Markdown titles.

Decoding order for raw bytes: a byte-order mark (UTF-8/16/32) wins; then known binary signatures, NUL
bytes (unless they follow the UTF-16 pattern of mostly-ASCII text) and a high share of control bytes mark
the input as binary; then strict UTF-8; then `charset_normalizer`, whose ties are broken towards cp1252
(it ranks cp1250 first on Western European text that every single-byte Latin code page decodes equally
well) and whose BOM-less UTF-16/32 guesses on NUL-free bytes are ignored (they are never right there).
"""

from __future__ import annotations

import codecs
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser

_NEWLINES = str.maketrans({"\r": "\n", "\u2028": "\n", "\u2029": "\n", "\x85": "\n", "\x0b": "\n", "\x0c": "\n"})
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalise_text(text: str) -> str:
    """NFC, unified newlines, no trailing spaces, runs of blank lines collapsed to one, stripped."""
    text = unicodedata.normalize("NFC", text).lstrip("\ufeff")
    text = text.replace("\r\n", "\n").translate(_NEWLINES)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def doc_id_for(text: str) -> str:
    """sha256 of the normalised text (UTF-8), hex, first 32 characters."""
    return hashlib.sha256(normalise_text(text).encode("utf-8")).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------- decoding

@dataclass(frozen=True)
class Decoded:
    """Outcome of decoding raw bytes: text + encoding, or a reject reason + detail."""

    text: str | None
    encoding: str = ""
    reason: str = ""
    detail: str = ""


_BOMS = [  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
]

_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or docx/xlsx/epub)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"\x28\xb5\x2f\xfd", "a zstd archive"),
    (b"PAR1", "a Parquet file"),
    (b"\x7fELF", "an ELF executable"),
    (b"SQLite format 3\x00", "an SQLite database"),
]

_TEXT_CONTROLS = {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1B}
_CONTROL_BYTES = bytes(b for b in list(range(0x20)) + [0x7F] if b not in _TEXT_CONTROLS)
_SAMPLE = 1 << 16
_MAX_CONTROL_SHARE = 0.05
_TIE = 0.01  # charset_normalizer scores closer than this are a tie


def decode_bytes(data: bytes, declared: str | None = None) -> Decoded:
    """Decode raw file bytes to text, detecting the encoding; binary or undecodable input gives a reason."""
    if not data:
        return Decoded("", "utf-8")
    for bom, enc in _BOMS:
        if data.startswith(bom):
            return _strict(data[len(bom):], enc, f"starts with a {enc} byte-order mark")
    binary = _binary_reason(data)
    if binary == "nul":
        utf16 = _bomless_utf16(data)
        return utf16 or Decoded(None, reason="binary", detail="contains NUL bytes, so it is not a text file")
    if binary:
        return Decoded(None, reason="binary", detail=binary)
    try:
        return Decoded(data.decode("utf-8"), "utf-8")
    except UnicodeDecodeError:
        pass
    if declared:
        hit = _try_declared(data, declared)
        if hit:
            return hit
    return _detect(data)


def _strict(data: bytes, enc: str, why: str) -> Decoded:
    """Decode with one codec or report why not."""
    try:
        return Decoded(data.decode(enc), enc)
    except UnicodeDecodeError as exc:
        detail = f"{why} but is not valid {enc}: {exc.reason} at byte {exc.start}"
        return Decoded(None, reason="undecodable", detail=detail)


def _binary_reason(data: bytes) -> str:
    """'' for text-like bytes, 'nul' for NUL bytes, else a sentence saying why the bytes look binary."""
    for magic, what in _MAGIC:
        if data.startswith(magic):
            return f"starts with the signature of {what}, so it is not text"
    sample = data[:_SAMPLE]
    if b"\x00" in sample:
        return "nul"
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    if controls > _MAX_CONTROL_SHARE * len(sample):
        return f"has {controls / len(sample):.0%} control characters among its first bytes, so it is not text"
    return ""


def _bomless_utf16(data: bytes) -> Decoded | None:
    """Mostly-ASCII UTF-16 without a BOM: NUL in every other byte. None when the pattern does not hold."""
    if len(data) < 4 or len(data) % 2:
        return None
    even, odd = data[0::2], data[1::2]
    z_even, z_odd = even.count(0) / len(even), odd.count(0) / len(odd)
    enc = "utf-16-le" if z_odd > 0.3 and z_even < 0.02 else "utf-16-be" if z_even > 0.3 and z_odd < 0.02 else ""
    if not enc:
        return None
    try:
        text = data.decode(enc)
    except UnicodeDecodeError:
        return None
    bad = sum(1 for ch in text if ord(ch) < 0x20 and ord(ch) not in _TEXT_CONTROLS)
    return Decoded(text, enc) if bad <= _MAX_CONTROL_SHARE * len(text) else None


def _canonical(enc: str) -> str:
    """Python's canonical codec name ('cp1252', 'utf-16-le', ...), or the input when unknown."""
    try:
        return codecs.lookup(enc).name
    except LookupError:
        return enc


def _try_declared(data: bytes, declared: str) -> Decoded | None:
    """Use an encoding the document declares (HTML meta charset); latin-1/ascii labels mean cp1252."""
    enc = _canonical(declared)
    if enc in ("iso8859-1", "latin-1", "ascii", "us-ascii"):
        enc = "cp1252"
    try:
        return Decoded(data.decode(enc), enc)
    except (UnicodeDecodeError, LookupError):
        return None


def _detect(data: bytes) -> Decoded:
    """charset_normalizer, with cp1252 preferred among equally good guesses and bogus UTF-16/32 skipped."""
    from charset_normalizer import from_bytes

    matches = [m for m in from_bytes(data) if not m.encoding.startswith(("utf_16", "utf_32"))]
    if not matches:
        return Decoded(None, reason="undecodable",
                       detail="is not UTF-8 and no character encoding decodes it into plausible text")
    best = matches[0]
    ties = [m for m in matches if abs(m.chaos - best.chaos) <= _TIE and abs(m.coherence - best.coherence) <= _TIE]
    if any("cp1252" in m.could_be_from_charset for m in ties):
        try:
            return Decoded(data.decode("cp1252"), "cp1252")
        except UnicodeDecodeError:
            pass
    return Decoded(str(best), _canonical(best.encoding))


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_:.\-]+)""", re.IGNORECASE)


def html_declared_charset(data: bytes) -> str | None:
    """The charset an HTML file declares in a <meta> tag within its first 4 KB, if any."""
    m = _META_CHARSET.search(data[:4096])
    return m.group(1).decode("ascii") if m else None


# --------------------------------------------------------------------------------------------------- HTML

_SKIP = {"script", "style", "noscript", "template", "svg", "iframe", "object", "canvas", "math"}
_BLOCK = {
    "address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "dialog", "div", "dl", "dt",
    "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr",
    "html", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "ul",
}
_LINE = {"br", "tr", "li", "option"}
_SPACES = re.compile(r"[ \t\n\r\f\v]+")


class _HTMLText(HTMLParser):
    """Collects the readable text of an HTML page, its <title> and its first <h1>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.title: list[str] | None = None
        self.h1: list[str] | None = None
        self._skip = self._pre = 0
        self._in_title = self._in_h1 = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        """Open a tag: skipped content, block and line breaks, title capture."""
        if tag in _SKIP:
            self._skip += 1
        elif tag == "title" and self.title is None:
            self._in_title, self.title = True, []
        elif tag == "h1" and self.h1 is None:
            self._in_h1, self.h1 = True, []
        if tag == "pre":
            self._pre += 1
        self._break(tag, opening=True)

    def handle_endtag(self, tag: str) -> None:
        """Close a tag."""
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in ("body", "html"):
            self._skip = 0
        elif tag == "title":
            self._in_title = False
        elif tag == "h1":
            self._in_h1 = False
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag not in _LINE:
            self._break(tag, opening=False)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        """A self-closing tag such as <br/>: only its break matters."""
        self._break(tag, opening=True)

    def handle_data(self, data: str) -> None:
        """Text: kept verbatim in <pre>, whitespace-collapsed elsewhere."""
        if self._in_title:
            self.title.append(data)  # type: ignore[union-attr]
            return
        if self._skip:
            return
        if self._in_h1:
            self.h1.append(data)  # type: ignore[union-attr]
        if not self._pre:
            data = _SPACES.sub(" ", data)
            if not self.out or self.out[-1][-1:] in ("\n", " "):
                data = data.lstrip(" ")
        if data:
            self.out.append(data)

    def _break(self, tag: str, opening: bool) -> None:
        """Emit the line or paragraph break a tag implies."""
        if self._skip:
            return
        if tag in _BLOCK:
            self.out.append("\n\n")
        elif tag in _LINE:
            self.out.append("\n- " if tag == "li" and opening else "\n")
        elif tag in ("td", "th") and opening and self.out and self.out[-1][-1:] not in ("\n", " "):
            self.out.append(" ")


def html_to_text(html: str) -> tuple[str, str]:
    """Readable text of an HTML page (scripts and styles dropped, paragraph breaks kept) and its title."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    title = parser.title if parser.title else parser.h1 or []
    return normalise_text("".join(parser.out)), _one_line("".join(title))


def _one_line(text: str) -> str:
    """Collapse whitespace to single spaces and cap the length, for titles."""
    return _SPACES.sub(" ", text).strip()[:500]


# ----------------------------------------------------------------------------------------------- Markdown

_ATX = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def markdown_title(text: str) -> str:
    """The front-matter title or the first heading (ATX or setext) outside code fences, else ''."""
    lines = text.split("\n")
    start, title = _front_matter(lines)
    if title:
        return title
    fence, prev = "", ""
    for line in lines[start:]:
        m = _FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = ""
            continue
        if m:
            fence, prev = m.group(1), ""
            continue
        heading = _ATX.match(line)
        if heading and (heading.group(1) or "").strip():
            return _one_line(heading.group(1))
        if prev and _SETEXT.match(line):
            return _one_line(prev)
        prev = line.strip() if line.strip() and not heading else ""
    return ""


def _front_matter(lines: list[str]) -> tuple[int, str]:
    """(index of the first line after YAML front matter, its `title:` value or '')."""
    if not lines or lines[0].strip() != "---":
        return 0, ""
    title = ""
    for i, line in enumerate(lines[1:200], start=1):
        if line.strip() in ("---", "..."):
            return i + 1, title
        if not title and line.lower().startswith("title:"):
            title = _one_line(line.split(":", 1)[1].strip().strip("'\""))
    return 0, ""
