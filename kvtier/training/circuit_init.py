"""Structured initialisation that starts a Llama with an induction circuit, so retrieval is learnable in minutes.

Retrieval needs an induction circuit: a head that writes "the token before me" into the residual
stream, and a later head whose query (the current token) matches that feature and copies the token
after the match (Olsson et al., 2022). From random weights the two must co-evolve and training sits on
a long loss plateau before they appear; on 2 CPU cores the plateau outlasts the whole budget. The hybrid
model does not have it, because Mamba2's short convolution already supplies previous-token features.

This module gives the Llama more than that head start. Layer 0 gets positional heads that attend to
offset 1 and 2 and write those tokens' identities into a residual subspace the embeddings leave empty;
their queries and keys read one embedding coordinate that every token holds at the same value, and RoPE
turns that into a score peaked at the chosen offset. Layer 1 gets heads that match the current token
against the offset-1 feature and copy the token found. Residual-branch output projections start at zero
(as in modded-nanogpt), so at step 0 the stream holds exactly the embedding and these features. All of
it is then trained like any other weight.
"""

from __future__ import annotations

import math

import torch

from kvtier.training.recipes import CircuitInit

CONST = 0  # the embedding coordinate every token holds at the same value
EMB_STD = 1.0  # O(1) embeddings: Adam's ~lr-sized steps then leave token identities legible (0.02 is swamped in ~10 steps)
OFFSET_GROUPS = 2  # layer-0 KV groups wired as offset heads; the rest of layer 0 is left to training


def seed_circuit(model: torch.nn.Module, circuit: CircuitInit, seed: int) -> None:
    """The whole structured start: offset heads in layer 0, then matching/copying heads in layer 1 that read them."""
    seed_previous_token_heads(model, seed=seed)
    seed_induction_heads(model, circuit.match, circuit.copy, circuit.content_pairs, seed=seed + 1)


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
def seed_previous_token_heads(model: torch.nn.Module, offsets: tuple[int, ...] = (1, 2), kv_groups: int = OFFSET_GROUPS,
                              sharpness: float = 60.0, emb_std: float = EMB_STD, seed: int = 0) -> None:
    """Lay out the residual stream and wire layer 0's first ``kv_groups`` KV groups as offset heads.

    Residual layout at step 0 (hidden size ``d``): coordinate 0 constant; token identity in the next
    ``d/2 - 1``; the rest split evenly between the ``offsets`` (each KV group's head for an offset
    writes its own ``head_dim`` slice there). Query heads of a group share its key and value, so a
    group has one head per offset: ``len(offsets)`` must equal the query heads per group.
    """
    cfg = model.config
    d, hd = cfg.hidden_size, cfg.head_dim
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    if len(offsets) != per_group:
        raise ValueError(f"offsets: need one per query head of a KV group ({per_group}), got {offsets}")
    ident = d // 2
    slice_width = (d - ident) // len(offsets)
    if kv_groups * hd > slice_width:
        raise ValueError(f"kv_groups: {kv_groups} x head_dim {hd} does not fit a {slice_width}-wide residual slice")
    g = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight
    emb.zero_()
    emb[:, 1:ident] = torch.randn(emb.shape[0], ident - 1, generator=g) * emb_std
    emb[:, CONST] = emb_std * math.sqrt(ident - 1)  # as large as the identity part, so it survives RMSNorm

    # tied embeddings: scale the final norm so that the initial logits are O(1), as with the usual init
    model.model.norm.weight.fill_(1.0 / (emb_std * math.sqrt(ident)))
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()

    attn = model.model.layers[0].self_attn
    patterns = [rope_offset_pattern(model.model.rotary_emb.inv_freq, offset, cfg.max_position_embeddings) for offset in offsets]
    key = patterns[0][1]  # the same for every offset: only the query carries it
    # after RMSNorm the constant coordinate is ~sqrt(d/2); score = (lam * c)^2 * query.R(d)key / sqrt(hd)
    c = math.sqrt(d / 2)
    lam = math.sqrt(sharpness * math.sqrt(hd)) / c
    for grp in range(kv_groups):
        rows = slice(grp * hd, (grp + 1) * hd)
        attn.k_proj.weight[rows] = 0
        attn.k_proj.weight[rows, CONST] = lam * key
        attn.v_proj.weight[rows] = 0
        attn.v_proj.weight[rows, 1:ident] = torch.randn(hd, ident - 1, generator=g) / math.sqrt(ident - 1)
        for i, (query, _) in enumerate(patterns):
            head = grp * per_group + i
            hrows = slice(head * hd, (head + 1) * hd)
            attn.q_proj.weight[hrows] = 0
            attn.q_proj.weight[hrows, CONST] = lam * query
            start = ident + i * slice_width + grp * hd
            attn.o_proj.weight[start:start + hd, head * hd:(head + 1) * hd] = torch.eye(hd) * emb_std


@torch.no_grad()
def seed_induction_heads(model: torch.nn.Module, match: float, copy: float, content_pairs: int, emb_std: float = EMB_STD,
                         seed: int = 1) -> None:
    """Wire layer 1's first query head of every KV group to match the current token against the offset-1 feature.

    Query: the token's identity through layer 0's value map; key: the offset-1 slice layer 0 wrote. Both go
    into the ``content_pairs`` lowest RoPE frequencies, which barely rotate over the context, so the score
    is content, not position. Value/output copy the attended token's identity back (tied embeddings make
    that a logit boost for it).
    """
    cfg = model.config
    d, hd = cfg.hidden_size, cfg.head_dim
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    ident = d // 2
    half = hd // 2
    g = torch.Generator().manual_seed(seed)
    l0 = model.model.layers[0].self_attn
    attn = model.model.layers[1].self_attn
    lo = [p for p in range(half - content_pairs, half)] + [p + half for p in range(half - content_pairs, half)]
    for grp in range(cfg.num_key_value_heads):
        src = grp % OFFSET_GROUPS  # layer-0 group whose offset-1 slice this group keys on
        value_map = l0.v_proj.weight[src * hd:(src + 1) * hd, 1:ident]  # (hd, ident-1)
        mix = torch.randn(len(lo), hd, generator=g) / math.sqrt(hd)
        rows = slice(grp * hd, (grp + 1) * hd)
        head = grp * per_group
        hrows = slice(head * hd, (head + 1) * hd)
        attn.q_proj.weight[hrows] = 0
        attn.k_proj.weight[rows] = 0
        attn.q_proj.weight[head * hd + torch.tensor(lo), 1:ident] = match * (mix @ value_map)
        start = ident + src * hd
        attn.k_proj.weight[grp * hd + torch.tensor(lo), start:start + hd] = match * mix
        read = torch.randn(hd, ident - 1, generator=g) / math.sqrt(ident - 1)
        attn.v_proj.weight[rows] = 0
        attn.v_proj.weight[rows, 1:ident] = read
        attn.o_proj.weight[1:ident, head * hd:(head + 1) * hd] = copy * emb_std * read.T
