"""A modeled accelerator for `leapserve bench offline --roofline`: the real engine, drafters and mode choice run,
but on a virtual clock that only model forwards advance. A target forward of T tokens takes max(ms, ms x T / knee):
flat while streaming the weights dominates, linear once compute does, as on GPUs and AMX CPUs, whose knee lies
far beyond a small CPU's. A drafter's forward takes a share of that. So this machine can show how adaptive
speculation decides, and what it gains or loses, on hardware it is not."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from leapserve.decoding.observe import StepObserver


@dataclass(frozen=True)
class Roofline:
    forward_ms: float  # a target forward of up to `knee_tokens` tokens
    knee_tokens: int  # beyond it, a forward's time grows in proportion to its tokens
    draft_share: float = 0.1  # a drafter forward's time, as a share of a target forward's of as many tokens

    @classmethod
    def parse(cls, text: str) -> Roofline:
        """`MS,KNEE[,DRAFT_SHARE]`, e.g. `10,128` or `10,128,0.05`."""
        parts = text.split(",")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            roofline = cls(float(parts[0]), int(parts[1]), *(float(p) for p in parts[2:]))
        except ValueError:
            raise ValueError(f"expected MS,KNEE[,DRAFT_SHARE] (e.g. 10,128), got {text!r}") from None
        if roofline.forward_ms <= 0 or roofline.knee_tokens < 1 or roofline.draft_share < 0:
            raise ValueError(f"MS must be positive, KNEE at least 1 and DRAFT_SHARE not negative, got {text!r}")
        return roofline

    def describe(self) -> str:
        return (
            f"a target forward of T tokens takes max({self.forward_ms:g}, {self.forward_ms:g} x T / "
            f"{self.knee_tokens}) ms, a drafter forward {self.draft_share:g} of that"
        )

    def seconds(self, tokens: int) -> float:
        """A target forward of `tokens` tokens."""
        return self.forward_ms / 1e3 * max(1.0, tokens / self.knee_tokens)


class VirtualClock(StepObserver):
    """Seconds that only an engine's model forwards advance: `target(tokens)` per target forward,
    `draft(tokens)` per forward of its drafter's model (n-gram lookup costs nothing). Pass it to the engine as
    both its clock and an observer: `LLM(..., clock=vc, observers=[vc])`."""

    def __init__(self, target: Callable[[int], float], draft: Callable[[int], float]) -> None:
        self.now = 0.0
        self.cost = {"target": target, "draft": draft}

    @classmethod
    def of(cls, roofline: Roofline) -> VirtualClock:
        return cls(roofline.seconds, lambda tokens: roofline.draft_share * roofline.seconds(tokens))

    def __call__(self) -> float:
        return self.now

    def on_forward(self, model: str, num_tokens: int) -> None:
        self.now += self.cost[model](num_tokens)
