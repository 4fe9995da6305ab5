"""common_prefix, streaming detokenization and chat rendering, with the real
smollm2 tokenizer (byte-level BPE: emoji and CJK characters span tokens)."""

from __future__ import annotations

import pytest

from services.worker.prompts import chat_tokens
from services.worker.tokens import Detokenizer, common_prefix


@pytest.mark.parametrize("a, b, expected", [
    ([], [], 0), ([1, 2], [], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2),
    ([1, 2], [1, 2, 3, 4], 2), ([5, 2, 3], [1, 2, 3], 0), ([1, 2, 9, 4], [1, 2, 3, 4], 2),
])
def test_common_prefix(a, b, expected):
    assert common_prefix(a, b) == expected, f"common prefix of {a} and {b} should be {expected}"


TEXTS = [
    "Hello, world! This is plain ASCII text.",
    "Emoji: 👋🏽 🦄🦄 and 👨‍👩‍👧 (a family: several code points joined).",
    "中文字符：你好世界。日本語のテキスト、한국어 텍스트.",
    "Mixed ünïcödé ≠ ∑ √ — “quotes” … done",
    "  leading spaces, a tab\tand\nnew lines\n\n  ",
    "a , b . c 's don't",
]


def stream(tokenizer, ids: list[int], eos: frozenset[int] = frozenset(),
           fallback: bool = False) -> list[str]:
    detok = Detokenizer(tokenizer, eos)
    if fallback:
        detok._stream = None     # transformers' decode, as without a fast tokenizer
    return [detok.push(token) for token in ids]


@pytest.mark.parametrize("fallback", [False, True], ids=["decode-stream", "decode-calls"])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_concatenate_to_the_decoded_text(tokenizer, text, fallback):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = stream(tokenizer, ids, fallback=fallback)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == expected, f"streamed {pieces!r} does not join to {expected!r}"
    assert not any("\ufffd" in piece for piece in pieces), (
        f"a piece holds a broken character (U+FFFD): {pieces!r}")


@pytest.mark.parametrize("fallback", [False, True], ids=["decode-stream", "decode-calls"])
@pytest.mark.parametrize("text", ["👋🏽🦄", "你好世界", "日本語"])
def test_multibyte_characters_wait_for_all_their_tokens(tokenizer, text, fallback):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text), f"{text!r} should take more tokens than characters: {ids}"
    pieces = stream(tokenizer, ids, fallback=fallback)
    assert "" in pieces, f"some token of {text!r} should give no text yet: {pieces!r}"
    assert "".join(pieces) == text, f"streamed {pieces!r} should join to {text!r}"


def test_eos_gives_no_text_and_does_not_disturb_the_stream(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer("abc 你好", add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer, frozenset({eos}))
    pieces = [detok.push(ids[0]), detok.push(eos), *(detok.push(t) for t in ids[1:]),
              detok.push(eos)]
    assert pieces[1] == "" and pieces[-1] == "", f"EOS should give no text: {pieces!r}"
    assert "".join(pieces) == "abc 你好", f"EOS disturbed the stream: {pieces!r}"
    assert eos not in detok.ids, "EOS should not be kept among the decoded ids"


@pytest.mark.parametrize("fallback", [False, True], ids=["decode-stream", "decode-calls"])
def test_other_special_tokens_give_no_text(tokenizer, fallback):
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids = tokenizer("hi", add_special_tokens=False)["input_ids"]
    pieces = stream(tokenizer, [special, *ids, special], fallback=fallback)
    assert "".join(pieces) == "hi", f"special tokens should be skipped: {pieces!r}"


def test_chat_tokens_render_with_the_models_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}]
    ids = chat_tokens(tokenizer, messages, tokenizer.chat_template)
    text = tokenizer.decode(ids)
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == expected, f"rendered {text!r}, the template gives {expected!r}"
    assert text.endswith("<|im_start|>assistant\n"), f"no generation prompt at the end: {text!r}"


def test_chat_tokens_use_the_given_template(tokenizer):
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    ids = chat_tokens(tokenizer, [{"role": "user", "content": "2+2?"}], template)
    assert tokenizer.decode(ids) == "[user] 2+2?\n[assistant]", (
        f"custom template rendered as {tokenizer.decode(ids)!r}")


def test_a_longer_conversation_extends_the_rendering(tokenizer):
    """What the engine relies on to reuse a session's context: the next turn's
    rendering starts with (nearly all of) the previous one."""
    first = [{"role": "user", "content": "Name a colour."}]
    before = chat_tokens(tokenizer, first, tokenizer.chat_template)
    after = chat_tokens(tokenizer, [*first, {"role": "assistant", "content": "Blue."},
                                    {"role": "user", "content": "Another?"}],
                        tokenizer.chat_template)
    assert common_prefix(before, after) >= len(before) - 3, (
        "the next turn's rendering should share the previous rendering's prefix")
