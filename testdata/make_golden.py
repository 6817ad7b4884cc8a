"""Write testdata/golden/: a tiny random Llama 3 checkpoint in Meta's layout and
the logits Hugging Face transformers computes for it.

The expected logits come from transformers' LlamaForCausalLM (rope type
"llama3"), an implementation independent of llama3.py, so the golden test can
catch our bugs. This script imports neither llama3.py nor anything of ours.

Run from the repository root:  python testdata/make_golden.py
(made with transformers 5.24.0 and torch 2.13.0 on CPU, float32)
"""

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).parent / "golden"

# Meta's params.json keys, plus the 3.1 scaling numbers llama3.py reads when present.
# original_max_seq_len 16 (instead of 8192) so that scaling changes a 40-token result.
PARAMS = {
    "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256,
    "multiple_of": 32, "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0,
    "use_scaled_rope": True, "rope_scaling_factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_seq_len": 16, "max_seq_len": 64,
}
HIDDEN = 192  # Meta's rule: int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 32
HEAD_DIM = PARAMS["dim"] // PARAMS["n_heads"]


def meta_weights(gen: torch.Generator) -> dict[str, torch.Tensor]:
    p, d = PARAMS, PARAMS["dim"]

    def randn(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    w = {"tok_embeddings.weight": randn(p["vocab_size"], d, std=1.0)}
    for i in range(p["n_layers"]):
        pre = f"layers.{i}."
        w[pre + "attention.wq.weight"] = randn(p["n_heads"] * HEAD_DIM, d)
        w[pre + "attention.wk.weight"] = randn(p["n_kv_heads"] * HEAD_DIM, d)
        w[pre + "attention.wv.weight"] = randn(p["n_kv_heads"] * HEAD_DIM, d)
        w[pre + "attention.wo.weight"] = randn(d, p["n_heads"] * HEAD_DIM)
        w[pre + "feed_forward.w1.weight"] = randn(HIDDEN, d)
        w[pre + "feed_forward.w2.weight"] = randn(d, HIDDEN)
        w[pre + "feed_forward.w3.weight"] = randn(HIDDEN, d)
        w[pre + "attention_norm.weight"] = 1 + randn(d, std=0.1)
        w[pre + "ffn_norm.weight"] = 1 + randn(d, std=0.1)
    w["norm.weight"] = 1 + randn(d, std=0.1)
    w["output.weight"] = randn(p["vocab_size"], d)
    return w


def to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Transformers' convert_llama_weights_to_hf permutation: interleaved pairs -> rotate-half."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = PARAMS
    sd = {"model.embed_tokens.weight": w["tok_embeddings.weight"], "model.norm.weight": w["norm.weight"],
          "lm_head.weight": w["output.weight"]}
    for i in range(p["n_layers"]):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        sd[h + "self_attn.q_proj.weight"] = to_hf_rows(w[m + "attention.wq.weight"], p["n_heads"])
        sd[h + "self_attn.k_proj.weight"] = to_hf_rows(w[m + "attention.wk.weight"], p["n_kv_heads"])
        sd[h + "self_attn.v_proj.weight"] = w[m + "attention.wv.weight"]
        sd[h + "self_attn.o_proj.weight"] = w[m + "attention.wo.weight"]
        sd[h + "mlp.gate_proj.weight"] = w[m + "feed_forward.w1.weight"]
        sd[h + "mlp.down_proj.weight"] = w[m + "feed_forward.w2.weight"]
        sd[h + "mlp.up_proj.weight"] = w[m + "feed_forward.w3.weight"]
        sd[h + "input_layernorm.weight"] = w[m + "attention_norm.weight"]
        sd[h + "post_attention_layernorm.weight"] = w[m + "ffn_norm.weight"]
    return sd


def main() -> None:
    gen = torch.Generator().manual_seed(20240723)  # Llama 3.1's release date
    weights = meta_weights(gen)
    p = PARAMS
    config = LlamaConfig(
        vocab_size=p["vocab_size"], hidden_size=p["dim"], intermediate_size=HIDDEN,
        num_hidden_layers=p["n_layers"], num_attention_heads=p["n_heads"],
        num_key_value_heads=p["n_kv_heads"], rms_norm_eps=p["norm_eps"],
        max_position_embeddings=p["max_seq_len"], tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": p["rope_theta"], "factor": p["rope_scaling_factor"],
                         "low_freq_factor": p["low_freq_factor"], "high_freq_factor": p["high_freq_factor"],
                         "original_max_position_embeddings": p["original_max_seq_len"]},
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).float().eval()
    model.load_state_dict(hf_state_dict(weights), strict=True)
    tokens = torch.randint(0, p["vocab_size"], (2, 40), generator=gen)
    with torch.no_grad():
        logits = model(tokens).logits.float()

    OUT.mkdir(exist_ok=True)
    (OUT / "params.json").write_text(json.dumps(PARAMS, indent=2) + "\n")
    torch.save(weights, OUT / "consolidated.00.pth")
    torch.save({"tokens": tokens, "logits": logits}, OUT / "expected.pt")
    print(f"wrote {OUT}: logits {tuple(logits.shape)}, |logits| max {logits.abs().max():.3f}")


if __name__ == "__main__":
    main()
