"""Write a tiny random Llama 3 checkpoint, to try llama3.py without downloading weights.

    pip install --no-deps llama-models      # ships Meta's real tokenizer.model
    python testdata/make_tiny_model.py tiny-llama3

The folder gets Meta's layout: params.json, consolidated.00.pth and Meta's
tokenizer.model, with Llama 3's real 128,256-token vocabulary and special
tokens, 2 layers of width 256 and 8,192 positions (67M parameters, 134 MB),
and random weights: it runs --chat, --explain and convert.py as a real
model does, but what it writes means nothing.
"""

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama3 import ModelArgs, Transformer


def main(out: Path) -> None:
    try:
        import llama_models
    except ImportError:
        sys.exit("make_tiny_model.py: error: needs Meta's tokenizer: pip install --no-deps llama-models")
    params = {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 256,
              "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
              "max_seq_len": 8192}
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**params))
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, out / "consolidated.00.pth")
    shutil.copy(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model", out / "tokenizer.model")
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M random parameters, bf16")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
