"""One decoder's engine under `leapserve bench offline`: passes over the prompt set with at most b requests running,
timed by the engine's clock and read through its step observer, and a profiled pass's breakdown of a step."""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from leapserve.decoding import LLM, RequestOutput, SamplingParams
from leapserve.decoding.engine import LLMEngine
from leapserve.decoding.observe import StepObserver, StepRecord

from .bench_metrics import OfflineRun, Pass, drafting_cost

# The profiler's Python tracer names frames "path(line): function"
ATTENTION_FRAME = ": attend_layer"  # one attention layer: K/V written, then attended (both model paths)
RUNNER_FILE, METADATA_FRAME = "runner.py(", ": step_metadata"
# the model forwards: the runners' (target, draft model) and the FSPAD drafter's, as (file, frame) of their calls
MODEL_FRAMES = (("runner.py(", ": forward"), ("fspad.py(", ": execute"))
MATMUL_OPS = ("aten::linear", "mkldnn::_linear_pointwise")  # transformers' modules; leapserve's prepacked GEMMs


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters, tied ones counted once."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def copy_bandwidth_gb_s(device: torch.device, num_bytes: int = 256 * 2**20) -> float:
    """Measured memory copy bandwidth (read + write), the roofline a decode step's weight stream is read against."""
    src = torch.ones(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best / 1e9


class StepLog(StepObserver):
    """The engine's step records since the last `clear` (an observer passed at construction)."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    def on_step(self, record: StepRecord) -> None:
        self.records.append(record)

    def clear(self) -> None:
        self.records = []


@dataclass
class Engine:
    """One decoder's engine in the benchmark, with its clock and step log."""

    llm: LLM
    steps: StepLog
    clock: Callable[[], float] = time.perf_counter

    @property
    def speculative(self) -> bool:
        return self.llm.engine.decoder.name == "speculative"


def generate_capped(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, batch_size: int, continuous: bool
) -> list[RequestOutput]:
    """Every prompt through `engine` with at most `batch_size` running: in groups of `batch_size`, each to its end,
    or (`continuous`) a finished request's place going to the next prompt at once, as under a server's steady
    load. Outputs in prompt order."""
    waiting, outputs, running = deque(enumerate(prompts)), {}, 0
    while waiting or running:
        if continuous or not running:
            while waiting and running < batch_size:
                index, prompt = waiting.popleft()
                engine.add_request(f"bench-{uuid.uuid4().hex}-{index}", prompt, params)
                running += 1
        for req in engine.step():
            if req.finished:
                outputs[int(req.request_id.rpartition("-")[2])] = req.output()
                running -= 1
    return [outputs[i] for i in range(len(prompts))]


def engine_pass(
    bench_engine: Engine, prompts: list[list[int]], batch_size: int, params: SamplingParams, continuous: bool = False
) -> Pass:
    """All prompts through the engine with at most `batch_size` running (`generate_capped`), timed by its clock."""
    bench_engine.steps.clear()
    clock = bench_engine.clock
    start = clock()
    outs = generate_capped(bench_engine.llm.engine, prompts, params, batch_size, continuous)
    elapsed = clock() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    steps = bench_engine.steps.records
    return OfflineRun(
        output_tokens=sum(map(len, tokens)),
        elapsed=elapsed,
        target_forwards=sum(s.target_forwards for s in steps),
        request_forwards=sum(o.metrics.target_forwards for o in outs),
        accepted_tokens=sum(o.metrics.accepted_tokens for o in outs),
        num_drafts=sum(o.metrics.num_drafts for o in outs),
        drafting_cost=drafting_cost(steps) if bench_engine.speculative else None,
    ), tokens


def step_breakdown(
    bench_engine: Engine, prompts: list[list[int]], batch_size: int, params: SamplingParams, continuous: bool
) -> dict[str, float]:
    """Where an engine step's time goes, under torch.profiler with Python stacks (which slow the Python parts):
    the model's matmuls (LM heads included), its attention layers (K/V writes included), the rest of the model
    (norms, rotary, activations, residuals: what is left of the model runners' forwards, target and drafter), and
    leapserve's own bookkeeping (the rest of the step: scheduling, metadata, sampling, drafting logic, outputs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        run_, _ = engine_pass(bench_engine, prompts, batch_size, params, continuous)
    steps = run_.target_forwards
    events = prof.events()

    def ms(selected: Callable[[str], bool]) -> float:
        return sum(e.cpu_time_total for e in events if selected(e.name)) / 1e3 / steps

    matmul = ms(lambda name: name in MATMUL_OPS)
    attend = ms(lambda name: name.endswith(ATTENTION_FRAME))
    forwards = ms(lambda name: any(file in name and name.endswith(frame) for file, frame in MODEL_FRAMES))
    metadata = ms(lambda name: RUNNER_FILE in name and name.endswith(METADATA_FRAME))
    model = forwards - metadata
    per_step = run_.elapsed * 1e3 / steps
    return {
        "ms_per_step": per_step,
        "matmul_ms": matmul,
        "attention_ms": attend,
        "rest_of_model_ms": model - matmul - attend,
        "bookkeeping_ms": per_step - model,
    }
