"""Next-token selection: the per-step ``Sampler`` and the logprob helper shared with prompt logprobs."""

from kvtier.sampling.sampler import Sampler, SampleResult, SamplingRow, compute_logprobs

__all__ = ["SampleResult", "Sampler", "SamplingRow", "compute_logprobs"]
