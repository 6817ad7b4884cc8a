"""What int8 and int4 weights change in the logits, against bf16 (run by hand).

    python benchmarks/quant_quality.py [--ckpt-dir DIR] [--tokens 256]

On bench.py's random Llama 3.2 1B-shaped checkpoint (made in --ckpt-dir if
missing), runs one random prompt through the model loaded with bf16, int8 and
int4 weights, and prints per mode: the largest and the mean absolute logit
difference from bf16, both over the spread (std) of bf16's logits, the mean KL
divergence from bf16's next-token distribution, and how often the most likely
token agrees with bf16's. Random weights make flat, near-uniform predictions,
so these are a check of the arithmetic, not of quality on text: for that, run
llama3.py --perplexity on real weights (README.md, Quantized weights).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import make_checkpoint

import llama3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt-dir", type=Path, default=None, help="bench.py's random checkpoint (made if missing)")
    p.add_argument("--tokens", type=int, default=256)
    opts = p.parse_args()
    tmp = None
    if opts.ckpt_dir is None:
        tmp = tempfile.TemporaryDirectory()
        opts.ckpt_dir = Path(tmp.name) / "llama-3.2-1b-random"
    make_checkpoint(opts.ckpt_dir)
    tokens = torch.randint(0, 128000, (1, opts.tokens), generator=torch.Generator().manual_seed(1))
    logits = {}
    for mode in (None, "int8", "int4"):
        model = llama3.load_model(opts.ckpt_dir, dtype=torch.bfloat16, quantize=mode)
        with torch.no_grad():
            logits[mode] = model(tokens, 0, model.new_cache(1, opts.tokens))[0]  # (tokens, vocab_size), fp32
        del model
    ref = logits[None]
    spread = ref.std().item()
    print(f"# {opts.tokens} random tokens through a random 1B-shaped model; bf16 logits' std {spread:.4f}")
    print("| weights | max abs logit diff / std | mean abs diff / std | mean KL from bf16 (nats) | top-1 agreement |")
    print("|---|---|---|---|---|")
    for mode in ("int8", "int4"):
        diff = (logits[mode] - ref).abs()
        kl = F.kl_div(F.log_softmax(logits[mode], -1), F.log_softmax(ref, -1), log_target=True,
                      reduction="batchmean").item()
        agree = (logits[mode].argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"| {mode} | {diff.max().item() / spread:.3f} | {diff.mean().item() / spread:.4f} | {kl:.2e} | "
              f"{100 * agree:.1f}% |")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
