"""Language side of the two-process example: receives the encoder's embeddings
(resuming as often as needed) and checks them bit for bit.

    python examples/encoder.py  --endpoint tcp://127.0.0.1:17600     # first
    python examples/language.py --endpoint tcp://127.0.0.1:17600     # then, in another shell
"""

import argparse
import logging
import sys
import time
import zlib

import torch

from embresume import Config, LanguageEndpoint, PeerError

# must match examples/encoder.py
CONFIG = dict(hidden_size=1024, dtype="bf16", default_allocate_tokens=1024, cache_buffers=8)
ROOMS = ["image-0", "image-1", "video-2"]   # the language side does not know their sizes


def vision_tower(room: str, tokens: int):
    """The encoder's stand-in model, to check what arrived (same seed, same tensors)."""
    g = torch.Generator().manual_seed(zlib.crc32(room.encode()))
    embeddings = torch.randn(tokens, CONFIG["hidden_size"], generator=g).to(torch.bfloat16)
    fill_ids = torch.randint(0, 1 << 30, (tokens,), generator=g, dtype=torch.int32)
    mrope_positions = torch.randint(0, 1 << 20, (3, tokens), generator=g, dtype=torch.int32)
    return embeddings, fill_ids, mrope_positions, -(tokens // 7)


def connect_when_up(lang: LanguageEndpoint, seconds: float) -> bool:
    """The encoder may start after us: retry until it listens (False after ``seconds``)."""
    deadline = time.monotonic() + seconds
    said = False
    quiet = logging.getLogger("embresume.language")
    level = quiet.level
    quiet.setLevel(logging.ERROR)       # refused attempts are expected here: no warning for each
    try:
        while True:
            try:
                lang.connect()
                return True
            except PeerError:
                if time.monotonic() > deadline:
                    return False
                if not said:
                    print(f"language: waiting up to {seconds:g} s for the encoder at "
                          f"{lang.config.encoder_endpoint}", flush=True)
                    said = True
                time.sleep(0.5)
    finally:
        quiet.setLevel(level)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:17600", help="the encoder's address (tcp://host:port)")
    ap.add_argument("--wait", type=float, default=30, help="seconds to wait for the encoder to listen (default 30)")
    args = ap.parse_args()

    ok = True
    with LanguageEndpoint(Config(**CONFIG, encoder_endpoint=args.endpoint), connect=False) as lang:
        if not connect_when_up(lang, args.wait):
            print(f"language: no encoder listens at {args.endpoint} (start examples/encoder.py "
                  f"--endpoint {args.endpoint} first)", file=sys.stderr, flush=True)
            return 1
        for room in ROOMS:
            lang.request(room)                  # non-blocking: allocates 1024 tokens, asks the encoder
        for room in ROOMS:
            res = lang.recv(room, timeout=60)   # waits; raises TransferFailed / EmbResumeTimeout
            emb, fill_ids, mrope, delta = vision_tower(room, res.embeddings.shape[0])
            same = (torch.equal(res.embeddings.view(torch.int16), emb.view(torch.int16))   # bit for bit
                    and torch.equal(res.fill_ids, fill_ids) and torch.equal(res.mrope_positions, mrope)
                    and res.mrope_delta == delta)
            print(f"language: {room}: {res.embeddings.shape[0]} tokens, {res.resumes} resume(s), "
                  f"{'data verified' if same else 'DATA MISMATCH'}", flush=True)
            ok &= same
            res.release()                       # its memory serves the next request
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
