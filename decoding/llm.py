"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from typing import cast

from tqdm import tqdm

from .config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from .engine import LLMEngine
from .observe import Clock, StepObserver
from .outputs import RequestOutput
from .sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(
        self,
        model: str = ModelConfig.model,
        *,
        decoder: str | None = None,
        speculative_config: dict | None = None,
        diffusion_config: dict | None = None,
        dtype: str = ModelConfig.dtype,
        device: str = ModelConfig.device,
        max_model_len: int | None = None,
        max_num_seqs: int = SchedulerConfig.max_num_seqs,
        kv_cache_tokens: int | None = None,
        block_size: int = CacheConfig.block_size,
        trust_remote_code: bool = ModelConfig.trust_remote_code,
        model_impl: str = ModelConfig.model_impl,
        enforce_eager: bool = ModelConfig.enforce_eager,
        seed: int = EngineConfig.seed,
        config: EngineConfig | None = None,
        clock: Clock = time.perf_counter,
        observers: Seq[StepObserver] = (),
    ):
        """Either pass the common options, or a whole `EngineConfig` (as `leapserve serve` builds it). `clock` and
        `observers`: the engine's observation seam (`leapserve.decoding.observe`)."""
        if config is None:
            config = EngineConfig(
                model=ModelConfig(
                    model=model,
                    dtype=dtype,
                    device=device,
                    max_model_len=max_model_len,
                    trust_remote_code=trust_remote_code,
                    model_impl=model_impl,
                    enforce_eager=enforce_eager,
                ),
                cache=CacheConfig(block_size=block_size, kv_cache_tokens=kv_cache_tokens),
                scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
                decoder=decoder,
                speculative_config=speculative_config,
                diffusion_config=diffusion_config,
                seed=seed,
            )
        self.engine = LLMEngine(config, clock=clock, observers=observers)
        self._counter = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_path(self):
        return self.engine.model_path

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids), batched by the engine; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            batch = [cast(Prompt, prompts)]  # one prompt: text, or token ids
        else:
            batch = list(cast(Seq[Prompt], prompts))
        params = params or SamplingParams()
        params_list = [params] * len(batch) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(batch):
            raise ValueError(f"{len(batch)} prompts but {len(params_list)} SamplingParams")
        ids = []
        for prompt, p in zip(batch, params_list):
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = str(self._counter)
            self._counter += 1
            self.engine.add_request(request_id, token_ids, p, prompt if isinstance(prompt, str) else None)
            ids.append(request_id)
        return self._run(ids, use_tqdm)

    def chat(
        self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None, *, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
        ]
        token_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(token_ids, params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for req in self.engine.step():
                    if req.finished:
                        done[req.request_id] = req.output()
                        bar.update(1)
        return [done[i] for i in request_ids]
