"""common/engine.py: class scores from logits (what 05 and 06 rank and argmax)."""

import numpy as np
import pytest
import torch
from scipy.special import log_expit, log_softmax

from common import engine
from common.metrics import classification_metrics


def test_log_probabilities_match_float64_references():
    z = torch.tensor([[-40.0], [-3.5], [0.0], [2.25], [17.0], [45.0]])
    got = engine.log_probabilities(z).numpy()
    assert got.dtype == np.float64
    expected = np.stack([log_expit(-z[:, 0].double().numpy()), log_expit(z[:, 0].double().numpy())], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0, atol=1e-12)
    multi = torch.tensor([[30.0, -2.0, 1.0], [0.1, 0.2, 0.3], [-5.0, 40.0, 39.0]])
    np.testing.assert_allclose(engine.log_probabilities(multi).numpy(), log_softmax(multi.double().numpy(), axis=1),
                               rtol=1e-12, atol=1e-15)


def test_confident_predictions_keep_their_order_for_auc():
    # The one negative has logit 17: in float32 sigmoid(17) == 1.0 == sigmoid(30), so probabilities would
    # tie it with the positives and report AUC 0.5; the true AUC is 1.0.
    logits = torch.tensor([[17.0], [30.0], [20.0], [25.0]])
    labels = np.array([0, 1, 1, 1])
    assert torch.sigmoid(logits[:, 0]).eq(1.0).all()  # the saturation this guards against
    names = ["negative", "positive"]
    assert classification_metrics(labels, engine.log_probabilities(logits).numpy(), names)["auc"] == pytest.approx(1.0)
