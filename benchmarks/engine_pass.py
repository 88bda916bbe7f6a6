"""One decoder's engine under `leapserve bench offline`: passes over the prompt set with at most b requests running,
timed by the engine's clock and read through its step observer, and a profiled pass's breakdown of a step."""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.profiler_util import FunctionEvent

from leapserve.decoding import LLM, RequestOutput, SamplingParams
from leapserve.decoding.engine import LLMEngine
from leapserve.decoding.observe import ATTENTION_RANGE, MODEL_RANGE, STEP_RANGE, StepObserver, StepRecord

from .bench_metrics import OfflineRun, Pass, drafting_cost

# the outermost op of a matmul call: transformers' modules'; leapserve's prepacked GEMM, compiled (the C++ op, its
# dispatch included) and eager
MATMUL_OPS = ("aten::linear", "leapserve_cpu::packed_linear", "mkldnn::_linear_pointwise")
# an attention layer: the engine's named range (eager, transformers' modules, the Python op), or the C++ op of a
# compiled CPU model, which runs no Python to mark a range
ATTENTION_EVENTS = (ATTENTION_RANGE, "leapserve_cpu::paged_attention")


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
        draft_tokens=sum(o.metrics.draft_tokens for o in outs),
        drafting_cost=drafting_cost(steps) if bench_engine.speculative else None,
    ), tokens


def step_breakdown(
    bench_engine: Engine, prompts: list[list[int]], batch_size: int, params: SamplingParams, continuous: bool
) -> dict[str, float]:
    """Where a decode step's time goes (steps computing no prompt tokens), from one pass under torch.profiler
    (operators and the engine's named ranges, no Python tracing): the models' matmuls (LM heads included), their
    attention layers (K/V writes included), the rest of the models (norms, rotary, activations, residuals, the
    compiled graph's own calls: what is left of every model forward, target and drafters), and leapserve's own
    bookkeeping (the rest of the step: scheduling, metadata, sampling, drafting logic, outputs). Milliseconds per
    step, averaged over the decode steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine_pass(bench_engine, prompts, batch_size, params, continuous)
    # steps that ran a model (one per step record: a step with nothing scheduled has neither)
    steps = [e for e in prof.events() if e.name == STEP_RANGE and e.cpu_children]
    records = bench_engine.steps.records
    if len(steps) != len(records):
        raise RuntimeError(f"{len(steps)} profiled steps for {len(records)} step records")
    decode = [e for e, r in zip(steps, records) if r.prompt_tokens == 0]
    if not decode:
        raise ValueError("--profile splits decode steps, and this pass had none: give --max-tokens 2 or more")
    parts = [_split(e) for e in decode]
    split = {key: sum(p[key] for p in parts) / 1e3 / len(parts) for key in parts[0]}
    return {
        "ms_per_step": split["step"],
        "matmul_ms": split["matmul"],
        "attention_ms": split["attention"],
        "rest_of_model_ms": split["model"] - split["matmul"] - split["attention"],
        "bookkeeping_ms": split["step"] - split["model"],
    }


def _split(step: FunctionEvent) -> dict[str, float]:
    """Microseconds of one step's event tree in model forwards, and in matmuls and attention layers within them."""
    split = {"step": step.cpu_time_total, "model": 0.0, "matmul": 0.0, "attention": 0.0}
    stack = list(step.cpu_children)
    while stack:
        event = stack.pop()
        if event.name == MODEL_RANGE:
            split["model"] += event.cpu_time_total
        elif event.name in MATMUL_OPS:
            split["matmul"] += event.cpu_time_total
            continue
        elif event.name in ATTENTION_EVENTS:
            split["attention"] += event.cpu_time_total
            continue
        stack.extend(event.cpu_children)
    return split
