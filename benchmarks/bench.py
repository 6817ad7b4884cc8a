"""llama3.py against Hugging Face transformers: load, prefill, decode, memory (run by hand).

    python benchmarks/bench.py [--rounds 3] [--dtypes fp32,bf16] [--new-tokens 32] [--device cpu|cuda]
    python benchmarks/bench.py --long 1024,4096,16384 [--rounds 1]    (long prompts)
    python benchmarks/bench.py --quantize [--dtypes bf16]              (bf16, int8, int4: ours only)
    python benchmarks/bench.py --dtype-vs-fp32 --isa all              (bf16 against fp32, ours, per level)
    python benchmarks/bench.py --speculative [--rounds 3]             (speculative decoding against plain)

Creates once, in a temporary folder (or --ckpt-dir, kept for the next run), a
random bf16 checkpoint in Llama 3.2 1B shape in the Hugging Face layout
(tied embeddings, 1.24 B parameters). Then, for each dtype and round, it runs
ours and transformers alternately, each in a fresh process with the same
thread count, and prints per side: load seconds and peak RSS after loading,
prefill ms for a 128-token prompt, greedy decode tokens/s, peak RSS of the
whole run, time to first token (load + prefill), and the ratio ours /
transformers (median of the per-round ratios). Each round also times torch's
own matrix-vector kernel through all the weights: the decode ceiling of any
implementation built on F.linear. On CPU it also measures the machine's read bandwidth, the decode
bound it implies (weights' bytes / bandwidth) and each side's share of it.
On CUDA (bf16) it adds ours with --compile and reports peak GPU memory.
With --long, it runs each prompt length instead, generating 2 tokens, and
prints per side the time to the first token (load + prefill) and the peak RSS
above the weights, with the ratios ours / transformers.
With --quantize, the sides are ours with bf16, int8 and int4 weights (appendix D),
and the ratios are to the unquantized side.
With --speculative (ours only, bf16 and int4, in one process, sides alternating):
(a) a copy of the checkpoint whose blocks' weights are scaled down 10x, so that with
tied embeddings the model repeats its last token: prompt lookup's drafts all hold,
the upper bound of speculation at the real shapes and bytes; (b) a 1-layer draft
model of the same width, the cost of drafting (its random drafts are rejected);
(c) the model as its own draft (all accepted, each draft a full forward); and the
cost of one forward over 1 to 8 new positions, from which the speedup at other
acceptance rates is computed.
With --dtype-vs-fp32, the sides are ours in each of --dtypes against ours in fp32,
with the ratios bf16 / fp32 of prefill time and decode speed.
--isa caps torch's kernels in the sides' processes as a CPU of that level would run
them (avx2, avx512 without bf16, avx512_bf16 without AMX; none: this CPU as it is),
or runs each level this CPU can show in turn (all).
transformers is needed for its side only; without it, ours runs alone.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The environment that caps torch's kernels (ATen's, oneDNN's, MKL's) at each level of llama3.CPU_LEVELS.
ISA_CAPS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
            "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
            "avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
            "none": {}}
SHAPE = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab": 128256, "hidden": 8192}


def make_checkpoint(folder: Path) -> None:
    """A random Llama 3.2 1B-shaped checkpoint in Hugging Face's layout (bf16, tied embeddings)."""
    import torch
    from safetensors.torch import save_file

    if (folder / "model.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    s, gen = SHAPE, torch.Generator().manual_seed(0)
    hd = s["dim"] // s["n_heads"]

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def ones():
        return torch.ones(s["dim"], dtype=torch.bfloat16)

    sd = {"model.embed_tokens.weight": rand(s["vocab"], s["dim"]), "model.norm.weight": ones()}
    for i in range(s["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = rand(s["n_heads"] * hd, s["dim"])
        sd[p + "self_attn.k_proj.weight"] = rand(s["n_kv_heads"] * hd, s["dim"])
        sd[p + "self_attn.v_proj.weight"] = rand(s["n_kv_heads"] * hd, s["dim"])
        sd[p + "self_attn.o_proj.weight"] = rand(s["dim"], s["n_heads"] * hd)
        sd[p + "mlp.gate_proj.weight"] = rand(s["hidden"], s["dim"])
        sd[p + "mlp.up_proj.weight"] = rand(s["hidden"], s["dim"])
        sd[p + "mlp.down_proj.weight"] = rand(s["dim"], s["hidden"])
        sd[p + "input_layernorm.weight"] = ones()
        sd[p + "post_attention_layernorm.weight"] = ones()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["dim"],
              "intermediate_size": s["hidden"], "num_hidden_layers": s["n_layers"],
              "num_attention_heads": s["n_heads"], "num_key_value_heads": s["n_kv_heads"], "vocab_size": s["vocab"],
              "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": True,
              "rope_theta": 500000.0, "hidden_act": "silu", "torch_dtype": "bfloat16",
              "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "bos_token_id": 128000, "eos_token_id": 128001}
    (folder / "config.json").write_text(json.dumps(config, indent=1))


# ----------------------------------------------------------------------------- child side


def peak_rss_gb() -> float:
    """This process's peak RSS. VmHWM, not getrusage: a child's ru_maxrss starts at its parent's."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e9  # bytes on macOS


def child(side: str, ckpt: str, dtype_name: str, device: str, prompt_len: int, new_tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128000, (prompt_len,), generator=gen).tolist()
    stamps = []
    t0 = time.perf_counter()
    if side == "ceiling":
        return matvec_ceiling(dtype, device)
    if side.startswith("ours"):
        sys.path.insert(0, str(ROOT))
        import llama3

        quantize = side.removeprefix("ours-") if side in ("ours-int8", "ours-int4") else None
        model = llama3.load_model(ckpt, device=device, dtype=dtype, quantize=quantize)
        if device == "cuda":
            torch.cuda.synchronize()
        load_s, load_rss = time.perf_counter() - t0, peak_rss_gb()
        tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # tied ones once
        weights = sum(t.numel() * t.element_size() for t in tensors.values())
        stamps.append(time.perf_counter())
        llama3.generate(model, [prompt], new_tokens, temperature=0, stop_tokens=[], compile=side == "ours-compile",
                        on_token=lambda _row, _tok: stamps.append(time.perf_counter()))
    else:
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        load_s, load_rss = time.perf_counter() - t0, peak_rss_gb()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())

        class Stamp(BaseStreamer):
            def put(self, value):  # first call: the prompt; then one call per new token
                if device == "cuda":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())

            def end(self):
                pass

        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, streamer=Stamp(), pad_token_id=0)
    prefill_ms = (stamps[1] - stamps[0]) * 1e3
    decode = (len(stamps) - 2) / (stamps[-1] - stamps[1]) if len(stamps) > 2 else float("nan")
    result = {"load_s": load_s, "load_rss_gb": load_rss, "prefill_ms": prefill_ms, "decode_tok_s": decode,
              "ttft_s": load_s + prefill_ms / 1e3,
              "peak_rss_gb": peak_rss_gb(), "weights_gb": weights / 1e9, "new_tokens": len(stamps) - 1}
    if device == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def matvec_ceiling(dtype, device: str, reps: int = 5) -> dict:
    """Decode's ceiling with torch's own kernels: one 1-row F.linear through every
    weight matrix of the model (the tied embedding once, as the output layer)."""
    import torch

    s = SHAPE
    hd = s["dim"] // s["n_heads"]
    shapes = [(s["n_heads"] * hd, s["dim"]), (s["n_kv_heads"] * hd, s["dim"]), (s["n_kv_heads"] * hd, s["dim"]),
              (s["dim"], s["n_heads"] * hd), (s["hidden"], s["dim"]), (s["dim"], s["hidden"]),
              (s["hidden"], s["dim"])] * s["n_layers"] + [(s["vocab"], s["dim"])]
    weights = [torch.randn(shape, device=device).to(dtype) for shape in shapes]
    xs = {n: torch.randn(1, n, device=device).to(dtype) for n in {w.shape[1] for w in weights}}
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(xs[w.shape[1]], w)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    return {"decode_tok_s": 1 / statistics.median(times), "matvec_gbs": nbytes / statistics.median(times) / 1e9}


# ----------------------------------------------------------------------------- parent side


def read_bandwidth_gbs(threads: int) -> float:
    """Streaming read bandwidth: the best of several sums over a 1 GiB float32 buffer."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    x.sum()
    best = 0.0
    for _ in range(8):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def run_child(side: str, opts, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--ckpt-dir", str(opts.ckpt_dir), "--dtypes", dtype,
           "--device", opts.device, "--prompt-len", str(opts.prompt_len), "--new-tokens", str(opts.new_tokens),
           "--threads", str(opts.threads)]
    env = {**os.environ, **ISA_CAPS[getattr(opts, "isa", "none")]}
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if r.returncode:
        sys.exit(f"{side} {dtype} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--ckpt-dir", type=Path, default=None, help="where the random checkpoint lives (kept)")
    p.add_argument("--long", default=None, help="long-prompt mode: prompt lengths, e.g. 1024,4096,16384")
    p.add_argument("--quantize", action="store_true", help="ours with bf16, int8 and int4 weights")
    p.add_argument("--dtype-vs-fp32", action="store_true", help="ours in each dtype against ours in fp32")
    p.add_argument("--speculative", action="store_true", help="speculative decoding against plain decoding")
    p.add_argument("--speculate-k", type=int, default=5)
    p.add_argument("--isa", default="none", choices=[*ISA_CAPS, "all"], help="cap torch's kernels at this level")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child:
        print(json.dumps(child(opts.child, str(opts.ckpt_dir), opts.dtypes, opts.device, opts.prompt_len,
                               opts.new_tokens, opts.threads)))
        return

    tmp = None
    if opts.ckpt_dir is None:
        tmp = tempfile.TemporaryDirectory()
        opts.ckpt_dir = Path(tmp.name) / "llama-3.2-1b-random"
    make_checkpoint(opts.ckpt_dir)
    try:
        import transformers

        sides = ["ours", "transformers"]
        versions = f"transformers {transformers.__version__}"
    except ImportError:
        sides, versions = ["ours"], "transformers not installed"
    if opts.device == "cuda" and not opts.quantize:
        sides.insert(1, "ours-compile")
    if opts.quantize:
        sides = ["ours", "ours-int8", "ours-int4"]
    baseline = "ours" if opts.quantize else "transformers"
    import torch
    if opts.speculative:
        return speculative(opts)
    if opts.dtype_vs_fp32:
        for isa in (isa_runs() if opts.isa == "all" else [opts.isa]):
            dtype_vs_fp32(argparse.Namespace(**{**vars(opts), "isa": isa}))
        return

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")
    device = torch.cuda.get_device_name() if opts.device == "cuda" else f"{cpu}, {opts.threads} threads"
    print(f"# {device}; torch {torch.__version__}; {versions}; load average {os.getloadavg()[0]:.2f}")
    print(f"# Llama 3.2 1B shape, random bf16 weights in {opts.ckpt_dir}; prompt {opts.prompt_len} tokens, "
          f"{opts.new_tokens} greedy new tokens; {opts.rounds} rounds, sides alternating")

    if opts.long:
        long_prompts(opts, sides)
        return
    for dtype in opts.dtypes.split(","):
        results = {s: [] for s in sides}
        bandwidths, ceilings = [], []
        for r in range(opts.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for side in order:
                if opts.device == "cpu":
                    bandwidths.append(read_bandwidth_gbs(opts.threads))
                results[side].append(run_child(side, opts, dtype))
            ceilings.append(run_child("ceiling", opts, dtype))
        print(f"\n## {dtype}")
        bw = statistics.median(bandwidths) if bandwidths else None
        weights = results["ours"][0]["weights_gb"]
        if bw:
            print(f"read bandwidth {bw:.1f} GB/s (median of {len(bandwidths)}); weights {weights:.2f} GB; "
                  f"decode bound {bw / weights:.2f} tokens/s")
        ceiling = statistics.median(c["decode_tok_s"] for c in ceilings)
        print(f"torch's matrix-vector ceiling: {ceiling:.2f} tokens/s "
              f"({statistics.median(c['matvec_gbs'] for c in ceilings):.1f} GB/s through F.linear, 1 row)")
        header = ("| side | weights GB | load s | load RSS GB | prefill ms | decode tok/s | % of bound | % of ceiling |"
                  " peak RSS GB |")
        if opts.device == "cuda":
            header += " peak GPU GB |"
        print(header + "\n|" + "---|" * (header.count("|") - 1))
        for side in sides:
            rs = results[side]

            def med(key, rs=rs):
                return statistics.median(x[key] for x in rs)

            pct = f"{100 * med('decode_tok_s') / (bw / med('weights_gb')):.0f}%" if bw else "-"
            row = (f"| {side} | {med('weights_gb'):.2f} | {med('load_s'):.2f} | {med('load_rss_gb'):.2f} | "
                   f"{med('prefill_ms'):.0f} | "
                   f"{med('decode_tok_s'):.2f} | {pct} | {100 * med('decode_tok_s') / ceiling:.0f}% | "
                   f"{med('peak_rss_gb'):.2f} |")
            if opts.device == "cuda":
                row += f" {med('peak_gpu_gb'):.2f} |"
            print(row)
        if baseline in sides:
            for key, better in (("decode_tok_s", "higher"), ("prefill_ms", "lower"), ("peak_rss_gb", "lower"),
                                ("load_s", "lower"), ("ttft_s", "lower")):
                for side in [s for s in sides if s.startswith("ours") and s != baseline]:
                    ratios = [a[key] / b[key] for a, b in zip(results[side], results[baseline])]
                    print(f"{side} / {baseline} {key}: median {statistics.median(ratios):.2f}x ({better} is better;"
                          f" rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    if tmp:
        tmp.cleanup()


def repeating_checkpoint(folder: Path, source: Path) -> None:
    """source's checkpoint with every block weight (norms aside) times 0.1: with the embedding tied to the output,
    the last token's own row then wins, and the model repeats it (prompt lookup's drafts all hold)."""
    from safetensors.torch import load_file, save_file

    if (folder / "model.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    state = load_file(source / "model.safetensors")
    for name, t in state.items():
        if ".layers." in name and "layernorm" not in name:
            state[name] = (t.float() * 0.1).to(t.dtype)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text((source / "config.json").read_text())


def speculative_speeds(llama3, model, prompt: list[int], opts, label: str, title: str, sides: dict) -> None:
    """Greedy decode tok/s of each side's generate arguments, alternating; ratios to "plain", drafts kept."""
    speeds = {name: [] for name in sides}
    outs = {}
    counts = {}
    for r in range(opts.rounds):
        for name in sides if r % 2 == 0 else list(sides)[::-1]:
            stamps = []
            counts[name] = llama3.Speculation()
            outs[name] = llama3.generate(model, [prompt], opts.new_tokens, temperature=0, stop_tokens=[],
                                         speculation=counts[name], **sides[name],
                                         on_token=lambda _r, _t, stamps=stamps: stamps.append(time.perf_counter()))
            speeds[name].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    parts = []
    for name in sides:
        ratio = statistics.median(a / b for a, b in zip(speeds[name], speeds["plain"]))
        kept = f", {counts[name].accepted}/{counts[name].drafted} drafts kept" if counts[name].drafted else ""
        same = "" if outs[name] == outs["plain"] else ", OUTPUT DIFFERS"
        extra = f" ({ratio:.2f}x{kept}{same})" if name != "plain" else ""
        parts.append(f"{name} {statistics.median(speeds[name]):.2f}{extra}")
    print(f"{label}, {title}: " + "; ".join(parts), flush=True)


def speculative(opts) -> None:
    """Plain decoding against speculative decoding in one process; see the module's docstring."""
    import dataclasses

    import torch

    sys.path.insert(0, str(ROOT))
    import llama3

    torch.set_num_threads(opts.threads)
    k = opts.speculate_k
    repeat = opts.ckpt_dir.parent / (opts.ckpt_dir.name + "-repeating")
    repeating_checkpoint(repeat, opts.ckpt_dir)
    prompt = torch.randint(0, 128000, (opts.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    print(f"# {os.cpu_count()} threads; torch {torch.__version__}; level {llama3.cpu_level()}; prompt "
          f"{opts.prompt_len} tokens, {opts.new_tokens} greedy new tokens, k = {k}; decode tok/s, medians of "
          f"{opts.rounds}")
    for quantize in (None, "int4"):
        label = quantize or "bf16"
        model = llama3.load_model(repeat, dtype=torch.bfloat16, quantize=quantize)
        speculative_speeds(llama3, model, prompt, opts, label, "(a) repeating model, every lookup draft holds",
                           {"plain": {}, f"prompt lookup {k}": {"prompt_lookup": k}})
        del model
        model = llama3.load_model(opts.ckpt_dir, dtype=torch.bfloat16, quantize=quantize)
        one_layer = dataclasses.replace(model.args, n_layers=1)
        draft = llama3.Transformer(one_layer).to(torch.bfloat16).eval()  # random: its drafts are rejected
        speculative_speeds(llama3, model, prompt, opts, label, "(b) a 1-layer draft, (c) the model as its own draft",
                           {"plain": {}, "1-layer draft": {"draft": draft, "speculate_k": k},
                            "itself": {"draft": model, "speculate_k": k}})
        with torch.inference_mode():  # one forward over T new positions after the prompt's, against T = 1
            cache = model.new_cache(1, opts.prompt_len + 16)
            model(torch.tensor([prompt]), 0, cache, last_only=True)
            times = {}
            for T in (1, 2, 4, 6, 8):
                ids = torch.tensor([prompt[:T]])
                runs = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    model(ids, opts.prompt_len, cache)
                    runs.append(time.perf_counter() - t0)
                times[T] = statistics.median(runs)
        print(f"{label}, one forward over T new positions: " + ", ".join(
            f"T={T} {t * 1e3:.0f} ms ({t / times[1]:.2f}x)" for T, t in times.items()), flush=True)
        del model, draft


def level_under(isa: str) -> str:
    """llama3.cpu_level() in a process whose kernels are capped at isa."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import llama3; print(llama3.cpu_level())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, **ISA_CAPS[isa]})
    return r.stdout.strip()


def isa_runs() -> list[str]:
    """The caps that show a level below this CPU's own, lowest first, then "none" (the CPU as it is)."""
    own = level_under("none")
    return [isa for isa in ("avx2", "avx512", "avx512_bf16") if level_under(isa) == isa != own] + ["none"]


def dtype_vs_fp32(opts) -> None:
    """Ours in each of opts.dtypes against ours in fp32, alternating, under opts.isa's cap."""
    print(f"\n## kernels capped at {opts.isa} (llama3.cpu_level() there: {level_under(opts.isa)}), "
          f"prompt {opts.prompt_len} tokens, {opts.new_tokens} new tokens")
    for dtype in [d for d in opts.dtypes.split(",") if d != "fp32"]:
        runs = {"fp32": [], dtype: []}
        for r in range(opts.rounds):
            for d in runs if r % 2 == 0 else list(runs)[::-1]:
                runs[d].append(run_child("ours", opts, d))
        for d, rs in runs.items():
            print(f"{d}: prefill {statistics.median(x['prefill_ms'] for x in rs):.0f} ms, decode "
                  f"{statistics.median(x['decode_tok_s'] for x in rs):.2f} tok/s, peak RSS "
                  f"{statistics.median(x['peak_rss_gb'] for x in rs):.2f} GB")
        prefill = [a["prefill_ms"] / b["prefill_ms"] for a, b in zip(runs[dtype], runs["fp32"])]
        decode = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(runs[dtype], runs["fp32"])]
        print(f"{dtype} / fp32: prefill time {statistics.median(prefill):.2f}x (rounds "
              f"{', '.join(f'{x:.2f}' for x in prefill)}), decode speed {statistics.median(decode):.2f}x (rounds "
              f"{', '.join(f'{x:.2f}' for x in decode)})")


def long_prompts(opts, sides: list[str]) -> None:
    """Time to first token and peak RSS above the weights for each prompt length, sides alternating."""
    for dtype in opts.dtypes.split(","):
        print(f"\n## {dtype}\n| prompt tokens | side | prefill s | time to first token s | peak RSS over weights GB |"
              "\n|---|---|---|---|---|")
        ratios = []
        for n in (int(x) for x in opts.long.split(",")):
            run = argparse.Namespace(**{**vars(opts), "prompt_len": n, "new_tokens": 2})
            results = {s: [] for s in sides}
            for r in range(opts.rounds):
                for side in sides if r % 2 == 0 else sides[::-1]:
                    results[side].append(run_child(side, run, dtype))
            for side in sides:
                rs = results[side]
                over = statistics.median(x["peak_rss_gb"] - x["weights_gb"] for x in rs)
                print(f"| {n} | {side} | {statistics.median(x['prefill_ms'] for x in rs) / 1e3:.1f} | "
                      f"{statistics.median(x['ttft_s'] for x in rs):.1f} | {over:.2f} |")
            if "transformers" in sides:
                ttft = statistics.median(a["ttft_s"] / b["ttft_s"] for a, b in zip(results["ours"],
                                                                                   results["transformers"]))
                mem = statistics.median((a["peak_rss_gb"] - a["weights_gb"]) / (b["peak_rss_gb"] - b["weights_gb"])
                                        for a, b in zip(results["ours"], results["transformers"]))
                ratios.append(f"{n} tokens: time to first token {ttft:.2f}x, memory over weights {mem:.2f}x")
        for line in ratios:
            print(f"ours / transformers, {line} (lower is better; median of {opts.rounds} rounds)")


if __name__ == "__main__":
    main()
