"""HumanEval (164 Python problems): pass@1 in percent (higher is better).

Each problem's prompt (signature and docstring) is completed greedily through the KV cache
(at most task.max_new_tokens, cut at the Codex stop sequences), and the program
prompt + completion + the problem's tests + check(entry_point) runs in a subprocess.

Running generated code: this task, and only it, executes model output. Each program runs in
its own process (`python -I`, a fresh temporary folder as cwd, an empty environment, no
stdin), its own session (killed whole at the timeout), with limits on CPU time (timeout),
address space (4 GiB), file size (16 MiB) and processes. That contains accidents (loops,
memory, stray files), not a hostile model: run untrusted checkpoints in a container.

pass@k is the unbiased estimator of the HumanEval paper (Chen et al. 2021, eq. 1):
1 - C(n-c, k) / C(n, k) for n samples of which c pass; greedy decoding gives n = 1.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from .. import data
from . import TASKS, Task, greedy_generate

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Codex's stop sequences
MEMORY_LIMIT = 4 << 30


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn from n (c of them correct) passes."""
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) as a stable product
        miss *= 1.0 - k / i
    return 1.0 - miss


def _limit_resources(timeout: float):
    def apply():
        import resource

        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))

    return apply


def run_program(program: str, timeout: float) -> tuple[bool, str]:
    """Run program in a sandboxed subprocess: (passed, why not). Passing is exit status 0 in time."""
    with tempfile.TemporaryDirectory(prefix="qsim-humaneval-") as folder:
        path = os.path.join(folder, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        try:
            done = subprocess.run([sys.executable, "-I", path], cwd=folder, env={}, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout, start_new_session=True,
                                  preexec_fn=_limit_resources(timeout))
        except subprocess.TimeoutExpired:
            return False, "timeout"
    if done.returncode == 0:
        return True, ""
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return False, lines[-1][:200] if lines else f"exit status {done.returncode}"


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _check(cfg) -> None:
    data.check_available("humaneval", cfg.task.split)


def problems(split: str, max_samples: int | None) -> tuple[list[dict], int]:
    rows = data.load_records("humaneval", split)
    return (rows if max_samples is None else rows[:max_samples]), len(rows)


def _evaluate(lm, cfg, progress=None) -> dict:
    chosen, available = problems(cfg.task.split, cfg.task.max_samples)
    if progress is not None:
        progress.start(len(chosen))
    passed, tokens, generated, outcomes = 0, 0, 0, []
    for p in chosen:
        completion, n_prompt, n_new = greedy_generate(lm.model, lm.tokenizer, p["prompt"], cfg.task.max_new_tokens, STOP)
        ok, why = run_program(program(p, completion), cfg.task.timeout)
        passed += ok
        tokens += n_prompt + n_new
        generated += n_new
        outcomes.append({"task_id": p["task_id"], "passed": ok, "error": why, "completion": completion})
        if progress is not None:
            progress.advance(1, f"passed {passed}")
    return {"value": 100.0 * sum(pass_at_k(1, int(o["passed"]), 1) for o in outcomes) / len(chosen),
            "passed": passed, "samples": len(chosen), "samples_available": available, "split": cfg.task.split,
            "tokens_evaluated": tokens, "tokens_generated": generated, "decoding": "greedy, n=1",
            "timeout_s": cfg.task.timeout, "outcomes": outcomes}


TASKS["humaneval"] = Task("humaneval", "pass@1", _check, _evaluate, reads=lambda cfg: [("humaneval", cfg.task.split)],
                          higher_is_better=True, families=("code-lm", "causal-lm"))
