"""Behavioural tests for olssm.data.synthetic."""

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from olssm.data import synthetic as syn
from olssm.data import (
    CORPUS_WORDS,
    DEFAULT_ALPHABET,
    IGNORE_INDEX,
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

FAST = settings(max_examples=25, deadline=None)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _differs(a, b):
    return any(not torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- #
# MQAR
# --------------------------------------------------------------------------- #
def _mqar_reference_targets(row, num_pairs):
    """Recompute the scored targets by scanning for the earlier key-value pair."""
    row = row.tolist()
    out = [IGNORE_INDEX] * len(row)
    for p in range(2 * num_pairs, len(row)):
        tok = row[p]
        if tok == 0:
            continue
        hits = [q for q in range(0, p - 1) if row[q] == tok and q % 2 == 0 and q < 2 * num_pairs]
        assert len(hits) == 1, "each query key must occur exactly once in the context"
        out[p] = row[hits[0] + 1]
    return out


@FAST
@given(
    num_pairs=st.integers(1, 8),
    extra_len=st.integers(0, 20),
    extra_vocab=st.integers(0, 40),
    num_examples=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_mqar_targets_recomputed_from_inputs(num_pairs, extra_len, extra_vocab, num_examples, seed):
    seq_len = 4 * num_pairs + extra_len
    vocab = 2 * num_pairs + 2 + extra_vocab
    x, y = mqar(num_examples, seq_len, vocab, num_pairs, seed=seed)
    assert x.shape == y.shape == (num_examples, seq_len)
    assert x.dtype == y.dtype == torch.long
    half = vocab // 2
    for row_x, row_y in zip(x, y):
        keys = row_x[0 : 2 * num_pairs : 2]
        vals = row_x[1 : 2 * num_pairs : 2]
        assert ((keys >= 1) & (keys < half)).all()
        assert ((vals >= half) & (vals < vocab)).all()
        assert len(set(keys.tolist())) == num_pairs
        assert len(set(vals.tolist())) == num_pairs
        # Query region: every key exactly once, filler elsewhere, at even offsets.
        query = row_x[2 * num_pairs :]
        nz = torch.nonzero(query).flatten()
        assert sorted(query[nz].tolist()) == sorted(keys.tolist())
        assert (nz % 2 == 0).all()
        # Targets: recomputed by scanning.
        assert row_y.tolist() == _mqar_reference_targets(row_x, num_pairs)
        assert int((row_y != IGNORE_INDEX).sum()) == num_pairs


def test_mqar_determinism_and_generator():
    a = mqar(8, 64, 32, 8, seed=3)
    _assert_same(a, mqar(8, 64, 32, 8, seed=3))
    assert _differs(a, mqar(8, 64, 32, 8, seed=4))
    g = torch.Generator().manual_seed(3)
    _assert_same(a, mqar(8, 64, 32, 8, seed=g))
    _assert_same(a, mqar(8, 64, 32, 8, seed=123, generator=torch.Generator().manual_seed(3)))
    # A generator is consumed: two successive draws differ.
    g = torch.Generator().manual_seed(0)
    assert _differs(mqar(8, 64, 32, 8, g), mqar(8, 64, 32, 8, g))


def test_mqar_query_order_and_positions_are_random():
    x, y = mqar(200, 64, 64, 4, seed=0)
    first_query_key = []
    for row in x:
        q = row[8:]
        first_query_key.append(int((row[0:8:2] == q[torch.nonzero(q)[0, 0]]).nonzero()[0, 0]))
    # the first query is not always the first key
    assert len(set(first_query_key)) == 4
    scored = (y != IGNORE_INDEX).nonzero()[:, 1]
    assert scored.min() >= 8 and scored.max() > 40


def test_mqar_plugs_into_cross_entropy():
    x, y = mqar(4, 32, 20, 4, seed=1)
    logits = torch.zeros(4, 32, 20)
    logits.scatter_(2, y.clamp(min=0).unsqueeze(-1), 50.0)
    assert F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100) < 1e-6


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_examples=0, seq_len=16, vocab_size=16, num_pairs=2), "num_examples"),
        (dict(num_examples=2, seq_len=15, vocab_size=32, num_pairs=4), "seq_len"),
        (dict(num_examples=2, seq_len=64, vocab_size=9, num_pairs=4), "vocab_size"),
        (dict(num_examples=2, seq_len=64, vocab_size=32, num_pairs=0), "num_pairs"),
        (dict(num_examples=2, seq_len=64, vocab_size=32, num_pairs=2.5), "num_pairs"),
        (dict(num_examples=2, seq_len=64, vocab_size=32, num_pairs=2, seed="x"), "seed"),
    ],
)
def test_mqar_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mqar(**kwargs)


def test_mqar_boundary_arguments_ok():
    x, y = mqar(3, 8, 6, 2, seed=0)  # seq_len == 4 * n, vocab == 2n + 2
    assert (y != IGNORE_INDEX).sum() == 6


# --------------------------------------------------------------------------- #
# selective copying
# --------------------------------------------------------------------------- #
@FAST
@given(
    k=st.integers(1, 8),
    extra_len=st.integers(0, 20),
    vocab=st.integers(4, 30),
    num_examples=st.integers(1, 4),
    teacher_forcing=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_selective_copying_targets_are_prefix_data_in_order(k, extra_len, vocab, num_examples, teacher_forcing, seed):
    L = k + extra_len
    x, y = selective_copying(num_examples, L, k, vocab, seed=seed, teacher_forcing=teacher_forcing)
    special = selective_copying_special_tokens(vocab)
    assert special == {"noise": 0, "separator": vocab - 2, "blank": vocab - 1}
    assert x.shape == y.shape == (num_examples, L + 1 + k)
    for row_x, row_y in zip(x, y):
        prefix = row_x[:L].tolist()
        data = [t for t in prefix if t != special["noise"]]
        assert len(data) == k
        assert all(1 <= t <= vocab - 3 for t in data)
        assert row_x[L] == special["separator"]
        scored = [(p, t) for p, t in enumerate(row_y.tolist()) if t != IGNORE_INDEX]
        assert [p for p, _ in scored] == list(range(L, L + k))
        assert [t for _, t in scored] == data
        tail = row_x[L + 1 :].tolist()
        assert tail == (data if teacher_forcing else [special["blank"]] * k)
        if teacher_forcing:
            # next-token alignment: target at p equals the input at p + 1
            for p, t in scored:
                assert row_x[p + 1] == t


def test_selective_copying_positions_are_spread():
    x, _ = selective_copying(100, 50, 5, 10, seed=0)
    pos = (x[:, :50] != 0).nonzero()[:, 1]
    assert pos.min() < 5 and pos.max() > 45


def test_selective_copying_determinism():
    a = selective_copying(6, 40, 6, 12, seed=7)
    _assert_same(a, selective_copying(6, 40, 6, 12, seed=7))
    assert _differs(a, selective_copying(6, 40, 6, 12, seed=8))
    _assert_same(a, selective_copying(6, 40, 6, 12, seed=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_examples=0, seq_len=10, num_tokens_to_copy=2, vocab_size=8), "num_examples"),
        (dict(num_examples=1, seq_len=3, num_tokens_to_copy=4, vocab_size=8), "seq_len"),
        (dict(num_examples=1, seq_len=10, num_tokens_to_copy=0, vocab_size=8), "num_tokens_to_copy"),
        (dict(num_examples=1, seq_len=10, num_tokens_to_copy=2, vocab_size=3), "vocab_size"),
    ],
)
def test_selective_copying_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        selective_copying(**kwargs)


# --------------------------------------------------------------------------- #
# induction heads
# --------------------------------------------------------------------------- #
@FAST
@given(
    seq_len=st.integers(3, 40),
    vocab=st.integers(3, 20),
    num_examples=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_induction_heads_target_is_token_after_first_trigger(seq_len, vocab, num_examples, seed):
    x, y = induction_heads(num_examples, seq_len, vocab, seed=seed)
    trig = induction_heads_trigger_token(vocab)
    assert trig == vocab - 1
    assert x.shape == y.shape == (num_examples, seq_len)
    for row_x, row_y in zip(x, y):
        pos = (row_x == trig).nonzero().flatten().tolist()
        assert len(pos) == 2 and pos[1] == seq_len - 1
        assert pos[0] < seq_len // 2
        assert row_y[-1] == row_x[pos[0] + 1]
        assert row_y[-1] != trig
        assert (row_y[:-1] == IGNORE_INDEX).all()
        assert ((row_x >= 0) & (row_x < vocab)).all()


def test_induction_heads_determinism():
    a = induction_heads(10, 64, 16, seed=0)
    _assert_same(a, induction_heads(10, 64, 16, seed=0))
    assert _differs(a, induction_heads(10, 64, 16, seed=1))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_examples=-1, seq_len=10, vocab_size=8), "num_examples"),
        (dict(num_examples=1, seq_len=2, vocab_size=8), "seq_len"),
        (dict(num_examples=1, seq_len=10, vocab_size=2), "vocab_size"),
    ],
)
def test_induction_heads_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        induction_heads(**kwargs)


# --------------------------------------------------------------------------- #
# in-context linear regression
# --------------------------------------------------------------------------- #
def test_icl_shapes_and_generative_model():
    xs, ys, ws = icl_linear_regression(5, 10, 4, seed=0, return_weights=True)
    assert xs.shape == (5, 11, 4) and ys.shape == (5, 11) and ws.shape == (5, 4)
    assert xs.dtype == ys.dtype == torch.float32
    torch.testing.assert_close(ys, torch.einsum("ntd,nd->nt", xs, ws))
    # same seed, with noise: same xs, ys perturbed by the noise
    xs2, ys2 = icl_linear_regression(5, 10, 4, noise_std=0.5, seed=0)
    assert torch.equal(xs, xs2)
    assert not torch.allclose(ys, ys2)


def test_icl_weight_scale():
    _, _, ws = icl_linear_regression(4000, 1, 8, seed=0, return_weights=True)
    # w ~ N(0, I/dim): E||w||^2 = 1
    assert abs(ws.pow(2).sum(-1).mean().item() - 1.0) < 0.05


@FAST
@given(
    dim=st.integers(1, 8),
    extra=st.integers(0, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_least_squares_recovers_noise_free_targets(dim, extra, seed):
    # float64 so that even square (num_context == dim), possibly ill-conditioned
    # systems are solved to 1e-4
    xs, ys = icl_linear_regression(6, dim + extra, dim, seed=seed, dtype=torch.float64)
    pred = least_squares_prediction(xs, ys)
    assert pred.shape == (6,)
    torch.testing.assert_close(pred, ys[:, -1], atol=1e-4, rtol=0)


def test_least_squares_recovers_float32_overdetermined():
    xs, ys = icl_linear_regression(64, 32, 16, seed=0)
    pred = least_squares_prediction(xs, ys)
    assert pred.dtype == torch.float32
    torch.testing.assert_close(pred, ys[:, -1], atol=1e-4, rtol=0)


def test_least_squares_min_norm_underdetermined():
    # num_context < dim: prediction = x_q . pinv(X) y; the min-norm solution lies
    # in the row space of X and fits the context exactly.
    xs, ys = icl_linear_regression(3, 2, 5, seed=0, dtype=torch.float64)
    X, y = xs[:, :-1], ys[:, :-1]
    w = X.transpose(1, 2) @ torch.linalg.solve(X @ X.transpose(1, 2), y.unsqueeze(-1))
    torch.testing.assert_close(least_squares_prediction(xs, ys), (xs[:, -1:] @ w).flatten())


def test_least_squares_ignores_query_target():
    xs, ys = icl_linear_regression(4, 6, 3, noise_std=0.3, seed=1)
    ys2 = ys.clone()
    ys2[:, -1] = 1e6
    torch.testing.assert_close(least_squares_prediction(xs, ys), least_squares_prediction(xs, ys2))


@pytest.mark.parametrize("lr", [0.0, 0.1, 1.0, 2.5])
def test_gradient_descent_prediction_matches_hand_computation(lr):
    xs, ys = icl_linear_regression(3, 5, 4, noise_std=0.1, seed=2, dtype=torch.float64)
    pred = gradient_descent_prediction(xs, ys, lr)
    for n in range(3):
        C = 5
        w1 = [0.0] * 4
        for i in range(C):
            for j in range(4):
                w1[j] += lr / C * float(ys[n, i]) * float(xs[n, i, j])
        expected = sum(w1[j] * float(xs[n, C, j]) for j in range(4))
        assert abs(float(pred[n]) - expected) < 1e-10


def test_gradient_descent_is_a_gradient_step_of_mse():
    xs, ys = icl_linear_regression(2, 7, 3, seed=3, dtype=torch.float64)
    lr = 0.3
    w = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * ((torch.einsum("ntd,nd->nt", xs[:, :-1], w) - ys[:, :-1]) ** 2).mean(1).sum()
    (g,) = torch.autograd.grad(loss, w)
    w1 = -lr * g
    torch.testing.assert_close(gradient_descent_prediction(xs, ys, lr), (xs[:, -1] * w1).sum(-1))


def test_icl_determinism():
    a = icl_linear_regression(4, 8, 3, noise_std=0.1, seed=5)
    _assert_same(a, icl_linear_regression(4, 8, 3, noise_std=0.1, seed=5))
    assert _differs(a, icl_linear_regression(4, 8, 3, noise_std=0.1, seed=6))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_examples=0, num_context=4, dim=2), "num_examples"),
        (dict(num_examples=1, num_context=0, dim=2), "num_context"),
        (dict(num_examples=1, num_context=4, dim=0), "dim"),
        (dict(num_examples=1, num_context=4, dim=2, noise_std=-1.0), "noise_std"),
    ],
)
def test_icl_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        icl_linear_regression(**kwargs)


def test_baselines_bad_arguments():
    xs, ys = icl_linear_regression(2, 4, 3)
    with pytest.raises(ValueError, match="ys"):
        least_squares_prediction(xs, ys[:, :-1])
    with pytest.raises(ValueError, match="xs"):
        gradient_descent_prediction(xs[0], ys, 0.1)
    with pytest.raises(ValueError, match="lr"):
        gradient_descent_prediction(xs, ys, float("nan"))


# --------------------------------------------------------------------------- #
# character corpus / tokenizer
# --------------------------------------------------------------------------- #
def test_char_corpus_is_english_like_and_tokenizable():
    text = char_corpus(5000, seed=0)
    assert isinstance(text, str) and len(text) == 5000
    assert set(text) <= set(DEFAULT_ALPHABET)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) > 500
    # every complete word (the last one may be truncated) is from the word list
    assert all(w.lower() in CORPUS_WORDS for w in words[:-1])
    sentences = re.findall(r"[A-Z][^.?!]*[.?!]", text)
    assert len(sentences) > 50
    assert "\n" in text
    tok = CharTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.shape == (5000,)
    assert int(ids.max()) < tok.vocab_size
    assert tok.decode(ids) == text


def test_char_corpus_determinism_and_prefix_stability():
    a = char_corpus(3000, seed=1)
    assert a == char_corpus(3000, seed=1)
    assert a != char_corpus(3000, seed=2)
    assert char_corpus(777, seed=1) == a[:777]
    assert char_corpus(0) == ""


def test_char_corpus_bad_arguments():
    with pytest.raises(ValueError, match="num_chars"):
        char_corpus(-1)


@FAST
@given(st.text(alphabet=DEFAULT_ALPHABET, max_size=200))
def test_tokenizer_round_trip(text):
    tok = CharTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_tokenizer_ids_and_errors():
    tok = CharTokenizer()
    assert tok.vocab_size == len(DEFAULT_ALPHABET) == len(set(DEFAULT_ALPHABET))
    assert tok.encode("a").item() == DEFAULT_ALPHABET.index("a")
    with pytest.raises(ValueError, match="'#'"):
        tok.encode("ab#c")
    with pytest.raises(ValueError, match="'é'"):
        tok.encode("café")
    with pytest.raises(ValueError, match="ids"):
        tok.decode(torch.tensor([0, tok.vocab_size]))
    with pytest.raises(ValueError, match="alphabet"):
        CharTokenizer("aa")
    custom = CharTokenizer("xyzé")
    assert custom.vocab_size == 4
    assert custom.decode(custom.encode("zéx")) == "zéx"


def test_module_exports():
    for name in syn.__all__:
        assert hasattr(syn, name)
