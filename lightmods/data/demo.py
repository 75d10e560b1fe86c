"""The embedded demo task: review sentences whose sentiment needs more than keyword spotting.

Sentences are composed from four domains (films, restaurants, hotels, gadgets) with negation ("was not
great"), contrast ("X, but Y" follows Y), concession ("although X, Y"), double statements and neutral
fillers, so a bag of polar words is not enough and a model has to learn word order. The validation split
uses sentiment words (adjectives and verbs) that never occur in training: scoring well on it takes what
a pretrained backbone knows about words it was not fine-tuned on, which a randomly initialised model
lacks. Generation is deterministic for a seed; the validation split contains no training sentence.
"""

from __future__ import annotations

import random

DOMAINS = {
    "film": ["the movie", "the plot", "the acting", "the soundtrack", "the ending", "the script", "the lead actor", "the cinematography"],
    "restaurant": ["the food", "the service", "our waiter", "the dessert", "the pasta", "the wine list", "the menu", "the kitchen"],
    "hotel": ["the room", "the hotel", "the staff", "the breakfast", "the bed", "the pool", "the location", "the front desk"],
    "gadget": ["this phone", "the battery", "the screen", "the keyboard", "the camera", "this laptop", "the charger", "the speaker"],
}
# Sentiment words: (seen in training, held out for validation).
POSITIVE = (["great", "excellent", "wonderful", "superb", "delightful", "brilliant", "charming", "impressive",
             "fantastic", "pleasant", "solid", "lovely", "outstanding", "reliable", "memorable", "friendly"],
            ["marvelous", "terrific", "splendid", "enjoyable", "exceptional", "gorgeous", "stellar", "flawless"])
NEGATIVE = (["awful", "terrible", "dreadful", "disappointing", "boring", "mediocre", "poor", "clumsy",
             "unpleasant", "annoying", "bland", "sloppy", "useless", "forgettable", "rude", "broken"],
            ["horrible", "atrocious", "dismal", "tedious", "lousy", "pathetic", "abysmal", "shoddy"])
INTENSIFIERS = ["", "", "", "really ", "truly ", "quite ", "absolutely ", "rather ", "surprisingly "]
NEGATIONS = ["not", "never", "hardly", "not at all"]
POS_VERBS = (["loved", "enjoyed", "adored"], ["cherished", "relished"])
NEG_VERBS = (["hated", "regretted", "disliked"], ["loathed", "despised"])
FILLERS = ["", "", "", "honestly , ", "to be fair , ", "after a long week , ", "on a rainy tuesday , ",
           "as my friends said , ", "for the price , ", "at first glance , "]  # fmt: skip


def _sentence(rng: random.Random, held_out: bool) -> tuple[str, int]:
    """One sentence and its label (1 = positive); ``held_out`` picks the validation-only sentiment words."""
    v = int(held_out)

    def _adj(r: random.Random, polarity: int) -> str:
        return r.choice((POSITIVE if polarity else NEGATIVE)[v])

    subjects = DOMAINS[rng.choice(sorted(DOMAINS))]
    s1, s2 = rng.sample(subjects, 2)
    label = rng.randint(0, 1)
    filler = rng.choice(FILLERS)
    kind = rng.randrange(8)
    if kind == 0:  # plain statement
        text = f"{s1} was {rng.choice(INTENSIFIERS)}{_adj(rng, label)} ."
    elif kind == 1:  # negated statement flips the adjective
        text = f"{s1} was {rng.choice(NEGATIONS)} {_adj(rng, 1 - label)} ."
    elif kind == 2:  # contrast: the clause after "but" decides
        text = f"{s1} was {_adj(rng, 1 - label)} , but {s2} was {rng.choice(INTENSIFIERS)}{_adj(rng, label)} ."
    elif kind == 3:  # concession: the main clause decides
        text = f"although {s1} was {_adj(rng, 1 - label)} , {s2} was {_adj(rng, label)} ."
    elif kind == 4:  # a verb carries the sentiment
        text = f"i {rng.choice((POS_VERBS if label else NEG_VERBS)[v])} {s1} ."
    elif kind == 5:  # recommendation, possibly negated
        text = f"i would {'definitely' if label else 'never'} recommend {s1} ."
    elif kind == 6:  # agreement of two clauses
        text = f"{s1} was {_adj(rng, label)} and {s2} was {_adj(rng, label)} too ."
    else:  # negated contrast: "not X but Y"
        text = f"{s1} was not {_adj(rng, 1 - label)} but {rng.choice(INTENSIFIERS)}{_adj(rng, label)} ."
    return filler + text, label


def generate_demo(num_train: int, num_val: int, seed: int) -> dict[str, list[dict]]:
    """``{"train": [...], "validation": [...]}`` with rows ``{"idx", "sentence", "label"}``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for split, n in (("train", num_train), ("validation", num_val)):
        attempts = 0
        while len(splits[split]) < n:
            attempts += 1
            if attempts > 50 * n:
                raise RuntimeError(f"demo generator ran out of distinct sentences at {split}={len(splits[split])}")
            text, label = _sentence(rng, held_out=split == "validation")
            if text in seen:
                continue
            seen.add(text)
            splits[split].append({"idx": len(splits[split]), "sentence": text, "label": label})
    return splits
