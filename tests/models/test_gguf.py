"""GGUF import (`from_pretrained("x.gguf")`) and `kdjax convert`, on tiny GGUF files
written here with the `gguf` package: float32 tensors (no quantization) under llama.cpp's
names and layouts (llama's q/k rows permuted), a byte-level BPE tokenizer with merges,
special tokens and a chat template. transformers' own GGUF loader is the reference."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed "
                           "(pip install 'kdjax[gguf]')")
pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdjax.cli import main  # noqa: E402
from kdjax.models import from_pretrained  # noqa: E402
from kdjax.models.gguf import convert_gguf  # noqa: E402
from tests.models.test_checkpoint import _same_params  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

PARITY = dict(rtol=0, atol=1e-4)  # |kdjax f32 - torch f64|, as tests/models/test_parity.py
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ in"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
TEXTS = ["the cat sat in the hat", "a tiny gguf in the test"]

# name -> (GGUF architecture, transformers config class, config kwargs)
CASES = {
    "llama": ("llama", "LlamaConfig", dict(num_key_value_heads=2)),
    "llama_tied_mqa": ("llama", "LlamaConfig", dict(num_key_value_heads=1,
                                                    tie_word_embeddings=True)),
    "qwen2": ("qwen2", "Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}
ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}


def _tokens() -> tuple[list[str], list[int]]:
    """A byte-level BPE vocabulary: the 256 byte symbols, one token per merge, the
    specials (token type 3, control)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    return tokens + SPECIALS, [1] * len(tokens) + [3] * len(SPECIALS)


def _torch_model(name: str):
    """A random float32 transformers model whose every parameter matters."""
    _arch, cls_name, kw = CASES[name]
    vocab = len(_tokens()[0])
    config = getattr(transformers, cls_name)(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, rms_norm_eps=1e-5, max_position_embeddings=64,
        bos_token_id=vocab - 3, eos_token_id=vocab - 1, **kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in pname
                    else 0.1 * torch.randn_like(p))
    return model.eval()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py `LlamaModel.permute`)."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path, model, arch: str, *, name: str = "tiny") -> None:
    """Writes `model` as llama.cpp's convert_hf_to_gguf.py would, in float32."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, types = _tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(ARCH[arch], cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # a tied GGUF has no output.weight
        base, suffix = hf_name.rsplit(".", 1)
        w = tensor.numpy().astype(np.float32)
        if arch == "llama" and base.endswith("q_proj") and suffix == "weight":
            w = _permute(w, cfg.num_attention_heads)
        if arch == "llama" and base.endswith("k_proj") and suffix == "weight":
            w = _permute(w, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (gguf path, the original torch model, transformers' model of the GGUF)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(f"gguf_{name}") / f"{name}.gguf"
            original = _torch_model(name)
            write_gguf(path, original, CASES[name][0])
            loaded = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32,
                attn_implementation="eager").eval()
            cache[name] = (path, original, loaded)
        return cache[name]

    return get


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model.double()(torch.as_tensor(tokens)).logits.numpy()


def _batch(tokenizer):
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    n = min(len(i) for i in ids)
    return np.asarray([i[:n] for i in ids], np.int32)


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_reads_the_tiny_gguf_back_exactly(tiny, name):
    """The writer is right: transformers' GGUF model is the original, bit for bit."""
    _path, original, loaded = tiny(name)
    want, got = original.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", list(CASES))
def test_from_pretrained_gguf_equals_transformers(tiny, name, tmp_path, rng):
    path, original, loaded = tiny(name)
    model = from_pretrained(path)
    assert model.config.family == CASES[name][0]
    assert model.config.tie_word_embeddings == loaded.config.tie_word_embeddings
    tokens = rng.integers(0, model.config.vocab_size, (2, 7)).astype(np.int32)
    assert_close(model(tokens).logits, _torch_logits(loaded, tokens), **PARITY)
    # the same parameters as the original checkpoint loaded from safetensors
    original.save_pretrained(tmp_path)
    _same_params(model, from_pretrained(tmp_path))


def test_gguf_text_through_its_tokenizer_and_dtype(tiny):
    path, _original, loaded = tiny("llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokens = _batch(tokenizer)
    assert tokens.shape[1] >= 4 and tokens.max() < tokenizer.vocab_size + len(SPECIALS)
    model = from_pretrained(path, param_dtype="bfloat16", dtype="bfloat16", remat="full")
    assert model.config.param_dtype == "bfloat16" and model.config.remat == "full"
    assert str(model.embed[...].dtype) == "bfloat16"
    assert_close(model(tokens).logits, _torch_logits(loaded, tokens), rtol=0, atol=0.1)


@pytest.mark.parametrize("name", ["llama", "llama_tied_mqa"])
def test_convert_writes_a_directory_transformers_loads(tiny, name, tmp_path, rng, capsys):
    path, _original, loaded = tiny(name)
    out = tmp_path / "hf"
    assert main(["convert", str(path), "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert f"LlamaForCausalLM, 2 layers, vocab {len(_tokens()[0])}," in summary, summary
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= names, names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    converted = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager").eval()
    tokens = rng.integers(0, config["vocab_size"], (2, 7)).astype(np.int32)
    np.testing.assert_array_equal(_torch_logits(converted, tokens),
                                  _torch_logits(loaded, tokens))
    _same_params(from_pretrained(out), from_pretrained(path))
    # the tokenizer: same ids, specials and chat template as the GGUF's
    want = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    got = transformers.AutoTokenizer.from_pretrained(out)
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>"]:
        assert got(text)["input_ids"] == want(text)["input_ids"], text
    chat = [{"role": "user", "content": "the hat"}]
    assert (got.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == want.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert got.eos_token == "<|im_end|>"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == loaded.config.eos_token_id


def test_convert_bfloat16(tiny, tmp_path):
    path, _original, _loaded = tiny("qwen2")
    summary = convert_gguf(path, tmp_path / "hf", dtype="bfloat16")
    assert summary["architecture"] == "Qwen2ForCausalLM" and summary["dtype"] == "bfloat16"
    assert summary["bytes"] == sum(p.stat().st_size for p in (tmp_path / "hf").iterdir())
    model = from_pretrained(tmp_path / "hf")
    assert str(model.layers.attn.q.kernel[...].dtype) == "float32"  # kdjax's default
    from kdjax.models.safetensors_io import open_tensors

    tensors = open_tensors(tmp_path / "hf")
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    with pytest.raises(ValueError, match="dtype='int8'"):
        convert_gguf(path, tmp_path / "other", dtype="int8")


def test_convert_refuses_an_existing_out_and_overwrites_atomically(tiny, tmp_path, capsys):
    path = tiny("llama")[0]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists" in err and "--overwrite" in err, err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["convert", str(path), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_failed_convert_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    path = tiny("llama")[0]

    def broken_save(self, directory, **kw):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(path, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
    # with --overwrite, the old directory survives a failure untouched
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(path, tmp_path / "hf", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    def convert(src):
        status = main(["convert", str(src), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1, err
        return err

    assert "does not exist" in convert(tmp_path / "missing.gguf")
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    assert "is not a GGUF file" in convert(text)
    assert "is a directory" in convert(tmp_path)
    phi = tmp_path / "phi.gguf"  # a valid header of an architecture kdjax lacks
    writer = gguf.GGUFWriter(str(phi), "phi3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    err = convert(phi)
    assert "unsupported GGUF architecture" in err and "'phi3'" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="unsupported GGUF architecture"):
        from_pretrained(phi)


def test_missing_extra_names_it(tiny, tmp_path, monkeypatch, capsys):
    path = tiny("llama")[0]
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'kdjax\[gguf\]'"):
        from_pretrained(path)
    assert main(["convert", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'kdjax[gguf]'" in err and len(err.splitlines()) == 1, err
