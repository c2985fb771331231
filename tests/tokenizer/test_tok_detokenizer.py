"""IncrementalDetokenizer: whole characters only, stop strings held back and cut, multi-token adds."""
import pytest

from glmserve.shared.tokenizer import IncrementalDetokenizer, load_tokenizer

TEXT = "Héllo 你好, world! 🙂👍 naïve café — done. <think>x</think> ЖΩ end"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _feed(tok, ids, chunk, stop=(), skip=True):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip, stop=list(stop))
    deltas = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.finish())
    return detok, deltas


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 1000])
def test_concatenation_is_the_full_decode_and_chars_never_split(tok, chunk):
    ids = tok.encode(TEXT)
    detok, deltas = _feed(tok, ids, chunk)
    assert "".join(deltas) == TEXT == detok.text
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_char_is_held_until_complete(tok):
    ids = tok.encode("🙂")  # 4 UTF-8 bytes, not merged in the built-in vocab: several ids
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok, True, [])
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🙂"


def test_truncated_character_is_flushed_by_finish(tok):
    ids = tok.encode("a🙂")[:-1]
    detok = IncrementalDetokenizer(tok, True, [])
    assert detok.add(ids) == "a"
    assert detok.finish() == "\ufffd"


@pytest.mark.parametrize("chunk", [1, 2, 4, 100])
def test_stop_string_cut_and_held(tok, chunk):
    text = "one two STO three STOP four"
    detok, deltas = _feed(tok, tok.encode(text), chunk, stop=["STOP"])
    assert "".join(deltas) == "one two STO three " == detok.text
    assert detok.stopped and detok.stop_str == "STOP"
    assert all("STOP" not in d for d in deltas)


def test_partial_stop_prefix_never_emitted_early(tok):
    detok = IncrementalDetokenizer(tok, True, ["</end>"])
    out = detok.add(tok.encode("abc </en"))
    assert out == "abc " and not detok.stopped
    assert detok.add(tok.encode("x")) == "</enx"
    assert detok.add(tok.encode(" </e")) == " "
    assert detok.finish() == "</e"  # never matched: flushed at the end


def test_earliest_of_several_stops_wins_and_later_adds_are_empty(tok):
    detok = IncrementalDetokenizer(tok, True, ["world", "lo w"])
    assert detok.add(tok.encode("hello world and more")) == "hel"
    assert detok.stop_str == "lo w" and detok.stopped
    assert detok.add(tok.encode("more")) == "" and detok.finish() == ""


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("hi<|user|>there")
    assert _feed(tok, ids, 1)[0].text == "hithere"
    assert _feed(tok, ids, 1, skip=False)[0].text == "hi<|user|>there"
    detok, _ = _feed(tok, ids, 1, stop=["<|user|>"], skip=False)
    assert detok.text == "hi" and detok.stopped


def test_unknown_ids_are_ignored(tok):
    detok = IncrementalDetokenizer(tok, True, [])
    assert detok.add([10**7, -5] + tok.encode("ok")) == "ok"
