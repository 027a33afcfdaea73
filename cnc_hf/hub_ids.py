"""What a Hugging Face Hub repo id looks like, written once for the card, the upload and the Space.

    is_hub_id("org/cnc-mvtec")           # True: "namespace/name"
    is_hub_id("cnc-mvtec", bare=True)    # True: a name alone (the Hub puts it under your account)
    looks_like_hub_id("openai/clip")     # an id that is not also a local path here
    check_repo_id(value, "repo_id")      # the value, or a ValueError naming the argument

The pattern is the Hub's own alphabet (letters, digits, "_", "-", ".") on each side of one "/";
the Hub's finer rules (length, no "--" or ".." inside) are left to the Hub, which says them better.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
BARE_NAME = re.compile(r"[\w.-]+")


def is_hub_id(value: Any, *, bare: bool = False) -> bool:
    """`namespace/name` (or, with `bare=True`, also a name alone)."""
    if not isinstance(value, str):
        return False
    return bool(HUB_ID.fullmatch(value) or (bare and BARE_NAME.fullmatch(value)))


def looks_like_hub_id(value: Any) -> bool:
    """A `namespace/name` that is not a local path here: the Hub repo is what is meant."""
    return is_hub_id(value) and not Path(value).exists()


def check_repo_id(value: Any, argument: str = "repo_id", *, bare: bool = False) -> str:
    """`value` when it is a Hub id, else a ValueError saying which argument and what was expected."""
    if not is_hub_id(str(value or ""), bare=bare):
        expected = "'name' or 'org/name'" if bare else "'org/name'"
        raise ValueError(f"{argument}: got {value!r}; expected {expected}")
    return str(value)


__all__ = ["HUB_ID", "check_repo_id", "is_hub_id", "looks_like_hub_id"]
