"""Build tiny-but-wide Qwen-VL checkpoints with random weights, offline: as wide
as real 7-8B models, so that an item has a real model's size, yet small enough
to run in vLLM's CPU build on 2 cores.

Run it with the engine's virtual environment, the ``.venv-vllm`` that
``tests/engine/setup_venv.sh`` builds (the project's own ``.venv`` has no
transformers):

    .venv-vllm/bin/python tests/engine/make_tiny_wide.py qwen2_5_vl OUT_DIR
    .venv-vllm/bin/python tests/engine/make_tiny_wide.py qwen3_vl OUT_DIR

- ``qwen2_5_vl``: Qwen2.5-VL layout, the LM as wide as Qwen2.5-VL-7B (hidden
  3584, 28 heads of 128, 4 KV heads) but 1 layer with an MLP of 256 and a
  vocabulary of 512; the vision tower (depth 2, width 64, patch 14, 2x2 merge)
  ends in a merger producing 3584-wide embeddings.
- ``qwen3_vl``: its DeepStack sibling in Qwen3-VL's layout, the LM as wide as
  Qwen3-VL-8B (hidden 4096, 32 heads of 128), 1 layer; the vision tower (depth
  3, width 64, patch 16) feeds DeepStack from all three blocks, so an item is
  4096 x (1 + 3) = 16384 wide, as vLLM measures it.

Both in bf16, processors taking up to 1344x1344 pixels: a 448x448 image is 256
tokens (2 MiB at 3584 in bf16) for Qwen2.5-VL, a 1344x1344 one 2304 tokens
(16 MiB); for Qwen3-VL (patch 16) 196 and 1764 tokens of 16384 (6 and 55 MiB).

``--small`` makes the same layouts narrow, for tests: the LM 128 wide (4 heads
of 32, 2 KV heads), fp32, processors taking up to 128x128 pixels (Qwen3-VL: a
128x128 image is 16 tokens, 64x64 is 4; each token 128 x (1 + 3) = 512 wide,
DeepStack levels included).

The tokenizer and chat template are those of ``make_tiny_qwen2vl.py``; the
weights come from ``torch.manual_seed(SEED)``: the same directory every run.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tiny_qwen2vl import CHAT_TEMPLATE, SEED, SPECIAL, VOCAB, build_tokenizer  # noqa: E402

MAX_PIXELS = 1344 * 1344
MIN_PIXELS = 56 * 56
KINDS = ("qwen2_5_vl", "qwen3_vl")
#: --small: (LM width, heads, KV heads, max pixels, dtype) instead of the real models' widths
SMALL = dict(hidden=128, heads=4, kv_heads=2, max_pixels=128 * 128, min_pixels=32 * 32, dtype="float32")
WIDE = None


def _ids(tok) -> dict:
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}


def _dtype() -> str:
    return SMALL["dtype"] if WIDE is False else "bfloat16"


def _text(ids: dict, **kw) -> dict:
    return dict(vocab_size=VOCAB, num_hidden_layers=1, intermediate_size=256, max_position_embeddings=4096,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False, torch_dtype=_dtype(), **kw)


def _tokens(ids: dict) -> dict:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False, torch_dtype=_dtype())


def _pixels() -> tuple[int, int]:
    return (SMALL["min_pixels"], SMALL["max_pixels"]) if WIDE is False else (MIN_PIXELS, MAX_PIXELS)


def _save(model, out: str, ids: dict) -> None:
    import torch
    with torch.no_grad():
        # random init at std 0.02 makes every logit nearly equal: widen it so that
        # greedy decoding depends strongly on the image (a swapped embedding shows)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(4.0)
    model.to(getattr(torch, _dtype())).save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                   "pad_token_id": ids["<|endoftext|>"], "do_sample": False}, f)


def build_qwen2_5_vl(out: str) -> None:
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    os.makedirs(out, exist_ok=True)
    tok = build_tokenizer(out)
    ids = _ids(tok)
    if WIDE is False:
        hidden, heads, kv_heads, mrope = SMALL["hidden"], SMALL["heads"], SMALL["kv_heads"], [4, 6, 6]
    else:
        hidden, heads, kv_heads, mrope = 3584, 28, 4, [16, 24, 24]
    config = Qwen2_5_VLConfig(
        text_config=_text(ids, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "mrope_section": mrope}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        **_tokens(ids))
    torch.manual_seed(SEED)
    _save(Qwen2_5_VLForConditionalGeneration(config).eval(), out, ids)
    lo, hi = _pixels()
    kw = dict(min_pixels=lo, max_pixels=hi, patch_size=14, merge_size=2, temporal_patch_size=2)
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok,
                        video_processor=Qwen2VLVideoProcessor(**kw), chat_template=CHAT_TEMPLATE).save_pretrained(out)


def build_qwen3_vl(out: str) -> None:
    import torch
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor)
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    os.makedirs(out, exist_ok=True)
    tok = build_tokenizer(out)
    ids = _ids(tok)
    if WIDE is False:    # head_dim 32: mrope sections sum to 16
        hidden, heads, kv_heads, head_dim, mrope = SMALL["hidden"], SMALL["heads"], SMALL["kv_heads"], 32, [6, 5, 5]
    else:
        hidden, heads, kv_heads, head_dim, mrope = 4096, 32, 4, 128, [24, 20, 20]
    config = Qwen3VLConfig(
        text_config=_text(ids, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          head_dim=head_dim,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "mrope_section": mrope, "mrope_interleaved": True}),
        vision_config=dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=2304, deepstack_visual_indexes=[0, 1, 2]),
        **_tokens(ids))
    torch.manual_seed(SEED)
    _save(Qwen3VLForConditionalGeneration(config).eval(), out, ids)
    lo, hi = _pixels()
    kw = dict(min_pixels=lo, max_pixels=hi, patch_size=16, merge_size=2, temporal_patch_size=2)
    image = Qwen2VLImageProcessor(**kw)
    video = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                     chat_template=CHAT_TEMPLATE).save_pretrained(out)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--small" in argv:
        argv.remove("--small")
        WIDE = False
    if len(argv) != 2 or argv[0] not in KINDS:
        sys.exit(f"usage: make_tiny_wide.py [--small] {{{'|'.join(KINDS)}}} OUT_DIR")
    {"qwen2_5_vl": build_qwen2_5_vl, "qwen3_vl": build_qwen3_vl}[argv[0]](argv[1])
    print(argv[1])
