"""The tissue-composition measure: exact on drawn slices, blind to real vs real, and flagging wrong tissue."""

import numpy as np
import pytest

import dataset
import metrics
import phantoms
from conftest import REAL_DATA

SIZE = 128
POSITIONS = range(4, 28, 3)  # 8 slices a subject, from low to high in the head


def phantom_set(subjects, **change):
    """Phantom slices (N, SIZE, SIZE, 1) in [0, 1], each subject's anatomy parameters changed by `change`."""
    changed = {key: (lambda v, f=f: f(v)) if callable(f) else (lambda v, f=f: f) for key, f in change.items()}

    original = phantoms.phantom_subject

    def subject(s):
        p = original(s)
        return {**p, **{key: f(p[key]) for key, f in changed.items()}}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(phantoms, "phantom_subject", lambda s, seed=0: subject(s))
        slices = [phantoms.phantom_slice(s, z, size=SIZE) for s in subjects for z in POSITIONS]
    return (np.stack(slices)[..., None] / 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def fitted():
    """The measure fitted on 30 training subjects, and two disjoint sets of 12 others (96 slices each)."""
    tissue = metrics.TissueComposition().fit(phantom_set(range(100, 130)))
    return tissue, phantom_set(range(0, 12)), phantom_set(range(12, 24))


def drawn(levels, width=32, jitter=0.0):
    """A 32 x `width` slice of vertical bands at `levels` (0 is background), as (1, 32, width, 1).

    Levels of 0.12 and up are brain (after `brain_mask`'s 3x3 smoothing, a background pixel beside 0.12
    stays below its threshold); `jitter` spreads each brain pixel by up to that much.
    """
    bands = np.tile(np.repeat(np.asarray(levels, np.float32), width // len(levels)), (32, 1))
    spread = np.random.default_rng(0).uniform(-jitter, jitter, bands.shape).astype(np.float32)
    return np.where(bands > 0, bands + spread, 0)[None, ..., None]


def test_classes_and_fractions_are_exact_on_a_drawn_slice():
    tissue = metrics.TissueComposition()
    tissue.thresholds = (0.3, 0.6)
    # background | CSF | grey | white | white | grey | CSF | background: symmetric about its centre.
    image = drawn([0, 0.12, 0.45, 0.8, 0.8, 0.45, 0.12, 0])
    np.testing.assert_array_equal(tissue.classes(image)[0, 0], np.repeat([0, 1, 2, 3, 3, 2, 1, 0], 4))
    csf, grey, white, area, symmetry = tissue(image)[0]
    assert (csf, grey, white) == (1 / 3, 1 / 3, 1 / 3) and area == 0.75 and symmetry == 1.0


def test_symmetry_is_about_the_brain_midline_wherever_the_brain_lies():
    tissue = metrics.TissueComposition()
    tissue.thresholds = (0.3, 0.6)
    off_centre = drawn([0.12, 0.45, 0.8, 0.45, 0.12, 0, 0, 0], width=40)  # symmetric, in the left half
    lopsided = drawn([0.12, 0.45, 0.8, 0.8, 0.12, 0, 0, 0], width=40)  # white where grey should be
    assert tissue(off_centre)[0, 4] == 1.0
    assert tissue(lopsided)[0, 4] == pytest.approx(0.6)  # the grey band and its mirror do not match


def test_fit_finds_three_intensity_classes_and_refuses_a_blank_set():
    tissue = metrics.TissueComposition().fit(drawn([0, 0.2, 0.45, 0.8, 0.8, 0.45, 0.2, 0], jitter=0.03))
    step = (0.83 - 0.17) / 256  # multi-Otsu thresholds are centres of 256 histogram bins: within one of the gaps
    low, high = tissue.thresholds
    assert 0.23 - step < low < 0.42 + step and 0.48 - step < high < 0.77 + step, tissue.thresholds
    with pytest.raises(ValueError, match="at least 3 intensities"):
        metrics.TissueComposition().fit(np.zeros((2, 32, 32, 1), np.float32))
    assert (tissue(np.zeros((1, 32, 32, 1), np.float32)) == 0).all()  # a blank slice: flagged, never NaN
    with pytest.raises(RuntimeError, match="call .fit"):
        metrics.TissueComposition()(drawn([0, 0.5]))


def test_a_normal_phantom_set_stays_within_twice_the_floor(fitted):
    tissue, reference, floor = fitted
    scores = tissue.compare(reference, phantom_set(range(24, 36)), floor)
    assert scores["worst_ratio"] < 2, scores
    assert set(scores) >= {f"{name}{end}" for name in metrics.TISSUE_FEATURES for end in ("", "_floor", "_mean")}


@pytest.mark.parametrize("wrong, flagged", [
    (dict(ventricles=lambda v: 3 * v), "csf"),  # enlarged ventricles: too much CSF
    (dict(wm=lambda v: v - 0.12), "white"),  # white matter darkened towards grey
    (dict(gm=lambda v: v + 0.12), "grey"),  # grey matter brightened towards white
    (dict(ax=lambda v: 0.8 * v), "brain_area"),  # narrow heads
])
def test_wrong_tissue_phantoms_are_flagged(fitted, wrong, flagged):
    tissue, reference, floor = fitted
    scores = tissue.compare(reference, phantom_set(range(24, 36), **wrong), floor)
    assert scores[flagged] > 3 * scores[f"{flagged}_floor"], scores


def test_a_missing_hemisphere_breaks_the_symmetry(fitted):
    tissue, reference, floor = fitted
    halved = phantom_set(range(24, 36))
    halved[:, :, SIZE // 2 + 6:] = 0  # the right hemisphere cut away past the midline
    scores = tissue.compare(reference, halved, floor)
    assert scores["symmetry"] > 3 * scores["symmetry_floor"] and scores["symmetry_mean"] < 0.6, scores


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real data not present at {REAL_DATA}")
def test_on_real_slices_real_sets_agree_and_a_darkened_white_matter_is_flagged():
    source = dataset.load_source(str(REAL_DATA), seed=0)

    def load(split, picks):
        return np.concatenate([b.numpy() for b in dataset.make_dataset(split.take(np.sort(picks)), image_size=SIZE,
                                                                       batch_size=64)])

    order = np.random.default_rng(0).permutation(len(source.splits["train"]))
    train, other = (load(source.splits["train"], picks) for picks in (order[:300], order[300:450]))
    validate, test = (load(source.splits[name], np.random.default_rng(1).permutation(len(source.splits[name]))[:150])
                      for name in ("validate", "test"))
    tissue = metrics.TissueComposition().fit(train)  # `other`: training slices it was not fitted on
    real = tissue.compare(test, validate, floor=other)
    assert real["worst_ratio"] < 2, real
    darkened = np.where(metrics.brain_mask(validate).numpy(), validate * 0.9, validate)
    assert tissue.compare(test, darkened, floor=other)["white"] > 3 * real["white_floor"]
