"""Face index benchmark: train / encode / search time and peak memory, each phase in its own process.

    python bench/bench_index.py                 # small default run (50k vectors)
    python bench/bench_index.py --n 1000000     # the 1M-vector run
    python bench/bench_index.py --n 1000000 --memory-budget 268435456   # sharded encode under 256 MiB

faiss allocates outside Python's allocator, so tracemalloc sees none of it: every phase runs in a
fresh subprocess that loads its inputs, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``,
Linux), runs, and reports its peak resident set (``VmHWM``; ``ru_maxrss`` elsewhere) and how far
it rose above the resident set it started from. Where the mark cannot be reset the rise is measured against the
earlier peak instead (an underestimate). Results go to ``bench/results/index.json`` and a table.
Data are seeded synthetic identities (photolens.faceindex.synthetic), 20 faces per identity.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "index.json"


def _rss_peak_bytes() -> int:
    """Peak resident bytes: VmHWM (which clear_refs resets), else ru_maxrss (which it does not)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _baseline() -> int:
    """Resident bytes now, with the peak mark reset to it when the kernel allows."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "reset the peak resident set size" (proc(5))
        return _rss_now_bytes()
    except OSError:
        return _rss_peak_bytes()


def _config(args: argparse.Namespace) -> Any:
    from photolens.faceindex.index import IndexConfig

    return IndexConfig(
        train_size=args.train_size,
        opq_niter=args.opq_niter,
        opq_train_size=min(args.train_size, 20_000),
        pq_niter=args.pq_niter,
        seed=args.seed,
        threads=args.threads,
    )


# -- phases (run in child processes) ------------------------------------------------------------


def phase_train(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from photolens.faceindex import index as fi

    sample = np.load(work / "train.npy")
    base = _baseline()
    t0 = time.perf_counter()
    trained = fi.train(sample, _config(args))
    seconds = time.perf_counter() - t0
    (work / "trained.faiss").write_bytes(trained)
    return {"seconds": seconds, "rss_base": base, "rss_peak": _rss_peak_bytes(), "trained_bytes": len(trained)}


def _plan(n: int, d: int, args: argparse.Namespace) -> list[tuple[int, int]]:
    from photolens.faceindex import index as fi

    if args.memory_budget is None:
        return [(0, n)]
    return fi.plan_shards(n, d, args.memory_budget)


def phase_encode_shard(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One shard, as one remote task would encode it: the per-task peak the plan must bound."""
    from photolens.faceindex import index as fi

    x = np.load(work / "base.npy", mmap_mode="r")
    n, d = x.shape
    a, b = _plan(n, d, args)[0]
    shard = np.array(x[a:b])
    del x  # drop the mapping: only the shard stays resident, as in a task
    ids = np.load(work / "ids.npy")[a:b]
    trained = (work / "trained.faiss").read_bytes()
    base = _baseline()
    t0 = time.perf_counter()
    out = fi.encode_shard(trained, shard, ids)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "rss_base": base,
        "rss_peak": _rss_peak_bytes(),
        "rows": b - a,
        "shard_bytes": len(out),
        "planned_bytes": fi.encode_shard_bytes_estimate(b - a, d, d * 4 // 8),
    }


def phase_encode(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every shard in turn, then merge and serialize: what a single-process build costs."""
    from photolens.faceindex import index as fi

    x = np.load(work / "base.npy")
    ids = np.load(work / "ids.npy")
    trained = (work / "trained.faiss").read_bytes()
    plan = _plan(len(x), x.shape[1], args)
    base = _baseline()
    t0 = time.perf_counter()
    parts = [fi.encode_shard(trained, x[a:b], ids[a:b]) for a, b in plan]
    t1 = time.perf_counter()
    index = fi.merge(parts)
    del parts
    data = fi.serialize(index)
    t2 = time.perf_counter()
    (work / "index.faiss").write_bytes(data)
    return {
        "seconds": t2 - t0,
        "encode_seconds": t1 - t0,
        "merge_seconds": t2 - t1,
        "rss_base": base,
        "rss_peak": _rss_peak_bytes(),
        "n_shards": len(plan),
        "index_bytes": len(data),
    }


def phase_search(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    from photolens.faceindex import index as fi

    queries = np.load(work / "queries.npy")
    data = (work / "index.faiss").read_bytes()
    base = _baseline()
    t0 = time.perf_counter()
    index = fi.deserialize(data)
    del data
    t1 = time.perf_counter()
    _, users = fi.search(index, queries, k=args.k)
    t2 = time.perf_counter()
    peak = _rss_peak_bytes()
    # Exact search over the float32 vectors, for the recall report and a speed reference.
    x = np.load(work / "base.npy")
    t3 = time.perf_counter()
    _, exact = faiss.knn(queries, x, 1)
    t4 = time.perf_counter()
    _, approx = faiss.downcast_index(index.index).search(queries, 5)
    recall = {f"recall_at_{k}": float(np.mean((approx[:, :k] == exact[:, :1]).any(axis=1))) for k in (1, 5)}
    q_ids = np.load(work / "query_ids.npy")
    return {
        "seconds": t2 - t1,
        "load_seconds": t1 - t0,
        "rss_base": base,
        "rss_peak": peak,
        "queries": len(queries),
        "ms_per_query": 1000 * (t2 - t1) / len(queries),
        "exact_ms_per_query": 1000 * (t4 - t3) / len(queries),
        "identity_top5": float(np.mean((users == q_ids[:, None]).any(axis=1))),
        **recall,
    }


PHASES = {
    "train": phase_train,
    "encode_shard": phase_encode_shard,
    "encode": phase_encode,
    "search": phase_search,
}


# -- driver --------------------------------------------------------------------------------------


def _run_phase(name: str, work: Path, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--work", str(work), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["rss_delta"] = result["rss_peak"] - result["rss_base"]
    return result


def _prepare(work: Path, args: argparse.Namespace) -> None:
    from photolens.faceindex.synthetic import make_identities, sample_faces

    n_ids = max(1, args.n // 20)
    data = make_identities(n_ids, 20, d=args.d, seed=args.seed)
    x = data.embeddings[: args.n]
    np.save(work / "base.npy", x)
    np.save(work / "ids.npy", data.labels[: args.n])
    rng = np.random.default_rng(args.seed + 1)
    rows = np.sort(rng.choice(len(x), min(args.train_size, len(x)), replace=False))
    np.save(work / "train.npy", x[rows])
    q_ids = rng.integers(0, int(data.labels[: args.n].max()) + 1, args.queries)
    np.save(work / "queries.npy", sample_faces(data.centres, q_ids, seed=args.seed + 2))
    np.save(work / "query_ids.npy", q_ids)


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="vectors in the index (1000000 for the full run)")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--opq-niter", type=int, default=5)
    parser.add_argument("--pq-niter", type=int, default=15)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads while training")
    parser.add_argument("--memory-budget", type=int, default=None, help="bytes per encode task: shard to fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:  # child process: one phase, one JSON line
        print(json.dumps(PHASES[args.phase](args.work, args)))
        return 0

    passthrough = [
        f"--n={args.n}",
        f"--d={args.d}",
        f"--train-size={args.train_size}",
        f"--opq-niter={args.opq_niter}",
        f"--pq-niter={args.pq_niter}",
        f"--k={args.k}",
        f"--seed={args.seed}",
        *([f"--threads={args.threads}"] if args.threads else []),
        *([f"--memory-budget={args.memory_budget}"] if args.memory_budget else []),
    ]
    from photolens.faceindex.index import default_factory

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        _prepare(work, args)
        prepare_s = time.perf_counter() - t0
        phases = {name: _run_phase(name, work, passthrough) for name in PHASES}

    n, d = args.n, args.d
    index_bytes = phases["encode"]["index_bytes"]
    report = {
        "bench": "faceindex",
        "factory": default_factory(d),
        "n": n,
        "d": d,
        "train_size": min(args.train_size, n),
        "opq_niter": args.opq_niter,
        "pq_niter": args.pq_niter,
        "threads": args.threads,
        "memory_budget": args.memory_budget,
        "float32_bytes": n * d * 4,
        "index_bytes": index_bytes,
        "bytes_per_vector": index_bytes / n,  # codes + the int64 id + codebooks spread over n
        "code_bytes_per_vector": d * 4 // 8,
        "compression_vs_float32": n * d * 4 / index_bytes,
        "prepare_seconds": prepare_s,
        "phases": phases,
        "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count()},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{report['factory']}  n={n:,}  d={d}  index {index_bytes / 2**20:.1f} MiB ", end="")
    print(
        f"({report['code_bytes_per_vector']} B code + 8 B id per vector: "
        f"{report['compression_vs_float32']:.2f}x smaller than float32 overall)"
    )
    print(f"{'phase':<14}{'seconds':>10}{'peak MiB':>10}{'+MiB':>10}  notes")
    for name, r in phases.items():
        if name == "train":
            note = f"train_size={report['train_size']:,}"
        elif name == "encode_shard":
            note = f"rows={r['rows']:,} planned {_mib(r['planned_bytes']).strip()} MiB"
        elif name == "encode":
            note = f"shards={r['n_shards']} merge {r['merge_seconds']:.2f}s"
        else:
            note = (
                f"{r['ms_per_query']:.2f} ms/q (exact {r['exact_ms_per_query']:.2f}) "
                f"R@1 {r['recall_at_1']:.3f} R@5 {r['recall_at_5']:.3f} id@5 {r['identity_top5']:.3f}"
            )
        print(f"{name:<14}{r['seconds']:>10.2f}{_mib(r['rss_peak']):>10}{_mib(r['rss_delta']):>10}  {note}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
