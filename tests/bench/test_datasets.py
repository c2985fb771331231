"""Dataset building: ShareGPT file parsing and vLLM's filters, the synthetic set, random and prefix sets."""

import json
import statistics

from bench.sharegpt.datasets import LengthFilter, load_sharegpt, synthetic_sharegpt
from bench.sharegpt.synthetic_sets import RandomSpec, prefix_requests, random_requests
from bench.sharegpt.text import TokenCounter


def _words(n: int) -> str:
    return " ".join(["w"] * n)


def _write(tmp_path, items) -> str:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(items))
    return str(path)


def _conv(i, prompt_len, output_len, first="human"):
    return {"id": f"c{i}", "conversations": [{"from": first, "value": _words(prompt_len)},
                                            {"from": "gpt", "value": _words(output_len)}]}


def test_sharegpt_filters(tmp_path):
    items = [
        _conv(0, 10, 20),           # kept
        _conv(1, 3, 20),            # prompt < 4
        _conv(2, 10, 3),            # output < 4
        _conv(3, 1025, 5),          # prompt > 1024
        _conv(4, 1000, 1049),       # total 2049 > 2048
        _conv(5, 1000, 1048),       # total 2048: kept
        {"id": "c6", "conversations": [{"from": "human", "value": _words(9)}]},  # one turn
        _conv(7, 12, 30),           # kept
    ]
    reqs = load_sharegpt(_write(tmp_path, items), 100, TokenCounter(), seed=0)
    assert sorted((r.prompt_len, r.expected_output_len) for r in reqs) == [(10, 20), (12, 30), (1000, 1048)]


def test_sharegpt_first_human_turn_and_configurable_filter(tmp_path):
    items = [{"id": "x", "conversations": [{"from": "gpt", "value": "hello there"},
                                           {"from": "human", "value": _words(6)},
                                           {"from": "gpt", "value": _words(50)}]}, _conv(1, 10, 20)]
    flt = LengthFilter(min_len=4, max_prompt_len=8, max_total_len=100)
    reqs = load_sharegpt(_write(tmp_path, items), 10, TokenCounter(), seed=1, flt=flt)
    assert [(r.prompt_len, r.expected_output_len) for r in reqs] == [(6, 50)]
    fixed = load_sharegpt(_write(tmp_path, items), 10, TokenCounter(), seed=1, fixed_output_len=7)
    assert sorted(r.expected_output_len for r in fixed) == [7, 7]


def test_sharegpt_seed_shuffles_and_caps(tmp_path):
    path = _write(tmp_path, [_conv(i, 5 + i, 10) for i in range(40)])
    a = load_sharegpt(path, 10, TokenCounter(), seed=0)
    b = load_sharegpt(path, 10, TokenCounter(), seed=0)
    c = load_sharegpt(path, 10, TokenCounter(), seed=1)
    assert len(a) == 10 and a == b and a != c


def test_synthetic_sharegpt_shape():
    reqs = synthetic_sharegpt(400, TokenCounter(), seed=3)
    assert reqs == synthetic_sharegpt(400, TokenCounter(), seed=3)
    flt = LengthFilter()
    assert all(flt.keep(r.prompt_len, r.expected_output_len) for r in reqs)
    assert all(len(r.prompt.split()) == r.prompt_len for r in reqs)
    # log-normal around the published means (161 in / 338 out), trimmed by the filter
    assert 90 < statistics.mean(r.prompt_len for r in reqs) < 200
    assert 180 < statistics.mean(r.expected_output_len for r in reqs) < 400
    assert statistics.median(r.prompt_len for r in reqs) < statistics.mean(r.prompt_len for r in reqs)


def test_random_lengths_and_no_shared_prefix():
    spec = RandomSpec(input_len=32, output_len=8, range_ratio=0.25)
    reqs = random_requests(50, spec, TokenCounter(), seed=0)
    assert all(24 <= r.prompt_len <= 40 and 6 <= r.expected_output_len <= 10 for r in reqs)
    assert all(len(r.prompt_ids) == r.prompt_len for r in reqs)
    assert len({r.prompt_ids[:4] for r in reqs}) == 50
    fixed = random_requests(5, RandomSpec(16, 4), TokenCounter(), seed=0)
    assert {(r.prompt_len, r.expected_output_len) for r in fixed} == {(16, 4)}


def test_prefix_groups_share_exactly_the_prefix():
    spec = RandomSpec(input_len=8, output_len=4, prefix_len=16, num_prefixes=2)
    reqs = prefix_requests(6, spec, TokenCounter(), seed=0)
    assert all(r.prompt_len == 24 for r in reqs)
    assert reqs[0].prompt_ids[:16] == reqs[2].prompt_ids[:16] == reqs[4].prompt_ids[:16]
    assert reqs[0].prompt_ids[:16] != reqs[1].prompt_ids[:16]
    assert reqs[0].prompt_ids[16:] != reqs[2].prompt_ids[16:]


def test_vllm_style_flags_resolve():
    from bench.sharegpt.flags import build_parser, resolve

    a = resolve(build_parser().parse_args(["--host", "10.0.0.5", "--port", "9000", "--backend", "openai-chat",
                                           "--dataset-name", "random", "--save-result", "--num_prompts", "7"]))
    assert a.base_url == "http://10.0.0.5:9000" and a.endpoint == "/v1/chat/completions"
    assert a.dataset == "random" and a.num_prompts == 7
    a = resolve(build_parser().parse_args(["--backend", "openai-chat", "--endpoint", "/generate"]))
    assert a.endpoint == "/generate" and a.base_url == "http://127.0.0.1:8000"
