"""How core code reports while it works. The CLI supplies a real one; core never prints."""

from __future__ import annotations


class Reporter:
    """Default: says nothing. Subclasses render to a terminal, a log file or nowhere."""

    def info(self, message: str) -> None:
        pass

    def start(self, label: str, total: int) -> None:
        """A transfer of `total` bytes begins."""

    def advance(self, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


QUIET = Reporter()
