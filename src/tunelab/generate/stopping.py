"""Stop strings for streamed text: emit text as soon as it cannot be the start of a stop string."""

from __future__ import annotations


class StopStringFilter:
    """Feed text pieces; get back what is safe to show, and whether a stop string was reached.

    Text that might be the beginning of a stop string is held back until it is clearly not, so a
    stream never shows part of a stop string.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = 0
        for stop in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
