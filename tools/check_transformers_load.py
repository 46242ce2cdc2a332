#!/usr/bin/env python3
"""Loads a dsv3 checkpoint (config.json + model.safetensors, Hugging Face layout) with transformers'
DeepseekV3ForCausalLM and compares its logits with `dsv3 logits` on the same token ids (issue 5: our
checkpoints are ones "that dsv3 logits and transformers both load"). Run where transformers is installed
(the GPU machine's python3), with a dsv3 binary built for that machine:

    python3 tools/check_transformers_load.py --model models/default --dsv3 .devbin/dsv3 [--json OUT.json]

FP8 checkpoints (`dsv3 quantize`: e4m3 weights with 128x128 `weight_scale_inv` blocks) are dequantized
here to float32 (w = fp8 * scale of its block) rather than through transformers' FP8 loader, whose
kernels also quantize the activations: the comparison is then of the same weights in float32 on both
sides. The MTP layer (layer `num_hidden_layers`) is not part of DeepseekV3ForCausalLM and is left out.
Prompts are token ids: `--prompts` text encoded with the model's tokenizer.json (BOS first) when it has
one, else bytes. The model runs in float32 with eager attention, on CUDA when available.

Per prompt it prints the max |logit difference| relative to the largest |logit| of that prompt (the "max
relative error"), the relative L2 error, and whether every position's argmax agrees. Exits 1 when a
parameter is missing in the load, or when the max relative error exceeds --tol (default 1e-3).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

PROMPTS = [
    "What is the capital of Peru?",
    'What does "canine" mean?',
    "The Devil's Dictionary defines a bore as a person who talks when you wish him to listen.",
    "def add(a, b):\n    return a + b\n",
]


def dequantized_checkpoint(src, dst):
    """Writes src as a float32 checkpoint without quantization_config or the MTP layer into dst."""
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    quant = cfg.pop("quantization_config", None)
    block = quant["weight_block_size"] if quant else None
    tensors = load_file(os.path.join(src, "model.safetensors"))
    mtp_prefix = f"model.layers.{cfg['num_hidden_layers']}."
    out, dequantized = {}, 0
    for name, t in tensors.items():
        if name.startswith(mtp_prefix) or name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = tensors[name + "_scale_inv"].float()
            s = scale.repeat_interleave(block[0], 0)[: t.shape[0]].repeat_interleave(block[1], 1)[:, : t.shape[1]]
            out[name] = (t.float() * s).contiguous()
            dequantized += 1
        else:
            out[name] = t.float().contiguous()
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return cfg, dequantized, len(out)


def prompt_ids(model_dir, cfg):
    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(path):
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(path)
        return [[cfg["bos_token_id"]] + tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    return [list(p.encode("utf-8"))[: cfg["max_position_embeddings"]] for p in PROMPTS]


def dsv3_logits(binary, model_dir, ids, vocab, tmp):
    out = os.path.join(tmp, "logits.f32")
    subprocess.run([binary, "logits", "--model", model_dir, "--tokens", ",".join(map(str, ids)), "--out", out],
                   check=True, stdout=subprocess.DEVNULL)
    return np.fromfile(out, dtype="<f4").reshape(len(ids), vocab)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dsv3", required=True, help="the dsv3 binary")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--tol", type=float, default=1e-3)
    a = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        os.makedirs(hf_dir)
        cfg, n_deq, n_tensors = dequantized_checkpoint(a.model, hf_dir)
        model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        model.to(device).eval()
        load = {k: sorted(v) if isinstance(v, (list, set)) else str(v) for k, v in info.items()}
        print(f"transformers {transformers.__version__}, torch {torch.__version__}, {device}; {a.model}: "
              f"{n_tensors} tensors ({n_deq} dequantized from FP8); load info: "
              + json.dumps({k: v[:8] if isinstance(v, list) else v for k, v in load.items()}))
        results = []
        for ids in prompt_ids(a.model, cfg):
            with torch.no_grad():
                hf = model(torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()
            ours = dsv3_logits(a.dsv3, a.model, ids, cfg["vocab_size"], tmp)
            diff = np.abs(ours.astype(np.float64) - hf)
            r = {
                "tokens": len(ids),
                "max_rel_err": float(diff.max() / np.abs(hf).max()),
                "rel_l2": float(np.linalg.norm(ours - hf) / np.linalg.norm(hf)),
                "argmax_agree": int((ours.argmax(1) == hf.argmax(1)).sum()),
            }
            results.append(r)
            print(f"  {len(ids):3d} tokens: max |diff| / max |logit| {r['max_rel_err']:.3e}, rel L2 "
                  f"{r['rel_l2']:.3e}, argmax agrees at {r['argmax_agree']}/{len(ids)} positions")
    worst = max(r["max_rel_err"] for r in results)
    missing = load.get("missing_keys", [])
    summary = {"model": a.model, "transformers": transformers.__version__, "torch": torch.__version__,
               "device": device, "load_info": load, "prompts": results, "max_rel_err": worst}
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    print(f"worst max relative error {worst:.3e} (tolerance {a.tol:g}); missing parameters: {len(missing)}")
    return 1 if missing or worst > a.tol else 0


if __name__ == "__main__":
    sys.exit(main())
