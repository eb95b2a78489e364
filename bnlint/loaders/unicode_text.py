"""Text from a model file must be valid Unicode: names and keys end up in every report format.

Python strings can hold surrogate code points (U+D800-U+DFFF) that no UTF-8 stream can carry: a
pickle decoded with `surrogatepass`, or a JSON `\\udc00` escape, produces them, and writing such a
name to stdout or a JSON report fails. Loaders refuse those files with one InputError line.
"""

from __future__ import annotations

import json
import re
from typing import Any

SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def json_has_surrogates(text: str, doc: Any) -> bool:
    """Whether parsed JSON `doc` (from `text`) holds an unpaired surrogate (paired escapes are one character)."""
    if not _SURROGATE_ESCAPE.search(text) and not SURROGATE.search(text):
        return False  # the common case: one regex scan, no second pass over the document
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (RecursionError, ValueError):
        return False  # nesting and NaN are judged by the caller's own checks
    return False
