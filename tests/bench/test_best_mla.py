"""bench/best_mla.py: which MLA decode variant the sweep's rows pick for the GPU suite's A/B step."""

from glmserve.bench.best_mla import best


def _row(b, variant, us, err=1e-3, ctx=640):
    return dict(kernel="mla", b=b, ctx=ctx, variant=variant, us=us, rel_err=err)


def test_best_triton_config_at_b256_or_nothing_when_the_rule_wins():
    rows = [_row(256, "rule", 100.0), _row(256, "n16 w4 s3 split0 prefetch1", 90.0),
            _row(256, "n32 w4 s3 split0 prefetch1", 80.0, err=0.5),  # wrong results never win
            _row(64, "n16 w4 s3 split0 prefetch1", 1.0)]  # another batch: not the shape
    assert best(rows) == "16,4,3"
    assert best([_row(256, "rule", 80.0), _row(256, "n16 w4 s3 split0 prefetch1", 90.0)]) is None
