#!/usr/bin/env python3
"""A/B of two rumor builds through the shared proxy harness (old vs new request path).

Runs, with ``shared/anchors/proxy/bench.py``, both builds as two targets of ONE run so
that the harness alternates them within every round:

1. ``overhead``     direct, haproxy, rumor-old, rumor-new; wrk -c1 and -c16, one backend
                    (``--abba``, 5 rounds by default);
2. ``slow-backend`` haproxy-rr, haproxy-leastconn, nginx-leastconn, rumor-old,
                    rumor-new at a fixed rate (1,000 req/s), the harness's variants
                    (healthy, fixed50, tail10x200), 3 rounds by default;

then prints the comparison tables: the per-target medians [min–max] are the harness
summary's; the new/old ratios are paired *within a round* (same round, same load,
same neighbour) from the harness's ``.jsonl`` records, undisturbed rounds only.

    python3 bench/pipeline_ab.py \\
        --old-python /work/base-old/.venv/bin/python --old-root /work/base-old \\
        --new-python .venv/bin/python --new-root . \\
        --rounds 5 --results-dir /tmp/pipeline-ab

    # only print the tables of finished runs (paths of the harness's .jsonl files)
    python3 bench/pipeline_ab.py --tables-from RESULTS/overhead-X.jsonl RESULTS/slow-backend-Y.jsonl

Each build's own ``bench/proxy_pair.py`` is run with its own python, and the script
refuses to start if that python imports ``rumor`` from somewhere else than its root.
Bars checked (``--bar-*``): new/old req/s and CPU µs/req within 5 %, c=1 p50 added
over direct ≤ 0.30 ms. Stdlib only; the harness needs ``haproxy nginx wrk``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OLD, NEW = "rumor-old", "rumor-new"


# ---- locating things ------------------------------------------------------------------


def find_harness(given: str | None) -> Path:
    cands = [Path(given)] if given else []
    if os.environ.get("RUMOR_PROXY_HARNESS"):
        cands.append(Path(os.environ["RUMOR_PROXY_HARNESS"]))
    for p in [HERE, *HERE.parents]:
        cands.append(p / "shared" / "anchors" / "proxy")
    cands.append(Path("/work/shared/anchors/proxy"))
    for c in cands:
        if (c / "bench.py").is_file():
            return c.resolve()
    raise SystemExit("harness not found: pass --harness DIR (the folder of bench.py)")


def check_build(label: str, python: str, root: str) -> str:
    """The file rumor.proxy.outbound is imported from; must lie under root."""
    p = subprocess.run([python, "-c", "import rumor.proxy.outbound as m; print(m.__file__)"],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise SystemExit(f"{label}: {python} cannot import rumor:\n{p.stderr}")
    where = Path(p.stdout.strip()).resolve()
    if not str(where).startswith(str(Path(root).resolve()) + os.sep):
        raise SystemExit(f"{label}: {python} imports rumor from {where}, not from {root}")
    if not (Path(root) / "bench" / "proxy_pair.py").is_file():
        raise SystemExit(f"{label}: {root}/bench/proxy_pair.py missing")
    return str(where)


def git_rev(root: str) -> str:
    p = subprocess.run(["git", "-C", root, "log", "-1", "--format=%h %s"],
                       capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (p.stdout.strip()[:70] or "?") + (" (+uncommitted changes)" if dirty else "")


# ---- running the harness --------------------------------------------------------------


def run_harness(argv: list[str], log: Path) -> Path:
    """Run bench.py, its JSON lines to ``log``, its stderr through; return the .jsonl."""
    print("\n$ " + " ".join(_q(a) for a in argv), flush=True)
    jsonl = None
    with open(log, "w") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, text=True)
        assert p.stderr is not None
        for line in p.stderr:
            sys.stderr.write(line)
            if line.startswith("# records: "):
                jsonl = Path(line[len("# records: "):].strip())
        rc = p.wait()
    if rc != 0 or jsonl is None:
        raise SystemExit(f"harness failed (rc={rc}); its output: {log}")
    return jsonl


def _q(a: str) -> str:
    return f"'{a}'" if (" " in a or ("=" in a and "/" in a)) else a


def proxy_cmds(args: argparse.Namespace) -> list[str]:
    out = []
    for label, py, root in ((OLD, args.old_python, args.old_root),
                            (NEW, args.new_python, args.new_root)):
        out += ["--proxy-cmd",
                f"{label}={Path(py).absolute()} {Path(root).resolve() / 'bench' / 'proxy_pair.py'}"]
    return out


# ---- numbers --------------------------------------------------------------------------


def load(jsonl: Path) -> tuple[list[dict], dict]:
    recs = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
    summ_path = jsonl.with_name(jsonl.stem + "-summary.json")
    if summ_path.exists():
        return recs, json.loads(summ_path.read_text())
    # No summary (the run was stopped): rebuild one with the harness's own code.
    import importlib.util
    spec = importlib.util.spec_from_file_location("_bench", find_harness(None) / "bench.py")
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    if recs[0]["scenario"] == "overhead":
        summ = bench.summarize_overhead(bench.kept(recs), {}, {}, "direct")
        summ["rows_all_rounds"] = bench.summarize_overhead(recs, {}, {}, "direct")["rows"]
        summ["rounds_discarded_as_disturbed"] = len({(x["backend"], x["conns"], x["round"])
                                                     for x in recs if x.get("round_disturbed")})
    else:
        summ = bench.summarize_slow(bench.kept(recs), {}, {}, {}, "haproxy-rr")
        summ["rows_all_rounds"] = bench.summarize_slow(recs, {}, {}, {}, "haproxy-rr")["rows"]
        summ["rounds_discarded_as_disturbed"] = len({(x["variant"], x["round"])
                                                     for x in recs if x.get("round_disturbed")})
    summ["note"] = "summary rebuilt from the records (the run did not finish)"
    return recs, summ


def st(vals: list[float]) -> dict | None:
    v = [x for x in vals if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def cell(s: dict | None, fmt: str = "{:.0f}", scale: float = 1.0) -> str:
    if not s:
        return "–"
    med, lo, hi = s["median"] * scale, s["min"] * scale, s["max"] * scale
    if s.get("n", 1) == 1 or lo == hi:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(lo)}–{fmt.format(hi)}]"


def table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def cpu_per_req_overhead(x: dict) -> float | None:
    p = x["cpu_pct"]["proxy"]
    return None if p is None else p / 100.0 / x["result"]["rps"] * 1e6


def cpu_per_req_slow(x: dict) -> float | None:
    p, rate = x["cpu_pct"]["proxy"], x["result"].get("send_rate_achieved")
    return None if p is None or not rate else p / 100.0 / rate * 1e6


def rows_of(summ: dict, recs: list[dict],
            include_disturbed: bool) -> tuple[list[dict], list[dict], str]:
    kept = [x for x in recs if include_disturbed or not x.get("round_disturbed")]
    if include_disturbed and summ.get("rows_all_rounds"):
        return summ["rows_all_rounds"], kept, "all rounds (disturbed ones included)"
    if not summ.get("rows") and summ.get("rows_all_rounds"):
        kept = recs
        return summ["rows_all_rounds"], kept, "ALL ROUNDS WERE DISTURBED: figures include them"
    return summ.get("rows", []), kept, "undisturbed rounds only"


def paired(kept: list[dict], key, metric) -> dict[object, list[tuple[int, float]]]:
    """{group: [(round, new/old), ...]} for rounds where both rumor targets ran."""
    by: dict = {}
    for x in kept:
        if x["target"] in (OLD, NEW):
            by.setdefault((key(x), x["round"]), {})[x["target"]] = x
    out: dict = {}
    for (g, r), pair in sorted(by.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if OLD in pair and NEW in pair:
            a, b = metric(pair[OLD]), metric(pair[NEW])
            if a and b is not None:
                out.setdefault(g, []).append((r, b / a))
    return out


def own_clean(recs: list[dict], limit: float) -> list[dict]:
    """Records of rounds where both rumor runs themselves stayed under ``limit`` %
    unaccounted CPU (a round is flagged when ANY of its runs passed it)."""
    by: dict = {}
    for x in recs:
        key = (x.get("backend", x.get("variant")), x.get("conns"), x["round"])
        by.setdefault(key, []).append(x)
    out = []
    for grp in by.values():
        rum = [x for x in grp if x["target"] in (OLD, NEW)]
        if len(rum) == 2 and all((x["cpu_pct"]["unaccounted"] or 0) <= limit for x in rum):
            out += grp
    return out


def sign(pairs: list[tuple[int, float]], worse_if_above: bool) -> str:
    if not pairs:
        return "–"
    k = sum(1 for _, v in pairs if (v > 1) == worse_if_above and v != 1)
    return f"new worse in {k} of {len(pairs)}"


def ratio_cell(pairs: list[tuple[int, float]]) -> str:
    s = st([v for _, v in pairs])
    return cell(s, "{:.3f}") if s else "–"


def per_round(pairs: list[tuple[int, float]]) -> str:
    return " ".join(f"r{r}:{v:.3f}" for r, v in pairs)


def overhead_tables(jsonl: Path, args: argparse.Namespace) -> list[str]:
    recs, summ = load(jsonl)
    rows, kept, note = rows_of(summ, recs, args.include_disturbed)
    out = [f"## overhead — {jsonl}",
           f"rounds discarded as disturbed: {summ.get('rounds_discarded_as_disturbed', '?')}; "
           f"tables from: {note}"]
    groups = sorted({(r["backend"], r["conns"]) for r in rows}, key=lambda k: (k[0], k[1]))
    verdict = []
    for kind, conns in groups:
        trs = []
        for r in rows:
            if (r["backend"], r["conns"]) != (kind, conns):
                continue
            trs.append([r["target"], str(r["rounds"]), cell(r["rps"]),
                        cell(r.get("rps_ratio_vs_direct"), "{:.3f}"),
                        cell(r["p50_us"]), cell(r.get("p50_added_us_vs_direct"), "{:+.0f}"),
                        cell(r["p99_us"]), cell(r["proxy_cpu_pct"]),
                        cell(r.get("proxy_cpu_us_per_req"), "{:.0f}"),
                        cell(r.get("unaccounted_cpu_pct")), str(r["errors"])])
        out.append(f"\n### backend={kind}, wrk -c{conns}\n\n" + table(
            ["target", "rounds", "req/s", "÷ direct", "p50 µs", "p50 added µs", "p99 µs",
             "proxy CPU %", "proxy CPU µs/req", "unaccounted CPU %", "errors"], trs))
        sel = [x for x in kept if x["backend"] == kind and x["conns"] == conns]
        key = lambda x: 0  # noqa: E731
        base = {(x["round"]): x for x in sel if x["target"] == "direct"}

        def added(x: dict, base: dict = base) -> float | None:
            b = base.get(x["round"])
            return None if b is None else (x["result"]["latency_us"]["p50"]
                                           - b["result"]["latency_us"]["p50"])
        rps = paired(sel, key, lambda x: x["result"]["rps"]).get(0, [])
        cpu = paired(sel, key, cpu_per_req_overhead).get(0, [])
        p50 = paired(sel, key, lambda x: x["result"]["latency_us"]["p50"]).get(0, [])
        p99 = paired(sel, key, lambda x: x["result"]["latency_us"]["p99"]).get(0, [])
        add = paired(sel, key, added).get(0, [])
        allr = [x for x in recs if x["backend"] == kind and x["conns"] == conns]
        oc = own_clean(allr, args.max_unaccounted)
        base_all = {x["round"]: x for x in allr if x["target"] == "direct"}

        def added_all(x: dict, base_all: dict = base_all) -> float | None:
            b = base_all.get(x["round"])
            return None if b is None else (x["result"]["latency_us"]["p50"]
                                           - b["result"]["latency_us"]["p50"])
        mets = [("req/s", lambda x: x["result"]["rps"], False, rps),
                ("proxy CPU µs/req", cpu_per_req_overhead, True, cpu),
                ("p50", lambda x: x["result"]["latency_us"]["p50"], True, p50),
                ("p50 added over direct", added_all, True, add),
                ("p99", lambda x: x["result"]["latency_us"]["p99"], True, p99)]
        trs2 = []
        for name, fn, up, kept_pairs in mets:
            a_ = paired(allr, key, fn).get(0, [])
            c_ = paired(oc, key, fn).get(0, [])
            trs2.append([name, ratio_cell(kept_pairs), per_round(kept_pairs), ratio_cell(c_),
                         ratio_cell(a_), sign(a_, up)])
        out.append("\nnew/old, paired per round (median [range]). 'kept' = the harness's "
                   "undisturbed rounds; 'own-clean' = rounds where both rumor runs had "
                   f"≤ {args.max_unaccounted:.0f}% unaccounted CPU; 'all' = every round:\n\n"
                   + table(["metric", "kept", "kept per round", "own-clean", "all rounds",
                            "sign (all rounds)"], trs2))
        rs, cs = st([v for _, v in rps]), st([v for _, v in cpu])
        if rs:
            ok = rs["median"] >= 1 - args.bar_ratio
            verdict.append(f"c={conns}: req/s new/old {rs['median']:.3f} "
                           f"({'ok' if ok else 'FAILS'} ≥ {1 - args.bar_ratio:.2f})")
        if cs:
            ok = cs["median"] <= 1 + args.bar_ratio
            verdict.append(f"c={conns}: CPU/req new/old {cs['median']:.3f} "
                           f"({'ok' if ok else 'FAILS'} ≤ {1 + args.bar_ratio:.2f})")
        if conns == 1:
            for r in rows:
                if (r["backend"], r["conns"]) == (kind, 1) and r["target"] in (OLD, NEW):
                    a = r.get("p50_added_us_vs_direct")
                    if a:
                        ok = a["median"] <= args.bar_added_us
                        verdict.append(f"c=1: {r['target']} p50 added {a['median']:.0f} µs "
                                       f"({'ok' if ok else 'FAILS'} ≤ {args.bar_added_us:.0f})")
    out.append("\n**bars**: " + ("; ".join(verdict) or "no paired rounds"))
    return out


def slow_tables(jsonl: Path, args: argparse.Namespace) -> list[str]:
    recs, summ = load(jsonl)
    rows, kept, note = rows_of(summ, recs, args.include_disturbed)
    env = summ.get("env", {})
    rate = env.get("rate") or args.rate
    out = [f"## slow-backend at {rate} req/s — {jsonl}",
           f"rounds discarded as disturbed: {summ.get('rounds_discarded_as_disturbed', '?')}; "
           f"tables from: {note}"]
    variants: list[str] = []
    for r in rows:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    warn = []
    for v in variants:
        trs = []
        for r in rows:
            if r["variant"] != v:
                continue
            lag = r.get("send_lag_p99_ms")
            if lag and lag["max"] > args.max_send_lag_ms:
                warn.append(f"{v}/{r['target']}: loadgen send-lag p99 up to {lag['max']:.1f} ms")
            trs.append([r["target"], str(r["rounds"]), cell(r["p50_ms"], "{:.2f}"),
                        cell(r["p99_ms"], "{:.2f}"), cell(r["p99_9_ms"], "{:.1f}"),
                        cell(r["share_degraded"], "{:.3f}"),
                        cell(r.get("proxy_cpu_us_per_req"), "{:.0f}"),
                        cell(r["proxy_cpu_pct"]), cell(r.get("send_lag_p99_ms"), "{:.2f}"),
                        str(r["errors"]), str(r["non_200"])])
        spec = summ.get("variants", {}).get(v)
        desc = ""
        if spec:
            desc = " (" + ", ".join(
                f"{b['name']}: +{b['delay_ms']:g} ms"
                + (f", {b['slow_fraction']:g}×{b['slow_ms']:g} ms"
                   if b.get("slow_fraction") else "")
                for b in spec) + ")"
        out.append(f"\n### {v}{desc}\n\n" + table(
            ["target", "rounds", "p50 ms", "p99 ms", "p99.9 ms", "share degraded",
             "proxy CPU µs/req", "proxy CPU %", "send-lag p99 ms", "errors", "non-200"], trs))
        sel = [x for x in kept if x["variant"] == v]
        key = lambda x: 0  # noqa: E731
        allr = [x for x in recs if x["variant"] == v]
        oc = own_clean(allr, args.max_unaccounted)
        trs2 = []
        for name, fn in (("p99", lambda x: x["result"]["latency_ms"]["p99"]),
                         ("p99.9", lambda x: x["result"]["latency_ms"]["p99_9"]),
                         ("proxy CPU µs/req", cpu_per_req_slow)):
            k_ = paired(sel, key, fn).get(0, [])
            a_ = paired(allr, key, fn).get(0, [])
            c_ = paired(oc, key, fn).get(0, [])
            trs2.append([name, ratio_cell(k_), per_round(k_), ratio_cell(c_), ratio_cell(a_),
                         sign(a_, True)])
        out.append("\nnew/old, paired per round (kept / own-clean / all rounds, as above):\n\n"
                   + table(["metric", "kept", "kept per round", "own-clean", "all rounds",
                            "sign (all rounds)"], trs2))
    # vCPU: the proxy session of proxy_pair.py holds the caller agent, one callee agent
    # per backend and the (sleeping) wrapper. Each request crosses two sidecars.
    lines = []
    for r in rows:
        if r["target"] in (OLD, NEW) and r.get("proxy_cpu_us_per_req"):
            us = r["proxy_cpu_us_per_req"]["median"]
            n_agents = 1 + len(summ.get("variants", {}).get(r["variant"], [None] * 3))
            sess = us * rate / 1e6
            lines.append([r["variant"], r["target"], f"{us:.0f}", f"{sess:.3f}",
                          f"{sess / 2:.3f}", str(n_agents)])
    if lines:
        out.append(f"\n### vCPU at {rate} req/s\n\nsession = every process of the proxy "
                   "session (caller + one callee per backend + wrapper; gossip included); "
                   "per sidecar = session ÷ 2 (each request crosses two sidecars: the "
                   "caller's outbound and one callee's inbound).\n\n" + table(
                       ["variant", "target", "CPU µs/req", "session vCPU", "per sidecar vCPU",
                        "agents"], lines))
    if warn:
        out.append("\n**suspicious**: " + "; ".join(warn))
    return out


# ---- main -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-python")
    ap.add_argument("--old-root")
    ap.add_argument("--new-python")
    ap.add_argument("--new-root")
    ap.add_argument("--rounds", type=int, default=5, help="overhead rounds (default 5)")
    ap.add_argument("--slow-rounds", type=int, default=3, help="slow-backend rounds (default 3)")
    ap.add_argument("--results-dir", help="harness results go to DIR/overhead and DIR/slow")
    ap.add_argument("--harness", help="folder of bench.py (default: found from here)")
    ap.add_argument("--only", choices=["overhead", "slow", "both"], default="both")
    ap.add_argument("--conns", default="1,16")
    ap.add_argument("--duration", type=int, default=10, help="overhead: seconds per wrk run")
    ap.add_argument("--slow-duration", type=int, default=20)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--no-abba", action="store_true")
    ap.add_argument("--base-port", type=int, help="passed to the harness (default its own)")
    ap.add_argument("--extra", action="append", default=[],
                    help="an extra harness argument (repeatable), e.g. --extra=--tag=x")
    ap.add_argument("--tables-from", nargs="+", metavar="JSONL",
                    help="do not run: print the tables of these harness .jsonl files")
    ap.add_argument("--include-disturbed", action="store_true")
    ap.add_argument("--bar-ratio", type=float, default=0.05)
    ap.add_argument("--bar-added-us", type=float, default=300.0)
    ap.add_argument("--max-unaccounted", type=float, default=40.0,
                    help="for the 'own-clean' pairing (the harness's default)")
    ap.add_argument("--max-send-lag-ms", type=float, default=2.0)
    args = ap.parse_args(argv)

    if args.tables_from:
        for f in args.tables_from:
            p = Path(f)
            first = json.loads(p.read_text().splitlines()[0])
            lines = (overhead_tables(p, args) if first["scenario"] == "overhead"
                     else slow_tables(p, args))
            print("\n".join(lines) + "\n")
        return 0

    for need in ("old_python", "old_root", "new_python", "new_root", "results_dir"):
        if not getattr(args, need):
            ap.error(f"--{need.replace('_', '-')} is required (or --tables-from)")
    harness = find_harness(args.harness)
    res = Path(args.results_dir).resolve()
    res.mkdir(parents=True, exist_ok=True)
    print("# harness:", harness)
    for label, py, root in ((OLD, args.old_python, args.old_root),
                            (NEW, args.new_python, args.new_root)):
        print(f"# {label}: {git_rev(root)}; rumor from {check_build(label, py, root)}")
    common = ["--host-header", "bench", *proxy_cmds(args)]
    if not args.no_abba:
        common.append("--abba")
    if args.base_port:
        common += ["--base-port", str(args.base_port)]
    common += args.extra
    done: list[Path] = []
    if args.only in ("overhead", "both"):
        (res / "overhead").mkdir(exist_ok=True)
        done.append(run_harness(
            [sys.executable, str(harness / "bench.py"), "overhead",
             "--targets", f"direct,haproxy,{OLD},{NEW}", *common,
             "--rounds", str(args.rounds), "--conns", args.conns,
             "--duration", str(args.duration), "--results-dir", str(res / "overhead")],
            res / "overhead" / f"harness-stdout-{int(time.time())}.jsonl"))
    if args.only in ("slow", "both"):
        (res / "slow").mkdir(exist_ok=True)
        done.append(run_harness(
            [sys.executable, str(harness / "bench.py"), "slow-backend",
             "--targets", f"haproxy-rr,haproxy-leastconn,nginx-leastconn,{OLD},{NEW}",
             *common, "--rate", str(args.rate), "--duration", str(args.slow_duration),
             "--rounds", str(args.slow_rounds), "--results-dir", str(res / "slow")],
            res / "slow" / f"harness-stdout-{int(time.time())}.jsonl"))
    print()
    for p in done:
        first = json.loads(p.read_text().splitlines()[0])
        lines = (overhead_tables(p, args) if first["scenario"] == "overhead"
                 else slow_tables(p, args))
        print("\n".join(lines) + "\n")
    print("# re-print with: " + " ".join(
        [sys.argv[0], "--tables-from", *map(str, done)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
