"""Split a generated medical report into its findings and impression, and judge whether it has that shape.

The teacher is asked for "a medical report consisting of findings and impressions" (paper section 3.1); real
models write the section headers in many ways: ``Findings:``, ``FINDINGS:``, ``**Findings:**``,
``Impressions:``, ``## Impression``. A report that is empty or has neither section is still kept (the
instruction mix decides what to use) but carries a ``quality`` flag that the stages count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

QUALITY_OK = "ok"  # both sections present and non-empty
QUALITY_PARTIAL = "partial"  # exactly one of the two sections (e.g. the teacher ran out of tokens)
QUALITY_NO_SECTIONS = "no_sections"  # text, but neither header
QUALITY_EMPTY = "empty"  # no text at all
QUALITIES = (QUALITY_OK, QUALITY_PARTIAL, QUALITY_NO_SECTIONS, QUALITY_EMPTY)
# The flags counted as "bad reports": such a report is kept, flagged, and counted in the stage summary.
FLAGGED = (QUALITY_NO_SECTIONS, QUALITY_EMPTY)

# A header is the word followed by a colon (anywhere, after optional markdown decoration: "**Findings:**"), or
# the word alone on its own line ("## Impression"). "the findings are" (no colon, mid-sentence) is prose.
_HEADER = re.compile(
    r"(?<![A-Za-z])[#*_]*(?P<a>findings?|impressions?)[*_]*[ \t]*:[*_]*"
    r"|^[ \t#*_]*(?P<b>findings?|impressions?)[ \t*_]*$",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class SplitReport:
    findings: Optional[str]
    impression: Optional[str]
    quality: str


def _clean(text: str) -> Optional[str]:
    text = text.strip().strip("*_#").strip()
    return text or None


def split_report(text: Optional[str]) -> SplitReport:
    """Findings and impression of ``text`` (None when a section is absent or empty) and its quality flag.

    A section runs from its header to the next header (or the end). When a header appears twice, the first
    non-empty occurrence wins. Text before the first header (a preamble) belongs to neither section.
    """
    if text is None or not text.strip():
        return SplitReport(None, None, QUALITY_EMPTY)
    headers = list(_HEADER.finditer(text))
    if not headers:
        return SplitReport(None, None, QUALITY_NO_SECTIONS)
    parts = {"findings": None, "impression": None}
    for i, match in enumerate(headers):
        name = match.group("a") or match.group("b")
        key = "findings" if name.lower().startswith("finding") else "impression"
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        body = _clean(text[match.end() : end])
        if parts[key] is None and body is not None:
            parts[key] = body
    have = sum(v is not None for v in parts.values())
    quality = QUALITY_OK if have == 2 else QUALITY_PARTIAL if have == 1 else QUALITY_NO_SECTIONS
    return SplitReport(parts["findings"], parts["impression"], quality)
