"""Value catalogues and tool behaviour for the tiny tool-calling model's corpus and evaluation.

Values are split once, here, into what training may show (the catalogue) and what it must
never show (the held-out set, 100 values: 60 cities, 20 currency amounts, 20 arithmetic
operand pairs). The corpus generator refuses any synthetic value that collides with a
held-out one, so "never seen in training" is a checked property, not a hope.

Tools are deterministic functions of their arguments, so the evaluation can run a call the
model emitted and know exactly what the final answer must restate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

TRAIN_CITIES = (
    """
Paris London Berlin Madrid Rome Vienna Prague Warsaw Budapest Lisbon Dublin Brussels
Amsterdam Copenhagen Stockholm Oslo Helsinki Athens Zurich Geneva Munich Hamburg Milan
Naples Venice Florence Barcelona Valencia Seville Porto Lyon Marseille Nice Bordeaux
Toulouse Krakow Gdansk Riga Vilnius Tallinn Sofia Bucharest Belgrade Zagreb Ljubljana
Bratislava Tirana Reykjavik Edinburgh Glasgow Manchester Liverpool Bristol Cardiff Belfast
Tokyo Osaka Kyoto Nagoya Sapporo Seoul Busan Beijing Shanghai Shenzhen Guangzhou Chengdu
Wuhan Hangzhou Nanjing Xian Taipei Hanoi Bangkok Manila Jakarta Singapore Mumbai Delhi
Chennai Kolkata Bangalore Hyderabad Karachi Lahore Dhaka Kathmandu Colombo Tehran Baghdad
Riyadh Dubai Doha Muscat Amman Beirut Jerusalem Ankara Istanbul Izmir Cairo Alexandria
Casablanca Marrakesh Tunis Algiers Lagos Accra Dakar Nairobi Kampala Kigali Asmara
Johannesburg Durban Luanda Harare Lusaka Maputo Toronto Montreal Vancouver Calgary Ottawa
Winnipeg Chicago Boston Seattle Denver Phoenix Dallas Houston Austin Miami Atlanta Detroit
Portland Nashville Memphis Baltimore Philadelphia Pittsburgh Cleveland Minneapolis
Sacramento Honolulu Anchorage Havana Kingston Panama Bogota Medellin Quito Lima Santiago
Caracas Montevideo Asuncion Brasilia Recife Salvador Fortaleza Sydney Melbourne Brisbane
Perth Adelaide Auckland Wellington Christchurch Hobart Darwin Canberra
""".split()
    + [
        "New York",
        "Los Angeles",
        "San Francisco",
        "San Diego",
        "Las Vegas",
        "New Orleans",
        "Salt Lake City",
        "Mexico City",
        "Buenos Aires",
        "Rio de Janeiro",
        "Cape Town",
        "Hong Kong",
        "Kuala Lumpur",
        "Ho Chi Minh City",
        "Abu Dhabi",
        "Tel Aviv",
        "St Louis",
        "Kansas City",
        "Quebec City",
        "La Paz",
        "Addis Ababa",
    ]
)

HELDOUT_CITIES = """
Antwerp Ghent Utrecht Rotterdam Aarhus Bergen Tampere Uppsala Graz Salzburg Innsbruck Brno
Poznan Wroclaw Debrecen Cluj Varna Thessaloniki Palermo Bologna Turin Genoa Malaga Bilbao
Granada Coimbra Nantes Strasbourg Leipzig Dresden Cologne Stuttgart Nuremberg Leeds
Sheffield Aberdeen Cork Fukuoka Incheon Kunming Harbin Surabaya Cebu Pune Jaipur
Lucknow Multan Isfahan Kochi Nagpur Agra Tabriz Mosul Aden Sanaa Khartoum Mombasa Arusha Windhoek Gaborone
""".split()
HELDOUT_CITIES = HELDOUT_CITIES[:60]
# Real cities kept out of training and out of the eval: a development set for choosing
# between trained candidates without looking at the held-out values themselves.
DEV_CITIES = """
Ostend Leiden Groningen Odense Trondheim Turku Linz Ostrava Lodz Szeged Iasi Plovdiv
Patras Catania Verona Pisa Cordoba Zaragoza Braga Rennes Lille Bremen Hanover Dortmund
Freiburg Norwich Exeter Galway Sendai Daegu Xiamen Medan Davao Indore Surat Peshawar
Shiraz Basra Tangier Kumasi
""".split()

CURRENCIES: dict[str, tuple[tuple[str, ...], float]] = {
    # code: (names users say, units per US dollar)
    "USD": (("US dollars", "dollars", "USD"), 1.0),
    "EUR": (("euros", "EUR"), 0.92),
    "GBP": (("British pounds", "pounds", "GBP"), 0.79),
    "JPY": (("Japanese yen", "yen", "JPY"), 151.0),
    "CNY": (("Chinese yuan", "yuan", "CNY"), 7.2),
    "INR": (("Indian rupees", "rupees", "INR"), 83.0),
    "CHF": (("Swiss francs", "francs", "CHF"), 0.9),
    "CAD": (("Canadian dollars", "CAD"), 1.36),
    "AUD": (("Australian dollars", "AUD"), 1.52),
    "KRW": (("South Korean won", "won", "KRW"), 1350.0),
    "SEK": (("Swedish kronor", "SEK"), 10.5),
    "MXN": (("Mexican pesos", "pesos", "MXN"), 17.0),
    "BRL": (("Brazilian reais", "reais", "BRL"), 5.0),
    "SGD": (("Singapore dollars", "SGD"), 1.35),
}

# Numbers reserved for evaluation: training never uses them as an amount or operand.
HELDOUT_AMOUNTS = [
    7310, 8462, 9137, 6584, 7923, 8851, 9476, 6215, 7648, 8309,
    9752, 6937, 7184, 8596, 9021, 6473, 7795, 8138, 9364, 6829,
]  # fmt: skip
HELDOUT_OPERANDS = [
    (7341, 26), (8923, 47), (6158, 39), (9472, 18), (7716, 53),
    (8265, 64), (6694, 72), (9817, 35), (7059, 81), (8531, 29),
    (6387, 94), (9143, 57), (7428, 66), (8876, 43), (6912, 88),
    (9605, 21), (7283, 75), (8047, 52), (6751, 37), (9239, 84),
]  # fmt: skip
HELDOUT_NUMBERS = frozenset(HELDOUT_AMOUNTS) | {a for a, _ in HELDOUT_OPERANDS}
HELDOUT_VALUE_COUNT = len(HELDOUT_CITIES) + len(HELDOUT_AMOUNTS) + len(HELDOUT_OPERANDS)

CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "stormy", "clear")
OPERATORS = {"+": ("plus", "added to"), "-": ("minus",), "*": ("times", "multiplied by")}

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount of money from one currency to another.",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "from_currency": {"type": "string", "description": "ISO code"},
                    "to_currency": {"type": "string", "description": "ISO code"},
                },
                "required": ["amount", "from_currency", "to_currency"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculate",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. 12 * 7"}},
                "required": ["expression"],
            },
        },
    },
]
TOOL_NAMES = tuple(t["function"]["name"] for t in TOOLS)


@dataclass(frozen=True)
class ToolOutcome:
    """What a tool returned (as the JSON text a tool turn carries) and the facts an answer
    restating it must contain verbatim."""

    content: str
    facts: tuple[str, ...]


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def weather_of(city: str) -> tuple[int, str]:
    h = _stable_int(city.lower())
    return (h % 45) - 10, CONDITIONS[(h // 45) % len(CONDITIONS)]


def convert_amount(amount: float, src: str, dst: str) -> str:
    return f"{amount / CURRENCIES[src][1] * CURRENCIES[dst][1]:.2f}"


def evaluate_expression(expression: str) -> int:
    """The three forms the corpus produces: `a op b` with integers and op in + - *."""
    left, op, right = expression.split()
    a, b = int(left), int(right)
    return {"+": a + b, "-": a - b, "*": a * b}[op]


class ToolArgumentError(ValueError):
    """A call's arguments the tool cannot take (missing key, wrong type, out of range). A model
    can emit anything, so every caller turns this into an error result, never a crash."""


def run_tool(name: str, args: dict[str, Any]) -> ToolOutcome:
    """Execute a call; ToolArgumentError for an unknown tool or arguments it cannot take."""
    try:
        return _run_tool(name, args)
    except (KeyError, ValueError, TypeError, OverflowError) as e:
        raise ToolArgumentError(f"{name}: {e}") from e


def _run_tool(name: str, args: dict[str, Any]) -> ToolOutcome:
    if name == "get_weather":
        city = str(args["city"])
        temp, cond = weather_of(city)
        result = {"city": city, "temperature_c": temp, "condition": cond}
        return ToolOutcome(json.dumps(result), (str(temp), cond))
    if name == "convert_currency":
        src, dst = str(args["from_currency"]), str(args["to_currency"])
        converted = convert_amount(float(args["amount"]), src, dst)
        result = {"amount": args["amount"], "from": src, "to": dst, "converted": converted}
        return ToolOutcome(json.dumps(result), (converted,))
    if name == "calculate":
        value = evaluate_expression(str(args["expression"]))
        return ToolOutcome(json.dumps({"result": value}), (str(value),))
    raise KeyError(f"unknown tool {name!r}")
