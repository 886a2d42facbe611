"""How many output tokens a key's next request will probably produce.

Admission holds the expected output of every request in flight against the token buckets, so
that a bucket charged as tokens are delivered still admits only what its limit can pay for. The
expectation comes from the key's own recent answers: a running mean of their output tokens,
capped by the request's own ``max_tokens``. Before the key has finished a request, the protocol
layer's default is used (the client's cap, else 1,024).

Why a mean, and why it matters: the sum of the expected outputs of the requests in flight is
tokens promised but not yet delivered, so its error is what a bucket holds back for nothing (an
over-estimate) or lets through on credit (an under-estimate, paid back as debt afterwards). The
mean makes that sum right on average; per request it may be far off, which costs nothing but a
short delay or debt, both corrected when the request ends.

Answers cut by their own cap are not learned: they say only that the answer would have been at
least that long, and learning them would bias the mean low for keys that cap tightly.
"""

from __future__ import annotations

#: Weight of each new answer once the key has enough history: the mean follows the key's last
#: twenty or so answers, so it adapts within a few requests when the key's workload changes.
ALPHA = 0.1


class OutputEstimate:
    """A running mean of one key's output tokens (bias-free from the first answer on)."""

    __slots__ = ("count", "mean")

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0

    def expected(self, default: int, cap: int | None) -> int:
        """The expected output of the next request: the mean (``default`` before any answer),
        at most the request's ``cap``, at least 1."""
        expected = round(self.mean) if self.count else default
        if cap is not None:
            expected = min(expected, cap)
        return max(1, expected)

    def learn(self, output_tokens: int, cap: int | None) -> None:
        """Add one finished answer, unless its cap cut it."""
        if output_tokens < 0 or (cap is not None and output_tokens >= cap):
            return
        self.count += 1
        # The plain mean of the first answers, then an exponential one: no prior to wash out.
        weight = max(ALPHA, 1 / self.count)
        self.mean += weight * (output_tokens - self.mean)
