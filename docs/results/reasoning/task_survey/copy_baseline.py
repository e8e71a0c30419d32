"""How often is the answer just a number copied from the question (reward-hacking risk for last-number extraction)?"""
import re

import reasoning_gym as rg

NUM = re.compile(r"-?\d+(?:\.\d+)?")
C = {"chain_sum d1": ("chain_sum", dict(min_terms=2,max_terms=2,max_digits=1)),
     "chain_sum d2": ("chain_sum", dict(min_terms=2,max_terms=2,max_digits=2)),
     "products d1": ("products", dict(max_digits=1)),
     "products 2x2d": ("products", dict(min_digits=2,max_digits=2)),
     "basic_arith +- d1": ("basic_arithmetic", dict(min_terms=2,max_terms=2,max_digits=1,allow_parentheses=False,allow_negation=False,operators=('+','-'))),
     "gcd v20": ("gcd", dict(max_value=20)), "gcd v50": ("gcd", dict(max_value=50)),
     "lcm v10": ("lcm", dict(max_value=10)), "lcm v20": ("lcm", dict(max_value=20)),
     "count_bits n15": ("count_bits", dict(max_n=15)), "letter_counting w3-5": ("letter_counting", dict(min_words=3,max_words=5))}
for n,(t,p) in C.items():
    ds = rg.create_dataset(t, size=500, seed=777, **p)
    anyq = sum(e["answer"] in NUM.findall(e["question"]) for e in ds) / len(ds)
    lastq = sum((NUM.findall(e["question"]) or [""])[-1] == e["answer"] for e in ds) / len(ds)
    one = sum(e["answer"] in ("0","1") for e in ds)/len(ds)
    print(f"{n:22s} answer appears in question: {anyq:.2f}  equals last number of question: {lastq:.2f}  answer is 0/1: {one:.2f}")
