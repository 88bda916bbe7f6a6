"""`/tokenize`, `/detokenize` and `/version`, shaped as vLLM's: a prompt or chat messages to the token ids the
engine would see, token ids back to text."""

from __future__ import annotations

import asyncio
from importlib.metadata import version

from .chat import chat_prompt
from .protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from .serving import OpenAIServing


async def tokenize(serving: OpenAIServing, req: TokenizeRequest) -> TokenizeResponse:
    """Token ids as a completion (`prompt`) or a chat completion (`messages`, through the chat template) gets them."""
    serving.check_model(req.model)
    tokenizer = serving.engine.tokenizer
    if req.messages is not None:
        _, ids = await asyncio.to_thread(chat_prompt, tokenizer, req.messages, req.add_generation_prompt)
    else:
        ids = await asyncio.to_thread(tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens)
    strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=serving.engine.max_model_len, tokens=ids, token_strs=strs)


async def detokenize(serving: OpenAIServing, req: DetokenizeRequest) -> DetokenizeResponse:
    serving.check_model(req.model)
    serving.engine.engine.check_token_ids("tokens", req.tokens)
    return DetokenizeResponse(prompt=serving.engine.tokenizer.decode(req.tokens))


def server_version() -> VersionResponse:
    return VersionResponse(version=version("leapserve"))
