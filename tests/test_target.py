import pytest

from mdp_trt.errors import MdpError
from mdp_trt.target import parse_target


@pytest.mark.parametrize(("text", "dense", "budget"), [("2x", 10.0, 5.0), ("2.5X", 10.0, 4.0),
                                                       ("50%", 8.0, 4.0), ("3.2ms", 100.0, 3.2)])
def test_targets_convert_to_budgets(text: str, dense: float, budget: float) -> None:
    assert parse_target(text).budget_ms(dense) == pytest.approx(budget)


@pytest.mark.parametrize("text", ["2", "fast", "0.5x", "1x", "150%", "0%", "0ms", "-3ms", ""])
def test_bad_targets_are_refused(text: str) -> None:
    with pytest.raises(MdpError):
        parse_target(text)
