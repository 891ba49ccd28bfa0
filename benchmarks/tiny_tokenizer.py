"""A small byte-level BPE tokenizer trained on given texts, saved as an ordinary Hugging Face tokenizer.

Used by tests and benchmarks that need a real tokenizer without a model (the toy model has its own
word-level tokenizer, model/toy/tokenizer.py). Byte-level, so any
text encodes (no unknown token); special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` and role markers
``<|system|>``, ``<|user|>``, ``<|assistant|>``; a chat template::

    <|bos|><|user|>{content}<|eos|><|assistant|>{content}<|eos|>...   (+ <|assistant|> as generation prompt)

The end of a turn is the eos token, so a model stops generating at the end of its answer.
Training is deterministic: the same texts give the same tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)  # ids 0..5, in this order

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2):
    """A trained `tokenizers.Tokenizer` (byte-level BPE) with the special tokens above at ids 0..5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(SPECIAL_TOKENS)} (bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def wrap_fast(tok, model_max_length: int = 2048):
    """Wrap a `tokenizers.Tokenizer` as a transformers fast tokenizer with our specials and chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        padding_side="right",
    )
    fast.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_bpe_tokenizer(
    texts: list[str],
    out_dir: Path,
    vocab_size: int = 512,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> Path:
    """Train a byte-level BPE on ``texts`` and ``save_pretrained`` it (with chat template) into ``out_dir``.

    Returns ``out_dir``; load it with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    if not texts:
        raise ValueError("build_bpe_tokenizer needs at least one text")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = wrap_fast(train_bpe(texts, vocab_size=vocab_size, min_frequency=min_frequency), model_max_length)
    fast.save_pretrained(str(out_dir))
    return out_dir
