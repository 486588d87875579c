"""One exception family, so the CLI can print a clean message instead of a stack trace."""


class LongsideError(Exception):
    """Base of every error longside raises on bad input. Its message says what to do."""


class BackboneError(LongsideError):
    """A backbone could not be found, read or wrapped."""


class MemoryBankError(LongsideError):
    """A memory bank is corrupt, foreign to this model, or misused."""


class DataError(LongsideError):
    """A corpus is missing, unreadable or empty."""


class CheckpointError(LongsideError):
    """A side-network checkpoint is missing, corrupt or made for another backbone."""


class SessionError(LongsideError):
    """A saved chat session is corrupt, from another version, or for another model."""
