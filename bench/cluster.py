"""``--cluster-table``: decode measured and projected against the link, one row per JSON record (one per link rate:
``make bench-cluster``), with each record's warnings.
"""

from mpitp.cli.runner import out

from .report import markdown
from .summary import checked, read_records


def link_label(rec):
    """The link a record ran over: the rate scripts/cluster.sh set with tc (MPITP_CLUSTER_RATE), else its hosts."""
    env = rec["environment"]
    wire = f", wire {rec['comm_dtype']}" if rec.get("comm_dtype", rec["dtype"]) != rec["dtype"] else ""
    if env.get("cluster_rate"):
        return env["cluster_rate"] + wire
    return f"{len(env['hosts'])} host{'s' if len(env['hosts']) > 1 else ''}{wire}"


def cluster_table(records):
    """Decode against the link, one row per record (``--cluster-table``): measured and projected tokens/s and
    the error, then per token the compute on the critical path, the Allreduce calls alone (in the instrumented
    runs, and as the projection charges them: at their idle-link cost, or back to back when the link binds),
    the most any rank waited for the slowest, and the link's sustained rate per rank."""
    head = ["link", "pp t/s", "tg t/s", "projected t/s", "error", "compute ms/tok", "Allreduce ms/tok",
            "modelled ms/tok", "wait ms/tok", "link MB/s", "bound"]
    rows = []
    for rec in records:
        pj, pp, tg = rec["projection"], rec["tests"][0], rec["tests"][1]
        wait = max(r["wait"] for r in rec["decode_breakdown"]["per_rank_ms"])
        rows.append([link_label(rec), f"{pp['mean']:.1f}", f"{tg['mean']:.2f} ± {tg['sd']:.2f}",
                     f"{pj['tokens_per_s']:.2f}", f"{pj['error_percent']:+.1f}%", f"{pj['compute_ms_per_token']:.3f}",
                     f"{pj['allreduce_in_situ_ms_per_token']:.3f}", f"{pj['allreduce_model_ms_per_token']:.3f}",
                     f"{wait:.3f}", f"{pj['link_sustained_MBps']:.1f}" if pj["link_sustained_MBps"] else "-",
                     pj["bound"]])
    return markdown(head, rows, left={0, 10})


def print_cluster_table(paths):
    """``--cluster-table``: the table of several JSON records (one per link rate) and their warnings."""
    records = read_records(paths)
    out(checked(paths, cluster_text, records))
    return 0


def cluster_text(records):
    """The heading, ``cluster_table``, the largest projection error and every record's warnings."""
    first = records[0]
    lines = [f"# decode against the link: {first['model']}, {first['dtype']}, {first['ranks']} ranks on "
             f"{len(first['environment']['hosts'])} hosts, {first['threads']} BLAS thread(s) each, "
             f"{first['tests'][0]['test']} {first['tests'][1]['test']}, {first['repeats']} repeats; projected = "
             f"compute + each collective at its idle-link cost, or the collectives back to back on a link whose "
             f"burst is spent if that is slower (docs/benchmark.md, \"Across nodes\"); Allreduce = the calls "
             f"alone (measured in the instrumented runs, and as the projection charges them), wait = the most a "
             f"rank waited for the slowest; link MB/s = its sustained rate per rank in 1 MB calls",
             cluster_table(records),
             f"largest projection error: {max(abs(r['projection']['error_percent']) for r in records):.1f}%"]
    lines += [f"warning ({link_label(rec)}): {w}" for rec in records for w in rec.get("warnings", [])]
    return "\n".join(lines)
