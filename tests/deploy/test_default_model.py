"""The embedded default model: deterministic, GLM-4.7-Flash-shaped, built-in tokenizer, written once."""

import hashlib
import json
import os

from glmserve.deploy.default_model import ensure_default_model, write_default_model


def _digest(path: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            h.update(open(os.path.join(path, name), "rb").read())
    return h.hexdigest()


def test_default_model_is_deterministic_and_loads(tmp_path):
    from glmserve.shared.tokenizer import load_tokenizer
    from glmserve.shared.tokenizer.builtin import BUILTIN_EOS_IDS, BUILTIN_VOCAB_SIZE

    path = ensure_default_model(str(tmp_path))
    assert path == str(tmp_path / "default_model")
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["model_type"] == "glm4_moe_lite" and cfg["vocab_size"] == BUILTIN_VOCAB_SIZE
    assert cfg["num_nextn_predict_layers"] == 1
    tok = load_tokenizer(path, None)
    assert tok.vocab_size == BUILTIN_VOCAB_SIZE and set(BUILTIN_EOS_IDS) <= set(tok.eos_token_ids)
    assert tok.decode(tok.encode("hello fleet")) == "hello fleet"
    # a second start reuses it; a fresh write with the same seed has the same bytes
    mtime = os.path.getmtime(os.path.join(path, "config.json"))
    assert ensure_default_model(str(tmp_path)) == path
    assert os.path.getmtime(os.path.join(path, "config.json")) == mtime
    assert _digest(write_default_model(str(tmp_path / "again"))) == _digest(path)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".default_model.")] == []
