"""TF-IDF diversity against a hand computation. `pytest tests/test_diversity.py`"""
from __future__ import annotations

import math

from tasks.diversity import ngrams, tfidf_rows


def test_ngrams_follow_the_sklearn_token_rules():
    assert ngrams("A cat, a CAT sat.") == {"cat": 2, "sat": 1, "cat cat": 1, "cat sat": 1, "cat cat sat": 1}


def test_tfidf_rows_match_a_hand_computation():
    texts = ["red apple", "red red", "green apple"]
    rows = tfidf_rows(texts, n_max=1)
    idf = lambda df: math.log((1 + 3) / (1 + df)) + 1  # noqa: E731
    raw = [{"red": idf(2), "apple": idf(2)}, {"red": 2 * idf(2)}, {"green": idf(1), "apple": idf(2)}]
    for got, want in zip(rows, raw):
        norm = math.sqrt(sum(v * v for v in want.values()))
        assert got.keys() == want.keys()
        for key in want:
            assert math.isclose(got[key], want[key] / norm, rel_tol=1e-12)
    # a response of distinct, rare n-grams is more diverse than a repetitive one
    assert sum(rows[0].values()) > sum(rows[1].values())


def test_empty_text_gets_an_empty_row():
    assert tfidf_rows(["", "words here"])[0] == {}
