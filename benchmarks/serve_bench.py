"""Time to first token of a follow-up chat turn over --serve, with prefix reuse against without; with --clients K,
K clients at once against one alone (continuous batching) (run by hand).

    python benchmarks/serve_bench.py [--ckpt-dir DIR] [--history 2000] [--rounds 5] [--dtype bf16] [--threads N]
    python benchmarks/serve_bench.py --clients 4 [--new-tokens 32] [--rounds 3]
    python benchmarks/serve_bench.py --long-prompt 2000 [--rounds 3]

Starts `llama3.py --serve 127.0.0.1:0` on a random checkpoint in Llama 3.2 1B shape
(bench.py's make_checkpoint, made once in --ckpt-dir or a temporary folder; Meta's
tokenizer.model from llama-models) and sends a conversation of about --history
tokens, as a chat client does: the whole history every turn. Each round times two
follow-up turns (a short assistant answer and a new user message appended), each
asked for one token, so its time is the prefill of what the server feeds plus one
request's overhead:
  reuse:    the follow-up right after the turn before it: the server's kept cache
            holds the history, and it feeds only the new tokens;
  no reuse: the same follow-up with a seed, which the server feeds whole, as it would
            be alone, so the whole history is fed again.
Prints the CPU, each side's median and the ratio. With --clients K, each round times
(alternating which goes first) one client's completion of --new-tokens tokens alone,
and K clients' completions sent at once: generated tokens per second, the K clients'
summed against the one's; then the time to first token of a request that joins K - 1
running ones, against alone. With --long-prompt N, each round streams one long answer
and, once it runs, sends a prompt of about N tokens, then half a second later a short
request: the longest gap between the stream's tokens while the long prompt goes in
(against its median gap before), and the short request's time to first token.
Standard library on the client side.
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
    p.add_argument("--clients", type=int, default=None, help="K clients at once against one (batching)")
    p.add_argument("--new-tokens", type=int, default=32, help="with --clients: tokens each client asks for")
    p.add_argument("--long-prompt", type=int, default=None, help="a prompt of about N tokens joins a running stream")
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
        if opts.clients:
            batching(url, opts, ckpt)
            return
        if opts.long_prompt:
            long_prompt(url, opts, ckpt)
            return
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
            seconds, _ = post(f"{url}/chat/completions", {**ask, "messages": follow_up, "seed": i})  # fed whole
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


def first_chunk(url: str, body: dict) -> float:
    """Seconds until the first event of a streamed completion; the rest is read and dropped."""
    data = json.dumps({**body, "stream": True}).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as r:
        r.readline()
        seconds = time.perf_counter() - t0
        r.read()
    return seconds


def batching(url: str, opts: argparse.Namespace, ckpt: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    k = opts.clients
    ask = {"model": "bench", "temperature": 0, "max_tokens": opts.new_tokens, "stop": []}
    post(f"{url}/completions", {**ask, "prompt": "Warm up", "max_tokens": 4})
    print(f"# {cpu_name()}; {ckpt.name}, {opts.dtype}, {opts.threads} threads; {k} clients, {opts.new_tokens} new "
          "tokens each", flush=True)

    def one(i: int) -> int:
        _, answer = post(f"{url}/completions", {**ask, "prompt": f"Client {i} asks about the weather in city {i}."})
        return answer["usage"]["completion_tokens"]

    alone, together, ratios = [], [], []
    with ThreadPoolExecutor(k) as pool:
        for r in range(opts.rounds):
            for side in (("alone", "together") if r % 2 == 0 else ("together", "alone")):
                t0 = time.perf_counter()
                tokens = one(0) if side == "alone" else sum(pool.map(one, range(k)))
                rate = tokens / (time.perf_counter() - t0)
                (alone if side == "alone" else together).append(rate)
            ratios.append(together[-1] / alone[-1])
            print(f"round {r + 1}: one client {alone[-1]:.2f} tok/s, {k} clients {together[-1]:.2f} tok/s together, "
                  f"{ratios[-1]:.2f}x", flush=True)
        print(f"median of {opts.rounds}: one {statistics.median(alone):.2f} tok/s, {k} together "
              f"{statistics.median(together):.2f} tok/s, ratio {statistics.median(ratios):.2f}x", flush=True)
        joined, lone = [], []
        long = {**ask, "max_tokens": 4 * opts.new_tokens}
        for r in range(opts.rounds):
            lone.append(first_chunk(f"{url}/completions", {**ask, "prompt": "A short question."}))
            running = [pool.submit(post, f"{url}/completions", {**long, "prompt": f"Long answer {i}."})
                       for i in range(k - 1)]
            time.sleep(2.0)  # the others are decoding
            joined.append(first_chunk(f"{url}/completions", {**ask, "prompt": "A short question."}))
            for f in running:
                f.result()
            print(f"round {r + 1}: time to first token alone {lone[-1]:.3f} s, joining {k - 1} running "
                  f"{joined[-1]:.3f} s", flush=True)
        print(f"time to first token, median: alone {statistics.median(lone):.3f} s, joining a running batch "
              f"{statistics.median(joined):.3f} s")


def long_prompt(url: str, opts: argparse.Namespace, ckpt: Path) -> None:
    post(f"{url}/completions", {"model": "bench", "prompt": "Warm up", "max_tokens": 4})
    print(f"# {cpu_name()}; {ckpt.name}, {opts.dtype}, {opts.threads} threads; a prompt of about "
          f"{opts.long_prompt} tokens joins a running stream", flush=True)
    for r in range(opts.rounds):
        words = " ".join(m["content"] for m in conversation(opts.long_prompt, seed=r + 1)[1:])  # no prefix kept
        tokens, seconds, gap, before, short = join_round(url, words, r)
        print(f"round {r + 1}: prompt of {tokens} tokens answered in {seconds:.2f} s; the running stream's longest "
              f"gap meanwhile {gap:.2f} s (median gap before {before:.3f} s); a short request sent 0.5 s after "
              f"it: first token in {short:.2f} s", flush=True)


def join_round(url: str, words: str, r: int) -> tuple[int, float, float, float, float]:
    """One stream running, a long prompt joining, a short request after it -> (the long prompt's tokens, its time,
    the stream's longest gap meanwhile, its median gap before, the short request's time to first token)."""
    import itertools
    import threading

    times, done, joined = [], threading.Event(), [0.0, float("inf")]  # when the long prompt was sent, answered
    data = json.dumps({"model": "bench", "prompt": f"Story {r}.", "max_tokens": 10_000, "temperature": 0,
                       "stop": [], "stream": True}).encode()
    request = urllib.request.Request(f"{url}/completions", data=data, headers={"Content-Type": "application/json"})

    def stream() -> None:
        with urllib.request.urlopen(request, timeout=600) as answer:
            for line in answer:
                if line.startswith(b"data: {"):
                    times.append(time.perf_counter())
                if done.is_set() and len(times) > 2 and times[-2] > joined[1]:
                    return  # closing the connection ends the generation

    reader = threading.Thread(target=stream)
    reader.start()
    while len(times) < 6:
        time.sleep(0.05)
    short = []
    asker = threading.Thread(target=lambda: time.sleep(0.5) or short.append(first_chunk(
        f"{url}/completions", {"model": "bench", "prompt": "A short question.", "max_tokens": 1})))
    joined[0] = time.perf_counter()
    asker.start()
    seconds, answer = post(f"{url}/completions", {"model": "bench", "prompt": words, "max_tokens": 1})
    joined[1] = time.perf_counter()
    done.set()
    asker.join()
    reader.join()
    gaps = list(itertools.pairwise(times))
    before = [b - a for a, b in gaps if b < joined[0]]
    during = [b - a for a, b in gaps if b > joined[0] and a < joined[1]]
    return answer["usage"]["prompt_tokens"], seconds, max(during), statistics.median(before), short[0]

if __name__ == "__main__":
    main()
