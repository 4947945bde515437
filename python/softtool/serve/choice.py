"""One choice of a completion as its row's tokens arrive: its text (detokenized, cut at a stop string, after the
echoed prompt) and, with `logprobs`, each token's entry in OpenAI's legacy shape.

Text: `tokenizer.decode(tokens, skip_special_tokens=True)` of the row's tokens, exactly what `softtool generate
--raw` decodes. A stream gets the growth of that text (`release`), holding back an incomplete character and,
with `stop`, the tail that could still become a stop string, so the chunks add up to the whole text.

Log-probs: per token its own text (`decode([id])`, special tokens by name), its log-prob, its best candidates
{text: log-prob} (two ids of one text keep the better) and where it starts in the choice's text (`text_offset`).
An echoed prompt's tokens come first, the first without a log-prob (OpenAI's convention). After a stop string only
the tokens that start before it are listed. A stream sends each token's entry with the text its start is in, so
the chunks' entries add up to the whole list.
"""

from __future__ import annotations

from softtool.runtime.logprobs import TokenLogprob
from softtool.serve.engine import Finished
from softtool.serve.protocol import CompletionLogprobs


class Choice:
    """One row's text as it grows: detokenized, cut at a stop string; with echo, after its prompt's text; with
    logprobs, each token's entry."""

    def __init__(self, tokenizer, stops: list[str], echo: list[int] | None = None, logprobs: int | None = None):
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # chars that may start a stop string
        self.tokens: list[int] = []
        self.text = ""  # the text so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` already released
        self.finish_reason: str | None = None
        self._checked = 0  # `text` before this index holds no stop string
        self.cut = False  # a stop string ended the text
        self.echo_ids = echo  # the prompt's tokens, when echoed
        self.echo = tokenizer.decode(echo, skip_special_tokens=False) if echo is not None else ""
        self._echo_sent = False
        self.want = logprobs  # None: no logprobs
        self.scores: list[TokenLogprob] = []  # per generated token
        self.offsets: list[int] = []  # per generated token: the characters of the completion before it
        self.prompt_scores: list[TokenLogprob | None] | None = None  # per echoed token (engine's Prompt event)
        self._taken = 0  # generated tokens whose entries a stream has sent
        self._prompt_taken = False

    def add(self, tokens: list[int], scores: list[TokenLogprob]) -> None:
        if self.want is not None:
            decode = self.tokenizer.decode
            self.offsets += [
                len(decode(self.tokens + tokens[:i], skip_special_tokens=True)) for i in range(len(tokens))
            ]
            self.scores += scores
        self.tokens += tokens
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stops:
            start = max(0, self._checked - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish_reason = "stop"
                self.cut = True
            self._checked = len(self.text)

    def finish(self, event: Finished, emitted: int) -> None:
        if self.finish_reason is None:
            # The engine emits the EOS token but leaves it out of the hypothesis.
            hyp = event.hypothesis
            self.finish_reason = "stop" if hyp is not None and emitted > len(hyp.tokens) else "length"

    def release(self) -> str:
        """The text not yet sent that can be sent now (the echoed prompt first)."""
        head = ""
        if not self._echo_sent:
            self._echo_sent, head = True, self.echo
        end = len(self.text)
        if self.finish_reason is None:
            end -= self.hold
            while end > self.sent and self.text[end - 1] == "\ufffd":  # a character still split between tokens
                end -= 1
        if end <= self.sent:
            return head
        delta = self.text[self.sent : end]
        self.sent = end
        return head + delta

    # -- logprobs -------------------------------------------------------------------------------------
    def _kept(self, limit: int) -> int:
        """Generated tokens, in order, that start before character `limit` of the completion."""
        count = 0
        while count < len(self.offsets) and self.offsets[count] < limit:
            count += 1
        return count

    def _ended(self) -> int:
        """The generated tokens a finished choice reports: all, or after a stop string those that start before it."""
        return self._kept(len(self.text)) if self.cut else len(self.scores)

    def logprobs(self) -> CompletionLogprobs | None:
        """Every entry (the non-streamed answer)."""
        if self.want is None:
            return None
        return self._entries(self.echo_ids is not None, 0, self._ended())

    def take_logprobs(self) -> CompletionLogprobs | None:
        """The entries a stream can send now: those of the tokens whose text starts in what was released (all
        once the choice ended), the echoed prompt's with the first chunk."""
        if self.want is None:
            return None
        prompt = self.echo_ids is not None and not self._prompt_taken
        self._prompt_taken = True
        end = self._ended() if self.finish_reason is not None else self._kept(self.sent)
        start, self._taken = self._taken, max(self._taken, end)
        return self._entries(prompt, start, end)

    def _entries(self, prompt: bool, start: int, end: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        decode = self.tokenizer.decode
        if prompt:
            ids = self.echo_ids
            scores = self.prompt_scores or [None] * len(ids)
            for i, (token, score) in enumerate(zip(ids, scores, strict=True)):
                score = None if i == 0 else score  # OpenAI's convention: the first prompt token has no log-prob
                self._entry(out, token, score, len(decode(ids[:i], skip_special_tokens=False)))
        for i in range(start, end):
            self._entry(out, self.tokens[i], self.scores[i], len(self.echo) + self.offsets[i])
        return out

    def _entry(self, out: CompletionLogprobs, token: int, score: TokenLogprob | None, offset: int) -> None:
        decode = self.tokenizer.decode
        out.tokens.append(decode([token], skip_special_tokens=False))
        out.token_logprobs.append(score.logprob if score is not None else None)
        top = None
        if score is not None:
            top = {}
            for candidate, value in score.top[: self.want]:
                top.setdefault(decode([candidate], skip_special_tokens=False), value)  # two ids, one text: the best
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
