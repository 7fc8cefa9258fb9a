"""The preflight (`duetlm.train.preflight`): its estimates against memory measured on tiny real models
on CPU (tensors' bytes after an AdamW step, a KV cache after a prefill, the bytes autograd saves in the
trainer's own log-prob pass), and `duetlm train --preflight` refusing the paper's config on one 80 GB
GPU with the fixes, from config.json files alone."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from duetlm.cli import app
from duetlm.train.preflight import ModelShape, activation_profile, estimate

TOL = 0.15


def storages_saved_in(fn) -> int:
    """Bytes of the distinct storages autograd saves while `fn()` runs (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def test_shape_counts_the_real_parameters(tiny_dir):
    from duetlm.models import load_model

    model, _ = load_model(str(tiny_dir), device="cpu")
    shape = ModelShape.of(str(tiny_dir))
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.layers == model.config.num_hidden_layers and shape.vocab == model.config.vocab_size


def test_model_state_estimate_equals_the_bytes_after_an_adamw_step(tiny_dir, tiny_llama_dir, tmp_path):
    from conftest import tiny_train_config
    from duetlm.models import load_model

    cfg = tiny_train_config(
        tmp_path, tiny_dir, tiny_llama_dir, {"large": {"dtype": "float32"}}, mode="single"
    )
    report = estimate(cfg, accelerator=False)
    want = sum(
        it.nbytes
        for it in report.items
        if it.model == "M" and it.phase == "resident" and "reference" not in it.what
    )
    model, _ = load_model(str(tiny_dir), device="cpu", trainable=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    opt.step()
    got = sum(p.nbytes + p.grad.nbytes for p in model.parameters())
    got += sum(v.nbytes for state in opt.state.values() for k, v in state.items() if k != "step")
    assert abs(got - want) / got < 0.01, (got, want)


def test_kv_cache_estimate_equals_a_real_cache(tiny_dir):
    from duetlm.models import load_model

    model, _ = load_model(str(tiny_dir), device="cpu")
    shape = ModelShape.of(str(tiny_dir))
    batch, tokens = 3, 40
    with torch.no_grad():
        out = model(input_ids=torch.randint(5, 300, (batch, tokens)), use_cache=True)
    cache = out.past_key_values
    got = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert got == batch * tokens * shape.kv_bytes_per_token(4)


def _update_pass(model, prompt: int, response: int, checkpointing: bool):
    """The trainer's log-prob pass (train.update.micro_logprobs) over one sample, gradients on."""
    from duetlm.train.records import Samples
    from duetlm.train.update import UpdateSpec, micro_logprobs

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    gen = torch.Generator().manual_seed(0)
    samples = Samples(
        prompt_ids=[torch.randint(5, 300, (prompt,), generator=gen).tolist()],
        token_ids=[torch.randint(5, 300, (response,), generator=gen).tolist()],
        texts=[""],
        finish=["length"],
        owner=torch.tensor([0]),
    )
    spec = UpdateSpec(1, 1, "token-mean", 0.2, None, response, 1.0, False, None, share_prompts=False)
    return lambda: micro_logprobs(model, samples, [0], 0, spec)


def test_activation_estimate_is_within_15_percent_of_what_autograd_saves(tiny_tokenizer, tmp_path):
    """The estimated update activations (without the logits' gradient, which exists only in the
    backward) against the bytes the trainer's forward saves, gradient checkpointing off and on."""
    from duetlm.models import save_pretrained, tiny_model

    model = tiny_model(tiny_tokenizer, arch="qwen3", hidden_size=128, num_layers=3, num_heads=4, seed=3)
    path = save_pretrained(model, tiny_tokenizer, tmp_path / "m")
    shape = ModelShape.of(str(path))
    prompt, response = 96, 64
    tokens = prompt + response
    for ckpt in (False, True):
        acts = activation_profile(shape, checkpointing=ckpt)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        _, seen = storages_saved_in(_update_pass(model, prompt, response, ckpt))
        got = sum(n for ptr, n in seen.items() if ptr not in params)
        want = shape.layers * acts.layer(tokens) + acts.base(tokens) + response * shape.vocab * 4
        assert abs(got - want) / got < TOL, (ckpt, got, want)


QWEN3 = {
    "M": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    "m": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
}


def _config_dirs(tmp_path):
    """config.json of Qwen3-4B and Qwen3-0.6B (no weights): what the preflight reads."""
    from transformers import Qwen3Config

    dirs = {}
    for role, dims in QWEN3.items():
        cfg = Qwen3Config(
            **dims, num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True
        )
        cfg.save_pretrained(tmp_path / role)
        dirs[role] = str(tmp_path / role)
    return dirs


def test_cli_preflight_refuses_the_paper_config_on_one_80gb_gpu_and_names_the_fixes(tmp_path):
    dirs = _config_dirs(tmp_path)
    base = ["train", "--config", "configs/paper/duet-qwen3-4b-0.6b-deepscaler.yaml", "--preflight"]
    base += ["--set", f"large.path={dirs['M']}", "--set", f"small.path={dirs['m']}", "--gpu-memory", "80"]
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 1, r.output
    assert "| cuda:0 | M | frozen reference (KL) | resident | 16.09 |" in r.output
    assert "| cuda:0 | M | KV cache: 16 x 17,408 tokens | generation | 82.14 |" in r.output
    assert "resident 89.99" in r.output  # docs/distributed.md's hand count: 89.9 GB
    assert "does not fit: cuda:0: needs" in r.output and "large.lora=true" in r.output
    # LoRA on M and 2 sequences decoded at once fit: the table, exit 0
    ok = CliRunner().invoke(app, [*base, "--set", "large.lora=true", "--set", "rollout.engine_batch_size=2"])
    assert ok.exit_code == 0, ok.output
    assert "LoRA adapter weights" in ok.output and "frozen reference" not in ok.output


def test_train_runs_the_preflight_first_on_a_gpu_and_an_unreadable_config_only_warns(
    tmp_path, tiny_dir, tiny_llama_dir, monkeypatch
):
    """Where CUDA is present `duetlm train` runs the preflight before loading anything (here the
    probe is made to say so; the tiny models then train on CPU, where nothing is capped); a model it
    cannot read (a .gguf file) is a warning there, while `--preflight` itself fails on it."""
    import yaml

    import duetlm.cli as cli
    from conftest import arithmetic_problems, tiny_train_config
    from duetlm.train import preflight

    calls = []
    real = preflight.estimate
    monkeypatch.setattr(cli, "_has_cuda", lambda: True)
    monkeypatch.setattr(preflight, "estimate", lambda *a, **k: calls.append(1) or real(*a, **k))
    import json

    problems = tmp_path / "problems.jsonl"
    rows = [{"id": p.id, "question": p.question, "answer": p.answer} for p in arithmetic_problems(4)]
    problems.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = tiny_train_config(
        tmp_path, tiny_dir, tiny_llama_dir, {"data": {"source": str(problems)}}, run={"steps": 1}
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    r = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert r.exit_code == 0, r.output
    assert calls == [1] and "step 1/1" in r.output
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not a model")
    r = CliRunner().invoke(
        app, ["train", "--config", str(path), "--set", f"large.path={gguf}", "--preflight"]
    )
    assert r.exit_code == 1 and "preflight: cannot read the config" in r.output
    r = CliRunner().invoke(app, ["train", "--config", str(path), "--set", f"large.path={gguf}"])
    assert (
        "warning: preflight skipped: preflight: cannot read the config" in r.output
    )  # then training's own error
