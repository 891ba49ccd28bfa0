"""Corpus readers for the ingest stage: source specs -> units of work -> `documents` and `rejects` rows.

Source specs (each `--source`, or each entry of `sources:` in a config):

  FILE     one file; its kind comes from the extension: .txt, .md/.markdown, .html/.htm, .jsonl, .parquet,
           .csv. A file named explicitly with any other extension is read as plain text.
  FOLDER   every file below it (recursively) whose extension is in `extensions`. Everything else is skipped,
           counted in the stage stats and listed in `rejects` with its reason: skipped_hidden (".name" files
           and folders), skipped_extension, skipped_compressed (.gz, .zst, ...: not decompressed),
           dangling_link, link_loop, skipped_linked_folder (symlinked folders are not followed),
           skipped_not_regular (fifos, sockets, devices).
  GLOB     e.g. "corpus/**/*.md" ("**" crosses folders). Matches are filtered like a folder's files, unless
           the pattern ends in a literal extension ("logs/*.log"), which takes every match as named.
  synthetic://facts?n=50&seed=0[&entities=4&relations=2&pool=32&name_seed=1234]
           n made-up toy-world fact documents, each with its gold question/answer pairs.
  datasets://PATH_OR_BUILDER?data_files=a.jsonl&split=train[&name=..&data_dir=..&revision=..]
           the rows of datasets.load_dataset(PATH_OR_BUILDER, ...), offline: a packaged builder (json, csv,
           parquet, text) over local data_files (repeatable, globs allowed), a local dataset folder, or a
           dataset already in the local Hugging Face cache. split defaults to train.

Each file, synthetic spec or dataset is one unit of work (one output shard). Whole files (txt, md, html) are
one document each; tabular sources (jsonl, csv, parquet, datasets) give one document per row from
`text_column`, with an optional `title_column`, and gold QA from `question_column`/`answer_column`.
Text is decoded by detection when it is not UTF-8 (the encoding is recorded), normalised (NFC, unified
newlines, no trailing spaces, one blank line at most) and identified by doc_id = sha256(text)[:32];
a document repeated within a unit is kept once.

A spec with an unknown scheme (ftp://, s3://, ...) is an `unknown_scheme` reject; it and a `not_found` spec
(nothing there) stop the ingest stage unless `allow_missing` (`--allow-missing`) is set.
Bad input never stops a run: it becomes a `rejects` row (stage "ingest") with one of these reasons:
  not_found, unknown_scheme, bad_spec, unreadable_file, empty, too_short, too_large, binary, undecodable, malformed_jsonl,
  malformed_csv, unreadable_parquet, unreadable_dataset, missing_column, not_text, read_error.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
from pathlib import Path
from urllib.parse import quote, unquote, urlencode


from storage.corpus_readers import READERS, Sink, split_uri
from storage.corpus_text import doc_id_for, normalise_text
from storage.hashing import canonical_json, file_sha256
from storage.sources import IngestConfig, SourceUnit
from storage.synthetic import registered_worlds, world_named

__all__ = ["IngestConfig", "SourceNotFoundError", "SourceUnit", "check_sources_found", "expand_sources",
           "quick_source_rejects", "read_unit", "normalise_text", "doc_id_for",
           "KIND_BY_EXTENSION", "REASONS"]

KIND_BY_EXTENSION = {".txt": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html",
                     ".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv"}
SKIP_REASONS = ("skipped_hidden", "skipped_extension", "skipped_compressed", "dangling_link", "link_loop",
                "skipped_linked_folder", "skipped_not_regular")
REASONS = ("not_found", "unknown_scheme", "bad_spec", "unreadable_file", "empty", "too_short", "too_large", "binary", "undecodable",
           "malformed_jsonl", "malformed_csv", "unreadable_parquet", "unreadable_dataset", "missing_column",
           "not_text", "read_error") + SKIP_REASONS
SCHEMES = ("file://", "synthetic://", "datasets://")
COMPRESSED = {".gz", ".zst", ".bz2", ".xz", ".lz4", ".zip", ".7z", ".tgz"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
DATASETS_ARGS = ("data_files", "split", "name", "data_dir", "revision")
_GLOB_CHARS = set("*?[")


class SourceNotFoundError(ValueError):
    """A source that does not exist, matches nothing, or has a scheme no reader knows."""


def check_sources_found(rejects: list[dict], cfg: IngestConfig) -> None:
    """Raise SourceNotFoundError naming the first missing or unknown source, unless `cfg.allow_missing`."""
    bad = [r for r in rejects if r["reason"] in ("not_found", "unknown_scheme")]
    if bad and not cfg.allow_missing:
        more = f" (and {len(bad) - 1} more source(s))" if len(bad) > 1 else ""
        raise SourceNotFoundError(
            f"Source {bad[0]['source']!r}: {bad[0]['detail'].rstrip('.')}{more}. Known schemes: "
            f"{', '.join(SCHEMES)}, or a local file, folder or glob. Pass --allow-missing to record it as a "
            "reject and go on.")


def quick_source_rejects(specs: list[str]) -> list[dict]:
    """Rejects for specs with an unknown scheme or a local path that does not exist (no file is read)."""
    out = []
    for spec in map(str, specs):
        scheme = _SCHEME.match(spec)
        if scheme and scheme.group(1).lower() in ("synthetic", "datasets"):
            continue
        if scheme and not spec.startswith("file://"):
            out.append(_reject(spec, "unknown_scheme", f"No reader knows the scheme {scheme.group(1)}://"))
            continue
        raw = os.path.expanduser(unquote(spec[len("file://"):]) if spec.startswith("file://") else spec)
        if not os.path.lexists(raw) and not (_GLOB_CHARS & set(raw) and glob.glob(raw, recursive=True)):
            out.append(_reject(spec, "not_found", f"{os.path.abspath(raw)} does not exist"))
    return out


def _reject(source: str, reason: str, detail: str) -> dict:
    """A REJECTS row for a spec."""
    return {"stage": "ingest", "source": source, "item": "", "reason": reason, "detail": detail}


# ------------------------------------------------------------------------------------------------- expand

class Skipped:
    """Files and folders a folder walk or glob passed over, each with its reason."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []

    def add(self, path: Path, reason: str, detail: str) -> None:
        self.items.append((os.path.abspath(path), reason, detail))

    def count(self, reason: str) -> int:
        return sum(1 for _, r, _ in self.items if r == reason)

    def rejects(self) -> list[dict]:
        """One REJECTS row per skipped path (each path once)."""
        seen, out = set(), []
        for path, reason, detail in self.items:
            if path not in seen:
                seen.add(path)
                out.append({"stage": "ingest", "source": path, "item": "", "reason": reason, "detail": detail})
        return out


def expand_sources(specs: list[str], cfg: IngestConfig, *, stats: dict | None = None
                   ) -> tuple[list[SourceUnit], list[dict]]:
    """Specs -> units sorted by source (each source once), plus rejects for specs that match nothing.

    When `stats` is given it is filled with counts (units, rejects, one per skip reason) and `skipped`: a
    REJECTS row for every file or folder that was passed over (the ingest stage writes them).
    """
    units: dict[str, SourceUnit] = {}
    rejects: list[dict] = []
    skipped = Skipped()
    for spec in specs:
        found, bad = _expand_spec(str(spec), cfg, skipped)
        rejects.extend(bad)
        for unit in found:
            units.setdefault(unit.source, unit)
    out = sorted(units.values(), key=lambda u: (u.source, u.kind))
    if stats is not None:
        stats.update(units=len(out), rejects=len(rejects))
        stats.update({r: skipped.count(r) for r in SKIP_REASONS})
        stats["skipped"] = skipped.rejects()
    return out, rejects


def _expand_spec(spec: str, cfg: IngestConfig, counts: Skipped) -> tuple[list[SourceUnit], list[dict]]:
    """One spec -> its units and rejects."""
    if spec.startswith("synthetic://"):
        return _synthetic_unit(spec)
    if spec.startswith("datasets://"):
        return _datasets_unit(spec)
    scheme = _SCHEME.match(spec)
    if scheme and not spec.startswith("file://"):
        return [], [_reject(spec, "unknown_scheme", f"No reader knows the scheme {scheme.group(1)}://; known: "
                            f"{', '.join(SCHEMES)}, or a local file, folder or glob.")]
    raw = unquote(spec[len("file://"):]) if spec.startswith("file://") else spec
    path = Path(os.path.expanduser(raw))
    if path.is_dir():
        files = _walk(path, cfg, counts)
        if not files:
            return [], [_reject(spec, "not_found", f"The folder {os.path.abspath(path)} holds no file with one of "
                                f"the extensions {', '.join(cfg.extensions)}.")]
    elif path.is_file():
        files = [(path, KIND_BY_EXTENSION.get(path.suffix.lower(), "txt"))]
    elif path.exists():
        return [], [_reject(spec, "unreadable_file", f"{os.path.abspath(path)} is not a regular file or folder.")]
    elif _GLOB_CHARS & set(raw):
        files = _glob(os.path.expanduser(raw), cfg, counts)
        if not files:
            return [], [_reject(spec, "not_found", f"The pattern {spec!r} matches no readable file.")]
    else:
        return [], [_reject(spec, "not_found", f"{os.path.abspath(path)} does not exist.")]
    return _file_units(files)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _link_problem(path: Path) -> str:
    """'dangling_link' or 'link_loop' for a symlink that cannot be followed, else ''."""
    try:
        os.stat(path)
        return ""
    except OSError as exc:
        return "link_loop" if exc.errno == errno.ELOOP else "dangling_link"


def _skip_folder(path: Path, root: Path, skipped: Skipped) -> bool:
    """True (recorded) if the walk must not enter this sub-folder."""
    if _hidden(path.name):
        skipped.add(path, "skipped_hidden", f"{path} is a hidden folder; its files are not read.")
        return True
    if path.is_symlink():
        problem = _link_problem(path)
        target = os.path.realpath(path)
        if not problem and (Path(root).resolve().as_posix() + "/").startswith(target.rstrip("/") + "/"):
            problem = "link_loop"
        if problem:
            skipped.add(path, problem, f"{path} is a symbolic link that cannot be followed ({problem}).")
        else:
            skipped.add(path, "skipped_linked_folder", f"{path} links to the folder {target}; symlinked folders "
                        "are not followed (name it as a source of its own to read it).")
        return True
    return False


def _walk(root: Path, cfg: IngestConfig, skipped: Skipped) -> list[tuple[Path, str]]:
    """Files under a folder with an accepted extension; everything passed over is recorded with its reason."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _skip_folder(Path(folder) / d, root, skipped))
        for name in sorted(names):
            kind = _accepted(Path(folder) / name, cfg, skipped)
            if kind:
                files.append((Path(folder) / name, kind))
    return files


def _accepted(path: Path, cfg: IngestConfig, skipped: Skipped) -> str:
    """The kind of a file found in a folder or glob, or '' (recorded with its reason) when it is skipped."""
    ext = path.suffix.lower()
    if _hidden(path.name):
        skipped.add(path, "skipped_hidden", f"{path.name} is a hidden file.")
    elif path.is_symlink() and (problem := _link_problem(path)):
        skipped.add(path, problem, f"{path} is a symbolic link that cannot be followed ({problem}).")
    elif ext in COMPRESSED and ext not in cfg.extensions:
        skipped.add(path, "skipped_compressed", f"{path.name} is compressed ({ext}); decompress it to ingest it.")
    elif ext not in cfg.extensions:
        skipped.add(path, "skipped_extension", f"{path.name}: the extension {ext or '(none)'} is not in "
                    f"ingest.extensions ({', '.join(cfg.extensions)}).")
    elif not path.is_file():
        skipped.add(path, "skipped_not_regular", f"{path} is not a regular file.")
    else:
        return KIND_BY_EXTENSION.get(ext, "txt")
    return ""


def _glob(pattern: str, cfg: IngestConfig, counts: Skipped) -> list[tuple[Path, str]]:
    """Files matching a glob: folders are walked; a literal extension in the pattern takes every match."""
    suffix = os.path.splitext(os.path.basename(pattern))[1]
    literal = bool(suffix) and not (_GLOB_CHARS & set(suffix))
    files = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            files.extend(_walk(path, cfg, counts))
        elif literal and path.is_file():
            files.append((path, KIND_BY_EXTENSION.get(path.suffix.lower(), "txt")))
        elif kind := _accepted(path, cfg, counts):
            files.append((path, kind))
    return files


def _file_units(files: list[tuple[Path, str]]) -> tuple[list[SourceUnit], list[dict]]:
    """Fingerprint files into units; unreadable ones become rejects."""
    units, rejects = [], []
    for path, kind in files:
        source = os.path.abspath(path)
        try:
            units.append(SourceUnit(source, kind, file_sha256(source)))
        except OSError as exc:
            rejects.append(_reject(source, "unreadable_file", f"{source} could not be read: {exc.strerror or exc}."))
    return units, rejects


def _synthetic_unit(spec: str) -> tuple[list[SourceUnit], list[dict]]:
    """synthetic://WORLD?... -> one unit with a canonical URI (every parameter, sorted)."""
    name, pairs = split_uri(spec)
    world = world_named(name)
    if world is None:
        known = ", ".join(repr(w) for w in registered_worlds()) or "none registered"
        return [], [_reject(spec, "bad_spec", f"Unknown synthetic world {name!r}; known: {known}.")]
    params = dict(world.defaults)
    for key, value in pairs:
        if key not in params:
            return [], [_reject(spec, "bad_spec", f"Unknown parameter {key!r}; known: {', '.join(sorted(params))}.")]
        try:
            params[key] = int(value)
        except ValueError:
            return [], [_reject(spec, "bad_spec", f"Parameter {key}={value!r} is not an integer.")]
    problem = world.check(params)
    if problem:
        return [], [_reject(spec, "bad_spec", f"Bad synthetic spec: {problem}.")]
    canonical = f"synthetic://{name}?" + "&".join(f"{k}={params[k]}" for k in sorted(params))
    return [SourceUnit(canonical, "synthetic", hashlib.sha256(canonical.encode()).hexdigest())], []


def _local(path: str) -> str:
    """An absolute local path for a relative or ~ path; URLs (anything with ://) unchanged."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _datasets_unit(spec: str) -> tuple[list[SourceUnit], list[dict]]:
    """datasets://PATH?... -> one unit: canonical URI (local paths absolute) hashed with its local files."""
    path, pairs = split_uri(spec)
    unknown = sorted({k for k, _ in pairs} - set(DATASETS_ARGS))
    if not path or unknown:
        why = f"unknown argument(s) {', '.join(unknown)}" if unknown else "no dataset path or builder"
        return [], [_reject(spec, "bad_spec", f"Bad datasets spec: {why}; known: {', '.join(DATASETS_ARGS)}.")]
    if os.path.exists(os.path.expanduser(path)):
        path = _local(path)
    pairs = [(k, _local(v) if k == "data_files" else v) for k, v in pairs]
    if "split" not in {k for k, _ in pairs}:
        pairs.append(("split", "train"))
    files: list[str] = []
    for _, pattern in (p for p in pairs if p[0] == "data_files" and "://" not in p[1]):
        matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
        if not matches:
            return [], [_reject(spec, "not_found", f"data_files {pattern} matches no file.")]
        files.extend(matches)
    if os.path.isdir(path):
        files.extend(_all_files(path))
    query = urlencode(sorted(pairs, key=lambda kv: kv[0]), quote_via=quote, safe="/:*")
    canonical = f"datasets://{quote(path, safe='/:~')}?{query}"
    try:
        hashed = [[f, file_sha256(f)] for f in sorted(set(files))]
    except OSError as exc:
        return [], [_reject(spec, "unreadable_file", f"A local file of the dataset could not be read: {exc}.")]
    fingerprint = hashlib.sha256(canonical_json({"uri": canonical, "files": hashed}).encode()).hexdigest()
    return [SourceUnit(canonical, "datasets", fingerprint)], []


def _all_files(root: str) -> list[str]:
    """Every non-hidden file below a folder."""
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        out.extend(os.path.join(folder, n) for n in names if not _hidden(n))
    return out


# --------------------------------------------------------------------------------------------------- read

def read_unit(unit: SourceUnit, cfg: IngestConfig) -> tuple[list[dict], list[dict], dict]:
    """One unit -> (DOCUMENTS rows, REJECTS rows, stats). Never raises for bad input."""
    sink = Sink(unit, cfg)
    reader = READERS.get(unit.kind)
    if reader is None:
        sink.reject("", "bad_spec", f"Unknown source kind {unit.kind!r}; known: {', '.join(sorted(READERS))}.")
        return sink.result()
    try:
        reader(sink)
    except Exception as exc:  # noqa: BLE001 - bad input must never stop the run; good rows are kept
        sink.reject("", "read_error", f"Reading stopped on an unexpected {type(exc).__name__}: {exc}.")
    return sink.result()
