"""`python -m glmserve.router.parsers` on a saved output: message JSON, and deltas + merged message with --stream-chunk."""
import json
import os
import subprocess
import sys

from parser_cases import TOOLS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUTPUT = ("Need weather.</think>Checking.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
          "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>")


def _run(args, stdin):
    proc = subprocess.run([sys.executable, "-m", "glmserve.router.parsers", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cli_message_and_stream(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    common = ["--tool-call-parser", "glm47", "--reasoning_parser", "glm45", "--tools", str(tools),
              "--prompt-ends-in-think"]
    message = _run(common, OUTPUT)
    assert message["content"] == "Checking." and message["reasoning_content"] == "Need weather."
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}
    streamed = _run(common + ["--stream-chunk", "3"], OUTPUT)
    assert len(streamed["deltas"]) > 5
    strip = lambda m: {**m, "tool_calls": [{**c, "id": None} for c in m["tool_calls"]]}
    assert strip(streamed["message"]) == strip(message)
    # no --tools: any tool name is accepted, values typed without a schema ("3" -> 3 anyway)
    untyped = _run(["--tool_call_parser", "glm45", "--reasoning-parser", "glm45", "--prompt_ends_in_think"],
                   OUTPUT.replace("get_weather", "anything"))
    assert untyped["tool_calls"][0]["function"]["name"] == "anything"
