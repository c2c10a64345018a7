"""Owner templates, friend suggestions on compressed templates, verification, the burst cache."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from realdata import dlib_embeddings

from photolens.faceindex import index as fi
from photolens.faceindex.suggest import (
    FriendIndexCache,
    best_distances,
    build_friend_index,
    calibrate_threshold,
    verify,
)
from photolens.faceindex.synthetic import CLUSTER_THRESHOLD, make_identities, sample_faces
from photolens.faceindex.templates import (
    NoTemplate,
    NoTemplateReason,
    Template,
    TemplateConfig,
    build_owner_template,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
D = 64
SYNTH = TemplateConfig(threshold=CLUSTER_THRESHOLD)  # the synthetic faces' cut, not dlib's


# -- templates ---------------------------------------------------------------------------------


def _profile(
    owner_photos: int, n_photos: int, *, seed: int, extra_people: int = 1
) -> tuple[np.ndarray, np.ndarray, list[str], list[str], np.ndarray]:
    """Faces on ``n_photos`` profile photos: the owner (identity 0) on the first ``owner_photos``.

    Every photo also shows ``extra_people`` random others (friends recur, strangers do not).
    Returns embeddings, weights, face ids, photo ids, true identity per face.
    """
    people = make_identities(40, 40, d=D, seed=seed)
    rng = np.random.default_rng(seed)
    used = np.zeros(40, dtype=int)
    emb, who, photos = [], [], []
    for p in range(n_photos):
        present = ([0] if p < owner_photos else []) + list(rng.choice(np.arange(1, 40), extra_people, replace=False))
        for person in present:
            emb.append(people.embeddings[person * 40 + used[person]])
            used[person] += 1
            who.append(person)
            photos.append(f"photo-{p}")
    order = rng.permutation(len(emb))  # faces of a photo come in no particular order
    emb_arr = np.stack(emb)[order]
    who_arr = np.asarray(who)[order]
    photo_ids = [photos[i] for i in order]
    face_ids = [f"face-{i}" for i in range(len(order))]
    return emb_arr, np.full(len(order), 0.95, dtype=np.float32), face_ids, photo_ids, who_arr


def test_template_picks_the_owner() -> None:
    emb, w, face_ids, photo_ids, who = _profile(owner_photos=6, n_photos=8, seed=1, extra_people=2)
    t = build_owner_template(emb, w, face_ids, photo_ids, min_weight=0.5, config=SYNTH)
    assert isinstance(t, Template)
    owner_faces = {f for f, p in zip(face_ids, who, strict=True) if p == 0}
    assert set(t.face_ids) == owner_faces and t.size == 6
    assert len(set(t.photo_ids)) == t.size  # one vector per photo at most
    assert t.vectors.shape == (6, D) and np.allclose(np.linalg.norm(t.vectors, axis=1), 1.0, atol=1e-5)
    assert t.n_photos == 8 and t.n_faces == len(face_ids) and t.runner_up_size <= 2
    assert 0.6 < t.density < 0.9  # synthetic faces of one person: cosine ≈ 0.75


def test_template_drops_low_weight_faces() -> None:
    emb, w, face_ids, photo_ids, who = _profile(owner_photos=6, n_photos=6, seed=2)
    owner_idx = np.flatnonzero(who == 0)
    w[owner_idx[:2]] = 0.1  # two owner faces at extreme angles
    t = build_owner_template(emb, w, face_ids, photo_ids, min_weight=0.5, config=SYNTH)
    assert isinstance(t, Template)
    assert set(t.face_ids) == {face_ids[i] for i in owner_idx[2:]}
    assert np.all(t.weights >= 0.5)


def test_template_looks_at_the_first_30_photos_only() -> None:
    # Photos 0-29 (newest): the owner on 15 of them; photos 30-59: someone else on every one.
    people = make_identities(2, 40, d=D, seed=3)
    strangers = make_identities(30, 1, d=D, seed=4).embeddings
    emb, photos = [], []
    for p in range(30):
        emb.append(people.embeddings[p] if p < 15 else strangers[p])
        photos.append(f"p{p}")
    for p in range(30, 60):
        emb.append(people.embeddings[40 + p - 30])
        photos.append(f"p{p}")
    x = np.stack(emb)
    faces = [f"f{i}" for i in range(60)]
    w = np.ones(60)
    t = build_owner_template(x, w, faces, photos, min_weight=0.5, max_photos=30, config=SYNTH)
    assert isinstance(t, Template) and set(t.face_ids) == {f"f{i}" for i in range(15)}
    everything = build_owner_template(x, w, faces, photos, min_weight=0.5, max_photos=60, config=SYNTH)
    assert isinstance(everything, Template) and everything.size == 30 and "f45" in everything.face_ids


def test_no_template_reasons() -> None:
    empty = build_owner_template(np.zeros((0, D)), np.zeros(0), [], [], min_weight=0.5, config=SYNTH)
    assert empty == NoTemplate(NoTemplateReason.NO_FACES)

    emb, w, face_ids, photo_ids, _ = _profile(owner_photos=5, n_photos=5, seed=5)
    low = build_owner_template(emb, np.full(len(w), 0.2), face_ids, photo_ids, min_weight=0.5, config=SYNTH)
    assert isinstance(low, NoTemplate) and low.reason is NoTemplateReason.ALL_LOW_QUALITY

    # Every photo shows someone different: no cluster is the owner.
    strangers = make_identities(6, 1, d=D, seed=6).embeddings
    photos = [f"p{i}" for i in range(6)]
    none = build_owner_template(strangers, np.ones(6), photos, photos, min_weight=0.5, config=SYNTH)
    assert isinstance(none, NoTemplate) and none.reason is NoTemplateReason.NO_DOMINANT_CLUSTER
    assert (none.n_photos, none.n_faces) == (6, 6)

    # The owner on 2 of 8 photos is below the 40% share.
    emb, w, face_ids, photo_ids, _ = _profile(owner_photos=2, n_photos=8, seed=7)
    rare = build_owner_template(emb, w, face_ids, photo_ids, min_weight=0.5, config=SYNTH)
    assert isinstance(rare, NoTemplate) and rare.reason is NoTemplateReason.NO_DOMINANT_CLUSTER

    # Two people on 3 photos each, nothing else: a tie that density does not settle clearly.
    pair = make_identities(2, 3, d=D, seed=8)
    photos = ["a", "b", "c", "d", "e", "f"]
    tie_cfg = TemplateConfig(threshold=CLUSTER_THRESHOLD, tie_density_margin=0.5)
    tied = build_owner_template(pair.embeddings, np.ones(6), photos, photos, min_weight=0.5, config=tie_cfg)
    assert isinstance(tied, NoTemplate) and tied.reason is NoTemplateReason.TIED_CLUSTERS
    # With no margin the denser one wins.
    winner = build_owner_template(
        pair.embeddings, np.ones(6), photos, photos, 0.5, config=TemplateConfig(threshold=1.0, tie_density_margin=0)
    )
    assert isinstance(winner, Template) and winner.size == 3

    # Single linkage chains loose clusters; the density floor refuses them.
    emb, w, face_ids, photo_ids, _ = _profile(owner_photos=6, n_photos=6, seed=9)
    strict = TemplateConfig(threshold=CLUSTER_THRESHOLD, min_density=0.95)
    loose = build_owner_template(emb, w, face_ids, photo_ids, 0.5, config=strict)
    assert isinstance(loose, NoTemplate) and loose.reason is NoTemplateReason.LOW_DENSITY

    with pytest.raises(ValueError, match="inconsistent"):
        build_owner_template(emb, w[:-1], face_ids, photo_ids, 0.5)


# -- suggestions -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def codec() -> bytes:
    """The published index's trained codec (OPQ32,PQ32x8np on 64-d: 8x), trained on other people."""
    population = make_identities(2_000, 5, d=D, seed=100)
    cfg = fi.IndexConfig(train_size=10_000, opq_niter=2, opq_train_size=10_000, pq_niter=8, seed=0, threads=1)
    return fi.train(population.embeddings, cfg)


@pytest.fixture(scope="module")
def people() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """120 people: a 3-vector template each; returns their centres and templates by user id."""
    data = make_identities(120, 3, d=D, seed=200)
    templates = {f"user-{i}": data.embeddings[i * 3 : i * 3 + 3] for i in range(120)}
    return data.centres, templates


class CountingProvider:
    def __init__(self, friends: Mapping[str, list[str]], templates: Mapping[str, np.ndarray]) -> None:
        self.friends, self.templates, self.calls = friends, templates, 0

    def __call__(self, uploader_id: str) -> dict[str, np.ndarray]:
        self.calls += 1
        return {f: self.templates[f] for f in self.friends[uploader_id]}


def test_true_friend_is_in_top5(codec: bytes, people: tuple[np.ndarray, dict[str, np.ndarray]]) -> None:
    centres, templates = people
    friends = [f"user-{i}" for i in range(60)]
    cache = FriendIndexCache(codec, CountingProvider({"me": friends}, templates))
    who = np.repeat(np.arange(60), 3)
    faces = sample_faces(centres, who, noise=0.55, seed=1)  # new photos of the friends
    results = cache.suggest("me", faces)
    assert all(1 <= len(r) <= 5 for r in results)
    in_top5 = np.mean([f"user-{w}" in {c.user_id for c in r} for w, r in zip(who, results, strict=True)])
    top1 = np.mean([r[0].user_id == f"user-{w}" for w, r in zip(who, results, strict=True)])
    assert in_top5 >= 0.98 and top1 >= 0.9, (in_top5, top1)
    for r in results:
        assert [c.distance for c in r] == sorted(c.distance for c in r)
        assert len({c.user_id for c in r}) == len(r)


def _calibrate(centres: np.ndarray, templates: dict[str, np.ndarray], ids: range) -> float:
    faces = sample_faces(centres, np.asarray(list(ids)), noise=0.55, seed=2)
    genuine = [best_distances(f, templates[f"user-{i}"]) for f, i in zip(faces, ids, strict=True)]
    impostor = [
        best_distances(f, templates[f"user-{j}"]) for f, i in zip(faces, ids, strict=True) for j in ids if j != i
    ]
    return calibrate_threshold(np.asarray(genuine), np.asarray(impostor), target_far=0.001).threshold


def test_verification_rejects_non_friends(codec: bytes, people: tuple[np.ndarray, dict[str, np.ndarray]]) -> None:
    centres, templates = people
    threshold = _calibrate(centres, templates, range(60, 120))  # calibrated on other people
    friends = [f"user-{i}" for i in range(30)]
    cache = FriendIndexCache(codec, CountingProvider({"me": friends}, templates))
    friend_faces = sample_faces(centres, np.arange(30), noise=0.55, seed=3)
    stranger_faces = sample_faces(centres, np.arange(30, 60), noise=0.55, seed=4)  # people, not friends
    friend_checks = cache.suggest_and_verify("me", friend_faces, threshold)
    stranger_checks = cache.suggest_and_verify("me", stranger_faces, threshold)
    # A stranger still gets 5 nearest friends from search; verification turns them all down.
    assert all(len(v) == 5 for v in stranger_checks)
    assert not any(v.accepted for checks in stranger_checks for v in checks)
    accepted_right = [checks[0].accepted and checks[0].user_id == f"user-{i}" for i, checks in enumerate(friend_checks)]
    assert np.mean(accepted_right) >= 0.95
    wrong = sum(v.accepted and v.user_id != f"user-{i}" for i, checks in enumerate(friend_checks) for v in checks)
    assert wrong <= 0.02 * 30 * 5  # false accepts among the 150 candidate checks


def test_verify_on_uncompressed_templates() -> None:
    template = np.eye(4, dtype=np.float32)[:2]  # two unit vectors
    face = np.array([1.0, 0.1, 0.0, 0.0], dtype=np.float32)
    unit = face / np.linalg.norm(face)
    near = float(np.linalg.norm(unit - template[0]))
    result = verify(face, {"a": template, "b": np.eye(4, dtype=np.float32)[2:]}, threshold=0.5)
    assert [v.user_id for v in result] == ["a", "b"]
    assert result[0].distance == pytest.approx(near) and result[0].accepted
    assert result[1].distance == pytest.approx(np.sqrt(2)) and not result[1].accepted
    with pytest.raises(ValueError, match="at most 5"):
        verify(face, {str(i): template for i in range(6)}, 0.5)


def test_calibrate_threshold_by_hand() -> None:
    genuine = np.array([0.2, 0.3, 0.5])
    impostor = np.array([0.9, 0.4, 1.0, 0.8])
    # 25% FAR on 4 impostors allows one false accept (0.4): the cut sits just under 0.8.
    c = calibrate_threshold(genuine, impostor, target_far=0.25)
    assert 0.79999 < c.threshold < 0.8 and c.far == 0.25 and c.frr == 0.0
    # No false accepts allowed: just under 0.4, and the genuine 0.5 is rejected.
    c = calibrate_threshold(genuine, impostor, target_far=0.0)
    assert 0.39999 < c.threshold < 0.4 and c.far == 0.0 and c.frr == pytest.approx(1 / 3)
    assert (c.n_genuine, c.n_impostor) == (3, 4)
    with pytest.raises(ValueError):
        calibrate_threshold(genuine, np.array([]), 0.1)


def test_cache_hits_on_a_burst_and_expires(codec: bytes, people: tuple[np.ndarray, dict[str, np.ndarray]]) -> None:
    centres, templates = people
    provider = CountingProvider({"me": ["user-1", "user-2"], "you": ["user-3"], "them": []}, templates)
    now = [1000.0]
    cache = FriendIndexCache(codec, provider, ttl_s=60, max_entries=2, clock=lambda: now[0])
    face = sample_faces(centres, np.array([1]), seed=5)
    for _ in range(5):  # one upload burst: five photos in a few seconds
        assert cache.suggest("me", face)[0][0].user_id == "user-1"
        now[0] += 2
    assert provider.calls == 1
    s = cache.stats
    assert (s.hits, s.misses, s.expired, s.entries) == (4, 1, 0, 1)
    now[0] += 61  # a quiet spell longer than the TTL: rebuilt from fresh templates
    cache.suggest("me", face)
    assert provider.calls == 2 and cache.stats.expired == 1
    cache.suggest("you", face)
    assert cache.suggest("them", face) == [[]]  # no friend has a template
    assert cache.stats.evicted == 1 and cache.stats.entries == 2  # "me" was least recent
    cache.suggest("me", face)
    assert provider.calls == 5
    cache.invalidate("me")
    cache.suggest("me", face)
    assert provider.calls == 6


def test_cache_reuses_a_built_index_codebook(codec: bytes, people: tuple[np.ndarray, dict[str, np.ndarray]]) -> None:
    _, templates = people
    published = fi.deserialize(codec)
    everyone = np.concatenate(list(templates.values()))
    published.add_with_ids(everyone, np.repeat(np.arange(120), 3))
    friends = {f"user-{i}": templates[f"user-{i}"] for i in range(4)}
    built = build_friend_index(published, friends)
    assert published.ntotal == 360  # the published index is left alone
    assert built.n_vectors == 12 and built.index is not None and built.index.ntotal == 12
    assert built.friend_ids == tuple(friends)
    np.testing.assert_allclose(built.templates["user-2"], templates["user-2"], atol=1e-6)
    with pytest.raises(ValueError, match="64-d"):
        build_friend_index(codec, {"x": np.ones((1, 32))})


# -- real faces --------------------------------------------------------------------------------


def _pairs(file: str, column: str) -> list[tuple[str, str, bool]]:
    with open(DATA / "faces" / "deepface" / file, newline="") as f:
        return [
            (r["file_x"].rsplit("/", 1)[-1], r["file_y"].rsplit("/", 1)[-1], r[column] == "Yes")
            for r in csv.DictReader(f)
        ]


@pytest.mark.slow
def test_real_faces_template_and_verification() -> None:
    if not (DATA / "faces" / "deepface" / "master.csv").exists():
        pytest.skip(f"real test photos not found under {DATA}")
    calib = _pairs("master.csv", "Decision")
    seen = {frozenset(p[:2]) for p in calib}
    held_out = [p for p in _pairs("face-recognition-pivot.csv", "decision") if frozenset(p[:2]) not in seen]
    names = sorted({n for a, b, _ in calib + held_out for n in (a, b)})
    emb = dlib_embeddings(names)

    def distances(pairs: list[tuple[str, str, bool]], same: bool) -> np.ndarray:
        return np.array([best_distances(emb[a], emb[b]) for a, b, y in pairs if y == same and a in emb and b in emb])

    c = calibrate_threshold(distances(calib, True), distances(calib, False), target_far=0.01)
    gen, imp = distances(held_out, True), distances(held_out, False)
    assert len(gen) >= 20 and len(imp) >= 20
    far, frr = float(np.mean(imp <= c.threshold)), float(np.mean(gen > c.threshold))
    assert far <= 0.03 and frr <= 0.05, (c, far, frr)

    # A profile: one person on 7 photos (img1, 2, 4, 5, 6, 7, 10 are the same man per master.csv),
    # plus 3 photos of other people: the template is exactly his 7 faces, with default settings.
    owner = ["img1.jpg", "img2.jpg", "img4.jpg", "img5.jpg", "img6.jpg", "img7.jpg", "img10.jpg"]
    others = ["img3.jpg", "img13.jpg", "img22.jpg"]
    profile = [n for n in owner + others if n in emb]
    x = np.stack([emb[n] for n in profile])
    t = build_owner_template(x, np.ones(len(profile)), profile, profile, min_weight=0.5)
    assert isinstance(t, Template), t
    assert set(t.face_ids) == {n for n in owner if n in emb}
