"""bench/best_mla.py: which MLA decode variant the sweep's rows pick for the GPU suite's A/B step."""

from glmserve.bench.best_mla import best, best_wg


def _row(b, variant, us, err=1e-3, ctx=640):
    return dict(kernel="mla", b=b, ctx=ctx, variant=variant, us=us, rel_err=err)


def test_best_triton_config_at_b256_or_nothing_when_the_rule_wins():
    rows = [_row(256, "rule", 100.0), _row(256, "n16 w4 s3 split0 prefetch1", 90.0),
            _row(256, "n32 w4 s3 split0 prefetch1", 80.0, err=0.5),  # wrong results never win
            _row(64, "n16 w4 s3 split0 prefetch1", 1.0)]  # another batch: not the shape
    assert best(rows) == "16,4,3"
    assert best([_row(256, "rule", 80.0), _row(256, "n16 w4 s3 split0 prefetch1", 90.0)]) is None


def test_best_wg_from_the_batch_on_which_it_always_wins():
    rows = [_row(b, "rule", us) for b, us in ((1, 10.0), (64, 34.0), (128, 56.0), (256, 104.0))]
    rows += [_row(b, "wg w8 s2 split0", us) for b, us in ((1, 9.0), (64, 40.0), (128, 50.0), (256, 80.0))]
    rows += [_row(256, "wg w4 s2 split0", 85.0), _row(256, "wg w8 s2 split1", 70.0)]  # fixed splits: not a rule
    # wins at B 1 too, but loses at 64: used from 128 on, with B 256's fastest rule-split variant
    assert best_wg(rows) == "128,8,2"
    slower = [r for r in rows if r["variant"] == "rule"] + [_row(256, "wg w8 s2 split0", 120.0)]
    assert best_wg(slower) is None
