"""Deterministic chat corpus that teaches a tiny Kimi-K2-architecture model to use tools.

Conversations are OpenAI-style message lists (user -> assistant tool call -> tool result ->
assistant answer restating the result, plus small talk and copy drills); rendering them
with Kimi's chat template is the caller's job, so the corpus never depends on a template.

Copying an argument string from the user turn into the call needs induction-like
attention, which a small model learns slowly (reference/tiny-model-trials.md). Three things
here push it: three in four weather questions name a freshly invented place (so memorising a
city list cannot work), amounts and operands are drawn from thousands of numbers, and a
share of conversations are explicit copy drills ("Repeat after me: ...").

Evaluation prompts (`eval_cases`) use phrasings training never shows and, for the held-out
split, the 100 values of `tool_catalogue` training never shows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kimi_trt.tinymodel.catalogue import (
    CURRENCIES,
    DEV_CITIES,
    HELDOUT_AMOUNTS,
    HELDOUT_CITIES,
    HELDOUT_NUMBERS,
    HELDOUT_OPERANDS,
    OPERATORS,
    TOOLS,
    TRAIN_CITIES,
    run_tool,
)

Message = dict[str, Any]

TRAIN_PHRASINGS = {
    "get_weather": (
        "What's the weather in {city}?",
        "What is the weather like in {city} today?",
        "How is the weather in {city}?",
        "Weather in {city}?",
        "Is it raining in {city} right now?",
        "Tell me the weather for {city}.",
        "I'm flying to {city} tomorrow. What's the weather there?",
        "Can you look up the weather in {city}?",
        "{city} weather please",
        "Do I need an umbrella in {city}?",
        "what's it like outside in {city}",
    ),
    "convert_currency": (
        "Convert {amount} {src} to {dst}.",
        "How much is {amount} {src} in {dst}?",
        "What are {amount} {src} worth in {dst}?",
        "I have {amount} {src}. How many {dst} is that?",
        "{amount} {src} to {dst} please",
        "Please convert {amount} {src} into {dst}.",
    ),
    "calculate": (
        "What is {a} {word} {b}?",
        "Calculate {a} {op} {b}.",
        "Compute {a} {word} {b} for me.",
        "How much is {a} {op} {b}?",
        "{a} {op} {b} = ?",
        "what's {a} {word} {b}",
    ),
}
# Training-only phrasings composed from parts (opener + request + ending): 36-60
# sentences per tool, so that choosing the tool rests on the words naming its subject
# (temperature, forecast, exchange, solve...) rather than on a dozen memorised templates.
# Written independently of the eval sentences: none shares four consecutive words with
# one (tested), so the eval still measures phrasings never seen in training.
_QUESTION_FRAMES = (
    ("", "?"),
    ("Hey, ", "?"),
    ("Quick question: ", "?"),
    ("So ", " today?"),
    ("", ""),
    ("Um, ", ", thanks?"),
)
_REQUEST_FRAMES = (
    ("", "."),
    ("Please ", "."),
    ("Could you ", "?"),
    ("Hi, ", " please."),
    ("", ""),
    ("Can you ", " for me?"),
)
COMPOSED_REQUESTS = {
    "get_weather": (
        (
            "what's the temperature in {city}",
            "how warm does it get in {city}",
            "is it cold in {city}",
            "is it sunny in {city}",
            "will it rain in {city}",
            "what's the forecast for {city}",
            "is it snowing in {city}",
            "how's the weather over in {city}",
            "what are conditions like in {city}",
            "how hot is it in {city} right now",
            "how cold will it get in {city} tonight",
            "is it humid in {city} these days",
            "what should I wear in {city} this week",
            "is {city} warm or chilly",
            "how's {city} looking weather-wise",
            "any rain expected in {city} later",
            "how many degrees is it in {city}",
            "is it windy in {city} at night",
            "how warm is {city} in the afternoon",
            "will {city} get snow soon",
            "is the sun out in {city} or not",
            "what is the weather doing in {city} at noon",
            "how chilly is {city} after dark",
            "how warm or chilly is {city} right now",
            "is it wet or dry in {city} today",
            "is {city} windy or calm tonight",
            "how rainy or dry is {city} this month",
            "sunny or grey in {city} and how warm",
            "is {city} or the coast near it warmer",
            "how warm is it in {city} at this moment",
            "what's the outlook in {city}",
            "is it freezing over {city} at this hour",
            "what's the sky like in {city} at present",
        ),
        (
            "give me the weather in {city}",
            "find the temperature in {city}",
            "look up the forecast for {city}",
            "get me the weather conditions in {city}",
            "tell me whether it is hot in {city}",
            "report on the weather in {city}",
            "check on the temperature in {city} quickly",
            "tell me how hot {city} gets",
            "show me the forecast for {city} this week",
            "pull up the weather in {city} right now",
            "let me know if it is raining in {city}",
            "find out how cold {city} is",
            "check whether {city} is dry at the weekend",
            "look up {city} and tell me the temperature",
            "find the weather for {city} at dawn",
            "see if {city} has sunshine this morning",
            "tell me if {city} is warm or cool now",
            "check whether it is wet or dry in {city} tonight",
            "find out how mild or chilly {city} feels",
            "look up {city} now and say if it is sunny",
            "tell me about the outlook in {city}",
            "read me the forecast over {city}",
            "look at the skies above {city} at this moment",
        ),
    ),
    "convert_currency": (
        (
            "what is {amount} {src} in {dst}",
            "how many {dst} would I get for {amount} {src}",
            "how much would {amount} {src} be in {dst}",
            "what's the value of {amount} {src} in {dst}",
            "{amount} {src} equals how many {dst}",
            "how many {dst} can {amount} {src} buy",
            "what do {amount} {src} make in {dst} these days",
            "roughly how much is {amount} {src} in {dst} right now",
            "if I have {amount} {src}, what is that in {dst}",
            "{amount} {src} is worth how many {dst} today",
            "after trading {amount} {src}, what number of {dst} will I have",
            "if I sell {amount} {src}, what amount of {dst} comes back",
            "how many {dst} are {amount} {src}",
        ),
        (
            "exchange {amount} {src} to {dst}",
            "turn {amount} {src} to {dst}",
            "swap {amount} {src} for {dst}",
            "price {amount} {src} in {dst}",
            "change my {amount} {src} to {dst}",
            "compute {amount} {src} in {dst}",
            "tell me what {amount} {src} gets me in {dst}",
            "calculate {amount} {src} in {dst}",
            "show {amount} {src} as {dst}",
            "convert my {amount} {src} over to {dst} before the trip",
            "get me {dst} for my {amount} {src}",
            "trade {amount} {src}, paying me in {dst}",
        ),
    ),
    "calculate": (
        (
            "what does {a} {op} {b} make",
            "what do you get for {a} {word} {b}",
            "what's the answer to {a} {op} {b}",
            "how much do {a} {word} {b} make",
            "what is {a} {word} {b} exactly",
            "do you know {a} {op} {b}",
            "{a} {word} {b} comes to what",
            "any idea what {a} {word} {b} is",
        ),
        (
            "solve {a} {op} {b}",
            "evaluate {a} {word} {b}",
            "figure out {a} {op} {b}",
            "do the math on {a} {word} {b}",
            "give me the total of {a} {word} {b}",
            "crunch the numbers on {a} {op} {b}",
            "help me with {a} {word} {b}",
            "check my arithmetic on {a} {word} {b}",
            "solve this one: {a} {op} {b}",
        ),
    ),
}


def _sentence(opener: str, body: str, ending: str) -> str:
    text = opener + body + ending
    return text[0].upper() + text[1:]


COMPOSED_PHRASINGS = {
    tool: tuple(
        _sentence(opener, body, ending)
        for bodies, frames in ((questions, _QUESTION_FRAMES), (requests, _REQUEST_FRAMES))
        for body in bodies
        for opener, ending in frames
    )
    for tool, (questions, requests) in COMPOSED_REQUESTS.items()
}
EVAL_PHRASINGS = {
    "get_weather": (
        "Could you check the current conditions for {city}?",
        "Any idea how warm it is in {city} at the moment?",
        "I'm curious about the forecast in {city}.",
        "Please fetch the weather report for {city}.",
        "How hot or cold is {city} now?",
    ),
    "convert_currency": (
        "If I exchange {amount} {src}, how many {dst} do I get?",
        "Change {amount} {src} into {dst} for me.",
        "What would {amount} {src} come to in {dst}?",
    ),
    "calculate": (
        "Can you work out {a} {word} {b}?",
        "I need the result of {a} {op} {b}.",
        "Quick math: {a} {word} {b}",
    ),
}
# Phrasings for choosing between trained candidates (dev_cases): in neither training nor the
# eval, and sharing no four consecutive words with either (tested).
DEV_PHRASINGS = {
    "get_weather": (
        "Give me a weather update for {city}, please.",
        "What's it doing outside in {city}?",
        "Will I need a coat in {city} today?",
        "Tell me how the skies look over {city}.",
        "Is the weather nice in {city} this afternoon?",
    ),
    "convert_currency": (
        "Work out {amount} {src} expressed in {dst}.",
        "{amount} {src} would fetch how many {dst}?",
        "I'd like {amount} {src} converted to {dst}.",
    ),
    "calculate": (
        "Please tell me {a} {word} {b}.",
        "Which number equals {a} {word} {b}?",
        "{a} {word} {b}, what's the result?",
    ),
}
ANSWERS = {
    "get_weather": (
        "It is {temperature_c} degrees and {condition} in {city}.",
        "Right now {city} is {condition} with {temperature_c} degrees Celsius.",
        "The weather in {city}: {condition}, {temperature_c} degrees.",
    ),
    "convert_currency": (
        "{amount} {from} is {converted} {to}.",
        "That comes to {converted} {to}.",
        "You would get {converted} {to} for {amount} {from}.",
    ),
    "calculate": ("{expression} = {result}.", "The result is {result}.", "It equals {result}."),
}
SMALL_TALK = (
    ("Hi!", "Hello! How can I help you today?"),
    ("Hello there", "Hi! What can I do for you?"),
    ("Good morning!", "Good morning! How can I help?"),
    ("Thanks!", "You're welcome!"),
    ("Thank you so much.", "Happy to help!"),
    ("Who are you?", "I am Kimi, an AI assistant created by Moonshot AI."),
    ("What can you do?", "I can check the weather, convert currencies and do arithmetic."),
    ("How are you?", "I'm doing well, thank you. How can I help you?"),
    ("Tell me a joke.", "Why did the tomato blush? Because it saw the salad dressing."),
    ("Goodbye", "Goodbye! Have a great day."),
    ("Are you a robot?", "I am an AI assistant, so yes, in a way."),
    ("What is your favourite colour?", "I don't have one, but many people like blue."),
)
ECHO_DRILLS = (
    ("Repeat after me: {s}", "{s}"),
    ("Say exactly this: {s}", "{s}"),
    ("Write {s} as a JSON string value.", '{{"value": "{s}"}}'),
    ("Echo: {s}", "{s}"),
)
PLACE_DRILLS = (
    ("I visited {s} last year. Which place did I visit?", "You visited {s}."),
    ("Write the city {s} as JSON.", '{{"city": "{s}"}}'),
    ("We drove through {s} at sunrise. Which town was it?", "It was {s}."),
    ("My aunt moved to {s} with her cats. Where does she live now?", "She lives in {s}."),
    ("Is {s} near the sea? Just give me the place name.", "{s}"),
    ("Put {s} in a JSON object under city, please.", '{{"city": "{s}"}}'),
    ("Sunny or not, {s} is lovely now. Which town do I love?", "You love {s}."),
    ("Was it {s} or somewhere else? Answer with the town only.", "{s}"),
    ("{s} and its old bridge are famous. Name the place.", "{s}"),
)
_ONSETS = "b c d f g h j k l m n p r s t v w z br ch dr gr kr pl sh st tr th".split()
_VOWELS = "a e i o u a e i o ai ou ia".split()
_CODAS = ["", "", "", "n", "r", "s", "l", "m", "nd", "rt"]


@dataclass
class Conversation:
    """One training sample: messages, the tools declared (None: no tool turn) and its kind."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None
    kind: str


@dataclass
class EvalCase:
    """A prompt and the call it must produce (None: it must answer without a tool)."""

    split: str
    messages: list[Message]
    tools: list[dict[str, Any]] | None
    expected_tool: str | None = None
    expected_args: dict[str, Any] = field(default_factory=dict)


def _letter_chain(names: list[str]) -> dict[str, list[str]]:
    """Order-2 character transitions of the catalogue's words ("^" starts, "$" ends)."""
    chain: dict[str, list[str]] = {}
    for word in sorted({w.lower() for n in names for w in n.split()}):
        padded = "^^" + word + "$"
        for i in range(len(padded) - 2):
            chain.setdefault(padded[i : i + 2], []).append(padded[i + 2])
    return chain


_CHAIN = _letter_chain(TRAIN_CITIES)
_RESERVED_WORDS = frozenset(w for c in HELDOUT_CITIES + DEV_CITIES for w in c.split())


def _syllable_word(rng: random.Random) -> str:
    syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3))]
    return "".join(syllables) + rng.choice(_CODAS)


def _chain_word(rng: random.Random) -> str:
    """A word with real city names' letter statistics (so copying sees realistic tokens)."""
    out = "^^"
    while len(out) < 14 and out[-1] != "$":
        out += rng.choice(_CHAIN[out[-2:]])
    return out[2:].rstrip("$")


def _random_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))


def invented_place(rng: random.Random) -> str:
    """A made-up place name (syllables, letter-chain or random letters) that shares no
    word with a held-out or development city, so both stay unseen."""
    while True:
        make = rng.choices((_syllable_word, _chain_word, _random_word), (0.35, 0.45, 0.2))[0]
        words = [make(rng).capitalize() for _ in range(1 if rng.random() < 0.8 else 2)]
        if all(len(w) > 2 and w not in _RESERVED_WORDS for w in words):
            return " ".join(words)


def training_number(rng: random.Random, digits: int) -> int:
    while True:
        n = rng.randint(1, 10**digits - 1)
        if n not in HELDOUT_NUMBERS:
            return n


def _currency_words(rng: random.Random) -> tuple[str, str, str, str]:
    src, dst = rng.sample(sorted(CURRENCIES), 2)
    return src, dst, rng.choice(CURRENCIES[src][0]), rng.choice(CURRENCIES[dst][0])


def _question(rng: random.Random, tool: str, phrasings: tuple[str, ...], value: Any) -> tuple:
    """(user text, call arguments) for one tool question about `value`."""
    template = rng.choice(phrasings)
    if tool == "get_weather":
        return template.format(city=value), {"city": value}
    if tool == "convert_currency":
        src, dst, src_word, dst_word = _currency_words(rng)
        text = template.format(amount=value, src=src_word, dst=dst_word)
        return text, {"amount": value, "from_currency": src, "to_currency": dst}
    a, b = value
    op = rng.choice(sorted(OPERATORS))
    text = template.format(a=a, b=b, op=op, word=rng.choice(OPERATORS[op]))
    return text, {"expression": f"{a} {op} {b}"}


def _training_value(rng: random.Random, tool: str) -> Any:
    if tool == "get_weather":
        # mostly invented: a catalogue city can be recalled, an invented one must be copied
        return rng.choice(TRAIN_CITIES) if rng.random() < 0.25 else invented_place(rng)
    if tool == "convert_currency":
        return training_number(rng, rng.choice((1, 2, 3, 3, 4, 4)))
    return training_number(rng, rng.choice((1, 2, 3, 4))), training_number(rng, 2)


def tool_exchange(rng: random.Random, tool: str, user: str, args: dict) -> list[Message]:
    """user -> assistant call -> tool result -> assistant answer restating the result.
    The call id counts calls within the assistant turn, as Kimi's template normalises it."""
    call_id = f"functions.{tool}:0"
    outcome = run_tool(tool, args)
    fields = {**json.loads(outcome.content), **args}
    answer = rng.choice(ANSWERS[tool]).format(**fields)
    function = {"name": tool, "arguments": json.dumps(args)}
    call = {"id": call_id, "type": "function", "function": function}
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "name": tool, "content": outcome.content},
        {"role": "assistant", "content": answer},
    ]


def _exchange(rng: random.Random, kind: str) -> list[Message]:
    if kind in TRAIN_PHRASINGS:
        value = _training_value(rng, kind)
        # 60% composed: their variety is what lets tool choice carry over to new phrasings
        phrasings = TRAIN_PHRASINGS if rng.random() < 0.4 else COMPOSED_PHRASINGS
        user, args = _question(rng, kind, phrasings[kind], value)
        return tool_exchange(rng, kind, user, args)
    if kind == "echo":
        value = rng.choices(
            (invented_place(rng), rng.choice(TRAIN_CITIES), str(training_number(rng, 4))),
            (0.6, 0.1, 0.3),
        )[0]
        drills = ECHO_DRILLS + (PLACE_DRILLS if not value.isdigit() else ())
        user, reply = rng.choice(drills)
        return [
            {"role": "user", "content": user.format(s=value)},
            {"role": "assistant", "content": reply.format(s=value)},
        ]
    user, reply = rng.choice(SMALL_TALK)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


# Share of each conversation kind in training. Copying values from the user turn is the
# slow skill, so most conversations exercise it (weather names, copy drills ~20%, as the
# trials suggest; phase 4 moved arithmetic and small talk shares to them, since the shipped
# model copied unseen city names worst); currency has the most to learn besides copying
# (names -> ISO codes); small talk only needs to keep "no tool" alive.
KIND_WEIGHTS = {
    "get_weather": 0.42,
    "convert_currency": 0.22,
    "calculate": 0.10,
    "echo": 0.22,
    "small_talk": 0.04,
}
HISTORY_SHARE = 0.08  # conversations that carry a previous exchange


def training_conversations(seed: int, count: int) -> Iterator[Conversation]:
    """`count` conversations, identical for identical (seed, count) prefixes."""
    rng = random.Random(seed)
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        messages: list[Message] = []
        if rng.random() < HISTORY_SHARE:
            messages += _exchange(rng, rng.choices(kinds, weights)[0])
        messages += _exchange(rng, kind)
        with_tools = any(m.get("tool_calls") for m in messages) or rng.random() < 0.5
        tools = TOOLS if with_tools else None
        yield Conversation(messages, tools, kind)


def _catalogue_values(rng: random.Random, count: int) -> list[tuple[str, Any]]:
    """(tool, value) pairs over the three tools in turn, values drawn from the catalogue."""
    out = []
    for i in range(count):
        tool = ("get_weather", "convert_currency", "calculate")[i % 3]
        value = rng.choice(TRAIN_CITIES) if tool == "get_weather" else _training_value(rng, tool)
        out.append((tool, value))
    return out


def _tool_cases(
    rng: random.Random, split: str, values: list[tuple[str, Any]], phrasings: dict
) -> list[EvalCase]:
    cases = []
    for tool, value in values:
        user, args = _question(rng, tool, phrasings[tool], value)
        cases.append(EvalCase(split, [{"role": "user", "content": user}], TOOLS, tool, args))
    return cases


def eval_cases(seed: int = 1234) -> list[EvalCase]:
    """Catalogue values with unseen phrasings (200), the 100 held-out values with training
    phrasings, and small talk that must not trigger a tool."""
    rng = random.Random(seed)
    heldout = (
        [("get_weather", c) for c in HELDOUT_CITIES]
        + [("convert_currency", a) for a in HELDOUT_AMOUNTS]
        + [("calculate", ab) for ab in HELDOUT_OPERANDS]
    )
    cases = _tool_cases(
        rng, "catalogue_unseen_phrasing", _catalogue_values(rng, 200), EVAL_PHRASINGS
    )
    cases += _tool_cases(rng, "heldout_values", heldout, TRAIN_PHRASINGS)
    for user, _ in SMALL_TALK:
        cases.append(EvalCase("no_tool", [{"role": "user", "content": user}], TOOLS))
    return cases


def dev_cases(seed: int = 4321) -> list[EvalCase]:
    """The eval's two questions asked of values and phrasings the eval never uses: catalogue
    values with the development phrasings (90) and the 40 development cities with training
    phrasings. Choosing between trained candidates on these keeps the eval's held-out
    values and unseen phrasings out of the choice."""
    rng = random.Random(seed)
    cities = [("get_weather", c) for c in DEV_CITIES]
    cases = _tool_cases(rng, "catalogue_dev_phrasing", _catalogue_values(rng, 90), DEV_PHRASINGS)
    return cases + _tool_cases(rng, "dev_cities", cities, TRAIN_PHRASINGS)
