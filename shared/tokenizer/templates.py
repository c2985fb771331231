"""Built-in GLM chat templates (jinja2 text), used when a checkpoint ships none.

Runs in the router process (and in tests). Both templates are written from spec §6.3/§6.4
and are meant to be rendered by `shared.tokenizer.render.render_chat_template` exactly the
way transformers renders a checkpoint's template (sandboxed jinja2, trim_blocks,
lstrip_blocks, `tojson` = json.dumps(ensure_ascii=False)). Every literal is written as a
jinja string expression with `{{- ... -}}`, so the rendering does not depend on the
whitespace of this file.

Invariants of the rendered prompt (both formats):
  * starts with `[gMASK]<sop>`; no end-of-turn token, a turn ends where the next role starts;
  * a tools block (`<|system|>` + instructions + one `tojson(tool)` per line) comes first;
  * tool-call argument values: strings raw, everything else `tojson`;
  * consecutive tool messages share one `<|observation|>`.
"""

# `visible_text` accepts a string, a list of OpenAI content parts, or None (-> "").
_VISIBLE_TEXT = r"""
{%- macro visible_text(content) -%}
{%- if content is string -%}{{- content -}}
{%- elif content is none -%}
{%- elif content is iterable and content is not mapping -%}
{%- for item in content -%}
{%- if item is mapping and item.type == 'text' -%}{{- item.text -}}
{%- elif item is string -%}{{- item -}}
{%- endif -%}
{%- endfor -%}
{%- else -%}{{- content -}}
{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user_index=-1) -%}
{%- for m in messages -%}
{%- if m.role == 'user' -%}{%- set ns.last_user_index = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- '[gMASK]<sop>' -}}
"""

# Splits `content` / `reasoning_content` of an assistant turn into `reasoning` and `content`.
_SPLIT_REASONING = r"""
{%- set content = visible_text(m.content) -%}
{%- set reasoning = '' -%}
{%- if m.reasoning_content is string -%}{%- set reasoning = m.reasoning_content -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
"""

_TOOLS_INTRO = (
    "<|system|>{NL}# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\\n"
)
_TOOLS_OUTRO_45 = (
    "</tools>\\n\\nFor each function call, output the function name and arguments within the following "
    "XML format:\\n<tool_call>{function-name}\\n<arg_key>{arg-key-1}</arg_key>\\n<arg_value>{arg-value-1}"
    "</arg_value>\\n<arg_key>{arg-key-2}</arg_key>\\n<arg_value>{arg-value-2}</arg_value>\\n...\\n</tool_call>"
)
_TOOLS_OUTRO_47 = (
    "</tools>\\n\\nFor each function call, output the function name and arguments within the following "
    "XML format:\\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}"
    "</arg_value><arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>"
)


def _tools_block(outro: str) -> str:
    intro = _TOOLS_INTRO.replace("{NL}", "\\n")
    return (
        "{%- if tools -%}{{- '" + intro + "' -}}"
        "{%- for tool in tools -%}{{- tool | tojson(ensure_ascii=False) -}}{{- '\\n' -}}{%- endfor -%}"
        "{{- '" + outro + "' -}}{%- endif -%}\n"
    )


GLM45_TEMPLATE = _VISIBLE_TEXT + _tools_block(_TOOLS_OUTRO_45) + r"""
{%- for m in messages -%}
{%- if m.role == 'user' -%}
{%- set text = visible_text(m.content) -%}
{{- '<|user|>\n' + text -}}
{%- if enable_thinking is defined and not enable_thinking and not text.endswith('/nothink') -%}{{- '/nothink' -}}{%- endif -%}
{%- elif m.role == 'system' -%}
{{- '<|system|>\n' + visible_text(m.content) -}}
{%- elif m.role == 'assistant' -%}
""" + _SPLIT_REASONING + r"""
{{- '<|assistant|>' -}}
{%- if loop.index0 > ns.last_user_index and reasoning -%}{{- '\n<think>' + reasoning.strip() + '</think>' -}}
{%- else -%}{{- '\n<think></think>' -}}{%- endif -%}
{%- if content.strip() -%}{{- '\n' + content.strip() -}}{%- endif -%}
{%- for tc in (m.tool_calls or []) -%}
{%- set tc = tc.function if tc.function is defined else tc -%}
{{- '\n<tool_call>' + tc.name -}}
{%- for k, v in (tc.arguments or {}).items() -%}
{{- '\n<arg_key>' + (k | string) + '</arg_key>\n<arg_value>' -}}
{{- v if v is string else v | tojson(ensure_ascii=False) -}}{{- '</arg_value>' -}}
{%- endfor -%}
{{- '\n</tool_call>' -}}
{%- endfor -%}
{%- elif m.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|observation|>' -}}{%- endif -%}
{{- '\n<tool_response>\n' + visible_text(m.content) + '\n</tool_response>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}
{%- if enable_thinking is defined and not enable_thinking -%}{{- '\n<think></think>' -}}{%- endif -%}
{%- endif -%}
"""

GLM47_TEMPLATE = _VISIBLE_TEXT + _tools_block(_TOOLS_OUTRO_47) + r"""
{%- for m in messages -%}
{%- if m.role == 'user' -%}
{{- '<|user|>' + visible_text(m.content) -}}
{%- elif m.role == 'system' -%}
{{- '<|system|>' + visible_text(m.content) -}}
{%- elif m.role == 'assistant' -%}
""" + _SPLIT_REASONING + r"""
{{- '<|assistant|>' -}}
{%- if ((clear_thinking is defined and not clear_thinking) or loop.index0 > ns.last_user_index) and reasoning -%}
{{- '<think>' + reasoning.strip() + '</think>' -}}
{%- else -%}{{- '</think>' -}}{%- endif -%}
{%- if content.strip() -%}{{- content.strip() -}}{%- endif -%}
{%- for tc in (m.tool_calls or []) -%}
{%- set tc = tc.function if tc.function is defined else tc -%}
{{- '<tool_call>' + tc.name -}}
{%- for k, v in (tc.arguments or {}).items() -%}
{{- '<arg_key>' + (k | string) + '</arg_key><arg_value>' -}}
{{- v if v is string else v | tojson(ensure_ascii=False) -}}{{- '</arg_value>' -}}
{%- endfor -%}
{{- '</tool_call>' -}}
{%- endfor -%}
{%- elif m.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|observation|>' -}}{%- endif -%}
{{- '<tool_response>' + visible_text(m.content) + '</tool_response>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}
{%- if enable_thinking is defined and not enable_thinking -%}{{- '</think>' -}}{%- else -%}{{- '<think>' -}}{%- endif -%}
{%- endif -%}
"""

TEMPLATES = {"glm45": GLM45_TEMPLATE, "glm47": GLM47_TEMPLATE}


def detect_template_format(chat_template: str, default: str = "glm47") -> str:
    """'glm47' when tool calls are rendered compactly (SGLang's rule), 'glm45' for the newline form."""
    if "'\\n<tool_call>' + tc.name" in chat_template or "\n<tool_call>' + tc.name" in chat_template:
        return "glm45"
    if "'<tool_call>' + tc.name" in chat_template:
        return "glm47"
    if "<|user|>\n" in chat_template or "<|user|>\\n" in chat_template:
        return "glm45"
    return default
