"""Exceptions that the command line turns into one line and a non-zero exit status."""


class ExtractionError(Exception):
    """An extraction that cannot start or continue; the message states what is wrong and what to do."""


class ResumeMismatchError(ExtractionError):
    """The output directory contains an extraction made with other settings."""


class NonFiniteHiddenStateError(ExtractionError):
    """The model produced a NaN or infinite hidden state."""


class Float16OverflowError(ExtractionError):
    """A hidden state is beyond the float16 range while storing float16."""
