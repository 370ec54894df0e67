"""Chain-of-thought distillation against plain fine-tuning: the same student, the same prompts and steps,
trained on a teacher's verified `<think>...</think><answer>...</answer>` traces or on the answers alone.

    python benchmarks/bench_distill.py --teacher runs/teacher/model --student runs/tiny/model

The teacher samples --samples replies per training prompt; the arithmetic verifier keeps the first right
one (rejection sampling). Both students are fine-tuned with `nanoseek sft`'s trainer; held-out greedy
pass@1 is printed for the teacher and both students.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from nanoseek.rl.distill import write_traces
from nanoseek.rl.evaluate import batch_engine, evaluate
from nanoseek.rl.tasks import get_task
from nanoseek.train.trainer import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, type=Path)
    parser.add_argument("--student", required=True, type=Path)
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--n-train", type=int, default=2000, help="training prompts")
    parser.add_argument("--n-test", type=int, default=200, help="held-out problems")
    parser.add_argument("--samples", type=int, default=2, help="teacher replies per prompt")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    task = get_task(args.task)
    train, test = task.problems("train", args.n_train, seed=1), task.problems("test", args.n_test)
    results = {"teacher": evaluate(batch_engine(args.teacher), task, test, max_tokens=96).pass_at_1}
    with tempfile.TemporaryDirectory() as tmp:
        traces, answers = Path(tmp) / "traces.jsonl", Path(tmp) / "answers.jsonl"
        start = time.perf_counter()
        stats = write_traces(batch_engine(args.teacher), train, task, traces, samples=args.samples, max_tokens=96)
        print(f"teacher: kept {stats['kept']} of {stats['prompts']} prompts in {time.perf_counter() - start:.0f} s")
        with open(answers, "w") as f:  # the same prompts the traces kept, answered without reasoning
            for line in traces.read_text().splitlines():
                messages = json.loads(line)["messages"]
                answer = messages[-1]["content"].rpartition("<answer>")[2]
                f.write(
                    json.dumps({"messages": [*messages[:-1], {"role": "assistant", "content": f"<answer>{answer}"}]})
                    + "\n"
                )
        for name, data in (("student on traces", traces), ("student on answers", answers)):
            cfg = TrainConfig(
                init=str(args.student),
                data=str(data),
                objective="sft",
                out=str(Path(tmp) / name),
                steps=args.steps,
                lr=args.lr,
                batch_size=32,
                seq_len=128,
                mtp_lambda=0,
                warmup_steps=10,
                eval_every=args.steps,
                save_every=args.steps,
                sample_tokens=0,
                progress=False,
            )
            Trainer(cfg).fit()
            results[name] = evaluate(batch_engine(Path(tmp) / name / "model"), task, test, max_tokens=96).pass_at_1
    print(f"held-out greedy pass@1 on {args.n_test} {args.task} problems ({args.steps} fine-tuning steps each):")
    for name, score in results.items():
        print(f"  {name:<20} {score:.3f}")


if __name__ == "__main__":
    main()
