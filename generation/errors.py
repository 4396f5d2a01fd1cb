"""Exceptions that the command line turns into one line and a non-zero exit status."""


class ExtractionError(Exception):
    """An extraction that cannot start or go on; the message says what is wrong and what to do."""


class ResumeMismatchError(ExtractionError):
    """The output directory holds an extraction made with other settings."""


class NonFiniteHiddenStateError(ExtractionError):
    """The model produced a NaN or infinite hidden state."""


class Float16OverflowError(ExtractionError):
    """A hidden state is beyond the float16 range while storing float16."""
