"""The load-test tool behind bench/run_sharegpt.py (runs in the benchmark client process only).

Modules: `datasets` (ShareGPT file, filters, synthetic ShareGPT-shaped set), `synthetic_sets`
(random and prefix sets), `text` (token counting and prompt text), `client` (one streamed
request per endpoint), `load` (arrival schedules, concurrency cap, workloads), `metrics`
(vLLM `bench serve` arithmetic), `report` (table and JSON), `plots` (PNG), `server_metrics`
(Prometheus /metrics before/after), `cli` (flags and sweeps). Nothing here imports the
serving engine; the tokenizer is used only when one is given.
"""
