"""The batch walker of the template layer (issue 26 item 1.4): a batch is a pytree, containers and
non-array leaves reach the model unchanged; one batch is told from a collection of batches."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, defaultdict, namedtuple

import numpy as np
import pytest

from curvop.backends.dataset import Dataset, _is_batch, batch_leaves, batch_size, map_batch

Pair = namedtuple("Pair", "x y")


@dataclasses.dataclass
class Inputs:
    ids: np.ndarray
    name: str = "a"


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: np.ndarray
    n: int = 3


def double(a):
    return a * 2 if isinstance(a, np.ndarray) else a


def test_issue26_item4_every_container_is_rebuilt_with_its_type():
    x = np.ones(2)
    bd = defaultdict(list, {"x": x})
    batch = (Pair(x, [x, "s", None, 3]), OrderedDict(a=x, tag="t"), bd, Inputs(x, "n"), Frozen(x))
    out = map_batch(double, batch)
    assert type(out) is tuple and type(out[0]) is Pair and type(out[1]) is OrderedDict
    assert type(out[2]) is defaultdict and out[2].default_factory is list
    assert isinstance(out[3], Inputs) and out[3].name == "n" and isinstance(out[4], Frozen) and out[4].n == 3
    np.testing.assert_array_equal(out[0].x, 2 * x)
    assert out[0].y[1:] == ["s", None, 3] and out[1]["tag"] == "t"
    for got in (out[0].y[0], out[1]["a"], out[2]["x"], out[3].ids, out[4].x):
        np.testing.assert_array_equal(got, 2 * x)
    np.testing.assert_array_equal(x, np.ones(2))  # the user's batch is not written
    assert batch[3].ids is x and batch[4].x is x


def test_issue26_item4_unchanged_batch_is_returned_itself():
    batch = (Pair(np.ones(2), "s"), {"k": [None, 1]}, Inputs(np.ones(1)))
    assert map_batch(lambda a: a, batch) is batch


def test_issue26_item4_leaves_in_order_and_is_leaf():
    x, y = np.zeros(1), np.ones(1)
    assert [type(v).__name__ for v in batch_leaves(({"a": x, "b": "s"}, Pair(y, None)))] == \
        ["ndarray", "str", "ndarray", "NoneType"]
    assert batch_leaves((Pair(x, y), y), is_leaf=lambda t: isinstance(t, Pair))[0] == Pair(x, y)


@pytest.mark.parametrize("batch, single", [
    ((np.ones((4, 2)), np.ones(4)), True),
    (Pair(np.ones((4, 2)), np.ones(4)), True),  # a namedtuple batch
    ((({"x": np.ones((4, 2))},), np.ones(4)), True),  # inputs: a one-element tuple holding a dict
    (({"x": np.ones((4, 2)), "tag": "a"}, np.ones(4)), True),  # a dict with a string entry
    (((np.ones((4, 2)), None), np.ones(4)), True),
    ({"input_ids": np.ones((4, 2)), "name": "s"}, True),
    (Inputs(np.ones((4, 2))), True),  # a dataclass batch
    ([(np.ones((4, 2)), np.ones(4)), (np.ones((2, 2)), np.ones(2))], False),  # a list of batches
    ([{"x": np.ones((4, 2))}, {"x": np.ones((2, 2))}], False),
    ([Pair(np.ones((4, 2)), np.ones(4))], False),
])
def test_issue26_item4_one_batch_or_several(batch, single):
    assert _is_batch(batch) is single
    assert Dataset(batch).single is single


@pytest.mark.parametrize("batch, n", [
    ((np.ones((4, 2)), np.ones(4)), 4),
    (Pair(np.ones((5, 2)), np.ones(5)), 5),
    (((np.ones((3, 2)), "s"), {"y": np.ones(3)}), 3),  # targets a dict: the first array leaf
    ({"tag": "s", "input_ids": np.ones((6, 2))}, 6),
])
def test_issue26_item4_batch_size_of_nested_batches(batch, n):
    assert batch_size(batch) == n


def test_issue26_item4_batch_size_without_any_array_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot tell the size of a batch"):
        batch_size(("a", "b"))
