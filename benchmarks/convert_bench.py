"""Peak memory and time of convert.py on a synthetic 8-shard checkpoint (run by hand).

    python benchmarks/convert_bench.py [--layers 24] [--keep DIR]

Writes, in a temporary folder, a random bf16 checkpoint in Meta's 8-shard
layout (dim 2048, 24 layers: about 2.5 GB, largest merged tensor the 134 MB
embedding), converts it with convert.py in a child process, and prints the
total size, the largest tensor, the child's peak RSS (resource.getrusage) and
the seconds taken. The target: peak RSS under 1 GB + 2 x the largest tensor,
whatever the model's size.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llama3  # after the path insert, so the benchmark runs from anywhere


def write_shards(folder: Path, args: llama3.ModelArgs, n_shards: int) -> tuple[int, int]:
    """Random bf16 shards in Meta's layout; returns (total bytes, largest merged tensor bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps({
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size, "multiple_of": args.multiple_of, "ffn_dim_multiplier": args.ffn_dim_multiplier,
        "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in llama3.Transformer(args).state_dict().items()}
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    largest = max(torch.Size(s).numel() * 2 for s in shapes.values())
    gen = torch.Generator().manual_seed(0)
    for rank in range(n_shards):
        shard = {}
        for name, shape in shapes.items():
            dim = llama3.shard_dim(name)
            if dim is None:
                shard[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                part = list(shape)
                part[dim] //= n_shards
                shard[name] = (torch.randn(part, generator=gen) * 0.02).to(torch.bfloat16)
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
        del shard
    return total, largest


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--keep", type=Path, default=None, help="work in this folder instead of a temporary one")
    opts = p.parse_args()
    args = llama3.ModelArgs(dim=2048, n_layers=opts.layers, n_heads=16, n_kv_heads=8, vocab_size=32768,
                            multiple_of=256, ffn_dim_multiplier=1.0, max_seq_len=4096)
    with tempfile.TemporaryDirectory(dir=opts.keep) as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        t0 = time.perf_counter()
        total, largest = write_shards(src, args, 8)
        print(f"wrote 8 shards, {total / 1e9:.2f} GB, in {time.perf_counter() - t0:.0f}s")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / "convert.py"), str(src), str(dst)], capture_output=True,
                           text=True, check=False)
        seconds = time.perf_counter() - t0
        if r.returncode:
            sys.exit(r.stderr)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(f"model: {total / 1e9:.2f} GB in {len(list(src.glob('*.pth')))} shards; largest merged tensor "
              f"{largest / 1e6:.0f} MB")
        print(f"convert.py: {seconds:.1f} s, peak RSS {peak / 1e9:.2f} GB "
              f"(target < 1 GB + 2 x largest = {(1e9 + 2 * largest) / 1e9:.2f} GB)")
        print(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
