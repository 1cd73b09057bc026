"""A structured-extraction task: a free-text restaurant booking message → one structured line.

Exact match is meaningful here: there is one right answer per message, and a base model
that has never seen the format scores near zero. Messages vary in template, word order,
casing of the day, and in how the party size and time are written.
"""

from __future__ import annotations

import random

from tunery.samples import disjoint_splits

INSTRUCTION = "Extract the booking as name | party size | day | time."

FIRST = ["Maria", "John", "Aisha", "Wei", "Lucas", "Sofia", "Omar", "Emma", "Ivan", "Priya", "Noah", "Chloe",
         "Mateo", "Hana", "Liam", "Zara", "Kenji", "Elena", "Samuel", "Amara", "Felix", "Nina", "Diego", "Yara"]
LAST = ["Lopez", "Smith", "Khan", "Zhang", "Muller", "Rossi", "Haddad", "Brown", "Petrov", "Patel", "Kim",
        "Dubois", "Garcia", "Sato", "Walsh", "Ali", "Tanaka", "Novak", "Okafor", "Berg", "Costa", "Larsen"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
         9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}

TEMPLATES = [
    "Hi, this is {name}. Could I book a table for {party} on {day} at {time}?",
    "Hello! {name} here, we are {party} people and would love to come {day} around {time}.",
    "Table for {party}, {day} {time}, under the name {name}. Thanks!",
    "Good evening, I'd like a reservation on {day} at {time} for {party}. My name is {name}.",
    "{name} speaking - need a table {day}, {time}, party of {party}.",
    "Can you fit {party} of us in on {day}? We'd arrive at {time}. Name: {name}",
    "Booking request from {name}: {party} guests, {day} at {time} please.",
    "hey, it's {name}. {party} people, {day} at {time} - is that possible?",
]


def _time(rng: random.Random) -> tuple[str, str]:
    """A time as written in the message, and as normalised in the answer (24h HH:MM)."""
    hour = rng.choice([12, 13, 17, 18, 19, 20, 21])
    minute = rng.choice([0, 0, 15, 30, 45])
    answer = f"{hour:02d}:{minute:02d}"
    style = rng.random()
    if style < 0.5:
        return answer, answer
    h12 = hour - 12 if hour > 12 else hour
    suffix = "pm"
    written = f"{h12}{suffix}" if minute == 0 else f"{h12}:{minute:02d}{suffix}"
    return written, answer


def make_example(rng: random.Random) -> dict[str, str]:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    party = rng.randint(1, 12)
    day = rng.choice(DAYS)
    written_time, time = _time(rng)
    party_text = WORDS[party] if rng.random() < 0.4 else str(party)
    day_text = day.lower() if rng.random() < 0.3 else day
    message = rng.choice(TEMPLATES).format(name=name, party=party_text, day=day_text, time=written_time)
    prompt = f"{INSTRUCTION}\nMessage: {message}\nBooking:"
    return {"prompt": prompt, "completion": f" {name} | {party} | {day} | {time}"}


def splits(n_train: int = 400, n_test: int = 100, seed: int = 7) -> tuple[list[dict], list[dict]]:
    """Train and test splits with no prompt shared between them."""
    return disjoint_splits(make_example, n_train, n_test, seed)
