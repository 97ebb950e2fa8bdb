class NewstuneError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it."""


class Interrupted(NewstuneError):
    """Training stopped on SIGINT/SIGTERM after saving a resumable checkpoint; the message says how to resume."""
