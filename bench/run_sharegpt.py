"""Load test for any OpenAI-compatible server, reported as `vllm bench serve` does (benchmark client).

    python bench/run_sharegpt.py --base-url http://127.0.0.1:8000 --workload all --num-prompts 200
    python bench/run_sharegpt.py --dataset random --random-input-len 1024 --random-output-len 128 --sweep rate

The tool lives in bench/sharegpt/ (see its __init__ for the module map and bench/README.md for usage).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.sharegpt.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
