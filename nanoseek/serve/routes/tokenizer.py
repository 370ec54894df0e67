"""vLLM's tokenizer routes: clients tokenise with the server's own tokenizer (lm-eval does). POST /tokenize,
POST /detokenize, GET /tokenizer_info."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from nanoseek.serve.errors import ApiError
from nanoseek.serve.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from nanoseek.serve.routes.common import ApiKey, ServiceDep, error_docs
from nanoseek.tokenizer import CHAT_TEMPLATE

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_docs(400, 401, 413))
async def tokenize(body: TokenizeRequest, service: ServiceDep, key: ApiKey) -> TokenizeResponse:
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "send a prompt or messages (one of them)", param="prompt")
    tokenizer = service.tokenizer
    if body.messages is not None:
        ids = await service.preprocess.chat_prompt(
            [m.template_dict() for m in body.messages],
            None,
            body.continue_final_message,
            add_generation_prompt=body.add_generation_prompt,
        )
    else:
        service.preprocess.check_text_length([body.prompt], "prompt")
        ids = await asyncio.to_thread(tokenizer.encode, body.prompt)
        ids = [tokenizer.bos_id, *ids] if body.add_special_tokens else ids
    strs = [tokenizer.tok.id_to_token(i) for i in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=service.context, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_docs(400, 401, 413))
async def detokenize(body: DetokenizeRequest, service: ServiceDep, key: ApiKey) -> DetokenizeResponse:
    tokenizer = service.tokenizer
    if any(not 0 <= t < tokenizer.vocab_size for t in body.tokens):
        raise ApiError(400, f"token ids must lie in [0, {tokenizer.vocab_size})", param="tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=error_docs(401))
async def tokenizer_info(service: ServiceDep, key: ApiKey) -> TokenizerInfo:
    tokenizer = service.tokenizer
    return TokenizerInfo(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        chat_template=CHAT_TEMPLATE,
        model_max_length=service.context,
        vocab_size=tokenizer.vocab_size,
    )
