"""Built-in tokenizer: byte-level coverage, GLM special tokens, determinism, checkpoint round trip."""
import hashlib
import json
import random

import pytest

from glmserve.shared.tokenizer import load_tokenizer
from glmserve.shared.tokenizer.builtin import (BUILTIN_EOS_IDS, BUILTIN_PAD_ID, BUILTIN_TOKEN_IDS, BUILTIN_VOCAB_SIZE,
                                      NUM_MERGES, train_merges, write_builtin_tokenizer)
from glmserve.shared.tokenizer.corpus import CORPUS


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_layout_and_constants(tok):
    assert tok.vocab_size == BUILTIN_VOCAB_SIZE == 1024
    assert BUILTIN_TOKEN_IDS["<|endoftext|>"] == BUILTIN_PAD_ID == 988
    assert BUILTIN_EOS_IDS == tuple(tok.special_token_ids[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>"))
    assert tok.eos_token_ids == BUILTIN_EOS_IDS
    assert tok.special_token_ids == BUILTIN_TOKEN_IDS
    assert tok.template_format == "glm47"
    # GLM's order: [gMASK] = eos + 2, <sop> = eos + 4, <think> = eos + 21, /nothink = eos + 31
    assert BUILTIN_TOKEN_IDS["[gMASK]"] == 990 and BUILTIN_TOKEN_IDS["<sop>"] == 992
    assert BUILTIN_TOKEN_IDS["<think>"] == 1009 and BUILTIN_TOKEN_IDS["/nothink"] == 1019


def test_merges_are_deterministic_and_frozen():
    merges = train_merges(CORPUS, NUM_MERGES)
    assert merges == train_merges(CORPUS, NUM_MERGES)
    assert len(set(a + b for a, b in merges)) == NUM_MERGES  # every merge makes a new symbol
    digest = hashlib.sha256(json.dumps(merges).encode()).hexdigest()[:16]
    assert digest == FROZEN_MERGES_DIGEST, "built-in vocabulary changed: the default model's ids move"


FROZEN_MERGES_DIGEST = "a80d002b657aaba5"


def test_every_text_round_trips(tok):
    rng = random.Random(0)
    alphabet = "abc XYZ 019\n\t{}\"'<>/|" + "éßü你好世界🙂👍\u200b\U0001F600ΩЖ" + "".join(map(chr, range(0, 32)))
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        ids = tok.encode(text)
        assert all(0 <= i < BUILTIN_VOCAB_SIZE for i in ids)
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_are_single_ids_and_skipping(tok):
    text = "[gMASK]<sop><|user|>hi<|assistant|><think>r</think><tool_call>f<arg_key>k</arg_key>" \
           "<arg_value>v</arg_value></tool_call>/nothink<|observation|>"
    ids = tok.encode(text)
    for special in ("[gMASK]", "<sop>", "<|user|>", "<think>", "</tool_call>", "<arg_value>", "/nothink"):
        assert BUILTIN_TOKEN_IDS[special] in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    # role/control tokens are skipped, the think/tool tags stay for the parsers (as in GLM checkpoints)
    assert tok.decode(ids) == "hi<think>r</think><tool_call>f<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>/nothink"
    assert tok.encode("Hello")[0] != BUILTIN_TOKEN_IDS["[gMASK]"]  # no BOS added


def test_unknown_ids_decode_to_nothing(tok):
    hello = tok.encode("hello")
    assert tok.decode([-1, BUILTIN_VOCAB_SIZE, 151329, *hello, 10**9]) == "hello"


def test_bpe_compresses_corpus_text(tok):
    text = "The router receives the request and sends the prompt to a prefill worker."
    assert len(tok.encode(text)) < len(text.encode()) / 2.5


def test_written_dir_loads_like_checkpoint(tmp_path, tok):
    write_builtin_tokenizer(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    text = "Weather in Paris? 你好 <tool_call>x</tool_call>"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.eos_token_ids == BUILTIN_EOS_IDS and loaded.template_format == "glm47"
    msgs = [{"role": "user", "content": "Hi"}]
    assert loaded.apply_chat_template(msgs) == "[gMASK]<sop><|user|>Hi<|assistant|><think>"
    by_file = load_tokenizer(None, tokenizer=str(tmp_path / "tokenizer.json"))
    assert by_file.encode(text) == tok.encode(text)


def test_transformers_reads_the_written_dir(tmp_path, tok):
    from transformers import AutoTokenizer
    write_builtin_tokenizer(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "[gMASK]<sop><|user|>Hi 你好<|assistant|><think>"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert len(hf) == BUILTIN_VOCAB_SIZE
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "reasoning_content": "r"},
            {"role": "user", "content": "Bye"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(msgs)


def test_parser_tags_survive_skip_special_even_if_marked_special(tmp_path):
    """A checkpoint that marks <think>/<tool_call> special still shows them to the parsers."""
    write_builtin_tokenizer(str(tmp_path))
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    for added in raw["added_tokens"]:
        added["special"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    tok = load_tokenizer(str(tmp_path))
    ids = tok.encode("<|assistant|>r</think><tool_call>f<arg_key>k</arg_key><arg_value>v</arg_value></tool_call><|user|>")
    assert tok.decode(ids) == "r</think><tool_call>f<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>"
