"""Generated token ids -> text deltas that are safe to send: whole characters, no stop string."""

from __future__ import annotations

__all__ = ["TextStream"]


class TextStream:
    """Turns generated token ids into text deltas that are safe to send.

    Held back: a trailing partial UTF-8 character, and any tail that could still grow into a stop
    string. When a stop string appears, the text before it is final and the rest is dropped.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text to send now, whether a stop string ended the row)."""
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        stop_at = self._stop_index()
        if stop_at is not None:
            self.text = self.text[:stop_at]
            return self._send(len(self.text)), True
        safe = len(self.text.rstrip("\ufffd"))
        for stop in self.stop:
            for length in range(min(len(stop) - 1, safe), 0, -1):
                if self.text[:safe].endswith(stop[:length]):
                    safe -= length
                    break
        return self._send(max(safe, self.sent)), False

    def flush(self) -> str:
        return self._send(len(self.text))

    def _stop_index(self) -> int | None:
        indexes = [i for i in (self.text.find(stop, max(0, self.sent - len(stop))) for stop in self.stop) if i >= 0]
        return min(indexes) if indexes else None

    def _send(self, end: int) -> str:
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
