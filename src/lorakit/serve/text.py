"""Text from token ids as they are generated: incremental decoding, and stop strings that cut the text."""

from __future__ import annotations


class TextStream:
    """Turns token ids into text deltas; holds back text that could still become a stop string.

    Only a short window of ids is decoded per token (so a long answer costs the same per token), and
    the window starts inside the prompt: tokenizers that drop a leading space at the start of a text
    (SentencePiece) then give the first generated word its space, as the whole text would.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), context: list[int] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = list(context)
        self.prefix_offset, self.read_offset = 0, len(self.ids)  # ids[prefix:read] is decoded text already
        self.text = ""  # the generated text so far (complete characters only)
        self.emitted = 0  # characters of `text` already sent

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text to send now, whether a stop string was reached)."""
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # \ufffd: half of a multi-byte character
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._take(len(self.text)), True
        safe = len(self.text)
        for s in self.stop:  # a tail that could start a stop string waits for the next token
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return self._take(safe), False

    def flush(self) -> str:
        """The rest of the text, at the end of the row (a trailing half character included)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before):
            self.text += after[len(before):]
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out
