"""What ingest reads: its settings (`IngestConfig`) and one unit of its work (`SourceUnit`)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["DEFAULT_EXTENSIONS", "IngestConfig", "SourceUnit"]

DEFAULT_EXTENSIONS = [".txt", ".md", ".markdown", ".html", ".htm", ".jsonl", ".parquet", ".csv"]


class IngestConfig(BaseModel):
    """How the ingest stage reads sources."""

    model_config = ConfigDict(extra="forbid")

    text_column: str = Field("text", description="Column holding the document text (jsonl, parquet, csv, datasets).")
    title_column: str | None = Field(None, description="Optional column holding a title for tabular sources.")
    question_column: str | None = Field(None, description="Optional gold-question column (tabular sources); "
                                        "a list of questions pairs with a list of answers.")
    answer_column: str | None = Field(None, description="Optional gold-answer column: a string, a list (first "
                                      "is used) or a SQuAD-style {'text': [...]} dict.")
    max_bytes: int = Field(20_000_000, gt=0, description="Files larger than this many bytes are rejected "
                           "(too_large), whatever their kind.")
    max_chars: int = Field(2_000_000, gt=0, description="Documents longer than this many characters (after "
                           "normalising) are rejected (too_large).")
    min_chars: int = Field(1, ge=0, description="Documents shorter than this are rejected (too_short; "
                           "no text at all is `empty`).")
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTENSIONS),
                                  description="File extensions picked up inside folders and globs; unknown "
                                  "ones are read as plain text.")
    allow_missing: bool = Field(False, exclude=True, description="A source that does not exist or has an unknown "
                                "scheme is a reject, not an error (--allow-missing). Not part of cache keys.")
    datasets_cache_dir: str | None = Field(None, exclude=True, description="cache_dir for datasets.load_dataset "
                                           "(default: the Hugging Face cache). Not part of cache keys.")

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, value: list[str]) -> list[str]:
        """Lower-case extensions with a leading dot."""
        return [e.lower() if e.startswith(".") else "." + e.lower() for e in value]


@dataclass(frozen=True)
class SourceUnit:
    """One unit of ingest work, written as one output shard."""

    source: str  # absolute path, or canonical synthetic:// / datasets:// URI
    kind: str  # txt | md | html | jsonl | parquet | csv | synthetic | datasets
    fingerprint: str  # sha256 hex of the file bytes / canonical URI / dataset args + local file bytes
