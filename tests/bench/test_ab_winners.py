"""bench.ab_step.winners: which A/B'd switches a GPU script turns on for the table that follows."""

from bench.ab_step import winners


def _row(switch: str, batch: int, on: float, off: float, diff: float = 0.0) -> dict:
    return dict(switch=switch, batch=batch, on_median=on, off_median=off, logits_rel_diff=diff)


def test_faster_in_total_and_nowhere_slower_wins():
    rows = [_row("a", 1, 3.40, 3.50), _row("a", 256, 15.50, 15.51),  # wins
            _row("b", 1, 3.30, 3.50), _row("b", 256, 15.60, 15.50),  # +0.1 at B 256: out though faster in total
            _row("c", 1, 3.51, 3.50), _row("c", 256, 15.51, 15.50),  # slower in total, within noise each
            _row("d", 1, 3.40, 3.50, diff=0.5)]  # faster, but the logits moved: out
    assert winners(rows) == ["a"]


def test_noise_bound_is_the_argument():
    rows = [_row("a", 1, 3.40, 3.50), _row("a", 256, 15.54, 15.50)]
    assert winners(rows) == []
    assert winners(rows, noise_ms=0.05) == ["a"]


def test_sum_order_switches_are_not_held_to_the_logits_bound():
    """gemv / moe_gemv change fp32 summation order (a routing flip in a later layer can move the logits a lot):
    timing decides; any other switch with moved logits stays out."""
    rows = [_row("gemv", 1, 3.40, 3.50, diff=0.4), _row("moe_gemv", 1, 3.60, 3.50, diff=0.4),
            _row("gemm_early", 1, 3.40, 3.50, diff=0.4)]
    assert winners(rows) == ["gemv"]
