import numpy as np
import pytest

from gateway.postprocess import predictions, softmax, to_probabilities, top_k


def test_softmax_matches_definition_and_is_stable():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 0.0]])
    out = softmax(logits)
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(out[0], e / e.sum())
    np.testing.assert_allclose(out[1], [0.5, 0.5, 0.0], atol=1e-12)  # float64 exp(-1000) underflows to 0
    np.testing.assert_allclose(out.sum(axis=1), 1.0)


def test_probabilities_pass_through_unchanged():
    p = np.array([[0.2, 0.7, 0.1]], dtype=np.float32)
    np.testing.assert_allclose(to_probabilities(p, "probabilities"), p)


def test_top_k_sorted_with_ties_by_index():
    p = np.array([[0.1, 0.3, 0.3, 0.05, 0.25], [0.9, 0.02, 0.03, 0.04, 0.01]])
    idx, scores = top_k(p, 3)
    assert idx.tolist() == [[1, 2, 4], [0, 3, 2]]
    np.testing.assert_allclose(scores, [[0.3, 0.3, 0.25], [0.9, 0.04, 0.03]])
    assert top_k(p, 10)[0].shape == (2, 5)


def test_predictions_format_and_class_count_check():
    labels = ["a", "b", "c"]
    out = predictions(np.array([[0.0, 5.0, 1.0]]), "logits", labels, 2)
    assert [p["label"] for p in out[0]] == ["b", "c"]
    assert out[0][0]["index"] == 1 and 0.9 < out[0][0]["score"] < 1.0
    with pytest.raises(ValueError, match="classes"):
        predictions(np.zeros((1, 4)), "logits", labels, 2)
