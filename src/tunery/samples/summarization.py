"""A dialogue-summarization task in the style of SAMSum, with Replicate's guide's prompt template.

Messenger-like chats between two or three people about everyday plans, each with a one-sentence
summary that names who does what and when. Generated from scenarios with random people, places,
times and phrasing, so the split is reproducible from the seed and needs no download.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tunery.samples import disjoint_splits

SYSTEM = "Use the Input to provide a summary of a conversation."
TEMPLATE = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\nInput:\n{dialogue} [/INST]\n\nSummary:"

NAMES = ["Anna", "Ben", "Carla", "Dev", "Ella", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kemi", "Leo", "Mia",
         "Nate", "Olga", "Paul", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yuki", "Zoe"]
PLACES = ["the cinema", "Luigi's", "the park", "the gym", "the library", "the station", "the market", "Kate's place"]
DAYS = ["today", "tomorrow", "on Friday", "on Saturday", "on Sunday", "on Monday", "tonight"]
TIMES = ["at 6", "at 7", "at 8", "at noon", "at 5:30", "around 9"]
ITEMS = ["keys", "umbrella", "charger", "wallet", "scarf", "headphones", "notebook"]
GIFTS = ["a book", "a plant", "concert tickets", "a board game", "a scarf", "a cookbook"]
FOODS = ["pizza", "sushi", "tacos", "curry", "burgers", "pasta"]


def _meet(rng: random.Random, a: str, b: str) -> tuple[list[str], str]:
    place, day, time = rng.choice(PLACES), rng.choice(DAYS), rng.choice(TIMES)
    lines = [
        f"{a}: {rng.choice(['Hey', 'Hi', 'Yo'])} {b}, are you free {day}?",
        f"{b}: {rng.choice(['I think so', 'Yes', 'Should be'])}, why?",
        f"{a}: Want to go to {place}?",
        f"{b}: {rng.choice(['Sure!', 'Sounds good', 'Love to'])} What time?",
        f"{a}: {time.capitalize()}?",
        f"{b}: {rng.choice(['Perfect', 'Deal', 'OK, see you there'])}",
    ]
    return lines, f"{a} and {b} will meet at {place} {day} {time}."


def _late(rng: random.Random, a: str, b: str) -> tuple[list[str], str]:
    minutes = rng.choice([10, 15, 20, 30])
    reason = rng.choice(["the bus is late", "traffic is terrible", "my meeting ran over", "I missed the train"])
    lines = [
        f"{a}: Sorry, I'm running about {minutes} minutes late, {reason}.",
        f"{b}: {rng.choice(['No worries', 'OK', 'Fine'])}, I'll wait at {rng.choice(PLACES)}.",
        f"{a}: Thanks, order me a coffee?",
        f"{b}: {rng.choice(['Will do', 'Sure', 'Already on it'])}",
    ]
    return lines, f"{a} will be {minutes} minutes late because {reason.replace('my', 'their').replace('I ', 'they ')}; {b} will order them a coffee."


def _lost(rng: random.Random, a: str, b: str) -> tuple[list[str], str]:
    item, place = rng.choice(ITEMS), rng.choice(PLACES)
    lines = [
        f"{a}: Have you seen my {item}?",
        f"{b}: I think you left it at {place}.",
        f"{a}: Oh no. Can you pick it up {rng.choice(DAYS)}?",
        f"{b}: {rng.choice(['Sure', 'Yes, no problem', 'OK'])}",
    ]
    return lines, f"{a} left their {item} at {place} and {b} will pick it up."


def _gift(rng: random.Random, a: str, b: str, c: str) -> tuple[list[str], str]:
    gift, amount = rng.choice(GIFTS), rng.choice([10, 15, 20, 25])
    lines = [
        f"{a}: It's {c}'s birthday next week, any ideas for a present?",
        f"{b}: How about {gift}?",
        f"{a}: Good idea. Split it?",
        f"{b}: Yes, I can put in {amount} euros.",
        f"{a}: Great, I'll buy it {rng.choice(['tomorrow', 'this weekend', 'tonight'])}.",
    ]
    return lines, f"{a} and {b} will give {c} {gift} for their birthday; {b} pays {amount} euros and {a} buys it."


def _dinner(rng: random.Random, a: str, b: str) -> tuple[list[str], str]:
    food, other = rng.sample(FOODS, 2)
    lines = [
        f"{a}: What do you want for dinner?",
        f"{b}: {other.capitalize()}?",
        f"{a}: We had {other} yesterday. {food.capitalize()}?",
        f"{b}: {rng.choice(['Fine', 'OK', 'Sure'])}, you order.",
        f"{a}: {rng.choice(['Done', 'Ordered', 'On it'])}.",
    ]
    return lines, f"{a} and {b} will have {food} for dinner; {a} orders it."


SCENARIOS: list[Callable[..., tuple[list[str], str]]] = [_meet, _late, _lost, _gift, _dinner]


def make_example(rng: random.Random) -> dict[str, str]:
    scenario = rng.choice(SCENARIOS)
    people = rng.sample(NAMES, 3)
    lines, summary = scenario(rng, *people[: scenario.__code__.co_argcount - 1])
    prompt = TEMPLATE.format(system=SYSTEM, dialogue="\n".join(lines))
    return {"prompt": prompt, "completion": f" {summary}"}


def splits(n_train: int = 400, n_test: int = 60, seed: int = 11) -> tuple[list[dict], list[dict]]:
    """Train and test splits with no dialogue shared between them."""
    return disjoint_splits(make_example, n_train, n_test, seed)
