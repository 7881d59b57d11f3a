from dataclasses import dataclass

import pytest

from autoglm_trt.engine.block_manager import BlockManager, hash_block
from autoglm_trt.engine.sequence import Sequence

BS = 4
IMG = 99


@dataclass
class FakeImage:
    content_hash: str


def make_seq(rid, ids, images=()):
    spans, i = [], 0
    for img in images:  # one run of IMG tokens per image, in order
        start = ids.index(IMG, i)
        end = start
        while end < len(ids) and ids[end] == IMG:
            end += 1
        spans.append((start, end, img.content_hash))
        i = end
    return Sequence(rid, ids, images=list(images), image_spans=spans)


def compute_all(bm, seq):
    """Allocate the whole sequence as a fresh prefill (with prefix reuse) and mark it computed."""
    cached = bm.find_cached_prefix(seq)
    res = bm.allocate(seq, seq.num_tokens - cached, num_cached_tokens=cached)
    assert res.ok
    seq.num_computed_tokens = seq.num_tokens
    return cached


def test_allocate_grows_and_free_returns_everything():
    bm = BlockManager(8, BS)
    seq = make_seq("a", list(range(10)))
    res = bm.allocate(seq, 6)
    assert res.ok and res.num_new_blocks == 2 and len(seq.block_table) == 2
    seq.num_computed_tokens = 6
    assert bm.allocate(seq, 4).num_new_blocks == 1 and len(seq.block_table) == 3
    seq.num_computed_tokens = 10
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    bm.check_invariants([seq])
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.check_invariants([])


def test_allocate_is_atomic_when_short():
    bm = BlockManager(2, BS)
    seq = make_seq("a", list(range(12)))
    res = bm.allocate(seq, 12)
    assert not res.ok and res.num_blocks_short == 1
    assert seq.block_table == [] and bm.num_free_blocks == 2
    bm.check_invariants([seq])


def test_allocate_rejects_more_tokens_than_known():
    bm = BlockManager(4, BS)
    with pytest.raises(ValueError, match="cannot allocate"):
        bm.allocate(make_seq("a", [1, 2]), 3)


def test_prefix_hit_shares_full_blocks_and_leaves_one_token():
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(12)))  # 3 full blocks
    assert compute_all(bm, a) == 0
    b = make_seq("b", list(range(12)))
    assert bm.find_cached_prefix(b) == 8  # never the whole prompt: logits need a computed token
    assert compute_all(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.check_invariants([a, b])
    c = make_seq("c", list(range(13)) + [50])
    assert bm.find_cached_prefix(c) == 12
    d = make_seq("d", [0, 1, 2, 7, 4, 5, 6, 7, 8])
    assert bm.find_cached_prefix(d) == 0  # a differing token in block 0 breaks the whole chain
    assert bm.prefix_cache_queries == 24 and bm.prefix_cache_hits == 8


def test_freed_cached_blocks_stay_findable_and_count_as_free():
    bm = BlockManager(8, BS)
    a = make_seq("a", list(range(9)))
    compute_all(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2
    b = make_seq("b", list(range(9)))
    assert compute_all(bm, b) == 8
    assert bm.num_free_blocks == 5  # 2 revived + 1 new
    bm.check_invariants([b])
    bm.free(b)
    bm.check_invariants([])


def test_different_images_with_same_placeholders_do_not_hit():
    ids = [1, 2, 3, 4, 5, 6, 7, 8, IMG, IMG, IMG, IMG, 9, 10, 11, 12, 13]
    bm = BlockManager(32, BS)
    compute_all(bm, make_seq("a", ids, [FakeImage("cat")]))
    other = make_seq("b", ids, [FakeImage("dog")])
    assert bm.find_cached_prefix(other) == 8  # text blocks before the image still hit
    same = make_seq("c", ids, [FakeImage("cat")])
    assert bm.find_cached_prefix(same) == 16
    bm.check_invariants()


def test_image_straddling_blocks_marks_both():
    ids = [1, 2, IMG, IMG, IMG, IMG, 3, 4, 5]
    bm = BlockManager(8, BS)
    compute_all(bm, make_seq("a", ids, [FakeImage("x")]))
    assert bm.find_cached_prefix(make_seq("b", ids, [FakeImage("y")])) == 0
    assert bm.find_cached_prefix(make_seq("c", ids, [FakeImage("x")])) == 8


def test_lru_eviction_order():
    bm = BlockManager(6, BS)
    a, b = make_seq("a", [1] * 9), make_seq("b", [2] * 9)  # 3 blocks each, 2 full
    compute_all(bm, a)
    compute_all(bm, b)
    bm.free(a)  # a's blocks freed first -> least recently used
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4
    c = make_seq("c", [3] * 12)  # 3 blocks: 2 plain free ones, then evicts 1 cached
    compute_all(bm, c)
    # a's last full block (freed before its first: tails go first) was evicted
    assert bm.find_cached_prefix(make_seq("a2", [1] * 9)) == 4
    assert bm.find_cached_prefix(make_seq("b2", [2] * 9)) == 8
    bm.check_invariants([c])


def test_plain_free_blocks_are_used_before_cached_ones():
    bm = BlockManager(4, BS)
    a = make_seq("a", [1] * 5)
    compute_all(bm, a)
    bm.free(a)
    compute_all(bm, make_seq("b", [2] * 8))  # 2 blocks; 2 plain ones are free
    assert bm.find_cached_prefix(make_seq("a2", [1] * 5)) == 4


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    compute_all(bm, make_seq("a", list(range(9))))
    assert bm.find_cached_prefix(make_seq("b", list(range(9)))) == 0 and bm.num_cached_blocks == 0


def test_twin_blocks_computed_concurrently_stay_consistent():
    bm = BlockManager(8, BS)
    a, b = make_seq("a", [5, 6, 7, 8, 9]), make_seq("b", [5, 6, 7, 8, 9])
    assert bm.allocate(a, 3).ok and bm.allocate(b, 3).ok  # neither block is full yet
    a.num_computed_tokens = b.num_computed_tokens = 3
    assert bm.allocate(a, 2).ok and bm.allocate(b, 2).ok  # both fill block 0 with equal tokens
    assert bm.blocks[a.block_table[0]].hash is not None and bm.blocks[b.block_table[0]].hash is None
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    bm.check_invariants([])
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 1


def test_cached_tokens_argument_is_checked():
    bm = BlockManager(8, BS)
    seq = make_seq("a", list(range(9)))
    with pytest.raises(ValueError, match="cached tokens"):
        bm.allocate(seq, 1, num_cached_tokens=8)


def test_reset_prefix_cache():
    bm = BlockManager(8, BS)
    a = make_seq("a", list(range(9)))
    compute_all(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8
    bm.check_invariants([])


def test_check_invariants_catches_corruption():
    bm = BlockManager(4, BS)
    seq = make_seq("a", [1, 2, 3])
    bm.allocate(seq, 3)
    bm.blocks[seq.block_table[0]].ref_count = 2
    with pytest.raises(AssertionError):
        bm.check_invariants([seq])


def test_hash_chain_depends_on_parent_tokens_and_images():
    h0 = hash_block(None, [1, 2], ())
    assert hash_block(None, [1, 2], ()) == h0 and len(h0) == 16
    assert hash_block(h0, [1, 2], ()) != h0
    assert hash_block(None, [1, 2], ("img",)) != h0
    assert hash_block(None, [2, 1], ()) != h0


def test_cached_tokens_only_for_fresh_sequences():
    bm = BlockManager(8, BS)
    compute_all(bm, make_seq("a", list(range(9))))
    b = make_seq("b", list(range(9)))
    assert bm.allocate(b, 1).ok
    with pytest.raises(ValueError, match="without blocks"):
        bm.allocate(b, 1, num_cached_tokens=4)
