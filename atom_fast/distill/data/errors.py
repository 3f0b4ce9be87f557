"""The two errors of the dataset readers (re-exported by ``data`` and ``data.common``)."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says what was looked for, where, and where to get it."""


class DatasetFileError(ValueError):
    """A dataset file or folder exists but cannot be used: corrupt, undecodable, empty or inconsistent.

    The message names the file or folder and says what to do about it.
    """
