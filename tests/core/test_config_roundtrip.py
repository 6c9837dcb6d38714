"""A config written with an update reads back as the same config."""
import json

from gradguard import GuardConfig


def test_a_config_reads_back_from_what_it_wrote():
    config = GuardConfig.preset("fundus", total_rounds=7, dp_noise_multiplier=0.5)
    assert GuardConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    public = GuardConfig.from_dict(config.public_dict())
    assert public == config.with_(seed=None) and public.seed is None
