"""Thread settings on an idle and on a busy machine: torch's default vs clipforge's choices.

Each case runs in a fresh process: ViT-B/32 image embedding (``for_inference(bf16)``, batch 32),
text embedding (32 Flickr8k-like captions) and one bf16 training step (ViT-Tiny-32, batch 64 —
the main job's model). "busy" starts one process per ``--busy`` core that spins in pure Python
(another job on the machine) before the case and stops it after. The thread counts compared:
torch's default, ``default_threads()`` (one per available physical core), ``"auto"`` (cores other
work leaves free, from /proc/stat), and 1.

    OMP_NUM_THREADS= python bench/threads.py --busy 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

CASE = r"""
import json, sys, time, torch, clipforge
from clipforge.threads import choose_threads
setting = sys.argv[1]
if setting != "torch-default":
    torch.set_num_threads(choose_threads(None if setting == "default" else setting))
threads = torch.get_num_threads()
torch.manual_seed(0)
out = {"threads": threads}
def timed(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
model = clipforge.create_model("ViT-B-32").eval()
fast = model.for_inference(torch.bfloat16)
images = torch.randn(32, 3, 224, 224)
words = "a man in a red shirt rides a bike down the street while two dogs run on the grass".split()
captions = [" ".join(words[i % 7: i % 7 + 6 + i % 9]) for i in range(32)]
ids = clipforge.tokenize(captions)
out["image/s"] = 32 / timed(lambda: fast.encode_image(images), int(sys.argv[2]))
out["text/s"] = 32 / timed(lambda: fast.encode_text(ids), int(sys.argv[2]))
from clipforge.training.grad_cache import contrastive_step
from clipforge.training.optim import make_optimizer
tiny = clipforge.create_model("ViT-Tiny-32").train()
opt = make_optimizer(tiny, 1e-5, 0.1, (0.9, 0.98), 1e-6)
x = torch.randn(64, 3, tiny.image_size, tiny.image_size)
t = clipforge.tokenize(captions * 2, context_length=tiny.context_length)
def step():
    opt.zero_grad(set_to_none=True)
    contrastive_step(tiny, x, t, micro_batch=None, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    opt.step()
out["train samples/s"] = 64 / timed(step, int(sys.argv[2]))
print(json.dumps(out))
"""


def _spin(stop) -> None:  # another job: one core of pure-Python work
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def run_case(setting: str, reps: int, busy: int) -> dict:
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
    for p in spinners:
        p.start()
    time.sleep(1.0 if busy else 0)  # let /proc/stat see them before "auto" samples
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        start_cpu = os.times()
        result = subprocess.run([sys.executable, "-c", CASE, setting, str(reps)], capture_output=True, text=True,
                                env=env, check=False)
        end_cpu = os.times()
    finally:
        stop.set()
        for p in spinners:
            p.join()
    if result.returncode:
        raise SystemExit(f"case {setting} failed:\n{result.stderr[-2000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["child CPU s"] = (end_cpu.children_user + end_cpu.children_system) - (start_cpu.children_user + start_cpu.children_system)
    out["load"] = os.getloadavg()[0]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--busy", type=int, default=1, help="cores kept busy by another job in the busy rows")
    parser.add_argument("--rounds", type=int, default=2, help="repeat the whole table, report medians")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    settings = ["torch-default", "default", "auto", "1"]
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for machine, busy in (("idle", 0), ("busy", args.busy)):
            for setting in settings:
                results.setdefault((machine, setting), []).append(run_case(setting, args.reps, busy))
    keys = ["image/s", "text/s", "train samples/s"]
    print("| machine | threads setting | threads | ViT-B/32 images/s | ViT-B/32 texts/s | ViT-Tiny-32 train samples/s | load |")
    print("|---|---|---:|---:|---:|---:|---:|")
    table = []
    for (machine, setting), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in keys + ["load"]}
        threads = "/".join(sorted({str(r["threads"]) for r in runs}))
        table.append({"machine": machine, "setting": setting, "threads": threads, **med})
        print(f"| {machine} | {setting} | {threads} | {med['image/s']:.1f} | {med['text/s']:.1f} | "
              f"{med['train samples/s']:.1f} | {med['load']:.1f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
