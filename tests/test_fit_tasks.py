import numpy as np
import pytest

from longside.errors import LongsideError
from longside.training.fit_tasks import PROMPTS, TASKS, classification_tasks


def _books():
    verse = lambda w: "\n".join(f"{i} {w} said unto them, go ye into the city and buy bread" for i in range(1, 9))
    return [
        {"source": "bible", "title": "Genesis", "chapters": [{"title": "1", "text": verse("Moses")}]},
        {"source": "bible", "title": "Mark", "chapters": [{"title": "1", "text": verse("Jesus")}]},
        {"source": "bible", "title": "Romans", "chapters": [{"title": "1", "text": verse("Paul")}]},
        {"source": "shakespeare", "title": "Hamlet",
         "chapters": [{"title": "Act 1", "text": "HAMLET.\nTo be, or not to be, that is the question\n\n[Exit.]"}]},
    ]


def test_documents_score_only_label_words_of_their_task(smollm2):
    tok = smollm2.tokenizer
    docs = classification_tasks(tok, _books(), 4, window=64, windows=3, seed=0)
    assert len(docs) == 4
    for i, (ids, labels) in enumerate(docs):
        assert ids.shape == labels.shape == (192,) and ids.dtype == labels.dtype == np.int64
        scored = labels != -100
        assert scored.sum() > 3 and np.array_equal(labels[scored], ids[scored])
        name = ("testament", "bible_section", "author")[i % 3]  # play_genre has one class in these books
        firsts = {tok(" " + w, add_special_tokens=False).input_ids[0] for w in TASKS[name][1]}
        assert set(ids[scored].tolist()) <= firsts
        prompt = PROMPTS[i % len(PROMPTS)][1].strip()
        assert tok.decode(ids[: np.flatnonzero(scored)[0]]).rstrip().endswith(prompt)
    again = classification_tasks(tok, _books(), 4, window=64, windows=3, seed=0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(docs, again))


def test_books_without_two_classes_are_refused(smollm2):
    with pytest.raises(LongsideError, match="no two classes"):
        classification_tasks(smollm2.tokenizer, _books()[3:], 2, window=64)
    assert classification_tasks(smollm2.tokenizer, _books(), 0, window=64) == []
