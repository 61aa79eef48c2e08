"""The sampler against float64 references written with plain numpy loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.sampling.sampler import Sampler, SamplingRow, apply_penalties, compute_logprobs, filtered_probs
from kvtier.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def gen(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---- references ----------------------------------------------------------------------------
def ref_penalised(logits: np.ndarray, prompt, output, rep: float, presence: float, frequency: float) -> np.ndarray:
    z = np.array(logits, dtype=np.float64)
    for tok in set(prompt) | set(output):
        z[tok] = z[tok] / rep if z[tok] > 0 else z[tok] * rep
    for tok in set(output):
        count = sum(1 for t in output if t == tok)
        z[tok] -= frequency * count + presence
    return z


def softmax(z: np.ndarray, keep: np.ndarray) -> np.ndarray:
    e = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    return e / e.sum()


class Ambiguous(Exception):
    """A threshold sits so close to a boundary that float32 and float64 may disagree."""


def ref_probs(z: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float, margin: float = 1e-4) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / temperature
    keep = np.isfinite(z)
    order = sorted(np.flatnonzero(keep), key=lambda t: -z[t])
    if top_k > 0:
        for t in order[top_k:]:
            keep[t] = False
    if top_p < 1:
        p = softmax(z, keep)
        cum = 0.0
        for rank, t in enumerate(o for o in order if keep[o]):
            if rank > 0 and abs(cum - top_p) < margin:
                raise Ambiguous
            if rank > 0 and cum >= top_p:
                keep[t] = False
            cum += p[t]
    if min_p > 0:
        p = softmax(z, keep)
        floor = min_p * p.max()
        for t in np.flatnonzero(keep):
            if abs(p[t] - floor) < margin:
                raise Ambiguous
            if p[t] < floor:
                keep[t] = False
    return softmax(z, keep)


def ref_log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    m = z.max()
    return z - m - np.log(np.exp(z - m).sum())


# ---- penalties and filtering, compared value by value -------------------------------------
def test_penalties_match_reference(device):
    rng = np.random.default_rng(0)
    vocab, rows, refs = 40, [], []
    logits = rng.normal(0, 2, size=(12, vocab)).astype(np.float32)
    for i in range(12):
        prompt = rng.integers(0, vocab, size=rng.integers(0, 15)).tolist()
        output = rng.integers(0, vocab // 2, size=rng.integers(0, 25)).tolist()
        rep, pres, freq = [(1.0, 0.0, 0.0), (1.7, 0.0, 0.0), (0.6, 0.0, 0.0), (1.0, 0.8, 0.0), (1.0, 0.0, -0.5), (1.3, -1.2, 0.4)][i % 6]
        rows.append(SamplingRow(SamplingParams(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq), prompt, output, None))
        refs.append(ref_penalised(logits[i], prompt, output, rep, pres, freq))
    x = torch.tensor(logits, device=device)
    apply_penalties(x, rows)
    np.testing.assert_allclose(x.cpu().numpy(), np.stack(refs), rtol=1e-6, atol=1e-5)


def test_filtered_probs_match_reference(device):
    rng = np.random.default_rng(1)
    vocab, params, refs, z = 30, [], [], []
    while len(params) < 60:
        logits = rng.normal(0, 2, size=vocab)
        p = SamplingParams(
            temperature=float(rng.choice([0.3, 0.7, 1.0, 1.6])),
            top_k=int(rng.choice([0, 0, 1, 3, 10, 40])),
            top_p=float(rng.choice([1.0, 1.0, 0.3, 0.6, 0.9])),
            min_p=float(rng.choice([0.0, 0.0, 0.05, 0.2])),
        )
        try:
            refs.append(ref_probs(logits, p.temperature, p.top_k, p.top_p, p.min_p))
        except Ambiguous:
            continue
        params.append(p)
        z.append(logits)
    got = filtered_probs(torch.tensor(np.stack(z), dtype=torch.float32, device=device), params).cpu().double().numpy()
    np.testing.assert_allclose(got, np.stack(refs), atol=1e-5)
    assert ((got > 0) == (np.stack(refs) > 0)).all()


# ---- sampling end to end: support set and frequencies --------------------------------------
LOGITS_10 = [1.1, 2.0, -0.4, 0.6, 1.6, -1.5, 0.2, 1.3, -0.9, 0.9]
SAMPLING_CASES = [
    # (params, prompt, output, banned)
    (SamplingParams(), [], [], ()),
    (SamplingParams(temperature=0.5, top_k=4), [], [], ()),
    (SamplingParams(temperature=1.3, top_p=0.7), [], [], ()),
    (SamplingParams(min_p=0.3), [], [], ()),
    (SamplingParams(top_p=0.05), [], [], ()),
    (SamplingParams(temperature=2.0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3), [1, 4, 5], [1, 1, 7, 2], ()),
    (SamplingParams(temperature=0.8, top_k=6, top_p=0.8, min_p=0.1, repetition_penalty=1.4, frequency_penalty=0.2), [4], [1, 9, 9], (7,)),
    (SamplingParams(temperature=1.0, top_k=8), [], [], (1, 4)),
]


@pytest.mark.parametrize("case", range(len(SAMPLING_CASES)))
def test_sample_frequencies_match_reference(case, device):
    params, prompt, output, banned = SAMPLING_CASES[case]
    z = ref_penalised(np.array(LOGITS_10), prompt, output, params.repetition_penalty, params.presence_penalty, params.frequency_penalty)
    z[list(banned)] = -np.inf
    ref = ref_probs(z, params.temperature, params.top_k, params.top_p, params.min_p, margin=1e-3)
    draws = 2000
    torch.manual_seed(case)
    # Odd rows carry their own generator, even rows use the global RNG: both paths draw from ref.
    rows = [SamplingRow(params, prompt, output, gen(10_000 * case + i, device) if i % 2 else None, banned) for i in range(draws)]
    logits = torch.tensor(LOGITS_10, dtype=torch.float32, device=device).expand(draws, -1).contiguous()
    tokens = np.array(Sampler()(logits, rows).token_ids)
    assert set(tokens.tolist()) <= set(np.flatnonzero(ref > 0).tolist())
    for half in (tokens[0::2], tokens[1::2]):
        freq = np.bincount(half, minlength=len(LOGITS_10)) / len(half)
        assert np.abs(freq - ref).max() < 0.05, (freq, ref)


@pytest.mark.parametrize("with_bans", [False, True])
def test_greedy_is_argmax_of_penalised_logits(device, with_bans):
    rng = np.random.default_rng(2)
    vocab = 64
    logits = rng.normal(0, 3, size=(10, vocab)).astype(np.float32)
    rows, expect = [], []
    for i in range(10):
        prompt, output = rng.integers(0, vocab, size=8).tolist(), rng.integers(0, vocab, size=6).tolist()
        output.append(int(np.argmax(logits[i])))  # so the penalties move the argmax
        pen = (1.0, 0.0, 0.0) if i < 3 else (2.0, 1.0, 0.5)
        banned = (int(np.argmax(logits[i])),) if with_bans and i % 4 == 1 else ()
        p = SamplingParams(temperature=0.0, repetition_penalty=pen[0], presence_penalty=pen[1], frequency_penalty=pen[2])
        if i % 3 == 2:
            p = SamplingParams(temperature=0.9, top_k=1, repetition_penalty=pen[0], presence_penalty=pen[1], frequency_penalty=pen[2])
        rows.append(SamplingRow(p, prompt, output, None, banned))
        z = ref_penalised(logits[i], prompt, output, *pen)
        z[list(banned)] = -np.inf
        expect.append(int(np.argmax(z)))
    assert Sampler()(torch.tensor(logits, device=device), rows).token_ids == expect


def test_all_greedy_batch_is_a_single_argmax(device, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the all-greedy batch left the argmax fast path")

    monkeypatch.setattr(Sampler, "_sample", must_not_run)
    logits = torch.randn(256, 3000, generator=gen(3, "cpu")).to(device)
    rows = [SamplingRow(SamplingParams(temperature=0.0, seed=i), [1, 2], [3], None) for i in range(256)]
    rows[7] = SamplingRow(SamplingParams(temperature=0.5, top_k=1), [1], [], None)
    result = Sampler()(logits, rows)
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs == [None] * 256


# ---- logprobs ------------------------------------------------------------------------------
def check_entry(entry: dict, raw: np.ndarray, chosen: int, k: int) -> None:
    ref = ref_log_softmax(raw)
    top = sorted(range(len(raw)), key=lambda t: -ref[t])[:k]
    assert set(entry) == {chosen, *top}
    assert next(iter(entry)) == chosen
    for tok, (lp, rank) in entry.items():
        assert abs(lp - ref[tok]) < 1e-5
        assert rank == 1 + int((ref > ref[tok]).sum())


def test_sampled_logprobs_are_raw_and_ranked(device):
    rng = np.random.default_rng(4)
    vocab = 50
    logits = rng.normal(0, 2, size=(8, vocab)).astype(np.float32)
    ks = [0, 1, 5, 20, None, 3, 2, 20]
    params = [
        SamplingParams(temperature=0.0, logprobs=ks[0]),
        SamplingParams(temperature=0.0, repetition_penalty=3.0, logprobs=ks[1]),
        SamplingParams(temperature=0.4, top_k=5, logprobs=ks[2]),
        SamplingParams(temperature=1.5, presence_penalty=2.0, logprobs=ks[3]),
        SamplingParams(logprobs=ks[4]),
        SamplingParams(top_p=0.5, min_p=0.1, logprobs=ks[5], seed=1),
        SamplingParams(temperature=0.0, logprobs=ks[6]),
        SamplingParams(logprobs=ks[7]),
    ]
    rows = [SamplingRow(p, [0, 1, 2], [3, 3, 4], gen(i, device) if p.seed is not None else None) for i, p in enumerate(params)]
    result = Sampler()(torch.tensor(logits, device=device), rows)
    for i, (tok, entry, k) in enumerate(zip(result.token_ids, result.logprobs, ks)):
        if k is None:
            assert entry is None
        else:
            check_entry(entry, logits[i], tok, k)


def test_compute_logprobs_for_given_tokens(device):
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, size=(6, 30)).astype(np.float32)
    logits[2, 7] = logits[2, 8]  # a tie: both get the same competition rank
    targets = [0, 29, 8, 7, 11, int(np.argmin(logits[5]))]
    for k in (0, 3, 20):
        entries = compute_logprobs(torch.tensor(logits, device=device), torch.tensor(targets, device=device), k)
        assert len(entries) == 6
        for row, (entry, tok) in enumerate(zip(entries, targets)):
            assert abs(entry[tok][0] - ref_log_softmax(logits[row])[tok]) < 1e-5
            if row != 2:  # the tied row's top-k set is order-dependent; its ranks are checked below
                check_entry(entry, logits[row], tok, k)
    tied = compute_logprobs(torch.tensor(logits[2:3]), torch.tensor([7]), 30)[0]
    assert tied[7][1] == tied[8][1]
    assert compute_logprobs(torch.tensor(logits[:2]), torch.tensor([1, 2]), 100)[0].keys() == set(range(30))


# ---- reproducibility and bans --------------------------------------------------------------
def run_steps(seed: int, index: int, batch: int, steps: int, device: str) -> list[int]:
    """Sample ``steps`` tokens for one seeded row placed at ``index`` among random other rows."""
    vocab = 1000
    params = SamplingParams(temperature=0.9, top_p=0.95, presence_penalty=0.3, seed=seed)
    target = gen(seed, device)
    others_rng = np.random.default_rng(1000 + batch)
    out: list[int] = []
    for step in range(steps):
        row_logits = torch.randn(vocab, generator=gen(step, "cpu")).to(device)
        logits = torch.randn(batch, vocab).to(device) * 3
        logits[index] = row_logits
        rows = []
        for j in range(batch):
            if j == index:
                rows.append(SamplingRow(params, [1, 2, 3], list(out), target))
                continue
            kind = others_rng.integers(0, 3)
            other = [SamplingParams(temperature=0.0), SamplingParams(top_k=50, seed=j), SamplingParams(min_p=0.05, repetition_penalty=1.2)][kind]
            rows.append(SamplingRow(other, [5], [6, 7], gen(j + 99, device) if kind == 1 else None, (3,) if kind == 2 else ()))
        out.append(Sampler()(logits, rows).token_ids[index])
    return out


def test_seeded_row_is_reproducible_whatever_the_batch(device):
    alone = run_steps(seed=1234, index=0, batch=1, steps=20, device=device)
    torch.manual_seed(99)
    assert run_steps(seed=1234, index=5, batch=9, steps=20, device=device) == alone
    torch.manual_seed(7)
    assert run_steps(seed=1234, index=2, batch=3, steps=20, device=device) == alone
    assert run_steps(seed=4321, index=0, batch=1, steps=20, device=device) != alone


def test_logits_processors_run_in_order_before_penalties(device):
    """Two-argument and three-argument processors (vLLM's forms) see their own row's history, in list order, and the
    penalties then apply to what they return; the greedy choice is the float64 reference's argmax, logprobs stay raw."""
    rng = np.random.default_rng(4)
    vocab = 32
    logits = rng.normal(0, 2, size=(6, vocab)).astype(np.float32)
    calls = []

    def boost_last(output_ids, row):  # raises the token generated last, so the repetition penalty has something to undo
        calls.append(("boost", tuple(output_ids)))
        row = row.clone()
        row[output_ids[-1]] += 5.0
        return row

    def ban_prompt_start(prompt_ids, output_ids, row):
        calls.append(("ban", tuple(output_ids)))
        row = row.clone()
        row[prompt_ids[0]] = float("-inf")
        return row

    rows, expect = [], []
    for i in range(6):
        prompt, output = rng.integers(0, vocab, size=5).tolist(), rng.integers(0, vocab, size=4).tolist()
        fns = [boost_last, ban_prompt_start] if i % 2 else []
        params = SamplingParams(temperature=0.0, repetition_penalty=1.5 if i % 3 else 1.0, logits_processors=fns, logprobs=0)
        rows.append(SamplingRow(params, prompt, output))
        z = np.array(logits[i], dtype=np.float64)
        if fns:
            z[output[-1]] += 5.0
            z[prompt[0]] = -np.inf
        z = ref_penalised(z, prompt, output, params.repetition_penalty, 0.0, 0.0)
        expect.append(int(np.argmax(z)))
    out = Sampler()(torch.tensor(logits, device=device), rows)
    assert out.token_ids == expect
    assert calls == [(name, tuple(rows[i].output_token_ids)) for i in (1, 3, 5) for name in ("boost", "ban")]
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert abs(entry[tok][0] - ref_log_softmax(logits[i])[tok]) < 1e-5


def test_a_logits_processor_returning_the_wrong_shape_is_named(device):
    from kvtier.errors import InvalidArgumentError

    params = SamplingParams(temperature=0.0, logits_processors=[lambda output_ids, row: row[:-1]])
    with pytest.raises(InvalidArgumentError, match="logits_processors: must return a tensor of shape"):
        Sampler()(torch.zeros(1, 8, device=device), [SamplingRow(params, [1], [])])


def test_banned_tokens_are_never_sampled(device):
    vocab, draws = 20, 500
    logits = torch.zeros(draws, vocab, device=device)
    logits[:, [2, 5]] = 10.0  # the banned tokens are by far the most likely
    banned = (2, 5)
    params = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(temperature=2.0, top_k=3),
              SamplingParams(temperature=0.0, repetition_penalty=1.2)]
    rows = [SamplingRow(params[i % 4], [2], [5], gen(i, device) if i % 3 == 0 else None, banned) for i in range(draws)]
    tokens = Sampler()(logits, rows).token_ids
    assert not set(tokens) & set(banned)
    assert len(set(tokens)) > 5
