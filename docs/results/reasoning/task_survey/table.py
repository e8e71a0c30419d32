"""Build results table (markdown + csv) from phase*.jsonl."""
import csv
import glob
import json

rows = []
WORD = {"spell_backward", "number_sorting", "word_sequence_reversal"}
for f in sorted(glob.glob("phase*.jsonl")):
    with open(f) as lines:
        summaries = [json.loads(line)["summary"] for line in lines]
    for s in summaries:
        ex = "c_firstline" if s["task"] in WORD else "b_lastnum"
        b = s["by_extract"]
        rows.append(dict(file=f.split("/")[-1], name=s["name"], task=s["task"], params=json.dumps(s["params"]), seed=s["seed"] or 777,
                         extract=ex, sys=s["sys"], temp=s["temp"], top_p=s["top_p"], max_new=s["max_new"],
                         pass1=b[ex]["pass1"], pass4=b[ex]["pass4"], greedy=b[ex]["greedy"], mixed=b[ex]["mixed"],
                         pass1_whole=b["a_whole"]["pass1"], pass1_firstline=b["c_firstline"]["pass1"], pass1_firstnum=b["d_firstnum"]["pass1"],
                         mean_len=s["mean_len"], cut=s["cut_share"], gen_s=s["t_sample_s"]))
with open("results.csv", "w") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
hdr = "| run | sys | T/top_p | N | extr | pass@1 | pass@4 | greedy | mixed-groups | p@1 whole/firstline/firstnum | len | cut | gen s |"
out = [hdr, "|" + "---|" * 13]
for r in rows:
    out.append(f"| {r['name']}{'' if r['seed']==777 else ' (seed '+str(r['seed'])+')'} | {r['sys']} | {r['temp']}/{r['top_p']} | {r['max_new']} | {r['extract'][:1]} | "
               f"{r['pass1']:.2f} | {r['pass4']:.2f} | {r['greedy']:.2f} | {r['mixed']:.2f} | {r['pass1_whole']:.2f}/{r['pass1_firstline']:.2f}/{r['pass1_firstnum']:.2f} | "
               f"{r['mean_len']:.1f} | {r['cut']:.2f} | {r['gen_s']:.0f} |")
with open("results.md", "w") as fh:
    fh.write("\n".join(out) + "\n")
print("\n".join(out))
