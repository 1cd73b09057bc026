"""A classification-with-extraction task: a customer-support message → its category and order number.

The answer is one of six categories (never named in the message: it has to be inferred from
what the customer describes) and the order number, written in the message in several styles
(``#48213``, ``order 48213``, ``no. 48-213``, ``A48213``) and normalised to its five digits.
Exact match needs both parts right, so it measures classification and extraction at once.
"""

from __future__ import annotations

import random

from tunery.samples import disjoint_splits

INSTRUCTION = "Classify the support message and extract its order number as category | order."

CATEGORIES: dict[str, list[str]] = {
    "refund": [
        "I returned the {item} last week and still have not got my money back",
        "please give me my money back for the {item}, I changed my mind",
        "the {item} was not what I wanted and I would like a refund",
        "I sent the {item} back, when will I be reimbursed?",
    ],
    "shipping": [
        "my {item} has not arrived yet and the tracking has not moved for days",
        "where is my parcel? the {item} was supposed to come on {day}",
        "the courier says the {item} was delivered but there is nothing at my door",
        "can you tell me when the {item} will be delivered?",
    ],
    "damaged": [
        "the {item} arrived broken, the box was crushed",
        "the {item} came with a big crack in it",
        "when I opened the package the {item} was scratched and dented",
        "the {item} I got is damaged and does not work",
    ],
    "billing": [
        "I was charged twice for the {item}",
        "my card was billed more than the price of the {item}",
        "the invoice for the {item} shows the wrong amount",
        "there is a payment on my statement for the {item} that I did not expect",
    ],
    "cancel": [
        "please cancel the {item} before it ships",
        "I ordered the {item} by mistake, stop the order please",
        "I no longer need the {item}, can you call off the order?",
        "do not send the {item}, I want to cancel",
    ],
    "wrong_item": [
        "I ordered a {item} but received something else",
        "the package had a different {item} from the one I bought",
        "you sent me the wrong {item}, the color and size are not what I chose",
        "instead of my {item} there was another product in the box",
    ],
}
ITEMS = ["blender", "jacket", "lamp", "headphones", "backpack", "kettle", "phone case", "desk chair", "rug",
         "watch", "coffee grinder", "pair of shoes", "keyboard", "mirror"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
OPENERS = ["Hi,", "Hello,", "Hey there,", "Good morning,", "", "Dear support,"]
CLOSERS = ["Thanks.", "Thank you!", "Regards, {name}", "Please help.", "", "Cheers, {name}"]
NAMES = ["Ada", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hiro", "Ines", "Jonas", "Kofi", "Lena"]


def _order_text(rng: random.Random, digits: str) -> str:
    style = rng.randrange(5)
    if style == 0:
        return f"order #{digits}"
    if style == 1:
        return f"order {digits}"
    if style == 2:
        return f"order no. {digits[:2]}-{digits[2:]}"
    if style == 3:
        return f"order A{digits}"
    return f"order number {digits}"


def make_example(rng: random.Random) -> dict[str, str]:
    category = rng.choice(sorted(CATEGORIES))
    body = rng.choice(CATEGORIES[category]).format(item=rng.choice(ITEMS), day=rng.choice(DAYS))
    digits = f"{rng.randint(10000, 99999)}"
    order = _order_text(rng, digits)
    name = rng.choice(NAMES)
    if rng.random() < 0.5:
        sentence = f"{body[0].upper()}{body[1:]} ({order})."
    else:
        sentence = f"About my {order}: {body}."
    parts = [rng.choice(OPENERS), sentence, rng.choice(CLOSERS).format(name=name)]
    message = " ".join(p for p in parts if p)
    prompt = f"{INSTRUCTION}\nMessage: {message}\nAnswer:"
    return {"prompt": prompt, "completion": f" {category} | {digits}"}


def splits(n_train: int = 400, n_test: int = 100, seed: int = 23) -> tuple[list[dict], list[dict]]:
    """Train and test splits with no prompt shared between them."""
    return disjoint_splits(make_example, n_train, n_test, seed)
