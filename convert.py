"""convert.py: turn any Llama 3 checkpoint into one safetensors file with Meta's names.

    python convert.py SRC DST [--dtype keep|bf16|fp32] [--force]

SRC is Meta's download (params.json + consolidated.00.pth ... NN.pth) or a
Hugging Face folder (config.json + *.safetensors). DST receives
model.safetensors, a params.json that states every number llama3.py needs
(the rope scaling factor included, so nothing is guessed at load time) and
SRC's tokenizer: tokenizer.model, else original/tokenizer.model, else
tokenizer.json, the file llama3.py would use. SRC may also be a Hugging Face
repo id or a Meta model id, found as llama3.py --ckpt finds them.
llama3.load_model(DST) loads the result.

It streams: shards are memory-mapped, each tensor is merged, cast and written
on its own, so peak memory is set by the largest tensor, not the model. A
70B (140 GB in bf16, shipped as 8 shards) converts on a 24 GB machine.

Split table (the same one llama3.py's loader uses, llama3.SHARD_DIM). Meta
trained with tensor parallelism and saved one slice per rank:
    concatenate on dim 0: wq, wk, wv, w1, w3, output, tok_embeddings (output features were split)
    concatenate on dim 1: wo, w2 (input features were split)
    replicated: attention_norm, ffn_norm, norm (the copies are checked to agree, and kept once)
Llama 2 split tok_embeddings along dim 1; Llama 3 splits it by vocabulary.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch loads ends quietly (exit 130), as in llama3.py
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
import torch

import llama3

# safetensors' names for the dtypes a Llama checkpoint holds.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
# Pages read through a memory map stay in our RSS until it is unmapped: remap after this many bytes.
REMAP_BYTES = 256 * 2**20


def fail(msg: str) -> None:
    print(f"convert.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes, for file.write.

    torch has no buffer protocol and .numpy() would add a dependency, so wrap
    the data pointer in a ctypes array. The caller keeps t alive while writing.
    """
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def plan(reader: llama3.CheckpointReader, dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple]]:
    """(name, output dtype, shape) of every tensor to write, in the model's order, checked against the config."""
    with torch.device("meta"), llama3.SkipInit():
        expected = reader.expected_tensors(llama3.Transformer(reader.args))  # a tied output is not written
    out = []
    for name, want in expected.items():
        stored = reader.dtype(name)
        if stored not in SAFETENSORS_DTYPES:
            raise llama3.CheckpointError(f"{reader.source(name)}: {name} has dtype {stored}; "
                                         "supported: float32, bfloat16, float16")
        out.append((name, dtype or stored, tuple(want.shape)))
    return out


def write_safetensors(reader: llama3.CheckpointReader, entries: list, file: Path,
                      log: Callable[[str], None] = print) -> int:
    """Write the tensors one by one: an 8-byte little-endian header length, a JSON
    header of names, dtypes, shapes and byte offsets, then the raw bytes in order.
    safetensors.torch.save_file needs every tensor in memory at once; this needs one."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        size = dtype.itemsize * (torch.Size(shape).numel())
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so the data starts 8-byte aligned
    since_remap = 0
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for i, (name, dtype, shape) in enumerate(entries, 1):
            t = reader.tensor(name)
            if tuple(t.shape) != shape:
                raise llama3.CheckpointError(f"{reader.source(name)}: {name} has shape {tuple(t.shape)}, not "
                                             f"{shape}: {llama3.config_hint(name, reader.args)}")
            if not bool(torch.isfinite(t).all()):  # a corrupt download: refuse, don't copy it on
                raise llama3.CheckpointError(f"{reader.source(name)}: {name} holds NaN or inf values; the file is "
                                             "corrupt (download it again)")
            t = t.to(dtype).contiguous()
            f.write(tensor_bytes(t))
            size = t.numel() * t.element_size()
            log(f"[{i:4d}/{len(entries)}] {name:<40} {list(shape)!s:<16} {str(dtype)[6:]:<9} {size / 2**20:9.1f} MiB")
            del t
            since_remap += size
            if since_remap > REMAP_BYTES:
                reader.reopen()
                since_remap = 0
    return offset


def verify(file: Path, entries: list) -> None:
    """Reopen the written file and check every name, shape and dtype against the plan."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        names = set(f.keys())
        if names != {name for name, _, _ in entries}:
            raise llama3.CheckpointError(f"{file}: written tensor names differ from the plan")
        for name, dtype, shape in entries:
            s = f.get_slice(name)
            if tuple(s.get_shape()) != shape or s.get_dtype() != SAFETENSORS_DTYPES[dtype]:
                raise llama3.CheckpointError(f"{file}: {name} was written as {s.get_dtype()} {s.get_shape()}")


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory, or None where the OS doesn't say (Windows has no resource)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def replace_together(files: dict[Path, Path | None], log: Callable[[str], None]) -> None:
    """Move each new file (a value) over its final path (the key), all or none.

    A None value removes a final path left from an earlier conversion, so DST never
    pairs a new model with an old tokenizer. The old files are first moved aside;
    if any step fails they are put back, so DST holds either the old set or the new.
    """
    aside = {final: final.with_name(f".{final.name}.old") for final in files if final.exists()}
    done = []
    try:
        for final, old in aside.items():
            final.replace(old)
        for final, new in files.items():
            if new is not None:
                new.replace(final)
                done.append(final)
    except BaseException:
        for final in done:
            final.unlink(missing_ok=True)
        for final, old in aside.items():
            if old.exists():
                old.replace(final)
        raise
    for final, old in aside.items():
        old.unlink()
        if files[final] is None:
            log(f"removed {final}, left by an earlier conversion (SRC has none)")


def params_json(args: llama3.ModelArgs) -> dict:
    """Every number llama3.py needs, so load_model guesses nothing (use_sdpa is a run-time choice)."""
    params = dataclasses.asdict(args)
    del params["use_sdpa"]
    params["hidden_dim"] = args.ffn_hidden_dim
    return params


def convert(src: str | Path, dst: str | Path, dtype: str = "keep", force: bool = False,
            log: Callable[[str], None] = print) -> dict:
    """Convert SRC into DST (see the module docstring). Returns a summary dict."""
    t0 = time.perf_counter()
    src, dst = llama3.resolve_checkpoint(str(src)), Path(dst)  # a folder, a repo id or a Meta model id
    out_dtype = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    reader = llama3.CheckpointReader(src)
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: DST must differ from SRC (SRC is never modified)")
    targets = [dst / "model.safetensors", dst / "params.json"]
    if not force and any(p.exists() for p in targets):
        raise FileExistsError(f"{dst} already holds a converted checkpoint; pass --force to overwrite it")
    entries = plan(reader, out_dtype)
    tokenizer = llama3.find_tokenizer(src)  # what llama3.py would use, under its own file name in DST
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst}: exists and is not a folder")
    made = not dst.exists()  # removed again if the conversion fails
    dst.mkdir(parents=True, exist_ok=True)
    tmp = {p: p.with_name(f".{p.name}.partial") for p in [*targets, dst / "tokenizer.model", dst / "tokenizer.json"]}
    try:
        nbytes = write_safetensors(reader, entries, tmp[dst / "model.safetensors"], log)
        verify(tmp[dst / "model.safetensors"], entries)
        tmp[dst / "params.json"].write_text(json.dumps(params_json(reader.args), indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp[dst / tokenizer.name])
        # Only once everything is written and checked, and as one set.
        replace_together({final: partial if partial.exists() else None for final, partial in tmp.items()}, log)
    finally:
        for partial in tmp.values():
            partial.unlink(missing_ok=True)
        if made and not any(dst.iterdir()):
            dst.rmdir()
    summary = {"tensors": len(entries), "bytes": nbytes, "seconds": time.perf_counter() - t0,
               "peak_rss_bytes": peak_rss_bytes()}
    peak = summary["peak_rss_bytes"]
    log(f"wrote {dst / 'model.safetensors'}: {summary['tensors']} tensors, {nbytes / 1e9:.2f} GB in "
        f"{summary['seconds']:.1f}s" + (f", peak RSS {peak / 1e9:.2f} GB" if peak is not None else "")
        + ("" if tokenizer else f"; no tokenizer in SRC ({', '.join(llama3.TOKENIZER_FILES)}): pass "
           "llama3.py --tokenizer PATH"))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="Meta download folder (params.json + consolidated.*.pth), Hugging Face folder, or a "
                   "name as llama3.py --ckpt takes it (Hugging Face repo id, Meta model id)")
    p.add_argument("dst", help="output folder: model.safetensors, params.json and SRC's tokenizer")
    p.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp32"], help="output dtype (default: keep)")
    p.add_argument("--force", action="store_true", help="overwrite an existing converted checkpoint in DST")
    p.error = fail
    opts = p.parse_args(argv)
    try:
        convert(opts.src, opts.dst, opts.dtype, opts.force)
    except (llama3.CheckpointError, ValueError, OSError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("convert.py: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # torch is loaded: Ctrl-C raises again
    main()
