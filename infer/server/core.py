"""Request handling shared by the endpoints: validation into engine options, submission, the chat plan (prompt,
grammar, answer parsing), response pieces (logprobs, usage, stop strings, server-sent events)."""

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any

from infer import structured
from infer.chat import CLIENT_EFFORTS, ChatParser, ReasoningPolicy, encode_chat, model_efforts, normalize_messages
from infer.engine.engine import Engine, QueueFull, RequestOutput, SamplingOptions
from infer.server.schemas import ChatRequest, CompletionRequest, HTTPError, CommonRequest
from small4_jax.errors import InputError


@dataclasses.dataclass
class ChatPlan:
    """A chat request made ready for the engine: its prompt, grammar, and how to parse its answers."""

    prompt: Any  # infer.chat.ChatPrompt
    grammar: str | None
    logprobs: int | None
    tokenizer: Any
    parse_tools: bool
    max_calls: int | None  # 1 for a named tool_choice without parallel_tool_calls

    def parser(self) -> ChatParser:
        parser = ChatParser(self.tokenizer, parse_tools=self.parse_tools)
        for t in self.prompt.forced:
            parser.push(t)
        return parser

    def parse(self, ids) -> ChatParser:
        parser = self.parser()
        for t in ids:
            parser.push(t)
        parser.finish()
        if self.max_calls is not None:
            del parser.tool_calls[self.max_calls:]
        return parser


class Server:
    """Request handling shared by the endpoints: validation into engine options, submission, the chat plan,
    response pieces (logprobs, usage)."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
                 image_dir: str | None = None, reasoning: ReasoningPolicy = ReasoningPolicy()):
        self.engine = engine
        self.reasoning = reasoning  # client reasoning_effort values -> the model's
        self.image_dir = image_dir  # image parts may name files under it (None: data: URLs only)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_names = {model_name}  # what a request's `model` may say
        self.api_key = api_key
        self.started = time.time()
        self.http_counts: dict[tuple[str, int], int] = {}

    # -- validation --
    def options(self, req: CommonRequest, prompt_len: int, logprobs: int | None, grammar: str | None = None,
                detokenize: bool = True, prompt_logprobs: int | None = None) -> SamplingOptions:
        if req.model is not None and req.model not in self.model_names and req.model not in self.adapters():
            raise HTTPError(400, f"model {req.model!r} is not served here; GET /v1/models lists "
                                 f"{', '.join(map(repr, sorted(self.model_names | set(self.adapters()))))}",
                            param="model")
        context = self.engine.max_model_len
        prompt_field = "prompt" if isinstance(req, CompletionRequest) else "messages"
        if prompt_len >= context:
            raise HTTPError(400, f"prompt has {prompt_len} tokens but the model's context is {context}; "
                                 "shorten the prompt", param=prompt_field)
        field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        max_tokens = getattr(req, field)
        if max_tokens is None:
            max_tokens = context - prompt_len
        elif max_tokens == 0 and prompt_logprobs is not None:
            pass  # echo with logprobs: the prompt's log-probabilities only
        elif max_tokens <= 0:
            raise HTTPError(400, f"{field} must be positive (0 only with echo and logprobs), got {max_tokens}",
                            param=field)
        elif prompt_len + max_tokens > context:
            raise HTTPError(400, f"prompt ({prompt_len} tokens) + {field} ({max_tokens}) exceeds the model's "
                                 f"context of {context} tokens", param=field)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        bias = None
        if req.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in req.logit_bias.items()}
            except ValueError:
                raise HTTPError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias") \
                    from None
        if req.seed is not None and req.random_seed is not None and req.seed != req.random_seed:
            raise HTTPError(400, f"seed ({req.seed}) and random_seed ({req.random_seed}) differ; send one",
                            param="random_seed")
        seed = req.seed if req.seed is not None else req.random_seed
        try:
            return SamplingOptions(
                max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
                min_p=req.min_p, seed=seed, stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos, logprobs=logprobs, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty, logit_bias=bias,
                grammar=grammar, detokenize=detokenize, prompt_logprobs=prompt_logprobs,
            )
        except InputError as e:
            msg = str(e)
            raise HTTPError(400, msg, param=msg.split(" ", 1)[0] if msg.split(" ", 1)[0] in CommonRequest.model_fields
                            else None) from None

    def adapters(self) -> dict:
        """The LoRA adapters served (name -> adapter), selected by a request's `model` (small4_jax/lora/multi.py)."""
        lora = getattr(self.engine, "lora", None)
        return {} if lora is None else dict(lora.adapters)

    def adapter_for(self, model: str | None) -> str | None:
        return model if model is not None and model not in self.model_names and model in self.adapters() else None

    def submit(self, prompt: list[int], options: SamplingOptions, n: int = 1, cache_salt: str | None = None,
               images=(), image_hashes=(), adapter: str | None = None, events: asyncio.Queue | None = None,
               first: int = 0):
        """Queue the n choices of a request; returns (their engine ids, asyncio queue of (choice, RequestOutput)).
        events, first: put the events on this queue, the choices numbered from `first` (several prompts in one
        completion request).

        Choices after the first are admitted once the first has cached its prompt pages (`Engine.submit(after=)`),
        so the prompt is computed once; a seeded request gives choice i the seed seed + i."""
        loop = asyncio.get_running_loop()
        events = asyncio.Queue() if events is None else events
        rids: list[str] = []
        base = f"r-{uuid.uuid4().hex[:16]}"
        try:
            for i in range(first, first + n):
                opts = options
                if i > first and options.seed is not None:
                    opts = dataclasses.replace(options, seed=(options.seed + i - first) % 2**32)

                def callback(out: RequestOutput, i=i):
                    loop.call_soon_threadsafe(events.put_nowait, (i, out))

                rids.append(self.engine.submit(prompt, opts, callback=callback, request_id=f"{base}-{i}",
                                               after=rids[0] if rids else None, cache_salt=cache_salt,
                                               images=images, image_hashes=image_hashes, adapter=adapter))
        except (QueueFull, InputError) as e:
            for rid in rids:
                self.engine.cancel(rid)
            if isinstance(e, QueueFull):
                raise HTTPError(429, str(e), kind="rate_limit_error") from None
            raise HTTPError(400, str(e)) from None
        return rids, events

    def need_tokenizer(self):
        if self.tokenizer is None:
            raise HTTPError(400, "this server has no tokenizer")
        return self.tokenizer

    def cancel_all(self, rids) -> None:
        for rid in rids:
            self.engine.cancel(rid)

    def reasoning_effort(self, req: ChatRequest) -> str | None:
        """The model's reasoning_effort for a request: `reasoning_effort`, `reasoning.effort` or Mistral's
        `prompt_mode: "reasoning"`, through the server's ReasoningPolicy."""
        effort = req.reasoning_effort
        if req.reasoning is not None:
            given = req.reasoning.get("effort")
            if set(req.reasoning) - {"effort", "summary"} or given not in CLIENT_EFFORTS:
                raise HTTPError(400, f"reasoning: expected {{\"effort\": one of {list(CLIENT_EFFORTS)}}}",
                                param="reasoning")
            if effort is not None and effort != given:
                raise HTTPError(400, "reasoning.effort and reasoning_effort differ; send one", param="reasoning")
            effort = given
        if effort is None and req.prompt_mode == "reasoning":
            effort = "high"
        try:
            return self.reasoning.resolve(effort, model_efforts(self.tokenizer))
        except InputError as e:
            raise HTTPError(400, str(e), param="reasoning_effort") from None

    def plan_chat(self, req: ChatRequest) -> ChatPlan:
        """Prompt ids, output grammar and answer parsing of a chat request; HTTPError 400 naming what is wrong."""
        if self.tokenizer is None:
            raise HTTPError(400, "this server has no tokenizer: chat is unavailable")
        if req.safe_prompt:
            raise HTTPError(400, "safe_prompt: this server has no safety prompt to prepend; send false or leave it "
                                 "out", param="safe_prompt")
        effort = self.reasoning_effort(req)
        tool_choice = "required" if req.tool_choice == "any" else req.tool_choice  # Mistral's "any"
        named = isinstance(tool_choice, dict)
        parallel = req.parallel_tool_calls if req.parallel_tool_calls is not None else not named
        forced_tools = tool_choice == "required" or named
        try:
            messages = normalize_messages(req.messages)
            use_grammar = (req.response_format not in (None, {"type": "text"})
                           or (forced_tools and structured.available(self.tokenizer)))
            prompt = encode_chat(self.tokenizer, messages, tools=req.tools, tool_choice=tool_choice,
                                 reasoning_effort=effort, force_prefix=not use_grammar, image_dir=self.image_dir)
        except InputError as e:
            msg = str(e)
            param = "tools" if msg.startswith("tools") else msg.split(":")[0] if msg.startswith("messages[") \
                else "messages"  # an image part's error names it: messages[i].content[j]
            raise HTTPError(400, msg, param=param) from None
        grammar = None
        if use_grammar:
            try:
                grammar = structured.chat_grammar(
                    self.tokenizer, messages, tools=req.tools, tool_choice=tool_choice,
                    response_format=req.response_format, parallel_tool_calls=parallel,
                    reasoning=effort not in (None, "none"))
            except InputError as e:
                raise HTTPError(400, str(e), param="tools" if str(e).startswith("tools") else "response_format") \
                    from None
        return ChatPlan(prompt, grammar, (req.top_logprobs or 0) if req.logprobs else None, self.tokenizer,
                        parse_tools=tool_choice != "none" and bool(req.tools),
                        max_calls=None if parallel or not forced_tools else 1)

    # -- helpers for responses --
    def token_str(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special=False) if self.tokenizer is not None else str(t)

    def chat_logprobs(self, lps) -> dict | None:
        if lps is None:
            return None

        def entry(t, lp):
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [dict(entry(x.token_id, x.logprob), top_logprobs=[entry(a, b) for a, b in x.top])
                            for x in lps]}

    def completion_logprobs(self, parts, logprobs: int | None, echo: bool, prompt: list[int]) -> dict | None:
        """OpenAI's completion logprobs of one choice's events; with echo the prompt's tokens lead (the first one's
        logprob and top_logprobs null: nothing precedes it)."""
        if logprobs is None:
            return None
        tokens, values, tops = [], [], []
        for p in parts:
            lps = p.logprobs or []
            if echo and p.prompt_logprobs is not None:
                tokens.append(prompt[0])
                values.append(None)
                tops.append(None)
                lps = p.prompt_logprobs[1:] + lps
            tokens += [x.token_id for x in lps]
            values += [x.logprob for x in lps]
            tops += [self._top_dict(x.top) for x in lps]
        return {"tokens": [self.token_str(t) for t in tokens], "token_logprobs": values, "top_logprobs": tops}

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """The prompts of a completion request as id lists: OpenAI's four shapes (a string, strings, token ids,
        token-id lists)."""
        p = req.prompt
        many = isinstance(p, list) and p and not all(isinstance(t, int) for t in p)
        items = p if many else [p]
        if not items:
            raise HTTPError(400, "prompt: expected a string, a list of strings, token ids or lists of token ids "
                                 "(got an empty list)", param="prompt")
        prompts = []
        for k, item in enumerate(items):
            where = f"prompt[{k}]" if many else "prompt"
            if isinstance(item, str):
                if not item:  # BOS alone is not a prompt
                    raise HTTPError(400, f"{where}: empty prompt" if many else "empty prompt", param="prompt")
                if self.tokenizer is None:
                    raise HTTPError(400, "this server has no tokenizer: give the prompt as token ids", param="prompt")
                prompts.append(self.tokenizer.encode(item, bos=True))
            elif not item:
                raise HTTPError(400, f"{where}: empty list of token ids", param="prompt")
            else:
                prompts.append([int(t) for t in item])
        return prompts

    def _top_dict(self, top) -> dict:
        out: dict[str, float] = {}
        for a, b in top:  # most likely first; tokens that print alike keep the larger logprob
            out.setdefault(self.token_str(a), b)
        return out

    @staticmethod
    def usage(outs: list[RequestOutput], n: int | None = None) -> dict:
        """Usage of a request from its choices' final events (each prompt counted once: `n` choices per prompt)."""
        n = n or len(outs)
        prompt = sum(o.prompt_tokens for o in outs[::n])
        completion = sum(o.completion_tokens for o in outs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in outs[::n])}}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def reason_of(out: RequestOutput) -> str:
    return out.finish_reason if out.finish_reason in ("stop", "length") else "stop"


def check_errors(finals: list[RequestOutput]) -> None:
    for out in finals:
        if out.finish_reason == "error":
            raise HTTPError(500, f"generation failed: {out.error}", kind="server_error")


def cut_at_stop(text: str, stops) -> str:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else text


def completion_text(tokenizer, options):
    """A function from one completion choice's events, in order, to their new text, decoded on the caller's thread
    (the event loop): the engine sends ids only (`detokenize=False`). With stop strings the engine does decode (it
    must see the text to stop on it, and holds back what may start one), so its text is used as it comes."""
    if tokenizer is None or options.stop:
        return lambda out: out.text
    decoder = tokenizer.stream_decoder()

    def text(out: RequestOutput) -> str:
        new = "".join(decoder.push(t) for t in out.token_ids)
        if out.finished and out.finish_reason in ("stop", "length"):  # as the engine: no flush on cancel / error
            new += decoder.flush()
        return new

    return text
