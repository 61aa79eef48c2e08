"""Structured initialisation that starts a model with an induction circuit, so retrieval is learnable in minutes.

Retrieval needs an induction circuit: a head that writes "the token before me" into the residual
stream, and a later head whose query (the current token) matches that feature and copies the token
after the match (Olsson et al., 2022). From random weights the two must co-evolve and training sits on
a long loss plateau before they appear; on 2 CPU cores the plateau outlasts the whole budget.

This module gives both embedded models more than that head start, through their first two attention
layers (layers 0 and 1 of the Llama; layers 2 and 6 of the hybrid, whose Mamba2 and MLP branches start
at zero like every other residual branch). The first gets positional heads that attend 1 to 4
tokens back and write those tokens' identities into a residual subspace the embeddings leave empty;
their queries and keys read one embedding coordinate that every token holds at the same value, and RoPE
turns that into a score peaked at the chosen offset. The second gets heads that match the last few tokens
against those features (an n-gram key, so the longest earlier match wins) and copy the token found. Residual-branch output projections start at zero
(as in modded-nanogpt), so at step 0 the stream holds exactly the embedding and these features. All of
it is then trained like any other weight.
"""

from __future__ import annotations

import math

import torch

from kvtier.training.recipes import CircuitInit

CONST = 0  # the embedding coordinate every token holds at the same value
EMB_STD = 1.0  # O(1) embeddings: Adam's ~lr-sized steps then leave token identities legible (0.02 is swamped in ~10 steps)
OFFSETS = (1, 2, 3, 4)  # first-attention-layer heads attending this many tokens back: two KV groups; its other heads are left to training


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules in depth order: every layer of a Llama, the attention layers of a hybrid."""
    return [layer.self_attn for layer in model.model.layers if hasattr(layer, "self_attn")]


def residual_outputs(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The projections that write each block's branch into the residual stream (attention, MLP, Mamba2 mixer)."""
    names = ("self_attn.o_proj", "mlp.down_proj", "feed_forward.down_proj", "mamba.out_proj")
    return [layer.get_submodule(n) for layer in model.model.layers for n in names
            if hasattr(layer, n.split(".")[0])]


def head_dim(cfg) -> int:
    """Per-head width: Llama configs state it, Bamba's leave it to hidden_size / heads."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def seed_circuit(model: torch.nn.Module, circuit: CircuitInit, seed: int) -> None:
    """The whole structured start: offset heads in the first attention layer, then matching/copying heads in the second."""
    seed_previous_token_heads(model, seed=seed)
    seed_induction_heads(model, circuit.match, circuit.copy, circuit.content_pairs, circuit.key_tokens, seed=seed + 1)


def rope_offset_pattern(inv_freq: torch.Tensor, offset: int, horizon: int, steps: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit (query, key) vectors of one head whose RoPE score peaks at ``offset`` tokens back.

    The key is fixed at (1, 0) per frequency pair; the query's pair (a, -b) then scores
    ``a cos(d w) + b sin(d w)`` at distance ``d``. The weights are fitted so that the peak beats every
    other distance in ``[0, horizon]`` by the widest softmax margin (a soft minimax, float64).
    """
    half = inv_freq.numel()
    d = torch.arange(horizon + 1, dtype=torch.float64)
    phase = d[:, None] * inv_freq.double()[None, :]
    basis = torch.cat([phase.cos(), phase.sin()], 1)  # (distance, 2 * half)
    target, rest = basis[offset], torch.cat([basis[:offset], basis[offset + 1:]])
    w = torch.zeros(2 * half, dtype=torch.float64)
    w[:half] = 1.0
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            u = w / w.norm()
            loss = torch.logsumexp(40.0 * ((rest - target) @ u), 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    u = (w / w.norm()).detach().float()
    query = torch.cat([u[:half], -u[half:]])
    key = torch.cat([torch.ones(half), torch.zeros(half)]) / math.sqrt(half)
    return query, key


@torch.no_grad()
def seed_previous_token_heads(model: torch.nn.Module, offsets: tuple[int, ...] = OFFSETS, sharpness: float = 60.0,
                              emb_std: float = EMB_STD, seed: int = 0) -> None:
    """Lay out the residual stream and wire the first attention layer's first KV groups as heads attending ``offsets`` tokens back.

    Residual layout at step 0 (hidden size ``d``): coordinate 0 constant; token identity in the next
    ``d/2 - 1``; then one ``head_dim`` slice per offset, in order, holding that earlier token's identity
    through one value map shared by all offset heads (so later heads can compare the slices). Query heads
    of a KV group share its key and value, so consecutive offsets fill a group's query heads in turn.
    """
    cfg = model.config
    d, hd = cfg.hidden_size, head_dim(cfg)
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    ident = d // 2
    if len(offsets) % per_group or len(offsets) * hd > d - ident:
        raise ValueError(f"offsets: need a multiple of the {per_group} query heads per KV group, at most "
                         f"{(d - ident) // hd} ({d - ident} free residual coordinates / head_dim {hd}), got {offsets}")
    g = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight
    emb.zero_()
    emb[:, 1:ident] = torch.randn(emb.shape[0], ident - 1, generator=g) * emb_std
    emb[:, CONST] = emb_std * math.sqrt(ident - 1)  # as large as the identity part, so it survives RMSNorm

    # tied embeddings: scale the final norm so that the initial logits are O(1), as with the usual init
    final_norm = model.model.norm if hasattr(model.model, "norm") else model.model.final_layernorm
    final_norm.weight.fill_(1.0 / (emb_std * math.sqrt(ident)))
    for proj in residual_outputs(model):
        proj.weight.zero_()

    attn = attention_layers(model)[0]
    inv_freq = model.model.rotary_emb.inv_freq
    # after RMSNorm the constant coordinate is ~sqrt(d/2); score = (lam * c)^2 * query.R(d)key / sqrt(hd)
    lam = math.sqrt(sharpness * math.sqrt(hd)) / math.sqrt(d / 2)
    read = torch.randn(hd, ident - 1, generator=g) / math.sqrt(ident - 1)
    patterns = [rope_offset_pattern(inv_freq, offset, cfg.max_position_embeddings) for offset in offsets]
    key = patterns[0][1]  # the same for every offset: only the query carries it
    for grp in range(len(offsets) // per_group):
        rows = slice(grp * hd, (grp + 1) * hd)
        attn.k_proj.weight[rows] = 0
        attn.k_proj.weight[rows, CONST] = lam * key
        attn.v_proj.weight[rows] = 0
        attn.v_proj.weight[rows, 1:ident] = read
        for i in range(per_group):
            head = grp * per_group + i
            query = patterns[head][0]
            hrows = slice(head * hd, (head + 1) * hd)
            attn.q_proj.weight[hrows] = 0
            attn.q_proj.weight[hrows, CONST] = lam * query
            start = ident + head * hd
            attn.o_proj.weight[start:start + hd, hrows] = torch.eye(hd) * emb_std


@torch.no_grad()
def seed_induction_heads(model: torch.nn.Module, match: float, copy: float, content_pairs: int, key_tokens: int,
                         emb_std: float = EMB_STD, seed: int = 1) -> None:
    """Wire the second attention layer's first query head of every KV group to match the last ``key_tokens`` tokens against earlier n-grams.

    Key at position s: the tokens at s-1 .. s-key_tokens (the first attention layer's offset slices). Query at t: the token
    itself (through the offset heads' shared value map) and t-1 .. t-key_tokens+1 (the offset slices again), each
    term through its own random projection into the ``content_pairs`` lowest RoPE frequencies, which
    barely rotate over the context: the score counts matching tokens, so the longest earlier match of the
    recent tokens wins, and a lone repeat of the current token still scores. Value/output copy the
    attended token's identity back (tied embeddings make that a logit boost for it).
    """
    cfg = model.config
    d, hd = cfg.hidden_size, head_dim(cfg)
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    ident = d // 2
    half = hd // 2
    g = torch.Generator().manual_seed(seed)
    first, attn = attention_layers(model)[:2]
    value_map = first.v_proj.weight[:hd, 1:ident]  # (hd, ident-1), shared by the offset heads
    lo = torch.tensor([p for p in range(half - content_pairs, half)] + [p + half for p in range(half - content_pairs, half)])

    if key_tokens < 1 or not set(range(1, key_tokens + 1)) <= set(OFFSETS):
        raise ValueError(f"key_tokens: must be >= 1 with the offset heads' offsets {OFFSETS} covering 1..key_tokens, got {key_tokens}")

    def feature(offset: int) -> slice:  # the offset heads write offset OFFSETS[i] to the i-th head_dim slice after the identity
        start = ident + OFFSETS.index(offset) * hd
        return slice(start, start + hd)

    for grp in range(cfg.num_key_value_heads):
        rows = slice(grp * hd, (grp + 1) * hd)
        head = grp * per_group
        attn.q_proj.weight[head * hd:(head + 1) * hd] = 0
        attn.k_proj.weight[rows] = 0
        for j in range(1, key_tokens + 1):  # key term j: the token j back from s; query term: j - 1 back from t
            mix = match * torch.randn(len(lo), hd, generator=g) / math.sqrt(hd * key_tokens)
            attn.k_proj.weight[grp * hd + lo, feature(j)] = mix
            if j == 1:
                attn.q_proj.weight[head * hd + lo, 1:ident] = mix @ value_map
            else:
                attn.q_proj.weight[head * hd + lo, feature(j - 1)] = mix
        read = torch.randn(hd, ident - 1, generator=g) / math.sqrt(ident - 1)
        attn.v_proj.weight[rows] = 0
        attn.v_proj.weight[rows, 1:ident] = read
        attn.o_proj.weight[1:ident, head * hd:(head + 1) * hd] = copy * emb_std * read.T
