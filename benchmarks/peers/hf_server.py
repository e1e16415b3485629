"""The ``transformers`` peer: what a user writes by hand to stream a Hugging Face causal LM over
HTTP. FastAPI on uvicorn (one process), ``POST /v1/completions`` with ``stream: true`` as
OpenAI's server-sent events, and ``model.generate`` run in a thread per request that feeds a
streamer, as Hugging Face's streaming docs show.

Two departures from the docs' snippet, both so that it measures what the others measure:
- The streamer hands over every token as it is made (a ``BaseStreamer`` with a queue, decoded
  incrementally). ``TextIteratorStreamer`` holds text back until a word ends, which would make
  its "tokens" words and its TTFT the first word's.
- ``--mode lock`` runs one generation at a time (the other requests wait); the default
  ``thread`` mode lets every request's ``generate`` run at once in its own thread (each a batch
  of 1: ``generate`` does not batch requests that arrive separately). ``--mode cb`` is
  transformers' own continuous batching instead of ``generate``: ``ContinuousBatchingManager``
  (``model.init_continuous_batching()``, paged attention ``paged|eager`` on CPU), a streaming
  request per HTTP request and a result handler per stream (what ``transformers serve`` builds on).

Prompts are encoded as maas-ray encodes them: the BOS first when the config names one
(``maas_bos`` in the checkpoint's ``generation_config.json``), then the text without special
tokens. ``ignore_eos: true`` makes it generate ``max_tokens`` (``min_new_tokens``).

    python -m benchmarks.peers.hf_server --model-dir /tmp/lm-hf --port 8210 [--mode lock] [--threads 2]
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class.
import argparse
import asyncio
import json
import threading
import time
import uuid
from typing import Optional


def build_app(model_dir: str, mode: str = "thread", threads: int = 2, model_name: str = "lm"):
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, **({"attn_implementation": "paged|eager"} if mode == "cb" else {})).eval()
    with open(f"{model_dir}/generation_config.json") as f:
        gen_cfg = json.load(f)
    bos: Optional[int] = gen_cfg.get("maas_bos")
    eos: int = gen_cfg["eos_token_id"]
    one_at_a_time = threading.Lock() if mode == "lock" else None
    manager = None
    if mode == "cb":
        from transformers import GenerationConfig

        manager = model.init_continuous_batching(generation_config=GenerationConfig(
            do_sample=False, eos_token_id=eos, pad_token_id=eos, max_new_tokens=64))
        manager.start()
    app = FastAPI()

    class TokenStreamer(BaseStreamer):
        """Every new token id into a queue; ``None`` when generation ends."""

        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self.loop, self.q = loop, asyncio.Queue()
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() first puts the prompt
                self.prompt_seen = True
                return
            self.loop.call_soon_threadsafe(self.q.put_nowait, value.reshape(-1).tolist())

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.q.put_nowait, None)

    def encode(prompt: str) -> list[int]:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        return ([bos] if bos is not None else []) + ids

    def run_generate(ids: list[int], max_tokens: int, ignore_eos: bool, temperature: float, streamer) -> None:
        kwargs = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=max_tokens, streamer=streamer, pad_token_id=eos, eos_token_id=eos,
                      do_sample=temperature > 0, **({"temperature": temperature} if temperature > 0 else {}),
                      **({"min_new_tokens": max_tokens} if ignore_eos else {}))
        try:
            with torch.no_grad():
                if one_at_a_time is None:
                    model.generate(**kwargs)
                else:
                    with one_at_a_time:
                        model.generate(**kwargs)
        finally:
            streamer.end()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return JSONResponse({"error": {"message": "prompt must be a non-empty string"}}, status_code=400)
        ids = encode(prompt)
        max_tokens = int(body.get("max_tokens", 16))
        temperature = float(body.get("temperature", 1.0))
        ignore_eos = bool(body.get("ignore_eos", False))
        loop = asyncio.get_running_loop()
        streamer = TokenStreamer(loop)
        if manager is not None:
            seen = [0]

            def on_result(result) -> None:  # on this loop (call_soon_threadsafe), per new token
                new = list(result.generated_tokens[seen[0]:])
                seen[0] += len(new)
                if new:
                    streamer.q.put_nowait(new)
                if result.is_finished():
                    streamer.q.put_nowait(None)

            rid_cb = uuid.uuid4().hex
            manager.register_result_handler(rid_cb, on_result)
            manager.add_request(ids, request_id=rid_cb, max_new_tokens=max_tokens, streaming=True)
        else:
            threading.Thread(target=run_generate, args=(ids, max_tokens, ignore_eos, temperature, streamer),
                             daemon=True).start()
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        async def tokens():
            out: list[int] = []
            text_so_far = ""
            while True:
                new = await streamer.q.get()
                if new is None:
                    break
                out.extend(new)
                text = tokenizer.decode(out, skip_special_tokens=True)
                delta, text_so_far = text[len(text_so_far):], text  # incremental detokenization
                yield new, delta, out
            finish = "length" if len(out) >= max_tokens else "stop"
            yield None, finish, out

        if not body.get("stream"):
            text, out, finish = "", [], "stop"
            async for new, delta, out in tokens():
                if new is None:
                    finish = delta
                else:
                    text += delta
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish}],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out),
                              "total_tokens": len(ids) + len(out)}}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def sse():
            async for new, delta, out in tokens():
                choice = ({"index": 0, "text": delta, "finish_reason": None} if new is not None
                          else {"index": 0, "text": "", "finish_reason": delta})
                yield "data: " + json.dumps({"id": rid, "object": "text_completion", "created": created,
                                              "model": model_name, "choices": [choice]}) + "\n\n"
                if new is None and include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": "text_completion", "created": created,
                                                  "model": model_name, "choices": [], "usage": {
                                                      "prompt_tokens": len(ids), "completion_tokens": len(out),
                                                      "total_tokens": len(ids) + len(out)}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def main(argv: Optional[list[str]] = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--port", type=int, default=8210)
    p.add_argument("--mode", choices=("thread", "lock", "cb"), default="thread")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--model-name", default="lm")
    a = p.parse_args(argv)
    uvicorn.run(build_app(a.model_dir, a.mode, a.threads, a.model_name), host="127.0.0.1", port=a.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
