"""Client.get assembles large tensors on pages that a later get uses again once the
program has dropped every reference to them (client/pages.py), over a real server:
values always those put, pages never reused while an array or a view of it lives,
the kept bytes bounded by the largest fetch and given back on close."""

from __future__ import annotations

import gc
import mmap
import threading

import numpy as np

from gradserve.client import Client
from gradserve.client.pages import PagePool
from gradserve.v1.chunks import OWN_PAGES_BYTES

BIG = 3 * OWN_PAGES_BYTES // 4  # float32 elements: 3 MiB, over OWN_PAGES_BYTES


def mapping(array: np.ndarray) -> mmap.mmap:
    """The mapping an array's pages belong to."""
    base = array
    while not isinstance(base, mmap.mmap):
        assert base is not None, "the array is not on a mapping of its own"
        base = base.obj if isinstance(base, memoryview) else base.base
    return base


def test_a_dropped_arrays_pages_assemble_the_next_get(address):
    rng = np.random.default_rng(0)
    first, second = (rng.standard_normal(BIG).astype(np.float32) for _ in range(2))
    with Client(address, timeout=30) as c:
        one, two = c.put({"w": first}), c.put({"w": second})
        got = c.get(one)["w"]
        np.testing.assert_array_equal(got, first)
        pages = mapping(got)  # holding the mapping object keeps nothing from reuse
        del got
        gc.collect()
        got = c.get(two)["w"]  # the same size: the pages of the array just dropped
        assert mapping(got) is pages
        np.testing.assert_array_equal(got, second)
        assert not got.flags.writeable


def test_pages_a_view_still_holds_are_not_reused(address):
    rng = np.random.default_rng(1)
    first, second = (rng.standard_normal(BIG).astype(np.float32) for _ in range(2))
    with Client(address, timeout=30) as c:
        one, two = c.put({"w": first}), c.put({"w": second})
        view = c.get(one)["w"].reshape(-1, 4)[::2].T  # the array itself is dropped
        gc.collect()
        got = c.get(two)["w"]
        np.testing.assert_array_equal(got, second)
        np.testing.assert_array_equal(view, first.reshape(-1, 4)[::2].T)
        assert mapping(got) is not mapping(view)
        held = memoryview(got)  # a buffer of the array keeps its pages too
        del got
        gc.collect()
        again = c.get(two)["w"]
        assert mapping(again) is not mapping(np.asarray(held))
        np.testing.assert_array_equal(again, second)
        np.testing.assert_array_equal(np.frombuffer(held, np.float32), second)


def test_kept_pages_are_bounded_by_the_largest_fetch_and_given_back_on_close(address):
    rng = np.random.default_rng(2)
    small, large = (rng.standard_normal(n).astype(np.float32) for n in (BIG, BIG + 1024))
    with Client(address, timeout=30) as c:
        one, two, both = c.put({"w": small}), c.put({"w": large}), c.put({"a": small,
                                                                        "b": large})
        first, second = c.get(one)["w"], c.get(two)["w"]  # two fetches held at once
        large_pages = mapping(second)
        del first
        gc.collect()
        del second
        gc.collect()
        assert c._pages.free_bytes == large.nbytes  # one fetch's worth: the oldest went
        fetched = c.get(both)  # a larger fetch: the large pages again, new small ones
        assert mapping(fetched["b"]) is large_pages
        np.testing.assert_array_equal(fetched["a"], small)
        np.testing.assert_array_equal(fetched["b"], large)
        assert c._pages.free_bytes == 0
        kept = fetched["b"]
        del fetched
        gc.collect()
        assert c._pages.free_bytes == small.nbytes
    assert c._pages.free_bytes == 0
    np.testing.assert_array_equal(kept, large)  # an array alive at close stays valid
    pages = mapping(kept)
    del kept
    gc.collect()
    assert c._pages.free_bytes == 0 and pages.closed  # dropped after close: unmapped


def test_an_array_dying_inside_the_pools_locked_section_does_not_deadlock():
    """The last reference may go anywhere, a garbage collection that runs while the pool
    holds its lock (making the next array) included: giving pages back takes no lock."""
    pool = PagePool()
    array = pool.fetch()((OWN_PAGES_BYTES,), np.uint8)
    cycle = [array]
    cycle.append(cycle)  # freed only by the cyclic collector
    del array, cycle

    def collect_while_locked():
        with pool._lock:
            gc.collect()
    thread = threading.Thread(target=collect_while_locked, daemon=True)
    thread.start()
    thread.join(60)  # a guard against hanging the run, not a measure of speed
    assert not thread.is_alive(), "the pool deadlocked on its own lock"
    assert pool.free_bytes == OWN_PAGES_BYTES
    again = pool.fetch()((OWN_PAGES_BYTES,), np.uint8)
    assert pool.free_bytes == 0 and len(mapping(again)) == OWN_PAGES_BYTES
