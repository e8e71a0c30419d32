"""Measure SmolLM2-135M-Instruct on easy reasoning-gym tasks (CPU).

Usage: python survey.py PLAN.json OUT.jsonl
PLAN.json: list of runs {"name", "task", "params", "sys", "temp", "top_p", "max_new", "n", "seed", "greedy"}.
Each run: n prompts x 4 samples (+ 1 greedy per prompt), all extractions scored at once.
Appends one JSON line per run (summary + all replies) to OUT.jsonl.
"""
import json
import os
import re
import sys
import time

import reasoning_gym as rg
import torch

from gipo.models import load_causal_lm, load_tokenizer

torch.set_num_threads(int(os.environ.get("RG_THREADS", "2")))

SYS = {
    "S1": "Answer the question. Give only the final answer, nothing else.",
    "S2": "Give only the final answer to the question, with no explanation.",
    "S3": "Reply with only the final number.",
    "none": None,
}
NUM_RE = re.compile(r"-?\d+(?:\.\d+)?")


def ex_whole(r):
    return r.strip()


def ex_last_num(r):
    m = NUM_RE.findall(r)
    return m[-1].rstrip(".") if m else ""


def ex_first_line(r):
    s = r.strip()
    s = s.split("\n")[0].strip() if s else ""
    return s[:-1].strip() if s.endswith(".") else s


def ex_first_num(r):
    m = NUM_RE.findall(r)
    return m[0] if m else ""


EXTRACT = {"a_whole": ex_whole, "b_lastnum": ex_last_num, "c_firstline": ex_first_line, "d_firstnum": ex_first_num}

tok = load_tokenizer("smollm2-135m-instruct")
model = load_causal_lm("smollm2-135m-instruct").eval()
EOS = tok.eos_token_id
PAD = tok.pad_token_id


def build(questions, sys_key):
    texts = []
    for q in questions:
        msgs = ([{"role": "system", "content": SYS[sys_key]}] if SYS[sys_key] else []) + [{"role": "user", "content": q}]
        texts.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    L = max(len(x) for x in ids)
    inp = torch.full((len(ids), L), PAD, dtype=torch.long)
    att = torch.zeros((len(ids), L), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, L - len(x):] = torch.tensor(x)
        att[i, L - len(x):] = 1
    return inp, att


def decode(out, L, max_new):
    gen = out[:, L:]
    res = []
    for row in gen.tolist():
        n = len(row)
        cut = True
        for j, t in enumerate(row):
            if t == EOS:
                n, cut = j + 1, False
                break
        # a row shorter than max_new without EOS cannot happen (generate pads only after EOS)
        if cut and len(row) < max_new:
            cut = False
        text = tok.decode(row[: n - (0 if cut else 1)], skip_special_tokens=True)
        res.append((text, n, cut))
    return res


def score(ds, entry, reply):
    out = {}
    for k, f in EXTRACT.items():
        try:
            s = float(ds.score_answer(f(reply), entry))
        except Exception:
            s = 0.0
        out[k] = s
    return out


@torch.no_grad()
def fast_generate(inp, att, k, temp, top_p, max_new):
    """Prefill each prompt once, repeat the KV cache to k sampled rows + 1 greedy row, and drop rows from the
    batch (and the cache) as soon as they emit EOS. Same distribution as generate(do_sample=True, temperature,
    top_p, top_k=0); the greedy row is argmax decoding."""
    from transformers import DynamicCache
    B, L = inp.shape
    R = k + 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=inp, attention_mask=att, position_ids=pos, past_key_values=cache, use_cache=True)
    cache = out.past_key_values
    logits = out.logits[:, -1].float().repeat_interleave(R, 0)
    cache.batch_repeat_interleave(R)
    att = att.repeat_interleave(R, 0)
    last = pos[:, -1].repeat_interleave(R, 0)
    is_greedy = torch.tensor([j == k for _ in range(B) for j in range(R)])
    alive = torch.arange(B * R)
    toks = [[] for _ in range(B * R)]
    for step in range(max_new):
        g = logits.argmax(-1)
        probs = torch.softmax(logits / temp, -1)
        if top_p < 1.0:
            sp, si = probs.sort(-1, descending=True)
            cs = sp.cumsum(-1)
            sp[(cs - sp) > top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, si, sp)
        s = torch.multinomial(probs, 1).squeeze(-1)
        nxt = torch.where(is_greedy, g, s)
        for r, t in zip(alive.tolist(), nxt.tolist(), strict=True):
            toks[r].append(t)
        if step == max_new - 1:
            break
        keep = nxt != EOS
        if not keep.any():
            break
        if not keep.all():
            idx = keep.nonzero().squeeze(-1)
            cache.batch_select_indices(idx)
            alive, nxt, att, last, is_greedy = alive[idx], nxt[idx], att[idx], last[idx], is_greedy[idx]
        att = torch.cat([att, torch.ones(att.shape[0], 1, dtype=att.dtype)], -1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=last[:, None], past_key_values=cache,
                    use_cache=True)
        logits = out.logits[:, -1].float()
    res = []
    for row in toks:
        cut = EOS not in row and len(row) >= max_new
        body = row[: row.index(EOS)] if EOS in row else row
        res.append((tok.decode(body, skip_special_tokens=True), len(row), cut))
    samples = [res[i * R + j] for i in range(B) for j in range(k)]
    greedy = [res[i * R + k] for i in range(B)]
    return samples, greedy


@torch.no_grad()
def run(cfg):
    ds = rg.create_dataset(cfg["task"], size=cfg.get("n", 24), seed=cfg.get("seed", 777), **cfg.get("params", {}))
    entries = [ds[i] for i in range(len(ds))]
    inp, att = build([e["question"] for e in entries], cfg["sys"])
    L = inp.shape[1]
    k = 4
    t0 = time.time()
    samples, greedy = fast_generate(inp, att, k, cfg["temp"], cfg["top_p"], cfg["max_new"])
    t_samp = time.time() - t0
    t_greedy = 0.0
    recs = []
    for i, e in enumerate(entries):
        for j in range(k):
            text, n, cut = samples[i * k + j]
            recs.append({"p": i, "kind": "sample", "reply": text, "len": n, "cut": cut, "s": score(ds, e, text)})
        if greedy:
            text, n, cut = greedy[i]
            recs.append({"p": i, "kind": "greedy", "reply": text, "len": n, "cut": cut, "s": score(ds, e, text)})
    summ = {}
    for x in EXTRACT:
        samp = [r for r in recs if r["kind"] == "sample"]
        corr = [r["s"][x] >= 1.0 for r in samp]
        p1 = sum(corr) / len(corr)
        p4 = sum(any(r["s"][x] >= 1.0 for r in samp if r["p"] == i) for i in range(len(entries))) / len(entries)
        mean_reward = sum(r["s"][x] for r in samp) / len(samp)
        # share of prompts with mixed outcomes among the 4 samples (nonzero GRPO advantage)
        mixed = sum(0 < sum(r["s"][x] >= 1.0 for r in samp if r["p"] == i) < k for i in range(len(entries))) / len(entries)
        g = [r for r in recs if r["kind"] == "greedy"]
        gp = sum(r["s"][x] >= 1.0 for r in g) / len(g) if g else None
        summ[x] = {"pass1": p1, "pass4": p4, "greedy": gp, "mean_reward": mean_reward, "mixed": mixed}
    samp = [r for r in recs if r["kind"] == "sample"]
    summary = {k2: cfg.get(k2) for k2 in ("name", "task", "params", "sys", "temp", "top_p", "max_new", "n", "seed")}
    summary.update({
        "by_extract": summ,
        "mean_len": sum(r["len"] for r in samp) / len(samp),
        "cut_share": sum(r["cut"] for r in samp) / len(samp),
        "t_sample_s": t_samp, "t_greedy_s": t_greedy, "prompt_len": L,
        "answers": [e["answer"] for e in entries],
        "questions": [e["question"] for e in entries],
    })
    return summary, recs


if __name__ == "__main__":
    with open(sys.argv[1]) as plan_file:
        plan = json.load(plan_file)
    outp = sys.argv[2]
    T0 = time.time()
    for cfg in plan:
        summary, recs = run(cfg)
        b = summary["by_extract"]
        key = cfg.get("extract") or ("b_lastnum" if cfg.get("numeric", True) else "c_firstline")
        print(f"{cfg['name']:32s} {cfg['sys']:4s} T={cfg['temp']} p={cfg['top_p']} N={cfg['max_new']} | "
              + " ".join(f"{x[:1]}:{b[x]['pass1']:.2f}/{b[x]['pass4']:.2f}/{b[x]['greedy']:.2f}" for x in b)
              + f" | len={summary['mean_len']:.1f} cut={summary['cut_share']:.2f} t={summary['t_sample_s']:.1f}s+{summary['t_greedy_s'] or 0:.1f}s",
              flush=True)
        for r in [r for r in recs if r["kind"] == "sample"][:6:2]:
            print("     ", repr(summary["answers"][r["p"]]), "<-", repr(r["reply"][:160]), flush=True)
        with open(outp, "a") as f:
            f.write(json.dumps({"summary": summary, "recs": recs}) + "\n")
    print(f"total {time.time() - T0:.1f}s")
