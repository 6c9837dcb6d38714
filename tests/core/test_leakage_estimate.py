"""The leakage estimate's record: what it accepts, and that it stays torch-free for the aggregator."""
import json
import math
import subprocess
import sys
from typing import get_args

import pytest

from gradguard import config
from gradguard.leakage import THREATS, LeakageEstimate

VOLUME = LeakageEstimate(threat="malicious_server", estimators=("noised_input_bound",), target_db=2.0,
                         psnr_above_prior_max=1.5, psnr_above_prior_mean=1.0, ssim_above_prior_max=math.nan,
                         ssim_above_prior_mean=math.nan, amplitude_max=0.4, amplitude_mean=0.2, samples=2,
                         noised_samples=2, met=True)


def test_the_threats_are_the_configs():
    assert THREATS == get_args(config.Threat)


def test_an_ssim_not_computed_round_trips_through_strict_json():
    data = json.loads(json.dumps(VOLUME.to_dict(), allow_nan=False))
    assert data["ssim_above_prior_max"] is None
    back = LeakageEstimate.from_dict(data)
    assert math.isnan(back.ssim_above_prior_max) and back.to_dict() == VOLUME.to_dict()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("threat", "neighbour", "threat 'neighbour' is not one of"),
    ("noised_samples", 3, r"noised_samples \(3\) must be at most samples \(2\)"),
    ("amplitude_max", -0.5, "amplitude_max must be finite and >= 0"),
    ("target_db", "inf", "target_db must be finite and > 0"),
    ("psnr_above_prior_max", None, "psnr_above_prior_max must be a number"),  # only an SSIM may be absent
])
def test_from_dict_refuses_an_out_of_range_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        LeakageEstimate.from_dict({**VOLUME.to_dict(), field: value})


def test_the_record_loads_without_torch():
    code = "import sys, gradguard.leakage; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
