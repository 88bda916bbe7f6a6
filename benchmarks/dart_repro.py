"""DART-style silent thought at small scale, on CPU: does answering from K learned "silent thought" vectors, trained by
self-distillation from the model's own chain of thought (`leapserve train dart`), beat answering directly, at the
same number of generated tokens?

    python -m leapserve.benchmarks.dart_repro run --seed 0 --out runs/dart     # one seed: train + evaluate (resumable)
    python -m leapserve.benchmarks.dart_repro time --out runs/dart             # batch-1 latency, after all runs, alone
    python -m leapserve.benchmarks.dart_repro report --out runs/dart           # table over the seeds + verdict

The task: compose k = 3 affine maps over Z_5, left to right from the first number, e.g. `3+4*2+1=` -> 3+4 = 2,
2*2 = 4, 4+1 = 0: answer 0 (ops `+a`, a in 0..4, and `*b`, b in {2, 3, 4}; 5 x 8^3 = 2,560 questions, chance 20%).
The CoT is the running values, 2 characters a step: `2;4;0;`. Held out by construction: a fixed shuffle of all
questions (the same for every seed) keeps a quarter, 640, for evaluation (all of them: fewer than 2,000).
Formats (separator `>`, answer prompt `#`): CoT `3+4*2+1=>2;4;0;#0`, direct `3+4*2+1=>#0`, silent thought
`3+4*2+1=>` + K vectors + `#0` (K = 2 = k - 1, the CoT steps the teacher keeps once CODI drops the last).

Per seed, all char-level 4-layer Llamas (hidden 96, 4 heads):
1. `cot`: CoT-SFT from scratch (`train sft`), 700 steps. Every other arm starts from it, as DART and CODI start
   from a pretrained LM; its own accuracy (greedy CoT after `question>`) is the ceiling.
2. From it, 1,500 steps each:
   - `no-cot`: `train sft --init-from` on direct answers;
   - `pause`: `train dart --beta 0 --gamma 0` (lambda 0): ST vectors + layer adapters on the answer CE alone;
   - `dart-r0`: `train dart`, layer adapters, beta 1, lambda 1 (gamma 1): the same arm plus CoT CE and KD;
   - `dart-r2`: the same with Jacobi REM, R = 2 refinement passes instead of adapters.
Evaluation goes through leapserve's engine (`LLM`, greedy, transformers modules for every arm): `cot` and `no-cot`
with the autoregressive decoder, the others with `--decoder silent-thought` (reasoning `st`), and `dart-r0`'s own
CoT pathway (reasoning `cot`: is the teacher intact?). Metrics: accuracy, generated tokens and sequential forwards
per answer; `time` measures batch-1 latency (median over questions, each model alone, after training).

Decision rule, fixed before any run: DART's claim is reproduced if DART-ST (R=0) beats both pause and no-CoT by more
than 5 points in mean accuracy over 3 seeds, with equal generated tokens; if only R=2 wins, the ST pathway needs
refinement passes (extra parallel forwards).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .dparallel_repro import write_jsonl

P, K_OPS, NUM_THOUGHTS = 5, 3, 2
SEPARATOR, ANSWER_PROMPT = ">", "#"
HELD_OUT, MAX_EVAL = 640, 2000
OPS = [f"+{a}" for a in range(P)] + [f"*{b}" for b in (2, 3, 4)]
ARMS = ("cot", "no-cot", "pause", "dart-r0", "dart-r2")
ST_ARMS = ("pause", "dart-r0", "dart-r2")
MARGIN = 5.0  # accuracy points the decision rule asks for
SEQ_LEN = 64  # the models' position limit (the longest sequence, CoT, is 17 tokens)
DART_LAYOUT = {"num_thoughts": NUM_THOUGHTS, "separator": SEPARATOR, "answer_prompt": ANSWER_PROMPT}
ST_SETTINGS = {  # `train dart` settings of the silent-thought arms (the rest: defaults, gamma 1)
    "pause": {"beta": 0.0, "gamma": 0.0, "lam": 0.0},
    "dart-r0": {"beta": 1.0, "lam": 1.0},
    "dart-r2": {"rem_mode": "jacobi", "jacobi_iterations": 2, "beta": 1.0, "lam": 1.0},
}


def solve(question: str) -> tuple[list[str], str]:
    """The CoT steps (`r;` each: the running value) and the answer of `3+4*2+1=`."""
    x, steps = int(question[0]), []
    for op, v in zip(question[1:-1:2], question[2:-1:2]):
        x = (x + int(v)) % P if op == "+" else (x * int(v)) % P
        steps.append(f"{x};")
    return steps, str(x)


def split_questions(seed: int = 1234) -> tuple[list[str], list[str]]:
    """All questions, shuffled once (the same split for every seed): (training, held out)."""
    questions = [str(x) + "".join(ops) + "=" for x in range(P) for ops in itertools.product(OPS, repeat=K_OPS)]
    random.Random(seed).shuffle(questions)
    held = min(HELD_OUT, MAX_EVAL)
    return questions[held:], questions[:held]


def answer(text: str) -> str | None:
    """The digit after the last answer prompt, or, with none in `text` (silent thought: the prompt was the
    server's), its first character."""
    tail = text.rsplit(ANSWER_PROMPT, 1)[-1]
    return tail[0] if tail[:1].isdigit() else None


@dataclass
class Settings:
    cot_steps: int = 700
    arm_steps: int = 1500
    batch_size: int = 64
    hidden_size: int = 96
    num_layers: int = 4
    lr: float = 2e-3
    arm_lr: float = 1e-3
    threads: int = 1


def _llm(model_dir: Path, decoder: str | None, num_seqs: int):
    from leapserve.decoding import LLM

    return LLM(
        str(model_dir),
        decoder=decoder,
        device="cpu",
        model_impl="transformers",  # the silent-thought decoder's, so latencies compare the same modules
        enforce_eager=True,
        max_num_seqs=num_seqs,
    )


# the prompt and decoding of each evaluated pathway: (model arm, decoder, reasoning, prompt suffix, max tokens)
PATHWAYS: dict[str, tuple[str, str | None, str | None, str, int]] = {
    "cot": ("cot", None, None, SEPARATOR, 4 + 2 * K_OPS),
    "no-cot": ("no-cot", None, None, SEPARATOR + ANSWER_PROMPT, 2),
    **{arm: (arm, "silent-thought", "st", "", 2) for arm in ST_ARMS},
    "dart-r0 (its CoT)": ("dart-r0", "silent-thought", "cot", "", 4 + 2 * K_OPS),
}


def _params(reasoning: str | None, max_tokens: int):
    from leapserve.decoding import SamplingParams

    extra = {"reasoning": reasoning} if reasoning else None
    return SamplingParams(max_tokens=max_tokens, temperature=0, extra_args=extra)


def evaluate(models: dict[str, Path], questions: list[str]) -> dict[str, dict]:
    """Accuracy, generated tokens and sequential forwards per answer of every pathway, all questions batched."""
    results = {}
    for name, (arm, decoder, reasoning, suffix, max_tokens) in PATHWAYS.items():
        llm = _llm(models[arm], decoder, len(questions))
        start = time.perf_counter()
        outs = llm.generate([q + suffix for q in questions], _params(reasoning, max_tokens), use_tqdm=False)
        seconds = time.perf_counter() - start
        correct = [answer(o.outputs[0].text) == solve(q)[1] for o, q in zip(outs, questions)]
        forwards = [o.metrics.sequential_forwards or o.metrics.target_forwards for o in outs]
        results[name] = {
            "accuracy": sum(correct) / len(correct),
            "generated_tokens": statistics.mean(len(o.outputs[0].token_ids) for o in outs),
            "sequential_forwards": statistics.mean(forwards),
            "seconds": seconds,
            "example": outs[0].outputs[0].text,
        }
        print(f"  {name:>18}: {results[name]}", flush=True)
    return results


def run(seed: int, out: Path, s: Settings) -> dict:
    import torch

    from leapserve.training.dart import DARTConfig, DARTTraining, train_dart
    from leapserve.training.mdm import ScratchShape
    from leapserve.training.sft import SFTConfig, SFTTraining, train_sft

    torch.set_num_threads(s.threads)
    work = out / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    train_q, test_q = split_questions()
    rows = [dict(zip(("steps", "answer"), solve(q)), question=q) for q in train_q]
    cot = [
        {"prompt": r["question"] + SEPARATOR, "response": "".join(r["steps"]) + ANSWER_PROMPT + r["answer"]}
        for r in rows
    ]
    direct = [{"prompt": r["question"] + SEPARATOR + ANSWER_PROMPT, "response": r["answer"]} for r in rows]
    data = {
        name: str(write_jsonl(work / f"{name}.jsonl", x))
        for name, x in (("cot", cot), ("direct", direct), ("dart", rows))
    }
    common = dict(batch_size=s.batch_size, seed=seed, checkpoint_every=250, warmup_steps=50, device="cpu")
    models = {arm: work / arm for arm in ARMS}
    seconds = {}

    def stage(arm: str, train_fn, cfg) -> None:
        if not (models[arm] / "config.json").is_file():
            wall, cpu = time.perf_counter(), time.process_time()
            train_fn(cfg)
            seconds[arm] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

    shape = ScratchShape(hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=4)
    first = SFTConfig(data["cot"], str(models["cot"]), tokenizer="char", seq_len=SEQ_LEN, shape=shape)
    stage("cot", train_sft, replace(first, train=SFTTraining(steps=s.cot_steps, lr=s.lr, **common)))
    arm_train = dict(steps=s.arm_steps, lr=s.arm_lr, **common)
    no_cot = SFTConfig(data["direct"], str(models["no-cot"]), init_from=str(models["cot"]), seq_len=SEQ_LEN)
    stage("no-cot", train_sft, replace(no_cot, train=SFTTraining(**arm_train)))
    for arm, st in ST_SETTINGS.items():
        cfg = DARTConfig(data["dart"], str(models[arm]), str(models["cot"]), **DART_LAYOUT, **st)
        stage(arm, train_dart, replace(cfg, train=DARTTraining(**arm_train)))
    timing = work / "train_seconds.json"
    seconds = {**(json.loads(timing.read_text()) if timing.is_file() else {}), **seconds}
    timing.write_text(json.dumps(seconds, indent=2))
    print(f"training seconds (this and earlier invocations): {seconds}", flush=True)
    results = {
        "seed": seed,
        "settings": vars(s),
        "eval_questions": len(test_q),
        "train_seconds": seconds,
        "pathways": evaluate(models, test_q),
    }
    write_jsonl(work / "results.jsonl", [results])
    return results


def measure_latency(out: Path, questions: int, threads: int) -> dict[str, dict[str, float]]:
    """Batch-1 latency per answer (ms, median over `questions` held-out questions after 3 warm-up ones) of every
    pathway of every seed run, one model loaded at a time; written to `seed*/latency.json`."""
    import torch

    torch.set_num_threads(threads)
    _, test_q = split_questions()
    asked = test_q[:questions]
    measured = {}
    for work in sorted(out.glob("seed*/")):
        if not (work / "results.jsonl").is_file():
            continue
        latency = {}
        for name, (arm, decoder, reasoning, suffix, max_tokens) in PATHWAYS.items():
            llm = _llm(work / arm, decoder, 1)
            params = _params(reasoning, max_tokens)
            times = []
            for i, q in enumerate(test_q[:3] + asked):
                start = time.perf_counter()
                llm.generate(q + suffix, params, use_tqdm=False)
                if i >= 3:
                    times.append(1000 * (time.perf_counter() - start))
            latency[name] = statistics.median(times)
            print(f"  {work.name} {name:>18}: {latency[name]:.2f} ms", flush=True)
            del llm
        (work / "latency.json").write_text(json.dumps(latency, indent=2))
        measured[work.name] = latency
    if not measured:
        raise ValueError(f"no finished runs under {out}: run `run --seed N --out {out}` first")
    return measured


def _spread(values: list[float], fmt: str = ".1f") -> str:
    return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def verdict(runs: list[dict]) -> str:
    """The decision rule applied to the mean accuracies over the seeds run."""

    def acc(name: str) -> float:
        return statistics.mean(100 * r["pathways"][name]["accuracy"] for r in runs)

    def tokens(name: str) -> float:
        return statistics.mean(r["pathways"][name]["generated_tokens"] for r in runs)

    def wins(name: str) -> bool:
        return acc(name) > max(acc("pause"), acc("no-cot")) + MARGIN and tokens(name) == tokens("no-cot")

    note = "" if len(runs) >= 3 else f" (preliminary: {len(runs)} seed(s), the rule asks for 3)"
    baseline = f"pause {acc('pause'):.1f}%, no-CoT {acc('no-cot'):.1f}%"
    if wins("dart-r0"):
        return (
            f"Reproduced{note}: DART-ST (R=0) {acc('dart-r0'):.1f}% beats {baseline} by more than {MARGIN:g} points "
            f"with equal generated tokens ({tokens('dart-r0'):.2f})."
        )
    if wins("dart-r2"):
        return (
            f"Not reproduced at R=0{note}: DART-ST (R=0) {acc('dart-r0'):.1f}% vs {baseline}; only DART-ST (R=2) "
            f"{acc('dart-r2'):.1f}% wins, so the ST pathway needs refinement passes (extra parallel forwards)."
        )
    return (
        f"Not reproduced{note}: DART-ST (R=0) {acc('dart-r0'):.1f}% and (R=2) {acc('dart-r2'):.1f}% vs {baseline}: "
        f"neither beats both by more than {MARGIN:g} points at equal generated tokens."
    )


def report(out: Path) -> str:
    """A markdown table (mean and min-max over seeds) of every pathway, and the verdict."""
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("seed*/results.jsonl"))]
    if not runs:
        raise ValueError(f"no results under {out}: run `run --seed N --out {out}` first")
    latencies = {r["seed"]: out / f"seed{r['seed']}" / "latency.json" for r in runs}
    latencies = {seed: json.loads(p.read_text()) for seed, p in latencies.items() if p.is_file()}
    lines = [
        f"Seeds {[r['seed'] for r in runs]}; {runs[0]['eval_questions']} held-out questions; mean (min-max) over "
        "seeds. Latency: batch 1, CPU, 1 thread, median per answer (`time`; — if not measured).",
        "",
        "| pathway | accuracy % | generated tokens | sequential forwards | latency ms |",
        "|---|---|---|---|---|",
    ]
    for name in PATHWAYS:
        acc = [100 * r["pathways"][name]["accuracy"] for r in runs]
        tokens = [r["pathways"][name]["generated_tokens"] for r in runs]
        forwards = [r["pathways"][name]["sequential_forwards"] for r in runs]
        lat = [latencies[r["seed"]][name] for r in runs if r["seed"] in latencies]
        lat_cell = _spread(lat, ".2f") if lat else "—"
        lines.append(
            f"| {name} | {_spread(acc)} | {_spread(tokens, '.2f')} | {_spread(forwards, '.2f')} | {lat_cell} |"
        )
    train = {arm: [r["train_seconds"][arm]["cpu"] for r in runs if arm in r["train_seconds"]] for arm in ARMS}
    lines += [
        "",
        "Training CPU seconds per arm: " + ", ".join(f"{a} {_spread(v, '.0f')}" for a, v in train.items() if v) + ".",
        "",
        f"**Verdict:** {verdict(runs)}",
    ]
    return "\n".join(lines)


def ship(seed: int, out: Path, arm: str, dest: Path) -> Path:
    """Copy one trained arm of a seed to `dest` (atomically) as a servable checkpoint, with a model card giving how
    it was made and what every pathway of that seed measured."""
    import shutil

    from leapserve.training.checkpoint import atomic_directory

    work = out / f"seed{seed}"
    results = json.loads((work / "results.jsonl").read_text().splitlines()[0])["pathways"]
    if arm not in ST_ARMS:
        raise ValueError(f"ship a silent-thought arm ({', '.join(ST_ARMS)}), not {arm!r}")
    with atomic_directory(dest) as tmp:
        for path in (work / arm).iterdir():
            if path.name != "README.md":
                shutil.copy(path, tmp / path.name)
        config = json.loads((tmp / "config.json").read_text())
        config["_name_or_path"] = dest.name
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        rows = [
            f"| {name} | {100 * r['accuracy']:.1f}% | {r['generated_tokens']:g} | {r['sequential_forwards']:.2f} |"
            for name, r in results.items()
        ]
        (tmp / "README.md").write_text(
            f"# {dest.name}: silent thought (DART-style) on composed affine maps over Z_5\n\n"
            "A 0.48M-parameter causal Llama (hidden 96, 4 layers, character tokenizer) with 2 silent-thought "
            "positions and layer-adapter REM. Asked `3+4*2+1=` (maps applied left to right from the first number), it "
            "answers the digit after computing the two learned positions in its prompt's prefill, instead of writing "
            "the chain of thought `2;4;0;` (a request's `reasoning` extra argument, `st`, `cot` or `direct`, picks the "
            f"pathway). It is the `{arm}` arm of seed {seed} of leapserve's DART reproduction "
            "(`leapserve.benchmarks.dart_repro`, BENCHMARKS.md): `leapserve train sft` (chain of thought, 700 "
            "steps), then `leapserve train dart` (1,500 steps: answer CE on the silent-thought pathway, CoT CE, "
            "hidden-state distillation at the answer prompt over all layers, step alignment of the two positions).\n\n"
            "```bash\n"
            f"leapserve serve --model {dest}    # decodes with --decoder silent-thought, its default\n"
            "```\n\n"
            "## Command\n\n```\n"
            f"python -m leapserve.benchmarks.dart_repro run --seed {seed} --out runs/dart\n"
            f"python -m leapserve.benchmarks.dart_repro ship --seed {seed} --arm {arm} --out runs/dart --dest {dest}\n"
            "```\n\n"
            f"## Measured\n\n{json.loads((work / 'results.jsonl').read_text().splitlines()[0])['eval_questions']} "
            "held-out questions, greedy, every model of the same seed (this one is the `"
            f"{arm}` row; `dart-r0 (its CoT)` is this model's own chain-of-thought pathway):\n\n"
            "| model / pathway | accuracy | generated tokens | sequential forwards |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n"
        )  # fmt: skip
    return dest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and evaluate one seed (resumes what is done)")
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--out", type=Path, required=True)
    for name, default in vars(Settings()).items():
        r.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    t = sub.add_parser("time", help="batch-1 latency of every pathway of every finished seed (run alone)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--questions", type=int, default=50)
    t.add_argument("--threads", type=int, default=1)
    sh = sub.add_parser("ship", help="copy a trained silent-thought arm of a seed as a servable checkpoint")
    sh.add_argument("--seed", type=int, required=True)
    sh.add_argument("--out", type=Path, required=True)
    sh.add_argument("--arm", default="dart-r0", choices=ST_ARMS)
    sh.add_argument("--dest", type=Path, required=True)
    p = sub.add_parser("report", help="the table over the seeds run, and the verdict")
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.seed, args.out, Settings(**{k: getattr(args, k) for k in vars(Settings())}))
    elif args.command == "time":
        measure_latency(args.out, args.questions, args.threads)
    elif args.command == "ship":
        print(ship(args.seed, args.out, args.arm, args.dest))
    else:
        print(report(args.out))


if __name__ == "__main__":
    main()
