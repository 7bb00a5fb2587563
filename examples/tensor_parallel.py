"""Tensor parallelism: one encoder, two language ranks, each rank receiving a
full copy of every embedding (``required_dst_info_num=2``).

    python examples/tensor_parallel.py

Runs the three roles as processes (multiprocessing 'spawn'); each rank
pre-allocates 1024 tokens per request, so the 3000- and 5000-token embeddings
need a resume, and checks every tensor bit for bit.
"""

import multiprocessing as mp
import sys
import zlib

import torch

from embresume import Config, EncoderEndpoint, LanguageEndpoint
from embresume.harness import free_port
from embresume.procutil import die_with_parent

CONFIG = dict(hidden_size=1024, dtype="bf16", default_allocate_tokens=1024, cache_buffers=8)
REQUESTS = {"image-0": 3000, "image-1": 700, "video-2": 5000}   # room key -> embedding tokens
RANKS = 2


def vision_tower(room: str, tokens: int):
    """Stand-in for the model: deterministic from the room key, so the ranks can check it."""
    g = torch.Generator().manual_seed(zlib.crc32(room.encode()))
    embeddings = torch.randn(tokens, CONFIG["hidden_size"], generator=g).to(torch.bfloat16)
    fill_ids = torch.randint(0, 1 << 30, (tokens,), generator=g, dtype=torch.int32)
    mrope_positions = torch.randint(0, 1 << 20, (3, tokens), generator=g, dtype=torch.int32)
    return embeddings, fill_ids, mrope_positions, -(tokens // 7)


def encoder(address: str, listening) -> None:
    die_with_parent()                                  # no orphan if the launcher is killed
    with EncoderEndpoint(Config(**CONFIG, encoder_endpoint=address)) as enc:
        listening.set()
        for room, tokens in REQUESTS.items():
            emb, fill_ids, mrope, delta = vision_tower(room, tokens)
            enc.send_tensors(room, emb, fill_ids, mrope, mrope_delta=delta)
        enc.drain(timeout=120)                         # delivered to both ranks before closing
    print("encoder: every room delivered to both ranks", flush=True)


def language_rank(rank: int, address: str, listening) -> None:
    die_with_parent()
    listening.wait(60)
    bad = 0
    with LanguageEndpoint(Config(**CONFIG, encoder_endpoint=address), tp_rank=rank) as lang:
        for room in REQUESTS:                          # every rank requests the rooms in the same order
            lang.request(room, required_dst_info_num=RANKS)
        for room in REQUESTS:
            res = lang.recv(room, timeout=60, required_dst_info_num=RANKS)
            emb, fill_ids, mrope, delta = vision_tower(room, res.embeddings.shape[0])
            same = (torch.equal(res.embeddings.view(torch.int16), emb.view(torch.int16))   # bit for bit
                    and torch.equal(res.fill_ids, fill_ids) and torch.equal(res.mrope_positions, mrope)
                    and res.mrope_delta == delta)
            print(f"rank {rank}: {room}: {res.embeddings.shape[0]} tokens, {res.resumes} resume(s), "
                  f"{'data verified' if same else 'DATA MISMATCH'}", flush=True)
            bad += not same
            res.release()
    sys.exit(1 if bad else 0)


def main() -> int:
    ctx = mp.get_context("spawn")
    address = f"tcp://127.0.0.1:{free_port()}"
    listening = ctx.Event()
    procs = [ctx.Process(target=encoder, args=(address, listening), name="encoder")]
    procs += [ctx.Process(target=language_rank, args=(r, address, listening), name=f"rank-{r}")
              for r in range(RANKS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    codes = {p.name: p.exitcode for p in procs}
    for p in procs:                                    # never leave a process behind
        if p.is_alive():
            p.kill()
            p.join(5)
    ok = all(c == 0 for c in codes.values())
    print("tensor parallel: OK" if ok else f"tensor parallel: FAILED {codes}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
