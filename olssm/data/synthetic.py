"""Small, deterministic, seedable synthetic tasks (pure torch, CPU).

Every token task returns a pair ``(inputs, targets)`` of ``int64`` tensors of
shape ``[N, T]``.  ``targets`` holds :data:`IGNORE_INDEX` (``-100``) at every
position that is not scored, so the pair plugs directly into::

    logits = model(inputs)                                  # [N, T, V]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                           ignore_index=-100)

The target at position ``p`` is always what the model must output *at* ``p``
(having seen ``inputs[:, :p + 1]``), i.e. the tensors are already aligned for
a causal model -- no further shifting is needed.

Randomness: every generator takes ``seed`` which is either an ``int`` (a fresh
``torch.Generator`` seeded with it is used, so equal seeds give identical
outputs) or a ``torch.Generator`` (consumed in place, handy for drawing many
distinct batches from one stream).  The keyword-only ``generator=`` argument,
when given, takes precedence over ``seed``.

Tasks
-----
* :func:`mqar` -- multi-query associative recall (Zoology, Arora et al. 2023).
* :func:`selective_copying` -- selective copying (Mamba, Gu & Dao 2023, §4.1).
* :func:`induction_heads` -- induction heads (Mamba §4.1, Olsson et al. 2022).
* :func:`icl_linear_regression` -- in-context linear regression (Garg et al.
  2022), with the baselines :func:`least_squares_prediction` and
  :func:`gradient_descent_prediction`.
* :func:`char_corpus` and :class:`CharTokenizer` -- a tiny, locally generated
  English-like character-level corpus.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "MQAR_FILLER_TOKEN",
    "SELECTIVE_COPYING_NOISE_TOKEN",
    "selective_copying_special_tokens",
    "induction_heads_trigger_token",
    "mqar",
    "selective_copying",
    "induction_heads",
    "icl_linear_regression",
    "least_squares_prediction",
    "gradient_descent_prediction",
    "char_corpus",
    "CharTokenizer",
    "DEFAULT_ALPHABET",
    "CORPUS_WORDS",
]

#: Value of ``targets`` at positions that are not scored (PyTorch's default
#: ``ignore_index`` of :func:`torch.nn.functional.cross_entropy`).
IGNORE_INDEX = -100

#: Token id that fills the unused positions of an MQAR sequence.
MQAR_FILLER_TOKEN = 0

#: Token id of the noise tokens of a selective-copying sequence.
SELECTIVE_COPYING_NOISE_TOKEN = 0


# --------------------------------------------------------------------------- #
# argument helpers
# --------------------------------------------------------------------------- #
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(name: str, value, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _make_generator(seed, generator) -> torch.Generator:
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        return generator
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int or a torch.Generator, got {seed!r}")
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def _random_subset(n_rows: int, population: int, k: int, g: torch.Generator) -> torch.Tensor:
    """``[n_rows, k]`` int64: per row, ``k`` distinct values of ``range(population)``
    in uniformly random order."""
    u = torch.rand(n_rows, population, generator=g)
    # The indices of the k smallest uniforms, ordered by value, are a uniformly
    # random ordered k-subset (same result as argsort(u)[:, :k], but cheaper).
    return u.topk(k, dim=1, largest=False, sorted=True).indices


# --------------------------------------------------------------------------- #
# multi-query associative recall
# --------------------------------------------------------------------------- #
def mqar(
    num_examples: int,
    seq_len: int,
    vocab_size: int,
    num_pairs: int,
    seed: int | torch.Generator = 0,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall (MQAR; Zoology, Arora et al. 2023).

    Token ids:

    * ``0`` (:data:`MQAR_FILLER_TOKEN`) -- filler;
    * keys -- ids in ``[1, vocab_size // 2)``;
    * values -- ids in ``[vocab_size // 2, vocab_size)``.

    Layout of each row (``n = num_pairs``, length exactly ``seq_len``)::

        positions 0 .. 2n-1      k_1 v_1 k_2 v_2 ... k_n v_n   (the "context")
        positions 2n .. seq_len-1  query region: filler 0 everywhere, except that
                                 every key k_1..k_n re-appears exactly once, in a
                                 random order, at a random position 2n + 2*j
                                 (j a distinct random slot in
                                 [0, (seq_len - 2n) // 2))

    Within a row the keys are distinct and the values are distinct (both are
    sampled without replacement).  Only the query positions are scored: the
    target at the position of a re-appearing key ``k_i`` is its value ``v_i``;
    every other target is ``-100``.  Query keys sit at even offsets of the
    query region (as in Zoology), which is why ``seq_len >= 4 * num_pairs``.

    Constraints (``ValueError`` otherwise): ``num_examples >= 1``,
    ``num_pairs >= 1``, ``seq_len >= 4 * num_pairs``,
    ``vocab_size >= 2 * num_pairs + 2`` (so that ``vocab_size // 2 - 1 >=
    num_pairs`` distinct keys exist).

    Returns ``(inputs, targets)``, both ``int64`` of shape ``[num_examples, seq_len]``.
    """
    N = _check_int("num_examples", num_examples, 1)
    n = _check_int("num_pairs", num_pairs, 1)
    T = _check_int("seq_len", seq_len, 1)
    V = _check_int("vocab_size", vocab_size, 1)
    if T < 4 * n:
        raise ValueError(
            f"seq_len must be >= 4 * num_pairs = {4 * n} (context of 2*num_pairs tokens "
            f"plus a query region with num_pairs even slots), got seq_len={T}"
        )
    if V < 2 * n + 2:
        raise ValueError(
            f"vocab_size must be >= 2 * num_pairs + 2 = {2 * n + 2} so that "
            f"vocab_size // 2 - 1 >= num_pairs distinct keys exist, got vocab_size={V}"
        )
    g = _make_generator(seed, generator)

    half = V // 2
    keys = _random_subset(N, half - 1, n, g) + 1  # ids in [1, half)
    values = _random_subset(N, V - half, n, g) + half  # ids in [half, V)
    num_slots = (T - 2 * n) // 2
    query_pos = 2 * n + 2 * _random_subset(N, num_slots, n, g)  # [N, n]

    inputs = torch.full((N, T), MQAR_FILLER_TOKEN, dtype=torch.long)
    inputs[:, 0 : 2 * n : 2] = keys
    inputs[:, 1 : 2 * n : 2] = values
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full((N, T), IGNORE_INDEX, dtype=torch.long)
    targets.scatter_(1, query_pos, values)
    return inputs, targets


# --------------------------------------------------------------------------- #
# selective copying
# --------------------------------------------------------------------------- #
def selective_copying_special_tokens(vocab_size: int) -> dict[str, int]:
    """Special ids of :func:`selective_copying` for a given ``vocab_size``:
    ``{"noise": 0, "separator": vocab_size - 2, "blank": vocab_size - 1}``."""
    V = _check_int("vocab_size", vocab_size, 4)
    return {"noise": SELECTIVE_COPYING_NOISE_TOKEN, "separator": V - 2, "blank": V - 1}


def selective_copying(
    num_examples: int,
    seq_len: int,
    num_tokens_to_copy: int,
    vocab_size: int,
    seed: int | torch.Generator = 0,
    *,
    teacher_forcing: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective copying (Mamba, Gu & Dao 2023, §4.1 / App. E.1).

    Special token ids (see :func:`selective_copying_special_tokens`):

    * ``0`` -- noise;
    * ``vocab_size - 2`` -- separator (the "now copy" marker);
    * ``vocab_size - 1`` -- blank (input placeholder in the copy region when
      ``teacher_forcing=False``);
    * data tokens -- ids in ``[1, vocab_size - 3]`` (drawn uniformly, with
      replacement).

    Layout of each row (``L = seq_len``, ``k = num_tokens_to_copy``); the total
    length is ``L + 1 + k``::

        positions 0 .. L-1       noise (0) with the k data tokens d_0..d_{k-1}
                                 at k distinct random positions (in this order)
        position  L              separator
        positions L+1 .. L+k     d_0 .. d_{k-1}  (teacher_forcing=True), or
                                 blank x k       (teacher_forcing=False)

    Targets follow next-token alignment: the target at position ``p`` is the
    token to emit next, so ``targets[:, L + j] = d_j`` for ``j = 0..k-1``
    (the separator predicts ``d_0``, the input ``d_j`` predicts ``d_{j+1}``);
    all other positions, including the final one, are ``-100``.  Exactly
    ``k`` positions are scored.

    Constraints (``ValueError`` otherwise): ``num_examples >= 1``,
    ``num_tokens_to_copy >= 1``, ``seq_len >= num_tokens_to_copy``,
    ``vocab_size >= 4``.

    Returns ``(inputs, targets)``, ``int64`` of shape
    ``[num_examples, seq_len + 1 + num_tokens_to_copy]``.
    """
    N = _check_int("num_examples", num_examples, 1)
    k = _check_int("num_tokens_to_copy", num_tokens_to_copy, 1)
    L = _check_int("seq_len", seq_len, 1)
    V = _check_int("vocab_size", vocab_size, 4)
    if L < k:
        raise ValueError(
            f"seq_len must be >= num_tokens_to_copy = {k} (the data tokens occupy "
            f"distinct positions of the prefix), got seq_len={L}"
        )
    g = _make_generator(seed, generator)
    sep, blank = V - 2, V - 1

    data = torch.randint(1, V - 2, (N, k), generator=g, dtype=torch.long)  # [1, V-3]
    pos = _random_subset(N, L, k, g).sort(dim=1).values

    total = L + 1 + k
    inputs = torch.full((N, total), SELECTIVE_COPYING_NOISE_TOKEN, dtype=torch.long)
    inputs.scatter_(1, pos, data)
    inputs[:, L] = sep
    inputs[:, L + 1 :] = data if teacher_forcing else blank
    targets = torch.full((N, total), IGNORE_INDEX, dtype=torch.long)
    targets[:, L : L + k] = data
    return inputs, targets


# --------------------------------------------------------------------------- #
# induction heads
# --------------------------------------------------------------------------- #
def induction_heads_trigger_token(vocab_size: int) -> int:
    """Trigger id of :func:`induction_heads`: ``vocab_size - 1``."""
    return _check_int("vocab_size", vocab_size, 3) - 1


def induction_heads(
    num_examples: int,
    seq_len: int,
    vocab_size: int,
    seed: int | torch.Generator = 0,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Induction heads (Mamba, Gu & Dao 2023, §4.1; Olsson et al. 2022).

    Token ids: ordinary tokens are ``[0, vocab_size - 2]`` (uniform, i.i.d.);
    the trigger is ``vocab_size - 1`` (see :func:`induction_heads_trigger_token`).

    Layout of each row (length exactly ``seq_len = T``)::

        random ordinary tokens, except
        position i      trigger, with i uniform in [0, T // 2 - 1] (first half)
        position i+1    X, an ordinary token (the one to recall)
        position T-1    trigger

    The trigger appears exactly twice (at ``i`` and at ``T - 1``).  Only the
    last position is scored: ``targets[:, T-1] = X``; all others are ``-100``.

    Constraints (``ValueError`` otherwise): ``num_examples >= 1``,
    ``seq_len >= 3``, ``vocab_size >= 3``.

    Returns ``(inputs, targets)``, ``int64`` of shape ``[num_examples, seq_len]``.
    """
    N = _check_int("num_examples", num_examples, 1)
    T = _check_int("seq_len", seq_len, 3)
    V = _check_int("vocab_size", vocab_size, 3)
    g = _make_generator(seed, generator)
    trigger = V - 1

    inputs = torch.randint(0, V - 1, (N, T), generator=g, dtype=torch.long)
    trig_pos = torch.randint(0, T // 2, (N,), generator=g, dtype=torch.long)
    rows = torch.arange(N)
    inputs[rows, trig_pos] = trigger
    inputs[:, -1] = trigger
    targets = torch.full((N, T), IGNORE_INDEX, dtype=torch.long)
    targets[:, -1] = inputs[rows, trig_pos + 1]  # i + 1 <= T // 2 < T - 1
    return inputs, targets


# --------------------------------------------------------------------------- #
# in-context linear regression
# --------------------------------------------------------------------------- #
def icl_linear_regression(
    num_examples: int,
    num_context: int,
    dim: int,
    noise_std: float = 0.0,
    seed: int | torch.Generator = 0,
    *,
    dtype: torch.dtype = torch.float32,
    return_weights: bool = False,
    generator: torch.Generator | None = None,
):
    """In-context linear regression (Garg et al. 2022; von Oswald et al. 2023;
    Sushma et al. 2024, "State-space models can learn in-context by gradient
    descent").

    For each example ``n`` independently: ``w_n ~ N(0, I / dim)``,
    ``x_{n,t} ~ N(0, I)`` for ``t = 0..num_context`` and
    ``y_{n,t} = x_{n,t} . w_n + noise_std * eps_{n,t}`` with ``eps ~ N(0, 1)``.
    The first ``num_context`` points are the context, the last one is the query
    (its ``y`` is the target).  Noise is drawn after ``xs`` and ``w``, so the
    same seed gives the same ``xs``/``w`` for every ``noise_std``.

    Returns ``(xs, ys)`` with ``xs`` of shape ``[N, num_context + 1, dim]`` and
    ``ys`` of shape ``[N, num_context + 1]`` (``dtype``, default float32); with
    ``return_weights=True`` returns ``(xs, ys, ws)``, ``ws`` of shape ``[N, dim]``.

    Constraints (``ValueError`` otherwise): ``num_examples >= 1``,
    ``num_context >= 1``, ``dim >= 1``, ``noise_std >= 0``.
    """
    N = _check_int("num_examples", num_examples, 1)
    C = _check_int("num_context", num_context, 1)
    d = _check_int("dim", dim, 1)
    noise_std = _check_float("noise_std", noise_std, 0.0)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    g = _make_generator(seed, generator)

    xs = torch.randn(N, C + 1, d, generator=g, dtype=dtype)
    ws = torch.randn(N, d, generator=g, dtype=dtype) / math.sqrt(d)
    ys = torch.einsum("ntd,nd->nt", xs, ws)
    if noise_std > 0:
        ys = ys + noise_std * torch.randn(N, C + 1, generator=g, dtype=dtype)
    if return_weights:
        return xs, ys, ws
    return xs, ys


def _check_regression_batch(xs: torch.Tensor, ys: torch.Tensor) -> None:
    if not isinstance(xs, torch.Tensor) or xs.dim() != 3:
        raise ValueError(f"xs must be a tensor of shape [N, T, dim], got {getattr(xs, 'shape', xs)!r}")
    if not isinstance(ys, torch.Tensor) or ys.shape != xs.shape[:2]:
        raise ValueError(
            f"ys must be a tensor of shape [N, T] = {tuple(xs.shape[:2])}, "
            f"got {tuple(getattr(ys, 'shape', ()))}"
        )
    if xs.shape[1] < 2:
        raise ValueError(f"xs must have T >= 2 points (context + query), got T={xs.shape[1]}")


def least_squares_prediction(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Min-norm least-squares baseline (no ridge).

    With context ``X = xs[:, :-1]`` (``[N, C, d]``), ``y = ys[:, :-1]`` and query
    ``x_q = xs[:, -1]``: ``w_hat = pinv(X) @ y`` (the minimum-norm minimiser of
    ``||X w - y||^2``; the exact solution when ``C >= d``, noise-free and ``X``
    has full column rank) and the prediction is ``x_q . w_hat``.  Computed in
    float64, returned in ``xs.dtype``.  ``ys[:, -1]`` is ignored.

    Returns a tensor of shape ``[N]``.
    """
    _check_regression_batch(xs, ys)
    X = xs[:, :-1].double()
    y = ys[:, :-1].double()
    w_hat = (torch.linalg.pinv(X) @ y.unsqueeze(-1)).squeeze(-1)  # [N, d]
    pred = (xs[:, -1].double() * w_hat).sum(-1)
    return pred.to(xs.dtype)


def gradient_descent_prediction(xs: torch.Tensor, ys: torch.Tensor, lr: float) -> torch.Tensor:
    """One step of gradient descent from ``w = 0`` (von Oswald et al. 2023).

    The loss is the context's mean squared error
    ``L(w) = 1 / (2C) * sum_{i<C} (w . x_i - y_i)^2`` with ``C = T - 1``, so
    ``grad L(0) = -(1/C) sum_i y_i x_i`` and one step gives
    ``w_1 = (lr / C) * sum_i y_i x_i``.  The prediction is
    ``x_q . w_1 = (lr / C) * sum_i y_i (x_i . x_q)``.  ``ys[:, -1]`` is ignored.

    Returns a tensor of shape ``[N]`` (in ``xs.dtype``).
    """
    _check_regression_batch(xs, ys)
    lr = _check_float("lr", lr)
    C = xs.shape[1] - 1
    w1 = (lr / C) * torch.einsum("nt,ntd->nd", ys[:, :-1].to(xs.dtype), xs[:, :-1])
    return (xs[:, -1] * w1).sum(-1)


# --------------------------------------------------------------------------- #
# character corpus
# --------------------------------------------------------------------------- #
#: Fixed alphabet of :class:`CharTokenizer` (id = index in this string).
DEFAULT_ALPHABET = (
    "\n !'(),-.:;?"
    "0123456789"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "abcdefghijklmnopqrstuvwxyz"
)

_DETERMINERS = ("the", "a", "every", "one", "that", "this", "some", "no")
_ADJECTIVES = (
    "small", "large", "quick", "slow", "old", "young", "quiet", "loud", "happy",
    "tired", "bright", "dark", "green", "red", "blue", "clever", "gentle",
    "brave", "strange", "little",
)
_NOUNS = (
    "cat", "dog", "bird", "fox", "child", "teacher", "farmer", "river", "tree",
    "house", "garden", "city", "ship", "king", "queen", "baker", "horse",
    "student", "friend", "stone", "letter", "window", "road", "mountain",
)
_TRANSITIVE = (
    "sees", "likes", "finds", "follows", "watches", "carries", "helps", "paints",
    "remembers", "visits", "calls", "builds", "opens", "chases", "reads",
)
_INTRANSITIVE = (
    "sleeps", "runs", "sings", "waits", "laughs", "walks", "falls", "shines",
    "listens", "dreams", "rests", "wanders",
)
_ADVERBS = ("quickly", "slowly", "quietly", "today", "again", "often", "always", "soon")
_PREPOSITIONS = ("near", "under", "behind", "beside", "over", "across", "inside", "past")
_CONJUNCTIONS = ("and", "but", "so", "while", "because")

#: Every word :func:`char_corpus` can emit (lower case).
CORPUS_WORDS = frozenset(
    _DETERMINERS + _ADJECTIVES + _NOUNS + _TRANSITIVE + _INTRANSITIVE + _ADVERBS
    + _PREPOSITIONS + _CONJUNCTIONS
)


class _IntStream:
    """Buffered uniform integers from a torch.Generator (deterministic)."""

    def __init__(self, g: torch.Generator, chunk: int = 4096):
        self._g = g
        self._chunk = chunk
        self._buf: list[float] = []
        self._i = 0

    def below(self, n: int) -> int:
        if self._i >= len(self._buf):
            self._buf = torch.rand(self._chunk, generator=self._g, dtype=torch.float64).tolist()
            self._i = 0
        u = self._buf[self._i]
        self._i += 1
        return min(int(u * n), n - 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, p_num: int, p_den: int) -> bool:
        return self.below(p_den) < p_num


def _noun_phrase(r: _IntStream) -> list[str]:
    words = [r.choice(_DETERMINERS)]
    if r.chance(1, 2):
        words.append(r.choice(_ADJECTIVES))
    words.append(r.choice(_NOUNS))
    return words


def _verb_phrase(r: _IntStream) -> list[str]:
    if r.chance(3, 5):
        words = [r.choice(_TRANSITIVE), *_noun_phrase(r)]
    else:
        words = [r.choice(_INTRANSITIVE)]
        if r.chance(1, 2):
            words.append(r.choice(_ADVERBS))
    if r.chance(1, 4):
        words += [r.choice(_PREPOSITIONS), *_noun_phrase(r)]
    return words


def _clause(r: _IntStream) -> list[str]:
    return [*_noun_phrase(r), *_verb_phrase(r)]


def _sentence(r: _IntStream) -> str:
    words = _clause(r)
    if r.chance(1, 3):
        words[-1] += ","
        words += [r.choice(_CONJUNCTIONS), *_clause(r)]
    text = " ".join(words)
    end = "?" if r.chance(1, 10) else ("!" if r.chance(1, 12) else ".")
    return text[0].upper() + text[1:] + end


def char_corpus(
    num_chars: int,
    seed: int | torch.Generator = 0,
    *,
    generator: torch.Generator | None = None,
) -> str:
    """A deterministic English-like text of exactly ``num_chars`` characters.

    Sentences come from a tiny grammar over a fixed built-in word list
    (:data:`CORPUS_WORDS`)::

        sentence := clause [", " conj clause] ("." | "?" | "!")
        clause   := NP VP
        NP       := det [adj] noun
        VP       := (tverb NP | iverb [adv]) [prep NP]

    The first letter of each sentence is capitalised; sentences are separated by
    a space, and paragraphs (3-7 sentences) by a newline.  Every character is in
    :data:`DEFAULT_ALPHABET`.  The text for a seed is a prefix-stable stream:
    ``char_corpus(m, s) == char_corpus(n, s)[:m]`` for ``m <= n`` (the last
    word may be cut).  ``num_chars >= 0`` (``ValueError`` otherwise).
    """
    n = _check_int("num_chars", num_chars, 0)
    r = _IntStream(_make_generator(seed, generator))
    parts: list[str] = []
    length = 0
    while length < n:
        paragraph = " ".join(_sentence(r) for _ in range(3 + r.below(5))) + "\n"
        parts.append(paragraph)
        length += len(paragraph)
    return "".join(parts)[:n]


class CharTokenizer:
    """Character-level tokenizer over a fixed alphabet (id = index in ``alphabet``).

    ``encode(str) -> LongTensor [len]`` and ``decode(ids) -> str`` round-trip
    exactly for any text made of alphabet characters; unknown characters and
    out-of-range ids raise ``ValueError``.  The default alphabet
    (:data:`DEFAULT_ALPHABET`, 74 symbols: newline, space, ``!'(),-.:;?``,
    digits, upper and lower case letters) covers :func:`char_corpus`.
    """

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if not isinstance(alphabet, str) or len(alphabet) == 0:
            raise ValueError("alphabet must be a non-empty string")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet must not contain repeated characters")
        self.alphabet = alphabet
        self._stoi = {c: i for i, c in enumerate(alphabet)}
        self._ascii_table = None
        if alphabet.isascii():
            table = np.full(128, -1, dtype=np.int64)
            for i, c in enumerate(alphabet):
                table[ord(c)] = i
            self._ascii_table = table

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def _unknown(self, text: str) -> ValueError:
        bad = next(c for c in text if c not in self._stoi)
        return ValueError(f"text contains character {bad!r} which is not in the tokenizer alphabet")

    def encode(self, text: str) -> torch.Tensor:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if self._ascii_table is not None and text.isascii():
            codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
            ids = self._ascii_table[codes]
            if (ids < 0).any():
                raise self._unknown(text)
            return torch.from_numpy(ids.copy())
        try:
            return torch.tensor([self._stoi[c] for c in text], dtype=torch.long)
        except KeyError:
            raise self._unknown(text) from None

    def decode(self, ids: torch.Tensor | Iterable[int]) -> str:
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
            if ids.is_floating_point() or ids.is_complex():
                raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
            ids = ids.reshape(-1).tolist()
        else:
            ids = [int(i) for i in ids]
        V = self.vocab_size
        for i in ids:
            if not 0 <= i < V:
                raise ValueError(f"ids must lie in [0, vocab_size={V}), got {i}")
        return "".join(self.alphabet[i] for i in ids)
