"""The quality suite's four tasks, generated here (no downloads), each with a checker that scores an answer.

Every task has fixed train / valid / test splits drawn from a seeded generator; the test items use words,
names or countries that the training rows never show, so a score measures generalisation, not recall.
Rows are chat messages, so LoReFT and LoRA see the same tokens through the model's own chat template.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

from loreft.demo import is_emoji_answer

SPLIT_SIZES = {"train": 64, "valid": 32, "test": 100}


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # what the task asks of the model, for the report
    rows: dict  # split -> list of {"messages": [user, assistant], "answer": ...}
    check: Callable[[str, dict], bool]  # (generated text, row) -> correct?
    max_tokens: int  # generation budget at test time


def _chat(prompt: str, completion: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], **fields}


def _split(items: list, sizes: dict[str, int]) -> dict[str, list]:
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = items[start:start + n]
        start += n
    if start > len(items):
        raise ValueError(f"need {start} items, have {len(items)}")
    return out


# ---------------------------------------------------------------------------------------------------
# 1. Persona: answer every question in emoji only.

EMOJI = {
    "food": "🍕🍔🍣🍜🥗🍎🍰🍩", "travel": "✈️🚆🗺️🏖️🏔️🧳🌍", "music": "🎵🎸🎹🥁🎤🎧", "sport": "⚽🏀🎾🏊🚴🏃🏆",
    "weather": "☀️🌧️❄️🌈⛅🌪️", "work": "💼💻📈📅✅☕", "animals": "🐶🐱🐢🦁🐘🐧", "health": "💪🥦😴🧘🚶💧",
    "science": "🔬🧪🚀🔭🧬⚛️", "home": "🏠🛋️🧹🪴🛏️🔑", "money": "💰💳🏦📊🪙", "love": "❤️💌🌹🥰💑",
}
QUESTIONS = [
    "What do you think about {t}?", "Give me one tip about {t}.", "How would you describe {t} to a child?",
    "Why do people care about {t}?", "What is the best thing about {t}?", "Tell me a short story about {t}.",
    "How can I get better at {t}?", "What is your favourite part of {t}?", "Explain {t} in a few words.",
    "What should a beginner know about {t}?", "Is {t} fun?", "Describe a perfect day of {t}.",
]
TOPIC_WORDS = {
    "food": ["cooking pasta", "baking bread", "eating sushi", "breakfast", "street food", "desserts"],
    "travel": ["travelling by train", "visiting Japan", "packing a suitcase", "a road trip", "camping", "airports"],
    "music": ["playing guitar", "jazz", "learning the piano", "concerts", "singing", "writing songs"],
    "sport": ["football", "running a marathon", "swimming", "cycling", "tennis", "the Olympics"],
    "weather": ["rainy days", "winter", "summer heat", "storms", "autumn", "snow"],
    "work": ["job interviews", "working from home", "meetings", "starting a company", "deadlines", "coffee breaks"],
    "animals": ["dogs", "cats", "penguins", "elephants", "zoos", "turtles"],
    "health": ["sleeping well", "drinking water", "yoga", "eating vegetables", "walking", "meditation"],
    "science": ["space travel", "chemistry", "telescopes", "DNA", "physics", "rockets"],
    "home": ["cleaning the kitchen", "house plants", "moving house", "decorating", "a cosy sofa", "gardening"],
    "money": ["saving money", "budgets", "investing", "banks", "paying bills", "pocket money"],
    "love": ["first dates", "weddings", "friendship", "love letters", "Valentine's Day", "family"],
}


def _emoji_answer(rng: random.Random, topic: str) -> str:
    chars = [c for c in EMOJI[topic] if unicodedata.category(c) == "So"]
    return "".join(rng.sample(chars, k=min(len(chars), rng.randint(3, 5))))


def emoji_task(seed: int) -> Task:
    rng = random.Random(seed)
    items = [(q, topic, word) for topic, words in TOPIC_WORDS.items() for word in words for q in QUESTIONS]
    rng.shuffle(items)
    # topics' words split by index: test words never appear in training
    test_words = {w for words in TOPIC_WORDS.values() for w in words[4:]}
    seen = [i for i in items if i[2] not in test_words]
    unseen = [i for i in items if i[2] in test_words]
    rows = _split(seen, {"train": SPLIT_SIZES["train"], "valid": SPLIT_SIZES["valid"]})
    rows["test"] = unseen[:SPLIT_SIZES["test"]]
    made = {split: [_chat(q.format(t=word), _emoji_answer(rng, topic)) for q, topic, word in part]
            for split, part in rows.items()}
    return Task("emoji", "persona: answer in emoji only", made, lambda text, _row: is_emoji_answer(text), max_tokens=16)


# ---------------------------------------------------------------------------------------------------
# 2. Classification: the sentiment of a short review; test reviews use adjectives training never shows.

POSITIVE = ["great", "excellent", "wonderful", "lovely", "fantastic", "delightful", "superb", "brilliant",
            "amazing", "pleasant", "perfect", "charming", "outstanding", "marvellous", "splendid", "terrific"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "disappointing", "poor", "bad", "unpleasant",
            "boring", "disgusting", "mediocre", "broken", "rude", "dirty", "useless", "miserable"]
THINGS = ["hotel", "restaurant", "film", "book", "phone", "laptop", "concert", "museum", "train ride",
          "coffee shop", "hair salon", "pizza", "jacket", "video game", "bakery", "gym"]
ASPECTS = ["the staff", "the price", "the service", "the quality", "the atmosphere", "the design"]
REVIEW = ["The {thing} was {a1}, and {aspect} was {a2}.", "I found the {thing} {a1}; {aspect} was {a2} too.",
          "What a {a1} {thing}. Honestly, {aspect} was {a2}.", "Our visit to the {thing}: {a1}. Also {aspect}: {a2}."]
QUESTION = "Is this review positive or negative? Answer with one word.\n\nReview: {review}"


def _label(text: str) -> str | None:
    """The one sentiment label the answer names ('This review is positive' counts), or None for neither or both."""
    named = {w for w in re.findall(r"[a-z]+", text.lower()) if w in ("positive", "negative")}
    return named.pop() if len(named) == 1 else None


def sentiment_task(seed: int) -> Task:
    rng = random.Random(seed)

    def make(n: int, pos: list[str], neg: list[str]) -> list[dict]:
        rows = []
        for i in range(n):
            label = "positive" if i % 2 == 0 else "negative"
            adjectives = pos if label == "positive" else neg
            a1, a2 = rng.sample(adjectives, 2)
            review = rng.choice(REVIEW).format(thing=rng.choice(THINGS), aspect=rng.choice(ASPECTS), a1=a1, a2=a2)
            rows.append(_chat(QUESTION.format(review=review), label, answer=label))
        rng.shuffle(rows)
        return rows

    # the first half of each list trains (and validates); the second half is only ever in test reviews
    half = len(POSITIVE) // 2
    made = {"train": make(SPLIT_SIZES["train"], POSITIVE[:half], NEGATIVE[:half]),
            "valid": make(SPLIT_SIZES["valid"], POSITIVE[:half], NEGATIVE[:half]),
            "test": make(SPLIT_SIZES["test"], POSITIVE[half:], NEGATIVE[half:])}
    return Task("sentiment", "classification: review sentiment, unseen adjectives", made,
                lambda text, row: _label(text) == row["answer"], max_tokens=8)


# ---------------------------------------------------------------------------------------------------
# 3. Structured output: extract name, age and city as JSON with exactly these keys.

NAMES = ["Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kenji", "Lena",
         "Marco", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wei", "Yara",
         "Zoe", "Liam", "Mia", "Noah", "Olga", "Pablo", "Ravi", "Sofia", "Tomas", "Ugo", "Wanda", "Xavier"]
CITIES = ["Lisbon", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Oslo", "Dublin", "Athens",
          "Warsaw", "Tokyo", "Seoul", "Lima", "Cairo", "Nairobi", "Toronto", "Boston", "Sydney", "Mumbai",
          "Denver", "Munich", "Porto", "Kyoto", "Quito", "Accra", "Hanoi", "Zurich", "Milan", "Bogota"]
SENTENCES = ["{name} is {age} years old and lives in {city}.", "Meet {name}, {age}, who is based in {city}.",
             "Living in {city}, {name} turned {age} this year.", "{name} ({age}) moved to {city} last spring.",
             "At {age}, {name} runs a small shop in {city}."]
JSON_PROMPT = "Extract the person's name, age and city from the text as JSON with keys name, age, city.\n\nText: {text}"


def _json_matches(text: str, row: dict) -> bool:
    """The whole answer parses as one JSON object with exactly the keys name, age, city and the right values."""
    try:
        got = json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(got, dict) and got == row["answer"]


def json_task(seed: int) -> Task:
    rng = random.Random(seed)
    # names and cities split in two: test people have names and cities no training row mentions
    names, cities = NAMES[:], CITIES[:]
    rng.shuffle(names)
    rng.shuffle(cities)
    seen, unseen = (names[:18], cities[:15]), (names[18:], cities[15:])

    def make(n: int, pool) -> list[dict]:
        rows = []
        for _ in range(n):
            person = {"name": rng.choice(pool[0]), "age": rng.randint(18, 90), "city": rng.choice(pool[1])}
            text = rng.choice(SENTENCES).format(**person)
            rows.append(_chat(JSON_PROMPT.format(text=text), json.dumps(person), answer=person))
        return rows

    made = {"train": make(SPLIT_SIZES["train"], seen), "valid": make(SPLIT_SIZES["valid"], seen),
            "test": make(SPLIT_SIZES["test"], unseen)}
    return Task("json", "structured output: JSON with given keys", made, _json_matches, max_tokens=32)


# ---------------------------------------------------------------------------------------------------
# 4. Knowledge in a new format: "CAPITAL: X" for countries training never shows.

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen",
    "Finland": "Helsinki", "Iceland": "Reykjavik", "Russia": "Moscow", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Slovenia": "Ljubljana", "Slovakia": "Bratislava",
    "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Belarus": "Minsk", "Albania": "Tirana",
    "North Macedonia": "Skopje", "Montenegro": "Podgorica", "Bosnia and Herzegovina": "Sarajevo",
    "Moldova": "Chisinau", "Luxembourg": "Luxembourg", "Malta": "Valletta", "Cyprus": "Nicosia",
    "Turkey": "Ankara", "Georgia": "Tbilisi", "Armenia": "Yerevan", "Azerbaijan": "Baku",
    "United States": "Washington", "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana",
    "Jamaica": "Kingston", "Haiti": "Port-au-Prince", "Dominican Republic": "Santo Domingo",
    "Guatemala": "Guatemala City", "Honduras": "Tegucigalpa", "El Salvador": "San Salvador",
    "Nicaragua": "Managua", "Costa Rica": "San Jose", "Panama": "Panama City", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Ecuador": "Quito", "Peru": "Lima", "Bolivia": "Sucre", "Chile": "Santiago",
    "Argentina": "Buenos Aires", "Uruguay": "Montevideo", "Paraguay": "Asuncion", "Brazil": "Brasilia",
    "Guyana": "Georgetown", "Suriname": "Paramaribo", "Bahamas": "Nassau", "Barbados": "Bridgetown",
    "Trinidad and Tobago": "Port of Spain", "Egypt": "Cairo", "Libya": "Tripoli", "Tunisia": "Tunis",
    "Algeria": "Algiers", "Morocco": "Rabat", "Sudan": "Khartoum", "Ethiopia": "Addis Ababa", "Kenya": "Nairobi",
    "Uganda": "Kampala", "Tanzania": "Dodoma", "Rwanda": "Kigali", "Burundi": "Gitega", "Somalia": "Mogadishu",
    "Nigeria": "Abuja", "Ghana": "Accra", "Senegal": "Dakar", "Mali": "Bamako", "Niger": "Niamey",
    "Chad": "N'Djamena", "Cameroon": "Yaounde", "Gabon": "Libreville", "Angola": "Luanda", "Zambia": "Lusaka",
    "Zimbabwe": "Harare", "Mozambique": "Maputo", "Malawi": "Lilongwe", "Botswana": "Gaborone",
    "Namibia": "Windhoek", "South Africa": "Pretoria", "Madagascar": "Antananarivo", "Liberia": "Monrovia",
    "Sierra Leone": "Freetown", "Guinea": "Conakry", "Ivory Coast": "Yamoussoukro", "Burkina Faso": "Ouagadougou",
    "Togo": "Lome", "Benin": "Porto-Novo", "Mauritania": "Nouakchott", "Eritrea": "Asmara", "Djibouti": "Djibouti",
    "Saudi Arabia": "Riyadh", "Yemen": "Sanaa", "Oman": "Muscat", "United Arab Emirates": "Abu Dhabi",
    "Qatar": "Doha", "Kuwait": "Kuwait City", "Bahrain": "Manama", "Iraq": "Baghdad", "Iran": "Tehran",
    "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman", "Israel": "Jerusalem", "Afghanistan": "Kabul",
    "Pakistan": "Islamabad", "India": "New Delhi", "Nepal": "Kathmandu", "Bhutan": "Thimphu",
    "Bangladesh": "Dhaka", "Sri Lanka": "Colombo", "Maldives": "Male", "China": "Beijing", "Mongolia": "Ulaanbaatar",
    "Japan": "Tokyo", "South Korea": "Seoul", "North Korea": "Pyongyang", "Taiwan": "Taipei", "Vietnam": "Hanoi",
    "Laos": "Vientiane", "Cambodia": "Phnom Penh", "Thailand": "Bangkok", "Myanmar": "Naypyidaw",
    "Malaysia": "Kuala Lumpur", "Singapore": "Singapore", "Indonesia": "Jakarta", "Philippines": "Manila",
    "Brunei": "Bandar Seri Begawan", "East Timor": "Dili", "Kazakhstan": "Astana", "Uzbekistan": "Tashkent",
    "Turkmenistan": "Ashgabat", "Kyrgyzstan": "Bishkek", "Tajikistan": "Dushanbe", "Australia": "Canberra",
    "New Zealand": "Wellington", "Papua New Guinea": "Port Moresby", "Fiji": "Suva", "Samoa": "Apia",
    "Tonga": "Nuku'alofa", "Vanuatu": "Port Vila", "Solomon Islands": "Honiara",
}
CAPITAL_PROMPTS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital city of {c}."]


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z]+", " ", text.lower()).strip()


def _capital_matches(text: str, row: dict) -> bool:
    """Exactly one line 'CAPITAL: <city>' naming the right capital (accents and case ignored)."""
    m = re.fullmatch(r"CAPITAL: (.+)", text.strip())
    return m is not None and _fold(m.group(1)) == _fold(row["answer"])


def capital_task(seed: int) -> Task:
    rng = random.Random(seed)
    countries = sorted(CAPITALS)
    rng.shuffle(countries)
    n_test = SPLIT_SIZES["test"]
    test, rest = countries[:n_test], countries[n_test:]  # training and validation share no country with test

    def make(pool: list[str], n: int) -> list[dict]:
        return [_chat(rng.choice(CAPITAL_PROMPTS).format(c=c), f"CAPITAL: {CAPITALS[c]}", answer=CAPITALS[c])
                for c in (pool * (n // len(pool) + 1))[:n]]

    valid_n = min(SPLIT_SIZES["valid"], len(rest) // 3)
    made = {"train": make(rest[valid_n:], SPLIT_SIZES["train"]), "valid": make(rest[:valid_n], valid_n),
            "test": make(test, n_test)}
    return Task("capitals", "knowledge in a new format: 'CAPITAL: X', unseen countries", made, _capital_matches,
                max_tokens=12)


TASKS = {"emoji": emoji_task, "sentiment": sentiment_task, "json": json_task, "capitals": capital_task}


def make_tasks(names: list[str] | None = None, seed: int = 0) -> list[Task]:
    """The named tasks (all by default), generated from the seed."""
    return [TASKS[n](seed) for n in (names or list(TASKS))]
