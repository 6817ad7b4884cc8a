"""Peak RSS per rank under tensor parallelism (run by hand, CPU, gloo).

    python benchmarks/tp_memory.py CKPT [--procs 1,2,4] [--new-tokens 4]

For each process count N it starts `torchrun --standalone --nproc-per-node N`
on this script's worker, which loads CKPT with tensor_parallel=True (N == 1: a
plain load), runs a 16-token prompt and a few greedy tokens, and reports its
peak RSS and the bytes of weights it holds. Expect each rank to hold 1/N of
the weights, plus the runtime (~0.25 GB for Python and torch).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(ckpt: str, new_tokens: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    import llama3

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = llama3.load_model(ckpt, tensor_parallel=world > 1)
    llama3.generate(model, [list(range(1000, 1016))], new_tokens, temperature=0, stop_tokens=[])
    rank = dist.get_rank() if world > 1 else 0
    held = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    Path(f"{out}.{rank}").write_text(json.dumps({
        "rank": rank, "weights_gb": held / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}))  # Linux: KiB
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--procs", default="1,2,4")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        return worker(opts.ckpt, opts.new_tokens, opts.out)
    print(f"# {opts.ckpt}; peak RSS of each rank after load + {opts.new_tokens} greedy tokens")
    print("| processes | weights per rank GB | peak RSS per rank GB (max over ranks) |\n|---|---|---|")
    for n in map(int, opts.procs.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rss")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   __file__, opts.ckpt, "--worker", "--out", out, "--new-tokens", str(opts.new_tokens)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
            if r.returncode:
                sys.exit(r.stderr[-3000:])
            ranks = [json.loads(Path(f"{out}.{i}").read_text()) for i in range(n)]
        print(f"| {n} | {max(x['weights_gb'] for x in ranks):.2f} | {max(x['peak_rss_gb'] for x in ranks):.2f} |")


if __name__ == "__main__":
    main()
