"""The tagging job on a simulated 3-node Ray cluster, one worker node killed mid-run (run by test_faults.py).

    python tests/faultcluster.py --photos s3://b/users/ --lake s3://l/lake --run-id r1 --out result.json

Runs in its own process (with its own RAY_TMPDIR) so the test session's Ray is never touched. A watcher
thread lists the run's staged Parquet files in the photos table; once ``--kill-after`` batches are written
it SIGKILLs every process of the worker node hosting the write actor (``Cluster.remove_node``, not
graceful). Ray Data restarts the lost actors and retries their tasks; the job must still commit exactly its
manifest. The result JSON holds the run report, what was killed when, and what became of those actors.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any


def _actors_on(node_id: str) -> list[dict[str, Any]]:
    from ray._private import state

    return [a for a in state.actors().values() if a["Address"]["NodeID"] == node_id and a["State"] == "ALIVE"]


def _used_cpus(node_id: str) -> float:
    from ray._private import state

    total = state.total_resources_per_node().get(node_id, {}).get("CPU", 0.0)
    free = state.available_resources_per_node().get(node_id, {}).get("CPU", 0.0)
    return float(total) - float(free)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", required=True)
    ap.add_argument("--lake", required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kill-after", type=int, default=2, help="staged batches before the kill")
    args = ap.parse_args()

    import ray
    from pyarrow.fs import FileSelector
    from ray.cluster_utils import Cluster

    from photolens.jobs.tag import TagConfig, run_tag
    from photolens.lake.delta import Lake
    from photolens.lake.storage import filesystem_for

    # A head without CPUs (the driver's node) and two 1-CPU workers: every pipeline actor runs on a worker, and
    # the job's CPU requests shrink to fit (fit_cpus), so one surviving worker can still host every pool.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)

    lake = Lake(args.lake)
    # rows_per_file=2: one staged file per 2-photo batch, so the kill comes with most of the run still to write.
    cfg = TagConfig(photos=args.photos, lake=args.lake, run_id=args.run_id, stages=("decode",), batch_size=2,
                    rows_per_file=2, progress=False, fetch_base_delay_s=0.01, cpu_actors=2, max_actors=2)
    killed: dict[str, Any] = {}
    stop = threading.Event()

    def watch_and_kill() -> None:
        fs, root = filesystem_for(lake.table_uri("photos"))
        while not stop.is_set():
            try:
                infos = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
            except OSError:
                infos = []
            staged = [i for i in infos if i.base_name.startswith(f"part-{args.run_id}-")]
            actors = {n.node_id: _actors_on(n.node_id) for n in workers} if len(staged) >= args.kill_after else {}
            # The worker hosting the write actor: writing Parquet to the store is the slowest stage of a
            # decode-only run, so that actor always has batches in flight, and they must be recovered.
            victims = [n for n in workers if any("WriteUDF" in a["ActorClassName"] for a in actors.get(n.node_id, []))]
            if victims:
                victim = victims[0]
                used = _used_cpus(victim.node_id)
                on_victim = actors[victim.node_id]
                killed.update(node_id=victim.node_id, used_cpus=used, staged_at_kill=len(staged),
                              actors=[{"id": a["ActorID"], "class": a["ActorClassName"]} for a in on_victim],
                              at=time.time())
                cluster.remove_node(victim, allow_graceful=False)
                killed["removed_at"] = time.time()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_and_kill, name="node-killer", daemon=True)
    watcher.start()
    try:
        report = run_tag(cfg)
        finished = time.time()
    finally:
        stop.set()
        watcher.join(timeout=60)
    # What became of the killed node's actors (Ray restarts them elsewhere; NumRestarts counts it).
    from ray._private import state

    table = state.actors()
    fates = {a["id"]: {"restarts": table[a["id"]]["NumRestarts"], "state": table[a["id"]]["State"]}
             for a in killed.get("actors", []) if a["id"] in table}
    pipeline = [{"class": a["ActorClassName"], "node_id": a["Address"]["NodeID"], "restarts": a["NumRestarts"]}
                for a in table.values() if "MapBatches" in a["ActorClassName"]]
    with open(args.out, "w") as f:
        json.dump({"report": json.loads(report.to_json()), "killed": killed, "finished_at": finished,
                   "fates": fates, "pipeline_actors": pipeline}, f)
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
