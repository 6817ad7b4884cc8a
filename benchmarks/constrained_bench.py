"""Constrained decoding (appendix F) against plain decoding, on the Llama 3.2 1B shape (run by hand).

    python benchmarks/constrained_bench.py [--rounds 3] [--new-tokens 32] [--threads N]

Builds a random bf16 model in Llama 3.2 1B shape (random weights decode at the real speed), with appendix A's CPU
paths as load_model would pick them, and Meta's tokenizer from the llama-models package. Each round decodes the
same prompt greedily twice, plain and under a JSON schema's constraint, alternating which goes first, and prints
both decode rates (new tokens after the first, per second) and their ratio; the summary is the median ratio, and
the constraint's own time per token (mask and advance, replayed without the model). The
schema's bounded strings, enum, integer range and array take a greedy document through every kind of state:
inside strings the mask comes from the token columns (a new state each character, as the length is counted),
elsewhere from trie walks. A first, untimed round warms up both.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama3
from tokenizer import Tokenizer

SHAPE = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256,
         "ffn_dim_multiplier": 1.5, "max_seq_len": 512, "tie_word_embeddings": True}
SCHEMA = {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 24},
                                           "mood": {"enum": ["happy", "sad", "neutral"]},
                                           "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                           "city": {"type": "string", "maxLength": 12},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["summary", "mood", "year", "city", "tags"]}


def decode_rate(model, prompt: list[int], n: int, constraint) -> tuple[float, list[int]]:
    times = []
    new = []

    def on_token(_row: int, token: int) -> None:
        times.append(time.perf_counter())
        new.append(token)

    llama3.generate(model, [prompt], n, temperature=0, stop_tokens=[], on_token=on_token, constraint=constraint)
    return (len(times) - 1) / (times[-1] - times[0]), new


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    opts = p.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    import llama_models

    tok = Tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                                                          check=False).stdout.splitlines()
                if line.startswith("Model name")), "unknown CPU")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = llama3.Transformer(llama3.ModelArgs(**SHAPE))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p_ in model.parameters():
            p_.normal_(0, 0.02) if p_.dim() > 1 else p_.fill_(1.0)
    model = llama3.use_cpu_speed_paths(model).eval()
    prompt = tok.encode("Describe your day as JSON:", bos=True, eos=False)
    llama3.json_constraint(tok, SCHEMA)  # the tokenizer's columns, once (kept on it)
    print(f"# Llama 3.2 1B shape, random bf16 weights, {torch.get_num_threads()} threads, {cpu}; greedy, "
          f"{opts.new_tokens} new tokens")
    decode_rate(model, prompt, 4, llama3.json_constraint(tok, SCHEMA))  # warm-up
    ratios = []
    for r in range(opts.rounds):
        rates = {}
        for side in (("plain", "constrained") if r % 2 == 0 else ("constrained", "plain")):
            constraint = llama3.json_constraint(tok, SCHEMA) if side == "constrained" else None
            rates[side], new = decode_rate(model, prompt, opts.new_tokens, constraint)
            if side == "constrained":
                text = tok.decode(new)
        ratios.append(rates["constrained"] / rates["plain"])
        print(f"round {r}: plain {rates['plain']:.2f} tok/s, constrained {rates['constrained']:.2f} tok/s, "
              f"ratio {ratios[-1]:.3f}  ({text[:60]!r}...)")
    # The constraint's own work per token (mask, advance), replayed without the model: robust to a busy machine.
    constraint = llama3.json_constraint(tok, SCHEMA)
    t0 = time.perf_counter()
    for token in new:
        constraint.mask(torch.zeros(1, SHAPE["vocab_size"]))
        constraint.advance(token)
    per_token = (time.perf_counter() - t0) / len(new)
    print(f"median ratio constrained / plain: {statistics.median(ratios):.3f}; the constraint's own work "
          f"{1000 * per_token:.1f} ms per token")


if __name__ == "__main__":
    main()
