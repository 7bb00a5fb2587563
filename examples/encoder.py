"""Encoder side of the two-process example: the vision tower's outputs, sent to
whichever language rank asks for them.

    python examples/encoder.py  --endpoint tcp://127.0.0.1:17600     # first
    python examples/language.py --endpoint tcp://127.0.0.1:17600     # then, in another shell

The language side pre-allocates only 1024 tokens per request, so the
3000- and 5000-token embeddings do not fit at first: each arrives in more than
one chunk, the language side asking for the rest (a resume).
"""

import argparse
import sys
import zlib

import torch

from embresume import Config, EncoderEndpoint, Status

# must match examples/language.py (the handshake checks hidden size, dtype and block size)
CONFIG = dict(hidden_size=1024, dtype="bf16", default_allocate_tokens=1024, cache_buffers=8)
REQUESTS = {"image-0": 3000, "image-1": 700, "video-2": 5000}   # room key -> embedding tokens


def vision_tower(room: str, tokens: int):
    """Stand-in for the model: deterministic from the room key, so the other side can check it."""
    g = torch.Generator().manual_seed(zlib.crc32(room.encode()))
    embeddings = torch.randn(tokens, CONFIG["hidden_size"], generator=g).to(torch.bfloat16)
    fill_ids = torch.randint(0, 1 << 30, (tokens,), generator=g, dtype=torch.int32)
    mrope_positions = torch.randint(0, 1 << 20, (3, tokens), generator=g, dtype=torch.int32)
    mrope_delta = -(tokens // 7)
    return embeddings, fill_ids, mrope_positions, mrope_delta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:17600", help="address to listen on (tcp://host:port)")
    args = ap.parse_args()

    failed = []

    def on_done(room, status: Status) -> None:       # called on an I/O thread of the endpoint
        print(f"encoder: {room} -> {status.name}", flush=True)
        if status is not Status.Success:
            failed.append(room)

    with EncoderEndpoint(Config(**CONFIG, encoder_endpoint=args.endpoint)) as enc:
        print(f"encoder listening at {enc.address}", flush=True)
        for room, tokens in REQUESTS.items():
            emb, fill_ids, mrope, delta = vision_tower(room, tokens)
            enc.send_tensors(room, emb, fill_ids, mrope, mrope_delta=delta, on_done=on_done)
        enc.drain(timeout=120)        # wait until every room was delivered (or failed) before closing
    print("encoder: done" if not failed else f"encoder: FAILED {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
