"""Encode throughput of tokenizer.py against Meta's llama_models tokenizer (run by hand).

    python benchmarks/tokenizer_bench.py [path/to/tokenizer.model]

Builds ~4 MB of mixed text (English prose, code, CJK, emoji, digits, long
runs), then encodes it with both tokenizers alternately, 5 rounds, and prints
MB/s per side and the median of the per-round ratios. Both must give the same ids.
"""

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizer import Tokenizer


def corpus(seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "llamas", "graze", "in",
             "the", "Andes", "and", "models", "predict", "the", "next", "token", "one", "at", "a", "time"]
    parts = []
    for _ in range(4000):
        kind = rng.random()
        if kind < 0.5:
            parts.append(" ".join(rng.choice(words) for _ in range(120)).capitalize() + ". ")
        elif kind < 0.7:
            parts.append(f"def f_{rng.randint(0, 999)}(x):\n"
                         f"    return [i ** 2 for i in range(x)]  # {rng.randint(0, 10**6)}\n\n")
        elif kind < 0.85:
            parts.append("日本語のテキストと中文文本和한국어 텍스트 " * 10)
        elif kind < 0.95:
            parts.append("👍🏽 🦙 🇫🇷 " * 20 + " ".join(str(rng.randint(0, 10**9)) for _ in range(40)))
        else:
            parts.append(" " * 3000 + "=" * 3000 + "\n")
    return "".join(parts)


def main() -> None:
    default = None
    try:
        import llama_models

        default = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
        from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    except ImportError:
        sys.exit("needs llama-models: pip install --no-deps llama-models")
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    text = corpus()
    mb = len(text.encode()) / 1e6
    ours, meta = Tokenizer(path), MetaTokenizer(path)
    assert ours.encode(text, bos=False, eos=False) == meta.encode(text, bos=False, eos=False)
    rates = {"tokenizer.py": [], "llama_models": []}
    for _ in range(5):
        for name, tok in (("tokenizer.py", ours), ("llama_models", meta)):
            t0 = time.perf_counter()
            tok.encode(text, bos=False, eos=False)
            rates[name].append(mb / (time.perf_counter() - t0))
    ratios = [a / b for a, b in zip(rates["tokenizer.py"], rates["llama_models"])]
    print(f"text: {mb:.2f} MB, {len(ours.encode(text, bos=False, eos=False))} tokens")
    for name, r in rates.items():
        print(f"{name:>13}: median {statistics.median(r):.2f} MB/s  (rounds: {', '.join(f'{x:.2f}' for x in r)})")
    print(f"ratio tokenizer.py / llama_models: median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
