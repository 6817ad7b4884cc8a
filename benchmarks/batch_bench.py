"""Decoding rows at their own positions (decode_rows, issue 35): aggregate decode speed by batch size (run by hand).

    python benchmarks/batch_bench.py [--rounds 3] [--steps 16] [--batches 1,2,4,8] [--dtype bf16] [--exactness]

Builds, in memory, a model in Llama 3.2 1B shape (tied embeddings, 1.24 B parameters) with random weights in
--dtype and appendix A's paths for this CPU, as load_model would set it up, and a cache of max(--batches) slots,
each prefilled with its own 64-token prompt. Each round then times, in turn (the order reversed every other round),
--steps decode steps of decode_rows over the first B slots for each B, each row at its own position, and --steps
steps of part 1's plain forward model(token, pos, cache) for one row: the overhead of the rows path at B = 1.
Prints per side the median over rounds of tokens per second, rows x steps / time (aggregate over the rows), and the
speedup over decode_rows at B = 1. --exactness also prints, for the largest B, the largest difference between a
row's decode_rows logits and the same row decoded alone with part 1's forward, in --dtype and in float32.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama3

PROMPT_LEN = 64
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def one_b_model(dtype: torch.dtype) -> llama3.Transformer:
    """Llama 3.2 1B's shape with random weights (normal, std 0.02; norms 1), and this CPU's appendix A paths."""
    args = llama3.ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                            ffn_dim_multiplier=1.5, max_seq_len=1024, tie_word_embeddings=True)
    with torch.device("meta"), llama3.SkipInit():
        model = llama3.Transformer(args)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return llama3.use_cpu_speed_paths(model.eval())


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128000, (PROMPT_LEN,), generator=gen).tolist() for _ in range(n)]


def filled_cache(model: llama3.Transformer, rows: list[list[int]], length: int) -> list[llama3.KVCache]:
    cache = model.new_cache(len(rows), length)
    for slot, tokens in enumerate(rows):
        llama3.prefill_row(model, cache, slot, tokens)
    return cache


def time_rows(model: llama3.Transformer, cache: list[llama3.KVCache], B: int, steps: int) -> float:
    """Tokens per second of `steps` decode_rows steps over slots 0..B-1, row b at position PROMPT_LEN + b + step."""
    tokens = list(range(1000, 1000 + B))
    start = time.perf_counter()
    for step in range(steps):
        positions = [PROMPT_LEN + b + step for b in range(B)]  # each row at its own position
        tokens = llama3.decode_rows(model, cache, list(range(B)), tokens, positions).argmax(-1).tolist()
    return B * steps / (time.perf_counter() - start)


@torch.inference_mode()
def time_plain(model: llama3.Transformer, cache: list[llama3.KVCache], steps: int) -> float:
    """Tokens per second of part 1's model(token, pos, cache) on slot 0 alone (a one-row view of it)."""
    row = llama3.row_cache(cache, 0)
    token = torch.tensor([[1000]])
    start = time.perf_counter()
    for step in range(steps):
        token = model(token, PROMPT_LEN + step, row)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    return steps / (time.perf_counter() - start)


@torch.inference_mode()
def largest_difference(model: llama3.Transformer, B: int) -> float:
    """Max |decode_rows logits - each row decoded alone| over one step of B rows at their own positions."""
    rows = prompts(B)
    cache = filled_cache(model, [r[: PROMPT_LEN - b] for b, r in enumerate(rows)], PROMPT_LEN + 1)
    tokens = [r[-1] for r in rows]
    positions = [PROMPT_LEN - b for b in range(B)]
    alone = [filled_cache(model, [r[: PROMPT_LEN - b]], PROMPT_LEN + 1) for b, r in enumerate(rows)]
    together = llama3.decode_rows(model, cache, list(range(B)), tokens, positions)  # (B, vocab_size)
    ref = torch.cat([model(torch.tensor([[t]]), p, c)[:, -1] for t, p, c in zip(tokens, positions, alone)])
    return (together - ref).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--exactness", action="store_true")
    opts = p.parse_args()
    batches = [int(b) for b in opts.batches.split(",")]
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")
    print(f"# {cpu}, {torch.get_num_threads()} threads, level {llama3.cpu_level()}; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"# Llama 3.2 1B shape, random weights, {opts.dtype}; {PROMPT_LEN}-token prompts; {opts.steps} steps; "
          f"{opts.rounds} rounds, sides alternating")
    model = one_b_model(DTYPES[opts.dtype])
    if opts.exactness:
        B = max(batches)
        print(f"largest |difference| of a row's logits from its decode alone, {B} rows: {opts.dtype} "
              f"{largest_difference(model, B):.3g}", end="", flush=True)
        print(f", fp32 {largest_difference(model.float(), B):.3g}")
        model = model.to(DTYPES[opts.dtype])
    cache = filled_cache(model, prompts(max(batches)), PROMPT_LEN + max(batches) + opts.steps)
    sides = [f"rows B={B}" for B in batches] + ["plain forward, 1 row"]
    speeds = {side: [] for side in sides}
    for r in range(opts.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            if side.startswith("rows"):
                speeds[side].append(time_rows(model, cache, int(side.split("=")[1]), opts.steps))
            else:
                speeds[side].append(time_plain(model, cache, opts.steps))
    base = statistics.median(speeds[sides[0]])
    print("| side | tokens/s (median) | rounds | vs B=1 |")
    print("|---|---|---|---|")
    for side in sides:
        med = statistics.median(speeds[side])
        print(f"| {side} | {med:.2f} | {', '.join(f'{s:.2f}' for s in speeds[side])} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
