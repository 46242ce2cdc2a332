#!/usr/bin/env python3
"""Golden references for the CPU trainer (src/train), from PyTorch autograd in float64.

Writes one case directory (default tests/train/goldens/tiny_v3_mtp/):
  config.json          the model config in the published Hugging Face form (no "training" section)
  model.safetensors    initial weights, F32, published names (per-expert names, F32 gate bias
                       `mlp.gate.e_score_correction_bias`, MTP layer at index num_hidden_layers with
                       its copies of embed_tokens / shared_head.head): `dsv3 logits` loads it
  grads.safetensors    F64 `grad.<name>`: d(loss)/d(param) of the first micro-batch, for every
                       parameter (loss = main + mtp_lambda * mtp + sequence-wise balance loss)
  final.safetensors    F64 `<name>`: parameters after `steps` optimizer steps, F32 `bias.<name>`: the
                       router biases after the auxiliary-loss-free updates
  golden.json          the training settings, every micro-batch's tokens, the losses of the gradient
                       batch, and per step: lr, grad norm (before clipping), losses, expert loads

Where the numbers come from: the small float64 model below, written from REFERENCE.md §3 / §3.4 / §5
(the project's model-facts file), with torch autograd for the backward pass and torch.optim.AdamW
(foreach off) for the updates. It is independent of the C++ code except for two conventions that the
C++ engine fixed and the trainer follows, both stated here:
  * RoPE cos/sin tables are rounded to float32 (the inference engine's tables), then used in float64;
  * the router bias is float32 (as checkpoints store it); an update is done in float64 and rounded.
The script checks itself: autograd against central finite differences on entries of every parameter
tensor (rel. err < 1e-6), before writing anything.

Training step (what src/train/trainer.cpp does): grads of the mean over `grad_accum` micro-batches;
clip_grad_norm_(1.0); AdamW(beta 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices only) at the step's
lr (linear warm-up, then cosine to min_lr); then b_i += gamma * sign(mean_load - load_i) per MoE layer
with the loads counted over all the step's micro-batches.

Run where torch + safetensors are installed (CPU is enough, ~10 s). On the project's GPU machine:
    PYTHONUNBUFFERED=1 python3 tools/make_train_goldens.py --out $OUT/tiny_v3_mtp
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

F64 = torch.float64
LATENT_NORM_EPS = 1e-6

CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 20,
    "moe_intermediate_size": 6,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "q_lora_rank": 12,
    "kv_lora_rank": 8,
    "qk_nope_head_dim": 4,
    "qk_rope_head_dim": 4,
    "v_head_dim": 6,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "attention_bias": False,
    "torch_dtype": "float32",
}

TRAINING = {
    "seq_len": 8, "batch_size": 2, "grad_accum": 2, "steps": 4, "lr": 1e-2, "min_lr": 1e-3,
    "warmup_steps": 2, "schedule": "cosine", "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
    "weight_decay": 0.1, "grad_clip": 1.0, "mtp_lambda": 0.3, "bias_update_speed": 0.01,
    "seq_aux_alpha": 0.01,
}


# ---------------------------------------------------------------------------------------------
# Config-derived quantities (REFERENCE.md §3.2)
# ---------------------------------------------------------------------------------------------
def yarn_mscale(factor, s):
    return 1.0 if factor <= 1.0 else 0.1 * s * math.log(factor) + 1.0


def rope_inv_freq(c):
    dr = c["qk_rope_head_dim"]
    theta = float(c["rope_theta"])
    f = [theta ** (-2.0 * i / dr) for i in range(dr // 2)]
    y = c.get("rope_scaling")
    if not y:
        return f
    orig, factor = y["original_max_position_embeddings"], float(y["factor"])

    def corr(rot):
        return dr * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr(y["beta_fast"])), 0.0)
    high = min(math.ceil(corr(y["beta_slow"])), float(dr - 1))
    if low == high:
        high += 0.001
    out = []
    for i in range(dr // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(f[i] * (1 - ramp) + f[i] / factor * ramp)
    return out


def softmax_scale(c):
    s = 1.0 / math.sqrt(c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
    y = c.get("rope_scaling")
    if y and y.get("mscale_all_dim", 0):
        m = yarn_mscale(y["factor"], y["mscale_all_dim"])
        s *= m * m
    return s


def cos_sin_scale(c):
    y = c.get("rope_scaling")
    if not y:
        return 1.0
    return yarn_mscale(y["factor"], y.get("mscale", 1.0)) / yarn_mscale(y["factor"], y.get("mscale_all_dim", 0.0))


def rope_tables(c, n):
    inv = rope_inv_freq(c)
    sc = cos_sin_scale(c)
    cos = [[math.cos(t * f) * sc for f in inv] for t in range(n)]
    sin = [[math.sin(t * f) * sc for f in inv] for t in range(n)]
    # Rounded to float32 as the engine's tables are; used in float64.
    return (torch.tensor(cos, dtype=F64).float().double(), torch.tensor(sin, dtype=F64).float().double())


# ---------------------------------------------------------------------------------------------
# Parameters under their published names
# ---------------------------------------------------------------------------------------------
def param_shapes(c):
    D, H, V = c["hidden_size"], c["num_attention_heads"], c["vocab_size"]
    dq = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    shapes = [("model.embed_tokens.weight", (V, D))]

    def layer(l):
        p = f"model.layers.{l}."
        out = [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,))]
        Q, C = c["q_lora_rank"], c["kv_lora_rank"]
        if Q:
            out += [(p + "self_attn.q_a_proj.weight", (Q, D)), (p + "self_attn.q_a_layernorm.weight", (Q,)),
                    (p + "self_attn.q_b_proj.weight", (H * dq, Q))]
        else:
            out += [(p + "self_attn.q_proj.weight", (H * dq, D))]
        out += [(p + "self_attn.kv_a_proj_with_mqa.weight", (C + c["qk_rope_head_dim"], D)),
                (p + "self_attn.kv_a_layernorm.weight", (C,)),
                (p + "self_attn.kv_b_proj.weight", (H * (c["qk_nope_head_dim"] + c["v_head_dim"]), C)),
                (p + "self_attn.o_proj.weight", (D, H * c["v_head_dim"]))]

        def mlp(q, inter):
            return [(q + "gate_proj.weight", (inter, D)), (q + "up_proj.weight", (inter, D)),
                    (q + "down_proj.weight", (D, inter))]

        if not is_moe(c, l):
            out += mlp(p + "mlp.", c["intermediate_size"])
        else:
            out += [(p + "mlp.gate.weight", (c["n_routed_experts"], D))]
            for e in range(c["n_routed_experts"]):
                out += mlp(p + f"mlp.experts.{e}.", c["moe_intermediate_size"])
            if c["n_shared_experts"]:
                out += mlp(p + "mlp.shared_experts.", c["n_shared_experts"] * c["moe_intermediate_size"])
        return out

    for l in range(c["num_hidden_layers"]):
        shapes += layer(l)
    shapes += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
    if c["num_nextn_predict_layers"]:
        L = c["num_hidden_layers"]
        p = f"model.layers.{L}."
        shapes += [(p + "enorm.weight", (D,)), (p + "hnorm.weight", (D,)), (p + "eh_proj.weight", (D, 2 * D))]
        shapes += layer(L)
        shapes += [(p + "shared_head.norm.weight", (D,))]
    return shapes


def is_moe(c, l):
    return c["n_routed_experts"] > 0 and l >= c["first_k_dense_replace"] and l % c["moe_layer_freq"] == 0


def moe_layers(c):
    n = c["num_hidden_layers"] + c["num_nextn_predict_layers"]
    return [l for l in range(n) if is_moe(c, l)]


# ---------------------------------------------------------------------------------------------
# The model (float64)
# ---------------------------------------------------------------------------------------------
def rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, cos, sin):
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def swiglu(P, p, x):
    return (F.silu(x @ P[p + "gate_proj.weight"].T) * (x @ P[p + "up_proj.weight"].T)) @ P[p + "down_proj.weight"].T


def attention(c, P, p, x, cos, sin):
    B, S, _ = x.shape
    H, dn, dr, dv, C = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"],
                        c["kv_lora_rank"])
    if c["q_lora_rank"]:
        qa = rmsnorm(x @ P[p + "self_attn.q_a_proj.weight"].T, P[p + "self_attn.q_a_layernorm.weight"], LATENT_NORM_EPS)
        q = qa @ P[p + "self_attn.q_b_proj.weight"].T
    else:
        q = x @ P[p + "self_attn.q_proj.weight"].T
    q = q.view(B, S, H, dn + dr)
    q_nope, q_pe = q[..., :dn], q[..., dn:]
    kva = x @ P[p + "self_attn.kv_a_proj_with_mqa.weight"].T
    lat = rmsnorm(kva[..., :C], P[p + "self_attn.kv_a_layernorm.weight"], LATENT_NORM_EPS)
    k_pe = rope(kva[..., C:], cos[None], sin[None])                 # [B, S, dr], shared by heads
    q_pe = rope(q_pe, cos[None, :, None], sin[None, :, None])       # [B, S, H, dr]
    kv = (lat @ P[p + "self_attn.kv_b_proj.weight"].T).view(B, S, H, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    scores = (torch.einsum("bshd,bthd->bhst", q_nope, k_nope) + torch.einsum("bshd,btd->bhst", q_pe, k_pe))
    scores = scores * softmax_scale(c)
    mask = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    o = torch.einsum("bhst,bthd->bshd", probs, v).reshape(B, S, H * dv)
    return o @ P[p + "self_attn.o_proj.weight"].T


def moe(c, P, p, x, bias, loads, alpha):
    """Returns (y, balance loss). Expert choice by sigmoid score + bias (no gradient through it)."""
    B, S, D = x.shape
    E, k, G, TG = c["n_routed_experts"], c["num_experts_per_tok"], c["n_group"], c["topk_group"]
    xt = x.reshape(-1, D)
    N = xt.shape[0]
    s = torch.sigmoid(xt @ P[p + "mlp.gate.weight"].T)  # [N, E]
    with torch.no_grad():
        sel = s + bias.double()[None]
        per = E // G
        gscore = sel.view(N, G, per).topk(min(2, per), dim=-1).values.sum(-1)
        gidx = gscore.topk(TG, dim=-1).indices
        gmask = torch.zeros(N, G, dtype=torch.bool).scatter(1, gidx, True)
        emask = gmask[:, :, None].expand(N, G, per).reshape(N, E)
        idx = sel.masked_fill(~emask, float("-inf")).topk(k, dim=-1).indices  # [N, k]
        loads += torch.bincount(idx.flatten(), minlength=E).double()
    w = s.gather(1, idx)
    if c["norm_topk_prob"] and k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * c["routed_scaling_factor"]
    y = swiglu(P, p + "mlp.shared_experts.", xt) if c["n_shared_experts"] else torch.zeros_like(xt)
    for e in range(E):
        rows, slot = torch.nonzero(idx == e, as_tuple=True)
        if rows.numel() == 0:
            continue
        y = y.index_add(0, rows, w[rows, slot].unsqueeze(1) * swiglu(P, p + f"mlp.experts.{e}.", xt[rows]))
    aux = torch.zeros((), dtype=F64)
    if alpha > 0:
        for b in range(B):
            sb = s.view(B, S, E)[b]
            f = torch.bincount(idx.view(B, S, k)[b].flatten(), minlength=E).double() * (E / (k * S))
            Pm = (sb / sb.sum(-1, keepdim=True)).mean(0)
            aux = aux + alpha * (f * Pm).sum()
        aux = aux / B
    return y.view(B, S, D), aux


def decoder_layer(c, P, l, x, cos, sin, biases, loads, alpha):
    p = f"model.layers.{l}."
    eps = c["rms_norm_eps"]
    h = x + attention(c, P, p, rmsnorm(x, P[p + "input_layernorm.weight"], eps), cos, sin)
    xn = rmsnorm(h, P[p + "post_attention_layernorm.weight"], eps)
    if is_moe(c, l):
        y, aux = moe(c, P, p, xn, biases[l], loads[l], alpha)
    else:
        y, aux = swiglu(P, p + "mlp.", xn), torch.zeros((), dtype=F64)
    return h + y, aux


def forward(c, P, biases, tokens, loads, t):
    """tokens: LongTensor [B, S+1]. Returns (total, main, mtp, aux) as 0-d tensors."""
    B, S1 = tokens.shape
    S = S1 - 1
    eps = c["rms_norm_eps"]
    cos, sin = rope_tables(c, S)
    x = P["model.embed_tokens.weight"][tokens[:, :S]]
    aux = torch.zeros((), dtype=F64)
    for l in range(c["num_hidden_layers"]):
        x, a = decoder_layer(c, P, l, x, cos, sin, biases, loads, t["seq_aux_alpha"])
        aux = aux + a
    hf = rmsnorm(x, P["model.norm.weight"], eps)
    V = c["vocab_size"]
    logits = hf @ P["lm_head.weight"].T
    main = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
    mtp = torch.zeros((), dtype=F64)
    if c["num_nextn_predict_layers"]:
        L = c["num_hidden_layers"]
        p = f"model.layers.{L}."
        Sm = S - 1
        e = rmsnorm(P["model.embed_tokens.weight"][tokens[:, 1:S]], P[p + "enorm.weight"], eps)  # t_{i+1}
        h = rmsnorm(hf[:, :Sm], P[p + "hnorm.weight"], eps)                                      # h_i
        xm = torch.cat([e, h], dim=-1) @ P[p + "eh_proj.weight"].T                               # [emb; h]
        xm, a = decoder_layer(c, P, L, xm, cos[:Sm], sin[:Sm], biases, loads, t["seq_aux_alpha"])
        aux = aux + a
        ml = rmsnorm(xm, P[p + "shared_head.norm.weight"], eps) @ P["lm_head.weight"].T
        mtp = F.cross_entropy(ml.reshape(-1, V), tokens[:, 2:].reshape(-1))
    total = main + t["mtp_lambda"] * mtp + aux
    return total, main, mtp, aux


def learning_rate(t, step):
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    if t["schedule"] == "constant":
        return t["lr"]
    span = max(1, t["steps"] - 1 - t["warmup_steps"])
    progress = min(1.0, (step - t["warmup_steps"]) / span)
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/train/goldens/tiny_v3_mtp")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    c, t = CONFIG, TRAINING
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    # Initial weights, generated in float32 (what the files hold), used in float64.
    init = {}
    for name, shape in param_shapes(c):
        if len(shape) == 1:
            init[name] = (1.0 + 0.2 * torch.randn(shape, generator=gen)).float()
        else:
            init[name] = (0.35 * torch.randn(shape, generator=gen)).float()
    biases0 = {l: (0.05 * torch.randn(c["n_routed_experts"], generator=gen)).float() for l in moe_layers(c)}
    V, S, B, A = c["vocab_size"], t["seq_len"], t["batch_size"], t["grad_accum"]
    batches = [[torch.randint(0, V, (B, S + 1), generator=gen) for _ in range(A)] for _ in range(t["steps"])]

    def fresh_params():
        return {n: w.double().clone().requires_grad_(True) for n, w in init.items()}

    def fresh_loads():
        return {l: torch.zeros(c["n_routed_experts"], dtype=F64) for l in moe_layers(c)}

    # 1. Gradients of one micro-batch (the first), and a finite-difference self-check.
    P = fresh_params()
    grad_batch = batches[0][0]
    total, main_l, mtp_l, aux_l = forward(c, P, biases0, grad_batch, fresh_loads(), t)
    # Experts that no token chose get no gradient (allow_unused): zeros.
    grads = torch.autograd.grad(total, [P[n] for n in P], allow_unused=True)
    grads = {n: (torch.zeros_like(P[n]) if g is None else g.detach().clone()) for n, g in zip(P, grads)}
    print(f"loss {total.item():.12f} main {main_l.item():.12f} mtp {mtp_l.item():.12f} aux {aux_l.item():.3e}")

    worst = 0.0
    gcheck = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, w in P.items():
            for _ in range(2):
                i = int(torch.randint(0, w.numel(), (1,), generator=gcheck))
                keep = w.view(-1)[i].item()
                h = 1e-6
                w.view(-1)[i] = keep + h
                up = forward(c, P, biases0, grad_batch, fresh_loads(), t)[0].item()
                w.view(-1)[i] = keep - h
                down = forward(c, P, biases0, grad_batch, fresh_loads(), t)[0].item()
                w.view(-1)[i] = keep
                num = (up - down) / (2 * h)
                err = abs(num - grads[n].view(-1)[i].item()) / (1 + abs(num))
                worst = max(worst, err)
                assert err < 1e-6, f"autograd vs finite differences: {n}[{i}] {grads[n].view(-1)[i].item()} vs {num}"
    print(f"finite-difference self-check: worst rel err {worst:.2e} over {2 * len(P)} entries")

    # 2. N optimizer steps.
    P = fresh_params()
    biases = {l: b.clone() for l, b in biases0.items()}
    names = list(P)
    decay = [P[n] for n in names if P[n].dim() == 2]
    no_decay = [P[n] for n in names if P[n].dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t["lr"], betas=(t["beta1"], t["beta2"]), eps=t["eps"], foreach=False)
    # Every parameter gets a (zero) gradient, so that AdamW also decays and updates the moments of
    # experts that no token chose in a step, as the C++ trainer does (torch skips grad=None params).
    for n in names:
        P[n].grad = torch.zeros_like(P[n])
    steps = []
    for i in range(t["steps"]):
        opt.zero_grad(set_to_none=False)
        loads = fresh_loads()
        parts = [0.0, 0.0, 0.0, 0.0]
        for a in range(A):
            out = forward(c, P, biases, batches[i][a], loads, t)
            (out[0] / A).backward()
            for j in range(4):
                parts[j] += out[j].item() / A
        gnorm = torch.nn.utils.clip_grad_norm_([P[n] for n in names], t["grad_clip"], foreach=False).item()
        lr = learning_rate(t, i)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        for l in moe_layers(c):
            mean = loads[l].mean()
            biases[l] = (biases[l].double() + t["bias_update_speed"] * torch.sign(mean - loads[l])).float()
        steps.append({"lr": lr, "grad_norm": gnorm, "loss": parts[0], "main": parts[1], "mtp": parts[2],
                      "aux": parts[3], "loads": {str(l): loads[l].tolist() for l in moe_layers(c)}})
        print(f"step {i + 1}: loss {parts[0]:.10f} lr {lr:.3e} gnorm {gnorm:.6f}")

    # 3. Write.
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    L = c["num_hidden_layers"]
    tensors = {n: w.contiguous() for n, w in init.items()}
    for l, b in biases0.items():
        tensors[f"model.layers.{l}.mlp.gate.e_score_correction_bias"] = b.contiguous()
    if c["num_nextn_predict_layers"]:
        tensors[f"model.layers.{L}.embed_tokens.weight"] = init["model.embed_tokens.weight"].clone()
        tensors[f"model.layers.{L}.shared_head.head.weight"] = init["lm_head.weight"].clone()
    save_file(tensors, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    save_file({"grad." + n: g.contiguous() for n, g in grads.items()}, os.path.join(args.out, "grads.safetensors"))
    final = {n: P[n].detach().clone().contiguous() for n in names}
    for l, b in biases.items():
        final[f"bias.model.layers.{l}.mlp.gate.e_score_correction_bias"] = b.contiguous()
    save_file(final, os.path.join(args.out, "final.safetensors"))
    golden = {
        "generator": "tools/make_train_goldens.py (PyTorch %s autograd, float64)" % torch.__version__,
        "training": t,
        "grad_batch": {"tokens": grad_batch.tolist(), "loss": total.item(), "main": main_l.item(),
                       "mtp": mtp_l.item(), "aux": aux_l.item()},
        "batches": [[mb.tolist() for mb in step] for step in batches],
        "steps": steps,
        "fd_self_check_worst_rel_err": worst,
    }
    with open(os.path.join(args.out, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    sys.exit(main())
