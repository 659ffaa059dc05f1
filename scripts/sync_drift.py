"""The drift table of docs/sync-precision.md: what each --comm-dtype costs in accuracy, from the perplexity tool's
KL mode. For each text: a 1-rank float64 run writes the KL base; then, at each rank count, one run per wire format
(--dtype float32 compute, the shipped default) compares itself with it. Prints the markdown table, one row per
(text, ranks, format): mean KLD, same top, perplexity; --json-out keeps every run's JSON object.

    python scripts/sync_drift.py --model DIR --text mpitp/data/tensor-parallel.txt --text mpitp/data/millrace.txt
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

FORMATS = ["float32", "float16", "bfloat16", "q8_0", "q8_0o"]


def perplexity(np_, args, extra, timeout):
    """The run's JSON object, or the error line of a run that mpitp refused (e.g. logits that are not finite)."""
    cmd = ["mpirun", "-n", str(np_), sys.executable, "-m", "mpitp.perplexity", "--model", args.model, "--ctx",
           str(args.ctx), "--chunks", str(args.chunks), "--json", "--quiet"] + extra
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode == 2 and "mpitp: error:" in out.stderr:
        return out.stderr.strip().splitlines()[-1]
    if out.returncode != 0:
        sys.exit(f"sync_drift: {' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--text", action="append", required=True)
    p.add_argument("--ranks", default="2,4,8")
    p.add_argument("--comm-dtypes", default=",".join(FORMATS))
    p.add_argument("--dtype", default="float32", help="the compared runs' compute dtype")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--json-out")
    args = p.parse_args()
    runs = []
    print("| text | ranks | comm dtype | mean KLD | same top | PPL | base PPL |\n|---|---|---|---|---|---|---|",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.text:
            base = os.path.join(tmp, "base.kld")
            r = perplexity(1, args, ["--file", text, "--dtype", "float64", "--kl-divergence-base", base], args.timeout)
            if isinstance(r, str):
                sys.exit(f"sync_drift: the base run failed: {r}")
            for np_ in [int(r) for r in args.ranks.split(",")]:
                for fmt in args.comm_dtypes.split(","):
                    r = perplexity(np_, args, ["--file", text, "--dtype", args.dtype, "--comm-dtype", fmt,
                                               "--kl-divergence", base], args.timeout)
                    runs.append(r)
                    if isinstance(r, str):
                        print(f"| {os.path.basename(text)} | {np_} | {fmt} | {r} | | | |", flush=True)
                        continue
                    k = r["kld"]
                    print(f"| {os.path.basename(text)} | {np_} | {fmt} | {k['mean']:.3g} | {100 * k['same_top']:.2f}% "
                          f"| {r['ppl']:.4f} | {k['base_ppl']:.4f} |", flush=True)
            os.remove(base)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
