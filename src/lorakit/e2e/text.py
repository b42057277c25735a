"""E2E text as the LoRA paper's pipeline renders it (microsoft/LoRA `format_converting_e2e.py`).

A meaning representation (MR) `name[The Vaults], eatType[pub], priceRange[more than £30]` becomes
the context `name : The Vaults | Type : pub | price : more than £ 30` (slots in MR order,
eatType→Type, priceRange→price, familyFriendly→family friendly); values and references are
tokenised Moses-style (`e2e_tokenize`). A training example is context + `E2E_SEPARATOR` as the
prompt and " " + the tokenised reference as the completion (`lorakit.data.formats.e2e_example`).
"""

from __future__ import annotations

import re

from lorakit.errors import DataError

__all__ = ["E2E_SEPARATOR", "e2e_mr_to_context", "e2e_tokenize"]

E2E_SEPARATOR = " ||"
"""Text between the context and the completion: the LoRA files' `||`, with the space before it."""

_E2E_KEYS = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}

_NONBREAKING = frozenset(
    [
        *"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        *("Adj", "Adm", "Adv", "Asst", "Bart", "Bldg", "Brig", "Bros", "Capt", "Cmdr", "Col", "Comdr"),
        *("Con", "Corp", "Cpl", "DR", "Dr", "Drs", "Ens", "Gen", "Gov", "Hon", "Hr", "Hosp", "Insp"),
        *("Lt", "MM", "MR", "MRS", "MS", "Maj", "Messrs", "Mlle", "Mme", "Mr", "Mrs", "Ms", "Msgr"),
        *("Op", "Ord", "Pfc", "Ph", "Prof", "Pvt", "Rep", "Reps", "Res", "Rev", "Rt", "Sen", "Sens"),
        *("Sfc", "Sgt", "Sr", "St", "Supt", "Surg", "v", "vs", "i.e", "rev", "e.g", "Nos", "Nr"),
        *("Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Sept", "Oct", "Nov", "Dec"),
    ]
)  # Moses' English non-breaking prefixes: "Dr." or "St." keep their period
_NUMERIC_ONLY = frozenset({"No", "Art", "pp"})  # non-breaking only before a number


def e2e_tokenize(text: str) -> str:
    """Tokenise text as the LoRA repo's E2E files are (a light Moses-style English tokenizer).

    Splits off punctuation (`£20` → `£ 20`, `food.` → `food .`, `a, b` → `a , b`), spaces hyphens
    between letters/digits (`family-friendly` → `family - friendly`), splits English contractions
    (`there's` → `there 's`) and keeps `..`/`...` whole. A final period after a bare number stays
    when a lowercase word follows (`5. in`). This reproduces LoRA's `valid.txt` from the official
    `devset.csv` for every one of its 4,672 references; on the training set a handful of lines with
    odd quote/apostrophe use differ from LoRA's files.

    Args:
        text: Raw text (an MR value or a reference sentence).

    Returns:
        The tokens joined by single spaces.
    """
    spaced = " " + " ".join(text.split()) + " "
    spaced = re.sub(r"(\D),", r"\1 , ", spaced)
    spaced = re.sub(r",(\D)", r" , \1", spaced)
    spaced = re.sub(r"(\d),$", r"\1 ,", spaced)
    words = spaced.split()
    kept = []
    for index, word in enumerate(words):
        if word.endswith(".") and not word.endswith("..") and len(word) > 1:
            stem = word[:-1]
            following = words[index + 1] if index + 1 < len(words) else ""
            is_acronym = "." in stem and re.search(r"[^\W\d_]", stem) is not None  # "e.g."
            keeps_period = (
                is_acronym
                or stem in _NONBREAKING
                or (stem.isdigit() and following[:1].islower())
                or (stem in _NUMERIC_ONLY and following[:1].isdigit())
            )
            if not keeps_period:
                word = stem + " ."
        kept.append(word)
    spaced = " ".join(kept)
    spaced = re.sub(r"([^\w\s.'`,\-])", r" \1 ", spaced)  # every other symbol: £ ! ? : ( ) " ...
    spaced = re.sub(r"(?<=[^\W_])-(?=[^\W_])", " - ", spaced)
    spaced = re.sub(r"\.\.+", lambda match: f" {match.group(0)} ", spaced)
    # Moses' English apostrophe rules: "isn't" -> "isn 't", "it's" -> "it 's", quotes split off.
    spaced = re.sub(r"([^a-zA-Z])'([^a-zA-Z])", r"\1 ' \2", spaced)
    spaced = re.sub(r"([^a-zA-Z\d])'([a-zA-Z])", r"\1 ' \2", spaced)
    spaced = re.sub(r"([a-zA-Z])'([^a-zA-Z])", r"\1 ' \2", spaced)
    spaced = re.sub(r"([a-zA-Z])'([a-zA-Z])", r"\1 '\2", spaced)
    spaced = re.sub(r"(\d)'(s)", r"\1 '\2", spaced)
    return " ".join(spaced.split())


def e2e_mr_to_context(mr: str) -> str:
    """Turn an official E2E meaning representation into the LoRA pipeline's context string.

    `name[The Vaults], eatType[pub], priceRange[more than £30]` becomes
    `name : The Vaults | Type : pub | price : more than £ 30`: slots keep the MR's order, keys are
    renamed (eatType→Type, priceRange→price, familyFriendly→family friendly) and values are
    tokenised with `e2e_tokenize`.

    Args:
        mr: The `mr` field of `trainset.csv` / `devset.csv`.

    Returns:
        The context, without the separator.

    Raises:
        DataError: The MR contains no `key[value]` slot.
    """
    slots = re.findall(r"([^,\[\]]+)\[([^\]]*)\]", mr)
    if not slots:
        raise DataError(f"not an E2E meaning representation (no 'key[value]' slot): {mr!r}")
    return " | ".join(f"{_E2E_KEYS.get(key.strip(), key.strip())} : {e2e_tokenize(value)}" for key, value in slots)
