"""The help centre: a handful of articles bundled with the package, found by plain keyword overlap.

No embeddings and no downloads: the retrieval step is ordinary Python over `data/articles.json`, so
it costs no LM call and answers the same for the same ticket. The articles are read once, when the
program is built, and only read after that (shared by every request).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources

_WORD = re.compile(r"[a-z0-9]+")
# Words too common in support tickets to say anything about which article fits.
_STOPWORDS = frozenset(
    (  # noqa: SIM905  (one string reads better than 52 quoted words, one per line)
        "a an and are as at be but by can do for from have how i if in is it its me my no not of on or "
        "our please so that the their this to was we were what when where which why will with you your "
        "hi hello thanks thank"
    ).split()
)


@dataclass(frozen=True, slots=True)
class Article:
    id: str
    title: str
    category: str
    body: str
    words: frozenset[str]

    def as_context(self) -> str:
        """The article as the drafting step reads it."""
        return f"{self.title}: {self.body}"


def keywords(text: str) -> frozenset[str]:
    """The text's lower-cased words, without stopwords."""
    return frozenset(word for word in _WORD.findall(text.lower()) if word not in _STOPWORDS)


def load_articles() -> tuple[Article, ...]:
    """Every article of `data/articles.json`."""
    raw = json.loads(resources.files(__package__).joinpath("data/articles.json").read_text("utf-8"))
    return tuple(
        Article(
            id=item["id"],
            title=item["title"],
            category=item["category"],
            body=item["body"],
            words=keywords(f"{item['title']} {item['body']}"),
        )
        for item in raw
    )


class HelpCentre:
    """Keyword search over the bundled articles (read-only after construction)."""

    def __init__(self, articles: tuple[Article, ...]) -> None:
        self.articles = articles

    def search(self, text: str, *, category: str | None = None, k: int = 2) -> list[Article]:
        """The `k` articles sharing the most keywords with `text`; an article of `category` gets one
        extra point. Articles sharing no keyword at all are never returned."""
        wanted = keywords(text)
        scored = []
        for index, article in enumerate(self.articles):
            overlap = len(wanted & article.words)
            if overlap == 0:
                continue
            bonus = 1 if category is not None and article.category == category else 0
            scored.append((overlap + bonus, -index, article))
        scored.sort(key=lambda entry: (entry[0], entry[1]), reverse=True)
        return [article for _, _, article in scored[:k]]
