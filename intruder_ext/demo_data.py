"""The demo's small task, made deterministically from templates (nothing is downloaded).

Eight classes, topic (sports, cooking, technology, finance) x sentiment, sentences built from
templates and slot words, and a fixed set of out-of-task sentences used to measure how far fine-tuning moves
the model's representations of text it was not tuned on.
"""

from __future__ import annotations

import random

TOPICS = ("sports", "cooking", "technology", "finance")
# Topic x sentiment; the sentiment is often carried by a negation ("was not reliable"), which
# mean-pooled embeddings of the base model barely separate, so fine-tuning has work to do.
LABELS = tuple(f"{t} {s}" for t in TOPICS for s in ("positive", "negative"))

_TEMPLATES = (
    "{who} said the {thing} {be} {adj} after {event}.",
    "Everyone agreed that the {thing} {be} {adj} at {event}.",
    "According to {who}, the {thing} {be} {adj} during {event}.",
    "At {event} the {thing} {be} {adj}, {who} noted.",
    "{who} thought the {thing} {be} {adj} at {event}.",
    "Honestly, the {thing} {be} {adj} at {event}, said {who}.",
)

# (verb phrase, flips the adjective's polarity)
_BE = (("was", False), ("was really", False), ("seemed", False),
       ("was not", True), ("was never", True), ("did not seem", True))

_WHO = ("my neighbour", "the reporter", "our teacher", "a friend of mine", "the manager",
        "my sister", "the old man", "a student", "the guide", "my colleague")

_SLOTS = {
    "sports": {
        "thing": ("goalkeeper", "final whistle", "penalty kick", "marathon", "tennis serve",
                  "relay team", "home run", "free throw", "league table", "transfer window"),
        "good": ("brilliant", "impressive", "thrilling", "well played"),
        "bad": ("dreadful", "sloppy", "boring", "embarrassing"),
        "event": ("the championship match", "the derby", "the Olympic trials", "training camp",
                  "the playoff game"),
    },
    "cooking": {
        "thing": ("sourdough", "risotto", "cast iron pan", "spice rub", "pastry dough",
                  "tomato sauce", "roast chicken", "soup stock", "chocolate cake", "marinade"),
        "good": ("delicious", "perfectly seasoned", "tasty", "wonderful"),
        "bad": ("burnt", "bland", "disgusting", "soggy"),
        "event": ("the dinner party", "the baking class", "the family barbecue",
                  "the cooking contest", "Sunday lunch"),
    },
    "technology": {
        "thing": ("smartphone", "laptop battery", "software update", "graphics card", "router",
                  "operating system", "compiler", "cloud server", "database", "smartwatch"),
        "good": ("reliable", "blazing fast", "excellent", "well designed"),
        "bad": ("buggy", "unusable", "sluggish", "broken"),
        "event": ("the product launch", "the hackathon", "the tech conference",
                  "the security audit", "the server migration"),
    },
    "finance": {
        "thing": ("stock price", "interest rate", "mortgage", "pension fund", "quarterly report",
                  "exchange rate", "savings account", "bond yield", "tax return", "loan"),
        "good": ("encouraging", "healthy", "profitable", "reassuring"),
        "bad": ("disastrous", "alarming", "ruinous", "worrying"),
        "event": ("the shareholder meeting", "the budget review", "the earnings call",
                  "the central bank announcement", "the audit"),
    },
}

# Unrelated to the four topics: nature, history, everyday life. Used only to measure drift.
OUT_OF_TASK = (
    "The river froze early this winter and the ducks moved south.",
    "Medieval castles were often built on hills for defence.",
    "She planted tulips along the fence in late autumn.",
    "The museum opened a new wing devoted to ancient pottery.",
    "Owls hunt mostly at night and sleep during the day.",
    "He forgot his umbrella on the train again.",
    "The poem describes a lonely lighthouse by the sea.",
    "Volcanic soil is very fertile for growing grapes.",
    "The children built a snowman in the schoolyard.",
    "A thick fog covered the valley until noon.",
    "The library extended its opening hours for exam season.",
    "Whales communicate with songs that travel for miles.",
    "The Roman aqueduct still carries water to the town.",
    "My grandmother knits scarves for the whole family.",
    "The desert blooms briefly after a rare spring rain.",
    "The choir rehearsed the hymn three times before mass.",
    "Bees return to the hive by following the sun.",
    "The old bridge was painted bright red last summer.",
    "He learned to play the violin at the age of forty.",
    "The glacier has retreated several kilometres since 1900.",
    "A stray cat sleeps on our porch every afternoon.",
    "The treaty ended a war that had lasted thirty years.",
    "Moss grows thickly on the north side of the trees.",
    "She painted the kitchen walls a soft yellow.",
    "The lighthouse keeper wrote letters to his daughter.",
    "Thunder rolled across the hills late in the evening.",
    "The village celebrates its patron saint every August.",
    "Penguins huddle together to survive the polar winter.",
    "The novel follows a sailor lost at sea for a year.",
    "Our train was delayed by leaves on the track.",
    "Ancient Egyptians wrote on papyrus made from reeds.",
    "The garden path is lined with lavender and rosemary.",
    "A rainbow appeared over the harbour after the storm.",
    "The orchestra tuned their instruments before the concert.",
    "Foxes have adapted well to life in large cities.",
    "The monastery library holds thousands of manuscripts.",
    "He walked the dog along the beach at sunrise.",
    "The cathedral took more than a century to complete.",
    "Migrating geese fly in a V formation to save energy.",
    "The attic was full of dusty letters and old photographs.",
)


def make_task(n_examples: int = 480, seed: int = 0, test_fraction: float = 0.25):
    """Return (train, test): lists of (sentence, label index), balanced over LABELS, shuffled.
    Label = 2 * topic + (1 if the sentence is negative), counting negations."""
    rng = random.Random(seed)
    examples = []
    seen = set()
    per_class = max(n_examples // len(LABELS), 2)
    for label in range(len(LABELS)):
        slots = _SLOTS[TOPICS[label // 2]]
        negative = bool(label % 2)
        made = 0
        while made < per_class:
            be, flips = rng.choice(_BE)
            adj = rng.choice(slots["bad" if negative != flips else "good"])
            text = rng.choice(_TEMPLATES).format(
                who=rng.choice(_WHO), thing=rng.choice(slots["thing"]), be=be, adj=adj,
                event=rng.choice(slots["event"]))
            if text in seen:
                continue
            seen.add(text)
            examples.append((text[0].upper() + text[1:], label))
            made += 1
    rng.shuffle(examples)
    n_test = max(int(round(len(examples) * test_fraction)), len(LABELS))
    return examples[n_test:], examples[:n_test]
