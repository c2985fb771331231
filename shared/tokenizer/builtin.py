"""The project's own tokenizer for the embedded default model: byte-level BPE + GLM special tokens.

Runs in the router and in tests (and wherever a tiny model dir is written). Layout of the ids
(BUILTIN_VOCAB_SIZE = 1024 in all, deterministic, no randomness and no network):
  0..255      the 256 bytes, in byte order, as GPT-2 byte-level symbols (every UTF-8 text encodes)
  256..987    732 BPE merges learned greedily on `corpus.CORPUS` (ties -> smallest pair)
  988..1023   GLM's added tokens in the order of the real tokenizer (spec §6.1), `<|endoftext|>` first
Role / control tokens are "special" (dropped by skip_special_tokens); the think / tool / arg tags
and `/nothink` are added but not special, as in the GLM checkpoints, so parsers still see them.
`write_builtin_tokenizer(dir)` writes tokenizer.json + tokenizer_config.json (GLM-4.7 template) so
the dir loads like a real checkpoint through `load_tokenizer` or transformers' AutoTokenizer.
"""
import functools
import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from glmserve.shared.tokenizer.corpus import CORPUS
from glmserve.shared.tokenizer.templates import GLM47_TEMPLATE

# (content, special) in the order of the GLM-4.5/4.6/4.7 tokenizer (151329 ... 151364).
GLM_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("[MASK]", True), ("[gMASK]", True), ("[sMASK]", True),
    ("<sop>", True), ("<eop>", True), ("<|system|>", True), ("<|user|>", True),
    ("<|assistant|>", True), ("<|observation|>", True), ("<|begin_of_image|>", True),
    ("<|end_of_image|>", True), ("<|begin_of_video|>", True), ("<|end_of_video|>", True),
    ("<|begin_of_audio|>", True), ("<|end_of_audio|>", True), ("<|begin_of_transcription|>", True),
    ("<|end_of_transcription|>", True), ("<|code_prefix|>", True), ("<|code_middle|>", True),
    ("<|code_suffix|>", True), ("<think>", False), ("</think>", False), ("<tool_call>", False),
    ("</tool_call>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<arg_key>", False), ("</arg_key>", False), ("<arg_value>", False), ("</arg_value>", False),
    ("/nothink", False), ("<|begin_of_box|>", True), ("<|end_of_box|>", True),
    ("<|image|>", True), ("<|video|>", True),
)
BUILTIN_VOCAB_SIZE = 1024
NUM_BYTE_TOKENS = 256
NUM_MERGES = BUILTIN_VOCAB_SIZE - NUM_BYTE_TOKENS - len(GLM_ADDED_TOKENS)  # 732
FIRST_ADDED_ID = NUM_BYTE_TOKENS + NUM_MERGES  # 988
BUILTIN_TOKEN_IDS: dict[str, int] = {tok: FIRST_ADDED_ID + i for i, (tok, _) in enumerate(GLM_ADDED_TOKENS)}
BUILTIN_PAD_ID = BUILTIN_TOKEN_IDS["<|endoftext|>"]
BUILTIN_EOS_IDS: tuple[int, ...] = tuple(BUILTIN_TOKEN_IDS[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>"))


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable symbol table (index = byte value), as tokenizers' ByteLevel uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _pair_counts(words: list[list[str]], counts: list[int]):
    pair_count: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for w, (word, n) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_count[pair] = pair_count.get(pair, 0) + n
            where.setdefault(pair, set()).add(w)
    return pair_count, where


def _merge_word(word: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on the byte-level pre-tokenized `text`; most frequent pair first, ties by pair order."""
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)
    word_count: dict[str, int] = {}
    for piece, _ in pieces:
        word_count[piece] = word_count.get(piece, 0) + 1
    words = [list(w) for w in word_count]
    counts = list(word_count.values())
    pair_count, where = _pair_counts(words, counts)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        best_n = max(pair_count.values())
        best = min(p for p, n in pair_count.items() if n == best_n)
        merges.append(best)
        for w in sorted(where.pop(best)):
            for pair in zip(words[w], words[w][1:]):  # remove this word's old pairs
                pair_count[pair] -= counts[w]
                if pair_count[pair] == 0:
                    del pair_count[pair]
                where.get(pair, set()).discard(w)
            words[w] = _merge_word(words[w], best)
            for pair in zip(words[w], words[w][1:]):
                pair_count[pair] = pair_count.get(pair, 0) + counts[w]
                where.setdefault(pair, set()).add(w)
        if not pair_count and len(merges) < num_merges:
            raise ValueError(f"corpus too small for {num_merges} merges")
    return merges


@functools.lru_cache(maxsize=1)
def builtin_tokenizer_json() -> str:
    """tokenizer.json text of the built-in tokenizer (deterministic; cached per process)."""
    vocab = {sym: i for i, sym in enumerate(bytes_to_unicode())}
    merges = train_merges(CORPUS, NUM_MERGES)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) == FIRST_ADDED_ID, "merges must create new symbols only"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    for content, special in GLM_ADDED_TOKENS:
        added = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    assert tok.get_vocab_size(with_added_tokens=True) == BUILTIN_VOCAB_SIZE
    return tok.to_str()


def builtin_tokenizer_config() -> dict:
    """tokenizer_config.json contents: special tokens, GLM-4.7 chat template, no BOS."""
    added = {
        str(BUILTIN_TOKEN_IDS[tok]): {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }
        for tok, special in GLM_ADDED_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "model_max_length": 131072,
        "padding_side": "left",
        "chat_template": GLM47_TEMPLATE,
    }


def write_builtin_tokenizer(model_dir: str) -> None:
    """Write tokenizer.json and tokenizer_config.json of the built-in tokenizer into `model_dir`."""
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(builtin_tokenizer_json())
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(builtin_tokenizer_config(), f, ensure_ascii=False, indent=2)
