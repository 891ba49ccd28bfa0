"""A small text corpus written into a folder, for pipeline tests."""

from __future__ import annotations

from pathlib import Path

WORDS = ("river stone lantern orchard copper meadow signal harbor pencil violet engine marble window "
         "forest ladder basket thunder garden silver candle").split()


def make_corpus(folder: Path, n: int = 24) -> Path:
    """`n` text files of varied length (some span several chunks) plus a duplicate of the first."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(20 + 13 * (i % 6))]
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. " + " ".join(words) + ".\n")
    (folder / "copy-of-doc00.txt").write_text((folder / "doc00.txt").read_text())
    return folder
