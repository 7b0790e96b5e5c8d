"""Peak resident memory (CPU) of ``fedlora simulate --task sft`` by engine, pass budget and
clients per round, beside PEFT's single-client figure (issue 19 item 3).

    OMP_NUM_THREADS=1 nice -n 5 python bench/memory.py                # all configs, ~15 min
    python bench/memory.py --only readme-batched,peft-1-client         # some of them
    python bench/memory.py --random-tiny --out /tmp/m.json             # a smoke run

Every configuration runs in a fresh Python process (one at a time) and reports that process's
``ru_maxrss`` (the peak resident set, model and data included) and its wall time:

- ``load-only``: the embedded SmolLM2-135M-Instruct (float32) and the encoded data, no training
  (the floor every other figure includes);
- ``readme-*``: the README's SFT command (``--task sft --clients 8 --local-steps 4``, batch 8,
  max length 256, its default evaluation) for one of its three rounds (the peak of a round
  repeats every round): ``batched`` (automatic pass budget: on CPU one client segment per
  pass), ``sequential``, ``batched`` with ``--gradient-checkpointing``, and ``joined`` (one pass
  holding every client, ``--max-tokens-per-pass 10**9``: the layout before passes existed);
- ``clients-8`` / ``clients-32``: one round of one local step with 8 and 32 clients at a fixed
  pass budget (the automatic one, and ``--max-tokens-per-pass 4096``: several clients per
  pass), evaluation cut to 8 test examples and 2 generations;
- ``clients-8-4bit``: ``clients-8`` on a 4-bit (NF4) base, ``--quantize 4bit`` (bitsandbytes'
  CPU backend);
- ``peft-1-client``: PEFT's LoRA (``r=8, alpha=16`` on the same projections) on the same model,
  one AdamW step on the same batch of 8 examples through the same response-token loss.

The results go to ``bench/results/memory-cpu.json`` (and a Markdown table beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

README = dict(task="sft", clients=8, rounds=1, local_steps=4)
SMALL_EVAL = dict(max_test=8, max_generate=2)
CONFIGS: dict[str, dict] = {
    "load-only": {"kind": "load"},
    "readme-batched": {"kind": "simulate", "cfg": dict(README)},
    "readme-sequential": {"kind": "simulate", "cfg": dict(README, engine="sequential")},
    "readme-batched-checkpointing": {
        "kind": "simulate",
        "cfg": dict(README, gradient_checkpointing=True),
    },
    "readme-joined-1-step": {
        "kind": "simulate",
        "cfg": dict(README, local_steps=1, max_tokens_per_pass=10**9),
    },
    "clients-8": {"kind": "simulate", "cfg": dict(README, local_steps=1, **SMALL_EVAL)},
    "clients-32": {
        "kind": "simulate",
        "cfg": dict(README, clients=32, local_steps=1, **SMALL_EVAL),
    },
    "clients-8-budget-4096": {
        "kind": "simulate",
        "cfg": dict(README, local_steps=1, max_tokens_per_pass=4096, **SMALL_EVAL),
    },
    "clients-32-budget-4096": {
        "kind": "simulate",
        "cfg": dict(README, clients=32, local_steps=1, max_tokens_per_pass=4096, **SMALL_EVAL),
    },
    "peft-1-client": {"kind": "peft"},
    "clients-8-4bit": {
        "kind": "simulate",
        "cfg": dict(README, local_steps=1, quantize="4bit", **SMALL_EVAL),
    },
}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _child(spec: dict, model: str | None) -> dict:
    """Run one configuration in this (fresh) process; its peak RSS and seconds."""
    import torch

    from fedlora.simulate import SimConfig, run

    t0 = time.perf_counter()
    extra = {"model": model} if model else {}
    if spec["kind"] == "simulate":
        cfg = SimConfig(**spec["cfg"], **extra)
        with tempfile.TemporaryDirectory() as out:
            result = run(cfg, Path(out) / "run", progress=False, log=lambda s: None, plot=False)
        info = {"train_loss": result.rounds[-1]["train_loss"], "config": spec["cfg"]}
    else:
        from fedlora.models import default_llm_target_modules, load_causal_lm
        from fedlora.simulate.tasks.sft import SFTTask, response_token_losses

        cfg = SimConfig(**README, **extra)
        lm, tok = load_causal_lm(cfg.model or "smollm2", dtype=torch.float32)
        task = SFTTask()
        data = task.load_data(cfg)
        train = task.encode(tok, data.train, cfg)
        info = {"examples": len(train)}
        if spec["kind"] == "peft":
            import peft

            targets = default_llm_target_modules(lm)
            pm = peft.get_peft_model(
                lm, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
            )
            inner = pm.base_model.model
            opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
            batch = train.take(list(range(cfg.batch_size))).trimmed()
            nll, _ = response_token_losses(inner, batch)
            nll.mean().backward()
            opt.step()
            info = {"loss": float(nll.mean()), "target_modules": targets}
    return {
        "peak_rss_mib": round(_peak_mib(), 1),
        "seconds": round(time.perf_counter() - t0, 1),
    } | info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated configuration names")
    p.add_argument("--out", default="bench/results/memory-cpu.json")
    p.add_argument("--random-tiny", action="store_true", help="a 2-layer random LLaMA (smoke)")
    p.add_argument("--merge", action="store_true", help="add to --out's results, not replace")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(CONFIGS[args.child], args.model)))
        return 0
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--only: unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    model = None
    tmp = None
    if args.random_tiny:
        from fedlora.testing import random_causal_lm

        tmp = tempfile.TemporaryDirectory()
        model = str(random_causal_lm(Path(tmp.name) / "tiny", arch="llama"))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = Path(args.out)
    results = {}
    if args.merge and out.exists():
        results = json.loads(out.read_text())["results"]
    for name in names:
        cmd = [sys.executable, __file__, "--child", name] + (["--model", model] if model else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            results[name] = {"error": proc.stderr.strip().splitlines()[-1:]}
        else:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    import torch

    report = {
        "what": "peak resident memory (ru_maxrss) of one process per configuration",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "omp_num_threads": env["OMP_NUM_THREADS"],
            "torch": torch.__version__,
        },
        "model": model or "smollm2 (embedded SmolLM2-135M-Instruct, float32)",
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(report))
    if tmp is not None:
        tmp.cleanup()
    return 0


def _markdown(report: dict) -> str:
    lines = [
        "# Peak resident memory, `fedlora simulate --task sft` on CPU",
        "",
        f"Model: {report['model']}; {report['machine']['cpus']} CPUs, OMP_NUM_THREADS="
        f"{report['machine']['omp_num_threads']}, torch {report['machine']['torch']}. "
        "Produced by `bench/memory.py` (each configuration in a fresh process; see its "
        "docstring for the configurations).",
        "",
        "| configuration | peak RSS (MiB) | seconds |",
        "|---|---:|---:|",
    ]
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | |")
        else:
            lines.append(f"| {name} | {r['peak_rss_mib']:.0f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
