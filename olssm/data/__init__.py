"""Synthetic data for examples and tests (see :mod:`olssm.data.synthetic`)."""

from .synthetic import (
    CORPUS_WORDS,
    DEFAULT_ALPHABET,
    IGNORE_INDEX,
    MQAR_FILLER_TOKEN,
    SELECTIVE_COPYING_NOISE_TOKEN,
    CharTokenizer,
    char_corpus,
    gradient_descent_prediction,
    icl_linear_regression,
    induction_heads,
    induction_heads_trigger_token,
    least_squares_prediction,
    mqar,
    selective_copying,
    selective_copying_special_tokens,
)

__all__ = [
    "CORPUS_WORDS",
    "DEFAULT_ALPHABET",
    "IGNORE_INDEX",
    "MQAR_FILLER_TOKEN",
    "SELECTIVE_COPYING_NOISE_TOKEN",
    "CharTokenizer",
    "char_corpus",
    "gradient_descent_prediction",
    "icl_linear_regression",
    "induction_heads",
    "induction_heads_trigger_token",
    "least_squares_prediction",
    "mqar",
    "selective_copying",
    "selective_copying_special_tokens",
]
