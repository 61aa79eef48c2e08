"""A radix tree of token prefixes whose edges hold K/V and whose nodes may hold an SSM-state checkpoint, with the
admission and eviction policies of Marconi (Pan et al., MLSys 2025) and its two baselines.

A hybrid model's Mamba2 state is updated in place and cannot be cut back, so a prefix is reusable only up to a node
that holds the state at exactly its length; K/V alone would serve any length. Tokens are compared exactly. What
each node holds is counted in bytes by a :class:`~kvtier.prefix.costs.HybridCosts`; the tree never holds more than
its capacity, and nothing locked (a path in use) is evicted.

Policies (:class:`Policy`):

- ``vllm+``: vLLM's block prefix caching extended to hybrids: a node per full block, each with its K/V and a state;
  least recently used leaves go first, and a hit refreshes the whole path.
- ``sglang+``: Marconi's admission (a state where a new input branches off the tree, found by inserting it
  speculatively before its prefill, and at the last decoded token) with SGLang's LRU over leaves, ancestors refreshed.
- ``marconi``: the same admission; candidates are the nodes with at most one child (a leaf goes whole, a single-child
  node gives up its state and its edge merges into the child), scored by normalised recency plus alpha x normalised
  FLOP efficiency (the FLOPs the node saves beyond its parent per byte a hit on it keeps resident); a hit refreshes only
  the node used.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvtier.prefix.costs import HybridCosts

POLICIES = ("vllm+", "sglang+", "marconi")


@dataclass(eq=False)
class Node:
    tokens: tuple[int, ...]  # the edge from the parent
    parent: Node | None
    depth: int  # the prefix length at the node's end
    children: dict[int, Node] = field(default_factory=dict)  # first token of each child's edge -> child
    state: bool = False  # holds the SSM state of exactly this prefix
    payload: object | None = None  # in the engine, the checkpoint that holds it (the simulator keeps none)
    last_access: int = 0
    locks: int = 0  # paths in use through this node
    detached: bool = False  # evicted, or merged into its child


CANDIDATES = ("leaves", "single-child")  # what eviction may take: leaves only, or also a single-child node's state
REFRESH = ("path", "node")  # what a hit refreshes: the whole matched path, or only the node it resumes from


@dataclass(frozen=True)
class Policy:
    """A policy by name; ``candidates`` and ``refresh`` default to the name's rules and can be set apart from it, which
    is how the report separates Marconi's alpha from its candidate and refresh rules."""

    name: str
    alpha: float = 0.0  # the weight of FLOP efficiency against recency (0: least recently used first)
    block_size: int = 32  # vllm+: the block a node holds
    candidates: str | None = None
    refresh: str | None = None

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.name!r}")
        marconi = self.name == "marconi"
        object.__setattr__(self, "candidates", self.candidates or CANDIDATES[marconi])
        object.__setattr__(self, "refresh", self.refresh or REFRESH[marconi])
        if self.candidates not in CANDIDATES or self.refresh not in REFRESH:
            raise ValueError(f"candidates must be one of {CANDIDATES} and refresh one of {REFRESH}, got {self.candidates!r}, {self.refresh!r}")
        if not 0 <= self.alpha <= 1e6 or self.block_size < 1:
            raise ValueError(f"alpha must be in [0, 1e6] and block_size >= 1, got {self.alpha}, {self.block_size}")

    @property
    def scored(self) -> bool:
        """Whether eviction scores every candidate (Marconi's utility) rather than popping the least recent leaf."""
        return self.candidates == "single-child" or self.alpha > 0


class RadixTree:
    """The tree over units of ``unit`` tokens: single tokens, or for ``vllm+`` whole blocks (each block one symbol, so
    two blocks that differ anywhere are two edges and share no K/V, as in vLLM)."""

    def __init__(self, costs: HybridCosts, capacity_bytes: int, policy: Policy, on_release: Callable[[object], None] | None = None) -> None:
        self.costs = costs
        self.on_release = on_release  # called with a payload the tree gives up (evicted, a duplicate, or not admitted)
        self.capacity = capacity_bytes
        self.policy = policy
        self.unit = policy.block_size if policy.name == "vllm+" else 1
        self.unit_kv_bytes = self.unit * costs.kv_bytes_per_token
        self.root = Node((), None, 0, state=True)  # the empty prefix: nothing to recompute
        self.bytes_used = 0
        self.clock = 0
        self.evictions = 0
        self.num_states = 0  # nodes holding a state, the root aside
        self._blocks: dict[tuple[int, ...], int] = {}  # vllm+: each distinct block's symbol
        self._lru: list[tuple[int, int, Node]] = []  # LRU policies: (last access, tie, leaf), stale entries skipped on pop
        self._tie = itertools.count()

    def _units(self, tokens: Sequence[int], new: bool = True) -> tuple[int, ...]:
        """``tokens`` as the tree's units (their full blocks only, for vllm+). A block never seen gets a new symbol only when
        ``new`` (an insertion); a lookup stops before it, so lookups do not grow the symbol table."""
        if self.unit == 1:
            return tuple(tokens)
        bs, out = self.unit, []
        for i in range(0, len(tokens) - bs + 1, bs):
            block = tuple(tokens[i : i + bs])
            symbol = self._blocks.setdefault(block, len(self._blocks)) if new else self._blocks.get(block)
            if symbol is None:
                break
            out.append(symbol)
        return tuple(out)

    # ---- reading ---------------------------------------------------------------------------
    def _walk(self, tokens: Sequence[int]) -> tuple[list[Node], int]:
        """The nodes whose whole edge ``tokens`` matches, from the root, and how many tokens in all match (into the next
        edge too)."""
        path, node, pos = [self.root], self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            edge = child.tokens
            common = _common(edge, tokens, pos)
            pos += common
            if common < len(edge):
                break
            path.append(child)
            node = child
        return path, pos

    def usable(self, path: list[Node]) -> Node:
        """The deepest node of a matched path a request can start from: one holding its state (any node when the model
        has no SSM layers)."""
        if self.costs.num_ssm == 0:
            return path[-1]
        return next(n for n in reversed(path) if n.state)

    def lookup(self, tokens: Sequence[int]) -> Node:
        """The node of the longest reusable prefix of ``tokens`` (the root: none); refreshes what a hit uses (the policy's
        rule)."""
        self.clock += 1
        path, _ = self._walk(self._units(tokens, new=False))
        hit = self.usable(path)
        for n in ([hit] if self.policy.refresh == "node" else path[: path.index(hit) + 1]):
            self._touch(n)
        return hit

    def match(self, tokens: Sequence[int]) -> int:
        """The longest reusable prefix of ``tokens``, in tokens."""
        return self.lookup(tokens).depth * self.unit

    # ---- admission ---------------------------------------------------------------------------
    def branch_point(self, prompt: Sequence[int]) -> int | None:
        """Marconi's speculative insertion: where ``prompt`` leaves the tree, if that is past its last state (so the state
        there is worth taking during this prompt's prefill: the prefix has now been seen twice)."""
        path, matched = self._walk(self._units(prompt, new=False))
        return matched * self.unit if matched > self.usable(path).depth else None

    def admit(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Cache a served request: the states its policy admits and the K/V of ``prompt + output`` (the simulator's
        path; the engine takes the states itself and calls ``insert``)."""
        tokens = tuple(prompt) + tuple(output)
        n = len(self._units(tokens)) * self.unit
        if self.policy.name == "vllm+":
            self.insert(tokens, dict.fromkeys(range(self.unit, n + 1, self.unit)))
            return
        branch = self.branch_point(prompt)
        self.insert(tokens, dict.fromkeys([*([] if branch is None else [branch]), n]))

    def insert(self, tokens: Sequence[int], states: dict[int, object | None]) -> None:
        """Cache ``tokens`` up to the last length in ``states`` with a state (and a node) at each, making room first. A
        state the tree already holds, one not at a whole unit or past the tokens, or a request larger than the whole cache
        is not kept: its payload goes back through ``on_release``."""
        units = self._units(tokens)
        kept = {length // self.unit: p for length, p in states.items() if length % self.unit == 0 and 0 < length <= len(units) * self.unit}
        self._release([p for length, p in states.items() if length // self.unit not in kept or kept[length // self.unit] is not p])
        if kept:  # tokens past the last state are not kept: no hit could resume there
            self._insert(units[: max(kept)], kept)

    def _release(self, payloads: list[object | None]) -> None:
        for p in payloads:
            if p is not None and self.on_release is not None:
                self.on_release(p)

    def _insert(self, tokens: tuple[int, ...], states: dict[int, object | None]) -> None:
        """Insert the units ``tokens`` with a state at each length in ``states``."""
        self.clock += 1
        path, matched = self._walk(tokens)
        new_states = [s for s in states if not self._has_state(path, s)]
        self._release([states[s] for s in states if s not in new_states])
        needed = (len(tokens) - matched) * self.unit_kv_bytes + len(new_states) * self.costs.state_bytes
        if needed > self.capacity:
            self._release([states[s] for s in new_states])
            return
        partial = path[-1].children.get(tokens[path[-1].depth]) if path[-1].depth < len(tokens) else None
        held = [*path, *([partial] if partial is not None else [])]  # the edge the new tokens branch from is shared too
        for n in held:
            n.locks += 1
        try:
            freed = self._make_room(needed)
        finally:
            for n in held:
                n.locks -= 1
        if not freed:
            self._release([states[s] for s in new_states])
            return
        node = self.root
        for cut in sorted({*states, len(tokens)}):
            node = self._extend(node, tokens, cut)
            if cut in new_states:
                node.state, node.payload = True, states[cut]
                self.num_states += 1
                self.bytes_used += self.costs.state_bytes
        for n in self._walk(tokens)[0]:  # node refresh: only what this request added; path refresh: the whole path
            if self.policy.refresh == "path" or n.depth >= matched:
                self._touch(n)

    def _has_state(self, path: list[Node], length: int) -> bool:
        return any(n.depth == length and n.state for n in path)

    def _extend(self, node: Node, tokens: tuple[int, ...], end: int) -> Node:
        """The node at ``tokens[:end]`` below ``node`` (splitting an edge, or adding a leaf, as needed)."""
        while node.depth < end:
            child = node.children.get(tokens[node.depth])
            if child is None:
                leaf = Node(tokens[node.depth : end], node, end)
                node.children[leaf.tokens[0]] = leaf
                self._touch(leaf)
                self.bytes_used += len(leaf.tokens) * self.unit_kv_bytes
                return leaf
            common = _common(child.tokens, tokens, node.depth)
            stop = min(common, end - node.depth)
            if stop < len(child.tokens):
                child = self._split(child, stop)  # ``end`` is inside this edge, or the tokens leave it before ``end``
            node = child
        return node

    def _split(self, child: Node, at: int) -> Node:
        """Cut ``child``'s edge after ``at`` tokens: the new node in between holds the first part (and no state yet)."""
        parent = child.parent
        mid = Node(child.tokens[:at], parent, parent.depth + at, last_access=child.last_access)
        parent.children[mid.tokens[0]] = mid
        child.tokens, child.parent = child.tokens[at:], mid
        mid.children[child.tokens[0]] = child
        return mid

    # ---- eviction ----------------------------------------------------------------------------
    def evict_one(self) -> bool:
        """Evict the policy's next victim (the engine's pools ran short); False when nothing can go."""
        victim = self._victim()
        if victim is not None:
            self._evict(victim)
        return victim is not None

    def _make_room(self, needed: int) -> bool:
        while self.bytes_used + needed > self.capacity:
            victim = self._victim()
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _touch(self, node: Node) -> None:
        node.last_access = self.clock
        self._queue(node)

    def _queue(self, node: Node) -> None:
        """Offer a leaf to the LRU heap at its current last access (a scored policy rates every candidate instead)."""
        if not self.policy.scored and not node.children and node is not self.root:
            heapq.heappush(self._lru, (node.last_access, next(self._tie), node))

    def _lru_victim(self) -> Node | None:
        """The least recently used unlocked leaf; entries for nodes refreshed, grown or gone since are dropped."""
        locked, victim = [], None
        while self._lru:
            entry = heapq.heappop(self._lru)
            n = entry[2]
            if n.detached or n.children or n.last_access != entry[0]:
                continue
            if n.locks:
                locked.append(entry)
                continue
            victim = n
            break
        for entry in locked:
            heapq.heappush(self._lru, entry)
        return victim

    def _candidates(self) -> list[Node]:
        """The unlocked nodes eviction may take: leaves, and with single-child candidates (Marconi's) a node with one child,
        which gives up only its state (a stateless single-child node was merged away)."""
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is self.root or node.locks:
                continue
            if not node.children or (self.policy.candidates == "single-child" and len(node.children) == 1 and node.state):
                out.append(node)
        return out

    def _victim(self) -> Node | None:
        if not self.policy.scored:
            return self._lru_victim()
        nodes = self._candidates()
        if not nodes:
            return None
        recency = _normalised([1.0 / (self.clock - n.last_access + 1) for n in nodes])
        u = self.unit
        efficiency = _normalised([self.costs.marginal_flops(n.parent.depth * u, n.depth * u) / self.hit_bytes(n) for n in nodes])
        scores = [r + self.policy.alpha * e for r, e in zip(recency, efficiency)]
        return nodes[min(range(len(nodes)), key=scores.__getitem__)]

    def hit_bytes(self, node: Node) -> int:
        """What a hit at the node keeps resident: its state and the K/V of its whole prefix (the authors' code; counting
        only the node's own edge instead makes short-edged branch checkpoints, the ones an agent's next turn resumes
        from, look the least efficient, and on SWE-like traces alpha > 0 then loses a third of the hits)."""
        return node.depth * self.unit_kv_bytes + (self.costs.state_bytes if node.state else 0)

    def node_bytes(self, node: Node) -> int:
        """What the node holds: its edge's K/V and its state."""
        return len(node.tokens) * self.unit_kv_bytes + (self.costs.state_bytes if node.state else 0)

    def _evict(self, node: Node) -> None:
        self.evictions += 1
        self.clock += 1
        parent = node.parent
        self._release([node.payload])
        self.num_states -= 1  # every candidate holds a state
        if node.children:  # a single-child node gives up its state; its edge joins the child's
            node.state, node.payload = False, None
            self.bytes_used -= self.costs.state_bytes
            self._merge(node)
            return
        self.bytes_used -= self.node_bytes(node)
        del parent.children[node.tokens[0]]
        node.detached = True
        if parent is not self.root and len(parent.children) == 1 and not parent.state:
            self._merge(parent)
        elif not parent.children:
            self._queue(parent)

    def _merge(self, node: Node) -> None:
        """Join a stateless single-child node's edge to its child's."""
        (child,) = node.children.values()
        child.tokens, child.parent = node.tokens + child.tokens, node.parent
        node.parent.children[child.tokens[0]] = child
        node.detached = True

    def nodes(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out


def _common(edge: tuple[int, ...], tokens: Sequence[int], pos: int) -> int:
    """How many leading tokens of ``edge`` equal ``tokens[pos:]``."""
    n = min(len(edge), len(tokens) - pos)
    if tuple(tokens[pos : pos + n]) == edge[:n]:
        return n
    return next(i for i in range(n) if edge[i] != tokens[pos + i])


def _normalised(values: list[float]) -> list[float]:
    """Min-max over the candidates; all equal: all 1."""
    lo, hi = min(values), max(values)
    return [1.0] * len(values) if hi == lo else [(v - lo) / (hi - lo) for v in values]
