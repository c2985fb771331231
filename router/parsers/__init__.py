"""GLM tool-call (`glm45`, `glm47`) and reasoning (`glm45`) parsers for the router.

Runs in the router process. `ChatOutputParser` is the one streaming object per request;
`merge_deltas` turns its deltas into the OpenAI assistant message. `python -m glmserve.router.parsers`
runs it on a saved model output (see __main__.py).
"""
from glmserve.router.parsers.chat import (REASONING_PARSERS, TOOL_CALL_PARSERS, ChatOutputParser, normalize_parser_name,
                                 prompt_ends_in_think, thinking_enabled)
from glmserve.router.parsers.deltas import DeltaBatch, merge_deltas
from glmserve.router.parsers.schema import ToolSchemas, decode_value

__all__ = ["ChatOutputParser", "DeltaBatch", "REASONING_PARSERS", "TOOL_CALL_PARSERS", "ToolSchemas", "decode_value",
           "merge_deltas", "normalize_parser_name", "prompt_ends_in_think", "thinking_enabled"]
