"""Extraction of per-token hidden states labelled with the number of tokens left to generate."""

from .config import ExtractionConfig
from .errors import ExtractionError

__all__ = ["ExtractionConfig", "ExtractionError", "run_extraction"]


def run_extraction(*args, **kwargs):
    """Run one extraction; see `generation.extract.run_extraction`."""
    from .extract import run_extraction as run

    return run(*args, **kwargs)
