"""charrnn: character-level recurrent language models on numpy + numba."""

__version__ = "0.1.0"
