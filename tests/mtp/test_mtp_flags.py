"""--mtp_step flag: --num_speculative_tokens (and dashes) alias it; values outside 0..4 are refused."""

from __future__ import annotations

import pytest

from glmserve.shared.worker_common.config import common_parser, worker_config

BASE = ["--model_dir", "m", "--control_addr", "tcp://127.0.0.1:1", "--router_addr", "tcp://127.0.0.1:2"]


@pytest.mark.parametrize("flag", ["--mtp_step", "--mtp-step", "--num_speculative_tokens", "--num-speculative-tokens"])
def test_aliases(flag):
    assert worker_config("decode", common_parser("decode").parse_args(BASE + [flag, "3"])).mtp_step == 3


def test_default_off_and_range():
    assert worker_config("decode", common_parser("decode").parse_args(BASE)).mtp_step == 0
    with pytest.raises(ValueError):
        worker_config("decode", common_parser("decode").parse_args(BASE + ["--mtp_step", "5"]))
