"""`python -m glmserve.router.parsers`: run the GLM output parsers on a saved model output (debugging aid).

Runs as a one-shot command. Reads the raw completion text (detokenized, special tokens such as
<think>/<tool_call> kept) from stdin and prints the OpenAI assistant message as JSON; with
`--stream-chunk N` it feeds the text N characters at a time, like a stream, and prints
{"deltas": [...], "message": {...}} where message is merged from the deltas.
Without --tools every tool name is accepted and values are typed schema-less.
"""
import argparse
import json
import sys

from glmserve.router.parsers.chat import REASONING_PARSERS, TOOL_CALL_PARSERS, ChatOutputParser
from glmserve.router.parsers.deltas import merge_deltas


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glmserve.router.parsers", description=__doc__.split("\n")[0])
    p.add_argument("--tool_call_parser", "--tool-call-parser", default=None,
                   help=f"one of {', '.join(TOOL_CALL_PARSERS)} (dash spellings accepted)")
    p.add_argument("--reasoning_parser", "--reasoning-parser", default=None,
                   help=f"one of {', '.join(REASONING_PARSERS)}")
    p.add_argument("--tools", default=None, help="JSON file: a list of OpenAI tools or {\"tools\": [...]}")
    p.add_argument("--tool_choice", "--tool-choice", default="auto",
                   help="auto | none | required | the name of one function")
    p.add_argument("--stream-chunk", "--stream_chunk", type=int, default=0, help="feed N characters at a time")
    p.add_argument("--no-thinking", "--no_thinking", action="store_true", help="enable_thinking=False")
    p.add_argument("--prompt-ends-in-think", "--prompt_ends_in_think", nargs="?", const="yes", default="unknown",
                   choices=("yes", "no", "unknown"),
                   help="yes: the prompt ended with <think> (GLM-4.7, thinking on); no: GLM-4.5 prompt "
                        "(reasoning only after a leading <think>); unknown (default): output starts as reasoning")
    return p


def _load_tools(path: str | None) -> list[dict] | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data.get("tools", []) if isinstance(data, dict) else data


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    tools = _load_tools(args.tools)
    choice = args.tool_choice
    if choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    parser = ChatOutputParser(args.tool_call_parser, args.reasoning_parser, tools=tools, tool_choice=choice,
                              enable_thinking=not args.no_thinking,
                              prompt_ends_in_think={"yes": True, "no": False}.get(args.prompt_ends_in_think),
                              accept_undeclared_tools=tools is None)
    text = sys.stdin.read()
    if args.stream_chunk <= 0:
        print(json.dumps(parser.parse_full(text), ensure_ascii=False, indent=2))
        return 0
    n = args.stream_chunk
    deltas = [d for i in range(0, len(text), n) for d in parser.feed(text[i:i + n])] + parser.finish()
    print(json.dumps({"deltas": deltas, "message": merge_deltas(deltas)}, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
