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
  FLOP efficiency (the FLOPs the node saves beyond its parent per byte it holds); a hit refreshes only the node used.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    last_access: int = 0
    locks: int = 0  # paths in use through this node


@dataclass(frozen=True)
class Policy:
    name: str
    alpha: float = 0.0  # marconi: the weight of FLOP efficiency against recency
    block_size: int = 32  # vllm+: the block a node holds

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.name!r}")


class RadixTree:
    """The tree over units of ``unit`` tokens: single tokens, or for ``vllm+`` whole blocks (each block one symbol, so
    two blocks that differ anywhere are two edges and share no K/V, as in vLLM)."""

    def __init__(self, costs: HybridCosts, capacity_bytes: int, policy: Policy) -> None:
        self.costs = costs
        self.capacity = capacity_bytes
        self.policy = policy
        self.unit = policy.block_size if policy.name == "vllm+" else 1
        self.unit_kv_bytes = self.unit * costs.kv_bytes_per_token
        self.root = Node((), None, 0, state=True)  # the empty prefix: nothing to recompute
        self.bytes_used = 0
        self.clock = 0
        self.evictions = 0
        self._blocks: dict[tuple[int, ...], int] = {}  # vllm+: each distinct block's symbol

    def _units(self, tokens: Sequence[int]) -> tuple[int, ...]:
        """``tokens`` as the tree's units (their full blocks only, for vllm+)."""
        if self.unit == 1:
            return tuple(tokens)
        bs = self.unit
        return tuple(self._blocks.setdefault(tuple(tokens[i : i + bs]), len(self._blocks)) for i in range(0, len(tokens) - bs + 1, bs))

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

    def match(self, tokens: Sequence[int]) -> int:
        """The longest reusable prefix of ``tokens``, in tokens; refreshes what a hit uses (the policy's rule)."""
        self.clock += 1
        path, _ = self._walk(self._units(tokens))
        hit = self.usable(path)
        for n in ([hit] if self.policy.name == "marconi" else path[: path.index(hit) + 1]):
            n.last_access = self.clock
        return hit.depth * self.unit

    # ---- admission ---------------------------------------------------------------------------
    def admit(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Cache a served request: the states its policy admits and the K/V of ``prompt + output``."""
        units = self._units(tuple(prompt) + tuple(output))
        if self.policy.name == "vllm+":
            self._insert(units, range(1, len(units) + 1))
            return
        path, matched = self._walk(self._units(prompt))
        branch = [matched] if matched > self.usable(path).depth and matched < len(units) else []
        self._insert(units, [*branch, len(units)])

    def _insert(self, tokens: tuple[int, ...], states: Sequence[int]) -> None:
        """Insert the units ``tokens`` with a state at each length in ``states`` (and a node there), making room first;
        a request larger than the whole cache is not cached."""
        self.clock += 1
        path, matched = self._walk(tokens)
        new_states = [s for s in states if not self._has_state(path, s)]
        needed = (len(tokens) - matched) * self.unit_kv_bytes + len(new_states) * self.costs.state_bytes
        if needed > self.capacity:
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
            return
        node = self.root
        for cut in sorted({*states, len(tokens)}):
            node = self._extend(node, tokens, cut)
            if cut in states and not node.state:
                node.state = True
                self.bytes_used += self.costs.state_bytes
        for n in self._walk(tokens)[0]:  # marconi refreshes only what this request added; the others the whole path
            if self.policy.name != "marconi" or n.depth >= matched:
                n.last_access = self.clock

    def _has_state(self, path: list[Node], length: int) -> bool:
        return any(n.depth == length and n.state for n in path)

    def _extend(self, node: Node, tokens: tuple[int, ...], end: int) -> Node:
        """The node at ``tokens[:end]`` below ``node`` (splitting an edge, or adding a leaf, as needed)."""
        while node.depth < end:
            child = node.children.get(tokens[node.depth])
            if child is None:
                leaf = Node(tokens[node.depth : end], node, end, last_access=self.clock)
                node.children[leaf.tokens[0]] = leaf
                self.bytes_used += len(leaf.tokens) * self.unit_kv_bytes
                return leaf
            common = _common(child.tokens, tokens, node.depth)
            stop = min(common, end - node.depth)
            if stop < len(child.tokens):
                return self._split(child, stop)
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
    def _make_room(self, needed: int) -> bool:
        while self.bytes_used + needed > self.capacity:
            victim = self._victim()
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _candidates(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is self.root or node.locks:
                continue
            if not node.children or (self.policy.name == "marconi" and len(node.children) == 1 and node.state):
                out.append(node)
        return out

    def _victim(self) -> Node | None:
        nodes = self._candidates()
        if not nodes:
            return None
        if self.policy.name != "marconi":
            return min(nodes, key=lambda n: n.last_access)
        recency = _normalised([1.0 / (self.clock - n.last_access + 1) for n in nodes])
        u = self.unit
        efficiency = _normalised([self.costs.marginal_flops(n.parent.depth * u, n.depth * u) / self.node_bytes(n) for n in nodes])
        scores = [r + self.policy.alpha * e for r, e in zip(recency, efficiency)]
        return nodes[min(range(len(nodes)), key=scores.__getitem__)]

    def node_bytes(self, node: Node) -> int:
        """What the node holds: its edge's K/V and its state."""
        return len(node.tokens) * self.unit_kv_bytes + (self.costs.state_bytes if node.state else 0)

    def _evict(self, node: Node) -> None:
        self.evictions += 1
        self.clock += 1
        parent = node.parent
        if node.children:  # a single-child node gives up its state; its edge joins the child's
            node.state = False
            self.bytes_used -= self.costs.state_bytes
            self._merge(node)
            return
        self.bytes_used -= self.node_bytes(node)
        del parent.children[node.tokens[0]]
        if parent is not self.root and len(parent.children) == 1 and not parent.state:
            self._merge(parent)

    def _merge(self, node: Node) -> None:
        """Join a stateless single-child node's edge to its child's."""
        (child,) = node.children.values()
        child.tokens, child.parent = node.tokens + child.tokens, node.parent
        node.parent.children[child.tokens[0]] = child

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
