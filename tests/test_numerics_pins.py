"""Numerics pins (qsim/pins.py): a commit that changes any number qsim computes fails here
until NUMERICS_VERSION is bumped and the pins are rewritten together, so results made
under the old numbers are recognised as stale instead of being reused or tabled."""
import functools
import json

import pytest

from qsim import NUMERICS_VERSION, pins

HINT = pins.BUMP_HINT


@pytest.fixture(scope="module")
def pinned():
    saved = pins.load()
    assert saved is not None, f"{pins.PIN_FILE} is missing: run `python -m qsim.pins --update`"
    return saved


@pytest.fixture(scope="module")
def exact_now():
    with pins._one_thread():
        return {**pins.format_pins(), **pins.quantizer_pins(), **pins.accum_pins()}


def test_the_pin_file_is_for_this_numerics_version(pinned):
    assert pinned["numerics_version"] == NUMERICS_VERSION, (
        f"qsim.NUMERICS_VERSION is {NUMERICS_VERSION} but {pins.PIN_FILE.name} was made under "
        f"{pinned['numerics_version']}: run `python -m qsim.pins --update`")
    assert pinned["rel_tol"] == pins.REL_TOL


def test_every_format_and_quantizer_setting_is_pinned_bit_exactly(pinned, exact_now):
    moved = pins.changed(pinned, {"exact": exact_now})
    assert not moved, "numerics changed:\n  " + "\n  ".join(moved) + "\n" + HINT
    missing = sorted(set(exact_now) - set(pinned["exact"]))
    gone = sorted(set(pinned["exact"]) - set(exact_now))
    assert not missing and not gone, f"pins to add {missing[:5]} / remove {gone[:5]}: run `python -m qsim.pins --update`"


def test_every_method_preset_is_pinned(pinned):
    wanted = {f"method/{p}/{m}" for p in pins.method_presets() for m in pins.PIN_MODELS}
    assert wanted == set(pinned["approx"]), "a method preset was added or removed: run `python -m qsim.pins --update`"


@functools.cache
def one_thread_method_pins(preset: str) -> dict:
    """A preset's numbers under one thread, as pins are made (the thread test compares to these)."""
    with pins._one_thread():
        return pins.method_pins([preset])


@pytest.mark.parametrize("preset", pins.method_presets())
def test_method_preset_on_tiny_models_matches_its_pin(preset, pinned):
    now = one_thread_method_pins(preset)
    configs = pins.method_configs([preset])
    assert set(configs) <= set(pinned["approx_config"]), "run `python -m qsim.pins --update`"
    assert all(pinned["approx_config"][k] == v for k, v in configs.items()), (
        f"the {preset} preset's config changed: run `python -m qsim.pins --update` (a new pin, no bump)")
    moved = pins.changed(pinned, {"approx": now})
    assert not moved, "numerics changed:\n  " + "\n  ".join(moved) + "\n" + HINT
    assert set(now) <= set(pinned["approx"]), "run `python -m qsim.pins --update`"


# ------------------------------------------------------------ the thread count moves nothing
# MKL's strict mode (qsim/__init__.py), qsim.reductions and the QAT LayerNorm gradients make every
# number independent of the thread count. 3 threads on this 2-core machine split work differently
# from 1 and 2; `make test` also runs whole with OMP_NUM_THREADS=1 (the README's contract).

def test_format_and_quantizer_bits_do_not_depend_on_the_thread_count(exact_now):
    with pins.threads(3):
        now = {**pins.format_pins(), **pins.quantizer_pins(), **pins.accum_pins()}
    assert [k for k in exact_now if exact_now[k] != now[k]] == []


# The presets whose statistics, searches or training reduce over many elements.
THREAD_PRESETS = ["abfp-qat", "gptq-abfp", "smoothquant", "mse", "rptq", "mofq", "fpt", "gptq-lorc", "rotate-gptq"]


@pytest.mark.parametrize("preset", THREAD_PRESETS)
def test_method_numbers_do_not_depend_on_the_thread_count(preset):
    with pins.threads(3):
        three = pins.method_pins([preset])
    assert one_thread_method_pins(preset) == three  # bit for bit, not within a band


# ------------------------------------------------------------ the update rule


def _write_pins(path, version, exact, approx):
    path.write_text(json.dumps({"numerics_version": version, "rel_tol": pins.REL_TOL, "exact": exact, "approx": approx}))


def test_update_refuses_a_changed_value_without_a_version_bump(tmp_path):
    path = tmp_path / "pins.json"
    _write_pins(path, 3, {"format/x": "aa"}, {"method/m/tiny-opt": 7.0})
    for now in ({"exact": {"format/x": "bb"}, "approx": {"method/m/tiny-opt": 7.0}},
                {"exact": {"format/x": "aa"}, "approx": {"method/m/tiny-opt": 7.0 * (1 + 3e-5)}}):
        with pytest.raises(pins.PinError, match="bump NUMERICS_VERSION in qsim/__init__.py to 4"):
            pins.update(now, version=3, path=path)
        assert json.loads(path.read_text())["exact"] == {"format/x": "aa"}  # untouched
        with pytest.raises(pins.PinError, match="below"):
            pins.update(now, version=2, path=path)
    # within the band, a new pin, or a bump: written
    within = {"exact": {"format/x": "aa", "format/new": "cc"}, "approx": {"method/m/tiny-opt": 7.0 * (1 + 5e-6)}}
    assert "0 changed, 1 added" in pins.update(within, version=3, path=path)
    bumped = {"exact": {"format/x": "bb", "format/new": "cc"}, "approx": {"method/m/tiny-opt": 7.5}}
    message = pins.update(bumped, version=4, path=path)
    assert "2 changed" in message and "numerics version 3 -> 4" in message
    saved = json.loads(path.read_text())
    assert saved["numerics_version"] == 4 and saved["exact"]["format/x"] == "bb" and saved["approx"]["method/m/tiny-opt"] == 7.5


def test_a_preset_whose_config_changed_gets_a_new_pin_without_a_bump(tmp_path):
    """A new value under a new config digest is a new pin; the same digest with a moved value is not."""
    path = tmp_path / "pins.json"
    path.write_text(json.dumps({"numerics_version": 3, "rel_tol": pins.REL_TOL, "exact": {},
                                "approx": {"method/m/tiny-opt": 7.0}, "approx_config": {"method/m/tiny-opt": "aaaa"}}))
    with pytest.raises(pins.PinError, match="bump NUMERICS_VERSION"):
        pins.update({"exact": {}, "approx": {"method/m/tiny-opt": 7.5},
                     "approx_config": {"method/m/tiny-opt": "aaaa"}}, version=3, path=path)
    message = pins.update({"exact": {}, "approx": {"method/m/tiny-opt": 7.5},
                           "approx_config": {"method/m/tiny-opt": "bbbb"}}, version=3, path=path)
    assert "0 changed" in message and "1 with a new config" in message
    saved = json.loads(path.read_text())
    assert saved["approx"]["method/m/tiny-opt"] == 7.5 and saved["approx_config"]["method/m/tiny-opt"] == "bbbb"
