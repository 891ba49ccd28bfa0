"""A word-level tokenizer for the toy world, saved as an ordinary Hugging Face tokenizer folder.

Every word of `toy_world.vocabulary()` (each entity, relation and value) is exactly one token. Words are
split on whitespace and punctuation is split off ("zorb." -> "zorb", "."); text is lower-cased; anything
else maps to `<unk>`. A blank line (the separator between a document and a question in `teacher_prompt`) is
kept as its own token so the model can see where the document ends.

The chat template renders a conversation as

    <s> <|user|> {content} </s> <|assistant|> {content} </s>

(every turn, of any role, ends with the eos token `</s>`, so greedy generation of an assistant turn stops
at the end of the turn). `add_generation_prompt=True` appends `<|assistant|>`. The template adds `<s>`
itself; the tokenizer adds no special tokens of its own, so `tokenizer(apply_chat_template(...,
tokenize=False))` and `apply_chat_template(..., tokenize=True)` give the same ids.
"""

from __future__ import annotations

from pathlib import Path

from model.toy.world import ToyWorldConfig, vocabulary

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT]
BLANK_LINE = "\n\n"  # a plain (non-special) added token: the document / question separator

# Whitespace inside the template is irrelevant to a whitespace-splitting tokenizer, but it keeps the
# rendered string readable and lets it round-trip through `tokenizer(text)`.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('toy chat template: unknown role ' ~ message['role']) }}"
    "{%- endif %}"
    "{%- if message['content'] is string %}{%- set content = message['content'] %}"
    "{%- else %}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') %}{%- endif %}"
    "{{- ' <|' ~ message['role'] ~ '|> ' ~ content | trim ~ ' ' ~ eos_token }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- ' <|assistant|>' }}{%- endif %}"
)


def build_toy_tokenizer(out_dir: Path | str | None, cfg: ToyWorldConfig | None = None):
    """Build the toy tokenizer; save it to `out_dir` (when given) with `save_pretrained`; return it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    cfg = cfg or ToyWorldConfig()
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + [BLANK_LINE] + vocabulary(cfg):
        vocab.setdefault(tok, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            # "zorb." -> "zorb" "." (special tokens such as "<|user|>" are matched before this step)
            pre_tokenizers.Split(Regex(r"[^\w\s]"), behavior="isolated"),
        ]
    )
    # decoding joins the words with single spaces (WordPiece's decoder; no word carries its "##" prefix)
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=4096,
        padding_side="left",  # batched greedy generation of a decoder-only model
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens([AddedToken(BLANK_LINE, normalized=False, special=False)])
    fast.chat_template = CHAT_TEMPLATE
    if len(fast) != len(vocab):
        raise AssertionError(f"toy tokenizer: {len(fast)} tokens, expected {len(vocab)}")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast
