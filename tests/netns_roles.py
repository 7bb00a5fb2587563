"""The two roles of the two-host test, each run inside its own network namespace.

    python tests/netns_roles.py encoder ENDPOINT SPEC_JSON
    python tests/netns_roles.py language ENDPOINT SPEC_JSON

SPEC_JSON: {"hidden": .., "rooms": [[room, tokens], ...], "pool_blocks": .., "timeout": ..}
Each prints one JSON line with its outcome and exits 0 on success.
"""

import json
import sys
import threading
import time


def main() -> int:
    role, endpoint, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    from embresume import Config, EncoderEndpoint, LanguageEndpoint, Status
    from embresume.synthetic import SyntheticData

    cfg = Config(hidden_size=spec["hidden"], dtype="bf16", default_allocate_tokens=1024,
                 pool_blocks=spec["pool_blocks"], encoder_endpoint=endpoint, transport="auto", prefault=False,
                 heartbeat_interval=0.2, peer_timeout=3.0, request_timeout=spec["timeout"],
                 auth_key="two-host test secret, not for production")   # a non-loopback bind needs one
    rooms = [tuple(x) for x in spec["rooms"]]
    data = SyntheticData(spec["hidden"], "bf16", max(t for _, t in rooms), seed=3)
    deadline = time.monotonic() + spec["timeout"]
    if role == "encoder":
        done = {}
        ev = threading.Event()

        def on_done(room, st):
            done[room] = st.name
            if len(done) == len(rooms):
                ev.set()

        with EncoderEndpoint(cfg, bind=endpoint.replace("tcp://", "tcp://")) as enc:
            for room, tokens in rooms:
                e, f, m, d = data.sample(room, tokens)
                enc.send_tensors(room, e, f, m, d, on_done=on_done)
            ev.wait(max(0.1, deadline - time.monotonic()))
            out = {"role": role, "done": done, "peers": enc.peers()}
        print(json.dumps(out), flush=True)
        return 0 if len(done) == len(rooms) and all(v == "Success" for v in done.values()) else 1
    # language
    t0 = time.monotonic()
    while True:   # the encoder namespace may still be starting
        try:
            lang = LanguageEndpoint(cfg)
            break
        except Exception as e:
            if time.monotonic() - t0 > 20:
                print(json.dumps({"role": role, "error": f"connect: {e}"}), flush=True)
                return 1
            time.sleep(0.2)
    results = {}
    with lang:
        for room, _ in rooms:
            lang.request(room)
        for room, tokens in rooms:
            st = lang.wait(room, max(0.1, deadline - time.monotonic()))
            if st is Status.Success:
                r = lang.result(room)
                results[room] = {"ok": r.total_tokens == tokens and data.verify(room, r), "chunks": r.chunks}
            else:
                results[room] = {"ok": False, "status": st.name, "reason": lang.failure_reason(room)}
        out = {"role": role, "transport": lang.transport_name, "results": results,
               "free_blocks": lang.allocator.free_blocks, "pool_blocks": lang.layout.num_blocks}
    print(json.dumps(out), flush=True)
    return 0 if all(v["ok"] for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
