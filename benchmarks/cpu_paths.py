"""The choices appendix A and generate make on a CPU, timed side by side (run by hand).

    python benchmarks/cpu_paths.py [--rounds 7] [--isa avx2|avx512|avx512_bf16|none|all]

On the Llama 3.2 1B shape, alternating the two sides of each choice and
printing medians, with the ratio of the medians of each round:
  - fp32 products: torch's F.linear against row_block_linear (1 to 2,048 rows); the output layer's product of
    1, 4 and 8 rows in 16 row blocks against blocks of at most 1M elements (CPULinear's count);
  - bf16 products of one row (a layer's shapes, the output layer): torch's bf16 kernel against row blocks;
  - bf16 products of 16 and 128 rows: torch's bf16 kernel against bf16_linear_in_fp32;
  - attention of one layer: explicit against SDPA, for a 512-token chunk and one decoded token;
  - a prompt's attention (4,096 tokens, then 16,384): one is_causal call against chunks of 512 with
    forward's mask through SDPA, and through CPUAttention (two unmasked calls a chunk); fp32 4,096
    also with masked chunks of 256 and 2,048.
With --quantized, instead: the products of all 16 layers and the output layer
(so no weight stays in cache), in bf16 against appendix D's int8 and int4
(groups of 32, 64 and 128), for 1 row (decode) and 128 rows (prefill).
--isa caps torch's kernels as a CPU of that level would run them (bench.py's ISA_CAPS);
all runs each level this CPU can show, lowest first, each in a process of its own.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import ISA_CAPS, isa_runs

import llama3

DIM, HIDDEN, N_HEADS, N_KV_HEADS, HEAD_DIM = 2048, 8192, 32, 8, 64


def timed(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def compare(title: str, sides: dict, rounds: int, reps: int) -> None:
    """Alternate the sides `rounds` times; print each side's median and the median ratio to the first."""
    for fn in sides.values():
        fn()  # warm up
    times = {name: [] for name in sides}
    for r in range(rounds):
        for name in sides if r % 2 == 0 else list(sides)[::-1]:
            times[name].append(timed(sides[name], reps))
    first = next(iter(sides))
    parts = []
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(times[first], ts))
        parts.append(f"{name} {statistics.median(ts) * 1e3:.2f} ms" + ("" if name == first else f" ({ratio:.2f}x)"))
    print(f"{title}: " + ", ".join(parts))


def causal_mask(T: int, past: int, dtype: torch.dtype) -> torch.Tensor:
    """Transformer.forward's (T, past + T) mask: the past visible to every query, the chunk causal."""
    return torch.hstack([torch.zeros(T, past), torch.full((T, T), float("-inf")).triu(1)]).to(dtype)


def chunks(attend, q, k, v, chunk: int) -> None:
    """A prompt's attention in chunks over the keys so far, each with forward's causal mask."""
    for start in range(0, q.shape[2], chunk):
        attend(q[:, :, start : start + chunk], k[:, :, : start + chunk], v[:, :, : start + chunk],
               causal_mask(chunk, start, q.dtype))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--long-prompt", type=int, default=16384, help="the last attention comparison's prompt length")
    p.add_argument("--quantized", action="store_true", help="bf16 against int8 and int4 products instead")
    p.add_argument("--isa", default="none", choices=[*ISA_CAPS, "all"], help="cap torch's kernels at this level")
    opts = p.parse_args()
    if os.environ.get("CPU_PATHS_CAPPED") is None:  # run each level in a process started under its cap
        for isa in isa_runs() if opts.isa == "all" else [opts.isa]:
            argv = [a for a in sys.argv[1:] if a not in ("--isa", opts.isa)]
            print(f"\n## kernels capped at {isa}", flush=True)
            subprocess.run([sys.executable, __file__, *argv], check=True,
                           env={**os.environ, **ISA_CAPS[isa], "CPU_PATHS_CAPPED": isa})
        return
    torch.manual_seed(0)
    if opts.quantized:
        return quantized(opts.rounds)
    print(f"# {os.cpu_count()} threads; torch {torch.__version__}; level "
          f"{llama3.cpu_level()}; ratios are (first side's time) / (this side's time), so > 1 is faster")
    shapes = [(N_HEADS * HEAD_DIM, DIM), (N_KV_HEADS * HEAD_DIM, DIM), (HIDDEN, DIM), (DIM, HIDDEN)]
    with torch.inference_mode():
        ws = [torch.randn(s) * 0.02 for s in shapes]
        for rows in (1, 128, 512, 2048):
            xs = [torch.randn(1, rows, w.shape[1]) for w in ws]
            compare(f"fp32, {rows} rows, one layer's shapes", {
                "F.linear": lambda xs=xs: [F.linear(x, w) for x, w in zip(xs, ws)],
                "row blocks": lambda xs=xs: [llama3.row_block_linear(x, w) for x, w in zip(xs, ws)]},
                opts.rounds, 20 if rows == 1 else 2)
        out = torch.randn(128256, DIM) * 0.02  # the output layer (vocabulary, dim)
        sized = llama3.row_block_count(*out.shape)
        for rows in (1, 4, 8):
            x = torch.randn(1, rows, DIM)
            compare(f"fp32, {rows} row(s), the output layer", {
                "16 row blocks": lambda x=x, w=out: llama3.row_block_linear(x, w, 16),
                f"{sized} row blocks (<= 1M elements each)": lambda x=x, w=out: llama3.row_block_linear(x, w, sized)},
                opts.rounds, 2)
        wb = [w.bfloat16() for w in ws]
        # Issue 35: on a Zen 5 bf16's one-row product gained from row blocks; here each level measures it.
        for name, weights in (("one layer's shapes", wb), ("the output layer", [out.bfloat16()])):
            xs = [torch.randn(1, 1, w.shape[1]).bfloat16() for w in weights]
            compare(f"bf16, 1 row, {name}", {
                "bf16 kernel": lambda xs=xs, ws=weights: [F.linear(x, w) for x, w in zip(xs, ws)],
                "row blocks": lambda xs=xs, ws=weights: [
                    llama3.row_block_linear(x, w, llama3.row_block_count(*w.shape)) for x, w in zip(xs, ws)]},
                opts.rounds, 20 if name.startswith("one") else 3)
        del out
        for rows in (16, 128):
            xs = [torch.randn(1, rows, w.shape[1]).bfloat16() for w in wb]
            compare(f"bf16, {rows} rows, one layer's shapes", {
                "bf16 kernel": lambda xs=xs: [F.linear(x, w) for x, w in zip(xs, wb)],
                "via fp32 blocks": lambda xs=xs: [llama3.bf16_linear_in_fp32(x, w) for x, w in zip(xs, wb)]},
                opts.rounds, 2)
        args = llama3.ModelArgs(dim=DIM, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS)
        attention = llama3.Attention(args)
        for dtype in (torch.float32, torch.bfloat16):
            for T, S in ((512, 4096), (1, 4096)):
                q = torch.randn(1, N_HEADS, T, HEAD_DIM, dtype=dtype)
                k, v = (torch.randn(1, N_KV_HEADS, S, HEAD_DIM, dtype=dtype) for _ in range(2))
                mask = None if T == 1 else causal_mask(T, S - T, dtype)
                compare(f"{str(dtype)[6:]} attention, {T} tokens over {S} positions", {
                    "explicit": lambda q=q, k=k, v=v, m=mask: attention.explicit(q, k, v, m),
                    "SDPA": lambda q=q, k=k, v=v, m=mask: attention.sdpa(q, k, v, m)},
                    opts.rounds, 50 if T == 1 else 2)
        cpu_attention = llama3.CPUAttention(args)
        for dtype, T in ((torch.float32, 4096), (torch.bfloat16, 4096), (torch.float32, opts.long_prompt)):
            q = torch.randn(1, N_HEADS, T, HEAD_DIM, dtype=dtype)
            k, v = (torch.randn(1, N_KV_HEADS, T, HEAD_DIM, dtype=dtype) for _ in range(2))
            compare(f"{str(dtype)[6:]} attention of a {T:,}-token prompt", {
                "is_causal": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                  enable_gqa=True),
                **{f"masked chunks of {c}": lambda c=c, q=q, k=k, v=v: chunks(attention.sdpa, q, k, v, c)
                   for c in ((256, 512, 2048) if T == 4096 and dtype == torch.float32 else (512,))},
                "CPUAttention chunks of 512": lambda q=q, k=k, v=v: chunks(cpu_attention.sdpa, q, k, v, 512)},
                3 if T > 4096 else max(3, opts.rounds // 2), 1)


def quantized(rounds: int) -> None:
    """One decode step's products (16 layers, then the output layer), bf16 against int8 and int4."""
    print(f"# {os.cpu_count()} threads; torch {torch.__version__}; level: {llama3.cpu_level()}; "
          "ratios are (bf16's time) / (this side's time), so > 1 is faster")
    shapes = [(N_HEADS * HEAD_DIM, DIM), (N_KV_HEADS * HEAD_DIM, DIM), (N_KV_HEADS * HEAD_DIM, DIM),
              (DIM, N_HEADS * HEAD_DIM), (HIDDEN, DIM), (DIM, HIDDEN), (HIDDEN, DIM)] * 16
    with torch.inference_mode():
        ws = [(torch.randn(s) * 0.02).bfloat16() for s in shapes]
        out = (torch.randn(128256, DIM) * 0.02).bfloat16()

        def layers(ws, cls, group=None):
            made = []
            for w in ws:
                layer = cls(w.shape[1], w.shape[0])
                if group:
                    layer.GROUP_SIZE = group
                layer.quantize_(w)
                made.append(layer)
            return made

        sides = {"bf16": [lambda x, w=w: F.linear(x, w) for w in ws], "int8": layers(ws, llama3.Int8Linear)}
        for g in (32, 64, 128):
            sides[f"int4 g{g}"] = layers(ws, llama3.Int4Linear, g)
        for rows in (1, 128):
            xs = {n: torch.randn(rows, n).bfloat16() for n in (DIM, HIDDEN)}
            compare(f"blocks' products, {rows} row(s), 16 layers", {
                name: lambda fs=fs, xs=xs: [f(xs[w.shape[1]]) for f, w in zip(fs, ws)] for name, fs in sides.items()},
                rounds, 3 if rows == 1 else 1)
        outs = {"bf16": lambda x: F.linear(x, out), "int8": layers([out], llama3.Int8Linear)[0],
                "int4 g32": layers([out], llama3.Int4Linear, 32)[0]}
        for rows in (1, 128):
            x = torch.randn(rows, DIM).bfloat16()
            compare(f"output layer, {rows} row(s)", {name: lambda f=f, x=x: f(x) for name, f in outs.items()},
                    rounds, 5 if rows == 1 else 1)


if __name__ == "__main__":
    main()
