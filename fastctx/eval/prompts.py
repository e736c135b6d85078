"""Token ids of each request in SCBench's two shared-context modes.

- multi-turn: one conversation; turn t sees the *golden* answers of earlier turns as
  assistant messages, so every turn extends the previous prompt (KV reused by prefix caching);
- multi-request: each query is its own request over the same context (the context is
  the shared prefix);
- rag: each query is its own request whose context chunks (a task's documents, else pieces
  of ``RAG_CHUNK_TOKENS``) come in another order, led by another chunk, and are joined by
  CacheBlend's separator: only the chat template's head is a shared prefix (CacheBlend's
  setting). Chunks are tokenized on their own, so a chunk's tokens are the same in any order.

Prompts are rendered with the model's chat template and tokenized here, and requests
carry token ids, so the token counts reported are exactly what the engine prefilled.
"""

from __future__ import annotations

from fastctx.eval.tasks import TASKS, Session
from fastctx.eval.texts import token_ids

MODES = ("multi-turn", "multi-request", "rag")
RAG_CHUNK_TOKENS = 512
_CONTEXT = "\u0000CONTEXT\u0000"


def answer_text(answer) -> str:
    return ", ".join(answer) if isinstance(answer, list) else str(answer)


def messages(session: Session, turn: int, mode: str) -> list[dict]:
    task = TASKS[session.task]
    query = session.turns[0 if mode == "multi-turn" else turn]["input"]
    first = {"role": "user", "content": task.template.format(context=session.context, input=query)}
    if mode == "multi-request":
        return [first]
    if mode != "multi-turn":
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    msgs = [first]
    for t in range(1, turn + 1):
        msgs.append({"role": "assistant", "content": answer_text(session.turns[t - 1]["answer"])})
        msgs.append({"role": "user", "content": task.follow_up.format(input=session.turns[t]["input"])})
    return msgs


def prompt_ids(tokenizer, session: Session, turn: int, mode: str) -> list[int]:
    if mode == "rag":
        return rag_prompt_ids(tokenizer, session, turn)
    text = tokenizer.apply_chat_template(messages(session, turn, mode), add_generation_prompt=True,
                                         tokenize=False)
    return token_ids(tokenizer, text)


def rag_chunks(tokenizer, session: Session) -> list[list[int]]:
    if session.chunks:
        return [token_ids(tokenizer, c) for c in session.chunks]
    ids = token_ids(tokenizer, session.context)
    return [ids[i:i + RAG_CHUNK_TOKENS] for i in range(0, len(ids), RAG_CHUNK_TOKENS)]


def rag_prompt_ids(tokenizer, session: Session, turn: int) -> list[int]:
    from fastctx.cacheblend.params import BlendParams

    task = TASKS[session.task]
    user = task.template.format(context=_CONTEXT, input=session.turns[turn]["input"])
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)
    head, tail = text.split(_CONTEXT)
    sep = token_ids(tokenizer, BlendParams().separator)
    chunks = rag_chunks(tokenizer, session)
    lead = turn % len(chunks)
    ids = token_ids(tokenizer, head) + sep
    for chunk in chunks[lead:] + chunks[:lead]:
        ids += chunk + sep
    return ids + token_ids(tokenizer, tail)


def teacher_forced_ids(tokenizer, session: Session, turn: int) -> tuple[list[int], int]:
    """The query's own request followed by its golden answer, and where the answer starts:
    the engine's prompt logprobs over the answer span say how each method scores it."""
    prompt = prompt_ids(tokenizer, session, turn, "multi-request")
    return prompt + token_ids(tokenizer, answer_text(session.turns[turn]["answer"])), len(prompt)
