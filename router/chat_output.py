"""Per-choice chat output parsing: the parsers part's `ChatOutputParser` set up for one request.

Runs in the router process. The parser splits generated text into content,
reasoning_content and tool calls (OpenAI delta dicts, see router/parsers/deltas.py). With
no --tool_call_parser / --reasoning_parser every piece of text is content.
"""

from __future__ import annotations

from typing import Any

from glmserve.router.config import RouterConfig
from glmserve.router.parsers import ChatOutputParser


def make_parser(cfg: RouterConfig, tools: list[dict] | None, tool_choice: Any, enable_thinking: bool,
                prompt_text: str) -> ChatOutputParser:
    return ChatOutputParser(
        tool_call_parser=cfg.tool_call_parser,
        reasoning_parser=cfg.reasoning_parser,
        tools=tools,
        tool_choice=tool_choice if tool_choice is not None else "auto",
        enable_thinking=enable_thinking,
        # GLM-4.7's generation prompt ends in "<think>": the output starts inside the reasoning
        prompt_ends_in_think=prompt_text.rstrip().endswith("<think>"),
    )
