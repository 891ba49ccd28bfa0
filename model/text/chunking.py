"""Token-aware, chat-template-aware chunking of documents (rows of `storage.schemas.CHUNKS`).

A chunk is fed to the model wrapped as a user turn: ``prefix + body + suffix`` where ``prefix``/``suffix``
are the token ids the chat template puts before and after a user message (with the generation prompt).
`ChunkConfig.max_tokens` bounds that whole wrapped sequence, so the body budget is
``max_tokens - len(prefix) - len(suffix)``.

A document of N tokens (its own tokenisation, no special tokens) is split into
``n = ceil((N - overlap) / (budget - overlap))`` windows of (nearly) equal size, as the reference does
(equal token chunks, affixes re-added to each). Window edges are moved, if needed, to the nearest token
boundary that is also a character boundary (byte-level tokenizers split one character over several
tokens). Chunk texts are character slices of the document; without overlap they partition it exactly:
``"".join(chunk texts) == text`` and the token spans partition ``[0, N)``.

Every row satisfies ``n_prompt_tokens == len(wrap_as_user_turn(tokenizer, row["text"])) <= max_tokens``:
the split is checked by re-tokenising each chunk text, and redone with a smaller budget in the rare case
that re-tokenising a chunk on its own gives more tokens than its span in the whole document.

Document text is always tokenised as plain text: a special-token string inside a document ("<|im_end|>")
becomes ordinary tokens, never a control token that would end the user turn early.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

_SENTINEL = "D2LSENTINEL7f3a9c"


@dataclass(frozen=True)
class ChunkConfig:
    max_tokens: int = 512  # per chunk INCLUDING the chat-template affixes of the user turn it is wrapped in
    overlap_tokens: int = 0  # tokens shared by consecutive chunks

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.overlap_tokens < 0:
            raise ValueError(f"overlap_tokens must be >= 0, got {self.overlap_tokens}")


# ------------------------------------------------------------------------------------------------------
# tokenizer identity


_FP_CACHE: OrderedDict[int, tuple[Any, tuple, str]] = OrderedDict()
_FP_CACHE_SIZE = 8


def _backend_digest(tokenizer) -> str:
    """sha256 of the backend tokenizer (vocab, merges, normalizer, pre-tokenizer, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # runtime settings, not part of the tokenizer's identity
        spec.pop("padding", None)
        payload = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    else:  # a slow (Python) tokenizer: fall back to its vocabulary
        payload = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _cheap_identity(tokenizer) -> tuple:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    specials = {
        name: getattr(tokenizer, name, None)
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    return (
        type(tokenizer).__name__,
        len(tokenizer),
        template,
        json.dumps(specials, sort_keys=True),
        json.dumps(sorted(str(t) for t in tokenizer.all_special_tokens)),
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """A short stable hash (16 hex) of the tokenizer: its full backend spec (vocab, merges, pre-tokenizer,
    added tokens), its special tokens and its chat template. Equal tokenizers give equal strings in any
    process; loading location, padding side and truncation settings do not count."""
    cheap = _cheap_identity(tokenizer)
    key = id(tokenizer)
    hit = _FP_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer and hit[1] == cheap:
        _FP_CACHE.move_to_end(key)
        return hit[2]
    payload = json.dumps(
        {"backend": _backend_digest(tokenizer), "template": cheap[2], "specials": cheap[3], "all": cheap[4]},
        sort_keys=True,
    )
    fingerprint = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
    _FP_CACHE[key] = (tokenizer, cheap, fingerprint)
    while len(_FP_CACHE) > _FP_CACHE_SIZE:
        _FP_CACHE.popitem(last=False)
    return fingerprint


# ------------------------------------------------------------------------------------------------------
# chat template


def _render_user_turn(tokenizer, content: str, add_generation_prompt: bool) -> str:
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; doc2lora wraps documents as a user turn")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=add_generation_prompt, tokenize=False
    )
    if not isinstance(rendered, str):  # some versions return a list for batched input
        rendered = rendered[0]
    return rendered


def _encode(tokenizer, text: str, plain: bool = False) -> list[int]:
    """Token ids of ``text`` without added special tokens. ``plain``: special-token strings inside the
    text (a document that contains "<|im_end|>") are tokenised as ordinary text, not as control tokens."""
    if not text:
        return []
    kwargs = {"split_special_tokens": True} if plain else {}
    return list(tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"])


def chat_affix_texts(tokenizer, add_generation_prompt: bool = True) -> tuple[str, str]:
    """The template's text before and after a user message's content."""
    rendered = _render_user_turn(tokenizer, _SENTINEL, add_generation_prompt)
    if rendered.count(_SENTINEL) != 1:
        raise ValueError(f"chat template does not render the user content verbatim exactly once: {rendered!r}")
    prefix, suffix = rendered.split(_SENTINEL)
    return prefix, suffix


_AFFIX_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def chat_affixes(tokenizer, add_generation_prompt: bool = True) -> tuple[list[int], list[int]]:
    """Token ids before and after the document when it is wrapped as a user turn (with the generation
    prompt). Found by rendering a sentinel; the rendered template carries its own special tokens, so the
    affixes are tokenised without adding any. Cached per tokenizer object and template text (rendering costs
    more than encoding a short chunk)."""
    key = (str(tokenizer.chat_template), bool(add_generation_prompt))
    try:
        per_tok = _AFFIX_CACHE.setdefault(tokenizer, {})
    except TypeError:  # an object that takes no weak reference: no cache
        per_tok = {}
    if key not in per_tok:
        prefix, suffix = chat_affix_texts(tokenizer, add_generation_prompt)
        per_tok[key] = (_encode(tokenizer, prefix), _encode(tokenizer, suffix))
    prefix_ids, suffix_ids = per_tok[key]
    return list(prefix_ids), list(suffix_ids)


def wrap_as_user_turn(tokenizer, text: str, add_generation_prompt: bool = True) -> list[int]:
    """``prefix + tokens(text) + suffix``: the ids a chunk (or question) is fed to the model as.

    Built at the token level (not by re-rendering the template) so its length is exactly
    ``len(tokens(text)) + affix length``. Special-token strings inside ``text`` are ordinary text."""
    prefix, suffix = chat_affixes(tokenizer, add_generation_prompt)
    return prefix + _encode(tokenizer, text, plain=True) + suffix


# ------------------------------------------------------------------------------------------------------
# chunking


def make_chunk_id(doc_id: str, chunk_index: int, fingerprint: str, cfg: ChunkConfig) -> str:
    """sha256 of (doc_id, chunk_index, tokenizer fingerprint, max_tokens[, overlap_tokens if non-zero])."""
    key: list[Any] = [doc_id, int(chunk_index), fingerprint, int(cfg.max_tokens)]
    if cfg.overlap_tokens:
        key.append(int(cfg.overlap_tokens))
    return hashlib.sha256(json.dumps(key).encode("utf-8")).hexdigest()[:32]


def _even_sizes(total: int, n: int) -> list[int]:
    base, extra = divmod(total, n)
    return [base + 1 if i < extra else base for i in range(n)]


def plan_windows(n_tokens: int, budget: int, overlap: int = 0) -> list[tuple[int, int]]:
    """Equal-size token windows ``[(start, end), ...]`` covering ``[0, n_tokens)``, each at most ``budget``
    long, consecutive windows sharing ``overlap`` tokens; sizes differ by at most one."""
    if budget <= 0:
        raise ValueError("budget must be positive")
    if not 0 <= overlap < budget:
        raise ValueError(f"overlap_tokens ({overlap}) must be smaller than the chunk body budget ({budget})")
    if n_tokens <= budget:
        return [(0, n_tokens)]
    n = math.ceil((n_tokens - overlap) / (budget - overlap))
    sizes = _even_sizes(n_tokens + (n - 1) * overlap, n)
    windows, start = [], 0
    for size in sizes:
        windows.append((start, start + size))
        start = start + size - overlap
    return windows


def _snap(pos: int, clean: list[bool], lo: int, hi: int) -> int:
    """The clean position nearest ``pos`` within [lo, hi] (``pos`` clamped into the range first; the earlier
    one wins a tie); the clamped ``pos`` if the range has none. Requires lo <= hi."""
    pos = min(max(pos, lo), hi)
    if clean[pos]:
        return pos
    for d in range(1, max(pos - lo, hi - pos) + 1):
        if pos - d >= lo and clean[pos - d]:
            return pos - d
        if pos + d <= hi and clean[pos + d]:
            return pos + d
    return pos


def _cut_windows(plan: list[tuple[int, int]], clean: list[bool], overlap: int, budget: int) -> list[tuple[int, int]]:
    """Follow the planned windows, moving each edge to a clean position (a character boundary) while
    keeping every window within ``budget`` tokens and contiguous with the previous one (starting
    ``overlap`` tokens before its end, or as near as a clean position allows). Always terminates with
    windows covering ``[0, n_tokens)``; there may be a window more or fewer than planned."""
    n_tokens = plan[-1][1]
    out: list[tuple[int, int]] = []
    start = 0
    while True:
        k = len(out)
        if k:
            prev_start, prev_end = out[-1]
            start = _snap(prev_end - overlap, clean, prev_start + 1, prev_end)
        target = plan[k][1] if k < len(plan) else start + budget
        hi = min(n_tokens, start + budget)
        end = _snap(max(target, start + 1), clean, start + 1, hi)
        out.append((start, end))
        if end >= n_tokens:
            return out


def _budget_tries(budget: int, overlap: int) -> list[int]:
    """Budgets to plan with: the full one, then smaller ones (1, 2, 4, ... less) down to overlap + 1."""
    tries, step = [budget], 1
    while budget - step > overlap:
        tries.append(budget - step)
        step *= 2
    if tries[-1] != overlap + 1 and overlap + 1 < budget:
        tries.append(overlap + 1)
    return tries


def _plan_spans(doc_id: str, text: str, tokenizer, cfg: ChunkConfig, budget: int) -> list[tuple[int, int, int, int, int]]:
    """(token start, token end, char start, char end, body tokens) of each chunk: the largest budget whose
    windows, cut only where no character is split, re-encode within the budget."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    n_tokens = len(ids)
    if n_tokens == 0:
        raise ValueError(f"document {doc_id!r} has no tokens")

    # clean[t]: cutting before token t splits no character (t in 1..N-1; 0 and N are always clean)
    clean = [True] * (n_tokens + 1)
    for t in range(1, n_tokens):
        clean[t] = offsets[t][0] >= offsets[t - 1][1] and offsets[t][0] > offsets[t - 1][0]

    def char_at(t: int) -> int:
        return len(text) if t >= n_tokens else offsets[t][0]

    for b in _budget_tries(budget, cfg.overlap_tokens):
        windows = plan_windows(n_tokens, b, cfg.overlap_tokens)
        if len(windows) > 1:
            windows = _cut_windows(windows, clean, cfg.overlap_tokens, budget)
        spans = []
        ok = True
        for start, end in windows:
            char_start = 0 if start == 0 else char_at(start)
            char_end = char_at(end)
            n_body = len(_encode(tokenizer, text[char_start:char_end], plain=True))
            if end <= start or end - start > budget or n_body > budget:
                ok = False
                break
            spans.append((start, end, char_start, char_end, n_body))
        if ok:
            break
    else:
        raise ValueError(
            f"document {doc_id!r}: no split keeps every chunk within max_tokens={cfg.max_tokens} "
            f"(a body budget of {budget} tokens): some character or unsplittable piece of the text takes "
            f"more tokens than that on its own; use a larger max_tokens"
        )

    return spans


def chunk_document(
    doc_id: str,
    text: str,
    tokenizer,
    cfg: ChunkConfig | None = None,
    *,
    fingerprint: str | None = None,
) -> list[dict]:
    """Split a document into rows of the ``chunks`` table (see the module docstring).

    Raises ValueError if ``max_tokens`` does not leave room for the chat-template affixes, if the overlap
    does not fit the body budget, if the tokenizer is not a fast one (offsets are needed), or if the
    document has no tokens.
    """
    cfg = cfg or ChunkConfig()
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chunk_document needs a fast (tokenizers-backed) tokenizer for character offsets")
    prefix, suffix = chat_affixes(tokenizer)
    n_affix = len(prefix) + len(suffix)
    budget = cfg.max_tokens - n_affix
    if budget <= 0:
        raise ValueError(
            f"max_tokens={cfg.max_tokens} leaves no room for a document: the chat-template affixes of a "
            f"user turn alone take {n_affix} tokens; use max_tokens > {n_affix}"
        )
    if cfg.overlap_tokens >= budget:
        raise ValueError(
            f"overlap_tokens={cfg.overlap_tokens} must be smaller than the chunk body budget "
            f"{budget} (= max_tokens {cfg.max_tokens} - {n_affix} affix tokens)"
        )
    fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)

    spans = _plan_spans(doc_id, text, tokenizer, cfg, budget)
    n_chunks = len(spans)
    rows = []
    for i, (start, end, char_start, char_end, n_body) in enumerate(spans):
        rows.append(
            {
                "chunk_id": make_chunk_id(doc_id, i, fingerprint, cfg),
                "doc_id": doc_id,
                "chunk_index": i,
                "n_chunks": n_chunks,
                "text": text[char_start:char_end],
                "char_start": char_start,
                "char_end": char_end,
                "token_start": start,
                "token_end": end,
                "n_tokens": end - start,
                "n_prompt_tokens": n_body + n_affix,
                "tokenizer": fingerprint,
            }
        )
    return rows
