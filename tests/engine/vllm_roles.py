"""One vLLM instance in one role, driven through vLLM's own entry points.

Run with the engine's interpreter (see tests/engine/setup_venv.sh):

    python tests/engine/vllm_roles.py ROLE --model DIR --images SPEC --out FILE [options]

ROLE is one of
  reference   a single instance: encoder and language model together;
  producer    an EC producer (``ec_role: ec_producer``, encoder only) with the
              connector ``--connector``; it encodes the images (vLLM's
              ``LLM.generate``), prints ``READY`` and keeps serving consumers
              until its standard input closes;
  consumer    an EC consumer (``ec_role: ec_consumer``) that asks the producer
              at ``--encoder`` for every image's embedding.

``--images`` is a comma-separated list of ``SIZE:SEED`` (a SIZExSIZE RGB image
of seeded noise).  The out file gets the greedy tokens per image, timings
and, for the connector's instances, the embresume counters read from vLLM's
Prometheus metrics (``vllm:embresume_ec_*``).  Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# worker_counters sends a function to the workers (LLM.collective_rpc): vLLM's engine core
# unpickles it only with this set (a test helper on one host, nothing else listens)
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
          "Describe this image.<|im_end|>\n<|im_start|>assistant\n")

CONNECTORS = {
    "embresume": ("EmbresumeECConnector", "embresume.integrations.vllm"),
    # the test's swapped-payload producer (tests/engine/swap_connector.py)
    "embresume-swap": ("SwappingECConnector", "swap_connector"),
    # vLLM's own disk connector, the control and the benchmark's baseline
    "example": ("ECExampleConnector", None),
}


def images(spec: str):
    import numpy as np
    from PIL import Image

    out = []
    for part in spec.split(","):
        size, seed = (int(x) for x in part.split(":"))
        rng = np.random.RandomState(seed)
        out.append(Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)))
    return out


def data_url(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_message(image) -> dict:
    """The OpenAI-format user message the server test sends for ``image``."""
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                        {"type": "text", "text": "Describe this image."}]}


def ec_config(args) -> dict:
    name, module = CONNECTORS[args.connector]
    cfg = {"ec_connector": name, "ec_role": "ec_producer" if args.role == "producer" else "ec_consumer"}
    if module:
        cfg["ec_connector_module_path"] = module
    extra = json.loads(args.extra) if args.extra else {}
    if args.connector.startswith("embresume"):
        if args.role == "producer":
            extra.setdefault("encoder_address", args.encoder)
        else:
            extra.setdefault("encoder_addresses", [args.encoder])
    else:
        extra.setdefault("shared_storage_path", args.storage)
    cfg["ec_connector_extra_config"] = extra
    return cfg


def embresume_counters(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        name = getattr(m, "name", "")
        if name == "vllm:embresume_ec_transfer_seconds":
            out["transfer_seconds"] = {"count": int(getattr(m, "count", 0)), "sum": float(getattr(m, "sum", 0.0)),
                                       "buckets": dict(getattr(m, "buckets", {}) or {})}
        elif name.startswith("vllm:embresume_ec_"):
            key = name[len("vllm:embresume_ec_"):]
            if key.endswith("_total"):
                key = key[:-len("_total")]
            out[key] = out.get(key, 0) + int(getattr(m, "value", 0))
    return out


def _connector_totals(worker) -> dict:
    """Runs in each worker process: its EC connector's totals since start."""
    from vllm.distributed.ec_transfer import ec_transfer_state
    ec = getattr(ec_transfer_state, "_EC_CONNECTOR_AGENT", None)
    return dict(getattr(ec, "stats", None) or {})


def worker_counters(llm) -> dict:
    """The worker-side connectors' totals, summed over workers, asked of the workers
    themselves: vLLM's V1 runner never collects worker-side connector stats, so counters
    kept there (the producer's items_published / items_not_published, the consumer's
    items_loaded) are not in get_metrics()."""
    out: dict = {}
    for totals in llm.collective_rpc(_connector_totals, timeout=60):
        for k, v in (totals or {}).items():
            out[k] = out.get(k, 0) + int(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["reference", "producer", "consumer"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--connector", default="embresume", choices=sorted(CONNECTORS))
    ap.add_argument("--encoder", default="tcp://127.0.0.1:17600")
    ap.add_argument("--storage", default="")
    ap.add_argument("--extra", default="")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--batch", action="store_true", help="submit every image at once (default: one by one)")
    ap.add_argument("--concurrency", type=int, default=0,
                    help="submit the images in groups of N at once (0: one by one, or all with --batch)")
    ap.add_argument("--throughput", default="",
                    help="after the images, for each 'N=SPEC' (';'-separated) submit SPEC's images at once, "
                         "N at a time, and report images per second (the producer encodes them with the rest)")
    ap.add_argument("--stepwise", action="store_true",
                    help="reference/consumer: print READY once up, then make each request (each image, "
                         "each throughput set) only when a line arrives on stdin, and print 'STEP <k>' after it "
                         "(a driver interleaves several instances request by request)")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chat", type=int, default=0,
                    help="also answer the first N images through LLM.chat (the server's prompt format)")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    kw = dict(model=args.model, enforce_eager=True, max_model_len=args.max_model_len, dtype=args.dtype,
              limit_mm_per_prompt={"image": 1, "video": 0}, disable_log_stats=False, seed=0)
    if args.role != "reference":
        kw["ec_transfer_config"] = ec_config(args)
    t0 = time.monotonic()
    llm = LLM(**kw)
    started = time.monotonic() - t0
    params = SamplingParams(max_tokens=1 if args.role == "producer" else args.max_tokens, temperature=0.0)
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images(args.images)]
    tokens, latency, transfer = [], [], []
    stepwise = args.stepwise and args.role != "producer"
    steps = iter(range(1 << 30))

    def go() -> None:
        if stepwise and not sys.stdin.readline():
            raise SystemExit("stepwise: the driver closed our standard input")

    def done() -> None:
        if stepwise:
            print(f"STEP {next(steps)}", flush=True)

    if stepwise:
        print("READY", flush=True)
    group = len(prompts) if args.batch else args.concurrency
    if group > 0:
        # groups of `group` requests at once: each request's latency is its group's time
        for i in range(0, len(prompts), group):
            t = time.monotonic()
            outs = llm.generate(prompts[i:i + group], params, use_tqdm=False)
            latency += [time.monotonic() - t] * len(outs)
            tokens += [list(o.outputs[0].token_ids) for o in outs]
    else:
        # one by one; an embresume consumer also records each item's transfer time (request to
        # landed), from the change of vLLM's transfer histogram across the request
        per_item = args.role == "consumer" and args.connector.startswith("embresume")
        seen = (0, 0.0)
        for p in prompts:
            go()
            t = time.monotonic()
            o = llm.generate([p], params, use_tqdm=False)[0]
            latency.append(time.monotonic() - t)
            tokens.append(list(o.outputs[0].token_ids))
            if per_item:
                h = embresume_counters(llm).get("transfer_seconds") or {}
                now = (int(h.get("count", 0)), float(h.get("sum", 0.0)))
                transfer.append(now[1] - seen[1] if now[0] == seen[0] + 1 else None)
                seen = now
            done()
    # throughput: each set submitted N requests at a time (vLLM batches what its budget allows)
    passes = [(int(n), spec) for n, spec in (part.split("=", 1) for part in args.throughput.split(";") if part)]
    throughput = []
    for n, spec in passes:
        batch = [{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images(spec)]
        if args.role == "producer":
            llm.generate(batch, params, use_tqdm=False)
            continue
        go()
        t = time.monotonic()
        got = []
        for i in range(0, len(batch), n):
            got += [list(o.outputs[0].token_ids) for o in llm.generate(batch[i:i + n], params, use_tqdm=False)]
        wall = time.monotonic() - t
        done()
        throughput.append({"concurrency": n, "images": len(batch), "seconds": wall,
                           "images_per_s": len(batch) / wall, "tokens": got})
    chat = []
    for im in images(args.images)[:args.chat]:
        o = llm.chat([chat_message(im)], params, use_tqdm=False)[0]
        chat.append(o.outputs[0].text)
    result = {"chat_text": chat, "role": args.role, "connector": args.connector, "tokens": tokens, "latency_s": latency,
              "start_s": started, "throughput": throughput, "transfer_s": transfer}
    if args.role == "producer":
        print("READY", flush=True)
        # keep serving consumers until the test closes our standard input (bounded by the test)
        sys.stdin.read()
    time.sleep(0.2)
    try:
        result["embresume"] = embresume_counters(llm)
    except Exception as e:            # the counters are the proof: report why they are missing
        result["embresume_error"] = f"{type(e).__name__}: {e}"
    if args.connector.startswith("embresume"):
        try:
            result["embresume_workers"] = worker_counters(llm)
        except Exception as e:
            result["embresume_workers_error"] = f"{type(e).__name__}: {e}"
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if k != "latency_s"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
