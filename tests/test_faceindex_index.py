"""OPQ/PQ face index: compression, recall vs exact search, sharded builds, forgetting, artifacts."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow.fs as pafs
import pytest

from photolens.faceindex import index as fi
from photolens.faceindex.artifacts import IndexStore, IntegrityError
from photolens.faceindex.synthetic import make_identities, sample_faces

# Small, fast codec for the unit tests: 32-d, OPQ16,PQ16x8np (8x), 10k training points so every
# 256-word codebook gets the ~39 points per centroid faiss asks for.
D_SMALL = 32
FAST = fi.IndexConfig(train_size=10_000, opq_niter=3, opq_train_size=10_000, pq_niter=10, seed=0, threads=1)


def _codes(index: faiss.Index) -> np.ndarray:
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    pq = faiss.downcast_index(inner.index) if isinstance(inner, faiss.IndexPreTransform) else inner
    return faiss.vector_to_array(pq.codes)


def _id_map(index: faiss.Index) -> np.ndarray:
    return faiss.vector_to_array(faiss.downcast_index(index).id_map)


@pytest.fixture(scope="module")
def small_data() -> tuple[np.ndarray, np.ndarray]:
    s = make_identities(2_000, 6, d=D_SMALL, noise=0.55, seed=11)
    return s.embeddings, s.labels


@pytest.fixture(scope="module")
def small_trained(small_data: tuple[np.ndarray, np.ndarray]) -> bytes:
    return fi.train(small_data[0], FAST)


def test_default_factory_is_8x_compression() -> None:
    assert fi.default_factory(128) == "OPQ64,PQ64x8np"  # 512 B float32 -> 64 B codes
    assert fi.default_factory(512) == "OPQ256,PQ256x8np"
    assert fi.default_factory(128, compression=16) == "OPQ32,PQ32x8np"
    with pytest.raises(ValueError, match="whole number"):
        fi.default_factory(128, compression=3)
    with pytest.raises(ValueError, match="whole number"):
        fi.default_factory(130, compression=5)  # 104 bytes do not split 130 dims into equal parts


def test_trained_codec_has_polysemous_off_and_8x_codes(small_trained: bytes) -> None:
    index = fi.deserialize(small_trained)
    assert isinstance(faiss.downcast_index(index), faiss.IndexIDMap)
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    assert isinstance(inner, faiss.IndexPreTransform)
    # The learnt OPQ rotation (read back as its LinearTransform base): orthonormal, d x d.
    rotation = faiss.downcast_VectorTransform(inner.chain.at(0))
    assert isinstance(rotation, faiss.LinearTransform) and rotation.is_trained
    a = faiss.vector_to_array(rotation.A).reshape(D_SMALL, D_SMALL)
    np.testing.assert_allclose(a @ a.T, np.eye(D_SMALL), atol=1e-4)
    pq = faiss.downcast_index(inner.index)
    assert isinstance(pq, faiss.IndexPQ)
    assert not pq.do_polysemous_training
    assert (pq.pq.M, pq.pq.nbits) == (16, 8)
    assert inner.sa_code_size() * 8 == D_SMALL * 4
    assert index.is_trained and index.ntotal == 0


def test_training_is_seeded(small_data: tuple[np.ndarray, np.ndarray]) -> None:
    quick = fi.IndexConfig(train_size=2_560, opq_niter=1, opq_train_size=2_560, pq_niter=2, seed=3, threads=1)
    first, again = (fi.deserialize(fi.train(small_data[0], quick)) for _ in range(2))
    other = fi.deserialize(fi.train(small_data[0], fi.IndexConfig(**{**quick.__dict__, "seed": 4})))
    assert fi.codec_fingerprint(first) == fi.codec_fingerprint(again) != fi.codec_fingerprint(other)


def test_shard_plan_under_small_budget_merges_to_single_shot(
    small_data: tuple[np.ndarray, np.ndarray], small_trained: bytes
) -> None:
    x, labels = small_data
    n, d = x.shape
    code_bytes = d * 4 // 8
    budget = 400_000
    plan = fi.plan_shards(n, d, budget, code_bytes=code_bytes)
    assert len(plan) >= 3
    assert plan[0][0] == 0 and plan[-1][1] == n
    assert all(a < b for a, b in plan)
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(plan))
    fixed = 2 * 4 * (d * d + 256 * d)
    assert all(fixed + fi.encode_shard_bytes_estimate(b - a, d, code_bytes) <= budget for a, b in plan)
    assert fi.plan_shards(n, d, 10**12) == [(0, n)]
    with pytest.raises(ValueError, match="cannot encode one"):
        fi.plan_shards(n, d, 10_000)

    ids = labels + 1_000
    single = fi.merge([fi.encode_shard(small_trained, x, ids)])
    sharded = fi.merge([fi.encode_shard(small_trained, x[a:b], ids[a:b]) for a, b in plan])
    assert sharded.ntotal == single.ntotal == n
    np.testing.assert_array_equal(_codes(sharded), _codes(single))
    np.testing.assert_array_equal(_id_map(sharded), _id_map(single))
    assert fi.serialize(sharded) == fi.serialize(single)


def test_build_index_shards_instead_of_failing(small_data: tuple[np.ndarray, np.ndarray]) -> None:
    x, labels = small_data
    built = fi.build_index(x, labels, FAST, memory_budget_bytes=400_000)
    car = built.sidecar
    assert car["n_shards"] >= 3
    assert built.index_bytes == fi.serialize(fi.merge([fi.encode_shard(built.trained_bytes, x, labels)]))
    assert car["n"] == len(x) and car["d"] == D_SMALL and car["n_ids"] == len(np.unique(labels))
    assert car["code_bytes"] == 16 and car["compression_ratio"] == 8.0
    assert car["train_size"] == 10_000 and car["factory"] == "OPQ16,PQ16x8np"
    assert car["memory_bytes"] == len(built.index_bytes)
    assert car["eval_mode"] == "leave_one_out" and car["n_eval_queries"] == 1_000
    assert 0.5 < car["recall_at_1"] <= car["recall_at_5"] <= 1.0
    json.dumps(car)  # the sidecar must be plain JSON


def test_merge_refuses_shards_from_another_codec(
    small_data: tuple[np.ndarray, np.ndarray], small_trained: bytes
) -> None:
    x, labels = small_data
    other = fi.train(
        x, fi.IndexConfig(train_size=2_560, opq_niter=1, opq_train_size=2_560, pq_niter=2, seed=7, threads=1)
    )
    a = fi.encode_shard(small_trained, x[:100], labels[:100])
    b = fi.encode_shard(other, x[100:200], labels[100:200])
    with pytest.raises(ValueError, match="different trained codec"):
        fi.merge([a, b])
    with pytest.raises(ValueError, match="empty trained index"):
        fi.encode_shard(a, x[:10], labels[:10])


def test_search_returns_distinct_users_at_their_best_vector(small_trained: bytes) -> None:
    rng = np.random.default_rng(3)
    query = rng.standard_normal((1, D_SMALL)).astype(np.float32)
    query /= np.linalg.norm(query)
    # User 7 owns 40 vectors all closer to the query than anyone else's: a raw top-5 would be all 7s.
    near = query + 0.05 * rng.standard_normal((40, D_SMALL)).astype(np.float32)
    far = rng.standard_normal((200, D_SMALL)).astype(np.float32)
    vectors = np.concatenate([near, far])
    ids = np.concatenate([np.full(40, 7), np.arange(100, 300)])
    index = fi.merge([fi.encode_shard(small_trained, vectors, ids)])
    dist, found = fi.search(index, query, k=5, overfetch=1)
    assert found[0, 0] == 7
    assert len(set(found[0].tolist())) == 5 and -1 not in found[0]
    assert np.all(np.diff(dist[0]) >= 0)
    exact = np.sqrt(((vectors - query) ** 2).sum(axis=1))
    assert dist[0, 0] == pytest.approx(exact[:40].min(), abs=0.1)  # compressed, so roughly
    # Asking for more users than exist fills the tail with -1 / inf.
    dist, found = fi.search(fi.merge([fi.encode_shard(small_trained, near, np.full(40, 7))]), query, k=3)
    assert found[0].tolist() == [7, -1, -1] and np.isinf(dist[0, 1:]).all()


def test_remove_ids_forgets_every_vector_of_a_user(small_trained: bytes) -> None:
    rng = np.random.default_rng(5)
    s = make_identities(300, rng.integers(1, 6, size=300), d=D_SMALL, seed=5)
    users = [f"user-{i}" for i in range(300)]
    keys = np.array([fi.user_key(users[i]) for i in s.labels], dtype=np.int64)
    index = fi.merge([fi.encode_shard(small_trained, s.embeddings, keys)])
    forget = [users[3], users[42]]
    forget_keys = {fi.user_key(u) for u in forget}
    n_vectors = int(np.isin(keys, list(forget_keys)).sum())
    assert n_vectors >= 2
    assert fi.remove_ids(index, sorted(forget_keys)) == n_vectors
    assert index.ntotal == len(keys) - n_vectors
    assert forget_keys.isdisjoint(set(_id_map(index).tolist()))
    # Their own faces now find other people; everyone else still finds themselves.
    _, found = fi.search(index, s.embeddings[np.isin(keys, list(forget_keys))], k=5)
    assert forget_keys.isdisjoint(set(found.ravel().tolist()))
    kept = ~np.isin(keys, list(forget_keys))
    _, found = fi.search(index, s.embeddings[kept][:200], k=1)
    assert np.mean(found[:, 0] == keys[kept][:200]) > 0.95
    assert fi.remove_ids(index, []) == 0


def test_user_key_is_stable_and_valid() -> None:
    assert fi.user_key("alice") == fi.user_key("alice") != fi.user_key("bob")
    assert 0 <= fi.user_key("alice") < 2**63
    assert fi.user_key(12345) == 12345
    with pytest.raises(ValueError, match="out of range"):
        fi.user_key(-1)


def test_recall_held_out_matches_hand_count(small_data: tuple[np.ndarray, np.ndarray], small_trained: bytes) -> None:
    x, labels = small_data
    index = fi.merge([fi.encode_shard(small_trained, x, labels)])
    q = sample_faces(make_identities(2_000, 1, d=D_SMALL, seed=11).centres, np.arange(50), seed=2)
    report = fi.evaluate_recall(index, x, q, ks=(1, 5))
    exact = np.argmin(((q[:, None, :] - x[None, :, :]) ** 2).sum(-1), axis=1)
    _, approx = faiss.downcast_index(index.index).search(q, 5)
    assert report["recall_at_5"] == pytest.approx(np.mean([e in row for e, row in zip(exact, approx, strict=True)]))
    assert report["recall_at_1"] == pytest.approx(np.mean(exact == approx[:, 0]))
    assert report["eval_mode"] == "held_out" and report["n_eval_queries"] == 50


@pytest.mark.slow
def test_pq_8x_on_200k_keeps_recall_and_identity_top5() -> None:
    """200k synthetic 128-d faces: 8x OPQ/PQ vs exact search on held-out queries."""
    n_ids, per_id = 10_000, 20
    data = make_identities(n_ids, per_id, d=128, noise=0.55, seed=2024)
    assert len(data.embeddings) == 200_000
    cfg = fi.IndexConfig(train_size=10_000, opq_niter=3, opq_train_size=10_000, pq_niter=10, seed=1, threads=1)
    rng = np.random.default_rng(9)
    q_ids = rng.integers(0, n_ids, 1_000)
    # Held-out faces of known people, noisier than the gallery (cos to their centre ≈ 0.4), so the
    # identity task is not trivially solved by exact search either.
    queries = sample_faces(data.centres, q_ids, noise=2.2, seed=10)
    built = fi.build_index(data.embeddings, data.labels, cfg, queries=queries)
    car = built.sidecar
    assert car["compression_ratio"] == 8.0 and car["code_bytes"] == 64
    assert car["memory_bytes"] < 200_000 * (64 + 8) * 1.05  # codes + ids, nothing else of size n
    assert car["recall_at_5"] >= 0.95, car

    exact = faiss.IndexIDMap(faiss.IndexFlatL2(128))
    exact.add_with_ids(data.embeddings, data.labels)
    _, exact_top = fi.search(exact, queries, k=5)
    _, pq_top = fi.search(built.index, queries, k=5)
    exact_rate = float(np.mean((exact_top == q_ids[:, None]).any(axis=1)))
    pq_rate = float(np.mean((pq_top == q_ids[:, None]).any(axis=1)))
    assert 0.8 < exact_rate < 1.0  # the task is neither trivial nor hopeless
    assert pq_rate >= exact_rate - 0.01, (pq_rate, exact_rate)


# -- artifacts ---------------------------------------------------------------------------------


def _two_versions(store: IndexStore, small_data: tuple[np.ndarray, np.ndarray], trained: bytes) -> list[bytes]:
    x, labels = small_data
    first = fi.serialize(fi.merge([fi.encode_shard(trained, x[:3_000], labels[:3_000])]))
    second = fi.serialize(fi.merge([fi.encode_shard(trained, x, labels)]))
    assert first != second
    return [first, second]


def _exercise_store(store: IndexStore, blobs: list[bytes]) -> None:
    assert store.current() is None and store.list_versions() == []
    with pytest.raises(LookupError):
        store.load()
    v1 = store.put_version(blobs[0], {"n": 3_000}, extra_files={"codec.faiss": b"codec-1"})
    v2 = store.put_version(blobs[1], {"n": 12_000})
    assert store.list_versions() == sorted([v1, v2])
    assert store.current() is None  # stored is not published
    store.publish(v1)
    store.publish(v2)
    loaded = store.load()
    assert loaded.version == v2 and loaded.sidecar == {"n": 12_000}
    assert hashlib.sha256(loaded.index_bytes).hexdigest() == hashlib.sha256(blobs[1]).hexdigest()
    assert loaded.index().ntotal == 12_000

    assert store.rollback() == v1
    restored = store.load()
    assert restored.version == v1 == store.current()
    assert hashlib.sha256(restored.index_bytes).hexdigest() == hashlib.sha256(blobs[0]).hexdigest()
    assert restored.index_bytes == blobs[0]
    assert store.load_extra(v1, "codec.faiss") == b"codec-1"
    with pytest.raises(LookupError, match="no earlier"):
        store.rollback()
    assert [e["action"] for e in store.history()] == ["publish", "publish", "rollback"]
    info = store.info()
    assert info["current"] == v1 and info["versions"] == sorted([v1, v2]) and info["sidecar"] == {"n": 3_000}
    with pytest.raises(KeyError):
        store.publish("20000101T000000000000Z-000000000000")


def test_store_publish_rollback_local(
    tmp_path: Path, small_data: tuple[np.ndarray, np.ndarray], small_trained: bytes
) -> None:
    store = IndexStore(str(tmp_path / "faceindex"))
    _exercise_store(store, _two_versions(store, small_data, small_trained))
    # The pointer is one small JSON file, replaced by rename: no temp files are left behind.
    assert sorted(p.name for p in (tmp_path / "faceindex").iterdir()) == ["CURRENT", "HISTORY", "versions"]


def test_store_on_an_object_store_filesystem(small_data: tuple[np.ndarray, np.ndarray], small_trained: bytes) -> None:
    # pyarrow's in-memory mock filesystem behaves like an object store here: no rename path.
    store = IndexStore("mock://bucket/faceindex", filesystem=pafs._MockFileSystem())
    _exercise_store(store, _two_versions(store, small_data, small_trained))


def test_store_refuses_corrupt_or_unfinished_versions(tmp_path: Path) -> None:
    root = tmp_path / "faceindex"
    store = IndexStore(str(root))
    good = store.put_version(b"index-bytes-1", {"v": 1})
    store.publish(good)
    bad = store.put_version(b"index-bytes-2", {"v": 2})
    (root / "versions" / bad / "index.faiss").write_bytes(b"index-bytes-X")  # bit rot / torn upload
    with pytest.raises(IntegrityError):
        store.load(bad)
    with pytest.raises(IntegrityError):
        store.publish(bad)
    assert store.current() == good  # a refused publish leaves readers where they were
    # A version whose sidecar was never written is an unfinished upload: invisible.
    shutil.copytree(root / "versions" / good, root / "versions" / "99990101T000000000000Z-unfinished")
    (root / "versions" / "99990101T000000000000Z-unfinished" / "sidecar.json").unlink()
    assert store.list_versions() == sorted([good, bad])
    with pytest.raises(ValueError, match="bad extra file name"):
        store.put_version(b"x", {}, extra_files={"../escape": b""})


@pytest.mark.s3
@pytest.mark.slow
def test_store_on_local_s3(tmp_path: Path, small_data: tuple[np.ndarray, np.ndarray], small_trained: bytes) -> None:
    seaweed = pytest.importorskip("photolens.lake.seaweed")
    try:
        seaweed.weed_binary()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    with seaweed.LocalS3(tmp_path / "s3") as s3:
        s3.create_bucket("faceindex")
        fs = s3.settings().pyarrow_fs()
        store = IndexStore("s3://faceindex/prod", filesystem=fs)
        _exercise_store(store, _two_versions(store, small_data, small_trained))


# ---------------------------------------------------------------------------------------------- below the codec's size


def test_few_vectors_give_an_exact_flat_index_with_the_same_artifacts(tmp_path: Path) -> None:
    s = make_identities(5, 3, d=128, seed=4)  # five users, 15 template vectors: far below 256
    ids = np.array([fi.user_key(f"user-{i}") for i in s.labels], dtype=np.int64)
    assert fi.min_train_vectors(128) == 256
    built = fi.build_index(s.embeddings, ids, fi.IndexConfig(threads=1))
    car = built.sidecar
    assert (car["kind"], car["factory"], car["factory_requested"]) == ("flat", fi.FLAT_FACTORY, "OPQ64,PQ64x8np")
    assert car["recall_at_1"] == car["recall_at_5"] == 1.0 and car["n"] == 15 and car["n_ids"] == 5
    assert car["code_bytes"] == 4 * 128  # float32 vectors, nothing compressed
    # Exact: the distances are the true L2 distances to each user's nearest vector.
    q = sample_faces(s.centres, np.array([0, 3]), seed=9)
    dist, got = fi.search(built.index, q, k=5)
    for row in range(len(q)):
        best = {}
        for v, uid in zip(s.embeddings, ids, strict=True):
            best[uid] = min(best.get(uid, np.inf), float(np.linalg.norm(q[row] - v)))
        order = sorted(best, key=best.get)
        assert got[row].tolist() == order
        np.testing.assert_allclose(dist[row], [best[u] for u in order], rtol=1e-5)
    # Forgetting works the same way.
    assert fi.remove_ids(built.index, [ids[0]]) == 3 and built.index.ntotal == 12
    # Same store, publish and rollback as the OPQ index.
    store = IndexStore(str(tmp_path / "faceindex"))
    v1 = store.put_version(built.index_bytes, car, extra_files={"codec.faiss": built.trained_bytes})
    store.publish(v1)
    loaded = store.load(v1)
    assert loaded.sidecar["kind"] == "flat" and loaded.index().ntotal == 15


def test_the_codec_is_trained_once_enough_vectors_exist() -> None:
    small = make_identities(40, 6, d=D_SMALL, seed=5).embeddings  # 240 < 256
    enough = make_identities(50, 6, d=D_SMALL, seed=5).embeddings  # 300 >= 256
    quick = fi.IndexConfig(opq_niter=1, pq_niter=2, threads=1)
    assert fi.index_kind(fi.deserialize(fi.train(small, quick))) == "flat"
    trained = fi.deserialize(fi.train(enough, quick))
    assert fi.index_kind(trained) == "opq" and trained.is_trained and trained.sa_code_size() == 16
    # A raised floor keeps exact search longer; a factory without OPQ needs only its own codewords.
    assert fi.index_kind(fi.deserialize(fi.train(enough, fi.IndexConfig(flat_below=1_000, threads=1)))) == "flat"
    assert fi.min_train_vectors(D_SMALL, fi.IndexConfig(factory="PQ16x4np")) == 16
    with pytest.raises(ValueError, match="no vectors"):
        fi.train(np.zeros((0, D_SMALL), dtype=np.float32))


@pytest.mark.slow
def test_index_build_and_suggest_for_a_new_deployment_with_a_few_users(ray_local: None, tmp_path: Path) -> None:
    """``index build`` on a lake with four users' templates (12 vectors), then friend suggestions with its codec;
    the next build with enough training vectors trains OPQ and publishes over it; rollback returns to flat."""
    import pyarrow as pa

    from photolens.jobs.index import CODEC_FILE, IndexBuildConfig, build_face_index
    from photolens.jobs.suggest import suggest_for_uploaders
    from photolens.lake.delta import Lake

    s = make_identities(4, 3, d=128, seed=21)
    users = [f"user-{i}" for i in range(4)]
    lake = Lake(str(tmp_path / "lake"))
    templates = {u: s.embeddings[s.labels == i] for i, u in enumerate(users)}
    lake.append("templates", pa.table({
        "user_id": users, "status": ["ok"] * 4, "vectors": [t.tolist() for t in templates.values()],
        "member_face_ids": [[f"{u}-f{k}" for k in range(3)] for u in users],
        "embedding_model": ["dlib_resnet34@test"] * 4, "run_id": ["t1"] * 4}))
    store_uri = str(tmp_path / "faceindex")
    first = build_face_index(IndexBuildConfig(lake=lake.root, index_store=store_uri, publish=True, run_id="i1"))
    side = first["sidecar"]
    assert side["kind"] == "flat" and side["n"] == 12 and side["n_users"] == 4 and side["recall_at_1"] == 1.0

    store = IndexStore(store_uri)
    codec = store.load_extra(first["version"], CODEC_FILE)
    faces = sample_faces(s.centres, np.array([1, 1, 3]), seed=2)
    groups = [("uploader", ["p1", "p1", "p2"], ["a", "b", "c"], faces)]
    rows, _ = suggest_for_uploaders(codec, groups, {"uploader": users}, templates, threshold=1.0)
    by_face = {r["face_id"]: r for r in rows}
    assert by_face["a"]["candidates"][0] == by_face["b"]["candidates"][0] == "user-1"
    assert by_face["c"]["candidates"][0] == "user-3" and by_face["c"]["verified_user_id"] == "user-3"
    assert len(by_face["a"]["candidates"]) == 4  # every friend, nearest first

    padding = make_identities(60, 5, d=128, seed=22).embeddings  # training pool only: 312 vectors in all
    second = build_face_index(IndexBuildConfig(lake=lake.root, index_store=store_uri, publish=True, run_id="i2",
                                               opq_niter=2), extra_training=padding)
    assert second["sidecar"]["kind"] == "opq" and second["sidecar"]["factory"] == "OPQ64,PQ64x8np"
    assert second["sidecar"]["n"] == 12 and store.current() == second["version"]
    store.rollback()
    assert store.current() == first["version"] and store.sidecar(store.current())["kind"] == "flat"
