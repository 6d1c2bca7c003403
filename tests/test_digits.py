"""Heavier checks of sit_workbench.digits: the cached judge (round trip, staleness, corruption), determinism of
training for a fixed seed, the 97% accuracy bar and robustness to the small defects of generated samples."""
import json

import pytest
import torch
import torch.nn.functional as F

import sit_workbench.digits as D
from sit_workbench.digits import (CLASSIFIER_VERSION, SIDECAR_NAME, WEIGHTS_NAME, classifier_accuracy,
                                  digits_arrays, load_or_train_classifier, train_classifier)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    "The classifier from `load_or_train_classifier` on an empty cache named by $SIT_WORKBENCH_CACHE (one real training)."
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIT_WORKBENCH_CACHE", str(root))
        clf = load_or_train_classifier()
    return root, clf


def test_accuracy_at_least_97_percent(cached):
    _, clf = cached
    acc = classifier_accuracy(clf, *digits_arrays("test"))
    assert acc >= 0.97, acc
    assert acc == clf.test_accuracy


def test_robust_to_noise_and_one_pixel_shifts(cached):
    _, clf = cached
    x, y = digits_arrays("test")
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert classifier_accuracy(clf, noisy, y) >= 0.95
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    for i in range(3):
        for j in range(3):
            assert classifier_accuracy(clf, padded[..., i:i + 8, j:j + 8], y) >= 0.93, (i - 1, j - 1)


def test_cache_round_trip(cached, monkeypatch):
    root, clf = cached
    assert (root / WEIGHTS_NAME).is_file()
    info = json.loads((root / SIDECAR_NAME).read_text())
    assert info["version"] == CLASSIFIER_VERSION and info["test_accuracy"] == clf.test_accuracy

    def no_training(*a, **k):
        raise AssertionError("trained although the cache was valid")
    monkeypatch.setattr(D, "train_classifier", no_training)
    monkeypatch.setenv("SIT_WORKBENCH_CACHE", str(root))
    again = load_or_train_classifier()
    assert _same_weights(again, clf) and again.test_accuracy == clf.test_accuracy and not again.training
    assert _same_weights(load_or_train_classifier(cache_dir=root), clf)
    assert sorted(p.name for p in root.iterdir()) == sorted([WEIGHTS_NAME, SIDECAR_NAME])  # no temporary leftovers


@pytest.mark.parametrize("damage", ["version", "no_sidecar", "no_weights", "truncated", "weights_version"])
def test_cache_retrains_when_missing_stale_or_corrupt(cached, tmp_path, monkeypatch, damage):
    root, clf = cached
    for name in (WEIGHTS_NAME, SIDECAR_NAME):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    calls = []
    def fake_train(seed=0, **kw):
        calls.append(seed)
        return clf
    monkeypatch.setattr(D, "train_classifier", fake_train)
    monkeypatch.setenv("SIT_WORKBENCH_CACHE", str(tmp_path))
    if damage == "version":
        (tmp_path / SIDECAR_NAME).write_text(json.dumps({"version": CLASSIFIER_VERSION - 1, "test_accuracy": 1.0}))
    elif damage == "no_sidecar":
        (tmp_path / SIDECAR_NAME).unlink()
    elif damage == "no_weights":
        (tmp_path / WEIGHTS_NAME).unlink()
    elif damage == "truncated":
        (tmp_path / WEIGHTS_NAME).write_bytes((root / WEIGHTS_NAME).read_bytes()[:1000])
    elif damage == "weights_version":  # new sidecar, old weights
        monkeypatch.setattr(D, "CLASSIFIER_VERSION", CLASSIFIER_VERSION + 1)
        (tmp_path / SIDECAR_NAME).write_text(json.dumps({"version": CLASSIFIER_VERSION + 1, "test_accuracy": 1.0}))
    got = load_or_train_classifier()
    assert calls == [0]
    assert _same_weights(got, clf)
    # the rewritten cache is valid now: no second training
    assert _same_weights(load_or_train_classifier(), clf) and calls == [0]
    assert json.loads((tmp_path / SIDECAR_NAME).read_text())["version"] == D.CLASSIFIER_VERSION


def test_unwritable_cache_only_warns(cached, tmp_path, monkeypatch):
    _, clf = cached
    monkeypatch.setattr(D, "train_classifier", lambda seed=0, **kw: clf)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="could not cache"):
        got = load_or_train_classifier(cache_dir=blocker / "sub")
    assert _same_weights(got, clf)


def test_training_is_deterministic_for_a_seed():
    state = torch.random.get_rng_state()
    a = train_classifier(seed=0, epochs=2)
    b = train_classifier(seed=0, epochs=2)
    c = train_classifier(seed=1, epochs=2)
    assert _same_weights(a, b) and a.test_accuracy == b.test_accuracy
    assert not _same_weights(a, c)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
