"""PyTorch reference for side-by-side CPU comparisons.

A small GPT trained the way nanoGPT's CPU recipe for Tiny Shakespeare (characters) trains:
4 layers, 4 heads, 128 channels, context 64, batch 12, 2000 iterations, AdamW
(lr 1e-3, betas 0.9/0.99, weight decay 0.1 on matrices only), 100 warm-up steps, cosine
decay to 1e-4, no dropout, tied embeddings, 90/10 train/val split of the text.

Run it in the same session as the candidate so both see the same machine
(`benchmarks/vs_torch.py` runs the two in turn):
    pip install -e '.[bench]'
    python benchmarks/torch_reference.py --data lm/data/tinyshakespeare.txt
It prints one JSON line: steady-state ms/iteration, tokens/s, wall seconds, final val loss.
(The project's reference script, kept here so that the comparison needs nothing outside the
repository.)
"""
import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, ctx, d, layers, heads):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("proj.weight", "out.weight"))
                std = 0.02 / math.sqrt(2 * layers) if residual else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def lr_at(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000):
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = min(1.0, (it - warmup) / (decay - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--eval_batches", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    a = p.parse_args()

    text = open(a.data, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.int64)
    n = int(0.9 * len(ids))
    splits = {"train": torch.from_numpy(ids[:n]), "val": torch.from_numpy(ids[n:])}

    torch.manual_seed(a.seed)
    def batch(split):
        data = splits[split]
        ix = torch.randint(len(data) - a.ctx - 1, (a.batch,))
        x = torch.stack([data[i:i + a.ctx] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + a.ctx] for i in ix])
        return x, y

    model = GPT(len(chars), a.ctx, a.d, a.layers, a.heads)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    start = time.perf_counter()
    step_times = []
    for it in range(a.iters):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(it, decay=a.iters)
        loss = model(*batch("train"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_times.append(time.perf_counter() - t0)
    train_s = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        val = float(np.mean([model(*batch("val")).item() for _ in range(a.eval_batches)]))
    steady = float(np.median(step_times[len(step_times) // 10:]))
    print(json.dumps({
        "impl": "torch-reference", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "ms_per_iter": round(1e3 * steady, 2),
        "tokens_per_s": round(a.batch * a.ctx / steady),
        "train_wall_s": round(train_s, 1), "val_loss": round(val, 4)}))


if __name__ == "__main__":
    main()
