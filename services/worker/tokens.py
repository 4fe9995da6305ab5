"""Tokens for sessions: common prefixes and streaming detokenization (chat
rendering is in prompts.py)."""

from __future__ import annotations


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


#: How many times shorter a normalizer may make text before tokens cover it
#: (NFC composes a decomposed Hangul syllable's three characters into one).
NORMALIZER_SHRINK = 4


def window_chars(tokenizer, max_context: int) -> int:
    """Characters past which a text cannot fit a window of max_context
    tokens, whatever it holds: no token covers more characters than its
    vocabulary string has (a byte-level token's string has a character per
    byte, a byte-fallback token's more), and a normalizer shrinks text at
    most NORMALIZER_SHRINK times. Lets a worker refuse a hopeless prompt
    without tokenizing it: tokenizing a million characters costs a second and
    leaves hundreds of MB in the allocator's arenas."""
    longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
    longest = max([longest, *(len(str(t)) for t in getattr(tokenizer, "all_special_tokens", ()))])
    return max_context * longest * NORMALIZER_SHRINK


class Detokenizer:
    """Incremental decoding that never splits a character: text is released
    only once the bytes decoded so far form whole characters (the method of
    text-generation-inference's decode_token). End-of-sequence tokens give no
    text.

    With a fast tokenizer it is the tokenizers library's own incremental
    decoder (`DecodeStream`, in Rust): about 0.6 us a token against 5.4 us
    for two `decode` calls through transformers on a CPU core, paid for
    every row of every decode step (64 rows: a third of a millisecond a
    step, several times that on a slow host). Without one (a slow
    tokenizer, an older tokenizers), the two `decode` calls."""

    def __init__(self, tokenizer, eos_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.eos = eos_token_ids
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if self._backend is not None:
            try:
                from tokenizers.decoders import DecodeStream

                self._stream = DecodeStream(skip_special_tokens=True)
            except ImportError:
                self._stream = None

    def push(self, token: int) -> str:
        if token in self.eos:
            return ""
        self.ids.append(token)
        if self._stream is not None:
            return self._stream.step(self._backend, token) or ""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return text[len(prefix):]
        return ""
