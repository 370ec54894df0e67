"""The engine in a terminal: `nanoseek generate` completes a prompt, `nanoseek chat` holds a conversation.

    nanoseek generate --model runs/tiny/model --prompt "def fib(n):" --max-tokens 64
    nanoseek chat --model runs/sft/model --temperature 0.7

Under torchrun every rank runs an engine with its share of the experts (serve/parallel.py); rank 0 reads and
prints.
"""

from __future__ import annotations

import sys

from nanoseek.serve.config import ChatConfig, GenerateConfig
from nanoseek.serve.engine import Engine
from nanoseek.serve.parallel import DataParallelFront, engine_for, run_as_worker


def generate(cfg: GenerateConfig) -> int:
    if (code := run_as_worker(cfg.model, cfg.engine)) is not None:
        return code
    engine = engine_for(cfg.model, cfg.engine)
    try:
        prompt: str | list[int] = cfg.prompt
        if cfg.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
        if not cfg.stream:
            print(engine.generate([prompt], cfg.sampling)[0].text)
            return 0
        for piece in engine.stream(prompt, cfg.sampling):
            print(piece, end="", flush=True)
        print()
        return 0
    finally:
        engine.close()


def chat(cfg: ChatConfig) -> int:
    if (code := run_as_worker(cfg.model, cfg.engine)) is not None:
        return code
    engine = engine_for(cfg.model, cfg.engine)
    try:
        converse(engine, cfg)
        return 0
    finally:
        engine.close()


def converse(engine: Engine | DataParallelFront, cfg: ChatConfig) -> None:
    """Read a message, stream the reply, until an empty line or end of input."""
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    print("nanoseek chat: type a message; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            user = input("you> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        prompt = engine.tokenizer.apply_chat_template(messages, tokenize=True)  # typed specials stay text
        reply = ""
        print("assistant> ", end="", flush=True)
        for piece in engine.stream(prompt, cfg.sampling):
            reply += piece
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})
