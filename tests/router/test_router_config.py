"""Router CLI: dashes and underscores, worker lists, parser aliases, limits from config.json."""

from __future__ import annotations

import json

import pytest

from glmserve.router.config import parse_config


def test_flags_with_dashes_and_underscores(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512, "vocab_size": 2000}))
    cfg = parse_config(["--model-dir", str(tmp_path), "--events_addr", "tcp://127.0.0.1:7000",
                        "--prefill", "p0=tcp://127.0.0.1:7001", "--prefill", "p1=tcp://127.0.0.1:7002",
                        "--decode", "d0=tcp://127.0.0.1:7011", "--max-queue", "7", "--served-model-name", "m",
                        "--tool-call-parser", "glm-4.7", "--reasoning_parser", "glm45"])
    assert cfg.prefill == {"p0": "tcp://127.0.0.1:7001", "p1": "tcp://127.0.0.1:7002"}
    assert cfg.decode == {"d0": "tcp://127.0.0.1:7011"} and cfg.max_queue == 7
    assert (cfg.served_model_name, cfg.tool_call_parser, cfg.reasoning_parser) == ("m", "glm47", "glm45")
    assert cfg.host == "127.0.0.1"  # never all interfaces unless told
    assert cfg.max_req_total_len == 512 and cfg.model_vocab_size == 2000  # from config.json
    assert parse_config(["--model_dir", str(tmp_path), "--max_req_total_len", "9999"]).max_req_total_len == 512
    assert parse_config(["--model_dir", str(tmp_path), "--max_req_total_len", "100"]).max_req_total_len == 100


@pytest.mark.parametrize("argv", [["--prefill", "p0"], ["--decode", "d0=http://x:1"],
                                  ["--decode", "d0=tcp://a:1", "--decode", "d0=tcp://a:2"],
                                  ["--tool_call_parser", "hermes"]])
def test_bad_flags_are_rejected(argv):
    with pytest.raises((SystemExit, ValueError)):
        parse_config(argv)


def test_router_never_imports_torch():
    import subprocess
    import sys

    code = "import sys, glmserve.router.app, glmserve.router.__main__; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
