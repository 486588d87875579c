"""`Memory`: the model's memory object (lifecycle, text intake, scoped swap, stats)."""

from __future__ import annotations

import pytest
import torch

from longside.config import SideNetConfig
from longside.errors import CheckpointError, LongsideError
from longside.memory import Memory, read_texts
from longside.model import LongSideModel


@pytest.fixture(scope="module")
def model(smollm2):
    return LongSideModel(smollm2, SideNetConfig(window=64, capacity_tokens=4096))


def test_a_mistyped_path_is_refused_not_memorized(model):
    model.init_memory(1)
    for path in ("/no/such/file.txt", "notes.txt", "data/book"):
        with pytest.raises(LongsideError, match="no file"):
            model.memorize(path, progress=False)
    assert model.memory.lengths() == [0]
    assert model.memorize("notes.txt", as_text=True, progress=False) > 0  # explicitly text
    assert [t for _, t in read_texts("It was late. Then/now nobody knew.")] == ["It was late. Then/now nobody knew."]


def test_an_existing_file_is_read(model, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("The meeting moved to Tuesday.")
    model.init_memory(1)
    n = model.memorize(str(f), progress=False)
    assert n == len(model.backbone.tokenizer("The meeting moved to Tuesday.", add_special_tokens=False).input_ids)
    assert model.memory.lengths() == [n]


def test_scoped_memory_leaves_the_model_memory_untouched(model):
    model.init_memory(2)
    model.memorize("kept for later", row=1, progress=False)
    own = model.memory
    with model.scoped_memory(1) as scratch:
        assert model.memory is scratch and scratch.rows == 1
        model(torch.tensor([[1, 2, 3, 4]]))
        assert scratch.lengths() == [4]
    assert model.memory is own and own.lengths()[0] == 0 and own.lengths()[1] > 0


def test_rows_are_checked_and_stats_are_per_row(model):
    model.init_memory(2)
    with pytest.raises(LongsideError, match="out of range"):
        model.memorize("text", row=2, progress=False)
    model.memorize("some words in row zero", row=0, progress=False)
    stats = model.memory.stats()
    assert len(stats) == 2 and stats[1]["tokens"] == 0 < stats[0]["tokens"]
    with pytest.raises(LongsideError, match="at least one row"):
        Memory(model.backbone, model.config, 0)


def test_a_batch_of_another_size_needs_an_empty_memory(model):
    model.init_memory(1)
    model.memorize("something", progress=False)
    with pytest.raises(LongsideError, match="init_memory"):
        model(torch.tensor([[1, 2], [3, 4]]))
    model.reset_memory()
    model(torch.tensor([[1, 2], [3, 4]]))
    assert model.memory.rows == 2


def test_a_segment_written_after_its_carried_tokens_stores_only_the_new_ones(model):
    memory = Memory(model.backbone, model.config, 1)
    ids = list(range(100, 140))
    for bad in (-1, 40, 64, True, 2.0):
        with pytest.raises(LongsideError, match="carried"):
            memory.write_ids(ids, carried=bad)
    assert memory.lengths() == [0]
    memory.write_ids(ids, carried=10)  # the first 10 are the end of a segment written before
    assert memory.lengths() == [30]
    with pytest.raises(LongsideError, match="carried"):  # more than a segment: nothing would be new
        memory.write_ids(list(range(200)), carried=64)


def test_a_shorter_write_window_carries_its_share_not_one_token_steps(model):
    """Written in segments shorter than the model's window (an evaluation's `--window`), a
    carried window scales with the segment: 64-token model carrying 32, 16-token segments
    carry 8 and bring 8 new tokens each, not 15 carried and 1 new."""
    carrying = LongSideModel(model.backbone, SideNetConfig(window=64, capacity_tokens=4096, window_carry=32),
                             side=model.side)
    assert [carrying.config.carry_for(w) for w in (64, 16, 1, 200)] == [32, 8, 0, 32]
    memory = Memory(carrying.backbone, carrying.config, 1)
    ids = list(range(100, 260))
    assert memory.write_ids(ids, window=16) == len(range(0, 160 - 8, 8)) == 19  # not ~145
    assert memory.lengths() == [160]  # every token once: carried ones are not written twice
    assert memory.write_ids(ids, window=64) == len(range(0, 160 - 32, 32)) == 4


def test_sink_tokens_are_the_first_of_each_forward_not_of_each_write(model):
    """memory_sink_tokens: each forward's first tokens leave the memory layer's bank (the
    token cache keeps them); a carried window's forward starts with tokens written before,
    so only the sinks past its carried ones are held back."""
    sinks = LongSideModel(model.backbone, SideNetConfig(window=64, capacity_tokens=4096, memory_sink_tokens=4),
                          side=model.side)
    memory = Memory(sinks.backbone, sinks.config, 1)
    memory.write_ids(list(range(100, 140)))  # one forward of 40
    plain = Memory(model.backbone, model.config, 1)
    plain.write_ids(list(range(100, 140)))
    assert memory.lengths() == [36] and len(memory.banks[0].tokens) == len(plain.banks[0].tokens)
    memory.write_ids(list(range(200, 240)), carried=2)  # 38 new, its positions 2 and 3 are sinks
    assert memory.lengths() == [36 + 36]
    memory.write_ids(list(range(300, 340)), carried=10)  # past the sinks: all 30 new written
    assert memory.lengths() == [102]
    with pytest.raises(CheckpointError, match="memory_sink_tokens"):
        SideNetConfig(window=64, memory_sink_tokens=64)
