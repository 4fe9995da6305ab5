"""Constrained decoding: a generation whose tokens must follow a grammar (a
JSON schema, or a Lark grammar that may embed JSON schemas), through
llguidance (the library vLLM, SGLang and llama.cpp use for it).

A `Grammars` per loaded model holds llguidance's view of the tokenizer
(built once, on first use) and compiles a request's grammar into a
`Constraint`: before each sampled token its mask leaves only the tokens the
grammar allows (`mask`, on the step's thread), and each token the
generation takes moves it on (`consume`, in Engine._advance). When the
grammar is complete the generation stops there (FINISH_STOP).

The front asks for one to force a tool call (tool_choice "required" or a
named function: services/front/tool_calls.py writes the grammar) and for
OpenAI's `response_format` json_schema and json_object.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import structlog
import torch

from services.common.errors import InvalidArgument

log = structlog.get_logger(__name__)

#: A grammar's text, at most (a schema of a few hundred tools fits).
MAX_GRAMMAR_CHARS = 256 * 1024


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What a request asks its tokens to follow: `kind` "json_schema" (the
    text is a JSON schema) or "lark" (llguidance's Lark syntax, where
    `%json {...}` embeds a schema)."""
    kind: str
    text: str


class Constraint:
    """One generation's grammar state."""

    def __init__(self, matcher, vocab_size: int, eos: list[int]):
        import llguidance.torch as lt

        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos = eos
        self._bitmask = lt.allocate_token_bitmask(1, vocab_size)
        self.num_masks = 0
        self.mask_seconds = 0.0       # spent computing masks (bench/constraints.py)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar does not allow next to -inf
        (a row [vocab], in place). A grammar that failed (llguidance's
        limits on the work of one token: a hostile grammar) allows only the
        end of the answer."""
        import llguidance.torch as lt

        started = time.perf_counter()
        lt.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        if self._matcher.is_error():
            log.warning("constraint_failed", error=self._matcher.get_error())
            allowed = torch.zeros(self._vocab_size, dtype=torch.bool)
            allowed[[t for t in self._eos if t < self._vocab_size]] = True
        else:
            allowed = _unpack(self._bitmask[0], self._vocab_size)
        allowed = allowed.to(logits.device)
        width = min(logits.shape[-1], self._vocab_size)
        logits[:width].masked_fill_(~allowed[:width], float("-inf"))
        if logits.shape[-1] > width:
            logits[width:] = float("-inf")
        self.num_masks += 1
        self.mask_seconds += time.perf_counter() - started

    def consume(self, token: int) -> None:
        """The generation took `token`; a token the grammar refuses (it
        cannot be, after `mask`) is logged and ends the constraint's say."""
        if not self._matcher.consume_token(token):
            log.warning("constraint_refused_token", token=token,
                        error=self._matcher.get_error())

    @property
    def complete(self) -> bool:
        """The grammar is done: nothing more may follow."""
        return self._matcher.is_stopped()


def _unpack(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's bitmask (int32 words, bit i of word w: token 32w+i) as
    a bool tensor [vocab_size]."""
    bits = torch.arange(32, dtype=torch.int32)
    unpacked = (words.unsqueeze(-1) >> bits) & 1
    return unpacked.reshape(-1)[:vocab_size].bool()


class Grammars:
    """Compiles grammars for one model's tokenizer."""

    def __init__(self, hf_tokenizer, eos_token_ids: set[int] | frozenset[int], limits=None):
        self._hf_tokenizer = hf_tokenizer
        self._eos = sorted(eos_token_ids)
        #: llguidance's bounds on a grammar's size and on the work of one
        #: token (an LLParserLimits; None: its defaults).
        self._limits = limits
        self._tokenizer = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf
                # Its import scripts functions (seconds): here, not in a step.
                import llguidance.torch  # noqa: F401

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, eos_token=self._eos[0] if self._eos else None)
            return self._tokenizer

    def compile(self, spec: GrammarSpec, field: str = "sampling.grammar") -> Constraint:
        """A new constraint (seconds at most for a large schema: call it off
        the event loop); INVALID_ARGUMENT naming `field` for a grammar
        llguidance refuses."""
        import llguidance

        if len(spec.text) > MAX_GRAMMAR_CHARS:
            raise InvalidArgument(field, f"at most {MAX_GRAMMAR_CHARS} characters")
        try:
            if spec.kind == "json_schema":
                json.loads(spec.text)
                grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.text)
            elif spec.kind == "lark":
                grammar = llguidance.LLMatcher.grammar_from_lark(spec.text)
            else:
                raise InvalidArgument(field, f"unknown grammar kind {spec.kind!r}")
        except ValueError as exc:
            raise InvalidArgument(field, f"is not a valid {spec.kind}: {exc}") from None
        tokenizer = self._llg_tokenizer()
        matcher = (llguidance.LLMatcher(tokenizer, grammar) if self._limits is None
                   else llguidance.LLMatcher(tokenizer, grammar, limits=self._limits))
        error = matcher.get_error()
        if error:
            raise InvalidArgument(field, f"the grammar does not compile: {error}")
        return Constraint(matcher, tokenizer.vocab_size, self._eos)
