"""Embedded training text for the built-in byte-level BPE tokenizer (see builtin.py).

Runs wherever the built-in tokenizer is built (router, tests). Changing this text changes
the built-in vocabulary, and so every token id the embedded default model was trained or
tested with: treat it as frozen.
"""

CORPUS = r"""
The quick brown fox jumps over the lazy dog. A server answers requests from many users at
the same time. Each request carries a prompt, and the model writes an answer one token after
another. The router receives the request, renders the chat template, counts the tokens and
sends the prompt to a prefill worker. The prefill worker computes the key and value cache for
every layer and moves the pages to a decode worker, which keeps generating until the answer is
complete or the length limit is reached. Streaming responses send each new piece of text to
the client as soon as it is ready.

What is the weather in Paris today? It is sunny and warm, about twenty degrees, with a light
wind from the west. Tomorrow there may be some rain in the afternoon and the evening will be
cool. Please tell me the time in Tokyo, London, New York, Berlin and Beijing. Thank you very
much for your help! You are a helpful assistant. Answer the question as well as you can, and
say so when you do not know. Let me check that for you. I need to call a tool first.

Hello! How can I help you today? Could you write a short poem about the sea, the sky and the
mountains? Sure, here is a poem: the waves are singing, the clouds are flying, the stars are
shining over the quiet hills. Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 20 32 64 100 128 256 512
1024 2048 4096 3.14 2.718 1e-5 -1 +1 50% $20 #1 @user a.b.c x=y [1, 2, 3] (a, b) {k: v}.

def add(a: int, b: int) -> int:
    return a + b

for i in range(10):
    if i % 2 == 0:
        print(f"even {i}")
    else:
        print("odd", i)

class Request:
    def __init__(self, prompt_ids: list[int], max_tokens: int = 16) -> None:
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens

import json
data = json.loads('{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}')
{"type": "function", "function": {"name": "get_weather", "description": "Get the current
weather for a city", "parameters": {"type": "object", "properties": {"city": {"type":
"string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}, "days": {"type":
"integer"}, "verbose": {"type": "boolean"}}, "required": ["city"]}}}
{"temp": 20, "unit": "celsius", "ok": true, "items": null, "list": [1.5, 2.5]}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>
<tool_response>{"temp": 18}</tool_response> get_time search_web run_in_terminal read_file
<think>The user asks about the weather, so I should call the weather tool.</think>
<think>Let me think step by step. First compute the sum, then check the result.</think>

Mixture of experts models route every token to a few experts out of many. Tensor parallel
workers split each layer across several GPUs, and the key value cache lives in pages of
sixteen tokens. Speculative decoding drafts a few tokens with a small layer and verifies them
with the full model in one step; accepted tokens are kept and rejected ones are rolled back.

Questions and answers: Why is the sky blue? Because air scatters blue light more than red
light. What is two plus two? Four. Where is the Eiffel Tower? In Paris, France. Who wrote
Hamlet? William Shakespeare. When did the first person walk on the moon? In 1969.

你好，世界！今天天气很好。我们一起去公园散步吧。请问现在几点了？谢谢你的帮助。
Bonjour le monde, comment allez-vous? Hola, ¿cómo estás? Grüße aus München. Привет, мир!
こんにちは世界。 안녕하세요. 🙂 👍 ✨ — “quotes” ‘single’ … ©®™ ±×÷ αβγδ λμπσ ∑∫√∞
"""
