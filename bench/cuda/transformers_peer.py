#!/usr/bin/env python3
"""The peer of dsv3_bench_cuda: Hugging Face transformers running the same checkpoint on the same GPU
(issue 6, item 4: "next to transformers on the same model where it runs"). Prints markdown rows in the
shape of dsv3_bench_cuda's, so a run script can put both side by side:

    python3 bench/cuda/transformers_peer.py --model DIR --label lite-bf16 --batch 1,8 --context 1024 \
        --decode-tokens 16 --prefill 1024,8192

Decode: B sequences of --context random prompt tokens are prefilled (untimed), then --decode-tokens greedy
steps run one token per sequence per step through the model's KV cache; tok/s = B x steps / seconds.
Prefill: one prompt of S tokens through the model without a cache, only the last position's logits
computed; tok/s = S / seconds (best of 2 after a warm-up). The model loads in its checkpoint dtype:
BF16 natively; FP8 (DeepSeek's block-scaled e4m3, quantization_config) through transformers' own
fine-grained FP8 support where this transformers/torch has it. A case that fails (unsupported dtype,
out of memory) prints one `| label | ... | skipped: reason |` row instead of stopping the run.
"""
import argparse
import time

import torch
import transformers


def ints(text):
    return [int(v) for v in text.split(",") if v]


def sync_time():
    torch.cuda.synchronize()
    return time.perf_counter()


def load(model_dir):
    # sdpa where the architecture supports it (the fast path a transformers user gets), else eager.
    for attn in ("sdpa", "eager"):
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir, dtype="auto", device_map="cuda", attn_implementation=attn)
            return model.eval(), attn
        except (ValueError, ImportError) as e:
            last = e
    raise last


@torch.inference_mode()
def decode_rate(model, vocab, batch, context, steps, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, context), device="cuda", generator=g)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    # One untimed step first: lazy allocations and kernel selection happen there.
    out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = sync_time()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    dt = sync_time() - t0
    return batch * steps / dt, dt / steps


@torch.inference_mode()
def prefill_rate(model, vocab, tokens, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(2, vocab, (1, tokens), device="cuda", generator=g)
    model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up
    best = None
    for _ in range(2):
        t0 = sync_time()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        dt = sync_time() - t0
        best = dt if best is None else min(best, dt)
    return tokens / best, best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--label", default="model")
    ap.add_argument("--batch", type=ints, default=[1])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--prefill", type=ints, default=[])
    args = ap.parse_args()

    card = torch.cuda.get_device_name()
    label = f"{args.label} (transformers {transformers.__version__})"
    try:
        t0 = time.perf_counter()
        model, attn = load(args.model)
        print(f"loaded {args.model} in {time.perf_counter() - t0:.0f} s, attention {attn}, "
              f"weights {torch.cuda.memory_allocated() / 1e9:.1f} GB on {card}", flush=True)
    except Exception as e:  # noqa: BLE001 - any load failure is a finding to print, not a crash
        print(f"| {label} | {card} | load | skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]} |")
        return
    vocab = model.config.vocab_size
    for b in args.batch:
        try:
            rate, step = decode_rate(model, vocab, b, args.context, args.decode_tokens, seed=b)
            print(f"| {label} | {card} | batch {b}, ctx {args.context} | {rate:.1f} tok/s ({step * 1e3:.3f} ms/step) |",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"| {label} | {card} | batch {b}, ctx {args.context} | skipped: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]} |", flush=True)
        torch.cuda.empty_cache()
    for s in args.prefill:
        try:
            rate, dt = prefill_rate(model, vocab, s, seed=s)
            print(f"| {label} | {card} | prefill {s} | {rate:.1f} tok/s ({dt * 1e3:.1f} ms) |", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"| {label} | {card} | prefill {s} | skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]} |",
                  flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
