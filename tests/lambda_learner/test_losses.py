import numpy as np
import pytest

from lambda_learner import Loss
from lambda_learner.losses import softplus


@pytest.mark.parametrize("loss", list(Loss))
def test_derivatives_match_finite_differences(loss):
    rng = np.random.default_rng(0)
    margins = rng.normal(0, 3, size=50)
    labels = loss.prepare_labels(rng.normal(size=50))
    first, second = loss.derivatives(margins, labels)
    step = 1e-6
    up, down = loss.value(margins + step, labels), loss.value(margins - step, labels)
    np.testing.assert_allclose(first, (up - down) / (2 * step), rtol=1e-6, atol=1e-8)
    first_up, _ = loss.derivatives(margins + step, labels)
    first_down, _ = loss.derivatives(margins - step, labels)
    np.testing.assert_allclose(second, (first_up - first_down) / (2 * step), rtol=1e-5, atol=1e-8)


def test_logistic_loss_is_finite_and_exact_at_any_margin():
    margins = np.array([-1e6, -800.0, -40.0, 0.0, 40.0, 800.0, 1e6])
    positive = Loss.LOGISTIC.value(margins, np.ones_like(margins))
    np.testing.assert_allclose(positive, [1e6, 800.0, 40.0, np.log(2), 4.248354255291589e-18, 0.0, 0.0], rtol=1e-12)
    first, second = Loss.LOGISTIC.derivatives(margins, np.ones_like(margins))
    assert np.isfinite(first).all() and np.isfinite(second).all()
    np.testing.assert_allclose(softplus(np.array([-800.0, 800.0])), [0.0, 800.0])


def test_labels_for_each_task():
    np.testing.assert_array_equal(Loss.LOGISTIC.prepare_labels([0.0, 1.0, -1.0, 2.0]), [-1, 1, -1, 1])
    np.testing.assert_array_equal(Loss.SQUARE.prepare_labels([0.0, 2.5, -1.0]), [0.0, 2.5, -1.0])
    assert Loss.for_task("linear") is Loss.SQUARE
    with pytest.raises(ValueError, match="task must be one of"):
        Loss.for_task("poisson")
