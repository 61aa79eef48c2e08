"""The prefix tree and its policies: hand-worked admissions, hits and evictions (Marconi's branch example, vLLM+'s
blocks, LRU and utility order), and random request streams that must keep every invariant."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.prefix.costs import HybridCosts
from kvtier.prefix.radix_tree import POLICIES, Policy, RadixTree

# 1 attention, 1 Mamba2, 1 MLP layer, d 4, N 2: 8 bytes of K/V a token, a 20-byte state
TINY = HybridCosts(num_attention=1, num_ssm=1, num_mlp=1, d_model=4, state_size=2, kv_bytes_per_token=8, state_bytes=20)
ATTENTION_ONLY = HybridCosts(num_attention=1, num_ssm=0, num_mlp=1, d_model=4, state_size=2, kv_bytes_per_token=8, state_bytes=0)


def shape(tree: RadixTree) -> list[tuple[int, bool, tuple[int, ...]]]:
    return sorted((n.depth, n.state, n.tokens) for n in tree.nodes())


def test_the_costs_are_the_papers():
    """The spec's arithmetic for the 7B hybrid: a 1,116,160-byte state per layer; a 10K-token sequence checkpointed every
    16 tokens holds 17.40 GB; one checkpoint is the K/V of 409 tokens."""
    c = HybridCosts.paper_7b()
    assert c.state_bytes == 24 * 1_116_160
    assert round((625 * c.state_bytes + 10_000 * c.kv_bytes_per_token) / 1e9, 2) == 17.40
    assert round(c.state_bytes / c.kv_bytes_per_token) == 409
    assert TINY.kv_bytes_per_token == 8 and TINY.state_bytes == 20


def test_marconi_checkpoints_where_an_input_branches_off():
    """'NYC is a busy city' then 'NYC is very huge': the second input splits the first's edge after 'NYC is'; that
    prefix has been seen twice, so its state is taken during the second prefill and a third input starting so hits."""
    tree = RadixTree(TINY, 10_000, Policy("marconi"))
    assert tree.match([1, 2, 3, 4, 5]) == 0
    tree.admit([1, 2, 3, 4, 5], [6])
    assert shape(tree) == [(0, True, ()), (6, True, (1, 2, 3, 4, 5, 6))]
    assert tree.match([1, 2, 3, 7, 8]) == 0  # no state at 3 yet
    tree.admit([1, 2, 3, 7, 8], [9])
    assert shape(tree) == [(0, True, ()), (3, True, (1, 2, 3)), (6, True, (4, 5, 6)), (6, True, (7, 8, 9))]
    assert tree.bytes_used == 9 * 8 + 3 * 20
    assert tree.match([1, 2, 3, 10]) == 3
    assert tree.match([1, 2, 3, 4, 5, 6, 11]) == 6  # a conversation continuing from the last decoded token


def test_vllm_plus_holds_a_state_at_every_block():
    tree = RadixTree(TINY, 10_000, Policy("vllm+", block_size=2))
    tree.admit([1, 2, 3, 4, 5, 6], [7])  # 7 tokens: 3 full blocks, the last token is not cached
    assert tree.bytes_used == 3 * (2 * 8 + 20)
    assert tree.match([1, 2, 3, 4, 9, 9]) == 4
    assert tree.match([1, 2, 3, 9]) == 2
    assert tree.match([1, 9]) == 0  # a block that differs anywhere is another block


def test_lru_evicts_the_least_recent_leaf_and_marconi_refreshes_only_the_node_used():
    tree = RadixTree(TINY, 3 * (2 * 8 + 20), Policy("sglang+"))
    tree.admit([1], [2])  # 2 tokens and a state: 36 bytes
    tree.admit([3], [4])
    tree.admit([5], [6])
    tree.match([1, 2, 9])  # refreshes [1, 2]
    tree.admit([7], [8])  # the cache holds three: [3, 4] is the least recent
    assert {n.tokens for n in tree.nodes()} == {(), (1, 2), (5, 6), (7, 8)} and tree.evictions == 1


def test_marconi_evicts_by_recency_and_flop_efficiency():
    """Two leaves of equal age: with alpha 0 the older goes; with a large alpha the one saving fewer FLOPs per byte goes
    (a short prefix: attention's quadratic term makes long prefixes the efficient ones)."""
    long, short = list(range(10, 30)), [40, 41]
    for alpha, kept in ((0.0, (40, 41)), (5.0, tuple(long))):
        tree = RadixTree(TINY, 10_000, Policy("marconi", alpha=alpha))
        tree.admit(long[:-1], long[-1:])
        tree.admit(short[:-1], short[-1:])
        tree.capacity = tree.bytes_used
        tree.admit([50], [51])  # needs 36 bytes: one of the two must go
        assert kept in {n.tokens for n in tree.nodes()}, (alpha, shape(tree))


def test_flop_efficiency_is_marginal_flops_per_byte_a_hit_keeps_resident():
    """Hand-worked on TINY (prefill of L tokens: 744 L + 16 L^2 FLOPs; a hit at depth L keeps 8 L + 20 bytes): with
    recency equal, the leaf (4, 5, 6) below the branch at 3 saves (744 x 3 + 16 x 27) = 2,664 FLOPs beyond its parent
    for 68 bytes (39.2 a byte), less than the root's children (2,376 for 44 bytes, 54.0), so it goes first, although
    its own edge and state (44 bytes) would rate it 60.5 a byte, above them."""
    tree = RadixTree(TINY, 10_000, Policy("marconi", alpha=1.0))
    tree.admit([1, 2, 3, 4, 5], [6])
    tree.admit([1, 2, 3, 7], [8])
    tree.admit([20, 21], [22])
    tree._evict(next(n for n in tree.nodes() if n.tokens == (7, 8)))
    for n in tree.nodes():
        n.last_access = 1
    assert TINY.prefill_flops(6) - TINY.prefill_flops(3) == 2_664 and TINY.prefill_flops(3) == 2_376
    assert {n.tokens for n in tree._candidates()} == {(1, 2, 3), (4, 5, 6), (20, 21, 22)}
    assert tree._victim().tokens == (4, 5, 6)


def test_a_single_child_node_gives_up_its_state_and_merges():
    """Marconi's candidates include a node with one child: evicting it frees its state only, and its edge joins the
    child's; SGLang+ evicts leaves only."""
    for policy in ("marconi", "sglang+"):
        tree = RadixTree(TINY, 10_000, Policy(policy))
        tree.admit([1, 2, 3, 4], [5])
        tree.admit([1, 2, 3, 6], [7])  # a branch state at 3
        tree._evict(next(n for n in tree.nodes() if n.tokens == (6, 7)))
        branch = next(n for n in tree.nodes() if n.depth == 3)
        branch.last_access = -1  # the least recently used node
        assert (tree._victim() is branch) == (policy == "marconi")
    tree = RadixTree(TINY, 10_000, Policy("marconi"))
    tree.admit([1, 2, 3, 4], [5])
    tree.admit([1, 2, 3, 6], [7])
    tree._evict(next(n for n in tree.nodes() if n.tokens == (6, 7)))
    tree._evict(next(n for n in tree.nodes() if n.depth == 3))
    assert shape(tree) == [(0, True, ()), (5, True, (1, 2, 3, 4, 5))] and tree.bytes_used == 5 * 8 + 20
    assert tree.match([1, 2, 3, 9]) == 0 and tree.match([1, 2, 3, 4, 5, 9]) == 5


def check_invariants(tree: RadixTree, stored: set[tuple[int, ...]]) -> None:
    total = 0
    for node in tree.nodes():
        assert node.locks == 0
        if node is not tree.root:
            assert node.parent.children[node.tokens[0]] is node
            assert node.depth == node.parent.depth + len(node.tokens) and node.tokens
            assert node.children or node.state, "a leaf without a state saves nothing"
            if tree.policy.name != "vllm+":
                assert node.state or len(node.children) > 1, "a stateless single-child node is merged away"
        total += tree.node_bytes(node) - (tree.costs.state_bytes if node is tree.root else 0)
    assert total == tree.bytes_used <= tree.capacity
    assert tree.num_states == sum(1 for n in tree.nodes() if n.state and n is not tree.root)


requests = st.lists(st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=12), st.lists(st.integers(0, 3), max_size=4)),
                    min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(requests, st.sampled_from(POLICIES), st.integers(60, 600), st.sampled_from([0.0, 0.5, 2.0]), st.booleans())
def test_random_streams_keep_every_invariant(stream, policy, capacity, alpha, hybrid):
    """Whatever the requests and the cache size: bytes counted exactly and within capacity, nothing left locked, the tree
    compressed, and no hit longer than a stored prefix that holds its state (any stored prefix without SSM layers)."""
    tree = RadixTree(TINY if hybrid else ATTENTION_ONLY, capacity, Policy(policy, alpha=alpha, block_size=2))
    seen: list[tuple[int, ...]] = []
    for prompt, output in stream:
        hit = tree.match(prompt)
        assert 0 <= hit <= len(prompt) and (hit == 0 or any(tuple(prompt[:hit]) == s[:hit] for s in seen))
        if hybrid and hit:
            path, _ = tree._walk(tree._units(prompt[:hit]))
            assert path[-1].depth * tree.unit == hit and path[-1].state
        tree.admit(prompt, output)
        seen.append(tuple(prompt) + tuple(output))
        check_invariants(tree, set(seen))


def prefix_of(node) -> tuple[int, ...]:
    out = ()
    while node.parent is not None:
        out, node = node.tokens + out, node.parent
    return out


inserts = st.lists(st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=12), st.sets(st.integers(1, 14), max_size=4)),
                   min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(inserts, st.sampled_from(["sglang+", "marconi"]), st.integers(60, 600))
def test_states_inserted_anywhere_land_exactly_or_come_back(stream, policy, capacity):
    """The engine inserts the states it took, which need not be where the tree would now branch: each payload is held by
    one node whose prefix is exactly the payload's tokens, or given back through on_release, once; never both."""
    released: list[object] = []
    tree = RadixTree(TINY, capacity, Policy(policy), on_release=released.append)
    made: list[tuple[object, tuple[int, ...]]] = []
    for tokens, lengths in stream:
        payloads = {n: object() for n in lengths}
        made += [(p, tuple(tokens[:n]) if n <= len(tokens) else None) for n, p in payloads.items()]
        tree.insert(tokens, payloads)
        held = {id(n.payload): n for n in tree.nodes() if n.payload is not None}
        gone = [id(p) for p in released]
        assert len(gone) == len(set(gone)), "a payload is released once"
        for p, prefix in made:
            assert (id(p) in held) != (id(p) in gone)
            if id(p) in held:
                assert prefix_of(held[id(p)]) == prefix and held[id(p)].state
        check_invariants(tree, set())


def test_an_empty_tree_has_nothing_to_evict():
    """The engine asks for room whenever a pool runs short, also when the tree holds nothing (the root never goes)."""
    for policy in POLICIES:
        tree = RadixTree(TINY, 10_000, Policy(policy, block_size=2))
        assert tree.match([1, 2, 3]) == 0 and not tree.evict_one()
        tree.admit([1, 2, 3, 4], [5])
        while tree.evict_one():
            pass
        assert tree.bytes_used == 0 and tree.nodes() == [tree.root] and tree.match([1, 2, 3, 4, 5]) == 0 and not tree.evict_one()
