"""Time to first token of a follow-up chat turn over --serve, with prefix reuse against without (run by hand).

    python benchmarks/serve_bench.py [--ckpt-dir DIR] [--history 2000] [--rounds 5] [--dtype bf16] [--threads N]

Starts `llama3.py --serve 127.0.0.1:0` on a random checkpoint in Llama 3.2 1B shape
(bench.py's make_checkpoint, made once in --ckpt-dir or a temporary folder; Meta's
tokenizer.model from llama-models) and sends a conversation of about --history
tokens, as a chat client does: the whole history every turn. Each round times two
follow-up turns (a short assistant answer and a new user message appended), each
asked for one token, so its time is the prefill of what the server feeds plus one
request's overhead:
  reuse:    the follow-up right after the turn before it: the server's kept cache
            holds the history, and it feeds only the new tokens;
  no reuse: the same follow-up after an unrelated request replaced the kept cache
            (it shares only <|begin_of_text|>), so the whole history is fed again.
Prints the CPU, each side's median and the ratio. Standard library on the client side.
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return f"{found.group(1) if found else 'unknown CPU'}, {os.cpu_count()} cores"


def post(url: str, body: dict) -> tuple[float, dict]:
    """POST body as JSON -> (seconds until the whole answer arrived, the answer)."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as r:
        answer = json.loads(r.read())
    return time.perf_counter() - t0, answer


def conversation(n_tokens: int, seed: int) -> list[dict]:
    """User and assistant turns of random words, about n_tokens in all (a word is about 1.17 tokens here)."""
    rng = random.Random(seed)
    words = re.findall(r"\w+", "the model reads every weight once per token so decoding speed follows memory "
                       "bandwidth while prefill is a matrix product that runs near the peak of the machine")
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    while sum(len(m["content"].split()) for m in messages) * 1.17 < n_tokens:
        role = "user" if messages[-1]["role"] != "user" else "assistant"
        messages.append({"role": role, "content": " ".join(rng.choice(words) for _ in range(60))})
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "Go on."})
    return messages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt-dir", type=Path, default=None, help="where the random 1B checkpoint lives (kept)")
    p.add_argument("--ckpt", type=Path, default=None, help="serve this checkpoint instead (a smoke run: tiny)")
    p.add_argument("--history", type=int, default=2000, help="tokens of conversation before the follow-up")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    opts = p.parse_args()
    import llama_models

    tokenizer = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    tmp = None
    ckpt = opts.ckpt
    if ckpt is None:
        from bench import make_checkpoint

        if opts.ckpt_dir is None:
            tmp = tempfile.TemporaryDirectory()
            opts.ckpt_dir = Path(tmp.name) / "llama-3.2-1b-random"
        make_checkpoint(opts.ckpt_dir)
        ckpt = opts.ckpt_dir
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads)}
    server = subprocess.Popen([sys.executable, str(ROOT / "llama3.py"), "--ckpt", str(ckpt), "--tokenizer",
                               str(tokenizer), "--dtype", opts.dtype, "--serve", "127.0.0.1:0"],
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        url = None
        for _ in range(50):  # the lines before the address: loading, notes
            line = server.stderr.readline()
            found = re.search(r"http://\S+/v1", line)
            if found:
                url = found.group(0)
                break
        if url is None:
            sys.exit(f"the server did not start: {line}")
        history = conversation(opts.history, seed=0)
        ask = {"model": "bench", "temperature": 0, "max_tokens": 1}
        _, first = post(f"{url}/chat/completions", {**ask, "messages": history})  # also warms up
        print(f"# {cpu_name()}; {ckpt.name}, {opts.dtype}, {opts.threads} threads; history "
              f"{first['usage']['prompt_tokens']} tokens", flush=True)
        reuse, fresh = [], []
        for i in range(opts.rounds):
            follow_up = [*history, {"role": "assistant", "content": f"Answer number {i}."},
                         {"role": "user", "content": f"And what about question {i + 1}?"}]
            post(f"{url}/chat/completions", {**ask, "messages": history})  # the kept cache: this history
            seconds, answer = post(f"{url}/chat/completions", {**ask, "messages": follow_up})
            reuse.append(seconds)
            post(f"{url}/completions", {**ask, "prompt": f"Something else entirely, {i}."})  # replaces it
            seconds, _ = post(f"{url}/chat/completions", {**ask, "messages": follow_up})
            fresh.append(seconds)
            print(f"round {i + 1}: follow-up of {answer['usage']['prompt_tokens']} tokens: reuse {reuse[-1]:.3f} s, "
                  f"no reuse {fresh[-1]:.3f} s", flush=True)
        print(f"time to first token, median of {opts.rounds}: reuse {statistics.median(reuse):.3f} s, no reuse "
              f"{statistics.median(fresh):.3f} s, ratio {statistics.median(fresh) / statistics.median(reuse):.1f}x")
    finally:
        server.terminate()
        server.wait(timeout=60)
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
