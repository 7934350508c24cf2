"""Structured output: llguidance grammars that force JSON (schema) answers and tool calls, as token masks.

The grammars come from mistral-common's `GrammarFactory` (Tekken tokenizers v11+): Lark grammars over the model's
own format, `[THINK]...[/THINK]` reasoning first where the tokenizer has think tokens, then either a JSON value
matching the schema (`response_format`) or `[TOOL_CALLS]name[ARGS]{json}` calls whose arguments match each tool's
parameters (`tool_choice` "required" / a named function; strict or not, the arguments are always a JSON object).
llguidance compiles a grammar into an `LLMatcher` per request; each step the engine asks every constrained row's
matcher for its allowed-token bitmask ([B, ceil(V/32)] int32, `batch_sampling.RowSampling.mask`), on the host
while the device computes the step's logits, and the sampler masks the logits on the device. After a token is
sampled the matcher consumes it.

The masks also keep the tokens canonical (`Constrained`, `small4_jax.inputs.canonical`): the ids of a finished answer
are what mistral-common's `encode_assistant_message` gives for the parsed answer (its content, or each call's
`[TOOL_CALLS]` name `[ARGS]` json.dumps(arguments)), not merely some tokenisation of the same text. The grammar
is edited to match what mistral-common writes (no optional whitespace around names and JSON; `", "` / `": "`
separators; json.dumps's string escapes), and argument numbers are kept to json.dumps's spellings.

llguidance (and jinja2, which mistral-common renders the grammars with) are imported only when a request asks for
structured output.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from infer.chat import check_schema, normalize_messages
from small4_jax.errors import InputError
from small4_jax.inputs.tokenizer import TekkenTokenizer, Tokenizer

_lock = threading.Lock()
_EXECUTOR = None


def _factory(tokenizer: Tokenizer):
    """The (cached) mistral-common GrammarFactory of `tokenizer`; InputError where structured output is unavailable."""
    with _lock:
        factory = getattr(tokenizer, "_grammar_factory", None)
        if factory is not None:
            return factory
        if not isinstance(tokenizer, TekkenTokenizer):
            raise InputError("structured output (response_format, forced tool calls) needs a tekken.json tokenizer")
        try:
            from mistral_common.guidance.grammar_factory import GrammarFactory
        except ImportError as e:
            raise InputError(f"structured output needs mistral-common's guidance module: {e}") from None
        mt = tokenizer.mistral_tokenizer()
        if not GrammarFactory.is_supported(mt):
            raise InputError("structured output needs a Tekken tokenizer of version v11 or later")
        try:
            factory = GrammarFactory(mt)
        except ImportError as e:
            raise InputError(f"structured output needs llguidance and jinja2 (pip install llguidance): {e}") from None
        tokenizer._grammar_factory = factory
        return factory


# OpenAI's JSON mode promises an object; mistral-common's json_object grammar also allows an array (its form is
# response_format {"type": "json_object_or_array"} here)
JSON_OBJECT_SCHEMA = {"type": "object"}
JSON_OBJECT_OR_ARRAY_SCHEMA = {"anyOf": [{"type": "object"}, {"type": "array"}]}
# JSON laid out as json.dumps does (", " and ": ", no other whitespace), unless the schema sets its own layout
# and strings escaped as json.dumps(ensure_ascii=False) escapes them (no "\/", no "\uXXXX"): mistral-common
# re-serialises tool-call arguments that way, so only that text encodes to the tokens the model wrote
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
           "json_allowed_escapes": "\"\\bfnrt"}


def _compact(schema: dict) -> dict:
    if not isinstance(schema, dict) or "x-guidance" in schema:
        return schema
    return {**schema, "x-guidance": _LAYOUT}


def available(tokenizer: Tokenizer) -> bool:
    """Whether structured output works with `tokenizer` here (Tekken v11+, llguidance installed)."""
    try:
        _factory(tokenizer)
        return True
    except InputError:
        return False


def chat_grammar(tokenizer: Tokenizer, messages, *, tools=None, tool_choice=None, response_format=None,
                 parallel_tool_calls: bool = True, reasoning: bool = False) -> str | None:
    """The Lark grammar a chat answer must match, or None when nothing is forced.

    Constrained: `response_format` json_object / json_schema, and `tool_choice` "required" or a named function.
    tool_choice "auto" and "none" with a text response are left free (the model may answer in text).

    Three edits to mistral-common's grammar, so the constraint holds whatever the weights: without `reasoning`
    (reasoning_effort none, where the format has no `[THINK]` section) the optional think section is removed;
    under a forced tool choice no free text may precede the calls (mistral-common's think template allows it, so a
    model could write text until max_tokens and never call); a `[THINK]...[/THINK]` section before them stays
    allowed when reasoning is on. And the optional whitespace (`SAFE_WS?`) around JSON values, tool names and
    calls is removed: mistral-common encodes a message's content, a call's name and its re-serialised arguments
    without it, so whitespace there would make the tokens differ from the encoding of the parsed answer.
    """
    if response_format is None:
        response_format = {"type": "text"}
    rtype = response_format.get("type") if isinstance(response_format, dict) else None
    if rtype not in ("text", "json_object", "json_object_or_array", "json_schema"):
        raise InputError('response_format.type must be "text", "json_object", "json_object_or_array" or '
                         '"json_schema"')
    if tool_choice == "any":  # Mistral's name for "required"
        tool_choice = "required"
    forced_tools = tool_choice == "required" or isinstance(tool_choice, dict)
    if rtype == "text" and not forced_tools:
        return None
    if rtype == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InputError("response_format.json_schema must be an object with a JSON schema under 'schema'")
        check_schema(spec.get("schema", {}), "response_format.json_schema.schema")
    if tools and forced_tools:
        for i, t in enumerate(tools):
            if isinstance(t, dict) and isinstance(t.get("function"), dict):
                check_schema(t["function"].get("parameters") or {}, f"tools[{i}].function.parameters")
    factory = _factory(tokenizer)
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    messages = normalize_messages(messages)

    kwargs = {}
    if rtype in ("json_object", "json_object_or_array"):
        schema = JSON_OBJECT_SCHEMA if rtype == "json_object" else JSON_OBJECT_OR_ARRAY_SCHEMA
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {
            "name": rtype, "schema": _compact(schema), "strict": True}}
    elif rtype == "json_schema":  # the schema is enforced whatever `strict` says
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {
            **spec, "schema": _compact(spec.get("schema", {})), "strict": True}}
    if tools and forced_tools:  # calls must name one of the tools and match its parameters schema
        tools = [{**t, "function": {**t["function"], "strict": True,
                                    "parameters": _compact(t["function"].get("parameters") or {})}}
                 if isinstance(t, dict) and isinstance(t.get("function"), dict) else t for t in tools]
    try:
        request = ChatCompletionRequest.from_openai(
            list(messages), tools=list(tools) if tools else None, tool_choice=tool_choice or "auto",
            parallel_tool_calls=parallel_tool_calls, **kwargs)
        grammar = factory.get_grammar_for_chat_request(request, factory.select_jinja_template())
    except Exception as e:  # mistral-common raises pydantic, ValueError and its own exception types
        errors = e.errors() if callable(getattr(e, "errors", None)) else None  # pydantic: say where and what
        what = "; ".join(f"{'.'.join(map(str, err.get('loc', ()))) or 'request'}: {err.get('msg')}"
                         for err in errors[:3]) if errors else str(e).splitlines()[0]
        raise InputError(f"cannot build the output grammar: {type(e).__name__}: {what[:300]}") from None
    return _edit(grammar, reasoning=reasoning, forced_tools=forced_tools and rtype == "text")


def _edit(grammar: str, *, reasoning: bool, forced_tools: bool) -> str:
    lines = grammar.split("\n")
    for i, line in enumerate(lines):
        if not reasoning and line.startswith(("body:", "json_grammar:")):
            lines[i] = line.replace("think? ", "").replace("think ", "")
        if forced_tools and line.startswith("fcalls:"):
            lines[i] = line.replace("fcalls: content? ", "fcalls: ").replace("fcalls: pretool_content? ", "fcalls: ")
        if not lines[i].startswith("SAFE_WS:"):
            lines[i] = lines[i].replace(" SAFE_WS?", "").replace("SAFE_WS? ", "")
    out = "\n".join(lines)
    if forced_tools and "content?" in out.split("fcalls:", 1)[-1].split("\n", 1)[0]:
        raise InputError("unexpected tool-call grammar from mistral-common (free text before forced calls)")
    return out


def prepare(tokenizer: Tokenizer) -> str:
    """Build now what the first structured-output request would otherwise wait for (mistral-common's grammar
    factory and the canonical-tokenisation tables: seconds for the 131K vocabulary); a line saying what was done."""
    t0 = time.perf_counter()
    try:
        _factory(tokenizer)
    except InputError as e:
        return f"structured output unavailable: {e}"
    tokenizer.canon()
    return f"structured output: grammar factory and canonical-token tables built ({time.perf_counter() - t0:.1f} s)"


def json_schema_grammar(tokenizer: Tokenizer, schema: dict) -> str:
    """A grammar of exactly one JSON value matching `schema` (no reasoning, no text): for completions."""
    factory = _factory(tokenizer)
    if not isinstance(schema, dict):
        raise InputError("the JSON schema must be an object")
    check_schema(schema, "the JSON schema")
    grammar = factory.get_lark_for_json_schema(factory.select_jinja_template(), _compact(schema))
    return _edit(grammar, reasoning=False, forced_tools=False)  # mistral-common's template allows [THINK] first


def new_matcher(tokenizer: Tokenizer, grammar: str, *, canonical: bool = True, max_tokens: int | None = None):
    """A matcher for `grammar` (`Constrained`); InputError naming the problem for a grammar llguidance rejects.

    With `canonical` (the default) its masks also keep the output canonically tokenised (`Constrained`); with
    `max_tokens` (the request's budget) they steer the answer to a close before the budget runs out."""
    import llguidance as llg

    factory = _factory(tokenizer)
    matcher = llg.LLMatcher(factory.llg_tokenizer, llg.grammar_from("lark", grammar))
    if matcher.is_error():
        raise InputError(f"invalid output grammar: {matcher.get_error()}")
    return Constrained(tokenizer, matcher, canonical=canonical, max_tokens=max_tokens)


_NUMBER = frozenset("-+0123456789.eE")
# JSON scanner state: (inside a call's arguments, inside a string, after a backslash there, the number being written)
_TEXT = (False, False, False, "")
_ARGS = (True, False, False, "")


def _special_names(tokenizer) -> set:
    return set(getattr(tokenizer, "_special_map", {}))


def _number_ok(lit: str, complete: bool) -> bool:
    """Whether the JSON number `lit` is json.dumps(json.loads(lit)) (complete), or can still become one."""
    if complete:
        try:
            return json.dumps(json.loads(lit)) == lit
        except ValueError:
            return False
    if any(ch in "eE+" for ch in lit):
        return False  # Python writes exponents only beyond 1e16 and below 1e-4: kept out altogether
    head, _, frac = lit.lstrip("-").partition(".")
    if "." not in lit:
        return True
    digits = (head + frac).lstrip("0")
    if len(digits) > 15:
        return False  # more digits than a double keeps: json.dumps would write others
    return head != "0" or len(frac) - len(frac.lstrip("0")) <= 3  # 0.0000x is below 1e-4: an exponent


def _string_char(in_str: bool, esc: bool, ch: str) -> tuple[bool, bool]:
    """One character through a JSON string scanner: (inside a string, after a backslash) once `ch` is read."""
    if not in_str:
        return ch == '"', False
    if esc:
        return True, False
    return ch != '"', ch == "\\"


def _scan(js, text: str, check: bool = True):
    """The JSON scanner's state after `text`; with `check`, None where a number in a call's arguments would not
    survive re-serialisation."""
    args, in_str, esc, num = js
    check = check and args
    for ch in text:
        if in_str:
            in_str, esc = _string_char(True, esc, ch)
        elif ch in _NUMBER:
            num += ch
            if check and not _number_ok(num, False):
                return None
        else:
            if check and num and not _number_ok(num, True):
                return None
            num = ""
            in_str = ch == '"'
    return (args, in_str, esc, num)


class Constrained:
    """An llguidance matcher whose masks also keep the output canonical: token for token what the tokenizer's own
    `encode` gives for the text written so far, so the ids of a finished answer equal mistral-common's encoding
    of it (`[TOOL_CALLS]`, `[ARGS]`, `[THINK]` ... are special tokens: each text between them is encoded alone).

    llguidance allows every tokenisation of an allowed text; a model (a random one for sure) picks others, e.g.
    `{"` as `{` + `"`. Each step `refine` removes from llguidance's mask the tokens that would make the text's last
    chunk non-canonical (`small4_jax.inputs.canonical`: chunk junctions by class string, BPE pair validity), and
    special tokens where the text so far may not end. Where few tokens remain it also looks ahead through the
    grammar, so that a token is kept only if its chunk can be finished canonically: after `{"`, `loc` is allowed by
    the grammar and canonical so far, but the key the grammar forces, `location`, is one token, so `loc` leads
    nowhere and is dropped. Should no token remain (a grammar forcing a text whose canonical tokens the lookahead
    missed), llguidance's mask is used as it is for that step and `fallbacks` counts it.

    A tool call's arguments are re-serialised by mistral-common (json.loads, then json.dumps): their numbers are
    kept to spellings that survive that (`_number_ok`: no `-0`, no exponent, no trailing fraction zeros, at most
    15 significant digits), so the arguments' text is the text it encodes.

    With the request's `max_tokens`, the last CLOSE_WITHIN tokens also follow a planned close of the answer
    (`_closing`), so an answer that would otherwise run to the budget (free strings, numbers) ends and parses.

    The methods the engine uses are llguidance's: consume_token(s), is_stopped, is_accepting, is_error,
    get_error, rollback (speculative verification: `validate_tokens` checks grammar and canonical order).
    """

    LOOKAHEAD = 32  # look ahead when at most this many tokens remain
    DEPTH = 3  # tokens of lookahead
    BREADTH = 8  # continuations tried per lookahead token

    CLOSE_WITHIN = 48  # with a budget: from this many tokens before it, plan how the answer would close
    SLACK = 4  # and follow that plan once it needs all but this many of the tokens left

    def __init__(self, tokenizer: Tokenizer, matcher, *, canonical: bool = True, max_tokens: int | None = None):
        self.llm = matcher
        self.budget = max_tokens
        self.eos = tokenizer.eos_id
        self._plan = None  # (tokens consumed when planned, closing path from there)
        self.canon = tokenizer.canon() if canonical else None
        self.nspec = self.canon.nspec if canonical else 0
        self.vocab = tokenizer.vocab_size
        # per consumed token, the state after it: (settled tail text, its token ids, JSON number scanner)
        self.tail: list[tuple] = [("", (), _TEXT)]
        names = _special_names(tokenizer) if canonical else set()
        self.args_id = tokenizer.token_id("[ARGS]") if "[ARGS]" in names else -1
        self.think_id = tokenizer.token_id("[THINK]") if "[THINK]" in names else -1
        self.fallbacks = 0
        self.ids: list[int] = []  # consumed tokens

    # ---- llguidance's interface ---------------------------------------------------------------------------

    def consume_token(self, t: int) -> bool:
        if not self.llm.consume_token(int(t)):
            return False
        self.tail.append(self._after(self.tail[-1], int(t)))
        self.ids.append(int(t))
        return True

    def rollback(self, n: int) -> bool:
        ok = self.llm.rollback(n)
        if ok and n:
            del self.tail[-n:], self.ids[-n:]
        return ok

    def validate_tokens(self, ts) -> int:
        """How many of `ts` the grammar accepts in order, each also canonical after the ones before it."""
        ts = [int(t) for t in ts]
        n = self.llm.validate_tokens(ts)
        state = self.tail[-1]
        for i, t in enumerate(ts[:n]):
            if not self._canonical_next(state, [t])[0]:
                return i
            state = self._after(state, t)
        return n

    def is_stopped(self) -> bool:
        return self.llm.is_stopped()

    def is_accepting(self) -> bool:
        return self.llm.is_accepting()

    def is_error(self) -> bool:
        return self.llm.is_error()

    def get_error(self) -> str:
        return self.llm.get_error()

    # ---- canonical masks ----------------------------------------------------------------------------------

    def _after(self, state, t: int):
        if self.canon is None:
            return state
        if t < self.nspec:  # a special token ends the text segment
            return ("", (), _ARGS if t == self.args_id else _TEXT)
        s = self.canon.tstr[t - self.nspec] if t - self.nspec < self.canon.n else None
        if s is None or not self.canon.text_ok[t - self.nspec]:  # a piece of a character (after a fallback)
            return ("", (), _TEXT)  # nothing to keep canonical against: start afresh
        return (*self.canon.advance(state[0], state[1], t - self.nspec), _scan(state[2], s, check=False))

    def _canonical_next(self, state, ids) -> np.ndarray:
        """Which of the token ids `ids` may follow the text whose settled tail is `state` canonically."""
        ids = np.asarray(ids, np.int64)
        ok = np.zeros(len(ids), bool)
        if self.canon is None:
            return ~ok
        c = self.canon
        tail, tail_ids = state[:2]
        special = ids < self.nspec
        if special.any():
            ok[special] = c.end_ok(tail, tail_ids, c.encode)
        text = np.flatnonzero(~special & (ids < self.nspec + c.n))
        if len(text):
            ok[text] = c.allowed(tail, list(tail_ids), ids[text] - self.nspec, c.encode)
        js = state[2]
        if js[0]:  # in a call's arguments: numbers that survive json.loads + json.dumps
            if special.any() and js[3]:
                ok[special] &= _number_ok(js[3], True)
            sel = text[ok[text]]
            if not js[3]:  # no number open: only tokens that leave the string, or start a number, matter
                sel = sel[(self._quote() if js[1] else self._numeric())[ids[sel] - self.nspec]]
            for i in sel:
                ok[i] = _scan(js, c.tstr[ids[i] - self.nspec]) is not None
        return ok

    def _bits(self, words: np.ndarray) -> np.ndarray:
        return np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab].astype(bool)

    def refine(self, words: np.ndarray) -> None:
        """Narrow llguidance's bitmask `words` ([W] int32, in place) to the tokens that keep the output canonical
        (and, near the budget, to the next token of the plan that closes the answer in time: `_closing`)."""
        if self.canon is None and not self.budget:
            return
        cands = np.flatnonzero(self._bits(words))
        if not len(cands):
            return
        keep = self._canonical(cands) if self.canon is not None else cands
        if not len(keep):
            self.fallbacks += 1
            keep = cands
        if self.budget:
            keep = self._closing(keep)
        if len(keep) == len(cands):
            return
        out = np.zeros(len(words) * 32, bool)
        out[keep] = True
        words[:] = np.packbits(out, bitorder="little").view(np.int32)

    def _closing(self, keep: np.ndarray) -> np.ndarray:
        """`keep`, or only the next token of the closing plan where the budget leaves no more room than it needs.

        The plan is a greedy way to the grammar's end (`_closer` each step, canonical masks included), recomputed
        while the model writes something else; once it needs all but SLACK of the tokens left it is followed to the
        end, so the answer parses (a random model writes free strings and numbers until max_tokens otherwise)."""
        consumed = len(self.tail) - 1
        left = self.budget - consumed
        if left > self.CLOSE_WITHIN:
            return keep
        plan = self._plan
        if plan is None or plan[0] != consumed:
            if plan is not None and plan[0] == consumed - 1 and plan[1] and len(plan[1]) > 1 \
                    and self.ids[-1] == plan[1][0]:  # the model wrote the plan's token: the rest still holds
                plan = (consumed, plan[1][1:])
            else:
                plan = (consumed, self._closing_path())
            self._plan = plan
        path = plan[1]
        if path and len(path) + self.SLACK >= left and path[0] in keep:
            return np.asarray(path[:1], np.int64)
        return keep

    def _closing_path(self) -> list[int] | None:
        sim = Constrained.__new__(Constrained)
        sim.__dict__.update(self.__dict__)
        sim.llm, sim.tail, sim.ids, sim.budget, sim.fallbacks = self.llm.deep_copy(), self.tail[-1:], [], None, 0
        path = []
        while not sim.llm.is_stopped():
            if len(path) > self.CLOSE_WITHIN:
                return None
            words = np.frombuffer(sim.llm.compute_bitmask(), np.int32).copy()
            sim.refine(words)
            allowed = np.flatnonzero(self._bits(words))
            if not len(allowed):
                return None
            t = self._closer(allowed, sim.tail[-1][2][1], sim.tail[-1][2][3])
            if not sim.consume_token(t):
                return None
            path.append(t)
        return path

    def _closer(self, allowed: np.ndarray, in_string: bool, number: str = "") -> int:
        """The greedy closing choice: the end of the output; else a special token other than [THINK]; else the
        text token that leaves no string open and closes the most arrays and objects (net of those it opens; a
        shorter one on ties), where that closes something or ends the string being written; else a short value
        ('0', '""', '"'); else the lowest text token id (a short one)."""
        if self.eos in allowed:
            return self.eos
        special = [t for t in allowed[allowed < self.nspec] if t != self.think_id] if self.canon is not None else []
        if special:  # ends a section ([/THINK]) or starts the forced part ([TOOL_CALLS]); never opens a [THINK]
            return int(special[0])
        text = allowed[allowed >= self.nspec] if self.canon is not None else allowed
        if not len(text):
            return int(allowed[0])
        if self.canon is not None:
            score = self._closing_scores(in_string)[text - self.nspec]
            if number:  # a number is being written: end it (a token that does not go on with its characters)
                ends = np.array([self.canon.tstr[t - self.nspec][0] not in _NUMBER for t in text])
                if ends.any():
                    score = np.where(ends, score + 10**7, score)
            best = int(np.argmax(score))
            if score[best] > -10**8 and (in_string or number or score[best] > 0):  # ends a string / number
                return int(text[best])
            if not in_string:  # a value: the shortest ones
                for short in ("0", '""', '"'):
                    t = self.canon.ranks.get(short.encode())
                    if t is not None and t + self.nspec in text:
                        return t + self.nspec
        return int(text[0])

    def _closing_scores(self, in_string: bool) -> np.ndarray:
        """Per token, written inside (or outside) a JSON string: 1000 x (brackets closed - opened) - its length,
        or a large negative number where it leaves a string open."""
        c = self.canon
        key = "closing_in" if in_string else "closing_out"
        if getattr(c, key, None) is None:
            out = np.full(c.n, -10**9, np.int64)
            for r, s in enumerate(c.tstr):
                if s is None:
                    continue
                in_str, esc, net = in_string, False, 0
                for ch in s:
                    was_in_str = in_str
                    in_str, esc = _string_char(in_str, esc, ch)
                    if not was_in_str and ch in "]}":
                        net += 1
                    elif not was_in_str and ch in "[{":
                        net -= 1
                if not in_str:
                    out[r] = 1000 * net - len(s)
            setattr(c, key, out)
        return getattr(c, key)

    def _canonical(self, cands: np.ndarray) -> np.ndarray:
        """The canonical ones of llguidance's allowed tokens `cands` (with lookahead; empty at a dead end)."""
        state = self.tail[-1]
        keep = cands[self._canonical_next(state, cands)]
        if len(keep) <= self.LOOKAHEAD:
            look = np.ones(len(keep), bool)
        else:  # many tokens: look ahead only from those after which the grammar may force text (outside a string)
            inner = np.maximum(keep - self.nspec, 0)
            outside = self._closing_scores(state[2][1])[inner] > -10**8  # leaves no JSON string open
            look = (self._quote()[inner] | self.canon.ends_ws[inner]) & outside & (keep >= self.nspec)
            look[np.flatnonzero(look)[4 * self.LOOKAHEAD:]] = False
        if look.any():
            dead = [i for i in np.flatnonzero(look) if not self._viable(self.llm, state, int(keep[i]), self.DEPTH)]
            keep = np.delete(keep, dead)
        return keep

    def _quote(self) -> np.ndarray:
        """Tokens holding a '"': in JSON the only way out of a string into text the grammar may force."""
        c = self.canon
        if getattr(c, "quote", None) is None:
            c.quote = np.array([b'"' in b for b in c.tbytes])
        return c.quote

    def _forced(self, m, state, t: int) -> bool | None:
        """The answer of `_viable` from the text the grammar forces after t (None when that does not decide it):
        where it finishes t's chunk, the encoding of the text so far plus that text must begin with ours."""
        c = self.canon
        try:
            forced = m.compute_ff_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not forced:
            return None
        tail, tail_ids = state[:2]
        text = tail + c.tstr[t - self.nspec]
        full = text + forced
        if not any(len(text) < s < len(full) for s in c.chunk_starts(full)):
            return None  # t's chunk runs to the end of the forced text: what follows decides
        want = [*tail_ids, t - self.nspec]
        if state[2][0] and _scan(_scan(state[2], text[len(tail):], check=False), forced) is None:
            return False  # the forced text ends a number of the arguments in a spelling json.dumps would not keep
        return c.encode(full)[: len(want)] == want

    def _numeric(self) -> np.ndarray:
        """Tokens holding a character of a JSON number."""
        c = self.canon
        if getattr(c, "numeric", None) is None:
            c.numeric = np.array([s is not None and any(ch in _NUMBER for ch in s) for s in c.tstr])
        return c.numeric

    def _viable(self, matcher, state, t: int, depth: int) -> bool:
        """Whether token t (canonical next) leaves a canonical way on: the grammar stops, or a special token that
        may end the text, or a token that starts a new chunk may follow, or (within `depth`) a canonical
        continuation of t's chunk does."""
        m = matcher.deep_copy()
        if not m.consume_token(t):
            return False
        if m.is_stopped() or t < self.nspec or depth == 0:
            return True
        c = self.canon
        forced = self._forced(m, state, t)
        if forced is not None:
            return forced
        after = self._after(state, t)
        words = np.frombuffer(m.compute_bitmask(), np.int32)
        if after[2][0] and after[2][3]:  # a number in a call's arguments: it must also end as json.dumps writes it
            cands = np.flatnonzero(self._bits(words.copy()))
            if not self._canonical_next(after, cands).any():
                return False
        nmask = c.new_chunk_mask(after[0])
        if after[0] and (words[: len(nmask)] & nmask[: len(words)]).any():  # a new chunk may start
            return True
        cands = np.flatnonzero(self._bits(words.copy()))
        special = cands[cands < self.nspec]
        if len(special) and c.end_ok(after[0], after[1], c.encode):
            return True
        text = cands[cands >= self.nspec] - self.nspec
        text = text[c.text_ok[text] & ~c.ends_ws[text]]
        if not len(text):
            return bool(len(cands)) and self._canonical_next(after, cands).any()
        kinds = c.kinds(after[0])[c.ckey[text]]
        if (kinds == c.N).any():  # a new chunk may start: t's chunk is finished as it is
            return True
        cont = text[kinds == c.C]
        cont = cont[c.valid_after(after[1][-1], cont)] if len(cont) else cont
        return any(self._viable(m, after, int(u) + self.nspec, depth - 1) for u in cont[: self.BREADTH])


def fill_masks(tokenizer: Tokenizer, rows: list[tuple[object, int]], mask: np.ndarray) -> None:
    """Write the allowed-token bitmask of each (matcher, row) into `mask` [B, W] int32: llguidance's masks of all
    rows in parallel (off the GIL), each then narrowed to the canonical tokens (`Constrained.refine`).

    Words past the tokenizer's vocabulary (a model vocabulary padded beyond it) are zeroed: never allowed."""
    global _EXECUTOR
    import llguidance as llg
    import llguidance.numpy as llnp

    if not rows:
        return
    if _EXECUTOR is None:
        _EXECUTOR = llg.LLExecutor()
    words = (_factory(tokenizer).llg_tokenizer.vocab_size + 31) // 32
    buf = np.full((len(rows), words), -1, np.int32)
    llnp.fill_next_token_bitmask_par(_EXECUTOR, [(m.llm, i) for i, (m, _) in enumerate(rows)], buf)
    for i, (m, row) in enumerate(rows):
        m.refine(buf[i])
        mask[row, : buf.shape[1]] = buf[i]
        mask[row, buf.shape[1] :] = 0
